"""The vbd's xenbus handshake against a real XenStore, with the fake frontend
of tests/frontends/xenbus.py that writes its keys as Linux's blkfront does
(through the guest's own, unprivileged xenstore client), real grant tables,
event channels and rings in guest memory, and an image file in tmp_path."""

import random
import time

import pytest

from frontends.common import PAGE
from frontends.xenbus import DOMID, Domain, XenbusBlkfront as Frontend
from pyvmm.xen.backends.blk import blkif
from pyvmm.xen.abi import EVTCHNSTAT_interdomain, EVTCHNSTAT_unbound
from pyvmm.xen.backends.blk.blkif import BLKIF_OP_READ, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY, VDISK_READONLY
from pyvmm.xen.hv.evtchn import DOMID_SELF
from pyvmm.xen.hv.gnttab import GTF_IN_USE
from pyvmm.xen.backend.ring import REQ_PROD
from pyvmm.xen.backends.blk.vbd import VbdDevice, create_vbds, vdev_index, vdev_to_devid
from pyvmm.xen.backend.xenbus_backend import XenbusState
from pyvmm.xen.xenstore import XenStoreError

SECTORS = 2048  # a 1 MiB image


@pytest.fixture
def domain():
    return Domain()


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(random.Random(1).randbytes(SECTORS * 512))
    return path


def make_vbd(domain, path, vdev="xvda", readonly=False, **options):
    device = VbdDevice.open(domain.store, DOMID, path, domain.gnttab, domain.evtchn, domain.call_soon,
                            vdev=vdev, readonly=readonly, **options)
    device.start()
    domain.loop.run()
    return device


def run_until(domain, condition, timeout=10):
    """Run the event thread's callbacks until `condition()` (workers are threads)."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        domain.loop.run()
        time.sleep(0.001)
    domain.loop.run()


def port_state(domain, port):
    return domain.evtchn.status(DOMID_SELF, port).status


# --- device ids ---------------------------------------------------------------------


def test_vdev_numbers_follow_xen():
    assert vdev_to_devid("xvda") == 51712
    assert vdev_to_devid("xvdb") == 51728
    assert vdev_to_devid("xvdp") == 202 << 8 | 15 << 4
    assert vdev_to_devid("xvdq") == 1 << 28 | 16 << 8
    assert vdev_index("xvdz") == 25 and vdev_index("xvdaa") == 26
    with pytest.raises(ValueError):
        vdev_to_devid("sda")


# --- nodes and permissions ------------------------------------------------------------


def test_nodes_and_permissions_as_the_toolstack_makes_them(domain, image):
    device = make_vbd(domain, image, max_queues=2)
    fe, be = device.frontend_path, device.backend_path
    assert fe == "/local/domain/1/device/vbd/51712"
    assert be == "/local/domain/0/backend/vbd/1/51712"
    guest = domain.guest
    read = lambda path: guest.read(path).decode()  # noqa: E731
    assert read(f"{fe}/backend") == be and read(f"{fe}/backend-id") == "0"
    assert read(f"{fe}/virtual-device") == "51712" and read(f"{fe}/device-type") == "disk"
    assert read(f"{fe}/state") == "1"
    assert read(f"{be}/frontend") == fe and read(f"{be}/frontend-id") == "1"
    assert read(f"{be}/online") == "1" and read(f"{be}/hotplug-status") == "connected"
    assert read(f"{be}/state") == str(int(XenbusState.INIT_WAIT))
    assert read(f"{be}/sectors") == str(SECTORS) and read(f"{be}/info") == "0"
    assert read(f"{be}/sector-size") == "512" and read(f"{be}/feature-flush-cache") == "1"
    assert read(f"{be}/max-ring-page-order") == "4" and read(f"{be}/multi-queue-max-queues") == "2"
    assert read(f"{be}/feature-max-indirect-segments") == "256"
    # The guest owns its directory; the backend's is read-only to it.
    guest.write(f"{fe}/state", "1")
    with pytest.raises(XenStoreError) as error:
        guest.write(f"{be}/state", "4")
    assert error.value.name == "EACCES"
    assert guest.get_perms(fe)[0].domid == DOMID
    assert guest.get_perms(f"{be}/sectors")[0].domid == 0
    device.close()


def test_readonly_disk_advertises_readonly(domain, image):
    device = make_vbd(domain, image, readonly=True)
    fe = Frontend(domain, device)
    assert int(fe.backend("info")) & VDISK_READONLY
    assert fe.backend("feature-flush-cache") == "0" and fe.backend("mode") == "r"
    fe.talk_to_backend()
    assert fe.backend_state() == XenbusState.CONNECTED
    before = image.read_bytes()
    assert fe.write(0, 1, 0, b"\xAA" * PAGE) == BLKIF_RSP_ERROR
    assert image.read_bytes() == before
    status, data = fe.read(0, 2, 8)
    assert status == BLKIF_RSP_OKAY and data == before[8 * 512 : 8 * 512 + PAGE]
    device.close()


# --- connecting -----------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["x86_64-abi", "x86_32-abi"])
def test_connect_one_ring_and_serve_requests(domain, image, protocol):
    device = make_vbd(domain, image)
    fe = Frontend(domain, device, protocol=protocol)
    fe.talk_to_backend()
    assert fe.backend_state() == XenbusState.CONNECTED and device.connected
    assert port_state(domain, fe.ports[0]) == EVTCHNSTAT_interdomain
    status, data = fe.read(0, 7, 16)
    assert status == BLKIF_RSP_OKAY and data == image.read_bytes()[16 * 512 : 16 * 512 + PAGE]
    assert fe.write(0, 8, 32, b"\x5A" * PAGE) == BLKIF_RSP_OKAY
    assert image.read_bytes()[32 * 512 : 32 * 512 + PAGE] == b"\x5A" * PAGE
    # The ring pages stay mapped while connected.
    assert all(domain.entry_flags(ref) & GTF_IN_USE for ref in fe.refs)
    device.close()
    assert not any(domain.entry_flags(ref) & GTF_IN_USE for ref in fe.refs)
    assert port_state(domain, fe.ports[0]) == EVTCHNSTAT_unbound


def test_frontend_connected_without_initialised_also_connects(domain, image):
    device = make_vbd(domain, image)
    fe = Frontend(domain, device)
    fe.talk_to_backend(state=XenbusState.CONNECTED)
    assert device.connected and fe.backend_state() == XenbusState.CONNECTED
    device.close()


def test_multi_queue_multi_page_rings(domain, image):
    device = make_vbd(domain, image, max_queues=2, max_ring_page_order=2)
    fe = Frontend(domain, device, queues=2, order=1)
    fe.talk_to_backend()
    assert device.connected and device.queues == 2 and device.ring_pages == 2
    for queue in (0, 1):
        status, data = fe.read(queue, 100 + queue, 8 * queue)
        assert status == BLKIF_RSP_OKAY and data == image.read_bytes()[8 * queue * 512 :][:PAGE]
    device.close()


def test_busy_queue_is_rescheduled_until_empty(domain, image):
    device = make_vbd(domain, image, budget=2, batch=1)
    fe = Frontend(domain, device)
    fe.talk_to_backend()
    refs = [domain.grant(domain.page()) for _ in range(7)]
    requests = [blkif.pack_request(fe.abi, BLKIF_OP_READ, i, 8 * i, [(ref, 0, 7)]) for i, ref in enumerate(refs)]
    responses = fe.request(0, *requests)
    assert responses == {i: BLKIF_RSP_OKAY for i in range(7)}
    device.close()


# --- bad frontends ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "spoil",
    ["ungranted-ring", "no-event-channel", "bad-protocol", "too-many-queues", "order-too-big", "garbage-ref"],
)
def test_bad_frontend_keys_fail_only_that_device(domain, image, tmp_path, spoil):
    other_image = tmp_path / "other.img"
    other_image.write_bytes(bytes(SECTORS * 512))
    device = make_vbd(domain, image, max_queues=2)
    other = make_vbd(domain, other_image, vdev="xvdb")
    fe = Frontend(domain, device)
    skip = ()
    if spoil == "no-event-channel":
        skip = ("event-channel",)
    elif spoil == "bad-protocol":
        fe.protocol = "arm-abi"
    elif spoil == "too-many-queues":
        fe.queues = 3
    elif spoil == "order-too-big":
        fe.order = 5
    fe.talk_to_backend(skip=skip) if spoil not in ("ungranted-ring", "garbage-ref") else None
    if spoil in ("ungranted-ring", "garbage-ref"):
        with domain.guest.transaction() as tx:
            ref = "4000" if spoil == "ungranted-ring" else "12x"
            domain.guest.write(f"{fe.path}/ring-ref", ref, tx)
            domain.guest.write(f"{fe.path}/event-channel", str(domain.evtchn.alloc_unbound(DOMID_SELF, 0)), tx)
        fe.set_state(XenbusState.INITIALISED)
        domain.loop.run()
    assert not device.connected
    assert fe.backend_state() == XenbusState.CLOSING
    assert fe.backend("error").split(" ", 1)[0].isdigit()
    assert not any(domain.entry_flags(ref) & GTF_IN_USE for ref in fe.refs)  # nothing left mapped
    for port in fe.ports:
        assert port_state(domain, port) == EVTCHNSTAT_unbound
    # The frontend closes in turn; the failed device stays closed.
    fe.set_state(XenbusState.CLOSED)
    domain.loop.run()
    assert fe.backend_state() == XenbusState.CLOSED
    # The other disk is unaffected.
    fe2 = Frontend(domain, other)
    fe2.talk_to_backend()
    assert other.connected and fe2.read(0, 1, 0)[0] == BLKIF_RSP_OKAY
    # Starting over explicitly (Initialising) makes the failed one usable again.
    fe.protocol, fe.queues, fe.order = "x86_64-abi", 1, None
    fe.set_state(XenbusState.INITIALISING)
    domain.loop.run()
    assert fe.backend_state() == XenbusState.INIT_WAIT
    fe.talk_to_backend()
    assert device.connected and fe.read(0, 1, 0)[0] == BLKIF_RSP_OKAY
    device.close()
    other.close()


def test_broken_ring_indices_close_the_device(domain, image):
    device = make_vbd(domain, image)
    fe = Frontend(domain, device)
    fe.talk_to_backend()
    ring = fe.rings[0]
    ring.shared.store(REQ_PROD, 100_000)  # far more requests than the ring holds
    domain.evtchn.send(fe.ports[0])
    run_until(domain, lambda: not device.connected)  # the worker reports, the event thread disconnects
    assert not device.connected and fe.backend_state() == XenbusState.CLOSING
    assert "ahead" in fe.backend("error")
    assert not any(domain.entry_flags(ref) & GTF_IN_USE for ref in fe.refs)
    device.close()


@pytest.mark.parametrize("persistent", [True, False])
def test_persistent_grants_only_when_the_frontend_says_so(domain, image, persistent):
    device = make_vbd(domain, image)
    fe = Frontend(domain, device, persistent=persistent)
    assert fe.backend("feature-persistent") == "1"
    fe.talk_to_backend()
    gfn = domain.page()
    ref = domain.grant(gfn)
    for request_id in range(3):  # the same grant, as a persistent frontend reuses it
        status, data = fe.read(0, request_id, 8 * request_id, (ref, gfn))
        assert status == BLKIF_RSP_OKAY and data == image.read_bytes()[4096 * request_id : 4096 * (request_id + 1)]
    assert bool(domain.entry_flags(ref) & GTF_IN_USE) == persistent
    assert device.backend.persistent_grants() == (1 if persistent else 0)
    fe.set_state(XenbusState.CLOSING)
    domain.loop.run()
    assert not domain.entry_flags(ref) & GTF_IN_USE  # given back at disconnect
    device.close()


# --- closing and reconnecting ------------------------------------------------------------


def test_close_then_reconnect_as_a_reloaded_driver_does(domain, image):
    device = make_vbd(domain, image)
    fe = Frontend(domain, device)
    fe.talk_to_backend()
    fe.set_state(XenbusState.CLOSING)
    domain.loop.run()
    assert fe.backend_state() == XenbusState.CLOSING and not device.connected
    assert not any(domain.entry_flags(ref) & GTF_IN_USE for ref in fe.refs)
    assert port_state(domain, fe.ports[0]) == EVTCHNSTAT_unbound
    states = []
    switch = device.switch_state
    device.switch_state = lambda state: (states.append(state), switch(state))
    fe.set_state(XenbusState.CLOSED)
    domain.loop.run()
    # Closed, then ready for the next driver: Linux's reloaded blkfront keeps its
    # device at Closed and renegotiates only with a Connected backend.
    assert states == [XenbusState.CLOSED, XenbusState.CONNECTED]
    assert fe.backend_state() == XenbusState.CONNECTED
    assert not device.connected
    old_refs = fe.refs
    fe.talk_to_backend()  # new rings and event channel, then Initialised
    assert device.connected and set(fe.refs).isdisjoint(old_refs)
    assert fe.read(0, 5, 40)[0] == BLKIF_RSP_OKAY
    # A frontend that starts over with Initialising gets InitWait.
    fe.set_state(XenbusState.CLOSED)
    domain.loop.run()
    fe.set_state(XenbusState.INITIALISING)
    domain.loop.run()
    assert fe.backend_state() == XenbusState.INIT_WAIT
    fe.talk_to_backend()
    assert device.connected
    device.close()


def test_frontend_node_removed_disconnects(domain, image):
    device = make_vbd(domain, image)
    fe = Frontend(domain, device)
    fe.talk_to_backend()
    domain.store.client(0).rm(f"{fe.path}/state")
    domain.loop.run()
    assert not device.connected and fe.backend_state() == XenbusState.CLOSED
    device.close()


def test_create_vbds_for_the_configured_disks(domain, image, tmp_path):
    from pyvmm.xen.backends.blk.spec import DiskSpec as DiskOption

    second = tmp_path / "ro.img"
    second.write_bytes(bytes(SECTORS * 512))
    disks = (DiskOption(image, "xvda"), DiskOption(second, "xvdb", readonly=True))
    devices = create_vbds(domain, disks)
    domain.loop.run()
    assert [d.devid for d in devices] == [51712, 51728]
    assert domain.guest.directory("device/vbd") == ["51712", "51728"]
    assert [d.backend.max_queues for d in devices] == [2, 2]  # one per vCPU
    assert devices[1].image.readonly
    for device in devices:
        device.close()
    assert devices[0].image.fd == -1


def test_create_vbds_closes_what_it_opened_on_error(domain, image, tmp_path):
    from pyvmm.xen.backends.blk.spec import DiskSpec as DiskOption

    with pytest.raises(OSError):
        create_vbds(domain, (DiskOption(image, "xvda"), DiskOption(tmp_path / "missing.img", "xvdb")))
