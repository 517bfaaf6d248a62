"""The PV network interface: Debian's xen-netfront talks through pyvmm's vif
backend (--net tap=...) to the host's network stack, in a network
namespace the test makes (so nothing leaks into the testbed's own).

The guest pings the host side and is pinged back, moves 16 MiB over TCP in
each direction (checksums compared on both ends), runs two interfaces on
two TAP devices at once (one made beforehand, one created by pyvmm), and
reconnects after xen-netfront is unloaded and loaded again.
"""

from __future__ import annotations

import hashlib
import os
import random

import pytest

from initrd import make_test_initrd
from netns import Namespace, Transfer
from vmm import LiveGuest, xen_guest_assets

pytestmark = [pytest.mark.guest, pytest.mark.xen]

BIG = 16 * 1024 * 1024  # thousands of frames: every ring wraps many times

GUEST_FUNCTIONS = r"""
set -e
up() {  # up IFACE ADDRESS: wait for the interface, configure it
    i=0
    while ! ip link show "$1" >/dev/null 2>&1 && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
    ip link set "$1" up
    ip addr add "$2/24" dev "$1"
}
reach() {  # reach ADDRESS: ping until it answers (30 tries)
    i=0
    until ping -c 1 -W 1 "$1" >/dev/null 2>&1; do
        i=$((i + 1)); [ $i -lt 30 ] || { echo "no answer from $1"; return 1; }
    done
    echo "reached $1"
}
"""


@pytest.fixture(scope="module")
def assets():
    if os.geteuid() != 0:
        pytest.skip("the network tests make a network namespace and TAP devices: run them as root (the testbed is)")
    return xen_guest_assets()


@pytest.fixture
def netns(request):
    namespace = Namespace(f"pyvmm-test-{os.getpid()}-{request.node.name[-12:]}")
    yield namespace
    namespace.close()


def launch(assets, tmp_path, script, nets, *, vcpus=2):
    initrd = make_test_initrd(assets["initramfs"], tmp_path / "initrd", GUEST_FUNCTIONS + script)
    args = ["run", "--xen", "--kernel", str(assets["vmlinuz"]), "--initrd", str(initrd),
            "--append", "console=hvc0 panic=-1 pyvmm.modules=xen-netfront", "--vcpus", str(vcpus),
            "--memory", "512M", "--no-reboot", "--timeout", "900", "-v"]
    for net in nets:
        args += ["--net", net]
    return args


def run_in(netns, args):
    return LiveGuest(args, prefix=("ip", "netns", "exec", netns.name))


def test_ping_both_ways_16mib_each_way_and_module_reload(assets, tmp_path, netns):
    netns.tap("pvtap0", "10.77.0.1")
    to_guest = random.Random(1).randbytes(BIG)
    sink, source = netns.listen(5001), netns.listen(5002)
    receiving, sending = Transfer(sink), Transfer(source, to_guest)
    script = r"""
up eth0 10.77.0.2
reach 10.77.0.1
echo "guest: ready for ping"
read line  # the host pinged us
dd if=/dev/urandom of=/tmp/out bs=1M count=16 2>/dev/null
echo "guest: sent sha $(sha256sum /tmp/out | cut -d' ' -f1)"
nc 10.77.0.1 5001 < /tmp/out
rm /tmp/out
nc 10.77.0.1 5002 < /dev/null > /tmp/in
echo "guest: received $(wc -c < /tmp/in) bytes sha $(sha256sum /tmp/in | cut -d' ' -f1)"
rm /tmp/in
ip link set eth0 down
# A bound xenbus device holds a reference on its driver's module: unbind first.
echo vif-0 > /sys/bus/xen/drivers/vif/unbind
rmmod xen-netfront
echo "guest: unloaded"
modprobe xen-netfront
up eth0 10.77.0.2
reach 10.77.0.1
echo "guest: reconnected"
"""
    args = launch(assets, tmp_path, script, ["tap=pvtap0,mac=00:16:3e:00:00:02"])
    with run_in(netns, args) as guest:
        guest.wait_for("guest: ready for ping")
        ping = netns.run("busybox", "ping", "-c", "3", "-W", "5", "10.77.0.2", check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        neighbours = netns.run("ip", "neigh", "show", "dev", "pvtap0").stdout
        assert "00:16:3e:00:00:02" in neighbours  # the MAC given on the command line
        guest.send(b"go\n")
        sent = guest.wait_for(r"guest: sent sha ([0-9a-f]{64})").group(1).decode()
        count, sha = receiving.result()
        assert (count, sha) == (BIG, sent)
        received = guest.wait_for(r"guest: received (\d+) bytes sha ([0-9a-f]{64})")
        assert int(received.group(1)) == BIG
        assert received.group(2).decode() == hashlib.sha256(to_guest).hexdigest() == sending.result()[1]
        guest.wait_for("guest: unloaded", timeout=300)
        guest.wait_for("guest: reconnected", timeout=300)
        guest.wait_for("pyvmm-guest: test exit 0")
        assert guest.finish() == 0, str(guest)


def test_two_vifs_on_two_taps_at_once(assets, tmp_path, netns):
    netns.tap("pvtapa", "10.78.1.1")  # the other one, pvtapb, pyvmm creates
    size = 8 * 1024 * 1024
    sinks = [Transfer(netns.listen(port)) for port in (6001, 6002)]
    script = r"""
up eth0 10.78.1.2
echo "guest: second interface wanted"
read line  # the host configured pvtapb
up eth1 10.78.2.2
reach 10.78.1.1
reach 10.78.2.1
dd if=/dev/urandom of=/tmp/a bs=1M count=8 2>/dev/null
dd if=/dev/urandom of=/tmp/b bs=1M count=8 2>/dev/null
echo "guest: sha a $(sha256sum /tmp/a | cut -d' ' -f1) b $(sha256sum /tmp/b | cut -d' ' -f1)"
nc 10.78.1.1 6001 < /tmp/a & first=$!
nc 10.78.2.1 6002 < /tmp/b
wait $first
echo "guest: both sent"
"""
    args = launch(assets, tmp_path, script, ["tap=pvtapa", "tap=pvtapb"])
    with run_in(netns, args) as guest:
        guest.wait_for("guest: second interface wanted")
        netns.run("ip", "addr", "add", "10.78.2.1/24", "dev", "pvtapb")  # pyvmm made it and brought it up
        guest.send(b"go\n")
        shas = guest.wait_for(r"guest: sha a ([0-9a-f]{64}) b ([0-9a-f]{64})")
        for index, transfer in enumerate(sinks):
            assert transfer.result() == (size, shas.group(index + 1).decode())
        guest.wait_for("guest: both sent")
        guest.wait_for("pyvmm-guest: test exit 0")
        assert guest.finish() == 0, str(guest)
    assert "pvtapb" not in netns.run("ip", "link", "show").stdout  # created by pyvmm, gone with it
