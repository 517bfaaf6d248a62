"""Wire protocol: framing, payload parsing, error replies, malformed input."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.xen.xenstore import Access, Op, Permission, XenStore, XenStoreError, create_domain_nodes
from pyvmm.xen.xenstore.protocol import (
    HEADER_SIZE,
    PAYLOAD_MAX,
    RING_ERROR_PROTO,
    FrameDecoder,
    FrameError,
    directory_part_payload,
    encode_message,
    iter_messages,
    one_arg,
    terminated_strings,
)


def message(op, payload=b"", req_id=7, tx_id=0):
    return encode_message(op, req_id, tx_id, payload)


def replies(conn):
    return [(h.type, h.req_id, h.tx_id, p) for h, p in iter_messages(conn.take_output(1 << 20))]


@pytest.fixture
def store():
    store = XenStore()
    create_domain_nodes(store, 1, "guest", 1, 0xFEFF9, 2, 0xFEFF8)
    return store


@pytest.fixture
def guest(store):
    return store.connect(1)


def ask(conn, op, payload=b"", req_id=7, tx_id=0):
    conn.feed(message(op, payload, req_id, tx_id))
    return replies(conn)


def test_header_layout_is_four_little_endian_u32():
    assert message(Op.READ, b"a\0", req_id=0x11223344, tx_id=5) == (
        struct.pack("<IIII", 2, 0x11223344, 5, 2) + b"a\0")


def test_op_numbers_match_xs_wire():
    assert (Op.CONTROL, Op.DIRECTORY, Op.READ, Op.WATCH_EVENT, Op.ERROR) == (0, 1, 2, 15, 16)
    assert (Op.RESET_WATCHES, Op.DIRECTORY_PART) == (21, 22)


def test_encode_rejects_oversized_payload():
    with pytest.raises(ValueError):
        encode_message(Op.WRITE, 0, 0, bytes(PAYLOAD_MAX + 1))


@given(st.lists(st.binary(max_size=200), max_size=6), st.data())
@settings(max_examples=60, deadline=None)
def test_decoder_reassembles_any_chunking(payloads, data):
    stream = b"".join(message(Op.WRITE, p, req_id=i) for i, p in enumerate(payloads))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    decoder = FrameDecoder()
    seen = []
    for start, end in zip([0] + cuts, cuts + [len(stream)]):
        decoder.push(stream[start:end])
        while (m := decoder.pop()) is not None:
            seen.append((m[0].req_id, m[1]))
    assert seen == list(enumerate(payloads))


def test_decoder_rejects_length_over_maximum():
    decoder = FrameDecoder()
    decoder.push(struct.pack("<IIII", Op.READ, 1, 0, PAYLOAD_MAX + 1))
    with pytest.raises(FrameError):
        decoder.pop()


def test_iter_messages_reports_trailing_bytes():
    with pytest.raises(FrameError):
        list(iter_messages(message(Op.READ, b"x\0") + b"\1\2"))


def test_one_arg_needs_exactly_one_terminating_nul():
    assert one_arg(b"path\0") == "path"
    for bad in (b"", b"path", b"a\0b\0", b"a\0b"):
        with pytest.raises(XenStoreError) as exc:
            one_arg(bad)
        assert exc.value.name == "EINVAL"


def test_terminated_strings_ignore_unterminated_tail():
    assert terminated_strings(b"a\0bc\0tail") == ["a", "bc"]
    assert terminated_strings(b"") == []


def test_permission_round_trip_and_rejects_garbage():
    for text in ("n0", "r1", "w65535", "b12"):
        assert str(Permission.parse(text)) == text
    assert Permission.parse("b3") == Permission(3, Access.READ | Access.WRITE)
    for bad in ("", "x1", "r", "r-1", "r65536", "r0x10", "r 1", "r１"):
        with pytest.raises(XenStoreError) as exc:
            Permission.parse(bad)
        assert exc.value.name == "EINVAL"


def test_error_names_are_checked():
    with pytest.raises(ValueError):
        XenStoreError("EPERM")


# --- replies -------------------------------------------------------------

def test_reply_echoes_type_req_id_and_tx_id(guest):
    assert ask(guest, Op.READ, b"domid\0", req_id=0xDEADBEEF) == [(Op.READ, 0xDEADBEEF, 0, b"1")]


def test_error_reply_is_errno_name_with_nul(guest):
    assert ask(guest, Op.READ, b"nonexistent\0", req_id=3) == [(Op.ERROR, 3, 0, b"ENOENT\0")]


def test_unknown_and_reply_only_types_get_enosys(guest):
    for msg_type in (Op.WATCH_EVENT, Op.ERROR, Op.RESTRICT, 23, 0xFFFF, 0xFFFFFFFF):
        assert ask(guest, msg_type, b"x\0") == [(Op.ERROR, 7, 0, b"ENOSYS\0")]
    assert not guest.broken


@pytest.mark.parametrize("op", [Op.CONTROL, Op.INTRODUCE, Op.RELEASE, Op.RESUME,
                                Op.SET_TARGET, Op.IS_DOMAIN_INTRODUCED])
def test_management_ops_are_refused_to_guests(guest, op):
    assert ask(guest, op, b"1\0" b"2\0" b"3\0") == [(Op.ERROR, 7, 0, b"EACCES\0")]


def test_privileged_management_ops(store):
    dom0 = store.connect(0, privileged=True)
    assert ask(dom0, Op.IS_DOMAIN_INTRODUCED, b"1\0") == [(Op.IS_DOMAIN_INTRODUCED, 7, 0, b"T\0")]
    assert ask(dom0, Op.IS_DOMAIN_INTRODUCED, b"2\0") == [(Op.IS_DOMAIN_INTRODUCED, 7, 0, b"F\0")]
    assert ask(dom0, Op.INTRODUCE, b"2\0" b"1234\0" b"5\0")[0][3] == b"OK\0"
    assert ask(dom0, Op.RESUME, b"2\0")[0][3] == b"OK\0"
    assert ask(dom0, Op.SET_TARGET, b"2\0" b"1\0")[0][3] == b"OK\0"
    assert ask(dom0, Op.RELEASE, b"2\0")[0][3] == b"OK\0"
    assert ask(dom0, Op.RELEASE, b"2\0")[0][3] == b"ENOENT\0"
    assert ask(dom0, Op.INTRODUCE, b"0\0" b"1\0" b"1\0")[0][3] == b"EINVAL\0"
    assert ask(dom0, Op.INTRODUCE, b"2\0")[0][3] == b"EINVAL\0"
    assert ask(dom0, Op.CONTROL, b"check\0") == [(Op.CONTROL, 7, 0, b"OK\0")]
    assert ask(dom0, Op.CONTROL, b"no-such-command\0")[0][3] == b"EINVAL\0"


def test_get_domain_path(guest):
    assert ask(guest, Op.GET_DOMAIN_PATH, b"5\0") == [(Op.GET_DOMAIN_PATH, 7, 0, b"/local/domain/5\0")]
    for bad in (b"x\0", b"\0", b"-1\0", b"99999999\0", b"5"):
        assert ask(guest, Op.GET_DOMAIN_PATH, bad)[0][3] == b"EINVAL\0"


def test_write_value_is_everything_after_the_first_nul(guest):
    assert ask(guest, Op.WRITE, b"data/bin\0a\0b\0")[0][3] == b"OK\0"
    assert ask(guest, Op.READ, b"data/bin\0")[0][3] == b"a\0b\0"
    assert ask(guest, Op.WRITE, b"data/empty\0")[0][3] == b"OK\0"
    assert ask(guest, Op.READ, b"data/empty\0")[0][3] == b""


def test_malformed_payloads_get_einval(guest):
    cases = [
        (Op.WRITE, b"no-nul-at-all"),
        (Op.READ, b"data"),
        (Op.READ, b""),
        (Op.READ, b"data\0extra\0"),
        (Op.MKDIR, b"data\0junk"),
        (Op.RM, b""),
        (Op.DIRECTORY, b"a\0b\0"),
        (Op.GET_PERMS, b""),
        (Op.SET_PERMS, b"data\0"),
        (Op.SET_PERMS, b"data\0q1\0"),
        (Op.WATCH, b"data\0"),
        (Op.WATCH, b"data\0tok\0extra\0"),
        (Op.UNWATCH, b"data"),
        (Op.DIRECTORY_PART, b"data\0"),
        (Op.DIRECTORY_PART, b"data\0x\0"),
        (Op.DIRECTORY_PART, b"data\0" + b"9" * 4000 + b"\0"),
        (Op.TRANSACTION_END, b"X\0"),
        (Op.TRANSACTION_END, b"T"),
    ]
    for op, payload in cases:
        assert ask(guest, op, payload) == [(Op.ERROR, 7, 0, b"EINVAL\0")], (op, payload)
    assert not guest.broken


def test_unknown_transaction_id_is_enoent(guest):
    for op, payload in ((Op.READ, b"domid\0"), (Op.WRITE, b"data/x\0v"),
                        (Op.GET_DOMAIN_PATH, b"1\0"), (Op.TRANSACTION_END, b"T\0")):
        assert ask(guest, op, payload, tx_id=42) == [(Op.ERROR, 7, 42, b"ENOENT\0")]
    assert ask(guest, Op.TRANSACTION_START, b"\0", tx_id=42)[0][3] == b"ENOENT\0"
    assert ask(guest, Op.TRANSACTION_END, b"T\0")[0][3] == b"ENOENT\0"


def test_watch_ignores_the_transaction_id(guest):
    assert ask(guest, Op.WATCH, b"data\0t\0", tx_id=99)[0][:3] == (Op.WATCH, 7, 99)


def test_nested_transaction_start_is_ebusy(guest):
    tx = int(ask(guest, Op.TRANSACTION_START, b"\0")[0][3].rstrip(b"\0"))
    assert ask(guest, Op.TRANSACTION_START, b"\0", tx_id=tx)[0][3] == b"EBUSY\0"


def test_transaction_over_the_wire(guest, store):
    (reply,) = ask(guest, Op.TRANSACTION_START, b"\0")
    assert reply[0] == Op.TRANSACTION_START and reply[3].endswith(b"\0")
    tx = int(reply[3][:-1])
    assert ask(guest, Op.WRITE, b"data/a\0v", tx_id=tx) == [(Op.WRITE, 7, tx, b"OK\0")]
    assert ask(guest, Op.READ, b"data/a\0")[0][3] == b"ENOENT\0"
    assert ask(guest, Op.READ, b"data/a\0", tx_id=tx)[0][3] == b"v"
    assert ask(guest, Op.TRANSACTION_END, b"T\0", tx_id=tx) == [(Op.TRANSACTION_END, 7, tx, b"OK\0")]
    assert ask(guest, Op.READ, b"data/a\0")[0][3] == b"v"


def test_oversized_length_breaks_the_connection(guest):
    guest.feed(struct.pack("<IIII", Op.READ, 1, 0, PAYLOAD_MAX + 1))
    assert guest.broken and guest.error == RING_ERROR_PROTO
    guest.feed(message(Op.READ, b"domid\0"))
    assert guest.pending_output() == 0 and not guest.accepting_input


def test_requests_before_the_bad_frame_are_answered(guest):
    guest.feed(message(Op.READ, b"domid\0") + struct.pack("<IIII", Op.READ, 2, 0, 1 << 31))
    assert guest.broken
    # Output was dropped with the connection state, as xenstored does.
    assert guest.pending_output() == 0


def test_truncated_message_waits_for_the_rest(guest):
    whole = message(Op.READ, b"domid\0")
    guest.feed(whole[:HEADER_SIZE - 3])
    guest.feed(whole[HEADER_SIZE - 3:-1])
    assert guest.pending_output() == 0
    guest.feed(whole[-1:])
    assert replies(guest) == [(Op.READ, 7, 0, b"1")]


def test_reply_too_large_is_e2big(store, guest):
    store.client(0).write("/local/domain/1/data/big", b"x" * 4097)
    assert ask(guest, Op.READ, b"data/big\0")[0][3] == b"E2BIG\0"


def test_directory_part_pages_through_a_large_directory(store, guest):
    dom0 = store.client(0)
    names = [f"entry-{i:04d}-{'x' * 40}" for i in range(200)]
    for name in names:
        dom0.write(f"/local/domain/1/data/{name}", "")
    collected, offset, generation = [], 0, None
    while True:
        payload = ask(guest, Op.DIRECTORY_PART, b"data\0" + str(offset).encode() + b"\0")[0][3]
        assert len(payload) <= PAYLOAD_MAX
        gen, rest = payload.split(b"\0", 1)
        assert generation in (None, gen)
        generation = gen
        parts = rest.split(b"\0")
        if rest == b"\0" or parts[-2:] == [b"", b""]:
            collected += [p.decode() for p in parts if p]
            break
        chunk = [p.decode() for p in parts[:-1]]
        collected += chunk
        offset += sum(len(c) + 1 for c in chunk)
    assert collected == names
    assert ask(guest, Op.DIRECTORY, b"data\0")[0][3] == b"E2BIG\0"


def test_directory_part_payload_past_the_end():
    assert directory_part_payload(5, ["a", "b"], 4) == b"5\0\0"
    assert directory_part_payload(5, ["a", "b"], 0) == b"5\0a\0b\0\0"
    assert directory_part_payload(5, ["a", "b"], 2) == b"5\0b\0\0"


def test_watch_event_message_has_zero_ids(guest):
    out = ask(guest, Op.WATCH, b"data\0my-token\0", req_id=9)
    assert out == [(Op.WATCH, 9, 0, b"OK\0"), (Op.WATCH_EVENT, 0, 0, b"data\0my-token\0")]


def test_identical_unsent_events_are_coalesced(store, guest):
    ask(guest, Op.WATCH, b"data\0t\0")
    dom0 = store.client(0)
    for _ in range(5):
        dom0.write("/local/domain/1/data/x", "1")
    events = [p for t, _, _, p in replies(guest) if t == Op.WATCH_EVENT]
    assert events == [b"data/x\0t\0"]


def test_event_backlog_is_bounded_for_guests(store):
    guest = store.connect(1, event_backlog_bytes=200)
    ask(guest, Op.WATCH, b"data\0t\0")
    dom0 = store.client(0)
    for i in range(100):
        dom0.write(f"/local/domain/1/data/n{i}", "1")
    assert 200 <= guest.pending_output() < 300


def test_output_listener_called_when_events_appear(store, guest):
    calls = []
    guest.output_listener = lambda: calls.append(guest.pending_output())
    ask(guest, Op.WATCH, b"data\0t\0")
    store.client(0).write("/local/domain/1/data/x", "1")
    assert calls and calls[-1] > 0


def test_take_output_splits_messages_anywhere(guest):
    guest.feed(message(Op.READ, b"domid\0") + message(Op.READ, b"name\0"))
    stream = b""
    while guest.pending_output():
        stream += guest.take_output(5)
    assert [(h.type, p) for h, p in iter_messages(stream)] == [(Op.READ, b"1"), (Op.READ, b"guest")]


def test_input_pauses_while_output_backs_up(guest):
    assert guest.accepting_input
    fed = 0
    while guest.accepting_input:
        guest.feed(message(Op.DIRECTORY, b"/local/domain/1\0"))
        fed += 1
        assert fed < 1000
    assert fed > 1
    guest.take_output(1 << 20)
    assert guest.accepting_input


def test_close_drops_watches_and_ignores_input(store, guest):
    ask(guest, Op.WATCH, b"data\0t\0")
    guest.close()
    assert not guest.client.watches
    guest.feed(message(Op.READ, b"domid\0"))
    assert guest.pending_output() == 0


def test_reset_recovers_a_broken_connection(guest):
    ask(guest, Op.WATCH, b"data\0t\0")
    guest.feed(struct.pack("<IIII", Op.READ, 1, 0, PAYLOAD_MAX + 1))
    guest.reset()
    assert not guest.broken and not guest.client.watches
    assert ask(guest, Op.READ, b"domid\0") == [(Op.READ, 7, 0, b"1")]


@given(st.binary(max_size=300))
@settings(max_examples=200, deadline=None)
def test_arbitrary_bytes_never_raise(data):
    store = XenStore()
    create_domain_nodes(store, 1, "g", 1, 1, 2, 2)
    conn = store.connect(1)
    conn.feed(data)
    conn.take_output(1 << 20)
    assert store.check() == []


@given(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF), st.binary(max_size=64))
@settings(max_examples=200, deadline=None)
def test_arbitrary_messages_get_exactly_one_reply(msg_type, tx_id, payload):
    store = XenStore()
    create_domain_nodes(store, 1, "g", 1, 1, 2, 2)
    conn = store.connect(1)
    conn.feed(encode_message(msg_type, 77, tx_id, payload))
    out = [(h.type, h.req_id) for h, _ in iter_messages(conn.take_output(1 << 20))
           if h.type != Op.WATCH_EVENT]
    assert len(out) == 1 and out[0][1] == 77


def test_counted_requests_by_type_answer_as_before(guest):
    from pyvmm.core.stats import Counters

    counters = Counters()
    guest.count_requests(counters)
    assert ask(guest, Op.WRITE, b"data/x\0v")[0][0] == Op.WRITE
    assert ask(guest, Op.READ, b"data/x\0") == [(Op.READ, 7, 0, b"v")]
    error = ask(guest, Op.READ, b"data/missing\0")
    assert error[0][0] == Op.ERROR
    assert counters.counters[("xenstore", "READ")][0] == 2  # a request that failed counts too
    assert counters.counters[("xenstore", "WRITE")][0] == 1
    assert counters.counters[("xenstore", "DIRECTORY")] == [0, 0]
