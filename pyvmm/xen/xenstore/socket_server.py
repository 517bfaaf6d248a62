"""The xenstore on a unix socket, for domain-0 tools on the host.

xenstored listens on /run/xenstored/socket; libxenstore (and through it
xenstore-read, xenstore-ls, xenstore-watch, ...) connects wherever
XENSTORED_PATH points. This server speaks the same wire protocol over the
VM's own socket:

    XENSTORED_PATH=$XDG_RUNTIME_DIR/pyvmm/NAME.xenstore xenstore-ls -s /local/domain/1

Each connection is a privileged domain-0 client of the store
(`store.connect(0, privileged=True)`) with its own watches and
transactions, dropped when it disconnects. Replies and watch events are
written without ever blocking the event loop; a client that stops reading
first stops being read from (so its requests cannot queue more replies),
and is disconnected once its backlog of watch events passes a limit.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from functools import partial

from pyvmm.core.unix_server import Client, UnixStreamServer
from .protocol import HEADER_SIZE, PAYLOAD_MAX, Connection
from .store import XenStore

log = logging.getLogger(__name__)

OUTPUT_LIMIT = 1024 * 1024   # queued bytes (mostly watch events) before a client is dropped
MAX_CLIENTS = 64
_CHUNK = 64 * 1024           # bytes of output taken from the connection at a time
# Request bytes read at a time: at most one full message, so that one read
# cannot make the store queue much more than OUTPUT_LIMIT in replies.
_READ_SIZE = HEADER_SIZE + PAYLOAD_MAX


@dataclass(eq=False)
class _Client(Client):
    conn: Connection
    unsent: bytes = b""          # taken from the connection, not yet accepted by the socket
    flush_scheduled: bool = False

    @property
    def backlog(self) -> int:
        return len(self.unsent) + self.conn.pending_output()


class XenstoreSocketServer(UnixStreamServer):
    """Serves `store` to privileged domain-0 clients on a unix socket at `path` (mode 0600).

    start() and close() run on the loop thread (or while the loop is not
    running); a live socket at `path` makes start() raise
    runtime.SocketInUseError, a stale one is replaced. close() disconnects
    every client, dropping their watches and transactions.
    """

    log_name = "xenstore socket"
    description = "xenstore socket"
    logger = log
    max_clients = MAX_CLIENTS
    output_limit = OUTPUT_LIMIT
    read_size = _READ_SIZE
    stalled_message = "a client does not read (%d bytes queued); disconnecting it"

    def __init__(self, path: str | os.PathLike, loop, store: XenStore):
        super().__init__(path, loop)
        self._store = store

    # -- connections -----------------------------------------------------------

    def _new_client(self, sock: socket.socket) -> _Client:
        client = _Client(sock, self._store.connect(0, privileged=True))
        client.conn.output_listener = partial(self._schedule_flush, client)
        return client

    def _disconnected(self, client: _Client) -> None:
        client.conn.output_listener = None
        client.conn.close()  # its watches and open transactions go with it

    # -- input -----------------------------------------------------------------

    def _received(self, client: _Client, data: bytes) -> None:
        client.conn.feed(data)
        if client.conn.broken:
            log.warning("xenstore socket: protocol error from a client; disconnecting it")
            self._drop(client)

    # -- output ----------------------------------------------------------------

    def _schedule_flush(self, client: _Client) -> None:
        # Called from inside the store's event delivery: flush right after it.
        if not client.flush_scheduled and not client.closed:
            client.flush_scheduled = True
            self._loop.call_soon_threadsafe(partial(self._scheduled_flush, client))

    def _scheduled_flush(self, client: _Client) -> None:
        client.flush_scheduled = False
        if not client.closed:
            self._guarded_flush(client)

    def _pending(self, client: _Client) -> bytes:
        if not client.unsent and client.conn.pending_output():
            client.unsent = client.conn.take_output(_CHUNK)
        return client.unsent

    def _sent(self, client: _Client, count: int) -> None:
        client.unsent = client.unsent[count:]

    def _backlog(self, client: _Client) -> int:
        return client.backlog

    def _flushed(self, client: _Client) -> None:
        # Replies queue only while requests are read: stop reading from a
        # client that does not take its output, resume once it has.
        if client.conn.accepting_input:
            self._start_reading(client)
        else:
            self._stop_reading(client)
