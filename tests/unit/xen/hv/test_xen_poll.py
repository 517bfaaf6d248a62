"""Pollers: which vCPUs halted in SCHEDOP_poll/SCHEDOP_block pyvmm must wake, and when."""

import threading

import pytest

from pyvmm.xen.hv.poll import ANY_PORT, Pollers


class FakeTimer:
    def __init__(self):
        self.armed = None

    def arm(self, delay, period=None):
        self.armed = delay

    def stop(self):
        self.armed = None


@pytest.fixture
def pollers():
    woken = []
    timers = [FakeTimer(), FakeTimer(), FakeTimer()]
    p = Pollers(3, woken.append, timers)
    p.woken, p.timers = woken, timers
    return p


def test_a_pending_port_wakes_every_vcpu_polling_it_and_no_other(pollers):
    pollers.start(0, [3, 5], None)
    pollers.start(1, [5], None)
    pollers.start(2, [7], None)
    pollers.port_pending(5)
    assert sorted(pollers.woken) == [0, 1]
    assert not pollers.waiting(0) and not pollers.waiting(1) and pollers.waiting(2)
    pollers.port_pending(5)  # woken once only
    assert sorted(pollers.woken) == [0, 1]


def test_block_waits_for_an_event_for_its_vcpu_not_for_ports(pollers):
    pollers.start(1, ANY_PORT, None)
    pollers.port_pending(4)
    assert pollers.woken == [] and pollers.waiting(1)
    pollers.vcpu_event(0)
    assert pollers.woken == []
    pollers.vcpu_event(1)
    assert pollers.woken == [1] and not pollers.waiting(1)


def test_an_event_for_a_polling_vcpu_wakes_it_whatever_it_polls(pollers):
    # Xen's vcpu_kick unblocks a poller too: spurious, and allowed.
    pollers.start(0, [9], None)
    pollers.vcpu_event(0)
    assert pollers.woken == [0]


def test_the_timeout_wakes_and_is_stopped_by_an_earlier_wake(pollers):
    pollers.start(0, [1], 0.25)
    assert pollers.timers[0].armed == 0.25
    pollers.expired(0)
    assert pollers.woken == [0] and not pollers.waiting(0)
    pollers.start(0, [1], 0.5)
    pollers.port_pending(1)
    assert pollers.timers[0].armed is None  # stopped with the wake
    pollers.expired(0)  # a timer that fired anyway, too late
    assert pollers.woken == [0, 0]


def test_a_stale_timeout_does_not_end_a_later_untimed_poll(pollers):
    pollers.start(2, [1], 1.0)
    pollers.start(2, [1], None)  # a new poll replaces the old, and stops its timer
    assert pollers.timers[2].armed is None
    pollers.expired(2)
    assert pollers.woken == [] and pollers.waiting(2)


def test_a_past_timeout_is_armed_at_zero(pollers):
    pollers.start(0, [], -3.0)
    assert pollers.timers[0].armed == 0.0


def test_cancel_forgets_the_wait_and_its_timer(pollers):
    pollers.start(1, [2], 5.0)
    pollers.cancel(1)
    assert not pollers.waiting(1) and pollers.timers[1].armed is None
    pollers.port_pending(2)
    assert pollers.woken == []


def test_wake_all(pollers):
    pollers.start(0, [1], None)
    pollers.start(2, ANY_PORT, 1.0)
    pollers.wake_all()
    assert sorted(pollers.woken) == [0, 2] and not any(pollers.waiting(i) for i in range(3))


def test_one_wait_per_vcpu_however_often_it_polls(pollers):
    for i in range(10_000):
        pollers.start(0, range(i % 128), 1.0)
    assert len(pollers._waits) == 3


def test_wakes_run_outside_the_lock(pollers):
    # wake() posts to a vCPU thread; it may itself deliver events.
    seen = []
    pollers._wake = lambda vcpu: seen.append(pollers._lock.acquire(blocking=False)) or pollers._lock.release()
    pollers.start(0, [1], None)
    pollers.port_pending(1)
    assert seen == [True]


def test_concurrent_deliveries_wake_once():
    woken = []
    lock = threading.Lock()

    def wake(vcpu):
        with lock:
            woken.append(vcpu)

    pollers = Pollers(1, wake, [FakeTimer()])
    for _ in range(200):
        pollers.start(0, [1], None)
        threads = [threading.Thread(target=pollers.port_pending, args=(1,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert woken == [0] * 200
