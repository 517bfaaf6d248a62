"""The xenstore wire protocol: message framing, op and error names, payloads.

Every message in either direction is a 16-byte header {type, req_id, tx_id,
len} (little-endian u32s) followed by `len` payload bytes, len <= 4096.
Requests carry NUL-terminated strings; errors travel as the *name* of an
errno ("EINVAL\\0"), never as a number.

`Connection` turns a byte stream from one client into calls on a store
`Client` and queues the encoded replies and watch events.  Everything the
client sends is hostile: a frame that cannot be resynchronised (a length over
the maximum) marks the connection broken instead of raising, and every other
malformation is answered with an ERROR reply.
"""

from __future__ import annotations

import enum
import logging
import struct
import time
from collections import Counter, deque
from contextlib import AbstractContextManager
from typing import Callable, Iterator, NamedTuple, Protocol, Sequence

from pyvmm.core.faults import NULL_FAULTS, FaultInjector
from pyvmm.core.trace import NULL_TRACE, Tracer
from pyvmm.core.stats import Counters
from pyvmm.limits import Limits
from pyvmm.core.ratelimit import DEFAULT_LOG_RATE, RateLimitedLog
from .errors import QuotaError, XenStoreError
from .perms import Permission
from pyvmm.core.snapshot import SnapshotError

log = logging.getLogger(__name__)

HEADER = struct.Struct("<IIII")
HEADER_SIZE = HEADER.size
PAYLOAD_MAX = 4096
ABS_PATH_MAX = 3072
REL_PATH_MAX = 2048


class Op(enum.IntEnum):
    CONTROL = 0  # formerly DEBUG
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESTRICT = 20  # removed from Xen; answered with ENOSYS
    RESET_WATCHES = 21
    DIRECTORY_PART = 22


# Values of the ring page's error field (see ring.py).
RING_ERROR_NONE = 0
RING_ERROR_COMM = 1
RING_ERROR_RINGIDX = 2
RING_ERROR_PROTO = 3


class Header(NamedTuple):  # a tuple: made on every message, cheaper than a dataclass
    type: int
    req_id: int
    tx_id: int
    length: int

    @classmethod
    def unpack(cls, data: bytes) -> "Header":
        return cls._make(HEADER.unpack(data))


def encode_message(msg_type: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    if len(payload) > PAYLOAD_MAX:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {PAYLOAD_MAX}")
    return HEADER.pack(msg_type, req_id, tx_id, len(payload)) + payload


def encode_error(req_id: int, tx_id: int, name: str) -> bytes:
    return encode_message(Op.ERROR, req_id, tx_id, name.encode("ascii") + b"\0")


def encode_watch_event(path: str, token: str) -> bytes:
    return encode_message(Op.WATCH_EVENT, 0, 0, _encode_strings((path, token)))


class FrameError(Exception):
    """The byte stream cannot be split into messages any more."""


class FrameDecoder:
    """Reassembles messages from arbitrary chunks of the byte stream."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def push(self, data: bytes) -> None:
        self._buffer += data

    def pop(self) -> tuple[Header, bytes] | None:
        """The next complete message, or None; FrameError on an oversized length."""
        buffer = self._buffer
        if len(buffer) < HEADER_SIZE:
            return None
        header = Header._make(HEADER.unpack_from(buffer))
        if header.length > PAYLOAD_MAX:
            raise FrameError(f"payload length {header.length} exceeds {PAYLOAD_MAX}")
        end = HEADER_SIZE + header.length
        if len(buffer) < end:
            return None
        payload = bytes(buffer[HEADER_SIZE:end])
        del buffer[:end]
        return header, payload

    def clear(self) -> None:
        self._buffer.clear()

    @property
    def buffered(self) -> int:
        return len(self._buffer)


# --- payload parsing and encoding ---------------------------------------

def _decode(raw: bytes) -> str:
    # latin-1 maps every byte to one character, so nothing is lost before the
    # path validator rejects non-ASCII characters, and tokens round-trip.
    return raw.decode("latin-1")


def _encode_strings(strings) -> bytes:
    return b"".join(s.encode("latin-1") + b"\0" for s in strings)


def terminated_strings(payload: bytes) -> list[str]:
    """The NUL-terminated strings at the start of payload; bytes after the last NUL are ignored."""
    parts = payload.split(b"\0")
    return [_decode(p) for p in parts[:-1]]


def one_arg(payload: bytes) -> str:
    """The single string of a payload that must hold exactly one NUL, at its end."""
    if not payload or payload.find(b"\0") != len(payload) - 1:
        raise XenStoreError("EINVAL", "expected exactly one NUL-terminated argument")
    return _decode(payload[:-1])


def parse_domid(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 5 or int(text) > 0xFFFF:
        raise XenStoreError("EINVAL", f"bad domid {text!r}")
    return int(text)


def directory_part_payload(generation: int, children: list[str], offset: int) -> bytes:
    """A DIRECTORY_PART reply: "<gen>\\0" then whole child names from byte `offset`.

    An extra empty string marks the end of the list, as xenstored does, so
    the client knows when to stop asking.
    """
    gen = str(generation).encode("ascii") + b"\0"
    blob = _encode_strings(children)
    if offset >= len(blob):
        return gen + b"\0"
    room = PAYLOAD_MAX - len(gen) - 1
    taken = 0
    while True:
        name_end = blob.find(b"\0", offset + taken)
        name_len = name_end - (offset + taken)
        if taken + name_len >= room:
            break
        taken += name_len + 1
        if offset + taken == len(blob):
            break
    data = gen + blob[offset:offset + taken]
    if offset + taken == len(blob):
        data += b"\0"
    return data


# --- the connection -------------------------------------------------------

_NO_TRANSACTION_OPS = frozenset({Op.WATCH, Op.UNWATCH})
_PRIVILEGED_OPS = frozenset({Op.CONTROL, Op.INTRODUCE, Op.RELEASE, Op.IS_DOMAIN_INTRODUCED,
                             Op.RESUME, Op.SET_TARGET})
_OK = b"OK\0"

# Stop reading requests while this much output waits: a guest that never
# consumes replies must not make the VMM buffer without bound.
INPUT_PAUSE_BYTES = 2 * (HEADER_SIZE + PAYLOAD_MAX)
# Watch events beyond this backlog are dropped for unprivileged clients
# (xenstored likewise drops events over a domain's memory quota).
EVENT_BACKLOG_BYTES = Limits.xenstore_event_backlog


# For the trace: requests whose first argument is a path, and replies worth showing.
_PATH_OPS = frozenset({"READ", "MKDIR", "RM", "DIRECTORY", "DIRECTORY_PART", "GET_PERMS", "SET_PERMS", "WATCH",
                       "UNWATCH"})
_TRACED_REPLIES = frozenset({"READ", "TRANSACTION_START", "DIRECTORY", "GET_DOMAIN_PATH"})


class StoreClient(Protocol):
    """What a Connection drives: one client of a store (store.Client).

    The wire protocol sits below the store and knows it only through this."""

    domid: int
    privileged: bool
    closed: bool

    def deferred_events(self) -> AbstractContextManager[None]: ...
    def has_transaction(self, tx: int) -> bool: ...
    def account_output(self, delta: int) -> None: ...
    def over_memory_quota(self) -> bool: ...
    def read(self, path: str, tx: int = 0) -> bytes: ...
    def write(self, path: str, value: bytes | str, tx: int = 0) -> None: ...
    def mkdir(self, path: str, tx: int = 0) -> None: ...
    def rm(self, path: str, tx: int = 0) -> None: ...
    def directory(self, path: str, tx: int = 0) -> list[str]: ...
    def directory_with_generation(self, path: str, tx: int = 0) -> tuple[int, list[str]]: ...
    def get_perms(self, path: str, tx: int = 0) -> list[Permission]: ...
    def set_perms(self, path: str, perms: Sequence[Permission], tx: int = 0) -> None: ...
    def watch(self, path: str, token: str, callback: Callable[[str, str], None]) -> None: ...
    def unwatch(self, path: str, token: str) -> None: ...
    def reset_watches(self) -> None: ...
    def transaction_start(self) -> int: ...
    def transaction_end(self, tx: int, commit: bool = True) -> None: ...
    def get_domain_path(self, domid: int) -> str: ...
    def is_domain_introduced(self, domid: int) -> bool: ...
    def introduce_domain(self, domid: int) -> None: ...
    def release_domain(self, domid: int) -> None: ...
    def resume_domain(self, domid: int) -> None: ...
    def set_target(self, domid: int, target: int) -> None: ...
    def control(self, command: str, args: Sequence[str] = ()) -> str: ...
    def close(self) -> None: ...
    def save_state(self) -> dict: ...
    def restore_state(self, state: dict, deliver: Callable[[str, str], None]) -> None: ...


class Connection:
    """One client's byte stream: requests in through feed(), replies and events out.

    Replies are queued in request order; watch events are queued after the
    reply of the request that caused them.  `output_listener`, if set, is
    called (outside any store operation) when a watch event makes output
    appear on its own, so the owner can schedule a flush; it should not feed
    this connection synchronously.
    """

    def __init__(self, client: StoreClient, *, event_backlog_bytes: int = EVENT_BACKLOG_BYTES,
                 limited_log: RateLimitedLog | None = None, trace: Tracer = NULL_TRACE,
                 faults: FaultInjector = NULL_FAULTS):
        self._client = client
        self._trace, self._faults = trace, faults  # the VM's; XenStore.connect passes its store's
        # Lines whose rate the guest sets; XenStore.connect passes one at the domain's LogRate.
        self._limited = limited_log or DEFAULT_LOG_RATE.limited(log)
        self._deferred_events = client.deferred_events()  # one reusable context manager
        self._decoder = FrameDecoder()
        self._out: deque[tuple[bytes, bool]] = deque()  # (message, is_watch_event)
        self._out_bytes = 0
        self._head_sent = 0
        self._unsent_events: Counter[bytes] = Counter()
        self._event_backlog_bytes = event_backlog_bytes
        self.broken = False
        self.error = RING_ERROR_NONE
        self.requests_answered = 0
        self.output_listener: Callable[[], None] | None = None
        self._handlers = {
            Op.CONTROL: self._control,
            Op.DIRECTORY: self._directory,
            Op.READ: self._read,
            Op.GET_PERMS: self._get_perms,
            Op.WATCH: self._watch,
            Op.UNWATCH: self._unwatch,
            Op.TRANSACTION_START: self._transaction_start,
            Op.TRANSACTION_END: self._transaction_end,
            Op.INTRODUCE: self._introduce,
            Op.RELEASE: self._release,
            Op.GET_DOMAIN_PATH: self._get_domain_path,
            Op.WRITE: self._write,
            Op.MKDIR: self._mkdir,
            Op.RM: self._rm,
            Op.SET_PERMS: self._set_perms,
            Op.IS_DOMAIN_INTRODUCED: self._is_domain_introduced,
            Op.RESUME: self._resume,
            Op.SET_TARGET: self._set_target,
            Op.RESET_WATCHES: self._reset_watches,
            Op.DIRECTORY_PART: self._directory_part,
        }

    def count_requests(self, counters: Counters) -> None:
        """Count each request type's calls and handler time (--stats) into
        `counters`, which the thread serving this connection owns: the
        handlers are wrapped once, so a connection not counted runs as before."""
        now = time.perf_counter_ns

        def counted(slot: list[int], handler):
            def run(tx: int, payload: bytes) -> bytes:
                start = now()
                try:
                    return handler(tx, payload)
                finally:
                    slot[0] += 1
                    slot[1] += now() - start

            return run

        self._handlers = {op: counted(counters.slot("xenstore", Op(op).name), handler)
                          for op, handler in self._handlers.items()}

    @property
    def domid(self) -> int:
        return self._client.domid

    @property
    def client(self) -> StoreClient:
        return self._client

    @property
    def closed(self) -> bool:
        return self._client.closed

    @property
    def accepting_input(self) -> bool:
        return not self.broken and not self.closed and self._out_bytes < INPUT_PAUSE_BYTES

    # -- input -------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Accept any chunk of the request stream; complete requests are answered."""
        if self.broken or self.closed:
            return
        self._decoder.push(data)
        while not self.closed:
            try:
                message = self._decoder.pop()
            except FrameError as exc:
                self._limited.warning("xenstore: domain %d: %s; connection broken", self.domid, exc)
                self._break(RING_ERROR_PROTO)
                return
            if message is None:
                return
            header, payload = message
            with self._deferred_events:
                self._queue(self._answer(header, payload), is_event=False)
            self.requests_answered += 1

    def _answer(self, header: Header, payload: bytes) -> bytes:
        try:
            reply = self._dispatch(header, payload)
            if len(reply) > PAYLOAD_MAX:
                raise XenStoreError("E2BIG", "reply too large")
            if self._trace.xenstore:
                self._trace_request(header, payload, reply=reply)
            return encode_message(header.type, header.req_id, header.tx_id, reply)
        except XenStoreError as exc:
            if self._trace.xenstore:
                self._trace_request(header, payload, error=exc.name)
            if isinstance(exc, QuotaError):
                self._limited.warning("xenstore: domain %d is at its %s limit (%s): answered %s", self.domid,
                                      exc.limit, exc.detail, exc.name, key=("quota", exc.limit))
            return encode_error(header.req_id, header.tx_id, exc.name)
        except Exception:
            # A bug here must not take the VMM down with the guest's request.
            log.exception("xenstore: domain %d: request type %d failed", self.domid, header.type)
            return encode_error(header.req_id, header.tx_id, "EIO")

    def _trace_request(self, header: Header, payload: bytes, *, reply: bytes = b"", error: str | None = None) -> None:
        try:
            op = Op(header.type).name
        except ValueError:
            op = str(header.type)
        fields = {"domid": self.domid, "op": op, "tx": header.tx_id, "req": header.req_id}
        if op == "WRITE":
            nul = payload.find(b"\0")
            fields["path"], fields["value"] = _decode(payload[:max(nul, 0)]), payload[nul + 1:]
        else:
            args = [_decode(arg) for arg in payload.split(b"\0")[:-1]]  # NUL-terminated strings
            if op in _PATH_OPS and args:
                fields["path"], args = args[0], args[1:]
            if args and args != [""]:
                fields["args"] = args
        if error is not None:
            fields["error"] = error
        elif op in _TRACED_REPLIES:
            fields["reply"] = reply.rstrip(b"\0").replace(b"\0", b" ")
        self._trace.emit("xenstore", "request", **fields)

    def _dispatch(self, header: Header, payload: bytes) -> bytes:
        op = header.type  # an int: the handlers' Op keys match it without Op()
        handler = self._handlers.get(op)
        if handler is None:
            raise XenStoreError("ENOSYS", f"unknown message type {op}")
        if op in _PRIVILEGED_OPS and not self._client.privileged:
            raise XenStoreError("EACCES", f"{Op(op).name} needs a privileged connection")
        tx = 0 if op in _NO_TRANSACTION_OPS else header.tx_id
        if tx and not self._client.has_transaction(tx):
            raise XenStoreError("ENOENT", f"no transaction {tx}")
        return handler(tx, payload)

    # -- handlers: (tx, payload) -> reply payload --------------------------

    def _read(self, tx: int, payload: bytes) -> bytes:
        return self._client.read(one_arg(payload), tx)

    def _write(self, tx: int, payload: bytes) -> bytes:
        nul = payload.find(b"\0")
        if nul < 0:
            raise XenStoreError("EINVAL", "WRITE without a path")
        self._client.write(_decode(payload[:nul]), payload[nul + 1:], tx)
        return _OK

    def _mkdir(self, tx: int, payload: bytes) -> bytes:
        self._client.mkdir(one_arg(payload), tx)
        return _OK

    def _rm(self, tx: int, payload: bytes) -> bytes:
        self._client.rm(one_arg(payload), tx)
        return _OK

    def _directory(self, tx: int, payload: bytes) -> bytes:
        return _encode_strings(self._client.directory(one_arg(payload), tx))

    def _directory_part(self, tx: int, payload: bytes) -> bytes:
        args = terminated_strings(payload)
        if len(args) != 2:
            raise XenStoreError("EINVAL", "DIRECTORY_PART needs a path and an offset")
        path, offset_text = args
        if not offset_text.isascii() or not offset_text.isdigit() or len(offset_text) > 10:
            raise XenStoreError("EINVAL", f"bad offset {offset_text!r}")
        generation, children = self._client.directory_with_generation(path, tx)
        return directory_part_payload(generation, children, int(offset_text))

    def _get_perms(self, tx: int, payload: bytes) -> bytes:
        return _encode_strings(str(p) for p in self._client.get_perms(one_arg(payload), tx))

    def _set_perms(self, tx: int, payload: bytes) -> bytes:
        args = terminated_strings(payload)
        if len(args) < 2:
            raise XenStoreError("EINVAL", "SET_PERMS needs a path and at least one permission")
        path, *texts = args
        self._client.set_perms(path, [Permission.parse(t) for t in texts], tx)
        return _OK

    def _watch(self, tx: int, payload: bytes) -> bytes:
        path, token = self._path_and_token(payload)
        self._client.watch(path, token, self._queue_watch_event)
        return _OK

    def _unwatch(self, tx: int, payload: bytes) -> bytes:
        path, token = self._path_and_token(payload)
        self._client.unwatch(path, token)
        return _OK

    @staticmethod
    def _path_and_token(payload: bytes) -> tuple[str, str]:
        args = terminated_strings(payload)
        if len(args) != 2:
            raise XenStoreError("EINVAL", "expected a path and a token")
        return args[0], args[1]

    def _reset_watches(self, tx: int, payload: bytes) -> bytes:
        self._client.reset_watches()
        return _OK

    def _transaction_start(self, tx: int, payload: bytes) -> bytes:
        if tx:
            raise XenStoreError("EBUSY", "transactions do not nest")
        return str(self._client.transaction_start()).encode("ascii") + b"\0"

    def _transaction_end(self, tx: int, payload: bytes) -> bytes:
        verdict = one_arg(payload)
        if verdict not in ("T", "F"):
            raise XenStoreError("EINVAL", f"TRANSACTION_END needs T or F, not {verdict!r}")
        if not tx:
            raise XenStoreError("ENOENT", "TRANSACTION_END outside a transaction")
        if verdict == "T" and self._faults.xenstore and self._faults.xenstore_commit(self.domid, tx):
            self._client.transaction_end(tx, commit=False)  # an injected conflict: the client must retry
            raise XenStoreError("EAGAIN", f"injected: transaction {tx}")
        self._client.transaction_end(tx, commit=verdict == "T")
        return _OK

    def _get_domain_path(self, tx: int, payload: bytes) -> bytes:
        return self._client.get_domain_path(parse_domid(one_arg(payload))).encode("ascii") + b"\0"

    def _is_domain_introduced(self, tx: int, payload: bytes) -> bytes:
        return b"T\0" if self._client.is_domain_introduced(parse_domid(one_arg(payload))) else b"F\0"

    def _introduce(self, tx: int, payload: bytes) -> bytes:
        args = terminated_strings(payload)
        if len(args) < 3:
            raise XenStoreError("EINVAL", "INTRODUCE needs domid, mfn and event channel")
        self._client.introduce_domain(parse_domid(args[0]))
        return _OK

    def _release(self, tx: int, payload: bytes) -> bytes:
        self._client.release_domain(parse_domid(one_arg(payload)))
        return _OK

    def _resume(self, tx: int, payload: bytes) -> bytes:
        self._client.resume_domain(parse_domid(one_arg(payload)))
        return _OK

    def _set_target(self, tx: int, payload: bytes) -> bytes:
        args = terminated_strings(payload)
        if len(args) < 2:
            raise XenStoreError("EINVAL", "SET_TARGET needs two domids")
        self._client.set_target(parse_domid(args[0]), parse_domid(args[1]))
        return _OK

    def _control(self, tx: int, payload: bytes) -> bytes:
        args = terminated_strings(payload)
        if not args:
            raise XenStoreError("EINVAL", "CONTROL without a command")
        return self._client.control(args[0], args[1:]).encode("latin-1") + b"\0"

    # -- output ------------------------------------------------------------

    def _queue(self, message: bytes, *, is_event: bool) -> None:
        self._out.append((message, is_event))
        self._out_bytes += len(message)
        self._client.account_output(len(message))
        if is_event:
            self._unsent_events[message] += 1

    def _queue_watch_event(self, path: str, token: str) -> None:
        if self._faults.xenstore:
            absolute = path if path[:1] in ("/", "@") else f"/local/domain/{self.domid}/{path}"
            fault = self._faults.watch_delay(absolute, token)
            if fault is not None:
                self._faults.call_later(fault.delay, lambda: self._deliver_watch_event(path, token))
                return
        self._deliver_watch_event(path, token)

    def _deliver_watch_event(self, path: str, token: str) -> None:
        if self._trace.xenstore:
            self._trace.emit("xenstore", "watch", domid=self.domid, path=path, token=token)
        if self.broken or self.closed:
            return
        payload_len = len(path) + len(token) + 2
        if payload_len > PAYLOAD_MAX:
            self._limited.warning("xenstore: domain %d: dropping over-long watch event", self.domid)
            return
        message = encode_watch_event(path, token)
        # An identical event still waiting tells the client the same thing.
        if not path.startswith("@") and self._unsent_events[message]:
            return
        if not self._client.privileged and (self._out_bytes >= self._event_backlog_bytes
                                            or self._client.over_memory_quota()):
            self._limited.warning("xenstore: domain %d: event backlog full, dropping %.200s", self.domid, path)
            return
        was_idle = self._out_bytes == 0
        self._queue(message, is_event=True)
        if was_idle and self.output_listener is not None:
            self.output_listener()

    def pending_output(self) -> int:
        """Bytes of replies and events waiting to be taken."""
        return self._out_bytes

    def take_output(self, max_bytes: int) -> bytes:
        """Up to max_bytes of the outbound stream; messages may be split across calls."""
        chunks = []
        room = max_bytes
        while room > 0 and self._out:
            message, is_event = self._out[0]
            if self._head_sent == 0 and is_event:
                self._unsent_events[message] -= 1
                if not self._unsent_events[message]:
                    del self._unsent_events[message]
            piece = message[self._head_sent:self._head_sent + room]
            chunks.append(piece)
            room -= len(piece)
            self._head_sent += len(piece)
            if self._head_sent == len(message):
                self._out.popleft()
                self._head_sent = 0
        data = b"".join(chunks)
        self._out_bytes -= len(data)
        self._client.account_output(-len(data))
        return data

    # -- snapshot ----------------------------------------------------------

    def save_state(self) -> dict:
        """A request not yet complete, replies and watch events not yet taken
        (the first maybe in part), whether it is broken, and its client's
        watches and transactions (Client.save_state)."""
        return {
            "partial_request": bytes(self._decoder._buffer).hex(),
            "output": [[message.hex(), is_event] for message, is_event in self._out],
            "head_sent": self._head_sent,
            "broken": self.broken,
            "error": self.error,
            "requests_answered": self.requests_answered,
            "client": self._client.save_state(),
        }

    def restore_state(self, state: dict) -> None:
        """Into a fresh connection, after the store's tree is restored."""
        if not isinstance(state, dict):
            raise SnapshotError("xenstore connection: no state")
        partial, output, head_sent, broken, error, answered = (state.get(key) for key in (
            "partial_request", "output", "head_sent", "broken", "error", "requests_answered"))
        try:
            pending = bytes.fromhex(partial) if isinstance(partial, str) else None
            messages = [(bytes.fromhex(item[0]), item[1]) for item in output] if isinstance(output, list) else None
        except (ValueError, TypeError, IndexError, KeyError):
            pending = messages = None
        if pending is None or messages is None:
            raise SnapshotError("xenstore connection: bad buffered bytes")
        if len(pending) >= HEADER_SIZE + PAYLOAD_MAX or (
                len(pending) >= HEADER_SIZE and Header._make(HEADER.unpack_from(pending)).length > PAYLOAD_MAX):
            raise SnapshotError("xenstore connection: the partial request is no request")
        for message, is_event in messages:
            if (not isinstance(is_event, bool) or len(message) < HEADER_SIZE
                    or Header._make(HEADER.unpack_from(message)).length != len(message) - HEADER_SIZE
                    or len(message) > HEADER_SIZE + PAYLOAD_MAX):
                raise SnapshotError("xenstore connection: a queued message is no message")
        total = sum(len(message) for message, _ in messages)
        if total > self._event_backlog_bytes + 2 * INPUT_PAUSE_BYTES:
            raise SnapshotError(f"xenstore connection: {total} bytes queued, more than it can hold")
        if (not isinstance(head_sent, int) or isinstance(head_sent, bool) or head_sent < 0
                or head_sent >= (len(messages[0][0]) if messages else 1)):
            raise SnapshotError(f"xenstore connection: bad head_sent {head_sent!r:.40}")
        if not isinstance(broken, bool) or error not in (RING_ERROR_NONE, RING_ERROR_COMM, RING_ERROR_RINGIDX,
                                                           RING_ERROR_PROTO) or isinstance(error, bool):
            raise SnapshotError("xenstore connection: bad broken state")
        if not isinstance(answered, int) or isinstance(answered, bool) or answered < 0:
            raise SnapshotError("xenstore connection: bad request count")
        if self._out or self._decoder.buffered:
            raise SnapshotError("xenstore connection: not fresh")
        self._client.restore_state(state.get("client"), self._queue_watch_event)
        self._decoder.push(pending)
        for index, (message, is_event) in enumerate(messages):
            self._out.append((message, is_event))
            if is_event and not (index == 0 and head_sent):  # one begun is no longer "unsent"
                self._unsent_events[message] += 1
        self._out_bytes = total - head_sent
        self._client.account_output(self._out_bytes)
        self._head_sent = head_sent
        self.broken, self.error, self.requests_answered = broken, error, answered

    # -- lifetime ----------------------------------------------------------

    def _break(self, error: int) -> None:
        self.broken = True
        self.error = error
        self._drop_state()

    def _drop_state(self) -> None:
        self._decoder.clear()
        self._out.clear()
        self._client.account_output(-self._out_bytes)
        self._out_bytes = 0
        self._head_sent = 0
        self._unsent_events.clear()
        if not self.closed:
            self._client.reset_watches()

    def reset(self) -> None:
        """Start afresh on a packet boundary (ring reconnection): drop buffered
        input and output, watches and transactions, and forget a broken state."""
        self._drop_state()
        self.broken = False
        self.error = RING_ERROR_NONE

    def close(self) -> None:
        """Drop this connection's watches and transactions; later input is ignored."""
        self._drop_state()
        self._client.close()


def iter_messages(data: bytes) -> Iterator[tuple[Header, bytes]]:
    """Split a complete byte stream into messages (for tests and tracing tools)."""
    decoder = FrameDecoder()
    decoder.push(data)
    while (message := decoder.pop()) is not None:
        yield message
    if decoder.buffered:
        raise FrameError(f"{decoder.buffered} trailing bytes")
