"""The xenstore socket server against Debian's real xenstore tools (libxenstore
from Xen 4.17, pointed at our socket with XENSTORED_PATH), and against a
small Python client speaking the wire protocol for what the tools cannot
do (transactions spanning several requests, clients that stop reading).

No VM is involved: a XenStore and the server run on an EventLoop in a
background thread, exactly as inside the VMM.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import threading

import pytest

from pyvmm.core.eventloop import EventLoop
from pyvmm.core.runtime import SocketInUseError
from pyvmm.xen.xenstore import Op, XenStore
from pyvmm.xen.xenstore.socket_server import OUTPUT_LIMIT, XenstoreSocketServer

from loop_thread import LoopThread

TOOL_TIMEOUT = 20

needs_tools = pytest.mark.skipif(
    shutil.which("xenstore-read") is None,
    reason="Debian's xenstore-utils (xenstore-read, ...) is not installed; scripts/bootstrap installs it",
)


class Harness(LoopThread):
    """A store served on a socket by an event loop running in a thread."""

    def __init__(self, directory):
        self.path = str(directory / "vm.xenstore")
        self.loop = EventLoop()
        self.watches_set = threading.Semaphore(0)
        self.store = XenStore(observer=self._observe)
        self.dom0 = self.store.client(0)
        self.server = XenstoreSocketServer(self.path, self.loop, self.store)
        self.server.start()
        self.start_loop()

    def _observe(self, domid, op, path, value, tx, result):
        if op == "WATCH" and result == "OK":
            self.watches_set.release()

    def tool(self, *argv, check=True):
        env = dict(os.environ, XENSTORED_PATH=self.path)
        result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=TOOL_TIMEOUT)
        if check:
            assert result.returncode == 0, f"{argv}: status {result.returncode}, stderr {result.stderr!r}"
        return result


@pytest.fixture
def xs(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    harness.close()


class WireClient:
    """A minimal xenstore wire-protocol client over the unix socket."""

    HEADER = struct.Struct("<IIII")

    def __init__(self, path, rcvbuf: int | None = None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.events: list[tuple[str, str]] = []
        self._req_id = 0

    def _recv_exact(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("server closed the connection")
            data += chunk
        return data

    def read_message(self) -> tuple[int, int, int, bytes]:
        msg_type, req_id, tx_id, length = self.HEADER.unpack(self._recv_exact(16))
        return msg_type, req_id, tx_id, self._recv_exact(length)

    def send(self, op: int, payload: bytes, tx: int = 0) -> None:
        self._req_id += 1
        self.sock.sendall(self.HEADER.pack(op, self._req_id, tx, len(payload)) + payload)

    def request(self, op: int, *args: str | bytes, tx: int = 0, raw_last: bool = False) -> bytes:
        parts = [a if isinstance(a, bytes) else a.encode() + b"\0" for a in args]
        self.send(op, b"".join(parts), tx)
        while True:
            msg_type, req_id, tx_id, payload = self.read_message()
            if msg_type == Op.WATCH_EVENT:
                path, token = payload.split(b"\0")[:2]
                self.events.append((path.decode(), token.decode()))
                continue
            assert req_id == self._req_id and tx_id == tx
            if msg_type == Op.ERROR:
                raise OSError(payload.rstrip(b"\0").decode())
            assert msg_type == op
            return payload

    def wait_event(self) -> tuple[str, str]:
        while not self.events:
            msg_type, _, _, payload = self.read_message()
            assert msg_type == Op.WATCH_EVENT, f"unexpected message type {msg_type}"
            path, token = payload.split(b"\0")[:2]
            self.events.append((path.decode(), token.decode()))
        return self.events.pop(0)

    def close(self):
        self.sock.close()


# --- Debian's tools ---------------------------------------------------------------

@needs_tools
def test_write_read_list_exists_rm(xs):
    xs.tool("xenstore-write", "/tool/a", "hello", "/tool/b/c", "deep value")
    assert xs.tool("xenstore-read", "/tool/a").stdout == "hello\n"
    assert xs.tool("xenstore-read", "/tool/b/c").stdout == "deep value\n"
    assert xs.on_loop(lambda: xs.dom0.read("/tool/b/c")) == b"deep value"
    assert xs.tool("xenstore-list", "/tool").stdout.split() == ["a", "b"]
    assert xs.tool("xenstore-exists", "/tool/a").returncode == 0
    assert xs.tool("xenstore-exists", "/tool/nothing", check=False).returncode != 0
    missing = xs.tool("xenstore-read", "/tool/nothing", check=False)
    assert missing.returncode != 0
    xs.tool("xenstore-rm", "/tool/b")
    assert xs.tool("xenstore-list", "/tool").stdout.split() == ["a"]
    assert not xs.on_loop(lambda: xs.dom0.exists("/tool/b"))
    # What the store's own client writes, the tools see.
    xs.on_loop(lambda: xs.dom0.write("/tool/from-vmm", "42"))
    assert xs.tool("xenstore-read", "-s", "/tool/from-vmm").stdout == "42\n"


@needs_tools
def test_ls_and_chmod(xs):
    xs.on_loop(lambda: (xs.dom0.write("/ls/x", "1"), xs.dom0.write("/ls/y/z", "2")))
    listing = xs.tool("xenstore-ls", "-f", "/ls").stdout.splitlines()
    assert listing == ['/ls/x = "1"', '/ls/y = ""', '/ls/y/z = "2"']
    xs.tool("xenstore-chmod", "/ls/x", "r1", "w2")
    assert [str(p) for p in xs.on_loop(lambda: xs.dom0.get_perms("/ls/x"))] == ["r1", "w2"]
    with_perms = xs.tool("xenstore-ls", "-p", "/ls").stdout
    assert "(r1,w2)" in with_perms and "(n0)" in with_perms
    # -r: recursively
    xs.tool("xenstore-chmod", "-r", "/ls/y", "b3")
    assert [str(p) for p in xs.on_loop(lambda: xs.dom0.get_perms("/ls/y/z"))] == ["b3"]


@needs_tools
def test_watch_sees_change_from_the_vmm(xs):
    xs.on_loop(lambda: xs.dom0.write("/watched", ""))
    env = dict(os.environ, XENSTORED_PATH=xs.path)
    watcher = subprocess.Popen(["xenstore-watch", "-n", "2", "/watched"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert xs.watches_set.acquire(timeout=TOOL_TIMEOUT), "xenstore-watch never set its watch"
        xs.on_loop(lambda: xs.dom0.write("/watched/by-vmm", "1"))
        out, err = watcher.communicate(timeout=TOOL_TIMEOUT)
    finally:
        watcher.kill()
    assert watcher.returncode == 0, err
    # The first event is the one every new watch fires.
    assert out.splitlines() == ["/watched", "/watched/by-vmm"]
    xs.wait_clients(0)


@needs_tools
def test_watch_sees_change_from_another_socket_client(xs):
    xs.on_loop(lambda: xs.dom0.write("/watched", ""))
    env = dict(os.environ, XENSTORED_PATH=xs.path)
    watcher = subprocess.Popen(["xenstore-watch", "-n", "2", "/watched"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert xs.watches_set.acquire(timeout=TOOL_TIMEOUT), "xenstore-watch never set its watch"
        xs.tool("xenstore-write", "/watched/by-tool", "2")
        out, err = watcher.communicate(timeout=TOOL_TIMEOUT)
    finally:
        watcher.kill()
    assert watcher.returncode == 0, err
    assert out.splitlines() == ["/watched", "/watched/by-tool"]


@needs_tools
def test_tools_see_guest_changes_and_ring_clients_see_tools(xs):
    """A guest's wire connection (unprivileged domain 1) and the tools share one store."""
    def set_up():
        xs.dom0.write("/local/domain/1", "")
        from pyvmm.xen.xenstore import Access, Permission
        xs.dom0.set_perms("/local/domain/1", [Permission(1, Access.NONE)])
        guest = xs.store.client(1)
        guest.write("data/from-guest", "g")
        return guest
    guest = xs.on_loop(set_up)
    assert xs.tool("xenstore-read", "/local/domain/1/data/from-guest").stdout == "g\n"
    xs.tool("xenstore-write", "/local/domain/1/data/from-tool", "t")
    assert xs.on_loop(lambda: guest.read("data/from-tool")) == b"t"


# --- the wire protocol from Python -----------------------------------------------

def test_transaction_commit_and_isolation(xs):
    client = WireClient(xs.path)
    other = WireClient(xs.path)
    try:
        tx = int(client.request(Op.TRANSACTION_START, "").rstrip(b"\0"))
        assert tx != 0
        client.request(Op.WRITE, "/tx/node", b"inside", tx=tx)
        assert client.request(Op.READ, "/tx/node", tx=tx) == b"inside"
        with pytest.raises(OSError, match="ENOENT"):
            other.request(Op.READ, "/tx/node")
        assert not xs.on_loop(lambda: xs.dom0.exists("/tx/node"))
        assert client.request(Op.TRANSACTION_END, "T", tx=tx) == b"OK\0"
        assert other.request(Op.READ, "/tx/node") == b"inside"
    finally:
        client.close()
        other.close()


def test_transaction_conflict_and_abort(xs):
    xs.on_loop(lambda: xs.dom0.write("/tx/shared", "0"))
    client = WireClient(xs.path)
    other = WireClient(xs.path)
    try:
        tx = int(client.request(Op.TRANSACTION_START, "").rstrip(b"\0"))
        assert client.request(Op.READ, "/tx/shared", tx=tx) == b"0"
        client.request(Op.WRITE, "/tx/shared", b"1", tx=tx)
        other.request(Op.WRITE, "/tx/shared", b"2")  # changes what the transaction read
        with pytest.raises(OSError, match="EAGAIN"):
            client.request(Op.TRANSACTION_END, "T", tx=tx)
        assert xs.on_loop(lambda: xs.dom0.read("/tx/shared")) == b"2"
        tx = int(client.request(Op.TRANSACTION_START, "").rstrip(b"\0"))
        client.request(Op.WRITE, "/tx/aborted", b"x", tx=tx)
        client.request(Op.TRANSACTION_END, "F", tx=tx)
        assert not xs.on_loop(lambda: xs.dom0.exists("/tx/aborted"))
        with pytest.raises(OSError, match="ENOENT"):
            client.request(Op.READ, "/tx/shared", tx=tx)  # the transaction is gone
    finally:
        client.close()
        other.close()


def test_watch_events_between_socket_clients(xs):
    watcher = WireClient(xs.path)
    writer = WireClient(xs.path)
    try:
        watcher.request(Op.WATCH, "/ev", "tok")
        assert watcher.wait_event() == ("/ev", "tok")
        writer.request(Op.WRITE, "/ev/a", b"1")
        assert watcher.wait_event() == ("/ev/a", "tok")
        xs.on_loop(lambda: xs.dom0.write("/ev/b", "2"))
        assert watcher.wait_event() == ("/ev/b", "tok")
        watcher.request(Op.UNWATCH, "/ev", "tok")
    finally:
        watcher.close()
        writer.close()


def test_disconnect_drops_watches_and_transactions(xs):
    baseline = xs.on_loop(lambda: len(xs.store._clients))
    client = WireClient(xs.path)
    client.request(Op.WATCH, "/gone", "tok")
    tx = int(client.request(Op.TRANSACTION_START, "").rstrip(b"\0"))
    client.request(Op.WRITE, "/gone/never", b"x", tx=tx)
    xs.wait_clients(1)
    client.close()
    xs.wait_clients(0)
    assert xs.on_loop(lambda: len(xs.store._clients)) == baseline
    xs.on_loop(lambda: xs.dom0.write("/gone/later", "1"))  # no watcher left to deliver to
    assert not xs.on_loop(lambda: xs.dom0.exists("/gone/never"))
    assert xs.on_loop(xs.store.check) == []


def test_protocol_garbage_disconnects_only_that_client(xs):
    good = WireClient(xs.path)
    bad = WireClient(xs.path)
    try:
        bad.sock.sendall(struct.pack("<IIII", Op.READ, 1, 0, 100000))  # longer than any message
        with pytest.raises((ConnectionError, OSError)):
            bad.read_message()
        xs.wait_clients(1)
        good.request(Op.WRITE, "/still/fine", b"1")
        assert good.request(Op.READ, "/still/fine") == b"1"
    finally:
        good.close()
        bad.close()


def test_client_that_stops_reading_is_disconnected(xs):
    stuck = WireClient(xs.path, rcvbuf=4096)
    stuck.request(Op.WATCH, "/flood", "t" * 1000)
    assert stuck.wait_event()[0] == "/flood"
    # Each change queues a ~1 KiB event the client never reads.
    count = 3 * OUTPUT_LIMIT // 1000

    def flood(start):
        for index in range(start, start + 200):
            xs.dom0.write(f"/flood/n{index}", "x")

    for start in range(0, count, 200):
        xs.on_loop(lambda start=start: flood(start))
        if xs.on_loop(lambda: xs.server.client_count) == 0:
            break
    xs.wait_clients(0)
    stuck.close()
    # The loop is still serving others.
    other = WireClient(xs.path)
    try:
        assert other.request(Op.READ, "/flood/n0") == b"x"
    finally:
        other.close()


def test_live_socket_refused_stale_socket_replaced(xs, tmp_path):
    second = XenstoreSocketServer(xs.path, EventLoop(), XenStore())
    with pytest.raises(SocketInUseError):
        second.start()
    # A socket nobody listens on any more is replaced.
    stale_path = str(tmp_path / "stale.xenstore")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(stale_path)
    stale.close()
    loop = EventLoop()
    server = XenstoreSocketServer(stale_path, loop, XenStore())
    server.start()
    try:
        assert oct(os.stat(stale_path).st_mode & 0o777) == oct(0o600)
    finally:
        server.close()
        loop.close()
    assert not os.path.exists(stale_path)


def test_close_disconnects_clients_and_unlinks(xs):
    client = WireClient(xs.path)
    client.request(Op.WATCH, "/bye", "tok")
    xs.wait_clients(1)
    xs.on_loop(xs.server.close)
    assert not os.path.exists(xs.path)
    client.sock.settimeout(5)
    with pytest.raises((ConnectionError, OSError)):
        while True:
            client.read_message()
    client.close()
