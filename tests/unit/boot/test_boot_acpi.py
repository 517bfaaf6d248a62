"""ACPI tables: structure, checksums, pointers, MADT, and the DSDT via iasl."""

import re
import shutil
import struct
import subprocess

import pytest

from pyvmm.core import layout
from pyvmm.boot import acpi
from pyvmm.boot.errors import BootError
from pyvmm.core.memory import GuestMemory

MiB = 1 << 20


def header(blob):
    return struct.unpack_from("<4sIBB6s8sI4sI", blob)


@pytest.fixture(scope="module")
def tables():
    return acpi.build_tables(4)


def test_every_table_sums_to_zero_and_has_its_length(tables):
    for sig, (addr, blob) in tables.items():
        if sig == b"RSDP":
            assert sum(blob[:20]) % 256 == 0 and sum(blob) % 256 == 0
            assert blob[:8] == b"RSD PTR " and blob[15] == 2
            assert struct.unpack_from("<I", blob, 20)[0] == len(blob) == 36
        elif sig == b"FACS":  # the FACS has no checksum
            assert blob[:4] == b"FACS" and struct.unpack_from("<I", blob, 4)[0] == len(blob) == 64
        else:
            assert sum(blob) % 256 == 0, sig
            assert header(blob)[0] == sig and header(blob)[1] == len(blob)


def test_tables_fit_the_window_and_do_not_overlap(tables):
    spans = sorted((addr, addr + len(blob)) for addr, blob in tables.values())
    assert spans[0][0] == layout.ACPI_TABLES and spans[-1][1] <= layout.ACPI_TABLES_END
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert tables[b"RSDP"][0] % 16 == 0 and tables[b"FACS"][0] % 64 == 0


def test_pointers(tables):
    rsdp = tables[b"RSDP"][1]
    assert struct.unpack_from("<Q", rsdp, 24)[0] == tables[b"XSDT"][0]
    xsdt = tables[b"XSDT"][1]
    assert list(struct.unpack_from("<2Q", xsdt, 36)) == [tables[b"FACP"][0], tables[b"APIC"][0]]
    fadt = tables[b"FACP"][1]
    facs, dsdt = tables[b"FACS"][0], tables[b"DSDT"][0]
    assert struct.unpack_from("<II", fadt, 36) == (0, dsdt)  # FIRMWARE_CTRL unused
    assert struct.unpack_from("<QQ", fadt, 132) == (facs, dsdt)


def gas(blob, offset):
    return struct.unpack_from("<BBBBQ", blob, offset)


def test_fadt_fields(tables):
    fadt = tables[b"FACP"][1]
    assert header(fadt)[2] >= 3 and len(fadt) == 276
    assert struct.unpack_from("<H", fadt, 46)[0] == layout.ACPI_SCI_IRQ
    assert struct.unpack_from("<I", fadt, 48)[0] == 0  # SMI_CMD: ACPI always on
    assert struct.unpack_from("<I", fadt, 56)[0] == layout.ACPI_PM1A_EVT_BLK
    assert struct.unpack_from("<I", fadt, 64)[0] == layout.ACPI_PM1A_CNT_BLK
    assert struct.unpack_from("<I", fadt, 76)[0] == layout.ACPI_PM_TMR_BLK
    assert fadt[88:92] == bytes([4, 2, 0, 4])
    assert struct.unpack_from("<H", fadt, 109)[0] & acpi.IAPC_8042
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & acpi.FADT_RESET_REG_SUP and not flags & (1 << 20)  # not hardware-reduced
    assert gas(fadt, 116) == (1, 8, 0, 1, layout.ACPI_RESET_REG)
    assert fadt[128] == layout.ACPI_RESET_VALUE
    assert gas(fadt, 148)[::4] == (1, layout.ACPI_PM1A_EVT_BLK) and gas(fadt, 148)[1] == 32
    assert gas(fadt, 172)[::4] == (1, layout.ACPI_PM1A_CNT_BLK) and gas(fadt, 172)[1] == 16
    assert gas(fadt, 208)[::4] == (1, layout.ACPI_PM_TMR_BLK) and gas(fadt, 208)[1] == 32


def madt_entries(blob):
    pos, entries = 44, []
    while pos < len(blob):
        kind, length = blob[pos], blob[pos + 1]
        assert length >= 2
        entries.append((kind, blob[pos : pos + length]))
        pos += length
    assert pos == len(blob)
    return entries


@pytest.mark.parametrize("cpus", [1, 2, 7, 254])
def test_madt(cpus):
    blob = acpi.build_tables(cpus)[b"APIC"][1]
    assert struct.unpack_from("<II", blob, 36) == (layout.LAPIC_BASE, 1)
    entries = madt_entries(blob)
    lapics = [struct.unpack("<BBBBI", e) for k, e in entries if k == 0]
    assert [(uid, apic, flags) for _, _, uid, apic, flags in lapics] == [(i, i, 1) for i in range(cpus)]
    ioapics = [struct.unpack("<BBBBII", e) for k, e in entries if k == 1]
    assert ioapics == [(1, 12, 0, 0, layout.IOAPIC_BASE, 0)]
    overrides = {e[3]: struct.unpack_from("<IH", e, 4) for k, e in entries if k == 2}
    assert overrides == {0: (layout.PIT_GSI, 0), layout.ACPI_SCI_IRQ: (layout.ACPI_SCI_IRQ, 0x0D)}
    assert len(blob) == 44 + 8 * cpus + 12 + 2 * 10


@pytest.mark.parametrize("cpus", [0, 255])
def test_cpu_count_limits(cpus):
    with pytest.raises(BootError, match="vCPUs"):
        acpi.build_tables(cpus)


def test_build_acpi_writes_guest_memory():
    mem = GuestMemory(layout.ram_ranges(16 * MiB))
    mem.fill(layout.ACPI_TABLES, layout.ACPI_TABLES_END - layout.ACPI_TABLES, 0xCC)
    rsdp = acpi.build_acpi(mem, 2)
    assert rsdp == layout.ACPI_TABLES and mem.read(rsdp, 8) == b"RSD PTR "
    for addr, blob in acpi.build_tables(2).values():
        assert mem.read(addr, len(blob)) == blob
    assert mem.read(layout.ACPI_TABLES_END - 1, 1) == b"\0"  # the rest is cleared


def test_dsdt_bytes_contain_the_objects(tables):
    dsdt = tables[b"DSDT"][1]
    s5 = layout.ACPI_S5_SLP_TYP
    assert b"\x08\\_S5_\x12\x08\x04\x0a" + bytes([s5]) + b"\x0a" + bytes([s5]) + b"\x00\x00" in dsdt
    assert b"PCI0" in dsdt and b"\x0c\x41\xd0\x0a\x03" in dsdt
    # pvpanic: the _HID string and an I/O port descriptor for its one port.
    port = layout.PVPANIC_PORT.to_bytes(2, "little")
    assert b"PEVT" in dsdt and b"\x0dQEMU0001\x00" in dsdt
    assert b"\x47\x01" + port + port + b"\x01\x01" in dsdt


needs_iasl = pytest.mark.skipif(
    shutil.which("iasl") is None,
    reason="iasl not installed (apt-get install acpica-tools)",
)


def disassemble(tmp_path, blob: bytes, name: str) -> str:
    path = tmp_path / f"{name}.dat"
    path.write_bytes(blob)
    result = subprocess.run(["iasl", "-d", str(path)], capture_output=True, text=True, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Error" not in output and "Warning" not in output, output
    return (tmp_path / f"{name}.dsl").read_text()


@needs_iasl
def test_iasl_disassembles_the_dsdt(tables, tmp_path):
    dsl = disassemble(tmp_path, tables[b"DSDT"][1], "dsdt")
    assert "Name (\\_S5, Package (0x04)" in dsl
    assert "Device (PCI0)" in dsl and 'EisaId ("PNP0A03")' in dsl
    for resource in ("WordBusNumber (", "IO (Decode16,\n                        0x0CF8",
                     "0x0CF7,             // Range Maximum", "0x0D00,             // Range Minimum",
                     "0xFEBFFFFF,         // Range Maximum"):
        assert resource in dsl, resource
    pvpanic = dsl[dsl.index("Device (PEVT)"):]
    assert 'Name (_HID, "QEMU0001")' in pvpanic
    assert re.search(r"IO \(Decode16,\s*0x0505,\s*// Range Minimum\s*0x0505,\s*// Range Maximum\s*"
                     r"0x01,\s*// Alignment\s*0x01,", pvpanic), pvpanic
    entries = re.findall(
        r"Package \(0x04\)\s*\{\s*(0x[0-9A-F]+|Zero|One),\s*(0x[0-9A-F]+|Zero|One),\s*Zero,\s*(0x[0-9A-F]+)\s*\}",
        dsl,
    )
    as_int = {"Zero": 0, "One": 1}
    routes = [tuple(as_int.get(x) if x in as_int else int(x, 16) for x in e) for e in entries]
    assert routes == [
        ((slot << 16) | 0xFFFF, pin, layout.pci_intx_gsi(slot, pin))
        for slot in range(1, 32) for pin in range(4)
    ]


@needs_iasl
@pytest.mark.parametrize("sig", [b"FACP", b"APIC", b"XSDT", b"FACS"])
def test_iasl_accepts_the_data_tables(tables, tmp_path, sig):
    dsl = disassemble(tmp_path, tables[sig][1], sig.decode().lower())
    assert "Raw Table Data" in dsl or "FACS" in dsl
