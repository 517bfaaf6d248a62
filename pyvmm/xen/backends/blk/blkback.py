"""The block backend: one virtual block device (vbd) served over blkif rings.

This is the device model only. Someone else runs the xenbus handshake: it
opens the image (DiskImage), publishes `BlockBackend.xenbus_keys()`, maps
the frontend's ring-ref pages, binds the event channel, then calls
`attach_ring(pages, protocol)` and `process()` whenever the frontend
notifies (and again while `work_pending`).

Data moves with os.preadv/os.pwritev straight between the image file and
the granted guest pages: each segment becomes one iovec over the mapped
page, nothing is copied through Python objects. Grants are mapped for
each request and released before its response is written: writable for a
READ (the disk writes guest memory), read-only for anything that writes
the disk.

Durability. A response is written only after the whole transfer returned
(short transfers are resumed), so an acknowledged write is in the file,
i.e. in the host's page cache: it survives the VMM exiting or crashing,
not a host power loss. That is what a disk with a volatile write cache
promises too; for the rest the backend offers:

- FLUSH_DISKCACHE: fdatasync before answering. Linux's blkfront sends it
  for a cache flush and, carrying data, for a FUA write: the data is
  written first, then flushed.
- WRITE_BARRIER: fdatasync, then the write (if it carries data), then
  fdatasync: everything before it is stable before it is done, and it is
  stable before anything after it starts. Requests are carried out one at
  a time, in ring order, so ordering holds by construction.

DISCARD punches a hole (fallocate PUNCH_HOLE|KEEP_SIZE): later reads of the
range return zeros and the file gives the space back. Whether the image's
file system can do that is probed when the backend is built (punching
beyond the end of the file, which touches no data); when it cannot (an
old or FUSE file system, NFSv3, ...), feature-discard is not advertised.
If a discard still fails with EOPNOTSUPP, it is answered
BLKIF_RSP_EOPNOTSUPP (Linux's blkfront then stops sending discards) and so
is every later one. Secure discards (BLKIF_DISCARD_SECURE) are refused with
EOPNOTSUPP: a punched hole does not make the old blocks unrecoverable, so
discard-secure is never advertised.

A hostile frontend. Whatever a request says, the worst outcome is an error
response for that request: a grant that is not the guest's to give, a
sector range beyond the disk, too many segments, bad segment sectors, a
write to a read-only disk, an unknown operation. The ring indices are the
exception: a producer more than a ring ahead raises RingBroken out of
process(), and the caller must disconnect the device. Requests are copied
off the ring (and indirect segment pages out of their grants) before being
looked at, so changing them under the backend's feet achieves nothing.

Persistent grants (feature-persistent). Mapping a grant means a locked
compare-exchange on the guest's grant entry, and undoing it another: per
4 KiB segment that is most of the backend's work. A frontend that agrees
(its own feature-persistent) keeps granting the same pages, so the first
use of each gref maps it writable and the mapping is kept until the ring
is detached; later uses cost a dictionary lookup. Up to
`max_persistent_grants` per queue (Linux's blkback's default); beyond
that, or for a grant that cannot be mapped writable, segments are mapped
per request as without the feature.

Threads: process(queue) may run on one thread per queue (vbd.py gives
each queue a RingWorker); a queue's ring, grant cache and counters are
only touched by the thread serving it. The grant table has its own lock.
attach_ring and detach_ring must not race with process() on that queue.
The I/O is synchronous: a slow image stalls only the queue's thread.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

from pyvmm.core.faults import NULL_FAULTS, FaultInjector
from pyvmm.core.kept import KEPT
from pyvmm.core.trace import NULL_TRACE, Tracer
from . import blkif
from .blkif import (
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    MAX_INDIRECT_SEGMENTS,
    SECTOR_SHIFT,
    SECTORS_PER_PAGE,
    SEGMENT_SIZE,
    VDISK_READONLY,
    BlkifAbi,
    BlkRequest,
)
from pyvmm.xen.hv.gnttab import GrantError, GrantMapping, GrantTable
from pyvmm.xen.backend.ring import BackRing, RingBroken
from pyvmm.core.ratelimit import DEFAULT_LOG_RATE, LogRate

log = logging.getLogger(__name__)

__all__ = [
    "BlockBackend",
    "DiskImage",
    "RingBroken",
    "punch_hole",
    "xenbus_backend_keys",
]

DEFAULT_MAX_INDIRECT_SEGMENTS = 256  # Linux's blkback offers the same
DEFAULT_MAX_RING_PAGE_ORDER = 4  # 16 pages: 512 requests in flight
DEFAULT_BATCH = 32  # requests between two pushes of responses
DEFAULT_BUDGET = 1024  # requests per process() call
DEFAULT_MAX_PERSISTENT_GRANTS = 1056  # per queue, as Linux's blkback (max_persistent_grants)
MAX_RING_PAGE_ORDER = 9  # what Linux's frontend would ever ask (XENBUS_MAX_RING_GRANT_ORDER)

try:
    IOV_MAX = os.sysconf("SC_IOV_MAX")
except (ValueError, OSError):  # pragma: no cover
    IOV_MAX = 1024
if IOV_MAX <= 0:  # pragma: no cover
    IOV_MAX = 1024

_NO_GRANTS: dict[int, GrantMapping] = {}  # the grant cache of a queue without persistent grants

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.ENOTTY)

_libc = ctypes.CDLL(None, use_errno=True)  # the C library already loaded (find_library would run ldconfig)
_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate [offset, offset+length) of `fd`, keeping its size; raises
    OSError (EOPNOTSUPP when the file system cannot)."""
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


class DiskImage:
    """An open disk image: a regular file or a block device.

    `sectors` counts 512-byte sectors (what blkif's "sectors" key and its
    requests use, whatever the logical `sector_size`); a file whose size
    is not a multiple of `sector_size` has its tail ignored.
    """

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False, sector_size: int = 512,
                 physical_sector_size: int | None = None):
        if sector_size not in (512, 4096):
            raise ValueError(f"sector size {sector_size} is neither 512 nor 4096")
        physical_sector_size = physical_sector_size or sector_size
        if physical_sector_size % sector_size or physical_sector_size & (physical_sector_size - 1):
            raise ValueError(f"physical sector size {physical_sector_size} is not a power-of-two "
                             f"multiple of {sector_size}")
        self.fd = -1
        self.path = os.fspath(path)
        self.readonly = readonly
        self.sector_size = sector_size
        self.physical_sector_size = physical_sector_size
        # Kept across reboots under the sandbox (pyvmm/core/kept.py); pread/pwrite need no offset.
        self.fd = KEPT.open(self.path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        try:
            info = os.fstat(self.fd)
            self.is_block_device = stat.S_ISBLK(info.st_mode)
            if self.is_block_device:
                self.file_size = os.lseek(self.fd, 0, os.SEEK_END)
            elif stat.S_ISREG(info.st_mode):
                self.file_size = info.st_size
            else:
                raise ValueError(f"{self.path} is neither a regular file nor a block device")
            usable = self.file_size - self.file_size % sector_size
            if usable == 0:
                raise ValueError(f"{self.path} is smaller than one {sector_size}-byte sector")
        except BaseException:
            os.close(self.fd)
            raise
        self.size = usable
        self.sectors = usable >> SECTOR_SHIFT

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "DiskImage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "ro" if self.readonly else "rw"
        return f"DiskImage({self.path!r}, {mode}, {self.sectors} sectors, {self.sector_size}-byte blocks)"


def _probe_punch_hole(image: DiskImage) -> bool:
    if image.readonly:
        return False
    if image.is_block_device:
        return True  # Linux >= 4.9 punches holes in block devices; EOPNOTSUPP is handled anyway
    try:
        # Past the end of the file, so no data is touched.
        punch_hole(image.fd, image.file_size, 4096)
    except OSError as error:
        log.info("%s: no discard (%s)", image.path, os.strerror(error.errno or 0))
        return False
    return True


def xenbus_backend_keys(image: DiskImage, *, flush: bool = True, barrier: bool = True, discard: bool = False,
                        discard_granularity: int | None = None, max_indirect_segments: int = 0,
                        max_ring_page_order: int = 0, max_queues: int = 1, persistent: bool = False) -> dict[str, str]:
    """The keys a block backend writes into its xenstore directory.

    Feature and transport keys (everything but sectors/info/sector-size/
    physical-sector-size) belong there before the backend enters InitWait;
    the device properties by Connected at the latest. Writing them all
    before InitWait is also correct.
    """
    writable = not image.readonly
    keys = {
        "sectors": str(image.sectors),
        "info": str(VDISK_READONLY if image.readonly else 0),
        "sector-size": str(image.sector_size),
        "physical-sector-size": str(image.physical_sector_size),
        "feature-flush-cache": "1" if flush and writable else "0",
        "feature-barrier": "1" if barrier and writable else "0",
        "feature-discard": "1" if discard and writable else "0",
        "max-ring-page-order": str(max_ring_page_order),
        "multi-queue-max-queues": str(max_queues),
        "feature-persistent": "1" if persistent else "0",
    }
    if discard and writable:
        keys["discard-granularity"] = str(discard_granularity or max(image.sector_size, 4096))
        keys["discard-alignment"] = "0"
        keys["discard-secure"] = "0"
    if max_indirect_segments:
        # Absent, not "0", when indirect requests are not offered (blkif.h).
        keys["feature-max-indirect-segments"] = str(max_indirect_segments)
    return keys


@dataclass
class _Queue:
    ring: BackRing
    abi: BlkifAbi
    notify: Callable[[], None]
    # Persistent grants (feature-persistent): gref -> writable mapping held
    # until the ring is detached; None when the frontend does not reuse grants.
    persistent: dict[int, GrantMapping] | None = None
    work_pending: bool = False
    requests: int = 0
    errors: int = 0
    # Responses an injected delay held back, for the serving thread to publish.
    late: deque = field(default_factory=deque)

    def release_persistent(self) -> None:
        if self.persistent:
            for mapping in self.persistent.values():
                mapping.release()
            self.persistent.clear()


class BlockBackend:
    """One vbd: an image, the guest's grant table, one or more rings.

    `notify` raises the ring's event channel in the guest (e.g. a
    BackendChannel's notify). With several queues each ring may have its
    own (attach_ring's `notify`).
    """

    def __init__(self, image: DiskImage, grants: GrantTable, notify: Callable[[], None], *,
                 max_indirect_segments: int = DEFAULT_MAX_INDIRECT_SEGMENTS,
                 max_ring_page_order: int = DEFAULT_MAX_RING_PAGE_ORDER,
                 max_queues: int = 1, flush: bool = True, discard: bool | None = None,
                 batch: int = DEFAULT_BATCH, budget: int = DEFAULT_BUDGET,
                 max_persistent_grants: int = DEFAULT_MAX_PERSISTENT_GRANTS, log_rate: LogRate = DEFAULT_LOG_RATE,
                 trace: Tracer = NULL_TRACE, faults: FaultInjector = NULL_FAULTS):
        if not 0 <= max_indirect_segments <= MAX_INDIRECT_SEGMENTS:
            raise ValueError(f"max_indirect_segments {max_indirect_segments} is not in 0..{MAX_INDIRECT_SEGMENTS}")
        if 0 < max_indirect_segments <= blkif.BLKIF_MAX_SEGMENTS_PER_REQUEST:
            raise ValueError("indirect requests must allow more than 11 segments")
        if not 0 <= max_ring_page_order <= MAX_RING_PAGE_ORDER:
            raise ValueError(f"max_ring_page_order {max_ring_page_order} is not in 0..{MAX_RING_PAGE_ORDER}")
        if max_queues < 1 or batch < 1 or budget < 1:
            raise ValueError("max_queues, batch and budget must be positive")
        if max_persistent_grants < 0:
            raise ValueError("max_persistent_grants must not be negative")
        self.image = image
        self.grants = grants
        self.notify = notify
        self._trace, self._faults = trace, faults  # the VM's
        self._limited = log_rate.limited(log)  # lines whose rate the guest sets
        self.max_indirect_segments = max_indirect_segments
        self.max_ring_page_order = max_ring_page_order
        self.max_queues = max_queues
        self.batch = batch
        self.budget = budget
        self.max_persistent_grants = max_persistent_grants  # 0: feature-persistent not offered
        writable = not image.readonly
        self.feature_flush = flush and writable
        self.feature_barrier = flush and writable
        if discard is None:
            discard = _probe_punch_hole(image)
        self.feature_discard = bool(discard) and writable
        self.discard_granularity = max(image.sector_size, 4096)
        self._discard_works = self.feature_discard
        self._queues: dict[int, _Queue] = {}
        self._block = image.sector_size >> SECTOR_SHIFT  # 512-byte sectors per logical block
        self.label = os.path.basename(image.path)  # names the disk in traces and fault rules (vbd: its vdev)
        # Set by whoever runs process() on threads: wake(queue) makes queue's thread serve it soon.
        self.wake: Callable[[int], None] | None = None
        # Counters of detached queues, for tests and diagnostics.
        self._retired_requests = 0
        self._retired_errors = 0

    @property
    def requests(self) -> int:
        """Requests served so far, over every queue."""
        return self._retired_requests + sum(q.requests for q in list(self._queues.values()))

    @property
    def errors(self) -> int:
        """Requests answered with an error so far."""
        return self._retired_errors + sum(q.errors for q in list(self._queues.values()))

    # --- wiring ---------------------------------------------------------------------

    def xenbus_keys(self) -> dict[str, str]:
        """What to advertise: exactly what this backend implements."""
        return xenbus_backend_keys(
            self.image, flush=self.feature_flush, barrier=self.feature_barrier, discard=self.feature_discard,
            discard_granularity=self.discard_granularity, max_indirect_segments=self.max_indirect_segments,
            max_ring_page_order=self.max_ring_page_order, max_queues=self.max_queues,
            persistent=self.max_persistent_grants > 0)

    def attach_ring(self, pages: Sequence[memoryview] | memoryview, protocol: str | None, *, queue: int = 0,
                    notify: Callable[[], None] | None = None, persistent: bool = False) -> None:
        """Serve the ring in `pages` (the mapped ring-ref0..N, in order);
        `persistent`: the frontend said feature-persistent (ignored unless
        offered).

        Raises BlkifError for an unknown protocol, ValueError for a ring the
        backend did not offer, RingBroken for a ring already inconsistent.
        """
        abi = blkif.abi_for_protocol(protocol)
        count = len(pages) // 4096 if isinstance(pages, memoryview) else len(pages)
        if count < 1 or count & (count - 1) or count > 1 << self.max_ring_page_order:
            raise ValueError(f"a ring of {count} pages; offered powers of two up to {1 << self.max_ring_page_order}")
        if not 0 <= queue < self.max_queues:
            raise ValueError(f"queue {queue} is not below {self.max_queues}")
        if queue in self._queues:
            raise ValueError(f"queue {queue} already has a ring")
        cache = {} if persistent and self.max_persistent_grants else None
        self._queues[queue] = _Queue(BackRing(pages, abi.entry_size), abi, notify or self.notify, cache)

    def detach_ring(self, queue: int | None = None) -> None:
        """Forget one queue's ring (all when None) and give back its
        persistent grants; the caller unmaps the ring pages."""
        for number in list(self._queues) if queue is None else [queue]:
            q = self._queues.pop(number, None)
            if q is not None:
                q.release_persistent()
                self._retired_requests += q.requests
                self._retired_errors += q.errors

    def persistent_grants(self, queue: int = 0) -> int:
        """How many grants `queue` holds mapped for reuse."""
        q = self._queues.get(queue)
        return len(q.persistent) if q and q.persistent else 0

    def drained(self, queue: int) -> bool:
        """No request of `queue` is in flight: each one taken off the ring is
        answered and published, none waits for an injected delay (a snapshot
        saves only a drained ring; the caller has stopped its thread)."""
        q = self._queues.get(queue)
        return q is None or (not q.late and not q.ring.requests_unanswered and not q.ring.responses_pending)

    def persistent_refs(self, queue: int) -> list[int]:
        """The grefs `queue` keeps mapped for reuse (feature-persistent)."""
        q = self._queues.get(queue)
        return sorted(q.persistent) if q and q.persistent else []

    def adopt_persistent(self, queue: int, refs: Sequence[int]) -> None:
        """Map these grefs for reuse again (a restore); one that cannot be
        mapped now is mapped per request instead, as beyond the cache's size."""
        q = self._queues[queue]
        if q.persistent is None:
            return
        for ref in list(refs)[: self.max_persistent_grants]:
            try:
                q.persistent[ref] = self.grants.map(ref, writable=True)
            except GrantError:
                pass

    @property
    def connected(self) -> bool:
        return bool(self._queues)

    def ring(self, queue: int = 0) -> BackRing:
        return self._queues[queue].ring

    def work_pending(self, queue: int = 0) -> bool:
        """process() stopped at its budget with requests waiting: call again."""
        q = self._queues.get(queue)
        return bool(q and q.work_pending)

    # --- the request loop -----------------------------------------------------------

    def process(self, queue: int = 0) -> int:
        """Serve the requests waiting on `queue`'s ring; returns how many.

        Requests are taken in batches; each batch's responses are published
        together and the guest is notified at most once per call, and only if
        it asked (rsp_event). Stops after `budget` requests with
        work_pending(queue) set; otherwise re-arms req_event so that the next
        request notifies. Raises RingBroken: disconnect the device.
        """
        q = self._queues.get(queue)
        if q is None:
            return 0
        if q.late:
            self._publish_late(q)
        if self._faults.blk and self._faults.blk_stalled(self.label):
            return 0
        ring = q.ring
        handled = 0
        notify = False
        try:
            while True:
                if handled >= self.budget:
                    q.work_pending = True
                    break
                wanted = min(self.batch, self.budget - handled)
                batch = ring.take_requests(wanted)
                for raw in batch:
                    response = self._serve(raw, q)
                    if response is not None:  # None: an injected fault answers later or never
                        ring.put_response(response)
                handled += len(batch)
                notify |= ring.push_responses()
                if len(batch) < wanted and not ring.final_check_for_requests():
                    q.work_pending = False  # the ring was empty: the next request notifies
                    break
        finally:
            # After a RingBroken, what was answered is still published.
            notify |= ring.push_responses()
            if notify:
                q.notify()
        return handled

    def _serve(self, raw: bytes, q: _Queue) -> bytes | None:
        """Carry out one request; its response, or None when an injected
        fault answers later or never."""
        q.requests += 1
        request = blkif.parse_request(raw, q.abi, max_indirect_segments=self.max_indirect_segments)
        if self._trace.blk or self._faults.blk:
            return self._serve_watched(request, q)
        return blkif.pack_response(q.abi, request.id, request.operation, self._carry_out(request, q))

    def _carry_out(self, request: BlkRequest, q: _Queue) -> int:
        """The request's status: what parsing found wrong, else what doing
        it gave; an error is counted."""
        status = request.status
        if status is None:
            try:
                status = self._execute(request, q)
            except GrantError as error:
                request.reason = f"grant: {error}"
                status = BLKIF_RSP_ERROR
            except OSError as error:
                self._limited.warning("%s: %s of sector %d failed: %s", self.image.path,
                                      blkif.OP_NAMES.get(request.operation, request.operation), request.sector, error)
                request.reason = f"I/O: {error}"
                status = BLKIF_RSP_ERROR
        if status != BLKIF_RSP_OKAY:
            q.errors += 1
            log.debug("%s: request %#x (op %d) answered %d: %s", self.image.path, request.id,
                      request.operation, status, request.reason)
        return status

    def _serve_watched(self, request: BlkRequest, q: _Queue) -> bytes | None:
        """_serve while tracing or fault rules are on: the same, plus the
        trace records and what a matching fault rule says."""
        if self._trace.blk:
            self._trace_request(request)
        fault = None
        if request.status is None and self._faults.blk:
            fault = self._faults.blk_request(self.label, blkif.OP_NAMES.get(request.operation, "?"), request.sector,
                                       request.nr_sectors or request.data_sectors or request.nr_segments * 8)
            if fault is not None and fault.action in ("error", "eopnotsupp"):
                request.fail(BLKIF_RSP_ERROR if fault.action == "error" else BLKIF_RSP_EOPNOTSUPP,
                             f"injected fault {fault.id}: {fault.spec}")
        status = self._carry_out(request, q)
        if self._trace.blk:
            self._trace.emit("blk", "response", disk=self.label, id=request.id,
                       op=blkif.OP_NAMES.get(request.operation, request.operation), status=status,
                       reason=request.reason or None, fault=fault.spec if fault else None)
        response = blkif.pack_response(q.abi, request.id, request.operation, status)
        if fault is not None and fault.action == "delay":
            self._answer_later(q, response, fault.delay)
            return None
        return None if fault is not None and fault.action == "drop" else response

    def _trace_request(self, request: BlkRequest) -> None:
        self._trace.emit("blk", "request", disk=self.label, id=request.id,
                   op=blkif.OP_NAMES.get(request.operation, request.operation), sector=request.sector,
                   sectors=request.nr_sectors or request.data_sectors, segments=request.nr_segments,
                   bytes=request.data_sectors << SECTOR_SHIFT, indirect=request.indirect)

    def _answer_later(self, q: _Queue, response: bytes, delay: float) -> None:
        """An injected delay: publish `response` after `delay` seconds, if
        the ring is still attached then. The ring is only written by the
        thread serving it: the answer is queued for that thread (woken
        through `wake`), or published at once where process() has no
        thread of its own."""
        def answer() -> None:
            queue = next((number for number, candidate in self._queues.items() if candidate is q), None)
            if queue is None:
                return  # detached meanwhile
            q.late.append(response)
            if self.wake is not None:
                self.wake(queue)
            else:
                self._publish_late(q)

        self._faults.call_later(delay, answer)

    def _publish_late(self, q: _Queue) -> None:
        while q.late:
            q.ring.put_response(q.late.popleft())
        if q.ring.push_responses():
            q.notify()

    def _execute(self, request: BlkRequest, q: _Queue) -> int:
        op = request.operation
        if op == BLKIF_OP_DISCARD:
            return self._discard(request)
        if (op == BLKIF_OP_FLUSH_DISKCACHE and not self.feature_flush) \
                or (op == BLKIF_OP_WRITE_BARRIER and not self.feature_barrier):
            request.reason = f"{blkif.OP_NAMES[op]} is not offered"
            return BLKIF_RSP_EOPNOTSUPP
        if request.indirect:
            self._read_indirect_segments(request, q)
            if request.status is not None:
                return request.status
        writes = op != BLKIF_OP_READ and bool(request.segments)
        if writes and self.image.readonly:
            request.reason = "write to a read-only disk"
            return BLKIF_RSP_ERROR
        if request.segments:
            count = request.data_sectors
            if not self._in_range(request, request.sector, count):
                return BLKIF_RSP_ERROR
        if op == BLKIF_OP_WRITE_BARRIER:
            os.fdatasync(self.image.fd)
        if request.segments:
            self._transfer(request, writes, q, count << SECTOR_SHIFT)
        if op in (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER):
            os.fdatasync(self.image.fd)
        return BLKIF_RSP_OKAY

    def _in_range(self, request: BlkRequest, sector: int, count: int) -> bool:
        if sector + count > self.image.sectors:
            request.reason = f"sectors {sector}+{count} are beyond the disk's {self.image.sectors}"
            return False
        if sector % self._block or count % self._block:
            request.reason = f"sectors {sector}+{count} are not whole {self.image.sector_size}-byte blocks"
            return False
        return True

    def _read_indirect_segments(self, request: BlkRequest, q: _Queue) -> None:
        needed = request.nr_segments * SEGMENT_SIZE
        pages = []
        transient: list[GrantMapping] = []
        try:
            for gref in request.indirect_grefs:
                size = min(needed, 4096)
                mapping = self._map(q, gref, False, transient)
                pages.append(bytes(mapping.view[:size]))  # a private copy: the guest may change the page
                needed -= size
        finally:
            for mapping in transient:
                mapping.release()
        blkif.parse_indirect_segments(request, pages)

    def _map(self, q: _Queue, gref: int, writable: bool, transient: list[GrantMapping]) -> GrantMapping:
        """The mapping of `gref`: a persistent one when the queue keeps them
        (made on first use while there is room), else a new one that the
        caller releases (appended to `transient`)."""
        cache = q.persistent
        if cache is not None:
            mapping = cache.get(gref)
            if mapping is not None:
                return mapping
            if len(cache) < self.max_persistent_grants:
                try:
                    mapping = cache[gref] = self.grants.map(gref, writable=True)
                    return mapping
                except GrantError:
                    pass  # e.g. a read-only grant: map it for this request only
        mapping = self.grants.map(gref, writable=writable)
        transient.append(mapping)
        return mapping

    def _transfer(self, request: BlkRequest, writes: bool, q: _Queue, total: int) -> None:
        """Move the `total` bytes between the granted pages and the image.

        The hot loop of the backend: a persistent grant costs one dict
        lookup, and a whole-page segment uses the mapping's own view."""
        cache = q.persistent
        if cache and request.whole_pages:
            try:  # the common case with persistent grants: every page already mapped
                buffers = [cache[gref].view for gref, _, _ in request.segments]
            except KeyError:
                pass
            else:
                self._move(buffers, writes, request.sector, total)
                return
        mappings: list[GrantMapping] = []
        buffers: list[memoryview] = []
        slices: list[memoryview] = []  # views made here, released after the transfer
        cache = q.persistent if q.persistent is not None else _NO_GRANTS
        try:
            for gref, first, last in request.segments:
                mapping = cache.get(gref)
                if mapping is None:
                    # The disk writes guest memory for a read: map writable then.
                    mapping = self._map(q, gref, not writes, mappings)
                if first == 0 and last == SECTORS_PER_PAGE - 1:
                    buffers.append(mapping.view)
                else:
                    piece = mapping.view[first << SECTOR_SHIFT : (last + 1) << SECTOR_SHIFT]
                    buffers.append(piece)
                    slices.append(piece)
            self._move(buffers, writes, request.sector, total)
        finally:
            for piece in slices:
                piece.release()
            for mapping in mappings:
                mapping.release()

    def _move(self, buffers: list[memoryview], writes: bool, sector: int, total: int) -> None:
        if writes:
            _transfer_all(os.pwritev, self.image.fd, buffers, sector << SECTOR_SHIFT, total,
                          "the image accepted no data")
        else:
            _transfer_all(os.preadv, self.image.fd, buffers, sector << SECTOR_SHIFT, total,
                          "the image ended before the disk did")

    def _discard(self, request: BlkRequest) -> int:
        if not self._discard_works:
            request.reason = "discard is not offered" if not self.feature_discard else "discard stopped working"
            return BLKIF_RSP_EOPNOTSUPP
        if request.secure:
            request.reason = "secure discard is not offered"
            return BLKIF_RSP_EOPNOTSUPP
        if not self._in_range(request, request.sector, request.nr_sectors):
            return BLKIF_RSP_ERROR
        if request.nr_sectors == 0:
            return BLKIF_RSP_OKAY
        try:
            punch_hole(self.image.fd, request.sector << SECTOR_SHIFT, request.nr_sectors << SECTOR_SHIFT)
        except OSError as error:
            if error.errno not in _UNSUPPORTED:
                raise
            log.warning("%s: the file system cannot punch holes; discard disabled", self.image.path)
            self._discard_works = False
            request.reason = "the image's file system cannot punch holes"
            return BLKIF_RSP_EOPNOTSUPP
        return BLKIF_RSP_OKAY


def _remaining(buffers: list[memoryview], done: int) -> list[memoryview]:
    """The buffers still to transfer after the first `done` bytes."""
    for index, buffer in enumerate(buffers):
        if done < len(buffer):
            return [buffer[done:]] + buffers[index + 1 :] if done else buffers[index:]
        done -= len(buffer)
    return []


def _transfer_all(syscall, fd: int, buffers: list[memoryview], position: int, total: int, stalled: str) -> None:
    """os.preadv/os.pwritev until every buffer (`total` bytes) is done;
    short transfers resume where they stopped."""
    pending = buffers
    while True:
        count = syscall(fd, pending if len(pending) <= IOV_MAX else pending[:IOV_MAX], position)
        if count == total:
            return  # usually at the first call
        if count == 0:
            raise OSError(errno.EIO, stalled)
        total -= count
        position += count
        pending = _remaining(pending, count)

