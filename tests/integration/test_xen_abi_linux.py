"""Xen ABI features a Linux guest uses: ballooning driven from the control
socket (`pyvmm ctl NAME mem-set`, as `xl mem-set`) and vCPU hot-unplug and
plug (`echo 0 > /sys/devices/system/cpu/cpu1/online`, then 1)."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from initrd import make_test_initrd
from vmm import REPO, LiveGuest, run_pyvmm, xen_guest_assets

pytestmark = [pytest.mark.guest, pytest.mark.xen]

BOOT_TIMEOUT = 900
MIB_KB = 1024


@pytest.fixture(scope="module")
def assets():
    return xen_guest_assets()


def pyvmm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyvmm", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


HOTPLUG = r"""
cpu1_ticks() { grep ' timer1$' /proc/interrupts | tr -s ' ' | cut -d' ' -f4; }
echo "before: online=$(cat /sys/devices/system/cpu/online) ticks=$(cpu1_ticks)"
for round in 1 2; do
    echo 0 > /sys/devices/system/cpu/cpu1/online && echo "round $round offline: $(cat /sys/devices/system/cpu/online)"
    sleep 1
    echo 1 > /sys/devices/system/cpu/cpu1/online && echo "round $round online: $(cat /sys/devices/system/cpu/online)"
    a=$(cpu1_ticks); sleep 2; b=$(cpu1_ticks)
    echo "round $round cpu1 timer ticks $a -> $b"
done
# Work on cpu1 finishes: IPIs (a function call) and its scheduler run there.
if command -v taskset >/dev/null; then
    taskset -c 1 sh -c 'echo "ran on cpu $(cut -d" " -f39 /proc/self/stat)"'
else
    echo "no taskset"
fi
grep -E 'resched|callfunc|timer' /proc/interrupts
"""


def test_vcpu_hot_unplug_and_plug(assets, tmp_path):
    initrd = make_test_initrd(assets["initramfs"], tmp_path / "initrd", HOTPLUG)
    result = run_pyvmm("run", "--kernel", str(assets["vmlinuz"]), "--initrd", str(initrd),
                       "--append", "console=hvc0", "--vcpus", "2", "--timeout", "300", timeout=BOOT_TIMEOUT)
    out = result.stdout
    assert "pyvmm-guest: test exit 0" in out, str(result)
    for round_ in (1, 2):
        assert f"round {round_} offline: 0" in out and f"round {round_} online: 0-1" in out, str(result)
        ticks = re.search(rf"round {round_} cpu1 timer ticks (\d+) -> (\d+)", out)
        assert ticks and int(ticks.group(2)) > int(ticks.group(1)), f"no timer interrupts on cpu1 again:\n{result}"
    assert "ran on cpu 1" in out or "no taskset" in out, str(result)
    assert result.status == 0, str(result)


BALLOON = r"""
i=0
while :; do
    i=$((i + 1))
    echo "mem $i $(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2)"
    sleep 0.5
done
"""


def mem_total(guest: LiveGuest, after: int) -> tuple[int, int]:
    """The first MemTotal (kB) the guest prints after its line `after`."""
    match = guest.wait_for(rf"mem ({after + 1}) (\d+)", timeout=120)
    return int(match.group(1)), int(match.group(2))


def wait_mem(guest: LiveGuest, line: int, test, timeout: float = 400) -> tuple[int, int]:
    """Follow the guest's MemTotal lines until `test(kB)` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line, kb = mem_total(guest, line)
        if test(kb):
            return line, kb
    pytest.fail(f"MemTotal never reached the target:\n{guest}")


# A boot, then 64 MiB ballooned out and back in: 76-81 s in the testbed over three runs (2026-12-06), so not
# marked slow.
def test_balloon_target_from_the_control_socket_moves_memtotal(assets, tmp_path):
    initrd = make_test_initrd(assets["initramfs"], tmp_path / "initrd", BALLOON)
    guest = LiveGuest(["run", "--kernel", str(assets["vmlinuz"]), "--initrd", str(initrd), "--append", "console=hvc0",
                       "--vcpus", "2", "--name", "balloon", "--timeout", "800"], stdin=False)
    with guest:
        line, full = mem_total(guest, int(guest.wait_for(r"mem (\d+) ", timeout=BOOT_TIMEOUT).group(1)))
        started = time.monotonic()
        lowered = pyvmm("ctl", "balloon", "mem-set", "448M")
        assert lowered.returncode == 0, lowered
        assert pyvmm("ctl", "balloon", "xenstore", "read", "/local/domain/1/memory/target").stdout.strip() == str(
            448 * MIB_KB)
        line, low = wait_mem(guest, line, lambda kb: kb <= full - 60 * MIB_KB)
        lowered_in = time.monotonic() - started
        info = pyvmm("ctl", "--json", "balloon", "mem-info")
        assert info.returncode == 0 and '"ballooned"' in info.stdout, info
        started = time.monotonic()
        raised = pyvmm("ctl", "balloon", "mem-set", "512M")
        assert raised.returncode == 0, raised
        line, back = wait_mem(guest, line, lambda kb: kb >= full - MIB_KB)
        print(f"MemTotal {full} kB -> {low} kB ({lowered_in:.0f} s) -> {back} kB "
              f"({time.monotonic() - started:.0f} s); {info.stdout}")
        guest.wait_for(rf"mem {line + 2} ", timeout=60)  # still alive
