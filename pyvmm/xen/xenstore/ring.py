"""The xenstore ring page shared with a guest, and a server loop over it.

Layout of `struct xenstore_domain_interface` (xs_wire.h, xenstore-ring.txt):

    0     req[1024]        requests, guest -> server
    1024  rsp[1024]        replies and watch events, server -> guest
    2048  req_cons  2052 req_prod  2056 rsp_cons  2060 rsp_prod   (u32, free running)
    2064  server_features  2068 connection  2072 error

The guest owns req_prod and rsp_cons and may write anything into them at
any time.  The server keeps its own indices (req_cons, rsp_prod) privately
and only publishes them, so a guest scribbling over them cannot make the
server re-read or overwrite data.  A producer/consumer distance above the
ring size is a broken ring: the server sets the error field and stops, as
xenstored does, until the guest asks for a reconnection.

Ordering: the data is copied before the index that publishes it is
written, and an index is read before the data it covers.  CPython performs
these memoryview stores in program order and x86 does not reorder stores
with stores or loads with loads, so no explicit barrier is needed.
"""

from __future__ import annotations

import logging

from pyvmm.core.atomic import SharedWords
from pyvmm.core.snapshot import SnapshotError
from .protocol import RING_ERROR_NONE, RING_ERROR_PROTO, RING_ERROR_RINGIDX, Connection
from pyvmm.core.ratelimit import DEFAULT_LOG_RATE, LogRate

log = logging.getLogger(__name__)

RING_SIZE = 1024
REQ_OFFSET = 0
RSP_OFFSET = 1024
REQ_CONS = 2048
REQ_PROD = 2052
RSP_CONS = 2056
RSP_PROD = 2060
SERVER_FEATURES = 2064
CONNECTION = 2068
ERROR = 2072
INTERFACE_SIZE = 2076

FEATURE_RECONNECTION = 1
FEATURE_ERROR = 2
CONNECTED = 0
RECONNECT = 1

DEFAULT_BUDGET = 8192  # request bytes consumed per process() call

_MASK32 = 0xFFFFFFFF


class RingServer:
    """Serves one guest's xenstore ring on behalf of a store `Connection`.

    Call process() whenever the guest signals the event channel, and when the
    connection's `output_listener` reports queued watch events.
    """

    def __init__(self, page: memoryview, connection: Connection, *, budget: int = DEFAULT_BUDGET,
                 log_rate: LogRate = DEFAULT_LOG_RATE):
        self._limited = log_rate.limited(log)  # lines whose rate the guest sets
        page = memoryview(page).cast("B")
        if page.readonly:
            raise ValueError("the xenstore ring page must be writable")
        if len(page) < INTERFACE_SIZE:
            raise ValueError(f"xenstore ring page of {len(page)} bytes, need {INTERFACE_SIZE}")
        if budget <= 0:
            raise ValueError("budget must be positive")
        self._page = page
        words = SharedWords(page)  # indices read and written whole
        self._load_u32 = words.load
        self._store_u32 = words.store
        self.connection = connection
        self.budget = budget
        self.work_pending = False  # stopped by the budget with requests still waiting
        self._busy = False
        # Advertise before touching any data; bits are never withdrawn.
        self._store_u32(SERVER_FEATURES,
                        self._load_u32(SERVER_FEATURES) | FEATURE_RECONNECTION | FEATURE_ERROR)
        self._req_cons = self._load_u32(REQ_CONS)
        self._rsp_prod = self._load_u32(RSP_PROD)
        self.error = self._load_u32(ERROR)

    def snapshot(self) -> dict:
        """The ring's indices as the guest sees them and as the server keeps
        them, and the connection's backlog; changes nothing."""
        return {
            "req_cons": self._load_u32(REQ_CONS), "req_prod": self._load_u32(REQ_PROD),
            "rsp_cons": self._load_u32(RSP_CONS), "rsp_prod": self._load_u32(RSP_PROD),
            "server_req_cons": self._req_cons, "server_rsp_prod": self._rsp_prod,
            "error": self.error,
            "queued": self.connection.pending_output(),
            "answered": self.connection.requests_answered,
        }

    # -- snapshot (GuestStoreService) ----------------------------------------

    def save_state(self) -> dict:
        """What the server trusts of the indexes it publishes (the page may
        say otherwise: the guest can write it) and its error."""
        return {"req_cons": self._req_cons, "rsp_prod": self._rsp_prod, "error": self.error}

    def restore_state(self, state: dict) -> None:
        if not isinstance(state, dict) or not all(
                isinstance(state.get(key), int) and not isinstance(state.get(key), bool)
                and 0 <= state[key] <= _MASK32 for key in ("req_cons", "rsp_prod", "error")):
            raise SnapshotError(f"xenstore ring: bad state {state!r:.100}")
        self._req_cons, self._rsp_prod, self.error = state["req_cons"], state["rsp_prod"], state["error"]

    # -- page access -------------------------------------------------------

    def _copy_out(self, base: int, index: int, length: int) -> bytes:
        start = index & (RING_SIZE - 1)
        first = min(length, RING_SIZE - start)
        data = bytes(self._page[base + start:base + start + first])
        if first < length:
            data += bytes(self._page[base:base + length - first])
        return data

    def _copy_in(self, base: int, index: int, data: bytes) -> None:
        start = index & (RING_SIZE - 1)
        first = min(len(data), RING_SIZE - start)
        self._page[base + start:base + start + first] = data[:first]
        if first < len(data):
            self._page[base:base + len(data) - first] = data[first:]

    # -- the loop ----------------------------------------------------------

    def process(self, budget: int | None = None) -> bool:
        """Move requests in and replies out; True if the guest should be notified.

        At most `budget` request bytes are consumed, so a guest that keeps the
        ring full cannot hold the VMM here; `work_pending` then says to call
        again soon.  Never raises for anything the guest wrote.
        """
        if self._busy:  # re-entered from a store callback: the outer call continues
            return False
        self._busy = True
        try:
            return self._process(self.budget if budget is None else budget)
        finally:
            self._busy = False

    def _process(self, budget: int) -> bool:
        self.work_pending = False
        if self._load_u32(CONNECTION) == RECONNECT:
            self._reconnect()
            return True
        if self.error != RING_ERROR_NONE:
            return False
        notify = False
        connection = self.connection
        while True:
            # Requests first: their replies are queued behind any earlier
            # output, so the write below sends both in order.
            consumed = 0
            if budget > 0 and connection.accepting_input:
                consumed = self._read_requests(budget)
                if consumed is None:
                    return True
                budget -= consumed
            if connection.broken:
                self._fail(connection.error or RING_ERROR_PROTO)
                return True
            written = self._write_replies()
            if written is None:
                return True
            if not (written or consumed):
                break
            notify = True
            if not connection.pending_output() and not self._requests_waiting():
                break  # both directions drained: no need for an idle pass
        self.work_pending = budget <= 0 and self._requests_waiting() and self.connection.accepting_input
        return notify

    def has_work(self) -> bool:
        """Would process() move anything now? (The safety net's question.)"""
        if self._load_u32(CONNECTION) == RECONNECT:
            return True
        if self.error != RING_ERROR_NONE:
            return False
        if self._requests_waiting() and self.connection.accepting_input:
            return True
        room = RING_SIZE - ((self._rsp_prod - self._load_u32(RSP_CONS)) & _MASK32)
        return room > 0 and self.connection.pending_output() > 0

    def unread_replies(self) -> int:
        """Reply bytes published that the guest has not consumed yet."""
        return (self._rsp_prod - self._load_u32(RSP_CONS)) & _MASK32

    def _requests_waiting(self) -> bool:
        return (self._load_u32(REQ_PROD) - self._req_cons) & _MASK32 != 0

    def _read_requests(self, budget: int) -> int | None:
        available = (self._load_u32(REQ_PROD) - self._req_cons) & _MASK32
        if available > RING_SIZE:
            self._fail(RING_ERROR_RINGIDX, f"request producer is {available} bytes ahead")
            return None
        length = min(available, budget)
        if not length:
            return 0
        data = self._copy_out(REQ_OFFSET, self._req_cons, length)
        self._req_cons = (self._req_cons + length) & _MASK32
        self._store_u32(REQ_CONS, self._req_cons)
        self.connection.feed(data)
        return length

    def _write_replies(self) -> int | None:
        in_flight = (self._rsp_prod - self._load_u32(RSP_CONS)) & _MASK32
        if in_flight > RING_SIZE:
            self._fail(RING_ERROR_RINGIDX, f"reply consumer is {in_flight} bytes behind")
            return None
        # Replies that do not fit stay queued in the connection until the
        # guest makes room and signals again.
        data = self.connection.take_output(RING_SIZE - in_flight)
        if data:
            self._copy_in(RSP_OFFSET, self._rsp_prod, data)
            self._rsp_prod = (self._rsp_prod + len(data)) & _MASK32
            self._store_u32(RSP_PROD, self._rsp_prod)
        return len(data)

    def _fail(self, error: int, why: str = "protocol violation") -> None:
        self._limited.warning("xenstore ring of domain %d broken: %s", self.connection.domid, why)
        self.error = error
        self._store_u32(ERROR, error)
        # As xenstored: whatever was in flight, the watches and the
        # transactions are gone; only a reconnection revives the ring.
        self.connection.reset()

    def _reconnect(self) -> None:
        self._limited.info("xenstore ring of domain %d: reconnection requested", self.connection.domid)
        self.reset()

    def reset(self) -> None:
        """Start afresh: the connection's watches, transactions and queued
        messages are dropped and the ring is empty and healthy (a guest's
        reconnection request, or the domain's soft reset: its next kernel
        finds a quiescent ring, as after a toolstack's new introduce)."""
        self.connection.reset()
        self.work_pending = False
        self._req_cons = self._rsp_prod = 0
        for offset in (REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD):
            self._store_u32(offset, 0)
        self.error = RING_ERROR_NONE
        self._store_u32(ERROR, RING_ERROR_NONE)
        # Last: the guest ignores every other field until it sees this.
        self._store_u32(CONNECTION, CONNECTED)
