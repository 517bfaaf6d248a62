"""Grant table v1 (v2: test_xen_gnttab_v2.py): guest operations, backend mapping checks, in-use flags, races."""

import ctypes
import struct
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.core.memory import GuestMemory
from pyvmm.core import atomic
from pyvmm.xen.hv import gnttab
from pyvmm.xen.errors import EINVAL, XenError
from pyvmm.xen.hv.gnttab import (
    GNTST_bad_copy_arg,
    GNTST_bad_gntref,
    GNTST_bad_page,
    GNTST_general_error,
    GNTST_permission_denied,
    GTF_permit_access,
    GTF_readonly,
    GTF_reading,
    GTF_writing,
    GrantError,
    GrantTable,
)

PAGE = 4096
RAM_PAGES = 16
GUEST_DOMID = 1


@pytest.fixture
def table():
    memory = GuestMemory([(0, RAM_PAGES * PAGE)])
    return GrantTable(memory, max_frames=4)


def entry_address(table, ref):
    # What the guest writes through its mapping of the table frame.
    return table.frame_host_address(ref // gnttab.ENTRIES_PER_FRAME) + (ref % gnttab.ENTRIES_PER_FRAME) * 8


def grant(table, ref, frame, flags=GTF_permit_access, domid=0):
    ctypes.memmove(entry_address(table, ref), struct.pack("<HHI", flags, domid, frame), 8)


def entry(table, ref):
    return struct.unpack("<HHI", ctypes.string_at(entry_address(table, ref), 8))


def flags(table, ref):
    return entry(table, ref)[0]


def guest_revoke(table, ref) -> bool:
    """Linux's gnttab_end_foreign_access_ref for v1: fails while in use."""
    address = entry_address(table, ref)
    seen = flags(table, ref)
    while True:
        if seen & (GTF_reading | GTF_writing):
            return False
        swapped, seen = atomic.compare_exchange(address, 2, seen, 0)
        if swapped:
            return True


# --- guest operations --------------------------------------------------------


def test_versions(table):
    assert table.get_version() == 1
    assert table.set_version(1) == 1
    for bad in (0, 3, 0xFFFFFFFF):
        with pytest.raises(XenError) as error:
            table.set_version(bad)
        assert error.value.errno == EINVAL
    assert table.get_version() == 1


def test_query_size_counts_mapped_frames(table):
    assert table.query_size() == (0, 4)
    table.note_frame_mapped(2)
    assert table.query_size() == (3, 4)
    table.note_frame_mapped(0)
    assert table.query_size() == (3, 4)
    for bad in (4, -1, 1 << 40):
        with pytest.raises(XenError) as error:
            table.note_frame_mapped(bad)
        assert error.value.errno == EINVAL
        with pytest.raises(XenError):
            table.frame_host_address(bad)


def test_grow_counts_frames_up_to_max_frames(table):
    table.grow(0)
    assert table.query_size() == (0, 4)
    table.grow(2)
    assert table.query_size() == (2, 4)
    table.grow(1)  # never shrinks
    assert table.query_size() == (2, 4)
    table.grow(4)
    assert table.query_size() == (4, 4)
    for bad in (5, -1, 1 << 40, None):
        with pytest.raises(XenError) as error:
            table.grow(bad)
        assert error.value.errno == EINVAL
    assert table.query_size() == (4, 4)


def test_frames_are_separate_page_aligned_pages(table):
    addresses = [table.frame_host_address(i) for i in range(table.max_frames)]
    assert all(a % PAGE == 0 for a in addresses)
    assert [b - a for a, b in zip(addresses, addresses[1:])] == [PAGE] * 3


def test_reserved_entries(table):
    table.reserve(gnttab.GNTTAB_RESERVED_XENSTORE, 5)
    assert entry(table, 1) == (GTF_permit_access, 0, 5)
    with pytest.raises(ValueError):
        table.reserve(8, 5)
    table.note_frame_mapped(1)
    grant(table, 9, 3, domid=0)
    table.reset()
    assert entry(table, 1) == (GTF_permit_access, 0, 5)
    assert entry(table, 9) == (0, 0, 0)
    assert table.query_size() == (0, 4)


# --- backend mapping -----------------------------------------------------------


def test_map_gives_the_page_and_marks_it_in_use(table):
    table.memory.write(7 * PAGE, b"granted!")
    grant(table, 10, 7)
    with table.map(10, writable=True) as mapping:
        assert len(mapping.view) == PAGE and mapping.gfn == 7
        assert bytes(mapping.view[:8]) == b"granted!"
        mapping.view[8:10] = b"ok"
        assert flags(table, 10) == GTF_permit_access | GTF_reading | GTF_writing
        assert not guest_revoke(table, 10)
    assert table.memory.read(7 * PAGE + 8, 2) == b"ok"
    assert flags(table, 10) == GTF_permit_access
    assert guest_revoke(table, 10)
    with pytest.raises(ValueError):
        mapping.view[0]  # released


def test_read_only_mapping_cannot_write(table):
    grant(table, 3, 2, flags=GTF_permit_access | GTF_readonly)
    mapping = table.map(3, writable=False)
    assert mapping.view.readonly
    with pytest.raises(TypeError):
        mapping.view[0] = 1
    assert flags(table, 3) == GTF_permit_access | GTF_readonly | GTF_reading
    mapping.release()
    mapping.release()  # idempotent
    assert flags(table, 3) == GTF_permit_access | GTF_readonly


@pytest.mark.parametrize("ref", [-1, 4 * 512, 1 << 32, "1", None])
def test_bad_refs(table, ref):
    with pytest.raises(GrantError) as error:
        table.map(ref, writable=False)
    assert error.value.status == GNTST_bad_gntref


@pytest.mark.parametrize(
    "entry_flags, domid, writable",
    [
        (0, 0, False),  # invalid
        (2, 0, False),  # accept_transfer
        (3, 0, False),
        (GTF_permit_access, GUEST_DOMID, False),  # granted to someone else
        (GTF_permit_access | GTF_readonly, 0, True),  # read-only grant, writable map
    ],
)
def test_grants_that_do_not_permit_the_access(table, entry_flags, domid, writable):
    grant(table, 20, 4, flags=entry_flags, domid=domid)
    with pytest.raises(GrantError) as error:
        table.map(20, writable=writable)
    assert error.value.status == GNTST_permission_denied
    assert isinstance(error.value, XenError)
    assert entry(table, 20) == (entry_flags, domid, 4)  # untouched


@pytest.mark.parametrize("frame", [RAM_PAGES, 0xFEFF9, 0xFFFFFFFF])
def test_frame_outside_ram(table, frame):
    grant(table, 30, frame)
    with pytest.raises(GrantError) as error:
        table.map(30, writable=True)
    assert error.value.status == GNTST_bad_page
    assert flags(table, 30) == GTF_permit_access  # in-use flags undone


def test_backend_domid_is_configurable():
    table = GrantTable(GuestMemory([(0, PAGE)]), max_frames=1, backend_domid=7)
    grant(table, 2, 0, domid=0)
    with pytest.raises(GrantError):
        table.map(2, writable=False)
    grant(table, 2, 0, domid=7)
    table.map(2, writable=False).release()


def test_flags_follow_the_last_mapping_of_each_kind(table):
    grant(table, 5, 1)
    reader = table.map(5, writable=False)
    writer = table.map(5, writable=True)
    second_writer = table.map(5, writable=True)
    assert flags(table, 5) & (GTF_reading | GTF_writing) == GTF_reading | GTF_writing
    writer.release()
    assert flags(table, 5) & GTF_writing
    second_writer.release()
    assert flags(table, 5) == GTF_permit_access | GTF_reading
    reader.release()
    assert flags(table, 5) == GTF_permit_access


def test_release_after_reset_leaves_new_entries_alone(table):
    grant(table, 12, 1)
    mapping = table.map(12, writable=True)
    table.reset()
    grant(table, 12, 2)
    fresh = table.map(12, writable=True)
    mapping.release()
    assert flags(table, 12) == GTF_permit_access | GTF_reading | GTF_writing
    fresh.release()
    assert flags(table, 12) == GTF_permit_access


def test_map_many_maps_each_or_says_why_not(table):
    grant(table, 60, 1)
    grant(table, 61, 2, flags=GTF_permit_access | GTF_readonly)
    grant(table, 62, RAM_PAGES)  # not RAM
    grant(table, 63, 3, domid=GUEST_DOMID)
    grant(table, 64, 4)
    table.memory.write(4 * PAGE, b"last")
    results = table.map_many([60, 61, 62, 4 * 512, 63, 64, 60], writable=True)
    statuses = [result.status if isinstance(result, GrantError) else "mapped" for result in results]
    assert statuses == ["mapped", GNTST_permission_denied, GNTST_bad_page, GNTST_bad_gntref,
                        GNTST_permission_denied, "mapped", "mapped"]
    assert bytes(results[5].view[:4]) == b"last" and not results[5].view.readonly
    assert [flags(table, ref) & (GTF_reading | GTF_writing) for ref in range(60, 65)] == [
        GTF_reading | GTF_writing, 0, 0, 0, GTF_reading | GTF_writing]
    mapped = [result for result in results if not isinstance(result, GrantError)]
    table.release_many(mapped[:2])
    assert flags(table, 60) & GTF_writing  # its second mapping is still held
    table.release_many(mapped)  # already released ones are left as they are
    assert [flags(table, ref) for ref in (60, 61, 62, 63, 64)] == [
        GTF_permit_access, GTF_permit_access | GTF_readonly, GTF_permit_access, GTF_permit_access, GTF_permit_access]
    assert all(mapping.released for mapping in mapped) and table._pins == {}
    with pytest.raises(ValueError):
        mapped[0].view[0]


def test_map_many_read_only(table):
    grant(table, 70, 5, flags=GTF_permit_access | GTF_readonly)
    (mapping,) = table.map_many([70], writable=False)
    assert mapping.view.readonly and flags(table, 70) == GTF_permit_access | GTF_readonly | GTF_reading
    table.release_many([mapping])
    assert flags(table, 70) == GTF_permit_access | GTF_readonly


def test_copy(table):
    grant(table, 40, 3)
    table.copy(40, 100, b"abc", to_guest=True)
    assert table.memory.read(3 * PAGE + 100, 3) == b"abc"
    assert table.copy(40, 99, 5, to_guest=False) == b"\0abc\0"
    assert flags(table, 40) == GTF_permit_access
    for offset, length in ((4095, 2), (-1, 1), (0, 4097)):
        with pytest.raises(GrantError) as error:
            table.copy(40, offset, length, to_guest=False)
        assert error.value.status == GNTST_bad_copy_arg
    grant(table, 41, 3, flags=GTF_permit_access | GTF_readonly)
    with pytest.raises(GrantError):
        table.copy(41, 0, b"x", to_guest=True)
    assert table.copy(41, 100, 3, to_guest=False) == b"abc"


# --- races with the guest -------------------------------------------------------


def test_guest_revoking_between_check_and_swap_wins(table, monkeypatch):
    grant(table, 50, 1)
    original = GrantTable._load_combo

    def load_then_revoke(self, ref):
        seen = original(self, ref)
        assert guest_revoke(self, ref)  # the guest gets in just after our read
        return seen

    monkeypatch.setattr(GrantTable, "_load_combo", load_then_revoke)
    with pytest.raises(GrantError) as error:
        table.map(50, writable=False)
    assert error.value.status == GNTST_permission_denied
    assert flags(table, 50) == 0


def test_guest_changing_domid_under_us_is_seen(table, monkeypatch):
    grant(table, 51, 1)
    original = GrantTable._load_combo

    def load_then_regrant(self, ref):
        seen = original(self, ref)
        grant(self, ref, 1, domid=GUEST_DOMID)
        return seen

    monkeypatch.setattr(GrantTable, "_load_combo", load_then_regrant)
    with pytest.raises(GrantError) as error:
        table.map(51, writable=True)
    assert error.value.status == GNTST_permission_denied
    assert flags(table, 51) == GTF_permit_access


def test_an_unstable_entry_gives_up(table, monkeypatch):
    grant(table, 52, 1)
    real = atomic.AtomicArray.compare_exchange
    calls = []

    def guest_keeps_flipping(words, index, expected, desired):
        calls.append(1)
        address = table.frame_host_address(0) + index * 4
        atomic.fetch_or(address, 2, 1 << 5) if len(calls) % 2 else atomic.fetch_and(address, 2, ~(1 << 5) & 0xFFFF)
        return real(words, index, expected, desired)

    monkeypatch.setattr(atomic.AtomicArray, "compare_exchange", guest_keeps_flipping)
    with pytest.raises(GrantError) as error:
        table.map(52, writable=False)
    assert error.value.status == GNTST_general_error
    assert len(calls) == gnttab.CMPXCHG_ATTEMPTS
    assert flags(table, 52) & (GTF_reading | GTF_writing) == 0


RACES = 200


def test_concurrent_revoke_never_succeeds_while_mapped(table):
    ref, held, stop = 60, threading.Event(), threading.Event()
    violations, revokes, maps = [], [0], [0]

    def guest():
        while not stop.is_set():
            grant(table, ref, 2)
            while not stop.is_set():
                if guest_revoke(table, ref):
                    if held.is_set():
                        violations.append("revoked while mapped")
                    revokes[0] += 1
                    break

    thread = threading.Thread(target=guest)
    thread.start()
    # Until both sides have won a good number of races: on a loaded machine
    # a fixed time may see one side starve. The deadline only bounds a bug.
    deadline = time.monotonic() + 60
    try:
        while (maps[0] < RACES or revokes[0] < RACES) and time.monotonic() < deadline:
            try:
                mapping = table.map(ref, writable=True)
            except GrantError as error:
                assert error.status in (GNTST_permission_denied, GNTST_general_error)
                continue
            held.set()
            assert flags(table, ref) & GTF_writing
            maps[0] += 1
            held.clear()
            mapping.release()
    finally:
        stop.set()
        thread.join()
    assert not violations
    assert maps[0] >= RACES and revokes[0] >= RACES, (maps, revokes)


# --- arbitrary entries ---------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.booleans(),
    st.integers(0, 4 * 512 - 1),
)
def test_arbitrary_entries(entry_flags, domid, frame, writable, ref):
    table = GrantTable(GuestMemory([(0, RAM_PAGES * PAGE)]), max_frames=4)
    grant(table, ref, frame, flags=entry_flags, domid=domid)
    permitted = (
        entry_flags & 3 == GTF_permit_access and domid == 0 and not (writable and entry_flags & GTF_readonly)
    )
    try:
        mapping = table.map(ref, writable)
    except GrantError as error:
        assert not permitted or frame >= RAM_PAGES
        assert error.status == (GNTST_permission_denied if not permitted else GNTST_bad_page)
        expected_flags = entry_flags if not permitted else entry_flags & ~(GTF_reading | GTF_writing)
        assert entry(table, ref) == (expected_flags, domid, frame)
        return
    assert permitted and frame < RAM_PAGES
    in_use = GTF_reading | (GTF_writing if writable else 0)
    assert flags(table, ref) == entry_flags | in_use
    assert mapping.view.readonly is not writable and len(mapping.view) == PAGE
    mapping.release()
    assert entry(table, ref) == (entry_flags & ~(GTF_reading | GTF_writing), domid, frame)
