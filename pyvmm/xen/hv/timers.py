"""A vCPU's Xen timers when pyvmm runs them (no in-kernel VIRQ_TIMER).

Each vCPU has one singleshot and one periodic timer, as in Xen; re-arming
one replaces it. A UserTimer holds at most one event-loop entry and at most
one call handed over to the event thread, however often the guest re-arms
it: a guest cannot grow the VMM's memory through its timers.

Threads: arm() and stop() come from vCPU threads. They record the guest's
latest wish under the timer's lock and hand one call over to the event
thread unless one is already on its way (it reads the latest wish when it
runs). The loop entry belongs to the event thread, which cancels the old
one before arming the new.
"""

from __future__ import annotations

import math
import threading
import time
from functools import partial
from typing import TYPE_CHECKING, Callable, NamedTuple

from pyvmm.core.snapshot import SnapshotError, check_version, versioned

if TYPE_CHECKING:
    from pyvmm.core.eventloop import EventLoop, TimerHandle

STATE_VERSION = 1
# A restored period below the shortest one Xen lets a guest set (1 ms,
# domain.MIN_PERIOD_NS) would have the event thread do nothing but fire it.
MIN_PERIOD_SECONDS = 0.001


class _Wish(NamedTuple):
    when: float  # time.monotonic() at which it fires
    period: float | None  # seconds, for a periodic timer


class UserTimer:
    def __init__(self, loop: "EventLoop", fire: Callable[[], None]):
        self._loop = loop
        self._fire = fire
        self._lock = threading.Lock()
        self._wish: _Wish | None = None  # what the guest asked for last; None: stopped
        self._handover = False  # an _apply() is queued for the event thread
        self._handle: TimerHandle | None = None  # event thread only

    @property
    def armed(self) -> bool:
        return self._wish is not None

    def due_in(self) -> float | None:
        """Seconds until it fires (negative: overdue), None while stopped; any thread."""
        wish = self._wish
        return None if wish is None else wish.when - time.monotonic()

    def arm(self, delay: float, period: float | None = None) -> None:
        """Fire `delay` seconds from now (then every `period` seconds), replacing
        whatever this timer was set to; any thread."""
        self._set(_Wish(time.monotonic() + delay, period))

    def stop(self) -> None:
        """Any thread."""
        self._set(None)

    def _set(self, wish: _Wish | None) -> None:
        with self._lock:
            if wish is None and self._wish is None and not self._handover:
                return  # stopped, expired or never armed: no loop entry exists
            self._wish = wish
            if self._handover:
                return
            self._handover = True
        self._loop.call_soon_threadsafe(self._apply)

    def _apply(self) -> None:
        with self._lock:
            self._handover = False
            wish = self._wish
        self._schedule(wish)

    def _schedule(self, wish: _Wish | None) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if wish is not None:
            self._handle = self._loop.call_later(max(0.0, wish.when - time.monotonic()), partial(self._expired, wish))

    def _expired(self, wish: _Wish) -> None:
        self._handle = None
        with self._lock:
            if self._wish is not wish:
                return  # changed meanwhile: the queued _apply() arms what is wanted now
            following = None if wish.period is None else _Wish(time.monotonic() + wish.period, wish.period)
            self._wish = following
        if following is not None:
            self._schedule(following)
        self._fire()

    # --- snapshot (pyvmm/core/snapshot.py) --------------------------------------------

    def save_state(self) -> dict:
        """Armed or not; if armed, the seconds left and the period."""
        with self._lock:
            wish = self._wish
        if wish is None:
            return versioned(STATE_VERSION, armed=False)
        return versioned(STATE_VERSION, armed=True, remaining=max(0.0, wish.when - time.monotonic()),
                         period=wish.period)

    def restore_state(self, state: dict) -> None:
        check_version(state, "UserTimer", STATE_VERSION)
        if not state.get("armed"):
            self.stop()
            return
        remaining, period = state.get("remaining"), state.get("period")
        if not _seconds(remaining) or not (period is None or (_seconds(period) and period >= MIN_PERIOD_SECONDS)):
            raise SnapshotError(f"UserTimer: bad remaining {remaining!r} or period {period!r}")
        self.arm(remaining, period)


def _seconds(value) -> bool:
    # JSON readers accept Infinity and NaN: neither is a delay.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
