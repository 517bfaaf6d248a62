"""Why a VM stopped: the one vocabulary of every part that can stop it.

Devices (reset and power registers, pvpanic), the Xen domain (SCHEDOP_shutdown,
its watchdogs),
the exit handler (a triple fault, an internal error) and the operator all ask
the machine to stop with a `StopReason`; runner.py maps the first one of the
last boot to pyvmm's exit status.
"""

from __future__ import annotations

import enum


class StopReason(enum.Enum):
    POWEROFF = "poweroff"
    REBOOT = "reboot"
    CRASH = "crash"
    WATCHDOG = "watchdog"  # a Xen domain watchdog ran out, or the guest shut down with SHUTDOWN_watchdog
    TRIPLE_FAULT = "triple-fault"  # a CPU reset the guest did not ask for
    EXPECT_MATCHED = "expect-matched"
    TIMEOUT = "timeout"
    QUIT = "quit"  # the operator asked (console escape, signal)
    DESTROYED = "destroyed"  # `pyvmm ctl NAME destroy`
    SNAPSHOT = "snapshot"  # stopped once a snapshot was written (`ctl NAME snapshot --stop`, `--snapshot-on RE,stop`)
    ERROR = "error"  # the VMM failed
