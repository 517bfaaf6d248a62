from hypothesis import given
from hypothesis import strategies as st

from pyvmm.core import layout
from pyvmm.core.bus import Bus
from pyvmm.devices.debugcon import DebugCon


def test_bytes_reach_the_sink_and_reads_detect():
    out = []
    bus = Bus("pio", 1 << 16)
    bus.register(layout.DEBUGCON_PORT, 1, DebugCon(out.append))
    for byte in b"Xen!\n":
        bus.write(layout.DEBUGCON_PORT, 1, byte)
    assert b"".join(out) == b"Xen!\n"
    assert bus.read(layout.DEBUGCON_PORT, 1) == 0xE9


@given(st.integers(-3, 3), st.sampled_from([0, 1, 2, 4, 8]), st.integers(0, 2**64 - 1))
def test_hostile_accesses(offset, size, value):
    out = []
    dev = DebugCon(out.append)
    dev.write(offset, size, value)
    assert out in ([], [bytes((value & 0xFF,))])
    result = dev.read(offset, size)
    assert 0 <= result < 1 << (8 * size) or size == 0
