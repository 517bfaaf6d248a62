"""The vbd's xenbus handshake against a real XenStore, with a fake frontend
that writes its keys as Linux's blkfront does (through the guest's own,
unprivileged xenstore client), real grant tables, event channels and rings
in guest memory, and an image file in tmp_path."""

import ctypes
import random
import struct
import time

import pytest

from pyvmm.core.memory import GuestMemory
from pyvmm.xen.backends.blk import blkif
from pyvmm.xen.hv import gnttab
from pyvmm.xen.abi import EVTCHNSTAT_interdomain, EVTCHNSTAT_unbound
from pyvmm.xen.backends.blk.blkif import BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY, VDISK_READONLY
from pyvmm.xen.hv.evtchn import DOMID_SELF, EventChannels
from pyvmm.xen.hv.gnttab import GTF_IN_USE, GTF_permit_access, GrantTable
from pyvmm.xen.backend.ring import REQ_PROD, FrontRing
from pyvmm.xen.backends.blk.vbd import VbdDevice, create_vbds, vdev_index, vdev_to_devid
from pyvmm.xen.backend.xenbus_backend import XenbusState
from pyvmm.xen.xenstore import XenStore, XenStoreError, create_domain_nodes

DOMID = 1
PAGE = 4096
SECTORS = 2048  # a 1 MiB image


class Loop:
    """The event thread: callbacks queued, run by run()."""

    def __init__(self):
        self.queue = []

    def schedule(self, callback):
        self.queue.append(callback)

    call_soon_threadsafe = schedule

    def run(self, limit=10_000):
        count = 0
        while self.queue:
            self.queue.pop(0)()
            count += 1
            assert count < limit, "callbacks keep rescheduling themselves"


class Domain:
    """What create_vbds and VbdDevice need of a XenDomain, and the guest's memory."""

    def __init__(self):
        self.loop = Loop()
        self.memory = GuestMemory([(0, 1024 * PAGE)])
        self.gnttab = GrantTable(self.memory, max_frames=4)
        self.evtchn = EventChannels(
            domid=DOMID, vcpu_count=2, long_mode=lambda: True,
            shared_info_address=lambda: None, vcpu_info_address=lambda index: None,
            upcall=lambda vcpu: None, schedule=self.loop.schedule,
            add_reader=lambda fd, cb: None, remove_reader=lambda fd: None,
        )
        self.store = XenStore()
        create_domain_nodes(self.store, DOMID, "guest", store_port=1, store_ring_ref=0xFEFF9,
                            console_port=2, console_ring_ref=0xFEFF8)
        self.domid = DOMID
        self.vcpu_count = 2
        self.guest = self.store.client(DOMID, privileged=False)
        self.next_ref = gnttab.GNTTAB_NR_RESERVED_ENTRIES
        self.next_gfn = 16

    def call_soon(self, callback):
        self.loop.schedule(callback)

    def grant(self, gfn, flags=GTF_permit_access):
        ref = self.next_ref
        self.next_ref += 1
        self.set_entry(ref, gfn, flags)
        return ref

    def set_entry(self, ref, gfn, flags=GTF_permit_access):
        address = self.gnttab.frame_host_address(ref // gnttab.ENTRIES_PER_FRAME) + (ref % gnttab.ENTRIES_PER_FRAME) * 8
        ctypes.memmove(address, struct.pack("<HHI", flags, 0, gfn), 8)

    def entry_flags(self, ref):
        address = self.gnttab.frame_host_address(ref // gnttab.ENTRIES_PER_FRAME) + (ref % gnttab.ENTRIES_PER_FRAME) * 8
        return struct.unpack("<H", ctypes.string_at(address, 2))[0]

    def page(self):
        gfn = self.next_gfn
        self.next_gfn += 1
        return gfn


class Frontend:
    """Linux's blkfront, as far as xenstore and the rings go."""

    def __init__(self, domain, device, *, queues=1, order=None, protocol="x86_64-abi", persistent=True):
        self.domain = domain
        self.xs = domain.guest
        self.path = device.frontend_path
        self.backend_path = self.xs.read(f"{self.path}/backend").decode()
        self.abi = blkif.abi_for_protocol(protocol)
        self.protocol = protocol
        self.persistent = persistent
        self.queues = queues
        self.order = order
        self.rings = []
        self.ports = []
        self.refs = []

    def backend(self, key):
        return self.xs.read(f"{self.backend_path}/{key}").decode()

    def backend_state(self):
        return XenbusState(int(self.backend("state")))

    def set_state(self, state):
        self.xs.write(f"{self.path}/state", str(int(state)))

    def talk_to_backend(self, *, state=XenbusState.INITIALISED, skip=()):
        """Allocate rings and channels, publish them in one transaction, switch state."""
        pages = 1 << (self.order or 0)
        self.rings, self.ports, self.refs = [], [], []
        with self.xs.transaction() as tx:
            for stale in ("ring-page-order", "multi-queue-num-queues"):  # from an earlier attempt
                self.xs.rm(f"{self.path}/{stale}", tx)
            if self.order is not None:
                self.xs.write(f"{self.path}/ring-page-order", str(self.order), tx)
            if self.queues > 1:
                self.xs.write(f"{self.path}/multi-queue-num-queues", str(self.queues), tx)
            for queue in range(self.queues):
                gfns = [self.domain.page() for _ in range(pages)]
                refs = [self.domain.grant(gfn) for gfn in gfns]
                self.refs += refs
                self.rings.append(FrontRing([self.domain.memory.view(g * PAGE, PAGE) for g in gfns],
                                            self.abi.entry_size))
                port = self.domain.evtchn.alloc_unbound(DOMID_SELF, 0)
                self.ports.append(port)
                base = f"{self.path}/queue-{queue}" if self.queues > 1 else self.path
                if self.order is None:
                    keys = {"ring-ref": str(refs[0])}
                else:
                    keys = {f"ring-ref{i}": str(ref) for i, ref in enumerate(refs)}
                keys["event-channel"] = str(port)
                for key, value in keys.items():
                    if key not in skip:
                        self.xs.write(f"{base}/{key}", value, tx)
            self.xs.write(f"{self.path}/protocol", self.protocol, tx)
            if self.persistent:
                self.xs.write(f"{self.path}/feature-persistent", "1", tx)
        self.set_state(state)
        self.domain.loop.run()

    def request(self, queue, *requests, expect=None):
        """Submit, notify, and collect responses until `expect` of them
        (default: one per request) came back from the queue's worker."""
        for request in requests:
            self.rings[queue].put_request(request)
        self.rings[queue].push_requests()
        self.domain.evtchn.send(self.ports[queue])
        wanted = len(requests) if expect is None else expect
        responses = {}
        deadline = time.monotonic() + 10
        while len(responses) < wanted and time.monotonic() < deadline:
            self.domain.loop.run()
            for raw in self.rings[queue].take_responses():
                request_id, op, status = blkif.parse_response(raw, self.abi)
                responses[request_id] = status
            time.sleep(0.001)
        self.domain.loop.run()
        return responses

    def read(self, queue, request_id, sector, page=None):
        """A one-page read at `sector` (into a fresh grant, or `page`, a
        (ref, gfn) pair); returns (status, the page's bytes)."""
        if page is None:
            gfn = self.domain.page()
            ref = self.domain.grant(gfn)
        else:
            ref, gfn = page
        status = self.request(queue, blkif.pack_request(self.abi, BLKIF_OP_READ, request_id, sector, [(ref, 0, 7)]))
        return status[request_id], self.domain.memory.read(gfn * PAGE, PAGE)

    def write(self, queue, request_id, sector, data):
        gfn = self.domain.page()
        self.domain.memory.write(gfn * PAGE, data)
        ref = self.domain.grant(gfn)
        status = self.request(queue, blkif.pack_request(self.abi, BLKIF_OP_WRITE, request_id, sector, [(ref, 0, 7)]))
        return status[request_id]


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
