"""mem-set and mem-info: the balloon target through the control socket, as
`xl mem-set` sets it (memory/target in KiB in the guest's xenstore directory)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pyvmm.control.operations import COMMAND_NAMES, machine_commands
from pyvmm.control.server import ControlError
from pyvmm.xen.domain import XenDomain
from pyvmm.xen.xenstore import XenStore
from pyvmm.xen.xenstore.domain import create_domain_nodes

MIB = 1 << 20


def xen_domain(memory=256 * MIB):
    """The domain's xenstore side only: its store, nodes and balloon state."""
    domain = XenDomain.__new__(XenDomain)
    domain.domid = 1
    domain.machine = SimpleNamespace(config=SimpleNamespace(memory=memory))
    domain.store = XenStore()
    domain.dom0 = domain.store.client(0)
    domain._lock = __import__("threading").RLock()
    domain._ballooned = set()
    create_domain_nodes(domain.store, 1, "vm", 1, 2, 3, 4, client=domain.dom0, memory_kib=memory >> 10)
    return domain


@pytest.fixture
def domain():
    return xen_domain()


@pytest.fixture
def commands(domain):
    return machine_commands(SimpleNamespace(xen=domain, config=domain.machine.config))


def read(domain, path):
    return domain.dom0.read(f"/local/domain/1/{path}").decode()


def test_the_toolstack_nodes_the_balloon_driver_reads(domain):
    assert read(domain, "memory/static-max") == read(domain, "memory/target") == str(256 * 1024)
    guest = domain.store.client(1)
    assert guest.read("/local/domain/1/memory/target") == str(256 * 1024).encode()
    from pyvmm.xen.xenstore import XenStoreError
    with pytest.raises(XenStoreError):
        guest.write("/local/domain/1/memory/target", "1")  # the toolstack's, not the guest's


def test_mem_set_writes_the_target_in_kib(domain, commands):
    assert "mem-set" in COMMAND_NAMES and "mem-info" in COMMAND_NAMES
    assert commands["mem-set"]({"target": 192 * MIB}) == {"target": 192 * MIB}
    assert read(domain, "memory/target") == str(192 * 1024)
    assert commands["mem-set"]({"target": 192 * MIB + 1000}) == {"target": 192 * MIB}  # whole KiB, as xl
    domain._ballooned.update(range(100, 110))
    assert commands["mem-info"]({}) == {"memory": 256 * MIB, "target": 192 * MIB, "ballooned": 10 * 4096,
                                        "present": 256 * MIB - 10 * 4096}


@pytest.mark.parametrize("target", [None, "128M", True, 1.5, 0, MIB - 1, 256 * MIB + 1024])
def test_mem_set_refuses(commands, domain, target):
    with pytest.raises(ControlError) as info:
        commands["mem-set"]({} if target is None else {"target": target})
    assert info.value.cls == "InvalidArgument"
    assert read(domain, "memory/target") == str(256 * 1024)


def test_mem_set_needs_xen():
    commands = machine_commands(SimpleNamespace(xen=None, config=SimpleNamespace(memory=256 * MIB)))
    with pytest.raises(ControlError) as info:
        commands["mem-set"]({"target": 128 * MIB})
    assert info.value.cls == "Unsupported"
