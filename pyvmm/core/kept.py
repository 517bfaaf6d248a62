"""Files and listening sockets opened once per run and kept across reboots.

A guest reboot builds a fresh Machine (runner.py), which opens /dev/kvm, the
kernel, the disks and the TAP devices again and listens on the xenstore and
gdb sockets again. Under the sandbox (pyvmm/sandbox.py) the VMM may no
longer open files or create sockets once the guest runs, so while `KEPT` is
active the first boot's opens are remembered and every later boot gets a
duplicate of the same descriptor (`os.dup`: the same open file, so a
duplicate's file offset is shared; callers that read sequentially seek
first). Asking for something that was not opened before the lockdown
raises `NotKept` with a message that says so.

Inactive (the default, and with --no-sandbox) everything is opened afresh,
as it always was.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from typing import Callable


class NotKept(PermissionError):
    """The sandbox is locked and this file or socket was not opened before."""


class KeptResources:
    def __init__(self):
        self._lock = threading.Lock()
        self.active = False
        self.locked = False
        self._fds: dict[tuple, int] = {}
        self._listeners: dict[tuple, socket.socket] = {}

    def activate(self) -> None:
        self.active = True

    def lock(self) -> None:
        """From now on only what is kept can be had."""
        self.locked = True

    # --- files ------------------------------------------------------------------------

    def open(self, path: str | os.PathLike, flags: int) -> int:
        """os.open(path, flags), or a duplicate of the descriptor kept for it."""
        if not self.active:
            return os.open(path, flags)
        key = ("file", os.path.abspath(os.fspath(path)), flags)
        return self.fd(key, lambda: os.open(path, flags), f"open {os.fspath(path)}")

    def open_file(self, path: str | os.PathLike, mode: str = "rb"):
        """A Python file object for reading `path` from its start."""
        if mode != "rb":
            raise ValueError("kept files are opened for reading only")
        fd = self.open(path, os.O_RDONLY | os.O_CLOEXEC)
        file = os.fdopen(fd, "rb")
        if self.active:
            file.seek(0)  # a duplicate shares the offset the last boot left
        return file

    def kept_fd(self, key: tuple) -> int | None:
        """A duplicate of the descriptor kept under `key`, or None."""
        with self._lock:
            fd = self._fds.get(key)
            return None if fd is None else os.dup(fd)

    def keep_fd(self, key: tuple, fd: int) -> None:
        """Keep a duplicate of `fd` under `key` (no-op when inactive)."""
        if not self.active:
            return
        with self._lock:
            if key not in self._fds:
                self._fds[key] = os.dup(fd)

    def fd(self, key: tuple, opener: Callable[[], int], what: str) -> int:
        duplicate = self.kept_fd(key)
        if duplicate is not None:
            return duplicate
        self.check_unlocked(what)
        fd = opener()
        self.keep_fd(key, fd)
        return fd

    def check_unlocked(self, what: str) -> None:
        if self.active and self.locked:
            raise NotKept(errno.EACCES, f"{what}: the sandbox allows no new files or sockets once the guest "
                                        f"runs (docs/SANDBOX.md; --no-sandbox lifts it)")

    # --- listening sockets --------------------------------------------------------------

    def listener(self, key: tuple, factory: Callable[[], socket.socket]) -> socket.socket:
        """factory(), or a duplicate of the listening socket kept under `key`.

        A kept listener outlives the servers that use it: closing their
        duplicate leaves it listening (and its path in place) for the next boot."""
        if not self.active:
            return factory()
        with self._lock:
            kept = self._listeners.get(key)
            if kept is not None:
                return kept.dup()
        self.check_unlocked(f"listen on {key[1]}")
        listener = factory()
        with self._lock:
            self._listeners[key] = listener.dup()
        return listener

    def holds_listener(self, key: tuple) -> bool:
        with self._lock:
            return key in self._listeners

    def unix_socket_paths(self) -> list[str]:
        with self._lock:
            return [key[1] for key in self._listeners if key[0] == "unix"]

    # --- the end of the run -----------------------------------------------------------

    def close(self) -> list[str]:
        """Close everything kept; returns the unix socket paths, which the
        caller removes (the VMM itself may no longer be allowed to)."""
        with self._lock:
            fds, self._fds = self._fds, {}
            listeners, self._listeners = self._listeners, {}
            self.active = self.locked = False
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        for listener in listeners.values():
            listener.close()
        return [key[1] for key in listeners if key[0] == "unix"]


KEPT = KeptResources()
