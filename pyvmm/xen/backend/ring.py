"""Xen's generic shared I/O ring (xen/include/public/io/ring.h).

A PV driver pair shares one ring of fixed-size entries: the frontend
produces requests into it and the backend overwrites consumed slots with
responses. The shared part starts with a 64-byte header

    0   u32 req_prod    written by the frontend: requests published
    4   u32 req_event   written by the backend: "notify me when req_prod
                        passes this"
    8   u32 rsp_prod    written by the backend: responses published
    12  u32 rsp_event   written by the frontend: "notify me when rsp_prod
                        passes this"
    16  private bytes and padding up to 64

followed by the entries: slot i sits at 64 + i * entry_size. The number of
slots is the largest power of two that fits in the pages after the header.
Indices are free-running u32 counters; a slot is `index & (size - 1)`, and
every distance is computed modulo 2**32, so wrapping past 0xFFFFFFFF is the
normal case, not an error.

A multi-page ring (blkif's ring-ref0..N) is contiguous only in the
frontend's address space: the backend maps each page on its own. A ring
here is therefore a list of page views, and an entry may straddle two of
them (112-byte blkif entries do not divide 4096).

The backend keeps its own indices (req_cons, and rsp_prod before it is
published) and only ever writes them to the ring, never reads them back:
the frontend can scribble anything into the shared page and the worst it
gets is garbage responses. What it can do to the producer index it owns is
checked: more requests outstanding than the ring holds is impossible for an
honest frontend, and raises RingBroken (the device is then disconnected, as
Linux's blkback does). Requests are copied out of the ring before anyone
looks at them, so a frontend changing an entry while it is parsed cannot
make the backend see two different values.

Ordering: data is written before the index that publishes it and an index
is read before the data it covers; CPython performs memoryview stores and
loads in program order and x86 keeps stores ordered with stores and loads
with loads. The one reordering x86 does, a load passing an earlier store,
matters in the two notification checks (store our index, then read the
peer's event index); `full_barrier()` sits between them, a locked
instruction on a private word, which orders all memory accesses around it.
"""

from __future__ import annotations

from typing import Sequence

from pyvmm.core import atomic
from ..abi import PAGE_SIZE

HEADER_SIZE = 64

REQ_PROD = 0
REQ_EVENT = 4
RSP_PROD = 8
RSP_EVENT = 12

_MASK32 = 0xFFFF_FFFF


class RingBroken(Exception):
    """The peer put impossible indices into the ring; disconnect the device."""


full_barrier = atomic.full_barrier  # Xen's mb()


def ring_size(nr_pages: int, entry_size: int) -> int:
    """Slots in a ring of `nr_pages` pages (ring.h's __CONST_RING_SIZE)."""
    if nr_pages < 1 or entry_size < 1:
        raise ValueError(f"no ring of {nr_pages} pages with {entry_size}-byte entries")
    fit = (nr_pages * PAGE_SIZE - HEADER_SIZE) // entry_size
    if fit < 1:
        raise ValueError(f"{entry_size}-byte entries do not fit {nr_pages} page(s)")
    return 1 << (fit.bit_length() - 1)


def _page_list(pages: memoryview | bytearray | Sequence[memoryview]) -> list[memoryview]:
    """Split or check the ring memory into writable 4 KiB byte views."""
    if isinstance(pages, (memoryview, bytearray, bytes)):
        whole = memoryview(pages).cast("B")
        if len(whole) == 0 or len(whole) % PAGE_SIZE:
            raise ValueError(f"ring memory of {len(whole)} bytes is not a whole number of pages")
        views = [whole[i : i + PAGE_SIZE] for i in range(0, len(whole), PAGE_SIZE)]
    else:
        views = [memoryview(page).cast("B") for page in pages]
        if not views:
            raise ValueError("a ring needs at least one page")
    for view in views:
        if len(view) != PAGE_SIZE:
            raise ValueError(f"ring page of {len(view)} bytes, expected {PAGE_SIZE}")
        if view.readonly:
            raise ValueError("ring pages must be writable")
    return views


class SharedRing:
    """The shared memory of one ring: header accessors and entry copies."""

    def __init__(self, pages: memoryview | bytearray | Sequence[memoryview], entry_size: int):
        self.pages = _page_list(pages)
        self.entry_size = entry_size
        self.size = ring_size(len(self.pages), entry_size)
        self._mask = self.size - 1
        self._header = self.pages[0]
        self._indices = atomic.SharedWords(self._header[:HEADER_SIZE])  # one access per index
        # A view of every slot that lies within one page, None for the few
        # that straddle two: the hot path copies a slot with one slice.
        self._slots = [self._slot_view(index) for index in range(self.size)]

    def _slot_view(self, index: int) -> memoryview | None:
        page, offset = divmod(HEADER_SIZE + index * self.entry_size, PAGE_SIZE)
        if offset + self.entry_size > PAGE_SIZE:
            return None
        return self.pages[page][offset : offset + self.entry_size]

    def load(self, offset: int) -> int:
        return self._indices.load(offset)

    def store(self, offset: int, value: int) -> None:
        self._indices.store(offset, value)

    def init(self) -> None:
        """SHARED_RING_INIT (the frontend's job): indices 0, events 1."""
        self._header[:HEADER_SIZE] = bytes(HEADER_SIZE)
        self.store(REQ_EVENT, 1)
        self.store(RSP_EVENT, 1)

    def _span(self, index: int):
        """Yield (page view, offset, length) pieces of the entry at `index`."""
        position = HEADER_SIZE + (index & self._mask) * self.entry_size
        remaining = self.entry_size
        while remaining:
            page, offset = divmod(position, PAGE_SIZE)
            count = min(remaining, PAGE_SIZE - offset)
            yield self.pages[page], offset, count
            position += count
            remaining -= count

    def read_entry(self, index: int) -> bytes:
        """A private copy of the entry at ring index `index`."""
        slot = self._slots[index & self._mask]
        if slot is not None:
            return bytes(slot)
        return b"".join(bytes(view[o : o + n]) for view, o, n in self._span(index))

    def write_entry(self, index: int, data: bytes | bytearray | memoryview) -> None:
        """Write `data` (at most one entry; the rest of the slot is left alone)."""
        length = len(data)
        if length > self.entry_size:
            raise ValueError(f"{length} bytes do not fit a {self.entry_size}-byte entry")
        slot = self._slots[index & self._mask]
        if slot is not None:
            slot[:length] = data
            return
        data = memoryview(data).cast("B")
        done = 0
        for view, offset, count in self._span(index):
            count = min(count, length - done)
            if count <= 0:
                break
            view[offset : offset + count] = data[done : done + count]
            done += count


class BackRing:
    """The backend's end: consumes requests, produces responses.

    Attaching takes the ring as it is: responses continue from the shared
    rsp_prod, so a backend can reconnect to a ring that was already in use
    (Linux's BACK_RING_ATTACH). A fresh ring has every index at 0.
    """

    def __init__(self, pages: memoryview | bytearray | Sequence[memoryview], entry_size: int):
        self.shared = SharedRing(pages, entry_size)
        self.size = self.shared.size
        start = self.shared.load(RSP_PROD)
        if (self.shared.load(REQ_PROD) - start) & _MASK32 > self.size:
            raise RingBroken("the frontend's request producer is more than a ring ahead of the responses")
        self.req_cons = start  # next request to take
        self.rsp_prod_pvt = start  # next response slot, not yet published
        self._rsp_published = start

    def unconsumed_requests(self) -> int:
        """Requests waiting that can be taken now (RING_HAS_UNCONSUMED_REQUESTS).

        Raises RingBroken when the frontend claims more than a ring's worth.
        """
        waiting = (self.shared.load(REQ_PROD) - self.req_cons) & _MASK32
        if waiting > self.size:
            raise RingBroken(
                f"req_prod is {waiting} requests ahead of req_cons on a ring of {self.size}")
        # Requests taken but not yet answered hold a slot each.
        free = self.size - ((self.req_cons - self.rsp_prod_pvt) & _MASK32)
        return min(waiting, free)

    def take_requests(self, max_count: int | None = None) -> list[bytes]:
        """Copy out up to `max_count` waiting requests and consume them."""
        count = self.unconsumed_requests()
        if max_count is not None:
            count = min(count, max_count)
        requests = [self.shared.read_entry(self.req_cons + i) for i in range(count)]
        self.req_cons = (self.req_cons + count) & _MASK32
        return requests

    def put_response(self, data: bytes | bytearray | memoryview) -> None:
        """Write one response into the next slot; published by push_responses()."""
        if self.rsp_prod_pvt == self.req_cons:
            raise ValueError("more responses than requests taken")
        self.shared.write_entry(self.rsp_prod_pvt, data)
        self.rsp_prod_pvt = (self.rsp_prod_pvt + 1) & _MASK32

    def put_responses(self, entries: bytes | bytearray) -> None:
        """put_response() of every entry-sized piece of `entries`, copied
        into a one-page ring with one slice assignment per run of slots."""
        entry_size = self.shared.entry_size
        count, rest = divmod(len(entries), entry_size)
        if rest:
            raise ValueError(f"{len(entries)} bytes are not whole {entry_size}-byte responses")
        if count > (self.req_cons - self.rsp_prod_pvt) & _MASK32:
            raise ValueError("more responses than requests taken")
        data = memoryview(entries)
        if len(self.shared.pages) != 1:
            for start in range(0, len(data), entry_size):
                self.put_response(data[start : start + entry_size])
            return
        page = self.shared.pages[0]
        done = 0
        while done < count:  # at most two runs: up to the ring's end, then from its start
            slot = self.rsp_prod_pvt & (self.size - 1)
            run = min(count - done, self.size - slot)
            offset = HEADER_SIZE + slot * entry_size
            page[offset : offset + run * entry_size] = data[done * entry_size : (done + run) * entry_size]
            self.rsp_prod_pvt = (self.rsp_prod_pvt + run) & _MASK32
            done += run

    @property
    def requests_unanswered(self) -> int:
        """Requests taken off the ring and not answered yet."""
        return (self.req_cons - self.rsp_prod_pvt) & _MASK32

    def resume_taken(self, count: int) -> None:
        """Just attached (a restore): the backend had taken `count` requests
        past the last response and holds them (netback's posted receive
        buffers); consume them again without reading them."""
        waiting = (self.shared.load(REQ_PROD) - self.req_cons) & _MASK32
        if not 0 <= count <= min(waiting, self.size) or self.rsp_prod_pvt != self._rsp_published:
            raise RingBroken(f"cannot hold {count} requests: {waiting} published on a ring of {self.size}")
        self.req_cons = (self.req_cons + count) & _MASK32

    @property
    def responses_pending(self) -> int:
        """Responses written but not yet published."""
        return (self.rsp_prod_pvt - self._rsp_published) & _MASK32

    def push_responses(self) -> bool:
        """Publish the responses written; True if the frontend must be notified.

        RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: notify only when the new
        responses pass the frontend's rsp_event, i.e. when it asked to hear.
        """
        old = self._rsp_published
        new = self.rsp_prod_pvt
        if old == new:
            return False
        self.shared.store(RSP_PROD, new)
        self._rsp_published = new
        full_barrier()
        event = self.shared.load(RSP_EVENT)
        return (new - event) & _MASK32 < (new - old) & _MASK32

    def final_check_for_requests(self) -> bool:
        """True if requests are waiting; otherwise ask to be notified of the next.

        RING_FINAL_CHECK_FOR_REQUESTS: set req_event just past what we have
        consumed, then look again, so a request published meanwhile is seen
        either here or through a notification.
        """
        if self.unconsumed_requests():
            return True
        self.shared.store(REQ_EVENT, self.req_cons + 1)
        full_barrier()
        return bool(self.unconsumed_requests())


class FrontRing:
    """The frontend's end (what a guest driver does); used to test backends."""

    def __init__(self, pages: memoryview | bytearray | Sequence[memoryview], entry_size: int, *, init: bool = True):
        self.shared = SharedRing(pages, entry_size)
        self.size = self.shared.size
        if init:
            self.shared.init()
        self.req_prod_pvt = self.shared.load(REQ_PROD)
        self.rsp_cons = self.shared.load(RSP_PROD)
        self._req_published = self.req_prod_pvt

    def free_requests(self) -> int:
        return self.size - ((self.req_prod_pvt - self.rsp_cons) & _MASK32)

    def put_request(self, data: bytes | bytearray | memoryview) -> None:
        if not self.free_requests():
            raise ValueError("the ring is full")
        self.shared.write_entry(self.req_prod_pvt, data)
        self.req_prod_pvt = (self.req_prod_pvt + 1) & _MASK32

    def push_requests(self) -> bool:
        """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY."""
        old = self._req_published
        new = self.req_prod_pvt
        self.shared.store(REQ_PROD, new)
        self._req_published = new
        full_barrier()
        event = self.shared.load(REQ_EVENT)
        return (new - event) & _MASK32 < (new - old) & _MASK32

    def take_responses(self) -> list[bytes]:
        produced = self.shared.load(RSP_PROD)
        count = (produced - self.rsp_cons) & _MASK32
        if count > self.size:
            raise RingBroken(f"rsp_prod is {count} responses ahead on a ring of {self.size}")
        responses = [self.shared.read_entry(self.rsp_cons + i) for i in range(count)]
        self.rsp_cons = produced
        return responses

    def final_check_for_responses(self) -> bool:
        """RING_FINAL_CHECK_FOR_RESPONSES."""
        if (self.shared.load(RSP_PROD) - self.rsp_cons) & _MASK32:
            return True
        self.shared.store(RSP_EVENT, self.rsp_cons + 1)
        full_barrier()
        return bool((self.shared.load(RSP_PROD) - self.rsp_cons) & _MASK32)
