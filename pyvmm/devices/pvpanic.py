"""The pvpanic ISA device (layout.PVPANIC_PORT): a guest reports its panics here.

One byte-wide I/O port. Reading it returns the events this device accepts;
the guest writes the event it is reporting:

    bit 0  PANICKED      the guest panicked and will not recover by itself
    bit 1  CRASH_LOADED  the guest panicked and is starting its crash kernel

The DSDT announces it as an ACPI device with _HID "QEMU0001" and the port in
its _CRS, where Linux's pvpanic-mmio driver finds it (pyvmm/boot/acpi.py).
What an event does is the machine's business: `on_event(events)` receives
the accepted bits of every write that carries any.
"""

from __future__ import annotations

from typing import Callable

from . import all_ones

PANICKED = 1 << 0
CRASH_LOADED = 1 << 1
SUPPORTED_EVENTS = PANICKED | CRASH_LOADED


class PvPanic:
    def __init__(self, on_event: Callable[[int], None]):
        self._on_event = on_event

    def read(self, offset: int, size: int) -> int:
        if offset != 0 or size < 1:
            return all_ones(size)
        return (all_ones(size) & ~0xFF) | SUPPORTED_EVENTS

    def write(self, offset: int, size: int, value: int) -> None:
        # Only the port's own byte lane; bits the device does not announce
        # are ignored, as the protocol asks.
        if offset != 0 or size < 1:
            return
        events = value & SUPPORTED_EVENTS
        if events:
            self._on_event(events)
