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
    if size == 1:  # nearly every access to such a device: no loop
        return read_byte(offset) & 0xFF
    value = 0
    for i in range(access_size(size)):
        value |= (read_byte(offset + i) & 0xFF) << (8 * i)
    return value


def write_bytewise(write_byte: Callable[[int, int], None], offset: int, size: int, value: int) -> None:
    """Write `size` consecutive byte registers starting at `offset`, low byte first."""
    if size == 1:
        write_byte(offset, value & 0xFF)
        return
    for i in range(access_size(size)):
        write_byte(offset + i, (value >> (8 * i)) & 0xFF)


# --- reading a saved state (pyvmm/core/snapshot.py) --------------------------------------


class SavedState:
    """A device's saved state, read field by field: each read checks the
    field's type and range and raises SnapshotError naming the device and
    the field, so a damaged or foreign state never reaches a register."""

    def __init__(self, kind: str, state: dict, newest: int):
        from ..core.snapshot import check_version

        self.kind = kind
        self.version = check_version(state, kind, newest)
        self._state = state

    def fail(self, message: str):
        from ..core.snapshot import SnapshotError

        raise SnapshotError(f"{self.kind}: {message}")

    def _get(self, key: str):
        if key not in self._state:
            self.fail(f"the saved state has no {key!r}")
        return self._state[key]

    def int(self, key: str, low: int, high: int) -> int:
        value = self._get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            self.fail(f"{key} is {value!r}, not a whole number from {low} to {high}")
        return value

    def optional_int(self, key: str, low: int, high: int) -> int | None:
        return None if self._get(key) is None else self.int(key, low, high)

    def bool(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            self.fail(f"{key} is {value!r}, not true or false")
        return value

    def float(self, key: str) -> float:
        value = self._get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value or abs(value) > 1e12:
            self.fail(f"{key} is {value!r}, not a number")
        return float(value)

    def optional_float(self, key: str) -> float | None:
        return None if self._get(key) is None else self.float(key)

    def bytes(self, key: str, length: int | None = None, maximum: int | None = None) -> bytes:
        value = self._get(key)
        try:
            data = bytes.fromhex(value) if isinstance(value, str) else None
        except ValueError:
            data = None
        if data is None:
            self.fail(f"{key} is not hex text")
        if length is not None and len(data) != length:
            self.fail(f"{key} has {len(data)} bytes, not {length}")
        if maximum is not None and len(data) > maximum:
            self.fail(f"{key} has {len(data)} bytes, more than {maximum}")
        return data

    def octets(self, key: str, count: int) -> list[int]:
        """A list of exactly `count` numbers from 0 to 255 (register bytes)."""
        value = self._get(key)
        if not isinstance(value, list) or len(value) != count or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 0xFF for v in value):
            self.fail(f"{key} is {value!r:.80}, not {count} bytes")
        return list(value)

    def list(self, key: str, maximum: int) -> list:
        value = self._get(key)
        if not isinstance(value, list) or len(value) > maximum:
            self.fail(f"{key} is not a list of at most {maximum} entries")
        return value
