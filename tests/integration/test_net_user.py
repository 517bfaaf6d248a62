"""User networking with no privilege: pyvmm runs as user nobody, no
capabilities, the sandbox on, and gives xen-netfront a network through
passt (--net user,hostfwd=...).

The run happens in a network namespace the test makes, whose only
interface is one end of a veth pair with an address and a default route
(passt takes the guest's address and gateway from the host's interface
with the default route; the testbed's L1 has only loopback). pyvmm starts
inside a private mount namespace where /root (not readable by nobody) is
covered and only the Python installation under it is bound back, and
/dev/kvm is a device node of the test's own, usable by anyone: nothing of
the machine's own permissions changes. Then setpriv drops to nobody. (In
the testbed, whose commands run chrooted, the chroot's root is first moved
onto the mount namespace's root: the kernel refuses a chrooted process the user
namespace passt makes for itself: netns.unchrooted.)

The guest gets its lease by DHCP (MTU 65520, passt's), fetches a file from
an HTTP server the test runs on the namespace's loopback (reached through
the gateway's address, which passt maps to the host), checked by SHA-256,
resolves a name with a DNS server (UDP) the test runs there too, and powers
off; pyvmm exits cleanly and no passt is left, on poweroff, on
--timeout and when pyvmm is killed with SIGKILL. A second test (slow)
takes 64 MiB from a host client through a forwarded port and sends 64 MiB
to the host's loopback, then powers off with no passt left.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import pytest

from initrd import make_test_initrd
from netns import Namespace, Transfer, dhcp_lease_script, unchrooted
from vmm import LiveGuest, xen_guest_assets

pytestmark = [pytest.mark.guest, pytest.mark.xen]

BIG = 64 * 1024 * 1024
NOBODY = 65534
HOST_ADDRESS, GATEWAY = "10.79.0.2", "10.79.0.1"
DNS_NAME, DNS_ADDRESS = "pyvmm-test.example", "10.11.12.13"  # served by serve_dns

UNPRIVILEGED = r"""
set -e
work=$1; shift
mkdir -p "$work/mnt"
mount -t tmpfs -o mode=755 pyvmm-test-dev "$work/mnt"  # /tmp may be nodev: device nodes on a mount of our own
mkdir "$work/mnt/pyenv"
mount --bind /root/.pyenv "$work/mnt/pyenv"
mknod -m 666 "$work/mnt/kvm" c "$KVM_MAJOR" "$KVM_MINOR"
mount --bind "$work/mnt/kvm" /dev/kvm
mount -t tmpfs -o mode=755 pyvmm-test-root /root
mkdir /root/.pyenv
mount --bind "$work/mnt/pyenv" /root/.pyenv
exec setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all --bounding-set=-all "$@"
"""


LEASE_SCRIPT = "\nset -e" + dhcp_lease_script() + r"""
wget -q -O /tmp/fetched "http://$router:@HTTP_PORT@/file"
echo "guest: fetched $(wc -c < /tmp/fetched) bytes sha $(sha256sum /tmp/fetched | cut -d' ' -f1)"
rm /tmp/fetched
"""

# DNS over UDP: busybox's nslookup asks the gateway's address, which passt
# maps to the host's loopback, where serve_dns answers.
FETCH_SCRIPT = LEASE_SCRIPT + r"""
answer=$(nslookup @DNS_NAME@ "$router" | sed -n '/^Name:/,$s/^Address: *//p' | head -n 1)
echo "guest: resolved @DNS_NAME@ to $answer"
echo "guest: all done"
""".replace("@DNS_NAME@", DNS_NAME)

# nc's standard input is a FIFO the shell holds open: at end-of-file nc
# would half-close at once, and Debian 12's passt takes no window update
# from a guest that has sent its FIN (docs/NETWORKING.md); a `sleep | nc`
# pipeline would keep `wait` waiting for the sleep.
TRANSFER_SCRIPT = LEASE_SCRIPT + r"""
mkfifo /tmp/hold
nc -l -p 5555 < /tmp/hold > /tmp/in &
listener=$!
exec 3> /tmp/hold
sleep 1
echo "guest: listening"
wait $listener
exec 3>&-
echo "guest: received $(wc -c < /tmp/in) bytes sha $(sha256sum /tmp/in | cut -d' ' -f1)"
rm /tmp/in
dd if=/dev/urandom of=/tmp/out bs=1M count=64 2>/dev/null
echo "guest: sent sha $(sha256sum /tmp/out | cut -d' ' -f1)"
nc "$router" @SINK_PORT@ < /tmp/out
rm /tmp/out
echo "guest: all done"
"""


@pytest.fixture(scope="module")
def assets():
    if os.geteuid() != 0:
        pytest.skip("the test makes a network namespace and a private mount namespace, then drops to nobody: "
                    "run it as root (the testbed is)")
    for tool in ("passt", "setpriv", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    return xen_guest_assets()


@pytest.fixture
def netns(request):
    namespace = Namespace(f"pyvmm-user-{os.getpid()}-{request.node.name[-10:]}")
    namespace.uplink(HOST_ADDRESS, GATEWAY)
    yield namespace
    namespace.close()


@pytest.fixture
def workdir():
    """A directory user nobody can read (pytest's tmp_path is root's alone)."""
    path = tempfile.mkdtemp(prefix="pyvmm-user-net-")
    os.chmod(path, 0o755)
    yield path
    subprocess.run(["umount", "-R", "-q", os.path.join(path, "mnt")], check=False)
    shutil.rmtree(path, ignore_errors=True)


def serve_file(netns, body):
    """An HTTP server on the namespace's loopback that serves `body` once; its port."""
    def listen():
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(900)
        return server

    server = netns.inside(listen)

    def answer():
        with server:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            with connection:
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = connection.recv(4096)
                    if not chunk:
                        return
                    request += chunk
                connection.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n"
                                   + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)

    threading.Thread(target=answer, daemon=True).start()
    return server.getsockname()[1]


def serve_dns(netns):
    """A DNS server on the namespace's loopback port 53 (UDP) that answers
    DNS_NAME's A query with DNS_ADDRESS and every other query with no
    record; the guest reaches it at the gateway's address, which passt maps
    to the host. Returns the list of names it was asked, as it fills."""
    def bind():
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        server.bind(("127.0.0.1", 53))
        server.settimeout(900)
        return server

    server = netns.inside(bind)
    asked = []

    def answer():
        with server:
            while True:
                try:
                    query, client = server.recvfrom(512)
                except OSError:
                    return
                if len(query) < 17:
                    continue
                # The question: labels up to a zero byte, then type and class.
                end = query.index(0, 12) + 5
                labels, position = [], 12
                while query[position]:
                    labels.append(query[position + 1:position + 1 + query[position]].decode(errors="replace"))
                    position += 1 + query[position]
                name, qtype = ".".join(labels), int.from_bytes(query[end - 4:end - 2], "big")
                asked.append(name)
                found = name == DNS_NAME and qtype == 1
                header = query[:2] + b"\x81\x80" + b"\x00\x01" + (b"\x00\x01" if found else b"\x00\x00") + b"\x00" * 4
                reply = header + query[12:end]
                if found:  # a pointer to the question's name, A, IN, TTL 60, 4 bytes
                    reply += b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + socket.inet_aton(DNS_ADDRESS)
                server.sendto(reply, client)

    threading.Thread(target=answer, daemon=True).start()
    return asked


def launch(assets, workdir, netns, script, net, *extra):
    kernel = os.path.join(workdir, "vmlinuz")
    shutil.copyfile(assets["vmlinuz"], kernel)
    os.chmod(kernel, 0o644)
    initrd = make_test_initrd(assets["initramfs"], tempfile.mktemp(dir=workdir, suffix=".initrd"), script)
    os.chmod(initrd, 0o644)
    args = ["run", "--xen", "--kernel", kernel, "--initrd", str(initrd),
            "--append", "console=hvc0 panic=-1 pyvmm.modules=xen-netfront", "--vcpus", "2",
            "--memory", "512M", "--no-reboot", "-v", "--net", net, *extra]
    if "--timeout" not in extra:
        args += ["--timeout", "1500"]
    device = os.stat("/dev/kvm").st_rdev
    os.environ["KVM_MAJOR"], os.environ["KVM_MINOR"] = str(os.major(device)), str(os.minor(device))
    prefix = ("ip", "netns", "exec", netns.name, *unchrooted(workdir),
              "sh", "-c", UNPRIVILEGED, "sh", workdir, "env", "HOME=/tmp")
    return LiveGuest(args, prefix=prefix)


def passt_pid(guest, timeout=300) -> int:
    return int(guest.wait_for(r"passt started \(pid (\d+)\)", timeout=timeout, stderr=True).group(1))


def passt_gone(pid, timeout=15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True  # exited; its parent is gone too, init reaps it
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def vmm_pid(guest) -> int:
    """pyvmm's own process: the one started, when ip netns exec, unshare and
    setpriv each exec the next, else the descendant running `-m pyvmm`."""
    def cmdline(pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                return handle.read().split(b"\0")
        except OSError:
            return []

    def children(pid):
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as handle:
                        if int(handle.read().rsplit(")", 1)[1].split()[1]) == pid:
                            found.append(int(entry))
                except (OSError, IndexError, ValueError):
                    pass
        return found

    queue = [guest.proc.pid]
    while queue:
        pid = queue.pop(0)
        if b"pyvmm" in cmdline(pid) and b"-m" in cmdline(pid):
            return pid
        queue += children(pid)
    raise AssertionError("no pyvmm process found")


def credentials(pid) -> tuple[int, int]:
    """(effective uid, effective capabilities) of a process."""
    with open(f"/proc/{pid}/status") as handle:
        status = handle.read()
    uid = int(re.search(r"^Uid:\s+\d+\s+(\d+)", status, re.M).group(1))
    return uid, int(re.search(r"^CapEff:\s+([0-9a-f]+)", status, re.M).group(1), 16)


def test_unprivileged_dhcp_lease_and_http_fetch_then_no_passt_left(assets, workdir, netns):
    body = random.Random(7).randbytes(3 * 1024 * 1024 + 17)
    http_port = serve_file(netns, body)
    asked = serve_dns(netns)
    script = FETCH_SCRIPT.replace("@HTTP_PORT@", str(http_port))
    with launch(assets, workdir, netns, script, "user,mac=00:16:3e:00:00:42") as guest:
        pid = passt_pid(guest)
        assert credentials(vmm_pid(guest)) == (NOBODY, 0), "pyvmm should run as nobody without capabilities"
        assert credentials(pid)[0] == NOBODY
        check_lease_and_fetch(guest, body)
        resolved = guest.wait_for(r"guest: resolved \S+ to (\S*)")
        assert resolved.group(1).decode() == DNS_ADDRESS, (asked, str(guest))
        assert DNS_NAME in asked
        guest.wait_for("guest: all done")
        guest.wait_for("pyvmm-guest: test exit 0")
        assert guest.finish() == 0, str(guest)
    assert passt_gone(pid), "passt outlived pyvmm after poweroff"


def check_lease_and_fetch(guest, body):
    lease = guest.wait_for(r"guest: lease ([0-9.]+) router ([0-9.]+) mtu (\S+)")
    assert lease.group(1).decode() == HOST_ADDRESS  # passt gives the guest the host's address
    assert lease.group(2).decode() == GATEWAY
    assert lease.group(3).decode() == "65520"
    fetched = guest.wait_for(r"guest: fetched (\d+) bytes sha ([0-9a-f]{64})")
    assert int(fetched.group(1)) == len(body)
    assert fetched.group(2).decode() == hashlib.sha256(body).hexdigest()


# Slow: 128 MiB through passt in the testbed, and hashing them in the guest.
@pytest.mark.slow
def test_unprivileged_forwarded_port_and_64mib_each_way(assets, workdir, netns):
    body = random.Random(7).randbytes(3 * 1024 * 1024 + 17)
    http_port = serve_file(netns, body)
    sink_server = netns.listen(0)
    sink_port = sink_server.getsockname()[1]
    sink = Transfer(sink_server)
    forward_port = netns.inside(lambda: _free_port())
    script = TRANSFER_SCRIPT.replace("@HTTP_PORT@", str(http_port)).replace("@SINK_PORT@", str(sink_port))
    net = f"user,mac=00:16:3e:00:00:42,hostfwd=tcp:127.0.0.1:{forward_port}-:5555"
    with launch(assets, workdir, netns, script, net) as guest:
        pid = passt_pid(guest)
        check_lease_and_fetch(guest, body)
        guest.wait_for("guest: listening")
        to_guest = random.Random(1).randbytes(BIG)
        try:
            netns.inside(lambda: _send_all(forward_port, to_guest))
        except OSError as error:
            time.sleep(10)  # the guest's own report of its side
            pytest.fail(f"sending through the forwarded port: {error}\n{guest.stdout[-6000:]}\n{guest.stderr[-6000:]}")
        received = guest.wait_for(r"guest: received (\d+) bytes sha ([0-9a-f]{64})")
        assert int(received.group(1)) == BIG
        assert received.group(2).decode() == hashlib.sha256(to_guest).hexdigest()
        sent = guest.wait_for(r"guest: sent sha ([0-9a-f]{64})").group(1).decode()
        assert sink.result() == (BIG, sent)
        guest.wait_for("guest: all done")
        guest.wait_for("pyvmm-guest: test exit 0")
        assert guest.finish() == 0, str(guest)
    assert passt_gone(pid), "passt outlived pyvmm after poweroff"


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _send_all(port, data):
    deadline = time.monotonic() + 120
    while True:
        try:
            connection = socket.create_connection(("127.0.0.1", port), timeout=240)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    with connection:
        connection.sendall(data)
        connection.shutdown(socket.SHUT_WR)
        connection.recv(1)  # until the guest closes
    return True


IDLE_SCRIPT = r"""
echo "guest: idle"
sleep 3600
"""


def test_no_passt_left_on_timeout(assets, workdir, netns):
    with launch(assets, workdir, netns, IDLE_SCRIPT, "user,hostfwd=tcp::2222-:22", "--timeout", "20") as guest:
        pid = passt_pid(guest)
        status = guest.finish(timeout=300)
    assert status == 124, str(guest)  # --timeout's exit status
    assert "Traceback" not in guest.stderr, str(guest)
    assert passt_gone(pid), "passt outlived pyvmm after --timeout"


def test_no_passt_left_when_pyvmm_is_killed(assets, workdir, netns):
    with launch(assets, workdir, netns, IDLE_SCRIPT, "user") as guest:
        pid = passt_pid(guest)
        time.sleep(3)
        vmm = vmm_pid(guest)
        os.kill(vmm, signal.SIGKILL)  # pyvmm alone, not its process group (passt is in it)
        guest.finish(timeout=120)
        assert "guest stopped" not in guest.stderr  # killed, not stopped in order
    assert passt_gone(pid), "passt outlived a SIGKILLed pyvmm"
