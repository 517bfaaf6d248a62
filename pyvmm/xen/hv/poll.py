"""vCPUs blocked in SCHEDOP_poll or SCHEDOP_block that pyvmm must wake.

A blocked vCPU is not a blocked thread: the hypercall returns at once with
the vCPU's KVM run state set to HALTED, so the vCPU thread goes back to
KVM_RUN, where KVM keeps it halted. Everything that must reach a vCPU
reaches it there as for a HLT: an interrupt (an upcall vector, a GSI, the
LAPIC), KVM's own event-channel deliveries (they unblock the vCPU they
target), and pyvmm's kicks for pause, stop, the gdb stub and queued work.
So a blocked vCPU is never harder to pause or kill than a running one, and
the clock freezes and resumes under it as under any halted vCPU.

What KVM cannot see is what pyvmm does in userspace: a port made pending by
pyvmm (a masked port raises no interrupt), an upcall raised by pyvmm for a
vCPU with interrupts off, and the poll's timeout. `Pollers` records which
vCPU waits for what, and calls `wake(vcpu)` (which makes the vCPU runnable
again, on its own thread) for a pending port it polls, an event for it, or
its timeout. Xen allows spurious wake-ups, and a wake that comes late (the
vCPU already woke by an interrupt and halted again for another reason) is
one of those.

Threads: `start()` runs on the polling vCPU's thread; `port_pending()` and
`vcpu_event()` on any thread that delivers events; `expired()` on the event
thread. One lock covers the table; `wake` and the timer calls run outside
it. At most one wait per vCPU exists (a new poll replaces the old), and one
timer per vCPU (re-armed in place), so a guest cannot grow pyvmm's memory
by polling.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterable, Protocol

ANY_PORT = None  # SCHEDOP_block: any event for the vCPU ends the wait


class Timer(Protocol):
    """One vCPU's poll timeout (a timers.UserTimer)."""

    def arm(self, delay: float, period: float | None = None) -> None: ...
    def stop(self) -> None: ...


class _Wait:
    __slots__ = ("ports", "timed")

    def __init__(self, ports: frozenset[int] | None, timed: bool):
        self.ports = ports  # None: SCHEDOP_block
        self.timed = timed


class Pollers:
    def __init__(self, vcpu_count: int, wake: Callable[[int], None], timers: list[Timer]):
        if len(timers) != vcpu_count:
            raise ValueError("one timer per vCPU")
        self._wake = wake
        self._timers = timers
        self._lock = threading.Lock()
        self._waits: list[_Wait | None] = [None] * vcpu_count

    def start(self, vcpu: int, ports: Iterable[int] | None, timeout_s: float | None) -> None:
        """vCPU `vcpu` is about to halt until one of `ports` is pending (None:
        until any event for it), or `timeout_s` seconds have passed (None:
        no timeout). Call it before checking whether the wait is needed at
        all: an event delivered after this wakes the vCPU, one delivered
        before is seen by that check."""
        wait = _Wait(None if ports is None else frozenset(ports), timeout_s is not None)
        with self._lock:
            old = self._waits[vcpu]
            self._waits[vcpu] = wait
        if timeout_s is not None:
            self._timers[vcpu].arm(max(0.0, timeout_s))
        elif old is not None and old.timed:
            self._timers[vcpu].stop()

    def cancel(self, vcpu: int) -> None:
        """The vCPU will not halt after all (the check found it need not)."""
        with self._lock:
            wait, self._waits[vcpu] = self._waits[vcpu], None
        if wait is not None and wait.timed:
            self._timers[vcpu].stop()

    def waiting(self, vcpu: int) -> bool:
        """Whether the vCPU may be halted waiting for an event channel (then
        a halt with interrupts off is not a dead CPU: an event wakes it)."""
        return self._waits[vcpu] is not None

    def port_pending(self, port: int) -> None:
        """Userspace made `port` pending: wake every vCPU polling it, as
        Xen's evtchn_check_pollers does (and those in SCHEDOP_block, which
        a pending port on another vCPU does not concern: see vcpu_event)."""
        woken = []
        with self._lock:
            for vcpu, wait in enumerate(self._waits):
                if wait is not None and wait.ports is not None and port in wait.ports:
                    self._waits[vcpu] = None
                    woken.append((vcpu, wait))
        self._finish(woken)

    def vcpu_event(self, vcpu: int) -> None:
        """Userspace raised an upcall for `vcpu`: whatever it waits for, it
        wakes (Xen's vcpu_kick unblocks a polling or blocked vCPU)."""
        with self._lock:
            wait, self._waits[vcpu] = self._waits[vcpu], None
        if wait is not None:
            self._finish([(vcpu, wait)])

    def expired(self, vcpu: int) -> None:
        """The vCPU's timeout (event thread)."""
        with self._lock:
            wait = self._waits[vcpu]
            if wait is None or not wait.timed:
                return  # woken already; the timer was stopped too late
            self._waits[vcpu] = None
        self._wake(vcpu)

    def wake_all(self) -> None:
        """Wake every waiting vCPU (a spurious wake-up: they check again)."""
        with self._lock:
            woken = [(vcpu, wait) for vcpu, wait in enumerate(self._waits) if wait is not None]
            self._waits = [None] * len(self._waits)
        self._finish(woken)

    def _finish(self, woken: list[tuple[int, _Wait]]) -> None:
        for vcpu, wait in woken:
            if wait.timed:
                self._timers[vcpu].stop()
            self._wake(vcpu)
