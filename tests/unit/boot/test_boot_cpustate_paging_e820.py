"""Segment descriptors, identity page tables and the E820 map."""

import struct

import pytest

from pyvmm.core import layout
from pyvmm.boot import e820 as e820mod
from pyvmm.boot.cpustate import (
    TYPE_CODE_XR, TYPE_DATA_RW, flat_segment, gdt_bytes, tss_segment,
)
from pyvmm.boot.e820 import E820Entry, E820Type, build_e820
from pyvmm.boot.errors import BootError
from pyvmm.boot.paging import identity_map_tables, write_identity_map
from pyvmm.core.memory import GuestMemory

MiB = 1 << 20
GiB = 1 << 30


# --- descriptors: the architecture's well-known flat descriptors ------------

def test_descriptor_encodings_match_the_architecture():
    assert flat_segment(0x10, TYPE_CODE_XR, long_mode=True).descriptor() == 0x00AF9B000000FFFF
    assert flat_segment(0x08, TYPE_CODE_XR).descriptor() == 0x00CF9B000000FFFF
    assert flat_segment(0x18, TYPE_DATA_RW).descriptor() == 0x00CF93000000FFFF
    assert tss_segment(0x18).descriptor() == 0x00008B0000000067


def test_descriptor_splits_base():
    seg = flat_segment(0x08, TYPE_DATA_RW)
    seg.base = 0x12345678
    d = seg.descriptor()
    assert (d >> 16) & 0xFFFFFF == 0x345678 and d >> 56 == 0x12


def test_gdt_bytes_null_slots():
    gdt = gdt_bytes([None, flat_segment(0x08, TYPE_CODE_XR)])
    assert gdt[:8] == bytes(8) and struct.unpack_from("<Q", gdt, 8)[0] == 0x00CF9B000000FFFF


def test_byte_granular_limit_too_large_is_refused():
    seg = tss_segment(0)
    seg.limit = 0x100000
    with pytest.raises(ValueError):
        seg.descriptor()


# --- paging -----------------------------------------------------------------

def _walk(pages: dict[int, bytes], cr3: int, va: int) -> int:
    def entry(table: int, index: int) -> int:
        return struct.unpack_from("<Q", pages[table], index * 8)[0]

    pml4e = entry(cr3, (va >> 39) & 0x1FF)
    assert pml4e & 1, f"PML4 entry for {va:#x} not present"
    pdpte = entry(pml4e & ~0xFFF, (va >> 30) & 0x1FF)
    assert pdpte & 1 and not pdpte & 0x80
    pde = entry(pdpte & ~0xFFF, (va >> 21) & 0x1FF)
    assert pde & 1 and pde & 0x80 and pde & 2
    return (pde & ~0x1FFFFF & ((1 << 52) - 1)) | (va & 0x1FFFFF)


@pytest.mark.parametrize("va", [0, 0x7000, 0x1000200, 0x3FFF_FFFF, 0x4000_0000, 0xFEE0_0000, 0xFFFF_FFFF])
def test_identity_map_translates_every_address_below_4g_to_itself(va):
    pages = identity_map_tables(layout.BOOT_PML4, layout.BOOT_PDPT, layout.BOOT_PD)
    assert _walk(pages, layout.BOOT_PML4, va) == va


def test_identity_map_stops_at_4g():
    pages = identity_map_tables(layout.BOOT_PML4, layout.BOOT_PDPT, layout.BOOT_PD)
    pdpt = pages[layout.BOOT_PDPT]
    assert struct.unpack_from("<Q", pdpt, 4 * 8)[0] == 0
    assert len(pages) == 6 and all(len(p) == 4096 for p in pages.values())


def test_write_identity_map_uses_layout_addresses():
    mem = GuestMemory(layout.ram_ranges(4 * MiB))
    assert write_identity_map(mem) == layout.BOOT_PML4
    pml4e = mem.read_int(layout.BOOT_PML4, 8)
    assert pml4e & ~0xFFF == layout.BOOT_PDPT
    assert mem.read_int(layout.BOOT_PD + 3 * 4096 + 511 * 8, 8) & ~0xFFF == 0xFFE0_0000


# --- E820 -------------------------------------------------------------------

def test_e820_small_guest():
    e = build_e820(512 * MiB)
    assert e == [
        E820Entry(0, layout.EBDA_START, E820Type.RAM),
        E820Entry(layout.EBDA_START, layout.LOW_RESERVED_END - layout.EBDA_START, E820Type.RESERVED),
        E820Entry(layout.LOW_RESERVED_END, 511 * MiB, E820Type.RAM),
        E820Entry(layout.XEN_SPECIAL_PAGES, layout.XEN_SPECIAL_PAGES_SIZE, E820Type.RESERVED),
    ]


def test_e820_covers_ram_above_4g():
    e = build_e820(4 * GiB)
    assert e[2].end == layout.PCI_HOLE_START
    assert e[-1] == E820Entry(layout.HIGH_RAM_START, 4 * GiB - layout.PCI_HOLE_START, E820Type.RAM)
    assert sum(x.size for x in e if x.type == E820Type.RAM) == 4 * GiB - (
        layout.LOW_RESERVED_END - layout.EBDA_START)


def test_e820_ram_matches_guest_memory():
    for size in (64 * MiB, 3 * GiB, 5 * GiB):
        for entry in e820mod.ram_entries(build_e820(size)):
            assert any(gpa <= entry.addr and entry.end <= gpa + n for gpa, n in layout.ram_ranges(size))


def test_e820_too_small_guest():
    with pytest.raises(BootError, match="too small"):
        build_e820(1 * MiB)


def test_e820_serialisations():
    e = build_e820(5 * GiB)
    zp = e820mod.to_boot_params(e)
    assert len(zp) == 20 * len(e)
    assert struct.unpack_from("<QQI", zp, 20 * 2) == (layout.LOW_RESERVED_END, e[2].size, 1)
    pvh = e820mod.to_pvh_memmap(e)
    assert len(pvh) == 24 * len(e)
    assert struct.unpack_from("<QQII", pvh, 24 * 1) == (layout.EBDA_START, e[1].size, 2, 0)


def test_zero_page_e820_limit():
    too_many = [E820Entry(i * 4096, 4096, E820Type.RAM) for i in range(129)]
    with pytest.raises(BootError, match="do not fit"):
        e820mod.to_boot_params(too_many)
    assert len(e820mod.to_boot_params(too_many[:128])) == 128 * 20


def test_highest_fit():
    e = build_e820(64 * MiB)
    assert e820mod.highest_fit(e, 4096, floor=0, ceiling=1 << 40) == 64 * MiB - 4096
    assert e820mod.highest_fit(e, 5000, floor=0, ceiling=32 * MiB) == 32 * MiB - 8192
    # Must not straddle the reserved EBDA/BIOS area.
    assert e820mod.highest_fit(e, 0x1000, floor=0, ceiling=layout.LOW_RESERVED_END + 0x800) == (
        layout.EBDA_START - 0x1000 - (layout.EBDA_START % 0x1000))
    assert e820mod.highest_fit(e, 64 * MiB, floor=0, ceiling=1 << 40) is None
    assert e820mod.low_ram_top(e) == 64 * MiB
