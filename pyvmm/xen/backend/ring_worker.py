"""A thread that serves one shared ring whenever its frontend notifies.

Backends do their I/O here rather than on the VMM's event thread: a slow
image or a busy ring then stalls only its own queue, and a notification
that KVM delivers to an eventfd (the in-kernel event-channel path) wakes
this thread directly, with no hop through the event loop.

The worker sleeps in poll() on its event channel's eventfd (when the host
delivers in kernel) and on a private doorbell eventfd that wake() rings
(notifications that come through userspace, a reschedule, stop()). Each
wake-up calls `serve()` until it says no work is left; serve() is expected
to re-arm the ring's event index itself (final check), so a request that
arrives while it runs is either seen by it or notifies again.

`serve()` raising ends the worker: `on_error(exception)` is called from
the worker thread and must hand the failure to whoever owns the device
(typically by scheduling a disconnect on the event thread).
"""

from __future__ import annotations

import logging
import os
import select
import threading
from typing import Callable

from pyvmm.core.eventloop import drain_eventfd

log = logging.getLogger(__name__)


class RingWorker:
    def __init__(self, name: str, serve: Callable[[], bool], on_error: Callable[[BaseException], None], *,
                 eventfd: int | None = None, accept: Callable[[], bool] | None = None):
        """`serve()` handles what is waiting and returns True when it
        stopped with more to do (a budget); `eventfd`, if given, is polled
        and drained (it belongs to the caller and stays open); `accept()`,
        if given, is asked about each wake-up through the eventfd (False:
        ignore it, e.g. an injected fault dropped the notification)."""
        self.name = name
        self._serve = serve
        self._on_error = on_error
        self._eventfd = eventfd
        self._accept = accept
        self._doorbell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Make the worker serve its ring soon; any thread may call it."""
        if not self._stopping:
            try:
                os.eventfd_write(self._doorbell, 1)
            except OSError:  # stopped (and the doorbell closed) meanwhile
                pass

    def stop(self) -> None:
        """Ask the worker to finish and wait for it (it completes the batch
        it is serving: responses already taken off the ring are written)."""
        self._stopping = True
        os.eventfd_write(self._doorbell, 1)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        os.close(self._doorbell)
        self._doorbell = -1

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._doorbell, select.POLLIN)
        if self._eventfd is not None:
            poller.register(self._eventfd, select.POLLIN)
        try:
            while not self._stopping:
                serve = False
                for fd, _ in poller.poll():  # only what is ready: a read of an idle eventfd raises
                    if not drain_eventfd(fd):
                        continue
                    if fd == self._doorbell or self._accept is None or self._accept():
                        serve = True
                while serve and not self._stopping:
                    serve = self._serve()
        except BaseException as error:  # the device's failure, never the VMM's
            if not self._stopping:
                self._on_error(error)
