"""XenDomain's guest-physical map: grant frames overlaid on RAM (and RAM back
when they go), and ballooning. No KVM: the memory slots are a MemslotTable
over a recorder that checks KVM's rules."""

import contextlib
import logging
import threading
from types import SimpleNamespace

import pytest

from pyvmm.core.memory import GuestMemory
from pyvmm.core.pageset import PageSet
from pyvmm.kvm.memslots import MemslotTable, map_guest_memory
from pyvmm.xen.abi import PAGE_SHIFT, PAGE_SIZE
from pyvmm.xen.domain import XenDomain
from pyvmm.xen.errors import XenError

RAM = 64 * PAGE_SIZE
FRAME_HOST = 0x5000_0000_0000  # where the fake grant frames live on the host


class FakeKvm:
    def __init__(self):
        self.live = {}

    def set_region(self, slot, gpa, size, host_address, flags):
        if size == 0:
            del self.live[slot]
            return
        assert slot not in self.live
        for other_gpa, other_size, _ in self.live.values():
            assert gpa + size <= other_gpa or other_gpa + other_size <= gpa
        self.live[slot] = (gpa, size, host_address)

    def backing(self, gpa):
        for base, size, host in self.live.values():
            if base <= gpa < base + size:
                return host + gpa - base
        return None


@pytest.fixture
def rig():
    kvm = FakeKvm()
    memory = GuestMemory([(0, RAM)])
    table = MemslotTable(kvm.set_region, 64, page_size=PAGE_SIZE)
    map_guest_memory(table, memory)
    domain = XenDomain.__new__(XenDomain)  # only the physical map, no VM
    domain.memory = memory
    domain.vm = SimpleNamespace(memslots=table)
    domain.gnttab = SimpleNamespace(note_frame_mapped=lambda index: None,
                                    frame_host_address=lambda index: FRAME_HOST + index * PAGE_SIZE)
    domain._lock = threading.RLock()
    domain.shared_info_gfn = None
    domain._grant_frame_gpa, domain._grant_frame_at, domain._ballooned = {}, {}, PageSet(RAM >> PAGE_SHIFT)
    domain._limited = logging.getLogger("test")
    holds = []
    domain.machine = SimpleNamespace(others_held=lambda: holds.append(1) or contextlib.nullcontext())
    yield SimpleNamespace(domain=domain, kvm=kvm, memory=memory, table=table, holds=holds)
    memory.close()


def ram(rig, gfn):
    return rig.memory.host_address(gfn << PAGE_SHIFT)


def test_grant_frame_over_ram_hides_it_and_gives_it_back(rig):
    rig.memory.write(5 * PAGE_SIZE, b"kept")
    rig.domain.map_grant_frame(0, 5)
    assert rig.kvm.backing(5 * PAGE_SIZE) == FRAME_HOST
    assert rig.kvm.backing(4 * PAGE_SIZE) == ram(rig, 4) and rig.kvm.backing(6 * PAGE_SIZE) == ram(rig, 6)
    rig.domain.map_grant_frame(0, 9)  # moving it puts RAM back where it was
    assert rig.kvm.backing(5 * PAGE_SIZE) == ram(rig, 5) and rig.kvm.backing(9 * PAGE_SIZE) == FRAME_HOST
    assert rig.memory.read(5 * PAGE_SIZE, 4) == b"kept"
    rig.domain.remove_from_physmap(9)
    assert all(rig.kvm.backing(p * PAGE_SIZE) == ram(rig, p) for p in range(64))
    assert len(rig.table.slots) == 1  # merged back: moves leave no slots behind
    with pytest.raises(XenError):
        rig.domain.remove_from_physmap(9)  # plain RAM is not given up that way


def test_a_second_frame_on_the_same_page_displaces_the_first(rig):
    rig.domain.map_grant_frame(0, 5)
    rig.domain.map_grant_frame(1, 5)
    assert rig.kvm.backing(5 * PAGE_SIZE) == FRAME_HOST + PAGE_SIZE
    assert rig.domain._grant_frame_gpa == {1: 5 * PAGE_SIZE}
    rig.domain.map_grant_frame(1, 5)  # again at the same place: nothing changes
    assert rig.domain._grant_frame_at == {5 * PAGE_SIZE: 1}


def test_a_frame_may_not_replace_shared_info(rig):
    rig.domain.shared_info_gfn = 3
    with pytest.raises(XenError):
        rig.domain.map_grant_frame(0, 3)
    assert rig.kvm.backing(3 * PAGE_SIZE) == ram(rig, 3)


def test_ballooning_out_and_back_in(rig):
    rig.memory.write(8 * PAGE_SIZE, b"secret")
    assert rig.domain.decrease_reservation([8], 1)  # two pages
    assert rig.kvm.backing(8 * PAGE_SIZE) is None and rig.kvm.backing(9 * PAGE_SIZE) is None
    assert rig.memory.read(8 * PAGE_SIZE, 6) == bytes(6)  # dropped at once, not when it comes back
    assert not rig.domain.decrease_reservation([8], 0)  # gone already
    assert not rig.domain.decrease_reservation([RAM >> PAGE_SHIFT], 0)  # not RAM
    assert not rig.domain.decrease_reservation([(RAM >> PAGE_SHIFT) - 1], 1)  # runs past the end of RAM
    rig.domain.shared_info_gfn = 20
    assert not rig.domain.decrease_reservation([16], 3)  # holds shared_info
    assert rig.domain.populate_physmap([8], 1)
    assert rig.kvm.backing(8 * PAGE_SIZE) == ram(rig, 8)
    assert rig.memory.read(8 * PAGE_SIZE, 6) == bytes(6)  # zeroed
    assert rig.domain.populate_physmap([8], 0)  # present already: nothing to do
    assert not rig.domain.populate_physmap([RAM >> PAGE_SHIFT], 0)
    assert len(rig.table.slots) == 1 and len(rig.domain._ballooned) == 0


def test_grant_frame_over_a_ballooned_page_leaves_a_hole_when_it_goes(rig):
    assert rig.domain.decrease_reservation([7], 0)
    rig.domain.map_grant_frame(0, 7)
    assert rig.kvm.backing(7 * PAGE_SIZE) == FRAME_HOST
    assert not rig.domain.decrease_reservation([7], 0)
    assert not rig.domain.populate_physmap([6], 1)  # no RAM can show under the frame
    assert 7 in rig.domain._ballooned and rig.kvm.backing(7 * PAGE_SIZE) == FRAME_HOST
    rig.domain.remove_from_physmap(7)
    assert rig.kvm.backing(7 * PAGE_SIZE) is None
    assert rig.domain.populate_physmap([7], 0) and rig.kvm.backing(7 * PAGE_SIZE) == ram(rig, 7)


def record_changes(rig) -> list:
    changes = []
    set_region = rig.kvm.set_region
    rig.table._set_region = lambda *args: (changes.append(args), set_region(*args))
    return changes


def test_a_run_of_neighbouring_extents_costs_one_memslot_change(rig):
    changes = record_changes(rig)
    assert rig.domain.decrease_reservation(list(range(10, 30)), 0) == 20  # 20 pages in one go
    assert len(changes) <= 3  # delete the RAM slot, re-create what is left either side
    assert rig.holds == [1]  # with every other vCPU out of KVM_RUN meanwhile
    assert all(rig.kvm.backing(p * PAGE_SIZE) is None for p in range(10, 30))
    assert rig.kvm.backing(9 * PAGE_SIZE) == ram(rig, 9) and rig.kvm.backing(30 * PAGE_SIZE) == ram(rig, 30)
    changes.clear()
    assert rig.domain.populate_physmap(list(range(10, 30)), 0) == 20
    assert all(rig.kvm.backing(p * PAGE_SIZE) == ram(rig, p) for p in range(10, 30))
    assert len(changes) <= 5 and len(rig.table.slots) == 1  # mapped once, merged back into one slot
    assert rig.holds == [1, 1]


def test_pages_in_any_order_go_in_runs_with_one_hold(rig):
    """Linux's balloon driver hands in single pages in descending order."""
    changes = record_changes(rig)
    pages = [29, 28, 27, 26, 40, 25, 24, 41]
    assert rig.domain.decrease_reservation(pages, 0) == len(pages)
    assert rig.holds == [1]
    assert len(changes) == 6  # two runs, 24-29 and 40-41: a slot split in two for each
    assert rig.domain._ballooned.runs() == [(24, 6), (40, 2)]
    changes.clear()
    assert rig.domain.populate_physmap(sorted(pages, reverse=True), 0) == len(pages)
    assert rig.holds == [1, 1] and len(rig.table.slots) == 1 and not rig.domain._ballooned


def test_a_list_stops_at_the_first_extent_that_cannot_be_done(rig):
    rig.domain.shared_info_gfn = 14
    assert rig.domain.decrease_reservation([10, 12, 14, 16], 1) == 2  # 10-11, 12-13; 14-15 holds shared_info
    assert rig.domain._ballooned.runs() == [(10, 4)]
    assert rig.domain.decrease_reservation([12, 20], 0) == 0  # 12 is gone already
    assert rig.domain.decrease_reservation([20, 21, 20, 22], 0) == 2  # 20 named twice: given back once
    assert rig.domain._ballooned.runs() == [(10, 4), (20, 2)]
    assert rig.domain.populate_physmap([8, 10, 12, 20], 1) == 4  # 8-9 present, 10-13 and 20-21 come back
    assert not rig.domain._ballooned
    assert rig.domain.populate_physmap([62, 63, 64, 65], 0) == 2  # 64 is beyond RAM
    assert rig.domain.decrease_reservation([30, 31, 64], 0) == 2
    assert rig.domain._ballooned.runs() == [(30, 2)]


def test_with_few_slots_left_scattered_pages_go_one_extent_at_a_time(rig):
    rig.table.max_slots = 3  # the RAM slot and two more
    assert rig.domain.decrease_reservation([50, 40, 30, 20, 10], 0) == 2  # a third split needs a fourth slot
    assert rig.domain._ballooned.runs() == [(40, 1), (50, 1)]
    assert all(rig.kvm.backing(p * PAGE_SIZE) == ram(rig, p) for p in (10, 20, 30))
    assert rig.domain.decrease_reservation([41, 42, 39], 0) == 3  # growing a hole needs no slot
    assert rig.domain.populate_physmap([39, 40, 41, 42, 50], 0) == 5
    assert len(rig.table.slots) == 1 and not rig.domain._ballooned


def test_a_soft_reset_gives_every_ballooned_page_back_in_runs(rig):
    assert rig.domain.decrease_reservation([5, 6, 7, 20, 21], 0) == 5
    changes = record_changes(rig)
    for first, count in rig.domain._region_runs(rig.domain._ballooned.runs()):
        rig.domain._restore_ram(first << PAGE_SHIFT, count << PAGE_SHIFT)
    assert len([c for c in changes if c[2]]) <= 4 and len(rig.table.slots) == 1


def test_status_frames_leave_with_version_1_and_are_found_by_get_status_frames(rig):
    status = 0x8000_0000  # XENMAPIDX_grant_table_status
    rig.domain.gnttab.frame_host_address = lambda index: FRAME_HOST + (index & 0xFFFF) * PAGE_SIZE + (
        0x1000_0000 if index & status else 0)
    rig.memory.write(7 * PAGE_SIZE, b"ram7")
    rig.domain.map_grant_frame(0, 6)
    rig.domain.map_grant_frame(status | 0, 7)
    assert rig.kvm.backing(7 * PAGE_SIZE) == FRAME_HOST + 0x1000_0000
    assert rig.domain.grant_status_gfns(2) == [7, (1 << 64) - 1]
    rig.domain._grant_status_frames_gone()
    assert rig.kvm.backing(7 * PAGE_SIZE) == ram(rig, 7) and rig.memory.read(7 * PAGE_SIZE, 4) == b"ram7"
    assert rig.kvm.backing(6 * PAGE_SIZE) == FRAME_HOST  # the shared frame stays
    assert rig.domain.grant_status_gfns(1) == [(1 << 64) - 1]


def test_grant_frame_gfns_tell_where_shared_frames_are(rig):
    status = 0x8000_0000  # XENMAPIDX_grant_table_status: not a shared frame
    rig.domain.map_grant_frame(2, 9)
    rig.domain.map_grant_frame(0, 6)
    rig.domain.map_grant_frame(status | 1, 7)
    invalid = (1 << 64) - 1
    assert rig.domain.grant_frame_gfns(4) == [6, invalid, 9, invalid]
    rig.domain.map_grant_frame(0, 11)  # moved
    assert rig.domain.grant_frame_gfns(1) == [11]
    rig.domain.remove_from_physmap(9)
    assert rig.domain.grant_frame_gfns(3) == [11, invalid, invalid]
    assert rig.domain.grant_frame_gfns(0) == []


def test_fifo_pages_must_be_plain_ram_of_the_guest(rig):
    rig.domain.map_grant_frame(0, 5)
    rig.domain.shared_info_gfn = 3
    rig.domain._ballooned.add(range(8, 9))
    page = rig.domain._fifo_page_address
    assert page(4) == ram(rig, 4)
    assert [page(gfn) for gfn in (3, 5, 8, 64, 1 << 40, (1 << 64) - 2)] == [None] * 6


def test_overlapping_extents_in_one_list_are_given_back_once(rig):
    # Extents need not be aligned to give back (as on Xen): 11-12 overlaps 10-11.
    assert rig.domain.decrease_reservation([10, 11, 14], 1) == 1
    assert rig.domain.decrease_reservation([20, 24, 22, 21], 1) == 3  # 21-22 overlaps 20-21 and 22-23
    assert rig.domain._ballooned.runs() == [(10, 2), (20, 6)]


def test_runs_are_merged_whatever_their_order():
    from pyvmm.xen.domain import _merged

    assert _merged([]) == []
    assert _merged([(9, 2), (0, 2), (2, 1), (10, 3), (20, 1)]) == [(0, 3), (9, 4), (20, 1)]
