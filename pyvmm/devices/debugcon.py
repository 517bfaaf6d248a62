"""The 0xE9 debug console (layout.DEBUGCON_PORT).

Xen guests print early messages by writing bytes to this port. Reading it
returns 0xE9, the value Bochs and QEMU return, which is how guests detect
that the port is there. Register it with one port.
"""

from __future__ import annotations

from typing import Callable

from . import all_ones

DETECT_VALUE = 0xE9


class DebugCon:
    def __init__(self, output: Callable[[bytes], None]):
        self._output = output

    def read(self, offset: int, size: int) -> int:
        if offset != 0 or size < 1:
            return all_ones(size)
        return (all_ones(size) & ~0xFF) | DETECT_VALUE

    def write(self, offset: int, size: int, value: int) -> None:
        # Only the byte lane of the port itself; wider accesses spill into
        # ports that are not ours.
        if offset == 0 and size >= 1:
            self._output(bytes((value & 0xFF,)))
