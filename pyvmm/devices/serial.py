"""16550A UART (COM1).

Eight byte-wide registers at layout.COM1_PORT. Transmission is instant: a
byte written to THR goes straight to the `output` sink, so THR and the
transmitter are always empty (LSR.THRE and LSR.TEMT read 1). Reception goes
through a 16-byte FIFO fed by `receive()` from the VMM's event thread; the
FIFO never overruns from there because `receive()` only takes what fits and
tells the caller, which keeps the rest (back-pressure). Overrun can still
happen in loopback mode, where transmitted bytes land in the RX FIFO.

Concurrency: vCPU threads access registers while the event thread calls
`receive()`; one lock guards all state. The interrupt line is driven under
that lock (so level changes reach it in order); the output sink and the
`input_wanted` notification are called after the lock is released.

Not modelled: baud-rate timing, parity/framing errors and break, the
character-timeout delay (a partly filled FIFO reports the timeout
interrupt at once, which drivers handle the same way), the TX FIFO.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Callable

from ..core.bus import IrqLine
from . import SavedState, read_bytewise, write_bytewise
from ..core.snapshot import versioned

log = logging.getLogger(__name__)

REGISTER_COUNT = 8
FIFO_SIZE = 16

# Register offsets.
RBR_THR = 0  # DLL when LCR.DLAB
IER = 1  # DLM when LCR.DLAB
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_ERBFI = 0x01  # received data available
IER_ETBEI = 0x02  # transmitter holding register empty
IER_ELSI = 0x04  # receiver line status
IER_EDSSI = 0x08  # modem status
IER_MASK = 0x0F  # bits 4-7 read 0: Linux probes bit 6 to spot XScale UARTs

IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_TIMEOUT = 0x0C
IIR_FIFO_ENABLED = 0xC0  # both bits set: what makes a driver say "16550A"

FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04
RX_TRIGGER_LEVELS = (1, 4, 8, 14)  # FCR bits 6-7

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

# With no real modem behind the port, report a connected, ready peer so that
# a guest using hardware flow control (CRTSCTS) or waiting for carrier sends.
HOST_MODEM_LINES = MSR_DCD | MSR_DSR | MSR_CTS

STATE_VERSION = 1


class Serial16550:
    """A 16550A with its interrupt on `irq` and transmitted bytes to `output`.

    `input_wanted`, if given, is called (without the lock held) when the
    guest has drained the RX FIFO, so an event thread holding back input can
    offer it again. The IRQ line must not call back into this device.
    """

    def __init__(
        self,
        irq: IrqLine,
        output: Callable[[bytes], None],
        input_wanted: Callable[[], None] | None = None,
    ):
        self._irq = irq
        self._output = output
        self._input_wanted = input_wanted
        self._lock = threading.Lock()
        self._irq_level = False
        self._rx: collections.deque[int] = collections.deque()
        self._tx: bytearray = bytearray()  # collected under the lock, sent after it
        self._wake_input = False
        self._ier = 0
        self._fifo_enabled = False
        self._rx_trigger = 1
        self._lcr = 0
        self._mcr = 0
        self._overrun = False
        self._msr_delta = 0
        self._msr_lines = HOST_MODEM_LINES
        self._scr = 0
        self._dll = 12  # 9600 baud until the guest programs the divisor
        self._dlm = 0
        # The THRE interrupt is an event, not a level: raised when THR
        # empties or ETBEI is enabled, cleared by reading IIR or writing THR.
        self._thr_pending = False

    # --- BusDevice ---------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            value = read_bytewise(self._read_register, offset, size)
            if not self._tx and not self._wake_input:  # a read rarely leaves anything to deliver
                return value
            deferred = self._take_deferred()
        self._deliver(*deferred)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            write_bytewise(self._write_register, offset, size, value)
            deferred = self._take_deferred()
        self._deliver(*deferred)

    # --- host side ---------------------------------------------------------

    def receive(self, data: bytes) -> int:
        """Queue bytes from the host; returns how many fitted in the FIFO."""
        with self._lock:
            if self._mcr & MCR_LOOP:
                return 0  # the serial input is disconnected in loopback
            room = self._rx_capacity() - len(self._rx)
            accepted = data[: max(room, 0)]
            self._rx.extend(accepted)
            self._update_irq()
            return len(accepted)

    def wants_input(self) -> bool:
        with self._lock:
            return not self._mcr & MCR_LOOP and len(self._rx) < self._rx_capacity()

    # --- snapshot (pyvmm/core/snapshot.py) -----------------------------------

    def save_state(self) -> dict:
        """Registers, the RX FIFO's bytes and the pending THRE event; the
        interrupt line's level follows from them. Nothing waits to be
        transmitted: a byte written to THR leaves at once."""
        with self._lock:
            return versioned(
                STATE_VERSION, rx=bytes(self._rx).hex(), ier=self._ier, fifo_enabled=self._fifo_enabled,
                rx_trigger=self._rx_trigger, lcr=self._lcr, mcr=self._mcr, overrun=self._overrun,
                msr_delta=self._msr_delta, msr_lines=self._msr_lines, scr=self._scr, dll=self._dll,
                dlm=self._dlm, thr_pending=self._thr_pending)

    def restore_state(self, state: dict) -> None:
        saved = SavedState("Serial16550", state, STATE_VERSION)
        fifo_enabled = saved.bool("fifo_enabled")
        rx_trigger = saved.int("rx_trigger", 1, FIFO_SIZE)
        if rx_trigger not in RX_TRIGGER_LEVELS:
            saved.fail(f"rx_trigger {rx_trigger} is not one of {RX_TRIGGER_LEVELS}")
        registers = {
            "_rx": collections.deque(saved.bytes("rx", maximum=FIFO_SIZE if fifo_enabled else 1)),
            "_ier": saved.int("ier", 0, IER_MASK), "_fifo_enabled": fifo_enabled, "_rx_trigger": rx_trigger,
            "_lcr": saved.int("lcr", 0, 0xFF), "_mcr": saved.int("mcr", 0, MCR_MASK),
            "_overrun": saved.bool("overrun"), "_msr_delta": saved.int("msr_delta", 0, 0x0F),
            "_msr_lines": saved.int("msr_lines", 0, 0xF0), "_scr": saved.int("scr", 0, 0xFF),
            "_dll": saved.int("dll", 0, 0xFF), "_dlm": saved.int("dlm", 0, 0xFF),
            "_thr_pending": saved.bool("thr_pending"),
        }
        with self._lock:
            for name, value in registers.items():
                setattr(self, name, value)
            self._tx = bytearray()
            self._wake_input = False
            self._irq_level = False
            self._update_irq()  # a pending interrupt raises the fresh line again

    # --- registers (lock held) ---------------------------------------------

    def _read_register(self, offset: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if offset == RBR_THR:
            return self._dll if dlab else self._read_rbr()
        if offset == IER:
            return self._dlm if dlab else self._ier
        if offset == IIR_FCR:
            return self._read_iir()
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            return self._read_lsr()
        if offset == MSR:
            value = self._msr_lines | self._msr_delta
            self._msr_delta = 0
            self._update_irq()
            return value
        if offset == SCR:
            return self._scr
        return 0xFF

    def _write_register(self, offset: int, value: int) -> None:
        dlab = self._lcr & LCR_DLAB
        if offset == RBR_THR:
            if dlab:
                self._dll = value
            else:
                self._write_thr(value)
        elif offset == IER:
            if dlab:
                self._dlm = value
            else:
                self._write_ier(value)
        elif offset == IIR_FCR:
            self._write_fcr(value)
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            self._write_mcr(value)
        elif offset == SCR:
            self._scr = value
        # LSR and MSR are read-only; writes there (and past SCR) are dropped.

    def _read_rbr(self) -> int:
        if not self._rx:
            return 0
        value = self._rx.popleft()
        if not self._rx:
            self._wake_input = True  # drained: the host may offer more now
        self._update_irq()
        return value

    def _read_iir(self) -> int:
        ident = self._interrupt_id()
        if ident == IIR_THRI:
            self._thr_pending = False  # reading IIR acknowledges THRE
            self._update_irq()
        return ident | (IIR_FIFO_ENABLED if self._fifo_enabled else 0)

    def _read_lsr(self) -> int:
        value = LSR_THRE | LSR_TEMT
        if self._rx:
            value |= LSR_DR
        if self._overrun:
            value |= LSR_OE
            self._overrun = False  # error bits clear on read
            self._update_irq()
        return value

    def _write_thr(self, value: int) -> None:
        if self._mcr & MCR_LOOP:
            self._push_rx(value)
        else:
            self._tx.append(value)
        # The byte left THR at once, so THR is empty again: a new THRE event.
        self._thr_pending = True
        self._update_irq()

    def _write_ier(self, value: int) -> None:
        old = self._ier
        self._ier = value & IER_MASK
        # Enabling ETBEI while THR is empty raises THRE again; Linux's 8250
        # driver checks this at startup and relies on it to start sending.
        if self._ier & IER_ETBEI and not old & IER_ETBEI:
            self._thr_pending = True
        self._update_irq()

    def _write_fcr(self, value: int) -> None:
        enable = bool(value & FCR_ENABLE)
        if enable != self._fifo_enabled:
            self._rx.clear()  # switching FIFO mode resets the FIFOs
            self._wake_input = True
        self._fifo_enabled = enable
        if enable:  # the other bits only take effect with the FIFO enabled
            if value & FCR_CLEAR_RX:
                self._rx.clear()
                self._wake_input = True
            self._rx_trigger = RX_TRIGGER_LEVELS[(value >> 6) & 3]
        else:
            self._rx_trigger = 1
        self._update_irq()

    def _write_mcr(self, value: int) -> None:
        was_loop = self._mcr & MCR_LOOP
        self._mcr = value & MCR_MASK
        self._set_modem_lines(self._loopback_lines() if self._mcr & MCR_LOOP else HOST_MODEM_LINES)
        if was_loop and not self._mcr & MCR_LOOP:
            self._wake_input = True
        self._update_irq()

    # --- internals (lock held) -----------------------------------------------

    def _rx_capacity(self) -> int:
        return FIFO_SIZE if self._fifo_enabled else 1

    def _push_rx(self, value: int) -> None:
        if len(self._rx) >= self._rx_capacity():
            # The new character is lost; the FIFO contents are kept.
            self._overrun = True
        else:
            self._rx.append(value)

    def _loopback_lines(self) -> int:
        # Loopback wires the modem outputs to the modem inputs.
        lines = 0
        if self._mcr & MCR_RTS:
            lines |= MSR_CTS
        if self._mcr & MCR_DTR:
            lines |= MSR_DSR
        if self._mcr & MCR_OUT1:
            lines |= MSR_RI
        if self._mcr & MCR_OUT2:
            lines |= MSR_DCD
        return lines

    def _set_modem_lines(self, lines: int) -> None:
        changed = lines ^ self._msr_lines
        if changed & MSR_CTS:
            self._msr_delta |= MSR_DCTS
        if changed & MSR_DSR:
            self._msr_delta |= MSR_DDSR
        if changed & MSR_RI and not lines & MSR_RI:
            self._msr_delta |= MSR_TERI  # trailing edge only
        if changed & MSR_DCD:
            self._msr_delta |= MSR_DDCD
        self._msr_lines = lines

    def _interrupt_id(self) -> int:
        """The highest-priority pending, enabled interrupt (datasheet order)."""
        if self._ier & IER_ELSI and self._overrun:
            return IIR_RLSI
        if self._ier & IER_ERBFI and self._rx:
            if len(self._rx) >= self._rx_trigger:
                return IIR_RDI
            return IIR_TIMEOUT
        if self._ier & IER_ETBEI and self._thr_pending:
            return IIR_THRI
        if self._ier & IER_EDSSI and self._msr_delta:
            return IIR_MSI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        # On a PC the UART's interrupt output reaches the PIC only through a
        # buffer enabled by OUT2; loopback forces OUT2 inactive.
        level = (
            self._interrupt_id() != IIR_NO_INT
            and bool(self._mcr & MCR_OUT2)
            and not self._mcr & MCR_LOOP
        )
        if level != self._irq_level:
            self._irq_level = level
            self._irq.set_level(level)

    def _take_deferred(self) -> tuple[bytes, bool]:
        data, self._tx = bytes(self._tx), bytearray()
        wake = self._wake_input and not self._rx and not self._mcr & MCR_LOOP
        self._wake_input = False
        return data, wake

    # --- without the lock ----------------------------------------------------

    def _deliver(self, data: bytes, wake: bool) -> None:
        if data:
            self._output(data)
        if wake and self._input_wanted is not None:
            self._input_wanted()
