"""PCI bus 0: configuration mechanism #1, a host bridge, and the device base.

`PciHost` answers the configuration ports (layout.PCI_CONFIG_ADDRESS_PORT,
eight ports: the 32-bit address register at 0xCF8 and the data window
0xCFC..0xCFF). It owns the 32 slots of bus 0, places BARs itself (there is
no firmware to do it), and keeps each device's BARs mapped on the PIO/MMIO
buses exactly while the guest has decoding enabled in COMMAND.

`PciDevice` is a type-0 configuration header with write masks; subclasses
add BARs and capabilities and implement `bar_read` / `bar_write`.

Simplifications: a single bus, single-function devices, no expansion ROM,
no MSI/MSI-X handling here (a device may still publish the capability
through `add_capability`), and a BAR holding address 0 counts as
unassigned and is never mapped.
"""

from __future__ import annotations

import enum
import logging
import threading
from dataclasses import dataclass
from typing import Callable

from ..core import layout
from ..core.bus import Bus, BusError, Claim, IrqLine
from . import SavedState, all_ones
from ..core.snapshot import versioned

log = logging.getLogger(__name__)

CONFIG_SPACE_SIZE = 256
CONFIG_PORT_COUNT = 8  # 0xCF8..0xCFF
SLOTS = 32

# Configuration header offsets.
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09  # prog-if, subclass, class: three bytes
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BAR0 = 0x10
BAR_COUNT = 6
BAR_END = BAR0 + 4 * BAR_COUNT
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
FIRST_CAPABILITY = 0x40  # the type-0 header ends here

COMMAND_IO = 0x0001
COMMAND_MEMORY = 0x0002
COMMAND_BUS_MASTER = 0x0004
COMMAND_PARITY = 0x0040
COMMAND_SERR = 0x0100
COMMAND_INTX_DISABLE = 0x0400
COMMAND_WRITABLE = (
    COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_PARITY | COMMAND_SERR | COMMAND_INTX_DISABLE
)

STATUS_INTERRUPT = 0x0008
STATUS_CAPABILITIES = 0x0010

BAR_IO = 0x1
BAR_MEM_TYPE_64 = 0x4
BAR_MEM_PREFETCH = 0x8

ADDRESS_ENABLE = 0x8000_0000
# Bits the address register keeps: enable, bus, device, function, dword
# register. The reserved bits 30-24 and 1-0 read back as zero.
ADDRESS_MASK = 0x80FF_FFFC

IO_SPACE_END = 0x1_0000
PCI_IO_START = 0xC000  # above every legacy ISA port we emulate

# Host bridge identity: Red Hat's 1b36:0008, the ID set aside for virtual
# PCI host bridges. Linux binds no driver and applies no quirk to it,
# unlike the real Intel bridges VMMs often imitate (8086:1237 triggers the
# 82441 "passive release" and "Natoma" quirks), and a class of host bridge
# passes the x86 probe's sanity check of mechanism #1.
HOST_BRIDGE_VENDOR_ID = 0x1B36
HOST_BRIDGE_DEVICE_ID = 0x0008
CLASS_HOST_BRIDGE = 0x06_00_00
# The subsystem QEMU gives its host bridges: SeaBIOS takes its QEMU path
# (fw_cfg, its own PCI set-up and tables) only when 00:00.0 carries it.
QEMU_SUBSYSTEM_VENDOR_ID = 0x1AF4
QEMU_SUBSYSTEM_ID = 0x1100

STATE_VERSION = 1


class BarKind(enum.Enum):
    IO = "io"
    MEM32 = "mem32"
    MEM64 = "mem64"


@dataclass
class Bar:
    index: int
    size: int
    kind: BarKind
    prefetchable: bool = False
    claim: Claim | None = None  # where it is mapped now, if anywhere

    @property
    def is_io(self) -> bool:
        return self.kind is BarKind.IO


class _BarWindow:
    """What the bus sees for one mapped BAR: forwards to the device."""

    __slots__ = ("device", "index")

    def __init__(self, device: "PciDevice", index: int):
        self.device = device
        self.index = index

    def read(self, offset: int, size: int) -> int:
        return self.device.bar_read(self.index, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.device.bar_write(self.index, offset, size, value)


class PciDevice:
    """A single-function PCI device with a type-0 configuration header.

    `class_code` is the 24-bit class / subclass / programming interface.
    `interrupt_pin` is 0 (none) or 1..4 for INTA..INTD.
    """

    def __init__(
        self,
        vendor_id: int,
        device_id: int,
        class_code: int,
        *,
        revision: int = 0,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        interrupt_pin: int = 0,
        name: str | None = None,
    ):
        if not 0 <= interrupt_pin <= 4:
            raise ValueError(f"interrupt pin {interrupt_pin} is not 0 (none) or 1..4 (INTA..INTD)")
        self.name = name or type(self).__name__
        self.config = bytearray(CONFIG_SPACE_SIZE)
        self._wmask = bytearray(CONFIG_SPACE_SIZE)  # 1 bits: the guest may write
        self.bars: list[Bar | None] = [None] * BAR_COUNT
        self.slot: int | None = None
        self.gsi: int | None = None
        self._host: PciHost | None = None
        self._intx_level = False
        self._last_cap: int | None = None
        self._cap_end = FIRST_CAPABILITY

        self._put(VENDOR_ID, 2, vendor_id)
        self._put(DEVICE_ID, 2, device_id)
        self._put(REVISION_ID, 1, revision)
        self._put(CLASS_PROG, 3, class_code)
        self._put(SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self._put(SUBSYSTEM_ID, 2, subsystem_id)
        self._put(INTERRUPT_PIN, 1, interrupt_pin)
        self.make_writable(COMMAND, 2, COMMAND_WRITABLE)
        self.make_writable(CACHE_LINE_SIZE, 1, 0xFF)
        self.make_writable(LATENCY_TIMER, 1, 0xFF)
        # Scratch for the OS; routing is fixed by slot and pin.
        self.make_writable(INTERRUPT_LINE, 1, 0xFF)

    # --- construction (VMM side) ------------------------------------------

    def add_bar(self, index: int, size: int, kind: BarKind, prefetchable: bool = False) -> None:
        """Declare BAR `index` (a 64-bit BAR also uses `index + 1`)."""
        if self._host is not None:
            raise ValueError("BARs must be declared before the device is added to the bus")
        last = index + 1 if kind is BarKind.MEM64 else index
        if index < 0 or last >= BAR_COUNT:
            raise ValueError(f"BAR {index} does not exist")
        if self.bars[index] is not None or self.bars[last] is not None or self._bar_covering(index):
            raise ValueError(f"BAR {index} is already in use")
        if size & (size - 1) or size < (4 if kind is BarKind.IO else 16):
            raise ValueError(f"BAR size {size:#x} is not a power of two of the minimum size")
        if kind is BarKind.IO and size > 256:
            raise ValueError("an I/O BAR is at most 256 bytes")
        if kind is BarKind.MEM32 and size > 1 << 31:
            raise ValueError("a 32-bit BAR is at most 2 GiB")
        if kind is BarKind.IO and prefetchable:
            raise ValueError("I/O BARs are never prefetchable")
        self.bars[index] = Bar(index, size, kind, prefetchable)
        # The low bits describe the BAR and are read-only; the address bits
        # below the size read 0, which is how sizing works.
        offset = BAR0 + 4 * index
        if kind is BarKind.IO:
            self._put(offset, 4, BAR_IO)
            self.make_writable(offset, 4, ~(size - 1) & 0xFFFF_FFFC)
        else:
            flags = (BAR_MEM_TYPE_64 if kind is BarKind.MEM64 else 0) | (BAR_MEM_PREFETCH if prefetchable else 0)
            self._put(offset, 4, flags)
            self.make_writable(offset, 4, ~(size - 1) & 0xFFFF_FFF0)
            if kind is BarKind.MEM64:
                self.make_writable(offset + 4, 4, (~(size - 1) >> 32) & 0xFFFF_FFFF)

    def add_capability(self, cap_id: int, body: bytes, writable: bytes | None = None) -> int:
        """Append a capability (ID, next pointer, then `body`); returns its offset.

        `writable` gives per-byte write masks for `body`.
        """
        offset = (self._cap_end + 3) & ~3
        end = offset + 2 + len(body)
        if end > CONFIG_SPACE_SIZE:
            raise ValueError("configuration space is full")
        if writable is not None and len(writable) != len(body):
            raise ValueError("the write mask must be as long as the capability body")
        self.config[offset] = cap_id & 0xFF
        self.config[offset + 1] = 0
        self.config[offset + 2 : end] = body
        if writable is not None:
            self._wmask[offset + 2 : end] = writable
        if self._last_cap is None:
            self.config[CAPABILITIES_POINTER] = offset
            self._put(STATUS, 2, self._get(STATUS, 2) | STATUS_CAPABILITIES)
        else:
            self.config[self._last_cap + 1] = offset
        self._last_cap = offset
        self._cap_end = end
        return offset

    def make_writable(self, offset: int, size: int, mask: int) -> None:
        """Let the guest write the `mask` bits of the `size` bytes at `offset`."""
        for i in range(size):
            self._wmask[offset + i] = (mask >> (8 * i)) & 0xFF

    # --- to be overridden ----------------------------------------------------

    def bar_read(self, index: int, offset: int, size: int) -> int:
        return all_ones(size)

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        pass

    def config_written(self, offset: int, size: int) -> None:
        """Called after the guest wrote configuration space (for subclasses)."""

    # --- device side ---------------------------------------------------------

    def set_intx(self, asserted: bool) -> None:
        """Drive this device's INTx pin (level-triggered, shared)."""
        host = self._host
        if host is None:
            self._intx_level = bool(asserted)
            self._refresh_intx()
            return
        with host._lock:
            self._intx_level = bool(asserted)
            self._refresh_intx()

    def bar_address(self, index: int) -> int | None:
        """Where BAR `index` is mapped now, or None."""
        bar = self.bars[index] if 0 <= index < BAR_COUNT else None
        return bar.claim.base if bar is not None and bar.claim is not None else None

    @property
    def command(self) -> int:
        return self._get(COMMAND, 2)

    # --- configuration space (PciHost holds its lock) ------------------------

    def config_read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4) or offset < 0 or offset + size > CONFIG_SPACE_SIZE:
            return all_ones(size)
        return self._get(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4) or offset < 0 or offset + size > CONFIG_SPACE_SIZE:
            return
        for i in range(size):
            mask = self._wmask[offset + i]
            byte = (value >> (8 * i)) & 0xFF
            self.config[offset + i] = (self.config[offset + i] & ~mask) | (byte & mask)
        end = offset + size
        if offset < BAR_END and end > COMMAND:  # COMMAND or a BAR changed
            if self._host is not None:
                self._host._update_mappings(self)
            self._refresh_intx()
        self.config_written(offset, size)

    # --- internals -----------------------------------------------------------

    def _get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset : offset + size], "little")

    def _put(self, offset: int, size: int, value: int) -> None:
        self.config[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def _bar_covering(self, index: int) -> bool:
        """Whether `index` is the upper half of a 64-bit BAR."""
        below = self.bars[index - 1] if index > 0 else None
        return below is not None and below.kind is BarKind.MEM64

    def _bar_register_address(self, bar: Bar) -> int:
        offset = BAR0 + 4 * bar.index
        if bar.is_io:
            return self._get(offset, 4) & ~0x3
        address = self._get(offset, 4) & ~0xF
        if bar.kind is BarKind.MEM64:
            address |= self._get(offset + 4, 4) << 32
        return address

    def _refresh_intx(self) -> None:
        # STATUS shows the pin's state even while INTx-disable masks it.
        status = self._get(STATUS, 2)
        status = status | STATUS_INTERRUPT if self._intx_level else status & ~STATUS_INTERRUPT
        self._put(STATUS, 2, status)
        if self._host is not None and self.gsi is not None:
            effective = self._intx_level and not self.command & COMMAND_INTX_DISABLE
            self._host._drive_intx(self, effective)


def _sizing_pattern(bar: Bar) -> int:
    """What a BAR's address reads after all ones were written to it."""
    if bar.is_io:
        return 0xFFFF_FFFC & ~(bar.size - 1)
    width = 64 if bar.kind is BarKind.MEM64 else 32
    return ((1 << width) - 1) & ~(bar.size - 1) & ~0xF


class HostBridge(PciDevice):
    def __init__(self, qemu_subsystem: bool = False) -> None:
        subsystem = (QEMU_SUBSYSTEM_VENDOR_ID, QEMU_SUBSYSTEM_ID) if qemu_subsystem else (0, 0)
        super().__init__(HOST_BRIDGE_VENDOR_ID, HOST_BRIDGE_DEVICE_ID, CLASS_HOST_BRIDGE, name="host-bridge",
                         subsystem_vendor_id=subsystem[0], subsystem_id=subsystem[1])


class PciHost:
    """Configuration mechanism #1 and the devices of bus 0.

    Register it on the PIO bus at layout.PCI_CONFIG_ADDRESS_PORT with
    CONFIG_PORT_COUNT ports. `irq_for_gsi(gsi)` gives the interrupt line of
    a GSI; it is called once per GSI that some device's INTx pin uses.
    """

    def __init__(self, pio_bus: Bus, mmio_bus: Bus, irq_for_gsi: Callable[[int], IrqLine], *,
                 qemu_subsystem: bool = False):
        self._pio = pio_bus
        self._mmio = mmio_bus
        self._irq_for_gsi = irq_for_gsi
        # One lock for configuration cycles and INTx so a COMMAND write and
        # a device's set_intx() cannot interleave.
        self._lock = threading.RLock()
        self._address = 0
        self._slots: list[PciDevice | None] = [None] * SLOTS
        self._io_next = PCI_IO_START
        self._mmio_next = layout.PCI_MMIO_START
        self._lines: dict[int, IrqLine] = {}
        self._asserting: dict[int, set[int]] = {}  # GSI -> slots driving it
        self._reported: set[tuple] = set()
        self.host_bridge = HostBridge(qemu_subsystem)
        self.add(self.host_bridge, slot=0)

    # --- VMM side ------------------------------------------------------------

    def add(self, device: PciDevice, slot: int | None = None, enable_decode: bool = True) -> int:
        """Plug `device` in, place its BARs and route its INTx pin; returns the slot.

        With `enable_decode` the device starts with I/O and memory decoding
        on, as firmware would leave it; otherwise the guest turns it on.
        """
        with self._lock:
            if device._host is not None:
                raise ValueError(f"{device.name} is already on a PCI bus")
            if slot is None:
                slot = next((s for s in range(1, SLOTS) if self._slots[s] is None), None)
                if slot is None:
                    raise ValueError("no free PCI slot")
            elif not 0 <= slot < SLOTS or self._slots[slot] is not None:
                raise ValueError(f"PCI slot {slot} is not free")
            self._place_bars(device)
            self._slots[slot] = device
            device.slot = slot
            device._host = self
            pin = device.config[INTERRUPT_PIN]
            if pin:
                gsi = layout.pci_intx_gsi(slot, pin - 1)
                device.gsi = gsi
                device.config[INTERRUPT_LINE] = gsi
                if gsi not in self._lines:
                    self._lines[gsi] = self._irq_for_gsi(gsi)
                    self._asserting[gsi] = set()
            if enable_decode:
                command = device.command
                if any(b is not None and b.is_io for b in device.bars):
                    command |= COMMAND_IO
                if any(b is not None and not b.is_io for b in device.bars):
                    command |= COMMAND_MEMORY
                device._put(COMMAND, 2, command)
            self._update_mappings(device)
            device._refresh_intx()
            return slot

    def device(self, slot: int) -> PciDevice | None:
        return self._slots[slot] if 0 <= slot < SLOTS else None

    # --- snapshot (pyvmm/core/snapshot.py) ---------------------------------------

    def save_state(self) -> dict:
        """The address register and, for each device by slot, its identity,
        its whole configuration space (COMMAND, BARs as the guest placed
        them, capabilities) and its INTx pin's level. A device's own
        registers beyond its configuration space are its own to save."""
        with self._lock:
            devices = [{"slot": device.slot, "vendor": device._get(VENDOR_ID, 2), "device": device._get(DEVICE_ID, 2),
                        "config": bytes(device.config).hex(), "intx": device._intx_level}
                       for device in self._slots if device is not None]
            return versioned(STATE_VERSION, address=self._address, devices=devices)

    def restore_state(self, state: dict) -> None:
        """On a bus built with the same devices in the same slots: each takes
        back its configuration space, its BARs are mapped where the guest
        had put them and its INTx line is driven as it was."""
        saved = SavedState("PciHost", state, STATE_VERSION)
        address = saved.int("address", 0, ADDRESS_MASK)
        if address & ~ADDRESS_MASK:
            saved.fail(f"address {address:#x} sets reserved bits")
        plan = {}
        for entry in saved.list("devices", SLOTS):
            device_state = SavedState("PciHost", {"version": STATE_VERSION, **entry}
                                      if isinstance(entry, dict) else {"version": STATE_VERSION}, STATE_VERSION)
            slot = device_state.int("slot", 0, SLOTS - 1)
            device = self._slots[slot]
            ids = (device_state.int("vendor", 0, 0xFFFF), device_state.int("device", 0, 0xFFFF))
            if device is None or (device._get(VENDOR_ID, 2), device._get(DEVICE_ID, 2)) != ids:
                saved.fail(f"slot {slot} held {ids[0]:04x}:{ids[1]:04x}; this VM has "
                           f"{'nothing' if device is None else device.name} there")
            if slot in plan:
                saved.fail(f"slot {slot} is saved twice")
            plan[slot] = (device_state.bytes("config", CONFIG_SPACE_SIZE), device_state.bool("intx"))
        missing = [device.name for device in self._slots if device is not None and device.slot not in plan]
        if missing:
            saved.fail(f"this VM has device(s) the snapshot lacks: {', '.join(missing)}")
        with self._lock:
            self._address = address
            for slot, (config, intx) in plan.items():
                device = self._slots[slot]
                device.config[:] = config
                device._intx_level = intx
                self._update_mappings(device)
                device._refresh_intx()

    # --- BusDevice: the configuration ports ------------------------------------

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == 0 and size == 4:
                return self._address
            if 4 <= offset < 8:
                target = self._config_target(offset - 4, size)
                if target is not None:
                    device, register = target
                    return device.config_read(register, size)
            return all_ones(size)

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if offset == 0:
                # Only a dword write latches the address: Linux's probe for
                # mechanism #1 writes a byte to 0xCFB first and expects the
                # address register to be unaffected.
                if size == 4:
                    self._address = value & ADDRESS_MASK
                return
            if 4 <= offset < 8:
                target = self._config_target(offset - 4, size)
                if target is not None:
                    device, register = target
                    device.config_write(register, size, value)

    def _config_target(self, lane: int, size: int) -> tuple[PciDevice, int] | None:
        address = self._address
        if not address & ADDRESS_ENABLE:
            return None
        # Accesses must be naturally aligned within the data window.
        if size not in (1, 2, 4) or lane % size or lane + size > 4:
            return None
        bus = (address >> 16) & 0xFF
        slot = (address >> 11) & 0x1F
        function = (address >> 8) & 0x7
        if bus != 0 or function != 0:
            return None
        device = self._slots[slot]
        if device is None:
            return None
        return device, (address & 0xFC) + lane

    # --- BAR placement and mapping -------------------------------------------

    def _place_bars(self, device: PciDevice) -> None:
        # Largest first, so that natural alignment wastes little space.
        bars = sorted((b for b in device.bars if b is not None), key=lambda b: -b.size)
        placed: list[tuple[Bar, int]] = []
        io_next, mmio_next = self._io_next, self._mmio_next
        for bar in bars:
            if bar.is_io:
                base = (io_next + bar.size - 1) & ~(bar.size - 1)
                io_next = base + bar.size
                if io_next > IO_SPACE_END:
                    raise ValueError(f"{device.name}: PCI I/O space exhausted")
            else:
                base = (mmio_next + bar.size - 1) & ~(bar.size - 1)
                mmio_next = base + bar.size
                if mmio_next > layout.PCI_MMIO_END:
                    raise ValueError(f"{device.name}: PCI MMIO window exhausted")
            placed.append((bar, base))
        self._io_next, self._mmio_next = io_next, mmio_next
        for bar, base in placed:
            offset = BAR0 + 4 * bar.index
            low_flags = device._get(offset, 4) & (0x3 if bar.is_io else 0xF)
            device._put(offset, 4, (base & 0xFFFF_FFFF) | low_flags)
            if bar.kind is BarKind.MEM64:
                device._put(offset + 4, 4, base >> 32)

    def _update_mappings(self, device: PciDevice, retry: bool = True) -> None:
        """Make the bus mappings of `device` match its COMMAND and BARs."""
        command = device.command
        released = False
        for bar in device.bars:
            if bar is None:
                continue
            enabled = command & (COMMAND_IO if bar.is_io else COMMAND_MEMORY)
            address = device._bar_register_address(bar)
            # All address bits set is what firmware writes to size a BAR
            # (decoding often left on): not a place, so nothing is mapped.
            sizing = address == _sizing_pattern(bar)
            want = address if enabled and address and not sizing else None
            have = bar.claim.base if bar.claim is not None else None
            if want == have:
                continue
            bus = self._pio if bar.is_io else self._mmio
            if bar.claim is not None:
                bus.unregister(bar.claim)
                bar.claim = None
                released = True
            if want is None:
                continue
            try:
                bar.claim = bus.register(want, bar.size, _BarWindow(device, bar.index), f"{device.name}.bar{bar.index}")
            except BusError as error:
                # A guest moving a BAR onto another device or out of the
                # address space gets no mapping (the BAR decodes nothing).
                key = (device.slot, bar.index, want)
                if key not in self._reported and len(self._reported) < 1024:
                    self._reported.add(key)
                    log.info("PCI %02x.0 BAR%d not mapped (yet): %s", device.slot or 0, bar.index, error)
        if released and retry:
            # Firmware moves BARs one at a time: a BAR refused because another
            # device's BAR was still in the way gets its place once that moved.
            for other in self._slots:
                if other is not None and other is not device:
                    self._update_mappings(other, retry=False)

    # --- INTx ------------------------------------------------------------------

    def _drive_intx(self, device: PciDevice, asserted: bool) -> None:
        # Several slots share each GSI: the line is the OR of their pins.
        gsi = device.gsi
        if gsi is None or device.slot is None:
            return
        drivers = self._asserting[gsi]
        before = bool(drivers)
        if asserted:
            drivers.add(device.slot)
        else:
            drivers.discard(device.slot)
        if bool(drivers) != before:
            self._lines[gsi].set_level(bool(drivers))
