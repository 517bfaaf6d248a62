"""The 0xE9 debug console (layout.DEBUGCON_PORT).

Xen guests print early messages by writing bytes to this port. Reading it
returns 0xE9, the value Bochs and QEMU return, which is how guests detect
that the port is there. Register it with one port.
"""

from __future__ import annotations

import threading
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


class LineLog:
    """An output sink that logs what firmware prints on its debug port, a
    line at a time, for at most `max_lines` lines per boot (the firmware is
    guest code: it must not fill the log). `on_line` sees every complete
    line (decoded, stripped), including those no longer logged."""

    MAX_LINE = 512

    def __init__(self, logger, prefix: str, *, max_lines: int = 5000,
                 on_line: Callable[[str], None] | None = None):
        self._logger = logger
        self._prefix = prefix
        self._max_lines = max_lines
        self._on_line = on_line
        self._buffer = bytearray()
        self._lock = threading.Lock()  # vCPU threads print at once
        self.lines = 0

    def __call__(self, data: bytes) -> None:
        with self._lock:
            self._take(data)

    def _take(self, data: bytes) -> None:
        for byte in data:
            if byte == 0x0A or len(self._buffer) >= self.MAX_LINE:
                self._line()
            elif byte != 0x0D:
                self._buffer.append(byte)

    def _line(self) -> None:
        text = self._buffer.decode("ascii", "replace").rstrip()
        self._buffer.clear()
        self.lines += 1
        if self.lines < self._max_lines:
            self._logger.info("%s%s", self._prefix, text)
        elif self.lines == self._max_lines:
            self._logger.info("%s(further output not logged)", self._prefix)
        if self._on_line is not None:
            self._on_line(text)
