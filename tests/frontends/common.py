"""What the fake frontends share: guest RAM with the guest's grant table in
it (granting pages as gnttab_grant_foreign_access() does), I/O rings on
granted pages, the byte rings of the console and xenstore pages, pages at a
host address (for what works on host addresses), and reproducible test
data."""

from __future__ import annotations

import ctypes
import mmap
import random
import struct

from pyvmm.core.memory import GuestMemory
from pyvmm.xen.backend.ring import FrontRing
from pyvmm.xen.hv import gnttab
from pyvmm.xen.hv.gnttab import GTF_permit_access, GTF_readonly, GrantTable

PAGE = 4096
MASK32 = 0xFFFF_FFFF


def pattern(seed: int, length: int) -> bytes:
    """`length` bytes that depend on `seed` only."""
    return random.Random(seed).randbytes(length)


class HostPages:
    """Anonymous shared memory at a host address, as KVM maps a guest's
    pages: for the parts that work on host addresses (atomics, the 2-level
    event channel bits in shared_info)."""

    def __init__(self, pages: int = 1) -> None:
        self.map = mmap.mmap(-1, pages * PAGE)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self.view = memoryview(self.map)


class GuestPages:
    """A guest's RAM and grant table (v1 entries), as its frontend drivers
    use them: frames handed out from `next_gfn` on, grant references from
    the first unreserved one on, each entry written by the guest."""

    def __init__(self, ram_pages: int, *, first_gfn: int, max_frames: int) -> None:
        self.memory = GuestMemory([(0, ram_pages * PAGE)])
        self.table = GrantTable(self.memory, max_frames=max_frames)
        self.next_ref = gnttab.GNTTAB_NR_RESERVED_ENTRIES
        self.next_gfn = first_gfn

    def new_gfn(self) -> int:
        gfn = self.next_gfn
        self.next_gfn += 1
        return gfn

    def grant(self, gfn, *, readonly=False, domid=0, flags=None):
        """A fresh grant reference for `gfn`, to domain `domid`."""
        ref = self.next_ref
        self.next_ref += 1
        self.set_entry(ref, gfn, readonly=readonly, domid=domid, flags=flags)
        return ref

    def _entry_address(self, ref):
        return self.table.frame_host_address(ref // gnttab.ENTRIES_PER_FRAME) + (ref % gnttab.ENTRIES_PER_FRAME) * 8

    def set_entry(self, ref, gfn, *, readonly=False, domid=0, flags=None):
        """Write grant entry `ref` (a fresh grant of `gfn`, unless `flags` says otherwise)."""
        if flags is None:
            flags = GTF_permit_access | (GTF_readonly if readonly else 0)
        ctypes.memmove(self._entry_address(ref), struct.pack("<HHI", flags, domid, gfn), 8)

    def entry_flags(self, ref):
        """The entry's flags as the guest sees them (GTF_IN_USE while the backend maps it)."""
        return struct.unpack("<H", ctypes.string_at(self._entry_address(ref), 2))[0]

    def front_ring(self, gfns, entry_size):
        """The frontend's end of an I/O ring on pages `gfns`, each granted
        (writable) to the backend: (FrontRing, their references)."""
        refs = [self.grant(gfn) for gfn in gfns]
        return FrontRing([self.memory.view(gfn * PAGE, PAGE) for gfn in gfns], entry_size), refs

    def map_for_backend(self, refs):
        """The grants mapped writable, as a backend maps a ring's pages."""
        return [self.table.map(ref, writable=True) for ref in refs]


class SharedPage:
    """A page the guest shares with the host, with its little-endian 32-bit
    indexes (free-running, wrapping at 2**32)."""

    def __init__(self, page) -> None:
        self.page = page

    def u32(self, offset):
        return struct.unpack_from("<I", self.page, offset)[0]

    def set_u32(self, offset, value):
        struct.pack_into("<I", self.page, offset, value & MASK32)

    def ring_put(self, offset: int, size: int, prod: int, cons: int, data: bytes) -> int:
        """Copy as much of `data` as fits into the byte ring of `size` bytes
        (a power of two) at `offset`, from index `prod` on, given the other
        side's `cons`; returns how much. The caller publishes the index."""
        room = size - ((prod - cons) & MASK32)
        count = max(0, min(room, size, len(data)))
        for i in range(count):
            self.page[offset + ((prod + i) & (size - 1))] = data[i]
        return count

    def ring_take(self, offset: int, size: int, cons: int, prod: int) -> bytes:
        """The bytes between `cons` and `prod` in the byte ring at `offset`.
        The caller publishes the new consumer index."""
        return bytes(self.page[offset + ((cons + i) & (size - 1))] for i in range((prod - cons) & MASK32))
