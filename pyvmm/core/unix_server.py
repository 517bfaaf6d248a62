"""A unix stream socket server on the VMM's event loop, for local clients.

The plumbing that the control socket (control/server.py) and the xenstore socket
(xen/xenstore/socket_server.py) share: binding and unlinking the socket,
accepting only the VM owner's connections up to a limit, reading without
blocking, and writing queued output without ever blocking the loop. A
subclass supplies the protocol through a few hooks:

    _new_client(sock)        the per-connection state (a Client subclass)
    _connected(client)       a connection was accepted
    _receive(client)         read what the client sent (default: recv; the
                             control socket also takes file descriptors)
    _received(client, data)  bytes arrived (the output is flushed after it)
    _eof(client)             the client finished sending (default: drop it)
    _disconnected(client)    the client is being dropped: release its state
    _pending(client)         the bytes to write next (b"" when nothing is queued)
    _sent(client, count)     the first `count` of those were written
    _backlog(client)         bytes queued and not yet written
    _flushed(client)         after each flush of a client that is still connected

A client whose backlog passes `output_limit` is dropped, so one that does
not read can never make the loop buffer without bound.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from .kept import KEPT
from .runtime import bind_unix_socket, inode_of, peer_allowed, unlink_if_same

log = logging.getLogger(__name__)

RETRY_FIRST = 0.005  # seconds between attempts to flush a full socket
RETRY_MAX = 0.1
_ACCEPTS_PER_WAKEUP = 16  # so that a flood of connections cannot starve the loop


@dataclass(eq=False)
class Client:
    sock: socket.socket
    # Not constructor arguments, so that subclasses can add required fields.
    closed: bool = field(default=False, init=False)
    reading: bool = field(default=False, init=False)          # registered with the loop
    retry: object | None = field(default=None, init=False)    # token of the armed flush timer
    retry_delay: float = field(default=RETRY_FIRST, init=False)
    fd: int = field(init=False)

    def __post_init__(self) -> None:
        self.fd = self.sock.fileno()


class UnixStreamServer:
    """Serves a protocol on a unix socket at `path` (mode 0600).

    start(), close() and move_to() run on the loop thread (or while the loop
    is not running); a live socket at `path` makes start() raise
    runtime.SocketInUseError, a stale one is replaced.
    """

    log_name = "unix socket"       # prefix of log messages
    description = "unix socket"    # what the socket is, for errors and logs
    logger = log                   # subclasses log under their own module
    max_clients = 64
    output_limit = 1024 * 1024
    read_size = 64 * 1024
    stalled_message = "a client does not read (%d bytes queued); disconnecting it"
    client_label = ""              # "client " makes "client read failed"

    def __init__(self, path: str | os.PathLike, loop):
        self.path = Path(path)
        self._loop = loop
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._clients: dict[int, Client] = {}
        self._accept_paused = False

    # -- lifetime --------------------------------------------------------------

    def start(self) -> None:
        if self._listener is not None:
            raise RuntimeError(f"{self.log_name} server already started")
        self._listener = bind_unix_socket(self.path, self.description)
        self._inode = inode_of(self.path)
        self._loop.add_reader(self._listener.fileno(), self._on_accept)
        self.logger.debug("%s listening at %s", self.description, self.path)

    def close(self) -> None:
        """Stop listening, unlink the socket and disconnect every client."""
        self._stop_listening()
        for client in list(self._clients.values()):
            self._drop(client)

    def _stop_listening(self) -> None:
        if self._listener is not None:
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            # Only our own socket: a newer server may have replaced it. A
            # listener kept across reboots (pyvmm/core/kept.py) stays where it is.
            if not KEPT.holds_listener(("unix", os.fspath(self.path))):
                unlink_if_same(self.path, self._inode)

    def move_to(self, loop) -> None:
        """Continue on another event loop (the VMM builds a new one per boot);
        clients stay connected."""
        old = self._loop
        if self._listener is not None:
            old.remove_reader(self._listener.fileno())
        for client in self._clients.values():
            if client.reading:
                old.remove_reader(client.fd)
        self._loop = loop
        if self._listener is not None and not self._accept_paused:
            loop.add_reader(self._listener.fileno(), self._on_accept)
        for client in list(self._clients.values()):
            if client.reading:
                loop.add_reader(client.fd, partial(self._on_readable, client))
            client.retry = None  # a timer armed on the old loop is void
            self._flush(client)

    @property
    def client_count(self) -> int:
        return len(self._clients)

    # -- hooks -----------------------------------------------------------------

    def _new_client(self, sock: socket.socket) -> Client:
        return Client(sock)

    def _connected(self, client: Client) -> None:
        pass

    def _receive(self, client: Client) -> bytes:
        return client.sock.recv(self.read_size)

    def _received(self, client: Client, data: bytes) -> None:
        raise NotImplementedError

    def _eof(self, client: Client) -> None:
        self._drop(client)

    def _disconnected(self, client: Client) -> None:
        pass

    def _pending(self, client: Client) -> bytes:
        raise NotImplementedError

    def _sent(self, client: Client, count: int) -> None:
        raise NotImplementedError

    def _backlog(self, client: Client) -> int:
        raise NotImplementedError

    def _flushed(self, client: Client) -> None:
        pass

    # -- connections -----------------------------------------------------------

    def _on_accept(self) -> None:
        listener = self._listener
        for _ in range(_ACCEPTS_PER_WAKEUP):
            if listener is None:
                return
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                # Out of file descriptors, typically: pause rather than spin.
                self.logger.warning("%s: accept failed: %s; pausing for a second", self.log_name, error)
                self._loop.remove_reader(listener.fileno())
                self._accept_paused = True
                self._loop.call_later(1.0, self._resume_accept)
                return
            if len(self._clients) >= self.max_clients:
                self.logger.warning("%s: %d clients connected already; refusing another",
                                    self.log_name, self.max_clients)
                sock.close()
                continue
            if not peer_allowed(sock):
                self.logger.warning("%s: refusing a connection from another user", self.log_name)
                sock.close()
                continue
            sock.setblocking(False)
            client = self._new_client(sock)
            self._clients[client.fd] = client
            self._loop.add_reader(client.fd, partial(self._on_readable, client))
            client.reading = True
            self._connected(client)

    def _resume_accept(self) -> None:
        self._accept_paused = False
        if self._listener is not None:
            self._loop.add_reader(self._listener.fileno(), self._on_accept)

    def _drop(self, client: Client) -> None:
        if client.closed:
            return
        client.closed = True
        client.retry = None
        self._stop_reading(client)
        self._clients.pop(client.fd, None)
        self._disconnected(client)
        try:
            client.sock.close()
        except OSError:
            pass

    def _start_reading(self, client: Client) -> None:
        if not client.reading:
            self._loop.add_reader(client.fd, partial(self._on_readable, client))
            client.reading = True

    def _stop_reading(self, client: Client) -> None:
        if client.reading:
            self._loop.remove_reader(client.fd)
            client.reading = False

    # -- input -----------------------------------------------------------------

    def _on_readable(self, client: Client) -> None:
        if client.closed:
            return
        try:
            try:
                data = self._receive(client)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                self.logger.debug("%s: %sread failed: %s", self.log_name, self.client_label, error)
                self._drop(client)
                return
            if not data:
                self._eof(client)
                return
            self._received(client, data)
            self._flush(client)
        except Exception:
            self.logger.exception("%s: dropping a client after an unexpected error", self.log_name)
            self._drop(client)

    # -- output ----------------------------------------------------------------

    def _flush(self, client: Client) -> None:
        while not client.closed:
            data = self._pending(client)
            if not data:
                break
            try:
                sent = client.sock.send(data, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as error:
                self.logger.debug("%s: %swrite failed: %s", self.log_name, self.client_label, error)
                self._drop(client)
                return
            self._sent(client, sent)
            client.retry_delay = RETRY_FIRST
        if client.closed:
            return
        backlog = self._backlog(client)
        if backlog > self.output_limit:
            self.logger.warning("%s: " + self.stalled_message, self.log_name, backlog)
            self._drop(client)
            return
        self._flushed(client)
        if client.closed:
            return
        if backlog == 0:
            client.retry = None
        elif client.retry is None:
            # The loop only watches for input, so a full socket is retried on a timer.
            token = client.retry = object()
            self._loop.call_later(client.retry_delay, partial(self._retry, client, token))
            client.retry_delay = min(client.retry_delay * 2, RETRY_MAX)

    def _retry(self, client: Client, token: object) -> None:
        if client.closed or client.retry is not token:
            return
        client.retry = None
        self._guarded_flush(client)

    def _guarded_flush(self, client: Client) -> None:
        # Called from a timer or callback, where an exception would reach the loop.
        try:
            self._flush(client)
        except Exception:
            self.logger.exception("%s: dropping a client after an unexpected error", self.log_name)
            self._drop(client)
