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
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ...runtime import bind_unix_socket, inode_of, peer_allowed, unlink_if_same
from .protocol import HEADER_SIZE, PAYLOAD_MAX, Connection
from .store import XenStore

log = logging.getLogger(__name__)

OUTPUT_LIMIT = 1024 * 1024   # queued bytes (mostly watch events) before a client is dropped
MAX_CLIENTS = 64
_CHUNK = 64 * 1024           # bytes of output taken from the connection at a time
# Request bytes read at a time: at most one full message, so that one read
# cannot make the store queue much more than OUTPUT_LIMIT in replies.
_READ_SIZE = HEADER_SIZE + PAYLOAD_MAX
_RETRY_FIRST = 0.005         # seconds between attempts to flush a full socket
_RETRY_MAX = 0.1


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    conn: Connection
    unsent: bytes = b""          # taken from the connection, not yet accepted by the socket
    reading: bool = False
    closed: bool = False
    flush_scheduled: bool = False
    retry: object | None = None  # token of the armed flush timer
    retry_delay: float = _RETRY_FIRST
    fd: int = field(init=False)

    def __post_init__(self) -> None:
        self.fd = self.sock.fileno()

    @property
    def backlog(self) -> int:
        return len(self.unsent) + self.conn.pending_output()


class XenstoreSocketServer:
    """Serves `store` to privileged domain-0 clients on a unix socket at `path` (mode 0600).

    start() and close() run on the loop thread (or while the loop is not
    running); a live socket at `path` makes start() raise
    runtime.SocketInUseError, a stale one is replaced.
    """

    def __init__(self, path: str | os.PathLike, loop, store: XenStore):
        self.path = Path(path)
        self._loop = loop
        self._store = store
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._clients: dict[int, _Client] = {}

    def start(self) -> None:
        if self._listener is not None:
            raise RuntimeError("xenstore socket server already started")
        self._listener = bind_unix_socket(self.path, "xenstore socket")
        self._inode = inode_of(self.path)
        self._loop.add_reader(self._listener.fileno(), self._on_accept)
        log.debug("xenstore socket listening at %s", self.path)

    def close(self) -> None:
        """Disconnect every client (dropping their watches and transactions) and unlink the socket."""
        if self._listener is not None:
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            unlink_if_same(self.path, self._inode)
        for client in list(self._clients.values()):
            self._drop(client)

    @property
    def client_count(self) -> int:
        return len(self._clients)

    # -- connections -----------------------------------------------------------

    def _on_accept(self) -> None:
        listener = self._listener
        for _ in range(16):
            if listener is None:
                return
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                log.warning("xenstore socket: accept failed: %s; pausing for a second", error)
                self._loop.remove_reader(listener.fileno())
                self._loop.call_later(1.0, self._resume_accept)
                return
            if len(self._clients) >= MAX_CLIENTS:
                log.warning("xenstore socket: %d clients connected already; refusing another", MAX_CLIENTS)
                sock.close()
                continue
            if not peer_allowed(sock):
                log.warning("xenstore socket: refusing a connection from another user")
                sock.close()
                continue
            sock.setblocking(False)
            client = _Client(sock, self._store.connect(0, privileged=True))
            client.conn.output_listener = partial(self._schedule_flush, client)
            self._clients[client.fd] = client
            self._loop.add_reader(client.fd, partial(self._on_readable, client))
            client.reading = True

    def _resume_accept(self) -> None:
        if self._listener is not None:
            self._loop.add_reader(self._listener.fileno(), self._on_accept)

    def _drop(self, client: _Client) -> None:
        if client.closed:
            return
        client.closed = True
        client.retry = None
        if client.reading:
            self._loop.remove_reader(client.fd)
            client.reading = False
        self._clients.pop(client.fd, None)
        client.conn.output_listener = None
        client.conn.close()  # its watches and open transactions go with it
        try:
            client.sock.close()
        except OSError:
            pass

    # -- input -----------------------------------------------------------------

    def _on_readable(self, client: _Client) -> None:
        if client.closed:
            return
        try:
            try:
                data = client.sock.recv(_READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                log.debug("xenstore socket: read failed: %s", error)
                self._drop(client)
                return
            if not data:
                self._drop(client)
                return
            client.conn.feed(data)
            if client.conn.broken:
                log.warning("xenstore socket: protocol error from a client; disconnecting it")
                self._drop(client)
                return
            self._flush(client)
        except Exception:
            log.exception("xenstore socket: dropping a client after an unexpected error")
            self._drop(client)

    # -- output ----------------------------------------------------------------

    def _schedule_flush(self, client: _Client) -> None:
        # Called from inside the store's event delivery: flush right after it.
        if not client.flush_scheduled and not client.closed:
            client.flush_scheduled = True
            self._loop.call_soon_threadsafe(partial(self._scheduled_flush, client))

    def _scheduled_flush(self, client: _Client) -> None:
        client.flush_scheduled = False
        if client.closed:
            return
        try:
            self._flush(client)
        except Exception:
            log.exception("xenstore socket: dropping a client after an unexpected error")
            self._drop(client)

    def _flush(self, client: _Client) -> None:
        conn = client.conn
        while not client.closed:
            if not client.unsent:
                if not conn.pending_output():
                    break
                client.unsent = conn.take_output(_CHUNK)
            try:
                sent = client.sock.send(client.unsent, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as error:
                log.debug("xenstore socket: write failed: %s", error)
                self._drop(client)
                return
            client.unsent = client.unsent[sent:]
            client.retry_delay = _RETRY_FIRST
        if client.closed:
            return
        if client.backlog > OUTPUT_LIMIT:
            log.warning("xenstore socket: a client does not read (%d bytes queued); disconnecting it",
                        client.backlog)
            self._drop(client)
            return
        # Replies queue only while requests are read: stop reading from a
        # client that does not take its output, resume once it has.
        wants_input = conn.accepting_input
        if wants_input and not client.reading:
            self._loop.add_reader(client.fd, partial(self._on_readable, client))
            client.reading = True
        elif not wants_input and client.reading:
            self._loop.remove_reader(client.fd)
            client.reading = False
        if client.backlog == 0:
            client.retry = None
        elif client.retry is None:
            # The loop only watches for input, so a full socket is retried on a timer.
            token = client.retry = object()
            self._loop.call_later(client.retry_delay, partial(self._retry, client, token))
            client.retry_delay = min(client.retry_delay * 2, _RETRY_MAX)

    def _retry(self, client: _Client, token: object) -> None:
        if client.closed or client.retry is not token:
            return
        client.retry = None
        try:
            self._flush(client)
        except Exception:
            log.exception("xenstore socket: dropping a client after an unexpected error")
            self._drop(client)
