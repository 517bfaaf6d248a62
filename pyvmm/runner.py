"""Runs a VM to its end: reboots, timeout, --expect, signals, exit status."""

from __future__ import annotations

import errno
import logging
import signal
import sys
import time

from .boot.errors import BootError
from .config import VmConfig
from .console import ConsoleOutput, ExpectWatcher
from .exit_handler import StopReason
from .kvm import KvmError, KvmUnavailable
from .memory import GuestMemoryError

log = logging.getLogger(__name__)

STATUS_FOR_REASON = {
    StopReason.POWEROFF: 0,
    StopReason.EXPECT_MATCHED: 0,
    StopReason.REBOOT: 2,
    StopReason.CRASH: 3,
    StopReason.TIMEOUT: 124,
    StopReason.ERROR: 1,
}
EXIT_NO_EXPECT = 5
EXIT_ESCAPE = 130


def run_vm(config: VmConfig) -> int:
    from .machine import Machine

    watchers = []
    if config.expect is not None:
        watchers.append(ExpectWatcher(config.expect, lambda: machine_holder[0].request_stop(StopReason.EXPECT_MATCHED)))
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
    try:
        while True:
            machine = Machine(config, console)
            machine_holder[:] = [machine]
            try:
                reason = machine.run(deadline)
            finally:
                machine.close()
            log.info("guest stopped: %s", reason.value)
            if reason is StopReason.REBOOT and not config.no_reboot:
                if stop_signal:
                    break
                continue
            break
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        console.close()
    if stop_signal and not (len(stop_signal) == 1 and reason is StopReason.POWEROFF):
        return 128 + stop_signal[0]
    if reason is StopReason.QUIT:
        return EXIT_ESCAPE
    if config.expect is not None and reason in (StopReason.POWEROFF, StopReason.REBOOT):
        return EXIT_NO_EXPECT
    return STATUS_FOR_REASON[reason]


def _open_serial_output(config: VmConfig):
    if config.serial.kind == "stdio":
        return sys.stdout.buffer
    if config.serial.kind == "file":
        return open(config.serial.path, "ab", buffering=0)
    return None


def describe_failure(error: BaseException) -> str | None:
    """A one-line message for failures a user can act on; None for bugs."""
    if isinstance(error, KvmUnavailable):
        return str(error)
    from .xen.kvm_xen import XenUnavailable

    if isinstance(error, XenUnavailable):
        return str(error)
    if isinstance(error, BootError):
        return f"cannot boot the kernel: {error}"
    if isinstance(error, GuestMemoryError):
        return f"guest memory: {error}"
    if isinstance(error, KvmError):
        if error.errno == errno.ENOMEM:
            return f"{error} (not enough host memory for the guest?)"
        return str(error)
    if isinstance(error, OSError) and error.filename:
        return f"{error.filename}: {error.strerror}"
    return None
