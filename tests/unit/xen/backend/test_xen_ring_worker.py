"""RingWorker: a thread per ring, woken by its doorbell or an eventfd."""

import os
import threading

import pytest

from pyvmm.xen.backend.ring_worker import RingWorker


class Recorder:
    def __init__(self, more=0, fail_on=None):
        self.calls = 0
        self.more = more  # how many calls report work left
        self.fail_on = fail_on
        self.called = threading.Event()
        self.errors = []
        self.failed = threading.Event()

    def serve(self):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("ring broken")
        self.called.set()
        if self.more:
            self.more -= 1
            return True
        return False

    def on_error(self, error):
        self.errors.append(error)
        self.failed.set()


def wait_calls(recorder, count):
    for _ in range(500):
        if recorder.calls >= count:
            return
        recorder.called.wait(0.01)
        recorder.called.clear()
    pytest.fail(f"serve() was called {recorder.calls} times, expected {count}")


def test_wake_serves_and_keeps_serving_while_work_is_left():
    recorder = Recorder(more=3)
    worker = RingWorker("t", recorder.serve, recorder.on_error)
    worker.start()
    worker.wake()
    wait_calls(recorder, 4)  # one wake: served until serve() said nothing is left
    worker.stop()
    assert not worker.alive and recorder.calls == 4 and not recorder.errors
    worker.wake()  # after stop: ignored, no error


def test_an_eventfd_signalled_by_someone_else_wakes_it_and_is_drained():
    recorder = Recorder()
    eventfd = os.eventfd(0, os.EFD_NONBLOCK)
    worker = RingWorker("t", recorder.serve, recorder.on_error, eventfd=eventfd)
    worker.start()
    os.eventfd_write(eventfd, 5)
    wait_calls(recorder, 1)
    with pytest.raises(BlockingIOError):
        os.eventfd_read(eventfd)  # consumed by the worker
    worker.stop()
    os.eventfd_write(eventfd, 1)  # the caller's fd stays open
    os.close(eventfd)


def test_a_failing_serve_ends_the_worker_and_reports_once():
    recorder = Recorder(fail_on=2)
    worker = RingWorker("t", recorder.serve, recorder.on_error)
    worker.start()
    worker.wake()
    wait_calls(recorder, 1)
    worker.wake()
    assert recorder.failed.wait(5)
    worker.wake()
    worker.stop()
    assert len(recorder.errors) == 1 and str(recorder.errors[0]) == "ring broken"


def test_a_notification_refused_by_accept_is_not_served_but_the_doorbell_is():
    recorder = Recorder()
    eventfd = os.eventfd(0, os.EFD_NONBLOCK)
    asked = []

    def accept():
        asked.append(True)
        return False  # e.g. an injected fault dropped it

    worker = RingWorker("t", recorder.serve, recorder.on_error, eventfd=eventfd, accept=accept)
    worker.start()
    os.eventfd_write(eventfd, 1)
    for _ in range(500):
        if asked:
            break
        recorder.called.wait(0.01)
    assert asked and recorder.calls == 0
    worker.wake()
    wait_calls(recorder, 1)
    worker.stop()
    os.close(eventfd)
