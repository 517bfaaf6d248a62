"""The domain's watchdogs (SCHEDOP_watchdog), as Xen has them.

Xen (xen/common/sched/core.c, domain_watchdog) gives each domain
NR_DOMAIN_WATCHDOG_TIMERS = 2 watchdogs; `struct sched_watchdog {id,
timeout}` (public/sched.h, timeout in seconds) asks:

- id 0: take the first free watchdog and arm it `timeout` seconds from now;
  the answer is its id (1 or 2), or -ENOSPC when both are in use. A timeout
  of 0 arms it to expire at once, as in Xen.
- id 1..2, in use: timeout != 0 arms it again, `timeout` seconds from now
  (the guest "pets" it); timeout 0 stops and frees it. Both answer 0.
- an id above 2, or one not in use: -EINVAL. (Linux's xen_wdt probes with
  id ~0 and expects exactly this; Xen before 4.2 answered -EEXIST.)

When any of them expires Xen shuts the domain down with SHUTDOWN_watchdog,
once. A soft reset (kexec) leaves them as they are: Xen's
domain_soft_reset() does not touch them.

Time here is the guest's Xen system time (its pvclock, KVM's clock), which
stands still while the VM is paused, so a paused VM's watchdog never fires
and, after resume, has the time left that it had when paused. (Xen's
watchdog timers count the host's time, so a domain paused for longer than
its timeout is shut down there; pyvmm's pause, through `pyvmm ctl` or a
debugger, must not kill the guest.)

Threads: `op()` comes from vCPU threads (the hypercall). It changes the
state under the lock and hands one call over to the event thread unless
one is already on its way; the event thread alone owns the one loop timer,
armed for the earliest deadline, and decides expiry there. However often
the guest pets, the VMM holds at most one loop entry and one queued call.

A snapshot (pyvmm/core/snapshot.py) holds each watchdog's timeout and the
guest time it has left; a restored domain arms them again once the guest's
clock is back, so a guest that does not pet them is shut down as it would
have been.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from pyvmm.core.snapshot import SnapshotError, check_version, natural, versioned

from ..errors import EINVAL, ENOSPC, XenError

if TYPE_CHECKING:
    from pyvmm.core.eventloop import EventLoop, TimerHandle

NR_DOMAIN_WATCHDOG_TIMERS = 2
NS_PER_SECOND = 1_000_000_000
STATE_VERSION = 1
# struct sched_watchdog's timeout is a uint32_t (seconds).
MAX_TIMEOUT = (1 << 32) - 1
# While the VM is paused its clock stands still: the expiry check looks
# again this often (it costs one loop entry) until the VM runs again.
PAUSED_RECHECK_SECONDS = 0.5
# A check that comes a hair early (float seconds against integer
# nanoseconds) waits at least this long for the rest.
MIN_WAIT_SECONDS = 0.001


@dataclass(frozen=True)
class Expiry:
    """A watchdog that ran out: its id (1-based) and the timeout it was last armed with."""

    id: int
    timeout: int


class Watchdogs:
    """The pure state: which watchdogs are in use and when each expires,
    in guest nanoseconds. Not thread-safe: WatchdogTimers holds the lock."""

    def __init__(self, count: int = NR_DOMAIN_WATCHDOG_TIMERS):
        self._deadline: list[int | None] = [None] * count  # None: free
        self._timeout: list[int] = [0] * count  # seconds, as last armed (for the log)

    def op(self, wid: int, timeout: int, now_ns: int) -> int:
        """SCHEDOP_watchdog: the hypercall's result (a new id, or 0);
        XenError for what Xen refuses."""
        count = len(self._deadline)
        if not 0 <= wid <= count:
            raise XenError(EINVAL, f"no watchdog {wid}")
        if wid == 0:
            for index, deadline in enumerate(self._deadline):
                if deadline is None:
                    self._arm(index, timeout, now_ns)
                    return index + 1
            raise XenError(ENOSPC, f"all {count} watchdogs are in use")
        index = wid - 1
        if self._deadline[index] is None:
            raise XenError(EINVAL, f"watchdog {wid} is not in use")
        if timeout == 0:
            self._deadline[index] = None
        else:
            self._arm(index, timeout, now_ns)
        return 0

    def _arm(self, index: int, timeout: int, now_ns: int) -> None:
        self._deadline[index] = now_ns + timeout * NS_PER_SECOND
        self._timeout[index] = timeout

    def next_deadline(self) -> int | None:
        """The earliest deadline of the watchdogs in use, or None."""
        armed = [deadline for deadline in self._deadline if deadline is not None]
        return min(armed) if armed else None

    def expired(self, now_ns: int) -> Expiry | None:
        """The watchdog that ran out first by `now_ns`, if any."""
        due = [(deadline, index) for index, deadline in enumerate(self._deadline)
               if deadline is not None and deadline <= now_ns]
        if not due:
            return None
        _, index = min(due)
        return Expiry(index + 1, self._timeout[index])

    def in_use(self) -> dict[int, int]:
        """{id: deadline in guest ns} of the watchdogs in use."""
        return {index + 1: deadline for index, deadline in enumerate(self._deadline) if deadline is not None}

    def save(self, now_ns: int) -> list[list[int] | None]:
        """Each watchdog: None when free, else [timeout in s, guest ns left
        at `now_ns`]. An overdue one has 0 left (it fires at once when
        restored); none has more than its timeout."""
        return [None if deadline is None else
                [self._timeout[index], min(max(0, deadline - now_ns), self._timeout[index] * NS_PER_SECOND)]
                for index, deadline in enumerate(self._deadline)]

    def restore(self, saved: list[tuple[int, int] | None], now_ns: int) -> None:
        """What save() gave (checked: see WatchdogTimers.restore_state), the
        time left counted from `now_ns`."""
        for index, entry in enumerate(saved):
            if entry is None:
                self._deadline[index] = None
            else:
                timeout, left = entry
                self._deadline[index] = now_ns + left
                self._timeout[index] = timeout


class WatchdogTimers:
    """A domain's watchdogs on the VMM's event loop.

    `clock()` reads the guest's Xen system time in ns; `paused()` says
    whether the VM is paused (its clock then stands still); `expire(expiry)`
    is called once, on the event thread, for the first watchdog that runs
    out while the VM runs."""

    def __init__(self, loop: "EventLoop", clock: Callable[[], int], paused: Callable[[], bool],
                 expire: Callable[[Expiry], None], *, count: int = NR_DOMAIN_WATCHDOG_TIMERS,
                 paused_recheck: float = PAUSED_RECHECK_SECONDS):
        self._loop = loop
        self._clock = clock
        self._paused = paused
        self._expire = expire
        self._paused_recheck = paused_recheck
        self._lock = threading.Lock()
        self._state = Watchdogs(count)  # under _lock
        self._handover = False  # a _reschedule() is queued for the event thread (under _lock)
        self._handle: TimerHandle | None = None  # event thread only
        self.fired: Expiry | None = None  # set once, on the event thread
        self._restored: list[tuple[int, int] | None] | None = None  # restore_state() until finish_restore()
        self._count = count

    def op(self, wid: int, timeout: int) -> int:
        """SCHEDOP_watchdog from a vCPU thread (or any): the result for the
        guest; XenError for what Xen refuses."""
        with self._lock:
            result = self._state.op(wid, timeout, self._clock())
            if self._handover:
                return result
            self._handover = True
        self._loop.call_soon_threadsafe(self._reschedule)
        return result

    def in_use(self) -> dict[int, int]:
        with self._lock:
            return self._state.in_use()

    # --- snapshot (pyvmm/core/snapshot.py) --------------------------------------------

    def save_state(self, now_ns: int) -> dict:
        """Each watchdog's timeout and guest time left at `now_ns`: the
        guest's clock as the pause froze it (clock() runs on under a pause)."""
        with self._lock:
            return versioned(STATE_VERSION, watchdogs=self._state.save(now_ns))

    def restore_state(self, state: dict) -> None:
        """Check and keep the saved watchdogs; finish_restore() arms them,
        once the guest's clock is back (it is not yet when this runs)."""
        check_version(state, "WatchdogTimers", STATE_VERSION)
        saved = state.get("watchdogs")
        if not isinstance(saved, list) or len(saved) != self._count:
            raise SnapshotError(f"WatchdogTimers: watchdogs is not a list of {self._count}")
        checked: list[tuple[int, int] | None] = []
        for entry in saved:
            if entry is None:
                checked.append(None)
                continue
            if not (isinstance(entry, list) and len(entry) == 2 and all(natural(value) for value in entry)
                    and entry[0] <= MAX_TIMEOUT and entry[1] <= entry[0] * NS_PER_SECOND):
                raise SnapshotError(f"WatchdogTimers: bad watchdog {entry!r:.40}")
            checked.append((entry[0], entry[1]))
        self._restored = checked

    def finish_restore(self) -> None:
        """The restored watchdogs run again, each with the time it had left,
        counted on the guest's clock as KVM has it back."""
        saved, self._restored = self._restored, None
        if saved is None:
            return
        with self._lock:
            self._state.restore(saved, self._clock())
            if self._state.next_deadline() is None or self._handover:
                return
            self._handover = True
        self._loop.call_soon_threadsafe(self._reschedule)

    # --- event thread ------------------------------------------------------------------

    def _reschedule(self) -> None:
        with self._lock:
            self._handover = False
        self._check()

    def _check(self) -> None:
        """Fire what ran out, else arm the one loop timer for what is next."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self.fired is not None:
            return  # the domain is shutting down: nothing more fires (Xen's domain_shutting_down)
        if self._paused():
            with self._lock:
                armed = self._state.next_deadline() is not None
            if armed:
                self._handle = self._loop.call_later(self._paused_recheck, self._check)
            return
        now = self._clock()
        with self._lock:
            expiry = self._state.expired(now)
            deadline = self._state.next_deadline()
        if expiry is not None:
            self.fired = expiry
            self._expire(expiry)
            return
        if deadline is not None:
            wait = max(MIN_WAIT_SECONDS, (deadline - now) / NS_PER_SECOND)
            self._handle = self._loop.call_later(wait, self._check)
