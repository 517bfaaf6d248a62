"""Firmware boot: the image checks, the reset state, fw_cfg's E820 and the ACPI loader."""

import struct

import pytest

from pyvmm.boot import acpi
from pyvmm.boot.errors import FirmwareError
from pyvmm.boot.firmware import (
    DEFAULT_FIRMWARE, firmware_e820, low_placement, read_firmware, reset_state, rom_placement,
)
from pyvmm.core import layout


def bios(size=256 * 1024):
    image = bytearray(size)
    image[-16:-11] = b"\xea\x5b\xe0\x00\xf0"  # jmp far f000:e05b
    return bytes(image)


def test_a_bios_image_is_mapped_below_4g_and_copied_below_1m(tmp_path):
    path = tmp_path / "bios.bin"
    path.write_bytes(bios())
    image = read_firmware(path)
    assert rom_placement(image) == (0xFFFC_0000, image)
    assert low_placement(image) == (0xC_0000, image)
    path.write_bytes(bios(128 * 1024))
    assert low_placement(read_firmware(path))[0] == 0xE_0000


@pytest.mark.parametrize("content, words", [
    (b"", "0 bytes"),
    (bytes(100_000), "100000 bytes"),
    (bytes(512 * 1024), "is more"),
    (bytes(256 * 1024), "no reset vector"),
])
def test_wrong_images_get_one_clear_line(tmp_path, content, words):
    path = tmp_path / "bios.bin"
    path.write_bytes(content)
    with pytest.raises(FirmwareError, match=words) as error:
        read_firmware(path)
    assert "\n" not in str(error.value)


def test_a_missing_firmware_is_named(tmp_path):
    with pytest.raises(FirmwareError, match="cannot read firmware .*nope"):
        read_firmware(tmp_path / "nope")


@pytest.mark.skipif(not DEFAULT_FIRMWARE.exists(), reason="Debian's seabios package is not installed")
def test_debians_seabios_passes():
    assert len(read_firmware(DEFAULT_FIRMWARE)) == 256 * 1024


def test_reset_state_is_real_mode_at_the_reset_vector():
    state = reset_state()
    assert state.cs.base + state.rip == 0xFFFF_FFF0
    assert state.cs.selector == 0xF000 and state.cs.limit == 0xFFFF and state.cs.db == 0
    assert state.cr0 & 1 == 0 and state.efer == 0
    assert state.ss.base == 0 and state.ss.limit == 0xFFFF


def test_e820_for_firmware_has_ram_and_the_holes_pages():
    raw = firmware_e820(6 * layout.GiB, xen=True)
    entries = [struct.unpack("<QQI", raw[i : i + 20]) for i in range(0, len(raw), 20)]
    assert entries == [
        (0, layout.PCI_HOLE_START, 1),
        (layout.XEN_SPECIAL_PAGES, layout.XEN_SPECIAL_PAGES_SIZE, 2),
        (layout.KVM_IDENTITY_MAP_ADDR, 0x4000, 2),
        (4 * layout.GiB, 6 * layout.GiB - layout.PCI_HOLE_START, 1),
    ]
    assert len(firmware_e820(512 * layout.MiB, xen=False)) == 2 * 20


def run_loader(files, bases):
    """Carry out the table loader's commands as firmware does."""
    data = {name: bytearray(blob) for name, blob in files.items() if name != acpi.LOADER_FILE}
    commands = files[acpi.LOADER_FILE]
    allocated = []
    for at in range(0, len(commands), acpi.LOADER_ENTRY_SIZE):
        entry = commands[at : at + acpi.LOADER_ENTRY_SIZE]
        command = struct.unpack_from("<I", entry)[0]
        name = entry[4:60].rstrip(b"\0").decode()
        if command == acpi.LOADER_ALLOCATE:
            align, zone = struct.unpack_from("<IB", entry, 60)
            assert bases[name] % align == 0
            allocated.append((name, zone))
        elif command == acpi.LOADER_ADD_POINTER:
            src = entry[60:116].rstrip(b"\0").decode()
            offset, size = struct.unpack_from("<IB", entry, 116)
            value = int.from_bytes(data[name][offset : offset + size], "little") + bases[src]
            data[name][offset : offset + size] = value.to_bytes(size, "little")
        elif command == acpi.LOADER_ADD_CHECKSUM:
            offset, start, length = struct.unpack_from("<III", entry, 60)
            data[name][offset] = (data[name][offset] - sum(data[name][start : start + length])) & 0xFF
        else:
            raise AssertionError(f"command {command}")
    return data, allocated


def test_table_loader_produces_the_same_linked_tables():
    files = acpi.build_loader_files(2)
    bases = {acpi.LOADER_RSDP: 0xF5A40, acpi.LOADER_TABLES: 0x1FFE_0000}
    data, allocated = run_loader(files, bases)
    assert allocated == [(acpi.LOADER_RSDP, acpi.ZONE_FSEG), (acpi.LOADER_TABLES, acpi.ZONE_HIGH)]
    rsdp = bytes(data[acpi.LOADER_RSDP])
    assert rsdp[:8] == b"RSD PTR " and sum(rsdp[:20]) & 0xFF == 0 and sum(rsdp) & 0xFF == 0
    tables, base = bytes(data[acpi.LOADER_TABLES]), bases[acpi.LOADER_TABLES]

    def at(address):
        offset = address - base
        signature, length = struct.unpack_from("<4sI", tables, offset)
        return signature, tables[offset : offset + length]

    signature, xsdt = at(struct.unpack_from("<Q", rsdp, 24)[0])
    assert signature == b"XSDT" and sum(xsdt) & 0xFF == 0
    pointed = [at(address) for address in struct.unpack_from("<2Q", xsdt, 36)]
    assert [sig for sig, _ in pointed] == [b"FACP", b"APIC"]
    for _, table in pointed:
        assert sum(table) & 0xFF == 0
    fadt = pointed[0][1]
    dsdt32, = struct.unpack_from("<I", fadt, 40)
    facs, dsdt = struct.unpack_from("<QQ", fadt, 132)
    assert dsdt32 == dsdt and at(dsdt)[0] == b"DSDT" and sum(at(dsdt)[1]) & 0xFF == 0
    assert tables[facs - base : facs - base + 4] == b"FACS" and facs % 64 == 0
