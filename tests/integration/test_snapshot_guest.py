"""Snapshots of a Linux Xen guest (the Debian kernel, console only: no PV
disk or NIC), in the testbed (docs/SNAPSHOTS.md).

A snapshot that cannot be written fails loudly, leaves no file behind and
the guest running. The guest's snapshot taken at a console marker is
restored into a new process and its shell goes on: it answers what is
typed, and its monotonic clock did not jump over the time the snapshot sat
on disk. (With a PV disk and NICs busy: test_snapshot_inflight.py.)
"""

from __future__ import annotations

import os
import re
import time

import pytest

from initrd import make_test_initrd
from vmm import LiveGuest, run_pyvmm, xen_guest_assets

pytestmark = [pytest.mark.guest, pytest.mark.xen]

BOOT_TIMEOUT = 900

# Guest physical page 0's first bytes, through /dev/mem (x86 lets it read
# the first megabyte): a restore once wrote Xen's hypercall page there.
PAGE0 = "page0=$(dd if=/dev/mem bs=16 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n')"

# The guest's shell: it prints page 0 and its uptime once ready, then runs
# what the console types, one line at a time, and ticks meanwhile.
SHELL = r"""
echo "{page0}"
echo "ready uptime=$(cut -d' ' -f1 /proc/uptime)"
( i=0; while :; do i=$((i + 1)); echo "tick $i"; sleep 1; done ) &
while read -r line; do
    eval "$line"
done
""".replace("{page0}", PAGE0)


@pytest.fixture(scope="module")
def assets():
    return xen_guest_assets()


@pytest.fixture(autouse=True)
def runtime_dir(tmp_path, monkeypatch):
    directory = tmp_path / "run"
    directory.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(directory))


def guest_args(assets, initrd, *extra) -> list[str]:
    return ["run", "--kernel", str(assets["vmlinuz"]), "--initrd", str(initrd), "--append", "console=hvc0",
            "--memory", "512M", "--timeout", "800", *extra]


def ticks(guest: LiveGuest) -> int:
    found = re.findall(r"tick (\d+)", guest.stdout)
    return int(found[-1]) if found else 0


def test_a_failed_snapshot_is_loud_and_the_guest_runs_on(assets, tmp_path):
    """The marker's snapshot is written while the guest runs on; a snapshot
    into a file that is not empty fails: one line that says why, the guest
    going on as it was."""
    from pyvmm.control.server import ControlClient, ControlError
    from pyvmm.core.runtime import control_socket_path

    initrd = make_test_initrd(assets["initramfs"], tmp_path / "initrd", SHELL)
    marked = tmp_path / "at-marker.snap"
    with LiveGuest(guest_args(assets, initrd, "--name", "snapguest", "--snapshot-on", "ready uptime",
                              "--snapshot-file", str(marked))) as guest:
        guest.wait_for("tick 2", timeout=BOOT_TIMEOUT)
        guest.wait_for("snapshot written to", timeout=300, stderr=True)
        assert os.path.getsize(marked) > 0
        # A snapshot into a file that is not empty fails.
        used = tmp_path / "used"
        used.write_bytes(b"not empty")
        fd = os.open(used, os.O_RDWR)
        try:
            with ControlClient(control_socket_path("snapguest"), timeout=300) as client:
                with pytest.raises(ControlError, match="must be empty") as error:
                    client.execute_with_fds("snapshot", [fd])
                assert error.value.cls == "SnapshotError"
                assert client.execute("status")["state"] == "running"  # resumed as it was
        finally:
            os.close(fd)
        before = ticks(guest)
        guest.wait_for(f"tick {before + 2}", timeout=120)
        guest.send(b"echo answer-$((6 * 7))\n")
        guest.wait_for("answer-42", timeout=120)
        guest.kill()


@pytest.mark.parametrize("fifo", [False, True], ids=["2-level", "fifo"])
def test_a_restored_guest_shell_goes_on(assets, tmp_path, fifo):
    """With FIFO event channels too: the queues' tails and places come back,
    and the console, IPIs and timers go on through them."""
    initrd = make_test_initrd(assets["initramfs"], tmp_path / "initrd", SHELL)
    path = tmp_path / "guest.snap"
    extra = ["--xen-fifo", "-v"] if fifo else []
    first = run_pyvmm(*guest_args(assets, initrd, "--snapshot-on", "ready uptime,stop", "--snapshot-file", str(path),
                                  *extra), timeout=BOOT_TIMEOUT)
    assert first.status == 0 and "snapshot written" in first.stderr, first
    assert ("the guest switched to the FIFO ABI" in first.stderr) == fifo, first
    saved_uptime = float(re.search(r"ready uptime=([\d.]+)", first.stdout).group(1))
    time.sleep(5 if fifo else 30)  # on disk for a while: the guest's monotonic clock must not see it
    with LiveGuest(["run", "--restore", str(path), "--timeout", "600"]) as restored:
        restored.send(b"echo after=$(cut -d' ' -f1 /proc/uptime)\n")
        after = float(restored.wait_for(r"after=([\d.]+)", timeout=300).group(1).decode())
        assert saved_uptime <= after < saved_uptime + 20, (saved_uptime, after)
        # The guest's page 0 is what it was when the snapshot was taken.
        saved_page0 = re.search(r"page0=([0-9a-f]+)", first.stdout).group(1)
        restored.send(f'echo "restored-{PAGE0}"\n'.encode())
        assert restored.wait_for(r"restored-page0=([0-9a-f]+)", timeout=120).group(1).decode() == saved_page0
        restored.wait_for("tick 3", timeout=120)
        restored.send(b"poweroff -f\n")
        assert restored.finish(timeout=300) == 0, str(restored)
        assert "ready uptime" not in restored.stdout  # it did not boot again
