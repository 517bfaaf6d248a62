"""Xen shared rings: sizes, multi-page rings, index wraparound, notification hold-off."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.xen.backend import ring
from pyvmm.xen.backend.ring import REQ_EVENT, REQ_PROD, RSP_EVENT, BackRing, FrontRing, RingBroken, ring_size

PAGE = 4096
MASK = 0xFFFF_FFFF


def scattered_pages(count):
    """Separate page buffers, as a backend gets from mapping ring-ref0..N."""
    return [memoryview(bytearray(PAGE)) for _ in range(count)]


def header(pages):
    return struct.unpack_from("<IIII", pages[0])


def set_indices(pages, req_prod, rsp_prod, req_event=None, rsp_event=None):
    req_event = req_prod + 1 if req_event is None else req_event
    rsp_event = rsp_prod + 1 if rsp_event is None else rsp_event
    struct.pack_into("<IIII", pages[0], 0, req_prod, req_event & MASK, rsp_prod, rsp_event & MASK)


def entry(tag, size):
    data = struct.pack("<Q", tag)
    return (data * (size // 8 + 1))[:size]


@pytest.mark.parametrize("pages, entry_size, expected", [
    (1, 112, 32), (1, 108, 32), (1, 64, 32), (1, 16, 128), (1, 4032, 1),
    (2, 112, 64), (4, 112, 128), (16, 112, 512), (16, 108, 512), (512, 112, 16384),
])
def test_ring_size_is_the_largest_power_of_two_that_fits(pages, entry_size, expected):
    assert ring_size(pages, entry_size) == expected


def test_ring_size_rejects_what_cannot_be_a_ring():
    for pages, size in ((0, 112), (1, 0), (1, 4033)):
        with pytest.raises(ValueError):
            ring_size(pages, size)


def test_ring_pages_must_be_whole_writable_pages():
    with pytest.raises(ValueError):
        BackRing([], 112)
    with pytest.raises(ValueError):
        BackRing([memoryview(bytearray(PAGE - 1))], 112)
    with pytest.raises(ValueError):
        BackRing([memoryview(bytes(PAGE))], 112)
    with pytest.raises(ValueError):
        BackRing(memoryview(bytearray(PAGE + 10)), 112)
    # One contiguous view of several pages is split into pages.
    back = BackRing(memoryview(bytearray(2 * PAGE)), 112)
    assert back.size == 64 and len(back.shared.pages) == 2


def test_shared_ring_init_is_the_frontends():
    pages = scattered_pages(1)
    pages[0][:64] = b"\xff" * 64
    FrontRing(pages, 112)
    assert header(pages) == (0, 1, 0, 1)
    assert bytes(pages[0][16:64]) == bytes(48)


def test_requests_and_responses_round_trip():
    pages = scattered_pages(1)
    front = FrontRing(pages, 112)
    back = BackRing(pages, 112)
    for tag in range(5):
        front.put_request(entry(tag, 112))
    assert back.take_requests() == []  # nothing published yet
    front.push_requests()
    taken = back.take_requests(3)
    assert taken == [entry(t, 112) for t in range(3)]
    assert back.take_requests() == [entry(t, 112) for t in (3, 4)]
    for tag in range(5):
        back.put_response(entry(100 + tag, 16))
    assert front.take_responses() == []  # not yet pushed
    back.push_responses()
    assert [r[:16] for r in front.take_responses()] == [entry(100 + t, 16) for t in range(5)]


def test_requests_are_private_copies():
    pages = scattered_pages(1)
    front = FrontRing(pages, 112)
    back = BackRing(pages, 112)
    front.put_request(entry(1, 112))
    front.push_requests()
    [copy] = back.take_requests()
    pages[0][64:72] = b"changed!"  # the guest rewrites the slot afterwards
    assert copy == entry(1, 112)


def test_entries_straddle_non_contiguous_pages():
    pages = scattered_pages(4)  # 128 slots of 112 bytes: many cross a page boundary
    front = FrontRing(pages, 112)
    back = BackRing(pages, 112)
    assert back.size == 128
    for tag in range(128):
        front.put_request(entry(tag, 112))
    front.push_requests()
    assert back.take_requests() == [entry(t, 112) for t in range(128)]
    # Slot 72 runs from byte 4032 of page 1 into page 2.
    start = 64 + 72 * 112 - PAGE
    assert start < PAGE < start + 112
    assert bytes(pages[1][start:PAGE]) + bytes(pages[2][: start + 112 - PAGE]) == entry(72, 112)


def test_backend_takes_no_more_than_it_can_answer():
    pages = scattered_pages(1)
    front = FrontRing(pages, 112)
    back = BackRing(pages, 112)
    for tag in range(32):
        front.put_request(entry(tag, 112))
    front.push_requests()
    assert len(back.take_requests()) == 32
    # The frontend (wrongly) produces more into slots not yet answered.
    struct.pack_into("<I", pages[0], REQ_PROD, 32 + 4)
    assert back.unconsumed_requests() == 0 and back.take_requests() == []
    back.put_response(entry(0, 16))
    assert back.unconsumed_requests() == 1


def test_more_responses_than_requests_is_refused():
    pages = scattered_pages(1)
    FrontRing(pages, 112)
    back = BackRing(pages, 112)
    with pytest.raises(ValueError):
        back.put_response(b"x")
    with pytest.raises(ValueError):
        back.shared.write_entry(0, bytes(113))


@pytest.mark.parametrize("ahead", [33, 1000, 0x8000_0000, MASK])
def test_impossible_request_producer_breaks_the_ring(ahead):
    pages = scattered_pages(1)
    FrontRing(pages, 112)
    back = BackRing(pages, 112)
    struct.pack_into("<I", pages[0], REQ_PROD, ahead)
    with pytest.raises(RingBroken):
        back.take_requests()
    with pytest.raises(RingBroken):
        back.final_check_for_requests()


def test_attach_to_a_broken_ring_fails():
    pages = scattered_pages(1)
    set_indices(pages, req_prod=100, rsp_prod=10)
    with pytest.raises(RingBroken):
        BackRing(pages, 112)


def test_attach_continues_from_the_published_responses():
    pages = scattered_pages(1)
    set_indices(pages, req_prod=17, rsp_prod=12)
    back = BackRing(pages, 112)
    assert back.req_cons == 12 and back.rsp_prod_pvt == 12
    assert len(back.take_requests()) == 5


def test_indices_wrap_around_u32():
    pages = scattered_pages(1)
    start = MASK - 20
    set_indices(pages, start, start)
    front = FrontRing(pages, 112, init=False)
    back = BackRing(pages, 112)
    served = []
    for round_ in range(4):  # 4 * 30 requests: crosses 2**32 early on
        for i in range(30):
            front.put_request(entry(round_ * 30 + i, 112))
        front.push_requests()
        for request in back.take_requests():
            served.append(struct.unpack_from("<Q", request)[0])
            back.put_response(request[:16])
        back.push_responses()
        assert len(front.take_responses()) == 30
    assert served == list(range(120))
    assert header(pages)[0] == (start + 120) & MASK == back.req_cons
    assert header(pages)[2] == (start + 120) & MASK


def test_push_responses_notifies_only_when_rsp_event_is_passed():
    pages = scattered_pages(1)
    front = FrontRing(pages, 112)
    back = BackRing(pages, 112)
    for tag in range(6):
        front.put_request(entry(tag, 112))
    front.push_requests()
    back.take_requests()
    assert back.push_responses() is False  # nothing to publish
    back.put_response(b"a")
    back.put_response(b"b")
    assert back.push_responses() is True  # rsp_event == 1: the frontend is waiting
    back.put_response(b"c")
    assert back.push_responses() is False  # it has not asked again
    front.take_responses()
    assert front.final_check_for_responses() is False  # re-arms: rsp_event = 4
    assert header(pages)[3] == 4
    back.put_response(b"d")
    back.put_response(b"e")
    assert back.push_responses() is True
    # rsp_event far ahead (a frontend that polls): no notification.
    struct.pack_into("<I", pages[0], RSP_EVENT, 1000)
    back.put_response(b"f")
    assert back.push_responses() is False


def test_final_check_for_requests_arms_req_event():
    pages = scattered_pages(1)
    front = FrontRing(pages, 112)
    back = BackRing(pages, 112)
    front.put_request(entry(0, 112))
    assert front.push_requests() is True  # req_event == 1 initially
    front.put_request(entry(1, 112))
    assert front.push_requests() is False  # backend has not asked again
    assert back.final_check_for_requests() is True  # work waiting: nothing armed
    assert header(pages)[1] == 1
    back.take_requests()
    assert back.final_check_for_requests() is False
    assert header(pages)[1] == back.req_cons + 1 == 3
    front.put_request(entry(2, 112))
    assert front.push_requests() is True  # the next request notifies
    assert back.final_check_for_requests() is True


def test_a_request_published_during_the_final_check_is_not_missed():
    pages = scattered_pages(1)
    FrontRing(pages, 112)
    back = BackRing(pages, 112)

    original = back.shared.store

    def store(offset, value):
        original(offset, value)
        if offset == REQ_EVENT:  # the frontend publishes right after we armed
            original(REQ_PROD, 1)

    back.shared.store = store
    assert back.final_check_for_requests() is True


def test_full_barrier_is_callable():
    ring.full_barrier()


@settings(max_examples=60, deadline=None)
@given(
    start=st.integers(0, MASK),
    pages=st.sampled_from([1, 2, 4]),
    entry_size=st.sampled_from([108, 112]),
    bursts=st.lists(st.tuples(st.integers(0, 140), st.integers(1, 50)), min_size=1, max_size=12),
)
def test_fifo_under_any_schedule(start, pages, entry_size, bursts):
    memory = scattered_pages(pages)
    set_indices(memory, start, start)
    front = FrontRing(memory, entry_size, init=False)
    back = BackRing(memory, entry_size)
    sent = received = answered = 0
    for produce, take in bursts:
        for _ in range(min(produce, front.free_requests())):
            front.put_request(entry(sent, entry_size))
            sent += 1
        front.push_requests()
        for request in back.take_requests(take):
            assert struct.unpack_from("<Q", request)[0] == received
            received += 1
            back.put_response(request[:16])
        back.push_responses()
        for response in front.take_responses():
            assert struct.unpack_from("<Q", response)[0] == answered
            answered += 1
    assert answered == received <= sent
    assert (back.req_cons - start) & MASK == received
