"""FIFO event channels (Xen's public/event_channel.h, "FIFO-based event
channel ABI"): the queues of one guest, kept in the guest's own pages.

The guest gives Xen
- an *event array*: pages of 32-bit event words, one per port, added one
  page (1024 ports) at a time with EVTCHNOP_expand_array, up to 128 pages
  (2^17 ports). A word holds PENDING (bit 31), MASKED (30), LINKED (29),
  BUSY (28) and, in bits 0-16, LINK: the next port in its queue;
- a *control block* per vCPU (EVTCHNOP_init_control; 72 bytes, 8-byte
  aligned, inside one page): READY (one bit per priority with events
  queued) and HEAD[16], the first port of each priority's queue.

Raising port p on vCPU v at priority q (Xen's evtchn_fifo_set_pending):
set PENDING; if p is not MASKED and was not LINKED, set LINKED and append
p to queue (v, q): the hypervisor keeps each queue's TAIL; if the tail
word is still LINKED its LINK becomes p, otherwise the queue was empty
and HEAD[q] becomes p. A new head sets READY bit q, and a READY bit that
was clear means the vCPU must be told: `set_pending` then answers True
and the caller raises the upcall. The guest consumes from the head:
it clears LINKED and LINK with a compare-and-swap and follows the link.

The guest changes the same words at the same time, so every change to
its memory is an atomic instruction (pyvmm/core/atomic.py) and a link is
written with compare-and-swap only while the tail is still LINKED. The
guest may clear MASKED under it: Xen marks the tail word BUSY while
linking, which Linux's unmask waits on, so the swap fails at most a few
times; after 4 failures the event stays queued on its own (Xen's choice).

Everything the guest hands in is checked: the vCPU, the control block's
offset (aligned, inside its page), that each frame is a RAM page the guest
owns (`page_address` answers None otherwise), the array's size (at most
128 pages), priorities (0-15). A control block or array page, once given,
stays this object's until the domain goes back to 2-level
(EVTCHNOP_reset), as on Xen; whatever the guest writes there can confuse
only its own queues: link values are masked to 17 bits and a port beyond
the array is never dereferenced.

Threads: this object has no lock of its own. Its one owner, EventChannels,
calls it only under EventChannels._lock, which any thread that raises,
masks or unmasks a port holds (vCPU threads in hypercalls, ring workers and
the event thread notifying the guest, timers); so tails, priorities and
pending state saved for missing array pages never race.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from pyvmm.core import atomic
from ..abi import PAGE_SIZE
from ..errors import EINVAL, ENOENT, ENOSPC, XenError

EVTCHN_FIFO_PENDING = 31
EVTCHN_FIFO_MASKED = 30
EVTCHN_FIFO_LINKED = 29
EVTCHN_FIFO_BUSY = 28
EVTCHN_FIFO_LINK_BITS = 17
EVTCHN_FIFO_LINK_MASK = (1 << EVTCHN_FIFO_LINK_BITS) - 1
EVTCHN_FIFO_NR_CHANNELS = 1 << EVTCHN_FIFO_LINK_BITS

EVTCHN_FIFO_MAX_QUEUES = 16
EVTCHN_FIFO_PRIORITY_MAX = 0  # the most urgent
EVTCHN_FIFO_PRIORITY_DEFAULT = 7
EVTCHN_FIFO_PRIORITY_MIN = 15

WORDS_PER_PAGE = PAGE_SIZE // 4
MAX_ARRAY_PAGES = EVTCHN_FIFO_NR_CHANNELS // WORDS_PER_PAGE  # 128

# struct evtchn_fifo_control_block: u32 ready, u32 reserved, u32 head[16].
CONTROL_BLOCK_SIZE = 8 + 4 * EVTCHN_FIFO_MAX_QUEUES
CONTROL_READY = 0
CONTROL_HEAD = 8

# Xen retries a link this many times once the tail is marked BUSY.
LINK_ATTEMPTS = 4

_PENDING = 1 << EVTCHN_FIFO_PENDING
_MASKED = 1 << EVTCHN_FIFO_MASKED
_LINKED = 1 << EVTCHN_FIFO_LINKED
_BUSY = 1 << EVTCHN_FIFO_BUSY
_WORD = 0xFFFF_FFFF


@dataclass
class _Vcpu:
    control_block: int | None = None  # host address, once the guest registered it
    control_place: tuple[int, int] | None = None  # and where: (gfn, offset), for a snapshot
    tails: list[int] = field(default_factory=lambda: [0] * EVTCHN_FIFO_MAX_QUEUES)  # 0: empty


class FifoQueues:
    """One domain's FIFO event channels. `page_address(gfn)`: the host
    address of guest RAM page `gfn`, or None when the guest may not hand it
    to the hypervisor (not RAM, an overlay, given back)."""

    def __init__(self, vcpu_count: int, page_address: Callable[[int], int | None]):
        self._vcpus = [_Vcpu() for _ in range(vcpu_count)]
        self._page_address = page_address
        self._pages: list[int] = []  # host addresses of the event array's pages
        self._gfns: list[int] = []  # and their frames (diagnostics)
        self._priority: dict[int, int] = {}  # port -> priority, when not the default
        # port -> (vCPU, priority) of the queue it was last linked on: a port
        # still linked there must not be appended to another queue's tail.
        self._last_queue: dict[int, tuple[int, int]] = {}
        self._saved: set[int] = set()  # raised while their array page was missing

    # --- set-up (hypercalls) ------------------------------------------------------

    @staticmethod
    def check_control(vcpu_count: int, vcpu: int, offset: int) -> None:
        """EVTCHNOP_init_control's argument checks, in Xen's order."""
        if not 0 <= vcpu < vcpu_count:
            raise XenError(ENOENT, f"no vCPU {vcpu}")
        if offset > PAGE_SIZE - CONTROL_BLOCK_SIZE:
            raise XenError(EINVAL, f"control block at offset {offset:#x} leaves its page")
        if offset % 8:
            raise XenError(EINVAL, f"control block offset {offset:#x} is not 8-byte aligned")

    def map_control_block(self, vcpu: int, gfn: int, offset: int) -> None:
        """The guest's control block for `vcpu`: once per vCPU (EINVAL after)."""
        self.check_control(len(self._vcpus), vcpu, offset)
        state = self._vcpus[vcpu]
        if state.control_block is not None:
            raise XenError(EINVAL, f"vCPU {vcpu} has its control block already")
        state.control_block = self._page(gfn) + offset
        state.control_place = (gfn, offset)

    def add_array_page(self, gfn: int) -> list[int]:
        """EVTCHNOP_expand_array: one more page of event words. Returns the
        ports it covers that were raised while it was missing, to raise
        again (the caller knows their vCPUs)."""
        if len(self._pages) >= MAX_ARRAY_PAGES:
            raise XenError(ENOSPC, "the event array has all its pages")
        address = self._page(gfn)
        first = len(self._pages) * WORDS_PER_PAGE
        self._pages.append(address)
        self._gfns.append(gfn)
        covered = sorted(port for port in self._saved if first <= port < first + WORDS_PER_PAGE)
        self._saved.difference_update(covered)
        return covered

    def _page(self, gfn: int) -> int:
        address = self._page_address(gfn)
        if address is None:
            raise XenError(EINVAL, f"gfn {gfn:#x} is not a RAM page of the guest")
        return address

    @property
    def nr_ports(self) -> int:
        """Ports the event array covers so far."""
        return len(self._pages) * WORDS_PER_PAGE

    def array_frames(self) -> list[int]:
        return list(self._gfns)

    def has_control_block(self, vcpu: int) -> bool:
        return self._vcpus[vcpu].control_block is not None

    def set_priority(self, port: int, priority: int) -> None:
        """For the port's future events; one already queued stays where it is."""
        if not 0 <= priority <= EVTCHN_FIFO_PRIORITY_MIN:
            raise XenError(EINVAL, f"no priority {priority}")
        if priority == EVTCHN_FIFO_PRIORITY_DEFAULT:
            self._priority.pop(port, None)
        else:
            self._priority[port] = priority

    def priority(self, port: int) -> int:
        return self._priority.get(port, EVTCHN_FIFO_PRIORITY_DEFAULT)

    def carry_over(self, ports: Iterable[int]) -> None:
        """Ports pending under 2-level when the guest switched: raised
        again once the event array covers them (Xen's setup_ports)."""
        self._saved.update(ports)

    # --- snapshots (EventChannels saves this within its own state) -------------------

    def save_state(self) -> dict:
        """What the hypervisor keeps of the queues (the words, READY and
        HEAD are guest RAM): where the control blocks and the array's pages
        are, each queue's tail, the priorities, the queue each port was last
        linked on, and the ports raised while their array page was missing."""
        return {
            "control_blocks": [list(vcpu.control_place) if vcpu.control_place else None for vcpu in self._vcpus],
            "tails": [list(vcpu.tails) for vcpu in self._vcpus],
            "array": list(self._gfns),
            "priority": [[port, priority] for port, priority in sorted(self._priority.items())],
            "last_queue": [[port, vcpu, priority] for port, (vcpu, priority) in sorted(self._last_queue.items())],
            "saved": sorted(self._saved),
        }

    @classmethod
    def restored(cls, state, vcpu_count: int, page_address: Callable[[int], int | None]) -> "FifoQueues":
        """The queues of a saved state, every field checked as the guest's
        hypercalls check them (XenError, which the caller turns into a refusal)."""
        try:
            return cls._restored(state, vcpu_count, page_address)
        except XenError as error:
            raise XenError(EINVAL, f"FIFO queues: {error}") from None

    @classmethod
    def _restored(cls, state, vcpu_count: int, page_address: Callable[[int], int | None]) -> "FifoQueues":
        def fail(why: str):
            raise XenError(EINVAL, why)

        def ints(value, count: int | None, end: int) -> list[int]:
            if not isinstance(value, list) or (count is not None and len(value) != count) or not all(
                    isinstance(v, int) and not isinstance(v, bool) and 0 <= v < end for v in value):
                fail(f"{value!r:.80} is not {count or 'a list of'} numbers below {end}")
            return value

        if not isinstance(state, dict):
            fail("no state")
        queues = cls(vcpu_count, page_address)
        array = ints(state.get("array"), None, 1 << 40)
        if len(array) > MAX_ARRAY_PAGES:
            fail(f"{len(array)} array pages")
        for gfn in array:
            queues.add_array_page(gfn)
        blocks, tails = state.get("control_blocks"), state.get("tails")
        if not isinstance(blocks, list) or len(blocks) != vcpu_count or not isinstance(tails, list) \
                or len(tails) != vcpu_count:
            fail("not one control block and tail list per vCPU")
        for vcpu, (place, vcpu_tails) in enumerate(zip(blocks, tails)):
            if place is not None:
                gfn, offset = ints(place, 2, 1 << 40)
                queues.map_control_block(vcpu, gfn, offset)
            queues._vcpus[vcpu].tails = list(ints(vcpu_tails, EVTCHN_FIFO_MAX_QUEUES, EVTCHN_FIFO_NR_CHANNELS))
        priorities, last_queues = state.get("priority"), state.get("last_queue")
        if not isinstance(priorities, list) or not isinstance(last_queues, list):
            fail("no priorities or last queues")
        for entry in priorities:
            port, priority = ints(entry, 2, EVTCHN_FIFO_NR_CHANNELS)
            queues.set_priority(port, priority)
        for entry in last_queues:
            port, vcpu, priority = ints(entry, 3, EVTCHN_FIFO_NR_CHANNELS)
            if vcpu >= vcpu_count or priority >= EVTCHN_FIFO_MAX_QUEUES:
                fail(f"port {port} was last on vCPU {vcpu}'s queue {priority}")
            queues._last_queue[port] = (vcpu, priority)
        queues._saved = set(ints(state.get("saved"), None, EVTCHN_FIFO_NR_CHANNELS))
        return queues

    # --- the event words -------------------------------------------------------------

    def word_address(self, port: int) -> int | None:
        if not 0 <= port < self.nr_ports:
            return None
        return self._pages[port // WORDS_PER_PAGE] + 4 * (port % WORDS_PER_PAGE)

    def word(self, port: int) -> int | None:
        address = self.word_address(port)
        return None if address is None else atomic.fetch_or(address, 4, 0)

    def is_pending(self, port: int) -> bool:
        word = self.word(port)
        return word is not None and bool(word & _PENDING)

    def is_masked(self, port: int) -> bool:
        word = self.word(port)
        return word is None or bool(word & _MASKED)  # as Xen: no word, no event

    def clear_pending(self, port: int) -> None:
        """A closed port: its next user must not see a stale event. A port
        still linked stays in its queue; the guest skips it as not pending."""
        self._saved.discard(port)
        self._priority.pop(port, None)  # a new binding starts at the default
        # (_last_queue stays: the port may still be its old queue's tail.)
        address = self.word_address(port)
        if address is not None:
            atomic.fetch_and(address, 4, _WORD & ~_PENDING)

    # --- raising ------------------------------------------------------------------------

    def set_pending(self, port: int, vcpu: int) -> tuple[bool, bool]:
        """Raise `port` on `vcpu`'s queue of the port's priority. Returns
        (newly pending, upcall needed): the first wakes pollers, the second
        asks the caller to mark `vcpu`'s events pending and raise its upcall."""
        address = self.word_address(port)
        if address is None:
            self._saved.add(port)  # raised again when its array page comes
            return False, False
        was_pending = bool(atomic.fetch_or(address, 4, _PENDING) & _PENDING)
        state = self._vcpus[vcpu]
        if state.control_block is None:
            # The guest must not unmask an event before the vCPU has its
            # control block: nothing to link to, the event is only pending.
            return not was_pending, False
        if atomic.fetch_or(address, 4, 0) & _MASKED:
            return not was_pending, False
        if atomic.fetch_or(address, 4, _LINKED) & _LINKED:
            return not was_pending, False  # queued already: the guest will get to it
        priority = self.priority(port)
        old_vcpu, old_priority = self._last_queue.get(port, (vcpu, priority))
        old_tails = self._vcpus[old_vcpu].tails
        if old_tails[old_priority] == port:
            old_tails[old_priority] = 0  # its old queue is empty now: never link behind it
        self._last_queue[port] = (vcpu, priority)
        tails = state.tails
        linked = False
        tail = tails[priority]
        if tail:
            tail_address = self.word_address(tail)
            linked = tail_address is not None and self._set_link(tail_address, port)
        if not linked:
            atomic.exchange(state.control_block + CONTROL_HEAD + 4 * priority, 4, port)
        tails[priority] = port
        upcall = False
        if not linked:
            upcall = not atomic.fetch_or(state.control_block + CONTROL_READY, 4, 1 << priority) & (1 << priority)
        return not was_pending, upcall

    @staticmethod
    def _set_link(tail_address: int, port: int) -> bool:
        """Point the tail's LINK at `port` while the tail is still LINKED;
        False when the guest has consumed it already (the queue is empty)."""
        word = atomic.fetch_or(tail_address, 4, 0)
        linked = FifoQueues._try_link(tail_address, word, port)
        if linked is not None:
            return linked
        # The guest changed the word under us: mark it BUSY, which keeps it
        # from clearing MASKED (the only change it may make without
        # consuming the event) until the link is in.
        atomic.fetch_or(tail_address, 4, _BUSY)
        for _ in range(LINK_ATTEMPTS):
            word = atomic.fetch_or(tail_address, 4, 0)
            linked = FifoQueues._try_link(tail_address, word, port)
            if linked is not None:
                if not linked:
                    atomic.fetch_and(tail_address, 4, _WORD & ~_BUSY)
                return linked
        atomic.fetch_and(tail_address, 4, _WORD & ~_BUSY)
        return True  # as Xen: the event stays linked, its link is lost

    @staticmethod
    def _try_link(address: int, word: int, port: int) -> bool | None:
        """True: linked; False: the tail is no longer linked; None: the word changed."""
        if not word & _LINKED:
            return False
        new = (word & ~(_BUSY | EVTCHN_FIFO_LINK_MASK)) | port
        swapped, _ = atomic.compare_exchange(address, 4, word, new)
        return True if swapped else None

    def unmask(self, port: int, vcpu: int) -> tuple[bool, bool]:
        """EVTCHNOP_unmask: clear MASKED and raise the port again if it is
        pending (Linux calls it when it found the port pending)."""
        address = self.word_address(port)
        if address is None:
            return False, False
        atomic.fetch_and(address, 4, _WORD & ~_MASKED)
        if atomic.fetch_or(address, 4, 0) & _PENDING:
            return self.set_pending(port, vcpu)
        return False, False

    def queue_heads(self, vcpu: int) -> tuple[int, list[int]] | None:
        """(READY, HEAD[16]) of a vCPU's control block, for diagnostics."""
        block = self._vcpus[vcpu].control_block
        if block is None:
            return None
        ready = atomic.fetch_or(block + CONTROL_READY, 4, 0)
        return ready, [atomic.fetch_or(block + CONTROL_HEAD + 4 * i, 4, 0) for i in range(EVTCHN_FIFO_MAX_QUEUES)]
