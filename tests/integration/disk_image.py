"""A bootable raw disk image for firmware-boot tests, built offline.

    image = make_grub_disk(tmp_path / "disk.img", kernel, initrd, "console=ttyS0 ...")

The disk is what an installer leaves on a BIOS machine: an MBR partition
table with one Linux partition (ext2, from mke2fs -d) holding /boot, and
GRUB for BIOS (Debian's grub-pc-bin: boot.img in the MBR, core.img in the
gap before the partition). GRUB's menu and messages go to the serial line.
No root, loop devices or network are needed.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import uuid
from pathlib import Path

GRUB_DIR = Path("/usr/lib/grub/i386-pc")
SECTOR = 512
PARTITION_START = 2048  # sectors: 1 MiB, as partitioners align
GRUB_MODULES = ["biosdisk", "part_msdos", "ext2", "normal", "linux", "serial", "terminal", "echo", "test",
                "search", "search_fs_uuid", "configfile", "boot"]

GRUB_CFG = """\
serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
set timeout={timeout}
set default=0
menuentry '{title}' {{
    echo 'pyvmm-disk: loading the kernel'
    linux /boot/vmlinuz {cmdline}
    initrd /boot/initrd.img
}}
"""


class DiskToolsMissing(RuntimeError):
    """grub-pc-bin or e2fsprogs is not installed (tests skip on it)."""


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(f"/usr/sbin/{name}") or shutil.which(f"/sbin/{name}")
    if path is None:
        raise DiskToolsMissing(f"{name} is not installed")
    return path


def _mbr_entry(start: int, sectors: int, kind: int = 0x83, bootable: bool = True) -> bytes:
    # CHS fields say "use the LBA fields" (the maximum), as for any disk over 8 GiB.
    return struct.pack("<B3sB3sII", 0x80 if bootable else 0, b"\xfe\xff\xff", kind, b"\xfe\xff\xff", start, sectors)


def make_grub_disk(out: Path, kernel: Path, initrd: Path, cmdline: str, *, size_mib: int = 64,
                   title: str = "pyvmm test", timeout: int = 1) -> Path:
    """Write the disk image `out`; returns it. The partition's UUID is
    in `out.with_suffix(".uuid")` for a root=UUID= command line."""
    for needed in ("boot.img", "diskboot.img", "kernel.img"):
        if not (GRUB_DIR / needed).exists():
            raise DiskToolsMissing(f"{GRUB_DIR / needed} is missing: apt-get install grub-pc-bin")
    out = Path(out)
    work = out.with_name(out.name + ".d")
    shutil.rmtree(work, ignore_errors=True)
    (work / "root" / "boot" / "grub").mkdir(parents=True)
    shutil.copyfile(kernel, work / "root" / "boot" / "vmlinuz")
    shutil.copyfile(initrd, work / "root" / "boot" / "initrd.img")
    (work / "root" / "boot" / "grub" / "grub.cfg").write_text(
        GRUB_CFG.format(timeout=timeout, title=title, cmdline=cmdline))

    total = size_mib * 1024 * 1024 // SECTOR
    part_sectors = total - PARTITION_START
    fs_uuid = str(uuid.uuid4())
    part = work / "part.img"
    subprocess.run([_tool("mke2fs"), "-q", "-F", "-t", "ext2", "-U", fs_uuid, "-L", "root", "-d",
                    str(work / "root"), str(part), f"{part_sectors // 2}k"], check=True, capture_output=True)
    core = work / "core.img"
    subprocess.run([_tool("grub-mkimage"), "-O", "i386-pc", "-d", str(GRUB_DIR), "-o", str(core),
                    "-p", "(hd0,msdos1)/boot/grub", *GRUB_MODULES], check=True, capture_output=True)
    core_bytes = core.read_bytes()
    if len(core_bytes) > (PARTITION_START - 1) * SECTOR:
        raise RuntimeError(f"core.img of {len(core_bytes)} bytes does not fit before the partition")

    boot = (GRUB_DIR / "boot.img").read_bytes()
    mbr = bytearray(SECTOR)
    mbr[:440] = boot[:440]  # code; boot.img's kernel_sector already says 1, where core.img goes
    mbr[440:444] = struct.pack("<I", int(fs_uuid[:8], 16))  # disk signature
    mbr[446:462] = _mbr_entry(PARTITION_START, part_sectors)
    mbr[510:512] = b"\x55\xaa"
    with out.open("wb") as disk:
        disk.truncate(total * SECTOR)
        disk.write(mbr)
        disk.seek(SECTOR)
        disk.write(core_bytes)  # diskboot.img first: its block list says "from sector 2"
        disk.seek(PARTITION_START * SECTOR)
        with part.open("rb") as source:
            shutil.copyfileobj(source, disk)
    out.with_suffix(".uuid").write_text(fs_uuid + "\n")
    shutil.rmtree(work)
    return out
