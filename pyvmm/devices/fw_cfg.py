"""QEMU's firmware configuration interface (fw_cfg), as SeaBIOS reads it.

The VMM hands the firmware its facts (RAM size and map, vCPU count, ACPI
tables, boot order) as numbered items and named files; the firmware selects
one and reads it. Three I/O registers, at layout.FW_CFG_PORT:

  +0  selector (16 bits, little-endian): picks an item, rewinds it
  +1  data (8 bits): the selected item's next byte (0 past its end)
  +4  DMA address (64 bits, big-endian: high half at +4, low at +8);
      writing the low half starts a transfer; reading gives "QEMU CFG"

A DMA transfer is described by a 16-byte structure in guest RAM, all
big-endian: control (u32: bit 0 error, 1 read, 2 skip, 3 select, 4 write,
the item in bits 16-31), length (u32), address (u64). The device carries it
out at once (on the vCPU's thread) and writes control back as 0, or with the
error bit when any part of it was not RAM or the item refuses writes.

Items are read-only here: nothing pyvmm gives the firmware asks to be
written back. Every guest value is checked: an unknown selector selects an
empty item, a DMA structure or buffer outside RAM is an error, and a read
past an item's end copies zeros in bounded chunks.
"""

from __future__ import annotations

import logging
import struct
import threading
from typing import Protocol

from ..core.snapshot import versioned
from . import SavedState, all_ones

log = logging.getLogger(__name__)

PORT_COUNT = 12  # selector (2), data (1), a gap, DMA address (8)
SELECTOR = 0
DATA = 1
DMA_HIGH = 4
DMA_LOW = 8

# Item numbers (QEMU's docs/specs/fw_cfg.rst).
SIGNATURE = 0x00
ID = 0x01
UUID = 0x02
RAM_SIZE = 0x03
NOGRAPHIC = 0x04
NB_CPUS = 0x05
NUMA = 0x0D
BOOT_MENU = 0x0E
MAX_CPUS = 0x0F
FILE_DIR = 0x19
FILE_FIRST = 0x20
FILE_LAST = 0x3FFF  # file selectors stop below the architecture's range
ARCH_LOCAL = 0x8000
ACPI_TABLES = ARCH_LOCAL + 0
SMBIOS_ENTRIES = ARCH_LOCAL + 1
IRQ0_OVERRIDE = ARCH_LOCAL + 2
E820_TABLE = ARCH_LOCAL + 3

ID_TRADITIONAL = 1 << 0  # the port interface
ID_DMA = 1 << 1

DMA_ERROR = 1 << 0
DMA_READ = 1 << 1
DMA_SKIP = 1 << 2
DMA_SELECT = 1 << 3
DMA_WRITE = 1 << 4
DMA_SIGNATURE = int.from_bytes(b"QEMU CFG", "big")
DMA_ACCESS = struct.Struct(">IIQ")

FILE_NAME_SIZE = 56
FILE_ENTRY = struct.Struct(">IHH56s")
ZERO_CHUNK = 64 * 1024  # zero-fill past an item's end this much at a time
STATE_VERSION = 1


class DmaMemory(Protocol):
    """What DMA needs of guest RAM (pyvmm.core.memory.GuestMemory)."""

    def read(self, gpa: int, length: int) -> bytes: ...

    def write(self, gpa: int, data: bytes) -> None: ...

    def check(self, gpa: int, length: int) -> None: ...


class FwCfg:
    """The fw_cfg device; `memory` serves DMA (None: no DMA interface)."""

    def __init__(self, memory: DmaMemory | None = None):
        self._memory = memory
        self._lock = threading.Lock()
        self._items: dict[int, bytes] = {}
        self._files: dict[str, int] = {}  # name -> selector
        self._selector = 0
        self._offset = 0
        self._dma_high = 0
        self.add_item(SIGNATURE, b"QEMU")
        self.add_item(ID, struct.pack("<I", ID_TRADITIONAL | (ID_DMA if memory is not None else 0)))

    # --- VMM side: what the firmware may read ---------------------------------

    def add_item(self, key: int, data: bytes) -> None:
        if not 0 <= key <= 0xFFFF or key == FILE_DIR or FILE_FIRST <= key <= FILE_LAST:
            raise ValueError(f"fw_cfg item {key:#x} is not a plain item")
        self._items[key] = bytes(data)

    def add_file(self, name: str, data: bytes) -> int:
        """Publish `data` as file `name` in the directory; returns its selector."""
        raw = name.encode()
        if not raw or len(raw) >= FILE_NAME_SIZE or b"\0" in raw:
            raise ValueError(f"fw_cfg file name {name!r} must be 1 to {FILE_NAME_SIZE - 1} bytes")
        if name in self._files:
            raise ValueError(f"fw_cfg file {name!r} is already there")
        key = FILE_FIRST + len(self._files)
        if key > FILE_LAST:
            raise ValueError("too many fw_cfg files")
        self._files[name] = key
        self._items[key] = bytes(data)
        return key

    def directory(self) -> bytes:
        """Item FILE_DIR: a big-endian count, then one entry per file, by name."""
        entries = sorted(self._files.items())
        return struct.pack(">I", len(entries)) + b"".join(
            FILE_ENTRY.pack(len(self._items[key]), key, 0, name.encode()) for name, key in entries)

    def _item(self, key: int) -> bytes:
        if key == FILE_DIR:
            return self.directory()
        return self._items.get(key, b"")

    # --- snapshots (pyvmm/core/snapshot.py) ----------------------------------------

    def save_state(self) -> dict:
        """Where the firmware is in its reading: the selected item, the
        offset in it and a DMA address's high half written but not yet its
        low. The items themselves are the VM's config, rebuilt at restore."""
        with self._lock:
            return versioned(STATE_VERSION, selector=self._selector, offset=self._offset, dma_high=self._dma_high)

    def restore_state(self, state: dict) -> None:
        saved = SavedState("FwCfg", state, STATE_VERSION)
        selector = saved.int("selector", 0, 0xFFFF)
        offset = saved.int("offset", 0, 1 << 32)
        dma_high = saved.int("dma_high", 0, 0xFFFF_FFFF)
        with self._lock:
            self._selector, self._offset, self._dma_high = selector, offset, dma_high

    # --- BusDevice -----------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == DATA and size == 1:
                data = self._item(self._selector)
                if self._offset >= len(data):
                    return 0
                self._offset += 1
                return data[self._offset - 1]
            if self._memory is not None and DMA_HIGH <= offset and offset + size <= DMA_HIGH + 8:
                # The signature as the bytes at these ports, in port order.
                raw = DMA_SIGNATURE.to_bytes(8, "big")[offset - DMA_HIGH : offset - DMA_HIGH + size]
                return int.from_bytes(raw, "little")
            if offset == SELECTOR and size == 2:
                return self._selector
            return all_ones(size)

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if offset == SELECTOR and size == 2:
                self._select(value)
            elif self._memory is not None and offset in (DMA_HIGH, DMA_LOW) and size == 4:
                # The register is big-endian: the bytes the guest wrote, in
                # port order, are the number's most significant first.
                half = int.from_bytes(value.to_bytes(4, "little"), "big")
                if offset == DMA_HIGH:
                    self._dma_high = half
                else:
                    address = (self._dma_high << 32) | half
                    self._dma_high = 0
                    self._dma(address)
            # Writes through the data port are refused (items are read-only).

    def _select(self, key: int) -> None:
        self._selector = key & 0xFFFF
        self._offset = 0

    # --- DMA ---------------------------------------------------------------------

    def _dma(self, access: int) -> None:
        memory = self._memory
        try:
            control, length, address = DMA_ACCESS.unpack(memory.read(access, DMA_ACCESS.size))
        except Exception:  # noqa: BLE001 - a structure outside RAM: nothing to report it in
            log.debug("fw_cfg DMA structure at %#x is not in RAM", access)
            return
        error = False
        try:
            if control & DMA_SELECT:
                self._select(control >> 16)
            if control & DMA_READ:
                self._dma_read(address, length)
            elif control & DMA_WRITE:
                error = True  # no item takes writes
            elif control & DMA_SKIP:
                self._offset = min(self._offset + length, 1 << 32)
        except Exception as exc:  # noqa: BLE001 - GuestMemoryError: the buffer is not RAM
            log.debug("fw_cfg DMA of %d bytes at %#x failed: %s", length, address, exc)
            error = True
        try:
            memory.write(access, struct.pack(">I", DMA_ERROR if error else 0))
        except Exception:  # noqa: BLE001 - checked readable above; RAM does not move
            pass

    def _dma_read(self, address: int, length: int) -> None:
        memory = self._memory
        memory.check(address, length)  # all of it RAM, before anything is written
        data = self._item(self._selector)
        start = min(self._offset, len(data))
        chunk = data[start : start + length]
        memory.write(address, chunk)
        done = len(chunk)
        while done < length:  # past the end: zeros, as the port reads
            count = min(ZERO_CHUNK, length - done)
            memory.write(address + done, bytes(count))
            done += count
        self._offset = min(self._offset + length, 1 << 32)
