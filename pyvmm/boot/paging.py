"""Identity page tables for entering a kernel directly in 64-bit mode.

Linux's 64-bit boot protocol wants the kernel, the zero page and the command
line identity mapped; mapping all of 0..4 GiB with 2 MiB pages covers that
with one PML4, one PDPT and four page directories.
"""

from __future__ import annotations

import struct

from pyvmm import layout
from pyvmm.layout import PAGE_SIZE

PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_LARGE = 1 << 7  # a PD entry that maps a 2 MiB page

LARGE_PAGE = 2 << 20
IDENTITY_MAPPED_GIB = 4


def identity_map_tables(pml4: int, pdpt: int, pd: int) -> dict[int, bytes]:
    """{guest address: page contents} for an identity map of 0..4 GiB.

    The four page directories are consecutive pages starting at `pd`.
    """
    pages = {
        pml4: struct.pack("<Q", pdpt | PTE_PRESENT | PTE_WRITABLE).ljust(PAGE_SIZE, b"\0"),
        pdpt: b"".join(
            struct.pack("<Q", (pd + i * PAGE_SIZE) | PTE_PRESENT | PTE_WRITABLE)
            for i in range(IDENTITY_MAPPED_GIB)
        ).ljust(PAGE_SIZE, b"\0"),
    }
    flags = PTE_PRESENT | PTE_WRITABLE | PTE_LARGE
    for gib in range(IDENTITY_MAPPED_GIB):
        base = gib << 30
        pages[pd + gib * PAGE_SIZE] = b"".join(
            struct.pack("<Q", (base + i * LARGE_PAGE) | flags) for i in range(512)
        )
    return pages


def write_identity_map(memory) -> int:
    """Write the tables at layout's BOOT_PML4/PDPT/PD; returns the CR3 value."""
    for gpa, page in identity_map_tables(
        layout.BOOT_PML4, layout.BOOT_PDPT, layout.BOOT_PD
    ).items():
        memory.write(gpa, page)
    return layout.BOOT_PML4
