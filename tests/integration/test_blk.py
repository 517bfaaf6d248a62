"""The PV disk: Debian's xen-blkfront reads and writes an ext4 image through
pyvmm's vbd backend (--disk), and a read-only disk stays unchanged.

The images are made here with e2fsprogs (mkfs.ext4 -d) and checked after
the guest is gone with debugfs, so the test trusts neither side's view.
"""

from __future__ import annotations

import hashlib
import random
import re
import shutil
import subprocess

import pytest

from initrd import GuestAssetsUnavailable, guest_assets, make_test_initrd
from vmm import run_pyvmm

pytestmark = [pytest.mark.guest, pytest.mark.xen]

BOOT_TIMEOUT = 900
KNOWN = random.Random(20261121).randbytes(3 * 1024 * 1024 + 12345)  # several requests, indirect segments
KNOWN_SHA = hashlib.sha256(KNOWN).hexdigest()
WRITTEN = "written by the guest through xen-blkfront\n"

WAIT_FOR = r"""
wait_for() {  # a block device node, up to 30 s
    i=0
    while [ ! -b "$1" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
    [ -b "$1" ] && echo "found $1" || echo "missing $1"
}
mkdir -p /mnt /ro
"""


def tool(name):
    path = shutil.which(name) or shutil.which(f"/usr/sbin/{name}") or shutil.which(f"/sbin/{name}")
    if path is None:
        pytest.skip(f"{name} (e2fsprogs) is not installed: apt-get install e2fsprogs")
    return path


def make_image(tmp_path, name, files):
    source = tmp_path / f"{name}.d"
    source.mkdir()
    for file, data in files.items():
        (source / file).write_bytes(data)
    image = tmp_path / name
    subprocess.run([tool("mkfs.ext4"), "-F", "-q", "-d", str(source), str(image), "64M"], check=True,
                   capture_output=True)
    return image


def debugfs_cat(image, path):
    result = subprocess.run([tool("debugfs"), "-R", f"cat {path}", str(image)], capture_output=True, check=True)
    return result.stdout


@pytest.fixture(scope="module")
def assets():
    from pyvmm.hostcheck import probe

    report = probe()
    if not report.can_run_xen:
        pytest.skip(f"this host's KVM cannot run Xen guests (missing {report.missing_xen or 'hardware virtualization'})")
    try:
        return guest_assets()
    except GuestAssetsUnavailable as error:
        pytest.skip(str(error))


def boot(assets, tmp_path, script, *disks):
    initrd = make_test_initrd(assets["initramfs"], tmp_path / "initrd", WAIT_FOR + script)
    args = []
    for disk in disks:
        args += ["--disk", disk]
    return run_pyvmm(
        "run", "--xen", "--kernel", str(assets["vmlinuz"]), "--initrd", str(initrd),
        "--append", "console=hvc0 panic=-1 pyvmm.modules=xen-blkfront", "--vcpus", "2", "--no-reboot",
        "--timeout", "600", *args,
        timeout=BOOT_TIMEOUT,
    )


def test_guest_reads_and_writes_an_ext4_disk(assets, tmp_path):
    image = make_image(tmp_path, "disk.img", {"known.bin": KNOWN})
    script = r"""
wait_for /dev/xvda
mount -t ext4 /dev/xvda /mnt && echo mounted
echo "known-sha=$(sha256sum /mnt/known.bin | cut -d' ' -f1)"
printf 'written by the guest through xen-blkfront\n' > /mnt/written.txt
dd if=/mnt/known.bin of=/mnt/copy.bin bs=64k 2>/dev/null
sync
umount /mnt && echo unmounted
# The driver unloaded and loaded again reconnects to the same backend. A
# bound xenbus device holds a reference on its driver's module: unbind first.
echo vbd-51712 > /sys/bus/xen/drivers/vbd/unbind && echo unbound
[ -b /dev/xvda ] || echo "xvda gone"
rmmod xen-blkfront && echo unloaded
modprobe xen-blkfront
wait_for /dev/xvda
mount -t ext4 -o ro /dev/xvda /mnt && echo "reloaded: $(cat /mnt/written.txt)"
umount /mnt
true
"""
    result = boot(assets, tmp_path, script, str(image))
    assert result.status == 0, result
    out = result.stdout
    assert "found /dev/xvda" in out and "mounted" in out, result
    assert f"known-sha={KNOWN_SHA}" in out, result
    assert "unmounted" in out, result
    assert "pyvmm-guest: test exit 0" in out, result
    # What the guest wrote is in the image, seen by the host's e2fsprogs.
    assert debugfs_cat(image, "/written.txt").decode() == WRITTEN
    assert hashlib.sha256(debugfs_cat(image, "/copy.bin")).hexdigest() == KNOWN_SHA
    check = subprocess.run([tool("e2fsck"), "-fn", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # Module reload (asserted last: the data checks above do not depend on it).
    assert "unbound" in out and "xvda gone" in out and "unloaded" in out, result
    assert "reloaded: " + WRITTEN.strip() in out, result


def test_readonly_second_disk_refuses_writes(assets, tmp_path):
    rw = make_image(tmp_path, "rw.img", {"hello.txt": b"rw disk\n"})
    ro = make_image(tmp_path, "ro.img", {"known.bin": KNOWN})
    ro_before = hashlib.sha256(ro.read_bytes()).hexdigest()
    script = r"""
wait_for /dev/xvda
wait_for /dev/xvdb
echo "xvdb-ro=$(cat /sys/block/xvdb/ro)"
mount -t ext4 -o ro /dev/xvdb /ro && echo ro-mounted
echo "ro-known-sha=$(sha256sum /ro/known.bin | cut -d' ' -f1)"
touch /ro/new 2>/dev/null; echo "touch-status=$?"
umount /ro
dd if=/dev/zero of=/dev/xvdb bs=4096 count=16 oflag=direct 2>/dev/null; echo "dd-status=$?"
mount -t ext4 /dev/xvda /mnt && echo "rw: $(cat /mnt/hello.txt)"
umount /mnt
true
"""
    result = boot(assets, tmp_path, script, str(rw), f"{ro},readonly=on")
    assert result.status == 0, result
    out = result.stdout
    assert "found /dev/xvdb" in out and "ro-mounted" in out, result
    assert f"ro-known-sha={KNOWN_SHA}" in out, result
    assert "xvdb-ro=1" in out, result
    assert re.search(r"touch-status=[1-9]", out), result
    assert re.search(r"dd-status=[1-9]", out), result
    assert "rw: rw disk" in out, result
    assert hashlib.sha256(ro.read_bytes()).hexdigest() == ro_before
