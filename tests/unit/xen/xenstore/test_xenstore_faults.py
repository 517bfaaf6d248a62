"""Injected xenstore faults (EAGAIN on commit, late watch events) and the
xenstore trace, through the wire protocol a guest speaks."""

from __future__ import annotations

import io
import json

import pytest

from pyvmm.xen.xenstore import Op, XenStore, create_domain_nodes
from pyvmm.xen.xenstore.protocol import encode_message, iter_messages

from fault_rules import faults, trace  # noqa: F401 - fixtures


@pytest.fixture
def guest(trace, faults):
    store = XenStore(trace=trace, faults=faults)
    create_domain_nodes(store, 1, "guest", 1, 0xFEFF9, 2, 0xFEFF8)
    return store.connect(1)


def ask(conn, op, payload=b"", tx_id=0):
    conn.feed(encode_message(op, 7, tx_id, payload))
    return [(h.type, p) for h, p in iter_messages(conn.take_output(1 << 20))]


def commit_write(conn, path, value):
    (_, tx), = ask(conn, Op.TRANSACTION_START, b"\0")
    tx = int(tx.rstrip(b"\0"))
    assert ask(conn, Op.WRITE, path + b"\0" + value, tx)[0][0] == Op.WRITE
    return ask(conn, Op.TRANSACTION_END, b"T\0", tx)


def test_eagain_on_the_first_commits_then_commits_work(guest, faults):
    faults.add("xenstore:eagain,count=2")
    for _ in range(2):
        assert commit_write(guest, b"data/x", b"1") == [(Op.ERROR, b"EAGAIN\0")]
        assert ask(guest, Op.READ, b"data/x\0") == [(Op.ERROR, b"ENOENT\0")]  # aborted: nothing written
    assert commit_write(guest, b"data/x", b"1") == [(Op.TRANSACTION_END, b"OK\0")]
    assert ask(guest, Op.READ, b"data/x\0") == [(Op.READ, b"1")]
    assert faults.rules()[0]["fired"] == 2


def test_aborts_are_not_refused(guest, faults):
    faults.add("xenstore:eagain")
    (_, tx), = ask(guest, Op.TRANSACTION_START, b"\0")
    assert ask(guest, Op.TRANSACTION_END, b"F\0", int(tx.rstrip(b"\0"))) == [(Op.TRANSACTION_END, b"OK\0")]


def test_watch_events_come_late(guest, faults):
    later = []
    faults.call_later = lambda delay, callback: later.append((delay, callback))
    faults.add("xenstore:delay-watch=250ms,path=/local/domain/1/data")
    assert ask(guest, Op.WATCH, b"data\0tok\0") == [(Op.WATCH, b"OK\0")]
    assert ask(guest, Op.WRITE, b"data/y\0v") == [(Op.WRITE, b"OK\0")]
    assert len(later) == 2  # the first event at WATCH, and the write's
    assert all(delay == 0.25 for delay, _ in later)
    for _, deliver in later:
        deliver()
    events = [p for h, p in iter_messages(guest.take_output(1 << 20)) if h.type == Op.WATCH_EVENT]
    assert events == [b"data\0tok\0", b"data/y\0tok\0"]


def test_requests_and_watches_are_traced(guest, faults, trace):
    stream = io.StringIO()
    trace.attach({"xenstore"}, stream)
    try:
        faults.add("xenstore:eagain,count=1")
        ask(guest, Op.WATCH, b"data\0tok\0")
        commit_write(guest, b"data/z", b"42")
        ask(guest, Op.READ, b"data/none\0")
    finally:
        trace.close()
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    requests = [(e["op"], e.get("path"), e.get("value"), e.get("args"), e.get("error"))
                for e in events if e["ev"] == "request"]
    assert requests == [("WATCH", "data", None, ["tok"], None), ("TRANSACTION_START", None, None, None, None),
                        ("WRITE", "data/z", "42", None, None), ("TRANSACTION_END", None, None, ["T"], "EAGAIN"),
                        ("READ", "data/none", None, None, "ENOENT")]
    assert [e["path"] for e in events if e["ev"] == "watch"] == ["data"]
    assert [e["ev"] for e in events if e["cat"] == "fault"] == ["eagain"]
    start = next(e for e in events if e.get("op") == "TRANSACTION_START")
    assert start["reply"].isdigit()
