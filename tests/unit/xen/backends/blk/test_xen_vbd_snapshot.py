"""VbdDevice.save_state()/restore_state(): a connected disk saved with a
request waiting in its ring (guest RAM) and a persistent grant, restored
with the grant table, event channels and xenstore into a freshly built VM,
serves that request and the next ones, the persistent grant still mapped;
a ring with a request in flight refuses the save; bad states are refused."""

import ctypes
import json
import random
import struct

import pytest

from frontends.common import PAGE
from frontends.xenbus import DOMID, Domain, XenbusBlkfront as Frontend
from pyvmm.core.snapshot import SnapshotError
from pyvmm.xen.backend.ring import RSP_PROD, FrontRing
from pyvmm.xen.backend.xenbus_backend import XenbusState
from pyvmm.xen.backends.blk import blkif
from pyvmm.xen.backends.blk.blkif import BLKIF_OP_READ, BLKIF_RSP_OKAY
from pyvmm.xen.backends.blk.vbd import VbdDevice
from pyvmm.xen.hv.gnttab import GTF_IN_USE

from test_xen_vbd import SECTORS, make_vbd, run_until


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(random.Random(1).randbytes(SECTORS * 512))
    return path


def gfn_of(domain, ref):
    return struct.unpack("<HHI", ctypes.string_at(domain._entry_address(ref), 8))[2]


def save(domain, device):
    state = {"gnttab": domain.gnttab.save_state(), "evtchn": domain.evtchn.save_state(),
             "store": domain.store.save_state(), "vbd": device.save_state(),
             "ram": domain.memory.read(0, 1024 * PAGE).hex()}
    return json.loads(json.dumps(state))


def restore(state, old_domain, image, **options):
    """Build the VM again (the device made and started as at boot), then restore in order."""
    domain = Domain()
    device = make_vbd(domain, image, **options)
    domain.memory.write(0, bytes.fromhex(state["ram"]))
    domain.next_gfn, domain.next_ref = old_domain.next_gfn, old_domain.next_ref
    domain.gnttab.restore_state(state["gnttab"])
    domain.evtchn.restore_state(state["evtchn"])
    domain.store.restore_state(state["store"])
    device.restore_state(state["vbd"])
    domain.evtchn.finish_restore()
    device.finish_restore()
    return domain, device


def frontend_again(domain, device, old, rsp_cons):
    """The guest's blkfront after the restore: the same rings (in restored RAM) and ports."""
    fe = Frontend(domain, device)
    fe.ports, fe.refs = old.ports, old.refs
    pages = [domain.memory.view(gfn_of(domain, ref) * PAGE, PAGE) for ref in old.refs]
    fe.rings = [FrontRing(pages, fe.abi.entry_size, init=False)]
    fe.rings[0].rsp_cons = rsp_cons
    return fe


def test_a_restored_disk_serves_the_waiting_request_and_the_next_ones(image):
    old = Domain()
    device = make_vbd(old, image)
    fe = Frontend(old, device, persistent=True)
    fe.talk_to_backend()
    gfn = old.page()
    kept = old.grant(gfn)
    assert fe.read(0, 1, 8, (kept, gfn))[0] == BLKIF_RSP_OKAY  # a persistent grant now
    assert fe.write(0, 2, 64, b"\x77" * PAGE) == BLKIF_RSP_OKAY
    # A request the guest queued but the VM was paused before it notified.
    waiting_gfn = old.page()
    waiting_ref = old.grant(waiting_gfn)
    fe.rings[0].put_request(blkif.pack_request(fe.abi, BLKIF_OP_READ, 3, 16, [(waiting_ref, 0, 7)]))
    fe.rings[0].push_requests()
    state = save(old, device)
    rsp_cons = fe.rings[0].rsp_cons  # the guest's, as saved with its RAM
    persistent = state["vbd"]["connection"]["persistent_refs"][0]
    assert kept in persistent and len(persistent) == 2  # the read's grant and the write's
    # The saved VM's queues stay quiesced (guest RAM is saved after this)
    # until it goes on; then both requests are answered there.
    assert not device._workers
    device.resume_after_save()
    other_ref = old.grant(old.page())
    request = blkif.pack_request(fe.abi, BLKIF_OP_READ, 4, 0, [(other_ref, 0, 7)])
    assert fe.request(0, request, expect=2) == {3: BLKIF_RSP_OKAY, 4: BLKIF_RSP_OKAY}
    device.close()

    domain, device2 = restore(state, old, image)
    assert device2.connected and device2.state == XenbusState.CONNECTED and device2.queues == 1
    assert all(domain.entry_flags(ref) & GTF_IN_USE for ref in fe.refs + persistent)  # mapped again
    fe2 = frontend_again(domain, device2, fe, rsp_cons)
    run_until(domain, lambda: fe2.rings[0].shared.load(RSP_PROD) != fe2.rings[0].rsp_cons)  # woken by finish_restore
    responses = [blkif.parse_response(raw, fe2.abi) for raw in fe2.rings[0].take_responses()]
    assert [(r[0], r[2]) for r in responses] == [(3, BLKIF_RSP_OKAY)]
    assert domain.memory.read(waiting_gfn * PAGE, PAGE) == image.read_bytes()[16 * 512:][:PAGE]
    status, data = fe2.read(0, 5, 64, (kept, gfn))
    assert status == BLKIF_RSP_OKAY and data == b"\x77" * PAGE
    assert device2.backend.persistent_grants() == 3  # the two restored and the waiting request's
    device2.close()
    assert not any(domain.entry_flags(ref) & GTF_IN_USE for ref in fe.refs + persistent)


def test_a_disk_that_was_not_connected_restores_as_it_was(image):
    old = Domain()
    device = make_vbd(old, image)
    state = save(old, device)
    assert state["vbd"]["connection"] is None
    domain, device2 = restore(state, old, image)
    assert not device2.connected and device2.state == XenbusState.INIT_WAIT
    fe = Frontend(domain, device2)
    fe.talk_to_backend()
    assert device2.connected and fe.read(0, 1, 0)[0] == BLKIF_RSP_OKAY
    device.close()
    device2.close()


def test_a_request_in_flight_refuses_the_save_and_the_disk_goes_on(image, monkeypatch):
    old = Domain()
    device = make_vbd(old, image)
    fe = Frontend(old, device)
    fe.talk_to_backend()
    monkeypatch.setattr(device.backend, "drained", lambda queue: False)
    with pytest.raises(SnapshotError, match="in flight"):
        device.save_state()
    monkeypatch.undo()
    assert fe.read(0, 1, 0)[0] == BLKIF_RSP_OKAY
    device.close()


@pytest.mark.parametrize("change", [
    lambda s: s.update(version=2),
    lambda s: s["xenbus"].update(devid=51728),
    lambda s: s["xenbus"].update(state=42),
    lambda s: s["connection"].update(queues=[]),
    lambda s: s["connection"]["queues"][0].update(refs=[-1]),
    lambda s: s["connection"]["channels"][0].update(dom0_port=77),  # not a saved channel
    lambda s: s["connection"]["channels"][0].update(guest_port=9),  # not its other end
    lambda s: s["connection"]["queues"][0].update(refs=[4000]),  # not granted
])
def test_bad_states_are_refused(image, change):
    old = Domain()
    device = make_vbd(old, image)
    Frontend(old, device).talk_to_backend()
    state = save(old, device)
    device.close()
    change(state["vbd"])
    with pytest.raises(SnapshotError):
        restore(state, old, image)
