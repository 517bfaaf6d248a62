"""Guest physical memory: RAM regions backed by anonymous shared mappings.

Every access is checked against the whole range [gpa, gpa + length): an access
that runs past the end of RAM fails with GuestMemoryError, it is never
silently truncated. An access may span adjacent regions only when they are
physically contiguous; the 32-bit PCI hole is not RAM.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import struct
from dataclasses import dataclass, field


class GuestMemoryError(Exception):
    """A guest-physical access that is not entirely inside RAM."""


@dataclass(eq=False)
class MemoryRegion:
    gpa: int
    size: int
    mapping: mmap.mmap = field(repr=False)
    host_address: int = field(repr=False)

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @classmethod
    def allocate(cls, gpa: int, size: int) -> "MemoryRegion":
        if gpa % mmap.PAGESIZE or size % mmap.PAGESIZE or size <= 0:
            raise ValueError(f"region {gpa:#x}+{size:#x} is not page aligned")
        # MAP_NORESERVE: a 4 GiB guest costs only the pages it touches.
        flags = mmap.MAP_SHARED | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        mapping = mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
        return cls(gpa, size, mapping, address)


class GuestMemory:
    def __init__(self, ranges: list[tuple[int, int]]):
        regions = sorted((MemoryRegion.allocate(g, s) for g, s in ranges), key=lambda r: r.gpa)
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

    def read_int(self, gpa: int, size: int) -> int:
        return int.from_bytes(self.read(gpa, size), "little")

    def write_int(self, gpa: int, size: int, value: int) -> None:
        self.write(gpa, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def read_struct(self, gpa: int, fmt: str) -> tuple:
        return struct.unpack(fmt, self.read(gpa, struct.calcsize(fmt)))

    def write_struct(self, gpa: int, fmt: str, *values) -> None:
        self.write(gpa, struct.pack(fmt, *values))

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
