"""Read-only memory on the MMIO bus: the firmware image at the top of 4 GiB.

KVM serves reads from a read-only memory slot itself; a guest write leaves
KVM as an MMIO exit and lands here, where it is dropped, as ROM drops it.
Reads arrive only if the slot is missing, and are answered from the image.
"""

from __future__ import annotations

from . import access_size


class Rom:
    def __init__(self, data: bytes):
        self._data = bytes(data)

    def read(self, offset: int, size: int) -> int:
        size = access_size(size)
        chunk = self._data[offset : offset + size] if offset >= 0 else b""
        return int.from_bytes(chunk.ljust(size, b"\xff"), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        pass  # ROM: the write goes nowhere
