"""Transactions: isolation, commit, abort, conflicts, and their watch events."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.xen.xenstore import Access, Permission, Quotas, XenStore, XenStoreError


def errno_of(call, *args, **kwargs):
    with pytest.raises(XenStoreError) as exc:
        call(*args, **kwargs)
    return exc.value.name


@pytest.fixture
def store():
    store = XenStore()
    dom0 = store.client(0)
    dom0.mkdir("/local/domain/1")
    dom0.set_perms("/local/domain/1", [Permission(1, Access.NONE)])
    return store


@pytest.fixture
def dom0(store):
    return store.client(0)


@pytest.fixture
def guest(store):
    return store.client(1)


@pytest.fixture
def events(dom0):
    seen = []
    dom0.watch("/local/domain/1", "w", lambda path, token: seen.append(path))
    seen.clear()  # the initial event
    return seen


def test_changes_are_private_until_commit(guest, dom0):
    tx = guest.transaction_start()
    guest.write("data/a", "1", tx)
    assert guest.read("data/a", tx) == b"1"
    assert errno_of(guest.read, "data/a") == "ENOENT"
    assert errno_of(dom0.read, "/local/domain/1/data") == "ENOENT"
    guest.transaction_end(tx, commit=True)
    assert dom0.read("/local/domain/1/data/a") == b"1"


def test_abort_discards_changes(guest):
    guest.write("keep", "old")
    tx = guest.transaction_start()
    guest.write("keep", "new", tx)
    guest.rm("keep", tx)
    guest.write("other", "x", tx)
    guest.transaction_end(tx, commit=False)
    assert guest.read("keep") == b"old"
    assert errno_of(guest.read, "other") == "ENOENT"


def test_transaction_id_is_gone_after_end(guest):
    tx = guest.transaction_start()
    guest.transaction_end(tx, commit=False)
    assert errno_of(guest.read, "x", tx) == "ENOENT"
    assert errno_of(guest.transaction_end, tx) == "ENOENT"


def test_transaction_ids_are_per_client_and_not_shared(store, guest):
    tx = guest.transaction_start()
    other = store.client(1)
    assert errno_of(other.read, "x", tx) == "ENOENT"
    assert tx != 0


def test_transaction_sees_a_snapshot_of_what_it_read(guest, dom0):
    guest.write("v", "1")
    tx = guest.transaction_start()
    assert guest.read("v", tx) == b"1"
    dom0.write("/local/domain/1/v", "2")
    assert guest.read("v", tx) == b"1"
    assert errno_of(guest.transaction_end, tx) == "EAGAIN"
    assert guest.read("v") == b"2"


def test_conflict_on_a_written_node(guest, dom0):
    guest.write("v", "1")
    tx = guest.transaction_start()
    guest.write("v", "mine", tx)
    dom0.write("/local/domain/1/v", "theirs")
    assert errno_of(guest.transaction_end, tx) == "EAGAIN"
    assert guest.read("v") == b"theirs"


def test_conflict_when_a_read_missing_node_appears(guest, dom0):
    tx = guest.transaction_start()
    assert errno_of(guest.read, "flag", tx) == "ENOENT"
    guest.write("other", "x", tx)
    dom0.write("/local/domain/1/flag", "now")
    assert errno_of(guest.transaction_end, tx) == "EAGAIN"
    assert errno_of(guest.read, "other") == "ENOENT"


def test_conflict_when_a_read_node_is_removed(guest, dom0):
    guest.write("v", "1")
    tx = guest.transaction_start()
    guest.read("v", tx)
    guest.write("w", "x", tx)
    dom0.rm("/local/domain/1/v")
    assert errno_of(guest.transaction_end, tx) == "EAGAIN"


def test_conflict_when_a_touched_directory_gains_a_child(guest, dom0):
    guest.mkdir("dir")
    tx = guest.transaction_start()
    guest.write("dir/mine", "", tx)
    dom0.write("/local/domain/1/dir/theirs", "")
    assert errno_of(guest.transaction_end, tx) == "EAGAIN"
    assert guest.directory("dir") == ["theirs"]


def test_unrelated_changes_do_not_conflict(guest, dom0):
    guest.write("a", "1")
    dom0.write("/elsewhere", "")
    tx = guest.transaction_start()
    guest.read("a", tx)
    guest.write("a", "2", tx)
    dom0.write("/elsewhere", "changed")
    dom0.write("/elsewhere/child", "")
    guest.transaction_end(tx)
    assert guest.read("a") == b"2"


def test_two_transactions_second_committer_loses(guest):
    guest.write("a", "0")
    guest.write("b", "0")
    t1, t2 = guest.transaction_start(), guest.transaction_start()
    guest.read("a", t1)
    guest.read("b", t2)
    guest.write("b", "1", t1)
    guest.write("a", "2", t2)
    guest.transaction_end(t1)
    assert errno_of(guest.transaction_end, t2) == "EAGAIN"
    assert (guest.read("a"), guest.read("b")) == (b"0", b"1")


def test_node_removed_and_recreated_inside_a_transaction(store, guest):
    guest.write("dev/old/deep", "x")
    guest.write("dev/keep", "k")
    tx = guest.transaction_start()
    guest.rm("dev", tx)
    assert errno_of(guest.read, "dev/keep", tx) == "ENOENT"
    guest.write("dev/new", "n", tx)
    assert guest.directory("dev", tx) == ["new"]
    assert guest.directory("dev") == ["old", "keep"]
    guest.transaction_end(tx)
    assert guest.directory("dev") == ["new"]
    assert errno_of(guest.read, "dev/old/deep") == "ENOENT"
    assert store.check() == []


def test_node_removed_and_recreated_outside_a_transaction(guest, dom0):
    guest.write("n", "same")
    tx = guest.transaction_start()
    assert guest.read("n", tx) == b"same"
    guest.write("m", "", tx)
    dom0.rm("/local/domain/1/n")
    dom0.write("/local/domain/1/n", "same")
    # Same content, but it is a different node: the transaction must retry.
    assert errno_of(guest.transaction_end, tx) == "EAGAIN"


def test_created_in_transaction_then_removed_leaves_nothing(store, guest):
    tx = guest.transaction_start()
    guest.write("tmp/a/b", "", tx)
    guest.rm("tmp", tx)
    guest.transaction_end(tx)
    assert errno_of(guest.read, "tmp") == "ENOENT"
    assert store.check() == []


def test_transactions_respect_permissions(dom0, guest):
    dom0.write("/secret", "s")
    tx = guest.transaction_start()
    assert errno_of(guest.read, "/secret", tx) == "EACCES"
    assert errno_of(guest.write, "/secret", "x", tx) == "EACCES"


def test_node_quota_checked_inside_and_at_commit():
    small = XenStore(Quotas(nodes=4))
    dom0 = small.client(0)
    dom0.mkdir("/local/domain/1")
    dom0.set_perms("/local/domain/1", [Permission(1, Access.NONE)])
    guest = small.client(1)
    guest.mkdir("sub")  # the domain now owns 2 nodes
    tx = guest.transaction_start()
    guest.write("a", "", tx)
    guest.write("b", "", tx)
    assert errno_of(guest.write, "c", "", tx) == "ENOSPC"
    # Meanwhile the domain uses a node where the transaction never looked.
    small.client(1).write("sub/x", "")
    assert errno_of(guest.transaction_end, tx) == "ENOSPC"
    assert errno_of(guest.read, "a") == "ENOENT"
    assert small.check() == []


def test_client_close_drops_its_transactions(store):
    guest = store.client(1)
    for _ in range(10):
        guest.transaction_start()
    guest.close()
    store.client(1).transaction_start()


def test_reset_watches_also_ends_transactions(guest):
    tx = guest.transaction_start()
    guest.reset_watches()
    assert errno_of(guest.read, "x", tx) == "ENOENT"


def test_context_manager_commits_and_aborts(guest):
    with guest.transaction() as tx:
        guest.write("cm", "1", tx)
    assert guest.read("cm") == b"1"
    with pytest.raises(RuntimeError):
        with guest.transaction() as tx:
            guest.write("cm", "2", tx)
            raise RuntimeError("boom")
    assert guest.read("cm") == b"1"


# --- watch events and transactions ---------------------------------------

def test_events_fire_on_commit_only(guest, events):
    tx = guest.transaction_start()
    guest.write("a", "1", tx)
    guest.write("b", "1", tx)
    assert events == []
    guest.transaction_end(tx)
    assert events == ["/local/domain/1/a", "/local/domain/1/b"]


def test_no_events_for_an_aborted_transaction(guest, events):
    tx = guest.transaction_start()
    guest.write("a", "1", tx)
    guest.transaction_end(tx, commit=False)
    assert events == []


def test_no_events_for_a_failed_commit(guest, dom0, events):
    tx = guest.transaction_start()
    guest.write("a", "1", tx)
    dom0.write("/local/domain/1/a", "0")
    events.clear()
    assert errno_of(guest.transaction_end, tx) == "EAGAIN"
    assert events == []


def test_events_after_commit_are_deduplicated(guest, events):
    tx = guest.transaction_start()
    for value in "123":
        guest.write("a", value, tx)
    guest.transaction_end(tx)
    assert events == ["/local/domain/1/a"]


def test_rm_in_transaction_fires_for_subtree_on_commit(guest, dom0):
    guest.write("d/x/y", "")
    seen = []
    dom0.watch("/local/domain/1/d/x/y", "deep", lambda p, t: seen.append((p, t)))
    dom0.watch("/local/domain/1", "top", lambda p, t: seen.append((p, t)))
    seen.clear()
    tx = guest.transaction_start()
    guest.rm("d", tx)
    assert seen == []
    guest.transaction_end(tx)
    assert ("/local/domain/1/d/x/y", "deep") in seen
    assert ("/local/domain/1/d", "top") in seen
    # An exact removal event below the removed node only reaches its own watch.
    assert ("/local/domain/1/d/x/y", "top") not in seen


MODEL_KEYS = st.sampled_from(["k1", "k2", "k3"])
TX_OPS = st.lists(st.tuples(st.sampled_from(["write", "rm", "read"]), MODEL_KEYS,
                            st.sampled_from([b"x", b"y"])), max_size=6)


@given(TX_OPS, TX_OPS, st.booleans())
@settings(max_examples=150, deadline=None)
def test_serialisable_against_one_concurrent_writer(tx_ops, outside_ops, outside_first):
    """A committed transaction's effect equals running its ops at commit time."""
    store = XenStore()
    dom0 = store.client(0)
    dom0.write("/m/k1", "x")
    tx = dom0.transaction_start()
    reads = {}

    def run(ops, t):
        for op, key, value in ops:
            path = f"/m/{key}"
            if op == "write":
                dom0.write(path, value, t)
            elif op == "rm":
                dom0.rm(path, t)
            else:
                try:
                    got = dom0.read(path, t)
                except XenStoreError:
                    got = None
                if t:
                    reads.setdefault(path, got)

    if outside_first:
        run(outside_ops, 0)
    run(tx_ops, tx)
    if not outside_first:
        run(outside_ops, 0)
    before = {k: (dom0.read(f"/m/{k}") if dom0.exists(f"/m/{k}") else None)
              for k in ("k1", "k2", "k3")}
    try:
        dom0.transaction_end(tx)
    except XenStoreError as exc:
        assert exc.name == "EAGAIN"
        after = {k: (dom0.read(f"/m/{k}") if dom0.exists(f"/m/{k}") else None)
                 for k in ("k1", "k2", "k3")}
        assert after == before
        return
    # Committed: every value the transaction read must still be current at commit...
    for path, value in reads.items():
        key = path.rsplit("/", 1)[1]
        assert before[key] == value or any(k == key and op != "read" for op, k, _ in tx_ops)
    # ...and replaying the transaction on the pre-commit state gives the result.
    replay = XenStore().client(0)
    for key, value in before.items():
        if value is not None:
            replay.write(f"/m/{key}", value)
    replay.mkdir("/m")
    for op, key, value in tx_ops:
        if op == "write":
            replay.write(f"/m/{key}", value)
        elif op == "rm":
            replay.rm(f"/m/{key}")
    for key in ("k1", "k2", "k3"):
        path = f"/m/{key}"
        assert dom0.exists(path) == replay.exists(path)
        if dom0.exists(path):
            assert dom0.read(path) == replay.read(path)
    assert store.check() == []


def test_subtree_event_wins_over_exact_one_for_the_same_path(guest, dom0):
    guest.mkdir("d")
    seen = []
    dom0.watch("/local/domain/1/d", "w", lambda p, t: seen.append(p))
    seen.clear()
    tx = guest.transaction_start()
    guest.write("d/x", "", tx)  # d/x changed: a subtree event
    guest.rm("d", tx)           # d/x removed below d: only an exact event
    guest.transaction_end(tx)
    assert seen == ["/local/domain/1/d/x", "/local/domain/1/d"]
