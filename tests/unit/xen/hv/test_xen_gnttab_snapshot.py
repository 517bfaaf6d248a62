"""GrantTable.save_state()/restore_state(): entries the guest wrote, the
frames it mapped and the reserved refs come back; the in-use bits of the
grants backends held are cleared for them to map again."""

import base64
import ctypes
import json
import struct

import pytest

from pyvmm.core.memory import GuestMemory
from pyvmm.core.snapshot import SnapshotError
from pyvmm.xen.hv import gnttab
from pyvmm.xen.hv.gnttab import GTF_permit_access, GTF_readonly, GTF_reading, GTF_writing, GrantError, GrantTable


PAGE = 4096
RAM_PAGES = 16


def entry_address(table, ref):
    return table.frame_host_address(ref // gnttab.ENTRIES_PER_FRAME) + (ref % gnttab.ENTRIES_PER_FRAME) * 8


def grant(table, ref, frame, flags=GTF_permit_access, domid=0):
    """What the guest writes through its mapping of the table frame."""
    ctypes.memmove(entry_address(table, ref), struct.pack("<HHI", flags, domid, frame), 8)


def entry(table, ref):
    return struct.unpack("<HHI", ctypes.string_at(entry_address(table, ref), 8))


def flags(table, ref):
    return entry(table, ref)[0]


def built(max_frames=4):
    """A table as the domain builds it: the two reserved refs."""
    memory = GuestMemory([(0, RAM_PAGES * PAGE)])
    table = GrantTable(memory, max_frames=max_frames)
    table.reserve(gnttab.GNTTAB_RESERVED_CONSOLE, 3)
    table.reserve(gnttab.GNTTAB_RESERVED_XENSTORE, 4)
    return table


def round_trip(state):
    return json.loads(json.dumps(state))


def test_a_restored_table_maps_what_the_saved_one_granted():
    table = built()
    table.note_frame_mapped(0)
    table.note_frame_mapped(2)
    second = 2 * gnttab.ENTRIES_PER_FRAME + 5  # a ref in frame 2
    grant(table, 10, 7)
    grant(table, 11, 8, GTF_permit_access | GTF_readonly)
    grant(table, second, 9)
    held = table.map(10, writable=True)  # a backend's persistent grant
    table.memory.write(7 * PAGE, b"data")
    state = round_trip(table.save_state())
    assert set(state["frames"]) == {"0", "2"}  # frame 1 is all zeros

    new = built()
    new.memory.write(7 * PAGE, b"data")  # guest RAM: the machine restores it
    new.restore_state(state)
    assert new.query_size() == (3, 4)
    assert entry(new, second) == entry(table, second)
    assert flags(new, 10) == GTF_permit_access  # in-use bits were the backend's: it maps again
    with new.map(10, writable=True) as mapping:
        assert bytes(mapping.view[:4]) == b"data"
        assert flags(new, 10) == GTF_permit_access | GTF_reading | GTF_writing
    with pytest.raises(GrantError):
        new.map(11, writable=True)  # still read-only
    assert new.map(second, writable=False).gfn == 9
    assert entry(new, gnttab.GNTTAB_RESERVED_XENSTORE)[2] == 4
    held.release()


def test_an_untouched_table_round_trips():
    table = built()
    new = built()
    new.restore_state(round_trip(table.save_state()))
    assert new.query_size() == (0, 4)
    assert entry(new, gnttab.GNTTAB_RESERVED_CONSOLE) == entry(table, gnttab.GNTTAB_RESERVED_CONSOLE)


def test_more_frames_than_this_vm_allows_is_refused():
    table = built(max_frames=8)
    table.note_frame_mapped(6)
    with pytest.raises(SnapshotError, match="allows 4"):
        built(max_frames=4).restore_state(round_trip(table.save_state()))


def corrupt(change):
    state = round_trip(built().save_state())
    change(state)
    return state


@pytest.mark.parametrize("change", [
    lambda s: s.update(version=9),
    lambda s: s.update(grant_version=3),
    lambda s: s.update(version=1, grant_version=2),  # the first format had no v2
    lambda s: s.update(grant_version=2, status_frames={"5": s["frames"]["0"]}),  # beyond its status frames
    lambda s: s.update(frame_count=-1),
    lambda s: s.update(frame_count=True),
    lambda s: s.update(frames=[]),
    lambda s: s["frames"].update({"1": s["frames"]["0"]}),  # beyond frame_count
    lambda s: s["frames"].update({"0": "!!"}),
    lambda s: s["frames"].update({"0": base64.b64encode(b"short").decode()}),
    lambda s: s["frames"].update({"-0": s["frames"]["0"]}),
    lambda s: s["reserved"].update({"1": 99}),
    lambda s: s["pins"].update({"x": [1, 0]}),
    lambda s: s["pins"].update({str(4 * 512): [1, 0]}),
])
def test_corrupt_states_are_refused(change):
    new = built()
    with pytest.raises(SnapshotError):
        new.restore_state(corrupt(change))
    assert entry(new, gnttab.GNTTAB_RESERVED_CONSOLE)[2] == 3  # left as built


def v2_grant(table, ref, frame, flags=GTF_permit_access, domid=0):
    per_frame = gnttab.ENTRIES_PER_FRAME_V2
    address = table.frame_host_address(ref // per_frame) + (ref % per_frame) * gnttab.ENTRY_SIZE_V2
    ctypes.memmove(address, struct.pack("<HHIQ", flags, domid, 0, frame), 16)


def v2_status(table, ref):
    address = table.frame_host_address(gnttab.XENMAPIDX_grant_table_status | 0) + 2 * ref
    return struct.unpack("<H", ctypes.string_at(address, 2))[0]


def test_a_version_2_table_and_its_status_frames_come_back():
    table = built()
    assert table.set_version(2) == 2
    table.note_frame_mapped(0)
    table.note_frame_mapped(gnttab.XENMAPIDX_grant_table_status | 0)
    v2_grant(table, 10, 7)
    v2_grant(table, 12, 8, GTF_permit_access | GTF_readonly)
    held = table.map(10, writable=True)  # a backend's: its in-use bits are in the status frame
    reading = table.map(12, writable=False)
    assert v2_status(table, 10) == GTF_reading | GTF_writing
    state = round_trip(table.save_state())
    assert state["grant_version"] == 2 and set(state["status_frames"]) == {"0"}

    new = built()
    new.restore_state(state)
    assert new.get_version() == 2 and new.query_size() == table.query_size()
    assert v2_status(new, 10) == 0  # the backends map again
    with new.map(10, writable=True) as mapping:
        assert mapping.gfn == 7 and v2_status(new, 10) == GTF_reading | GTF_writing
    with pytest.raises(GrantError):
        new.map(12, writable=True)  # still read-only
    assert new.map(12, writable=False).gfn == 8
    held.release()
    reading.release()


def test_a_version_1_state_without_status_frames_still_restores():
    state = round_trip(built().save_state())
    state["version"] = 1
    del state["status_frames"]
    new = built()
    new.restore_state(state)
    assert new.get_version() == 1
