"""Grant table v2: the version switch, v2 entries and status frames as the
backends take and give back grants, sub-page grants, and what the guest
may not do."""

import ctypes
import struct

import pytest

from pyvmm.core import atomic
from pyvmm.core.memory import GuestMemory
from pyvmm.xen.errors import EBUSY, EINVAL, ERANGE, XenError
from pyvmm.xen.hv import gnttab
from pyvmm.xen.hv.gnttab import (
    GNTST_bad_gntref,
    GNTST_general_error,
    GNTST_permission_denied,
    GTF_permit_access,
    GTF_readonly,
    GTF_reading,
    GTF_sub_page,
    GTF_transitive,
    GTF_writing,
    XENMAPIDX_grant_table_status,
    GrantError,
    GrantTable,
)

PAGE = 4096
RAM_PAGES = 16


@pytest.fixture
def table():
    return GrantTable(GuestMemory([(0, RAM_PAGES * PAGE)]), max_frames=16)


def v2_address(table, ref):
    return table.frame_host_address(ref // 256) + (ref % 256) * 16


def grant_v2(table, ref, frame, flags=GTF_permit_access, domid=0, page_off=0, length=0):
    ctypes.memmove(v2_address(table, ref), struct.pack("<HHHHQ", flags, domid, page_off, length, frame), 16)


def header(table, ref):
    return struct.unpack("<HH", ctypes.string_at(v2_address(table, ref), 4))


def status(table, ref):
    address = table.frame_host_address(XENMAPIDX_grant_table_status | ref // 2048) + 2 * (ref % 2048)
    return struct.unpack("<H", ctypes.string_at(address, 2))[0]


def guest_revoke_v2(table, ref) -> bool:
    """Linux's gnttab_end_foreign_access_ref_v2: clear the flags, then the
    grant is the guest's again only if no one has it in use."""
    ctypes.memmove(v2_address(table, ref), b"\0\0", 2)
    atomic.full_barrier()
    return not status(table, ref) & (GTF_reading | GTF_writing)


def errno_of(call, *args):
    with pytest.raises(XenError) as info:
        call(*args)
    return info.value.errno


def test_switch_to_v2_keeps_the_reserved_entries_and_wipes_the_rest(table):
    table.reserve(1, 0xFEFF9)
    v1 = table.frame_host_address(0)
    ctypes.memmove(v1 + 8 * 9, struct.pack("<HHI", GTF_permit_access, 0, 3), 8)
    assert table.set_version(2) == 2 and table.get_version() == 2
    assert table.nr_entries == 16 * 256
    assert header(table, 1) == (GTF_permit_access, 0)
    assert struct.unpack("<Q", ctypes.string_at(v2_address(table, 1) + 8, 8))[0] == 0xFEFF9
    assert ctypes.string_at(v2_address(table, 9), 16) == bytes(16)  # no crud from v1
    assert table.set_version(2) == 2  # no change, no wipe
    assert header(table, 1) == (GTF_permit_access, 0)
    assert table.set_version(1) == 1
    assert struct.unpack("<HHI", ctypes.string_at(v1 + 8, 8)) == (GTF_permit_access, 0, 0xFEFF9)
    assert table.nr_entries == 16 * 512


def test_status_frames_exist_only_in_v2(table):
    status0 = XENMAPIDX_grant_table_status | 0
    assert errno_of(table.frame_host_address, status0) == EINVAL
    assert errno_of(table.note_frame_mapped, status0) == EINVAL
    assert table.nr_status_frames() == 0
    table.set_version(2)
    table.note_frame_mapped(0)
    assert table.nr_status_frames() == 1  # 256 entries: one status frame covers them
    table.note_frame_mapped(status0 | 1)  # a status frame grows the table to the frames it covers
    assert table.query_size() == (16, 16) and table.nr_status_frames() == 2
    assert errno_of(table.note_frame_mapped, status0 | 2) == EINVAL  # 16 frames have 2 status frames
    assert table.frame_host_address(status0) != table.frame_host_address(status0 | 1)


def test_growing_the_table_grows_its_status_frames(table):
    table.set_version(2)
    table.grow(9)  # GNTTABOP_setup_table: 9 * 256 entries need 2 status frames
    assert table.query_size() == (9, 16) and table.nr_status_frames() == 2


def test_backend_map_sets_and_clears_status_bits(table):
    table.set_version(2)
    grant_v2(table, 20, 5)
    with table.map(20, writable=True) as mapping:
        assert mapping.gfn == 5 and len(mapping.view) == PAGE
        assert status(table, 20) == GTF_reading | GTF_writing
        assert header(table, 20) == (GTF_permit_access, 0)  # the flags stay as the guest wrote them
        assert not guest_revoke_v2(table, 20)  # in use: the guest must wait
    assert status(table, 20) == 0


def test_readers_and_writers_share_the_status(table):
    table.set_version(2)
    grant_v2(table, 20, 5)
    reader = table.map(20, writable=False)
    writer = table.map(20, writable=True)
    assert status(table, 20) == GTF_reading | GTF_writing
    writer.release()
    assert status(table, 20) == GTF_reading
    reader.release()
    assert status(table, 20) == 0


@pytest.mark.parametrize("flags,domid,writable", [
    (0, 0, False),  # invalid
    (GTF_permit_access, 7, False),  # for another domain
    (GTF_permit_access | GTF_readonly, 0, True),  # read-only
    (GTF_transitive, 0, False),  # a grant of a grant: refused to backends
    (GTF_permit_access | GTF_sub_page, 0, False),  # part of a page cannot be mapped
])
def test_refused_v2_grants_leave_no_status(table, flags, domid, writable):
    table.set_version(2)
    grant_v2(table, 30, 5, flags=flags, domid=domid)
    with pytest.raises(GrantError) as error:
        table.map(30, writable=writable)
    assert error.value.status == GNTST_permission_denied
    assert status(table, 30) == 0


def test_grant_revoked_while_being_taken_backs_out(table, monkeypatch):
    table.set_version(2)
    grant_v2(table, 40, 5)
    real = atomic.fetch_or

    def revoke_after_status(address, size, bits):
        old = real(address, size, bits)
        if size == 2:  # the status bit is set: the guest revokes now
            ctypes.memmove(v2_address(table, 40), b"\0\0", 2)
        return old

    monkeypatch.setattr(atomic, "fetch_or", revoke_after_status)
    with pytest.raises(GrantError) as error:
        table.map(40, writable=True)
    assert error.value.status == GNTST_general_error
    assert status(table, 40) == 0


def test_refs_beyond_the_v2_table(table):
    table.set_version(2)
    with pytest.raises(GrantError) as error:
        table.map(16 * 256, writable=False)
    assert error.value.status == GNTST_bad_gntref


def test_sub_page_grant_copies_inside_its_part_only(table):
    table.set_version(2)
    grant_v2(table, 50, 6, flags=GTF_permit_access | GTF_sub_page, page_off=100, length=50)
    table.copy(50, 100, b"x" * 50, to_guest=True)
    assert table.copy(50, 120, 10, to_guest=False) == b"x" * 10
    for offset, length in ((99, 2), (140, 11), (0, 4096)):
        with pytest.raises(GrantError):
            table.copy(50, offset, length, to_guest=False)
    assert status(table, 50) == 0


def test_version_switch_refused_while_grants_are_mapped(table):
    grant = table.frame_host_address(0) + 8 * 12
    ctypes.memmove(grant, struct.pack("<HHI", GTF_permit_access, 0, 5), 8)
    mapping = table.map(12, writable=False)
    assert errno_of(table.set_version, 2) == EBUSY
    assert table.get_version() == 1
    mapping.release()
    assert table.set_version(2) == 2


def test_back_to_v1_refuses_a_reserved_entry_v1_cannot_hold(table):
    table.set_version(2)
    grant_v2(table, 3, 1 << 33)
    assert errno_of(table.set_version, 1) == ERANGE
    grant_v2(table, 3, 5, flags=GTF_transitive)
    assert errno_of(table.set_version, 1) == ERANGE
    grant_v2(table, 3, 5)
    assert table.set_version(1) == 1


def test_going_back_to_v1_tells_the_domain(table):
    gone = []
    table = GrantTable(GuestMemory([(0, RAM_PAGES * PAGE)]), max_frames=4, on_status_frames_gone=lambda: gone.append(1))
    table.set_version(2)
    assert gone == []
    table.set_version(1)
    assert gone == [1]


def test_reset_is_version_1_again(table):
    table.reserve(0, 0x100)
    table.set_version(2)
    grant_v2(table, 20, 5)
    table.reset()
    assert table.get_version() == 1
    assert struct.unpack("<HHI", ctypes.string_at(table.frame_host_address(0), 8)) == (GTF_permit_access, 0, 0x100)


def test_reserve_writes_the_current_version(table):
    table.set_version(2)
    table.reserve(0, 0x1234)
    assert header(table, 0) == (GTF_permit_access, 0)
    assert struct.unpack("<Q", ctypes.string_at(v2_address(table, 0) + 8, 8))[0] == 0x1234
    assert status(table, 0) == 0
    assert gnttab.ENTRIES_PER_FRAME_V2 == 256 and gnttab.STATUS_PER_FRAME == 2048
