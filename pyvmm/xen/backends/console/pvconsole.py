"""Backend of the guest's primary PV console (hvc0 in Linux).

The console page (HVM_PARAM_CONSOLE_PFN) holds `struct xencons_interface`
(io/console.h):

    0     in[1024]     host -> guest
    1024  out[2048]    guest -> host
    3072  in_cons  3076 in_prod  3080 out_cons  3084 out_prod   (u32, free running)
    3088  connection   (u8; 0 = connected: the backend empties the rings)

The guest owns out_prod and in_cons; the backend owns out_cons and in_prod.
Like xenconsoled, the backend reads every index from the page each time, so
a guest that reinitialises its ring (a new kernel after kexec) just works;
a guest rewriting our indices can only make its own console repeat or lose
output. A producer/consumer distance larger than the ring is a broken ring:
it is logged once and left alone until the guest puts it right.

Ordering: data is written before the index that publishes it, and an index
is read before the data it covers. CPython performs these memoryview
accesses in program order and x86 reorders neither stores with stores nor
loads with loads, so no explicit barrier is needed.

process() (output) and receive() (input) touch disjoint fields and may run
on different threads.
"""

from __future__ import annotations

import logging
from typing import Callable

from pyvmm.core.trace import NULL_TRACE, Tracer
from pyvmm.core.atomic import SharedWords

log = logging.getLogger(__name__)

IN_OFFSET = 0
IN_SIZE = 1024
OUT_OFFSET = 1024
OUT_SIZE = 2048
IN_CONS = 3072
IN_PROD = 3076
OUT_CONS = 3080
OUT_PROD = 3084
CONNECTION = 3088
INTERFACE_SIZE = 3089

CONNECTED = 0
DISCONNECTED = 1

_MASK32 = 0xFFFF_FFFF


class PvConsole:
    def __init__(self, page: memoryview, notify: Callable[[], None], output: Callable[[bytes], None], *,
                 trace: Tracer = NULL_TRACE):
        self._trace = trace  # the VM's
        page = memoryview(page).cast("B")
        if page.readonly:
            raise ValueError("the console page must be writable")
        if len(page) < INTERFACE_SIZE:
            raise ValueError(f"console page of {len(page)} bytes, need {INTERFACE_SIZE}")
        self._page = page
        self._words = SharedWords(page)  # indices read and written whole
        self._notify = notify
        self._output = output
        self._reported: set[str] = set()
        self.taken = 0  # output bytes taken from the ring so far (for a diagnosis)
        page[CONNECTION] = CONNECTED

    def _load(self, offset: int) -> int:
        return self._words.load(offset)

    def _store(self, offset: int, value: int) -> None:
        self._words.store(offset, value)

    def _broken(self, ring: str, distance: int, size: int) -> None:
        if ring not in self._reported:
            self._reported.add(ring)
            log.warning("PV console %s ring broken: indices %d bytes apart in a %d-byte ring", ring, distance, size)

    def output_waiting(self) -> tuple[int, int] | None:
        """(out_cons, out_prod) while the guest's output waits to be taken,
        else None: what the domain's safety net compares between checks."""
        cons, prod = self._load(OUT_CONS), self._load(OUT_PROD)
        return (cons, prod) if cons != prod else None

    def snapshot(self) -> dict[str, int]:
        """The ring's indices and connection byte as the page holds them now,
        and the bytes taken so far: for a stuck guest's diagnosis."""
        return {"out_cons": self._load(OUT_CONS), "out_prod": self._load(OUT_PROD), "in_cons": self._load(IN_CONS),
                "in_prod": self._load(IN_PROD), "connection": self._page[CONNECTION], "taken": self.taken}

    def process(self) -> None:
        """Pass the guest's output on and free the space (the guest notified us)."""
        cons = self._load(OUT_CONS)
        prod = self._load(OUT_PROD)
        pending = (prod - cons) & _MASK32
        if pending > OUT_SIZE:
            self._broken("output", pending, OUT_SIZE)
            return
        if not pending:
            return
        start = cons % OUT_SIZE
        first = min(pending, OUT_SIZE - start)
        data = bytes(self._page[OUT_OFFSET + start : OUT_OFFSET + start + first])
        if first < pending:
            data += bytes(self._page[OUT_OFFSET : OUT_OFFSET + pending - first])
        self._store(OUT_CONS, cons + pending)
        self.taken += pending
        if self._trace.console:
            self._trace.emit("console", "out", bytes=len(data), text=data)
        self._output(data)
        self._notify()

    def receive(self, data: bytes | bytearray | memoryview) -> int:
        """Queue host input for the guest; returns how many bytes fit."""
        data = memoryview(data).cast("B")
        cons = self._load(IN_CONS)
        prod = self._load(IN_PROD)
        queued = (prod - cons) & _MASK32
        if queued > IN_SIZE:
            self._broken("input", queued, IN_SIZE)
            return 0
        count = min(len(data), IN_SIZE - queued)
        if self._trace.console:
            self._trace.emit("console", "in", bytes=count, offered=len(data), text=bytes(data[:count]))
        if not count:
            return 0
        start = prod % IN_SIZE
        first = min(count, IN_SIZE - start)
        self._page[IN_OFFSET + start : IN_OFFSET + start + first] = data[:first]
        if first < count:
            self._page[IN_OFFSET : IN_OFFSET + count - first] = data[first:count]
        self._store(IN_PROD, prod + count)
        self._notify()
        return count
