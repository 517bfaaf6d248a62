"""The guest's physical address map, I/O ports and interrupt numbers.

Every address or port that two modules must agree on lives here, so that the
firmware tables (pyvmm.boot) and the devices that answer at those addresses
(pyvmm.devices) cannot drift apart.
"""

from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# x86's base page: the unit of guest-physical memory, of the boot page
# tables and of every page Xen's ABI speaks of (xen/abi.py takes it from here).
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

# --- Physical memory -------------------------------------------------------

# RAM is split around a 32-bit hole for PCI BARs, the IOAPIC, the LAPIC and
# Xen's special pages; RAM beyond the hole continues at 4 GiB.
PCI_HOLE_START = 0xC000_0000
HIGH_RAM_START = 4 * GiB

# Low memory below 1 MiB: real-mode IVT/BDA, the boot structures we write,
# the EBDA and the BIOS area where ACPI's RSDP is searched for.
BOOT_GDT = 0x0000_0500
BOOT_IDT = 0x0000_0520
BOOT_PARAMS = 0x0000_7000  # Linux zero page / PVH hvm_start_info
BOOT_PML4 = 0x0000_9000  # identity page tables for the 64-bit Linux entry
BOOT_PDPT = 0x0000_A000
BOOT_PD = 0x0000_B000  # four page directories: 0xB000..0xEFFF map 0..4 GiB
BOOT_CMDLINE = 0x0002_0000
BOOT_CMDLINE_MAX = 64 * KiB
EBDA_START = 0x0009_FC00
ACPI_TABLES = 0x000E_0000  # RSDP first (16-byte aligned), then the other tables
ACPI_TABLES_END = 0x000F_0000
LOW_RESERVED_END = 0x0010_0000  # 0x9FC00..1 MiB is reserved in the E820 map

# The 32-bit MMIO window handed to PCI BARs (bottom of the hole).
PCI_MMIO_START = PCI_HOLE_START
PCI_MMIO_END = 0xFEC0_0000  # exclusive
IOAPIC_BASE = 0xFEC0_0000
LAPIC_BASE = 0xFEE0_0000
# Xen special pages (console ring, xenstore ring): reserved in E820.
XEN_SPECIAL_PAGES = 0xFEFF_8000
XEN_SPECIAL_PAGES_SIZE = 0x4000

# Firmware boot: the BIOS image ends at 4 GiB (where the CPU's first fetch,
# 0xFFFFFFF0, lands) and a copy ends at 1 MiB, where real-mode code at
# F000:xxxx runs (boot/firmware.py).
FIRMWARE_TOP = 4 * GiB
FIRMWARE_MAX_SIZE = 256 * KiB  # what fits above KVM's pages below, and above 0xC0000

# KVM needs three pages for the VMX TSS and one for the identity map; they
# must sit in the hole, below 4 GiB, where no RAM or device lives.
KVM_TSS_ADDR = 0xFFFB_D000
KVM_IDENTITY_MAP_ADDR = 0xFFFB_C000


def ram_ranges(mem_size: int) -> list[tuple[int, int]]:
    """(gpa, size) of each RAM range for a guest with `mem_size` bytes."""
    if mem_size <= 0:
        raise ValueError("guest memory size must be positive")
    low = min(mem_size, PCI_HOLE_START)
    ranges = [(0, low)]
    if mem_size > low:
        ranges.append((HIGH_RAM_START, mem_size - low))
    return ranges


# --- I/O ports --------------------------------------------------------------

COM1_PORT = 0x3F8
COM1_IRQ = 4
I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
CMOS_PORT = 0x70  # index at 0x70, data at 0x71
RTC_IRQ = 8
PCI_CONFIG_ADDRESS_PORT = 0xCF8  # config mechanism #1: 0xCF8 address, 0xCFC..0xCFF data
PCI_CONFIG_DATA_PORT = 0xCFC
XEN_PLATFORM_IO_PORT = 0x10  # xen-platform unplug/log ports 0x10..0x13
DEBUGCON_PORT = 0xE9  # early debug output (Xen guests print here)
FIRMWARE_DEBUG_PORT = 0x402  # SeaBIOS's debug output under QEMU
FW_CFG_PORT = 0x510  # QEMU's firmware configuration: 0x510..0x51B (devices/fw_cfg.py)
# The PIIX3 IDE channels in legacy mode: (command block, control block, IRQ).
IDE_CHANNELS = ((0x1F0, 0x3F6, 14), (0x170, 0x376, 15))
PVPANIC_PORT = 0x505  # pvpanic: the guest reports panics (the port QEMU uses too)

# ACPI fixed hardware, non-reduced model: PM1a event and control blocks, the
# PM timer, and a reset register, all in one small I/O block.
ACPI_PM_BASE = 0x600
ACPI_PM1A_EVT_BLK = ACPI_PM_BASE + 0x0  # 4 bytes: status (2) + enable (2)
ACPI_PM1A_CNT_BLK = ACPI_PM_BASE + 0x4  # 2 bytes
ACPI_PM_TMR_BLK = ACPI_PM_BASE + 0x8  # 4 bytes, 24-bit timer at 3.579545 MHz
ACPI_RESET_REG = ACPI_PM_BASE + 0xC  # 1 byte
ACPI_PM_BLOCK_SIZE = 0x10
ACPI_RESET_VALUE = 0x06
ACPI_SCI_IRQ = 9
# The sleep type the DSDT's \_S5 object announces; writing it with SLP_EN
# into PM1a_CNT powers the machine off.
ACPI_S5_SLP_TYP = 5

# --- Interrupts -------------------------------------------------------------

IOAPIC_PINS = 24
# ISA IRQ0 (the PIT) is wired to IOAPIC pin 2, as on every PC since the
# IOAPIC appeared; the MADT carries a matching interrupt source override.
PIT_GSI = 2
PCI_INTX_GSI_BASE = 16  # PCI INTA..INTD are swizzled onto GSIs 16..19


def pci_intx_gsi(slot: int, pin: int) -> int:
    """GSI that INTx `pin` (0 = INTA .. 3 = INTD) of PCI device `slot` raises.

    The DSDT's _PRT publishes exactly this mapping.
    """
    if not 0 <= slot < 32 or not 0 <= pin < 4:
        raise ValueError(f"no PCI INTx for slot {slot} pin {pin}")
    return PCI_INTX_GSI_BASE + ((slot + pin) & 3)
