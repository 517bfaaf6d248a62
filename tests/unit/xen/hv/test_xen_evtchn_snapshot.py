"""EventChannels.save_state()/restore_state(): a table driven through the
guest's operations, saved, sent through JSON and restored into a fresh
part behaves as the original did; the backend channels are claimed again
and the in-kernel ports registered by finish_restore()."""

import json

import pytest

from frontends.evtchn import DOMID, FakeKernel, Rig
from pyvmm.core.snapshot import SnapshotError
from pyvmm.xen.abi import DOMID_SELF, EVTCHNSTAT_interdomain, VIRQ_CONSOLE, VIRQ_TIMER


def busy_table(rig):
    """Ports of every kind; returns what the test needs to find them again."""
    ev = rig.ev
    store = ev.connect_backend(lambda: None)  # what the domain makes at build
    offered = ev.alloc_unbound(DOMID_SELF, 0)
    disk = ev.bind_backend(offered, lambda: None)
    a = ev.alloc_unbound(DOMID_SELF, DOMID_SELF)
    b = ev.bind_interdomain(DOMID_SELF, a)
    timer = ev.bind_virq(VIRQ_TIMER, 2)
    console = ev.bind_virq(VIRQ_CONSOLE, 0)
    ev.bind_vcpu(console, 3)
    ipi = ev.bind_ipi(1)
    spare = ev.alloc_unbound(DOMID_SELF, 0)
    ev.close(spare)  # a hole the next allocation fills
    rig.run_scheduled()
    return {"store": store, "disk": disk, "offered": offered, "a": a, "b": b, "timer": timer,
            "console": console, "ipi": ipi, "spare": spare}


def table(ev):
    return [{k: v for k, v in entry.items() if k not in ("pending", "masked")} for entry in ev.snapshot()]


def restored(state, *, kernel=None, claim=True):
    rig = Rig(kernel=kernel)
    store_notes = []
    store = rig.ev.connect_backend(lambda: store_notes.append(1))  # rebuilt as at boot
    rig.run_scheduled()
    store_notes.clear()
    rig.ev.restore_state(json.loads(json.dumps(state)))
    disk_notes = []
    disk = None
    if claim:
        disk_port = next(b["dom0_port"] for b in state["backends"] if b["dom0_port"] != store.dom0_port)
        disk = rig.ev.claim_backend(disk_port, lambda: disk_notes.append(1))
    return rig, store, store_notes, disk, disk_notes


def test_a_restored_table_behaves_as_the_saved_one():
    rig = Rig()
    ports = busy_table(rig)
    state = rig.ev.save_state()
    new, store, store_notes, disk, disk_notes = restored(state)
    new.ev.finish_restore()
    new.run_scheduled()
    assert store_notes and disk_notes  # every connected backend is woken once
    # shared_info is guest RAM, not restored here: compare the table alone.
    assert table(new.ev) == table(rig.ev)
    ev, guest = new.ev, new.guest
    assert ev.status(DOMID_SELF, ports["b"]).remote_port == ports["a"]
    ev.send(ports["a"])
    assert guest.pending(ports["b"])
    ev.send_virq(VIRQ_TIMER, 2)
    assert guest.pending(ports["timer"]) and 2 in new.upcalls
    ev.send_virq(VIRQ_CONSOLE)
    assert guest.pending(ports["console"]) and 3 in new.upcalls  # still on the vCPU it was moved to
    ev.send(ports["ipi"])
    assert 1 in new.upcalls
    # The guest's send reaches the claimed backend; the backend's reaches the guest.
    disk_notes.clear()
    ev.send(ports["offered"])
    new.run_scheduled()
    assert disk_notes == [1]
    guest.set_pending(ports["offered"], False)
    disk.notify()
    assert guest.pending(ports["offered"])
    assert disk.dom0_port == ports["disk"].dom0_port and store.guest_port == ports["store"].guest_port
    assert ev.alloc_unbound(DOMID_SELF, 0) == ports["spare"]  # the hole is found again
    with pytest.raises(Exception):
        ev.bind_virq(VIRQ_TIMER, 2)  # still bound


def test_finish_restore_registers_the_in_kernel_ports_again():
    rig = Rig(kernel=FakeKernel())
    ports = busy_table(rig)
    state = rig.ev.save_state()
    kernel = FakeKernel()
    new, store, _, disk, _ = restored(state, kernel=kernel)
    kernel.calls.clear()
    new.ev.finish_restore()
    assert kernel.calls[0] == ("reset",)
    assert kernel.named("assign_ipi") == [(ports["ipi"], 1)]
    assigned = dict(kernel.named("assign_eventfd"))
    assert assigned == {store.guest_port: store.eventfd, ports["offered"]: disk.eventfd}
    assert disk.eventfd in new.readers
    assert all(entry["in_kernel"] for entry in new.ev.snapshot()
               if entry["port"] in (ports["ipi"], ports["offered"], store.guest_port))


def test_every_saved_backend_must_be_claimed():
    rig = Rig()
    busy_table(rig)
    new, *_ = restored(rig.ev.save_state(), claim=False)
    with pytest.raises(SnapshotError, match="not claimed"):
        new.ev.finish_restore()


def test_claiming_what_was_not_saved_is_refused():
    rig = Rig()
    busy_table(rig)
    new, *_ = restored(rig.ev.save_state())
    with pytest.raises(SnapshotError):
        new.ev.claim_backend(99, lambda: None)


def test_a_backend_of_this_vm_missing_from_the_snapshot_is_refused():
    state = Rig().ev.save_state()  # no backend at all
    rig = Rig()
    rig.ev.connect_backend(lambda: None)
    with pytest.raises(SnapshotError, match="not in the snapshot"):
        rig.ev.restore_state(state)


def corrupt(state, change):
    state = json.loads(json.dumps(state))
    change(state)
    return state


@pytest.mark.parametrize("change", [
    lambda s: s.update(version=3),
    lambda s: s.update(ports=None),
    lambda s: s["ports"].append({"port": 0, "state": "ipi", "vcpu": 0}),
    lambda s: s["ports"].append({"port": 4096, "state": "ipi", "vcpu": 0}),
    lambda s: s["ports"].append({"port": 300, "state": "ipi", "vcpu": 9}),
    lambda s: s["ports"].append({"port": 300, "state": "bogus", "vcpu": 0}),
    lambda s: s["ports"].append({"port": 300, "state": "unbound", "vcpu": 0, "remote_dom": 5}),
    lambda s: s["ports"].append(dict(s["ports"][0])),
    lambda s: s["ports"].append({"port": 300, "state": "virq", "vcpu": 2, "virq": VIRQ_TIMER}),
    lambda s: s["ports"].append({"port": 300, "state": "interdomain", "vcpu": 0, "remote_dom": DOMID,
                                 "remote_port": 301}),
    lambda s: s["ports"].append({"port": 300, "state": "interdomain", "vcpu": 0, "remote_dom": 0,
                                 "remote_port": 7}),
    lambda s: s["backends"].append({"dom0_port": 7, "guest_port": 299}),
    lambda s: s["backends"].append({"dom0_port": True, "guest_port": None}),
])
def test_corrupt_states_are_refused(change):
    rig = Rig()
    busy_table(rig)
    state = corrupt(rig.ev.save_state(), change)
    new = Rig()
    before = new.ev.snapshot()
    with pytest.raises(SnapshotError):
        new.ev.restore_state(state)
    assert new.ev.snapshot() == before  # nothing half-restored


def test_a_version_1_table_restores_as_two_level():
    """Saved before FIFO queues were: no "fifo" field, a 2-level guest."""
    rig = Rig()
    ports = busy_table(rig)
    state = rig.ev.save_state()
    del state["fifo"]
    state["version"] = 1
    new, *_ = restored(state)
    new.ev.finish_restore()
    assert not new.ev.fifo_active and table(new.ev) == table(rig.ev)
    new.ev.send(ports["ipi"])
    assert 1 in new.upcalls
