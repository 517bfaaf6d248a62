"""The guest's xenstore: its ring served on the event thread, with the event channel both ways.

Owner: the event thread. Everything here (the RingServer, the guest's
Connection, the store behind it) runs there; other threads reach it only
through the loop's call_soon_threadsafe(). In debug runs (PYVMM_DEBUG_THREADS=1)
every entry checks it.

Wake-ups: the guest signals the store port after writing requests, but
Linux's xenbus skips the signal whenever the server has not yet published
that it consumed the earlier requests (xb_write: `if (prod <= req_cons)
notify`), and signals after reading replies only when the reply ring was
full. So the server must look at the ring again after every index it
publishes, which RingServer.process() does before it returns. Output that
appears on its own (watch events fired by another client's write) is
flushed by a call handed to the loop.

Once a second, too, transactions past their lifetime are expired (see
store.Quotas.transaction_seconds).

The safety net: once a second (`recheck_seconds`) the ring is looked at
even without a signal. Work that has waited there for a whole interval with
nothing moving means a wake-up was lost somewhere (a bug, in pyvmm, the
host kernel or the guest): it is served, counted and logged, so the guest
never waits forever on a lost reply (at most about two intervals), and the
count says that it happened.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

from .protocol import Connection
from .ring import RingServer
from .store import XenStore
from ...core.snapshot import SnapshotError, check_version, versioned

log = logging.getLogger(__name__)

RECHECK_SECONDS = 1.0
STATE_VERSION = 1
DEBUG_THREADS = os.environ.get("PYVMM_DEBUG_THREADS") == "1"


class GuestStoreService:
    def __init__(self, loop, store: XenStore, domid: int, page: memoryview, *,
                 recheck_seconds: float | None = RECHECK_SECONDS, check_threads: bool = DEBUG_THREADS):
        self._loop = loop
        self._store = store
        self.connection: Connection = store.connect(domid)
        self.ring = RingServer(page, self.connection, log_rate=store.log_rate)
        self._notify_guest: Callable[[], None] = lambda: None
        self._flush_scheduled = False
        self._recheck_seconds = recheck_seconds
        self.requests_served = 0  # process() calls that moved data
        self.lost_wakeups = 0  # work found by the safety net alone
        self._progress_at_last_check = (0, 0)  # (requests served, unread reply bytes) at the last check
        self._work_at_last_check = False
        self._unread_at_last_check = False
        self.connection.output_listener = self._output_appeared
        self._check_threads = check_threads
        if check_threads:
            store.owner_check = loop.assert_owner

    def attach(self, notify_guest: Callable[[], None]) -> None:
        """The guest's end of the store channel: notify_guest() raises it."""
        self._notify_guest = notify_guest

    def reset(self) -> None:
        """The domain's soft reset (event thread): the guest's connection
        starts over on an empty ring, as after the toolstack released and
        introduced the domain again; its watches and transactions are gone.
        attach() the new store channel afterwards."""
        if self._check_threads:
            self._loop.assert_owner("the guest's xenstore")
        self.ring.reset()
        self._progress_at_last_check = (self.requests_served, 0)
        self._work_at_last_check = self._unread_at_last_check = False

    def start(self) -> None:
        """Arm the safety net (on the event thread, or before the loop runs)."""
        if self._recheck_seconds is not None:
            self._loop.call_later(self._recheck_seconds, self._recheck)

    # --- snapshot (pyvmm/core/snapshot.py) --------------------------------------------

    def save_state(self) -> dict:
        """The guest connection (partial request, queued replies and watch
        events, its watches and transactions) and the server's own copies of
        the ring indexes it publishes. The ring itself (the guest's indexes
        and bytes) is guest RAM. Event thread, VM paused: no request is half
        served, each one is answered as soon as it is whole."""
        if self.ring._busy:
            raise SnapshotError("GuestStoreService: saved while serving the ring")
        return versioned(STATE_VERSION, connection=self.connection.save_state(), ring=self.ring.save_state(),
                         lost_wakeups=self.lost_wakeups)

    def restore_state(self, state: dict) -> None:
        """After XenStore.restore_state(). The ring is served again at the
        first notification, which EventChannels.finish_restore() makes."""
        check_version(state, "GuestStoreService", STATE_VERSION)
        lost = state.get("lost_wakeups")
        if not isinstance(lost, int) or isinstance(lost, bool) or lost < 0:
            raise SnapshotError("GuestStoreService: bad lost_wakeups")
        self.ring.restore_state(state.get("ring"))  # checked first: it changes nothing it refuses
        self.connection.restore_state(state.get("connection"))
        self.lost_wakeups = lost

    # --- event thread ------------------------------------------------------------

    def notified(self) -> None:
        """The guest signalled the store port (or output is waiting): serve the ring."""
        if self._check_threads:
            self._loop.assert_owner("the guest's xenstore")
        self._flush_scheduled = False
        if self.ring.process():
            self.requests_served += 1
            self._notify_guest()
        if self.ring.work_pending:  # the budget stopped it: the rest after other work
            self._loop.call_later(0, self.notified)

    def _output_appeared(self) -> None:
        # Called from inside the store's event delivery, on the event thread:
        # flush once the current request is done.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon_threadsafe(self.notified)

    def _recheck(self) -> None:
        # Transactions a silent guest left open release their copies here.
        self._store.expire_transactions()
        # Each check compares with the one before, so only work that waited
        # a whole interval with nothing moving counts: an event that is
        # merely queued behind this timer on the loop is not a lost one.
        ring = self.ring
        progress = (self.requests_served, ring.unread_replies())
        stalled = progress == self._progress_at_last_check
        if ring.has_work():
            if stalled and self._work_at_last_check:
                self._lost_wakeup("requests or replies waited for the VMM")
                self.notified()
            self._work_at_last_check = True
        else:
            self._work_at_last_check = False
            # Replies the guest has not touched for a whole interval: its
            # signal may have been lost on the way in. Another is harmless.
            if progress[1] and stalled and self._unread_at_last_check:
                self._lost_wakeup("replies waited for the guest")
                self._notify_guest()
            self._unread_at_last_check = bool(progress[1])
        self._progress_at_last_check = (self.requests_served, ring.unread_replies())
        self._loop.call_later(self._recheck_seconds, self._recheck)

    def _lost_wakeup(self, what: str) -> None:
        self.lost_wakeups += 1
        level = logging.WARNING if self.lost_wakeups == 1 else logging.DEBUG
        log.log(level, "xenstore of domain %d: %s with no event announcing it (%d times so far): %s",
                self.connection.domid, what, self.lost_wakeups, self.ring.snapshot())
