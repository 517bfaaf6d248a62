"""Fuzz targets for the guest-facing surfaces, run by scripts/fuzz and, briefly,
by tests/unit/test_fuzz_targets.py.

Each target takes one input (bytes), builds a fresh device against the fake
frontend its unit tests use (tests/frontends), and plays the input as up to MAX_ROUNDS rounds
of hostile guest actions (ring contents, index scribbles, grant entries,
xenstore keys, hypercall arguments) interleaved with the VMM's processing.
After every round it checks its invariants and raises InvariantBroken if
one fails. Exceptions a surface documents (RingBroken: disconnect the
device) are expected; any other exception is a finding.

The round count bounds each input's work, so a hang shows as an input that
never ends rather than as a timeout.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import socket
import struct
import tempfile
from pathlib import Path
from types import SimpleNamespace

from frontends.blkfront import PROTOCOLS, Blkfront
from frontends.common import SharedPage
from frontends.netfront import Netfront
from frontends.xenbus import Domain
from pyvmm.xen.backends.blk import blkif
from pyvmm.xen.hv import gnttab
from pyvmm.xen.backend.ring import REQ_PROD, RingBroken
from pyvmm.xen.xenstore import Quotas, RingServer, XenStore, XenStoreError, create_domain_nodes
from pyvmm.xen.xenstore import ring as xsring
from pyvmm.xen.xenstore.store import MEMORY_OVERSHOOT
from pyvmm.xen.xenstore.protocol import EVENT_BACKLOG_BYTES, HEADER_SIZE, INPUT_PAUSE_BYTES, PAYLOAD_MAX

MAX_ROUNDS = 48
PAGE = 4096
_UNIT = Path(__file__).parent / "unit"


class InvariantBroken(AssertionError):
    pass


def check(condition: bool, what: str) -> None:
    if not condition:
        raise InvariantBroken(what)


def _fake_module(relative: str):
    """A unit test module, for its fakes (loaded once, under its own name)."""
    name = "fuzz_fakes_" + Path(relative).stem
    spec = importlib.util.spec_from_file_location(name, _UNIT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_fakes: dict[str, object] = {}


def fakes(relative: str):
    if relative not in _fakes:
        _fakes[relative] = _fake_module(relative)
    return _fakes[relative]


class Input:
    """Reads an input as a sequence of choices; past its end everything is 0."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, count: int) -> bytes:
        chunk = self.data[self.pos:self.pos + count]
        self.pos += len(chunk)
        return chunk

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size).ljust(size, b"\0"), "little")

    def u8(self) -> int:
        return self.uint(1)

    def u16(self) -> int:
        return self.uint(2)

    def u32(self) -> int:
        return self.uint(4)

    def below(self, count: int) -> int:
        return self.uint(1 if count <= 256 else 2) % count

    def pick(self, choices):
        return choices[self.below(len(choices))]

    def blob(self, maximum: int) -> bytes:
        return self.take(self.below(maximum + 1))


def rounds(data: Input):
    count = 0
    while data.left and count < MAX_ROUNDS:
        yield data.u8()
        count += 1


# --- the xenstore ring ------------------------------------------------------

_XS_PATHS = ["data/x", "device", "device/vbd/51712/state", "control/shutdown", "/local/domain/1/data",
             "/local/domain/0", "/", "@introduceDomain", "@releaseDomain", "domid", "a/b/c/d", "data",
             "/local/domain/1/" + "p" * 200, "", "bad//path", "x" * 300]
_XS_MEMORY = Quotas().memory
_XS_SLACK = MEMORY_OVERSHOOT


class XenstoreRing(SharedPage):
    """RingServer + Connection + XenStore, as a guest's ring sees them."""

    def __init__(self) -> None:
        super().__init__(memoryview(bytearray(PAGE)))
        self.now = 0.0
        self.store = XenStore(clock=lambda: self.now)
        create_domain_nodes(self.store, 1, "guest", 1, 2, 3, 4)
        self.dom0 = self.store.client(0)
        self.conn = self.store.connect(1)
        self.server = RingServer(self.page, self.conn)
        self.req_prod = 0
        self.rsp_cons = 0

    def put(self, data: bytes) -> None:
        # As a guest does: into the free part of the request ring, then the
        # index (its own copy: the page's may have been scribbled over).
        count = self.ring_put(xsring.REQ_OFFSET, xsring.RING_SIZE, self.req_prod, self.u32(xsring.REQ_CONS), data)
        self.req_prod = (self.req_prod + count) & 0xFFFFFFFF
        self.set_u32(xsring.REQ_PROD, self.req_prod)

    def message(self, data: Input) -> bytes:
        op = data.below(24)
        tx = data.pick([0, 0, 1, 2, data.u32()])
        path = data.pick(_XS_PATHS).encode()
        kind = data.below(4)
        if kind == 0:
            payload = path + b"\0"
        elif kind == 1:
            payload = path + b"\0" + data.blob(64) + b"\0"
        elif kind == 2:
            payload = path + b"\0" + b"x" * data.below(2100)
        else:
            payload = data.blob(80)
        return struct.pack("<IIII", op, data.u32(), tx, len(payload)) + payload

    def round(self, choice: int, data: Input) -> None:
        action = choice % 8
        if action == 0:
            self.put(data.blob(300))
        elif action in (1, 2):
            self.put(self.message(data))
        elif action == 3:
            self.set_u32(data.pick([xsring.REQ_CONS, xsring.REQ_PROD, xsring.RSP_CONS, xsring.RSP_PROD,
                                    xsring.CONNECTION, xsring.ERROR, xsring.SERVER_FEATURES]), data.u32())
        elif action == 4:  # the guest reads what was published
            self.rsp_cons = self.u32(xsring.RSP_PROD)
            self.set_u32(xsring.RSP_CONS, self.rsp_cons)
        elif action == 5:  # dom0 changes something the guest may watch
            with contextlib.suppress(XenStoreError):
                self.dom0.write(f"/local/domain/1/data/d{data.below(8)}", data.blob(16))
        elif action == 6:  # time passes: open transactions expire
            self.now += data.below(100)
            self.store.expire_transactions()
        self.server.process()

    def invariants(self) -> None:
        store, conn = self.store, self.conn
        check(store.check() == [], f"store inconsistent: {store.check()[:3]}")
        check(store.memory_of(1) <= _XS_MEMORY + _XS_SLACK, f"domain 1 holds {store.memory_of(1)} bytes")
        check(conn.pending_output() <= INPUT_PAUSE_BYTES + EVENT_BACKLOG_BYTES + HEADER_SIZE + PAYLOAD_MAX,
              f"{conn.pending_output()} bytes of output queued")
        check(len(store._clients) == 2, "clients leaked")


def xenstore_ring(raw: bytes) -> None:
    data = Input(raw)
    target = XenstoreRing()
    for choice in rounds(data):
        target.round(choice, data)
        target.invariants()


# --- blkback ------------------------------------------------------------------

_BLK_DIR = tempfile.TemporaryDirectory(prefix="pyvmm-fuzz-")
_BLK_SECTORS = 64


def _scribble_grant(target, data: Input, **domid) -> None:
    """Rewrite one of the first grant entries: the ring's, the data pages' or unused ones."""
    ref = gnttab.GNTTAB_NR_RESERVED_ENTRIES + data.below(24)
    flags = data.pick([gnttab.GTF_permit_access, gnttab.GTF_permit_access | gnttab.GTF_readonly, data.u16(), 0])
    gfn = data.pick([32 + data.below(16), data.u32(), 2])
    target.set_entry(ref, gfn, flags=flags, **domid)


def blkback(raw: bytes) -> None:
    data = Input(raw)
    protocol = data.pick(PROTOCOLS)
    guest = Blkfront(Path(_BLK_DIR.name), protocol, sectors=_BLK_SECTORS,
                         persistent=bool(data.u8() & 1), image_bytes=bytes(_BLK_SECTORS * 512))
    for _ in range(8):
        guest.page(bytes(PAGE))
    front, entry = guest.front, guest.abi.entry_size
    broken = False
    try:
        for choice in rounds(data):
            action = choice % 6
            if action == 0:  # a request of arbitrary bytes
                front.put_request(data.take(entry).ljust(entry, b"\0"))
                front.push_requests()
            elif action == 1:  # a well-formed request with hostile fields
                op = data.pick([blkif.BLKIF_OP_READ, blkif.BLKIF_OP_WRITE, blkif.BLKIF_OP_FLUSH_DISKCACHE,
                                blkif.BLKIF_OP_DISCARD, blkif.BLKIF_OP_WRITE_BARRIER, data.u8()])
                segments = [(gnttab.GNTTAB_NR_RESERVED_ENTRIES + data.below(24), data.below(10), data.below(10))
                            for _ in range(data.below(13))]
                with contextlib.suppress(ValueError, struct.error):
                    front.put_request(guest.rw(op, data.u16(), data.pick([0, data.below(80), data.u32()]),
                                               segments))
                    front.push_requests()
            elif action == 2:
                _scribble_grant(guest, data, domid=data.pick([0, 0, data.u16()]))
            elif action == 3:  # the guest writes its producer index
                struct.pack_into("<I", guest.memory.view(2 * PAGE, 16), REQ_PROD,
                                 data.pick([front.req_prod_pvt + data.below(4), data.u32()]) & 0xFFFFFFFF)
            elif action == 4:  # and scribbles the rest of the ring page
                offset = data.below(PAGE)
                guest.memory.write(2 * PAGE + offset, data.blob(min(64, PAGE - offset)))
            guest.backend.process()
    except RingBroken:
        broken = True  # documented: the device disconnects
    finally:
        guest.backend.detach_ring()
        check(not guest.table._pins.keys() - {m.ref for m in guest.ring_mappings},
              f"grants still mapped after detach (broken={broken})")
        for mapping in guest.ring_mappings:
            mapping.release()
        guest.image.close()


# --- netback ------------------------------------------------------------------

def netback(raw: bytes) -> None:
    data = Input(raw)
    from pyvmm.xen.backends.net import netif
    front = Netfront()
    try:
        for _ in range(8):
            front.page(bytes(PAGE))
        try:
            for choice in rounds(data):
                action = choice % 7
                if action == 0:
                    front.tx.put_request(data.take(netif.TX_ENTRY_SIZE).ljust(netif.TX_ENTRY_SIZE, b"\0"))
                    front.tx.push_requests()
                elif action == 1:  # a well-formed slot with hostile fields
                    with contextlib.suppress(struct.error, ValueError):
                        front.tx.put_request(netif.pack_tx_request(
                            gnttab.GNTTAB_NR_RESERVED_ENTRIES + data.below(24), data.u16() % (PAGE + 8),
                            data.u16() & 0xF, data.u16(), data.u16()))
                        front.tx.push_requests()
                elif action == 2:
                    with contextlib.suppress(struct.error, ValueError):
                        front.rx.put_request(netif.pack_rx_request(data.u16(),
                                                                   gnttab.GNTTAB_NR_RESERVED_ENTRIES
                                                                   + data.below(24)))
                        front.rx.push_requests()
                elif action == 3:
                    _scribble_grant(front, data, domid=data.pick([0, 0, data.u16()]))
                elif action == 4:  # a frame from the host, with an arbitrary vnet header
                    with contextlib.suppress(BlockingIOError):
                        front.host.send(data.take(10).ljust(10, b"\0") + data.blob(1600))
                elif action == 5:
                    page = data.pick([2, 4])
                    struct.pack_into("<I", front.memory.view(page * PAGE, 16), REQ_PROD, data.u32())
                front.backend.process_tx()
                front.backend.rx_notified()
                front.backend.process_rx()
                check(len(front.backend._rx_posted) <= 256, "more rx buffers held than a ring has")
        except RingBroken:
            pass  # documented: the vif disconnects
        front.backend.detach()
        check(not front.table._pins.keys() - {m.ref for m in front.ring_maps}, "grants still mapped after detach")
    finally:
        front.close()


# --- the xenbus handshake -------------------------------------------------------

_KEYS = ["state", "ring-ref", "ring-ref0", "ring-ref1", "event-channel", "event-channel-tx", "event-channel-rx",
         "protocol", "ring-page-order", "multi-queue-num-queues", "feature-persistent", "queue-0/ring-ref",
         "queue-0/event-channel", "queue-1/ring-ref", "tx-ring-ref", "rx-ring-ref", "request-rx-copy",
         "feature-rx-notify", "feature-sg", "feature-gso-tcpv4", "feature-no-csum-offload", "backend",
         "backend-id", "virtual-device", "device-type", "mac", "handle"]
_VALUES = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "-1", "4294967295", "4294967296", "x86_64-abi",
           "x86_32-abi", "arm-abi", "", " 1", "0x10", "1e3", "99999999999999999999", "\x00", "ûtf"]


def xenbus(raw: bytes) -> None:
    data = Input(raw)
    from pyvmm.xen.backends.blk.vbd import VbdDevice
    from pyvmm.xen.backends.net.vif import VifDevice
    domain = Domain()
    loop = domain.loop  # the unit tests' event thread, plus what a vif asks of it
    loop.add_reader = lambda fd, callback: None
    loop.remove_reader = lambda fd: None
    loop.call_later = lambda delay, callback: loop.schedule(callback)
    image = Path(_BLK_DIR.name) / "xenbus.img"
    if not image.exists():
        image.write_bytes(bytes(_BLK_SECTORS * 512))
    tap_end, host = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tap_end.setblocking(False)
    tap = SimpleNamespace(fd=tap_end.fileno(), name="fuzz0", set_offload=lambda flags: None, close=lambda: None)
    devices = []
    try:
        if data.u8() & 1:
            device = VbdDevice.open(domain.store, 1, image, domain.gnttab, domain.evtchn, domain.call_soon,
                                    vdev="xvda")
        else:
            device = VifDevice(domain.store, 1, 0, tap, "00:16:3e:00:00:01", domain.gnttab, domain.evtchn, loop)
        devices.append(device)
        device.start()
        loop.run()
        guest = domain.guest
        for _ in range(4):  # real rings and channels the keys may name
            gfn = domain.page()
            domain.grant(gfn)
            domain.evtchn.alloc_unbound(0x7FF0, 0)
        for choice in rounds(data):
            action = choice % 4
            key = data.pick(_KEYS)
            value = data.pick(_VALUES + [str(data.u32()), data.blob(12).decode("latin-1")])
            with contextlib.suppress(XenStoreError):
                if action == 0:
                    guest.write(f"{device.frontend_path}/{key}", value)
                elif action == 1:
                    guest.write(f"{device.frontend_path}/state", str(data.below(9)))
                elif action == 2:
                    guest.rm(f"{device.frontend_path}/{key}")
                else:
                    _scribble_grant(domain, data)
            loop.run()
            state = domain.store.client(0).read(f"{device.backend_path}/state")
            check(state.isdigit() and int(state) <= 8, f"backend state {state!r}")
    finally:
        for device in devices:
            device.close()
        loop.run()
        tap_end.close()
        host.close()


# --- the hypercall dispatcher -----------------------------------------------------

def hypercalls(raw: bytes) -> None:
    data = Input(raw)
    module = fakes("xen/hv/test_xen_hypercalls.py")
    from pyvmm.core.memory import GuestMemory
    from pyvmm.xen.hv.guest_access import GuestAccess
    from pyvmm.xen.hv.hypercalls import HypercallDispatcher
    memory = GuestMemory([(0, module.RAM)])
    dispatcher = HypercallDispatcher(module.FakeDomain())
    access = GuestAccess(module.identity, memory)
    pointers = [module.BUF, module.ARRAY, module.UNMAPPED, module.READONLY, module.OUTSIDE, module.BUF + PAGE - 4,
                0, 0xFFFF_FFFF_FFFF_F000]
    for choice in rounds(data):
        if choice % 4 == 0:
            memory.write(data.pick([module.BUF, module.ARRAY]) + data.below(PAGE - 64), data.blob(64))
        number = data.pick([data.below(64), data.u32(), data.u8() % 41])
        params = [data.pick([data.below(64), data.pick(pointers), data.u32(), data.uint(8)]) for _ in range(6)]
        exit = module.FakeExit(number, *params, longmode=bool(choice & 0x10), cpl=data.pick([0, 0, 0, 3]))
        dispatcher.handle(exit, data.below(4), access)
        check(isinstance(exit.result, int), f"hypercall {number} left result {exit.result!r}")


TARGETS = {
    "xenstore-ring": xenstore_ring,
    "blkback": blkback,
    "netback": netback,
    "xenbus": xenbus,
    "hypercalls": hypercalls,
}


# --- running them -------------------------------------------------------------------

MAX_INPUT = 2048  # bytes: enough for MAX_ROUNDS rounds of the largest choices


def run(name: str, *, inputs: int | None = None, seconds: float | None = None, seed: int = 0,
        batch: int = 2000, trace_memory: bool = True) -> dict:
    """Feed target `name` hypothesis-generated inputs, for `inputs` inputs or
    `seconds` of wall time (in batches of `batch`, each with its own seed).
    Failures are counted, not raised: {inputs, failures, first_failure,
    peak_bytes (traced; 0 unless trace_memory, which makes inputs 2-4 times
    slower), peak_rss_bytes (the whole process's), slowest_seconds}."""
    import resource
    import time
    import tracemalloc

    from hypothesis import HealthCheck, Phase, given, settings, strategies as st
    from hypothesis import seed as with_seed

    target = TARGETS[name]
    stats = {"target": name, "inputs": 0, "failures": 0, "first_failure": None, "peak_bytes": 0,
             "slowest_seconds": 0.0}
    deadline = None if seconds is None else time.monotonic() + seconds

    def one(raw: bytes) -> None:
        started = time.monotonic()
        stats["inputs"] += 1
        try:
            target(raw)
        except Exception as exc:  # noqa: BLE001 - every escape is a finding, counted
            stats["failures"] += 1
            if stats["first_failure"] is None:
                stats["first_failure"] = {"error": f"{type(exc).__name__}: {exc}", "input": raw.hex()}
        stats["slowest_seconds"] = max(stats["slowest_seconds"], time.monotonic() - started)

    # Logs are tested elsewhere; here they would only slow every input down.
    logger = logging.getLogger("pyvmm")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    if trace_memory:
        tracemalloc.start()
    try:
        number = 0
        while True:
            left = batch if inputs is None else min(batch, inputs - stats["inputs"])
            if left <= 0 or (deadline is not None and time.monotonic() >= deadline):
                break
            runner = with_seed(seed * 1_000_003 + number)(settings(
                max_examples=left, database=None, deadline=None, phases=[Phase.generate],
                suppress_health_check=list(HealthCheck))(given(st.binary(max_size=MAX_INPUT))(one)))
            runner()
            number += 1
        if trace_memory:
            stats["peak_bytes"] = tracemalloc.get_traced_memory()[1]
        stats["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    finally:
        logger.setLevel(level)
        if trace_memory:
            tracemalloc.stop()
    return stats
