"""The stub's TCP side against a fake target: Debian's gdb itself as the client
(skipped without gdb), plus hostile bytes on the socket."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import threading

import pytest

from fake_target import BASE, FakeTarget
from pyvmm.gdbstub import protocol as p
from pyvmm.gdbstub.server import GdbServer, GdbStubError
from pyvmm.kvm import uapi
from pyvmm.kvm.exits import DebugExit


class Hardware:
    """Plays the vCPUs: a resumed guest hits its first int3, or finishes a step."""

    def __init__(self, target: FakeTarget, server: GdbServer):
        self.target, self.server = target, server
        target.on_resume = self.resumed

    def resumed(self, debug) -> None:
        for vcpu, (control, _) in enumerate(debug):
            if control & uapi.KVM_GUESTDBG_SINGLESTEP:
                self.target.regs[vcpu]["rip"] += 1
                self._exit(vcpu, DebugExit(1, self.target.regs[vcpu]["rip"], 1 << 14, 0))
                return
        if debug[1][0] & uapi.KVM_GUESTDBG_USE_SW_BP:
            address = BASE + self.target.memory.index(0xCC)
            self.target.regs[1]["rip"] = address
            self._exit(1, DebugExit(3, address, 0, 0))

    def _exit(self, vcpu: int, exit: DebugExit) -> None:
        threading.Thread(target=self.server.debug_exit, args=(vcpu, exit)).start()


@pytest.fixture
def served():
    target = FakeTarget()
    server = GdbServer(target, "127.0.0.1", 0, wait=True)
    server.start()
    Hardware(target, server)
    try:
        yield target, server, server._listener.getsockname()[1]
    finally:
        server.close()


def test_real_gdb_reads_registers_memory_and_hits_a_breakpoint(served):
    gdb = shutil.which("gdb")
    if gdb is None:
        pytest.skip("gdb is not installed")
    target, server, port = served
    target.memory[0x40:0x44] = b"\x90\x90\x90\xc3"
    commands = ["set architecture i386:x86-64", f"target remote 127.0.0.1:{port}", "info threads",
                "p/x $rip", "p/x $cs", "x/4xb %#x" % (BASE + 0x40), "thread 2", "p/x $rip",
                f"break *{BASE + 0x40:#x}", "continue", "p/x $rip", "stepi", "p/x $rip",
                "x/1xb %#x" % (BASE + 0x40), "detach"]
    args = [gdb, "-nx", "-batch"] + [arg for command in commands for arg in ("-ex", command)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    out = done.stdout + done.stderr
    values = {int(n): int(v, 16) for n, v in re.findall(r"^\$(\d+) = (0x[0-9a-f]+)", out, re.MULTILINE)}
    assert values == {1: BASE + 0x100, 2: 0x10, 3: BASE + 0x200, 4: BASE + 0x40, 5: BASE + 0x41}, out
    assert "0x90\t0x90\t0x90\t0xc3" in out, out  # memory, with gdb's int3 hidden
    assert "Thread 2 hit Breakpoint 1" in out, out
    assert target.memory[0x40] == 0x90 and target.resumes[-1] == [(0, [0] * 8)] * 2  # detached cleanly


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def exchange(sock: socket.socket, data: bytes) -> bytes:
    """Send `data`, return everything up to the first complete packet reply."""
    sock.sendall(data)
    reply = b""
    while not re.search(rb"\$[^#]*#..", reply):
        chunk = sock.recv(65536)
        if not chunk:
            break
        reply += chunk
    return reply


def test_hostile_bytes_then_a_real_question(served):
    target, server, port = served
    sock = connect(port)
    try:
        sock.sendall(b"\x00\xff garbage $g#00 $" + b"A" * (3 * p.PACKET_SIZE) + b"#00")
        reply = exchange(sock, p.frame(b"m" + b"f" * 100 + b",1"))  # an address of 400 bits
        assert reply == b"--+" + p.frame(b"E16")  # two bad packets nacked, the nonsense refused
        assert exchange(sock, p.frame(b"qAttached")) == b"+" + p.frame(b"1")
        assert exchange(sock, p.frame(b"m%x,2" % BASE)) == b"+" + p.frame(b"0001")
    finally:
        sock.close()


def test_gdb_going_away_removes_its_breakpoints(served):
    target, server, port = served
    sock = connect(port)
    exchange(sock, p.frame(b"Z0,%x,1" % (BASE + 8)))
    assert target.memory[8] == 0xCC
    target.resumed.clear()
    sock.close()
    assert target.resumed.wait(10)
    assert target.memory[8] == 8 and target.resumes[-1] == [(0, [0] * 8)] * 2


def test_ctrl_c_stops_a_running_guest(served):
    target, server, port = served
    sock = connect(port)
    try:
        assert exchange(sock, p.frame(b"QStartNoAckMode")) == b"+" + p.frame(b"OK")
        sock.sendall(p.frame(b"vCont;c"))
        assert target.resumed.wait(10)
        stops = target.stops
        assert exchange(sock, b"\x03") == p.frame(b"T02thread:1;")
        assert target.stops == stops + 1
    finally:
        sock.close()


def test_a_failing_kvm_call_is_an_error_reply_not_the_end(served):
    target, server, port = served

    def refuse(vcpu):
        raise OSError(5, "KVM_GET_REGS: Input/output error")

    target.registers = refuse
    sock = connect(port)
    try:
        assert exchange(sock, p.frame(b"g")) == b"+" + p.frame(b"E01")
        assert exchange(sock, p.frame(b"qAttached")) == b"+" + p.frame(b"1")
    finally:
        sock.close()


def test_real_gdb_over_a_unix_socket(tmp_path):
    gdb = shutil.which("gdb")
    if gdb is None:
        pytest.skip("gdb is not installed")
    path = tmp_path / "guest.gdb"
    path.write_bytes(b"")  # not a socket: refused, never removed
    target = FakeTarget()
    with pytest.raises(GdbStubError, match="unix:.*guest.gdb"):
        GdbServer(target, "127.0.0.1", 0, wait=True, path=str(path)).start()
    path.unlink()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # a socket nobody listens on, as a killed pyvmm leaves: replaced
    stale.close()
    server = GdbServer(target, "127.0.0.1", 0, wait=True, path=str(path))
    server.start()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        commands = ["set architecture i386:x86-64", f"target remote {path}", "p/x $rip", "detach"]
        args = [gdb, "-nx", "-batch"] + [arg for command in commands for arg in ("-ex", command)]
        done = subprocess.run(args, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        out = done.stdout + done.stderr
        assert re.search(r"^\$1 = %#x$" % (BASE + 0x100), out, re.MULTILINE), out
    finally:
        server.close()
    assert not path.exists()


def test_listening_beyond_loopback_warns(caplog):
    server = GdbServer(FakeTarget(), "0.0.0.0", 0, wait=False)
    with caplog.at_level(logging.WARNING, logger="pyvmm.gdbstub.server"):
        server.start()
    try:
        assert "without authentication: anyone who can reach that port controls the guest" in caplog.text
    finally:
        server.close()
    caplog.clear()
    server = GdbServer(FakeTarget(), "127.0.0.1", 0, wait=False)
    with caplog.at_level(logging.WARNING, logger="pyvmm.gdbstub.server"):
        server.start()
    server.close()
    assert "authentication" not in caplog.text
