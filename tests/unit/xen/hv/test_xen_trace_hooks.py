"""The trace hooks of the hypercall dispatcher, grant table, PV console and
I/O exits: what a record says, and nothing while the category is off."""

from __future__ import annotations

import ctypes
import io
import json
import struct
from types import SimpleNamespace

import pytest

from pyvmm.core.bus import Bus
from pyvmm.vmm.exit_handler import ExitHandler
from pyvmm.core.memory import GuestMemory
from pyvmm.core.trace import NULL_TRACE, Tracer
from pyvmm.xen import abi
from pyvmm.xen.backends.console.pvconsole import PvConsole
from pyvmm.xen.hv.gnttab import GTF_permit_access, GrantError, GrantTable
from pyvmm.xen.hv.guest_access import GuestAccess
from pyvmm.xen.hv.hypercalls import HypercallDispatcher

from test_xen_hypercalls import FakeDomain, FakeExit, identity


@pytest.fixture
def tracer():
    """This test's VM tracer, handed to the part under test."""
    tracer = Tracer()
    yield tracer
    tracer.close()


@pytest.fixture
def traced(tracer):
    stream = io.StringIO()

    def start(*categories):
        tracer.attach(set(categories), stream)
        return stream

    return start


def records(tracer, stream):
    tracer.flush()
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_hypercall_records_name_subop_args_and_result(traced, tracer):
    dispatcher = HypercallDispatcher(FakeDomain(), trace=tracer)
    access = GuestAccess(identity, GuestMemory([(0, 1 << 20)]))
    stream = traced("hypercall")
    exit = FakeExit(abi.HYPERCALL_sched_op, abi.SCHEDOP_yield, 0)
    dispatcher.handle(exit, 1, access)
    dispatcher.handle(FakeExit(99), 0, access)
    first, second = records(tracer, stream)
    assert (first["name"], first["op"], first["vcpu"], first["result"], first["args"][:2]) == (
        "sched_op", "yield", 1, 0, [hex(abi.SCHEDOP_yield), "0x0"])
    assert second["name"] == "hypercall_99" and second["result"] < 0


def test_grant_map_unmap_and_errors(traced, tracer):
    memory = GuestMemory([(0, 1 << 20)])
    table = GrantTable(memory, max_frames=1, trace=tracer)
    ctypes.memmove(table.frame_host_address(0) + 8 * 8, struct.pack("<HHI", GTF_permit_access, 0, 40), 8)
    stream = traced("grant")
    with table.map(8, writable=True):
        pass
    with pytest.raises(GrantError):
        table.map(9, writable=False)
    events = records(tracer, stream)
    assert [(e["ev"], e["ref"]) for e in events] == [("map", 8), ("unmap", 8), ("map", 9)]
    assert events[0]["gfn"] == 40 and "error" in events[2]


def test_grant_map_many_and_release_many(traced, tracer):
    memory = GuestMemory([(0, 1 << 20)])
    table = GrantTable(memory, max_frames=1, trace=tracer)
    ctypes.memmove(table.frame_host_address(0) + 8 * 8, struct.pack("<HHI", GTF_permit_access, 0, 40), 8)
    stream = traced("grant")
    good, bad = table.map_many([8, 9], writable=True)
    table.release_many([good])
    events = records(tracer, stream)
    assert [(e["ev"], e["ref"]) for e in events] == [("map", 8), ("map", 9), ("unmap", 8)]
    assert events[0]["gfn"] == 40 and events[1]["error"] == str(bad)


def test_console_bytes_in_and_out(traced, tracer):
    page = memoryview(bytearray(4096))
    out = []
    console = PvConsole(page, lambda: None, out.append, trace=tracer)
    stream = traced("console")
    console.receive(b"ls\n")
    events = records(tracer, stream)
    assert events == [{**events[0], "ev": "in", "bytes": 3, "offered": 3, "text": "ls\\n"}]


def test_io_exits(traced, tracer):
    pio = Bus("port I/O", 1 << 16)
    handler = ExitHandler(pio, Bus("MMIO", 1 << 64), trace=tracer)
    stream = traced("io")
    handler._io(SimpleNamespace(size=1, port=0x80, data=bytearray(b"\x2a"), is_write=True, count=1))
    handler._mmio(SimpleNamespace(address=0xFED00000, length=4, data=bytearray(8), is_write=False))
    pio_event, mmio_event = records(tracer, stream)
    assert (pio_event["port"], pio_event["dir"], pio_event["value"]) == (0x80, "out", "0x2a")
    assert (mmio_event["addr"], mmio_event["size"], mmio_event["dir"]) == ("0xfed00000", 4, "read")


def test_nothing_while_off():
    assert NULL_TRACE.enabled == frozenset()
    dispatcher = HypercallDispatcher(FakeDomain())
    exit = FakeExit(abi.HYPERCALL_sched_op, abi.SCHEDOP_yield, 0)
    dispatcher.handle(exit, 0, GuestAccess(identity, GuestMemory([(0, 1 << 20)])))
    assert exit.result == 0
