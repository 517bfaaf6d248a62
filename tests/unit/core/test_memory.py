import pytest

from pyvmm.core import layout
from pyvmm.core.memory import GuestMemory, GuestMemoryError

MiB = layout.MiB


@pytest.fixture
def memory():
    # Two regions with a hole between them, like RAM split around the PCI hole.
    return GuestMemory([(0, 2 * MiB), (4 * MiB, 1 * MiB)])


def test_read_write_round_trip(memory):
    memory.write(0x1234, b"hello")
    assert memory.read(0x1234, 5) == b"hello"
    memory.write_int(0x2000, 4, 0xDEADBEEF)
    assert memory.read_int(0x2000, 4) == 0xDEADBEEF
    assert memory.read(0x2000, 4) == bytes.fromhex("efbeadde")


def test_access_overrunning_a_region_fails_and_writes_nothing(memory):
    end = 2 * MiB
    memory.write(end - 4, b"keep")
    with pytest.raises(GuestMemoryError):
        memory.write(end - 4, b"toolong!")
    assert memory.read(end - 4, 4) == b"keep"
    with pytest.raises(GuestMemoryError):
        memory.read(end - 4, 5)


@pytest.mark.parametrize("gpa,length", [(2 * MiB, 1), (3 * MiB, 16), (5 * MiB, 1), (5 * MiB - 1, 2), (-1, 1), (0, -1)])
def test_accesses_outside_ram_fail(memory, gpa, length):
    with pytest.raises(GuestMemoryError):
        memory.read(gpa, length)
    assert not memory.contains(gpa, max(length, 1)) or length < 0


def test_access_may_span_contiguous_regions_only():
    memory = GuestMemory([(0, 1 * MiB), (1 * MiB, 1 * MiB)])
    memory.write(MiB - 2, b"abcd")
    assert memory.read(MiB - 2, 4) == b"abcd"
    with pytest.raises(GuestMemoryError):  # a view must stay inside one region
        memory.view(MiB - 2, 4)


def test_view_is_zero_copy_and_bounded(memory):
    view = memory.view(4 * MiB, 16)
    view[0:3] = b"xyz"
    assert memory.read(4 * MiB, 3) == b"xyz"
    assert len(memory.view(5 * MiB - 16, 16)) == 16
    with pytest.raises(GuestMemoryError):
        memory.view(5 * MiB - 16, 17)


def test_host_address_is_stable_and_offset(memory):
    base = memory.host_address(4 * MiB)
    assert memory.host_address(4 * MiB + 0x123) == base + 0x123
    with pytest.raises(GuestMemoryError):
        memory.host_address(3 * MiB)


def test_overlapping_or_unaligned_regions_are_refused():
    with pytest.raises(ValueError):
        GuestMemory([(0, 2 * MiB), (1 * MiB, 2 * MiB)])
    with pytest.raises(ValueError):
        GuestMemory([(0x100, MiB)])


def test_ram_ranges_split_around_the_pci_hole():
    assert layout.ram_ranges(512 * MiB) == [(0, 512 * MiB)]
    low = layout.PCI_HOLE_START
    assert layout.ram_ranges(4 * layout.GiB) == [(0, low), (layout.HIGH_RAM_START, 4 * layout.GiB - low)]
    with pytest.raises(ValueError):
        layout.ram_ranges(0)


def test_region_is_the_one_holding_the_address():
    memory = GuestMemory([(0, 0x10000), (0x100000, 0x10000)])
    try:
        assert memory.region(0x100000 + 0x1234) is memory.regions[1]
        assert memory.region(0xFFFF) is memory.regions[0]
        with pytest.raises(GuestMemoryError):
            memory.region(0x10000)  # the gap between them
    finally:
        memory.close()


def test_discard_clears_and_gives_anonymous_memory_back():
    memory = GuestMemory([(0, 0x10000), (0x10000, 0x4000)])
    memory.write(0x3000, b"\xaa" * 0x3000)
    memory.write(0xF000, b"\xbb" * 0x2000)  # across the two regions
    memory.discard(0x4000, 0xD000)
    # Before anything reads them (a read maps the zero page): the host holds only what was kept.
    assert [list(region.touched_runs()) for region in memory.regions] == [[(0x3000, 0x4000)], []]
    assert memory.read(0x3000, 0x1000) == b"\xaa" * 0x1000  # outside: kept
    assert memory.read(0x4000, 0xD000) == bytes(0xD000)
    with pytest.raises(GuestMemoryError):
        memory.discard(0x13000, 0x2000)  # past the end of RAM: nothing done
    memory.close()


def test_discard_writes_zeros_over_ram_mapped_from_a_file(tmp_path):
    path = tmp_path / "ram"
    path.write_bytes(b"\xcc" * 0x4000)
    with open(path, "rb") as file:
        memory = GuestMemory.from_file(file.fileno(), [(0, 0x4000, 0)])
    memory.discard(0x1000, 0x2000)  # dropping the copy would show the file's bytes again
    assert memory.read(0, 0x4000) == b"\xcc" * 0x1000 + bytes(0x2000) + b"\xcc" * 0x1000
    assert path.read_bytes() == b"\xcc" * 0x4000  # copy-on-write: the file keeps its own
    memory.close()
