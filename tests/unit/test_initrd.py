"""The per-test initramfs builder (tests/integration/initrd.py) and the pure parts of
scripts/guest-assets: newc archives are checked with Debian's own cpio."""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO_ROOT = Path(__file__).resolve().parents[2]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


initrd = _load(REPO_ROOT / "tests" / "integration" / "initrd.py", "pyvmm_test_initrd")
assets = initrd._guest_assets_module()

needs_cpio = pytest.mark.skipif(shutil.which("cpio") is None,
                                reason="needs cpio (apt-get install cpio)")


def cpio_list(archive: bytes) -> dict[str, str]:
    """name -> `ls -l` style mode string, as GNU cpio reads the archive."""
    result = subprocess.run(["cpio", "-itv", "--quiet"], input=archive,
                            capture_output=True, check=True)
    listing = {}
    for line in result.stdout.decode().splitlines():
        fields = line.split()
        name = fields[-3] if " -> " in line else fields[-1]
        listing[name] = fields[0]
    return listing


def cpio_extract(archive: bytes, into: Path) -> None:
    subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=archive,
                   cwd=into, capture_output=True, check=True)


def split_overlay(out: bytes, base: bytes) -> bytes:
    """The decompressed archive make_test_initrd appended after `base`."""
    assert out[:len(base)] == base
    rest = out[len(base):]
    padding = len(rest) - len(rest.lstrip(b"\0"))
    assert (len(base) + padding) % 4 == 0 and padding < 4
    return gzip.decompress(rest[padding:])


@pytest.fixture
def base(tmp_path: Path) -> Path:
    # An odd length exercises the alignment padding before the overlay.
    path = tmp_path / "base.cpio.gz"
    path.write_bytes(b"\x1f\x8b base initramfs stand-in \x01")
    return path


@needs_cpio
def test_overlay_holds_executable_test_script_and_files(tmp_path, base):
    script = "echo hello from the guest\nexit 3\n"
    files = {"/etc/data.bin": bytes(range(256)) * 3, "srv/deep/dir/note.txt": b"x"}
    out = initrd.make_test_initrd(base, tmp_path / "initrd", script, files)

    overlay = split_overlay(out.read_bytes(), base.read_bytes())
    listing = cpio_list(overlay)
    assert listing["test.sh"] == "-rwxr-xr-x"
    assert listing["etc/data.bin"] == "-rw-r--r--"
    assert listing["srv/deep/dir/note.txt"] == "-rw-r--r--"
    # Parents come before children so the kernel can create them in order.
    names = list(listing)
    assert names.index("srv") < names.index("srv/deep") < names.index("srv/deep/dir/note.txt")
    assert listing["srv/deep"] == "drwxr-xr-x"

    extracted = tmp_path / "extracted"
    extracted.mkdir()
    cpio_extract(overlay, extracted)
    assert (extracted / "test.sh").read_text() == script
    assert (extracted / "etc/data.bin").read_bytes() == files["/etc/data.bin"]
    assert stat.S_IMODE((extracted / "test.sh").stat().st_mode) == 0o755


@needs_cpio
def test_overlay_without_files_has_only_the_script(tmp_path, base):
    out = initrd.make_test_initrd(base, tmp_path / "initrd", "true\n")
    assert list(cpio_list(split_overlay(out.read_bytes(), base.read_bytes()))) == ["test.sh"]


@pytest.mark.parametrize("bad_path", [
    "../escape",
    "/etc/../../escape",
    "a/./b",
    "a//b",
    "",
    "/",
    "nul\0byte",
    "x" * 256,                       # one component over NAME_MAX
    "/".join(["d" * 200] * 21),      # whole path over PATH_MAX
])
def test_bad_paths_are_refused(tmp_path, base, bad_path):
    with pytest.raises(ValueError):
        initrd.make_test_initrd(base, tmp_path / "initrd", "true\n", {bad_path: b"data"})


def test_files_may_not_replace_the_test_script(tmp_path, base):
    with pytest.raises(ValueError, match="twice"):
        initrd.make_test_initrd(base, tmp_path / "initrd", "true\n", {"/test.sh": b"other"})


def test_files_may_not_live_below_a_file(tmp_path, base):
    with pytest.raises(ValueError, match="not a directory"):
        initrd.make_test_initrd(base, tmp_path / "initrd", "true\n", {"test.sh/x": b""})


def test_longest_allowed_path_is_accepted():
    name = "/".join(["d" * 255] * 16)[:4095]
    assert assets.validate_member_path("/" + name) == name


@needs_cpio
def test_writer_symlinks_devices_and_directory_modes():
    stream = io.BytesIO()
    with initrd.newc_writer(stream) as archive:
        archive.add_directory("tmp", 0o1777)
        archive.add_char_device("dev/console", 5, 1)
        archive.add_symlink("bin/sh", "/bin/busybox")
    assert len(stream.getvalue()) % 4 == 0
    result = subprocess.run(["cpio", "-itv", "--quiet"], input=stream.getvalue(),
                            capture_output=True, check=True)
    lines = result.stdout.decode().splitlines()
    assert lines[0].startswith("drwxrwxrwt") and lines[0].endswith(" tmp")
    console = next(line for line in lines if line.endswith("dev/console"))
    assert console.startswith("crw-------") and "5,   1" in console
    assert any(line.startswith("lrwxrwxrwx") and line.endswith("bin/sh -> /bin/busybox")
               for line in lines)


def test_writer_refuses_additions_after_close():
    archive = initrd.newc_writer(io.BytesIO())
    archive.close()
    with pytest.raises(ValueError):
        archive.add_file("late", b"")


names = st.text(alphabet="abcXYZ019_-.", min_size=1, max_size=12).filter(
    lambda n: n not in (".", ".."))


@needs_cpio
@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.dictionaries(st.lists(names, min_size=1, max_size=3).map("/".join),
                             st.binary(max_size=64), max_size=6))
def test_any_valid_tree_round_trips_through_cpio(tmp_path_factory, files):
    # A file whose path is also a directory of another file cannot exist.
    if any(other.startswith(path + "/") for path in files for other in files):
        return
    files = {path: data for path, data in files.items() if path.split("/")[0] != "test.sh"}
    work = tmp_path_factory.mktemp("tree")
    base = work / "base"
    base.write_bytes(b"")
    out = initrd.make_test_initrd(base, work / "initrd", "true\n", files)
    extracted = work / "x"
    extracted.mkdir()
    cpio_extract(gzip.decompress(out.read_bytes()), extracted)
    for path, data in files.items():
        assert (extracted / path).read_bytes() == data


def test_reported_exit_status_takes_the_last_marker():
    console = ("pyvmm-guest: init started\r\n[    1.0] some kernel line\r\n"
               "pyvmm-guest: test exit 7\r\n")
    assert initrd.reported_exit_status(console) == 7
    assert initrd.reported_exit_status("\x1bc\x1b[2Jpyvmm-guest: test exit 0\r\n") == 0
    assert initrd.reported_exit_status("pyvmm-guest: init started\n") is None
    assert initrd.reported_exit_status("pyvmm-guest: test exit x\n") is None


# ---- pure logic of scripts/guest-assets ----------------------------------

def make_module_elf(modinfo: list[str]) -> bytes:
    """A minimal ELF64 object with a .shstrtab and a .modinfo section."""
    names = b"\0.shstrtab\0.modinfo\0"
    body = b"".join(item.encode() + b"\0" for item in modinfo)
    names_at = 64
    body_at = names_at + len(names)
    sections_at = (body_at + len(body) + 7) & ~7
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x28, sections_at)
    struct.pack_into("<HHH", header, 0x3A, 64, 3, 1)
    image = bytearray(header + names + body)
    image += bytes(sections_at - len(image))
    for name_offset, offset, size in ((0, 0, 0), (1, names_at, len(names)),
                                      (11, body_at, len(body))):
        image += struct.pack("<IIQQQQIIQQ", name_offset, 1, 0, 0, offset, size, 0, 0, 1, 0)
    return bytes(image)


def test_read_modinfo_parses_key_value_pairs():
    elf = make_module_elf(["alias=xen:vbd", "depends=", "name=xen_blkfront",
                           "vermagic=6.1.0 SMP mod_unload "])
    assert assets.read_modinfo(elf) == [("alias", "xen:vbd"), ("depends", ""),
                                        ("name", "xen_blkfront"),
                                        ("vermagic", "6.1.0 SMP mod_unload ")]


@pytest.mark.parametrize("damage", [
    lambda elf: b"\x7fELX" + elf[4:],
    lambda elf: elf[:4] + b"\x01" + elf[5:],                 # 32-bit
    lambda elf: elf[:0x28] + struct.pack("<Q", 1 << 40) + elf[0x30:],
    lambda elf: elf[:-64],                                    # truncated section table
])
def test_read_modinfo_rejects_damaged_elf(damage):
    with pytest.raises(ValueError):
        assets.read_modinfo(damage(make_module_elf(["name=x"])))


def test_read_modinfo_needs_a_modinfo_section():
    elf = bytearray(make_module_elf(["name=x"]))
    elf[64 + 11:64 + 19] = b".notinfo"
    with pytest.raises(ValueError, match="no .modinfo"):
        assets.read_modinfo(bytes(elf))


def module(name, relpath, depends=(), aliases=()):
    return assets.KernelModule(name, relpath, tuple(depends), tuple(aliases), "v")


MODULES = {m.name: m for m in (
    module("xen_scsifront", "kernel/drivers/scsi/xen-scsifront.ko", ["scsi_mod"], ["xen:vscsi"]),
    module("scsi_mod", "kernel/drivers/scsi/scsi_mod.ko", ["scsi_common"]),
    module("scsi_common", "kernel/drivers/scsi/scsi_common.ko"),
    module("xen_blkback", "kernel/drivers/block/xen-blkback/xen-blkback.ko"),
    module("pvcalls_back", "kernel/drivers/xen/pvcalls-back.ko"),
    module("pvcalls_front", "kernel/drivers/xen/pvcalls-front.ko"),
    module("xen_wdt", "kernel/drivers/watchdog/xen_wdt.ko", ["watchdog"]),
    module("watchdog", "kernel/drivers/watchdog/watchdog.ko"),
    module("loop", "kernel/drivers/block/loop.ko"),
)}


def test_xen_guest_modules_exclude_backends_and_unrelated_modules():
    chosen = {m.name for m in MODULES.values() if assets.is_xen_guest_module(m)}
    assert chosen == {"xen_scsifront", "pvcalls_front", "xen_wdt"}


def test_load_order_puts_dependencies_first():
    order = assets.load_order(["xen_scsifront", "xen_wdt"], MODULES)
    assert sorted(order) == ["scsi_common", "scsi_mod", "watchdog", "xen_scsifront", "xen_wdt"]
    assert order.index("scsi_common") < order.index("scsi_mod") < order.index("xen_scsifront")
    assert order.index("watchdog") < order.index("xen_wdt")


def test_load_order_reports_missing_dependency_and_cycles():
    broken = dict(MODULES, a=module("a", "kernel/a.ko", ["missing"]))
    with pytest.raises(assets.AssetError, match="missing.*needed by a"):
        assets.load_order(["a"], broken)
    cyclic = {"a": module("a", "kernel/a.ko", ["b"]), "b": module("b", "kernel/b.ko", ["a"])}
    with pytest.raises(assets.AssetError, match="cycle"):
        assets.load_order(["a"], cyclic)


def test_modules_dep_lists_all_dependencies_in_reverse_load_order():
    selected = assets.load_order(["xen_scsifront"], MODULES)
    lines = assets.modules_dep_text(selected, MODULES).splitlines()
    assert "kernel/drivers/scsi/scsi_common.ko:" in lines
    assert ("kernel/drivers/scsi/xen-scsifront.ko: kernel/drivers/scsi/scsi_mod.ko "
            "kernel/drivers/scsi/scsi_common.ko") in lines
    assert assets.modules_alias_text(selected, MODULES) == "alias xen:vscsi xen_scsifront\n"


def test_builtin_xen_options_only_lists_built_in_xen_symbols():
    config = ("CONFIG_XEN=y\nCONFIG_XEN_BLKDEV_FRONTEND=m\n# CONFIG_XEN_WDT is not set\n"
              "CONFIG_HVC_XEN=y\nCONFIG_SERIAL_8250=y\nCONFIG_XEN_MEMORY_HOTPLUG_LIMIT=512\n")
    assert assets.builtin_xen_options(config) == ["CONFIG_XEN", "CONFIG_HVC_XEN"]


def test_cache_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path / "explicit"))
    assert assets.cache_root() == tmp_path / "explicit"
    monkeypatch.delenv("PYVMM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_root() == tmp_path / "xdg" / "pyvmm"


def test_inputs_key_changes_with_each_input():
    kernel = assets.Package("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2")
    busybox = assets.Package("busybox-static", "1:1.35.0-4")
    reference = assets.Inputs(kernel, busybox, b"#!/bin/sh\n", "builder")
    variants = [
        assets.Inputs(assets.Package(kernel.name, "6.1.192-3"), busybox, b"#!/bin/sh\n", "builder"),
        assets.Inputs(kernel, assets.Package(busybox.name, "1:1.36"), b"#!/bin/sh\n", "builder"),
        assets.Inputs(kernel, busybox, b"#!/bin/sh\necho\n", "builder"),
        assets.Inputs(kernel, busybox, b"#!/bin/sh\n", "builder2"),
    ]
    keys = {reference.key()} | {variant.key() for variant in variants}
    assert len(keys) == 5
    assert reference.build_name().startswith("6.1.0-56-cloud-amd64-")


def test_guest_assets_honours_an_explicit_directory(monkeypatch, tmp_path):
    for name in ("vmlinuz", "initramfs.cpio.gz"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "manifest.json").write_text('{"kernel_release": "6.1.0-99-cloud-amd64"}')
    monkeypatch.setenv("PYVMM_GUEST_ASSETS", str(tmp_path))
    initrd.guest_assets.cache_clear()
    try:
        found = initrd.guest_assets()
        assert found["initramfs"] == tmp_path / "initramfs.cpio.gz"
        assert found["kernel_release"] == "6.1.0-99-cloud-amd64"
        (tmp_path / "vmlinuz").unlink()
        initrd.guest_assets.cache_clear()
        with pytest.raises(initrd.GuestAssetsUnavailable, match="vmlinuz"):
            initrd.guest_assets()
    finally:
        initrd.guest_assets.cache_clear()


@needs_cpio
def test_decompressed_initrd_keeps_every_archive_aligned(tmp_path):
    # A real gzip'd base of odd length: the overlay follows zero padding.
    base_archive = io.BytesIO()
    writer = initrd.newc_writer(base_archive)
    writer.add_file("base.txt", b"base content", 0o644)
    writer.close()
    raw_base = base_archive.getvalue() + b"odd"  # an archive whose length is not a multiple of 4
    base = tmp_path / "base.cpio.gz"
    base.write_bytes(gzip.compress(raw_base, mtime=0))
    packed = initrd.make_test_initrd(base, tmp_path / "initrd", "exit 0\n", {"/etc/x": b"1"})

    out = initrd.decompressed_initrd(packed, tmp_path / "initrd.cpio").read_bytes()
    assert out.startswith(raw_base)
    overlay = out[len(raw_base):]
    padding = len(overlay) - len(overlay.lstrip(b"\0"))
    assert (len(raw_base) + padding) % 4 == 0 and padding < 4
    assert list(cpio_list(overlay.lstrip(b"\0"))) == ["test.sh", "etc", "etc/x"]
    assert len(out) % 4 == 0


def test_decompressed_initrd_refuses_what_is_not_gzip(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"070701 raw cpio")
    with pytest.raises(ValueError, match="not a gzip member"):
        initrd.decompressed_initrd(bad, tmp_path / "out")
    cut = tmp_path / "cut"
    cut.write_bytes(gzip.compress(b"x" * 10000)[:-20])
    with pytest.raises(ValueError, match="cut short"):
        initrd.decompressed_initrd(cut, tmp_path / "out")
