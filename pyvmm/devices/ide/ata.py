"""An ATA hard disk on one IDE channel: the task-file registers and the commands.

What BIOS firmware, GRUB and Linux's ata_piix use of ATA/ATAPI-6: IDENTIFY,
PIO reads and writes (single and multiple sectors, 28- and 48-bit LBA),
DMA reads and writes through the channel's bus master (`DmaEngine`), FLUSH
CACHE, SET FEATURES, SET MULTIPLE MODE, the power-management no-ops, and
the software reset. Anything else is aborted (ERR with ABRT), as a drive
aborts a command it does not implement.

Every command runs to completion on the vCPU thread that issues it (file
I/O on the image is synchronous), so BSY is never seen. A transfer moves at
most one DRQ block (PIO) or one bounded chunk (DMA) through memory at a
time. The sector range of every command is checked against the disk
(ID NOT FOUND past its end). A write is on the image once the command
completes, and FLUSH CACHE is fsync.

`unplugged` (the Xen unplug protocol, pyvmm/xen/hv/xen_platform.py): the
channel then answers as one with no drive (zeros, as QEMU's do), so the
guest's ATA driver finds nothing.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from typing import Callable, Protocol

from ...core.kept import KEPT
from ...core.snapshot import versioned
from .. import SavedState

log = logging.getLogger(__name__)

SECTOR = 512
MAX_MULTIPLE = 16  # sectors per DRQ block for READ/WRITE MULTIPLE
DMA_CHUNK = 64 * SECTOR  # what a DMA command moves through memory at a time

# Command block registers (offsets from the channel's base port).
DATA, ERROR_FEATURES, SECTOR_COUNT, LBA_LOW, LBA_MID, LBA_HIGH, DEVICE, STATUS_COMMAND = range(8)
COMMAND_BLOCK_PORTS = 8

# Status bits.
ERR, DRQ, DSC, DF, DRDY, BSY = 0x01, 0x08, 0x10, 0x20, 0x40, 0x80
# Error bits.
ABRT, IDNF, UNC = 0x04, 0x10, 0x40
# Device control (the control block's write side).
NIEN, SRST, HOB = 0x02, 0x04, 0x80
DEVICE_LBA, DEVICE_DRV = 0x40, 0x10
# What a channel without a drive answers on every register: 0, as QEMU
# does. A real floating bus reads 0xFF, whose BSY bit a BIOS waits out for
# its full timeout (SeaBIOS: 32 s a drive) before giving up on the channel.
FLOATING = 0x00

CMD_RECALIBRATE = 0x10
CMD_READ_SECTORS, CMD_READ_SECTORS_NORETRY = 0x20, 0x21
CMD_READ_SECTORS_EXT = 0x24
CMD_READ_DMA_EXT = 0x25
CMD_READ_MULTIPLE_EXT = 0x29
CMD_WRITE_SECTORS, CMD_WRITE_SECTORS_NORETRY = 0x30, 0x31
CMD_WRITE_SECTORS_EXT = 0x34
CMD_WRITE_DMA_EXT = 0x35
CMD_WRITE_MULTIPLE_EXT = 0x39
CMD_READ_VERIFY, CMD_READ_VERIFY_NORETRY, CMD_READ_VERIFY_EXT = 0x40, 0x41, 0x42
CMD_SEEK = 0x70
CMD_DIAGNOSTIC = 0x90
CMD_INIT_PARAMETERS = 0x91
CMD_IDENTIFY_PACKET = 0xA1
CMD_READ_MULTIPLE, CMD_WRITE_MULTIPLE, CMD_SET_MULTIPLE = 0xC4, 0xC5, 0xC6
CMD_READ_DMA, CMD_READ_DMA_NORETRY = 0xC8, 0xC9
CMD_WRITE_DMA, CMD_WRITE_DMA_NORETRY = 0xCA, 0xCB
CMD_STANDBY_IMMEDIATE, CMD_IDLE_IMMEDIATE, CMD_STANDBY, CMD_IDLE = 0xE0, 0xE1, 0xE2, 0xE3
CMD_CHECK_POWER_MODE = 0xE5
CMD_SLEEP = 0xE6
CMD_FLUSH_CACHE, CMD_FLUSH_CACHE_EXT = 0xE7, 0xEA
CMD_IDENTIFY = 0xEC
CMD_SET_FEATURES = 0xEF
CMD_READ_NATIVE_MAX, CMD_READ_NATIVE_MAX_EXT = 0xF8, 0x27

_READS = {CMD_READ_SECTORS: (False, 1), CMD_READ_SECTORS_NORETRY: (False, 1), CMD_READ_SECTORS_EXT: (True, 1),
          CMD_READ_MULTIPLE: (False, 0), CMD_READ_MULTIPLE_EXT: (True, 0)}
_WRITES = {CMD_WRITE_SECTORS: (False, 1), CMD_WRITE_SECTORS_NORETRY: (False, 1), CMD_WRITE_SECTORS_EXT: (True, 1),
           CMD_WRITE_MULTIPLE: (False, 0), CMD_WRITE_MULTIPLE_EXT: (True, 0)}
_DMA = {CMD_READ_DMA: (False, False), CMD_READ_DMA_NORETRY: (False, False), CMD_READ_DMA_EXT: (True, False),
        CMD_WRITE_DMA: (False, True), CMD_WRITE_DMA_NORETRY: (False, True), CMD_WRITE_DMA_EXT: (True, True)}
_NO_DATA = {CMD_RECALIBRATE, CMD_SEEK, CMD_INIT_PARAMETERS, CMD_STANDBY_IMMEDIATE, CMD_IDLE_IMMEDIATE,
            CMD_STANDBY, CMD_IDLE, CMD_SLEEP}

LBA28_LIMIT = 1 << 28
STATE_VERSION = 1
MAX_SAVED_BUFFER = 64 * 1024  # a DRQ block: MAX_MULTIPLE sectors, or an ATAPI drive's byte count limit
# Geometry reported for CHS callers (16 heads, 63 sectors per track).
HEADS, SECTORS_PER_TRACK = 16, 63


class DmaEngine(Protocol):
    """The channel's bus master (piix.BusMaster): moves bytes between
    guest memory, as its PRD table describes it, and the drive."""

    def transfer(self, to_memory: bool, data_source: Callable[[int], bytes] | None,
                 data_sink: Callable[[bytes], None] | None, length: int) -> bool: ...


class Disk(Protocol):
    """The image: pread/pwrite/fsync on an open descriptor (ImageFile)."""

    sectors: int
    readonly: bool

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...

    def flush(self) -> None: ...


class ImageFile:
    """A raw image or block device, opened once (before the sandbox locks)."""

    def __init__(self, path, readonly: bool = False):
        self.path = os.fspath(path)
        self.readonly = readonly
        # Kept across reboots under the sandbox (pyvmm/core/kept.py); pread/pwrite need no offset.
        self.fd = KEPT.open(self.path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        size = os.lseek(self.fd, 0, os.SEEK_END)
        self.sectors = size // SECTOR

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        return data.ljust(length, b"\0")

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            done = os.pwrite(self.fd, view, offset)
            view, offset = view[done:], offset + done

    def flush(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _ata_string(text: str, length: int) -> bytes:
    # IDENTIFY strings swap the two bytes of each word.
    raw = text.encode("ascii").ljust(length, b" ")[:length]
    return bytes(raw[i ^ 1] for i in range(length))


def identify_data(sectors: int, serial: str, multiple: int) -> bytes:
    """IDENTIFY DEVICE's 256 words for a disk of `sectors` 512-byte sectors."""
    words = [0] * 256
    cylinders = min(16383, max(1, sectors // (HEADS * SECTORS_PER_TRACK)))
    words[0] = 0x0040  # fixed, not removable
    words[1], words[3], words[6] = cylinders, HEADS, SECTORS_PER_TRACK
    words[47] = 0x8000 | MAX_MULTIPLE
    words[49] = (1 << 9) | (1 << 8)  # LBA, DMA
    words[53] = 0x0007  # words 54-58, 64-70 and 88 are valid
    words[54], words[55], words[56] = cylinders, HEADS, SECTORS_PER_TRACK
    chs = cylinders * HEADS * SECTORS_PER_TRACK
    words[57], words[58] = chs & 0xFFFF, chs >> 16
    words[59] = (0x100 | multiple) if multiple else 0
    lba28 = min(sectors, LBA28_LIMIT - 1)
    words[60], words[61] = lba28 & 0xFFFF, lba28 >> 16
    words[63] = 0x0007  # multiword DMA 0-2 supported
    words[64] = 0x0003  # PIO 3 and 4
    words[65] = words[66] = words[67] = words[68] = 120
    words[80] = 0x007E  # ATA-1 .. ATA-6
    words[82] = 1 << 14  # NOP
    words[83] = (1 << 14) | (1 << 13) | (1 << 12) | (1 << 10)  # FLUSH CACHE (EXT), LBA48
    words[84] = 1 << 14
    words[85] = 1 << 14
    words[86] = (1 << 13) | (1 << 12) | (1 << 10)
    words[87] = 1 << 14
    words[88] = 0x203F  # UDMA 0-5 supported, mode 5 selected
    words[93] = 0x6001 | (1 << 13)  # an 80-wire cable: what lets Linux pick UDMA above 2
    for i in range(4):
        words[100 + i] = (sectors >> (16 * i)) & 0xFFFF
    return identify_block(words, serial, "PYVMM HARDDISK")


def identify_block(words: list[int], serial: str, model: str) -> bytes:
    """IDENTIFY (PACKET) DEVICE's 512 bytes: the 256 `words`, with the
    serial number, firmware revision and model strings and the integrity
    word filled in."""
    raw = bytearray(struct.pack("<256H", *words))
    raw[20:40] = _ata_string(serial, 20)
    raw[46:54] = _ata_string("1.0", 8)
    raw[54:94] = _ata_string(model, 40)
    raw[510] = 0xA5  # integrity word: signature, then the checksum byte
    raw[511] = -sum(raw[:511]) & 0xFF
    return bytes(raw)


class AtaChannel:
    """One IDE channel's registers, with a hard disk as master (or no drive).

    `irq(asserted)` drives the channel's interrupt line (IRQ14 for the
    primary); `dma` is the channel's bus master, None without one. The
    command block is the bus device at the channel's base (8 ports), the
    control block (`control_port()`) the one at base + 0x206.
    """

    def __init__(self, disk: Disk | None, irq: Callable[[bool], None], *, dma: DmaEngine | None = None,
                 serial: str = "PYVMM0001", on_error: Callable[[str], None] | None = None):
        self._line = False
        self.disk = disk
        self._irq = irq
        self.dma = dma
        self._serial = serial
        self._on_error = on_error or (lambda message: log.warning("%s", message))
        self._lock = threading.RLock()
        self.unplugged = False
        self._reset_registers()
        self._nien = False
        self._irq_pending = False
        self._line = False
        self._multiple = MAX_MULTIPLE

    # --- state -----------------------------------------------------------------

    def _reset_registers(self) -> None:
        self._features = self._hob_features = 0
        # After reset the task file holds the ATA signature: count 1, LBA 1, 0, 0.
        self._count, self._hob_count = 1, 0
        self._lba = [1, 0, 0]
        self._hob_lba = [0, 0, 0]
        self._device = 0
        self._error = 0x01  # diagnostic: device 0 passed
        self._status = DRDY | DSC if self._present(0) else 0
        self._buffer = b""
        self._buffer_pos = 0
        self._transfer: tuple | None = None  # what a DRQ block continues: ("read"|"write", lba, left, block)
        self._hob = False

    def _present(self, drive: int) -> bool:
        return drive == 0 and self.disk is not None and not self.unplugged

    @property
    def _selected(self) -> int:
        return 1 if self._device & DEVICE_DRV else 0

    def unplug(self) -> None:
        """The guest unplugged the emulated disk: from now on no drive answers."""
        with self._lock:
            self.unplugged = True
            self._transfer = None
            self._buffer = b""
            self._status = 0
            self._set_irq(False)

    # --- snapshots (pyvmm/core/snapshot.py) ----------------------------------------

    def save_state(self) -> dict:
        """The task file, the DRQ block in flight (its bytes and where the
        guest is in it), the command it continues, the interrupt, the
        unplug, and the bus master's registers. Called with the VM paused,
        so no command is half run: every one completes on its vCPU's exit."""
        with self._lock:
            return versioned(
                STATE_VERSION,
                features=self._features, hob_features=self._hob_features, count=self._count,
                hob_count=self._hob_count, lba=list(self._lba), hob_lba=list(self._hob_lba), device=self._device,
                error=self._error, status=self._status, hob=self._hob, nien=self._nien, srst=self._srst,
                irq_pending=self._irq_pending, multiple=self._multiple, unplugged=self.unplugged,
                buffer=bytes(self._buffer).hex(), buffer_filling=isinstance(self._buffer, bytearray),
                buffer_pos=self._buffer_pos,
                transfer=list(self._transfer) if self._transfer is not None else None,
                bus_master=self.dma.save_state() if self.dma is not None else None,
                **self._drive_state())

    def restore_state(self, state: dict) -> None:
        saved = SavedState(type(self).__name__, state, STATE_VERSION)
        registers = {name: saved.int(name, 0, 0xFF) for name in
                     ("features", "hob_features", "count", "hob_count", "device", "error", "status")}
        lba, hob_lba = saved.octets("lba", 3), saved.octets("hob_lba", 3)
        flags = {name: saved.bool(name) for name in ("hob", "nien", "srst", "irq_pending", "unplugged",
                                                      "buffer_filling")}
        multiple = saved.int("multiple", 0, MAX_MULTIPLE)
        buffer = saved.bytes("buffer", maximum=MAX_SAVED_BUFFER)
        buffer_pos = saved.int("buffer_pos", 0, len(buffer))
        transfer = self._saved_transfer(saved, state)
        if flags["unplugged"] and self.disk is None:
            saved.fail("only a disk is unplugged")
        bus_master = state.get("bus_master")
        if (bus_master is None) != (self.dma is None):
            saved.fail("the saved channel and this one differ in having a bus master")
        drive = self._restore_drive(saved, state)
        if self.dma is not None:
            self.dma.restore_state(bus_master)
        with self._lock:
            for name, value in registers.items():
                setattr(self, f"_{name}", value)
            self._lba, self._hob_lba, self._multiple = lba, hob_lba, multiple
            self._hob, self._nien, self._srst = flags["hob"], flags["nien"], flags["srst"]
            self.unplugged = flags["unplugged"]
            self._buffer = bytearray(buffer) if flags["buffer_filling"] else buffer
            self._buffer_pos, self._transfer = buffer_pos, transfer
            drive()
            self._line = False
            self._set_irq(flags["irq_pending"])

    def _saved_transfer(self, saved: SavedState, state: dict) -> tuple | None:
        """The saved command in flight, checked against this channel's disk."""
        value = state.get("transfer")
        if value is None:
            return None
        sectors = self.disk.sectors if self.disk is not None else 0
        if isinstance(value, list) and len(value) == 4 and value[0] in ("read", "write", "dma") \
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value[1:3]) \
                and value[1] + value[2] <= sectors:
            kind, lba, left, last = value
            if kind != "dma" and isinstance(last, int) and not isinstance(last, bool) and 1 <= last <= MAX_MULTIPLE:
                return (kind, lba, left, last)
            if kind == "dma" and isinstance(last, bool) and left:
                return (kind, lba, left, last)
        saved.fail(f"transfer {value!r} is no command this disk of {sectors} sectors can be in")

    def _drive_state(self) -> dict:
        """What a kind of drive adds to the channel's state (nothing for a disk)."""
        return {}

    def _restore_drive(self, saved: SavedState, state: dict) -> Callable[[], None]:
        """Check the drive's own saved fields; returns what sets them (under the lock)."""
        return lambda: None

    # --- interrupts ------------------------------------------------------------

    def _raise_irq(self) -> None:
        # ISA interrupts are edges: one raised while the last is still
        # unacknowledged needs the line to drop first.
        if self._line:
            self._line = False
            self._irq(False)
        self._irq_pending = True
        if self.dma is not None:
            self.dma.interrupt()
        self._update_irq()

    def _set_irq(self, pending: bool) -> None:
        self._irq_pending = pending
        self._update_irq()

    def _update_irq(self) -> None:
        level = self._irq_pending and not self._nien
        if level != self._line:
            self._line = level
            self._irq(level)

    # --- the command block ----------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == DATA and size in (2, 4):
                return self._read_data(size)
            if size != 1 or not 0 < offset < COMMAND_BLOCK_PORTS:
                return (1 << (8 * max(0, min(size, 8)))) - 1
            if not self._present(self._selected):
                # No drive at all: FLOATING. A missing slave behind a present
                # master reads zeros too (the master answers), but for the
                # device register, which both drives latch.
                if not self._present(0):
                    return FLOATING
                return self._device | 0xA0 if offset == DEVICE else 0
            if offset == STATUS_COMMAND:
                self._set_irq(False)  # reading status acknowledges the interrupt
                return self._status
            return self._task_file(offset)

    def read_string(self, offset: int, size: int, count: int) -> bytes | None:
        """A REP INSW/INSD on the data port, served a block at a time rather
        than a word at a time (what makes a BIOS's PIO reads bearable)."""
        if offset != DATA or size not in (2, 4):
            return None
        with self._lock:
            wanted = size * count
            out = bytearray()
            while len(out) < wanted and self._status & DRQ and self._buffer and self._present(self._selected) \
                    and (self._transfer is None or self._transfer[0] == "read"):
                take = min(wanted - len(out), len(self._buffer) - self._buffer_pos)
                take -= take % size
                if take <= 0:
                    break
                out += self._buffer[self._buffer_pos : self._buffer_pos + take]
                self._buffer_pos += take
                if self._buffer_pos >= len(self._buffer):
                    self._buffer, self._buffer_pos = b"", 0
                    if self._transfer is not None and self._transfer[2]:
                        self._next_read_block()
                    else:
                        self._transfer = None
                        self._status = DRDY | DSC
            return bytes(out.ljust(wanted, b"\0"))

    def write_string(self, offset: int, size: int, data: bytes) -> bool:
        """A REP OUTSW/OUTSD on the data port: the words, in order."""
        if offset != DATA or size not in (2, 4):
            return False
        with self._lock:
            for at in range(0, len(data) - size + 1, size):
                self._write_data(size, int.from_bytes(data[at : at + size], "little"))
        return True

    def _task_file(self, offset: int) -> int:
        if offset == ERROR_FEATURES:
            return self._error
        if offset == SECTOR_COUNT:
            return self._hob_count if self._hob else self._count
        if offset in (LBA_LOW, LBA_MID, LBA_HIGH):
            index = offset - LBA_LOW
            return self._hob_lba[index] if self._hob else self._lba[index]
        return self._device | 0xA0  # DEVICE: bits 7 and 5 read as one (obsolete, set)

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            value &= (1 << (8 * max(0, min(size, 8)))) - 1
            if offset == DATA and size in (2, 4):
                self._write_data(size, value)
                return
            if size != 1 or not 0 < offset < COMMAND_BLOCK_PORTS:
                return
            value &= 0xFF
            self._hob = False  # any task-file write clears HOB (ATA-6)
            if offset == ERROR_FEATURES:
                self._hob_features, self._features = self._features, value
            elif offset == SECTOR_COUNT:
                self._hob_count, self._count = self._count, value
            elif offset in (LBA_LOW, LBA_MID, LBA_HIGH):
                index = offset - LBA_LOW
                self._hob_lba[index], self._lba[index] = self._lba[index], value
            elif offset == DEVICE:
                self._device = value & 0x5F
            elif self._present(self._selected):
                self._command(value)

    # --- the control block (alternate status / device control) -----------------

    def control_port(self) -> "_ControlPort":
        return _ControlPort(self)

    def alt_status(self) -> int:
        with self._lock:
            if not self._present(self._selected):
                return FLOATING if not self._present(0) else 0
            return self._status

    def device_control(self, value: int) -> None:
        with self._lock:
            if value & SRST and not self._srst:
                self._srst = True
            elif not value & SRST and getattr(self, "_srst", False):
                self._srst = False
                self._reset_registers()  # reset ends when SRST is cleared
            self._nien = bool(value & NIEN)
            self._hob = bool(value & HOB)
            self._update_irq()

    _srst = False

    # --- commands --------------------------------------------------------------

    def _command(self, command: int) -> None:
        self._set_irq(False)
        self._error = 0
        self._transfer = None
        self._buffer, self._buffer_pos = b"", 0
        if command in _READS:
            lba48, block = _READS[command]
            if block == 0 and not self._multiple:
                return self._abort()
            self._start_pio(lba48, block or self._multiple, write=False)
        elif command in _WRITES:
            lba48, block = _WRITES[command]
            if block == 0 and not self._multiple:
                return self._abort()
            self._start_pio(lba48, block or self._multiple, write=True)
        elif command in _DMA:
            self._dma_command(*_DMA[command])
        elif command == CMD_IDENTIFY:
            self._buffer = identify_data(self.disk.sectors, self._serial, self._multiple)
            self._status = DRDY | DSC | DRQ
            self._raise_irq()
        elif command in (CMD_FLUSH_CACHE, CMD_FLUSH_CACHE_EXT):
            try:
                self.disk.flush()
            except OSError as error:
                self._on_error(f"IDE: flushing {getattr(self.disk, 'path', 'the disk')} failed: {error}")
                self._status = DRDY | DF | ERR
                self._error = ABRT
                self._raise_irq()
                return
            self._complete()
        elif command in (CMD_READ_VERIFY, CMD_READ_VERIFY_NORETRY, CMD_READ_VERIFY_EXT):
            lba48 = command == CMD_READ_VERIFY_EXT
            lba, count = self._range(lba48)
            if lba is None:
                return
            self._complete()
        elif command == CMD_SET_MULTIPLE:
            count = self._count
            if count == 0 or count > MAX_MULTIPLE or count & (count - 1):
                return self._abort()
            self._multiple = count
            self._complete()
        elif command == CMD_SET_FEATURES:
            # Transfer modes, write cache and look-ahead: accepted, nothing to change.
            self._complete()
        elif command == CMD_CHECK_POWER_MODE:
            self._count = 0xFF  # active or idle
            self._complete()
        elif command in (CMD_READ_NATIVE_MAX, CMD_READ_NATIVE_MAX_EXT):
            top = self.disk.sectors - 1
            if command == CMD_READ_NATIVE_MAX:
                top = min(top, LBA28_LIMIT - 1)
                self._device = (self._device & 0xF0) | ((top >> 24) & 0x0F)
            self._lba = [top & 0xFF, (top >> 8) & 0xFF, (top >> 16) & 0xFF]
            self._hob_lba = [(top >> 24) & 0xFF, (top >> 32) & 0xFF, (top >> 40) & 0xFF]
            self._complete()
        elif command == CMD_DIAGNOSTIC:
            self._reset_registers()
            self._raise_irq()
        elif command in _NO_DATA:
            self._complete()
        else:  # IDENTIFY PACKET DEVICE included: this is not an ATAPI drive
            if command == CMD_IDENTIFY_PACKET:
                self._lba[1], self._lba[2] = 0, 0  # keep the ATA signature for the probe
            self._abort()

    def _complete(self) -> None:
        self._status = DRDY | DSC
        self._raise_irq()

    def _abort(self, error: int = ABRT) -> None:
        self._error = error
        self._status = DRDY | DSC | ERR
        self._raise_irq()

    def _range(self, lba48: bool) -> tuple[int | None, int]:
        """The command's (first sector, count), or (None, 0) after aborting it."""
        if lba48:
            lba = (self._lba[0] | self._lba[1] << 8 | self._lba[2] << 16
                   | self._hob_lba[0] << 24 | self._hob_lba[1] << 32 | self._hob_lba[2] << 40)
            count = (self._hob_count << 8 | self._count) or 65536
        elif self._device & DEVICE_LBA:
            lba = self._lba[0] | self._lba[1] << 8 | self._lba[2] << 16 | (self._device & 0x0F) << 24
            count = self._count or 256
        else:
            cylinder = self._lba[1] | self._lba[2] << 8
            head, sector = self._device & 0x0F, self._lba[0]
            if sector == 0 or sector > SECTORS_PER_TRACK:
                self._abort(IDNF)
                return None, 0
            lba = (cylinder * HEADS + head) * SECTORS_PER_TRACK + sector - 1
            count = self._count or 256
        if lba + count > self.disk.sectors:
            self._abort(IDNF)
            return None, 0
        return lba, count

    # --- PIO ---------------------------------------------------------------------

    def _start_pio(self, lba48: bool, block: int, write: bool) -> None:
        lba, count = self._range(lba48)
        if lba is None:
            return
        if write and self.disk.readonly:
            return self._abort()
        self._transfer = ("write" if write else "read", lba, count, block)
        if write:
            self._buffer = bytearray(min(block, count) * SECTOR)
            self._buffer_pos = 0
            self._status = DRDY | DSC | DRQ  # the first block needs no interrupt
        else:
            self._next_read_block()

    def _next_read_block(self) -> None:
        _, lba, left, block = self._transfer
        take = min(block, left)
        try:
            self._buffer = self.disk.read(lba * SECTOR, take * SECTOR)
        except OSError as error:
            self._on_error(f"IDE: reading sector {lba} failed: {error}")
            self._transfer = None
            return self._abort(UNC)
        self._buffer_pos = 0
        self._transfer = ("read", lba + take, left - take, block)
        self._status = DRDY | DSC | DRQ
        self._raise_irq()

    def _read_data(self, size: int) -> int:
        if not self._status & DRQ or self._transfer is None and not self._buffer:
            return 0
        chunk = self._buffer[self._buffer_pos : self._buffer_pos + size]
        self._buffer_pos += size
        if self._buffer_pos >= len(self._buffer):
            self._buffer, self._buffer_pos = b"", 0
            if self._transfer is not None and self._transfer[0] == "read" and self._transfer[2]:
                self._next_read_block()
            else:
                self._transfer = None
                self._status = DRDY | DSC
        return int.from_bytes(chunk.ljust(size, b"\0"), "little")

    def _write_data(self, size: int, value: int) -> None:
        if not self._status & DRQ or self._transfer is None or self._transfer[0] != "write":
            return
        room = len(self._buffer) - self._buffer_pos
        take = min(size, room)
        self._buffer[self._buffer_pos : self._buffer_pos + take] = value.to_bytes(size, "little")[:take]
        self._buffer_pos += take
        if self._buffer_pos < len(self._buffer):
            return
        _, lba, left, block = self._transfer
        sectors = len(self._buffer) // SECTOR
        try:
            self.disk.write(lba * SECTOR, bytes(self._buffer))
        except OSError as error:
            self._on_error(f"IDE: writing sector {lba} failed: {error}")
            self._transfer = None
            return self._abort(ABRT)
        left -= sectors
        if left:
            self._transfer = ("write", lba + sectors, left, block)
            self._buffer = bytearray(min(block, left) * SECTOR)
            self._buffer_pos = 0
            self._status = DRDY | DSC | DRQ
            self._raise_irq()
        else:
            self._transfer = None
            self._buffer, self._buffer_pos = b"", 0
            self._complete()

    # --- DMA ---------------------------------------------------------------------

    def _dma_command(self, lba48: bool, write: bool) -> None:
        if self.dma is None:
            return self._abort()
        lba, count = self._range(lba48)
        if lba is None:
            return
        if write and self.disk.readonly:
            return self._abort()
        # The drive is ready; the transfer runs when the bus master starts.
        self._transfer = ("dma", lba, count, write)
        self._status = DRDY | DSC | DRQ
        self.dma.pending(self)

    def run_dma(self) -> None:
        """The bus master was started: carry out the pending DMA command."""
        with self._lock:
            if self._transfer is None or self._transfer[0] != "dma":
                return
            _, lba, count, write = self._transfer
            self._transfer = None
            position = [lba * SECTOR]
            end = (lba + count) * SECTOR
            failed = []

            def source(length: int) -> bytes:  # disk -> memory
                length = min(length, end - position[0])
                data = self.disk.read(position[0], length)
                position[0] += length
                return data

            def sink(data: bytes) -> None:  # memory -> disk
                data = data[: end - position[0]]
                self.disk.write(position[0], data)
                position[0] += len(data)

            try:
                ok = self.dma.transfer(not write, None if write else source, sink if write else None,
                                       count * SECTOR)
            except OSError as error:
                self._on_error(f"IDE: DMA at sector {lba} failed: {error}")
                failed.append(error)
                ok = False
            if failed:
                self._abort(UNC if not write else ABRT)
            elif not ok:
                self._abort(ABRT)  # the PRD table did not cover the transfer, or was not RAM
            else:
                self._complete()


class _ControlPort:
    """The control block register: alternate status (read), device control (write)."""

    def __init__(self, channel: AtaChannel):
        self._channel = channel

    def read(self, offset: int, size: int) -> int:
        if offset == 0 and size == 1:
            return self._channel.alt_status()
        return (1 << (8 * max(0, min(size, 8)))) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 1:
            self._channel.device_control(value & 0xFF)
