"""The VMM's single event thread: file descriptors, timers, cross-thread calls.

vCPU threads only run guest code and handle exits; anything slow or
blocking (stdin, consoles, backends, timers) runs here. Other threads hand
work over with call_soon_threadsafe(), which wakes the loop through an
eventfd.

Ownership is enforced, not just documented: while run() is active, the
selector and the timer heap belong to the thread running it, and
add_reader(), remove_reader() and call_later() from any other thread raise
WrongThread (a heap pushed from two threads loses timers; a reader added
from a vCPU thread races the loop's own dispatch). Before run() starts and
after it returns, the thread that builds or tears down the VM may call them.
`assert_owner()` lets other single-threaded components (the xenstore) make
the same check.

call_later() returns a TimerHandle whose cancel() (event thread) takes the
timer back. Cancelled entries leave the heap when they come up, or all at
once when they are more than half of it (and at least COMPACT_MIN), so a
timer re-armed again and again (a guest's, say) costs one live entry and a
bounded number of dead ones. The select() wait is capped, so a timer
centuries away is legal.
"""

from __future__ import annotations

import heapq
import itertools
import os
import selectors
import threading
import time
from collections import deque
from typing import Callable


# select() takes at most INT_MAX milliseconds (about 24.8 days); a timer
# further away than this is simply waited for in several steps.
MAX_WAIT_SECONDS = 3600.0
# Below this many cancelled entries the heap is never rebuilt.
COMPACT_MIN = 64


def drain_eventfd(fd: int) -> bool:
    """Reset a non-blocking eventfd; True if it had been signalled."""
    try:
        return os.eventfd_read(fd) > 0
    except BlockingIOError:
        return False


class WrongThread(RuntimeError):
    """An event-thread-only operation was called from another thread."""


class TimerHandle:
    """A timer armed with call_later(); cancel() it on the event thread."""

    __slots__ = ("when", "callback", "cancelled", "_loop", "_queued")

    def __init__(self, loop: "EventLoop", when: float, callback: Callable[[], None]):
        self.when = when
        self.callback = callback
        self.cancelled = False
        self._loop = loop
        self._queued = True  # in the loop's heap, not yet run

    def cancel(self) -> None:
        """The callback will not run; idempotent, and harmless after it ran."""
        self._loop.assert_owner("cancelling a timer")
        if self.cancelled:
            return
        self.cancelled = True
        self.callback = _nothing  # let go of what it would have called
        if self._queued:
            self._loop._note_cancelled()


class EventLoop:
    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._cancelled = 0  # cancelled handles still in _timers
        self._sequence = itertools.count()
        self._calls: deque[Callable[[], None]] = deque()
        self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._selector.register(self._wakeup, selectors.EVENT_READ, self._drain_wakeup)
        self._stopped = threading.Event()
        self._owner: int | None = None  # the thread inside run(), if any
        # What a callback that raises does: by default the error ends run()
        # (tests see it); the Machine logs it and keeps serving the others.
        self.on_callback_error: Callable[[Callable[[], None], Exception], None] | None = None

    # --- ownership ------------------------------------------------------------

    def on_owner_thread(self) -> bool:
        """True on the thread running the loop, or on any thread while it is not running."""
        owner = self._owner
        return owner is None or owner == threading.get_ident()

    def assert_owner(self, what: str = "this") -> None:
        if not self.on_owner_thread():
            raise WrongThread(f"{what} must run on the event thread, not {threading.current_thread().name}; "
                              "hand it over with call_soon_threadsafe()")

    # --- registration (event thread) -------------------------------------------

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self.assert_owner("add_reader")
        self._selector.register(fd, selectors.EVENT_READ, callback)

    def remove_reader(self, fd: int) -> None:
        self.assert_owner("remove_reader")
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        self.assert_owner("call_later")
        handle = TimerHandle(self, time.monotonic() + delay, callback)
        heapq.heappush(self._timers, (handle.when, next(self._sequence), handle))
        return handle

    def _note_cancelled(self) -> None:
        self._cancelled += 1
        if self._cancelled >= COMPACT_MIN and self._cancelled * 2 > len(self._timers):
            live = []
            for entry in self._timers:
                if entry[2].cancelled:
                    entry[2]._queued = False
                else:
                    live.append(entry)
            heapq.heapify(live)
            self._timers = live
            self._cancelled = 0

    @property
    def timer_count(self) -> int:
        """Entries in the timer heap, cancelled ones included (what they cost)."""
        return len(self._timers)

    # --- any thread ------------------------------------------------------------

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        self._calls.append(callback)  # deque.append is atomic
        os.eventfd_write(self._wakeup, 1)

    def call_later_threadsafe(self, delay: float, callback: Callable[[], None]) -> None:
        """call_later() from any thread: the timer is armed on the event thread."""
        if self._owner == threading.get_ident():
            self.call_later(delay, callback)
        else:
            self.call_soon_threadsafe(lambda: self.call_later(delay, callback))

    def _drain_wakeup(self) -> None:
        drain_eventfd(self._wakeup)

    def stop(self) -> None:
        """Make run() return; safe from any thread."""
        self._stopped.set()
        try:
            os.eventfd_write(self._wakeup, 1)
        except OSError:  # already closed: nothing left to wake
            pass

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def run(self) -> None:
        self._owner = threading.get_ident()
        try:
            self._run()
        finally:
            self._owner = None

    def _run(self) -> None:
        while not self._stopped.is_set():
            timeout = None
            if self._timers:
                timeout = min(MAX_WAIT_SECONDS, max(0.0, self._timers[0][0] - time.monotonic()))
            if self._calls:
                timeout = 0.0
            for key, _ in self._selector.select(timeout):
                self._call(key.data)
            while self._calls:
                self._call(self._calls.popleft())
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, handle = heapq.heappop(self._timers)
                handle._queued = False
                if handle.cancelled:
                    self._cancelled -= 1
                else:
                    self._call(handle.callback)

    def _call(self, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception as error:
            handler = self.on_callback_error
            if handler is None:
                raise
            handler(callback, error)

    def close(self) -> None:
        self._selector.close()
        os.close(self._wakeup)


def _nothing() -> None:
    pass
