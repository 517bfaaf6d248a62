"""Where a running VM's unix sockets live, and how they are bound.

Every VM named NAME has, in the per-user runtime directory,

    NAME.control    the control socket (docs/CONTROL.md)
    NAME.xenstore   the xenstore socket for dom0 tools (XENSTORED_PATH=...)

The directory is `$XDG_RUNTIME_DIR/pyvmm`, else `/run/user/<uid>/pyvmm`
when `/run/user/<uid>` exists, else `/tmp/pyvmm-<uid>`. It is created with
mode 0700 and refused when someone else owns it or others may write to it:
whoever can write there could put their own socket in place of a VM's.

Sockets are bound with `bind_unix_socket()`: a socket left behind by a VMM
that died (connecting is refused) is replaced, a live one never is.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import stat
import struct
from pathlib import Path

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
CONTROL_SUFFIX = ".control"
XENSTORE_SUFFIX = ".xenstore"

# sizeof(sockaddr_un.sun_path) on Linux, including the terminating NUL.
_SUN_PATH_MAX = 108


class RuntimeDirError(Exception):
    """The runtime directory or a socket in it cannot be used; the message says why."""


class SocketInUseError(RuntimeDirError):
    """A live process already serves the socket path (a VM of that name runs)."""


def validate_name(name: str) -> str:
    """Return `name` if it can name a VM's sockets, else raise RuntimeDirError."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise RuntimeDirError(
            f"invalid VM name {name!r}: use 1 to 64 letters, digits, '_', '.' or '-'")
    if name in (".", ".."):
        raise RuntimeDirError(f"invalid VM name {name!r}")
    return name


def _base_directory() -> Path:
    uid = os.getuid()
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):  # the XDG spec: ignore a relative value
        return Path(xdg) / "pyvmm"
    user_run = Path(f"/run/user/{uid}")
    if user_run.is_dir():
        return user_run / "pyvmm"
    return Path(f"/tmp/pyvmm-{uid}")


def runtime_dir(create: bool = True) -> Path:
    """The per-user directory for control sockets, checked (and created, mode
    0700, unless create=False; then a missing directory is returned as is)."""
    path = _base_directory()
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except FileNotFoundError:
            raise RuntimeDirError(
                f"cannot create runtime directory {path}: {path.parent} does not exist") from None
        except OSError as error:
            raise RuntimeDirError(f"cannot create runtime directory {path}: {error.strerror}") from None
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        if create:
            raise RuntimeDirError(f"runtime directory {path} vanished") from None
        return path
    except OSError as error:
        raise RuntimeDirError(f"cannot inspect runtime directory {path}: {error.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise RuntimeDirError(f"runtime directory {path} is not a directory (a symbolic link?)")
    if info.st_uid != os.getuid():
        raise RuntimeDirError(
            f"runtime directory {path} belongs to uid {info.st_uid}, not to us (uid {os.getuid()})")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise RuntimeDirError(
            f"runtime directory {path} is writable by other users (mode {stat.S_IMODE(info.st_mode):04o});"
            f" remove it or chmod 700 it")
    return path


def _socket_path(name: str, suffix: str, directory: Path | None) -> Path:
    validate_name(name)
    path = (runtime_dir() if directory is None else Path(directory)) / (name + suffix)
    if len(os.fsencode(path)) >= _SUN_PATH_MAX:
        raise RuntimeDirError(f"socket path {path} is too long for a unix socket")
    return path


def control_socket_path(name: str, directory: Path | None = None) -> Path:
    return _socket_path(name, CONTROL_SUFFIX, directory)


def xenstore_socket_path(name: str, directory: Path | None = None) -> Path:
    return _socket_path(name, XENSTORE_SUFFIX, directory)


def socket_is_live(path: str | os.PathLike) -> bool | None:
    """True if a process accepts connections on the socket at `path`, False
    if connecting is refused (a stale socket) or nothing is there, None when
    it cannot be told (e.g. permission denied)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fspath(path))
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except socket.timeout:
        return True  # a full backlog: someone is there, just busy
    except OSError:
        return None
    finally:
        probe.close()


def bind_unix_socket(path: str | os.PathLike, what: str = "socket", backlog: int = 16) -> socket.socket:
    """A non-blocking listening unix socket at `path`, mode 0600.

    A stale socket at `path` is removed first; a live one raises
    SocketInUseError, anything that is not a socket RuntimeDirError.
    """
    path = os.fspath(path)
    if len(os.fsencode(path)) >= _SUN_PATH_MAX:
        raise RuntimeDirError(f"{what} path {path} is too long for a unix socket")
    from .kept import KEPT

    # Under the sandbox the listener is bound once and kept across reboots.
    return KEPT.listener(("unix", path), lambda: _bind_unix_socket(path, what, backlog))


def _bind_unix_socket(path: str, what: str, backlog: int) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        for attempt in range(2):
            try:
                listener.bind(path)
                break
            except OSError as error:
                if error.errno != errno.EADDRINUSE or attempt:
                    raise RuntimeDirError(f"cannot bind {what} {path}: {error.strerror}") from None
            _remove_stale(path, what)
        # The directory is private already; the socket's own mode keeps it
        # private should the directory's mode ever be relaxed.
        os.chmod(path, 0o600)
        listener.listen(backlog)
        listener.setblocking(False)
    except BaseException:
        listener.close()
        raise
    return listener


def _remove_stale(path: str, what: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise RuntimeDirError(f"{path} exists and is not a socket; not replacing it with the {what}")
    live = socket_is_live(path)
    if live:
        raise SocketInUseError(f"{path} is in use: a VM of that name is running")
    if live is None:
        raise RuntimeDirError(f"{path} exists and cannot be probed; not replacing it")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def unlink_if_same(path: str | os.PathLike, inode: tuple[int, int] | None) -> None:
    """Remove the socket at `path` if it is still the one we bound, (st_dev,
    st_ino) == inode: never another VMM's socket that replaced ours."""
    try:
        info = os.lstat(path)
        if inode is None or (info.st_dev, info.st_ino) == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        pass


def inode_of(path: str | os.PathLike) -> tuple[int, int] | None:
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def peer_allowed(sock: socket.socket) -> bool:
    """Whether the process at the other end of a unix socket runs as our user
    or as root (SO_PEERCRED); the socket's mode should already ensure it."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return False
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (0, os.getuid())
