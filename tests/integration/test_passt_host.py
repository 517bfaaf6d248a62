"""pyvmm's passt launcher against the real passt, no KVM needed: a DHCP
exchange over the stream socket, passt's end with the socket (closed, or
its starter SIGKILLed), a forward to a port in use, passt missing, and
`pyvmm run --net user,...` refusing bad input in one line.

passt takes the guest's addresses from the host's interface with the
default route; where there is none (the testbed's L1) the tests that start
passt are skipped with that reason."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time

import pytest

from vmm import REPO, run_pyvmm

from pyvmm.xen.backends.net.passt import PasstError, open_user_network, start_passt
from pyvmm.xen.backends.net.spec import parse_net_option
from pyvmm.xen.backends.net.stream import encode_length

MAC = bytes.fromhex("00163e0a0b0c")


def has_default_route() -> bool:
    try:
        with open("/proc/net/route") as routes:
            return any(line.split()[1] == "00000000" for line in routes.readlines()[1:])
    except OSError:
        return False


needs_passt = pytest.mark.skipif(not os.path.exists("/usr/bin/passt") and not any(
    os.path.exists(os.path.join(d, "passt")) for d in os.environ.get("PATH", "").split(":")),
    reason="passt is not installed (Debian: apt install passt)")
needs_route = pytest.mark.skipif(not has_default_route(),
                                 reason="no default route: passt has no interface to take addresses from")


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def dhcp_discover() -> bytes:
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, 0x5A5A1234, 0, 0x8000, bytes(4), bytes(4),
                        bytes(4), bytes(4), MAC + bytes(10), b"", b"")
    bootp += b"\x63\x82\x53\x63" + bytes([53, 1, 1, 255])
    udp = struct.pack("!HHHH", 68, 67, 8 + len(bootp), 0) + bootp
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, bytes(4), b"\xff" * 4))
    ip[10:12] = checksum(bytes(ip)).to_bytes(2, "big")
    return b"\xff" * 6 + MAC + b"\x08\x00" + bytes(ip) + udp


def dhcp_offer(frames) -> tuple[str, int] | None:
    """(the address offered, the MTU option or 0) of the first DHCP OFFER for us among `frames`."""
    for frame in frames:
        if frame[12:14] != b"\x08\x00" or frame[23] != 17:
            continue
        ihl = (frame[14] & 0x0F) * 4
        udp = frame[14 + ihl:]
        if struct.unpack("!H", udp[2:4])[0] != 68:
            continue
        bootp = udp[8:]
        if bootp[0] != 2 or bootp[28:34] != MAC or bootp[4:8] != struct.pack("!I", 0x5A5A1234):
            continue
        options, mtu, kind = bootp[240:], 0, None
        position = 0
        while position < len(options) and options[position] != 255:
            code = options[position]
            if code == 0:
                position += 1
                continue
            length = options[position + 1]
            value = options[position + 2:position + 2 + length]
            if code == 53:
                kind = value[0]
            elif code == 26:
                mtu = struct.unpack("!H", value)[0]
            position += 2 + length
        if kind == 2:
            return socket.inet_ntoa(bootp[16:20]), mtu
    return None


def read_frames(sock: socket.socket, timeout: float = 10.0, want=lambda frames: False):
    """Frames from a raw (blocking) passt socket until `want(frames)` or the timeout."""
    frames, buffer = [], b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not want(frames):
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = sock.recv(1 << 16)
        except socket.timeout:
            break
        if not chunk:
            break
        buffer += chunk
        while len(buffer) >= 4 and len(buffer) >= 4 + struct.unpack(">I", buffer[:4])[0]:
            length = struct.unpack(">I", buffer[:4])[0]
            frames.append(buffer[4:4 + length])
            buffer = buffer[4 + length:]
    return frames


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@needs_passt
@needs_route
def test_dhcp_through_pyvmms_passt_and_passt_ends_with_the_socket():
    spec = parse_net_option(f"user,hostfwd=tcp:127.0.0.1:{free_port()}-:80")
    sock, passt = start_passt(spec)
    try:
        sock.sendall(encode_length(len(dhcp_discover())) + dhcp_discover())
        frames = read_frames(sock, want=lambda frames: dhcp_offer(frames) is not None)
        offer = dhcp_offer(frames)
        assert offer is not None, f"no DHCP offer in {len(frames)} frames"
        address, mtu = offer
        assert address != "0.0.0.0" and mtu == 65520  # passt's default: large frames instead of GSO
        assert alive(passt.pid)
    finally:
        sock.close()
    assert wait_gone(passt.pid), "passt still runs after its socket closed"
    passt.stop(may_wait=True)
    assert passt.process.returncode == 0


@needs_passt
@needs_route
def test_shared_user_network_lives_while_it_has_users():
    spec = parse_net_option("user")
    first = open_user_network(spec, ("host-test", 0))
    second = open_user_network(spec, ("host-test", 0))  # the next boot's vif, built before the last one closes
    assert second is first and first.users == 2
    pid = first.process.pid
    first.release()
    assert alive(pid) and not first.stream.eof
    second.release()
    assert not alive(pid)  # waited for: gone at once


STARTER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from pyvmm.xen.backends.net.passt import start_passt
    from pyvmm.xen.backends.net.spec import parse_net_option
    sock, passt = start_passt(parse_net_option("user"))
    print(passt.pid, flush=True)
    time.sleep(600)
""")


@needs_passt
@needs_route
def test_no_stray_passt_after_its_starter_is_killed():
    starter = subprocess.Popen([sys.executable, "-c", STARTER.format(repo=str(REPO))], stdout=subprocess.PIPE,
                               text=True)
    try:
        pid = int(starter.stdout.readline())
        assert alive(pid)
        starter.send_signal(signal.SIGKILL)
        starter.wait()
        assert wait_gone(pid), f"passt {pid} outlived the process that started it"
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait()


@needs_passt
@needs_route
def test_a_forward_to_a_port_in_use_is_one_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        spec = parse_net_option(f"user,hostfwd=tcp:127.0.0.1:{port}-:80")
        with pytest.raises(PasstError) as caught:
            start_passt(spec)
    message = str(caught.value)
    assert "\n" not in message and f"{port}" in message and "in use" in message, message
    assert message.startswith(f"--net 'user,hostfwd=tcp:127.0.0.1:{port}-:80': passt did not start")
    assert not subprocess.run(["pgrep", "-f", f"passt.*{port}:80"], capture_output=True).stdout


def test_passt_missing_is_named(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(PasstError, match="passt is not installed.*apt install passt"):
        start_passt(parse_net_option("user"))


def test_connecting_to_no_passt_says_so(tmp_path):
    with pytest.raises(PasstError, match="cannot connect to passt at .*start it first"):
        open_user_network(parse_net_option(f"user,socket={tmp_path / 'none.sock'}"), ("host-test", 1))


@pytest.mark.parametrize("net, message", [
    ("user,hostfwd=tcp::22", "hostfwd 'tcp::22': expected"),
    ("user,hostfwd=tcp::22-10.0.2.15:22", "the guest's address cannot be chosen"),
])
def test_pyvmm_run_refuses_bad_hostfwd_in_one_line(tmp_path, net, message):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"\0" * 4096)
    result = run_pyvmm("run", "--kernel", str(kernel), "--net", net, timeout=120)
    assert result.status != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_pyvmm_run_without_passt_names_the_package(tmp_path):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"\0" * 4096)
    env_path = os.path.dirname(sys.executable)  # python, but no passt
    proc = subprocess.run([sys.executable, "-m", "pyvmm", "run", "--kernel", str(kernel), "--net", "user"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "PATH": env_path})
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "apt install passt" in lines[0], proc.stderr
