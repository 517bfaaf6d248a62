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
from pyvmm.core.snapshot import SavesNoStateYet

if TYPE_CHECKING:
    from pyvmm.xen.hv.evtchn import EventChannels

log = logging.getLogger(__name__)

XENVBD_MAJOR = 202
EXTENDED_VDEV = 1 << 28
MAX_QUEUES = 4  # Linux's blkfront asks for at most min(4, CPUs)

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


class VbdDevice(XenbusBackendDevice, SavesNoStateYet):  # until its save_state() is written (core/snapshot.py)
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
        self._generation += 1
        generation = self._generation
        ports = []
        for queue in range(queues):
            prefix = f"queue-{queue}/" if queues > 1 else ""
            if single:
                refs = [self.read_frontend_uint(f"{prefix}ring-ref")]
            else:
                refs = [self.read_frontend_uint(f"{prefix}ring-ref{i}") for i in range(1 << order)]
            port = self.read_frontend_uint(f"{prefix}event-channel")
            pages = [self.map_ring_page(f"{prefix}ring-ref", ref) for ref in refs]
            channel = self.bind_channel(f"{prefix}event-channel", port, partial(self._notified, queue, generation),
                                        own_eventfd=True)
            try:
                backend.attach_ring(pages, protocol, queue=queue, notify=channel.notify, persistent=persistent)
            except (ValueError, RingBroken) as error:  # BlkifError is a ValueError
                raise FrontendError(f"ring of queue {queue}: {error}") from None
            self._workers.append(RingWorker(
                f"{self.vdev}-q{queue}", partial(self._serve, queue),
                partial(self._worker_failed, queue, generation), eventfd=channel.eventfd,
                accept=channel.guest_sent))
            ports.append(port)
        for worker in self._workers:
            worker.start()
        self.queues, self.ring_pages = queues, 1 if single else 1 << order
        self._limited.info("%s (%s, %s): connected, %d queue(s) of %d ring page(s), protocol %s, event channel(s) %s%s",
                      self.vdev, self.image.path, "ro" if self.image.readonly else "rw", queues, self.ring_pages,
                      protocol or "native", ", ".join(map(str, ports)), ", persistent grants" if persistent else "")

    def disconnect(self) -> None:
        self._generation += 1
        workers, self._workers = self._workers, []
        for worker in workers:  # first: nothing may touch a ring being taken away
            worker.stop()
        self.backend.detach_ring()
        self.release_connection()
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
