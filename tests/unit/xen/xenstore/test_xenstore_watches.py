"""Watch registration and firing rules."""

import pytest

from pyvmm.xen.xenstore import Access, Permission, XenStore, XenStoreError, create_domain_nodes

N, R = Access.NONE, Access.READ


def errno_of(call, *args, **kwargs):
    with pytest.raises(XenStoreError) as exc:
        call(*args, **kwargs)
    return exc.value.name


class Recorder:
    def __init__(self):
        self.events = []

    def __call__(self, path, token):
        self.events.append((path, token))

    def take(self):
        events, self.events = self.events, []
        return events


@pytest.fixture
def store():
    store = XenStore()
    dom0 = store.client(0)
    dom0.mkdir("/local/domain/1")
    dom0.set_perms("/local/domain/1", [Permission(1, N)])
    return store


@pytest.fixture
def dom0(store):
    return store.client(0)


@pytest.fixture
def guest(store):
    return store.client(1)


def test_initial_event_on_registration(dom0):
    rec = Recorder()
    dom0.watch("/nonexistent/path", "tok", rec)
    assert rec.take() == [("/nonexistent/path", "tok")]


def test_fires_for_node_and_descendants_only(dom0):
    rec = Recorder()
    dom0.watch("/a/b", "t", rec)
    rec.take()
    dom0.write("/a/b", "")
    dom0.write("/a/b/c/d", "")
    dom0.write("/a/bc", "")      # a sibling sharing a prefix
    dom0.write("/a", "x")        # the parent
    assert rec.take() == [("/a/b", "t"), ("/a/b/c/d", "t")]


def test_root_watch_sees_everything(dom0):
    rec = Recorder()
    dom0.watch("/", "t", rec)
    rec.take()
    dom0.write("/x/y", "")
    assert rec.take() == [("/x/y", "t")]


def test_event_names_the_changed_path_not_created_parents(dom0):
    rec = Recorder()
    dom0.watch("/p", "t", rec)
    rec.take()
    dom0.write("/p/q/r", "")
    assert rec.take() == [("/p/q/r", "t")]


def test_mkdir_fires_only_when_creating(dom0):
    rec = Recorder()
    dom0.watch("/m", "t", rec)
    rec.take()
    dom0.mkdir("/m")
    dom0.mkdir("/m")
    assert rec.take() == [("/m", "t")]


def test_set_perms_fires(dom0):
    dom0.write("/s", "")
    rec = Recorder()
    dom0.watch("/s", "t", rec)
    rec.take()
    dom0.set_perms("/s", [Permission(0, R)])
    assert rec.take() == [("/s", "t")]


def test_rm_fires_for_removed_nodes(dom0):
    dom0.write("/r/a/b", "")
    above, exact, below = Recorder(), Recorder(), Recorder()
    dom0.watch("/r", "above", above)
    dom0.watch("/r/a", "exact", exact)
    dom0.watch("/r/a/b", "below", below)
    dom0.watch("/r/a/b/never", "absent", below)
    for rec in (above, exact, below):
        rec.take()
    dom0.rm("/r/a")
    assert above.take() == [("/r/a", "above")]
    assert exact.take() == [("/r/a", "exact")]
    assert below.take() == [("/r/a/b", "below")]


def test_rm_of_missing_node_fires_nothing(dom0):
    dom0.write("/q", "")
    rec = Recorder()
    dom0.watch("/q", "t", rec)
    rec.take()
    dom0.rm("/q/missing")
    assert rec.take() == []


def test_relative_watch_gets_relative_paths(guest):
    rec = Recorder()
    guest.watch("device", "rel", rec)
    guest.watch("/local/domain/1/device", "abs", rec)
    guest.write("device/vif/0/state", "1")
    assert rec.take() == [("device", "rel"), ("/local/domain/1/device", "abs"),
                          ("device/vif/0/state", "rel"),
                          ("/local/domain/1/device/vif/0/state", "abs")]


def test_unwatch_stops_events_and_unknown_unwatch_is_enoent(dom0):
    rec = Recorder()
    dom0.watch("/u", "t", rec)
    dom0.unwatch("/u", "t")
    dom0.write("/u", "")
    assert rec.take() == [("/u", "t")]
    assert errno_of(dom0.unwatch, "/u", "t") == "ENOENT"


def test_unwatch_matches_the_relative_form_canonically(guest):
    rec = Recorder()
    guest.watch("x", "t", rec)
    guest.unwatch("/local/domain/1/x", "t")
    assert not guest.watches


def test_duplicate_watch_is_eexist_but_other_token_is_fine(dom0):
    rec = Recorder()
    dom0.watch("/d", "t", rec)
    assert errno_of(dom0.watch, "/d", "t", rec) == "EEXIST"
    dom0.watch("/d", "t2", rec)


def test_watch_path_is_validated(dom0):
    assert errno_of(dom0.watch, "/bad//path", "t", Recorder()) == "EINVAL"
    assert errno_of(dom0.watch, "/bad/", "t", Recorder()) == "EINVAL"


def test_watching_needs_no_permission_but_unreadable_changes_are_hidden(dom0, guest):
    dom0.write("/private/x", "")
    rec = Recorder()
    guest.watch("/private", "t", rec)
    assert rec.take() == [("/private", "t")]
    dom0.write("/private/x", "secret")
    assert rec.take() == []
    dom0.set_perms("/private/x", [Permission(0, N), Permission(1, R)])
    assert rec.take() == [("/private/x", "t")]
    dom0.write("/private/x", "visible")
    assert rec.take() == [("/private/x", "t")]


def test_losing_read_permission_is_still_reported(dom0, guest):
    dom0.write("/shared", "")
    dom0.set_perms("/shared", [Permission(0, R)])
    rec = Recorder()
    guest.watch("/shared", "t", rec)
    rec.take()
    dom0.set_perms("/shared", [Permission(0, N)])
    assert rec.take() == [("/shared", "t")]
    dom0.write("/shared", "hidden")
    assert rec.take() == []


def test_removal_of_readable_node_reported(dom0, guest):
    dom0.write("/gone", "")
    dom0.set_perms("/gone", [Permission(0, R)])
    rec = Recorder()
    guest.watch("/gone", "t", rec)
    rec.take()
    dom0.rm("/gone")
    assert rec.take() == [("/gone", "t")]


def test_special_watches(store, dom0, guest):
    admin, seen_by_guest = Recorder(), Recorder()
    dom0.watch("@introduceDomain", "i", admin)
    dom0.watch("@releaseDomain", "r", admin)
    guest.watch("@introduceDomain", "i", seen_by_guest)
    assert seen_by_guest.take() == [("@introduceDomain", "i")]
    admin.take()
    dom0.introduce_domain(5)
    dom0.introduce_domain(5)  # already known: no second event
    dom0.release_domain(5)
    assert admin.take() == [("@introduceDomain", "i"), ("@releaseDomain", "r")]
    # The special nodes belong to dom0 and are unreadable: guests hear nothing...
    assert seen_by_guest.take() == []
    # ...until dom0 lets them read it.
    dom0.set_perms("@introduceDomain", [Permission(0, R)])
    seen_by_guest.take()
    dom0.introduce_domain(6)
    assert seen_by_guest.take() == [("@introduceDomain", "i")]


def test_normal_writes_never_match_special_watches(dom0):
    rec = Recorder()
    dom0.watch("@releaseDomain", "r", rec)
    rec.take()
    dom0.write("/@releaseDomain", "")
    assert rec.take() == []


def test_reset_watches_drops_all(dom0):
    rec = Recorder()
    dom0.watch("/a", "1", rec)
    dom0.watch("/b", "2", rec)
    dom0.reset_watches()
    rec.take()
    dom0.write("/a", "")
    dom0.write("/b", "")
    assert rec.take() == []
    dom0.watch("/a", "1", rec)  # the old registration is really gone


def test_callbacks_run_after_the_operation_completes(dom0):
    observed = []

    def callback(path, token):
        # The tree is consistent and the write is visible when we are called.
        observed.append(dom0.read("/c/x") if token == "t" and path == "/c/x" else None)

    dom0.write("/c", "")
    dom0.watch("/c", "t", callback)
    dom0.write("/c/x", "done")
    assert observed[-1] == b"done"


def test_callback_may_mutate_the_store(store, dom0):
    order = []

    def echo(path, token):
        order.append(path)
        if path == "/ping":
            dom0.write("/pong", "")

    dom0.watch("/ping", "a", echo)
    dom0.watch("/pong", "b", echo)
    order.clear()
    dom0.write("/ping", "")
    assert order == ["/ping", "/pong"]
    assert store.check() == []


def test_failing_callback_does_not_break_delivery(dom0):
    rec = Recorder()

    def broken(path, token):
        raise RuntimeError("backend bug")

    dom0.watch("/f", "bad", broken)
    dom0.watch("/f", "good", rec)
    rec.take()
    dom0.write("/f", "")
    assert rec.take() == [("/f", "good")]


def test_unwatch_from_a_callback_suppresses_queued_events(dom0):
    rec = Recorder()

    def first(path, token):
        if path != "/z":
            dom0.unwatch("/z", "second")

    dom0.watch("/z", "first", first)
    dom0.watch("/z", "second", rec)
    rec.take()
    dom0.write("/z/1", "")
    assert rec.take() == []


def test_closed_client_gets_no_events(store, dom0):
    other = store.client(0)
    rec = Recorder()
    other.watch("/w", "t", rec)
    rec.take()
    other.close()
    dom0.write("/w", "")
    assert rec.take() == []


def test_watches_of_other_clients_fire_for_each(store, dom0):
    a, b = Recorder(), Recorder()
    store.client(0).watch("/x", "t", a)
    store.client(0).watch("/x", "t", b)
    a.take(), b.take()
    dom0.write("/x", "")
    assert a.take() == b.take() == [("/x", "t")]


def test_domain_creation_fires_introduce(store):
    rec = Recorder()
    store.client(0).watch("@introduceDomain", "i", rec)
    rec.take()
    create_domain_nodes(store, 3, "g", 1, 1, 2, 2)
    assert rec.take() == [("@introduceDomain", "i")]
