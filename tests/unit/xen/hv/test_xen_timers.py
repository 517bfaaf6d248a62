"""UserTimer: a vCPU's timer on the event loop, re-armed from another thread."""

import threading

from pyvmm.core.eventloop import EventLoop
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
