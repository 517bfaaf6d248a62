"""Guest physical memory: RAM regions backed by private mappings.

Every access is checked against the whole range [gpa, gpa + length): an access
that runs past the end of RAM fails with GuestMemoryError, it is never
silently truncated. An access may span adjacent regions only when they are
physically contiguous; the 32-bit PCI hole is not RAM.

A fresh boot's RAM is anonymous memory; a restored VM's is mapped from its
snapshot file (`GuestMemory.from_file`), privately: pages are read from the
file when the guest first touches them and copied when it first writes them,
so the file is never changed and any number of VMs can map it at once. Both
are private mappings, whose untouched pages read as the kernel's shared zero
page (a snapshot reads every page without making the guest any bigger), and
neither is inherited by a child process (MADV_DONTFORK: a helper started by
fork-and-exec never shares the guest's pages copy-on-write with it).
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import re
import struct
import threading
from dataclasses import dataclass, field

_PRIVATE = mmap.MAP_PRIVATE | getattr(mmap, "MAP_NORESERVE", 0)  # a 4 GiB guest costs only the pages it touches


class GuestMemoryError(Exception):
    """A guest-physical access that is not entirely inside RAM."""


@dataclass(eq=False)
class MemoryRegion:
    gpa: int
    size: int
    mapping: mmap.mmap = field(repr=False)
    host_address: int = field(repr=False)
    anonymous: bool = True  # False: mapped from a file (whose pages may hold data before they are touched)

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @classmethod
    def allocate(cls, gpa: int, size: int) -> "MemoryRegion":
        _check_aligned(gpa, size)
        _open_pagemap()  # now, while files may still be opened (pyvmm/sandbox.py)
        mapping = mmap.mmap(-1, size, flags=_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        return cls._of(gpa, size, mapping, True)

    @classmethod
    def map_file(cls, gpa: int, size: int, fd: int, offset: int) -> "MemoryRegion":
        """`size` bytes of file `fd` from `offset` (page aligned), copy-on-write."""
        _check_aligned(gpa, size)
        if offset % mmap.PAGESIZE:
            raise ValueError(f"region {gpa:#x} would start at file offset {offset:#x}, which is not page aligned")
        _open_pagemap()  # for a reboot's fresh RAM, after the sandbox's lockdown
        mapping = mmap.mmap(fd, size, flags=_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        return cls._of(gpa, size, mapping, False)

    @classmethod
    def _of(cls, gpa: int, size: int, mapping: mmap.mmap, anonymous: bool) -> "MemoryRegion":
        if hasattr(mmap, "MADV_DONTFORK"):
            mapping.madvise(mmap.MADV_DONTFORK)
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
        return cls(gpa, size, mapping, address, anonymous)

    def touched_runs(self):
        """(start, end) offsets of the runs of pages that may hold anything
        but zeros: for anonymous memory, the pages the process's page
        tables hold or that are swapped out (/proc/self/pagemap); a page
        never touched is zero and is never read, so scanning a big idle
        guest costs no page faults. A file's pages may all hold data."""
        pagemap = _open_pagemap()
        if not self.anonymous or pagemap is None:
            yield 0, self.size
            return
        page = mmap.PAGESIZE
        pages = self.size // page
        first = self.host_address // page
        done = 0
        while done < pages:  # in slices: 8 bytes of pagemap per page
            count = min(pages - done, 1 << 18)
            entries = os.pread(pagemap, count * 8, (first + done) * 8)
            if len(entries) != count * 8:
                yield done * page, self.size  # cannot tell: all of the rest may hold data
                return
            # Bits 63 (present) and 62 (swapped) are in each little-endian entry's last byte.
            flags = entries[7::8].translate(_PRESENT_OR_SWAPPED)
            for run in _ONES.finditer(flags):
                yield (done + run.start()) * page, (done + run.end()) * page
            done += count


_PRESENT_OR_SWAPPED = bytes(1 if byte & 0xC0 else 0 for byte in range(256))
_ONES = re.compile(b"\x01+")
_pagemap_lock = threading.Lock()
_pagemap: list[int | None] = []  # opened once per process: [fd], [None] where it cannot be


def _open_pagemap() -> int | None:
    with _pagemap_lock:
        if not _pagemap:
            try:
                _pagemap.append(os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                _pagemap.append(None)
        return _pagemap[0]


def _check_aligned(gpa: int, size: int) -> None:
    if gpa % mmap.PAGESIZE or size % mmap.PAGESIZE or size <= 0:
        raise ValueError(f"region {gpa:#x}+{size:#x} is not page aligned")


class GuestMemory:
    def __init__(self, ranges: list[tuple[int, int]]):
        """Fresh RAM: zeroed anonymous memory for each (gpa, size) range."""
        self._take([MemoryRegion.allocate(g, s) for g, s in ranges])

    @classmethod
    def from_file(cls, fd: int, regions: list[tuple[int, int, int]]) -> "GuestMemory":
        """RAM mapped from file `fd`: each (gpa, size, file offset), copy-on-write."""
        memory = cls.__new__(cls)
        memory._take([MemoryRegion.map_file(g, s, fd, o) for g, s, o in regions])
        return memory

    def _take(self, regions: list[MemoryRegion]) -> None:
        regions = sorted(regions, key=lambda r: r.gpa)
        for a, b in zip(regions, regions[1:]):
            if a.end > b.gpa:
                raise ValueError(f"RAM regions {a.gpa:#x} and {b.gpa:#x} overlap")
        self.regions = regions
        self._starts = [r.gpa for r in regions]
        self._ends = [r.end for r in regions]
        self._views = [memoryview(r.mapping) for r in regions]

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    def _locate(self, gpa: int) -> int:
        index = bisect.bisect_right(self._starts, gpa) - 1
        if index < 0 or gpa >= self._ends[index]:
            raise GuestMemoryError(f"guest physical address {gpa:#x} is not RAM")
        return index

    def region(self, gpa: int) -> MemoryRegion:
        """The RAM region holding `gpa`; GuestMemoryError if it is not RAM."""
        return self.regions[self._locate(gpa)]

    def _pieces(self, gpa: int, length: int):
        """Yield (view, offset, count) covering [gpa, gpa+length), or raise."""
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"bad guest access {gpa:#x}+{length}")
        if length == 0:
            return
        index = self._locate(gpa)
        remaining = length
        while True:
            region = self.regions[index]
            offset = gpa - region.gpa
            count = min(remaining, region.size - offset)
            yield self._views[index], offset, count
            remaining -= count
            gpa += count
            if not remaining:
                return
            index += 1
            if index == len(self.regions) or self.regions[index].gpa != gpa:
                raise GuestMemoryError(f"guest access runs past the end of RAM at {gpa:#x}")

    def check(self, gpa: int, length: int) -> None:
        """Raise GuestMemoryError unless [gpa, gpa+length) is all RAM."""
        for _ in self._pieces(gpa, length):
            pass

    def contains(self, gpa: int, length: int = 1) -> bool:
        try:
            self.check(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable zero-copy view; the range must lie inside one region."""
        if length < 0:
            raise GuestMemoryError(f"bad guest access {gpa:#x}+{length}")
        index = self._locate(gpa)
        if gpa + length > self._ends[index]:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is not one RAM region")
        offset = gpa - self._starts[index]
        return self._views[index][offset : offset + length]

    def read(self, gpa: int, length: int) -> bytes:
        pieces = list(self._pieces(gpa, length))
        return b"".join(bytes(v[o : o + n]) for v, o, n in pieces)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        data = memoryview(data).cast("B")
        pieces = list(self._pieces(gpa, len(data)))  # check everything before writing
        done = 0
        for view, offset, count in pieces:
            view[offset : offset + count] = data[done : done + count]
            done += count

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        pieces = list(self._pieces(gpa, length))
        for view, offset, count in pieces:
            view[offset : offset + count] = bytes([byte]) * count

    def discard(self, gpa: int, length: int) -> None:
        """Clear [gpa, gpa+length) and give its host memory back where the
        kernel can: anonymous RAM is dropped (MADV_DONTNEED: it reads as
        zeros and costs nothing until touched again); RAM mapped from a
        file (a restored snapshot) would read the file again, so it is
        written with zeros instead."""
        pieces = list(self._pieces(gpa, length))  # check everything first
        index = self._locate(gpa)
        for view, offset, count in pieces:
            region = self.regions[index]
            index += 1
            if region.anonymous and hasattr(mmap, "MADV_DONTNEED"):
                region.mapping.madvise(mmap.MADV_DONTNEED, offset, count)
            else:
                view[offset : offset + count] = bytes(count)

    def read_int(self, gpa: int, size: int) -> int:
        return int.from_bytes(self.read(gpa, size), "little")

    def write_int(self, gpa: int, size: int, value: int) -> None:
        self.write(gpa, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def read_struct(self, gpa: int, fmt: str) -> tuple:
        return struct.unpack(fmt, self.read(gpa, struct.calcsize(fmt)))

    def write_struct(self, gpa: int, fmt: str, *values) -> None:
        self.write(gpa, struct.pack(fmt, *values))

    def gpa_of_host_address(self, address: int) -> int | None:
        """The guest-physical address a host address inside RAM stands for."""
        for region in self.regions:
            if region.host_address <= address < region.host_address + region.size:
                return region.gpa + (address - region.host_address)
        return None

    def host_address(self, gpa: int) -> int:
        """Host virtual address of guest-physical `gpa` (for KVM and iovecs)."""
        index = self._locate(gpa)
        region = self.regions[index]
        return region.host_address + (gpa - region.gpa)

    def close(self) -> None:
        for view in self._views:
            view.release()
        self._views = []
        # The ctypes export taken for host_address keeps the mapping alive
        # until the region objects are collected; that is what we want while
        # KVM may still reference the pages.
        self.regions = []
        self._starts = []
        self._ends = []
