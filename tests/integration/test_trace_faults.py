"""Tracing and fault injection with a real guest (Debian's xen-blkfront).

- a trace of a boot with a disk holds the vbd's xenstore handshake and the
  blk requests, decoded, and `pyvmm trace show` renders it;
- a write error injected on a sector range fails, in the guest, exactly
  the O_DIRECT writes inside that range; the others (and a read of the
  range) succeed, and the image shows which writes landed;
- EAGAIN injected on the first transaction commits is retried by the
  guest's xenbus: the disk still connects and /test.sh runs to its end;
- through the control socket, a write fault added at run time fails the
  next write in its range, is counted, is cleared again, and a backend
  moved to Closing on demand makes the frontend drop its disk.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys

import pytest

from initrd import make_test_initrd
from vmm import REPO, run_pyvmm, xen_guest_assets

pytestmark = [pytest.mark.guest, pytest.mark.xen]

BOOT_TIMEOUT = 900
BLOCK = 4096
PATTERN = random.Random(20261121).randbytes(BLOCK)
WAIT_FOR = r"""
wait_for() {  # a block device node, up to 30 s
    i=0
    while [ ! -b "$1" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
    [ -b "$1" ] && echo "found $1" || echo "missing $1"
}
"""


@pytest.fixture(scope="module")
def assets():
    return xen_guest_assets()


def boot(assets, tmp_path, script, disks, extra=(), files=None):
    initrd = make_test_initrd(assets["initramfs"], tmp_path / "initrd", WAIT_FOR + script, files)
    args = ["run", "--xen", "--kernel", str(assets["vmlinuz"]), "--initrd", str(initrd),
            "--append", "console=hvc0 panic=-1 pyvmm.modules=xen-blkfront", "--no-reboot", "--timeout", "600"]
    for disk in disks:
        args += ["--disk", str(disk)]
    return run_pyvmm(*args, *extra, timeout=BOOT_TIMEOUT)


def raw_disk(tmp_path, name, size=8 << 20):
    path = tmp_path / name
    path.write_bytes(bytes(size))
    return path


def trouble(result):
    """The run's result with the console lines that tell why a boot failed
    (a panic's reason comes before a stack trace that fills Result's tail)."""
    lines = [line for line in result.stdout.splitlines()
             if re.search(r"panic|BUG|Oops|RIP:|WARNING|xenbus|blkfront|vbd", line)]
    return "\n".join(lines[-60:]) + f"\n{result}"


def read_trace(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_boot_trace_has_the_vbd_handshake_and_decoded_blk_requests(assets, tmp_path):
    disk = raw_disk(tmp_path, "disk.img")
    trace = tmp_path / "boot.trace"
    script = """
wait_for /dev/xvda
dd if=/dev/xvda of=/dev/null bs=4096 count=4 skip=100 iflag=direct 2>/dev/null && echo "read done"
"""
    result = boot(assets, tmp_path, script, [disk],
                  extra=("--trace", "xenstore,blk,evtchn,hypercall", "--trace-file", str(trace)))
    assert result.status == 0, trouble(result)
    assert "found /dev/xvda" in result.stdout and "read done" in result.stdout, str(result)
    events = read_trace(trace)

    # Linux's xenbus names the frontend's nodes relative to its domain's home.
    frontend = "device/vbd/51712/"
    guest_writes = [(e["path"].removeprefix("/local/domain/1/"), e.get("value")) for e in events
                    if e["cat"] == "xenstore" and e["ev"] == "request" and e["op"] == "WRITE" and e["domid"] == 1]
    written_keys = {path.removeprefix(frontend) for path, _ in guest_writes if path.startswith(frontend)}
    assert "event-channel" in written_keys and "state" in written_keys, guest_writes
    assert any(key.startswith("ring-ref") for key in written_keys), guest_writes
    assert (f"{frontend}state", "4") in guest_writes, "the frontend never said Connected"
    backend_states = [e["new"] for e in events if e["ev"] == "backend-state" and e["device"].endswith("/51712")]
    assert backend_states[:2] == ["INIT_WAIT", "CONNECTED"], backend_states
    assert any(e["ev"] == "watch" and e["path"].startswith("/local/domain/0/backend/vbd/1/51712")
               for e in events if e["cat"] == "xenstore"), "no watch fired on the backend's nodes"
    assert any(e["cat"] == "xenstore" and e["op"] == "TRANSACTION_START" for e in events
               if e["ev"] == "request"), "no transaction in the handshake"

    # The direct read of 4 blocks at block 100 (sector 800).
    requests = [e for e in events if e["cat"] == "blk" and e["ev"] == "request"]
    assert requests and all(e["disk"] == "xvda" for e in requests)
    ours = [e for e in requests if e["op"] == "read" and 800 <= e["sector"] < 832]
    assert sum(e["sectors"] for e in ours) == 32, ours
    responses = {e["id"]: e["status"] for e in events if e["cat"] == "blk" and e["ev"] == "response"}
    assert all(responses.get(e["id"]) == 0 for e in ours), responses
    assert any(e["cat"] == "hypercall" and e["name"] == "event_channel_op" for e in events)
    assert any(e["cat"] == "evtchn" and e["ev"] == "guest-send" for e in events)

    shown = subprocess.run([sys.executable, "-m", "pyvmm", "trace", "show", str(trace), "-c", "blk",
                            "--grep", '"op":"read"'], cwd=REPO, capture_output=True, text=True, check=True)
    lines = shown.stdout.splitlines()
    assert lines and all(" blk " in line and "op=read" in line for line in lines), shown.stdout[:2000]
    assert any("sector=800 " in line for line in lines), shown.stdout[:2000]


def test_injected_write_error_hits_exactly_its_sector_range(assets, tmp_path):
    disk = raw_disk(tmp_path, "data.img")
    trace = tmp_path / "fault.trace"
    # Block 512 of 4 KiB is sectors 4096..4103: the range that fails.
    script = r"""
wait_for /dev/xvdb
for block in 510 511 512 513 514; do
    if dd if=/pattern.bin of=/dev/xvdb bs=4096 count=1 seek=$block oflag=direct conv=notrunc 2>/dev/null; then
        echo "write $block: ok"
    else
        echo "write $block: failed"
    fi
done
dd if=/dev/xvdb of=/dev/null bs=4096 count=1 skip=512 iflag=direct 2>/dev/null && echo "read 512: ok"
"""
    result = boot(assets, tmp_path, script, [raw_disk(tmp_path, "root.img", 1 << 20), disk],
                  extra=("--fault", "blk:error,op=write,vdev=xvdb,sectors=4096-4103",
                         "--trace", "blk", "--trace-file", str(trace)),
                  files={"/pattern.bin": PATTERN})
    assert result.status == 0, trouble(result)
    out = result.stdout
    assert "found /dev/xvdb" in out, str(result)
    for block in (510, 511, 513, 514):
        assert f"write {block}: ok" in out, str(result)
    assert "write 512: failed" in out, str(result)
    assert "read 512: ok" in out, str(result)

    image = disk.read_bytes()
    for block in (510, 511, 513, 514):
        assert image[block * BLOCK:(block + 1) * BLOCK] == PATTERN, f"block {block} was not written"
    assert image[512 * BLOCK:513 * BLOCK] == bytes(BLOCK), "the failed write reached the image"

    events = read_trace(trace)
    faults = [e for e in events if e["cat"] == "fault"]
    assert faults and all(e["op"] == "write" and e["vdev"] == "xvdb" and 4096 <= e["sector"] <= 4103
                          for e in faults), faults
    failed = [e for e in events if e["cat"] == "blk" and e["ev"] == "response" and e["status"] != 0]
    assert failed and all(e["fault"] == "blk:error,op=write,vdev=xvdb,sectors=4096-4103" for e in failed), failed


def test_injected_eagain_on_commits_is_retried_and_the_boot_completes(assets, tmp_path):
    disk = raw_disk(tmp_path, "disk.img")
    trace = tmp_path / "eagain.trace"
    script = """
wait_for /dev/xvda
dd if=/dev/xvda of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null && echo "disk answers"
echo "end of test.sh"
"""
    result = boot(assets, tmp_path, script, [disk],
                  extra=("--fault", "xenstore:eagain,count=3", "--trace", "xenstore", "--trace-file", str(trace)))
    assert result.status == 0, trouble(result)
    assert "found /dev/xvda" in result.stdout and "disk answers" in result.stdout, str(result)
    assert "end of test.sh" in result.stdout, str(result)

    events = read_trace(trace)
    injected = [e for e in events if e["cat"] == "fault" and e["ev"] == "eagain"]
    assert len(injected) == 3, injected
    ends = [e for e in events if e["cat"] == "xenstore" and e["ev"] == "request" and e["op"] == "TRANSACTION_END"
            and e["domid"] == 1]
    refused = [e for e in ends if e.get("error") == "EAGAIN"]
    assert len(refused) == 3, ends
    # Every refused commit was followed by one that went through.
    last_refused = max(events.index(e) for e in refused)
    assert any(events.index(e) > last_refused and "error" not in e for e in ends), ends


def ctl(name, *args):
    """`pyvmm ctl --json NAME ARGS...`, its output parsed."""
    result = subprocess.run([sys.executable, "-m", "pyvmm", "ctl", "--json", name, *args], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_faults_added_and_cleared_at_run_time_and_backend_closing_on_demand(assets, tmp_path):
    from test_blk import LiveGuest

    disk = raw_disk(tmp_path, "data.img")
    trace = tmp_path / "live.trace"
    name = f"trace-faults-{os.getpid()}"
    script = r"""
wait_for /dev/xvdb
try_write() {
    dd if=/pattern.bin of=/dev/xvdb bs=4096 count=1 seek=$1 oflag=direct conv=notrunc 2>/dev/null \
        && echo "$2 write $1: ok" || echo "$2 write $1: failed"
}
try_write 512 before
read -t 300 -r reply
try_write 512 faulty; try_write 600 faulty
read -t 300 -r reply
try_write 512 cleared
read -t 300 -r reply
# Linux 6.1's blkfront, told the backend is closing, marks the disk dead
# (capacity 0) and closes its end.
i=0
while [ "$(cat /sys/block/xvdb/size 2>/dev/null || echo 0)" != 0 ] && [ $i -lt 300 ]; do
    sleep 0.1; i=$((i + 1))
done
echo "xvdb after closing: size=$(cat /sys/block/xvdb/size 2>/dev/null || echo none)"
try_write 520 closed
"""
    initrd = make_test_initrd(assets["initramfs"], tmp_path / "initrd", WAIT_FOR + script, {"/pattern.bin": PATTERN})
    args = ["run", "--xen", "--kernel", str(assets["vmlinuz"]), "--initrd", str(initrd), "--name", name,
            "--append", "console=hvc0 panic=-1 pyvmm.modules=xen-blkfront", "--no-reboot", "--timeout", "600",
            "--disk", str(raw_disk(tmp_path, "root.img", 1 << 20)), "--disk", str(disk),
            "--trace", "xenstore", "--trace-file", str(trace)]
    with LiveGuest(args) as guest:
        guest.wait_for("before write 512: ")
        added = ctl(name, "fault", "add", "blk:error,op=write,vdev=xvdb,sectors=4096-4103")
        guest.send(b"go\n")
        guest.wait_for("faulty write 600: ")
        rules = ctl(name, "fault", "list")
        assert [(rule["id"], rule["fired"]) for rule in rules] == [(added["id"], 1)], rules
        assert ctl(name, "fault", "clear") == {"removed": 1}
        guest.send(b"go\n")
        guest.wait_for("cleared write 512: ")
        assert ctl(name, "xenbus-state", "xvdb", "closing")["state"] == "CLOSING"
        guest.send(b"go\n")
        status = guest.finish()
        out = guest.stdout
    assert status == 0, str(guest)
    assert "before write 512: ok" in out and "faulty write 512: failed" in out, str(guest)
    assert "faulty write 600: ok" in out and "cleared write 512: ok" in out, str(guest)
    assert "xvdb after closing: size=0" in out and "closed write 520: failed" in out, str(guest)
    # The frontend answered the backend's Closing by closing its end.
    states = [(e["ev"], e.get("new") or e.get("state")) for e in read_trace(trace)
              if e["ev"] in ("backend-state", "frontend-state") and "51728" in e["device"]]
    closing = states.index(("backend-state", "CLOSING"))
    assert ("frontend-state", "CLOSED") in states[closing:], states
