"""The PIIX3 IDE function (PCI 8086:7010) and its bus-master DMA engine.

What Xen and QEMU give an HVM guest's boot disk: both channels in legacy
mode (primary at ports 0x1F0-0x1F7 and 0x3F6 on IRQ 14, secondary at
0x170-0x177 and 0x376 on IRQ 15; the platform places those), with the
bus-master registers in BAR4 (16 ports: the primary's at 0-7, the
secondary's at 8-15). The IDE timing registers (0x40-0x4F) only hold what
the guest writes, with both channels' decode enable bits set as firmware
leaves them (Linux's ata_piix skips a channel whose bit is clear).

A DMA transfer walks the physical region descriptor table (PRDs: 32-bit
address, byte count, 0 meaning 64 KiB, and end-of-table in bit 31 of the
second dword) in guest memory. The table is bounded by its 64 KiB
(8192 entries), every region is checked to be RAM before it is touched,
and a table shorter than the transfer ends it with the error bit.
"""

from __future__ import annotations

import struct
import threading
from typing import Callable, Protocol

from ...core.snapshot import versioned
from .. import SavedState
from ..pci import BarKind, PciDevice
from .ata import DMA_CHUNK

VENDOR_INTEL = 0x8086
DEVICE_PIIX3_IDE = 0x7010
CLASS_IDE_LEGACY_BUSMASTER = 0x01_01_80
BAR_BUS_MASTER = 4
BUS_MASTER_PORTS = 16
IDETIM_PRIMARY, IDETIM_SECONDARY = 0x40, 0x42
IDETIM_DECODE_ENABLE = 0x8000

# Bus master registers (per channel, offsets from its base).
BM_COMMAND, BM_STATUS, BM_PRD = 0, 2, 4
BM_START, BM_TO_MEMORY = 0x01, 0x08
BM_ACTIVE, BM_ERROR, BM_INTERRUPT = 0x01, 0x02, 0x04
BM_DRIVE_CAPABLE = 0x60
PRD_ENTRY = struct.Struct("<II")
PRD_END = 1 << 31
MAX_PRDS = 65536 // PRD_ENTRY.size
STATE_VERSION = 1


class DmaMemory(Protocol):
    def read(self, gpa: int, length: int) -> bytes: ...

    def write(self, gpa: int, data: bytes) -> None: ...

    def check(self, gpa: int, length: int) -> None: ...


class BusMaster:
    """One channel's bus-master registers and its DMA engine.

    `attach(channel)` gives it the AtaChannel it serves; the channel calls
    pending() when a DMA command is ready, interrupt() when it raises its
    interrupt, and transfer() from run_dma(), under the channel's lock.
    """

    def __init__(self, memory: DmaMemory):
        self._memory = memory
        self._lock = threading.RLock()
        self._channel = None
        self._command = 0
        self._status = 0
        self._prd = 0
        self._waiting = False

    def attach(self, channel) -> None:
        self._channel = channel

    # --- the registers ---------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == BM_COMMAND and size == 1:
                return self._command
            if offset == BM_STATUS and size == 1:
                return self._status
            if offset == BM_PRD and size == 4:
                return self._prd
            if BM_PRD <= offset < BM_PRD + 4 and offset + size <= BM_PRD + 4:
                return (self._prd >> (8 * (offset - BM_PRD))) & ((1 << (8 * size)) - 1)
            return 0 if size in (1, 2, 4) and 0 <= offset < 8 else (1 << (8 * max(0, min(size, 8)))) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        start = False
        with self._lock:
            if offset == BM_COMMAND and size in (1, 2, 4):
                value &= BM_START | BM_TO_MEMORY
                was = self._command & BM_START
                self._command = value
                if value & BM_START and not was:
                    self._status |= BM_ACTIVE
                    start = self._waiting
                elif not value & BM_START:
                    self._status &= ~BM_ACTIVE  # stopping aborts what is left
                    self._waiting = False
            elif offset == BM_STATUS and size == 1:
                self._status = ((self._status & ~(BM_ERROR | BM_INTERRUPT | BM_DRIVE_CAPABLE))
                                | (self._status & (BM_ERROR | BM_INTERRUPT) & ~value)
                                | (value & BM_DRIVE_CAPABLE))
            elif offset == BM_PRD and size == 4:
                self._prd = value & 0xFFFF_FFFC
        if start:
            self._run()

    # --- snapshots: part of its channel's state --------------------------------

    def save_state(self) -> dict:
        with self._lock:
            return versioned(STATE_VERSION, command=self._command, status=self._status, prd=self._prd,
                             waiting=self._waiting)

    def restore_state(self, state: dict) -> None:
        saved = SavedState("BusMaster", state, STATE_VERSION)
        command = saved.int("command", 0, BM_START | BM_TO_MEMORY)
        status = saved.int("status", 0, 0xFF)
        prd = saved.int("prd", 0, 0xFFFF_FFFC)
        waiting = saved.bool("waiting")
        if command & ~(BM_START | BM_TO_MEMORY) or prd & 3:
            saved.fail(f"command {command:#x} or PRD address {prd:#x} has bits no guest can set")
        with self._lock:
            self._command, self._status, self._prd, self._waiting = command, status, prd, waiting

    # --- what the channel calls --------------------------------------------------

    def pending(self, channel) -> None:
        with self._lock:
            self._waiting = True
            started = bool(self._command & BM_START)
        if started:
            self._run()

    def interrupt(self) -> None:
        with self._lock:
            self._status |= BM_INTERRUPT

    def _run(self) -> None:
        with self._lock:
            self._waiting = False
        if self._channel is not None:
            self._channel.run_dma()

    def transfer(self, to_memory: bool, data_source: Callable[[int], bytes] | None,
                 data_sink: Callable[[bytes], None] | None, length: int) -> bool:
        """Move `length` bytes through the PRD table; False if it could not all go."""
        with self._lock:
            if bool(self._command & BM_TO_MEMORY) != to_memory:
                self._status |= BM_ERROR
                self._status &= ~BM_ACTIVE
                return False
            table = self._prd
        done = 0
        ok = True
        for index in range(MAX_PRDS):
            try:
                address, flags = PRD_ENTRY.unpack(self._memory.read(table + index * PRD_ENTRY.size, PRD_ENTRY.size))
            except Exception:  # noqa: BLE001 - GuestMemoryError: the table is not RAM
                ok = False
                break
            count = (flags & 0xFFFF) or 0x10000
            count = min(count, length - done)
            try:
                self._memory.check(address, count)
            except Exception:  # noqa: BLE001 - a region outside RAM
                ok = False
                break
            moved = 0
            while moved < count:
                piece = min(DMA_CHUNK, count - moved)
                if to_memory:
                    self._memory.write(address + moved, data_source(piece))
                else:
                    data_sink(self._memory.read(address + moved, piece))
                moved += piece
            done += count
            if done >= length or flags & PRD_END:
                break
        with self._lock:
            if not ok or done < length:
                self._status |= BM_ERROR
                ok = False
            # A table longer than the transfer leaves the engine active, as on
            # the PIIX; a complete or failed one clears it.
            if not ok or done >= length:
                self._status &= ~BM_ACTIVE
        return ok


class PiixIde(PciDevice):
    """PCI function 8086:7010 in legacy mode, its bus masters in BAR4."""

    def __init__(self, primary: BusMaster, secondary: BusMaster):
        super().__init__(VENDOR_INTEL, DEVICE_PIIX3_IDE, CLASS_IDE_LEGACY_BUSMASTER, name="piix3-ide")
        self._masters = (primary, secondary)
        self.add_bar(BAR_BUS_MASTER, BUS_MASTER_PORTS, BarKind.IO)
        for register in (IDETIM_PRIMARY, IDETIM_SECONDARY):
            self._put(register, 2, IDETIM_DECODE_ENABLE)
        self.make_writable(0x40, 16, (1 << 128) - 1)

    def bar_read(self, index: int, offset: int, size: int) -> int:
        master = self._masters[offset // 8] if 0 <= offset < BUS_MASTER_PORTS else None
        if index != BAR_BUS_MASTER or master is None:
            return (1 << (8 * max(0, min(size, 8)))) - 1
        return master.read(offset % 8, size)

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        if index == BAR_BUS_MASTER and 0 <= offset < BUS_MASTER_PORTS:
            self._masters[offset // 8].write(offset % 8, size, value)
