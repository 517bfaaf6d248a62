"""Linux x86 boot protocol (Documentation/arch/x86/boot.rst), 64-bit entry.

We skip the real-mode setup code entirely: the protected-mode part of the
bzImage is copied to its load address, the zero page is filled in the way the
setup code would have, and the vCPU starts in long mode at load address +
0x200 with identity paging and %rsi pointing at the zero page.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pyvmm.core import layout

from . import e820 as e820mod
from .cpustate import (
    CR0_ET, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, TYPE_CODE_XR, TYPE_DATA_RW,
    BootCpuState, DescriptorTable, flat_segment, gdt_bytes, tss_segment,
)
from .errors import BootError
from .paging import write_identity_map

SECTOR = 512
BOOT_FLAG = 0xAA55
HDRS = b"HdrS"
MIN_VERSION = 0x020C  # 2.12: xloadflags, hence the 64-bit entry flag
RSDP_FIELD_VERSION = 0x020E  # 2.14 added boot_params.acpi_rsdp_addr
ENTRY_64_OFFSET = 0x200
RELOCATED_FLOOR = 16 << 20  # where a relocatable kernel goes when pref_address won't do

# loadflags
LOADED_HIGH = 1 << 0
KEEP_SEGMENTS = 1 << 6
CAN_USE_HEAP = 1 << 7
# xloadflags
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1

LOADER_TYPE_UNDEFINED = 0xFF

# Offsets inside the zero page (struct boot_params); the setup header sits at
# the same offset there as in the image.
HDR_START = 0x1F1
BP_ACPI_RSDP_ADDR = 0x070
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_TYPE_OF_LOADER = 0x210
BP_LOADFLAGS = 0x211
BP_CODE32_START = 0x214
BP_RAMDISK_IMAGE = 0x218
BP_RAMDISK_SIZE = 0x21C
BP_HEAP_END_PTR = 0x224
BP_CMD_LINE_PTR = 0x228
BP_E820_TABLE = 0x2D0
ZERO_PAGE_SIZE = 4096

# The 64-bit boot protocol's selectors: __BOOT_CS and __BOOT_DS.
BOOT_CS = 0x10
BOOT_DS = 0x18


@dataclass(frozen=True)
class SetupHeader:
    setup_sects: int
    syssize: int
    version: int
    loadflags: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable: bool
    xloadflags: int
    cmdline_size: int
    pref_address: int
    init_size: int
    header_end: int  # offset just past the header, from the jump at 0x200

    @property
    def setup_size(self) -> int:
        # setup_sects == 0 means 4, for very old images.
        return ((self.setup_sects or 4) + 1) * SECTOR

    @property
    def version_text(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"


def is_bzimage(data: bytes) -> bool:
    return len(data) >= 0x206 and data[0x1FE:0x200] == b"\x55\xaa" and data[0x202:0x206] == HDRS


def parse_setup_header(data: bytes) -> SetupHeader:
    """Validate the setup header of a bzImage; BootError says what is wrong."""
    if len(data) < 0x206:
        raise BootError(f"kernel image is truncated: {len(data)} bytes, no setup header")
    (boot_flag,) = struct.unpack_from("<H", data, 0x1FE)
    if boot_flag != BOOT_FLAG:
        raise BootError(f"not a Linux kernel image: boot flag {boot_flag:#06x}, expected 0xaa55")
    if data[0x202:0x206] != HDRS:
        raise BootError(f"not a Linux bzImage: header magic {bytes(data[0x202:0x206])!r}")
    if len(data) < 0x208:
        raise BootError(f"kernel image is truncated inside its setup header ({len(data)} bytes)")
    (version,) = struct.unpack_from("<H", data, 0x206)
    if version < MIN_VERSION:
        raise BootError(
            f"boot protocol {version >> 8}.{version & 0xFF:02d} is too old: 2.12 or newer needed"
        )
    header_end = 0x202 + data[0x201]
    if len(data) < max(header_end, 0x264):
        raise BootError(f"kernel image is truncated inside its setup header ({len(data)} bytes)")
    hdr = SetupHeader(
        setup_sects=data[0x1F1],
        syssize=struct.unpack_from("<I", data, 0x1F4)[0],
        version=version,
        loadflags=data[0x211],
        initrd_addr_max=struct.unpack_from("<I", data, 0x22C)[0],
        kernel_alignment=struct.unpack_from("<I", data, 0x230)[0],
        relocatable=bool(data[0x234]),
        xloadflags=struct.unpack_from("<H", data, 0x236)[0],
        cmdline_size=struct.unpack_from("<I", data, 0x238)[0],
        pref_address=struct.unpack_from("<Q", data, 0x258)[0],
        init_size=struct.unpack_from("<I", data, 0x260)[0],
        header_end=header_end,
    )
    if not hdr.xloadflags & XLF_KERNEL_64:
        raise BootError("kernel has no 64-bit entry point (XLF_KERNEL_64 is clear)")
    if not hdr.loadflags & LOADED_HIGH:
        raise BootError("kernel is a zImage that loads below 1 MiB: not supported")
    align = hdr.kernel_alignment
    if hdr.relocatable and (align == 0 or align & (align - 1)):
        raise BootError(f"kernel_alignment {hdr.kernel_alignment:#x} is not a power of two")
    pm_end = hdr.setup_size + hdr.syssize * 16
    if len(data) < pm_end:
        raise BootError(
            f"kernel image is truncated: {len(data)} bytes, its header says {pm_end}"
        )
    return hdr


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def choose_load_address(hdr: SetupHeader, footprint: int, e820: list) -> int:
    """Where the protected-mode kernel goes: pref_address when it fits,
    else (relocatable kernels only) the first aligned spot at or above 16 MiB."""
    low_top = e820mod.low_ram_top(e820)
    candidates = [hdr.pref_address]
    if hdr.relocatable:
        candidates.append(_align_up(RELOCATED_FLOOR, hdr.kernel_alignment))
    for addr in candidates:
        if (
            addr >= layout.LOW_RESERVED_END
            and addr + footprint <= low_top
            and e820mod.in_ram(e820, addr, footprint)
        ):
            return addr
    raise BootError(
        f"kernel needs {footprint >> 20} MiB at {hdr.pref_address:#x}"
        f"{' (relocatable)' if hdr.relocatable else ''}, which does not fit in RAM below"
        f" {low_top:#x}"
    )


def load_bzimage(
    memory, image: bytes, initrd: bytes | None, cmdline: bytes, rsdp_address: int, e820: list
) -> BootCpuState:
    hdr = parse_setup_header(image)
    kernel = memoryview(image)[hdr.setup_size :]
    if len(cmdline) > min(hdr.cmdline_size, layout.BOOT_CMDLINE_MAX - 1):
        raise BootError(
            f"command line is {len(cmdline)} bytes; this kernel accepts at most"
            f" {min(hdr.cmdline_size, layout.BOOT_CMDLINE_MAX - 1)}"
        )
    # init_size covers the decompressor's whole working area from the load address.
    footprint = max(hdr.init_size, len(kernel))
    load_addr = choose_load_address(hdr, footprint, e820)

    initrd_addr = 0
    if initrd:
        initrd_addr = _place_initrd(hdr, len(initrd), load_addr + footprint, e820)

    memory.write(load_addr, kernel)
    if initrd:
        memory.write(initrd_addr, initrd)
    memory.write(layout.BOOT_CMDLINE, cmdline + b"\0")
    memory.write(
        layout.BOOT_PARAMS,
        _zero_page(image, hdr, load_addr, initrd_addr, len(initrd or b""), rsdp_address, e820),
    )
    cr3 = write_identity_map(memory)
    return _long_mode_state(memory, load_addr + ENTRY_64_OFFSET, cr3)


def _place_initrd(hdr: SetupHeader, size: int, kernel_end: int, e820: list) -> int:
    low_top = e820mod.low_ram_top(e820)
    if hdr.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G:
        ceiling = low_top
    else:
        ceiling = min(low_top, hdr.initrd_addr_max + 1)
    addr = e820mod.highest_fit(e820, size, floor=_align_up(kernel_end, 4096), ceiling=ceiling)
    if addr is None:
        raise BootError(
            f"kernel ({kernel_end >> 20} MiB including its load address) and initrd"
            f" ({size / (1 << 20):.1f} MiB) do not fit below {ceiling:#x}: add guest memory"
        )
    return addr


def _zero_page(image, hdr, load_addr, initrd_addr, initrd_size, rsdp_address, e820) -> bytes:
    zp = bytearray(ZERO_PAGE_SIZE)
    zp[HDR_START : hdr.header_end] = image[HDR_START : hdr.header_end]
    zp[BP_TYPE_OF_LOADER] = LOADER_TYPE_UNDEFINED
    # The real-mode setup code never runs, so it needs no heap, and the 64-bit
    # entry loads its own segments: both flags would only mislead.
    zp[BP_LOADFLAGS] = (hdr.loadflags | LOADED_HIGH) & ~(KEEP_SEGMENTS | CAN_USE_HEAP)
    struct.pack_into("<H", zp, BP_HEAP_END_PTR, 0)
    struct.pack_into("<I", zp, BP_CODE32_START, load_addr)
    struct.pack_into("<I", zp, BP_CMD_LINE_PTR, layout.BOOT_CMDLINE)
    struct.pack_into("<I", zp, BP_EXT_CMD_LINE_PTR, 0)
    low32 = 0xFFFF_FFFF
    struct.pack_into("<II", zp, BP_RAMDISK_IMAGE, initrd_addr & low32, initrd_size & low32)
    struct.pack_into("<II", zp, BP_EXT_RAMDISK_IMAGE, initrd_addr >> 32, initrd_size >> 32)
    table = e820mod.to_boot_params(e820)
    zp[BP_E820_ENTRIES] = len(e820)
    zp[BP_E820_TABLE : BP_E820_TABLE + len(table)] = table
    if hdr.version >= RSDP_FIELD_VERSION:
        struct.pack_into("<Q", zp, BP_ACPI_RSDP_ADDR, rsdp_address)
    return bytes(zp)


def _long_mode_state(memory, entry: int, cr3: int) -> BootCpuState:
    code = flat_segment(BOOT_CS, TYPE_CODE_XR, long_mode=True)
    data = flat_segment(BOOT_DS, TYPE_DATA_RW)
    gdt = gdt_bytes([None, None, code, data])
    memory.write(layout.BOOT_GDT, gdt)
    return BootCpuState(
        rip=entry,
        rsi=layout.BOOT_PARAMS,
        cs=code, ds=data, es=data, fs=data, gs=data, ss=data,
        tr=tss_segment(0),
        gdt=DescriptorTable(layout.BOOT_GDT, len(gdt) - 1),
        # No IDT: interrupts stay off until the kernel installs its own.
        idt=DescriptorTable(layout.BOOT_IDT, 0),
        cr0=CR0_PE | CR0_ET | CR0_PG,
        cr3=cr3,
        cr4=CR4_PAE,
        efer=EFER_LME | EFER_LMA,
    )
