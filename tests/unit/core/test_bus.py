import pytest

from pyvmm.core.bus import Bus, BusError


class Recorder:
    def __init__(self):
        self.writes = []

    def read(self, offset, size):
        return 0x1122334455667788 >> (8 * offset)

    def write(self, offset, size, value):
        self.writes.append((offset, size, value))


def test_dispatch_uses_offsets_relative_to_the_claim():
    bus, dev = Bus("pio", 1 << 16), Recorder()
    bus.register(0x3F8, 8, dev)
    bus.write(0x3FB, 1, 0x1FF)  # value is truncated to the access size
    assert dev.writes == [(3, 1, 0xFF)]
    assert bus.read(0x3F9, 1) == 0x77
    assert bus.read(0x3F8, 2) == 0x7788


def test_overlapping_claims_are_refused():
    bus = Bus("mmio", 1 << 32)
    bus.register(0x1000, 0x100, Recorder(), "a")
    for base, size in [(0x1000, 1), (0x10FF, 2), (0xF00, 0x101), (0x0, 0x2000)]:
        with pytest.raises(BusError, match="overlaps a"):
            bus.register(base, size, Recorder())
    bus.register(0x1100, 0x10, Recorder())  # adjacent is fine
    bus.register(0xF00, 0x100, Recorder())


def test_registration_outside_the_bus_is_refused():
    bus = Bus("pio", 1 << 16)
    with pytest.raises(BusError):
        bus.register(0xFFFF, 2, Recorder())
    with pytest.raises(BusError):
        bus.register(0x10, 0, Recorder())


def test_straddling_or_unclaimed_access_reads_ones_and_drops_writes():
    bus, dev = Bus("pio", 1 << 16), Recorder()
    bus.register(0x60, 1, dev)
    assert bus.read(0x60, 2) == 0xFFFF  # runs past the 1-byte claim
    assert bus.read(0x61, 4) == 0xFFFFFFFF
    bus.write(0x5F, 2, 0)
    bus.write(0x70, 1, 0)
    assert dev.writes == []


def test_unregister_releases_the_range():
    bus, dev = Bus("pio", 1 << 16), Recorder()
    claim = bus.register(0xC000, 0x100, dev)
    bus.unregister(claim)
    assert bus.find(0xC000) is None
    bus.register(0xC000, 0x100, Recorder())
