"""A Xen guest's lifecycle hypercalls with Debian's kernel: the domain
watchdog through Linux's xen_wdt driver, and kexec (SHUTDOWN_soft_reset)
into a second kernel."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from initrd import XS_SHELL, make_test_initrd
from vmm import REPO, LiveGuest, run_pyvmm, xen_guest_assets

pytestmark = [pytest.mark.guest, pytest.mark.xen]

BOOT_TIMEOUT = 900
WATCHDOG_TIMEOUT = 10  # xen_wdt's timeout= (seconds)
PAUSED_FOR = 20  # twice the most time the watchdog can have left when the VM is paused

# Open /dev/watchdog (xen_wdt asks Xen for a watchdog: SCHEDOP_watchdog id 0),
# pet it every second (id N, the timeout again), then stop petting with the
# device still open: Xen, and pyvmm, shut the domain down.
WATCHDOG_SCRIPT = f"""
modprobe xen_wdt timeout={WATCHDOG_TIMEOUT} || {{ echo "no xen_wdt"; exit 1; }}
dmesg | grep -i "xen_wdt\\|watchdog" | sed 's/^/dmesg: /'
exec 3>/dev/watchdog || {{ echo "cannot open /dev/watchdog"; exit 1; }}
for i in 1 2 3 4 5 6 7 8; do echo p >&3; echo "pet $i"; sleep 1; done
echo p >&3
echo "petting stopped"
sleep 600
echo "still running"
"""


@pytest.fixture(scope="module")
def assets():
    return xen_guest_assets()


def pyvmm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyvmm", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


def test_xen_wdt_watchdog_stops_the_vm_when_not_petted_and_not_while_paused(assets, tmp_path):
    initrd = make_test_initrd(assets["initramfs"], tmp_path / "initrd", WATCHDOG_SCRIPT)
    name = "wdtest"
    with LiveGuest(["run", "--kernel", str(assets["vmlinuz"]), "--initrd", str(initrd),
                    "--append", "console=hvc0 panic=-1", "--vcpus", "2", "--name", name,
                    "--no-reboot", "--timeout", "800", "-v"], stdin=False) as guest:
        # Paused while it pets, for longer than its timeout: the guest's
        # clock stands still, and so does its watchdog.
        guest.wait_for("pet 3")
        seen = time.monotonic()
        pause = pyvmm("ctl", name, "pause")
        paused_at = time.monotonic()
        timings = f"pet 3 seen, `ctl pause` returned {paused_at - seen:.1f} s later"
        assert pause.returncode == 0, f"{timings}: {pause.stderr}\n{guest}"
        time.sleep(PAUSED_FOR)
        assert guest.proc.poll() is None, f"{timings}: the watchdog fired while the VM was paused:\n{guest}"
        resume = pyvmm("ctl", name, "resume")
        assert resume.returncode == 0, f"{timings}: {resume.stderr}\n{guest}"
        # It pets on, then stops: the watchdog runs out one timeout later.
        guest.wait_for("petting stopped", timeout=120)
        stopped_petting = time.monotonic()
        status = guest.finish(timeout=120)
        ran = time.monotonic() - stopped_petting
    print(f"{timings}; the watchdog stopped the VM {ran:.1f} s after the last pet")  # shown with pytest -rP
    assert status == 7, f"{timings}\n{guest}"
    log = guest.stderr
    assert re.search(r"WARNING: pyvmm\.xen\.domain: Xen watchdog 1 of domain 1 expired: the guest did not pet "
                     rf"it within {WATCHDOG_TIMEOUT} s", log), guest
    assert "guest stopped: watchdog (watchdog 1)" in log, str(guest)
    assert "pet 8" in guest.stdout and "still running" not in guest.stdout, str(guest)
    # One timeout after the last pet, give or take the console's and the
    # testbed's delays.
    assert ran >= WATCHDOG_TIMEOUT - 4, (ran, timings, str(guest))


# --- kexec: SHUTDOWN_soft_reset ---------------------------------------------------------

KEXEC_MARKER = "pyvmm.kexec=second"

DISK_MARKER = b"pyvmm-kexec-disk"

# Both kernels run this /test.sh (the second kernel's initramfs is the
# same base with the same script): the first reads its PV disk, loads the
# second kernel and kexecs into it; the second shows that Xen works for it
# (xenstore through the new store channel, the console, grant tables, the
# timer, the PV disk's backend started over) and powers off.
KEXEC_SCRIPT = XS_SHELL + rf"""
disk() {{ modprobe xen-blkfront && sleep 1 && dd if=/dev/xvda bs=512 count=1 2>/dev/null | head -c {len(DISK_MARKER)}; }}
if grep -q {KEXEC_MARKER} /proc/cmdline; then
    echo "second kernel: init reached"
    dmesg > /tmp/dmesg
    grep -m1 "Grant table initialized" /tmp/dmesg | sed 's/^/second kernel dmesg: /'
    grep -m1 "xen:events" /tmp/dmesg | sed 's/^/second kernel dmesg: /'
    echo "second kernel: hypervisor=$(cat /sys/hypervisor/type)"
    echo "second kernel: xenstore domid=$(xs 2 domid)"
    echo "second kernel: old node=$(xs 2 data/old-kernel)"
    echo "second kernel: disk=$(disk)"
    dmesg | grep -i "blkfront\|xenbus" | sed 's/^/second kernel dmesg: /'
    sleep 1
    echo "second kernel: timer ok"
    exit 0
fi
echo "first kernel: xenstore domid=$(xs 2 domid)"
echo "first kernel: disk=$(disk)"
xs 11 data/old-kernel was-here >/dev/null
chmod 755 /kexec/kexec /kexec/lib/*
export LD_LIBRARY_PATH=/kexec/lib
/kexec/lib/ld-linux-x86-64.so.2 /kexec/kexec -l /kexec/vmlinuz --initrd=/kexec/initrd \
    --append="console=hvc0 panic=-1 {KEXEC_MARKER}" || {{ echo "kexec -l failed"; exit 1; }}
echo "first kernel: kexec loaded"
/kexec/lib/ld-linux-x86-64.so.2 /kexec/kexec -e
echo "kexec -e returned $?"
exit 1
"""


def kexec_files() -> dict[str, bytes]:
    """/sbin/kexec (Debian's kexec-tools, which scripts/bootstrap installs)
    and the shared libraries it needs, from this host."""
    binary = shutil.which("kexec") or next((p for p in ("/usr/sbin/kexec", "/sbin/kexec") if Path(p).exists()), None)
    if binary is None:
        pytest.skip("Debian's kexec-tools are not installed (scripts/bootstrap installs them)")
    ldd = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=60)
    assert ldd.returncode == 0, ldd.stderr
    libraries = re.findall(r"(/\S+\.so[.\d]*)\s", ldd.stdout + "\n")
    files = {"/kexec/kexec": Path(binary).read_bytes()}
    for library in libraries:
        files[f"/kexec/lib/{Path(library).name}"] = Path(library).resolve().read_bytes()
    assert "/kexec/lib/ld-linux-x86-64.so.2" in files, ldd.stdout
    return files


def test_kexec_into_a_second_kernel(assets, tmp_path):
    second = make_test_initrd(assets["initramfs"], tmp_path / "second-initrd", KEXEC_SCRIPT)
    files = kexec_files()
    files["/kexec/vmlinuz"] = Path(assets["vmlinuz"]).read_bytes()
    files["/kexec/initrd"] = second.read_bytes()
    first = make_test_initrd(assets["initramfs"], tmp_path / "initrd", KEXEC_SCRIPT, files)
    disk = tmp_path / "disk.img"
    disk.write_bytes(DISK_MARKER + bytes(1024 * 1024 - len(DISK_MARKER)))
    result = run_pyvmm("run", "--kernel", str(assets["vmlinuz"]), "--initrd", str(first),
                       "--append", "console=hvc0 panic=-1", "--memory", "768M", "--vcpus", "2", "--no-reboot",
                       "--disk", f"{disk},readonly=on", "-v", timeout=BOOT_TIMEOUT)
    out = result.stdout
    assert "first kernel: xenstore domid=1" in out and "first kernel: kexec loaded" in out, str(result)
    assert f"first kernel: disk={DISK_MARKER.decode()}" in out, str(result)
    assert "the guest asked for a soft reset" in result.stderr, str(result)
    assert "soft reset done" in result.stderr, str(result)
    assert "second kernel: init reached" in out, str(result)
    assert "second kernel: hypervisor=xen" in out, str(result)
    assert "second kernel: xenstore domid=1" in out, str(result)
    assert "second kernel: old node=ENOENT" in out, result  # the domain's directory was made anew
    assert f"second kernel: disk={DISK_MARKER.decode()}" in out, result  # the backend started over
    assert "second kernel dmesg: " in out and "Grant table initialized" in out.split("second kernel: init")[1], str(result)
    assert "second kernel: timer ok" in out, str(result)
    # The second kernel's /test.sh ended and the guest powered off.
    assert result.status == 0, str(result)
