"""The Xen platform PCI device (5853:0001) and its fixed I/O ports.

A Xen HVM guest finds its PV drivers' home here:

- BAR0, 256 bytes of I/O: byte 0 holds the platform flags; writing 1 to
  byte 4 unplugs the emulated disks and NICs (an old SUSE protocol); a byte
  written at 8 unplugs disks (1) or NICs (2) and is otherwise a log character.
- BAR1, 16 MiB of prefetchable 32-bit memory: unbacked address space in
  which Linux places the grant table frames (and the domain maps them there
  with memslots); other accesses read 0 and are ignored.
- INTA: the event-channel callback when the guest asks for the GSI/PCI INTx
  delivery method (`set_callback_level`).

The fixed ports at layout.XEN_PLATFORM_IO_PORT (`fixed_ports()`, FIXED_PORT_COUNT
ports) carry the unplug protocol Linux's platform-pci-unplug speaks:

    inw  0x10  magic 0x49d2          inb  0x12  protocol version (1)
    outw 0x12  product number        outl 0x10  driver version
    outw 0x10  unplug mask           outb 0x12  log character
    inb/outb 0x10  platform flags

Log characters are collected into lines for `on_log`; unplug masks go to
`on_unplug` (UNPLUG_* bits). Any other access reads all-ones or is ignored.
The guest decides what and how often it writes, so a line is cut at
LOG_LINE_MAX bytes, its control characters (terminal escapes among them)
are shown escaped, and the default sinks log at a limited rate.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from pyvmm.core.ratelimit import DEFAULT_LOG_RATE, LogRate
from pyvmm.devices import all_ones
from pyvmm.devices.pci import BarKind, PciDevice
from pyvmm.core.snapshot import SnapshotError, check_version, natural, versioned

log = logging.getLogger(__name__)

VENDOR_ID = 0x5853  # XenSource
DEVICE_ID = 0x0001
CLASS_CODE = 0xFF_80_00  # "unassigned class", subclass 0x80, prog-if 0
REVISION = 1
IO_BAR = 0
IO_BAR_SIZE = 0x100
MMIO_BAR = 1
MMIO_BAR_SIZE = 16 << 20

FIXED_PORT_COUNT = 4  # 0x10..0x13
MAGIC = 0x49D2
PROTOCOL_VERSION = 1

# Unplug mask bits (outw 0x10).
UNPLUG_IDE_SCSI_DISKS = 1 << 0
UNPLUG_ALL_NICS = 1 << 1
UNPLUG_AUX_IDE_DISKS = 1 << 2  # IDE disks except the primary master
UNPLUG_NVME_DISKS = 1 << 3

PLATFORM_FLAG_ROM_LOCK = 1  # the only platform flag that reads back

STATE_VERSION = 1
LOG_LINE_MAX = 512  # a longer "line" is cut here and goes on as the next one
_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}


class XenPlatformDevice(PciDevice):
    def __init__(
        self,
        *,
        on_unplug: Callable[[int], None] | None = None,
        on_log: Callable[[str], None] | None = None,
        log_rate: LogRate = DEFAULT_LOG_RATE,
    ):
        super().__init__(
            VENDOR_ID,
            DEVICE_ID,
            CLASS_CODE,
            revision=REVISION,
            subsystem_vendor_id=VENDOR_ID,
            subsystem_id=DEVICE_ID,
            interrupt_pin=1,
            name="xen-platform",
        )
        self.add_bar(IO_BAR, IO_BAR_SIZE, BarKind.IO)
        self.add_bar(MMIO_BAR, MMIO_BAR_SIZE, BarKind.MEM32, prefetchable=True)
        self._limited = log_rate.limited(log)  # lines whose rate the guest sets
        self._on_unplug = on_unplug or self._log_unplug
        self._on_log = on_log or self._log_line
        self._lock = threading.Lock()  # vCPUs may write log bytes at once
        self._log_buffer = bytearray()
        self.platform_flags = 0
        self.product_number: int | None = None
        self.driver_version: int | None = None
        self.unplugged = 0  # every unplug bit the guest has asked for
        self._fixed = _FixedPorts(self)


    def _log_line(self, line: str) -> None:
        self._limited.info("guest PV driver: %s", line)

    def _log_unplug(self, mask: int) -> None:
        self._limited.info("guest unplugged emulated devices (mask %#x)", mask)

    def fixed_ports(self) -> "_FixedPorts":
        """The BusDevice to register at layout.XEN_PLATFORM_IO_PORT."""
        return self._fixed

    def reset(self) -> None:
        """Machine reset: flags cleared, a partial log line dropped."""
        with self._lock:
            self._log_buffer.clear()
        self.platform_flags = 0

    def set_callback_level(self, asserted: bool) -> None:
        """Drive INTA for the event-channel callback (GSI/INTx method)."""
        self.set_intx(asserted)

    # --- snapshot (pyvmm/core/snapshot.py) --------------------------------------------

    def save_state(self) -> dict:
        """Its registers, what the guest unplugged and a log line it has not
        finished. Its PCI config space (BARs as placed, INTx) is PciHost's."""
        with self._lock:
            partial_line = self._log_buffer.hex()
        return versioned(STATE_VERSION, platform_flags=self.platform_flags, product_number=self.product_number,
                         driver_version=self.driver_version, unplugged=self.unplugged, log_buffer=partial_line)

    def restore_state(self, state: dict) -> None:
        """Unplugging is not done again: what it caused is in the restored
        VM already (the snapshot holds the guest's view of it)."""
        check_version(state, "XenPlatformDevice", STATE_VERSION)
        flags, product, version, unplugged, text = (state.get(key) for key in (
            "platform_flags", "product_number", "driver_version", "unplugged", "log_buffer"))
        try:
            line = bytes.fromhex(text) if isinstance(text, str) else None
        except ValueError:
            line = None
        if (not natural(flags, PLATFORM_FLAG_ROM_LOCK + 1) or not natural(unplugged, 1 << 16)
                or not (product is None or natural(product, 1 << 16)) or not (version is None or natural(version, 1 << 32))
                or line is None or len(line) >= LOG_LINE_MAX):
            raise SnapshotError(f"XenPlatformDevice: bad state {state!r:.200}")
        with self._lock:
            self._log_buffer[:] = line
        self.platform_flags, self.product_number, self.driver_version, self.unplugged = flags, product, version, unplugged

    # --- guest-facing behaviour shared by both register windows -------------

    def _unplug(self, mask: int) -> None:
        self.unplugged |= mask
        self._on_unplug(mask)

    def _log_byte(self, byte: int) -> None:
        with self._lock:
            if byte == 0x0A or len(self._log_buffer) >= LOG_LINE_MAX:
                line = self._log_buffer.decode("utf-8", "replace").rstrip("\r").translate(_ESCAPES)
                self._log_buffer.clear()
                # A cut-off line keeps the byte that did not fit.
                if byte != 0x0A:
                    self._log_buffer.append(byte)
            else:
                self._log_buffer.append(byte)
                return
        self._on_log(line)

    # --- BAR0 and BAR1 ----------------------------------------------------------

    def bar_read(self, index: int, offset: int, size: int) -> int:
        if index == MMIO_BAR:
            return 0
        if index == IO_BAR and offset == 0 and size == 1:
            return self.platform_flags
        return all_ones(size)

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        if index != IO_BAR or size != 1:
            return
        value &= 0xFF
        if offset == 0:
            self.platform_flags = value & PLATFORM_FLAG_ROM_LOCK
        elif offset == 4:
            if value == 1:
                self._unplug(UNPLUG_IDE_SCSI_DISKS | UNPLUG_ALL_NICS)
        elif offset == 8:
            if value == 1:
                self._unplug(UNPLUG_IDE_SCSI_DISKS)
            elif value == 2:
                self._unplug(UNPLUG_ALL_NICS)
            else:
                self._log_byte(value)


class _FixedPorts:
    """Ports 0x10..0x13; offsets are relative to layout.XEN_PLATFORM_IO_PORT."""

    def __init__(self, device: XenPlatformDevice):
        self._device = device

    def read(self, offset: int, size: int) -> int:
        if size == 2 and offset == 0:
            return MAGIC
        if size == 1 and offset == 0:
            return self._device.platform_flags
        if size == 1 and offset == 2:
            return PROTOCOL_VERSION
        return all_ones(size)

    def write(self, offset: int, size: int, value: int) -> None:
        device = self._device
        if size == 1 and offset == 0:
            device.platform_flags = value & PLATFORM_FLAG_ROM_LOCK
        elif size == 1 and offset == 2:
            device._log_byte(value & 0xFF)
        elif size == 2 and offset == 0:
            device._unplug(value & 0xFFFF)
        elif size == 2 and offset == 2:
            device.product_number = value & 0xFFFF
            log.debug("xen-platform: PV driver product %#x", device.product_number)
        elif size == 4 and offset == 0:
            device.driver_version = value & 0xFFFF_FFFF
            log.debug("xen-platform: PV driver version %#x", device.driver_version)
