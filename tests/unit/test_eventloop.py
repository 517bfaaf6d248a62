"""The event loop's ownership rules and its handling of failing callbacks."""

from __future__ import annotations

import os
import threading

import pytest

from pyvmm.eventloop import EventLoop, WrongThread


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
        assert run_in_thread(lambda: loop.call_later(0, lambda: None)) == {"value": None}
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
