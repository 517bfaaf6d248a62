"""A Linux Xen guest snapshotted in the middle of its I/O and restored twice
at once (docs/SNAPSHOTS.md): what a CI system that boots once and tests
many times does.

The guest has a PV disk and two PV NICs. When the snapshot is taken it is
running fio (random writes with verify, libaio, queue depth 8) on the disk
and a TCP stream from its first NIC to its second: the second NIC sits in
a network namespace of the guest's own, and the host only bridges the two
TAP devices, so both ends of the connection are in the guest and survive
the restore with it (a connection to a host process could not: that
process's end is not in the snapshot). It also holds a xenstore watch.

The run stops at its snapshot; the disk image is copied twice; two VMs
are restored from the one file at the same time, each with its own disk
copy and its own namespace with the same two TAP devices. Each must: finish
fio with every block verified, finish the stream with the checksum the
sender computed, see its watch fire when the host writes the key through
`pyvmm ctl`, answer `pyvmm ctl` status, and power off with status 0.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import ExitStack

import pytest

from initrd import XS_SHELL, decompressed_initrd, make_test_initrd
from netns import Namespace
from vmm import REPO, LiveGuest, xen_guest_assets

pytestmark = [pytest.mark.guest, pytest.mark.xen, pytest.mark.slow]

DISK_MIB = 64
FIO_MIB = 32
STREAM_MIB = 32
MARKER = "inflight: both running"
NETWORK = "10.81.0"

sys.path.insert(0, str(REPO / "scripts"))
from benchlib import load_script  # noqa: E402

blk = load_script("bench-blk")
FIO = f"{blk.GUEST_FIO_DIR}/lib/{blk.LOADER} --library-path {blk.GUEST_FIO_DIR}/lib {blk.GUEST_FIO_DIR}/fio"

# xs_watch PATH TOKEN on descriptor 4 of /dev/xen/xenbus (XS_WATCH is 4);
# every read of that descriptor that names PATH is a watch event.
GUEST_SCRIPT = XS_SHELL + rf"""
chmod 755 {blk.GUEST_FIO_DIR}/fio {blk.GUEST_FIO_DIR}/lib/{blk.LOADER}
[ -e /dev/xen/xenbus ] || {{ modprobe xenfs; mount -t xenfs xenfs /proc/xen; }} 2>/dev/null
fail() {{ echo "inflight-error: $*"; exit 1; }}
up() {{
    i=0
    while ! ip link show "$1" >/dev/null 2>&1 && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
    ip link set "$1" up && ip addr add "$2/24" dev "$1"
}}
i=0; while [ ! -b /dev/xvda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
[ -b /dev/xvda ] || fail "no /dev/xvda"

# The stream's receiving end: eth1 in a network namespace of its own.
up eth0 {NETWORK}.2 || fail "eth0"
unshare -n sleep 100000 & peer=$!
# Until unshare has run, $peer is still in our namespace and a move would go nowhere.
i=0; while [ "$(readlink /proc/$peer/ns/net)" = "$(readlink /proc/self/ns/net)" ] && [ $i -lt 100 ]; do
    sleep 0.1; i=$((i + 1)); done
i=0; while ! ip link show eth1 >/dev/null 2>&1 && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
ip link set eth1 netns $peer || fail "eth1 into a namespace"
nsenter -t $peer -n sh -c 'ip link set lo up; ip link set eth1 up; ip addr add {NETWORK}.3/24 dev eth1' \
    || fail "eth1 address"
i=0; until ping -c 1 -W 1 {NETWORK}.3 >/dev/null 2>&1; do i=$((i + 1)); [ $i -lt 60 ] || fail "no path eth0 -> eth1"; done
nsenter -t $peer -n sh -c 'sleep 100000 | nc -l -p 7000 | {{ sha256sum > /tmp/rx.part; mv /tmp/rx.part /tmp/rx; }}' &
dd if=/dev/urandom of=/tmp/chunk bs=1M count=1 2>/dev/null
sent=$(for i in $(seq {STREAM_MIB}); do cat /tmp/chunk; done | sha256sum | cut -d' ' -f1)

# The watch, before the snapshot: the restored guests must keep it.
domid=$(xs 2 domid)
path=/local/domain/$domid/data/poke
exec 4<>/dev/xen/xenbus
len=$(( ${{#path}} + 1 + 4 + 1 ))  # PATH NUL poke NUL
printf "\004\000\000\000\000\000\000\000\000\000\000\000\\$(printf %03o $len)\000\000\000$path\000poke\000" >&4
( while :; do
    dd bs=4096 count=1 <&4 2>/dev/null | tr '\000' '\n' | grep -q "^$path\$" || continue
    value=$(xs 2 data/poke)
    echo "inflight: watch fired value=$value"
    case "$value" in restored-*) touch /tmp/poked ;; esac
  done ) &

# fio and the stream, paced so that both are still going when the snapshot is taken.
{FIO} --name=inflight --filename=/dev/xvda --rw=randwrite --bsrange=4k-64k --size={FIO_MIB}m \
    --direct=1 --ioengine=libaio --iodepth=8 --verify=crc32c --verify_fatal=1 --rate=2m \
    --output=/tmp/fio.out > /dev/null 2> /tmp/fio.err &
fio=$!
( for i in $(seq {STREAM_MIB}); do cat /tmp/chunk; sleep 0.2; done ) | nc {NETWORK}.3 7000 &
stream=$!
sleep 3
echo "{MARKER}"

wait $fio; echo "inflight: fio status $?"
grep -E 'err=|verify' /tmp/fio.out | sed 's/^/inflight-fio: /'
sed 's/^/inflight-fio: /' /tmp/fio.err
wait $stream; echo "inflight: stream sender status $?"
i=0; while [ ! -e /tmp/rx ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
echo "inflight: stream sent=$sent received=$(cut -d' ' -f1 /tmp/rx 2>/dev/null)"
echo "inflight: waiting for the host's poke"
i=0; while [ ! -e /tmp/poked ] && [ $i -lt 3000 ]; do sleep 0.1; i=$((i + 1)); done
[ -e /tmp/poked ] || fail "the watch did not fire after the restore"
"""


@pytest.fixture(scope="module")
def assets():
    if os.geteuid() != 0:
        pytest.skip("the test makes network namespaces and TAP devices: run it as root (the testbed is)")
    return xen_guest_assets()


@pytest.fixture
def fio_initrd(assets, tmp_path):
    """The guest initramfs with fio (built by `scripts/bench --prepare`: the
    testbed has no network to download it), uncompressed, plus our script."""
    try:
        base = blk.fio_initrd()
    except Exception as error:  # noqa: BLE001 - any failure to fetch fio means the same
        if os.environ.get("PYVMM_REQUIRE_GUEST"):
            raise
        pytest.skip(f"no fio for the guest (run scripts/bench --prepare on a host with Debian's archive): {error}")
    packed = make_test_initrd(base, tmp_path / "initrd.cpio.gz", GUEST_SCRIPT)
    return decompressed_initrd(packed, tmp_path / "initrd.cpio")


def bridged_taps(name: str) -> Namespace:
    """A namespace whose bridge joins TAP devices pvtapa and pvtapb: the
    guest's two NICs see each other and nothing else."""
    namespace = Namespace(name)
    try:
        namespace.run("ip", "link", "add", "br0", "type", "bridge")
        for tap in ("pvtapa", "pvtapb"):
            namespace.run("ip", "tuntap", "add", "dev", tap, "mode", "tap")
            namespace.run("ip", "link", "set", tap, "master", "br0")
            namespace.run("ip", "link", "set", tap, "up")
        namespace.run("ip", "link", "set", "br0", "up")
    except Exception:
        namespace.close()
        raise
    return namespace


def pyvmm_ctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyvmm", "ctl", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_fio_and_a_tcp_stream_in_flight_go_on_in_two_restored_vms_at_once(assets, fio_initrd, tmp_path,
                                                                          monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run_dir))
    snapshot = tmp_path / "inflight.snap"
    disk = tmp_path / "disk.img"
    with disk.open("wb") as image:
        image.truncate(DISK_MIB << 20)
    nets = ["--net", "tap=pvtapa", "--net", "tap=pvtapb"]
    tag = f"{os.getpid()}"

    # The first run: booted, snapshotted at the marker with everything in flight, stopped.
    with ExitStack() as stack:
        first_ns = bridged_taps(f"pyvmm-inflight-{tag}-0")
        stack.callback(first_ns.close)
        args = ["run", "--kernel", str(assets["vmlinuz"]), "--initrd", str(fio_initrd),
                "--append", "console=hvc0 panic=-1 pyvmm.modules=xen-blkfront,xen-netfront",
                "--vcpus", "2", "--memory", "512M", "--disk", str(disk), *nets, "--name", f"inflight-{tag}",
                "--no-reboot", "--timeout", "900", "--snapshot-on", f"{MARKER},stop",
                "--snapshot-file", str(snapshot), "-v"]
        with LiveGuest(args, prefix=("ip", "netns", "exec", first_ns.name)) as first:
            status = first.finish()
        assert status == 0 and "snapshot written" in first.stderr, str(first)
        assert MARKER in first.stdout and "inflight: fio status" not in first.stdout, str(first)
    copies = []
    for index in (1, 2):
        copy = tmp_path / f"disk-{index}.img"
        shutil.copyfile(disk, copy)
        copies.append(copy)

    # Two VMs from the one file at the same time, each with its own disk and TAP devices.
    with ExitStack() as stack:
        guests = []
        for index, copy in enumerate(copies, start=1):
            namespace = bridged_taps(f"pyvmm-inflight-{tag}-{index}")
            stack.callback(namespace.close)
            name = f"inflight-{tag}-r{index}"
            guest = LiveGuest(["run", "--restore", str(snapshot), "--name", name, "--disk", str(copy), *nets,
                               "--no-reboot", "--timeout", "900", "-v"],
                              prefix=("ip", "netns", "exec", namespace.name))
            stack.enter_context(guest)
            guests.append((name, guest))
        for name, guest in guests:
            guest.wait_for("inflight: waiting for the host's poke", timeout=900)
            status = json.loads(pyvmm_ctl("--json", name, "status").stdout)
            assert status["state"] == "running", status
            written = pyvmm_ctl(name, "xenstore", "write", "/local/domain/1/data/poke", f"restored-{name}")
            assert written.returncode == 0, written
        for name, guest in guests:
            guest.wait_for(f"inflight: watch fired value=restored-{name}", timeout=300)
            assert guest.finish() == 0, str(guest)
            out = guest.stdout
            assert "Linux version" not in out, guest  # it went on; it did not boot again
            assert re.search(r"inflight: fio status 0\b", out), str(guest)
            assert not re.search(r"inflight-fio: .*(err= *[1-9]|verify: bad|bad magic)", out), str(guest)
            assert "inflight: stream sender status 0" in out, str(guest)
            stream = re.search(r"inflight: stream sent=([0-9a-f]{64}) received=(\S*)", out)
            assert stream and stream.group(1) == stream.group(2), str(guest)
            assert "inflight-error" not in out and "pyvmm-guest: test exit 0" in out, str(guest)
