"""Xen's PVH boot ABI (docs/misc/pvh.pandoc) for ELF kernels.

A PVH kernel is an ELF file (x86-64, or i386 in a 32-bit ELF) with a
XEN_ELFNOTE_PHYS32_ENTRY note. We load
its PT_LOAD segments at their physical addresses, describe the machine in an
hvm_start_info structure and enter at the note's address in 32-bit protected
mode with paging off and %ebx pointing at that structure.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

from pyvmm.core import layout

from . import e820 as e820mod
from .cpustate import (
    CR0_ET, CR0_PE, TYPE_CODE_XR, TYPE_DATA_RW,
    BootCpuState, DescriptorTable, flat_segment, gdt_bytes, tss_segment,
)
from .errors import BootError

ELF_MAGIC = b"\x7fELF"
XEN_ELFNOTE_PHYS32_ENTRY = 18
XEN_NOTE_NAME = b"Xen"

START_INFO_MAGIC = 0x336EC578
START_INFO_VERSION = 1  # version 1 adds the memory map
START_INFO_FORMAT = "<IIIIQQQQII"  # 56 bytes
MODLIST_ENTRY_FORMAT = "<QQQQ"  # paddr, size, cmdline_paddr, reserved

# Everything PVH needs fits in the boot-parameters page.
START_INFO_ADDR = layout.BOOT_PARAMS
MODLIST_ADDR = layout.BOOT_PARAMS + 0x40
MEMMAP_ADDR = layout.BOOT_PARAMS + 0x80
BOOT_PARAMS_END = layout.BOOT_PARAMS + 0x1000

# Selectors of the GDT we leave behind (the ABI leaves them unspecified).
PVH_CS = 0x08
PVH_DS = 0x10
PVH_TR = 0x18

# Low-memory structures we write; kernel segments must keep clear of them.
BOOT_STRUCTURES = [
    ("boot GDT", layout.BOOT_GDT, layout.BOOT_IDT - layout.BOOT_GDT),
    ("start_info page", layout.BOOT_PARAMS, 0x1000),
    ("command line", layout.BOOT_CMDLINE, layout.BOOT_CMDLINE_MAX),
]


@dataclass(frozen=True)
class LoadSegment:
    paddr: int
    offset: int
    filesz: int
    memsz: int


@dataclass(frozen=True)
class PvhImage:
    entry: int
    segments: list[LoadSegment]
    elfclass: int


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def iter_notes(blob: bytes):
    """Yield (name, type, desc) of each note in a PT_NOTE/SHT_NOTE blob."""
    pos = 0
    while pos + 12 <= len(blob):
        namesz, descsz, ntype = struct.unpack_from("<III", blob, pos)
        name_at = pos + 12
        desc_at = name_at + (namesz + 3) // 4 * 4
        end = desc_at + (descsz + 3) // 4 * 4
        if desc_at + descsz > len(blob):
            raise BootError(f"ELF note at offset {pos} runs past the end of its segment")
        yield bytes(blob[name_at : name_at + namesz]).rstrip(b"\0"), ntype, bytes(
            blob[desc_at : desc_at + descsz]
        )
        pos = end


def _phys32_entry(note_blobs) -> int | None:
    for blob in note_blobs:
        for name, ntype, desc in iter_notes(blob):
            if name == XEN_NOTE_NAME and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                if len(desc) not in (4, 8):
                    raise BootError(f"Xen PHYS32_ENTRY note has a {len(desc)}-byte value")
                return int.from_bytes(desc, "little")
    return None


def parse_pvh_elf(data: bytes) -> PvhImage:
    """Validate an ELF kernel and find its PVH entry; BootError if unusable."""
    try:
        # Imported here: pyelftools costs a noticeable part of pyvmm's start-up
        # and only PVH ELF kernels need it (a bzImage is the common case).
        from elftools.elf.elffile import ELFFile

        elf = ELFFile(io.BytesIO(data))
        machine = elf["e_machine"]
        segments = list(elf.iter_segments())
        # pyelftools silently returns short data for a truncated file.
        for seg in segments:
            if seg["p_offset"] + seg["p_filesz"] > len(data):
                raise BootError(
                    f"kernel file is truncated: a segment needs bytes up to"
                    f" {seg['p_offset'] + seg['p_filesz']}, the file has {len(data)}"
                )
        note_blobs = [s.data() for s in segments if s["p_type"] == "PT_NOTE"]
        if not note_blobs:
            note_sections = [s for s in elf.iter_sections() if s["sh_type"] == "SHT_NOTE"]
            if any(s["sh_offset"] + s["sh_size"] > len(data) for s in note_sections):
                raise BootError("kernel file is truncated inside a note section")
            note_blobs = [s.data() for s in note_sections]
        loads = [
            LoadSegment(s["p_paddr"], s["p_offset"], s["p_filesz"], s["p_memsz"])
            for s in segments
            if s["p_type"] == "PT_LOAD" and s["p_memsz"]
        ]
    except BootError:
        raise
    except Exception as exc:  # pyelftools reports damage with many exception types
        raise BootError(f"malformed ELF kernel: {exc}") from None
    # The PVH entry is 32-bit code either way: an i386 kernel (EM_386, always
    # ELFCLASS32) boots like an x86-64 one, as on Xen and QEMU.
    if machine != "EM_X86_64" and not (machine == "EM_386" and elf.elfclass == 32):
        raise BootError(f"ELF kernel is for {machine}, not x86 (EM_X86_64, or EM_386 in a 32-bit ELF)")
    entry = _phys32_entry(note_blobs)
    if entry is None:
        raise BootError("ELF kernel has no Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")
    if not loads:
        raise BootError("ELF kernel has no loadable segments")
    for seg in loads:
        if seg.filesz > seg.memsz:
            raise BootError(f"ELF segment at {seg.paddr:#x} has file size > memory size")
    if not any(s.paddr <= entry < s.paddr + s.memsz for s in loads):
        raise BootError(f"PVH entry point {entry:#x} is outside every loaded segment")
    return PvhImage(entry, loads, elf.elfclass)


def _check_placement(seg: LoadSegment, e820: list) -> None:
    end = seg.paddr + seg.memsz
    if not e820mod.in_ram(e820, seg.paddr, seg.memsz):
        raise BootError(f"ELF segment {seg.paddr:#x}-{end:#x} is outside guest RAM")
    for what, start, size in BOOT_STRUCTURES:
        if seg.paddr < start + size and start < end:
            raise BootError(
                f"ELF segment {seg.paddr:#x}-{end:#x} overlaps the {what} at {start:#x}"
            )


def load_pvh(
    memory, image: bytes, initrd: bytes | None, cmdline: bytes, rsdp_address: int, e820: list
) -> BootCpuState:
    pvh = parse_pvh_elf(image)
    if len(cmdline) > layout.BOOT_CMDLINE_MAX - 1:
        raise BootError(
            f"command line is {len(cmdline)} bytes; at most {layout.BOOT_CMDLINE_MAX - 1} fit"
        )
    memmap = e820mod.to_pvh_memmap(e820)
    if MEMMAP_ADDR + len(memmap) > BOOT_PARAMS_END:
        raise BootError(f"{len(e820)} memory map entries do not fit the start_info page")
    for seg in pvh.segments:
        _check_placement(seg, e820)

    initrd_addr = 0
    if initrd:
        kernel_end = max(s.paddr + s.memsz for s in pvh.segments)
        initrd_addr = e820mod.highest_fit(
            e820, len(initrd), floor=(kernel_end + 4095) // 4096 * 4096,
            ceiling=e820mod.low_ram_top(e820),
        )
        if initrd_addr is None:
            raise BootError(
                f"kernel (ending at {kernel_end:#x}) and initrd ({len(initrd)} bytes)"
                " do not fit in low RAM: add guest memory"
            )

    for seg in pvh.segments:
        memory.write(seg.paddr, memoryview(image)[seg.offset : seg.offset + seg.filesz])
        memory.fill(seg.paddr + seg.filesz, seg.memsz - seg.filesz)  # .bss
    memory.write(layout.BOOT_CMDLINE, cmdline + b"\0")
    if initrd:
        memory.write(initrd_addr, initrd)
        memory.write_struct(MODLIST_ADDR, MODLIST_ENTRY_FORMAT, initrd_addr, len(initrd), 0, 0)
    memory.write(MEMMAP_ADDR, memmap)
    memory.write_struct(
        START_INFO_ADDR, START_INFO_FORMAT,
        START_INFO_MAGIC, START_INFO_VERSION, 0,
        1 if initrd else 0, MODLIST_ADDR if initrd else 0,
        layout.BOOT_CMDLINE, rsdp_address,
        MEMMAP_ADDR, len(e820), 0,
    )
    return _protected_mode_state(memory, pvh.entry)


def _protected_mode_state(memory, entry: int) -> BootCpuState:
    code = flat_segment(PVH_CS, TYPE_CODE_XR)
    data = flat_segment(PVH_DS, TYPE_DATA_RW)
    tss = tss_segment(PVH_TR)
    gdt = gdt_bytes([None, code, data, tss])
    memory.write(layout.BOOT_GDT, gdt)
    return BootCpuState(
        rip=entry,
        rbx=START_INFO_ADDR,
        cs=code, ds=data, es=data, fs=data, gs=data, ss=data,
        tr=tss,
        gdt=DescriptorTable(layout.BOOT_GDT, len(gdt) - 1),
        idt=DescriptorTable(layout.BOOT_IDT, 0),
        cr0=CR0_PE | CR0_ET,  # paging off; ET is not writable
        cr4=0,
        efer=0,
    )
