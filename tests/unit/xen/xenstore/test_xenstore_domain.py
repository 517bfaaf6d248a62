"""Default nodes for a new guest domain."""

import pytest

from pyvmm.xen.xenstore import (
    Access,
    Permission,
    XenStore,
    XenStoreError,
    create_domain_nodes,
    default_domain_nodes,
)

GUEST_WRITABLE = ["control/shutdown", "control/feature-poweroff", "control/feature-reboot",
                  "control/feature-suspend", "control/feature-s3", "control/feature-s4",
                  "control/sysrq", "attr", "data", "device", "drivers", "error", "feature"]
GUEST_READ_ONLY = ["domid", "name", "control/platform-feature-xs_reset_watches",
                   "platform/acpi", "platform/acpi_s3", "platform/acpi_s4",
                   "store/port", "store/ring-ref", "console/port", "console/ring-ref"]


@pytest.fixture
def store():
    store = XenStore()
    assert create_domain_nodes(store, 4, "my-guest", 3, 0xFEFF9, 5, 0xFEFF8) == "/local/domain/4"
    return store


def test_values(store):
    guest = store.client(4)
    assert guest.read("domid") == b"4"
    assert guest.read("name") == b"my-guest"
    assert guest.read("store/port") == b"3"
    assert guest.read("store/ring-ref") == str(0xFEFF9).encode()
    assert guest.read("console/port") == b"5"
    assert guest.read("console/ring-ref") == str(0xFEFF8).encode()
    assert guest.read("control/platform-feature-xs_reset_watches") == b"1"
    assert guest.read("platform/acpi_laptop_slate") == b"0"
    # Left to the guest to fill in: pyvmm cannot suspend a domain yet.
    for empty in ("data", "device", "drivers", "error", "feature", "attr", "control/shutdown",
                  "control/feature-suspend"):
        assert guest.read(empty) == b""


def test_guest_may_write_its_own_nodes(store):
    guest = store.client(4)
    for path in GUEST_WRITABLE:
        guest.write(path, "x")
    guest.write("device/vbd/51712/state", "1")
    guest.write("data/anything", "1")


def test_guest_may_not_write_informational_nodes(store):
    guest = store.client(4)
    for path in GUEST_READ_ONLY:
        with pytest.raises(XenStoreError) as exc:
            guest.write(path, "x")
        assert exc.value.name == "EACCES", path
    with pytest.raises(XenStoreError):
        guest.write("newnode", "x")


def test_other_domains_see_nothing(store):
    create_domain_nodes(store, 5, "other", 1, 1, 2, 2)
    other = store.client(5)
    for path in ("/local/domain/4", "/local/domain/4/name", "/local/domain/4/data"):
        with pytest.raises(XenStoreError) as exc:
            other.read(path)
        assert exc.value.name == "EACCES"


def test_permissions(store):
    dom0 = store.client(0)
    assert dom0.get_perms("/local/domain/4") == [Permission(0, Access.NONE), Permission(4, Access.READ)]
    assert dom0.get_perms("/local/domain/4/data") == [Permission(4, Access.NONE)]


def test_domain_is_introduced_and_tree_consistent(store):
    assert store.client(0).is_domain_introduced(4)
    assert store.check() == []


def test_recreating_is_idempotent(store):
    create_domain_nodes(store, 4, "renamed", 3, 1, 5, 2)
    assert store.client(4).read("name") == b"renamed"
    assert store.check() == []


def test_node_list_has_parents_first():
    seen = {""}
    for relative, _, _ in default_domain_nodes(1, "n", 1, 1, 2, 2):
        parent = relative.rpartition("/")[0]
        assert relative == "" or parent in seen, relative
        seen.add(relative)


def test_rejects_dom0_and_unprivileged_clients():
    store = XenStore()
    with pytest.raises(ValueError):
        create_domain_nodes(store, 0, "dom0", 1, 1, 2, 2)
    with pytest.raises(ValueError):
        create_domain_nodes(store, 2, "g", 1, 1, 2, 2, client=store.client(1))
