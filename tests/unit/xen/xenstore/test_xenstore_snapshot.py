"""XenStore and GuestStoreService save_state()/restore_state(): a guest
that watches, writes and holds a transaction open across a save finds
everything as it left it in a restored store: its watches fire with their
tokens, its transaction commits (or conflicts) as it would have, its half
sent request is answered, and the accounting is the same."""

import json

import pytest

from frontends.xenstore import XenbusRing as Guest
from pyvmm.core.snapshot import SnapshotError
from pyvmm.xen.xenstore import Access, Op, Permission, XenStore, create_domain_nodes
from pyvmm.xen.xenstore.protocol import encode_message
from pyvmm.xen.xenstore.service import GuestStoreService

DOMID = 1


class ManualLoop:
    def __init__(self):
        self.timers, self.calls = [], []

    def call_later(self, delay, callback):
        self.timers.append(callback)

    def call_soon_threadsafe(self, callback):
        self.calls.append(callback)

    def assert_owner(self, what=""):
        pass


def build(page=None):
    """What the domain builds at boot: the store, the guest's nodes, its ring service."""
    store = XenStore()
    create_domain_nodes(store, DOMID, "guest", 1, 0xFEFF9, 2, 0xFEFF8)
    page = memoryview(bytearray(4096)) if page is None else page
    service = GuestStoreService(ManualLoop(), store, DOMID, page, recheck_seconds=None, check_threads=False)
    service.attach(lambda: None)
    return store, service, Guest(page)


def ask(guest, service, op, payload, req_id, tx=0):
    guest.send(encode_message(op, req_id, tx, payload))
    service.notified()
    guest.receive()
    return [m for m in guest.messages() if m[1] == req_id or m[0] == Op.WATCH_EVENT]


def events(guest):
    return [payload for kind, _, payload in guest.messages() if kind == Op.WATCH_EVENT]


def busy(store, service, guest):
    """Drive the guest's connection into a state worth saving; returns the transaction id."""
    ask(guest, service, Op.WATCH, b"device\0tok-dev\0", 1)
    ask(guest, service, Op.WATCH, b"/local/domain/1/other\0tok-abs\0", 2)
    ask(guest, service, Op.WRITE, b"data/a\0one", 3)
    ask(guest, service, Op.SET_PERMS, b"data/a\0b1\0r0\0", 4)
    reply = ask(guest, service, Op.TRANSACTION_START, b"\0", 5)
    tx = int(reply[-1][2].rstrip(b"\0"))
    ask(guest, service, Op.WRITE, b"data/b\0in-tx", 6, tx)
    ask(guest, service, Op.READ, b"data/a\0", 7, tx)
    # Half a request: the guest wrote it in two goes and the VM was saved between.
    half = encode_message(Op.READ, 8, 0, b"data/a\0")
    guest.send(half[:10])
    service.notified()
    return tx, half


def save(store, service, page):
    state = {"store": store.save_state(), "service": service.save_state(), "ram": bytes(page).hex()}
    return json.loads(json.dumps(state))


def restore(state):
    page = memoryview(bytearray(bytes.fromhex(state["ram"])))  # the machine restores guest RAM
    store, service, guest = build(page)
    store.restore_state(state["store"])
    service.restore_state(state["service"])
    guest.received = b""
    return store, service, guest


def test_a_restored_guest_connection_goes_on_where_it_was():
    store, service, guest = build()
    tx, half = busy(store, service, guest)
    before = {domid: store.memory_of(domid) for domid in (0, DOMID)}
    state = save(store, service, service.ring._page)

    store2, service2, guest2 = restore(state)
    assert {domid: store2.memory_of(domid) for domid in (0, DOMID)} == before
    assert store2.check() == []
    dom0 = store2.client(0)
    assert dom0.read("/local/domain/1/data/a") == b"one"
    assert dom0.get_perms("/local/domain/1/data/a") == [Permission(1, Access.READ | Access.WRITE),
                                                        Permission(0, Access.READ)]
    assert not dom0.exists("/local/domain/1/data/b")  # still only in the transaction
    # The rest of the half-sent request.
    guest2.send(half[10:])
    service2.notified()
    guest2.receive()
    assert (Op.READ, 8, b"one") in guest2.messages()
    # The watches fire with their tokens.
    guest2.received = b""
    dom0.write("/local/domain/1/device/vbd/51712/state", "1")
    dom0.write("/local/domain/1/other/c", "x")
    service2.notified()
    guest2.receive()
    assert events(guest2) == [b"device/vbd/51712/state\0tok-dev\0", b"/local/domain/1/other/c\0tok-abs\0"]
    # The transaction sees its own write and commits.
    assert ask(guest2, service2, Op.READ, b"data/b\0", 9, tx)[-1] == (Op.READ, 9, b"in-tx")
    assert ask(guest2, service2, Op.TRANSACTION_END, b"T\0", 10, tx)[-1] == (Op.TRANSACTION_END, 10, b"OK\0")
    assert dom0.read("/local/domain/1/data/b") == b"in-tx"
    # Generations go on from where they were: a new transaction gets a new id.
    reply = ask(guest2, service2, Op.TRANSACTION_START, b"\0", 11)
    assert int(reply[-1][2].rstrip(b"\0")) != tx


def test_a_restored_transaction_conflicts_as_the_saved_one_would():
    store, service, guest = build()
    tx, half = busy(store, service, guest)
    store2, service2, guest2 = restore(save(store, service, service.ring._page))
    guest2.send(half[10:])  # the rest of the half-sent request
    service2.notified()
    store2.client(0).write("/local/domain/1/data/a", "changed")  # read by the transaction
    reply = ask(guest2, service2, Op.TRANSACTION_END, b"T\0", 12, tx)
    assert reply[-1] == (Op.ERROR, 12, b"EAGAIN\0")


def test_queued_replies_and_events_that_did_not_fit_are_delivered_after_restore():
    store, service, guest = build()
    ask(guest, service, Op.WATCH, b"data\0t\0", 1)
    for index in range(3):  # three big values; the guest does not read its replies
        store.client(0).write(f"/local/domain/1/data/v{index}", "x" * 3000)
        guest.send(encode_message(Op.READ, 100 + index, 0, f"data/v{index}\0".encode()))
        service.notified()
    queued = service.connection.pending_output()
    assert queued  # the ring (1 KiB) holds only part of it
    store2, service2, guest2 = restore(save(store, service, service.ring._page))
    assert service2.connection.pending_output() == queued
    assert store2.memory_of(DOMID) == store.memory_of(DOMID)
    guest2.received = b""
    for _ in range(40):
        guest2.receive()
        service2.notified()
    replies = {req: payload for kind, req, payload in guest2.messages() if kind == Op.READ}
    assert sorted(replies) == [100, 101, 102] or sorted(replies) == [101, 102]  # 100 may have left already
    assert all(payload == b"x" * 3000 for payload in replies.values())


def test_the_store_refuses_to_save_a_vmm_clients_open_transaction():
    store, _, _ = build()
    client = store.client(0)
    client.transaction_start()
    with pytest.raises(SnapshotError, match="transaction"):
        store.save_state()


def corrupt_store(change):
    store, service, guest = build()
    busy(store, service, guest)
    state = json.loads(json.dumps(store.save_state()))
    change(state)
    return state


@pytest.mark.parametrize("change", [
    lambda s: s.update(version=2),
    lambda s: s.update(nodes={}),
    lambda s: s.update(generation=-1),
    lambda s: s["nodes"].append(["/orphan", "", ["b0"], [], 1]),  # not listed by a parent
    lambda s: s["nodes"].append(list(s["nodes"][0])),  # twice
    lambda s: s["nodes"].append(["bad//path", "", ["b0"], [], 1]),
    lambda s: s["nodes"][0].__setitem__(2, []),  # no permissions
    lambda s: s["nodes"][0].__setitem__(2, ["q7"]),
    lambda s: s["nodes"][0].__setitem__(1, "%%%"),
    lambda s: s["nodes"][0].__setitem__(4, s["generation"] + 1),
    lambda s: s["nodes"][0].__setitem__(3, ["../x"]),
    lambda s: s["nodes"].pop(0),  # the root, or a listed child, goes missing
    lambda s: s.update(introduced=["x"]),
    lambda s: s.update(targets={"1": 70000}),
])
def test_corrupt_trees_are_refused(change):
    state = corrupt_store(change)
    store, _, _ = build()
    before = store.save_state()
    with pytest.raises(SnapshotError):
        store.restore_state(state)
    assert store.save_state() == before


@pytest.mark.parametrize("change", [
    lambda s: s.update(version=0),
    lambda s: s["ring"].update(req_cons=-1),
    lambda s: s["connection"].update(partial_request="zz"),
    lambda s: s["connection"].update(partial_request="ff" * 20),  # a header with an oversized length
    lambda s: s["connection"].update(output=[["00" * 16 + "01", False]]),  # length field says 0
    lambda s: s["connection"].update(head_sent=5),  # nothing queued to have sent part of
    lambda s: s["connection"].update(error=9),
    lambda s: s["connection"]["client"]["watches"].append(["rel/path", "t", 0]),
    lambda s: s["connection"]["client"]["watches"].append(["/x", "t", 3]),
    lambda s: s["connection"]["client"]["transactions"].append({"id": 0, "age": 0}),
    lambda s: s["connection"]["client"]["transactions"][0].update(age=float("inf")),
    lambda s: s["connection"]["client"]["transactions"][0]["accessed"].append(["/a", -1, None, None, False]),
    lambda s: s["connection"]["client"].update(next_tx=1 << 40),
])
def test_corrupt_connections_are_refused(change):
    store, service, guest = build()
    busy(store, service, guest)
    state = json.loads(json.dumps(service.save_state()))
    state["connection"]["partial_request"] = ""
    change(state)
    store2, service2, _ = build()
    store2.restore_state(store.save_state())
    held = store2.memory_of(DOMID)
    with pytest.raises(SnapshotError):
        service2.restore_state(state)
    assert store2.memory_of(DOMID) == held  # nothing half-restored is charged
    assert not service2.connection.client.watches
