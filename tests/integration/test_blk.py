"""The PV disk: Debian's xen-blkfront reads and writes an ext4 image through
pyvmm's vbd backend (--disk), a read-only disk stays unchanged, discard gives
space back to the image file, both blk-mq queues carry I/O, the guest's root
file system can live on xvda, and what the guest has synced survives the VMM
being killed.

The images are made here with e2fsprogs (mkfs.ext4 -d) and checked after
the guest is gone with debugfs, so the test trusts neither side's view.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import re
import secrets
import shutil
import signal
import stat
import subprocess

import pytest

from initrd import make_test_initrd, newc_writer
from vmm import LiveGuest, run_pyvmm, xen_guest_assets

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


def make_image(tmp_path, name, files, source=None):
    """An ext4 image of 64 MiB holding `files` (name -> bytes), added to the
    directory `source` if given."""
    if source is None:
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
    return xen_guest_assets()


def pyvmm_args(assets, initrd, disks, append="console=hvc0 panic=-1 pyvmm.modules=xen-blkfront"):
    args = ["run", "--xen", "--kernel", str(assets["vmlinuz"]), "--initrd", str(initrd), "--append", append,
            "--vcpus", "2", "--no-reboot", "--timeout", "600"]
    for disk in disks:
        args += ["--disk", disk]
    return args


def boot(assets, tmp_path, script, *disks, extra=()):
    initrd = make_test_initrd(assets["initramfs"], tmp_path / "initrd", WAIT_FOR + script)
    return run_pyvmm(*pyvmm_args(assets, initrd, disks), *extra, timeout=BOOT_TIMEOUT)


def test_ext4_read_write_a_read_only_second_disk_two_queues_and_a_driver_reload(assets, tmp_path):
    """One boot, two disks (each check would otherwise pay for a boot of its own):
    - xvda (read-write, ext4): with 2 vCPUs blkfront asks for 2 rings and
      blk-mq has a hardware queue per CPU; I/O issued from each CPU (taskset)
      goes through that CPU's queue and both rings' interrupts fire; files the
      guest writes are in the image, checked by the host's e2fsprogs;
    - xvdb (readonly=on): the guest sees it read-only, reads it, cannot write
      it, and the image is unchanged;
    - the driver unbound, unloaded and loaded again reconnects to the same
      backends and reads what it wrote."""
    image = make_image(tmp_path, "disk.img", {"known.bin": KNOWN})
    ro = make_image(tmp_path, "ro.img", {"known.bin": KNOWN})
    ro_before = hashlib.sha256(ro.read_bytes()).hexdigest()
    script = r"""
wait_for /dev/xvda
wait_for /dev/xvdb
echo "mq: $(ls /sys/block/xvda/mq | tr '\n' ' ')"
for q in /sys/block/xvda/mq/*; do echo "queue ${q##*/} serves cpus $(cat $q/cpu_list)"; done
grep -i blkif /proc/interrupts | sed 's/^/irq-before /'
for cpu in 0 1; do
    taskset -c $cpu dd if=/dev/xvda of=/dev/null bs=64k count=256 iflag=direct 2>/dev/null \
        && echo "direct read on cpu $cpu"
done
mount -t ext4 /dev/xvda /mnt && echo mounted
echo "known-sha=$(sha256sum /mnt/known.bin | cut -d' ' -f1)"
for cpu in 0 1; do
    taskset -c $cpu dd if=/mnt/known.bin of=/mnt/cpu$cpu.bin bs=64k conv=fsync 2>/dev/null
    echo "cpu$cpu-sha=$(sha256sum /mnt/cpu$cpu.bin | cut -d' ' -f1)"
done
printf 'written by the guest through xen-blkfront\n' > /mnt/written.txt
sync
umount /mnt && echo unmounted
grep -i blkif /proc/interrupts | sed 's/^/irq-after /'
echo "xvdb-ro=$(cat /sys/block/xvdb/ro)"
mount -t ext4 -o ro /dev/xvdb /ro && echo ro-mounted
echo "ro-known-sha=$(sha256sum /ro/known.bin | cut -d' ' -f1)"
touch /ro/new 2>/dev/null; echo "touch-status=$?"
umount /ro
dd if=/dev/zero of=/dev/xvdb bs=4096 count=16 oflag=direct 2>/dev/null; echo "dd-status=$?"
# A bound xenbus device holds a reference on its driver's module: unbind first.
echo vbd-51712 > /sys/bus/xen/drivers/vbd/unbind && echo vbd-51728 > /sys/bus/xen/drivers/vbd/unbind && echo unbound
[ -b /dev/xvda ] || echo "xvda gone"
rmmod xen-blkfront && echo unloaded
modprobe xen-blkfront
wait_for /dev/xvda
mount -t ext4 -o ro /dev/xvda /mnt && echo "reloaded: $(cat /mnt/written.txt)"
umount /mnt
true
"""
    result = boot(assets, tmp_path, script, str(image), f"{ro},readonly=on", extra=("-v",))
    assert result.status == 0, str(result)
    out = result.stdout
    assert "found /dev/xvda" in out and "found /dev/xvdb" in out and "mounted" in out, str(result)
    assert f"known-sha={KNOWN_SHA}" in out, str(result)
    # Two queues, each serving its CPU, each read and written from its CPU.
    assert "mq: 0 1 " in out, str(result)
    assert "queue 0 serves cpus 0" in out and "queue 1 serves cpus 1" in out, str(result)
    assert "direct read on cpu 0" in out and "direct read on cpu 1" in out, str(result)
    assert f"cpu0-sha={KNOWN_SHA}" in out and f"cpu1-sha={KNOWN_SHA}" in out, str(result)
    assert "unmounted" in out and "pyvmm-guest: test exit 0" in out, str(result)
    # Four rings (two per disk), each its own interrupt line; xvdb was idle
    # while xvda did I/O from both CPUs, so at least xvda's two lines rang.
    def irq_counts(prefix):
        counts = [re.match(r"\s*(\d+):\s+(\d+)\s+(\d+)", line[len(prefix):])
                  for line in out.splitlines() if line.startswith(prefix)]
        assert all(counts), out
        return {int(m[1]): int(m[2]) + int(m[3]) for m in counts}
    before, after = irq_counts("irq-before "), irq_counts("irq-after ")
    print(f"blkif interrupts before {before}, after {after}")
    assert len(before) == 4 and set(before) == set(after), str(result)
    assert sum(after[irq] > before[irq] for irq in before) >= 2, (before, after)
    assert re.search(r"xvda .*connected, 2 queue\(s\)", result.stderr), str(result)
    # What the guest wrote is in the image, seen by the host's e2fsprogs.
    assert debugfs_cat(image, "/written.txt").decode() == WRITTEN
    for cpu in (0, 1):
        assert hashlib.sha256(debugfs_cat(image, f"/cpu{cpu}.bin")).hexdigest() == KNOWN_SHA
    check = subprocess.run([tool("e2fsck"), "-fn", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # The read-only disk.
    assert "ro-mounted" in out and f"ro-known-sha={KNOWN_SHA}" in out, str(result)
    assert "xvdb-ro=1" in out, str(result)
    assert re.search(r"touch-status=[1-9]", out), str(result)
    assert re.search(r"dd-status=[1-9]", out), str(result)
    assert hashlib.sha256(ro.read_bytes()).hexdigest() == ro_before
    # Module reload (asserted last: the data checks above do not depend on it).
    assert "unbound" in out and "xvda gone" in out and "unloaded" in out, str(result)
    assert "reloaded: " + WRITTEN.strip() in out, str(result)


def allocated(path):
    """Bytes the file system really holds for `path` (holes excluded)."""
    return os.stat(path).st_blocks * 512


def test_discard_gives_space_back_to_the_image(assets, tmp_path):
    """fstrim in the guest becomes BLKIF_OP_DISCARD, which punches holes in
    the image: the file's allocated size, seen by the host while the guest
    runs and after, grows by the 16 MiB the guest writes and shrinks by
    (most of) them again once the guest deletes the file and trims."""
    image = make_image(tmp_path, "disk.img", {})
    empty = allocated(image)
    script = r"""
wait_for /dev/xvda
echo "discard-max-bytes=$(cat /sys/block/xvda/queue/discard_max_bytes)"
# noinit_itable: no background zeroing of inode tables to blur the numbers.
mount -t ext4 -o noinit_itable /dev/xvda /mnt && echo mounted
dd if=/dev/urandom of=/mnt/random.bin bs=1M count=16 2>/dev/null
sync
echo "written and synced: $(du -k /mnt/random.bin | cut -f1) KiB"
read -t 300 -r reply
echo "the host says: $reply"
rm /mnt/random.bin
sync  # the blocks are free once the deletion is committed
fstrim -v /mnt
umount /mnt && echo unmounted
true
"""
    initrd = make_test_initrd(assets["initramfs"], tmp_path / "initrd", WAIT_FOR + script)
    with LiveGuest(pyvmm_args(assets, initrd, [str(image)])) as guest:
        guest.wait_for(r"written and synced: \d+ KiB")
        full = allocated(image)
        guest.send(b"go\n")
        status = guest.finish()
        trimmed = allocated(image)
        out = guest.stdout
        assert status == 0, str(guest)
    mib = 1 << 20
    summary = f"image allocation: empty {empty / mib:.1f} MiB, full {full / mib:.1f} MiB, trimmed {trimmed / mib:.1f} MiB"
    print(summary)
    print("\n".join(line for line in out.splitlines() if "trimmed" in line))
    assert re.search(r"discard-max-bytes=[1-9]", out), str(guest)
    assert "the host says: go" in out, str(guest)
    assert re.search(r"/mnt: .* trimmed", out), str(guest)
    assert "pyvmm-guest: test exit 0" in out, str(guest)
    assert full - empty >= 16 * mib, summary
    assert full - trimmed >= 14 * mib, summary
    check = subprocess.run([tool("e2fsck"), "-fn", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def extract_newc(archive: bytes, dest):
    """Unpack a (possibly concatenated) newc cpio archive into `dest`:
    directories, regular files and symlinks; device nodes are left out (the
    guest mounts devtmpfs on /dev)."""
    position = 0
    while position + 110 <= len(archive):
        if archive[position] == 0:  # padding between concatenated archives
            position += 1
            continue
        header = archive[position:position + 110]
        if header[:6] != b"070701":
            raise ValueError(f"not a newc header at offset {position}")
        fields = [int(header[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        mode, size, name_size = fields[1], fields[6], fields[11]
        name_start = position + 110
        name = archive[name_start:name_start + name_size - 1].decode()
        data_start = name_start + name_size + (-(110 + name_size) % 4)
        data = archive[data_start:data_start + size]
        position = data_start + size + (-size % 4)
        if name == "TRAILER!!!":
            continue
        path = os.path.join(dest, os.path.normpath(name).lstrip("/"))
        if os.path.normpath(name).startswith(".."):
            raise ValueError(f"{name!r} leaves the archive")
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFDIR:
            os.makedirs(path, exist_ok=True)
            os.chmod(path, stat.S_IMODE(mode))
        elif kind == stat.S_IFREG:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as file:
                file.write(data)
            os.chmod(path, stat.S_IMODE(mode))
        elif kind == stat.S_IFLNK:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if os.path.lexists(path):
                os.unlink(path)
            os.symlink(data.decode(), path)


# PID 1 of the initramfs in test_root_file_system_on_xvda: what a distribution's
# initramfs does, in short. Exiting makes the kernel panic, and with panic=-1
# and --no-reboot pyvmm then exits with status 2.
SWITCH_INIT = r"""#!/bin/sh
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
root=
for word in $(cat /proc/cmdline); do
    case "$word" in root=*) root="${word#root=}" ;; esac
done
echo "switch-init: root is $root"
[ -n "$root" ] || exit 1
modprobe xen-blkfront || exit 1
i=0
while [ ! -b "$root" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
mkdir -p /newroot
mount -t ext4 "$root" /newroot || exit 1
umount /dev /sys /proc
echo "switch-init: switching to $root"
exec switch_root /newroot /init
"""


def test_root_file_system_on_xvda(assets, tmp_path):
    """The initramfs only loads xen-blkfront, mounts root=/dev/xvda and
    switch_roots into it (as PID 1). Everything after that, including
    /init and /test.sh, comes from the disk image: an ext4 file system made
    from the base initramfs's contents plus a marker that only the disk
    has. The guest reports the marker and its root mount, writes a file to
    its root, and powers off cleanly."""
    root = tmp_path / "root.d"
    root.mkdir()
    extract_newc(gzip.decompress(assets["initramfs"].read_bytes()), root)
    assert (root / "init").is_file() and (root / "bin" / "busybox").is_file()
    marker = f"root-marker-{secrets.token_hex(8)}"
    disk_test = r"""
echo "marker: $(cat /marker)"
echo "root: $(awk '$2 == "/" {print $1, $3}' /proc/mounts)"
[ -e /switch-init ] && echo "the initramfs is still the root" || echo "the initramfs is gone"
echo "written to the root disk" > /written.txt
sync
true
"""
    (root / "test.sh").write_text(disk_test)
    (root / "test.sh").chmod(0o755)
    image = make_image(tmp_path, "root.img", {"marker": marker.encode() + b"\n"}, source=root)

    initrd = tmp_path / "initrd"
    overlay = io.BytesIO()
    with gzip.GzipFile(fileobj=overlay, mode="wb", mtime=0) as compressed:
        archive = newc_writer(compressed)
        archive.add_file("switch-init", SWITCH_INIT.encode(), 0o755)
        archive.close()
    base = assets["initramfs"].read_bytes()
    initrd.write_bytes(base + b"\0" * (-len(base) % 4) + overlay.getvalue())

    append = "console=hvc0 panic=-1 rdinit=/switch-init root=/dev/xvda"
    result = run_pyvmm(*pyvmm_args(assets, initrd, [str(image)], append=append), timeout=BOOT_TIMEOUT)
    out = result.stdout
    assert "switch-init: switching to /dev/xvda" in out, str(result)
    assert f"marker: {marker}" in out, str(result)
    assert "root: /dev/xvda ext4" in out, str(result)
    assert "the initramfs is gone" in out, str(result)
    assert "pyvmm-guest: test exit 0" in out, str(result)
    assert result.status == 0, str(result)
    assert debugfs_cat(image, "/written.txt") == b"written to the root disk\n"


def test_synced_data_survives_sigkill_of_the_vmm(assets, tmp_path):
    """The guest writes a file with a random payload, syncs it (fsync of
    the file, then sync: ext4 commits its journal with cache flushes and
    FUA writes, which blkfront sends as FLUSH_DISKCACHE) and only then
    prints durable-<token>. The moment the host sees that line it SIGKILLs
    pyvmm's whole process group: no orderly shutdown, no unmount. The
    payload is in the image, after the journal replay any crashed ext4
    gets.

    This shows that blkback acknowledges a flush only once the data is in
    the image file (nothing is held back in the VMM). It cannot show the
    fdatasync under the acknowledgement reaching stable storage: that would
    take a host crash, and here the image lives on tmpfs anyway."""
    image = make_image(tmp_path, "disk.img", {})
    token = secrets.token_hex(8)
    payload = token.encode() + b"\n" + random.Random(token).randbytes(1024 * 1024 + 777)
    script = r"""
wait_for /dev/xvda
mount -t ext4 /dev/xvda /mnt && echo mounted
cp /payload.bin /mnt/durable.bin
sync /mnt/durable.bin && sync && echo "durable-$(head -n 1 /mnt/durable.bin)"
sleep 600
"""
    initrd = make_test_initrd(assets["initramfs"], tmp_path / "initrd", WAIT_FOR + script,
                              {"/payload.bin": payload})
    with LiveGuest(pyvmm_args(assets, initrd, [str(image)])) as guest:
        guest.wait_for(rf"durable-{token}")
        status = guest.kill()
        assert status == -signal.SIGKILL, str(guest)
        assert "mounted" in guest.stdout, str(guest)
    # What mount would do after a crash: replay the journal (exit 1: the
    # file system was changed by that), then a clean check.
    replay = subprocess.run([tool("e2fsck"), "-fy", str(image)], capture_output=True, text=True)
    assert replay.returncode in (0, 1), replay.stdout + replay.stderr
    assert debugfs_cat(image, "/durable.bin") == payload
    check = subprocess.run([tool("e2fsck"), "-fn", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
