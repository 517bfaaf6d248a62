"""A Xen guest under the sandbox (docs/SANDBOX.md), which is on by default:
disk, network, console, control socket, xenstore socket and gdb on loopback
all work while the VMM runs as nobody with no capabilities and its seccomp
filter, and keep working across a guest reboot (the first boot's disk, TAP
and sockets are kept for the second)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from initrd import make_test_initrd
from netns import Namespace
from test_blk import WAIT_FOR, debugfs_cat, make_image
from test_net import GUEST_FUNCTIONS
from vmm import REPO, LiveGuest, xen_guest_assets

pytestmark = [pytest.mark.guest, pytest.mark.xen]

KNOWN = b"the sandbox lets the disk through\n"

# First boot: disk, network, then the host's checks, then a reboot. The
# second boot finds the marker the first wrote, checks disk and network
# again and ends the test.
SCRIPT = WAIT_FOR + GUEST_FUNCTIONS + r"""
wait_for /dev/xvda
mount /dev/xvda /mnt
up eth0 10.79.0.2
reach 10.79.0.1
if [ -f /mnt/marker ]; then
    echo "guest: second boot sees $(cat /mnt/marker)"
    read line  # the host has checked the VMM from outside again
    echo "second boot" > /mnt/second.txt
    umount /mnt
    sync
    echo "guest: second boot done"
    exit 0
fi
echo "guest: disk says $(cat /mnt/known.txt)"
echo "first boot" > /mnt/marker
umount /mnt
sync
echo "guest: ready"
read line  # the host has checked the VMM from outside
echo "guest: rebooting"
reboot -f
"""


@pytest.fixture(scope="module")
def assets():
    if os.geteuid() != 0:
        pytest.skip("this test makes a network namespace and a TAP device: run it as root (the testbed is)")
    return xen_guest_assets()


@pytest.fixture
def netns():
    namespace = Namespace(f"pyvmm-sbx-{os.getpid()}")
    yield namespace
    namespace.close()


def ctl(name, *args, options=()):
    return subprocess.run([sys.executable, "-m", "pyvmm", "ctl", *options, name, *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO)


def vmm_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as file:
        return dict(line.rstrip("\n").split(":\t", 1) for line in file if ":\t" in line)


def check_from_outside(netns, name, xenstore_socket, gdb_port):
    """What the host's operator and tools do, and what the VMM process is."""
    status = ctl(name, "status", options=("--json",))
    assert status.returncode == 0, status.stderr
    pid = json.loads(status.stdout)["pid"]
    proc = vmm_status(pid)
    assert proc["Seccomp"] == "2" and proc["NoNewPrivs"] == "1", proc
    assert proc["Uid"].split() == ["65534"] * 4, proc
    assert int(proc["CapEff"], 16) == 0 and int(proc["CapBnd"], 16) == 0, proc
    # The xenstore socket, through Debian's tools as root.
    if shutil.which("xenstore-read"):
        env = dict(os.environ, XENSTORED_PATH=str(xenstore_socket))
        read = subprocess.run(["xenstore-read", "/local/domain/1/name"], env=env, capture_output=True, text=True,
                              timeout=60)
        assert read.returncode == 0 and read.stdout.strip() == name, read
    assert ctl(name, "xenstore", "read", "/local/domain/1/name").stdout.strip() == name
    # gdb on loopback, inside the VMM's network namespace: stop, look, go on.
    if shutil.which("gdb"):
        gdb = netns.run("gdb", "-nx", "-batch", "-ex", "set architecture i386:x86-64", "-ex",
                        f"target remote 127.0.0.1:{gdb_port}", "-ex", "info registers rip", "-ex", "detach",
                        check=False, timeout=300)
        assert re.search(r"^rip\s+0x", gdb.stdout, re.MULTILINE), gdb.stdout + gdb.stderr
    # The network, from the host's side.
    ping = netns.run("busybox", "ping", "-c", "2", "-W", "5", "10.79.0.2", check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr


def test_disk_net_console_sockets_and_gdb_under_the_sandbox_across_a_reboot(assets, tmp_path, netns):
    netns.tap("sbxtap0", "10.79.0.1")
    image = make_image(tmp_path, "disk.img", {"known.txt": KNOWN})
    initrd = make_test_initrd(assets["initramfs"], tmp_path / "initrd", SCRIPT)
    name = f"sbx-guest-{os.getpid()}"
    xenstore_socket = tmp_path / "xs.sock"
    args = ["run", "--xen", "--kernel", str(assets["vmlinuz"]), "--initrd", str(initrd),
            "--append", "console=hvc0 panic=-1 pyvmm.modules=xen-blkfront,xen-netfront", "--vcpus", "2",
            "--memory", "512M", "--timeout", "1200", "-v", "--name", name,
            "--disk", str(image), "--net", "tap=sbxtap0,mac=00:16:3e:00:00:09",
            "--xenstore-socket", str(xenstore_socket), "--gdb", "tcp:127.0.0.1:0"]
    with LiveGuest(args, prefix=("ip", "netns", "exec", netns.name)) as guest:
        guest.wait_for(r"guest: ready")
        assert f"guest: disk says {KNOWN.decode().strip()}" in guest.stdout, str(guest)
        stderr = guest.stderr
        port = re.search(r"gdb stub listening on tcp:127\.0\.0\.1:(\d+)", stderr)
        assert port, stderr
        assert "sandbox: locked down as uid 65534" in stderr, stderr
        check_from_outside(netns, name, xenstore_socket, int(port.group(1)))
        guest.send(b"go\n")
        guest.wait_for(r"guest: second boot sees first boot")
        # The second boot serves the same sockets, on the kept listeners.
        status = ctl(name, "status", options=("--json",))
        assert status.returncode == 0 and json.loads(status.stdout)["reboots"] == 1, (status, guest.stderr[-4000:])
        check_from_outside(netns, name, xenstore_socket, int(port.group(1)))
        guest.send(b"go\n")
        guest.wait_for(r"guest: second boot done")
        guest.wait_for(r"pyvmm-guest: test exit 0")
        assert guest.finish() == 0, str(guest)
        final = guest.stderr
    assert "forbidden system call" not in final and "sandbox allows no new" not in final, final[-4000:]
    assert debugfs_cat(image, "/second.txt") == b"second boot\n"
    assert not xenstore_socket.exists(), "the xenstore socket was left behind"
