"""The shared ring page: indices, wraparound, broken rings, back-pressure, reconnection."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from frontends.xenstore import XenbusRing as Guest
from pyvmm.xen.xenstore import Op, RingServer, XenStore, create_domain_nodes
from pyvmm.xen.xenstore.protocol import PAYLOAD_MAX, encode_message
from pyvmm.xen.xenstore.ring import (
    CONNECTION,
    ERROR,
    FEATURE_ERROR,
    FEATURE_RECONNECTION,
    RECONNECT,
    REQ_CONS,
    REQ_PROD,
    RING_SIZE,
    RSP_CONS,
    RSP_OFFSET,
    RSP_PROD,
    SERVER_FEATURES,
)


def make(start_index=0, **options):
    store = XenStore()
    create_domain_nodes(store, 1, "guest", 1, 0xFEFF9, 2, 0xFEFF8)
    page = memoryview(bytearray(4096))
    guest = Guest(page)
    for offset in (REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD):
        guest.set_u32(offset, start_index)
    connection = store.connect(1)
    server = RingServer(page, connection, **options)
    return store, guest, server


def request(op, payload, req_id=1, tx_id=0):
    return encode_message(op, req_id, tx_id, payload)


def test_features_advertised_and_page_checked():
    _, guest, _ = make()
    assert guest.u32(SERVER_FEATURES) & (FEATURE_RECONNECTION | FEATURE_ERROR) == 3
    store = XenStore()
    with pytest.raises(ValueError):
        RingServer(memoryview(bytes(4096)), store.connect(1))
    with pytest.raises(ValueError):
        RingServer(memoryview(bytearray(100)), store.connect(1))


def test_request_and_reply_round_trip():
    _, guest, server = make()
    guest.send(request(Op.READ, b"name\0", req_id=42))
    assert server.process() is True
    guest.receive()
    assert guest.messages() == [(Op.READ, 42, b"guest")]
    assert server.process() is False  # nothing more to do


def test_indices_wrap_around_2_to_the_32():
    _, guest, server = make(start_index=0xFFFFFFFF - 20)
    for i in range(40):
        guest.send(request(Op.READ, b"domid\0", req_id=i))
        server.process()
        guest.receive()
    assert [m[1] for m in guest.messages()] == list(range(40))
    assert guest.u32(REQ_CONS) < 0x1000  # it really wrapped


def test_messages_split_across_the_ring_edge():
    _, guest, server = make(start_index=RING_SIZE - 7)
    guest.send(request(Op.WRITE, b"data/k\0" + b"v" * 100))
    server.process()
    guest.receive()
    guest.send(request(Op.READ, b"data/k\0", req_id=2))
    server.process()
    guest.receive()
    assert guest.messages()[-1] == (Op.READ, 2, b"v" * 100)


def test_partial_message_is_kept_until_complete():
    _, guest, server = make()
    whole = request(Op.READ, b"domid\0")
    guest.send(whole[:10])
    assert server.process() is True  # consumed bytes: the guest may send more
    assert guest.receive() == b""
    guest.send(whole[10:])
    server.process()
    guest.receive()
    assert guest.messages() == [(Op.READ, 1, b"1")]


def test_large_request_streams_through_the_small_ring():
    _, guest, server = make()
    value = (bytes(range(256)) * 8)[:-8]  # the largest value a guest may store beside one permission
    stream = request(Op.WRITE, b"data/big\0" + value) + request(Op.READ, b"data/big\0", req_id=2)
    while stream:
        stream = stream[guest.send(stream):]
        server.process()
        guest.receive()
    for _ in range(10):
        server.process()
        guest.receive()
    assert guest.messages() == [(Op.WRITE, 1, b"OK\0"), (Op.READ, 2, value)]


def test_replies_wait_for_room_back_pressure():
    store, guest, server = make()
    store.client(0).write("/local/domain/1/data/big", b"x" * 900)
    for i in range(3):
        guest.send(request(Op.READ, b"data/big\0", req_id=i))
    server.process()
    assert guest.u32(RSP_PROD) - guest.u32(RSP_CONS) == RING_SIZE  # ring full, rest kept back
    assert server.connection.pending_output() == 3 * (16 + 900) - RING_SIZE
    while server.connection.pending_output():
        guest.receive()
        server.process()
    guest.receive()
    assert [(m[1], len(m[2])) for m in guest.messages()] == [(0, 900), (1, 900), (2, 900)]


def test_stops_reading_while_guest_does_not_consume():
    _, guest, server = make()
    stream = b"".join(request(Op.DIRECTORY, b"/local/domain/1\0", req_id=i) for i in range(200))
    sent = 0
    for _ in range(50):
        sent += guest.send(stream[sent:])
        server.process()
    # The guest never read a reply: the server must stop consuming requests.
    assert sent < len(stream)
    assert server.connection.pending_output() < 3 * (16 + PAYLOAD_MAX)


def test_budget_bounds_work_per_call():
    _, guest, server = make(budget=64)
    stream = b"".join(request(Op.READ, b"domid\0", req_id=i) for i in range(40))
    assert guest.send(stream) == len(stream)
    server.process()
    assert guest.u32(REQ_CONS) == 64
    assert server.work_pending
    calls = 1
    while server.work_pending:
        server.process()
        guest.receive()
        calls += 1
    guest.receive()
    assert calls == -(-len(stream) // 64)
    assert [m[1] for m in guest.messages()] == list(range(40))


@pytest.mark.parametrize("offset,value", [(REQ_PROD, RING_SIZE + 1), (REQ_PROD, 0x80000000),
                                          (RSP_CONS, 5)])
def test_broken_indices_stop_the_ring(offset, value):
    _, guest, server = make()
    if offset == RSP_CONS:  # consumer ahead of the producer: distance wraps huge
        guest.set_u32(RSP_PROD, 0)
    guest.set_u32(offset, value)
    assert server.process() is True
    assert guest.u32(ERROR) == 2
    # Stopped for good: fixing the index alone does not restart it.
    guest.set_u32(REQ_PROD, guest.u32(REQ_CONS))
    guest.set_u32(RSP_CONS, guest.u32(RSP_PROD))
    guest.send(request(Op.READ, b"domid\0"))
    assert server.process() is False
    assert guest.receive() == b""


def test_guest_scribbling_server_indices_is_ignored():
    _, guest, server = make()
    guest.send(request(Op.READ, b"domid\0"))
    server.process()
    guest.set_u32(REQ_CONS, 0)  # tries to make the server re-read the request
    server.process()
    guest.receive()
    assert guest.messages() == [(Op.READ, 1, b"1")]


def test_oversized_length_sets_protocol_error():
    _, guest, server = make()
    guest.send(struct.pack("<IIII", Op.READ, 1, 0, PAYLOAD_MAX + 1))
    assert server.process() is True
    assert guest.u32(ERROR) == 3


def test_reconnect_resets_everything():
    store, guest, server = make(start_index=500)
    guest.send(request(Op.WATCH, b"data\0t\0"))
    guest.send(request(Op.TRANSACTION_START, b"\0", req_id=2))
    guest.send(request(Op.READ, b"domid\0")[:9])  # a partial packet
    server.process()
    assert server.connection.client.watches
    guest.set_u32(REQ_PROD, 0xDEAD)  # garbage: the guest ignores indices now
    guest.set_u32(ERROR, 0)
    guest.set_u32(CONNECTION, RECONNECT)
    assert server.process() is True
    assert guest.u32(CONNECTION) == 0
    assert [guest.u32(o) for o in (REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD)] == [0, 0, 0, 0]
    assert not server.connection.client.watches
    assert not server.connection.client.has_transaction(1)
    guest.received = b""
    guest.send(request(Op.READ, b"domid\0", req_id=9))
    server.process()
    guest.receive()
    assert guest.messages() == [(Op.READ, 9, b"1")]


def test_reset_by_the_vmm_leaves_a_quiescent_ring_and_a_fresh_connection():
    # The domain's soft reset (kexec): the next kernel finds an empty ring
    # and none of the old kernel's watches or transactions.
    store, guest, server = make(start_index=500)
    guest.send(request(Op.WATCH, b"data\0t\0"))
    guest.send(request(Op.TRANSACTION_START, b"\0", req_id=2))
    guest.send(request(Op.READ, b"domid\0")[:9])  # a partial packet
    server.process()
    guest.set_u32(ERROR, 1)
    server.reset()
    assert [guest.u32(o) for o in (REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD, ERROR, CONNECTION)] == [0] * 6
    assert not server.connection.client.watches
    assert not server.connection.client.has_transaction(1)
    guest.received = b""
    guest.send(request(Op.READ, b"domid\0", req_id=9))
    server.process()
    guest.receive()
    assert guest.messages() == [(Op.READ, 9, b"1")]


def test_reconnect_recovers_a_broken_ring():
    _, guest, server = make()
    guest.set_u32(REQ_PROD, 5000)
    server.process()
    assert guest.u32(ERROR) == 2
    guest.set_u32(CONNECTION, RECONNECT)
    server.process()
    assert guest.u32(ERROR) == 0
    guest.send(request(Op.READ, b"domid\0"))
    server.process()
    guest.receive()
    assert guest.messages() == [(Op.READ, 1, b"1")]


def test_watch_events_from_dom0_reach_the_ring():
    store, guest, server = make()
    notified = []
    server.connection.output_listener = lambda: notified.append(True)
    guest.send(request(Op.WATCH, b"control/shutdown\0sd\0"))
    server.process()
    guest.receive()
    store.client(0).write("/local/domain/1/control/shutdown", "poweroff")
    assert notified
    assert server.process() is True
    guest.receive()
    assert guest.messages()[-1] == (Op.WATCH_EVENT, 0, b"control/shutdown\0sd\0")


def test_listener_reentering_process_is_harmless():
    store, guest, server = make()
    server.connection.output_listener = lambda: server.process()
    guest.send(request(Op.WATCH, b"data\0t\0"))
    server.process()
    store.client(0).write("/local/domain/1/data/x", "1")
    server.process()
    guest.receive()
    assert [m[0] for m in guest.messages()] == [Op.WATCH, Op.WATCH_EVENT, Op.WATCH_EVENT]


@given(st.lists(st.integers(1, 300), min_size=1, max_size=30),
       st.lists(st.integers(1, 1024), min_size=1, max_size=30),
       st.integers(0, 0xFFFFFFFF))
@settings(max_examples=60, deadline=None)
def test_any_interleaving_delivers_every_reply_in_order(send_sizes, receive_sizes, start):
    _, guest, server = make(start_index=start)
    requests = [request(Op.WRITE, b"data/k\0" + bytes([i]) * (i * 7 % 200), req_id=i)
                for i in range(12)]
    stream = b"".join(requests)
    sent = 0
    step = 0
    while True:
        size = send_sizes[step % len(send_sizes)]
        sent += guest.send(stream[sent:sent + size])
        server.process()
        cons, prod = guest.u32(RSP_CONS), guest.u32(RSP_PROD)
        take = min((prod - cons) & 0xFFFFFFFF, receive_sizes[step % len(receive_sizes)])
        data = bytes(guest.page[RSP_OFFSET + (cons + i) % RING_SIZE] for i in range(take))
        guest.set_u32(RSP_CONS, cons + take)
        guest.received += data
        step += 1
        if sent == len(stream) and not server.connection.pending_output() and \
                guest.u32(RSP_CONS) == guest.u32(RSP_PROD):
            break
        assert step < 10000
    assert [(m[1], m[2]) for m in guest.messages()] == [(i, b"OK\0") for i in range(12)]


@pytest.mark.parametrize("window", ["after reading req_prod", "after publishing req_cons"])
def test_a_request_written_while_the_server_works_is_answered_without_a_signal(window):
    # Linux's xb_write signals only `if (prod <= req_cons)`: a request written
    # while the server has not yet published that it consumed the one
    # before gets no signal. The server must find it on its own before it
    # returns, or the guest waits forever (the lost-reply hang).
    _, guest, server = make()
    guest.send(request(Op.READ, b"name\0", req_id=1))
    load, store = server._load_u32, server._store_u32
    signalled = []

    def guest_writes_second_request():
        old_prod = guest.u32(REQ_PROD)
        guest.send(request(Op.READ, b"domid\0", req_id=2))
        signalled.append(old_prod <= guest.u32(REQ_CONS))

    def hooked_load(offset):
        value = load(offset)
        if offset == REQ_PROD and window == "after reading req_prod" and not signalled:
            guest_writes_second_request()
        return value

    def hooked_store(offset, value):
        store(offset, value)
        if offset == REQ_CONS and window == "after publishing req_cons" and not signalled:
            guest_writes_second_request()

    server._load_u32, server._store_u32 = hooked_load, hooked_store
    server.process()
    guest.receive()
    if window == "after reading req_prod":
        assert signalled == [False]  # the case Linux leaves to the server
    assert [m[1] for m in guest.messages()] == [1, 2]


def test_snapshot_shows_both_sides_of_the_ring_and_the_backlog():
    _, guest, server = make(start_index=100)
    assert server.snapshot() == {"req_cons": 100, "req_prod": 100, "rsp_cons": 100, "rsp_prod": 100,
                                 "server_req_cons": 100, "server_rsp_prod": 100, "error": 0, "queued": 0,
                                 "answered": 0}
    sent = guest.send(request(Op.READ, b"name\0") + request(Op.READ, b"domid\0", req_id=2))
    guest.set_u32(REQ_CONS, 0)  # a guest scribbling on the server's index
    before = server.snapshot()
    assert (before["req_prod"], before["req_cons"], before["server_req_cons"]) == (100 + sent, 0, 100)
    server.process()
    after = server.snapshot()
    assert after["server_req_cons"] == after["req_cons"] == 100 + sent
    assert after["answered"] == 2 and after["queued"] == 0
    assert after["rsp_prod"] == after["server_rsp_prod"] > after["rsp_cons"] == 100  # replies not yet read


class ManualLoop:
    """Timers and handed-over calls that the test runs by hand."""

    def __init__(self):
        self.timers, self.calls = [], []

    def call_later(self, delay, callback):
        self.timers.append(callback)

    def call_soon_threadsafe(self, callback):
        self.calls.append(callback)

    def assert_owner(self, what=""):
        pass

    def tick(self):
        """One safety-net interval: run the timers that are due."""
        timers, self.timers = self.timers, []
        for callback in timers:
            callback()


def service_rig():
    from pyvmm.xen.xenstore.service import GuestStoreService

    store = XenStore()
    create_domain_nodes(store, 1, "guest", 1, 0xFEFF9, 2, 0xFEFF8)
    page = memoryview(bytearray(4096))
    loop = ManualLoop()
    service = GuestStoreService(loop, store, 1, page, recheck_seconds=1.0, check_threads=False)
    signals = []
    service.attach(lambda: signals.append(True))
    service.start()
    return Guest(page), service, loop, signals


def test_safety_net_answers_a_request_whose_signal_was_lost(caplog):
    guest, service, loop, signals = service_rig()
    guest.send(request(Op.READ, b"name\0", req_id=7))  # and no signal
    loop.tick()  # seen once: it may just be queued behind this check
    assert guest.u32(RSP_PROD) == 0 and service.lost_wakeups == 0
    loop.tick()  # a whole interval without progress: a lost wake-up
    guest.receive()
    assert guest.messages() == [(Op.READ, 7, b"guest")]
    assert service.lost_wakeups == 1 and signals == [True]
    assert "no event announcing it" in caplog.text


def test_safety_net_stays_quiet_when_the_signal_arrives():
    guest, service, loop, signals = service_rig()
    guest.send(request(Op.READ, b"name\0", req_id=7))
    loop.tick()
    service.notified()  # the guest's signal, served between two checks
    guest.receive()
    loop.tick()
    loop.tick()
    assert service.lost_wakeups == 0 and signals == [True]


def test_safety_net_signals_again_for_replies_the_guest_never_read():
    guest, service, loop, signals = service_rig()
    guest.send(request(Op.READ, b"name\0", req_id=7))
    service.notified()  # answered and signalled, but the guest never reads
    assert signals == [True]
    loop.tick()
    loop.tick()
    assert service.lost_wakeups == 1 and signals == [True, True]
