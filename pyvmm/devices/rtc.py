"""MC146818 real-time clock and its 128 bytes of CMOS.

Two ports at layout.CMOS_PORT: the index register (bit 7 disables NMI) and
the data register. The guest's clock is the host's UTC clock plus an offset
that changes whenever the guest sets the time; the time registers are
computed from it when read, in the format register B asks for (BCD or
binary, 12 or 24 hours). While B.SET is set, or the divider chain is held
in reset (A.DV = 110/111), the clock is frozen in the registers, which the
guest then edits; releasing it restarts the clock from them.

Interrupts (layout.RTC_IRQ): the update-ended, alarm and periodic flags are
brought up to date by `tick()`, which the machine calls at `next_deadline()`
(and whenever else it likes); reads of A and C also catch up, so a guest
polling them needs no timer.

Not implemented: the divider's other modes (any DV besides the reset values
runs the clock at the normal rate), daylight-saving (B.DSE), the square-wave
output, the 2 ms window in which time registers are unreadable, and
alarm checks for more than MAX_ALARM_CATCHUP seconds missed at once.
NMI masking is recorded but not wired to anything.
"""

from __future__ import annotations

import calendar
import logging
import threading
import time
from typing import Callable

from ..core.bus import IrqLine
from . import SavedState, read_bytewise, write_bytewise
from ..core.snapshot import versioned

log = logging.getLogger(__name__)

PORT_COUNT = 2
CMOS_SIZE = 128

SECONDS = 0x00
SECONDS_ALARM = 0x01
MINUTES = 0x02
MINUTES_ALARM = 0x03
HOURS = 0x04
HOURS_ALARM = 0x05
DAY_OF_WEEK = 0x06
DAY_OF_MONTH = 0x07
MONTH = 0x08
YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
CENTURY = 0x32  # where the ACPI FADT's century field points
TIME_REGISTERS = frozenset({SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR, CENTURY})

A_UIP = 0x80
A_DV_SHIFT = 4
A_DV_NORMAL = 0x2  # 32.768 kHz time base
A_DV_RESET = (0x6, 0x7)
A_RS_MASK = 0x0F

B_SET = 0x80
B_PIE = 0x40
B_AIE = 0x20
B_UIE = 0x10
B_SQWE = 0x08
B_DM_BINARY = 0x04
B_24H = 0x02
B_DSE = 0x01

C_IRQF = 0x80
C_PF = 0x40
C_AF = 0x20
C_UF = 0x10

D_VRT = 0x80  # the battery is fine

HOUR_PM = 0x80
ALARM_DONT_CARE = 0xC0  # an alarm byte with both top bits set matches anything

# UIP rises this long before each update, so a reader that saw it clear has
# that long to read the time registers without an update intervening.
UIP_LEAD = 244e-6
MAX_ALARM_CATCHUP = 3600

STATE_VERSION = 1

# Clamp guest time to what the registers can express (years 1..9999).
_MIN_TIME = calendar.timegm((1, 1, 1, 0, 0, 0))
_MAX_TIME = calendar.timegm((9999, 12, 31, 23, 59, 59))


def _to_bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


def _from_bcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0x0F)


class CmosRtc:
    """The RTC/CMOS. `clock()` returns host UTC time in seconds (time.time)."""

    def __init__(self, irq: IrqLine, clock: Callable[[], float] = time.time):
        self._irq = irq
        self._clock = clock
        self._lock = threading.Lock()
        self._cmos = bytearray(CMOS_SIZE)
        self._cmos[REG_A] = (A_DV_NORMAL << A_DV_SHIFT) | 0x6  # 1024 Hz when enabled
        self._cmos[REG_B] = B_24H  # BCD, 24 hours: what PC firmware leaves
        self._cmos[REG_D] = D_VRT
        self._index = 0
        self.nmi_disabled = False
        self._offset = 0.0  # guest time minus host time, seconds
        self._frozen_phase: float | None = None  # sub-second phase while frozen
        self._flags = 0  # C's PF/AF/UF
        self._irq_level = False
        self._last = clock()  # host time the flags are up to date with

    # --- BusDevice ---------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            return read_bytewise(self._read_port, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            write_bytewise(self._write_port, offset, size, value)

    # --- timer side ----------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """Bring the interrupt flags up to host time `now` (default: clock())."""
        with self._lock:
            self._advance(self._clock() if now is None else now)

    def next_deadline(self) -> float | None:
        """Host time at which the next enabled interrupt is due, if any."""
        with self._lock:
            if not self._running():
                return None
            b = self._cmos[REG_B]
            deadlines = []
            if b & (B_UIE | B_AIE):
                guest = self._last + self._offset
                deadlines.append(self._last + (int(guest) + 1 - guest))
            period = self._period()
            if b & B_PIE and period:
                deadlines.append((int(self._last / period) + 1) * period)
            return min(deadlines, default=None)

    # --- snapshot (pyvmm/core/snapshot.py) -----------------------------------

    def save_state(self) -> dict:
        """The CMOS bytes, the index, the pending flags (brought up to now)
        and the guest's clock as its offset from the host's UTC clock: a
        restored RTC keeps telling real time, as a PC's battery-backed clock
        goes on while the machine is off. A frozen clock (SET, divider
        reset) keeps its registers and its phase."""
        with self._lock:
            self._advance(self._clock())
            return versioned(STATE_VERSION, cmos=bytes(self._cmos).hex(), index=self._index,
                             nmi_disabled=self.nmi_disabled, offset=self._offset,
                             frozen_phase=self._frozen_phase, flags=self._flags)

    def restore_state(self, state: dict) -> None:
        saved = SavedState("CmosRtc", state, STATE_VERSION)
        cmos = bytearray(saved.bytes("cmos", CMOS_SIZE))
        index = saved.int("index", 0, CMOS_SIZE - 1)
        nmi_disabled = saved.bool("nmi_disabled")
        offset = saved.float("offset")
        frozen_phase = saved.optional_float("frozen_phase")
        if frozen_phase is not None and not 0.0 <= frozen_phase < 1.0:
            saved.fail(f"frozen_phase {frozen_phase} is not a fraction of a second")
        flags = saved.int("flags", 0, C_PF | C_AF | C_UF)
        with self._lock:
            self._cmos, self._index, self.nmi_disabled = cmos, index, nmi_disabled
            self._cmos[REG_A] &= ~A_UIP
            self._offset, self._frozen_phase, self._flags = offset, frozen_phase, flags
            self._last = self._clock()
            self._irq_level = False
            self._update_irq()

    # --- ports (lock held) ---------------------------------------------------

    def _read_port(self, offset: int) -> int:
        if offset == 1:
            return self._read_register(self._index)
        return 0xFF  # the index register is write-only

    def _write_port(self, offset: int, value: int) -> None:
        if offset == 0:
            self._index = value & 0x7F
            self.nmi_disabled = bool(value & 0x80)
        elif offset == 1:
            self._write_register(self._index, value)

    def _read_register(self, index: int) -> int:
        if index in TIME_REGISTERS and self._running():
            self._load_time(self._guest_now())
        elif index == REG_A:
            self._advance(self._clock())
            value = self._cmos[REG_A] & ~A_UIP
            if self._running() and self._guest_now() % 1.0 >= 1.0 - UIP_LEAD:
                value |= A_UIP
            return value
        elif index == REG_C:
            self._advance(self._clock())
            value = self._flags | (C_IRQF if self._irq_pending() else 0)
            self._flags = 0  # reading C acknowledges every interrupt
            self._update_irq()
            return value
        elif index == REG_D:
            return D_VRT
        return self._cmos[index]

    def _write_register(self, index: int, value: int) -> None:
        if index in (REG_C, REG_D):
            return  # read-only
        was_running = self._running()
        was_divider_reset = self._divider_reset()
        if index == REG_A:
            self._advance(self._clock())
            self._cmos[REG_A] = value & ~A_UIP
        elif index == REG_B:
            self._advance(self._clock())
            if value & B_SET:
                value &= ~B_UIE  # SET disables update interrupts
            self._cmos[REG_B] = value
        elif index in TIME_REGISTERS and was_running:
            # Setting one field of a running clock: keep the others current.
            now = self._guest_now()
            self._load_time(now)
            self._cmos[index] = value
            self._offset = self._parse_time() + now % 1.0 - self._clock()
            return
        else:
            self._cmos[index] = value
        running = self._running()
        if was_running and not running:
            now = self._guest_now()
            self._load_time(now)
            self._frozen_phase = now % 1.0
        elif running and not was_running:
            # After a divider reset the first update comes 500 ms later; after
            # SET alone the divider chain kept its phase.
            phase = 0.5 if was_divider_reset else (self._frozen_phase or 0.0)
            host = self._clock()
            self._offset = self._parse_time() + phase - host
            self._last = host
            self._frozen_phase = None
        self._update_irq()

    # --- time ------------------------------------------------------------------

    def _running(self) -> bool:
        return not self._cmos[REG_B] & B_SET and not self._divider_reset()

    def _divider_reset(self) -> bool:
        return (self._cmos[REG_A] >> A_DV_SHIFT) & 0x7 in A_DV_RESET

    def _guest_now(self) -> float:
        return min(max(self._clock() + self._offset, _MIN_TIME), _MAX_TIME)

    def _encode(self, value: int) -> int:
        return value if self._cmos[REG_B] & B_DM_BINARY else _to_bcd(value)

    def _decode(self, value: int) -> int:
        return value if self._cmos[REG_B] & B_DM_BINARY else _from_bcd(value)

    def _encode_hour(self, hour: int) -> int:
        if self._cmos[REG_B] & B_24H:
            return self._encode(hour)
        return self._encode(hour % 12 or 12) | (HOUR_PM if hour >= 12 else 0)

    def _decode_hour(self, value: int) -> int:
        if self._cmos[REG_B] & B_24H:
            return self._decode(value)
        return self._decode(value & ~HOUR_PM) % 12 + (12 if value & HOUR_PM else 0)

    def _load_time(self, guest_time: float) -> None:
        tm = time.gmtime(int(guest_time))
        self._cmos[SECONDS] = self._encode(tm.tm_sec)
        self._cmos[MINUTES] = self._encode(tm.tm_min)
        self._cmos[HOURS] = self._encode_hour(tm.tm_hour)
        self._cmos[DAY_OF_WEEK] = self._encode((tm.tm_wday + 1) % 7 + 1)  # Sunday = 1
        self._cmos[DAY_OF_MONTH] = self._encode(tm.tm_mday)
        self._cmos[MONTH] = self._encode(tm.tm_mon)
        self._cmos[YEAR] = self._encode(tm.tm_year % 100)
        self._cmos[CENTURY] = self._encode(tm.tm_year // 100)

    def _parse_time(self) -> int:
        """The registers as seconds since the epoch; nonsense is clamped."""
        c = self._cmos
        year = self._decode(c[CENTURY]) * 100 + self._decode(c[YEAR])
        month = self._decode(c[MONTH])
        day = self._decode(c[DAY_OF_MONTH])
        hour = self._decode_hour(c[HOURS])
        minute = self._decode(c[MINUTES])
        second = self._decode(c[SECONDS])
        fields = (
            min(max(year, 1), 9999),
            min(max(month, 1), 12),
            min(max(day, 1), 31),  # 31 February rolls into March, as timegm does
            min(hour, 23),
            min(minute, 59),
            min(second, 59),
        )
        return min(max(calendar.timegm(fields), _MIN_TIME), _MAX_TIME)

    # --- interrupts ------------------------------------------------------------

    def _period(self) -> float | None:
        rate = self._cmos[REG_A] & A_RS_MASK
        if rate == 0:
            return None
        if rate <= 2:  # rates 1 and 2 repeat 256 Hz and 128 Hz
            rate += 7
        return 1.0 / (32768 >> (rate - 1))

    def _advance(self, now: float) -> None:
        last, self._last = self._last, now
        if now <= last or not self._running():
            self._update_irq()
            return
        period = self._period()
        if period and int(now / period) > int(last / period):
            self._flags |= C_PF
        first = int(last + self._offset) + 1
        current = int(now + self._offset)
        if current >= first:
            self._flags |= C_UF
            for second in range(max(first, current - MAX_ALARM_CATCHUP + 1), current + 1):
                if self._alarm_matches(second):
                    self._flags |= C_AF
                    break
        self._update_irq()

    def _alarm_matches(self, guest_second: int) -> bool:
        tm = time.gmtime(min(max(guest_second, _MIN_TIME), _MAX_TIME))
        pairs = (
            (SECONDS_ALARM, self._encode(tm.tm_sec)),
            (MINUTES_ALARM, self._encode(tm.tm_min)),
            (HOURS_ALARM, self._encode_hour(tm.tm_hour)),
        )
        for register, current in pairs:
            alarm = self._cmos[register]
            if alarm & ALARM_DONT_CARE != ALARM_DONT_CARE and alarm != current:
                return False
        return True

    def _irq_pending(self) -> bool:
        return bool(self._flags & self._cmos[REG_B] & (B_PIE | B_AIE | B_UIE))

    def _update_irq(self) -> None:
        level = self._irq_pending()
        if level != self._irq_level:
            self._irq_level = level
            self._irq.set_level(level)
