"""The host side of the guest console: where output goes, where input comes from.

Output goes to stdout, a file or nowhere, and is watched for the --expect
pattern. Input is read from stdin; on a terminal, stdin is put in raw mode so
every key reaches the guest, and the escape sequence Ctrl-A x quits
(Ctrl-A Ctrl-A sends a literal Ctrl-A), as in other VMMs.
"""

from __future__ import annotations

import os
import re
import sys
import termios
import threading
import time
import tty
from typing import BinaryIO, Callable

ESCAPE_KEY = 0x01  # Ctrl-A
QUIT_KEY = ord("x")
EXPECT_WINDOW = 64 * 1024  # how much recent output a pattern may span


class ExpectWatcher:
    """Watches a byte stream for a regular expression, across write boundaries."""

    def __init__(self, pattern: re.Pattern[bytes], on_match: Callable[[], None]):
        self.pattern = pattern
        self.on_match = on_match
        self.matched = False
        self._tail = b""

    def feed(self, data: bytes) -> None:
        if self.matched:
            return
        self._tail = (self._tail + data)[-EXPECT_WINDOW:]
        # Only complete lines (and the unfinished last one) are searched; a
        # match fires once.
        if self.pattern.search(self._tail):
            self.matched = True
            self.on_match()


class ConsoleOutput:
    """A thread-safe sink for guest console bytes."""

    def __init__(self, stream: BinaryIO | None, watchers: list[ExpectWatcher] | None = None):
        self._stream = stream
        self._watchers = list(watchers or ())
        self._lock = threading.Lock()
        # For a diagnosis: bytes handed to the stream, and when (monotonic) last.
        self.written = 0
        self.last_write: float | None = None

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._stream is not None:
                try:
                    self._stream.write(data)
                    self._stream.flush()
                    self.written += len(data)
                    self.last_write = time.monotonic()
                except (BrokenPipeError, ValueError):
                    self._stream = None  # the reader went away; keep the guest running
            for watcher in self._watchers:
                watcher.feed(data)

    def close(self) -> None:
        with self._lock:
            if self._stream is not None and self._stream not in (sys.stdout.buffer,):
                self._stream.close()
            self._stream = None


class EscapeFilter:
    """Strips the Ctrl-A escape sequences out of terminal input."""

    def __init__(self, on_quit: Callable[[], None]):
        self.on_quit = on_quit
        self._escaped = False

    def filter(self, data: bytes) -> bytes:
        out = bytearray()
        for byte in data:
            if self._escaped:
                self._escaped = False
                if byte == QUIT_KEY:
                    self.on_quit()
                    break
                if byte == ESCAPE_KEY:
                    out.append(byte)
                # any other key after Ctrl-A is swallowed
            elif byte == ESCAPE_KEY:
                self._escaped = True
            else:
                out.append(byte)
        return bytes(out)


class RawTerminal:
    """Puts a terminal into raw mode for the guest and always restores it."""

    def __init__(self, fd: int):
        self.fd = fd
        self._saved: list | None = None

    def __enter__(self) -> "RawTerminal":
        if os.isatty(self.fd):
            self._saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd)
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None
