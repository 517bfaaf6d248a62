"""The pure parts of scripts/guest-image: the disk layout and MBR, GRUB's
boot sector and core.img blocklist as grub-bios-setup leaves them, the
configuration written into the image, apt sources and the cache key.
Where the host has them, Debian's own tools (sfdisk, grub-mkimage) check
the bytes."""

from __future__ import annotations

import dataclasses
import importlib.machinery
import importlib.util
import io
import os
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
GRUB_DIR = Path("/usr/lib/grub/i386-pc")


def _load_script(path: Path, name: str):
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_loader(name, loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    loader.exec_module(module)
    return module


image = _load_script(REPO_ROOT / "scripts" / "guest-image", "pyvmm_guest_image")

needs_sfdisk = pytest.mark.skipif(shutil.which("sfdisk") is None,
                                  reason="needs sfdisk (apt-get install fdisk)")
needs_grub = pytest.mark.skipif(not (GRUB_DIR / "boot.img").is_file()
                                or shutil.which("grub-mkimage") is None,
                                reason="needs GRUB for BIOS (apt-get install grub-pc-bin)")


def fake_boot_img() -> bytes:
    """The fields guest-image relies on, laid out as in GRUB 2's boot.S."""
    boot = bytearray(512)
    boot[0:2] = b"\xeb\x63"                      # jmp over the BPB
    boot[3:0x5A] = b"\x11" * (0x5A - 3)          # a BPB from "the disk" that must be cleared
    struct.pack_into("<H", boot, 0x5A, 0x8000)   # kernel_address
    struct.pack_into("<Q", boot, 0x5C, 1)        # kernel_sector
    boot[0x64] = 0xFF                            # boot_drive
    boot[0x65] = 0xFA                            # cli
    boot[0x66:0x68] = b"\xeb\x05"                # boot_drive_check: jmp 3f
    boot[0x68:0x1B8] = bytes(range(256)) + bytes(range(0x1B8 - 0x68 - 256))
    boot[0x1B8:0x1FE] = b"\x22" * (0x1FE - 0x1B8)  # floppy code that the table overwrites
    boot[0x1FE:] = b"\x55\xaa"
    return bytes(boot)


def fake_core_img(sectors: int = 60, tail: int = 100) -> bytes:
    """A diskboot.img-like first sector (default blocklist: start 2, len N,
    segment 0x820) and the rest of a core.img, not sector-aligned."""
    first = bytearray(512)
    struct.pack_into("<QHH", first, 500, 2, sectors, 0x820)
    return bytes(first) + bytes([0xC3]) * (sectors * 512 - tail)


# ---------------------------------------------------------------- layout

def test_disk_layout_is_one_partition_from_1_mib_to_the_end():
    layout = image.disk_layout(2048)
    assert layout.total_sectors == 2048 * 2048
    assert (layout.start, layout.offset) == (2048, 1 << 20)
    assert layout.start + layout.sectors == layout.total_sectors
    assert layout.size == 2 << 30
    assert layout.gap_sectors == 2047


@pytest.mark.parametrize("size", [0, 63, -1, 1.5, "1024", 2 << 20])
def test_disk_layout_refuses_bad_sizes(size):
    with pytest.raises(ValueError):
        image.disk_layout(size)


@pytest.mark.parametrize("lba, chs", [
    (0, (0, 0, 1)),           # (cylinder, head, sector)
    (62, (0, 0, 63)),
    (63, (0, 1, 1)),
    (2048, (0, 32, 33)),
    (16065, (1, 0, 1)),        # one cylinder: 255 * 63
    (1024 * 16065 - 1, (1023, 254, 63)),
    (1024 * 16065, (1023, 254, 63)),   # beyond CHS: saturated
    (0xFFFFFFFF, (1023, 254, 63)),
])
def test_lba_to_chs(lba, chs):
    cylinder, head, sector = chs
    raw = image.lba_to_chs(lba)
    assert raw[0] == head
    assert raw[1] & 0x3F == sector
    assert ((raw[1] & 0xC0) << 2) | raw[2] == cylinder


def test_partition_table_bytes():
    layout = image.disk_layout(1024)
    table = image.partition_table(layout, 0x1234ABCD)
    assert len(table) == 0x200 - 0x1B8
    assert struct.unpack_from("<IH", table, 0) == (0x1234ABCD, 0)
    entry = table[6:22]
    assert entry[0] == 0x80 and entry[4] == 0x83
    assert struct.unpack_from("<II", entry, 8) == (2048, 1024 * 2048 - 2048)
    assert table[22:70] == bytes(48)
    assert table[-2:] == b"\x55\xaa"


def test_partition_entry_must_fit():
    with pytest.raises(ValueError):
        image.partition_entry(0, 10)
    with pytest.raises(ValueError):
        image.partition_entry(2048, 0xFFFFFFFF)


@needs_sfdisk
def test_sfdisk_reads_the_partition_table(tmp_path):
    layout = image.disk_layout(128)
    disk = tmp_path / "disk.raw"
    with disk.open("wb") as stream:
        stream.truncate(layout.size)
        stream.write(image.make_mbr(fake_boot_img(), layout, 0xDEADBEEF))
    dump = subprocess.run(["sfdisk", "--dump", str(disk)], capture_output=True, text=True,
                          check=True).stdout
    assert "label: dos" in dump
    assert "label-id: 0xdeadbeef" in dump
    partitions = [line for line in dump.splitlines() if line.startswith(str(disk))]
    assert len(partitions) == 1
    assert "start=        2048" in partitions[0]
    assert f"size=      {layout.sectors}" in partitions[0]
    assert "type=83" in partitions[0] and "bootable" in partitions[0]


# ---------------------------------------------------------------- boot.img

def check_patched_mbr(mbr: bytes, boot: bytes, layout, disk_id: int) -> None:
    assert len(mbr) == 512
    assert mbr[0:3] == boot[0:3]
    assert mbr[3:0x5A] == bytes(0x57)                       # BPB cleared
    assert struct.unpack_from("<H", mbr, 0x5A)[0] == 0x8000
    assert struct.unpack_from("<Q", mbr, 0x5C)[0] == 1      # core.img at LBA 1
    assert mbr[0x64] == 0xFF                                # drive from the BIOS
    assert mbr[0x65] == boot[0x65]
    assert mbr[0x66:0x68] == b"\x90\x90"                    # hard disk: no floppy jump
    assert mbr[0x68:0x1B8] == boot[0x68:0x1B8]              # the code itself untouched
    assert mbr[0x1B8:] == image.partition_table(layout, disk_id)


def test_make_mbr_patches_what_grub_bios_setup_patches():
    boot = fake_boot_img()
    layout = image.disk_layout(2048)
    check_patched_mbr(image.make_mbr(boot, layout, 7), boot, layout, 7)


@needs_grub
def test_make_mbr_on_debians_boot_img():
    boot = (GRUB_DIR / "boot.img").read_bytes()
    layout = image.disk_layout(2048)
    check_patched_mbr(image.make_mbr(boot, layout, 7), boot, layout, 7)


@pytest.mark.parametrize("damage", [
    lambda b: b[:511],
    lambda b: b[:510] + b"\0\0",
    lambda b: b"\x90" + b[1:],
    lambda b: b[:0x66] + b"\x00" + b[0x67:],
    lambda b: b[:0x5A] + b"\x00\x7c" + b[0x5C:],
])
def test_make_mbr_refuses_what_is_not_a_grub_boot_img(damage):
    with pytest.raises(image.AssetError):
        image.make_mbr(damage(fake_boot_img()), image.disk_layout(1024), 1)


# ---------------------------------------------------------------- core.img

def blocklists(core: bytes) -> list[tuple[int, int, int]]:
    entries, position = [], 500
    while position > 0:
        entry = struct.unpack_from("<QHH", core, position)
        entries.append(entry)
        if entry[1] == 0:
            break
        position -= 12
    return entries


def test_embed_core_sets_one_blocklist_and_a_terminator():
    core = fake_core_img(sectors=60, tail=100)   # 61 sectors, the last one partly
    embedded = image.embed_core(core, image.disk_layout(1024))
    assert len(embedded) == 61 * 512
    assert embedded[:500] == core[:500]
    assert embedded[512:len(core)] == core[512:]
    assert embedded[len(core):] == bytes(len(embedded) - len(core))
    assert blocklists(embedded) == [(2, 60, 0x820), (0, 0, 0)]


def test_embed_core_clears_older_blocklists():
    core = bytearray(fake_core_img(sectors=10, tail=0))
    struct.pack_into("<QHH", core, 488, 900, 5, 0x1000)   # a second, stale entry
    embedded = image.embed_core(bytes(core), image.disk_layout(1024))
    assert blocklists(embedded) == [(2, 10, 0x820), (0, 0, 0)]


def test_embed_core_refuses_a_core_that_does_not_fit():
    layout = dataclasses.replace(image.disk_layout(1024), start=64)
    with pytest.raises(image.AssetError, match="gap"):
        image.embed_core(fake_core_img(sectors=70), layout)
    with pytest.raises(image.AssetError, match="gap"):
        image.embed_core(fake_core_img(sectors=image.CORE_MAX_SECTORS + 1), image.disk_layout(1024))


def test_embed_core_refuses_a_foreign_image():
    core = bytearray(fake_core_img())
    struct.pack_into("<H", core, 510, 0x1000)
    with pytest.raises(image.AssetError, match="segment"):
        image.embed_core(bytes(core), image.disk_layout(1024))
    with pytest.raises(image.AssetError):
        image.embed_core(b"\0" * 600, image.disk_layout(1024))


@needs_grub
def test_embed_core_on_a_core_img_from_grub_mkimage(tmp_path):
    early = tmp_path / "load.cfg"
    early.write_text(image.grub_early_config(str(uuid.uuid4())))
    core_path = tmp_path / "core.img"
    subprocess.run(["grub-mkimage", "-O", "i386-pc", "-d", str(GRUB_DIR), "-c", str(early),
                    "-p", "/boot/grub", "-o", str(core_path), *image.GRUB_CORE_MODULES],
                   check=True, capture_output=True)
    core = core_path.read_bytes()
    assert core[:512] == (GRUB_DIR / "diskboot.img").read_bytes()[:500] + core[500:512]
    embedded = image.embed_core(core, image.disk_layout(1024))
    sectors = -(-len(core) // 512)
    assert blocklists(embedded) == [(2, sectors - 1, 0x820), (0, 0, 0)]
    assert embedded[512:len(core)] == core[512:]


# ---------------------------------------------------------------- image contents

def test_kernel_command_line_has_root_by_uuid_and_ttys0_last():
    line = image.kernel_command_line("u-u-i-d", "pyvmm.check=poweroff")
    words = line.split()
    assert words[0] == "root=UUID=u-u-i-d" and "ro" in words
    consoles = [w for w in words if w.startswith("console=")]
    assert consoles == ["console=hvc0", "console=ttyS0,115200"]
    assert words[-1] == "pyvmm.check=poweroff"


def test_grub_config():
    root = str(uuid.uuid4())
    config = image.grub_config(root, timeout=3)
    assert "serial --unit=0 --speed=115200" in config
    assert "terminal_input serial console" in config and "terminal_output serial console" in config
    assert "set timeout=3\n" in config and "set default=0\n" in config
    assert f"search --no-floppy --fs-uuid --set=root {root}" in config
    assert config.count("menuentry ") == len(image.MENU_ENTRIES)
    assert config.count(f"root=UUID={root} ") == len(image.MENU_ENTRIES)
    assert config.count("{") == config.count("}")
    keys = [key for key, *_ in image.MENU_ENTRIES]
    assert len(set(keys)) == len(keys) and not set(keys) & {"c", "e"}
    emulated = next(line for line in config.splitlines()
                    if "linux " in line and "xen_emul_unplug=never" in line)
    assert "modprobe.blacklist=xen_blkfront" in emulated and "pyvmm.check=poweroff" in emulated


def test_grub_config_takes_the_entry_from_grubenv():
    config = image.grub_config(str(uuid.uuid4()))
    assert "if [ -s $prefix/grubenv ]; then load_env pyvmm_entry; fi\n" in config
    assert 'set default="pyvmm-${pyvmm_entry}"' in config
    # Every hotkey names an entry that id would select.
    for key, *_ in image.MENU_ENTRIES:
        assert f"--id=pyvmm-{key} " in config


@pytest.mark.skipif(shutil.which("grub-script-check") is None, reason="needs grub-common")
def test_grub_config_is_valid_grub_script(tmp_path):
    config = tmp_path / "grub.cfg"
    config.write_text(image.grub_config(str(uuid.uuid4())))
    subprocess.run(["grub-script-check", str(config)], check=True, capture_output=True)


def test_the_images_grubenv_is_an_empty_environment_block():
    block = image.empty_grubenv()
    assert len(block.encode()) == image.GRUBENV_SIZE == 1024
    assert block.startswith("# GRUB Environment Block\n") and set(block.splitlines()[1]) == {"#"}
    assert guest_image_helpers.grubenv_block() == block.encode()
    assert guest_image_helpers.GRUBENV_ENTRY == image.GRUBENV_ENTRY


@pytest.mark.skipif(shutil.which("grub-editenv") is None, reason="needs grub-common")
def test_grubenv_block_is_what_grub_editenv_reads(tmp_path):
    env = tmp_path / "grubenv"
    env.write_bytes(guest_image_helpers.grubenv_block(pyvmm_entry="i"))
    listing = subprocess.run(["grub-editenv", str(env), "list"], check=True, capture_output=True, text=True)
    assert listing.stdout == "pyvmm_entry=i\n"
    with pytest.raises(ValueError):
        guest_image_helpers.grubenv_block(pyvmm_entry="x" * 1024)


def test_grub_early_config_finds_root_by_uuid():
    assert image.grub_early_config("abcd") == (
        "search.fs_uuid abcd root hd0,msdos1\nset prefix=($root)/boot/grub\n")


def test_fstab_mounts_root_by_uuid():
    lines = [line for line in image.fstab("abcd").splitlines() if not line.startswith("#")]
    assert lines == ["UUID=abcd / ext4 errors=remount-ro 0 1"]


def test_overlay(tmp_path):
    overlay = tmp_path / "overlay"
    image.write_overlay(overlay, "abcd")
    assert stat.S_IMODE((overlay / "tmp").stat().st_mode) == 0o1777
    assert stat.S_IMODE((overlay / "etc").stat().st_mode) == 0o755
    assert stat.S_IMODE((overlay / "usr/local/sbin/pyvmm-check").stat().st_mode) == 0o755
    assert "UUID=abcd" in (overlay / "etc/fstab").read_text()
    assert (overlay / "etc/systemd/system/systemd-firstboot.service").readlink() == Path("/dev/null")
    wants = overlay / "etc/systemd/system/multi-user.target.wants/pyvmm-check.service"
    assert wants.is_symlink()
    customize = (overlay / "tmp/pyvmm-image-customize").read_text()
    assert "@" not in customize and "search_fs_uuid" in customize


@pytest.mark.parametrize("script", [image.CHECK_SCRIPT, image.CUSTOMIZE_SCRIPT])
def test_shell_scripts_parse(script, tmp_path):
    path = tmp_path / "script.sh"
    path.write_text(script)
    subprocess.run(["sh", "-n", str(path)], check=True)


def test_check_initramfs_listing():
    listing = "\n".join([
        "usr/lib/modules/6.1.0-57-cloud-amd64/kernel/drivers/block/xen-blkfront.ko",
        "usr/lib/modules/6.1.0-57-cloud-amd64/kernel/drivers/ata/ata_piix.ko",
        "usr/lib/modules/6.1.0-57-cloud-amd64/kernel/drivers/ata/ata_generic.ko",
        "usr/lib/modules/6.1.0-57-cloud-amd64/kernel/drivers/scsi/sd_mod.ko",
        "usr/lib/modules/6.1.0-57-cloud-amd64/kernel/drivers/block/virtio_blk.ko",
    ])
    assert image.check_initramfs_listing(listing) == [
        "xen-blkfront", "ata_piix", "ata_generic", "sd_mod"]
    with pytest.raises(image.AssetError, match="xen-blkfront"):
        image.check_initramfs_listing(listing.replace("xen-blkfront", "xen-blkback"))


# ---------------------------------------------------------------- apt sources

def test_image_sources_from_one_line_and_deb822(tmp_path):
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list").write_text(
        "# comment\n"
        "deb [signed-by=/k.gpg arch=amd64] http://mirror.example/debian bookworm main contrib\n"
        "deb-src http://mirror.example/debian bookworm main\n"
        "deb http://mirror.example/debian bookworm-backports main\n")
    (apt / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\n"
        "Types: deb\nURIs: https://vendor.example/apt\nSuites: nodistro\nComponents: main\n")
    text = image.image_sources(image.host_sources(apt))
    stanzas = text.split("\n\n")
    assert [s.splitlines()[2] for s in stanzas] == [
        "Suites: bookworm", "Suites: bookworm-updates", "Suites: bookworm-security"]
    assert "Signed-By: /k.gpg" in stanzas[0]            # the first entry for a suite wins
    assert "http://security.example/debian-security" in stanzas[2]
    assert "backports" not in text and "vendor" not in text


def test_image_sources_without_bookworm_is_a_clear_error():
    sources = [image.AptSource("http://x/debian", "trixie", ("main",))]
    with pytest.raises(image.AssetError, match="bookworm"):
        image.image_sources(sources)


# ---------------------------------------------------------------- cache key

def make_inputs(**changes):
    inputs = image.Inputs(kernel=("linux-image-6.1.0-57-cloud-amd64", "6.1.192-3"),
                          packages=(("systemd", "252.39-1~deb12u2"), ("libc6", "2.36-9")),
                          size_mib=2048, builder_sha256="0" * 64)
    return dataclasses.replace(inputs, **changes)


def test_cache_key_is_stable_and_covers_every_input():
    base = make_inputs()
    assert base.key() == make_inputs().key()
    assert len(base.key()) == 12
    variants = [
        make_inputs(kernel=("linux-image-6.1.0-58-cloud-amd64", "6.1.193-1")),
        make_inputs(packages=(("systemd", "252.40-1~deb12u1"), ("libc6", "2.36-9"))),
        make_inputs(size_mib=1024),
        make_inputs(builder_sha256="1" * 64),
    ]
    keys = {base.key()} | {v.key() for v in variants}
    assert len(keys) == 1 + len(variants)
    assert base.build_name() == f"bookworm-6.1.0-57-cloud-amd64-{base.key()}"


def test_root_uuid_and_disk_id_follow_the_key():
    base, other = make_inputs(), make_inputs(size_mib=1024)
    assert uuid.UUID(base.root_uuid()).version == 5
    assert base.root_uuid() == make_inputs().root_uuid() != other.root_uuid()
    assert 0 < base.disk_id() <= 0xFFFFFFFF
    assert base.disk_id() != other.disk_id()


# ---------------------------------------------------------------- filesystem

guest_image_helpers = _load_script(REPO_ROOT / "tests" / "integration" / "guest_image.py",
                                   "pyvmm_test_guest_image")
needs_e2fsprogs = pytest.mark.skipif(shutil.which("mke2fs") is None or shutil.which("debugfs") is None,
                                     reason="needs e2fsprogs")


def debugfs_stat(disk: Path, path: str) -> str:
    return subprocess.run(["debugfs", "-R", f"stat {path}", f"{disk}?offset={1 << 20}"],
                          capture_output=True, text=True, check=True).stdout


@needs_e2fsprogs
@pytest.mark.parametrize("as_root", [
    pytest.param(True, marks=pytest.mark.skipif(
        os.geteuid() != 0, reason="needs root")),
    pytest.param(False, marks=pytest.mark.skipif(
        shutil.which("fakeroot") is None, reason="needs fakeroot")),
], ids=["root", "fakeroot"])
def test_make_filesystem_keeps_owners_modes_and_devices(tmp_path, as_root):
    tarball = tmp_path / "root.tar"
    with tarfile.open(tarball, "w") as archive:
        def add(name, kind=tarfile.REGTYPE, data=b"", mode=0o644, uid=0, **extra):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid, info.gid, info.size = kind, mode, uid, uid, len(data)
            for key, value in extra.items():
                setattr(info, key, value)
            archive.addfile(info, io.BytesIO(data) if data else None)
        add("etc", tarfile.DIRTYPE, mode=0o755)
        add("etc/hello", data=b"hello from the image\n", mode=0o640)
        add("srv", tarfile.DIRTYPE, mode=0o755)
        add("srv/owned", data=b"x", uid=100)
        add("dev", tarfile.DIRTYPE, mode=0o755)
        add("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3)
        add("vmlinuz", tarfile.SYMTYPE, linkname="boot/vmlinuz-1")
    layout = image.disk_layout(64)
    disk = tmp_path / "disk.raw"
    with disk.open("wb") as stream:
        stream.truncate(layout.size)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    image.make_filesystem(tarball, disk, layout, "6a1f0b34-4f5c-4bd3-9f0e-2d1c3c0d7e11", scratch,
                          as_root=as_root)

    assert disk.stat().st_size == layout.size       # nothing written past the partition
    assert disk.read_bytes()[:1 << 20] == bytes(1 << 20)   # nor before it
    read = guest_image_helpers.read_image_file
    assert read(disk, "/etc/hello") == b"hello from the image\n"
    with pytest.raises(FileNotFoundError):
        read(disk, "/etc/missing")
    hello = debugfs_stat(disk, "/etc/hello")
    assert "User:     0" in hello and "Mode:  0640" in hello
    assert "User:   100" in debugfs_stat(disk, "/srv/owned")
    null = debugfs_stat(disk, "/dev/null")
    assert "Type: character special" in null and "Device major/minor number: 01:03" in null
    assert 'Fast link dest: "boot/vmlinuz-1"' in debugfs_stat(disk, "/vmlinuz")
    super_block = subprocess.run(["dumpe2fs", "-h", f"{disk}?offset={1 << 20}"], capture_output=True,
                                 text=True, check=True).stdout
    assert "6a1f0b34-4f5c-4bd3-9f0e-2d1c3c0d7e11" in super_block
    assert image.FS_LABEL in super_block


@needs_e2fsprogs
def test_choose_entry_replaces_the_grubenv_in_the_image(tmp_path):
    grub = tmp_path / "tree" / "boot" / "grub"
    grub.mkdir(parents=True)
    (grub / "grubenv").write_text(image.empty_grubenv())
    layout = image.disk_layout(64)
    disk = tmp_path / "disk.raw"
    with disk.open("wb") as stream:
        stream.truncate(layout.size)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-E", f"offset={layout.offset}", "-d",
                    str(tmp_path / "tree"), str(disk), f"{layout.sectors * image.SECTOR // 1024}k"],
                   check=True, capture_output=True)
    guest_image_helpers.choose_entry(disk, "i")
    block = guest_image_helpers.read_image_file(disk, "/boot/grub/grubenv")
    assert block == guest_image_helpers.grubenv_block(pyvmm_entry="i")
    assert not (tmp_path / "disk.raw.grubenv").exists()
    subprocess.run(["e2fsck", "-fn", f"{disk}?offset={layout.offset}"], check=True, capture_output=True)


def test_check_report_parses_the_last_marker():
    console = ("noise\r\npyvmm-check: ok root=/dev/sda1 fstype=ext4 disks=sda boot=1\r\n"
               "[  5.1] pyvmm-check[230]: pyvmm-check: ok root=/dev/xvda1 fstype=ext4 "
               "disks=xvda hypervisor=xen boot=2\r\n")
    assert guest_image_helpers.check_report(console) == {
        "root": "/dev/xvda1", "fstype": "ext4", "disks": "xvda", "hypervisor": "xen", "boot": "2"}
    assert guest_image_helpers.check_report("nothing here") is None
    assert guest_image_helpers.MARKER_CHECK_OK.strip() == image.CHECK_MARKER + " ok"


# ---------------------------------------------------------------- mmdebstrap mode

def test_has_subid(tmp_path):
    subuid = tmp_path / "subuid"
    subuid.write_text("alice:100000:65536\nbob:165536:65536\n")
    assert image.has_subid("bob", subuid)
    assert not image.has_subid("carol", subuid)
    assert not image.has_subid("bob", tmp_path / "missing")


@pytest.mark.parametrize("euid, unshare_works, subids, fakechroot, mode", [
    (0, True, False, "/usr/bin/fakechroot", "unshare"),
    (0, False, False, "/usr/bin/fakechroot", "fakechroot"),   # a container without CAP_SYS_ADMIN
    (0, False, False, None, "unshare"),                        # mmdebstrap then says why not
    (1000, False, True, "/usr/bin/fakechroot", "unshare"),
    (1000, False, False, "/usr/bin/fakechroot", "fakechroot"),
])
def test_default_mode(monkeypatch, euid, unshare_works, subids, fakechroot, mode):
    monkeypatch.setattr(image.os, "geteuid", lambda: euid)
    monkeypatch.setattr(image.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 0 if unshare_works else 1))
    monkeypatch.setattr(image, "has_subid", lambda name, path: subids)
    monkeypatch.setattr(image.shutil, "which", lambda name: fakechroot)
    assert image.default_mode() == mode
