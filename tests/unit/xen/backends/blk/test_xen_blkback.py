"""The block backend against the fake blkfront of tests/frontends/blkfront.py:
real rings and grants in guest memory, an image file in tmp_path, checked by
reading the file back."""

import errno
import os
import struct

import pytest

from frontends.blkfront import DISK_SECTORS, PROTOCOLS, RAM_PAGES, Blkfront as Guest
from frontends.common import PAGE, pattern
from pyvmm.xen.backends.blk import blkback, blkif
from pyvmm.xen.hv import gnttab
from pyvmm.xen.backends.blk.blkback import BlockBackend, DiskImage, xenbus_backend_keys
from pyvmm.xen.backends.blk.blkif import (
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
)
from pyvmm.xen.backend.ring import REQ_PROD, FrontRing, RingBroken, ring_size


@pytest.fixture(params=PROTOCOLS)
def guest(request, tmp_path):
    g = Guest(tmp_path, request.param)
    yield g
    g.image.close()


# --- data path ------------------------------------------------------------------


def test_read_single_segment(guest):
    ref, gfn = guest.page()
    assert guest.run(guest.rw(BLKIF_OP_READ, 7, 40, [(ref, 0, 7)])) == {7: (BLKIF_OP_READ, BLKIF_RSP_OKAY)}
    assert guest.page_bytes(gfn) == guest.disk(40, 8)
    assert guest.notified == 1
    guest.assert_grants_released()


def test_read_partial_sectors_leaves_the_rest_of_the_page(guest):
    ref, gfn = guest.page(b"\xaa" * PAGE)
    assert guest.run(guest.rw(BLKIF_OP_READ, 1, 100, [(ref, 2, 4)]))[1][1] == BLKIF_RSP_OKAY
    assert guest.page_bytes(gfn, 2, 4) == guest.disk(100, 3)
    assert guest.page_bytes(gfn, 0, 1) == b"\xaa" * 1024 and guest.page_bytes(gfn, 5, 7) == b"\xaa" * 1536


def test_read_eleven_segments(guest):
    pages = [guest.page() for _ in range(11)]
    segments = [(ref, i % 4, 4 + i % 4) for i, (ref, _) in enumerate(pages)]
    assert guest.run(guest.rw(BLKIF_OP_READ, 3, 500, segments))[3] == (BLKIF_OP_READ, BLKIF_RSP_OKAY)
    sector = 500
    for (ref, gfn), (_, first, last) in zip(pages, segments):
        count = last - first + 1
        assert guest.page_bytes(gfn, first, last) == guest.disk(sector, count)
        sector += count


def test_write_is_in_the_file_when_acknowledged(guest):
    data = [pattern(i, PAGE) for i in range(3)]
    pages = [guest.page(d, readonly=True) for d in data]  # Linux grants write data read-only
    segments = [(pages[0][0], 0, 7), (pages[1][0], 1, 3), (pages[2][0], 5, 7)]
    before = guest.disk()
    assert guest.run(guest.rw(BLKIF_OP_WRITE, 9, 64, segments)) == {9: (BLKIF_OP_WRITE, BLKIF_RSP_OKAY)}
    expected = data[0] + data[1][512:2048] + data[2][5 * 512 :]
    assert guest.disk(64, 14) == expected
    assert guest.disk(0, 64) == before[: 64 * 512] and guest.disk(78) == before[78 * 512 :]
    assert os.path.getsize(guest.path) == DISK_SECTORS * 512
    guest.assert_grants_released()


def test_write_then_read_back_through_the_ring(guest):
    data = pattern(5, PAGE)
    wref, _ = guest.page(data, readonly=True)
    rref, rgfn = guest.page()
    guest.run(guest.rw(BLKIF_OP_WRITE, 1, DISK_SECTORS - 8, [(wref, 0, 7)]))
    assert guest.run(guest.rw(BLKIF_OP_READ, 2, DISK_SECTORS - 8, [(rref, 0, 7)]))[2][1] == BLKIF_RSP_OKAY
    assert guest.page_bytes(rgfn) == data


def test_transfers_go_straight_between_file_and_guest_memory(guest, monkeypatch):
    seen = []
    real_preadv, real_pwritev = os.preadv, os.pwritev

    def check(buffers):
        for buffer in buffers:
            assert isinstance(buffer, memoryview)
            assert buffer.obj is guest.memory.regions[0].mapping  # guest RAM itself, no copy
        seen.append(len(buffers))

    monkeypatch.setattr(os, "preadv", lambda fd, b, off: (check(b), real_preadv(fd, b, off))[1])
    monkeypatch.setattr(os, "pwritev", lambda fd, b, off: (check(b), real_pwritev(fd, b, off))[1])
    r1, _ = guest.page()
    r2, _ = guest.page()
    w1, _ = guest.page(pattern(1, PAGE), readonly=True)
    guest.run(guest.rw(BLKIF_OP_READ, 1, 0, [(r1, 0, 7), (r2, 0, 3)]), guest.rw(BLKIF_OP_WRITE, 2, 8, [(w1, 0, 7)]))
    assert seen == [2, 1]


@pytest.mark.parametrize("count", [40, 600])
def test_indirect_read_and_write(tmp_path, count):
    for protocol in PROTOCOLS:
        g = Guest(tmp_path, protocol, sectors=8 * count + 64, max_indirect_segments=1024)
        data = [pattern(1000 + i, PAGE) for i in range(count)]
        wpages = [g.page(d, readonly=True) for d in data]
        segments = [(ref, 0, 7) for ref, _ in wpages]
        seg_pages = [g.page(blkif.pack_segments(segments[i : i + 512]), readonly=True)
                     for i in range(0, count, 512)]
        request = blkif.pack_indirect(g.abi, BLKIF_OP_WRITE, 11, 16, count, [ref for ref, _ in seg_pages])
        assert g.run(request) == {11: (BLKIF_OP_WRITE, BLKIF_RSP_OKAY)}  # the inner operation
        assert g.disk(16, 8 * count) == b"".join(data)
        # Read it back into other pages.
        rpages = [g.page() for _ in range(count)]
        rsegs = [(ref, 0, 7) for ref, _ in rpages]
        rseg_pages = [g.page(blkif.pack_segments(rsegs[i : i + 512]), readonly=True) for i in range(0, count, 512)]
        request = blkif.pack_indirect(g.abi, BLKIF_OP_READ, 12, 16, count, [ref for ref, _ in rseg_pages])
        assert g.run(request) == {12: (BLKIF_OP_READ, BLKIF_RSP_OKAY)}
        assert all(g.page_bytes(gfn) == d for (_, gfn), d in zip(rpages, data))
        g.assert_grants_released()
        g.image.close()


def test_indirect_not_offered_is_eopnotsupp(tmp_path):
    g = Guest(tmp_path, max_indirect_segments=0)
    assert "feature-max-indirect-segments" not in g.backend.xenbus_keys()
    ref, _ = g.page(blkif.pack_segments([(1, 0, 7)] * 20))
    request = blkif.pack_indirect(g.abi, BLKIF_OP_READ, 4, 0, 20, [ref])
    assert g.run(request) == {4: (blkif.BLKIF_OP_INDIRECT, BLKIF_RSP_EOPNOTSUPP)}


# --- flush, barrier, discard ---------------------------------------------------------


@pytest.fixture
def io_log(monkeypatch):
    """Record fdatasync and pwritev calls, in order."""
    events = []
    real_sync, real_pwritev = os.fdatasync, os.pwritev
    monkeypatch.setattr(os, "fdatasync", lambda fd: (events.append("sync"), real_sync(fd))[1])
    monkeypatch.setattr(os, "pwritev", lambda fd, b, off: (events.append("write"), real_pwritev(fd, b, off))[1])
    return events


def test_flush_syncs_before_answering(guest, io_log):
    assert guest.run(guest.rw(BLKIF_OP_FLUSH_DISKCACHE, 1, 0, [])) == {1: (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_RSP_OKAY)}
    assert io_log == ["sync"]


def test_flush_with_data_writes_then_syncs(guest, io_log):
    # Linux's blkfront sends a FUA write as a flush carrying data.
    ref, _ = guest.page(pattern(3, PAGE), readonly=True)
    assert guest.run(guest.rw(BLKIF_OP_FLUSH_DISKCACHE, 1, 24, [(ref, 0, 7)]))[1][1] == BLKIF_RSP_OKAY
    assert io_log == ["write", "sync"]
    assert guest.disk(24, 8) == pattern(3, PAGE)


def test_barrier_syncs_before_and_after(guest, io_log):
    ref, _ = guest.page(pattern(4, PAGE), readonly=True)
    wref, _ = guest.page(pattern(5, PAGE), readonly=True)
    responses = guest.run(guest.rw(BLKIF_OP_WRITE, 1, 0, [(wref, 0, 7)]),
                          guest.rw(BLKIF_OP_WRITE_BARRIER, 2, 8, [(ref, 0, 7)]),
                          guest.rw(BLKIF_OP_WRITE_BARRIER, 3, 0, []))
    assert responses == {1: (BLKIF_OP_WRITE, 0), 2: (BLKIF_OP_WRITE_BARRIER, 0), 3: (BLKIF_OP_WRITE_BARRIER, 0)}
    assert io_log == ["write", "sync", "write", "sync", "sync", "sync"]
    assert guest.disk(8, 8) == pattern(4, PAGE)


def test_failed_sync_is_an_error(guest, monkeypatch):
    def broken(fd):
        raise OSError(errno.EIO, "disk on fire")

    monkeypatch.setattr(os, "fdatasync", broken)
    assert guest.run(guest.rw(BLKIF_OP_FLUSH_DISKCACHE, 1, 0, []))[1][1] == BLKIF_RSP_ERROR


def test_discard_punches_a_hole(guest):
    if not guest.backend.feature_discard:
        pytest.skip("tmp_path's file system cannot punch holes")
    keys = guest.backend.xenbus_keys()
    assert keys["feature-discard"] == "1" and keys["discard-granularity"] == "4096"
    before = guest.disk()
    request = blkif.pack_discard(guest.abi, 5, 64, 16)
    assert guest.run(request) == {5: (BLKIF_OP_DISCARD, BLKIF_RSP_OKAY)}
    after = guest.disk()
    assert len(after) == len(before)
    assert after[64 * 512 : 80 * 512] == bytes(16 * 512)
    assert after[: 64 * 512] == before[: 64 * 512] and after[80 * 512 :] == before[80 * 512 :]
    assert guest.run(blkif.pack_discard(guest.abi, 6, 0, 0))[6][1] == BLKIF_RSP_OKAY


def test_discard_refusals(tmp_path):
    g = Guest(tmp_path, discard=True)
    before = g.disk()
    assert g.run(blkif.pack_discard(g.abi, 1, 0, 8, secure=True))[1] == (BLKIF_OP_DISCARD, BLKIF_RSP_EOPNOTSUPP)
    assert g.run(blkif.pack_discard(g.abi, 2, DISK_SECTORS - 8, 9))[2][1] == BLKIF_RSP_ERROR
    assert g.run(blkif.pack_discard(g.abi, 3, (1 << 64) - 1, 1))[3][1] == BLKIF_RSP_ERROR
    assert g.disk() == before  # nothing punched by refusals
    assert g.backend.errors == 3


def test_discard_on_a_file_system_without_punch_hole(tmp_path, monkeypatch):
    calls = []

    def unsupported(fd, offset, length):
        calls.append((offset, length))
        raise OSError(errno.EOPNOTSUPP, "not here")

    monkeypatch.setattr(blkback, "punch_hole", unsupported)
    probed = Guest(tmp_path)  # discard=None: probed, not offered
    assert probed.backend.feature_discard is False
    assert probed.backend.xenbus_keys()["feature-discard"] == "0"
    assert "discard-granularity" not in probed.backend.xenbus_keys()
    assert probed.run(blkif.pack_discard(probed.abi, 1, 0, 8))[1][1] == BLKIF_RSP_EOPNOTSUPP
    probed.image.close()
    # Offered anyway (e.g. the probe passed), then the punch fails: EOPNOTSUPP, and no more tries.
    forced = Guest(tmp_path, discard=True)
    before = forced.disk()
    calls.clear()
    assert forced.run(blkif.pack_discard(forced.abi, 1, 0, 8))[1][1] == BLKIF_RSP_EOPNOTSUPP
    assert forced.run(blkif.pack_discard(forced.abi, 2, 0, 8))[2][1] == BLKIF_RSP_EOPNOTSUPP
    assert len(calls) == 1
    assert forced.disk() == before


def test_discard_other_failure_is_an_error(tmp_path, monkeypatch):
    def failing(fd, offset, length):
        raise OSError(errno.EIO, "bad")

    monkeypatch.setattr(blkback, "punch_hole", failing)
    g = Guest(tmp_path, discard=True)
    assert g.run(blkif.pack_discard(g.abi, 1, 0, 8))[1][1] == BLKIF_RSP_ERROR
    assert g.run(blkif.pack_discard(g.abi, 2, 0, 8))[2][1] == BLKIF_RSP_ERROR  # still tried: not "unsupported"


# --- durability ----------------------------------------------------------------------


def test_short_writes_and_reads_are_resumed(guest, monkeypatch):
    real_preadv, real_pwritev = os.preadv, os.pwritev
    calls = []

    def short(real):
        def call(fd, buffers, offset):
            # At most 700 bytes per call: splits segments mid-way.
            taken, budget = [], 700
            for buffer in buffers:
                if budget <= 0:
                    break
                taken.append(buffer[:budget])
                budget -= len(taken[-1])
            calls.append(offset)
            return real(fd, taken, offset)
        return call

    monkeypatch.setattr(os, "pwritev", short(real_pwritev))
    monkeypatch.setattr(os, "preadv", short(real_preadv))
    data = [pattern(20 + i, PAGE) for i in range(3)]
    pages = [guest.page(d, readonly=True) for d in data]
    segments = [(pages[0][0], 0, 7), (pages[1][0], 3, 5), (pages[2][0], 0, 6)]
    assert guest.run(guest.rw(BLKIF_OP_WRITE, 1, 200, segments))[1][1] == BLKIF_RSP_OKAY
    assert guest.disk(200, 18) == data[0] + data[1][1536:3072] + data[2][:3584]
    assert len(calls) == -(-18 * 512 // 700)
    rpages = [guest.page() for _ in range(2)]
    assert guest.run(guest.rw(BLKIF_OP_READ, 2, 200, [(rpages[0][0], 0, 7), (rpages[1][0], 1, 7)]))[2][1] == 0
    assert guest.page_bytes(rpages[0][1]) == data[0]
    assert guest.page_bytes(rpages[1][1], 1, 7) == guest.disk(208, 7)


def test_more_segments_than_iov_max_are_split(guest, monkeypatch):
    monkeypatch.setattr(blkback, "IOV_MAX", 4)
    real_pwritev = os.pwritev
    sizes = []
    monkeypatch.setattr(os, "pwritev", lambda fd, b, off: (sizes.append(len(b)), real_pwritev(fd, b, off))[1])
    data = [pattern(40 + i, PAGE) for i in range(11)]
    pages = [guest.page(d, readonly=True) for d in data]
    assert guest.run(guest.rw(BLKIF_OP_WRITE, 1, 0, [(ref, 0, 7) for ref, _ in pages]))[1][1] == BLKIF_RSP_OKAY
    assert sizes == [4, 4, 3]
    assert guest.disk(0, 88) == b"".join(data)


def test_failed_write_is_not_acknowledged(guest, monkeypatch):
    def broken(fd, buffers, offset):
        raise OSError(errno.ENOSPC, "full")

    monkeypatch.setattr(os, "pwritev", broken)
    ref, _ = guest.page(pattern(1, PAGE), readonly=True)
    assert guest.run(guest.rw(BLKIF_OP_WRITE, 1, 0, [(ref, 0, 7)]))[1][1] == BLKIF_RSP_ERROR
    guest.assert_grants_released()


def test_writes_that_make_no_progress_fail(guest, monkeypatch):
    monkeypatch.setattr(os, "pwritev", lambda fd, buffers, offset: 0)
    ref, _ = guest.page(pattern(1, PAGE), readonly=True)
    assert guest.run(guest.rw(BLKIF_OP_WRITE, 1, 0, [(ref, 0, 7)]))[1][1] == BLKIF_RSP_ERROR


def test_image_shrunk_under_the_backend(guest):
    os.truncate(guest.path, 100 * 512)
    ref, _ = guest.page()
    assert guest.run(guest.rw(BLKIF_OP_READ, 1, 96, [(ref, 0, 7)]))[1][1] == BLKIF_RSP_ERROR


# --- batching, ring handling ---------------------------------------------------------


def test_one_notification_per_batch(tmp_path):
    g = Guest(tmp_path, batch=4)
    pages = [g.page() for _ in range(20)]
    g.submit(*[g.rw(BLKIF_OP_READ, i, 8 * i, [(ref, 0, 7)]) for i, (ref, _) in enumerate(pages)])
    responses = g.run()
    assert len(responses) == 20 and all(s == BLKIF_RSP_OKAY for _, s in responses.values())
    assert g.notified == 1
    # The frontend has not re-armed rsp_event: responses go out silently.
    ref, _ = g.page()
    g.run(g.rw(BLKIF_OP_READ, 100, 0, [(ref, 0, 7)]))
    assert g.notified == 1
    # Once it re-arms, the next batch notifies once.
    assert g.front.final_check_for_responses() is False
    g.run(*[g.rw(BLKIF_OP_READ, 200 + i, 0, [(ref, 0, 7)]) for i in range(10)])
    assert g.notified == 2


def test_backend_rearms_req_event_after_draining(guest):
    ref, _ = guest.page()
    assert guest.submit(guest.rw(BLKIF_OP_READ, 1, 0, [(ref, 0, 7)])) is True
    assert guest.submit(guest.rw(BLKIF_OP_READ, 2, 0, [(ref, 0, 7)])) is False  # backend busy, not re-armed
    guest.run()
    assert guest.submit(guest.rw(BLKIF_OP_READ, 3, 0, [(ref, 0, 7)])) is True  # idle again: notify
    assert guest.backend.process() == 1


def test_process_without_work_does_not_notify(guest):
    assert guest.backend.process() == 0
    assert guest.notified == 0


def test_budget_bounds_one_call(tmp_path):
    g = Guest(tmp_path, budget=8, batch=3)
    ref, _ = g.page()
    g.submit(*[g.rw(BLKIF_OP_READ, i, 0, [(ref, 0, 7)]) for i in range(20)])
    assert g.backend.process() == 8 and g.backend.work_pending()
    assert g.backend.process() == 8 and g.backend.work_pending()
    assert g.backend.process() == 4 and not g.backend.work_pending()
    assert len(g.front.take_responses()) == 20


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_ring_indices_wrap(tmp_path, protocol):
    g = Guest(tmp_path, protocol)
    # Restart the ring with indices just below 2**32 (rings are re-attached as found).
    g.backend.detach_ring()
    start = 0xFFFF_FFF0
    struct.pack_into("<IIII", g.front.shared.pages[0], 0, start, start + 1, start, start + 1)
    g.front = FrontRing(g.front.shared.pages, g.abi.entry_size, init=False)
    g.backend.attach_ring([m.view for m in g.ring_mappings], protocol)
    data = pattern(9, PAGE)
    wref, _ = g.page(data, readonly=True)
    seen = set()
    for round_ in range(5):  # 5 * 25 requests: through 2**32 and around the 32 slots several times
        rpages = [g.page() for _ in range(5)]
        requests = [g.rw(BLKIF_OP_WRITE, 1000 * round_ + i, 8 * i, [(wref, 0, 7)]) for i in range(20)]
        requests += [g.rw(BLKIF_OP_READ, 1000 * round_ + 20 + i, 8 * i, [(ref, 0, 7)])
                     for i, (ref, _) in enumerate(rpages)]
        responses = g.run(*requests)
        assert sorted(responses) == sorted(1000 * round_ + i for i in range(25))
        assert all(status == BLKIF_RSP_OKAY for _, status in responses.values())
        assert all(g.page_bytes(gfn) == data for _, gfn in rpages)
        seen.update(responses)
        g.front.final_check_for_responses()
    assert len(seen) == 125
    assert g.backend.ring().req_cons == (start + 125) & 0xFFFF_FFFF
    g.assert_grants_released()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_multi_page_ring(tmp_path, protocol):
    g = Guest(tmp_path, protocol, ring_pages=4)
    assert g.backend.ring().size == 128
    pages = [g.page() for _ in range(100)]
    g.submit(*[g.rw(BLKIF_OP_READ, i, 8 * i, [(ref, 0, 7)]) for i, (ref, _) in enumerate(pages)])
    responses = g.run()
    assert sorted(responses) == list(range(100)) and g.notified == 1
    assert all(g.page_bytes(gfn) == g.disk(8 * i, 8) for i, (_, gfn) in enumerate(pages))


def test_impossible_ring_indices_break_the_ring(guest):
    ref, _ = guest.page()
    guest.submit(guest.rw(BLKIF_OP_READ, 1, 0, [(ref, 0, 7)]))
    struct.pack_into("<I", guest.front.shared.pages[0], REQ_PROD, 1 + 33)
    with pytest.raises(RingBroken):
        guest.backend.process()


def test_requests_answered_before_the_ring_broke_are_published(tmp_path):
    g = Guest(tmp_path, batch=1)
    ref, _ = g.page()
    g.submit(g.rw(BLKIF_OP_READ, 1, 0, [(ref, 0, 7)]))
    original = g.backend.ring().take_requests
    calls = []

    def take(max_count=None):
        calls.append(1)
        if len(calls) == 2:  # the frontend scribbles after our first batch
            struct.pack_into("<I", g.front.shared.pages[0], REQ_PROD, 500)
        return original(max_count)

    g.backend.ring().take_requests = take
    with pytest.raises(RingBroken):
        g.backend.process()
    assert [blkif.parse_response(r, g.abi)[0] for r in g.front.take_responses()] == [1]
    assert g.notified == 1


# --- hostile frontends ----------------------------------------------------------------


def test_bad_grants_fail_only_their_request(guest):
    good, good_gfn = guest.page()
    data_ref, _ = guest.page(pattern(7, PAGE), readonly=True)
    ungranted = guest.next_ref + 50
    foreign = guest.grant(40, domid=5)  # granted to another domain
    not_ram = guest.grant(RAM_PAGES + 10)  # not a guest RAM frame
    ro_for_read = guest.grant(41, readonly=True)  # a read needs a writable grant
    before = guest.disk()
    responses = guest.run(
        guest.rw(BLKIF_OP_READ, 1, 0, [(good, 0, 7), (ungranted, 0, 7)]),
        guest.rw(BLKIF_OP_READ, 2, 0, [(foreign, 0, 7)]),
        guest.rw(BLKIF_OP_WRITE, 3, 0, [(data_ref, 0, 7), (not_ram, 0, 7)]),
        guest.rw(BLKIF_OP_READ, 4, 0, [(ro_for_read, 0, 7)]),
        guest.rw(BLKIF_OP_READ, 5, 0, [(0xFFFF_FFFF, 0, 7)]),
        guest.rw(BLKIF_OP_READ, 6, 8, [(good, 0, 7)]),
    )
    assert {i: s for i, (_, s) in responses.items()} == {1: -1, 2: -1, 3: -1, 4: -1, 5: -1, 6: 0}
    assert guest.page_bytes(good_gfn) == guest.disk(8, 8)
    assert guest.disk() == before  # the failed write wrote nothing
    guest.assert_grants_released()
    assert guest.notified == 1


def test_sector_ranges_beyond_the_disk(guest):
    ref, _ = guest.page(pattern(1, PAGE), readonly=True)
    rref, _ = guest.page()
    before = guest.disk()
    responses = guest.run(
        guest.rw(BLKIF_OP_WRITE, 1, DISK_SECTORS - 7, [(ref, 0, 7)]),
        guest.rw(BLKIF_OP_WRITE, 2, DISK_SECTORS, [(ref, 0, 0)]),
        guest.rw(BLKIF_OP_READ, 3, (1 << 64) - 4, [(rref, 0, 7)]),  # would wrap a u64
        guest.rw(BLKIF_OP_READ, 4, DISK_SECTORS - 8, [(rref, 0, 7)]),
        guest.rw(BLKIF_OP_WRITE_BARRIER, 5, DISK_SECTORS, [(ref, 0, 7)]),
    )
    assert {i: s for i, (_, s) in responses.items()} == {1: -1, 2: -1, 3: -1, 4: 0, 5: -1}
    assert guest.disk() == before
    assert os.path.getsize(guest.path) == DISK_SECTORS * 512  # never extended


def test_malformed_requests(guest):
    ref, _ = guest.page()
    eleven = [(ref, 0, 7)] * 11
    responses = guest.run(
        guest.rw(BLKIF_OP_READ, 1, 0, eleven, nr_segments=12),
        guest.rw(BLKIF_OP_READ, 2, 0, [(ref, 4, 3)]),
        guest.rw(BLKIF_OP_READ, 3, 0, [(ref, 0, 8)]),
        guest.rw(BLKIF_OP_WRITE, 4, 0, []),
        guest.rw(blkif.BLKIF_OP_RESERVED_1, 5, 0, [(ref, 0, 7)]),
        guest.rw(0xEE, 6, 0, [(ref, 0, 7)]),
        guest.rw(BLKIF_OP_READ, 7, 0, eleven),
    )
    assert responses == {
        1: (BLKIF_OP_READ, -1), 2: (BLKIF_OP_READ, -1), 3: (BLKIF_OP_READ, -1), 4: (BLKIF_OP_WRITE, -1),
        5: (blkif.BLKIF_OP_RESERVED_1, BLKIF_RSP_EOPNOTSUPP), 6: (0xEE, BLKIF_RSP_EOPNOTSUPP),
        7: (BLKIF_OP_READ, 0),
    }
    assert guest.backend.errors == 6


def test_hostile_indirect_requests(tmp_path):
    g = Guest(tmp_path, max_indirect_segments=32)
    data_ref, _ = g.page()
    segs_ok = g.page(blkif.pack_segments([(data_ref, 0, 7)] * 20), readonly=True)[0]
    segs_bad_sector = g.page(blkif.pack_segments([(data_ref, 0, 7)] * 19 + [(data_ref, 5, 9)]), readonly=True)[0]
    segs_bad_grant = g.page(blkif.pack_segments([(data_ref, 0, 7)] * 19 + [(9999, 0, 7)]), readonly=True)[0]
    segs_foreign = g.grant(50, domid=3)
    responses = g.run(
        blkif.pack_indirect(g.abi, BLKIF_OP_READ, 1, 0, 33, [segs_ok]),  # more than offered
        blkif.pack_indirect(g.abi, BLKIF_OP_READ, 2, 0, 20, [segs_bad_sector]),
        blkif.pack_indirect(g.abi, BLKIF_OP_READ, 3, 0, 20, [segs_bad_grant]),
        blkif.pack_indirect(g.abi, BLKIF_OP_READ, 4, 0, 20, [segs_foreign]),
        blkif.pack_indirect(g.abi, BLKIF_OP_FLUSH_DISKCACHE, 5, 0, 20, [segs_ok]),
        blkif.pack_indirect(g.abi, BLKIF_OP_READ, 6, DISK_SECTORS - 8, 20, [segs_ok]),  # past the end
        blkif.pack_indirect(g.abi, BLKIF_OP_READ, 7, 0, 20, [segs_ok]),
    )
    assert {i: s for i, (_, s) in responses.items()} == {1: -1, 2: -1, 3: -1, 4: -1, 5: -1, 6: -1, 7: 0}
    assert responses[5][0] == BLKIF_OP_FLUSH_DISKCACHE
    g.assert_grants_released()


def test_read_only_disk(tmp_path):
    g = Guest(tmp_path, readonly=True)
    keys = g.backend.xenbus_keys()
    assert keys["info"] == str(blkif.VDISK_READONLY)
    assert keys["feature-flush-cache"] == keys["feature-barrier"] == keys["feature-discard"] == "0"
    before = g.disk()
    wref, _ = g.page(pattern(1, PAGE), readonly=True)
    rref, rgfn = g.page()
    responses = g.run(
        g.rw(BLKIF_OP_WRITE, 1, 0, [(wref, 0, 7)]),
        g.rw(BLKIF_OP_FLUSH_DISKCACHE, 2, 0, [(wref, 0, 7)]),
        g.rw(BLKIF_OP_WRITE_BARRIER, 3, 0, []),
        blkif.pack_discard(g.abi, 4, 0, 8),
        g.rw(BLKIF_OP_READ, 5, 0, [(rref, 0, 7)]),
    )
    assert {i: s for i, (_, s) in responses.items()} == {1: -1, 2: -2, 3: -2, 4: -2, 5: 0}
    assert g.disk() == before
    assert g.page_bytes(rgfn) == before[:PAGE]


# --- 4 KiB sectors, keys, wiring ------------------------------------------------------


def test_4k_sector_disk(tmp_path):
    g = Guest(tmp_path, sector_size=4096)
    keys = g.backend.xenbus_keys()
    assert keys["sector-size"] == "4096" and keys["physical-sector-size"] == "4096"
    assert keys["sectors"] == str(DISK_SECTORS)  # 512-byte units, as Linux's blkfront reads it
    ref, gfn = g.page()
    responses = g.run(
        g.rw(BLKIF_OP_READ, 1, 8, [(ref, 0, 7)]),
        g.rw(BLKIF_OP_READ, 2, 4, [(ref, 0, 7)]),  # not on a 4 KiB boundary
        g.rw(BLKIF_OP_READ, 3, 8, [(ref, 0, 3)]),  # half a block
        blkif.pack_discard(g.abi, 4, 3, 8),
    )
    assert responses[1][1] == 0 and responses[2][1] == -1 and responses[3][1] == -1
    assert responses[4][1] in (-1, -2)  # misaligned (or discard not offered here)


def test_disk_image_sizes(tmp_path):
    path = tmp_path / "odd.img"
    path.write_bytes(bytes(4096 * 3 + 1000))
    with DiskImage(path) as image:
        assert image.sectors == 25 and image.size == 25 * 512 and not image.is_block_device
    with DiskImage(path, sector_size=4096) as image:
        assert image.sectors == 24 and image.size == 3 * 4096
    path.write_bytes(bytes(100))
    with pytest.raises(ValueError):
        DiskImage(path)
    with pytest.raises(ValueError):
        DiskImage(path, sector_size=1024)
    with pytest.raises(FileNotFoundError):
        DiskImage(tmp_path / "missing.img")
    with pytest.raises(IsADirectoryError):
        DiskImage(tmp_path)
    with pytest.raises(ValueError):
        DiskImage("/dev/null", readonly=True)  # neither a file nor a block device


def test_xenbus_backend_keys(tmp_path):
    path = tmp_path / "d.img"
    path.write_bytes(bytes(1 << 20))
    with DiskImage(path, physical_sector_size=4096) as image:
        keys = xenbus_backend_keys(image, discard=True, max_indirect_segments=256, max_ring_page_order=4,
                                   max_queues=2, persistent=True)
        assert keys == {
            "sectors": "2048", "info": "0", "sector-size": "512", "physical-sector-size": "4096",
            "feature-flush-cache": "1", "feature-barrier": "1", "feature-discard": "1",
            "discard-granularity": "4096", "discard-alignment": "0", "discard-secure": "0",
            "feature-max-indirect-segments": "256", "max-ring-page-order": "4", "multi-queue-max-queues": "2",
            "feature-persistent": "1",
        }
        plain = xenbus_backend_keys(image, flush=False, barrier=False)
        assert plain["feature-flush-cache"] == plain["feature-barrier"] == plain["feature-discard"] == "0"
        assert "feature-max-indirect-segments" not in plain and "discard-granularity" not in plain
        assert plain["max-ring-page-order"] == "0" and plain["multi-queue-max-queues"] == "1"
        assert plain["feature-persistent"] == "0"


def test_advertised_features_are_what_is_served(tmp_path):
    g = Guest(tmp_path, flush=False, max_indirect_segments=64, max_ring_page_order=2)
    keys = g.backend.xenbus_keys()
    assert keys["feature-flush-cache"] == keys["feature-barrier"] == "0"
    assert keys["feature-max-indirect-segments"] == "64" and keys["max-ring-page-order"] == "2"
    responses = g.run(g.rw(BLKIF_OP_FLUSH_DISKCACHE, 1, 0, []), g.rw(BLKIF_OP_WRITE_BARRIER, 2, 0, []))
    assert responses == {1: (BLKIF_OP_FLUSH_DISKCACHE, -2), 2: (BLKIF_OP_WRITE_BARRIER, -2)}


def test_attach_ring_checks(tmp_path):
    g = Guest(tmp_path, max_ring_page_order=2)
    views = [memoryview(bytearray(PAGE)) for _ in range(8)]
    with pytest.raises(ValueError):
        g.backend.attach_ring(views[:1], "x86_64-abi")  # queue 0 is taken
    g.backend.detach_ring(0)
    assert not g.backend.connected
    with pytest.raises(blkif.BlkifError):
        g.backend.attach_ring(views[:1], "sparc-abi")
    for count in (0, 3, 8):
        with pytest.raises(ValueError):
            g.backend.attach_ring(views[:count], "x86_64-abi")
    with pytest.raises(ValueError):
        g.backend.attach_ring(views[:1], "x86_64-abi", queue=1)  # one queue offered
    g.backend.attach_ring(views[:4], "x86_32-abi")
    assert g.backend.ring().size == ring_size(4, 108)
    for bad in ({"max_indirect_segments": 11}, {"max_indirect_segments": 5000}, {"max_ring_page_order": 10},
                {"max_queues": 0}, {"batch": 0}):
        with pytest.raises(ValueError):
            BlockBackend(g.image, g.table, g.notify, **bad)


def test_two_queues_notify_separately(tmp_path):
    g = Guest(tmp_path, max_queues=2)
    second = []
    gfns = [200, 202]
    refs = [g.grant(gfn) for gfn in gfns]
    front2 = FrontRing([g.memory.view(gfn * PAGE, PAGE) for gfn in gfns], g.abi.entry_size)
    mappings = [g.table.map(ref, writable=True) for ref in refs]
    g.backend.attach_ring([m.view for m in mappings], "x86_64-abi", queue=1, notify=lambda: second.append(1))
    ref, gfn = g.page()
    front2.put_request(g.rw(BLKIF_OP_READ, 1, 16, [(ref, 0, 7)]))
    front2.push_requests()
    assert g.backend.process(1) == 1
    assert second == [1] and g.notified == 0
    assert blkif.parse_response(front2.take_responses()[0], g.abi) == (1, BLKIF_OP_READ, 0)
    assert g.page_bytes(gfn) == g.disk(16, 8)
    assert g.backend.process(0) == 0 and g.backend.process(5) == 0


# --- persistent grants ------------------------------------------------------------


def test_persistent_grants_are_mapped_once_and_kept_until_detach(tmp_path):
    g = Guest(tmp_path, persistent=True)
    assert g.backend.xenbus_keys()["feature-persistent"] == "1"
    write_ref, write_gfn = g.page(pattern(1, PAGE))
    read_ref, read_gfn = g.page()
    for round_ in range(3):  # the frontend reuses the same two grants
        g.memory.write(write_gfn * PAGE, pattern(round_, PAGE))
        responses = g.run(g.rw(BLKIF_OP_WRITE, 1, 8 * round_, [(write_ref, 0, 7)]),
                          g.rw(BLKIF_OP_READ, 2, 8 * round_, [(read_ref, 0, 7)]))
        assert responses == {1: (BLKIF_OP_WRITE, BLKIF_RSP_OKAY), 2: (BLKIF_OP_READ, BLKIF_RSP_OKAY)}
        assert g.disk(8 * round_, 8) == pattern(round_, PAGE) == g.page_bytes(read_gfn)
        # Held between requests: the guest sees its grants in use.
        assert g.entry_flags(write_ref) & gnttab.GTF_IN_USE and g.entry_flags(read_ref) & gnttab.GTF_IN_USE
    assert g.backend.persistent_grants() == 2
    g.backend.detach_ring()
    assert g.backend.persistent_grants() == 0
    g.assert_grants_released()


def test_persistent_grants_beyond_the_limit_are_mapped_per_request(tmp_path):
    g = Guest(tmp_path, persistent=True, max_persistent_grants=2)
    pages = [g.page(pattern(i, PAGE)) for i in range(4)]
    segments = [(ref, 0, 7) for ref, _ in pages]
    assert g.run(g.rw(BLKIF_OP_WRITE, 7, 0, segments)) == {7: (BLKIF_OP_WRITE, BLKIF_RSP_OKAY)}
    assert g.disk(0, 32) == b"".join(pattern(i, PAGE) for i in range(4))
    assert g.backend.persistent_grants() == 2
    kept = [ref for ref, _ in pages if g.entry_flags(ref) & gnttab.GTF_IN_USE]
    assert len(kept) == 2  # the other two were released with the response


def test_a_read_only_grant_is_not_kept_but_still_serves_a_write(tmp_path):
    g = Guest(tmp_path, persistent=True)
    ref, _ = g.page(pattern(5, PAGE), readonly=True)
    assert g.run(g.rw(BLKIF_OP_WRITE, 1, 16, [(ref, 0, 7)])) == {1: (BLKIF_OP_WRITE, BLKIF_RSP_OKAY)}
    assert g.disk(16, 8) == pattern(5, PAGE)
    assert g.backend.persistent_grants() == 0 and not g.entry_flags(ref) & gnttab.GTF_IN_USE
    # ... and a read into it is refused, as without persistent grants.
    assert g.run(g.rw(BLKIF_OP_READ, 2, 16, [(ref, 0, 7)])) == {2: (BLKIF_OP_READ, BLKIF_RSP_ERROR)}


def test_persistent_indirect_pages_are_copied_before_parsing(tmp_path):
    g = Guest(tmp_path, persistent=True)
    data_pages = [g.page() for _ in range(16)]
    segments = blkif.pack_segments([(ref, 0, 7) for ref, _ in data_pages])
    indirect_ref, indirect_gfn = g.page(segments)
    request = blkif.pack_indirect(g.abi, BLKIF_OP_READ, 3, 0, 16, [indirect_ref])
    assert g.run(request) == {3: (BLKIF_OP_READ, BLKIF_RSP_OKAY)}
    assert b"".join(g.page_bytes(gfn) for _, gfn in data_pages) == g.disk(0, 128)
    assert g.backend.persistent_grants() == 17  # the indirect page is kept too
    # The next request through the same (kept) indirect page sees its new content.
    g.memory.write(indirect_gfn * PAGE, blkif.pack_segments([(data_pages[0][0], 0, 7)] * 16))
    request = blkif.pack_indirect(g.abi, BLKIF_OP_READ, 4, 128, 16, [indirect_ref])
    assert g.run(request) == {4: (BLKIF_OP_READ, BLKIF_RSP_OKAY)}
    assert g.page_bytes(data_pages[0][1]) == g.disk(128 + 15 * 8, 8)


def test_persistent_grants_are_not_offered_when_disabled(tmp_path):
    g = Guest(tmp_path, persistent=True, max_persistent_grants=0)
    assert g.backend.xenbus_keys()["feature-persistent"] == "0"
    ref, _ = g.page()
    assert g.run(g.rw(BLKIF_OP_READ, 1, 0, [(ref, 0, 7)])) == {1: (BLKIF_OP_READ, BLKIF_RSP_OKAY)}
    g.assert_grants_released()
