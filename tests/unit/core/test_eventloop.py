"""The event loop's ownership rules and its handling of failing callbacks."""

from __future__ import annotations

import os
import threading

import pytest

from pyvmm.core.eventloop import COMPACT_MIN, EventLoop, WrongThread


def run_in_thread(function):
    outcome = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as error:  # handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(10)
    return outcome


@pytest.fixture
def running_loop():
    loop = EventLoop()
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    started = threading.Event()
    loop.call_soon_threadsafe(started.set)
    assert started.wait(10)
    yield loop
    loop.stop()
    thread.join(10)
    loop.close()


@pytest.mark.parametrize("operation", ["call_later", "add_reader", "remove_reader"])
def test_loop_only_operations_refuse_other_threads_while_it_runs(running_loop, operation):
    fd = os.eventfd(0)
    try:
        calls = {
            "call_later": lambda: running_loop.call_later(0, lambda: None),
            "add_reader": lambda: running_loop.add_reader(fd, lambda: None),
            "remove_reader": lambda: running_loop.remove_reader(fd),
        }
        outcome = run_in_thread(calls[operation])
        assert isinstance(outcome.get("error"), WrongThread)
    finally:
        os.close(fd)


def test_before_it_runs_any_thread_may_set_it_up():
    loop = EventLoop()
    try:
        assert "error" not in run_in_thread(lambda: loop.call_later(0, lambda: None))
    finally:
        loop.close()


def test_call_later_threadsafe_arms_the_timer_on_the_loop(running_loop):
    fired = threading.Event()
    ran_on = []

    def callback():
        ran_on.append(threading.get_ident())
        fired.set()

    assert "error" not in run_in_thread(lambda: running_loop.call_later_threadsafe(0.01, callback))
    assert fired.wait(10)
    assert ran_on == [running_loop._owner]


def test_a_failing_callback_ends_run_by_default():
    loop = EventLoop()
    try:
        loop.call_later(0, lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            loop.run()
    finally:
        loop.close()


def test_with_a_handler_the_loop_goes_on_after_a_failing_callback():
    loop = EventLoop()
    failures, later = [], []
    loop.on_callback_error = lambda callback, error: failures.append(type(error))
    try:
        loop.call_later(0, lambda: 1 / 0)
        loop.call_later(0.01, lambda: (later.append(True), loop.stop()))
        loop.run()
        assert failures == [ZeroDivisionError] and later == [True]
    finally:
        loop.close()


def run_pending(loop):
    """Run what is queued and the timers already due, then return."""
    loop.call_soon_threadsafe(loop.stop)
    loop.run()
    loop._stopped.clear()


def test_a_cancelled_timer_does_not_run():
    loop = EventLoop()
    ran = []
    try:
        handle = loop.call_later(0, lambda: ran.append("cancelled"))
        loop.call_later(0, lambda: ran.append("kept"))
        handle.cancel()
        handle.cancel()  # idempotent
        run_pending(loop)
        assert ran == ["kept"] and loop.timer_count == 0
        handle.cancel()  # after it left the heap: nothing to do
        assert loop._cancelled == 0
    finally:
        loop.close()


def test_re_arming_a_timer_keeps_the_heap_bounded():
    # A timer re-armed over and over (cancel the old entry, arm a new one)
    # must not leave one dead entry per re-arm behind.
    loop = EventLoop()
    try:
        handle = loop.call_later(1e9, lambda: None)
        for _ in range(100_000):
            handle.cancel()
            handle = loop.call_later(1e9, lambda: None)
        assert loop.timer_count <= 2 * COMPACT_MIN
        assert not handle.cancelled and handle in [entry[2] for entry in loop._timers]
    finally:
        loop.close()


def test_cancel_is_for_the_event_thread_only(running_loop):
    handles = []
    done = threading.Event()
    running_loop.call_soon_threadsafe(lambda: (handles.append(running_loop.call_later(1e9, lambda: None)), done.set()))
    assert done.wait(10)
    assert isinstance(run_in_thread(handles[0].cancel).get("error"), WrongThread)


def test_a_timer_centuries_away_does_not_break_the_loop():
    # select() refuses timeouts above INT_MAX milliseconds (about 24.8 days).
    loop = EventLoop()
    ready = os.eventfd(1)  # readable at once: the loop's first select() returns with it
    try:
        loop.call_later(3e9, lambda: None)
        loop.add_reader(ready, loop.stop)
        loop.run()
        assert loop.stopped and loop.timer_count == 1
    finally:
        loop.close()
        os.close(ready)
