"""The control socket: a QMP-like JSON protocol for managing a running VM.

One JSON object per line in each direction, UTF-8, over a unix socket
(docs/CONTROL.md has the whole protocol and the command set):

    <- {"pyvmm": {"version": "0.1.0", "name": "web", "pid": 4242}}
    -> {"execute": "status", "id": 1}
    <- {"return": {"name": "web", "state": "running", ...}, "id": 1}
    <- {"event": "STOP", "data": {...}, "timestamp": {"seconds": ..., "microseconds": ...}}

`ControlServer` runs on the VMM's event loop: commands are plain callables
run on the loop thread. Everything a client sends is untrusted: bad JSON,
unknown commands, oversized lines and failing commands are answered with
error replies, and a client that stops reading is disconnected once its
output backlog passes a limit, so it can never block the loop or make it
buffer without bound.

`ControlClient` is the blocking client for the CLI and tests; `list_vms()`
asks every VM in the runtime directory for its status.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable

from .. import __version__
from ..core.runtime import (
    CONTROL_SUFFIX,
    control_socket_path,
    inode_of,
    runtime_dir,
    socket_is_live,
    unlink_if_same,
)
from ..core.unix_server import Client, UnixStreamServer

log = logging.getLogger(__name__)

LINE_MAX = 64 * 1024            # a request line longer than this is refused
MAX_FDS = 4                     # file descriptors a connection may have waiting for a command
OUTPUT_LIMIT = 4 * 1024 * 1024  # a client with more unsent output is disconnected
MAX_CLIENTS = 64
_RECV_SIZE = 64 * 1024

# Error classes of the protocol itself; commands add their own (docs/CONTROL.md).
PARSE_ERROR = "ParseError"
INVALID_REQUEST = "InvalidRequest"
REQUEST_TOO_LARGE = "RequestTooLarge"
COMMAND_NOT_FOUND = "CommandNotFound"
INVALID_ARGUMENT = "InvalidArgument"
INTERNAL_ERROR = "InternalError"
# ... and those the VMM's commands use.
UNSUPPORTED = "Unsupported"
INVALID_STATE = "InvalidState"
XENSTORE_ERROR = "XenstoreError"
SNAPSHOT_ERROR = "SnapshotError"

_REQUEST_KEYS = frozenset({"execute", "arguments", "id"})

Command = Callable[[dict], object]


class ControlError(Exception):
    """An error reply: `cls` is its class (e.g. "CommandNotFound"), `desc` says what went wrong.

    Raised by a command to answer with an error, and by ControlClient.execute
    when the VM answered with one.
    """

    def __init__(self, cls: str, desc: str):
        super().__init__(f"{cls}: {desc}")
        self.cls = cls
        self.desc = desc


class ControlConnectionError(Exception):
    """The control connection failed: nothing listens, it broke, or the peer is no pyvmm."""


class NotRunningError(ControlConnectionError):
    """No VM of that name is running: its socket is missing or refuses connections."""


def timestamp() -> dict:
    now = time.time()
    seconds = int(now)
    return {"seconds": seconds, "microseconds": int((now - seconds) * 1_000_000)}


def make_greeting(name: str) -> dict:
    """The greeting a VMM sends: {"version", "name", "pid"}."""
    return {"version": __version__, "name": name, "pid": os.getpid()}


def _reject_constant(text: str):
    raise ValueError(f"{text} is not JSON")


def _decode_json(line: bytes):
    return json.loads(line.decode("utf-8"), parse_constant=_reject_constant)


def _encode_json(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode("utf-8") + b"\n"


# --- the server -------------------------------------------------------------------

@dataclass(eq=False)
class _Client(Client):
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    discarding: bool = False     # skipping the rest of an oversized line
    eof: bool = False            # the client has finished sending; close once flushed
    fds: list = field(default_factory=list)  # descriptors it sent (SCM_RIGHTS), for the command they came with


class ControlServer(UnixStreamServer):
    """Serves the control protocol on a unix socket at `path` (mode 0600).

    `commands` maps command names to callables taking the request's
    `arguments` object and returning a JSON-serialisable result (None is
    sent as {}). They run on the loop thread. A ControlError they raise
    becomes an error reply; any other exception an "InternalError" reply
    and a log line. `greeting` is sent as {"pyvmm": greeting} on connect.

    start(), close(), broadcast() and move_to() must be called on the loop
    thread (or while the loop is not running); broadcast_threadsafe() from
    anywhere. start() replaces a stale socket at `path`; a live one (a
    running VM of the same name) raises runtime.SocketInUseError.
    """

    log_name = "control"
    description = "control socket"
    logger = log
    max_clients = MAX_CLIENTS
    output_limit = OUTPUT_LIMIT
    read_size = _RECV_SIZE
    stalled_message = "a client does not read its replies (%d bytes queued); disconnecting"
    client_label = "client "

    def __init__(self, path: str | os.PathLike, loop, commands: dict[str, Command], greeting: dict):
        super().__init__(path, loop)
        self._commands = dict(commands)
        self._greeting = dict(greeting)
        self._answering: _Client | None = None  # whose request a command is running for

    def take_fd(self) -> int | None:
        """For a command, while it runs: a file descriptor its client sent
        with the request (SCM_RIGHTS), now the command's to close; None if
        none came. A client's descriptors that no command takes are closed
        once its request lines are answered."""
        client = self._answering
        if client is None or not client.fds:
            return None
        return client.fds.pop(0)

    def close(self, flush_timeout: float = 0.5) -> None:
        """Stop listening, unlink the socket, give clients up to
        `flush_timeout` seconds in all to receive what is queued for them
        (a last STOP event), then disconnect them."""
        self._stop_listening()
        deadline = time.monotonic() + flush_timeout
        for client in list(self._clients.values()):
            if client.outbuf and not client.closed:
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    try:
                        client.sock.settimeout(remaining)
                        client.sock.sendall(client.outbuf)
                    except OSError:
                        pass
            self._drop(client)

    # -- events ----------------------------------------------------------------

    def broadcast(self, name: str, data: dict | None = None) -> None:
        """Send event `name` with `data` to every connected client."""
        message = {"event": name, "data": {} if data is None else data, "timestamp": timestamp()}
        try:
            line = _encode_json(message)
        except (TypeError, ValueError) as error:
            log.error("control: cannot encode event %s: %s", name, error)
            return
        for client in list(self._clients.values()):
            if not client.closed:
                client.outbuf += line
                self._flush(client)

    def broadcast_threadsafe(self, name: str, data: dict | None = None) -> None:
        self._loop.call_soon_threadsafe(partial(self.broadcast, name, data))

    # -- connections -----------------------------------------------------------

    def _new_client(self, sock: socket.socket) -> _Client:
        return _Client(sock)

    def _connected(self, client: _Client) -> None:
        self._send(client, {"pyvmm": self._greeting})
        self._flush(client)

    def _disconnected(self, client: _Client) -> None:
        client.inbuf.clear()
        client.outbuf.clear()
        self._close_fds(client)

    @staticmethod
    def _close_fds(client: _Client) -> None:
        fds, client.fds = client.fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def _receive(self, client: _Client) -> bytes:
        data, fds, _, _ = socket.recv_fds(client.sock, self.read_size, MAX_FDS, socket.MSG_CMSG_CLOEXEC)
        if fds:
            client.fds += fds
            while len(client.fds) > MAX_FDS:
                os.close(client.fds.pop(0))
        return data

    def _eof(self, client: _Client) -> None:
        # Answer what was sent before the end; _flushed closes the connection after.
        client.eof = True
        self._stop_reading(client)
        if client.inbuf and not client.discarding:
            line = bytes(client.inbuf)  # a last request without its newline
            client.inbuf.clear()
            self._request(client, line)
        self._flush(client)

    # -- requests --------------------------------------------------------------

    def _received(self, client: _Client, data: bytes) -> None:
        try:
            self._received_lines(client, data)
        finally:
            if not client.inbuf:  # every line answered: what no command took is closed
                self._close_fds(client)

    def _received_lines(self, client: _Client, data: bytes) -> None:
        start = 0
        while not client.closed:
            newline = data.find(b"\n", start)
            if newline < 0:
                break
            piece = data[start:newline]
            start = newline + 1
            if client.discarding:
                client.discarding = False
                continue
            if len(client.inbuf) + len(piece) > LINE_MAX:
                client.inbuf.clear()
                self._too_large(client)
                continue
            client.inbuf += piece
            line = bytes(client.inbuf)
            client.inbuf.clear()
            self._request(client, line)
        rest = data[start:]
        if client.discarding or client.closed:
            return
        if len(client.inbuf) + len(rest) > LINE_MAX:
            client.inbuf.clear()
            client.discarding = True
            self._too_large(client)
        else:
            client.inbuf += rest

    def _too_large(self, client: _Client) -> None:
        self._send(client, _error_reply(REQUEST_TOO_LARGE,
                                        f"request line longer than {LINE_MAX} bytes", None, False))

    def _request(self, client: _Client, line: bytes) -> None:
        self._answering = client
        try:
            reply = self._answer(line)
        finally:
            self._answering = None
        if reply is not None:
            self._send(client, reply)

    def _answer(self, line: bytes) -> dict | None:
        if not line.strip():
            return None  # blank lines are allowed (typing by hand)
        try:
            request = _decode_json(line)
        except (UnicodeDecodeError, ValueError, RecursionError) as error:
            return _error_reply(PARSE_ERROR, f"invalid JSON: {error}", None, False)
        if not isinstance(request, dict):
            return _error_reply(INVALID_REQUEST, "a request must be a JSON object", None, False)
        has_id = "id" in request
        request_id = request.get("id")
        unexpected = sorted(set(request) - _REQUEST_KEYS)
        if unexpected:
            return _error_reply(INVALID_REQUEST, f"unexpected member(s) {', '.join(map(repr, unexpected))}"[:200],
                                request_id, has_id)
        command = request.get("execute")
        if not isinstance(command, str):
            return _error_reply(INVALID_REQUEST, "'execute' must name a command", request_id, has_id)
        arguments = request.get("arguments", {})
        if not isinstance(arguments, dict):
            return _error_reply(INVALID_REQUEST, "'arguments' must be an object", request_id, has_id)
        handler = self._commands.get(command)
        if handler is None and command == "query-commands":
            handler = self._query_commands
        if handler is None:
            return _error_reply(COMMAND_NOT_FOUND, f"unknown command {command[:100]!r}", request_id, has_id)
        try:
            result = handler(arguments)
        except ControlError as error:
            return _error_reply(str(error.cls), str(error.desc), request_id, has_id)
        except Exception as error:
            log.exception("control: command %s failed", command)
            return _error_reply(INTERNAL_ERROR, f"command {command} failed: {error}", request_id, has_id)
        reply = {"return": {} if result is None else result}
        if has_id:
            reply["id"] = request_id
        return reply

    def _query_commands(self, arguments: dict) -> list[str]:
        return sorted(set(self._commands) | {"query-commands"})

    # -- output ----------------------------------------------------------------

    def _send(self, client: _Client, message: dict) -> None:
        try:
            line = _encode_json(message)
        except (TypeError, ValueError) as error:
            log.error("control: cannot encode a reply: %s", error)
            replacement = _error_reply(INTERNAL_ERROR, f"the result cannot be sent as JSON: {error}",
                                       message.get("id"), "id" in message)
            try:
                line = _encode_json(replacement)
            except (TypeError, ValueError):
                line = _encode_json(_error_reply(INTERNAL_ERROR, "the result cannot be sent as JSON",
                                                 None, False))
        client.outbuf += line

    def _pending(self, client: _Client) -> bytearray:
        return client.outbuf

    def _sent(self, client: _Client, count: int) -> None:
        del client.outbuf[:count]

    def _backlog(self, client: _Client) -> int:
        return len(client.outbuf)

    def _flushed(self, client: _Client) -> None:
        if client.eof and not client.outbuf:
            self._drop(client)


def _error_reply(cls: str, desc: str, request_id: Any, has_id: bool) -> dict:
    reply: dict = {"error": {"class": cls, "desc": desc}}
    if has_id:
        reply["id"] = request_id
    return reply


# --- the client -------------------------------------------------------------------

def _vm_name(path: str) -> str:
    base = os.path.basename(path)
    return base[:-len(CONTROL_SUFFIX)] if base.endswith(CONTROL_SUFFIX) else base


class ControlClient:
    """A blocking client of one VM's control socket.

        with ControlClient(control_socket_path("web")) as vm:
            print(vm.greeting["pid"], vm.execute("status")["state"])
            vm.execute("shutdown", timeout=60)
            vm.wait_event(["SHUTDOWN", "STOP"], timeout=60)

    Raises NotRunningError when nothing answers at `path`. Every wait is
    bounded by `timeout` seconds (None: unbounded) and raises TimeoutError.
    """

    _BUFFER_MAX = 64 * 1024 * 1024

    def __init__(self, path: str | os.PathLike, timeout: float | None = 10.0):
        self.path = os.fspath(path)
        self.timeout = timeout
        self.greeting: dict = {}
        self._buffer = bytearray()
        self._events: deque[dict] = deque()
        self._next_id = 1
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.settimeout(timeout)
            try:
                self._sock.connect(self.path)
            except (FileNotFoundError, ConnectionRefusedError):
                raise NotRunningError(
                    f"no VM named {_vm_name(self.path)!r} is running (nothing answers at {self.path})") from None
            except socket.timeout:
                raise ControlConnectionError(f"timed out connecting to {self.path}") from None
            except OSError as error:
                raise ControlConnectionError(f"cannot connect to {self.path}: {error.strerror or error}") from None
            greeting = self._read_message(self._deadline(timeout))
            if not isinstance(greeting.get("pyvmm"), dict):
                raise ControlConnectionError(f"{self.path} is not a pyvmm control socket")
            self.greeting = greeting["pyvmm"]
        except BaseException:
            self._sock.close()
            raise

    @classmethod
    def for_vm(cls, name: str, timeout: float | None = 10.0) -> "ControlClient":
        """Connect to the VM called `name` in the runtime directory."""
        return cls(control_socket_path(name), timeout)

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def execute(self, command: str, /, **arguments) -> Any:
        """Run `command` and return its result; an error reply raises ControlError."""
        return self.execute_with_fds(command, [], **arguments)

    def execute_with_fds(self, command: str, fds: list[int], /, **arguments) -> Any:
        """execute(), the request carrying open file descriptors `fds` (SCM_RIGHTS):
        `snapshot` writes into the file its client opened."""
        request_id = self._next_id
        self._next_id += 1
        request: dict = {"execute": command, "id": request_id}
        if arguments:
            request["arguments"] = arguments
        self._send_line(_encode_json(request), fds)
        deadline = self._deadline(self.timeout)
        while True:
            message = self._read_message(deadline)
            if "event" in message:
                self._events.append(message)
                continue
            if message.get("id") != request_id:
                log.debug("control client: ignoring a stray message %.200r", message)
                continue
            if "error" in message:
                error = message["error"] if isinstance(message["error"], dict) else {}
                raise ControlError(str(error.get("class", "GenericError")), str(error.get("desc", "")))
            return message.get("return")

    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are (for tests of the server's error handling)."""
        self._send_line(data)

    def read_message(self, timeout: float | None = None) -> dict:
        """The next message, whatever it is (for tests); events are not queued."""
        if self._events:
            return self._events.popleft()
        return self._read_message(self._deadline(self.timeout if timeout is None else timeout))

    def wait_event(self, names: str | Iterable[str], timeout: float | None = None) -> dict:
        """The first event called one of `names`, received now or earlier;
        other events stay queued. TimeoutError after `timeout` seconds
        (None: wait as long as the connection lasts)."""
        wanted = {names} if isinstance(names, str) else set(names)
        for index, event in enumerate(self._events):
            if event.get("event") in wanted:
                del self._events[index]
                return event
        deadline = self._deadline(timeout)
        while True:
            message = self._read_message(deadline)
            if "event" not in message:
                continue  # a late reply nobody waits for
            if message.get("event") in wanted:
                return message
            self._events.append(message)

    @property
    def queued_events(self) -> list[dict]:
        return list(self._events)

    # -- plumbing --------------------------------------------------------------

    @staticmethod
    def _deadline(timeout: float | None) -> float | None:
        return None if timeout is None else time.monotonic() + timeout

    def _send_line(self, data: bytes, fds: list[int] = ()) -> None:
        try:
            self._sock.settimeout(self.timeout)
            if fds:
                # The descriptors ride on the first byte of the line (as the
                # server reads them, before the line is complete).
                sent = socket.send_fds(self._sock, [data], list(fds))
                data = data[sent:]
            self._sock.sendall(data)
        except socket.timeout:
            raise TimeoutError(f"timed out sending to {self.path}") from None
        except (BrokenPipeError, ConnectionResetError):
            raise ControlConnectionError(f"the VM closed the control connection ({self.path})") from None
        except OSError as error:
            raise ControlConnectionError(f"control connection to {self.path} failed: {error}") from None

    def _read_message(self, deadline: float | None) -> dict:
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                line = bytes(self._buffer[:newline])
                del self._buffer[:newline + 1]
                if not line.strip():
                    continue
                try:
                    message = _decode_json(line)
                except (UnicodeDecodeError, ValueError, RecursionError) as error:
                    raise ControlConnectionError(f"malformed message from {self.path}: {error}") from None
                if not isinstance(message, dict):
                    raise ControlConnectionError(f"malformed message from {self.path}: not an object")
                return message
            if len(self._buffer) > self._BUFFER_MAX:
                raise ControlConnectionError(f"message from {self.path} too long")
            if deadline is None:
                self._sock.settimeout(None)
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no answer from {self.path} in time")
                self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(_RECV_SIZE)
            except socket.timeout:
                raise TimeoutError(f"no answer from {self.path} in time") from None
            except OSError as error:
                raise ControlConnectionError(f"control connection to {self.path} failed: {error}") from None
            if not data:
                raise ControlConnectionError(f"the VM closed the control connection ({self.path})")
            self._buffer += data


# --- every VM of this user ----------------------------------------------------------

def list_vms(directory: str | os.PathLike | None = None, timeout: float = 2.0) -> list[dict]:
    """The `status` of every VM with a control socket in `directory` (the
    runtime directory by default), sorted by socket name. Each dict also
    has "control_socket". A VM that does not answer properly is listed as
    {"name", "control_socket", "state": "unresponsive", "error"}. Stale
    sockets (connecting is refused) are removed."""
    directory = runtime_dir(create=False) if directory is None else Path(directory)
    if not directory.is_dir():
        return []
    vms = []
    for path in sorted(directory.glob("*" + CONTROL_SUFFIX)):
        try:
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                continue
        except OSError:
            continue
        name = _vm_name(str(path))
        inode = inode_of(path)
        try:
            with ControlClient(path, timeout) as client:
                status = client.execute("status")
        except NotRunningError:
            if socket_is_live(path) is False:
                log.info("removing stale control socket %s", path)
                unlink_if_same(path, inode)
            continue
        except (ControlError, ControlConnectionError, TimeoutError) as error:
            vms.append({"name": name, "control_socket": str(path), "state": "unresponsive",
                        "error": str(error)})
            continue
        entry = dict(status) if isinstance(status, dict) else {"name": name}
        entry.setdefault("name", name)
        entry["control_socket"] = str(path)
        vms.append(entry)
    return vms
