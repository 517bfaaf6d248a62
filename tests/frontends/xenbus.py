"""A guest domain and Linux's blkfront on the xenbus side: what create_vbds
and VbdDevice need of a XenDomain (a real XenStore with the toolstack's
nodes, grant table, event channels, and an event thread run by hand), and a
frontend that writes its keys as xen-blkfront's talk_to_blkback() does,
through the guest's own unprivileged xenstore client, in one transaction,
then switches state and drives its rings."""

from __future__ import annotations

import time

from pyvmm.xen.backend.xenbus_backend import XenbusState
from pyvmm.xen.backends.blk import blkif
from pyvmm.xen.backends.blk.blkif import BLKIF_OP_READ, BLKIF_OP_WRITE
from pyvmm.xen.hv.evtchn import DOMID_SELF, EventChannels
from pyvmm.xen.xenstore import XenStore, create_domain_nodes

from .common import PAGE, GuestPages

DOMID = 1


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


class Domain(GuestPages):
    """What create_vbds and VbdDevice need of a XenDomain, and the guest's memory."""

    def __init__(self):
        super().__init__(1024, first_gfn=16, max_frames=4)
        self.gnttab = self.table
        self.loop = Loop()
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

    def call_soon(self, callback):
        self.loop.schedule(callback)

    def page(self):
        """A fresh frame of guest RAM (not granted)."""
        return self.new_gfn()


class XenbusBlkfront:
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
                ring, refs = self.domain.front_ring([self.domain.page() for _ in range(pages)], self.abi.entry_size)
                self.refs += refs
                self.rings.append(ring)
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
