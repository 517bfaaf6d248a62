"""The control socket's fault-* and xenbus-state commands (operations.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pyvmm.control.server import ControlError
from pyvmm.core.faults import FaultInjector
from pyvmm.control.operations import COMMAND_NAMES, machine_commands
from pyvmm.xen.backend.xenbus_backend import XenbusState


class Vbd:
    def __init__(self, vdev, devid):
        self.vdev, self.devid = vdev, devid
        self.name = vdev
        self.backend_path = f"/local/domain/0/backend/vbd/1/{devid}"
        self.forced = []

    def force_state(self, state):
        self.forced.append(state)


@pytest.fixture
def vbds():
    return [Vbd("xvda", 51712), Vbd("xvdb", 51728)]


@pytest.fixture
def commands(vbds):
    return machine_commands(SimpleNamespace(xen=SimpleNamespace(xenbus_devices=vbds), faults=FaultInjector()))


def test_the_commands_are_registered(commands):
    for name in ("fault-add", "fault-list", "fault-clear", "xenbus-state"):
        assert name in COMMAND_NAMES and name in commands


def test_each_vm_has_its_own_rules(vbds):
    first, second = FaultInjector(), FaultInjector()
    machine_commands(SimpleNamespace(xen=None, faults=first))["fault-add"]({"spec": "blk:stall"})
    assert machine_commands(SimpleNamespace(xen=None, faults=second))["fault-list"]({}) == []
    assert [rule["spec"] for rule in first.rules()] == ["blk:stall"] and first.blk and not second.blk


def test_add_list_clear(commands):
    first = commands["fault-add"]({"spec": "blk:error,op=write"})
    second = commands["fault-add"]({"spec": "xenstore:eagain,count=1"})
    assert (first["id"], first["spec"], first["fired"]) == (first["id"], "blk:error,op=write", 0)
    assert [rule["spec"] for rule in commands["fault-list"]({})] == ["blk:error,op=write", "xenstore:eagain,count=1"]
    assert commands["fault-clear"]({"id": first["id"]}) == {"removed": 1}
    assert [rule["id"] for rule in commands["fault-list"]({})] == [second["id"]]
    assert commands["fault-clear"]({}) == {"removed": 1}
    assert commands["fault-list"]({}) == []


@pytest.mark.parametrize("args", [{}, {"spec": 3}, {"spec": "blk:explode"}])
def test_bad_specs(commands, args):
    with pytest.raises(ControlError) as error:
        commands["fault-add"](args)
    assert error.value.cls == "InvalidArgument"


@pytest.mark.parametrize("args", [{"id": 99}, {"id": "1"}, {"id": True}])
def test_bad_clears(commands, args):
    with pytest.raises(ControlError) as error:
        commands["fault-clear"](args)
    assert error.value.cls == "InvalidArgument"


def test_xenbus_state_by_vdev_devid_or_path(commands, vbds):
    assert commands["xenbus-state"]({"device": "xvdb", "state": "closing"}) == {
        "device": vbds[1].backend_path, "state": "CLOSING"}
    commands["xenbus-state"]({"device": "51712", "state": "closed"})
    commands["xenbus-state"]({"device": vbds[1].backend_path, "state": "closed"})
    assert vbds[0].forced == [XenbusState.CLOSED]
    assert vbds[1].forced == [XenbusState.CLOSING, XenbusState.CLOSED]


@pytest.mark.parametrize("args", [{"device": "xvdc", "state": "closed"}, {"device": "xvda", "state": "open"},
                                  {"device": "xvda"}])
def test_xenbus_state_refusals(commands, args):
    with pytest.raises(ControlError) as error:
        commands["xenbus-state"](args)
    assert error.value.cls == "InvalidArgument"


def test_xenbus_state_without_xen():
    with pytest.raises(ControlError) as error:
        machine_commands(SimpleNamespace(xen=None))["xenbus-state"]({"device": "xvda", "state": "closed"})
    assert error.value.cls == "Unsupported"


def test_xenstore_commands_reuse_one_store_client():
    # Each command once made a new client of its own, never closed, and every
    # store change scanned them all: 1,000 reads left 1,000 clients behind.
    from pyvmm.xen.xenstore import XenStore

    store = XenStore()
    dom0 = store.client(0)
    dom0.write("/local/domain/1/name", "guest")
    commands = machine_commands(SimpleNamespace(xen=SimpleNamespace(store=store, dom0=dom0)))
    before = len(store._clients)
    for _ in range(1000):
        assert commands["xenstore-read"]({"path": "/local/domain/1/name"}) is not None
    assert len(store._clients) == before
