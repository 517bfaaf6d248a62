"""Booting through BIOS firmware (SeaBIOS) instead of loading a kernel.

The firmware image is read and checked here; the machine maps it at the top
of 4 GiB (read-only) and copies it into RAM below 1 MiB, and the boot
vCPU starts as a PC's CPU leaves reset: real mode at F000:FFF0, which is
4 GiB - 16, the image's reset vector. What the firmware learns of the
machine comes through fw_cfg (pyvmm/devices/fw_cfg.py): `firmware_e820()`
and the ACPI loader files (acpi.build_loader_files) are built here.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from pyvmm.core import layout
from pyvmm.core.kept import KEPT

from .cpustate import BootCpuState, DescriptorTable, Segment
from .e820 import E820Type
from .errors import FirmwareError

# Debian's seabios package: the 256 KiB build QEMU's PC machines use.
DEFAULT_FIRMWARE = Path("/usr/share/seabios/bios-256k.bin")
FIRMWARE_SIZES = (128 * layout.KiB, 256 * layout.KiB)

# Reset state (Intel SDM vol. 3, "Processor State After Reset").
RESET_CS_SELECTOR = 0xF000
RESET_CS_BASE = 0xFFFF_0000
RESET_IP = 0xFFF0
CR0_RESET = 0x6000_0010  # CD, NW and ET
RESET_EDX = 0x0000_0600  # family 6: the CPU signature EDX holds after reset
TYPE_DATA_RW = 0x3
TYPE_CODE_XR = 0xB
TYPE_LDT = 0x2
TYPE_TSS16_BUSY = 0x3  # what reset leaves in TR


def read_firmware(path: Path) -> bytes:
    """The firmware image at `path`, or FirmwareError saying why it cannot be one."""
    try:
        with KEPT.open_file(path, "rb") as f:  # kept across reboots under the sandbox
            image = f.read(max(FIRMWARE_SIZES) + 1)
    except OSError as exc:
        raise FirmwareError(f"cannot read firmware {os.fspath(path)}: {exc.strerror}") from None
    if len(image) not in FIRMWARE_SIZES:
        sizes = " or ".join(f"{s // layout.KiB} KiB" for s in FIRMWARE_SIZES)
        what = "more" if len(image) > max(FIRMWARE_SIZES) else f"{len(image)} bytes"
        raise FirmwareError(f"firmware {os.fspath(path)} is {what}; a BIOS image (SeaBIOS) is {sizes}")
    # The reset vector is the image's last 16 bytes: x86 code starts there
    # with a far jump (0xEA) in every BIOS; zeros or a header mean this is
    # not a BIOS image (an EFI volume, a truncated file).
    if image[-16] != 0xEA:
        raise FirmwareError(f"firmware {os.fspath(path)} has no reset vector (no far jump at 0xFFFFFFF0): "
                        "it is not a legacy BIOS image")
    return image


def _segment(selector: int, base: int, type_: int) -> Segment:
    return Segment(base=base, limit=0xFFFF, selector=selector, type=type_, present=1, dpl=0, db=0, s=1, l=0, g=0)


def reset_state() -> BootCpuState:
    """The boot CPU as it leaves reset: real mode, CS base 0xFFFF0000, IP 0xFFF0."""
    data = _segment(0, 0, TYPE_DATA_RW)
    return BootCpuState(
        rip=RESET_IP,
        rdx=RESET_EDX,
        cs=_segment(RESET_CS_SELECTOR, RESET_CS_BASE, TYPE_CODE_XR),
        ds=data, es=data, fs=data, gs=data, ss=data,
        tr=Segment(0, 0xFFFF, 0, TYPE_TSS16_BUSY, 1, 0, 0, 0, 0, 0),
        ldt=Segment(0, 0xFFFF, 0, TYPE_LDT, 1, 0, 0, 0, 0, 0),
        gdt=DescriptorTable(0, 0xFFFF),
        idt=DescriptorTable(0, 0xFFFF),
        cr0=CR0_RESET,
    )


def rom_placement(image: bytes) -> tuple[int, bytes]:
    """(gpa, bytes) of the image's top mapping: it ends at 4 GiB."""
    if len(image) > layout.FIRMWARE_MAX_SIZE:
        raise FirmwareError(f"firmware of {len(image)} bytes does not fit below 4 GiB")
    return layout.FIRMWARE_TOP - len(image), image


def low_placement(image: bytes) -> tuple[int, bytes]:
    """(gpa, bytes) of the image's copy in RAM below 1 MiB, ending there.

    The whole image, not only the 128 KiB a PC decodes at 0xE0000: a
    256 KiB SeaBIOS links part of its 32-bit code below 0xE0000 and, on a
    chipset whose shadow RAM it can unlock, copies it there from the top
    copy itself. pyvmm's BIOS area is plain RAM from the start, so the copy
    is made here, as it would be after that unlock.
    """
    return layout.LOW_RESERVED_END - len(image), image


def firmware_e820(mem_size: int, xen: bool) -> bytes:
    """fw_cfg's "etc/e820": RAM as it is mapped, and the hole's pages the
    firmware must keep off (KVM's TSS and identity map, Xen's special pages).
    The firmware carves the BIOS area and its own tables out itself.
    Entries are {u64 address, u64 length, u32 type}, little-endian."""
    entries = [(gpa, size, E820Type.RAM) for gpa, size in layout.ram_ranges(mem_size)]
    entries.append((layout.KVM_IDENTITY_MAP_ADDR, 4 * layout.PAGE_SIZE, E820Type.RESERVED))
    if xen:
        entries.append((layout.XEN_SPECIAL_PAGES, layout.XEN_SPECIAL_PAGES_SIZE, E820Type.RESERVED))
    entries.sort()
    return b"".join(struct.pack("<QQI", gpa, size, int(kind)) for gpa, size, kind in entries)
