"""The bootable Debian disk image for firmware-boot tests (scripts/guest-image).

    disk = guest_image_copy(tmp_path)     # a private, writable copy (sparse)
    choose_entry(disk, HOTKEY_CHECK)      # GRUB boots that entry at once (grubenv)
    # boot `disk` through the firmware (or press the hotkey on the serial
    # console at "pyvmm-image: GRUB menu"), then wait for
    #   pyvmm-check: ok root=/dev/xvda1 ...   and the power-off
    report = check_report(console_text)  # {"root": "/dev/xvda1", "disks": "xvda", ...}
    last = read_image_file(disk, "/var/lib/pyvmm-check/last")   # from the host

See docs/GUEST-ASSETS.md, "Disk image".
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
GUEST_IMAGE_SCRIPT = REPO_ROOT / "scripts" / "guest-image"
GUEST_IMAGE_ENV = "PYVMM_GUEST_IMAGE"

# The root partition starts at 1 MiB (scripts/guest-image's layout).
ROOT_PARTITION_OFFSET = 1 << 20

# Markers on the serial console (keep in step with scripts/guest-image).
MARKER_GRUB_MENU = "pyvmm-image: GRUB menu"
MARKER_CHECK_OK = "pyvmm-check: ok "
MARKER_POWERING_OFF = "pyvmm-check: powering off"
# GRUB menu hotkeys.
HOTKEY_DEFAULT = "d"
HOTKEY_CHECK = "t"            # check, then power off; PV drivers as the platform allows
HOTKEY_EMULATED_DISK = "i"    # xen_emul_unplug=never, PV drivers blacklisted; check, power off
CHECK_FILE = "/var/lib/pyvmm-check/last"
# GRUB's environment block; pyvmm_entry=HOTKEY in it boots that entry at once
# (keep in step with scripts/guest-image).
GRUBENV = "/boot/grub/grubenv"
GRUBENV_ENTRY = "pyvmm_entry"
GRUBENV_SIZE = 1024


class GuestImageUnavailable(RuntimeError):
    """scripts/guest-image could not build or find the image (no Debian
    mirror, no mmdebstrap, no user namespaces...). Tests may skip on it."""


@functools.cache
def guest_image() -> Path:
    """The cached image (never boot it directly: use guest_image_copy)."""
    override = os.environ.get(GUEST_IMAGE_ENV)
    if override:
        path = Path(override)
        if not path.is_file():
            raise GuestImageUnavailable(f"{GUEST_IMAGE_ENV}={override} is not a file")
        return path
    result = subprocess.run([str(GUEST_IMAGE_SCRIPT), "--print-path"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise GuestImageUnavailable(result.stderr.strip() or "scripts/guest-image failed")
    return Path(result.stdout.strip())


def guest_image_copy(directory: Path, name: str = "disk.raw") -> Path:
    """A writable copy of the image in `directory`; sparse, so it costs the
    allocated size (about 350 MB), not 2 GiB."""
    target = Path(directory) / name
    subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(guest_image()), str(target)],
                   check=True)
    return target


def check_report(console: str) -> dict[str, str] | None:
    """The fields of the last "pyvmm-check: ok" line on the console, or None."""
    lines = re.findall(re.escape(MARKER_CHECK_OK) + r"([^\r\n]*)", console)
    if not lines:
        return None
    return dict(field.split("=", 1) for field in lines[-1].split() if "=" in field)


def read_image_file(disk: Path, path: str, offset: int = ROOT_PARTITION_OFFSET) -> bytes:
    """A file's bytes from the image's root filesystem, read with debugfs
    (e2fsprogs) without mounting. Raises FileNotFoundError if it is not there."""
    if shutil.which("debugfs") is None:
        raise RuntimeError("debugfs not found (apt-get install e2fsprogs)")
    device = f"{disk}?offset={offset}"
    stat = subprocess.run(["debugfs", "-R", f"stat {path}", device], capture_output=True, text=True)
    if stat.returncode != 0 or "Type: regular" not in stat.stdout:
        raise FileNotFoundError(f"{path} is not a regular file in {disk}: "
                                f"{(stat.stderr or stat.stdout).strip()[-300:]}")
    result = subprocess.run(["debugfs", "-R", f"cat {path}", device], capture_output=True)
    if result.returncode != 0:
        raise RuntimeError(f"debugfs cannot read {path} from {disk}: {result.stderr.decode()[-300:]}")
    return result.stdout


def grubenv_block(**variables: str) -> bytes:
    """A GRUB environment block (what grub-editenv writes): a header line,
    name=value lines, '#' up to 1024 bytes."""
    text = "# GRUB Environment Block\n" + "".join(f"{name}={value}\n" for name, value in variables.items())
    if len(text) > GRUBENV_SIZE:
        raise ValueError("the variables do not fit a GRUB environment block")
    return text.ljust(GRUBENV_SIZE, "#").encode()


def choose_entry(disk: Path, hotkey: str, offset: int = ROOT_PARTITION_OFFSET) -> None:
    """Make the image's GRUB boot the menu entry with `hotkey` at once: its
    grubenv is replaced in the (unmounted) image with debugfs."""
    block = grubenv_block(**{GRUBENV_ENTRY: hotkey})
    local = Path(disk).with_name(Path(disk).name + ".grubenv")
    local.write_bytes(block)
    try:
        # debugfs goes on after a failed command (rm of a missing file) and
        # exits 0 either way: the read-back below is the check.
        subprocess.run(["debugfs", "-w", "-f", "-", f"{disk}?offset={offset}"],
                       input=f"rm {GRUBENV}\nwrite {local} {GRUBENV}\n", capture_output=True,
                       text=True, check=True)
    finally:
        local.unlink()
    if read_image_file(disk, GRUBENV, offset) != block:
        raise RuntimeError(f"debugfs did not write {GRUBENV} into {disk}")
