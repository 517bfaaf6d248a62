"""UserTimer: a vCPU's timer on the event loop, re-armed from another thread."""

import json
import threading

import pytest

from pyvmm.core.eventloop import EventLoop
from pyvmm.core.snapshot import SnapshotError
from pyvmm.xen.hv.timers import UserTimer


def test_re_arms_from_a_vcpu_thread_while_the_loop_runs():
    loop = EventLoop()
    fired = []
    done = threading.Event()
    timer = UserTimer(loop, lambda: (fired.append(1), done.set()))
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        for _ in range(20_000):
            timer.arm(1e6)  # far away: never fires
            assert len(loop._calls) <= 1
        timer.arm(0)  # the last wish wins
        assert done.wait(10)
        checked = threading.Event()
        counts = []
        loop.call_soon_threadsafe(lambda: (counts.append(loop.timer_count - loop._cancelled), checked.set()))
        assert checked.wait(10)
        assert fired == [1] and counts == [0] and not timer.armed
    finally:
        loop.stop()
        thread.join(10)
        loop.close()


def test_stop_before_the_loop_got_the_arm():
    loop = EventLoop()
    fired = []
    timer = UserTimer(loop, lambda: fired.append(1))
    try:
        timer.arm(0)
        timer.stop()
        assert len(loop._calls) == 1
        loop.call_soon_threadsafe(loop.stop)
        loop.run()
        assert fired == [] and loop.timer_count == 0
        timer.stop()  # nothing armed: nothing handed over
        assert len(loop._calls) == 0
    finally:
        loop.close()


def test_state_saved_and_restored_as_time_left():
    loop = EventLoop()
    try:
        timer = UserTimer(loop, lambda: None)
        assert timer.save_state() == {"version": 1, "armed": False}
        timer.arm(30.0, period=0.01)
        state = timer.save_state()
        assert json.loads(json.dumps(state)) == state  # JSON as it is
        assert state["armed"] and 29.0 < state["remaining"] <= 30.0 and state["period"] == 0.01
        fresh = UserTimer(loop, lambda: None)
        fresh.restore_state(state)
        again = fresh.save_state()
        assert fresh.armed and again["period"] == 0.01 and again["remaining"] <= state["remaining"]
        fresh.restore_state({"version": 1, "armed": False})
        assert not fresh.armed
    finally:
        loop.close()


@pytest.mark.parametrize("state", [{}, {"version": 2, "armed": False}, {"version": True, "armed": False},
                                   {"version": 1, "armed": True, "remaining": -1, "period": None},
                                   {"version": 1, "armed": True, "remaining": 1.0, "period": 0},
                                   {"version": 1, "armed": True, "remaining": 1.0, "period": 1e-9},
                                   {"version": 1, "armed": True, "remaining": float("inf"), "period": None},
                                   {"version": 1, "armed": True, "remaining": float("nan"), "period": None},
                                   {"version": 1, "armed": True, "remaining": "1", "period": None}])
def test_bad_states_are_refused(state):
    loop = EventLoop()
    try:
        timer = UserTimer(loop, lambda: None)
        with pytest.raises(SnapshotError):
            timer.restore_state(state)
        assert not timer.armed
    finally:
        loop.close()
