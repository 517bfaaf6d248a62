"""A stress test of the guest's xenstore path, on the host, without a VM.

The real pieces run as inside the VMM: an EventLoop on its own thread, the
XenStore, the guest's GuestStoreService (RingServer and Connection), the
EventChannels with the store's channel, and the xenstore socket server.
What is fake is the guest, and (in "kernel" mode) KVM's event-channel
delivery:

- FakeLinuxXenbus, on its own thread, speaks to the ring exactly as Linux's
  xenbus does (drivers/xen/xenbus/xenbus_comms.c): it signals the store port
  after writing requests only when the server had consumed everything
  before (`prod <= req_cons`), and after reading replies only when the reply
  ring was full; it keeps many requests in flight and checks every reply.
  Its "upcall" clears the port's pending bit in shared_info before it looks
  at the ring, as Linux's 2-level event handler does.
- Backend threads write nodes under a path the guest watches, handing each
  write to the event thread (the documented way: call_soon_threadsafe).
- Socket clients write under the same path through the xenstore socket.

It checks what a guest relies on: every request gets exactly one reply, in
order of its own kind (a READ sees the value of the last WRITE sent before
it), every watched write reaches the guest as a watch event, and no
wake-up is lost (the service's safety net is off, so a lost one stalls the
guest, which the checker reports with the ring's state).

    run_stress(seconds=2)            the suite's short run
    scripts/stress-xenstore --seconds 600    a soak
"""

from __future__ import annotations

import os
import random
import socket
import struct
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from functools import partial

from frontends.common import HostPages
from pyvmm.core.eventloop import EventLoop
from pyvmm.core import atomic
from pyvmm.core.atomic import SharedWords
from pyvmm.xen.hv.evtchn import EventChannels
from pyvmm.xen.hv.shared_info import LONG_MODE
from pyvmm.xen.xenstore import Op, XenStore, create_domain_nodes
from pyvmm.xen.xenstore.protocol import HEADER, HEADER_SIZE, FrameDecoder, encode_message
from pyvmm.xen.xenstore.ring import REQ_CONS, REQ_OFFSET, REQ_PROD, RING_SIZE, RSP_CONS, RSP_OFFSET, RSP_PROD
from pyvmm.xen.xenstore.service import GuestStoreService
from pyvmm.xen.xenstore.socket_server import XenstoreSocketServer

DOMID = 1
WATCH_PATH = f"/local/domain/{DOMID}/data/w"
GUEST_KEYS = 64
# Host writers cycle through at most HOST_PATHS nodes each and stay at most
# WINDOW events ahead of the guest, so no event can be merged with an
# identical one still unsent, and each write is one event. The nodes are
# the guest's (they are in its directory): together they stay within
# HOST_NODES, which leaves room in its node quota (1000) for its own keys
# and the domain's nodes, however many writers run.
HOST_PATHS = 128
HOST_NODES = 768
PHASE_SECONDS = 0.5
WINDOW = 32
MAX_WRITERS = HOST_NODES // (WINDOW + 1)  # each cycle longer than the window
MASK32 = 0xFFFFFFFF


class StressFailure(AssertionError):
    pass


def host_paths(writers: int) -> int:
    """How many nodes each of `writers` host writers cycles through."""
    if not 0 < writers <= MAX_WRITERS:
        raise ValueError(f"{writers} host writers: 1 to {MAX_WRITERS} fit the guest's node quota")
    return min(HOST_PATHS, HOST_NODES // writers)


class _FakeKvmEvtchn:
    """KVM's in-kernel event channels, as far as the store channel uses them:
    the guest's send on an assigned port signals an eventfd, and a send from
    the VMM sets the 2-level bits in shared_info and raises the upcall."""

    def __init__(self, shared_info: int, upcall) -> None:
        self._shared_info = shared_info
        self._upcall = upcall
        self.eventfds: dict[int, int] = {}

    def delivers_to(self, vcpu: int) -> bool:
        return True

    def send(self, port: int, vcpu: int) -> None:
        abi = LONG_MODE
        if atomic.test_and_set_bit(self._shared_info + abi.evtchn_pending, port):
            return
        if atomic.test_and_set_bit(self._shared_info + abi.pending_sel, port // abi.bits_per_word):
            return
        if atomic.exchange(self._shared_info + abi.upcall_pending, 1, 1) == 0:
            self._upcall(vcpu)

    def assign_eventfd(self, port: int, fd: int) -> None:
        self.eventfds[port] = fd

    def assign_ipi(self, port: int, vcpu: int) -> None:
        raise OSError("not in this fake")

    def deassign(self, port: int) -> None:
        self.eventfds.pop(port, None)

    def reset(self) -> None:
        self.eventfds.clear()


@dataclass
class Stats:
    requests: int = 0
    replies: int = 0
    watch_events: int = 0
    host_writes: int = 0
    guest_signals: int = 0
    skipped_signals: int = 0  # requests written while the server was busy: Linux does not signal
    upcalls: int = 0
    errors: list[str] = field(default_factory=list)


class FakeLinuxXenbus(threading.Thread):
    """The guest: Linux's xenbus ring protocol, driven as hard as a thread can."""

    def __init__(self, rig: "StressRig", *, depth: int, seed: int, stall_seconds: float) -> None:
        super().__init__(name="fake-guest", daemon=True)
        self.rig = rig
        self.depth = depth
        self.random = random.Random(seed)
        self.stall_seconds = stall_seconds
        words = SharedWords(rig.ring.view)
        self._load, self._store = words.load, words.store
        self._ring = rig.ring.view
        self._upcall = threading.Event()
        self._decoder = FrameDecoder()
        self._unsent = bytearray()  # requests not yet in the ring
        self._outstanding: deque[tuple[int, int, bytes | None, str]] = deque()  # (req_id, op, expected, what)
        self._next_req = 1
        self._latest: dict[str, bytes | None] = {}
        self.events: Counter[str] = Counter()  # watch events by path
        self.host_events = 0  # those for the host's writes (below WATCH_PATH)
        self.stop_sending = threading.Event()
        self.watching = threading.Event()
        self.finished = threading.Event()
        self.failure: str | None = None

    # --- event channel ------------------------------------------------------------

    def upcall(self, vcpu: int) -> None:
        """KVM (or the VMM) injected the callback: any thread."""
        self._upcall.set()

    def _take_upcall(self, timeout: float) -> bool:
        if not self._upcall.wait(timeout):
            return False
        self._upcall.clear()
        rig, abi = self.rig, LONG_MODE
        self.rig.stats.upcalls += 1
        base = rig.shared_info.address
        atomic.exchange(base + abi.upcall_pending, 1, 0)
        atomic.exchange(base + abi.pending_sel, 8, 0)
        atomic.test_and_clear_bit(base + abi.evtchn_pending, rig.guest_port)
        return True

    def _signal(self) -> None:
        self.rig.stats.guest_signals += 1
        self.rig.guest_send()

    # --- the ring, as xenbus_comms.c --------------------------------------------------

    def _xb_write(self) -> None:
        while self._unsent:
            cons, prod = self._load(REQ_CONS), self._load(REQ_PROD)
            space = RING_SIZE - ((prod - cons) & MASK32)
            if space == 0:
                return
            start = prod & (RING_SIZE - 1)
            chunk = min(space, RING_SIZE - start, len(self._unsent))
            self._ring[REQ_OFFSET + start:REQ_OFFSET + start + chunk] = self._unsent[:chunk]
            del self._unsent[:chunk]
            self._store(REQ_PROD, prod + chunk)
            atomic.full_barrier()
            if prod <= self._load(REQ_CONS):  # Linux's test, unsigned and without wrap-around
                self._signal()
            else:
                self.rig.stats.skipped_signals += 1

    def _xb_read(self) -> bool:
        moved = False
        while True:
            cons, prod = self._load(RSP_CONS), self._load(RSP_PROD)
            if cons == prod:
                return moved
            if (prod - cons) & MASK32 > RING_SIZE:
                raise StressFailure(f"reply indices out of range: cons={cons} prod={prod}")
            start = cons & (RING_SIZE - 1)
            chunk = min((prod - cons) & MASK32, RING_SIZE - start)
            self._decoder.push(bytes(self._ring[RSP_OFFSET + start:RSP_OFFSET + start + chunk]))
            self._store(RSP_CONS, cons + chunk)
            atomic.full_barrier()
            if (self._load(RSP_PROD) - cons) & MASK32 >= RING_SIZE:
                self._signal()
            moved = True
            while (message := self._decoder.pop()) is not None:
                self._received(*message)

    # --- requests and replies -------------------------------------------------------

    def _send(self, op: int, payload: bytes, expected: bytes | None = None, what: str = "") -> None:
        req_id = self._next_req
        self._next_req = (self._next_req + 1) & MASK32 or 1
        self._unsent += encode_message(op, req_id, 0, payload)
        self._outstanding.append((req_id, op, expected, what))
        self.rig.stats.requests += 1

    def _new_request(self) -> None:
        key = f"data/k{self.random.randrange(GUEST_KEYS)}"
        choice = self.random.random()
        if choice < 0.4:
            value = os.urandom(self.random.randrange(1, 64)).hex().encode()
            self._latest[key] = value
            self._send(Op.WRITE, key.encode() + b"\0" + value, what=key)
        elif choice < 0.8:
            self._send(Op.READ, key.encode() + b"\0", self._latest.get(key), key)
        elif choice < 0.9:
            self._send(Op.DIRECTORY, b"data\0", what="data")
        else:
            self._latest[key] = None
            self._send(Op.RM, key.encode() + b"\0", what=key)

    def _burst(self) -> None:
        # Like Linux's xenwatch and driver threads: mostly one request at a
        # time, sometimes several. Each goes into the ring on its own, with
        # a chance for the server to run in between: the last request of a
        # burst, written while the server still works on the one before, is
        # the one whose signal Linux skips.
        count = 1 if self.random.random() < 0.5 else self.random.randrange(1, self.depth + 1)
        for _ in range(count):
            self._new_request()
            self._xb_write()
            if self.random.random() < 0.5:
                time.sleep(0)

    def _received(self, header, payload: bytes) -> None:
        if header.type == Op.WATCH_EVENT:
            path = payload.split(b"\0")[0].decode()
            self.events[path] += 1
            if path.startswith(WATCH_PATH + "/"):
                self.host_events += 1
            elif path == WATCH_PATH:
                self.watching.set()  # a watch's first event: it is registered
            return
        self.rig.stats.replies += 1
        if not self._outstanding:
            raise StressFailure(f"a reply (req {header.req_id}) to no request")
        req_id, op, expected, what = self._outstanding.popleft()
        if header.req_id != req_id:
            raise StressFailure(f"reply to req {header.req_id} where req {req_id} ({Op(op).name} {what}) was next")
        if header.type == Op.ERROR:
            error = payload.rstrip(b"\0").decode()
            if op == Op.READ and expected is None and error == "ENOENT":
                return
            if op == Op.RM and error == "ENOENT":
                return
            raise StressFailure(f"{Op(op).name} {what}: {error}")
        if header.type != op:
            raise StressFailure(f"reply of type {header.type} to {Op(op).name}")
        if op == Op.READ and payload != expected:
            raise StressFailure(f"READ {what}: {payload!r}, expected {expected!r}")

    # --- the thread --------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._send(Op.WATCH, WATCH_PATH.encode() + b"\0stress\0")
            self._loop()
        except BaseException as error:  # reported by the rig on the test's thread
            self.failure = f"{type(error).__name__}: {error}"
        finally:
            self.finished.set()

    def _loop(self) -> None:
        last_progress = time.monotonic()
        while True:
            sending = not self.stop_sending.is_set()
            if sending and not self._outstanding:
                self._burst()
            self._xb_write()
            if self._xb_read():
                last_progress = time.monotonic()
            expected_events = self.rig.expected_host_events
            events_due = expected_events is not None and self.host_events < expected_events
            if not sending and not self._outstanding and not self._unsent and expected_events is not None \
                    and not events_due:
                return
            if self._take_upcall(0.05):
                continue
            if events_due and time.monotonic() - last_progress > self.stall_seconds:
                raise StressFailure(f"{expected_events - self.host_events} watch event(s) never arrived; "
                                    f"ring: {self.rig.ring_state()}")
            if self._outstanding and time.monotonic() - last_progress > self.stall_seconds:
                raise StressFailure(
                    f"no reply for {self.stall_seconds:.0f} s with {len(self._outstanding)} request(s) in flight "
                    f"(next: req {self._outstanding[0][0]} {Op(self._outstanding[0][1]).name}); "
                    f"ring: {self.rig.ring_state()}")
            if not self._outstanding and not events_due:
                last_progress = time.monotonic()


class _SocketWriter(threading.Thread):
    """A domain-0 tool writing through the xenstore socket, one request at a time."""

    def __init__(self, rig: "StressRig", index: int) -> None:
        super().__init__(name=f"socket-writer-{index}", daemon=True)
        self.rig, self.index = rig, index
        self.failure: str | None = None

    def run(self) -> None:
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(30)
                sock.connect(self.rig.socket_path)
                n = 0
                while not self.rig.stop_host.is_set():
                    path = f"{WATCH_PATH}/s{self.index}-{n % self.rig.host_paths}"
                    self.rig.wait_window()
                    sock.sendall(encode_message(Op.WRITE, n + 1, 0, path.encode() + b"\0x"))
                    header = HEADER.unpack(_recv_exact(sock, HEADER_SIZE))
                    payload = _recv_exact(sock, header[3])
                    if header[0] != Op.WRITE:
                        raise StressFailure(f"socket WRITE {path}: {payload!r}")
                    self.rig.wrote(path)
                    n += 1
        except BaseException as error:
            self.failure = f"{type(error).__name__}: {error}"


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise StressFailure("the xenstore socket closed")
        data += chunk
    return data


class _Backend(threading.Thread):
    """A backend's worker thread publishing nodes: each write handed to the event thread."""

    def __init__(self, rig: "StressRig", index: int) -> None:
        super().__init__(name=f"backend-{index}", daemon=True)
        self.rig, self.index = rig, index
        self.failure: str | None = None

    def run(self) -> None:
        rig = self.rig
        n = 0
        try:
            while not rig.stop_host.is_set():
                path = f"{WATCH_PATH}/b{self.index}-{n % rig.host_paths}"
                rig.wait_window()
                done = threading.Event()
                rig.loop.call_soon_threadsafe(partial(self._write, path, done))
                if not done.wait(30):
                    raise StressFailure("the event thread did not run a handed-over write")
                n += 1
        except BaseException as error:
            self.failure = f"{type(error).__name__}: {error}"

    def _write(self, path: str, done: threading.Event) -> None:
        self.rig.dom0.write(path, b"y")
        self.rig.wrote(path)
        done.set()


def _widen_race_windows(ring, chance) -> None:
    """Let the guest thread run between the server's index accesses.

    The guest of a real VM runs in parallel with the server; a Python fake
    only runs when the server's thread gives up the interpreter, which
    rarely happens in the few instructions between reading an index and
    publishing the next. Yielding there at random makes the interleavings
    that matter (the guest writing while the server has read req_prod but
    not yet published req_cons) happen thousands of times per second.
    """
    load, store = ring._load_u32, ring._store_u32

    def yielding_load(offset: int) -> int:
        value = load(offset)
        if chance.random() < 0.3:
            time.sleep(0)
        return value

    def yielding_store(offset: int, value: int) -> None:
        if chance.random() < 0.3:
            time.sleep(0)
        store(offset, value)

    ring._load_u32, ring._store_u32 = yielding_load, yielding_store


class StressRig:
    def __init__(self, *, mode: str, directory: str) -> None:
        if mode not in ("kernel", "userspace"):
            raise ValueError(mode)
        self.mode = mode
        self.stats = Stats()
        self.loop = EventLoop()
        self.ring, self.shared_info = HostPages(), HostPages()
        self.store = XenStore()
        self.dom0 = self.store.client(0)
        self.guest: FakeLinuxXenbus | None = None
        self.kernel = _FakeKvmEvtchn(self.shared_info.address, self._upcall) if mode == "kernel" else None
        self.evtchn = EventChannels(
            domid=DOMID, vcpu_count=1, long_mode=lambda: True,
            shared_info_address=lambda: self.shared_info.address, vcpu_info_address=lambda vcpu: None,
            upcall=self._upcall, kernel=self.kernel, schedule=self.loop.call_soon_threadsafe,
            add_reader=self.loop.add_reader, remove_reader=self.loop.remove_reader)
        # No safety net: a lost wake-up must show as a stall, not be repaired.
        self.service = GuestStoreService(self.loop, self.store, DOMID, self.ring.view, recheck_seconds=None,
                                         check_threads=True)
        _widen_race_windows(self.service.ring, random.Random(1))
        channel = self.evtchn.connect_backend(self.service.notified)
        self.service.attach(channel.notify)
        self.guest_port = channel.guest_port
        self._channel = channel
        create_domain_nodes(self.store, DOMID, "stress", store_port=self.guest_port, store_ring_ref=1,
                            console_port=2, console_ring_ref=2)
        self.socket_path = os.path.join(directory, "stress.xenstore")
        self.server = XenstoreSocketServer(self.socket_path, self.loop, self.store)
        self.server.start()
        self.stop_host = threading.Event()
        # Host writes wake the server too, and would hide a wake-up lost
        # between the guest and the server: half the time the guest is alone.
        self.host_quiet = threading.Event()
        self.expected_host_events: int | None = None  # known once the host writers stopped
        self._written: Counter[str] = Counter()
        self._written_total = 0
        self._written_lock = threading.Lock()
        self._window = threading.Semaphore(0)

    def _upcall(self, vcpu: int) -> None:
        if self.guest is not None:
            self.guest.upcall(vcpu)

    def guest_send(self) -> None:
        """The guest's EVTCHNOP_send on the store port (a vCPU thread's hypercall)."""
        if self.kernel is not None:
            os.eventfd_write(self.kernel.eventfds[self.guest_port], 1)
        else:
            self.evtchn.send(self.guest_port)

    def wrote(self, path: str) -> None:
        with self._written_lock:
            self._written[path] += 1
            self._written_total += 1

    def wait_window(self) -> None:
        while not self.guest.watching.wait(0.1):  # writes before the guest's WATCH would fire nothing
            if self.stop_host.is_set():
                return
        # Host writers stay a bounded number of events ahead of the guest, so
        # the guest's event backlog (which may drop events) never fills.
        while not self.stop_host.is_set():
            if self._written_total - self.guest.host_events < WINDOW and not self.host_quiet.is_set():
                return
            time.sleep(0.001)

    def ring_state(self) -> str:
        return str(self.service.ring.snapshot())

    def run(self, *, seconds: float, depth: int = 24, seed: int = 0, backends: int = 2, sockets: int = 2,
            stall_seconds: float = 5.0) -> Stats:
        loop_thread = threading.Thread(target=self.loop.run, name="event-loop", daemon=True)
        self.host_paths = host_paths(backends + sockets) if backends + sockets else 0
        self.guest = FakeLinuxXenbus(self, depth=depth, seed=seed, stall_seconds=stall_seconds)
        host = [_Backend(self, i) for i in range(backends)] + [_SocketWriter(self, i) for i in range(sockets)]
        old_interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)  # switch threads often: more interleavings per second
        loop_thread.start()
        try:
            self.guest.start()
            for thread in host:
                thread.start()
            deadline = time.monotonic() + seconds
            while not self.guest.finished.is_set() and time.monotonic() < deadline:
                if self.host_quiet.is_set():
                    self.host_quiet.clear()
                else:
                    self.host_quiet.set()
                self.guest.finished.wait(min(PHASE_SECONDS, max(0.0, deadline - time.monotonic())))
            self.host_quiet.clear()
            self.stop_host.set()
            self.guest.stop_sending.set()
            for thread in host:
                thread.join(stall_seconds + 30)
            self.expected_host_events = self._written_total
            if not self.guest.finished.wait(stall_seconds + 30):
                raise StressFailure(f"the fake guest did not finish; ring: {self.ring_state()}")
        finally:
            sys.setswitchinterval(old_interval)
            self.stop_host.set()
            self.loop.call_soon_threadsafe(self.server.close)
            self.loop.stop()
            loop_thread.join(10)
        failures = [f"guest: {self.guest.failure}"] if self.guest.failure else []
        failures += [f"{t.name}: {t.failure}" for t in host if t.failure]
        if failures:
            raise StressFailure("; ".join(failures))
        events = self.guest.events
        wrong = {path: (count, events[path]) for path, count in self._written.items() if events[path] != count}
        if wrong:
            raise StressFailure(f"{len(wrong)} watched node(s) with a different number of events than writes "
                                f"(path: (writes, events)), e.g. {sorted(wrong.items())[:3]}")
        self.stats.host_writes = self._written_total
        self.stats.watch_events = sum(events.values())
        return self.stats

    def close(self) -> None:
        self.loop.close()
        for page in (self.ring, self.shared_info):
            page.view.release()


def run_stress(*, seconds: float, mode: str = "kernel", **options) -> Stats:
    """One stress run; raises StressFailure with what went wrong."""
    with tempfile.TemporaryDirectory(prefix="pyvmm-xs-stress-") as directory:
        rig = StressRig(mode=mode, directory=directory)
        try:
            return rig.run(seconds=seconds, **options)
        finally:
            rig.close()
