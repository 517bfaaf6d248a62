"""Log lines whose rate a guest decides stay bounded: 100,000 triggering
events give at most a burst of lines per call site (pyvmm/ratelimit.py)."""

import logging
import struct

import pytest

from pyvmm import ratelimit
from pyvmm.xen import xenbus_backend
from pyvmm.xen.xenbus_backend import FrontendError, XenbusBackendDevice, XenbusState
from pyvmm.xen.xenstore import Op, RingServer, XenStore, create_domain_nodes, protocol
from pyvmm.xen.xenstore import ring as xenstore_ring
from pyvmm.xen.xenstore.protocol import encode_message
from pyvmm.xen.xenstore.ring import CONNECTION, RECONNECT, REQ_PROD, RING_SIZE

EVENTS = 100_000
# Every limited site lets a burst through; a suppressed-count line replaces a normal one.
BOUND = ratelimit.BURST


# Full buckets and a clock that stands still: the bound cannot depend on the time taken.
STILL = ratelimit.LogRate(clock=lambda: 0.0)


def lines(caplog, module):
    return [record.getMessage() for record in caplog.records if record.name == module.__name__]


def store_with_guest():
    store = XenStore(log_rate=STILL)  # each object that logs for the guest has its own buckets
    create_domain_nodes(store, 1, "guest", 1, 0xFEFF9, 2, 0xFEFF8)
    return store


def test_dropped_watch_events(caplog):
    store = store_with_guest()
    guest = store.connect(1, event_backlog_bytes=200)
    guest.feed(encode_message(Op.WATCH, 1, 0, b"data\0t\0"))
    with caplog.at_level(logging.INFO, logger=protocol.__name__):
        for i in range(EVENTS):
            guest._queue_watch_event(f"data/n{i}", "t")  # what every change under data/ does
        for i in range(EVENTS):
            guest._queue_watch_event("data/" + "x" * protocol.PAYLOAD_MAX, "t")
    found = lines(caplog, protocol)
    assert len(found) <= 2 * BOUND and any("backlog full" in line for line in found)


def test_broken_and_reconnected_rings(caplog):
    store = store_with_guest()
    page = memoryview(bytearray(4096))
    server = RingServer(page, store.connect(1), log_rate=STILL)
    with caplog.at_level(logging.INFO, logger=xenstore_ring.__name__):
        with caplog.at_level(logging.INFO, logger=protocol.__name__):
            for _ in range(EVENTS // 3):  # three logged events a round
                struct.pack_into("<I", page, REQ_PROD, RING_SIZE + 1)  # a producer too far ahead
                server.process()
                struct.pack_into("<I", page, CONNECTION, RECONNECT)
                server.process()
                server.connection.feed(struct.pack("<IIII", Op.READ, 1, 0, 1 << 31))  # a bad frame
                server.connection.reset()
    assert len(lines(caplog, xenstore_ring)) <= 2 * BOUND
    assert len(lines(caplog, protocol)) <= BOUND
    assert server.error == 0


class RefusingDevice(XenbusBackendDevice):
    device_type = "vbd"

    def connect(self):
        raise FrontendError("ring-ref = 'garbage' is not an unsigned number")


def test_failed_xenbus_handshakes(caplog):
    store = store_with_guest()
    device = RefusingDevice(store, 1, 51712)
    device.start()
    frontend = store.client(1)
    state = f"{device.frontend_path}/state"
    # A backend logs under its own class's module (vbd, vif; here this test's).
    with caplog.at_level(logging.INFO, logger=RefusingDevice.__module__):
        for _ in range(EVENTS // 10):  # a failure in three store writes each: slower, so fewer
            frontend.write(state, str(int(XenbusState.INITIALISED)))
            frontend.write(state, str(int(XenbusState.CLOSED)))
            frontend.write(state, str(int(XenbusState.INITIALISING)))
    assert device.failed is None and device.state == XenbusState.INIT_WAIT
    found = [record for record in caplog.records if record.name == RefusingDevice.__module__]
    assert 1 <= len(found) <= BOUND
