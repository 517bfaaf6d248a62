"""ACPI tables for a PC-like, non-hardware-reduced machine.

RSDP -> XSDT -> {FADT -> {FACS, DSDT}, MADT}, all inside layout's
ACPI_TABLES..ACPI_TABLES_END window (reserved in the E820 map, and inside
the BIOS area where an OS without a boot-protocol pointer searches for the
RSDP). The FADT describes the PM1a/PM-timer/reset I/O block that
pyvmm.devices implements; the DSDT declares \\_S5, the PCI root bridge and
the pvpanic device.
"""

from __future__ import annotations

import struct

from pyvmm.core import layout

from . import aml
from .errors import BootError

OEM_ID = b"PYVMM "
OEM_REVISION = 1
CREATOR_ID = b"PYVM"
CREATOR_REVISION = 1
HEADER_FORMAT = "<4sIBB6s8sI4sI"  # the 36-byte common table header
HEADER_SIZE = struct.calcsize(HEADER_FORMAT)
CHECKSUM_OFFSET = 9

RSDP_SIZE = 36
FADT_REVISION = 6
FADT_SIZE = 276
FACS_SIZE = 64
MADT_REVISION = 3
DSDT_REVISION = 2  # 2 and up: AML integers are 64 bits wide

MAX_CPUS = 254  # xAPIC IDs are 8 bits and 0xFF is the broadcast ID
IOAPIC_ID = 0  # what KVM's in-kernel IOAPIC reports after reset

# FADT fields and flags (ACPI spec 5.2.9)
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_PWR_BUTTON = 1 << 4  # 1: no fixed-feature power button
FADT_SLP_BUTTON = 1 << 5
FADT_FIX_RTC = 1 << 6  # 1: no RTC wake status in the fixed registers
FADT_RESET_REG_SUP = 1 << 10
IAPC_8042 = 1 << 1
IAPC_NO_VGA = 1 << 2
C2_UNSUPPORTED_LATENCY = 101
C3_UNSUPPORTED_LATENCY = 1001

# Generic Address Structure
GAS_SYSTEM_IO = 1
ACCESS_BYTE, ACCESS_WORD, ACCESS_DWORD = 1, 2, 3

# MADT
MADT_PCAT_COMPAT = 1 << 0  # the 8259 PICs are there too
MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_INTERRUPT_OVERRIDE = 2
LAPIC_ENABLED = 1 << 0
MPS_CONFORMING = 0
MPS_ACTIVE_HIGH = 0x1
MPS_LEVEL = 0x3 << 2

PCI_HOST_BRIDGE_SLOT = 0  # slot 0 is the host bridge: no INTx
PCI_IO_HIGH_WINDOW = 0x0D00  # 0xCF8..0xCFF, rounded up, stay with the host bridge


def checksum(data: bytes) -> int:
    """The byte that makes `data` sum to zero modulo 256."""
    return -sum(data) & 0xFF


def table(signature: bytes, revision: int, body: bytes) -> bytes:
    """A system description table: common header with a correct checksum."""
    length = HEADER_SIZE + len(body)
    raw = bytearray(
        struct.pack(
            HEADER_FORMAT, signature, length, revision, 0, OEM_ID,
            b"PYVMM" + signature[:3], OEM_REVISION, CREATOR_ID, CREATOR_REVISION,
        )
        + body
    )
    raw[CHECKSUM_OFFSET] = checksum(raw)
    return bytes(raw)


def gas(address: int, bit_width: int, access_size: int) -> bytes:
    return struct.pack("<BBBBQ", GAS_SYSTEM_IO, bit_width, 0, access_size, address)


def rsdp(xsdt_address: int) -> bytes:
    raw = bytearray(
        struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, 2, 0, RSDP_SIZE, xsdt_address, 0)
    )
    raw[8] = checksum(raw[:20])  # ACPI 1.0 part
    raw[32] = checksum(raw)  # extended checksum, whole structure
    return bytes(raw)


def xsdt(entries: list[int]) -> bytes:
    return table(b"XSDT", 1, b"".join(struct.pack("<Q", a) for a in entries))


def facs() -> bytes:
    # No checksum; version 2; no global lock, no waking vector (no S3).
    return struct.pack("<4sIIIIIQB3xI24x", b"FACS", FACS_SIZE, 0, 0, 0, 0, 0, 2, 0)


def fadt(facs_address: int, dsdt_address: int) -> bytes:
    body = bytearray(FADT_SIZE - HEADER_SIZE)

    def put(offset: int, fmt: str, *values) -> None:
        struct.pack_into(fmt, body, offset - HEADER_SIZE, *values)

    # The FACS only through X_FIRMWARE_CTRL: with both pointers set, Linux
    # installs the same FACS twice. Both DSDT pointers agree, which is allowed.
    put(36, "<II", 0, dsdt_address)
    put(46, "<H", layout.ACPI_SCI_IRQ)
    put(48, "<I", 0)  # SMI_CMD 0: ACPI is always enabled, no mode switch
    put(56, "<I", layout.ACPI_PM1A_EVT_BLK)
    put(64, "<I", layout.ACPI_PM1A_CNT_BLK)
    put(76, "<I", layout.ACPI_PM_TMR_BLK)
    put(88, "<BBBB", 4, 2, 0, 4)  # PM1_EVT_LEN, PM1_CNT_LEN, PM2_CNT_LEN, PM_TMR_LEN
    put(96, "<HH", C2_UNSUPPORTED_LATENCY, C3_UNSUPPORTED_LATENCY)
    put(109, "<H", IAPC_8042 | IAPC_NO_VGA)
    put(
        112, "<I",
        FADT_WBINVD | FADT_PROC_C1 | FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_FIX_RTC
        | FADT_RESET_REG_SUP,
    )
    put(116, "<12s", gas(layout.ACPI_RESET_REG, 8, ACCESS_BYTE))
    put(128, "<B", layout.ACPI_RESET_VALUE)
    put(131, "<B", 0)  # FADT minor version
    put(132, "<QQ", facs_address, dsdt_address)  # X_FIRMWARE_CTRL, X_DSDT
    put(148, "<12s", gas(layout.ACPI_PM1A_EVT_BLK, 32, ACCESS_WORD))
    put(172, "<12s", gas(layout.ACPI_PM1A_CNT_BLK, 16, ACCESS_WORD))
    put(208, "<12s", gas(layout.ACPI_PM_TMR_BLK, 32, ACCESS_DWORD))
    return table(b"FACP", FADT_REVISION, bytes(body))


def madt(num_cpus: int) -> bytes:
    body = struct.pack("<II", layout.LAPIC_BASE, MADT_PCAT_COMPAT)
    for cpu in range(num_cpus):
        body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, cpu, cpu, LAPIC_ENABLED)
    body += struct.pack("<BBBBII", MADT_IO_APIC, 12, IOAPIC_ID, 0, layout.IOAPIC_BASE, 0)
    # ISA IRQ0 (PIT) arrives on GSI 2; the SCI is level triggered, active high.
    body += struct.pack(
        "<BBBBIH", MADT_INTERRUPT_OVERRIDE, 10, 0, 0, layout.PIT_GSI, MPS_CONFORMING
    )
    body += struct.pack(
        "<BBBBIH", MADT_INTERRUPT_OVERRIDE, 10, 0, layout.ACPI_SCI_IRQ, layout.ACPI_SCI_IRQ,
        MPS_LEVEL | MPS_ACTIVE_HIGH,
    )
    return table(b"APIC", MADT_REVISION, body)


def pci_root_bridge() -> bytes:
    config_ports = layout.PCI_CONFIG_ADDRESS_PORT  # 0xCF8..0xCFF
    crs = aml.resource_template(
        aml.word_bus_number(0x00, 0xFF),
        aml.io(config_ports, config_ports, 1, 8),
        # Every other port is forwarded to PCI, in two windows around them.
        aml.word_io(0x0000, config_ports - 1),
        aml.word_io(PCI_IO_HIGH_WINDOW, 0xFFFF),
        aml.dword_memory(layout.PCI_MMIO_START, layout.PCI_MMIO_END - 1),
    )
    prt = [
        aml.package((slot << 16) | 0xFFFF, pin, 0, layout.pci_intx_gsi(slot, pin))
        for slot in range(PCI_HOST_BRIDGE_SLOT + 1, 32)
        for pin in range(4)
    ]
    return aml.device(
        "PCI0",
        aml.name("_HID", aml.eisa_id("PNP0A03")),
        aml.name("_UID", 0),
        aml.name("_BBN", 0),
        aml.method("_CRS", aml.return_(crs)),
        # Source 0 in each entry: the last field is a GSI, no link device.
        aml.name("_PRT", aml.package(*prt)),
    )


def pvpanic() -> bytes:
    """The pvpanic port, under the _HID Linux's pvpanic-mmio driver matches."""
    port = layout.PVPANIC_PORT
    return aml.device(
        "PEVT",
        aml.name("_HID", "QEMU0001"),
        aml.name("_CRS", aml.resource_template(aml.io(port, port, 1, 1))),
    )


def dsdt() -> bytes:
    s5 = layout.ACPI_S5_SLP_TYP
    body = aml.name("\\_S5", aml.package(s5, s5, 0, 0)) + aml.scope("\\_SB", pci_root_bridge(), pvpanic())
    return table(b"DSDT", DSDT_REVISION, body)


def build_tables(num_cpus: int) -> dict[bytes, tuple[int, bytes]]:
    """{signature: (address, bytes)} of every table, RSDP included."""
    if not 1 <= num_cpus <= MAX_CPUS:
        raise BootError(f"{num_cpus} vCPUs: the MADT describes 1 to {MAX_CPUS}")
    blobs = {b"FACS": facs(), b"APIC": madt(num_cpus), b"DSDT": dsdt()}
    sizes = {b"RSDP": RSDP_SIZE, b"XSDT": HEADER_SIZE + 16, b"FACP": FADT_SIZE, **{
        sig: len(blob) for sig, blob in blobs.items()}}
    addresses, cursor = {}, layout.ACPI_TABLES
    for sig in (b"RSDP", b"XSDT", b"FACP", b"FACS", b"APIC", b"DSDT"):
        align = 64 if sig == b"FACS" else 16  # the FACS must be 64-byte aligned
        cursor = (cursor + align - 1) // align * align
        addresses[sig] = cursor
        cursor += sizes[sig]
    if cursor > layout.ACPI_TABLES_END:
        raise BootError(f"ACPI tables need {cursor - layout.ACPI_TABLES} bytes, more than reserved")
    blobs[b"FACP"] = fadt(addresses[b"FACS"], addresses[b"DSDT"])
    blobs[b"XSDT"] = xsdt([addresses[b"FACP"], addresses[b"APIC"]])
    blobs[b"RSDP"] = rsdp(addresses[b"XSDT"])
    return {sig: (addresses[sig], blobs[sig]) for sig in addresses}


def build_acpi(memory, num_cpus: int) -> int:
    """Write the ACPI tables for `num_cpus` vCPUs; returns the RSDP address."""
    tables = build_tables(num_cpus)
    memory.fill(layout.ACPI_TABLES, layout.ACPI_TABLES_END - layout.ACPI_TABLES)
    for address, blob in tables.values():
        memory.write(address, blob)
    return tables[b"RSDP"][0]


# --- The same tables for firmware, through fw_cfg's table loader ------------------

# SeaBIOS (and OVMF) place tables they are handed as fw_cfg files: the
# "etc/table-loader" file is a list of 128-byte commands that allocate each
# file in guest RAM, patch the pointers between them with the addresses they
# got, and fix the checksums those pointers changed.
LOADER_FILE = "etc/table-loader"
LOADER_TABLES = "etc/acpi/tables"
LOADER_RSDP = "etc/acpi/rsdp"
LOADER_ENTRY_SIZE = 128
LOADER_NAME_SIZE = 56
LOADER_ALLOCATE, LOADER_ADD_POINTER, LOADER_ADD_CHECKSUM = 1, 2, 3
ZONE_HIGH, ZONE_FSEG = 1, 2  # top of low RAM; the BIOS area, where the RSDP is searched for


def _loader_entry(command: int, body: bytes) -> bytes:
    return struct.pack("<I", command) + body.ljust(LOADER_ENTRY_SIZE - 4, b"\0")


def _name(file: str) -> bytes:
    return file.encode().ljust(LOADER_NAME_SIZE, b"\0")


def loader_allocate(file: str, align: int, zone: int) -> bytes:
    return _loader_entry(LOADER_ALLOCATE, _name(file) + struct.pack("<IB", align, zone))


def loader_add_pointer(dest: str, src: str, offset: int, size: int) -> bytes:
    """Add src's address to the `size`-byte little-endian integer at dest+offset."""
    return _loader_entry(LOADER_ADD_POINTER, _name(dest) + _name(src) + struct.pack("<IB", offset, size))


def loader_add_checksum(file: str, offset: int, start: int, length: int) -> bytes:
    """Fix the byte at file+offset so that [start, start+length) sums to zero."""
    return _loader_entry(LOADER_ADD_CHECKSUM, _name(file) + struct.pack("<III", offset, start, length))


def build_loader_files(num_cpus: int) -> dict[str, bytes]:
    """The fw_cfg files that make firmware install pyvmm's ACPI tables.

    The tables are those build_acpi() writes for a kernel boot, laid out in
    one blob whose pointers hold offsets into it; the loader adds the blob's
    address to each of them and then fixes every checksum.
    """
    if not 1 <= num_cpus <= MAX_CPUS:
        raise BootError(f"{num_cpus} vCPUs: the MADT describes 1 to {MAX_CPUS}")
    blobs = {b"FACS": facs(), b"DSDT": dsdt(), b"APIC": madt(num_cpus)}
    sizes = {b"FACP": FADT_SIZE, b"XSDT": HEADER_SIZE + 16, **{sig: len(b) for sig, b in blobs.items()}}
    offsets, cursor = {}, 0
    for sig in (b"FACS", b"DSDT", b"FACP", b"APIC", b"XSDT"):  # the FACS first: 64-byte aligned
        cursor = (cursor + 15) // 16 * 16
        offsets[sig] = cursor
        cursor += sizes[sig]
    blobs[b"FACP"] = fadt(offsets[b"FACS"], offsets[b"DSDT"])
    blobs[b"XSDT"] = xsdt([offsets[b"FACP"], offsets[b"APIC"]])
    tables = bytearray(cursor)
    for sig, offset in offsets.items():
        tables[offset : offset + len(blobs[sig])] = blobs[sig]

    commands = [
        loader_allocate(LOADER_RSDP, 16, ZONE_FSEG),
        loader_allocate(LOADER_TABLES, 64, ZONE_HIGH),
        loader_add_pointer(LOADER_RSDP, LOADER_TABLES, 24, 8),  # XsdtAddress
        loader_add_pointer(LOADER_TABLES, LOADER_TABLES, offsets[b"FACP"] + 40, 4),  # DSDT
        loader_add_pointer(LOADER_TABLES, LOADER_TABLES, offsets[b"FACP"] + 132, 8),  # X_FIRMWARE_CTRL
        loader_add_pointer(LOADER_TABLES, LOADER_TABLES, offsets[b"FACP"] + 140, 8),  # X_DSDT
        loader_add_pointer(LOADER_TABLES, LOADER_TABLES, offsets[b"XSDT"] + HEADER_SIZE, 8),
        loader_add_pointer(LOADER_TABLES, LOADER_TABLES, offsets[b"XSDT"] + HEADER_SIZE + 8, 8),
    ]
    for sig in (b"DSDT", b"FACP", b"APIC", b"XSDT"):  # the FACS has no checksum
        offset = offsets[sig]
        commands.append(loader_add_checksum(LOADER_TABLES, offset + CHECKSUM_OFFSET, offset, sizes[sig]))
    commands += [
        loader_add_checksum(LOADER_RSDP, 8, 0, 20),  # the ACPI 1.0 part first: the whole covers it
        loader_add_checksum(LOADER_RSDP, 32, 0, RSDP_SIZE),
    ]
    return {LOADER_RSDP: rsdp(offsets[b"XSDT"]), LOADER_TABLES: bytes(tables), LOADER_FILE: b"".join(commands)}
