"""The store's operations, permissions, path rules and quotas, through the Python API."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.xen.xenstore import Access, Permission, Quotas, XenStore, XenStoreError

N, R, W, B = Access.NONE, Access.READ, Access.WRITE, Access.READ | Access.WRITE


def errno_of(call, *args, **kwargs):
    with pytest.raises(XenStoreError) as exc:
        call(*args, **kwargs)
    return exc.value.name


@pytest.fixture
def store():
    return XenStore()


@pytest.fixture
def dom0(store):
    return store.client(0)


@pytest.fixture
def guest(store, dom0):
    """Domain 1 with a home directory it owns, as the toolstack would set up."""
    dom0.mkdir("/local/domain/1")
    dom0.set_perms("/local/domain/1", [Permission(1, N)])
    return store.client(1)


# --- basic operations ----------------------------------------------------

def test_write_read_round_trip(dom0):
    dom0.write("/a/b", b"\x00\xffbinary")
    assert dom0.read("/a/b") == b"\x00\xffbinary"


def test_write_creates_parents_with_empty_values(dom0):
    dom0.write("/a/b/c", "v")
    assert dom0.read("/a") == b"" and dom0.read("/a/b") == b""
    assert dom0.directory("/a") == ["b"]


def test_directory_lists_children_in_creation_order(dom0):
    for name in ("zeta", "alpha", "mid"):
        dom0.write(f"/d/{name}", "")
    assert dom0.directory("/d") == ["zeta", "alpha", "mid"]
    assert dom0.directory("/d/zeta") == []


def test_read_missing_is_enoent(dom0):
    assert errno_of(dom0.read, "/nope") == "ENOENT"
    assert errno_of(dom0.directory, "/nope") == "ENOENT"


def test_mkdir_keeps_existing_value(dom0):
    dom0.write("/a", "keep")
    dom0.mkdir("/a")
    dom0.mkdir("/a/b/c")
    assert dom0.read("/a") == b"keep" and dom0.read("/a/b/c") == b""


def test_rm_removes_subtree(store, dom0):
    dom0.write("/a/b/c", "1")
    dom0.write("/a/d", "2")
    dom0.rm("/a/b")
    assert dom0.directory("/a") == ["d"]
    assert errno_of(dom0.read, "/a/b/c") == "ENOENT"
    assert store.check() == []


def test_rm_missing_node_is_ok_if_parent_exists(dom0):
    dom0.write("/a", "")
    dom0.rm("/a/missing")
    assert errno_of(dom0.rm, "/a/missing/deeper") == "ENOENT"


def test_rm_root_is_einval(dom0):
    assert errno_of(dom0.rm, "/") == "EINVAL"


def test_generation_changes_with_the_node(dom0):
    dom0.write("/a", "")
    first, _ = dom0.directory_with_generation("/a")
    assert dom0.directory_with_generation("/a")[0] == first
    dom0.write("/a/child", "")
    assert dom0.directory_with_generation("/a")[0] != first


def test_relative_paths_resolve_under_the_domain(guest):
    guest.write("data/x", "1")
    assert guest.read("/local/domain/1/data/x") == b"1"
    assert guest.get_domain_path(7) == "/local/domain/7"


def test_str_values_are_utf8(dom0):
    dom0.write("/s", "é")
    assert dom0.read("/s") == "é".encode()


# --- path validation -----------------------------------------------------

@pytest.mark.parametrize("path", ["", "/a/", "//a", "/a//b", "/a b", "/a.b", "/a\0b",
                                  "/ä", "@introduceDomain", "rel/", "/a\n"])
def test_invalid_paths_are_einval(dom0, path):
    assert errno_of(dom0.write, path, "v") == "EINVAL"


def test_allowed_characters(dom0):
    dom0.write("/Az09-_@x", "v")
    assert dom0.read("/Az09-_@x") == b"v"


def test_path_length_limits(dom0, guest):
    long_abs = "/" + "a" * 3071
    dom0.write(long_abs, "")
    assert errno_of(dom0.write, long_abs + "b", "") == "EINVAL"
    longest_rel = ("a" * 99 + "/") * 20 + "a" * 48  # short names: each counts in its parent's size
    guest.write(longest_rel, "")
    assert errno_of(guest.write, longest_rel + "a", "") == "EINVAL"


def test_special_paths_only_for_perms_and_watches(dom0):
    assert errno_of(dom0.read, "@introduceDomain") == "EINVAL"
    assert errno_of(dom0.rm, "@releaseDomain") == "EINVAL"
    assert dom0.get_perms("@introduceDomain") == [Permission(0, N)]
    assert errno_of(dom0.get_perms, "@other") == "ENOENT"


def test_deep_tree_does_not_hit_recursion_limits(store, dom0):
    deep = "/d" * 1500
    dom0.write(deep, "x")
    dom0.rm("/d")
    assert store.check() == []


# --- permissions ---------------------------------------------------------

def test_guest_cannot_read_or_write_dom0_nodes(dom0, guest):
    dom0.write("/secret", "s")
    assert errno_of(guest.read, "/secret") == "EACCES"
    assert errno_of(guest.write, "/secret", "x") == "EACCES"
    assert errno_of(guest.directory, "/") == "EACCES"
    assert errno_of(guest.rm, "/secret") == "EACCES"
    assert errno_of(guest.mkdir, "/secret") == "EACCES"
    assert dom0.read("/secret") == b"s"


def test_missing_node_under_unreadable_parent_is_eacces(dom0, guest):
    dom0.write("/hidden/x", "")
    assert errno_of(guest.read, "/hidden/nothing") == "EACCES"
    assert errno_of(guest.read, "/hidden/nothing/deeper") == "EACCES"
    assert errno_of(guest.read, "nothing") == "ENOENT"


def test_creating_needs_write_on_nearest_existing_ancestor(dom0, guest):
    dom0.write("/ro", "")
    dom0.set_perms("/ro", [Permission(0, N), Permission(1, R)])
    assert errno_of(guest.write, "/ro/a/b", "x") == "EACCES"
    dom0.set_perms("/ro", [Permission(0, N), Permission(1, W)])
    guest.write("/ro/a/b", "x")
    assert errno_of(guest.read, "/ro") == "EACCES"
    assert guest.read("/ro/a/b") == b"x"


def test_first_entry_is_owner_and_default(dom0, store):
    dom0.write("/n", "v")
    dom0.set_perms("/n", [Permission(2, R), Permission(3, N), Permission(4, W)])
    two, three, four, five = (store.client(d) for d in (2, 3, 4, 5))
    two.write("/n", "owner-can-write")
    assert errno_of(three.read, "/n") == "EACCES"
    assert errno_of(four.read, "/n") == "EACCES"
    four.write("/n", "w-only")
    assert five.read("/n") == b"w-only"
    assert errno_of(five.write, "/n", "x") == "EACCES"


def test_new_node_inherits_parent_perms_owned_by_creator(dom0, guest):
    dom0.set_perms("/local/domain/1", [Permission(0, R), Permission(1, B), Permission(5, R)])
    guest.write("data/x", "")
    assert guest.get_perms("data") == [Permission(1, R), Permission(1, B), Permission(5, R)]
    assert guest.get_perms("data/x") == guest.get_perms("data")


def test_dom0_created_nodes_keep_parent_owner(dom0, guest):
    dom0.write("/local/domain/1/device/vbd", "")
    assert dom0.get_perms("/local/domain/1/device/vbd") == [Permission(1, N)]


def test_set_perms_only_by_owner_or_privileged(dom0, guest, store):
    dom0.write("/local/domain/1/shared", "")
    dom0.set_perms("/local/domain/1/shared", [Permission(0, B)])
    assert errno_of(guest.set_perms, "shared", [Permission(1, N)]) == "EACCES"
    guest.write("mine", "")
    guest.set_perms("mine", [Permission(1, N), Permission(2, R)])
    assert store.client(2).read("/local/domain/1/mine") == b""
    assert errno_of(guest.set_perms, "mine", [Permission(2, N)]) == "EINVAL"
    dom0.set_perms("/local/domain/1/mine", [Permission(2, N)])
    assert errno_of(guest.read, "mine") == "EACCES"


def test_set_perms_rejects_empty_and_missing(dom0):
    assert errno_of(dom0.set_perms, "/local", []) == "EINVAL"
    assert errno_of(dom0.set_perms, "/missing", [Permission(0, N)]) == "ENOENT"


def test_get_perms_needs_read(dom0, guest):
    dom0.write("/x", "")
    assert errno_of(guest.get_perms, "/x") == "EACCES"


def test_target_domain_acts_as_its_target(dom0, store):
    dom0.write("/local/domain/1/t", "")
    dom0.set_perms("/local/domain/1/t", [Permission(1, N)])
    dom0.introduce_domain(1)
    dom0.introduce_domain(2)
    stub = store.client(2)
    assert errno_of(stub.read, "/local/domain/1/t") == "EACCES"
    dom0.set_target(2, 1)
    stub.write("/local/domain/1/t", "via target")
    assert dom0.read("/local/domain/1/t") == b"via target"


def test_management_calls_need_privilege(guest):
    for call, args in ((guest.introduce_domain, (2,)), (guest.release_domain, (2,)),
                       (guest.resume_domain, (2,)), (guest.set_target, (2, 1)),
                       (guest.is_domain_introduced, (1,)), (guest.control, ("check",))):
        assert errno_of(call, *args) == "EACCES"


def test_release_closes_the_domains_clients(dom0, store):
    dom0.introduce_domain(3)
    three = store.client(3)
    three.watch("/", "t", lambda p, t: None)
    dom0.release_domain(3)
    assert three.closed and not dom0.is_domain_introduced(3)
    assert errno_of(three.read, "/") == "EINVAL"


def test_privileged_guest_client_bypasses_checks(dom0, store):
    dom0.write("/secret", "s")
    assert store.client(7, privileged=True).read("/secret") == b"s"


# --- quotas --------------------------------------------------------------

def small_store():
    store = XenStore(Quotas(watches=2, nodes=5, entry_size=64, transactions=2, perms=2,
                            transaction_nodes=20))
    dom0 = store.client(0)
    dom0.mkdir("/local/domain/1")
    dom0.set_perms("/local/domain/1", [Permission(0, N), Permission(1, B)])
    return store, dom0, store.client(1)


def test_entry_size_quota_counts_value_and_permissions():
    _, dom0, guest = small_store()
    guest.write("a", b"x" * 48)  # beside two permissions of 8 bytes
    assert errno_of(guest.write, "a", b"x" * 49) == "ENOSPC"
    assert guest.read("a") == b"x" * 48
    dom0.write("/local/domain/1/a", b"x" * 100)


def test_node_quota_counts_owned_nodes():
    store, dom0, guest = small_store()
    for i in range(5):
        guest.write(f"n{i}", "")
    assert errno_of(guest.write, "n5", "") == "ENOSPC"
    assert errno_of(guest.mkdir, "n5") == "ENOSPC"
    guest.rm("n0")
    guest.write("x", "")
    assert errno_of(guest.write, "p/q", "") == "ENOSPC"
    dom0.write("/local/domain/1/dom0-may", "")
    assert store.check() == []


def test_quota_is_all_or_nothing_for_deep_writes():
    store, _, guest = small_store()
    guest.write("a", "")
    assert errno_of(guest.write, "b/c/d/e/f", "") == "ENOSPC"
    assert errno_of(guest.read, "b") == "ENOENT"
    assert store.check() == []


def test_watch_quota_is_e2big():
    _, dom0, guest = small_store()
    guest.watch("a", "1", lambda p, t: None)
    guest.watch("a", "2", lambda p, t: None)
    assert errno_of(guest.watch, "a", "3", lambda p, t: None) == "E2BIG"
    guest.unwatch("a", "1")
    guest.watch("a", "3", lambda p, t: None)
    for i in range(10):
        dom0.watch("/", str(i), lambda p, t: None)


def test_watch_quota_is_per_domain():
    store, _, guest = small_store()
    other = store.client(1)
    guest.watch("a", "1", lambda p, t: None)
    other.watch("a", "2", lambda p, t: None)
    assert errno_of(other.watch, "a", "3", lambda p, t: None) == "E2BIG"
    other.close()
    guest.watch("a", "3", lambda p, t: None)


def test_transaction_quota():
    _, dom0, guest = small_store()
    first, _ = guest.transaction_start(), guest.transaction_start()
    assert errno_of(guest.transaction_start) == "ENOSPC"
    guest.transaction_end(first, commit=False)
    guest.transaction_start()
    for _ in range(20):
        dom0.transaction_start()


def test_perms_quota():
    _, dom0, guest = small_store()
    guest.write("a", "")
    assert errno_of(guest.set_perms, "a", [Permission(1, N)] * 3) == "ENOSPC"
    guest.set_perms("a", [Permission(1, N), Permission(2, R)])
    dom0.set_perms("/local/domain/1/a", [Permission(1, N)] + [Permission(i, R) for i in range(2, 9)])


def test_transaction_node_quota():
    _, _, guest = small_store()
    tx = guest.transaction_start()
    for i in range(19):
        assert errno_of(guest.read, f"missing{i}", tx) == "ENOENT"
    assert errno_of(guest.read, "missing-too-many", tx) == "ENOSPC"


# --- observer ------------------------------------------------------------

def test_observer_sees_every_operation_and_result():
    seen = []
    store = XenStore(observer=lambda *args: seen.append(args))
    dom0 = store.client(0)
    dom0.write("/a", "v")
    with pytest.raises(XenStoreError):
        dom0.read("/missing")
    assert seen == [(0, "WRITE", "/a", b"v", 0, "OK"), (0, "READ", "/missing", None, 0, "ENOENT")]


# --- a model check -------------------------------------------------------

SEGMENTS = st.sampled_from(["a", "b", "c"])
PATHS = st.lists(SEGMENTS, min_size=1, max_size=4).map(lambda s: "/t/" + "/".join(s))
OPS = st.one_of(
    st.tuples(st.just("write"), PATHS, st.binary(max_size=4)),
    st.tuples(st.just("mkdir"), PATHS, st.none()),
    st.tuples(st.just("rm"), PATHS, st.none()),
)


@given(st.lists(OPS, max_size=40))
@settings(max_examples=150, deadline=None)
def test_store_matches_a_dictionary_model(ops):
    store = XenStore()
    dom0 = store.client(0)
    dom0.mkdir("/t")
    model = {"/t": b""}

    def parent(p):
        return p.rsplit("/", 1)[0]

    for op, path, value in ops:
        if op == "write" or (op == "mkdir" and path not in model):
            p = path
            while p not in model:
                model[p] = b""
                p = parent(p)
            getattr(dom0, op)(*((path, value) if op == "write" else (path,)))
            if op == "write":
                model[path] = value
        elif op == "mkdir":
            dom0.mkdir(path)
        else:
            if path not in model and parent(path) not in model:
                assert errno_of(dom0.rm, path) == "ENOENT"
                continue
            dom0.rm(path)
            for p in [p for p in model if p == path or p.startswith(path + "/")]:
                del model[p]
    for p, value in model.items():
        assert dom0.read(p) == value
        expected = sorted(q.rsplit("/", 1)[1] for q in model if parent(q) == p)
        assert sorted(dom0.directory(p)) == expected
    assert store.check() == []
