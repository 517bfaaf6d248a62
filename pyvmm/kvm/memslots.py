"""Bookkeeping of KVM memory slots: which guest-physical ranges are backed by
which host memory, under which slot number.

KVM cannot resize a slot, so taking pages out of the middle of a slot
(an overlay page mapped inside RAM) means deleting it and re-creating the
parts that remain. MemslotTable does that, hands out slot numbers (reusing
freed ones) and keeps within KVM's slot limit. It talks to KVM only through
the injected `set_region` callable, so it can be tested without KVM.

Splitting a slot is not atomic: between the delete and the re-creates a
running vCPU touching that RAM would see MMIO exits. Callers change slots
while the other vCPUs are paused, or accept that window.
"""

from __future__ import annotations

import bisect
import mmap
from dataclasses import dataclass
from typing import Protocol

from .uapi import KVM_MEM_READONLY


class SetRegion(Protocol):
    """KVM_SET_USER_MEMORY_REGION; size 0 deletes the slot."""

    def __call__(self, slot: int, gpa: int, size: int, host_address: int, flags: int) -> None: ...


class MemslotError(Exception):
    """A mapping request that conflicts with the current slots."""


@dataclass(frozen=True)
class Memslot:
    slot: int
    gpa: int
    size: int
    host_address: int
    readonly: bool = False

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def flags(self) -> int:
        return KVM_MEM_READONLY if self.readonly else 0


class MemslotTable:
    def __init__(self, set_region: SetRegion, max_slots: int, page_size: int = mmap.PAGESIZE):
        if max_slots <= 0:
            raise ValueError("KVM offers no memory slots")
        self._set_region = set_region
        self.max_slots = max_slots
        self._page_size = page_size
        self._slots: list[Memslot] = []  # sorted by gpa, never overlapping
        self._free_ids: list[int] = []  # sorted: lowest free id first
        self._next_id = 0

    @property
    def slots(self) -> tuple[Memslot, ...]:
        return tuple(self._slots)

    @property
    def free_slots(self) -> int:
        """Slots still free: taking one run of pages out of mapped RAM
        needs at most one (the slot around it split in two)."""
        return self._available_ids()

    def lookup(self, gpa: int) -> Memslot | None:
        index = bisect.bisect_right(self._starts(), gpa) - 1
        if index >= 0 and gpa < self._slots[index].end:
            return self._slots[index]
        return None

    def map(self, gpa: int, size: int, host_address: int, readonly: bool = False) -> Memslot:
        """Back [gpa, gpa+size) with host memory at `host_address`."""
        self._check_aligned(gpa, size, host_address)
        overlapping = self._overlapping(gpa, size)
        if overlapping:
            first = overlapping[0]
            raise MemslotError(
                f"{gpa:#x}+{size:#x} overlaps slot {first.slot} at {first.gpa:#x}+{first.size:#x}"
            )
        if self._available_ids() < 1:
            raise MemslotError(f"all {self.max_slots} KVM memory slots are in use")
        return self._create(gpa, size, host_address, readonly)

    def map_joined(self, gpa: int, size: int, host_address: int, low: int, high: int) -> Memslot:
        """map() [gpa, gpa+size), joined with the slots either side of it
        that continue it both in the guest and in host memory, inside
        [low, high): RAM coming back into a hole in its slot takes no slot
        more (one fewer when it fills the hole), so it can come back even
        when every slot is in use."""
        self._check_aligned(gpa, size, host_address)
        end = gpa + size
        left, right = self.lookup(gpa - 1) if gpa else None, self.lookup(end)
        joined = [slot for slot, touches in (
            (left, left is not None and left.end == gpa and left.host_address + left.size == host_address),
            (right, right is not None and right.gpa == end and host_address + size == right.host_address),
        ) if touches and not slot.readonly and low <= slot.gpa and slot.end <= high]
        if not joined or self._overlapping(gpa, size):
            return self.map(gpa, size, host_address)  # map() refuses an overlap
        for slot in joined:
            self._delete(slot)
        first = min([gpa] + [slot.gpa for slot in joined])
        last = max([end] + [slot.end for slot in joined])
        try:
            return self._create(first, last - first, host_address - (gpa - first), False)
        except BaseException:
            for slot in joined:  # as it was
                self._create(slot.gpa, slot.size, slot.host_address, False)
            raise

    def unmap(self, gpa: int, size: int) -> None:
        """Remove [gpa, gpa+size) from the guest; every page of it must be
        mapped. Slots only partly covered keep their other parts."""
        self._check_aligned(gpa, size, 0)
        end = gpa + size
        affected = self._overlapping(gpa, size)
        covered = gpa
        for slot in affected:
            if slot.gpa > covered:
                break
            covered = slot.end
        if covered < end:
            raise MemslotError(f"{max(covered, gpa):#x} in {gpa:#x}+{size:#x} is not mapped")

        remnants = [piece for slot in affected for piece in self._remnants(slot, gpa, end)]
        if len(remnants) - len(affected) > self._available_ids():
            raise MemslotError(f"splitting needs more than the {self.max_slots} KVM memory slots")

        for slot in affected:
            self._delete(slot)
        for old, piece_gpa, piece_end in remnants:
            offset = piece_gpa - old.gpa
            self._create(piece_gpa, piece_end - piece_gpa, old.host_address + offset, old.readonly)

    def coalesce(self, gpa: int, low: int, high: int) -> Memslot | None:
        """Merge the slot holding `gpa` with its neighbours inside [low, high)
        that continue it both in the guest and in host memory (the pieces an
        overlay page left of a RAM slot, once RAM is back under it). Returns
        the slot now holding `gpa`, or None where nothing is mapped."""
        slot = self.lookup(gpa)
        if slot is None:
            return None
        index = self._slots.index(slot)

        def continues(a: Memslot, b: Memslot) -> bool:
            return (a.end == b.gpa and a.host_address + a.size == b.host_address
                    and a.readonly == b.readonly and low <= a.gpa and b.end <= high)

        first = last = index
        while first > 0 and continues(self._slots[first - 1], self._slots[first]):
            first -= 1
        while last + 1 < len(self._slots) and continues(self._slots[last], self._slots[last + 1]):
            last += 1
        if first == last:
            return slot
        group = self._slots[first : last + 1]
        for piece in group:
            self._delete(piece)
        head = group[0]
        return self._create(head.gpa, group[-1].end - head.gpa, head.host_address, head.readonly)

    # --- internals ------------------------------------------------------------

    def _check_aligned(self, gpa: int, size: int, host_address: int) -> None:
        page = self._page_size
        if size <= 0:
            raise MemslotError(f"memory slot size {size:#x} must be positive")
        if gpa < 0 or gpa % page or size % page or host_address % page:
            raise MemslotError(
                f"{gpa:#x}+{size:#x} at host {host_address:#x} is not page aligned"
            )

    def _starts(self) -> list[int]:
        return [s.gpa for s in self._slots]

    def _overlapping(self, gpa: int, size: int) -> list[Memslot]:
        end = gpa + size
        return [s for s in self._slots if s.gpa < end and gpa < s.end]

    @staticmethod
    def _remnants(slot: Memslot, gpa: int, end: int):
        """(slot, start, end) of the parts of `slot` outside [gpa, end)."""
        if slot.gpa < gpa:
            yield slot, slot.gpa, gpa
        if end < slot.end:
            yield slot, end, slot.end

    def _available_ids(self) -> int:
        return self.max_slots - len(self._slots)

    def _allocate_id(self) -> int:
        if self._free_ids:
            return self._free_ids.pop(0)
        slot_id = self._next_id
        self._next_id += 1
        return slot_id

    def _release_id(self, slot_id: int) -> None:
        bisect.insort(self._free_ids, slot_id)

    def _create(self, gpa: int, size: int, host_address: int, readonly: bool) -> Memslot:
        slot_id = self._allocate_id()
        slot = Memslot(slot_id, gpa, size, host_address, readonly)
        try:
            self._set_region(slot_id, gpa, size, host_address, slot.flags)
        except BaseException:
            self._release_id(slot_id)
            raise
        bisect.insort(self._slots, slot, key=lambda s: s.gpa)
        return slot

    def _delete(self, slot: Memslot) -> None:
        self._set_region(slot.slot, slot.gpa, 0, slot.host_address, 0)
        self._slots.remove(slot)
        self._release_id(slot.slot)


def map_guest_memory(table: MemslotTable, guest_memory) -> list[Memslot]:
    """Register every RAM region of a pyvmm.core.memory.GuestMemory."""
    return [table.map(r.gpa, r.size, r.host_address) for r in guest_memory.regions]
