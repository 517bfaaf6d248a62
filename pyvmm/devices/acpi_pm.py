"""ACPI fixed hardware: PM1a event/control blocks, PM timer, reset register.

One I/O block of layout.ACPI_PM_BLOCK_SIZE ports at layout.ACPI_PM_BASE:

    +0  PM1a_STS  (2)  write 1 to clear
    +2  PM1a_EN   (2)
    +4  PM1a_CNT  (2)  SCI_EN, SLP_TYP, SLP_EN
    +8  PM_TMR    (4)  24-bit free-running counter at 3.579545 MHz
    +C  RESET_REG (1)  layout.ACPI_RESET_VALUE resets the machine

Any access size at any offset is taken byte by byte, so a 32-bit read of
PM1a_EVT_BLK returns status and enable together, as some OSes do.

There is no SMI handler to hand over from, so SCI_EN is hard-wired to 1
(the OS finds ACPI mode already on). The SCI (layout.ACPI_SCI_IRQ) is
asserted while any enabled status bit is set. Sleep type S5 with SLP_EN
calls `on_poweroff()`; other sleep states are refused with a log line.

Not implemented: TMR_STS (timer carry out of bit 23) is never set, so
enabling TMR_EN raises no SCI; the global lock (GBL_*) and wake status.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from ..core import layout
from ..core.bus import IrqLine
from . import read_bytewise, write_bytewise
from ..core.ratelimit import DEFAULT_LOG_RATE, LogRate
from ..core.snapshot import versioned
from . import SavedState

log = logging.getLogger(__name__)

BLOCK_SIZE = layout.ACPI_PM_BLOCK_SIZE
PM1_STS = layout.ACPI_PM1A_EVT_BLK - layout.ACPI_PM_BASE
PM1_EN = PM1_STS + 2
PM1_CNT = layout.ACPI_PM1A_CNT_BLK - layout.ACPI_PM_BASE
PM_TMR = layout.ACPI_PM_TMR_BLK - layout.ACPI_PM_BASE
RESET_REG = layout.ACPI_RESET_REG - layout.ACPI_PM_BASE

STS_TMR = 0x0001
STS_BM = 0x0010
STS_GBL = 0x0020
STS_PWRBTN = 0x0100
STS_SLPBTN = 0x0200
STS_RTC = 0x0400
STS_WAK = 0x8000

EN_TMR = 0x0001
EN_GBL = 0x0020
EN_PWRBTN = 0x0100
EN_SLPBTN = 0x0200
EN_RTC = 0x0400
EN_WRITABLE = EN_TMR | EN_GBL | EN_PWRBTN | EN_SLPBTN | EN_RTC

CNT_SCI_EN = 0x0001
CNT_BM_RLD = 0x0002
CNT_GBL_RLS = 0x0004  # write-only
CNT_SLP_TYP_SHIFT = 10
CNT_SLP_TYP_MASK = 0x7 << CNT_SLP_TYP_SHIFT
CNT_SLP_EN = 0x2000  # write-only
CNT_STORED = CNT_BM_RLD | CNT_SLP_TYP_MASK

PM_TIMER_HZ = 3_579_545
PM_TIMER_MASK = 0xFF_FFFF
STATE_VERSION = 1


class AcpiPm:
    """`monotonic_ns()` drives the PM timer (time.monotonic_ns by default)."""

    def __init__(
        self,
        sci: IrqLine,
        on_poweroff: Callable[[], None],
        on_reset: Callable[[], None],
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
        log_rate: LogRate = DEFAULT_LOG_RATE,
    ):
        self._limited = log_rate.limited(log)  # lines whose rate the guest sets
        self._sci = sci
        self._on_poweroff = on_poweroff
        self._on_reset = on_reset
        self._monotonic_ns = monotonic_ns
        self._epoch = monotonic_ns()
        self._lock = threading.Lock()
        self._status = 0
        self._enable = 0
        self._control = 0
        self._sci_level = False
        self._requests: list[Callable[[], None]] = []

    # --- BusDevice ---------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if offset == PM_TMR and size == 4:
            # The clocksource's read (acpi_pm), thousands a second when the
            # guest has nothing better: the count alone, no lock (_epoch only
            # changes in restore_state(), before any vCPU runs).
            return self._timer()
        with self._lock:
            block = self._snapshot()  # one timer sample, so a wide read is consistent
        return read_bytewise(lambda i: block[i] if 0 <= i < BLOCK_SIZE else 0xFF, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            status_clear = enable_set = enable_mask = control_set = control_mask = 0
            reset = False

            def collect(index: int, byte: int) -> None:
                nonlocal status_clear, enable_set, enable_mask, control_set, control_mask, reset
                if PM1_STS <= index < PM1_STS + 2:
                    status_clear |= byte << (8 * (index - PM1_STS))
                elif PM1_EN <= index < PM1_EN + 2:
                    enable_set |= byte << (8 * (index - PM1_EN))
                    enable_mask |= 0xFF << (8 * (index - PM1_EN))
                elif PM1_CNT <= index < PM1_CNT + 2:
                    control_set |= byte << (8 * (index - PM1_CNT))
                    control_mask |= 0xFF << (8 * (index - PM1_CNT))
                elif index == RESET_REG and byte == layout.ACPI_RESET_VALUE:
                    reset = True
                # The timer is read-only; other ports are reserved.

            # Gather the bytes first so a 16-bit write to PM1a_CNT acts once.
            write_bytewise(collect, offset, size, value)
            self._status &= ~status_clear
            self._enable = (self._enable & ~enable_mask) | (enable_set & enable_mask & EN_WRITABLE)
            if control_mask:
                self._write_control(control_set, control_mask)
            if reset:
                self._limited.info("acpi: guest wrote the reset register")
                self._requests.append(self._on_reset)
            self._update_sci()
            requests, self._requests = self._requests, []
        for request in requests:  # outside the lock: they may stop the machine
            request()

    # --- host side ---------------------------------------------------------

    def press_power_button(self) -> None:
        """Signal the fixed-feature power button (an orderly shutdown request)."""
        with self._lock:
            self._status |= STS_PWRBTN
            self._update_sci()

    # --- snapshot (pyvmm/core/snapshot.py) -----------------------------------

    def save_state(self) -> dict:
        """PM1 status, enable and control, and the PM timer as the time it
        has counted (it goes on from there when restored, in another
        process whose monotonic clock has another origin)."""
        with self._lock:
            return versioned(STATE_VERSION, status=self._status, enable=self._enable, control=self._control,
                             timer_ns=self._monotonic_ns() - self._epoch)

    def restore_state(self, state: dict) -> None:
        saved = SavedState("AcpiPm", state, STATE_VERSION)
        status = saved.int("status", 0, 0xFFFF)
        enable = saved.int("enable", 0, EN_WRITABLE)
        if enable & ~EN_WRITABLE:
            saved.fail(f"enable {enable:#x} sets bits the guest cannot")
        control = saved.int("control", 0, CNT_STORED)
        if control & ~CNT_STORED:
            saved.fail(f"control {control:#x} holds bits that are never stored")
        timer_ns = saved.int("timer_ns", 0, 1 << 63)
        with self._lock:
            self._status, self._enable, self._control = status, enable, control
            self._epoch = self._monotonic_ns() - timer_ns
            self._sci_level = False
            self._update_sci()

    # --- internals (lock held) ---------------------------------------------

    def _snapshot(self) -> bytes:
        """The block's registers as read; reserved ports read 0."""
        block = bytearray(BLOCK_SIZE)
        block[PM1_STS : PM1_STS + 2] = self._status.to_bytes(2, "little")
        block[PM1_EN : PM1_EN + 2] = self._enable.to_bytes(2, "little")
        block[PM1_CNT : PM1_CNT + 2] = (self._control | CNT_SCI_EN).to_bytes(2, "little")
        block[PM_TMR : PM_TMR + 4] = self._timer().to_bytes(4, "little")
        return bytes(block)

    def _timer(self) -> int:
        # Also called without the lock (read()): it only reads _epoch.
        elapsed = self._monotonic_ns() - self._epoch
        return (elapsed * PM_TIMER_HZ // 1_000_000_000) & PM_TIMER_MASK

    def _write_control(self, value: int, mask: int) -> None:
        self._control = (self._control & ~(mask & CNT_STORED)) | (value & mask & CNT_STORED)
        if not value & mask & CNT_SLP_EN:
            return
        sleep_type = (self._control & CNT_SLP_TYP_MASK) >> CNT_SLP_TYP_SHIFT
        if sleep_type == layout.ACPI_S5_SLP_TYP:
            self._limited.info("acpi: guest entered S5 (soft off)")
            self._requests.append(self._on_poweroff)
        else:
            self._limited.warning("acpi: sleep type %d is not supported; staying awake", sleep_type)

    def _update_sci(self) -> None:
        level = bool(self._status & self._enable)
        if level != self._sci_level:
            self._sci_level = level
            self._sci.set_level(level)
