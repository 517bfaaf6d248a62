import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.kvm.memslots import MemslotError, MemslotTable, map_guest_memory
from pyvmm.kvm.uapi import KVM_MEM_READONLY
from pyvmm.core.memory import GuestMemory

PAGE = 0x1000
HOST = 0x7F00_0000_0000


class FakeKvm:
    """Records KVM_SET_USER_MEMORY_REGION calls and checks KVM's own rules:
    slot ids below the limit, no overlap, deletes only of live slots."""

    def __init__(self, max_slots=8):
        self.max_slots = max_slots
        self.live = {}  # slot -> (gpa, size, host, flags)
        self.calls = []

    def set_region(self, slot, gpa, size, host_address, flags):
        self.calls.append((slot, gpa, size, host_address, flags))
        assert 0 <= slot < self.max_slots
        if size == 0:
            assert slot in self.live
            del self.live[slot]
            return
        assert slot not in self.live, "KVM cannot resize a slot"
        for other_gpa, other_size, _, _ in self.live.values():
            assert gpa + size <= other_gpa or other_gpa + other_size <= gpa
        self.live[slot] = (gpa, size, host_address, flags)

    def backing(self, gpa):
        """Host address KVM would use for guest page `gpa`, or None (MMIO)."""
        for base, size, host, _ in self.live.values():
            if base <= gpa < base + size:
                return host + gpa - base
        return None


@pytest.fixture
def kvm():
    return FakeKvm()


@pytest.fixture
def table(kvm):
    return MemslotTable(kvm.set_region, kvm.max_slots, page_size=PAGE)


def spans(table):
    return [(s.gpa, s.size, s.host_address) for s in table.slots]


def test_map_registers_a_slot(table, kvm):
    slot = table.map(0, 16 * PAGE, HOST)
    assert slot.slot == 0
    assert kvm.live == {0: (0, 16 * PAGE, HOST, 0)}


def test_readonly_sets_the_flag(table, kvm):
    table.map(0, PAGE, HOST, readonly=True)
    assert kvm.live[0][3] == KVM_MEM_READONLY


@pytest.mark.parametrize("gpa,size", [(0, PAGE), (15 * PAGE, 2 * PAGE), (4 * PAGE, PAGE), (0, 32 * PAGE)])
def test_overlap_is_refused(table, kvm, gpa, size):
    table.map(0, 16 * PAGE, HOST)
    with pytest.raises(MemslotError, match="overlaps slot 0"):
        table.map(gpa, size, HOST)
    assert len(kvm.live) == 1


def test_adjacent_ranges_are_fine(table):
    table.map(0, PAGE, HOST)
    table.map(PAGE, PAGE, HOST + 0x10000)
    assert len(table.slots) == 2


@pytest.mark.parametrize("gpa,size,host", [(1, PAGE, HOST), (0, PAGE + 1, HOST), (0, PAGE, HOST + 8), (0, 0, HOST)])
def test_unaligned_or_empty_is_refused(table, gpa, size, host):
    with pytest.raises(MemslotError):
        table.map(gpa, size, host)


def test_split_middle_keeps_both_sides(table, kvm):
    table.map(0, 16 * PAGE, HOST)
    table.unmap(5 * PAGE, PAGE)
    assert spans(table) == [(0, 5 * PAGE, HOST), (6 * PAGE, 10 * PAGE, HOST + 6 * PAGE)]
    assert kvm.backing(5 * PAGE) is None
    assert kvm.backing(4 * PAGE) == HOST + 4 * PAGE
    assert kvm.backing(6 * PAGE) == HOST + 6 * PAGE
    # the left part reuses the freed id
    assert sorted(s.slot for s in table.slots) == [0, 1]


def test_split_left_edge(table, kvm):
    table.map(0, 16 * PAGE, HOST)
    table.unmap(0, 2 * PAGE)
    assert spans(table) == [(2 * PAGE, 14 * PAGE, HOST + 2 * PAGE)]


def test_split_right_edge(table, kvm):
    table.map(0, 16 * PAGE, HOST)
    table.unmap(14 * PAGE, 2 * PAGE)
    assert spans(table) == [(0, 14 * PAGE, HOST)]


def test_unmap_whole_slot_frees_its_id(table, kvm):
    table.map(0, PAGE, HOST)
    table.map(PAGE, PAGE, HOST + PAGE)
    table.unmap(0, PAGE)
    assert kvm.live.keys() == {1}
    assert table.map(8 * PAGE, PAGE, HOST).slot == 0


def test_unmap_across_adjacent_slots(table, kvm):
    table.map(0, 4 * PAGE, HOST)
    table.map(4 * PAGE, 4 * PAGE, HOST + 0x100000)
    table.unmap(3 * PAGE, 2 * PAGE)
    assert spans(table) == [(0, 3 * PAGE, HOST), (5 * PAGE, 3 * PAGE, HOST + 0x100000 + PAGE)]


def test_split_preserves_readonly(table, kvm):
    table.map(0, 4 * PAGE, HOST, readonly=True)
    table.unmap(PAGE, PAGE)
    assert all(flags == KVM_MEM_READONLY for *_, flags in kvm.live.values())


@pytest.mark.parametrize("gpa,size", [(32 * PAGE, PAGE), (15 * PAGE, 2 * PAGE), (0, 0)])
def test_unmap_of_unmapped_range_is_an_error(table, kvm, gpa, size):
    table.map(0, 16 * PAGE, HOST)
    calls = len(kvm.calls)
    with pytest.raises(MemslotError):
        table.unmap(gpa, size)
    assert len(kvm.calls) == calls, "nothing may change on error"


def test_unmap_spanning_a_hole_is_an_error(table, kvm):
    table.map(0, PAGE, HOST)
    table.map(2 * PAGE, PAGE, HOST)
    with pytest.raises(MemslotError, match="0x1000"):
        table.unmap(0, 3 * PAGE)
    assert len(table.slots) == 2


def test_slot_limit(kvm):
    table = MemslotTable(kvm.set_region, 2, page_size=PAGE)
    table.map(0, 4 * PAGE, HOST)
    table.map(8 * PAGE, PAGE, HOST)
    with pytest.raises(MemslotError, match="in use"):
        table.map(16 * PAGE, PAGE, HOST)
    with pytest.raises(MemslotError, match="splitting"):
        table.unmap(PAGE, PAGE)  # would need a third slot
    assert len(kvm.live) == 2


def test_failed_kvm_call_leaves_the_table_consistent():
    def refuse(slot, gpa, size, host, flags):
        raise OSError(22, "refused")

    table = MemslotTable(refuse, 4, page_size=PAGE)
    with pytest.raises(OSError):
        table.map(0, PAGE, HOST)
    assert table.slots == ()


def test_remap_after_split_restores_the_page(table, kvm):
    table.map(0, 16 * PAGE, HOST)
    table.unmap(5 * PAGE, PAGE)
    table.map(5 * PAGE, PAGE, HOST + 5 * PAGE)
    assert all(kvm.backing(p * PAGE) == HOST + p * PAGE for p in range(16))
    assert table.lookup(5 * PAGE + 7).gpa == 5 * PAGE
    assert table.lookup(16 * PAGE) is None


def test_coalesce_merges_ram_back_into_one_slot(table, kvm):
    table.map(0, 16 * PAGE, HOST)
    table.unmap(5 * PAGE, PAGE)
    overlay = table.map(5 * PAGE, PAGE, 0x1000_0000)  # another host buffer: never merged
    assert table.coalesce(5 * PAGE, 0, 16 * PAGE) == overlay and len(table.slots) == 3
    table.unmap(5 * PAGE, PAGE)
    table.map(5 * PAGE, PAGE, HOST + 5 * PAGE)
    merged = table.coalesce(5 * PAGE, 0, 16 * PAGE)
    assert spans(table) == [(0, 16 * PAGE, HOST)] and merged == table.slots[0]
    assert kvm.live == {merged.slot: (0, 16 * PAGE, HOST, 0)}
    assert table.coalesce(20 * PAGE, 0, 32 * PAGE) is None


def test_coalesce_stays_inside_its_bounds(table, kvm):
    table.map(0, 4 * PAGE, HOST)
    table.map(4 * PAGE, 4 * PAGE, HOST + 4 * PAGE)  # continues it, but another region
    table.coalesce(0, 0, 4 * PAGE)
    assert len(table.slots) == 2
    table.coalesce(0, 0, 8 * PAGE)
    assert spans(table) == [(0, 8 * PAGE, HOST)]


def test_map_guest_memory_registers_every_region(table, kvm):
    memory = GuestMemory([(0, 4 * PAGE), (0x10_0000, 2 * PAGE)])
    try:
        map_guest_memory(table, memory)
        assert [(g, s) for g, s, _ in spans(table)] == [(0, 4 * PAGE), (0x10_0000, 2 * PAGE)]
        assert kvm.backing(0x10_0000) == memory.host_address(0x10_0000)
    finally:
        memory.close()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 31), st.integers(1, 8)), max_size=30))
def test_table_agrees_with_kvm_under_random_operations(operations):
    """Whatever succeeds, the table and KVM see the same page -> host map."""
    kvm = FakeKvm(max_slots=6)
    table = MemslotTable(kvm.set_region, 6, page_size=PAGE)
    expected = {}  # page -> host address
    for is_map, page, pages in operations:
        gpa, size = page * PAGE, pages * PAGE
        try:
            if is_map:
                table.map(gpa, size, HOST + gpa)
                expected.update({p: HOST + p * PAGE for p in range(page, page + pages)})
            else:
                table.unmap(gpa, size)
                for p in range(page, page + pages):
                    del expected[p]
        except MemslotError:
            pass
        for p in range(40):
            assert kvm.backing(p * PAGE) == expected.get(p)
        assert len(kvm.live) == len(table.slots) <= 6


def test_map_joined_fills_a_hole_with_no_slot_more(kvm):
    table = MemslotTable(kvm.set_region, 3, page_size=PAGE)
    table.map(0, 16 * PAGE, HOST)
    table.unmap(4 * PAGE, 2 * PAGE)
    table.unmap(10 * PAGE, 2 * PAGE)  # three slots: all there are
    with pytest.raises(MemslotError):
        table.map(4 * PAGE, PAGE, HOST + 4 * PAGE)
    table.map_joined(4 * PAGE, PAGE, HOST + 4 * PAGE, 0, 16 * PAGE)  # grows the slot before it
    table.map_joined(10 * PAGE, 2 * PAGE, HOST + 10 * PAGE, 0, 16 * PAGE)  # fills a hole: one slot fewer
    assert spans(table) == [(0, 5 * PAGE, HOST), (6 * PAGE, 10 * PAGE, HOST + 6 * PAGE)]
    table.map_joined(5 * PAGE, PAGE, HOST + 5 * PAGE, 0, 16 * PAGE)
    assert spans(table) == [(0, 16 * PAGE, HOST)]
    assert all(kvm.backing(p * PAGE) == HOST + p * PAGE for p in range(16))


def test_map_joined_joins_only_what_continues_it_inside_its_bounds(table, kvm):
    table.map(0, 4 * PAGE, HOST)
    table.map(8 * PAGE, 4 * PAGE, HOST + 0x100000)  # elsewhere in host memory
    table.map(12 * PAGE, 4 * PAGE, HOST + 12 * PAGE)
    table.map_joined(4 * PAGE, 4 * PAGE, HOST + 4 * PAGE, 2 * PAGE, 16 * PAGE)  # the slot at 0 starts below
    assert spans(table) == [(0, 4 * PAGE, HOST), (4 * PAGE, 4 * PAGE, HOST + 4 * PAGE),
                            (8 * PAGE, 4 * PAGE, HOST + 0x100000), (12 * PAGE, 4 * PAGE, HOST + 12 * PAGE)]
    with pytest.raises(MemslotError):
        table.map_joined(12 * PAGE, PAGE, HOST + 12 * PAGE, 0, 16 * PAGE)  # mapped already
    with pytest.raises(MemslotError):
        table.map_joined(16 * PAGE, PAGE, HOST + 16 * PAGE + 1, 0, 32 * PAGE)  # not aligned
