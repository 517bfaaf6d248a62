"""The VMM's single event thread: file descriptors, timers, cross-thread calls.

vCPU threads only run guest code and handle exits; anything slow or
blocking (stdin, consoles, backends, timers) runs here. Other threads hand
work over with call_soon_threadsafe(), which wakes the loop through an
eventfd.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import selectors
import threading
import time
from collections import deque
from typing import Callable

log = logging.getLogger(__name__)


class EventLoop:
    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._sequence = itertools.count()
        self._calls: deque[Callable[[], None]] = deque()
        self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._selector.register(self._wakeup, selectors.EVENT_READ, self._drain_wakeup)
        self._stopped = threading.Event()

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self._selector.register(fd, selectors.EVENT_READ, callback)

    def remove_reader(self, fd: int) -> None:
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._sequence), callback))

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        self._calls.append(callback)  # deque.append is atomic
        os.eventfd_write(self._wakeup, 1)

    def _drain_wakeup(self) -> None:
        try:
            os.eventfd_read(self._wakeup)
        except BlockingIOError:
            pass

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
        while not self._stopped.is_set():
            timeout = None
            if self._timers:
                timeout = max(0.0, self._timers[0][0] - time.monotonic())
            if self._calls:
                timeout = 0.0
            for key, _ in self._selector.select(timeout):
                key.data()
            while self._calls:
                self._calls.popleft()()
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, callback = heapq.heappop(self._timers)
                callback()

    def close(self) -> None:
        self._selector.close()
        os.close(self._wakeup)
