"""The domain watchdogs (SCHEDOP_watchdog): Xen's answers, and their timers
on the event loop, which follow the guest's clock and so stand still while
the VM is paused."""

import heapq
import threading

import pytest

from pyvmm.core.eventloop import EventLoop
from pyvmm.xen.errors import EINVAL, ENOSPC, XenError
from pyvmm.xen.hv.watchdog import NR_DOMAIN_WATCHDOG_TIMERS, Expiry, Watchdogs, WatchdogTimers

S = 1_000_000_000  # ns


def errno_of(call) -> int:
    with pytest.raises(XenError) as error:
        call()
    return error.value.errno


# --- Xen's answers (xen/common/sched/core.c, domain_watchdog) ------------------------------


def test_id_0_takes_the_free_watchdogs_in_turn_until_none_is_left():
    dogs = Watchdogs()
    assert NR_DOMAIN_WATCHDOG_TIMERS == 2
    assert dogs.op(0, 10, now_ns=0) == 1
    assert dogs.op(0, 20, now_ns=0) == 2
    assert errno_of(lambda: dogs.op(0, 10, now_ns=0)) == ENOSPC
    assert dogs.in_use() == {1: 10 * S, 2: 20 * S}


@pytest.mark.parametrize("wid", [3, 0xFFFF_FFFF])
def test_an_id_beyond_the_watchdogs_is_einval(wid):
    # Linux's xen_wdt probes with id ~0 and wants exactly -EINVAL.
    assert errno_of(lambda: Watchdogs().op(wid, 0, now_ns=0)) == EINVAL


@pytest.mark.parametrize("timeout", [0, 5])
def test_an_id_not_in_use_is_einval(timeout):
    dogs = Watchdogs()
    assert dogs.op(0, 5, now_ns=0) == 1
    assert errno_of(lambda: dogs.op(2, timeout, now_ns=0)) == EINVAL


def test_petting_moves_the_deadline_and_timeout_0_frees_the_watchdog():
    dogs = Watchdogs()
    assert dogs.op(0, 5, now_ns=100) == 1
    assert dogs.op(1, 7, now_ns=3 * S) == 0
    assert dogs.in_use() == {1: 10 * S}
    assert dogs.op(1, 0, now_ns=4 * S) == 0
    assert dogs.in_use() == {} and dogs.next_deadline() is None
    assert errno_of(lambda: dogs.op(1, 5, now_ns=4 * S)) == EINVAL  # freed: not in use any more
    assert dogs.op(0, 5, now_ns=4 * S) == 1  # and free to take again


def test_the_first_deadline_is_what_expires():
    dogs = Watchdogs()
    dogs.op(0, 30, now_ns=0)
    dogs.op(0, 10, now_ns=0)
    assert dogs.next_deadline() == 10 * S
    assert dogs.expired(10 * S - 1) is None
    assert dogs.expired(10 * S) == Expiry(2, 10)
    assert dogs.expired(40 * S) == Expiry(2, 10)  # both due: the earlier one


def test_id_0_with_timeout_0_expires_at_once_as_on_xen():
    dogs = Watchdogs()
    assert dogs.op(0, 0, now_ns=5) == 1
    assert dogs.expired(5) == Expiry(1, 0)


# --- on the event loop --------------------------------------------------------------------


class Rig:
    def __init__(self):
        self.loop = EventLoop()
        self.now = 1000 * S  # the guest's clock
        self.paused = False
        self.fired = []
        self.timers = WatchdogTimers(self.loop, clock=lambda: self.now, paused=lambda: self.paused,
                                     expire=self.fired.append, paused_recheck=0.5)

    def run_handed_over(self):
        """Run what other threads handed to the event thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.loop.run()
        self.loop._stopped.clear()

    def live_timers(self):
        return sorted(handle.when for _, _, handle in self.loop._timers if not handle.cancelled)

    def fire_next(self):
        """The earliest loop timer, as the loop runs it once due."""
        while True:
            _, _, handle = heapq.heappop(self.loop._timers)
            handle._queued = False
            if not handle.cancelled:
                handle.callback()
                return


@pytest.fixture
def rig():
    rig = Rig()
    yield rig
    rig.loop.close()


def test_a_watchdog_not_petted_in_time_fires_once(rig):
    assert rig.timers.op(0, 5) == 1
    rig.run_handed_over()
    assert len(rig.live_timers()) == 1
    rig.now += 5 * S
    rig.fire_next()
    assert rig.fired == [Expiry(1, 5)] and rig.timers.fired == Expiry(1, 5)
    assert rig.live_timers() == []
    rig.timers.op(1, 5)  # the domain is shutting down: nothing fires again
    rig.run_handed_over()
    assert rig.fired == [Expiry(1, 5)] and rig.live_timers() == []


def test_a_petted_watchdog_does_not_fire(rig):
    rig.timers.op(0, 5)
    rig.run_handed_over()
    for _ in range(3):
        rig.now += 4 * S
        rig.timers.op(1, 5)
        rig.run_handed_over()
    rig.now += 4 * S  # 4 s after the last pet
    rig.fire_next()  # the loop timer was armed for 5 s: the check finds time left and waits for it
    assert rig.fired == [] and len(rig.live_timers()) == 1
    rig.now += 1 * S
    rig.fire_next()
    assert rig.fired == [Expiry(1, 5)]


def test_a_paused_vms_watchdog_never_fires_and_keeps_its_time_left(rig):
    rig.timers.op(0, 5)
    rig.run_handed_over()
    rig.now += 3 * S
    rig.paused = True  # the guest's clock stands still from here (KVM's clock is frozen)
    for _ in range(20):  # ten seconds of the host's time
        rig.fire_next()
        assert rig.fired == [] and len(rig.live_timers()) == 1
    rig.paused = False  # resumed: 2 s of the guest's time are left
    rig.fire_next()
    assert rig.fired == []
    rig.now += 2 * S
    rig.fire_next()
    assert rig.fired == [Expiry(1, 5)]


def test_no_loop_entry_without_a_watchdog(rig):
    rig.timers.op(0, 5)
    rig.timers.op(1, 0)
    rig.run_handed_over()
    assert rig.live_timers() == []
    rig.paused = True
    rig.timers.op(0, 5)
    rig.timers.op(1, 0)
    rig.run_handed_over()
    assert rig.live_timers() == []  # a paused VM without watchdogs is not polled


def test_petting_from_a_vcpu_thread_costs_one_loop_entry_and_one_handover(rig):
    # However often the guest pets, the event loop holds one timer and at
    # most one call handed over.
    rig.timers.op(0, 5)
    rig.timers.op(0, 9)

    def vcpu():
        for _ in range(10_000):
            rig.timers.op(1, 5)
            rig.timers.op(2, 9)

    thread = threading.Thread(target=vcpu)
    thread.start()
    thread.join()
    assert len(rig.loop._calls) == 1
    rig.run_handed_over()
    assert len(rig.live_timers()) == 1
    assert rig.loop.timer_count <= 1 + 64  # cancelled entries are compacted away


def test_the_earliest_of_two_watchdogs_arms_the_timer(rig):
    rig.timers.op(0, 30)
    rig.timers.op(0, 10)
    rig.run_handed_over()
    (when,) = rig.live_timers()
    rig.now += 10 * S
    rig.fire_next()
    assert rig.fired == [Expiry(2, 10)]


# --- snapshot: time left on the guest's clock ------------------------------------------------


def test_save_gives_each_watchdogs_timeout_and_time_left():
    dogs = Watchdogs()
    dogs.op(0, 30, now_ns=0)
    dogs.op(0, 10, now_ns=0)
    dogs.op(1, 0, now_ns=S)  # freed
    assert dogs.save(now_ns=4 * S) == [None, [10, 6 * S]]
    assert dogs.save(now_ns=12 * S) == [None, [10, 0]]  # overdue, not yet fired: fires at once when restored


def test_a_restored_watchdog_keeps_its_id_and_time_left(rig):
    rig.timers.op(0, 30)
    rig.timers.op(0, 10)
    state = rig.timers.save_state(rig.now + 4 * S)
    other = Rig()
    other.now = 77 * S
    try:
        other.timers.restore_state(state)
        assert other.timers.in_use() == {} and len(other.loop._calls) == 0  # armed by finish_restore() only
        other.timers.finish_restore()
        assert other.timers.in_use() == {1: 103 * S, 2: 83 * S}
        other.run_handed_over()
        assert len(other.live_timers()) == 1
        assert other.timers.op(2, 10) == 0  # the guest pets it by the id it had
        assert errno_of(lambda: other.timers.op(0, 5)) == ENOSPC  # both still in use
    finally:
        other.loop.close()


def test_a_restored_watchdog_not_petted_fires(rig):
    rig.timers.op(0, 10)
    state = rig.timers.save_state(rig.now + 7 * S)
    other = Rig()
    try:
        other.timers.restore_state(state)
        other.timers.finish_restore()
        other.run_handed_over()
        other.now += 3 * S
        other.fire_next()
        assert other.fired == [Expiry(1, 10)]
    finally:
        other.loop.close()


def test_restoring_no_watchdog_arms_nothing(rig):
    other = Rig()
    try:
        other.timers.restore_state(rig.timers.save_state(rig.now))
        other.timers.finish_restore()
        other.run_handed_over()
        assert other.timers.in_use() == {} and other.live_timers() == []
    finally:
        other.loop.close()
