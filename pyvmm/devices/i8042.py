"""The i8042 keyboard controller, without a keyboard or a mouse.

Enough of the controller for an OS to probe it and to reset the machine:
the status and command port (layout.I8042_COMMAND_PORT), the data port
(layout.I8042_DATA_PORT), the command byte, the self tests, the port
enable/disable commands, the loop-back commands (0xD2/0xD3) and the
output port, whose bit 0 is the CPU reset line (0xFE pulses it, 0xD1 can
clear it): either calls `on_reset()`.

Nothing is attached to either PS/2 port. A byte the guest sends to a
device gets the answer of an empty port: 0xFE with the timeout bit set in
the status register, so a driver gives up at once instead of waiting.
Interrupt lines are optional; without them the guest can still poll.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Callable

from ..core import layout
from ..core.bus import IrqLine
from ..core.ratelimit import DEFAULT_LOG_RATE, LogRate
from . import SavedState, read_bytewise, write_bytewise
from ..core.snapshot import versioned

log = logging.getLogger(__name__)

# Register this device twice: it decodes the absolute port numbers.
DATA_PORT = layout.I8042_DATA_PORT
COMMAND_PORT = layout.I8042_COMMAND_PORT

STATUS_OBF = 0x01  # output buffer full
STATUS_IBF = 0x02  # input buffer full (never: we process writes at once)
STATUS_SYS = 0x04  # system flag: self test passed
STATUS_CMD = 0x08  # last write was to the command port
STATUS_UNLOCKED = 0x10  # keyboard not inhibited
STATUS_AUX = 0x20  # the byte in the output buffer is from the aux port
STATUS_TIMEOUT = 0x40

CTR_KBD_INT = 0x01
CTR_AUX_INT = 0x02
CTR_SYS = 0x04
CTR_KBD_DISABLE = 0x10
CTR_AUX_DISABLE = 0x20
CTR_XLATE = 0x40

OUTPUT_RESET = 0x01  # bit 0 low holds the CPU in reset
OUTPUT_A20 = 0x02
OUTPUT_KBD_OBF = 0x10
OUTPUT_AUX_OBF = 0x20

SELF_TEST_OK = 0x55
PORT_TEST_OK = 0x00
NO_DEVICE = 0xFE  # what a port without a device answers (with STATUS_TIMEOUT)

# Commands followed by a parameter byte on the data port.
CMD_WRITE_CTR = 0x60
CMD_WRITE_OUTPUT = 0xD1
CMD_WRITE_KBD_BUFFER = 0xD2
CMD_WRITE_AUX_BUFFER = 0xD3
CMD_WRITE_AUX = 0xD4

OUTPUT_QUEUE_LIMIT = 16
STATE_VERSION = 1


class I8042:
    """The controller. The two ports are not adjacent (0x61 is someone
    else's), so it is registered twice, one port each:
    `bus.register(DATA_PORT, 1, kbc.data_port())` and
    `bus.register(COMMAND_PORT, 1, kbc.command_port())`.
    """

    def __init__(
        self,
        on_reset: Callable[[], None],
        kbd_irq: IrqLine | None = None,
        aux_irq: IrqLine | None = None,
        log_rate: LogRate = DEFAULT_LOG_RATE,
    ):
        self._limited = log_rate.limited(log)  # lines whose rate the guest sets
        self._on_reset = on_reset
        self._kbd_irq = kbd_irq
        self._aux_irq = aux_irq
        self._lock = threading.Lock()
        self._ram = bytearray(32)  # controller RAM, byte 0 is the command byte
        self._ctr = CTR_KBD_INT | CTR_SYS | CTR_XLATE
        self._output_port = OUTPUT_RESET | OUTPUT_A20
        self._status_cmd = 0
        self._pending_command: int | None = None
        # (byte, from_aux, timeout) waiting for the guest to read port 0x60.
        self._queue: collections.deque[tuple[int, bool, bool]] = collections.deque()
        self._levels = [False, False]  # kbd, aux

    def data_port(self) -> "_Port":
        return _Port(self, DATA_PORT)

    def command_port(self) -> "_Port":
        return _Port(self, COMMAND_PORT)

    # --- port access -----------------------------------------------------------

    def port_read(self, port: int) -> int:
        with self._lock:
            if port == COMMAND_PORT:
                return self._status()
            if port == DATA_PORT:
                return self._read_data()
            return 0xFF

    def port_write(self, port: int, value: int) -> None:
        reset = False
        with self._lock:
            value &= 0xFF
            if port == COMMAND_PORT:
                self._status_cmd = STATUS_CMD
                reset = self._command(value)
            elif port == DATA_PORT:
                self._status_cmd = 0
                reset = self._data(value)
        if reset:
            self._limited.info("i8042: guest pulsed the reset line")
            self._on_reset()

    # --- snapshot (pyvmm/core/snapshot.py) -----------------------------------------

    def save_state(self) -> dict:
        """The controller's RAM (the command byte first), the output port,
        the last port written, a command waiting for its parameter and the
        bytes waiting in the output buffer; the interrupt lines follow."""
        with self._lock:
            return versioned(STATE_VERSION, ram=bytes(self._ram).hex(), output_port=self._output_port,
                             status_cmd=self._status_cmd, pending_command=self._pending_command,
                             queue=[[value, aux, timeout] for value, aux, timeout in self._queue])

    def restore_state(self, state: dict) -> None:
        saved = SavedState("I8042", state, STATE_VERSION)
        ram = bytearray(saved.bytes("ram", len(self._ram)))
        output_port = saved.int("output_port", 0, 0xFF)
        status_cmd = saved.int("status_cmd", 0, STATUS_CMD)
        if status_cmd not in (0, STATUS_CMD):
            saved.fail(f"status_cmd {status_cmd:#x} is neither 0 nor {STATUS_CMD:#x}")
        pending = saved.optional_int("pending_command", 0, 0xFF)
        queue = collections.deque()
        for entry in saved.list("queue", OUTPUT_QUEUE_LIMIT):
            if (not isinstance(entry, list) or len(entry) != 3 or not isinstance(entry[0], int)
                    or isinstance(entry[0], bool) or not 0 <= entry[0] <= 0xFF
                    or not all(isinstance(flag, bool) for flag in entry[1:])):
                saved.fail(f"an output buffer entry is {entry!r}, not [byte, from_aux, timeout]")
            queue.append((entry[0], entry[1], entry[2]))
        with self._lock:
            self._ram, self._output_port, self._status_cmd = ram, output_port, status_cmd
            self._pending_command, self._queue = pending, queue
            self._levels = [False, False]
            self._update_irqs()

    # --- internals (lock held) ---------------------------------------------------

    def _status(self) -> int:
        status = self._status_cmd | STATUS_UNLOCKED
        if self._ctr & CTR_SYS:
            status |= STATUS_SYS
        if self._queue:
            _, aux, timeout = self._queue[0]
            status |= STATUS_OBF
            if aux:
                status |= STATUS_AUX
            if timeout:
                status |= STATUS_TIMEOUT
        return status

    def _read_data(self) -> int:
        if not self._queue:
            return 0x00
        value, _, _ = self._queue.popleft()
        self._update_irqs()
        return value

    def _respond(self, value: int, aux: bool = False, timeout: bool = False) -> None:
        if len(self._queue) < OUTPUT_QUEUE_LIMIT:
            self._queue.append((value & 0xFF, aux, timeout))
        self._update_irqs()

    def _command(self, command: int) -> bool:
        """Run a controller command; returns whether to reset the machine."""
        self._pending_command = None
        if 0x20 <= command <= 0x3F:  # read controller RAM; 0x20 is the command byte
            self._respond(self._ram[command & 0x1F])
        elif 0x60 <= command <= 0x7F or command in (CMD_WRITE_OUTPUT, CMD_WRITE_KBD_BUFFER,
                                                    CMD_WRITE_AUX_BUFFER, CMD_WRITE_AUX):
            self._pending_command = command
        elif command == 0xA7:
            self._ctr |= CTR_AUX_DISABLE
        elif command == 0xA8:
            self._ctr &= ~CTR_AUX_DISABLE
        elif command == 0xA9 or command == 0xAB:
            self._respond(PORT_TEST_OK)
        elif command == 0xAA:
            self._queue.clear()
            self._ctr |= CTR_SYS
            self._respond(SELF_TEST_OK)
        elif command == 0xAD:
            self._ctr |= CTR_KBD_DISABLE
        elif command == 0xAE:
            self._ctr &= ~CTR_KBD_DISABLE
        elif command == 0xC0:
            self._respond(0xA0)  # input port: keyboard not inhibited
        elif command == 0xD0:
            self._respond(self._output_port_value())
        elif command == 0xE0:
            self._respond(0x00)  # test inputs
        elif 0xF0 <= command <= 0xFF:
            # Pulse the output lines whose bits are 0 in the low nibble;
            # bit 0 is the reset line.
            return not command & 0x01
        else:
            log.debug("i8042: unsupported command %#04x", command)
        self._update_irqs()
        return False

    def _data(self, value: int) -> bool:
        command, self._pending_command = self._pending_command, None
        if command is None:
            self._no_device(aux=False)  # a byte for the keyboard
        elif CMD_WRITE_CTR <= command <= 0x7F:  # write controller RAM
            self._ram[command & 0x1F] = value
        elif command == CMD_WRITE_OUTPUT:
            self._output_port = value
            if not value & OUTPUT_RESET:
                self._output_port |= OUTPUT_RESET  # the reset line comes back up
                return True
        elif command == CMD_WRITE_KBD_BUFFER:
            self._respond(value, aux=False)
        elif command == CMD_WRITE_AUX_BUFFER:
            self._respond(value, aux=True)
        elif command == CMD_WRITE_AUX:
            self._no_device(aux=True)
        self._update_irqs()
        return False

    def _no_device(self, aux: bool) -> None:
        self._respond(NO_DEVICE, aux=aux, timeout=True)

    def _output_port_value(self) -> int:
        value = self._output_port & ~(OUTPUT_KBD_OBF | OUTPUT_AUX_OBF)
        if self._queue:
            value |= OUTPUT_AUX_OBF if self._queue[0][1] else OUTPUT_KBD_OBF
        return value

    def _update_irqs(self) -> None:
        # The head of the output buffer interrupts on its port's line when
        # the command byte enables that port's interrupt.
        kbd = aux = False
        if self._queue:
            from_aux = self._queue[0][1]
            aux = from_aux and bool(self._ctr & CTR_AUX_INT)
            kbd = not from_aux and bool(self._ctr & CTR_KBD_INT)
        for index, (line, level) in enumerate(((self._kbd_irq, kbd), (self._aux_irq, aux))):
            if line is not None and level != self._levels[index]:
                self._levels[index] = level
                line.set_level(level)

    @property
    def _ctr(self) -> int:
        return self._ram[0]

    @_ctr.setter
    def _ctr(self, value: int) -> None:
        self._ram[0] = value & 0xFF


class _Port:
    """One of the i8042's two ports as a BusDevice."""

    __slots__ = ("controller", "port")

    def __init__(self, controller: I8042, port: int):
        self.controller = controller
        self.port = port

    def read(self, offset: int, size: int) -> int:
        return read_bytewise(self._read_byte, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        write_bytewise(self._write_byte, offset, size, value)

    def _read_byte(self, offset: int) -> int:
        return self.controller.port_read(self.port) if offset == 0 else 0xFF

    def _write_byte(self, offset: int, value: int) -> None:
        if offset == 0:
            self.controller.port_write(self.port, value)
