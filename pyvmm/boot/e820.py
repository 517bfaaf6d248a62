"""The guest's memory map (E820), as both boot protocols hand it over.

The map follows layout.ram_ranges(): RAM below the EBDA, the EBDA/BIOS area
reserved up to 1 MiB (the ACPI tables live there), RAM up to the PCI hole,
Xen's special pages reserved inside the hole, and RAM again above 4 GiB.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from pyvmm.core import layout

from .errors import BootError

# Linux's zero page holds at most this many entries.
ZEROPAGE_MAX_ENTRIES = 128


class E820Type(IntEnum):
    RAM = 1
    RESERVED = 2
    ACPI = 3
    NVS = 4


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: E820Type

    @property
    def end(self) -> int:
        return self.addr + self.size


def build_e820(mem_size: int) -> list[E820Entry]:
    """The memory map for a guest with `mem_size` bytes of RAM."""
    ranges = layout.ram_ranges(mem_size)
    low_top = ranges[0][1]
    if low_top <= layout.LOW_RESERVED_END:
        raise BootError(
            f"guest memory of {mem_size:#x} bytes is too small: RAM must extend past 1 MiB"
        )
    entries = [
        E820Entry(0, layout.EBDA_START, E820Type.RAM),
        E820Entry(
            layout.EBDA_START, layout.LOW_RESERVED_END - layout.EBDA_START, E820Type.RESERVED
        ),
        E820Entry(layout.LOW_RESERVED_END, low_top - layout.LOW_RESERVED_END, E820Type.RAM),
        E820Entry(layout.XEN_SPECIAL_PAGES, layout.XEN_SPECIAL_PAGES_SIZE, E820Type.RESERVED),
    ]
    entries += [E820Entry(gpa, size, E820Type.RAM) for gpa, size in ranges[1:]]
    return entries


def ram_entries(e820: list[E820Entry]) -> list[E820Entry]:
    return [e for e in e820 if e.type == E820Type.RAM]


def low_ram_top(e820: list[E820Entry]) -> int:
    """End of the RAM range that starts at 1 MiB: where 32-bit loads must stop."""
    for entry in ram_entries(e820):
        if entry.addr <= layout.LOW_RESERVED_END < entry.end:
            return entry.end
    raise BootError("the memory map has no RAM above 1 MiB")


def in_ram(e820: list[E820Entry], start: int, size: int) -> bool:
    """Whether [start, start+size) lies inside a single RAM entry."""
    return any(e.addr <= start and start + size <= e.end for e in ram_entries(e820))


def highest_fit(
    e820: list[E820Entry], size: int, *, floor: int, ceiling: int, align: int = 4096
) -> int | None:
    """The highest `align`ed address a with floor <= a and a+size <= ceiling,
    inside one RAM entry; None if there is none."""
    best = None
    for entry in ram_entries(e820):
        top = min(entry.end, ceiling) - size
        addr = top - top % align
        if addr >= max(entry.addr, floor) and (best is None or addr > best):
            best = addr
    return best


def to_boot_params(e820: list[E820Entry]) -> bytes:
    """Linux boot_params.e820_table: 20-byte packed {addr, size, type} entries."""
    if len(e820) > ZEROPAGE_MAX_ENTRIES:
        raise BootError(f"{len(e820)} memory map entries do not fit the zero page")
    return b"".join(struct.pack("<QQI", e.addr, e.size, e.type) for e in e820)


def to_pvh_memmap(e820: list[E820Entry]) -> bytes:
    """PVH hvm_memmap_table_entry array: {addr, size, type, reserved}, 24 bytes each."""
    return b"".join(struct.pack("<QQII", e.addr, e.size, e.type, 0) for e in e820)
