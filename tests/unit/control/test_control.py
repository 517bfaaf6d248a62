"""The control protocol over a real unix socket, with the server on an
EventLoop running in a background thread as inside the VMM."""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from pyvmm.core import runtime
from pyvmm.control.server import (
    LINE_MAX,
    OUTPUT_LIMIT,
    ControlClient,
    ControlError,
    ControlServer,
    NotRunningError,
    list_vms,
    make_greeting,
)
from pyvmm.core.eventloop import EventLoop
from pyvmm.core.runtime import RuntimeDirError, SocketInUseError

from loop_thread import LoopThread


class Vmm(LoopThread):
    """A control server with a few commands, served from a loop thread."""

    def __init__(self, directory, name="vm1"):
        self.name = name
        self.path = str(directory / f"{name}.control")
        self.loop = EventLoop()
        self.calls: list[dict] = []
        commands = {
            "status": self.status,
            "echo": lambda arguments: arguments,
            "nothing": lambda arguments: None,
            "refuse": self.refuse,
            "crash": self.crash,
            "unencodable": lambda arguments: {"set": {1, 2}},
            "emit": self.emit,
            "big": lambda arguments: "x" * arguments["size"],
        }
        self.server = ControlServer(self.path, self.loop, commands, make_greeting(name))
        self.server.start()
        self.start_loop()

    def status(self, arguments):
        self.calls.append(arguments)
        assert threading.current_thread() is self.thread  # commands run on the loop thread
        return {"name": self.name, "state": "running", "vcpus": 1, "pid": os.getpid()}

    @staticmethod
    def refuse(arguments):
        raise ControlError("InvalidState", "not now")

    @staticmethod
    def crash(arguments):
        raise RuntimeError("boom")

    def emit(self, arguments):
        self.server.broadcast(arguments["name"], arguments.get("data"))
        return {}


@pytest.fixture
def vmm(tmp_path):
    server = Vmm(tmp_path)
    yield server
    server.close()


def raw_connection(path):
    """A plain socket that has read the greeting."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    reader = sock.makefile("rb")
    greeting = json.loads(reader.readline())
    assert "pyvmm" in greeting
    return sock, reader


def read_json(reader):
    line = reader.readline()
    assert line.endswith(b"\n"), f"no complete line: {line!r}"
    return json.loads(line)


# --- greeting and commands ------------------------------------------------------------

def test_greeting(vmm):
    with ControlClient(vmm.path, timeout=5) as client:
        assert client.greeting == {"version": client.greeting["version"], "name": "vm1", "pid": os.getpid()}
        assert isinstance(client.greeting["version"], str)


def test_socket_mode_is_0600(vmm):
    assert stat.S_IMODE(os.stat(vmm.path).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(vmm.path).st_mode)


def test_execute_returns_results(vmm):
    with ControlClient(vmm.path, timeout=5) as client:
        assert client.execute("status")["state"] == "running"
        assert client.execute("echo", path="/a", value="b", command="x") == {
            "path": "/a", "value": "b", "command": "x"}
        assert client.execute("nothing") == {}
        assert "status" in client.execute("query-commands")
        assert vmm.calls == [{}]


def test_ids_are_echoed_whatever_their_type(vmm):
    sock, reader = raw_connection(vmm.path)
    try:
        for request_id in (7, "abc", [1, {"x": None}], None):
            sock.sendall(json.dumps({"execute": "nothing", "id": request_id}).encode() + b"\n")
            assert read_json(reader) == {"return": {}, "id": request_id}
        sock.sendall(b'{"execute": "nothing"}\n')
        assert read_json(reader) == {"return": {}}  # no id asked, none given
        sock.sendall(b'\n  \n{"execute": "nothing", "id": 1}\r\n')  # blank lines and CRLF are fine
        assert read_json(reader) == {"return": {}, "id": 1}
    finally:
        reader.close()
        sock.close()


def test_pipelined_requests_in_one_write_are_answered_in_order(vmm):
    sock, reader = raw_connection(vmm.path)
    try:
        sock.sendall(b"".join(json.dumps({"execute": "echo", "arguments": {"n": n}, "id": n}).encode() + b"\n"
                              for n in range(50)))
        for n in range(50):
            assert read_json(reader) == {"return": {"n": n}, "id": n}
    finally:
        reader.close()
        sock.close()


def test_request_split_across_writes(vmm):
    sock, reader = raw_connection(vmm.path)
    try:
        for piece in (b'{"exec', b'ute": "echo", "argu', b'ments": {"a": 1}, "id": 3}', b"\n"):
            sock.sendall(piece)
            time.sleep(0.01)
        assert read_json(reader) == {"return": {"a": 1}, "id": 3}
    finally:
        reader.close()
        sock.close()


def test_last_request_without_newline_is_answered_at_eof(vmm):
    sock, reader = raw_connection(vmm.path)
    try:
        sock.sendall(b'{"execute": "nothing", "id": 9}')
        sock.shutdown(socket.SHUT_WR)
        assert read_json(reader) == {"return": {}, "id": 9}
        assert reader.readline() == b""  # then the server closes
    finally:
        reader.close()
        sock.close()
    vmm.wait_clients(0)


# --- errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("line, error_class", [
    (b"{not json", "ParseError"),
    (b'{"execute": "nothing", "id": NaN}', "ParseError"),
    (b"\xff\xfe{}", "ParseError"),
    (b"[" * 100000, "RequestTooLarge"),
    (b"[" * 30000 + b"]" * 30000, "ParseError"),  # too deep for the decoder
    (b'["execute", "status"]', "InvalidRequest"),
    (b"42", "InvalidRequest"),
    (b"{}", "InvalidRequest"),
    (b'{"execute": 5}', "InvalidRequest"),
    (b'{"execute": "echo", "arguments": [1]}', "InvalidRequest"),
    (b'{"execute": "echo", "extra": 1}', "InvalidRequest"),
    (b'{"execute": "no-such-command"}', "CommandNotFound"),
])
def test_malformed_requests_get_error_replies(vmm, line, error_class):
    sock, reader = raw_connection(vmm.path)
    try:
        sock.sendall(line + b"\n")
        reply = read_json(reader)
        assert reply["error"]["class"] == error_class
        assert isinstance(reply["error"]["desc"], str) and reply["error"]["desc"]
        # The connection still works afterwards.
        sock.sendall(b'{"execute": "status", "id": "after"}\n')
        assert read_json(reader)["id"] == "after"
    finally:
        reader.close()
        sock.close()


def test_error_reply_keeps_the_id(vmm):
    sock, reader = raw_connection(vmm.path)
    try:
        sock.sendall(b'{"execute": "no-such", "id": 42}\n')
        assert read_json(reader) == {"error": {"class": "CommandNotFound",
                                               "desc": "unknown command 'no-such'"}, "id": 42}
    finally:
        reader.close()
        sock.close()


def test_oversized_line_is_refused_and_skipped(vmm):
    sock, reader = raw_connection(vmm.path)
    try:
        # One line far over the limit, sent in many pieces, then a good request.
        huge = b'{"execute": "echo", "arguments": {"pad": "' + b"p" * (3 * LINE_MAX) + b'"}}\n'
        sock.sendall(huge + b'{"execute": "nothing", "id": "next"}\n')
        reply = read_json(reader)
        assert reply["error"]["class"] == "RequestTooLarge"
        assert "id" not in reply
        assert read_json(reader) == {"return": {}, "id": "next"}  # one error, then back in step
        # Just under the limit is accepted.
        pad = LINE_MAX - 200
        sock.sendall(b'{"execute": "echo", "arguments": {"pad": "' + b"p" * pad + b'"}, "id": 1}\n')
        assert read_json(reader) == {"return": {"pad": "p" * pad}, "id": 1}
    finally:
        reader.close()
        sock.close()


def test_command_errors(vmm, caplog):
    with ControlClient(vmm.path, timeout=5) as client:
        with pytest.raises(ControlError) as refused:
            client.execute("refuse")
        assert (refused.value.cls, refused.value.desc) == ("InvalidState", "not now")
        with caplog.at_level(logging.ERROR, logger="pyvmm.control.server"):
            with pytest.raises(ControlError) as crashed:
                client.execute("crash")
        assert crashed.value.cls == "InternalError" and "boom" in crashed.value.desc
        assert any("crash" in record.getMessage() for record in caplog.records)
        with pytest.raises(ControlError) as unencodable:
            client.execute("unencodable")
        assert unencodable.value.cls == "InternalError"
        with pytest.raises(ControlError) as missing_argument:
            client.execute("emit")  # KeyError inside the command
        assert missing_argument.value.cls == "InternalError"
        with pytest.raises(ControlError) as unknown:
            client.execute("no-such")
        assert unknown.value.cls == "CommandNotFound"
        assert client.execute("status")["name"] == "vm1"  # all survived


# --- events ---------------------------------------------------------------------------

def test_events_reach_every_client(vmm):
    with ControlClient(vmm.path, timeout=5) as first, ControlClient(vmm.path, timeout=5) as second:
        vmm.wait_clients(2)
        vmm.on_loop(lambda: vmm.server.broadcast("PAUSED"))
        vmm.on_loop(lambda: vmm.server.broadcast("STOP", {"reason": "poweroff", "status": 0}))
        for client in (first, second):
            stop = client.wait_event("STOP", timeout=5)
            assert stop["data"] == {"reason": "poweroff", "status": 0}
            assert set(stop["timestamp"]) == {"seconds", "microseconds"}
            assert abs(stop["timestamp"]["seconds"] - time.time()) < 60
            # The earlier event was kept for later.
            assert client.wait_event(["RESUMED", "PAUSED"], timeout=5)["data"] == {}


def test_events_arriving_during_execute_are_queued(vmm):
    with ControlClient(vmm.path, timeout=5) as client:
        assert client.execute("emit", name="RESET", data={"guest": True}) == {}
        assert [e["event"] for e in client.queued_events] == ["RESET"]
        assert client.wait_event("RESET", timeout=1)["data"] == {"guest": True}


def test_broadcast_threadsafe(vmm):
    with ControlClient(vmm.path, timeout=5) as client:
        vmm.wait_clients(1)
        vmm.server.broadcast_threadsafe("SHUTDOWN", {"reason": "poweroff"})
        assert client.wait_event("SHUTDOWN", timeout=5)["data"] == {"reason": "poweroff"}


def test_wait_event_times_out(vmm):
    with ControlClient(vmm.path, timeout=5) as client:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            client.wait_event("NEVER", timeout=0.2)
        assert time.monotonic() - start < 3


def test_close_flushes_a_last_event_then_disconnects(vmm):
    with ControlClient(vmm.path, timeout=5) as client:
        vmm.wait_clients(1)

        def last_words():
            vmm.server.broadcast("STOP", {"reason": "destroyed", "status": 0})
            vmm.server.close()

        vmm.on_loop(last_words)
        assert client.wait_event("STOP", timeout=5)["data"]["reason"] == "destroyed"
        assert not os.path.exists(vmm.path)
        with pytest.raises(Exception, match="closed"):
            client.execute("status")


# --- clients that misbehave -------------------------------------------------------------

def test_client_that_never_reads_is_disconnected(vmm):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(vmm.path)
    try:
        vmm.wait_clients(1)
        event = {"blob": "e" * 60000}
        for _ in range(2 * OUTPUT_LIMIT // 60000):
            vmm.on_loop(lambda: vmm.server.broadcast("FLOOD", event))
        vmm.wait_clients(0)
        # Others are still served.
        with ControlClient(vmm.path, timeout=5) as client:
            assert client.execute("status")["state"] == "running"
    finally:
        sock.close()


def test_large_reply_to_a_slow_reader_arrives_whole(vmm):
    with ControlClient(vmm.path, timeout=10) as client:
        assert len(client.execute("big", size=1_000_000)) == 1_000_000


def test_client_hanging_up_mid_request(vmm):
    sock, reader = raw_connection(vmm.path)
    sock.sendall(b'{"execute": "sta')
    reader.close()
    sock.close()
    vmm.wait_clients(0)
    with ControlClient(vmm.path, timeout=5) as client:
        assert client.execute("status")["state"] == "running"


# --- sockets: stale, live, missing ------------------------------------------------------

def make_stale_socket(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()  # bound, never listening, not unlinked: what a killed VMM leaves


def test_stale_socket_is_replaced(tmp_path):
    make_stale_socket(tmp_path / "vm1.control")
    vmm = Vmm(tmp_path)
    try:
        with ControlClient(vmm.path, timeout=5) as client:
            assert client.greeting["name"] == "vm1"
    finally:
        vmm.close()
    assert not os.path.exists(vmm.path)


def test_live_socket_is_not_replaced(vmm):
    loop = EventLoop()
    try:
        intruder = ControlServer(vmm.path, loop, {}, make_greeting("vm1"))
        with pytest.raises(SocketInUseError, match="running"):
            intruder.start()
    finally:
        loop.close()
    with ControlClient(vmm.path, timeout=5) as client:
        assert client.execute("status")["name"] == "vm1"


def test_a_file_that_is_not_a_socket_is_not_replaced(tmp_path):
    path = tmp_path / "vm1.control"
    path.write_text("precious")
    loop = EventLoop()
    try:
        with pytest.raises(RuntimeDirError, match="not a socket"):
            ControlServer(path, loop, {}, {}).start()
    finally:
        loop.close()
    assert path.read_text() == "precious"


def test_client_reports_missing_vm(tmp_path):
    with pytest.raises(NotRunningError, match="no VM named 'ghost' is running"):
        ControlClient(tmp_path / "ghost.control", timeout=1)
    make_stale_socket(tmp_path / "stale.control")
    with pytest.raises(NotRunningError, match="'stale'"):
        ControlClient(tmp_path / "stale.control", timeout=1)


def test_client_refuses_a_socket_that_is_not_pyvmm(tmp_path):
    path = str(tmp_path / "other.control")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()

    def serve():
        conn, _ = listener.accept()
        conn.sendall(b'{"QMP": {}}\n')
        conn.recv(100)
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with pytest.raises(Exception, match="not a pyvmm control socket"):
            ControlClient(path, timeout=5)
    finally:
        thread.join(5)
        listener.close()


def test_list_vms(tmp_path):
    first = Vmm(tmp_path, "alpha")
    second = Vmm(tmp_path, "beta")
    make_stale_socket(tmp_path / "dead.control")
    (tmp_path / "notes.control").write_text("not a socket")  # ignored, left alone
    (tmp_path / "alpha.xenstore").write_text("")              # other sockets are not VMs
    try:
        vms = list_vms(tmp_path, timeout=5)
        assert [vm["name"] for vm in vms] == ["alpha", "beta"]
        assert vms[0]["state"] == "running"
        assert vms[0]["control_socket"] == str(tmp_path / "alpha.control")
        assert not (tmp_path / "dead.control").exists()
        assert (tmp_path / "notes.control").exists()
    finally:
        first.close()
        second.close()
    assert list_vms(tmp_path) == []
    assert list_vms(tmp_path / "missing") == []


def test_list_vms_reports_a_vm_that_does_not_answer(tmp_path):
    path = str(tmp_path / "hung.control")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()  # accepts (in the kernel) but never speaks
    try:
        vms = list_vms(tmp_path, timeout=0.3)
        assert [(vm["name"], vm["state"]) for vm in vms] == [("hung", "unresponsive")]
        assert os.path.exists(path)
    finally:
        listener.close()


def test_move_to_another_loop_keeps_clients(vmm):
    with ControlClient(vmm.path, timeout=5) as client:
        vmm.wait_clients(1)
        new_loop = EventLoop()
        vmm.on_loop(lambda: vmm.server.move_to(new_loop))
        vmm.loop.stop()
        vmm.thread.join(5)
        vmm.loop.close()
        vmm.loop = new_loop
        vmm.thread = threading.Thread(target=new_loop.run, daemon=True)
        vmm.thread.start()
        # Commands assert they run on the loop thread: the new one.
        assert client.execute("status")["state"] == "running"
        vmm.on_loop(lambda: vmm.server.broadcast("RESET", {}))
        assert client.wait_event("RESET", timeout=5)["event"] == "RESET"


# --- the runtime directory ----------------------------------------------------------------

def test_runtime_dir_prefers_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    directory = runtime.runtime_dir()
    assert directory == tmp_path / "pyvmm"
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert runtime.control_socket_path("web-1") == tmp_path / "pyvmm" / "web-1.control"
    assert runtime.xenstore_socket_path("web-1") == tmp_path / "pyvmm" / "web-1.xenstore"


def test_runtime_dir_fallbacks(monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    uid = os.getuid()
    expected = (f"/run/user/{uid}/pyvmm" if os.path.isdir(f"/run/user/{uid}") else f"/tmp/pyvmm-{uid}")
    assert str(runtime.runtime_dir(create=False)) == expected
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative/dir")  # ignored, as the XDG spec says
    assert str(runtime.runtime_dir(create=False)) == expected


def test_runtime_dir_refuses_unsafe_directories(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    directory = tmp_path / "pyvmm"
    directory.mkdir(mode=0o700)
    os.chmod(directory, 0o777)
    with pytest.raises(RuntimeDirError, match="writable by other users"):
        runtime.runtime_dir()
    os.chmod(directory, 0o720)
    with pytest.raises(RuntimeDirError, match="writable by other users"):
        runtime.runtime_dir()
    os.chmod(directory, 0o755)  # readable by others is acceptable
    assert runtime.runtime_dir() == directory
    directory.rmdir()
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    directory.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RuntimeDirError, match="not a directory"):
        runtime.runtime_dir()


def test_runtime_dir_refuses_a_directory_of_another_user(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    (tmp_path / "pyvmm").mkdir(mode=0o700)
    monkeypatch.setattr(os, "getuid", lambda: os.stat(tmp_path).st_uid + 1)
    with pytest.raises(RuntimeDirError, match="belongs to uid"):
        runtime.runtime_dir()


@pytest.mark.parametrize("name", ["", "a b", "x/y", "../etc", "é", "a" * 65, ".", "..", "a\n"])
def test_bad_names(name, tmp_path):
    with pytest.raises(RuntimeDirError, match="invalid VM name"):
        runtime.control_socket_path(name, tmp_path)


@pytest.mark.parametrize("name", ["a", "web-1", "vm_2.test", "A" * 64])
def test_good_names(name, tmp_path):
    assert runtime.control_socket_path(name, Path("/run/user/1000/pyvmm")).name == name + ".control"


def test_socket_path_length_is_checked(tmp_path):
    deep = tmp_path / ("d" * 100)
    with pytest.raises(RuntimeDirError, match="too long"):
        runtime.control_socket_path("vm", deep)


# --- file descriptors sent with a request (the snapshot's file) ---------------------------

class FdVmm(Vmm):
    """A command that writes into the file its client sent, as `snapshot` does."""

    def __init__(self, directory):
        super().__init__(directory, name="fds")
        self.server._commands["write-into"] = self.write_into

    def write_into(self, arguments):
        fd = self.server.take_fd()
        if fd is None:
            raise ControlError("InvalidArgument", "no descriptor")
        try:
            os.write(fd, arguments["text"].encode())
        finally:
            os.close(fd)
        return {"ok": True}


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def test_a_command_takes_the_file_descriptor_sent_with_its_request(tmp_path):
    vmm = FdVmm(tmp_path)
    try:
        before = open_fds()
        target = tmp_path / "out"
        fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o600)
        with ControlClient(vmm.path) as client:
            assert client.execute_with_fds("write-into", [fd], text="written by the server") == {"ok": True}
            os.close(fd)
            # A request without one gets none, and a descriptor no command takes is closed.
            with pytest.raises(ControlError, match="no descriptor"):
                client.execute("write-into", text="x")
            spare = os.open(target, os.O_RDONLY)
            assert client.execute_with_fds("status", [spare])["state"] == "running"
            os.close(spare)
            assert client.execute("status")["state"] == "running"
        vmm.wait_clients(0)
        assert target.read_text() == "written by the server"
        assert open_fds() <= before | {fd}  # the server kept none of them
    finally:
        vmm.close()


def test_a_client_cannot_pile_up_descriptors(tmp_path):
    vmm = FdVmm(tmp_path)
    try:
        before = open_fds()
        sock, reader = raw_connection(vmm.path)
        fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(12)]
        for fd in fds:  # bytes of an unfinished line, each with a descriptor
            socket.send_fds(sock, [b" "], [fd])
        for fd in fds:
            os.close(fd)
        sock.sendall(b'{"execute": "status", "id": 1}\n')
        assert json.loads(reader.readline())["id"] == 1
        reader.close()
        sock.close()
        vmm.wait_clients(0)
        assert open_fds() <= before
    finally:
        vmm.close()
