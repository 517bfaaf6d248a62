import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.kvm.vcpu import Translation
from pyvmm.core.memory import GuestMemory
from pyvmm.xen import abi
from pyvmm.xen.hv.guest_access import PAGE_SIZE, GuestAccess, GuestFault

RAM = 1 << 20  # 1 MiB of guest RAM at 0
KERNEL = 0xFFFF_8000_0000_0000  # where the test page tables map RAM, page by page


class PageTables:
    """A toy MMU: KERNEL + n*4K maps to the physical page pages[n] (None:
    not present); `readonly` pages are mapped without write access. Counts
    translations to check the per-call cache."""

    def __init__(self, pages, readonly=()):
        self.pages = pages
        self.readonly = set(readonly)
        self.lookups = 0

    def __call__(self, gva: int) -> Translation:
        self.lookups += 1
        index = (gva - KERNEL) // PAGE_SIZE
        if not 0 <= index < len(self.pages) or self.pages[index] is None:
            return Translation(0, False, False)
        return Translation(self.pages[index] * PAGE_SIZE + gva % PAGE_SIZE, True, index not in self.readonly)


@pytest.fixture
def memory():
    return GuestMemory([(0, RAM)])


def make(memory, pages, readonly=()):
    tables = PageTables(pages, readonly)
    return GuestAccess(tables, memory), tables


def test_read_write_cross_pages_through_their_own_translations(memory):
    # Virtual pages 0 and 1 are physical pages 7 and 3: not contiguous.
    access, _ = make(memory, [7, 3])
    access.write(KERNEL + PAGE_SIZE - 2, b"abcd")
    assert memory.read(7 * PAGE_SIZE + PAGE_SIZE - 2, 2) == b"ab"
    assert memory.read(3 * PAGE_SIZE, 2) == b"cd"
    assert access.read(KERNEL + PAGE_SIZE - 2, 4) == b"abcd"


def test_unmapped_page_faults_and_nothing_is_written(memory):
    access, _ = make(memory, [7, None])
    with pytest.raises(GuestFault):
        access.write(KERNEL + PAGE_SIZE - 2, b"abcd")
    assert memory.read(8 * PAGE_SIZE - 2, 2) == b"\0\0"
    with pytest.raises(GuestFault):
        access.read(KERNEL + PAGE_SIZE, 1)


def test_read_only_mapping(memory):
    access, _ = make(memory, [7, 3], readonly={1})
    memory.write(3 * PAGE_SIZE, b"xy")
    assert access.read(KERNEL + PAGE_SIZE, 2) == b"xy"
    with pytest.raises(GuestFault):
        access.read(KERNEL + PAGE_SIZE, 2, for_update=True)
    with pytest.raises(GuestFault):
        access.write(KERNEL + PAGE_SIZE - 1, b"ab")  # first page writeable, second not
    assert memory.read(8 * PAGE_SIZE - 1, 1) == b"\0"
    with pytest.raises(GuestFault):
        access.check(KERNEL + PAGE_SIZE, 1, write=True)
    access.check(KERNEL + PAGE_SIZE, 1)


def test_translation_outside_ram_faults(memory):
    access, _ = make(memory, [RAM // PAGE_SIZE])  # the page just past RAM
    with pytest.raises(GuestFault, match="not RAM"):
        access.read(KERNEL, 1)


def test_sizes_and_addresses_are_bounded_before_translating(memory):
    access, tables = make(memory, [0])
    for gva, size in [(KERNEL, 2 << 30), (KERNEL, -1), (-1, 1), ((1 << 64) - 2, 4)]:
        with pytest.raises(GuestFault):
            access.read(gva, size)
    with pytest.raises(GuestFault):
        access.read_array(KERNEL, 1 << 40, 8)
    assert tables.lookups == 0


def test_empty_access_translates_nothing(memory):
    access, tables = make(memory, [])
    assert access.read(0xDEAD_0000, 0) == b""
    access.write(0xDEAD_0000, b"")
    assert tables.lookups == 0


def test_translations_are_cached_until_forget(memory):
    access, tables = make(memory, [1, 2])
    access.read(KERNEL, 16)
    access.write(KERNEL + 100, b"x")
    access.read(KERNEL + PAGE_SIZE - 1, 2)
    assert tables.lookups == 2
    tables.pages[0] = 5  # the guest changes its page tables between calls
    access.forget()
    access.write(KERNEL, b"new")
    assert memory.read(5 * PAGE_SIZE, 3) == b"new"


def test_translate_gpa(memory):
    access, _ = make(memory, [4, 5, 9])
    assert access.translate_gpa(KERNEL + 0x123) == 4 * PAGE_SIZE + 0x123
    # Crossing into the physically next page is fine ...
    assert access.translate_gpa(KERNEL + PAGE_SIZE - 8, 48) == 5 * PAGE_SIZE - 8
    # ... into an unrelated one is not.
    with pytest.raises(GuestFault, match="physically"):
        access.translate_gpa(KERNEL + 2 * PAGE_SIZE - 8, 48)
    access2, _ = make(memory, [4], readonly={0})
    with pytest.raises(GuestFault):
        access2.translate_gpa(KERNEL)
    assert access2.translate_gpa(KERNEL, write=False) == 4 * PAGE_SIZE


def test_structs_and_arrays(memory):
    access, _ = make(memory, [2, 3])
    record = abi.SCHED_POLL.record(ports=0x1000, nr_ports=3, timeout=1 << 40)
    for compat, size in ((False, 24), (True, 16)):
        access.write_struct(KERNEL + 8, abi.SCHED_POLL, record, compat)
        assert access.read_struct(KERNEL + 8, abi.SCHED_POLL, compat) == record
        assert memory.read(2 * PAGE_SIZE + 8, size) == abi.SCHED_POLL.pack(record, compat)
    access.write(KERNEL + PAGE_SIZE - 4, (1).to_bytes(4, "little") + (0xFFFFFFFF).to_bytes(4, "little"))
    assert access.read_array(KERNEL + PAGE_SIZE - 4, 2, 4) == [1, 0xFFFFFFFF]
    assert access.read_array(KERNEL, 0, 8) == []


@settings(max_examples=300, deadline=None)
@given(
    gva=st.one_of(st.integers(0, (1 << 64) - 1), st.integers(KERNEL - PAGE_SIZE, KERNEL + 4 * PAGE_SIZE)),
    size=st.one_of(st.integers(-2, 3 * PAGE_SIZE), st.integers(0, 1 << 64)),
    write=st.booleans(),
)
def test_hostile_ranges_only_ever_fault(gva, size, write):
    memory = GuestMemory([(0, 64 * 1024)])
    access = GuestAccess(PageTables([1, None, 2, 300], readonly={2}), memory)
    try:
        if write:
            access.write(gva, bytes(min(max(size, 0), 4 * PAGE_SIZE)))
        else:
            data = access.read(gva, size)
            assert len(data) == size
    except GuestFault:
        pass
