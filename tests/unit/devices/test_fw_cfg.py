"""fw_cfg as SeaBIOS drives it: the port interface, the file directory, DMA."""

import struct

from hypothesis import given
from hypothesis import strategies as st

from pyvmm.core import layout
from pyvmm.core.bus import Bus
from pyvmm.core.memory import GuestMemory
from pyvmm.devices import fw_cfg
from pyvmm.devices.fw_cfg import FwCfg

PORT = layout.FW_CFG_PORT


def machine(dma=True):
    memory = GuestMemory([(0, 1 << 20)])
    device = FwCfg(memory if dma else None)
    bus = Bus("pio", 1 << 16)
    bus.register(PORT, fw_cfg.PORT_COUNT, device)
    return bus, device, memory


def port_read(bus, key, length):
    bus.write(PORT, 2, key)
    return bytes(bus.read(PORT + 1, 1) for _ in range(length))


def dma_start(bus, address):
    # What SeaBIOS does: outl(cpu_to_be32(address), 0x518).
    bus.write(PORT + 8, 4, int.from_bytes(address.to_bytes(4, "big"), "little"))


def dma(bus, memory, control, length, address, at=0x1000):
    memory.write(at, struct.pack(">IIQ", control, length, address))
    dma_start(bus, at)
    return struct.unpack(">I", memory.read(at, 4))[0]


def test_signature_and_id_through_the_ports():
    bus, _, _ = machine()
    assert port_read(bus, fw_cfg.SIGNATURE, 4) == b"QEMU"
    assert struct.unpack("<I", port_read(bus, fw_cfg.ID, 4))[0] == fw_cfg.ID_TRADITIONAL | fw_cfg.ID_DMA
    bus, _, _ = machine(dma=False)
    assert struct.unpack("<I", port_read(bus, fw_cfg.ID, 4))[0] == fw_cfg.ID_TRADITIONAL


def test_reading_past_the_end_gives_zeros_and_selecting_rewinds():
    bus, device, _ = machine()
    device.add_item(fw_cfg.NB_CPUS, struct.pack("<H", 3))
    assert port_read(bus, fw_cfg.NB_CPUS, 4) == b"\x03\x00\x00\x00"
    assert port_read(bus, fw_cfg.NB_CPUS, 2) == b"\x03\x00"
    assert port_read(bus, 0x1234, 3) == bytes(3)  # an unknown item is empty


def test_file_directory_lists_files_by_name():
    bus, device, _ = machine()
    b = device.add_file("etc/b", b"bee")
    a = device.add_file("etc/a", b"a" * 300)
    raw = port_read(bus, fw_cfg.FILE_DIR, 4 + 2 * 64)
    assert struct.unpack(">I", raw[:4])[0] == 2
    entries = [struct.unpack(">IHH56s", raw[4 + 64 * i : 4 + 64 * (i + 1)]) for i in range(2)]
    assert [(size, key, name.rstrip(b"\0")) for size, key, _, name in entries] == [
        (300, a, b"etc/a"), (3, b, b"etc/b")]
    assert port_read(bus, b, 3) == b"bee"


def test_bad_file_names_and_duplicates_are_refused():
    _, device, _ = machine()
    device.add_file("etc/x", b"")
    for name in ("", "x" * 56, "a\0b", "etc/x"):
        try:
            device.add_file(name, b"")
        except ValueError:
            continue
        raise AssertionError(f"{name!r} accepted")


def test_dma_signature_reads_back_in_port_order():
    bus, _, _ = machine()
    raw = b"".join(bus.read(PORT + 4 + i, 1).to_bytes(1, "little") for i in range(8))
    assert raw == b"QEMU CFG"
    assert bus.read(PORT + 4, 4).to_bytes(4, "little") == b"QEMU"


def test_dma_select_and_read_then_continue():
    bus, device, memory = machine()
    key = device.add_file("etc/e820", bytes(range(40)))
    status = dma(bus, memory, (key << 16) | fw_cfg.DMA_SELECT | fw_cfg.DMA_READ, 16, 0x2000)
    assert status == 0
    assert memory.read(0x2000, 16) == bytes(range(16))
    # Without SELECT the transfer continues where the last one stopped,
    # and past the end the buffer is zero-filled.
    memory.write(0x3000, b"\xAA" * 32)
    assert dma(bus, memory, fw_cfg.DMA_READ, 32, 0x3000) == 0
    assert memory.read(0x3000, 32) == bytes(range(16, 40)) + bytes(8)


def test_dma_skip_moves_the_offset():
    bus, device, memory = machine()
    key = device.add_file("f", bytes(range(10)))
    assert dma(bus, memory, (key << 16) | fw_cfg.DMA_SELECT | fw_cfg.DMA_SKIP, 4, 0) == 0
    assert dma(bus, memory, fw_cfg.DMA_READ, 2, 0x2000) == 0
    assert memory.read(0x2000, 2) == bytes([4, 5])


def test_dma_outside_ram_or_a_write_is_an_error_and_writes_nothing():
    bus, device, memory = machine()
    key = device.add_file("f", b"x" * 64)
    # A buffer that runs past the end of RAM: nothing written, error set.
    memory.write((1 << 20) - 8, b"\x55" * 8)
    control = (key << 16) | fw_cfg.DMA_SELECT | fw_cfg.DMA_READ
    assert dma(bus, memory, control, 64, (1 << 20) - 8) == fw_cfg.DMA_ERROR
    assert memory.read((1 << 20) - 8, 8) == b"\x55" * 8
    assert dma(bus, memory, (key << 16) | fw_cfg.DMA_SELECT | fw_cfg.DMA_WRITE, 4, 0x2000) == fw_cfg.DMA_ERROR
    assert memory.read(0x2000, 4) == bytes(4)


def test_dma_structure_outside_ram_is_ignored():
    bus, _, _ = machine()
    bus.write(PORT + 4, 4, int.from_bytes((1).to_bytes(4, "big"), "little"))  # high half: 4 GiB up
    dma_start(bus, 0)  # no exception, nothing to report into


def test_huge_zero_fill_is_bounded_by_ram():
    bus, device, memory = machine()
    key = device.add_file("f", b"abc")
    assert dma(bus, memory, (key << 16) | fw_cfg.DMA_SELECT | fw_cfg.DMA_READ, 0xFFFF_FFFF, 0x4000) \
        == fw_cfg.DMA_ERROR
    assert dma(bus, memory, (key << 16) | fw_cfg.DMA_SELECT | fw_cfg.DMA_READ, 0x80000, 0x80000) == 0
    assert memory.read(0x80000, 4) == b"abc\0"


@given(st.integers(0, fw_cfg.PORT_COUNT - 1), st.sampled_from([1, 2, 4]), st.integers(0, 2**32 - 1))
def test_hostile_port_accesses_never_raise(offset, size, value):
    bus, device, memory = machine()
    device.add_file("f", b"data")
    device.write(offset, size, value)
    assert 0 <= device.read(offset, size) < 1 << (8 * size)
