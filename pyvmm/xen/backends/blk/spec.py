"""A PV disk as `pyvmm run --disk` and xl.cfg's `disk = [...]` describe it: DiskSpec.

Two grammars, one spec: `--disk PATH[,vdev=xvdX][,readonly=on]`
(parse_disk_option) and xl's disk syntax, xl-disk-configuration(5)
(parse_disk_spec), with its positional and KEY=VALUE forms, xend's
prefixes and a `target=` that takes the rest of the entry, commas
included. What pyvmm cannot serve of what xl's grammar allows is refused
by DiskSpec.check() in the words the person wrote.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from pyvmm.config import ConfigError, DeviceSpec, Origin, foreign_image, read_header

# The guest's names pyvmm serves: Xen PV disks, whole ones, and the four IDE
# names of an HVM guest's xl.cfg (hda..hdd): on Xen such a disk is both an
# emulated IDE disk and a PV disk, which Linux calls xvda..xvdd once it has
# unplugged the emulated one (a firmware boot's IDE disk: docs/FIRMWARE.md).
_PV_VDEV = re.compile(r"xvd[a-z]{1,2}")
_IDE_VDEV = re.compile(r"hd[a-d]")


def guest_name(vdev: str) -> str:
    """The name Linux's blkfront gives the disk: hda -> xvda, xvdb -> xvdb."""
    return "xvd" + vdev[2:] if _IDE_VDEV.fullmatch(vdev) else vdev


@dataclass(frozen=True)
class DiskSpec(DeviceSpec):
    """A block device for the guest: a raw image or device at `path`, seen as `vdev`."""

    kind = "blk"
    option = "--disk"

    path: Path
    vdev: str
    readonly: bool = False
    origin: Origin | None = field(default=None, compare=False, repr=False)
    # xl.cfg's devtype=cdrom / hdc:cdrom: not a PV disk but the firmware
    # boot's CD-ROM drive, which pyvmm.xlcfg takes out as `cdrom`.
    cdrom: bool = False

    def option_text(self) -> str:
        return f"{self.path},vdev={self.vdev}" + (",readonly=on" if self.readonly else "")

    def to_xl(self) -> str:
        """This disk in xl's disk syntax (target= last, so any path survives)."""
        access = "ro" if self.readonly else "rw"
        return f"format=raw, vdev={self.vdev}, access={access}, target={self.path}"

    def unique(self) -> tuple[str, str]:
        return ("vdev", guest_name(self.vdev))

    def check(self) -> None:
        self._check_vdev()
        path = self.path
        if not (path.is_file() or path.is_block_device()):
            raise self.error(f"{str(path)!r} is not a file or block device")
        if not os.access(path, os.R_OK if self.readonly else os.R_OK | os.W_OK):
            raise self.error(f"{str(path)!r} is not {'readable' if self.readonly else 'writable'}")
        what = foreign_image(read_header(path))
        if what is not None:
            raise self.error(f"{str(path)!r} is {what}; pyvmm serves raw images and block devices only "
                             f"(convert it: qemu-img convert -O raw {path} {path}.raw)")

    def _check_vdev(self) -> None:
        vdev = self.vdev
        if _PV_VDEV.fullmatch(vdev) or _IDE_VDEV.fullmatch(vdev):
            return
        whole = re.fullmatch(r"(xvd|hd|sd)([a-z]+)([0-9]*)", vdev)
        if whole and whole.group(3):
            raise self.error(f"vdev {vdev} is a partition; pyvmm gives the guest whole disks only "
                             f"(vdev={whole.group(1)}{whole.group(2)})")
        if whole and whole.group(1) == "hd":
            raise self.error(f"vdev {vdev}: an IDE controller has four disks, hda to hdd; name further disks "
                             f"as Xen PV disks (vdev=xvd{whole.group(2)})")
        if whole and whole.group(1) != "xvd":
            raise self.error(f"vdev {vdev} names an emulated SCSI disk; pyvmm has no SCSI controller and gives "
                             f"the guest Xen PV disks, named xvda, xvdb, ... (vdev=xvd{whole.group(2)})")
        raise self.error(f"vdev {vdev}: pyvmm's disks are named xvda to xvdzz")


def parse_disk_option(text: str, index: int) -> DiskSpec:
    """One `--disk PATH[,vdev=xvdX][,readonly=on]`; the `index`th disk is xvd<a+index> by default."""
    path, *options = text.split(",")
    if not path:
        raise ConfigError(f"--disk {text!r}: expected PATH[,vdev=xvdX][,readonly=on]")
    vdev, readonly = f"xvd{chr(ord('a') + index)}", False
    for option in options:
        key, _, value = option.partition("=")
        if key == "vdev" and (_PV_VDEV.fullmatch(value) or _IDE_VDEV.fullmatch(value)):
            vdev = value
        elif key in ("readonly", "ro") and value in ("on", "off", "yes", "no", "1", "0", "true", "false", ""):
            readonly = value in ("on", "yes", "1", "true", "")
        else:
            raise ConfigError(f"--disk {text!r}: unknown or bad option {option!r} (vdev=xvdX, readonly=on|off)")
    return DiskSpec(Path(path), vdev, readonly, origin=Origin("--disk", text))


class _SpecError(Exception):
    pass


_XL_VDEV = re.compile(r"(?:xvd|hd|sd)[a-z]+[0-9]*|d[0-9]+(?:p[0-9]+)?")
_DISK_FLAGS = {"cdrom", "direct-io-safe", "discard", "no-discard", "colo", "no-colo", "trusted", "untrusted"}
_DISK_KNOWN_KEYS = {"backend", "script", "specification", "colo-host", "colo-port", "colo-export", "active-disk",
                    "hidden-disk", "grant_usage"}
_IGNORED_PREFIXES = ("tapdisk", "tap2", "tap", "aio", "ioemu", "file", "phy")
_FORMAT_PREFIXES = ("raw", "qcow2", "qcow", "vhd")
_SCRIPT_PREFIXES = ("iscsi", "nbd", "enbd", "drbd")
_KNOWN_PREFIX = re.compile("(" + "|".join(_IGNORED_PREFIXES + _FORMAT_PREFIXES + _SCRIPT_PREFIXES) + "):")
_FORMATS = {"raw", "qcow", "qcow2", "vhd", "qed"}
_EMPTY_CDROM = "an empty CD-ROM drive is not supported: give the ISO image as its target"


def _set_format(disk: dict, text: str) -> None:
    text = text.strip()
    if text in ("", "raw"):
        disk["format"] = "raw"
    elif text in _FORMATS:
        raise _SpecError(f"format {text} is not supported: pyvmm serves raw images and block devices only "
                         f"(convert it: qemu-img convert -O raw IMAGE IMAGE.raw)")
    else:
        raise _SpecError(f"unknown disk format {text!r}")


def _set_access(disk: dict, text: str) -> None:
    text = text.strip()
    if text in ("", "w", "rw"):
        disk["readonly"] = False
    elif text in ("r", "ro"):
        disk["readonly"] = True
    else:
        raise _SpecError(f"access {text!r}: expected r, ro, w or rw")
    disk["access_set"] = True


def _set_vdev(disk: dict, text: str) -> None:
    text = text.strip()
    if "vdev" in disk:
        raise _SpecError("vdev is given twice")
    if ":" in text:
        text, devtype = text.split(":", 1)
        if devtype == "cdrom":
            disk["cdrom"] = True
        elif devtype != "disk":
            raise _SpecError(f"unknown device type {devtype!r} after the vdev")
    disk["vdev"] = text


def parse_disk_spec(spec: str) -> tuple[DiskSpec, list[str]]:
    """One entry of xl.cfg's `disk = [...]` -> (DiskSpec, warnings). Raises ConfigError.

    xl's whole grammar (xl-disk-configuration(5)): what pyvmm cannot serve
    of what it reads (a vdev such as hda or xvdb1) is refused later, by
    DiskSpec.check(), naming the file's line."""
    try:
        disk, warnings = _parse_disk(spec)
    except _SpecError as error:
        raise ConfigError(f"disk {spec!r}: {error}") from None
    return replace(disk, origin=Origin("disk", spec)), warnings


def _parse_disk(spec: str) -> tuple[DiskSpec, list[str]]:
    disk: dict = {}
    warnings: list[str] = []
    had_prefix = False
    rest = spec
    while True:
        rest = rest.lstrip(" \t\n")
        if not rest:
            break
        if rest.startswith("target="):  # takes the rest of the spec, commas included
            target = rest[len("target="):]
            disk["target"] = target[:-1] if target.endswith(",") else target
            break
        # xend's prefixes: known ones whatever follows, any other word only before a non-alphanumeric
        prefix = _KNOWN_PREFIX.match(rest) or re.match(r"([a-z][a-z0-9]*):(?![a-z0-9])", rest)
        if prefix:
            name = prefix.group(1)
            rest = rest[prefix.end():]
            if name in _IGNORED_PREFIXES:
                had_prefix = True
            elif name in _FORMAT_PREFIXES:
                had_prefix = True
                _set_format(disk, name)
            elif name in _SCRIPT_PREFIXES:
                raise _SpecError(f"{name}: disks (a block script) are not supported: give a path pyvmm can open")
            else:
                raise _SpecError(f"unknown disk prefix {name}:")
            continue
        param, comma, rest = rest.partition(",")
        if "=" in param:
            key, _, value = param.partition("=")
            key = key.strip()
            if key == "format":
                if "format" in disk:
                    raise _SpecError("format is given twice")
                _set_format(disk, value)
            elif key == "vdev":
                _set_vdev(disk, value)
            elif key == "access":
                if disk.get("access_set"):
                    raise _SpecError("access is given twice")
                _set_access(disk, value)
            elif key == "devtype":
                if value.strip() == "cdrom":
                    disk["cdrom"] = True
                elif value.strip() != "disk":
                    raise _SpecError(f"unknown devtype {value.strip()!r}")
            elif key == "backendtype":
                if value.strip() not in ("phy", "tap", "qdisk"):
                    raise _SpecError(f"unknown backendtype {value.strip()!r}")
                warnings.append(f"backendtype={value.strip()} is ignored: pyvmm's own block backend serves "
                                "every disk (the guest sees no difference)")
            elif key == "mode":
                raise _SpecError("mode= is not an xl disk parameter; use access=r or access=rw")
            elif key in _DISK_KNOWN_KEYS:
                raise _SpecError(f"{key}= is not supported by pyvmm")
            else:
                raise _SpecError(f"unknown disk parameter {key}=")
            continue
        if param.strip() == "cdrom":
            disk["cdrom"] = True
            if not comma:
                break
            continue
        if param.strip() in _DISK_FLAGS:
            raise _SpecError(f"{param.strip()} is not supported by pyvmm")
        # a positional parameter: target, format, vdev, access in turn
        if "target" not in disk:
            disk["target"] = param
        elif not had_prefix and "format" not in disk:
            if not disk["target"].strip() and ":" in param:  # xend's ",hdc:cdrom,r": an empty drive
                _set_vdev(disk, param)
                disk["format"] = "raw"  # so that the access comes next
            else:
                _set_format(disk, param)
        elif "vdev" not in disk:
            _set_vdev(disk, param)
        elif not disk.get("access_set"):
            _set_access(disk, param)
        else:
            raise _SpecError(f"too many positional parameters (at {param.strip()!r})")
        if not comma:
            break
    target = disk.get("target", "")
    if not target.strip():
        raise _SpecError(_EMPTY_CDROM if disk.get("cdrom") else "no target (the image file or block device)")
    vdev = disk.get("vdev", "")
    if not vdev:
        raise _SpecError("no vdev (the guest's name for the disk, e.g. xvda)")
    if not _XL_VDEV.fullmatch(vdev):
        raise _SpecError(f"vdev {vdev!r} is not a disk name like xvda, hda, sdb or xvda1")
    return DiskSpec(Path(target), vdev, disk.get("readonly", False), cdrom=disk.get("cdrom", False)), warnings
