"""Platform devices: one module per device, none of them knows about KVM.

Each device is a small state machine behind the `pyvmm.core.bus.BusDevice`
protocol (`read(offset, size)` / `write(offset, size, value)`), with its
interrupt line, output sink and power requests injected by the machine.
Guest accesses are hostile: any offset, any size, any value, and a device
must answer them without raising.

The functions below serve devices whose registers are one byte wide (UART,
RTC, i8042, ...). A wider access to such a device is split into byte
accesses at consecutive offsets, the way an ISA bus cycles an 8-bit device.
"""

from __future__ import annotations

from typing import Callable

# Bus accesses are at most 8 bytes (a 64-bit MMIO access).
MAX_ACCESS = 8


def access_size(size: int) -> int:
    """Clamp a guest-supplied access size into 0..MAX_ACCESS."""
    return max(0, min(int(size), MAX_ACCESS))


def all_ones(size: int) -> int:
    """What an access of `size` bytes reads from nothing."""
    return (1 << (8 * access_size(size))) - 1


def read_bytewise(read_byte: Callable[[int], int], offset: int, size: int) -> int:
    """Read `size` consecutive byte registers starting at `offset`."""
    value = 0
    for i in range(access_size(size)):
        value |= (read_byte(offset + i) & 0xFF) << (8 * i)
    return value


def write_bytewise(write_byte: Callable[[int, int], None], offset: int, size: int, value: int) -> None:
    """Write `size` consecutive byte registers starting at `offset`, low byte first."""
    for i in range(access_size(size)):
        write_byte(offset + i, (value >> (8 * i)) & 0xFF)
