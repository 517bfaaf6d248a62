"""The xen-platform PCI device: identity, BARs, the unplug/log port protocol, INTx."""

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.core import layout, ratelimit
from pyvmm.core.bus import Bus
from pyvmm.devices import pci
from pyvmm.xen.hv import xen_platform
from pyvmm.devices.pci import PciHost
from pyvmm.xen.hv.xen_platform import (
    FIXED_PORT_COUNT,
    LOG_LINE_MAX,
    UNPLUG_ALL_NICS,
    UNPLUG_IDE_SCSI_DISKS,
    UNPLUG_NVME_DISKS,
    XenPlatformDevice,
)

CF8 = layout.PCI_CONFIG_ADDRESS_PORT
CFC = layout.PCI_CONFIG_DATA_PORT
PORT = layout.XEN_PLATFORM_IO_PORT


class Irq:
    def __init__(self):
        self.level = False

    def set_level(self, asserted):
        self.level = asserted


class Machine:
    def __init__(self):
        self.pio = Bus("pio", 1 << 16)
        self.mmio = Bus("mmio", 1 << 48)
        self.lines = {}
        self.unplugs = []
        self.logs = []
        self.host = PciHost(self.pio, self.mmio, self._irq)
        self.pio.register(CF8, pci.CONFIG_PORT_COUNT, self.host)
        self.device = XenPlatformDevice(on_unplug=self.unplugs.append, on_log=self.logs.append)
        self.slot = self.host.add(self.device)
        self.pio.register(PORT, FIXED_PORT_COUNT, self.device.fixed_ports(), "xen-platform-fixed")

    def _irq(self, gsi):
        self.lines[gsi] = Irq()
        return self.lines[gsi]

    def cfg(self, register, size):
        self.pio.write(CF8, 4, 0x8000_0000 | self.slot << 11 | (register & 0xFC))
        return self.pio.read(CFC + (register & 3), size)


@pytest.fixture
def machine():
    return Machine()


def test_pci_identity(machine):
    assert machine.cfg(pci.VENDOR_ID, 2) == 0x5853
    assert machine.cfg(pci.DEVICE_ID, 2) == 0x0001
    assert machine.cfg(pci.REVISION_ID, 1) == 1
    assert machine.cfg(pci.CLASS_PROG, 1) == 0x00
    assert machine.cfg(0x0A, 2) == 0xFF80  # class 0xff, subclass 0x80
    assert machine.cfg(pci.SUBSYSTEM_VENDOR_ID, 2) == 0x5853
    assert machine.cfg(pci.SUBSYSTEM_ID, 2) == 0x0001
    assert machine.cfg(pci.INTERRUPT_PIN, 1) == 1
    assert machine.cfg(pci.INTERRUPT_LINE, 1) == layout.pci_intx_gsi(machine.slot, 0)


def test_bars(machine):
    io = machine.cfg(pci.BAR0, 4)
    assert io & 1
    mem = machine.cfg(pci.BAR0 + 4, 4)
    assert mem & 0xF == pci.BAR_MEM_PREFETCH  # 32-bit, prefetchable
    base = machine.device.bar_address(1)
    assert base == mem & ~0xF and base % (16 << 20) == 0
    assert layout.PCI_MMIO_START <= base and base + (16 << 20) <= layout.PCI_MMIO_END
    # Sizing: all-ones reads back the size mask; then the address is restored.
    for register, original, expected in ((pci.BAR0, io, 0xFFFF_FF01), (pci.BAR0 + 4, mem, 0xFF00_0008)):
        machine.pio.write(CF8, 4, 0x8000_0000 | machine.slot << 11 | register)
        machine.pio.write(CFC, 4, 0xFFFF_FFFF)
        assert machine.pio.read(CFC, 4) == expected
        machine.pio.write(CFC, 4, original)
    assert machine.device.bar_address(1) == base
    # BAR1 is plain address space until grant frames are mapped over it.
    machine.mmio.write(base + 0x1000, 4, 0xDEAD_BEEF)
    assert machine.mmio.read(base + 0x1000, 4) == 0
    assert machine.mmio.read(base + (16 << 20) - 8, 8) == 0


def test_linux_unplug_sequence(machine):
    pio = machine.pio
    assert pio.read(PORT, 2) == 0x49D2
    assert pio.read(PORT + 2, 1) == 1
    pio.write(PORT + 2, 2, 0x0003)  # Linux's product number
    pio.write(PORT, 4, 0x0001)  # driver version
    assert pio.read(PORT, 2) == 0x49D2  # not blacklisted
    pio.write(PORT, 2, UNPLUG_IDE_SCSI_DISKS | UNPLUG_ALL_NICS)
    assert machine.device.product_number == 3
    assert machine.device.driver_version == 1
    assert machine.unplugs == [UNPLUG_IDE_SCSI_DISKS | UNPLUG_ALL_NICS]
    pio.write(PORT, 2, UNPLUG_NVME_DISKS)
    assert machine.device.unplugged == UNPLUG_IDE_SCSI_DISKS | UNPLUG_ALL_NICS | UNPLUG_NVME_DISKS


def test_log_lines(machine):
    for byte in b"hello\r\nwor":
        machine.pio.write(PORT + 2, 1, byte)
    assert machine.logs == ["hello"]
    for byte in b"ld\n":
        machine.pio.write(PORT + 2, 1, byte)
    assert machine.logs == ["hello", "world"]
    for _ in range(LOG_LINE_MAX + 1):
        machine.pio.write(PORT + 2, 1, ord("x"))
    assert machine.logs[-1] == "x" * LOG_LINE_MAX
    machine.pio.write(PORT + 2, 1, 0xFF)
    machine.pio.write(PORT + 2, 1, 0x0A)
    assert machine.logs[-1] == "x\ufffd"


def test_platform_flags_and_other_reads(machine):
    pio = machine.pio
    pio.write(PORT, 1, 0xFF)
    assert pio.read(PORT, 1) == 1  # only ROM lock sticks
    assert pio.read(PORT + 1, 1) == 0xFF
    assert pio.read(PORT + 2, 2) == 0xFFFF
    assert pio.read(PORT, 4) == 0xFFFF_FFFF
    machine.device.reset()
    assert pio.read(PORT, 1) == 0


def test_bar0_registers(machine):
    pio = machine.pio
    io = machine.device.bar_address(0)
    pio.write(io, 1, 1)
    assert pio.read(io, 1) == 1
    assert pio.read(io + 1, 1) == 0xFF
    pio.write(io + 8, 1, ord("A"))
    pio.write(io + 8, 1, ord("\n"))
    assert machine.logs == ["A"]
    pio.write(io + 8, 1, 2)
    pio.write(io + 8, 1, 1)
    pio.write(io + 4, 1, 1)
    pio.write(io + 4, 1, 3)  # only 1 means unplug
    assert machine.unplugs == [UNPLUG_ALL_NICS, UNPLUG_IDE_SCSI_DISKS, UNPLUG_IDE_SCSI_DISKS | UNPLUG_ALL_NICS]


def test_callback_level_drives_inta(machine):
    line = machine.lines[layout.pci_intx_gsi(machine.slot, 0)]
    machine.device.set_callback_level(True)
    assert line.level is True
    assert machine.cfg(pci.STATUS, 2) & pci.STATUS_INTERRUPT
    machine.device.set_callback_level(False)
    assert line.level is False


@given(st.integers(-2, 20), st.sampled_from([0, 1, 2, 3, 4, 8]), st.integers(0, 2**64 - 1), st.integers(0, 2))
def test_hostile_accesses(offset, size, value, window):
    device = XenPlatformDevice(on_unplug=lambda mask: None, on_log=lambda line: None)
    if window == 2:
        target = device.fixed_ports()
        target.write(offset, size, value)
        result = target.read(offset, size)
    else:
        device.bar_write(window, offset, size, value)
        result = device.bar_read(window, offset, size)
    assert 0 <= result < 1 << (8 * size) or size == 0


def test_log_lines_cannot_drive_the_host_terminal(machine):
    for byte in b"\x1b[2Jred\x07\tend\x7f\n":
        machine.pio.write(PORT + 2, 1, byte)
    assert machine.logs == ["\\x1b[2Jred\\x07\\x09end\\x7f"]


# Full buckets and a clock that stands still: the bound cannot depend on the time taken.
STILL = ratelimit.LogRate(clock=lambda: 0.0)


def test_a_flood_of_log_lines_gives_a_bounded_log(caplog):
    # The guest decides how many lines it writes to port 0x12.
    device = XenPlatformDevice(log_rate=STILL)
    ports = device.fixed_ports()
    with caplog.at_level(logging.INFO, logger=xen_platform.__name__):
        for _ in range(100_000):
            ports.write(2, 1, ord("x"))
            ports.write(2, 1, 0x0A)
        for _ in range(100_000):
            ports.write(0, 2, UNPLUG_ALL_NICS)
    lines = [record for record in caplog.records if record.name == xen_platform.__name__]
    assert len(lines) == 2 * ratelimit.BURST
    assert all(len(record.getMessage()) < 2 * LOG_LINE_MAX for record in lines)


def test_a_long_line_is_cut(caplog):
    device = XenPlatformDevice(log_rate=STILL)
    with caplog.at_level(logging.INFO, logger=xen_platform.__name__):
        for _ in range(100 * LOG_LINE_MAX):
            device.fixed_ports().write(2, 1, ord("y"))
    lines = [record.getMessage() for record in caplog.records if record.name == xen_platform.__name__]
    assert lines and all(len(line) <= LOG_LINE_MAX + 100 for line in lines)


# --- snapshot ----------------------------------------------------------------------


def test_state_round_trips_through_json():
    import json

    lines, unplugs = [], []
    device = XenPlatformDevice(on_log=lines.append, on_unplug=unplugs.append)
    ports = device.fixed_ports()
    ports.write(0, 2, UNPLUG_ALL_NICS)
    ports.write(2, 2, 0xBEEF)
    ports.write(0, 4, 0x1234)
    ports.write(0, 1, 1)
    for byte in b"half a li":
        ports.write(2, 1, byte)
    state = json.loads(json.dumps(device.save_state()))
    new_lines, new_unplugs = [], []
    fresh = XenPlatformDevice(on_log=new_lines.append, on_unplug=new_unplugs.append)
    fresh.restore_state(state)
    assert (fresh.unplugged, fresh.product_number, fresh.driver_version) == (UNPLUG_ALL_NICS, 0xBEEF, 0x1234)
    assert fresh.fixed_ports().read(0, 1) == 1 and new_unplugs == []  # restored, not unplugged again
    for byte in b"ne\n":
        fresh.fixed_ports().write(2, 1, byte)
    assert new_lines == ["half a line"]  # the line the guest had begun goes on


@pytest.mark.parametrize("change", [
    {"version": 2}, {"platform_flags": 2}, {"unplugged": -1}, {"product_number": "x"},
    {"driver_version": 1 << 32}, {"log_buffer": "zz"}, {"log_buffer": "00" * LOG_LINE_MAX}, {"unplugged": True},
])
def test_bad_states_are_refused(change):
    from pyvmm.core.snapshot import SnapshotError

    state = dict(XenPlatformDevice().save_state(), **change)
    fresh = XenPlatformDevice()
    with pytest.raises(SnapshotError):
        fresh.restore_state(state)
    assert fresh.save_state() == XenPlatformDevice().save_state()
