"""What a VM is asked to be: parsed, validated command-line settings."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .core import layout
from .limits import Limits, LimitError, parse_assignment

if TYPE_CHECKING:
    from .sandbox import SandboxOptions

MIN_MEMORY = 32 * layout.MiB
MAX_VCPUS = 64


class ConfigError(Exception):
    """A setting that cannot work, phrased for the person who gave it."""


@dataclass(frozen=True)
class SerialSpec:
    kind: str  # "stdio" | "file" | "none"
    path: Path | None = None

    @classmethod
    def parse(cls, text: str) -> "SerialSpec":
        if text in ("stdio", "none"):
            return cls(text)
        if text.startswith("file:") and len(text) > 5:
            return cls("file", Path(text[5:]))
        raise ConfigError(f"--serial {text!r}: expected stdio, none or file:PATH")


@dataclass(frozen=True)
class DiskOption:
    """One --disk PATH[,vdev=xvda][,readonly=on]: a Xen virtual block device."""

    path: Path
    vdev: str
    readonly: bool = False

    @classmethod
    def parse(cls, text: str, index: int) -> "DiskOption":
        path, *options = text.split(",")
        if not path:
            raise ConfigError(f"--disk {text!r}: expected PATH[,vdev=xvdX][,readonly=on]")
        vdev, readonly = f"xvd{chr(ord('a') + index)}", False
        for option in options:
            key, _, value = option.partition("=")
            if key == "vdev" and re.fullmatch(r"xvd[a-z]{1,2}", value):
                vdev = value
            elif key in ("readonly", "ro") and value in ("on", "off", "yes", "no", "1", "0", "true", "false", ""):
                readonly = value in ("on", "yes", "1", "true", "")
            else:
                raise ConfigError(f"--disk {text!r}: unknown or bad option {option!r} (vdev=xvdX, readonly=on|off)")
        return cls(Path(path), vdev, readonly)


@dataclass(frozen=True)
class GdbAddress:
    """--gdb tcp:[HOST:]PORT or unix:PATH: where the gdb stub listens (port 0:
    any free one). HOST defaults to 127.0.0.1; the stub has no authentication,
    so a HOST beyond loopback also needs --gdb-allow-remote (VmConfig.validate)."""

    host: str = "127.0.0.1"
    port: int = 0
    path: str | None = None  # a unix socket instead of TCP

    @classmethod
    def parse(cls, text: str) -> "GdbAddress":
        if text.startswith("unix:"):
            if len(text) == 5 or "\0" in text:
                raise ConfigError(f"--gdb {text!r}: expected unix:PATH, e.g. unix:/tmp/guest.gdb")
            return cls(path=text[5:])
        match = re.fullmatch(r"tcp:(?:(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]*):)?(\d{1,5})", text)
        if not match or int(match.group(2)) > 65535:
            raise ConfigError(f"--gdb {text!r}: expected tcp:PORT, tcp:HOST:PORT or unix:PATH, e.g. tcp::1234")
        return cls(match.group(1).strip("[]") if match.group(1) else "127.0.0.1", int(match.group(2)))

    @property
    def is_loopback(self) -> bool:
        """Only this host's users can reach it: a unix socket, or a loopback address."""
        if self.path is not None or self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name: it may resolve anywhere
            return False

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"tcp:[{self.host}]:{self.port}" if ":" in self.host else f"tcp:{self.host}:{self.port}"


@dataclass(frozen=True)
class NetOption:
    """One --net tap=IFNAME[,mac=MAC]: a Xen virtual network interface on a TAP device."""

    tap: str
    mac: str | None = None  # None: a stable one made from the VM's name

    @classmethod
    def parse(cls, text: str) -> "NetOption":
        from .xlcfg import parse_mac, valid_ifname

        tap = mac = None
        for option in text.split(","):
            key, _, value = option.partition("=")
            if key == "tap" and valid_ifname(value):
                tap = value
            elif key == "mac":
                mac = parse_mac(value)
            else:
                raise ConfigError(f"--net {text!r}: unknown or bad option {option!r} (tap=IFNAME, mac=MAC)")
        if tap is None:
            raise ConfigError(f"--net {text!r}: expected tap=IFNAME[,mac=MAC]")
        return cls(tap, mac)


@dataclass(frozen=True)
class VmConfig:
    kernel: Path
    initrd: Path | None = None
    cmdline: str = ""
    memory: int = 512 * layout.MiB
    vcpus: int = 1
    serial: SerialSpec = field(default_factory=lambda: SerialSpec("stdio"))
    no_reboot: bool = False
    timeout: float | None = None
    expect: re.Pattern[bytes] | None = None
    xen: bool = True
    xen_version: int = (4 << 16) | 17
    xen_accel: bool = True  # use KVM's in-kernel event-channel paths when present
    name: str = "pyvmm"
    xenstore_socket: Path | None = None  # default: in the runtime directory
    disks: tuple[DiskOption, ...] = ()
    gdb: GdbAddress | None = None  # serve a gdb stub here
    gdb_wait: bool = False  # vCPUs start only when gdb resumes them
    gdb_breakpoints: str = "int3"  # or "debugregs": gdb's breakpoints in DR0-DR3
    nets: tuple[NetOption, ...] = ()
    limits: Limits = field(default_factory=Limits)  # what the guest may make pyvmm hold (docs/XEN.md)
    gdb_allow_remote: bool = False  # --gdb may listen beyond loopback
    # None: no sandbox (what a VmConfig built in code gets); `pyvmm run` sets
    # SandboxOptions() unless --no-sandbox (pyvmm/sandbox.py, docs/SANDBOX.md).
    sandbox: "SandboxOptions | None" = None
    # --trace (parsed categories) and --trace-file, --fault (checked rules):
    # the runner makes the VM's Tracer and FaultInjector from them.
    trace: frozenset[str] = frozenset()
    trace_file: Path | None = None
    faults: tuple[str, ...] = ()

    @staticmethod
    def limits_from(settings: dict) -> Limits:
        """Limits with these {NAME: value} (already parsed) over the defaults."""
        try:
            return Limits().with_settings(settings)
        except LimitError as error:
            raise ConfigError(f"--limit: {error}") from None

    def validate(self) -> None:
        for what, path in (("kernel", self.kernel), ("initrd", self.initrd)):
            if path is None:
                continue
            if not path.is_file():
                raise ConfigError(f"{what} {str(path)!r} is not a readable file")
        if self.memory < MIN_MEMORY:
            raise ConfigError(f"--memory {self.memory // layout.MiB}M is too little; at least {MIN_MEMORY // layout.MiB}M")
        if self.memory % (2 * layout.MiB):
            raise ConfigError("--memory must be a multiple of 2M")
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise ConfigError(f"--vcpus must be between 1 and {MAX_VCPUS}")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError("--timeout must be positive")
        vdevs = [disk.vdev for disk in self.disks]
        if len(set(vdevs)) != len(vdevs):
            raise ConfigError(f"two disks share a vdev: {', '.join(vdevs)}")
        for disk in self.disks:
            if not (disk.path.is_file() or disk.path.is_block_device()):
                raise ConfigError(f"--disk {str(disk.path)!r} is not a file or block device")
            if not os.access(disk.path, os.R_OK if disk.readonly else os.R_OK | os.W_OK):
                raise ConfigError(f"--disk {str(disk.path)!r} is not {'readable' if disk.readonly else 'writable'}")
        if (self.gdb_wait or self.gdb_breakpoints != "int3" or self.gdb_allow_remote) and self.gdb is None:
            raise ConfigError("--gdb-wait, --gdb-breakpoints and --gdb-allow-remote need --gdb tcp:PORT")
        if self.gdb is not None and not self.gdb.is_loopback and not self.gdb_allow_remote:
            raise ConfigError(f"--gdb {self.gdb}: the gdb stub has no authentication, so pyvmm listens only on "
                              f"loopback (tcp::{self.gdb.port}) or a unix:PATH unless --gdb-allow-remote is given")
        taps = [net.tap for net in self.nets]
        if len(set(taps)) != len(taps):
            raise ConfigError(f"two --net options share a TAP device: {', '.join(taps)}")
        if self.nets and not self.xen:
            raise ConfigError("--net needs Xen mode (it is a Xen PV network interface); drop --no-xen")
        if self.disks and not self.xen:
            raise ConfigError("--disk needs Xen mode (it is a Xen PV disk); drop --no-xen")


def parse_limit_option(text: str) -> tuple[str, float]:
    """One --limit NAME=VALUE: (the limit's name, its value)."""
    try:
        return parse_assignment(text)
    except LimitError as error:
        raise ConfigError(f"--limit {text!r}: {error}") from None


def parse_xen_version(text: str) -> int:
    """'4.17' -> (4 << 16) | 17, as Xen's XENVER_version reports it."""
    match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", text)
    if not match or int(match.group(1)) > 0xFFFF or int(match.group(2)) > 0xFFFF:
        raise ConfigError(f"--xen-version {text!r}: expected MAJOR.MINOR, e.g. 4.17")
    return (int(match.group(1)) << 16) | int(match.group(2))


_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)


def parse_size(text: str, default_unit: str = "M") -> int:
    """'512M', '2G', '1024' (MiB by default) -> bytes."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"{text!r} is not a size like 512M or 2G")
    number, unit = int(match.group(1)), (match.group(2) or default_unit).upper()
    return number << {"K": 10, "M": 20, "G": 30, "T": 40}[unit]
