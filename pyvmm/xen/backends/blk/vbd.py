"""The virtual block device (vbd): BlockBackend behind the xenbus handshake.

At InitWait the backend advertises what BlockBackend implements
(sectors, info, sector-size, feature-flush-cache, feature-barrier,
feature-discard..., feature-max-indirect-segments, max-ring-page-order,
multi-queue-max-queues). When the frontend is Initialised it reads, as
Linux's blkback does:

    protocol                    optional, native (x86_64-abi) when absent
    multi-queue-num-queues      optional, 1 when absent; then the ring keys
                                below are in queue-0/ ... queue-<N-1>/
    ring-page-order             optional, top level; absent: one page in
                                `ring-ref`, else ring-ref0 .. ring-ref<2^order-1>
    event-channel               per queue

    feature-persistent          optional: the frontend reuses its grants

maps the ring pages through the grant table (held for the connection's
life), binds each queue's event channel and attaches the rings. Each
queue is served by its own RingWorker thread, which KVM's in-kernel
event-channel path wakes directly through the channel's eventfd; it runs
BlockBackend.process() for that queue until the ring is empty. A
RingBroken, or a bad key, fails this device only (xenbus_backend.fail,
on the event thread).

Device ids follow Xen's vdev numbering: xvdX with index < 16 is
202 << 8 | index << 4 (xvda 51712, xvdb 51728); higher indexes use the
extended form 1 << 28 | index << 8.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from functools import partial
from typing import TYPE_CHECKING, Callable, Iterable

from .blkback import BlockBackend, DiskImage
from pyvmm.xen.hv.gnttab import GrantTable
from pyvmm.xen.backend.ring import RingBroken
from pyvmm.xen.backend.ring_worker import RingWorker
from pyvmm.xen.backend.xenbus_backend import FrontendError, XenbusBackendDevice
from pyvmm.xen.xenstore import XenStore
from pyvmm.core.snapshot import SnapshotError, check_version, versioned

if TYPE_CHECKING:
    from pyvmm.xen.hv.evtchn import EventChannels

log = logging.getLogger(__name__)

XENVBD_MAJOR = 202
EXTENDED_VDEV = 1 << 28
MAX_QUEUES = 4  # Linux's blkfront asks for at most min(4, CPUs)
STATE_VERSION = 1

_VDEV = re.compile(r"xvd([a-z]{1,3})")


def vdev_index(vdev: str) -> int:
    """xvda -> 0, xvdz -> 25, xvdaa -> 26 (letters count like spreadsheet columns)."""
    match = _VDEV.fullmatch(vdev)
    if not match:
        raise ValueError(f"{vdev!r} is not a Xen disk name like xvda")
    index = 0
    for letter in match.group(1):
        index = index * 26 + (ord(letter) - ord("a") + 1)
    return index - 1


# Xen's numbers for the IDE names: major 3 (hda, hdb) and 22 (hdc, hdd),
# 64 minors a disk. Linux's blkfront names them xvda..xvdd.
IDE_DEVIDS = {"hda": 3 << 8, "hdb": 3 << 8 | 64, "hdc": 22 << 8, "hdd": 22 << 8 | 64}


def vdev_to_devid(vdev: str) -> int:
    if vdev in IDE_DEVIDS:
        return IDE_DEVIDS[vdev]
    index = vdev_index(vdev)
    if index < 16:
        return XENVBD_MAJOR << 8 | index << 4
    if index >= 1 << 20:
        raise ValueError(f"{vdev!r} is beyond Xen's disk numbering")
    return EXTENDED_VDEV | index << 8


class VbdDevice(XenbusBackendDevice):
    device_type = "vbd"

    def __init__(self, store: XenStore, domid: int, image: DiskImage, grants: GrantTable, evtchn: "EventChannels",
                 call_soon: Callable[[Callable[[], None]], None], *, vdev: str = "xvda", backend_domid: int = 0,
                 **backend_options):
        """`call_soon(fn)` runs fn later on the event thread, from any
        thread (the loop's call_soon_threadsafe); `backend_options` go to
        BlockBackend."""
        super().__init__(store, domid, vdev_to_devid(vdev), backend_domid=backend_domid)
        self.vdev = vdev
        self.image = image
        self.grants = grants
        self.evtchn = evtchn
        self.call_soon = call_soon
        self.backend = BlockBackend(image, grants, _unattached_notify, log_rate=store.log_rate, trace=self.trace,
                                    faults=self.faults, **backend_options)
        self.backend.label = vdev
        self.backend.wake = self._wake_worker
        self.faults.subscribe(self._faults_changed)  # a lifted stall: serve what waits
        self._workers: list[RingWorker] = []
        self._generation = 0  # bumped at every (dis)connect: stale callbacks do nothing
        self.queues = 0
        self.ring_pages = 0
        self._plan: dict | None = None  # what connect() attached (saved by a snapshot)
        self._queue_channels: list = []  # each queue's BackendChannel
        self._quiesced = False  # its workers were stopped for a save (save_state)

    @classmethod
    def open(cls, store: XenStore, domid: int, path: str | os.PathLike, grants: GrantTable, evtchn: "EventChannels",
             call_soon: Callable[[Callable[[], None]], None], *, vdev: str = "xvda", readonly: bool = False,
             **options) -> "VbdDevice":
        """Open the image and build the device (not started)."""
        image = DiskImage(path, readonly=readonly)
        try:
            return cls(store, domid, image, grants, evtchn, call_soon, vdev=vdev, **options)
        except BaseException:
            image.close()
            raise

    # --- xenbus ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.vdev

    def frontend_keys(self) -> dict[str, str]:
        # Linux's blkfront needs virtual-device, and device-type in an HVM
        # guest (it skips "cdrom").
        return {"virtual-device": str(self.devid), "device-type": "disk"}

    def backend_keys(self) -> dict[str, str]:
        keys = {
            "dev": self.vdev,
            "type": "phy" if self.image.is_block_device else "file",
            "params": self.image.path,
            "mode": "r" if self.image.readonly else "w",
            "device-type": "disk",
            "removable": "0",
            "bootable": "1",
        }
        keys.update(self.backend.xenbus_keys())
        return keys

    def connect(self) -> None:
        backend = self.backend
        protocol = self.read_frontend("protocol")
        queues = self.read_frontend_uint("multi-queue-num-queues", 1)
        if not 1 <= queues <= backend.max_queues:
            raise FrontendError(f"multi-queue-num-queues = {queues}; offered 1..{backend.max_queues}")
        persistent = self.read_frontend_uint("feature-persistent", 0, maximum=1) == 1
        single = self.read_frontend("ring-page-order") is None  # absent: one page in ring-ref
        order = 0 if single else self.read_frontend_uint("ring-page-order")
        if order > backend.max_ring_page_order:
            raise FrontendError(f"ring-page-order = {order}; offered up to {backend.max_ring_page_order}")
        plan = {"protocol": protocol, "persistent": persistent, "single": single, "queues": []}
        for queue in range(queues):
            prefix = f"queue-{queue}/" if queues > 1 else ""
            if single:
                refs = [self.read_frontend_uint(f"{prefix}ring-ref")]
            else:
                refs = [self.read_frontend_uint(f"{prefix}ring-ref{i}") for i in range(1 << order)]
            plan["queues"].append({"refs": refs, "port": self.read_frontend_uint(f"{prefix}event-channel")})
        self._attach(plan)
        for worker in self._workers:
            worker.start()
        self._limited.info("%s (%s, %s): connected, %d queue(s) of %d ring page(s), protocol %s, event channel(s) %s%s",
                      self.vdev, self.image.path, "ro" if self.image.readonly else "rw", queues, self.ring_pages,
                      protocol or "native", ", ".join(str(q["port"]) for q in plan["queues"]),
                      ", persistent grants" if persistent else "")

    def _attach(self, plan: dict, saved_channels: list | None = None) -> None:
        """Map the rings, bind (or, restoring, claim) each queue's channel and
        attach; the workers are made, not started."""
        backend = self.backend
        self._generation += 1
        generation = self._generation
        queues = len(plan["queues"])
        for queue, info in enumerate(plan["queues"]):
            prefix = f"queue-{queue}/" if queues > 1 else ""
            pages = [self.map_ring_page(f"{prefix}ring-ref", ref) for ref in info["refs"]]
            callback = partial(self._notified, queue, generation)
            if saved_channels is None:
                channel = self.bind_channel(f"{prefix}event-channel", info["port"], callback, own_eventfd=True)
            else:
                saved = saved_channels[queue]
                channel = self.claim_channel(f"{prefix}event-channel", saved["guest_port"], saved["dom0_port"],
                                             callback, own_eventfd=True)
            self._queue_channels.append(channel)
            try:
                backend.attach_ring(pages, plan["protocol"], queue=queue, notify=channel.notify,
                                    persistent=plan["persistent"])
            except (ValueError, RingBroken) as error:  # BlkifError is a ValueError
                raise FrontendError(f"ring of queue {queue}: {error}") from None
        self._make_workers(generation)
        self.queues, self.ring_pages = queues, len(plan["queues"][0]["refs"])
        self._plan = plan

    def _make_workers(self, generation: int) -> None:
        for queue, channel in enumerate(self._queue_channels):
            self._workers.append(RingWorker(
                f"{self.vdev}-q{queue}", partial(self._serve, queue),
                partial(self._worker_failed, queue, generation), eventfd=channel.eventfd,
                accept=channel.guest_sent))

    # --- snapshot (pyvmm/core/snapshot.py) --------------------------------------------

    def save_state(self) -> dict:
        """Its xenbus state and, while connected, what it attached: the
        protocol, each queue's ring refs and event channel (both ends),
        the grants it keeps mapped for reuse (feature-persistent).

        Nothing in flight is saved: the queues' workers are stopped first
        (each finishes the batch it holds: every request taken off a ring is
        answered in guest RAM) and the rings checked drained. The workers
        stay stopped, so that neither guest RAM nor the grant table changes
        before the machine has saved them, until resume_after_save() (the
        VM goes on) or the device is closed. Requests the guest queued and
        the workers did not take wait in its ring (guest RAM) and are served
        after a restore, or after the resume. A ring that is not drained (an
        injected delay holds a response) or a queue whose worker died
        refuses the snapshot, and the workers go on at once."""
        connection = None
        if self.connected and self._plan is not None:
            if not all(worker.alive for worker in self._workers):
                raise SnapshotError(f"{self.vdev}: a queue failed and its failure is not handled yet")
            workers, self._workers = self._workers, []
            for worker in workers:
                worker.stop()
            self._quiesced = True
            for queue in range(self.queues):
                if not self.backend.drained(queue):
                    self.resume_after_save()
                    raise SnapshotError(f"{self.vdev}: queue {queue} has a request in flight")
            connection = dict(self._plan, channels=[
                {"guest_port": channel.guest_port, "dom0_port": channel.dom0_port}
                for channel in self._queue_channels],
                persistent_refs=[self.backend.persistent_refs(queue) for queue in range(self.queues)])
        return versioned(STATE_VERSION, xenbus=self.xenbus_state(), connection=connection)

    def resume_after_save(self) -> None:
        """The VM goes on after a save (or the save failed): the queues'
        workers start again and look at their rings."""
        if not self._quiesced:
            return
        self._quiesced = False
        if self.connected and not self._workers:
            self._make_workers(self._generation)
            for worker in self._workers:
                worker.start()
                worker.wake()  # whatever arrived, or was left at a budget, while they were stopped

    def restore_state(self, state: dict) -> None:
        """Into the device just built and started, after the grant table,
        event channels and xenstore are restored: the rings are mapped and
        attached again (at the indexes in guest RAM), the channels claimed,
        the persistent grants mapped again. Its workers start in
        finish_restore()."""
        check_version(state, "VbdDevice", STATE_VERSION)
        if not self.restore_xenbus_state(state.get("xenbus")):
            if state.get("connection") is not None:
                raise SnapshotError(f"{self.vdev}: a connection saved for a device that was not connected")
            return
        plan = self._checked_plan(state.get("connection"))
        try:
            self._attach(plan, plan["channels"])
            for queue, refs in enumerate(plan["persistent_refs"]):
                self.backend.adopt_persistent(queue, refs)
        except FrontendError as error:
            self._disconnect()
            raise SnapshotError(f"{self.vdev}: cannot attach the saved rings again: {error}") from None
        except SnapshotError:
            self._disconnect()
            raise
        self.connected = True

    def finish_restore(self) -> None:
        """The VM is about to run again: start the queues' workers."""
        for worker in self._workers:
            if not worker.alive:
                worker.start()
                worker.wake()

    def _checked_plan(self, plan) -> dict:
        def natural(value, end=1 << 32) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < end

        if not isinstance(plan, dict):
            raise SnapshotError(f"{self.vdev}: connected, but no connection saved")
        queues, channels, persistent_refs = plan.get("queues"), plan.get("channels"), plan.get("persistent_refs")
        protocol, persistent, single = plan.get("protocol"), plan.get("persistent"), plan.get("single")
        ok = (isinstance(queues, list) and 1 <= len(queues) <= self.backend.max_queues
              and isinstance(channels, list) and len(channels) == len(queues)
              and isinstance(persistent_refs, list) and len(persistent_refs) == len(queues)
              and (protocol is None or isinstance(protocol, str)) and isinstance(persistent, bool)
              and isinstance(single, bool))
        if ok:
            pages = len(queues[0]["refs"]) if isinstance(queues[0], dict) and isinstance(queues[0].get("refs"), list) else 0
            ok = pages >= 1 and not pages & (pages - 1) and (pages == 1 or not single)
            for info, channel, refs in zip(queues, channels, persistent_refs):
                ok = ok and isinstance(info, dict) and isinstance(info.get("refs"), list) \
                    and len(info["refs"]) == pages and all(natural(ref) for ref in info["refs"]) \
                    and natural(info.get("port")) and isinstance(channel, dict) \
                    and (channel.get("guest_port") is None or natural(channel["guest_port"])) \
                    and natural(channel.get("dom0_port")) and isinstance(refs, list) \
                    and all(natural(ref) for ref in refs)
        if not ok:
            raise SnapshotError(f"{self.vdev}: bad saved connection {plan!r:.200}")
        return plan

    def disconnect(self) -> None:
        self._generation += 1
        self._quiesced = False
        workers, self._workers = self._workers, []
        for worker in workers:  # first: nothing may touch a ring being taken away
            worker.stop()
        self.backend.detach_ring()
        self.release_connection()
        self._queue_channels = []
        self._plan = None
        if self.queues:
            self._limited.info("%s: disconnected", self.vdev)
        self.queues = self.ring_pages = 0

    def close(self) -> None:
        self.faults.unsubscribe(self._faults_changed)
        super().close()
        self.image.close()

    def _faults_changed(self) -> None:
        for queue in range(self.queues):
            self.call_soon(partial(self._notified, queue, self._generation))

    # --- requests ---------------------------------------------------------------------

    def _notified(self, queue: int, generation: int) -> None:
        """A notification that came through userspace (or the catch-up one
        after binding): hand it to the queue's worker."""
        if generation == self._generation and not self.closed:
            self._wake_worker(queue)

    def _wake_worker(self, queue: int) -> None:
        workers = self._workers
        if queue < len(workers):
            workers[queue].wake()

    def _serve(self, queue: int) -> bool:
        """On the queue's worker: serve the ring; True while work is left."""
        self.backend.process(queue)
        return self.backend.work_pending(queue)

    def _worker_failed(self, queue: int, generation: int, error: BaseException) -> None:
        # On the worker thread: the device is failed on the event thread.
        if not isinstance(error, RingBroken):
            log.error("%s: serving queue %d failed", self.vdev, queue, exc_info=error)
        self.call_soon(partial(self._fail_queue, queue, generation, error))

    def _fail_queue(self, queue: int, generation: int, error: BaseException) -> None:
        if generation != self._generation or self.closed:
            return
        if isinstance(error, RingBroken):
            self.fail(f"queue {queue}: {error}", errno.EPROTO)
        else:
            self.fail(f"internal error on queue {queue}: {error}")


def _unattached_notify() -> None:  # every ring gets its own channel's notify
    pass


def create_vbds(domain, disks: Iterable, **options) -> list[VbdDevice]:
    """One started VbdDevice per DiskSpec (path, vdev, readonly) of a
    XenDomain; on an error the ones already made are closed again."""
    devices: list[VbdDevice] = []
    options.setdefault("max_queues", max(1, min(MAX_QUEUES, domain.vcpu_count)))
    try:
        for disk in disks:
            device = VbdDevice.open(
                domain.store, domain.domid, disk.path, domain.gnttab, domain.evtchn,
                domain.loop.call_soon_threadsafe,  # worker threads hand failures over
                vdev=disk.vdev, readonly=disk.readonly, **options)
            devices.append(device)
            device.start()
            log.info("disk %s: %s (%d sectors, %s)", disk.vdev, disk.path, device.image.sectors,
                     "read-only" if disk.readonly else "read-write")
    except BaseException:
        for device in devices:
            device.close()
        raise
    return devices
