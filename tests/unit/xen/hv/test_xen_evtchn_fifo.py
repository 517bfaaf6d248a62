"""FIFO event channels: the queues (FifoQueues) against a fake guest that
keeps its event array and control blocks in host pages and consumes
events as Linux's events_fifo.c does, and EventChannels switched to FIFO."""

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from frontends.common import PAGE, HostPages
from frontends.evtchn import FakeKernel, Rig
from pyvmm.core.snapshot import SnapshotError
from pyvmm.xen.abi import DOMID_SELF, VIRQ_TIMER
from pyvmm.xen.errors import EINVAL, ENOENT, ENOSPC, ENOSYS, EOPNOTSUPP, XenError
from pyvmm.xen.hv.evtchn_fifo import (
    EVTCHN_FIFO_BUSY,
    EVTCHN_FIFO_LINK_MASK,
    EVTCHN_FIFO_LINKED,
    EVTCHN_FIFO_MASKED,
    EVTCHN_FIFO_PENDING,
    MAX_ARRAY_PAGES,
    WORDS_PER_PAGE,
    FifoQueues,
)

PENDING, MASKED, LINKED, BUSY = (1 << b for b in (EVTCHN_FIFO_PENDING, EVTCHN_FIFO_MASKED, EVTCHN_FIFO_LINKED,
                                                  EVTCHN_FIFO_BUSY))
ARRAY_GFN = 0x100  # the fake guest's first event array page; control blocks from CONTROL_GFN
CONTROL_GFN = 0x200


class FifoGuest:
    """The guest's pages: frame numbers to host pages, made on first use."""

    def __init__(self, pages=16):
        self.pages = HostPages(pages)
        self.count = pages
        self.frames = {}  # gfn -> page index
        self.refused = set()

    def page_address(self, gfn):
        if gfn in self.refused:
            return None
        index = self.frames.setdefault(gfn, len(self.frames))
        assert index < self.count, "the fake guest has no more pages"
        return self.pages.address + index * PAGE

    def _offset(self, gfn):
        return self.frames[gfn] * PAGE

    def word(self, port):
        return struct.unpack_from("<I", self.pages.map, self._offset(ARRAY_GFN + port // WORDS_PER_PAGE)
                                  + 4 * (port % WORDS_PER_PAGE))[0]

    def set_word(self, port, value):
        struct.pack_into("<I", self.pages.map, self._offset(ARRAY_GFN + port // WORDS_PER_PAGE)
                         + 4 * (port % WORDS_PER_PAGE), value)

    def control(self, vcpu, offset=0):
        ready, _, *heads = struct.unpack_from("<18I", self.pages.map, self._offset(CONTROL_GFN + vcpu) + offset)
        return ready, heads

    def consume(self, vcpu, offset=0):
        """Linux's upcall: every event of every ready queue, highest priority
        first, each unlinked as it is taken. Returns the ports handled."""
        base = self._offset(CONTROL_GFN + vcpu) + offset
        handled = []
        local_heads = [0] * 16
        ready = struct.unpack_from("<I", self.pages.map, base)[0]
        struct.pack_into("<I", self.pages.map, base, 0)
        while ready:
            priority = (ready & -ready).bit_length() - 1
            head = local_heads[priority] or struct.unpack_from("<I", self.pages.map, base + 8 + 4 * priority)[0]
            word = self.word(head)
            self.set_word(head, word & ~(LINKED | EVTCHN_FIFO_LINK_MASK))
            link = word & EVTCHN_FIFO_LINK_MASK
            if not link:
                ready &= ~(1 << priority)
            if word & PENDING and not word & MASKED:
                handled.append(head)
                self.set_word(head, self.word(head) & ~PENDING)  # the handler acknowledges it
            local_heads[priority] = link
            ready |= struct.unpack_from("<I", self.pages.map, base)[0]
            struct.pack_into("<I", self.pages.map, base, 0)
        return handled


@pytest.fixture
def guest():
    return FifoGuest()


def fifo_for(guest, vcpus=2, pages=1):
    fifo = FifoQueues(vcpus, guest.page_address)
    for vcpu in range(vcpus):
        fifo.map_control_block(vcpu, CONTROL_GFN + vcpu, 0)
    for page in range(pages):
        assert fifo.add_array_page(ARRAY_GFN + page) == []
    return fifo


def raises(errno, call, *args):
    with pytest.raises(XenError) as info:
        call(*args)
    assert info.value.errno == errno, info.value


# --- the queues ---------------------------------------------------------------------


def test_first_event_becomes_head_and_raises_the_upcall(guest):
    fifo = fifo_for(guest)
    assert fifo.set_pending(5, 0) == (True, True)
    assert guest.word(5) == PENDING | LINKED
    ready, heads = guest.control(0)
    assert ready == 1 << 7 and heads[7] == 5  # the default priority
    assert guest.control(1)[0] == 0


def test_later_events_link_behind_the_tail_without_another_upcall(guest):
    fifo = fifo_for(guest)
    fifo.set_pending(5, 0)
    assert fifo.set_pending(9, 0) == (True, False)
    assert fifo.set_pending(3, 0) == (True, False)
    assert guest.word(5) & EVTCHN_FIFO_LINK_MASK == 9
    assert guest.word(9) & EVTCHN_FIFO_LINK_MASK == 3
    assert guest.consume(0) == [5, 9, 3]
    assert guest.control(0)[0] == 0


def test_raising_a_pending_or_linked_port_again_adds_nothing(guest):
    fifo = fifo_for(guest)
    fifo.set_pending(5, 0)
    assert fifo.set_pending(5, 0) == (False, False)
    assert guest.word(5) & EVTCHN_FIFO_LINK_MASK == 0  # not linked to itself
    assert guest.consume(0) == [5]


def test_queue_emptied_by_the_guest_starts_again_at_head(guest):
    fifo = fifo_for(guest)
    fifo.set_pending(5, 0)
    assert guest.consume(0) == [5]
    # The tail (5) is no longer LINKED: 6 becomes the head, with a new upcall.
    assert fifo.set_pending(6, 0) == (True, True)
    assert guest.control(0)[1][7] == 6
    assert guest.word(5) & EVTCHN_FIFO_LINK_MASK == 0
    assert guest.consume(0) == [6]


def test_masked_port_is_pending_but_not_queued_until_unmasked(guest):
    fifo = fifo_for(guest)
    guest.set_word(4, MASKED)
    assert fifo.set_pending(4, 1) == (True, False)
    assert guest.word(4) == PENDING | MASKED
    assert fifo.is_pending(4) and fifo.is_masked(4)
    assert fifo.unmask(4, 1) == (False, True)  # not newly pending; queued now
    assert guest.word(4) == PENDING | LINKED
    assert guest.consume(1) == [4]
    assert fifo.unmask(4, 1) == (False, False)  # nothing pending: only the mask goes


def test_priorities_are_separate_queues_taken_most_urgent_first(guest):
    fifo = fifo_for(guest)
    fifo.set_priority(8, 2)
    fifo.set_pending(5, 0)
    assert fifo.set_pending(8, 0) == (True, True)  # a new queue's first event
    ready, heads = guest.control(0)
    assert ready == (1 << 7) | (1 << 2) and heads[2] == 8 and heads[7] == 5
    assert guest.consume(0) == [8, 5]
    raises(EINVAL, fifo.set_priority, 8, 16)
    fifo.set_priority(8, 15)
    assert fifo.priority(8) == 15


def test_port_moved_to_another_vcpu_never_links_its_old_queue_to_the_new(guest):
    fifo = fifo_for(guest)
    fifo.set_pending(5, 0)
    assert guest.consume(0) == [5]
    fifo.set_pending(5, 1)  # rebound to vCPU 1 (EVTCHNOP_bind_vcpu)
    assert guest.control(1)[1][7] == 5
    # vCPU 0's queue had 5 as its tail: the next event there is a new head,
    # not a link from 5 (which now sits on vCPU 1's queue).
    assert fifo.set_pending(6, 0) == (True, True)
    assert guest.control(0)[1][7] == 6
    assert guest.word(5) & EVTCHN_FIFO_LINK_MASK == 0
    assert guest.consume(1) == [5] and guest.consume(0) == [6]


def test_busy_tail_the_guest_keeps_changing_stays_linked(guest, monkeypatch):
    fifo = fifo_for(guest)
    fifo.set_pending(5, 0)
    from pyvmm.core import atomic
    real = atomic.compare_exchange
    attempts = []

    def guest_flips_mask(address, size, expected, desired):
        attempts.append(desired)
        atomic.fetch_or(address, 4, 0)
        guest.set_word(5, guest.word(5) ^ MASKED)  # the guest changes the word every time
        return real(address, size, expected, desired)

    monkeypatch.setattr(atomic, "compare_exchange", guest_flips_mask)
    assert fifo.set_pending(9, 0) == (True, False)
    assert len(attempts) == 5  # one try, then four with the tail BUSY, as Xen
    assert not guest.word(5) & BUSY  # given back


def test_link_succeeds_after_a_guest_change(guest, monkeypatch):
    fifo = fifo_for(guest)
    fifo.set_pending(5, 0)
    from pyvmm.core import atomic
    real = atomic.compare_exchange
    calls = []

    def once(address, size, expected, desired):
        calls.append(desired)
        if len(calls) == 1:
            guest.set_word(5, guest.word(5) | MASKED)
        return real(address, size, expected, desired)

    monkeypatch.setattr(atomic, "compare_exchange", once)
    assert fifo.set_pending(9, 0) == (True, False)
    assert guest.word(5) == PENDING | LINKED | MASKED | 9  # BUSY cleared by the link itself
    assert len(calls) == 2


def test_events_without_their_array_page_wait_for_it(guest):
    fifo = fifo_for(guest, pages=1)
    assert fifo.set_pending(1500, 0) == (False, False)
    assert not fifo.is_pending(1500) and fifo.is_masked(1500)
    assert fifo.add_array_page(ARRAY_GFN + 1) == [1500]
    assert fifo.add_array_page(ARRAY_GFN + 2) == []  # given once
    fifo.carry_over([3, 4000])
    assert fifo.add_array_page(ARRAY_GFN + 3) == [4000]


def test_vcpu_without_control_block_keeps_the_event_pending_only(guest):
    fifo = FifoQueues(2, guest.page_address)
    fifo.map_control_block(0, CONTROL_GFN, 0)
    fifo.add_array_page(ARRAY_GFN)
    assert fifo.set_pending(5, 1) == (True, False)
    assert guest.word(5) == PENDING


def test_closed_port_loses_its_pending_bit_and_priority(guest):
    fifo = fifo_for(guest)
    fifo.set_priority(5, 1)
    guest.set_word(5, MASKED)
    fifo.set_pending(5, 0)
    fifo.clear_pending(5)
    assert guest.word(5) == MASKED and fifo.priority(5) == 7


# --- what the guest hands in --------------------------------------------------------


@pytest.mark.parametrize("vcpu,offset,errno", [
    (2, 0, ENOENT), (-1, 0, ENOENT), (0, 4096 - 72 + 8, EINVAL), (0, 4, EINVAL), (0, 1 << 31, EINVAL),
])
def test_control_block_arguments(guest, vcpu, offset, errno):
    raises(errno, FifoQueues(2, guest.page_address).map_control_block, vcpu, CONTROL_GFN, offset)


def test_control_block_at_the_end_of_its_page(guest):
    fifo = FifoQueues(1, guest.page_address)
    fifo.map_control_block(0, CONTROL_GFN, 4096 - 72)
    fifo.add_array_page(ARRAY_GFN)
    fifo.set_pending(2, 0)
    assert guest.control(0, 4096 - 72)[1][7] == 2
    raises(EINVAL, fifo.map_control_block, 0, CONTROL_GFN + 1, 0)  # once per vCPU


def test_frames_that_are_not_the_guests_ram(guest):
    guest.refused.add(0x999)
    fifo = FifoQueues(1, guest.page_address)
    raises(EINVAL, fifo.map_control_block, 0, 0x999, 0)
    fifo.map_control_block(0, CONTROL_GFN, 0)
    raises(EINVAL, fifo.add_array_page, 0x999)
    assert fifo.nr_ports == 0


def test_the_array_is_bounded(guest):
    fifo = FifoQueues(1, lambda gfn: guest.pages.address)  # every page the same: enough here
    for _ in range(MAX_ARRAY_PAGES):
        fifo.add_array_page(ARRAY_GFN)
    raises(ENOSPC, fifo.add_array_page, ARRAY_GFN)
    assert fifo.nr_ports == 1 << 17


# --- EventChannels under FIFO ---------------------------------------------------------


class FifoRig(Rig):
    def __init__(self, fifo_guest, **kwargs):
        self.abi_changes = []
        self.polled = []
        super().__init__(fifo=True, page_address=fifo_guest.page_address, on_abi_change=self.abi_changes.append,
                         on_pending=self.polled.append, **kwargs)

    def switch(self, vcpus=4, pages=1):
        for vcpu in range(vcpus):
            assert self.ev.init_control(vcpu, CONTROL_GFN + vcpu, 0) == 17
        for page in range(pages):
            self.ev.expand_array(ARRAY_GFN + page)


def test_not_offered_answers_enosys_after_the_checks(guest):
    ev = Rig().ev
    raises(ENOENT, ev.init_control, 9, CONTROL_GFN, 0)
    raises(EINVAL, ev.init_control, 0, CONTROL_GFN, 3)
    raises(ENOSYS, ev.init_control, 0, CONTROL_GFN, 0)
    raises(EOPNOTSUPP, ev.expand_array, ARRAY_GFN)
    raises(ENOSYS, ev.set_priority, 1, 3)
    raises(EINVAL, ev.set_priority, 5000, 3)


def test_switch_keeps_pending_events_and_delivers_through_queues(guest):
    rig = FifoRig(guest, kernel=FakeKernel())
    ev = rig.ev
    ipi = ev.bind_ipi(1)
    timer = ev.bind_virq(VIRQ_TIMER, 0)
    rig.guest.set_pending(timer)  # raised under 2-level, not yet seen
    raises(EOPNOTSUPP, ev.expand_array, ARRAY_GFN)
    rig.switch()
    assert rig.abi_changes == [True]
    assert ("deassign", ipi) in rig.kernel.calls  # KVM would raise it in 2-level bits
    assert ev.fifo_active and guest.consume(0) == [timer]  # carried over once the array came
    sends = len(rig.kernel.named("send"))
    ev.send(ipi)
    assert len(rig.kernel.named("send")) == sends  # never KVM_XEN_HVM_EVTCHN_SEND under FIFO
    assert guest.consume(1) == [ipi]
    assert rig.upcalls.count(1) == 1 and ipi in rig.polled
    new = ev.bind_ipi(0)
    assert ("assign_ipi", new, 0) not in rig.kernel.calls


def test_ports_beyond_two_level_and_the_limit(guest):
    rig = FifoRig(guest)
    rig.ev.max_port = 5000
    rig.switch(pages=5)
    ports = [rig.ev.alloc_unbound(DOMID_SELF, 0) for _ in range(5000)]
    assert ports[-1] == 5000
    raises(ENOSPC, rig.ev.alloc_unbound, DOMID_SELF, 0)
    rig.ev.close(4500)
    b = rig.ev.bind_ipi(2)
    assert b == 4500
    rig.ev.send(b)
    assert guest.consume(2) == [4500]


def test_unmask_and_close_under_fifo(guest):
    rig = FifoRig(guest)
    rig.switch()
    port = rig.ev.bind_ipi(0)
    guest.set_word(port, MASKED)
    rig.ev.send(port)
    assert rig.ev.is_pending(port) and guest.consume(0) == []
    rig.ev.unmask(port)
    assert guest.consume(0) == [port]
    guest.set_word(port, MASKED)
    rig.ev.send(port)
    rig.ev.close(port)
    assert guest.word(port) == MASKED
    entry_ports = [entry["port"] for entry in rig.ev.snapshot()]
    assert port not in entry_ports


def test_reset_goes_back_to_two_level(guest):
    rig = FifoRig(guest)
    rig.switch()
    rig.ev.bind_ipi(0)
    rig.ev.reset(DOMID_SELF)
    assert not rig.ev.fifo_active and rig.abi_changes == [True, False]
    port = rig.ev.bind_ipi(0)
    rig.ev.send(port)
    assert rig.guest.pending(port)  # the shared_info bit again
    rig.ev.init_control(0, CONTROL_GFN + 7, 0)  # and FIFO may be taken again
    assert rig.ev.fifo_active


def test_failed_first_init_control_stays_two_level(guest):
    guest.refused.add(0x999)
    rig = FifoRig(guest)
    raises(EINVAL, rig.ev.init_control, 0, 0x999, 0)
    assert not rig.ev.fifo_active and rig.abi_changes == []


def test_snapshot_shows_fifo_state(guest):
    rig = FifoRig(guest)
    rig.switch()
    port = rig.ev.bind_ipi(1)
    rig.ev.set_priority(port, 3)
    rig.ev.send(port)
    entry = next(entry for entry in rig.ev.snapshot() if entry["port"] == port)
    assert entry["pending"] is True and entry["masked"] is False and entry["priority"] == 3


# --- raising and consuming in any order ---------------------------------------------------

PORTS = range(1, 41)


@settings(max_examples=200, deadline=None)
@given(priorities=st.lists(st.integers(0, 15), min_size=len(PORTS), max_size=len(PORTS)),
       ops=st.lists(st.one_of(st.tuples(st.just("raise"), st.sampled_from(PORTS)),
                              st.tuples(st.just("consume"), st.integers(0, 1)),
                              st.tuples(st.just("move"), st.sampled_from(PORTS)),
                              st.tuples(st.just("save"), st.just(0))), max_size=120))
def test_every_raised_event_is_consumed_once_on_its_vcpu(priorities, ops):
    guest = FifoGuest()
    fifo = fifo_for(guest)
    vcpu_of = {port: port % 2 for port in PORTS}
    for port, priority in zip(PORTS, priorities):
        fifo.set_priority(port, priority)
    outstanding: dict[int, int] = {}  # port -> the vCPU it was queued on
    for op, arg in ops:
        if op == "raise":
            outstanding.setdefault(arg, vcpu_of[arg])
            fifo.set_pending(arg, vcpu_of[arg])
        elif op == "move":
            vcpu_of[arg] ^= 1  # EVTCHNOP_bind_vcpu: later events go to the other vCPU
        elif op == "save":  # a snapshot and its restore: the queues go on on the same RAM
            fifo = FifoQueues.restored(through_json(fifo.save_state()), 2, guest.page_address)
        else:
            handled = guest.consume(arg)
            assert len(handled) == len(set(handled))
            assert set(handled) == {port for port, vcpu in outstanding.items() if vcpu == arg}
            for port in handled:
                del outstanding[port]
    for vcpu in (0, 1):
        handled = guest.consume(vcpu)
        assert set(handled) == {port for port, v in outstanding.items() if v == vcpu}


def through_json(state):
    return json.loads(json.dumps(state))


def test_a_fifo_table_saved_with_events_queued_goes_on_after_a_restore(guest):
    """Guest RAM (the words, READY, HEAD) is the machine's to save; the
    queues' tails, priorities and places are the table's: restored into a
    fresh part on the same RAM, a new event links behind the saved tail."""
    rig = FifoRig(guest, kernel=FakeKernel())
    rig.switch(vcpus=2)
    first, second, urgent = rig.ev.bind_ipi(0), rig.ev.bind_ipi(0), rig.ev.bind_ipi(1)
    rig.ev.set_priority(urgent, 2)
    rig.ev.send(first)
    state = through_json(rig.ev.save_state())
    assert state["fifo"]["array"] == [ARRAY_GFN] and state["fifo"]["priority"] == [[urgent, 2]]
    new = FifoRig(guest, kernel=FakeKernel())
    new.ev.restore_state(state)
    new.ev.finish_restore()
    assert new.ev.fifo_active and not new.kernel.named("assign_ipi")  # KVM raises 2-level only
    new.ev.send(second)
    new.ev.send(urgent)
    assert guest.consume(0) == [first, second]  # linked behind the saved tail, in order
    assert guest.consume(1) == [urgent] and guest.control(1)[1][2] == urgent
    assert new.ev.snapshot() == rig.ev.snapshot()


def test_a_fifo_table_is_refused_where_fifo_is_not_offered(guest):
    rig = FifoRig(guest)
    rig.switch()
    state = through_json(rig.ev.save_state())
    with pytest.raises(SnapshotError, match="--xen-fifo"):
        Rig().ev.restore_state(state)


@pytest.mark.parametrize("change", [
    lambda f: f.update(array=[ARRAY_GFN] * (MAX_ARRAY_PAGES + 1)),
    lambda f: f.update(array=[0x999]),  # not a page the guest may hand over
    lambda f: f.update(control_blocks=[[CONTROL_GFN, 3]] + f["control_blocks"][1:]),  # unaligned
    lambda f: f.update(control_blocks=f["control_blocks"][:1]),
    lambda f: f.update(tails=[[0] * 15] * 4),
    lambda f: f.update(priority=[[5, 16]]),
    lambda f: f.update(last_queue=[[5, 9, 0]]),  # no vCPU 9
    lambda f: f.update(saved=[1 << 17]),
    lambda f: f.pop("saved"),
])
def test_a_damaged_fifo_state_is_refused(guest, change):
    guest.refused.add(0x999)
    rig = FifoRig(guest)
    rig.switch()
    state = through_json(rig.ev.save_state())
    change(state["fifo"])
    with pytest.raises(SnapshotError, match="FIFO queues"):
        FifoRig(guest).ev.restore_state(state)
