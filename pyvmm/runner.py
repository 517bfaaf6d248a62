"""Runs a VM to its end: reboots, timeout, --expect, signals, exit status."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import signal
import sys
import time

from .boot.errors import BootError, FirmwareError
from .config import VmConfig
from .core.console import ConsoleOutput, ExpectWatcher
from .core.faults import FaultInjector
from .core.kept import KEPT, NotKept
from .kvm import KvmError, KvmUnavailable
from .core.memory import GuestMemoryError
from .core.snapshot import SnapshotError
from .core.stop import StopReason
from .core.trace import Tracer, open_trace
from .core.stats import RunStats, format_report, write_json
from .xen import backends as _backends  # noqa: F401 - the device kinds' trace categories and fault targets

log = logging.getLogger(__name__)

STATUS_FOR_REASON = {
    StopReason.POWEROFF: 0,
    StopReason.EXPECT_MATCHED: 0,
    StopReason.REBOOT: 2,
    StopReason.CRASH: 3,
    StopReason.TRIPLE_FAULT: 6,
    StopReason.WATCHDOG: 7,
    StopReason.TIMEOUT: 124,
    StopReason.DESTROYED: 4,
    StopReason.SNAPSHOT: 0,
    StopReason.ERROR: 1,
}
EXIT_NO_EXPECT = 5
RESETS = (StopReason.REBOOT, StopReason.TRIPLE_FAULT)
EXIT_ESCAPE = 130


def run_vm(config: VmConfig) -> int:
    if config.firmware_boot:
        # A firmware image that cannot boot is one line before anything starts.
        from .boot.firmware import DEFAULT_FIRMWARE, read_firmware

        read_firmware(config.firmware or DEFAULT_FIRMWARE)
    # The VM's tracer and fault injector, for the whole run (every boot's
    # Machine gets these two): the trace file is opened first, as the user
    # who ran pyvmm, before the sandbox exists.
    try:
        trace = open_trace(config.trace, config.trace_file)
    except OSError as error:
        raise RunError(f"--trace-file {str(config.trace_file)!r}: {error.strerror}") from None
    stats = stats_file = None
    try:
        if config.stats or config.stats_json is not None:
            # Before the sandbox: the file is opened and /proc read now, which the lockdown refuses later.
            if config.stats_json is not None:
                try:
                    stats_file = open(config.stats_json, "w", encoding="utf-8")
                except OSError as error:
                    raise RunError(f"--stats-json {str(config.stats_json)!r}: {error.strerror}") from None
            stats = RunStats(config.vcpus)
        faults = FaultInjector.from_specs(config.faults, trace)
        return _run_sandboxed(config, trace, faults, stats)
    finally:
        trace.close()
        if stats is not None:
            _report_stats(config, stats, stats_file)


def _report_stats(config: VmConfig, stats: RunStats, out) -> None:
    """--stats and --stats-json, once every vCPU thread has been joined."""
    report = stats.report()
    if config.stats:
        sys.stderr.write("".join(f"pyvmm: {line}\n" for line in format_report(report)))
        sys.stderr.flush()
    if out is not None:
        with out:
            write_json(report, out)


def _run_sandboxed(config: VmConfig, trace: Tracer, faults: FaultInjector, stats: RunStats | None) -> int:
    snapshots = _Snapshots(config)  # files opened now, as the user who ran pyvmm, before the sandbox
    try:
        return _run_with_sandbox(config, trace, faults, stats, snapshots)
    finally:
        snapshots.close()


class _Snapshots:
    """The run's snapshot files: the one --restore resumes (its state read,
    its RAM mapped by the first boot, then closed) and the one --snapshot-on
    writes (created or emptied now: the sandbox opens no file later)."""

    def __init__(self, config: VmConfig):
        self.restore = self.state = None
        self.out_fd: int | None = None
        try:
            if config.restore is not None:
                from .core.snapfile import open_snapshot

                self.restore = open_snapshot(config.restore)
                self.state = self.restore.state()
            if config.snapshot_file is not None:
                try:
                    self.out_fd = os.open(config.snapshot_file, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                                          0o600)
                except OSError as error:
                    raise RunError(f"--snapshot-file {str(config.snapshot_file)!r}: {error.strerror}") from None
        except BaseException:
            self.close()
            raise

    def keep_kernel(self, config: VmConfig) -> None:
        """A restored guest's reboot boots the kernel it was booted with:
        under the sandbox it is read now, to be kept (KEPT is active), and
        its parser imported. A kernel gone or changed since only warns: the
        guest runs without it until it reboots."""
        if self.restore is None or config.firmware_boot:  # the builder reads (and keeps) the firmware
            return
        from .boot.loader import check_kernel

        try:
            check_kernel(config.kernel, config.initrd)
        except BootError as error:
            log.warning("the restored guest cannot reboot: its kernel: %s", error)

    def restored(self) -> None:
        """The first boot has mapped what it needs of the snapshot."""
        if self.restore is not None:
            self.restore.close()
            self.restore = self.state = None

    def take_out_fd(self) -> int | None:
        fd, self.out_fd = self.out_fd, None
        return fd

    def close(self) -> None:
        self.restored()
        fd = self.take_out_fd()
        if fd is not None:
            os.close(fd)


def _run_with_sandbox(config: VmConfig, trace: Tracer, faults: FaultInjector, stats: RunStats | None,
                      snapshots: "_Snapshots") -> int:
    sandbox = None
    if config.sandbox is not None and config.sandbox.enabled:
        # First, while the VMM is one thread: the monitor is forked here.
        from .sandbox import Sandbox

        sandbox = Sandbox(config.sandbox)
        sandbox.start()
        KEPT.activate()
        snapshots.keep_kernel(config)
        if config.xen and config.xenstore_socket is None:
            # Named once: a reboot under the sandbox cannot look at the runtime directory.
            from .core.runtime import xenstore_socket_path

            config = dataclasses.replace(config, xenstore_socket=xenstore_socket_path(config.name))
    try:
        return _run(config, sandbox, trace, faults, stats, snapshots)
    finally:
        if sandbox is not None:
            sandbox.finish(KEPT.close())


def _run(config: VmConfig, sandbox, trace: Tracer, faults: FaultInjector, stats: RunStats | None,
         snapshots: "_Snapshots") -> int:
    from .vmm.builder import MachineBuilder
    from .vmm.machine import Machine

    watchers = []
    if config.expect is not None:
        watchers.append(ExpectWatcher(config.expect, lambda: machine_holder[0].request_stop(StopReason.EXPECT_MATCHED)))
    if config.snapshot_on is not None:
        def at_marker() -> None:  # a vCPU's thread, or the event thread: the snapshot is the event thread's
            machine = machine_holder[0]
            machine.loop.call_soon_threadsafe(lambda: _snapshot_at_marker(config, machine, snapshots))

        watchers.append(ExpectWatcher(config.snapshot_on, at_marker))
    console = ConsoleOutput(_open_serial_output(config), watchers)
    deadline = time.monotonic() + config.timeout if config.timeout else None
    stop_signal: list[int] = []
    machine_holder: list[Machine] = []

    def on_signal(signum, frame):
        stop_signal.append(signum)
        if not machine_holder:
            return
        machine = machine_holder[0]
        if signum == signal.SIGTERM and machine.xen is not None and len(stop_signal) == 1:
            # First SIGTERM: ask the guest to power off in order, as
            # `xl shutdown` does; a second one (or --timeout) stops it hard.
            log.info("SIGTERM: asking the guest to power off (again to stop it at once)")
            machine.xen.request_guest_shutdown("poweroff")
            return
        machine.request_stop(StopReason.QUIT)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    if not (config.serial.kind == "stdio" and sys.stdin.isatty()):
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, on_signal)
    control = None
    machine = None
    reason = StopReason.ERROR
    detail = None
    run_counts = {"reboots": 0, "triple_faults": 0}
    try:
        while True:
            if snapshots.restore is not None:
                booting = MachineBuilder.from_snapshot(snapshots.restore, config, console, trace=trace, faults=faults,
                                                       state=snapshots.state)
                snapshots.restored()
            else:
                booting = MachineBuilder.for_boot(config, console, trace=trace, faults=faults)
            faults.use_loop(booting.loop)
            if control is None:
                control = _start_control_server(config, booting, machine_holder)
            else:
                control.move_to(booting.loop)  # clients stay connected across a reboot
            if machine is not None:
                machine.close()
            machine = booting
            machine.control = control
            machine.run_counts = run_counts
            machine.stats = stats
            machine_holder[:] = [machine]
            if sandbox is not None and not sandbox.locked:
                # Everything the first boot opens is open; no thread runs yet.
                machine.open_listeners()
                sandbox.lock(KEPT.unix_socket_paths(), unused=_unused_subsystems(config))
                _sandbox_test_call(machine)
            reason = machine.run(deadline)
            detail = machine.stop_detail
            log.info("guest stopped: %s%s", reason.value, f" ({detail})" if detail else "")
            if reason is StopReason.TRIPLE_FAULT:
                run_counts["triple_faults"] += 1
            if _boots_again(config, reason) and not stop_signal:
                # A triple fault resets a PC, so the guest boots again; the
                # warning (exit_handler.py) and the count say it happened.
                # So does a watchdog under --on-watchdog restart.
                run_counts["reboots"] += 1
                control.broadcast("RESET", _with_detail({"reason": reason.value}, detail))
                continue
            if reason in (StopReason.POWEROFF, StopReason.CRASH, StopReason.WATCHDOG):
                control.broadcast("SHUTDOWN", _with_detail({"reason": reason.value}, detail))
            break
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        status = _exit_status(config, reason, stop_signal)
        if control is not None:
            control.broadcast("STOP", _with_detail({"reason": reason.value, "status": status}, detail))
            control.close()
        if machine is not None:
            machine.close()
        console.close()
        trace.close()
    return status


def _boots_again(config: VmConfig, reason: StopReason) -> bool:
    """Whether this stop starts the next boot: a reset, or a watchdog under
    --on-watchdog restart, unless --no-reboot."""
    if config.no_reboot:
        return False
    return reason in RESETS or (reason is StopReason.WATCHDOG and config.on_watchdog == "restart")


def _snapshot_at_marker(config: VmConfig, machine, snapshots: "_Snapshots") -> None:
    """--snapshot-on: the console printed the marker (event thread)."""
    from .core.snapshot import SnapshotError

    fd = snapshots.take_out_fd()
    if fd is None or machine.stop_reason is not None:
        if fd is not None:
            os.close(fd)
        return
    try:
        summary = machine.snapshot_to(fd, stop=config.snapshot_stop)
    except SnapshotError as error:
        log.error("--snapshot-on: no snapshot written to %s: %s", config.snapshot_file, error)
        if config.snapshot_stop:
            machine.request_stop(StopReason.ERROR, detail="snapshot failed")
        return
    finally:
        os.close(fd)
    sys.stderr.write(f"pyvmm: snapshot written to {config.snapshot_file} ({summary['bytes']} bytes, "
                     f"{summary['data_bytes']} of RAM data, in {summary['seconds']:.3f} s)\n")
    sys.stderr.flush()


def _unused_subsystems(config: VmConfig) -> tuple[str, ...]:
    """What this run never imports after the sandbox's lockdown, so
    preload() leaves it out (pyvmm/sandbox.py)."""
    from .sandbox import GDB_STUB, STATS, XEN

    uses = {GDB_STUB: config.gdb is not None, XEN: config.xen, STATS: config.stats or config.stats_json is not None}
    return tuple(name for name, used in uses.items() if not used)


# The suite's way to show that the sandbox stops a VMM thread: with this set,
# vCPU 0's thread tries the named call once the guest runs (tests only).
TEST_CALL_VARIABLE = "PYVMM_TEST_SANDBOX_CALL"


def _sandbox_test_call(machine) -> None:
    call = os.environ.get(TEST_CALL_VARIABLE)
    if not call:
        return
    from .sandbox import try_forbidden_call

    machine.loop.call_later(0.5, lambda: machine.post_to_vcpu(0, lambda vcpu: try_forbidden_call(call)))


def _with_detail(data: dict, detail: str | None) -> dict:
    """An event's data, with what exactly stopped the guest when it is known."""
    return {**data, "detail": detail} if detail else data


def _exit_status(config: VmConfig, reason: StopReason, stop_signal: list[int]) -> int:
    if stop_signal and not (len(stop_signal) == 1 and reason is StopReason.POWEROFF):
        return 128 + stop_signal[0]
    if reason is StopReason.QUIT:
        return EXIT_ESCAPE
    # A triple fault keeps its own status under --expect: it says more than
    # "the pattern never came".
    if config.expect is not None and reason in (StopReason.POWEROFF, StopReason.REBOOT):
        return EXIT_NO_EXPECT
    # As --expect: a run that was to stop at its snapshot ended without the marker.
    if config.snapshot_on is not None and config.snapshot_stop and reason in (StopReason.POWEROFF, StopReason.REBOOT):
        return EXIT_NO_EXPECT
    return STATUS_FOR_REASON[reason]


def _start_control_server(config: VmConfig, machine, machine_holder: list):
    """The VM's control socket, for the whole run (reboots included)."""
    from .control.server import ControlServer, make_greeting
    from .control.operations import COMMAND_NAMES, machine_commands
    from .core.runtime import SocketInUseError, control_socket_path

    def command(name: str):
        return lambda args: machine_commands(machine_holder[0])[name](args)

    server = ControlServer(
        control_socket_path(config.name), machine.loop, {name: command(name) for name in COMMAND_NAMES},
        make_greeting(config.name),
    )
    try:
        server.start()
    except SocketInUseError:
        machine.close()
        raise RunError(f"a VM named {config.name!r} is already running (pyvmm list); choose another --name")
    return server


class RunError(Exception):
    """A failure to start the VM that the user can act on."""


def _open_serial_output(config: VmConfig):
    if config.serial.kind == "stdio":
        return sys.stdout.buffer
    if config.serial.kind == "file":
        return open(config.serial.path, "ab", buffering=0)
    return None


def describe_failure(error: BaseException) -> str | None:
    """A one-line message for failures a user can act on; None for bugs."""
    if isinstance(error, (KvmUnavailable, RunError, SnapshotError)):
        return str(error)
    from .sandbox import SandboxError

    if isinstance(error, SandboxError):
        return f"sandbox: {error}"
    if isinstance(error, NotKept):
        return f"sandbox: {error.strerror}"
    from .core.runtime import RuntimeDirError

    if isinstance(error, RuntimeDirError):
        return str(error)
    # Looked up, not imported: an error of a subsystem this run never
    # loaded cannot be raised, and after the sandbox's lockdown the
    # import itself would fail.
    kvm_xen = sys.modules.get("pyvmm.xen.hv.kvm_xen")
    if kvm_xen is not None and isinstance(error, kvm_xen.XenUnavailable):
        return str(error)
    gdbstub = sys.modules.get("pyvmm.debug.gdbstub")
    if gdbstub is not None and isinstance(error, gdbstub.GdbStubError):
        return str(error)
    if isinstance(error, BootError):
        what = "the disk image" if isinstance(error, FirmwareError) else "the kernel"
        return f"cannot boot {what}: {error}"
    if isinstance(error, GuestMemoryError):
        return f"guest memory: {error}"
    if isinstance(error, KvmError):
        if error.errno == errno.ENOMEM:
            return f"{error} (not enough host memory for the guest?)"
        return str(error)
    if isinstance(error, OSError) and error.filename:
        return f"{error.filename}: {error.strerror}"
    return None
