"""Network namespaces and TCP endpoints for guests on TAP devices (tests and
scripts/bench-net): the host side of a guest's network, kept out of the
machine's own."""

from __future__ import annotations

import ctypes
import hashlib
import socket
import subprocess
import sys
import threading
import time

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class Namespace:
    """A network namespace of our own; close() removes it."""

    def __init__(self, name):
        self.name = name
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.run("ip", "link", "set", "lo", "up")

    def run(self, *command, check=True, timeout=120):
        return subprocess.run(["ip", "netns", "exec", self.name, *command], check=check, capture_output=True,
                              text=True, timeout=timeout)

    def tap(self, name, address):
        """A persistent TAP device with the host's address on it."""
        self.run("ip", "tuntap", "add", "dev", name, "mode", "tap")
        self.run("ip", "addr", "add", f"{address}/24", "dev", name)

    def uplink(self, address, gateway):
        """A veth pair whose end uplink0 has `address` and the default route
        via `gateway`: what passt copies for its guest (it takes the host
        interface with the default route)."""
        self.run("ip", "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink1")
        self.run("ip", "addr", "add", f"{address}/24", "dev", "uplink0")
        self.run("ip", "link", "set", "uplink0", "up")
        self.run("ip", "link", "set", "uplink1", "up")
        self.run("ip", "route", "add", "default", "via", gateway)

    def inside(self, function):
        """`function()` called on a thread that entered the namespace (what
        it makes, e.g. a socket, stays there); its result or its exception."""
        result = {}

        def enter_and_call():
            try:
                with open(f"/run/netns/{self.name}") as handle:
                    if _libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                result["value"] = function()
            except Exception as error:  # handed to the caller
                result["error"] = error

        thread = threading.Thread(target=enter_and_call)
        thread.start()
        thread.join()
        if "error" in result:
            raise result["error"]
        return result["value"]

    def listen(self, port):
        """A TCP listening socket inside the namespace."""
        def listen():
            server = socket.socket()
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(("0.0.0.0", port))
            server.listen(1)
            server.settimeout(600)
            return server

        return self.inside(listen)

    def close(self):
        subprocess.run(["ip", "netns", "del", self.name], check=False)


class Transfer(threading.Thread):
    """One TCP connection to a listening socket: receive everything (sink)
    or send `data` (source); the SHA-256 of what went through, and how long
    it took: a sink from its first byte to the peer's end of stream, a
    source from the connection to the peer closing after it read the end.
    With `digest=False` (benchmarks) nothing is hashed; `data` may then be
    an int, the number of zero bytes to send."""

    CHUNK = 1 << 20

    def __init__(self, server, data=None, *, digest=True):
        super().__init__(daemon=True)
        self.server, self.data, self.digest = server, data, digest
        self.sha = self.error = None
        self.count = 0
        self.seconds = None
        self.start()

    def run(self):
        digest = hashlib.sha256() if self.digest else None
        try:
            connection, _ = self.server.accept()
            with connection:
                connection.settimeout(600)
                if self.data is None:
                    chunk = connection.recv(self.CHUNK)
                    started = time.monotonic()
                    while chunk:
                        if digest:
                            digest.update(chunk)
                        self.count += len(chunk)
                        chunk = connection.recv(self.CHUNK)
                else:
                    started = time.monotonic()
                    self._send(connection, digest)
                    connection.shutdown(socket.SHUT_WR)
                    while connection.recv(self.CHUNK):
                        pass
            self.seconds = time.monotonic() - started
            self.sha = digest.hexdigest() if digest else None
        except Exception as error:
            self.error = error

    def _send(self, connection, digest):
        if isinstance(self.data, int):
            block = memoryview(bytes(self.CHUNK))
            left = self.data
            while left:
                connection.sendall(block[: min(left, self.CHUNK)])
                left -= min(left, self.CHUNK)
        else:
            connection.sendall(self.data)
            if digest:
                digest.update(self.data)
        self.count = self.data if isinstance(self.data, int) else len(self.data)

    def result(self, timeout=600):
        self.join(timeout)
        assert self.error is None and not self.is_alive(), f"transfer failed: {self.error or 'timed out'}"
        return self.count, self.sha


def dhcp_lease_script(failure: str = "exit 1") -> str:
    """Guest shell (busybox): eth0 up with a DHCP lease, the server's MTU
    applied, "guest: lease IP router R mtu M" printed, $router set;
    `failure` runs when no lease comes."""
    return r"""
cat > /tmp/lease.sh <<'EOF'
#!/bin/sh
case "$1" in
bound|renew)
    [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    ip route add default via "$router" dev "$interface"
    echo "guest: lease $ip router $router mtu ${mtu:-none}"
    ;;
esac
EOF
chmod +x /tmp/lease.sh
i=0
while ! ip link show eth0 >/dev/null 2>&1 && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
ip link set eth0 up
udhcpc -i eth0 -s /tmp/lease.sh -O mtu -n -q -t 20 -T 3 || { FAILURE; }
router=$(ip route | sed -n 's/^default via \([0-9.]*\).*/\1/p')
""".replace("FAILURE", failure)


# Runs as root in a private mount namespace (unchrooted() below). A chrooted process may
# not make a user namespace (the kernel's rule), and passt makes one to
# sandbox itself; the testbed runs its commands chrooted into the host's
# root. So, as switch_root does, the chroot's root mount is moved onto / of
# this namespace and made the root: the same files, no longer a chroot.
SWITCH_ROOT = r"""
import ctypes, os, sys
here, work, command = os.getcwd(), sys.argv[1], sys.argv[2:]
root = os.stat("/")
try:
    real = os.stat("/proc/1/root")
except OSError:  # not ours to look at (a container): taken as not chrooted
    real = root
if (root.st_dev, root.st_ino) != (real.st_dev, real.st_ino):
    libc = ctypes.CDLL(None, use_errno=True)
    top = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    escape = os.path.join(work, "escape")
    os.makedirs(escape, exist_ok=True)
    os.chroot(escape)
    os.fchdir(top)
    for _ in range(64):
        os.chdir("..")
    os.chroot(".")
    names = [name for name in os.listdir("/") if os.path.isdir("/" + name)
             and (os.stat("/" + name).st_dev, os.stat("/" + name).st_ino) == (root.st_dev, root.st_ino)]
    if len(names) != 1:
        sys.exit(f"switch-root: cannot find the chroot's root among {sorted(os.listdir('/'))}")
    os.chdir("/" + names[0])
    if libc.mount(b".", b"/", None, 8192, None) != 0:  # MS_MOVE
        sys.exit(f"switch-root: mount --move: {os.strerror(ctypes.get_errno())}")
    os.chroot(".")
    os.chdir(here)
os.execvp(command[0], command)
"""


def unchrooted(workdir: str) -> list[str]:
    """A command prefix that runs the rest of the command, as root, in a
    private mount namespace that is not a chroot (SWITCH_ROOT); `workdir` is
    a scratch directory for the escape. Needed for passt, and for anything
    that starts it, under the testbed."""
    return ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", SWITCH_ROOT, workdir]
