"""Guest kernel/initramfs for integration tests, and per-test initramfs overlays.

    assets = guest_assets()            # builds once, cached: see docs/GUEST-ASSETS.md
    initrd = make_test_initrd(assets["initramfs"], tmp_path / "initrd",
                              "cat /proc/cpuinfo\\nlsmod\\n")
    # boot assets["vmlinuz"] with initrd; the console shows
    #   pyvmm-guest: init started ... pyvmm-guest: test exit 0

The overlay is a second gzip'd newc archive appended to the base initramfs:
the kernel unpacks concatenated archives in order, later members replacing
earlier ones, so a test adds /test.sh (and data files) without rebuilding
the base.
"""

from __future__ import annotations

import functools
import gzip
import importlib.machinery
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[2]
GUEST_ASSETS_SCRIPT = REPO_ROOT / "scripts" / "guest-assets"
GUEST_ASSETS_ENV = "PYVMM_GUEST_ASSETS"
TEST_SCRIPT_PATH = "test.sh"

# Markers printed by scripts/guest-init on the guest console.
MARKER_INIT_STARTED = "pyvmm-guest: init started"
MARKER_READY = "pyvmm-guest: ready"
MARKER_TEST_EXIT_PREFIX = "pyvmm-guest: test exit "


# For a test's guest script: xs TYPE PATH [VALUE] sends one xenstore request
# through the kernel's /dev/xen/xenbus (raw wire protocol built by busybox
# printf, so the guest needs no xenstore tools) and prints the reply's
# payload (an error reply prints its name, e.g. ENOENT). TYPE 2 reads, 11 writes.
XS_SHELL = r"""
xs() {
    if [ $# -eq 3 ]; then len=$(( ${#2} + 1 + ${#3} )); body="$2\000$3"; else len=$(( ${#2} + 1 )); body="$2\000"; fi
    exec 3<>/dev/xen/xenbus
    printf "\\$(printf %03o $1)\000\000\000\000\000\000\000\000\000\000\000\\$(printf %03o $len)\000\000\000$body" >&3
    dd bs=4096 count=1 <&3 2>/dev/null | tail -c +17 | tr -d '\000'
    exec 3<&-
}
"""


class GuestAssetsUnavailable(RuntimeError):
    """scripts/guest-assets could not build or find the guest assets
    (typically: no Debian package archive reachable). Tests may skip on it."""


@functools.cache
def _guest_assets_module() -> ModuleType:
    # The script is the single home of the newc writer; load it as a module.
    loader = importlib.machinery.SourceFileLoader("pyvmm_guest_assets", str(GUEST_ASSETS_SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = module  # dataclasses look their module up there
    loader.exec_module(module)
    return module


def newc_writer(stream):
    """A newc cpio writer on a binary stream (NewcWriter in scripts/guest-assets)."""
    return _guest_assets_module().NewcWriter(stream)


def make_test_initrd(base: Path, out: Path, script: str,
                     files: dict[str, bytes] | None = None) -> Path:
    """Write `out`: the `base` initramfs followed by an archive holding
    /test.sh (0755, run by the guest's /init) and `files` (0644), whose keys
    are guest paths such as "/etc/data" or "srv/disk.img".

    Raises ValueError for a path the kernel would refuse or that could escape
    the initramfs root ("..", over-long names), or one given twice.
    """
    overlay = io.BytesIO()
    with gzip.GzipFile(fileobj=overlay, mode="wb", mtime=0) as compressed:
        archive = newc_writer(compressed)
        archive.add_file(TEST_SCRIPT_PATH, script.encode(), 0o755)
        for path, data in sorted((files or {}).items()):
            archive.add_file(path, data, 0o644)  # ValueError on a bad or repeated path
        archive.close()

    out = Path(out)
    with Path(base).open("rb") as base_stream, out.open("wb") as out_stream:
        shutil.copyfileobj(base_stream, out_stream)
        # Archives in an initramfs start on a 4-byte boundary; the kernel
        # skips the zero padding between them.
        out_stream.write(b"\0" * (-out_stream.tell() % 4))
        out_stream.write(overlay.getvalue())
    return out


def decompressed_initrd(src: Path, out: Path) -> Path:
    """Write `out`: the archives of the initramfs `src` (gzip members, such as
    make_test_initrd's base and overlay, with zero padding between them)
    uncompressed, each starting on a 4-byte boundary, as the kernel reads them.

    A large initramfs boots faster so under an emulated CPU: the kernel copies
    it instead of inflating it."""
    data = Path(src).read_bytes()
    position = 0
    with Path(out).open("wb") as stream:
        while position < len(data):
            if data[position] == 0:
                position += 1
                continue
            if data[position:position + 2] != b"\x1f\x8b":
                raise ValueError(f"{src}: not a gzip member at offset {position}")
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            stream.write(inflater.decompress(data[position:]) + inflater.flush())
            if not inflater.eof:
                raise ValueError(f"{src}: the gzip member at offset {position} is cut short")
            stream.write(b"\0" * (-stream.tell() % 4))
            position = len(data) - len(inflater.unused_data)
    return Path(out)


@functools.cache
def guest_assets() -> dict:
    """Build (first time) or locate the guest assets and return
    {"dir", "vmlinuz", "initramfs", "manifest": Path, "kernel_release": str}.

    PYVMM_GUEST_ASSETS=<dir> names a build directory to use as is, for
    environments that cannot run scripts/guest-assets themselves (the testbed
    sees the host's files read-only and may lack apt's lists).
    """
    if os.environ.get(GUEST_ASSETS_ENV):
        directory = Path(os.environ[GUEST_ASSETS_ENV])
    else:
        directory = _run_guest_assets_script()
    assets = {
        "dir": directory,
        "vmlinuz": directory / "vmlinuz",
        "initramfs": directory / "initramfs.cpio.gz",
        "manifest": directory / "manifest.json",
    }
    for name, path in assets.items():
        if not path.exists():
            raise GuestAssetsUnavailable(f"guest assets incomplete: no {name} at {path}")
    assets["kernel_release"] = json.loads(assets["manifest"].read_text())["kernel_release"]
    return assets


def _run_guest_assets_script() -> Path:
    try:
        result = subprocess.run([sys.executable, str(GUEST_ASSETS_SCRIPT), "--print-dir"],
                                capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise GuestAssetsUnavailable(f"cannot run {GUEST_ASSETS_SCRIPT}: {error}") from None
    if result.returncode != 0:
        raise GuestAssetsUnavailable(
            f"{GUEST_ASSETS_SCRIPT} failed (exit {result.returncode}):\n{result.stderr.strip()}")
    return Path(result.stdout.strip())


_EXIT_MARKER = re.compile(re.escape(MARKER_TEST_EXIT_PREFIX) + r"(\d+)\s*$")


def reported_exit_status(console_output: str) -> int | None:
    """The exit status /test.sh reported on the console, or None if it never
    finished. Firmware escape codes may precede a marker on its line."""
    for line in reversed(console_output.splitlines()):
        match = _EXIT_MARKER.search(line)
        if match:
            return int(match.group(1))
    return None
