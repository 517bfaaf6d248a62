"""What a VM is asked to be: parsed, validated command-line settings."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

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
class Origin:
    """Where a device's description came from, to name it the way the person wrote it:
    `--disk 'a.img,vdev=xvdb'`, or `vm.cfg:4: disk 'vdev=hda, target=a.img'`."""

    what: str  # the option (--disk) or the xl.cfg key (disk)
    text: str  # what was written after it
    filename: str | None = None  # an xl.cfg file's name, with the line below
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.filename}:{self.line}: " if self.filename is not None else ""
        return f"{where}{self.what} {self.text!r}"

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self}: {message}")


class DeviceSpec:
    """One device the VM is given: the typed description that `pyvmm run`'s
    options and an xl.cfg file both produce. Each device kind (the backend
    folders of pyvmm/xen/backends/) defines its own as a frozen dataclass
    with an `origin: Origin | None` field kept out of comparisons; a spec
    made in code has none and is then named as its option would be written."""

    kind: ClassVar[str] = ""  # the registered kind's name (blk, net, ...)
    option: ClassVar[str] = ""  # its `pyvmm run` option, for specs made in code
    needs_xen: ClassVar[bool] = True  # a Xen PV device: refused under --no-xen
    origin: Origin | None

    def option_text(self) -> str:
        """This spec as its `pyvmm run` option's value."""
        raise NotImplementedError

    def source(self) -> Origin:
        return self.origin if self.origin is not None else Origin(self.option, self.option_text())

    def error(self, message: str) -> ConfigError:
        return self.source().error(message)

    def unique(self) -> tuple[str, str] | None:
        """(what, value) that no two devices of this kind may share, e.g. ("vdev", "xvda")."""
        return None

    def check(self) -> None:
        """Refuse (raise self.error(...)) what this host or pyvmm cannot give the guest."""


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


WATCHDOG_ACTIONS = ("destroy", "restart", "preserve")


@dataclass(frozen=True)
class VmConfig:
    # No kernel: the guest boots from its first disk through BIOS firmware
    # (`firmware`, default Debian's SeaBIOS; pyvmm/boot/firmware.py).
    kernel: Path | None
    initrd: Path | None = None
    cmdline: str = ""
    memory: int = 512 * layout.MiB
    vcpus: int = 1
    serial: SerialSpec = field(default_factory=lambda: SerialSpec("stdio"))
    no_reboot: bool = False
    # What a Xen watchdog's expiry (or SHUTDOWN_watchdog) does: "destroy"
    # (stop, status 7), "restart" (boot again; stop under no_reboot) or
    # "preserve" (keep the VM paused until it is destroyed). xl.cfg's on_watchdog.
    on_watchdog: str = "destroy"
    timeout: float | None = None
    expect: re.Pattern[bytes] | None = None
    xen: bool = True
    xen_version: int = (4 << 16) | 17
    xen_accel: bool = True  # use KVM's in-kernel event-channel paths when present
    xen_fifo: bool = False  # offer FIFO event channels (all their delivery is then in userspace)
    name: str = "pyvmm"
    xenstore_socket: Path | None = None  # default: in the runtime directory
    devices: tuple[DeviceSpec, ...] = ()  # disks, NICs, ...: one spec per device, of the registered kinds
    gdb: GdbAddress | None = None  # serve a gdb stub here
    gdb_wait: bool = False  # vCPUs start only when gdb resumes them
    gdb_breakpoints: str = "int3"  # or "debugregs": gdb's breakpoints in DR0-DR3
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
    # --stats (print the run's statistics on stderr at its end) and
    # --stats-json (write them there); either makes the runner count.
    stats: bool = False
    stats_json: Path | None = None
    firmware: Path | None = None  # --firmware: the BIOS image of a firmware boot
    # --cdrom ISO: an ATAPI CD-ROM drive on the secondary IDE channel (a
    # firmware boot only); --boot disk|cdrom: what the firmware boots
    # (None: the disk when there is one, else the CD-ROM).
    cdrom: Path | None = None
    boot: str | None = None

    @property
    def firmware_boot(self) -> bool:
        """Whether the guest starts in firmware (no --kernel) rather than in a kernel."""
        return self.kernel is None
    # --restore FILE: resume the guest of a snapshot instead of booting the
    # kernel (which a reboot boots); --snapshot-on REGEX[,stop] with
    # --snapshot-file FILE: write one when the console prints REGEX.
    restore: Path | None = None
    snapshot_on: re.Pattern[bytes] | None = None
    snapshot_stop: bool = False
    snapshot_file: Path | None = None

    @staticmethod
    def limits_from(settings: dict) -> Limits:
        """Limits with these {NAME: value} (already parsed) over the defaults."""
        try:
            return Limits().with_settings(settings)
        except LimitError as error:
            raise ConfigError(f"--limit: {error}") from None

    def validate(self) -> None:
        if self.kernel is None:
            if self.initrd is not None or self.cmdline:
                raise ConfigError("--initrd and --append need --kernel (a firmware boot takes them from the disk)")
            disks = self.devices_of("blk")
            if not disks and self.cdrom is None:
                raise ConfigError("no kernel and no disk: give --kernel, or --disk IMAGE or --cdrom ISO to boot "
                                  "through firmware (or kernel= or disk= in an xl.cfg file)")
            header = read_header(disks[0].path) if disks else b""
            if is_plain_iso9660(header):
                raise disks[0].error(f"{str(disks[0].path)!r} is an ISO 9660 image (a CD-ROM), not a disk: "
                                     f"give it as --cdrom {disks[0].path}")
            self._validate_cdrom(bool(disks))
        elif self.cdrom is not None:
            raise ConfigError("--cdrom is a drive for the firmware to boot from; it does not go with --kernel")
        elif self.boot is not None:
            raise ConfigError("--boot chooses what the firmware boots; it does not go with --kernel")
        elif self.firmware is not None:
            raise ConfigError("--firmware boots a disk image; it does not go with --kernel")
        for what, path in (("kernel", self.kernel), ("initrd", self.initrd), ("firmware", self.firmware)):
            if path is None or (self.restore is not None and what != "firmware"):
                # a restored guest needs its kernel only to reboot
                continue
            if not path.is_file():
                raise ConfigError(f"{what} {str(path)!r} is not a readable file")
        if self.memory < MIN_MEMORY:
            raise ConfigError(f"--memory {self.memory // layout.MiB}M is too little; at least {MIN_MEMORY // layout.MiB}M")
        if self.memory % (2 * layout.MiB):
            raise ConfigError("--memory must be a multiple of 2M")
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise ConfigError(f"--vcpus must be between 1 and {MAX_VCPUS}")
        if self.on_watchdog not in WATCHDOG_ACTIONS:
            raise ConfigError(f"--on-watchdog {self.on_watchdog!r}: expected {', '.join(WATCHDOG_ACTIONS)}")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError("--timeout must be positive")
        self._validate_devices()
        if (self.snapshot_on is None) != (self.snapshot_file is None):
            raise ConfigError("--snapshot-on and --snapshot-file go together")
        if (self.gdb_wait or self.gdb_breakpoints != "int3" or self.gdb_allow_remote) and self.gdb is None:
            raise ConfigError("--gdb-wait, --gdb-breakpoints and --gdb-allow-remote need --gdb tcp:PORT")
        if self.gdb is not None and not self.gdb.is_loopback and not self.gdb_allow_remote:
            raise ConfigError(f"--gdb {self.gdb}: the gdb stub has no authentication, so pyvmm listens only on "
                              f"loopback (tcp::{self.gdb.port}) or a unix:PATH unless --gdb-allow-remote is given")

    def _validate_cdrom(self, have_disk: bool) -> None:
        if self.boot not in (None, "disk", "cdrom"):
            raise ConfigError(f"--boot {self.boot!r}: expected disk or cdrom")
        if self.boot == "cdrom" and self.cdrom is None:
            raise ConfigError("--boot cdrom needs --cdrom ISO")
        if self.boot == "disk" and not have_disk:
            raise ConfigError("--boot disk needs --disk IMAGE")
        if self.cdrom is None:
            return
        if not self.cdrom.is_file():
            raise ConfigError(f"--cdrom {str(self.cdrom)!r} is not a readable file")
        if not is_iso9660(read_header(self.cdrom)):
            raise ConfigError(f"--cdrom {str(self.cdrom)!r} is not an ISO 9660 image (no CD001 at byte 0x8001)")

    @property
    def boots_cdrom(self) -> bool:
        """Whether the firmware boots the CD-ROM rather than the disk."""
        return self.cdrom is not None and (self.boot == "cdrom" or
                                           (self.boot is None and not self.devices_of("blk")))

    @property
    def ide_disk(self) -> DeviceSpec | None:
        """A firmware boot's emulated IDE disk (primary master): xl.cfg's hda
        when there is one (an HVM image's usual boot disk), else the first disk."""
        if not self.firmware_boot:
            return None
        disks = self.devices_of("blk")
        return next((disk for disk in disks if getattr(disk, "vdev", None) == "hda"), disks[0] if disks else None)

    def _validate_devices(self) -> None:
        seen: dict[tuple[str, str, str], DeviceSpec] = {}
        ide_disk = self.ide_disk
        for device in self.devices:
            if device.needs_xen and not self.xen and device is not ide_disk:
                # Without Xen only the firmware's IDE disk is there (no PV backend).
                only = "; without Xen a firmware boot has one disk, the IDE disk" if ide_disk is not None else ""
                raise device.error(f"needs Xen mode (it is a Xen PV device{only}); drop --no-xen")
            unique = device.unique()
            if unique is not None:
                other = seen.setdefault((device.kind, *unique), device)
                if other is not device:
                    raise ConfigError(f"{other.source()} and {device.source()} share a {unique[0]}: {unique[1]}")
        for device in self.devices:
            device.check()

    def devices_of(self, kind: str) -> tuple[DeviceSpec, ...]:
        """The specs of one device kind, in the order given."""
        return tuple(device for device in self.devices if device.kind == kind)

# Image formats pyvmm does not serve, by their magic: a disk is raw bytes
# (a file or a block device), and serving a format's own bytes as a disk
# would hand the guest garbage.
FOREIGN_IMAGES = [
    (0, b"QFI\xfb", "a qcow2 image"),
    (0, b"KDMV", "a VMDK image"),
    (0, b"conectix", "a VHD image"),
    (0, b"vhdxfile", "a VHDX image"),
    (0x40, b"<<< Oracle VM VirtualBox Disk Image >>>", "a VDI image"),
]
ISO9660_MAGIC = (0x8001, b"CD001")


def foreign_image(header: bytes) -> str | None:
    """What a disk image whose first 64 KiB are `header` is, if not a raw disk."""
    for offset, magic, what in FOREIGN_IMAGES:
        if header[offset : offset + len(magic)] == magic:
            return what
    return None


def is_iso9660(header: bytes) -> bool:
    offset, magic = ISO9660_MAGIC
    return header[offset : offset + len(magic)] == magic


def is_plain_iso9660(header: bytes) -> bool:
    """An ISO 9660 image without an MBR boot signature: a CD, where a hybrid
    ISO (one with a partition table) boots as a disk too."""
    return is_iso9660(header) and header[510:512] != b"\x55\xaa"


def read_header(path: Path, size: int = 64 * 1024) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return b""


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
