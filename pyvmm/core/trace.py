"""Event tracing: one JSON object per line, per category, cheap when off.

Each VM has one Tracer: the runner makes it from the VM's config (--trace,
--trace-file) and it is handed down to every part that traces, which keeps
it as `self._trace` (or reaches it through what it was built on: the
backends through their xenstore, `XenStore.trace`). Two VMs in one process
never share one. Each category is a plain boolean attribute, so a hook
costs one attribute test while its category is off and builds nothing:

    if self._trace.blk:
        self._trace.emit("blk", "request", op="write", sector=2048, ...)

A part built alone (a unit test) gets `NULL_TRACE`: a Tracer that is always
off and refuses to be turned on, so no test can start tracing for others.

Categories:

    hypercall   name, sub-op, arguments, result, vCPU
    evtchn      guest sends, backend notifications, binds and closes;
                `kernel` says whether KVM delivers the port itself; the
                upcalls pyvmm raises (how, and the vCPU's IF at its last
                exit) and a GSI callback's asserts and EOIs
    xenstore    every request (op, path, value, tx id, result or error)
                from the guest's ring and from the socket, watches fired
    grant       map/unmap/copy: ref, writable, errors
    io          port I/O and MMIO exits: port or address, size, dir, value
    fault       every injected fault (pyvmm/core/faults.py); on whenever any
                other category is
    stop        why the guest stopped when it was not asked to: a triple
                fault (registers), every vCPU halted for good, a pvpanic
                report, --timeout; on whenever any other category is

and one or more per device kind, registered with the backends
(pyvmm/xen/backends/*/kind.py: blk, net, console); `describe()` lists
them all.

A record is {"t": monotonic ns, "cat": category, "ev": event, "thread":
name, "vcpu": index (when the event happened on a vCPU thread), ...decoded
fields}. Writes are thread-safe and buffered: a batch goes to the file
every 512 events or after a second; close() (the runner's, at the end of
the run) writes the rest.
"""

from __future__ import annotations

import json
import threading
import time
from typing import IO

# Every category, the device kinds' included (a list that register_category
# extends in place, so that an import of it sees them).
CATEGORIES: list[str] = ["hypercall", "evtchn", "xenstore", "grant", "io", "fault", "stop"]
_DESCRIPTIONS: dict[str, str] = {}  # the registered categories' one-line descriptions
_FLUSH_LINES = 512
_FLUSH_NS = 1_000_000_000  # a quiet trace still reaches the file within about a second


class TraceError(ValueError):
    """A bad --trace category list."""


def parse_categories(text: str) -> frozenset[str]:
    """'blk,xenstore' -> {'blk', 'xenstore'}; 'all' -> every category."""
    wanted = {word.strip() for word in text.split(",") if word.strip()}
    if "all" in wanted:
        return frozenset(CATEGORIES)
    unknown = wanted - set(CATEGORIES)
    if unknown or not wanted:
        raise TraceError(f"unknown trace categories {', '.join(sorted(unknown)) or '(none)'}; "
                         f"choose from {', '.join(CATEGORIES)} or all")
    return frozenset(wanted)


def register_category(name: str, description: str) -> None:
    """A category of a device kind: a flag of every Tracer, off until enabled."""
    if name in CATEGORIES:
        if _DESCRIPTIONS.get(name) != description:
            raise ValueError(f"a trace category {name!r} exists already")
        return
    if hasattr(Tracer, name) or name == "all":
        raise ValueError(f"{name!r} cannot be a trace category")
    CATEGORIES.append(name)
    _DESCRIPTIONS[name] = description
    setattr(Tracer, name, False)


def unregister_category(name: str) -> None:
    """Forget a registered category (tests that register one of their own)."""
    if name in _DESCRIPTIONS:
        del _DESCRIPTIONS[name]
        CATEGORIES.remove(name)
        delattr(Tracer, name)


def describe() -> dict[str, str]:
    """The registered (device kinds') categories and what they record."""
    return dict(_DESCRIPTIONS)


class Tracer:
    """One VM's trace: which categories are on, and the file they go to.

    Every category is a flag of the instance, made when it is constructed
    from the categories registered by then (CATEGORIES); the class holds
    each category's default, off, so that a Tracer made before a kind was
    registered (NULL_TRACE) still answers False for its category."""

    hypercall = evtchn = xenstore = grant = io = fault = stop = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._out: IO[str] | None = None
        self._pending: list[str] = []
        self._owned = False
        self._written_at = 0
        self.enabled: frozenset[str] = frozenset()
        for name in CATEGORIES:  # the built-in ones and every device kind's
            setattr(self, name, False)

    def open(self, categories: frozenset[str] | set[str], path) -> None:
        """Start writing the `categories` to the file at `path` (replaced)."""
        self.close()
        self._out = open(path, "w", encoding="utf-8")
        self._owned = True
        self.enable(categories)

    def attach(self, categories, stream: IO[str]) -> None:
        """Write to an already open text stream (tests)."""
        self.close()
        self._out = stream
        self._owned = False
        self.enable(categories)

    def enable(self, categories) -> None:
        self._written_at = time.monotonic_ns()
        categories = frozenset(categories)
        if categories:
            categories |= {"fault", "stop"}
        self.enabled = categories
        for name in CATEGORIES:
            setattr(self, name, name in categories)

    def emit(self, category: str, event: str, vcpu: int | None = None, **fields) -> None:
        """Record one event; call only after testing the category's flag."""
        thread = threading.current_thread().name
        if vcpu is None and thread.startswith("vcpu") and thread[4:].isdigit():
            vcpu = int(thread[4:])
        now = time.monotonic_ns()
        record = {"t": now, "cat": category, "ev": event, "thread": thread}
        if vcpu is not None:
            record["vcpu"] = vcpu
        record.update(fields)
        line = json.dumps(record, default=_jsonable, separators=(",", ":"))
        with self._lock:
            self._pending.append(line)
            if len(self._pending) >= _FLUSH_LINES or now - self._written_at > _FLUSH_NS:
                self._write_pending()
                self._written_at = now

    def flush(self) -> None:
        with self._lock:
            self._write_pending()

    def close(self) -> None:
        """Flush and stop: every category off again."""
        self.enable(())
        with self._lock:
            self._write_pending()
            out, self._out = self._out, None
        if out is not None and self._owned:
            out.close()

    def _write_pending(self) -> None:
        if self._out is not None and self._pending:
            self._out.write("\n".join(self._pending) + "\n")
            self._out.flush()
        self._pending.clear()


def _jsonable(value):
    if isinstance(value, (bytes, bytearray, memoryview)):
        return summarize_bytes(bytes(value))
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def summarize_bytes(data: bytes, limit: int = 64) -> str:
    """Printable text of at most `limit` bytes, the rest counted."""
    text = data[:limit].decode("latin-1").encode("unicode_escape").decode("ascii")
    return text if len(data) <= limit else f"{text}...(+{len(data) - limit} bytes)"


class _NullTracer(Tracer):
    """Always off: the default of parts built without their VM's Tracer."""

    def enable(self, categories) -> None:
        if frozenset(categories):
            raise RuntimeError("NULL_TRACE cannot be turned on: give the part its VM's Tracer")
        super().enable(())


NULL_TRACE: Tracer = _NullTracer()


def open_trace(categories: frozenset[str] | set[str], path) -> Tracer:
    """A VM's Tracer writing `categories` to `path`, or one that is off when
    `categories` is empty (no --trace)."""
    tracer = Tracer()
    if categories:
        tracer.open(categories, path)
    return tracer

