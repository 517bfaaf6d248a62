"""ISO 9660 images for CD-ROM tests, built offline.

    iso = make_eltorito_iso(tmp_path / "boot.iso", boot_code)   # no tools needed
    iso = make_grub_iso(tmp_path / "linux.iso", kernel, initrd, cmdline, {"hello.txt": b"..."})

make_eltorito_iso writes the few sectors a BIOS reads of a bootable CD (the
primary volume descriptor, El Torito's boot record and catalog) around a
no-emulation boot image, with no file system to speak of. make_grub_iso
uses GRUB's grub-mkrescue (grub-pc-bin, with xorriso) for a real one.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

from disk_image import GRUB_CFG, GRUB_DIR, DiskToolsMissing

BLOCK = 2048
PVD, BOOT_RECORD, TERMINATOR, CATALOG, BOOT_IMAGE = 16, 17, 18, 19, 20


def _descriptor(kind: int, body: bytes) -> bytes:
    return (bytes([kind]) + b"CD001\x01" + body).ljust(BLOCK, b"\0")


def make_eltorito_iso(out: Path, boot_code: bytes, *, extra_blocks: int = 4) -> Path:
    """A CD whose El Torito no-emulation boot image (loaded at 07C0:0000) is
    `boot_code` (at most 2048 bytes)."""
    if len(boot_code) > BLOCK:
        raise ValueError("the boot image is one 2048-byte sector here")
    total = BOOT_IMAGE + 1 + extra_blocks
    image = bytearray(total * BLOCK)
    pvd = bytearray(BLOCK - 7)  # from byte 7 of the sector: the offsets below are ECMA-119's less 7
    pvd[1:33] = b"PYVMM".ljust(32)  # system identifier
    pvd[33:65] = b"PYVMM_CD_TEST".ljust(32)  # volume identifier
    pvd[73:81] = struct.pack("<I", total) + struct.pack(">I", total)  # volume space size, both-endian
    pvd[113:117] = struct.pack("<H", 1) + struct.pack(">H", 1)  # volume set size
    pvd[117:121] = struct.pack("<H", 1) + struct.pack(">H", 1)  # volume sequence number
    pvd[121:125] = struct.pack("<H", BLOCK) + struct.pack(">H", BLOCK)  # logical block size
    image[PVD * BLOCK : (PVD + 1) * BLOCK] = _descriptor(1, bytes(pvd))
    record = bytearray(BLOCK - 7)
    record[0:32] = b"EL TORITO SPECIFICATION".ljust(32, b"\0")
    record[64:68] = struct.pack("<I", CATALOG)  # at byte 0x47 of the sector
    image[BOOT_RECORD * BLOCK : (BOOT_RECORD + 1) * BLOCK] = _descriptor(0, bytes(record))
    image[TERMINATOR * BLOCK : (TERMINATOR + 1) * BLOCK] = _descriptor(255, b"")
    validation = bytearray(32)
    validation[0] = 0x01  # header ID; platform 0 (80x86)
    validation[4:28] = b"PYVMM".ljust(24, b"\0")
    validation[30:32] = b"\x55\xaa"
    checksum = -sum(struct.unpack("<16H", bytes(validation))) & 0xFFFF
    validation[28:30] = struct.pack("<H", checksum)
    # Initial entry: bootable, no emulation, load segment 0 (07C0), 4 virtual 512-byte sectors.
    initial = struct.pack("<BBHBBHI", 0x88, 0, 0, 0, 0, 4, BOOT_IMAGE).ljust(32, b"\0")
    image[CATALOG * BLOCK : CATALOG * BLOCK + 64] = bytes(validation) + initial
    image[BOOT_IMAGE * BLOCK : BOOT_IMAGE * BLOCK + len(boot_code)] = boot_code
    Path(out).write_bytes(bytes(image))
    return Path(out)


def print_boot_code(message: bytes) -> bytes:
    """Real-mode code that prints `message` through the BIOS (INT 10h
    teletype, which SeaBIOS copies to the serial line), then halts."""
    code = bytes([
        0xE8, 0x00, 0x00,  # call next: the stack holds where this code runs
        0x5E,  # pop si
        0x83, 0xC6, 22,  # add si, message - 3
        0x0E, 0x1F,  # push cs; pop ds
        0xAC,  # next: lodsb
        0x84, 0xC0,  # test al, al
        0x74, 0x08,  # jz done
        0xB4, 0x0E,  # mov ah, 0x0e
        0x31, 0xDB,  # xor bx, bx
        0xCD, 0x10,  # int 0x10
        0xEB, 0xF3,  # jmp next
        0xF4,  # done: hlt
        0xEB, 0xFD,  # jmp done
    ])
    assert len(code) == 25
    return code + message + b"\0"


def make_grub_iso(out: Path, kernel: Path, initrd: Path, cmdline: str, files: dict[str, bytes], *,
                  title: str = "pyvmm cdrom test") -> Path:
    """A GRUB (BIOS, El Torito) CD holding /boot/vmlinuz, /boot/initrd.img and `files` at its root."""
    for tool in ("grub-mkrescue", "xorriso"):
        if shutil.which(tool) is None:
            raise DiskToolsMissing(f"{tool} is not installed (grub-mkrescue needs grub-pc-bin and xorriso)")
    if not (GRUB_DIR / "cdboot.img").exists():
        raise DiskToolsMissing(f"{GRUB_DIR / 'cdboot.img'} is missing: apt-get install grub-pc-bin")
    out = Path(out)
    root = out.with_name(out.name + ".d")
    shutil.rmtree(root, ignore_errors=True)
    (root / "boot" / "grub").mkdir(parents=True)
    shutil.copyfile(kernel, root / "boot" / "vmlinuz")
    shutil.copyfile(initrd, root / "boot" / "initrd.img")
    (root / "boot" / "grub" / "grub.cfg").write_text(GRUB_CFG.format(timeout=1, title=title, cmdline=cmdline))
    for name, data in files.items():
        (root / name).write_bytes(data)
    subprocess.run(["grub-mkrescue", "-d", str(GRUB_DIR), "-o", str(out), str(root)], check=True,
                   capture_output=True)
    shutil.rmtree(root)
    return out
