"""Per-domain accounting as cxenstored's: node size with children's names,
a memory quota over nodes, watches, transactions and queued output, and
transactions with a lifetime.  Each test asserts a bound, never a time."""

import tracemalloc

import pytest

from pyvmm.xen.xenstore import Access, Op, Permission, Quotas, XenStore, XenStoreError
from pyvmm.xen.xenstore.protocol import encode_message, iter_messages

N, B = Access.NONE, Access.READ | Access.WRITE


def errno_of(call, *args, **kwargs):
    with pytest.raises(XenStoreError) as exc:
        call(*args, **kwargs)
    return exc.value.name


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make(quotas=None, clock=None):
    store = XenStore(quotas, clock=clock) if clock else XenStore(quotas)
    dom0 = store.client(0)
    dom0.mkdir("/local/domain/1")
    dom0.set_perms("/local/domain/1", [Permission(1, N)])
    return store, dom0, store.client(1)


def fill(call, limit=5000):
    """Call call(i) until it fails; (successes, errno)."""
    for i in range(limit):
        try:
            call(i)
        except XenStoreError as exc:
            return i, exc.name
    return limit, None


def test_child_names_count_against_the_parents_entry_size():
    # Before: one directory took 987 children with 2 MB of names (the node
    # quota was the only bound), and each DIRECTORY on it cost the event
    # thread a 2 MB walk to answer E2BIG.
    store, _, guest = make()
    guest.mkdir("dir")
    name = "n" * 200
    created, error = fill(lambda i: guest.write(f"dir/{i:04}{name}", ""))
    assert error == "ENOSPC"
    listing = guest.directory("dir")
    assert len(listing) == created
    assert sum(len(n) + 1 for n in listing) <= 2048  # cxenstored's quota-max-entry-size
    assert store.check() == []


def test_a_failed_child_leaves_no_half_created_path():
    store, _, guest = make(Quotas(entry_size=64))
    guest.mkdir("dir")
    fill(lambda i: guest.write(f"dir/{i:09}", ""))  # fill dir's size to the brim
    assert errno_of(guest.write, "dir/xxxxxxxxxx/y/z", "") == "ENOSPC"
    assert errno_of(guest.read, "dir/xxxxxxxxxx") == "ENOENT"
    assert store.check() == []


def test_privileged_clients_have_no_entry_size():
    _, dom0, _ = make(Quotas(entry_size=64))
    for i in range(100):
        dom0.write(f"/big/{i:09}", "")
    assert len(dom0.directory("/big")) == 100


def test_open_transactions_are_bounded_by_the_memory_quota():
    # Before: ten transactions of 1,024 private 2 KB copies at 3 KB paths
    # held ~44 MB of the VMM.
    store, _, guest = make()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        deep = "/".join(["d" * 200] * 10)
        for _ in range(Quotas().transactions):
            try:
                tx = guest.transaction_start()
            except XenStoreError as exc:
                assert exc.name == "ENOMEM"
                break
            fill(lambda i: guest.write(f"{deep}/{i}", b"v" * 1500, tx), limit=1100)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    quota = 2 * 1024 * 1024 + 512 * 1024
    assert held < 3 * quota
    assert store.memory_of(1) <= quota + 8 * 1024  # at most one node's change past it


def test_memory_quota_answers_enomem_and_recovers_after_rm():
    store, _, guest = make(Quotas(memory=64 * 1024))
    written, error = fill(lambda i: guest.write(f"data{i}", b"x" * 1000))
    assert error == "ENOMEM"
    assert written <= 64
    assert store.memory_of(1) <= 64 * 1024 + 2048 + 64
    assert guest.read("data0") == b"x" * 1000  # reads and removals still work
    guest.rm("data0")
    guest.rm("data1")
    guest.write("again", b"x" * 1000)


@pytest.mark.parametrize("in_transaction", [False, True])
def test_one_deep_write_cannot_jump_over_the_memory_quota(in_transaction):
    # One write creates every missing ancestor: 900 nodes with long paths
    # would be ~0.8 MB past the quota if only the start were checked.
    store, _, guest = make(Quotas(memory=64 * 1024))
    tx = guest.transaction_start() if in_transaction else 0
    deep = "/".join(["n"] * 900)
    assert errno_of(guest.write, deep, "", tx) == "ENOMEM"
    assert store.memory_of(1) <= 64 * 1024
    guest.write("shallow/a/b", "", tx)


def test_watches_count_against_the_memory_quota():
    store, _, guest = make(Quotas(memory=16 * 1024))
    made, error = fill(lambda i: guest.watch("/" + "w" * 1000, f"{i}" + "t" * 1000, lambda p, t: None))
    assert error == "ENOMEM" and made < 16
    guest.reset_watches()
    assert store.memory_of(1) == store._tree.bytes_owned_by(1)


def test_queued_output_counts_and_events_stop_at_the_quota():
    store, dom0, _ = make(Quotas(memory=8 * 1024))
    dom0.mkdir("/ev")
    dom0.set_perms("/ev", [Permission(0, Access.READ)])
    conn = store.connect(1)
    conn.feed(encode_message(Op.WATCH, 1, 0, b"/ev\0tok\0"))
    base = store.memory_of(1)
    assert base >= conn.pending_output() > 0
    for i in range(500):  # the guest never reads its ring
        dom0.write(f"/ev/k{i}", "")
    assert store.memory_of(1) <= 8 * 1024 + 200
    conn.take_output(1 << 20)
    assert store.memory_of(1) == store._tree.bytes_owned_by(1) + store._watch_bytes[1]


def test_dom0_is_not_limited_by_memory():
    store, dom0, _ = make(Quotas(memory=1024))
    for i in range(50):
        dom0.write(f"/local/domain/1/d{i}", b"x" * 1000)
        dom0.set_perms(f"/local/domain/1/d{i}", [Permission(1, N)])  # owned by the guest now
    assert store.memory_of(1) > 50_000
    dom0.write("/still", "ok")


def test_transactions_expire_release_their_copies_and_fail_with_eagain():
    # Before: a transaction held its copies for as long as the guest wished.
    clock = Clock()
    store, _, guest = make(Quotas(transaction_seconds=60), clock=clock)
    base = store.memory_of(1)
    tx = guest.transaction_start()
    for i in range(100):
        guest.write(f"n{i}", b"x" * 1000, tx)
    assert store.memory_of(1) > base + 100_000
    clock.now += 59
    assert store.expire_transactions() == 0
    clock.now += 2
    assert store.expire_transactions() == 1  # as the guest's once-a-second check does
    assert store.memory_of(1) == base
    assert errno_of(guest.read, "n0", tx) == "EAGAIN"
    assert errno_of(guest.transaction_end, tx) == "EAGAIN"
    assert errno_of(guest.transaction_end, tx) == "ENOENT"  # it is over
    assert errno_of(guest.read, "n0") == "ENOENT"


def test_expired_transactions_are_expired_by_their_clients_own_requests():
    clock = Clock()
    store, _, guest = make(Quotas(transactions=2), clock=clock)
    guest.transaction_start()
    guest.transaction_start()
    assert errno_of(guest.transaction_start) == "ENOSPC"
    clock.now += Quotas().transaction_seconds + 1
    t1, t2 = list(guest._transactions)
    guest.read("/local/domain/1")
    guest.transaction_end(t1, commit=False)  # aborting a timed-out one is fine
    guest.transaction_start()


def test_privileged_transactions_never_expire():
    clock = Clock()
    store, dom0, _ = make(clock=clock)
    tx = dom0.transaction_start()
    dom0.write("/x", "1", tx)
    clock.now += 10 ** 6
    store.expire_transactions()
    dom0.transaction_end(tx)
    assert dom0.read("/x") == b"1"


def test_ended_transactions_give_their_memory_back():
    store, _, guest = make()
    base = store.memory_of(1)
    for commit in (True, False):
        tx = guest.transaction_start()
        guest.write(f"c{commit}", b"x" * 500, tx)
        guest.transaction_end(tx, commit=commit)
    conflicted = guest.transaction_start()
    guest.read("cTrue", conflicted)
    guest.write("cTrue", "changed")
    guest.write("other", "1", conflicted)
    assert errno_of(guest.transaction_end, conflicted) == "EAGAIN"
    assert store._transaction_bytes[1] == 0
    guest.transaction_start()
    guest.reset_watches()  # drops transactions too
    assert store._transaction_bytes[1] == 0
    assert store.memory_of(1) > base
