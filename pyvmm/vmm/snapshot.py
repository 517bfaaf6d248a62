"""Snapshots of a whole VM: what the machine saves besides its parts, and the checks of a restore.

A snapshot (docs/SNAPSHOTS.md; the file: pyvmm/core/snapfile.py) holds

- in its header: pyvmm's version, the host's CPU and KVM (`host_identity`),
  the disks' identities (`disk_identities`) and the NICs' MACs, the VM's
  shape (memory, vCPUs, Xen or not), where RAM lies in the file;
- in its state: the config the VM was built from (`config_state`), every
  stateful part's `save_state()` by name (`Machine.stateful_parts`), and
  KVM's own state: each vCPU's, the irqchip and PIT, the guest's clock as
  the pause froze it, and KVM's Xen attributes (pyvmm/kvm/state.py);
- guest RAM, its zero pages left as holes.

`take` writes one, VM paused, on the event thread; `RestorePlan` is what a
Machine built by `MachineBuilder.from_snapshot` does when it starts (the
vCPUs' state on their own threads, then the clock, KVM's Xen attributes,
each part's `finish_restore()`, and only then the guest runs).

A restore is refused, in one line, when the file is not a snapshot this
pyvmm reads (snapfile), when it was taken on another CPU vendor or model or
under another kind of KVM, or this host's KVM offers fewer CPU features
than the snapshot's did (`check_host`), or when a disk is not the one the
guest had (`check_disks`: its size and a fingerprint of
its content) or a NIC has another MAC.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import __version__
from ..boot.firmware import DEFAULT_FIRMWARE
from ..config import ConfigError, DeviceSpec, VmConfig
from ..core.kept import KEPT
from ..core.snapfile import SnapshotFile, Written, write_snapshot
from ..core.snapshot import SnapshotError
from ..kvm import state as kvm_state
from ..kvm.cpuid import CpuidEntry

log = logging.getLogger(__name__)

STATE_VERSION = 1
SAMPLE = 64 * 1024  # a disk's fingerprint reads this much at each of its sample points
SAMPLES = 16


# --- the host ---------------------------------------------------------------------------------

_host_cache: dict | None = None


def host_identity(kvm) -> dict:
    """This host's CPU as KVM passes it to guests, and which KVM it is.
    Read once per process (/proc/cpuinfo cannot be opened once the sandbox
    is locked: the builder asks before)."""
    global _host_cache
    if _host_cache is None:
        leaves = {(e.function, e.index): e for e in kvm.supported_cpuid()}
        zero, one = leaves.get((0, 0)), leaves.get((1, 0))
        vendor = struct.pack("<III", zero.ebx, zero.edx, zero.ecx).decode(errors="replace") if zero else "unknown"
        signature = one.eax if one else 0
        family = (signature >> 8) & 0xF
        model = (signature >> 4) & 0xF
        if family == 0xF:
            family += (signature >> 20) & 0xFF
        if family >= 6:
            model |= ((signature >> 16) & 0xF) << 4
        _host_cache = {"vendor": vendor, "family": family, "model": model, "stepping": signature & 0xF,
                       "signature": f"{signature:#010x}", "model_name": _model_name(), "kvm": _kvm_kind(),
                       "features": cpu_features(list(leaves.values()))}
    return dict(_host_cache)


def _model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return "unknown"


def _kvm_kind() -> str:
    for module in ("kvm_pvm", "kvm_intel", "kvm_amd"):
        if os.path.exists(f"/sys/module/{module}"):
            return module
    return "kvm"


def _cpu(host: dict) -> str:
    return f"{host.get('vendor')} family {host.get('family')} model {host.get('model')} ({host.get('model_name')})"


def check_host(saved: dict, current: dict, path: str) -> None:
    """SnapshotError unless the snapshot's host and this one are alike
    enough for its vCPU state: the same kind of KVM, the same CPU vendor,
    family and model (another stepping is fine)."""
    if not isinstance(saved, dict):
        raise SnapshotError(f"{path}: corrupt: its header does not say which host took it")
    if saved.get("kvm") != current.get("kvm"):
        raise SnapshotError(f"{path}: taken under {saved.get('kvm')}, and this host's KVM is {current.get('kvm')}")
    if saved.get("vendor") != current.get("vendor"):
        raise SnapshotError(f"{path}: taken on a {saved.get('vendor')} CPU, and this host's is {current.get('vendor')}")
    if (saved.get("family"), saved.get("model")) != (current.get("family"), current.get("model")):
        raise SnapshotError(f"{path}: taken on another CPU model: {_cpu(saved)}; this host has {_cpu(current)}")
    check_cpu_features(saved.get("features"), current.get("features", {}), path)


# The CPUID feature words a guest's features come from: a restore needs a
# host whose KVM offers (KVM_GET_SUPPORTED_CPUID) every bit the snapshot's did.
FEATURE_WORDS = (
    (0x1, 0, "ecx"), (0x1, 0, "edx"),
    (0x7, 0, "ebx"), (0x7, 0, "ecx"), (0x7, 0, "edx"), (0x7, 1, "eax"),
    (0xD, 1, "eax"),
    (0x8000_0001, 0, "ecx"), (0x8000_0001, 0, "edx"),
    (0x8000_0008, 0, "ebx"),
)


def cpu_features(supported: list[CpuidEntry]) -> dict[str, int]:
    """The FEATURE_WORDS of KVM_GET_SUPPORTED_CPUID, as {"0x7.0.ebx": bits}."""
    leaves = {(e.function, e.index): e for e in supported}
    return {f"{leaf:#x}.{subleaf}.{register}": getattr(leaves[(leaf, subleaf)], register)
            for leaf, subleaf, register in FEATURE_WORDS if (leaf, subleaf) in leaves}


def check_cpu_features(saved: dict, current: dict, path: str) -> None:
    """SnapshotError naming the CPU features the snapshot's host's KVM
    offered its guests and this one's does not (a guest may use any of them)."""
    if not isinstance(saved, dict):
        raise SnapshotError(f"{path}: corrupt: its header does not say which CPU features its host had")
    missing = []
    for word, bits in sorted(saved.items()):
        lacking = bits & ~current.get(word, 0) if isinstance(bits, int) else 0
        if lacking:
            missing.append(f"CPUID {word} {lacking:#x}")
    if missing:
        raise SnapshotError(f"{path}: this host's KVM lacks CPU features the guest may use: {'; '.join(missing)}")


# --- disks and NICs -------------------------------------------------------------------------

def disk_fingerprint(fd: int, size: int) -> str:
    """SHA-256 of a disk's size and SAMPLE bytes at SAMPLES points spread
    over it (the first and last included): cheap, and it tells one image
    from another and a changed one from the one a snapshot was taken with,
    unless the change is between the points."""
    digest = hashlib.sha256(str(size).encode())
    if size:
        step = max(size - SAMPLE, 0) // max(SAMPLES - 1, 1)
        for point in sorted({min(step * n, max(size - SAMPLE, 0)) for n in range(SAMPLES)}):
            digest.update(os.pread(fd, min(SAMPLE, size - point), point))
    return digest.hexdigest()


def _image_identity(path, readonly: bool) -> dict:
    # The device's own flags: under the sandbox KEPT hands back a duplicate of its descriptor.
    fd = KEPT.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        return {"path": str(path), "readonly": readonly, "size": size, "fingerprint": disk_fingerprint(fd, size)}
    finally:
        os.close(fd)


def _disk_identity(spec) -> dict:
    return {"vdev": spec.vdev, **_image_identity(spec.path, spec.readonly)}


def check_firmware_boot(header: dict, config: VmConfig, path: str) -> None:
    """A firmware-booted guest's CD-ROM must hold the image it had (its
    firmware is checked when it is mapped: Machine.firmware_digest)."""
    saved = header.get("cdrom")
    if (saved is None) != (config.cdrom is None) or not isinstance(saved, (dict, type(None))):
        raise SnapshotError(f"{path}: corrupt: its header and its config disagree about a CD-ROM")
    if saved is None:
        return
    try:
        identity = _image_identity(config.cdrom, True)
    except OSError as error:
        raise SnapshotError(f"{path}: CD-ROM {config.cdrom}: {error.strerror}") from None
    if (identity["size"], identity["fingerprint"]) != (saved.get("size"), saved.get("fingerprint")):
        raise SnapshotError(f"{path}: CD-ROM {config.cdrom} is not the image the snapshot was taken with")


def disk_identities(config: VmConfig) -> list[dict]:
    return [_disk_identity(spec) for spec in config.devices_of("blk")]


def check_disks(saved: list, config: VmConfig, path: str) -> None:
    """SnapshotError unless the disks of `config` are the snapshot's: the
    same vdevs, each with the size and fingerprint it had."""
    given = {spec.vdev: spec for spec in config.devices_of("blk")}
    wanted = {disk["vdev"]: disk for disk in saved}
    if set(given) != set(wanted):
        raise SnapshotError(f"{path}: the guest had disk(s) {', '.join(sorted(wanted)) or 'none'}; "
                            f"this VM is given {', '.join(sorted(given)) or 'none'}")
    for vdev, disk in sorted(wanted.items()):
        spec = given[vdev]
        try:
            identity = _disk_identity(spec)
        except OSError as error:
            raise SnapshotError(f"{path}: disk {vdev}: {spec.path}: {error.strerror}") from None
        if identity["size"] != disk["size"]:
            raise SnapshotError(f"{path}: disk {vdev}: {spec.path} has {identity['size']} bytes; the guest's "
                                f"had {disk['size']}")
        if identity["fingerprint"] != disk["fingerprint"]:
            raise SnapshotError(f"{path}: disk {vdev}: {spec.path} is not the image the snapshot was taken with "
                                f"(its content differs; restore from a copy made when the snapshot was taken)")
        if spec.readonly != disk["readonly"]:
            raise SnapshotError(f"{path}: disk {vdev} was {'read-only' if disk['readonly'] else 'writable'}; "
                                f"give it the same way")


def nic_identities(config: VmConfig) -> list[dict]:
    nics = config.devices_of("net")
    if not nics:
        return []  # a --no-xen run's sandbox has not loaded the Xen modules
    from ..xen.backends.net.vif import generated_mac

    return [{"index": index, "mac": spec.mac or generated_mac(config.name, index)}
            for index, spec in enumerate(nics)]


def restored_nics(saved: list, specs: tuple[DeviceSpec, ...], path: str) -> tuple[DeviceSpec, ...]:
    """The NICs of a restored VM: as many as the guest had, each with the
    MAC the guest knows (filled in where the spec gives none)."""
    if len(specs) != len(saved):
        raise SnapshotError(f"{path}: the guest had {len(saved)} NIC(s); this VM is given {len(specs)}")
    nics = []
    for spec, nic in zip(specs, saved):
        if spec.mac is not None and spec.mac.lower() != nic["mac"].lower():
            raise SnapshotError(f"{path}: NIC {nic['index']} had MAC {nic['mac']}; {spec.source()} gives {spec.mac}")
        nics.append(replace(spec, mac=nic["mac"]))
    return tuple(nics)


# --- the config ------------------------------------------------------------------------------

SHAPE = ("kernel", "initrd", "cmdline", "memory", "vcpus", "xen", "xen_version", "xen_accel")


def config_state(config: VmConfig) -> dict:
    """What a restored VM takes from the snapshot's config: its shape (a
    reboot boots its kernel again), limits, devices and name."""
    return {
        "kernel": str(config.kernel) if config.kernel is not None else None,  # None: a firmware boot
        "firmware": str(config.firmware) if config.firmware is not None else None,
        "cdrom": str(config.cdrom) if config.cdrom is not None else None,
        "boot": config.boot,
        "initrd": str(config.initrd) if config.initrd is not None else None,
        "cmdline": config.cmdline,
        "memory": config.memory,
        "vcpus": config.vcpus,
        "xen": config.xen,
        "xen_version": config.xen_version,
        "xen_accel": config.xen_accel,
        "xen_fifo": config.xen_fifo,
        "name": config.name,
        "limits": {name: value for name, value in config.limits.describe().items()},
        "devices": [{"kind": spec.kind, "option": spec.option_text()} for spec in config.devices],
    }


def saved_devices(saved: dict) -> dict[str, tuple[DeviceSpec, ...]]:
    """The snapshot's device specs by kind, parsed as their options were."""
    from ..xen.backend import kind as device_kinds

    known = {kind.name: kind for kind in device_kinds.kinds()}
    by_kind: dict[str, list[DeviceSpec]] = {}
    for entry in saved.get("devices", []):
        kind = known.get(entry.get("kind"))
        if kind is None or kind.option is None:
            raise SnapshotError(f"the snapshot has a device of kind {entry.get('kind')!r}, which this pyvmm lacks")
        specs = by_kind.setdefault(kind.name, [])
        try:
            specs.append(kind.option.parse(entry["option"], len(specs)))
        except ConfigError as error:
            raise SnapshotError(f"the snapshot's device {entry['option']!r}: {error}") from None
    return {kind: tuple(specs) for kind, specs in by_kind.items()}


def saved_boot(saved: dict) -> dict:
    """What the saved config boots: its kernel, or (a firmware boot) its
    firmware, CD-ROM and boot order; VmConfig's fields."""
    def path(key: str) -> Path | None:
        return Path(saved[key]) if saved.get(key) else None

    return {"kernel": path("kernel"), "firmware": path("firmware"), "cdrom": path("cdrom"),
            "boot": saved.get("boot") if saved.get("boot") in ("disk", "cdrom") else None}


def restored_config(path, header: dict, state: dict, config: VmConfig, given_kinds: set[str]) -> VmConfig:
    """`config` (the restore's own settings: console, name, timeouts, ...)
    with the shape and limits of the snapshot at `path` (its `header` and
    `state`) and the devices of every kind the restore does not give
    itself (`given_kinds`), NICs given the MACs the guest knows."""
    saved = state.get("config")
    if not isinstance(saved, dict):
        raise SnapshotError(f"{path}: corrupt: its state has no config")
    devices = []
    saved_by_kind = saved_devices(saved)
    from ..xen.backend import kind as device_kinds

    for kind in device_kinds.kinds():
        if kind.name in given_kinds:
            devices += config.devices_of(kind.name)
        else:
            devices += saved_by_kind.get(kind.name, ())
    nets = [spec for spec in devices if spec.kind == "net"]
    others = [spec for spec in devices if spec.kind != "net"]
    nets = list(restored_nics(header.get("nics", []), tuple(nets), path))
    limits = VmConfig.limits_from(saved.get("limits", {}))
    return replace(
        config,
        **saved_boot(saved),
        initrd=Path(saved["initrd"]) if saved.get("initrd") else None,
        cmdline=saved["cmdline"],
        memory=saved["memory"],
        vcpus=saved["vcpus"],
        xen=saved["xen"],
        xen_version=saved["xen_version"],
        xen_accel=saved["xen_accel"],
        xen_fifo=saved.get("xen_fifo") is True,  # not in snapshots from before FIFO ones were saved
        limits=limits,
        devices=tuple(others + nets),
    )


# --- taking one ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Taken:
    written: Written
    seconds: float  # from the pause to the end of the writing
    paused_seconds: float  # how long the guest stood still for it


def take(machine, fd: int, *, stopping: bool = False) -> Taken:
    """Pause `machine`, save all of it into `fd` (an empty regular file),
    and leave it paused: the caller resumes or stops it (`stopping`).
    Event thread. SnapshotError (nothing useful written) when a part
    cannot save its state, or a vCPU does not end the hypercall it is in
    within its time; the VM is then still paused, as the caller found it or
    left it.

    A part whose save_state() holds something still until guest RAM is
    saved (the Xen domain's disks keep their queues quiesced) has
    `resume_after_save()`: called once the file is written, unless the VM
    stops, and whenever the snapshot fails after that part was saved."""
    from ..core.snapfile import check_empty_file

    check_empty_file(fd)
    started = time.monotonic()
    # Every vCPU saved between two exits: one in the middle of a long
    # hypercall ends it first (Machine.pause_for_snapshot, preempt_point).
    machine.pause_for_snapshot()
    paused = time.monotonic()
    saved: list = []
    failed = True
    try:
        header, state = capture(machine, saved)
        written = write_snapshot(fd, header, state, machine.memory)
        failed = False
    finally:
        if failed or not stopping:
            for part in saved:
                resume = getattr(part, "resume_after_save", None)
                if resume is not None:
                    resume()
    done = time.monotonic()
    return Taken(written, done - started, done - paused)


def capture(machine, saved: list | None = None) -> tuple[dict, dict]:
    """The header and state of a snapshot of `machine`, which is paused;
    each part whose state was saved is added to `saved`."""
    if not machine.paused:
        raise SnapshotError("the VM must be paused for a snapshot")
    config = machine.config
    parts = {}
    for name, part in machine.stateful_parts().items():
        parts[name] = part.save_state()  # SnapshotError from a part that cannot save now
        if saved is not None:
            saved.append(part)
    if machine.xen is not None and machine.xen.vcpu_waiting_for_event_thread:
        # Its hypercall (a soft reset) waits for this thread: reading that
        # vCPU would wait for it in turn.
        raise SnapshotError("a vCPU is in the middle of a soft reset (kexec); try again")
    caps = machine.vcpu_capabilities()
    vcpus = []
    for index in range(config.vcpus):
        try:
            vcpus.append(machine.run_on_vcpu(index, lambda vcpu: kvm_state.save_vcpu(vcpu, caps)))
        except TimeoutError:
            raise SnapshotError(f"vCPU {index} is busy in the VMM and does not stop for the snapshot") from None
    kvm = {"vm": kvm_state.save_vm(machine.vm), "clock": machine.paused_clock, "vcpus": vcpus}
    if machine.xen is not None:
        bits = machine.kvm.xen_capabilities()
        gpa_of = machine.memory.gpa_of_host_address
        kvm["xen"] = {
            "vm": kvm_state.xen_save_vm(machine.vm, bits, gpa_of),
            "vcpus": [machine.run_on_vcpu(index, lambda vcpu: kvm_state.xen_save_vcpu(vcpu, bits, gpa_of,
                                                                                       machine.paused_clock))
                      for index in range(config.vcpus)],
        }
    state = {"version": STATE_VERSION, "config": config_state(config), "parts": parts, "kvm": kvm}
    header = {
        "pyvmm": __version__,
        "created": time.time(),
        "name": config.name,
        "memory": config.memory,
        "vcpus": config.vcpus,
        "xen": config.xen,
        "host": host_identity(machine.kvm),
        "disks": disk_identities(config),
        "nics": nic_identities(config),
    }
    if config.firmware_boot:
        header["firmware"] = machine.firmware_digest
        header["cdrom"] = _image_identity(config.cdrom, True) if config.cdrom is not None else None
    return header, state


# --- restoring ------------------------------------------------------------------------------------

@dataclass
class RestorePlan:
    """What a restored Machine still has to do once its vCPUs exist: see
    Machine.run. `state` is the snapshot's "kvm" entry."""

    path: str
    kvm: dict
    parts: dict = field(default_factory=dict)  # name -> part, for finish_restore()
    started: float = field(default_factory=time.monotonic)  # when the builder began (for the log)
    steps: list = field(default_factory=list)  # (what, when it ended): the restore's log line

    def step(self, what: str) -> None:
        self.steps.append((what, time.monotonic()))

    def timings(self) -> str:
        """'checks 2 ms, memory 1 ms, ...': each step's time, in order."""
        parts, last = [], self.started
        for what, when in self.steps:
            parts.append(f"{what} {(when - last) * 1000:.0f} ms")
            last = when
        return ", ".join(parts)

    def vcpu_state(self, index: int) -> dict:
        return self.kvm["vcpus"][index]


def check_restore(snapshot: SnapshotFile, state: dict, config: VmConfig, kvm) -> None:
    """Everything that refuses a restore before anything is built."""
    path = snapshot.path
    header = snapshot.header
    check_host(header.get("host"), host_identity(kvm), path)
    version = state.get("version")
    if version != STATE_VERSION:
        raise SnapshotError(f"{path}: its state is version {version!r}; this pyvmm reads {STATE_VERSION}")
    vcpus = state.get("kvm", {}).get("vcpus")
    if not isinstance(vcpus, list) or len(vcpus) != config.vcpus:
        raise SnapshotError(f"{path}: corrupt: it holds {len(vcpus) if isinstance(vcpus, list) else 'no'} vCPU "
                            f"state(s) for {config.vcpus} vCPU(s)")
    check_disks(header.get("disks", []), config, path)
    if config.firmware_boot:
        check_firmware_boot(header, config, path)
    if config.xen and "xen" not in state["kvm"]:
        raise SnapshotError(f"{path}: corrupt: a Xen guest's snapshot without KVM's Xen state")


def read_config(path: Path) -> tuple[dict, dict]:
    """(header, the saved config) of the snapshot at `path`, checked as a file
    (the command line builds the restored VM's config from them)."""
    from ..core.snapfile import open_snapshot

    with open_snapshot(path) as snapshot:
        state = snapshot.state()
        config = state.get("config")
        if not isinstance(config, dict) or any(key not in config for key in SHAPE):
            raise SnapshotError(f"{path}: corrupt: its state has no config")
        return snapshot.header, state


def refuse_shape_options(given: dict[str, object]) -> None:
    """A restore takes the guest's shape from the snapshot: the options
    that would change it are refused."""
    names = [option for option, value in given.items() if value]
    if names:
        raise ConfigError(f"{', '.join(names)} cannot be given with --restore: the snapshot decides "
                          f"(memory, vCPUs, kernel or firmware and CD-ROM, Xen mode and limits are the guest's own)")


def describe(snapshot: SnapshotFile) -> dict:
    """What `pyvmm snapshot info` shows of a snapshot (its state checked too)."""
    header = snapshot.header
    state = snapshot.state()
    host = header.get("host", {})
    saved = state.get("config", {})
    created = header.get("created")
    return {
        "file": snapshot.path,
        "format": header.get("format"),
        "pyvmm": header.get("pyvmm"),
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(created)) if created else None,
        "name": header.get("name"),
        "memory": header.get("memory"),
        "vcpus": header.get("vcpus"),
        "xen": header.get("xen"),
        "kernel": saved.get("kernel"),
        "cmdline": saved.get("cmdline"),
        **({"firmware": f"{saved.get('firmware') or DEFAULT_FIRMWARE} (SHA-256 {header.get('firmware')})",
            "cdrom": (header.get("cdrom") or {}).get("path")} if saved.get("kernel") is None else {}),
        "host": f"{_cpu(host)}, stepping {host.get('stepping')}, under {host.get('kvm')}",
        "file_bytes": snapshot.file_length,
        "bytes_on_disk": os.fstat(snapshot.fd).st_blocks * 512,
        "disks": [f"{d['vdev']}: {d['path']} ({d['size']} bytes{', read-only' if d['readonly'] else ''})"
                  for d in header.get("disks", [])],
        "nics": [f"{n['index']}: mac {n['mac']}" for n in header.get("nics", [])],
        "parts": sorted(state.get("parts", {})),
        **_restorable_here(snapshot),
    }


def _restorable_here(snapshot: SnapshotFile) -> dict:
    """{"restorable_here": True, False or None (no KVM to ask), "why": ...}."""
    from ..kvm import Kvm, KvmUnavailable

    try:
        with Kvm() as kvm:
            current = host_identity(kvm)
    except KvmUnavailable as error:
        return {"restorable_here": None, "why": str(error)}
    try:
        check_host(snapshot.header.get("host"), current, snapshot.path)
    except SnapshotError as error:
        return {"restorable_here": False, "why": str(error)}
    return {"restorable_here": True}
