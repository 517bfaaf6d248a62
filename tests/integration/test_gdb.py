"""Debian's gdb debugs the guest kernel through `pyvmm run --gdb`.

The guest starts parked (--gdb-wait); a first gdb attaches, reads the
registers of the vCPU about to run the kernel's 64-bit entry and detaches,
which starts the guest. The guest's /test.sh prints where __x64_sys_sync is
(/proc/kallsyms) and calls sync(2) once a second; a second gdb attaches to
the running guest, puts a breakpoint and then a hardware breakpoint on
that address, sees each hit with rip there, single-steps, watches
jiffies_64 change, and detaches.
The guest goes on to power off by itself.

The VM runs with --gdb-breakpoints debugregs: the testbed's L1 runs on
QEMU's TCG, whose nested SVM does not turn a guest's int3 into the #BP
intercept KVM_GUESTDBG_USE_SW_BP relies on (the guest takes the int3 itself
and oopses). tests/unit/debug/gdbstub covers int3 breakpoints against Debian's
gdb, and tests/integration/test_guest_debug_host.py against a real KVM.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from initrd import XS_SHELL, make_test_initrd
from vmm import LiveGuest, xen_guest_assets

pytestmark = [pytest.mark.guest, pytest.mark.xen]

BOOT_TIMEOUT = 900
GDB_TIMEOUT = 600

# sync(2) once a second until the test says (a xenstore key it writes as
# domain 0) that gdb is done, or for ten minutes at most. (A line sent to
# the serial console did not do: the guest's tty echoed it, but busybox's
# `read -t 1` on /dev/ttyS0 in this loop never returned it, so the loop
# always ran its ten minutes.)
GUEST_SCRIPT = XS_SHELL + r"""
address=$(grep ' T __x64_sys_sync$' /proc/kallsyms | cut -d' ' -f1)
echo "gdb-target=$address"
echo "gdb-watch=$(grep -E ' [DdBb] jiffies_64$' /proc/kallsyms | cut -d' ' -f1)"
i=0
while [ $i -lt 600 ]; do
    sync
    if [ "$(xs 2 data/gdb-done)" = yes ]; then echo "gdb-done-seen"; break; fi
    sleep 1
    i=$((i + 1))
done
echo "sync-loop-done"
"""


def gdb_binary() -> str:
    path = shutil.which("gdb")
    if path is None:
        pytest.skip("gdb is not installed (apt-get install gdb)")
    return path


def run_gdb(port: int, *commands: str) -> str:
    args = [gdb_binary(), "-nx", "-batch", "-ex", "set architecture i386:x86-64",
            "-ex", f"target remote 127.0.0.1:{port}"]
    for command in commands:
        args += ["-ex", command]
    done = subprocess.run(args, capture_output=True, timeout=GDB_TIMEOUT, stdin=subprocess.DEVNULL)
    return done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")


def value_of(output: str, expression_number: int) -> int:
    """The value gdb printed as `$N = 0x...`."""
    match = re.search(rf"^\${expression_number} = (0x[0-9a-f]+)", output, re.MULTILINE)
    assert match, output
    return int(match.group(1), 16)


@pytest.fixture(scope="module")
def assets():
    return xen_guest_assets()


def test_gdb_reads_registers_and_hits_breakpoints(assets, tmp_path):
    initrd = make_test_initrd(assets["initramfs"], tmp_path / "initrd", GUEST_SCRIPT)
    name = f"gdbtest{os.getpid()}"
    guest = LiveGuest([
        "run", "--xen", "--kernel", str(assets["vmlinuz"]), "--initrd", str(initrd),
        "--append", "console=hvc0 panic=-1 nokaslr", "--vcpus", "2", "--no-reboot",
        "--timeout", str(BOOT_TIMEOUT), "--gdb", "tcp:127.0.0.1:0", "--gdb-wait",
        "--gdb-breakpoints", "debugregs", "--name", name,
    ])
    try:
        port = int(guest.wait_for(r"gdb stub listening on tcp:127\.0\.0\.1:(\d+) \(vCPUs wait", 120, stderr=True).group(1))

        # 1. The guest has not run an instruction: vCPU 0 sits at the entry
        # pyvmm's loader chose, in 64-bit mode (cs 0x10), and gdb reads it.
        first = run_gdb(port, "info threads", "p/x $rip", "p/x $cs", "p/x $rsi", "x/2xb $rip", "detach")
        print(first)
        assert "Thread 1" in first and "Thread 2" in first, first
        entry = value_of(first, 1)
        assert entry != 0 and value_of(first, 2) == 0x10, first
        assert value_of(first, 3) != 0, first  # rsi: the boot_params page the loader passes
        assert "Cannot access memory" not in first, first

        address = int(guest.wait_for(r"gdb-target=([0-9a-f]{16})", BOOT_TIMEOUT).group(1), 16)
        assert address >= 0xFFFFFFFF80000000, str(guest)
        jiffies = int(guest.wait_for(r"gdb-watch=([0-9a-f]{16})", 60).group(1), 16)

        # 2. A running guest: gdb's breakpoint (in a debug register, see
        # below) on the syscall handler, hit with rip there; one step on;
        # then an explicit hardware breakpoint (DR0 again) hit the same way.
        second = run_gdb(
            port,
            f"break *{address:#x}", "continue", "p/x $rip", "info threads", "stepi", "p/x $rip", "delete",
            f"hbreak *{address:#x}", "continue", "p/x $rip", "delete",
            f"watch *(long *){jiffies:#x}", "continue", "delete", "detach",
        )
        print(second)
        assert f"Breakpoint 1 at {address:#x}" in second, second
        assert re.search(rf"Thread \d hit Breakpoint 1, {address:#x}", second), second
        assert value_of(second, 1) == address, second
        stepped = value_of(second, 2)
        assert stepped != address and 0 < stepped - address < 16, second  # one instruction on
        assert f"Hardware assisted breakpoint 2 at {address:#x}" in second, second
        assert re.search(rf"Thread \d hit Breakpoint 2, {address:#x}", second), second
        assert value_of(second, 3) == address, second
        # A write watchpoint on jiffies_64: the timer interrupt's update trips it.
        watched = re.search(r"Hardware watchpoint 3: \*\(long \*\)0x[0-9a-f]+\s+Old value = (\d+)\s+New value = (\d+)",
                            second)
        assert watched and int(watched.group(2)) > int(watched.group(1)), second

        done = subprocess.run([sys.executable, "-m", "pyvmm", "ctl", name, "xenstore", "write",
                               "/local/domain/1/data/gdb-done", "yes"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done
        guest.wait_for(r"gdb-done-seen", 120)
        guest.wait_for(r"sync-loop-done", 60)
        guest.wait_for(r"pyvmm-guest: test exit 0", 120)
        assert guest.proc.wait(timeout=300) == 0, str(guest)
    finally:
        guest.kill()
        print(str(guest))  # shown with a failure: the console and pyvmm's stderr
