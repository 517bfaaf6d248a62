"""The one place pyvmm calls ioctl(2) on a KVM file descriptor.

libc's ioctl is called through cffi rather than fcntl.ioctl because:
- arguments are cffi structs already; their pointer goes to the kernel with
  no copy in or out;
- an integer argument (KVM_SET_TSS_ADDR's 0xfffbd000) is passed as a C
  unsigned long, where fcntl.ioctl would overflow a C int;
- EINTR comes back as an errno we decide about, instead of a retry or an
  InterruptedError depending on the Python version.
cffi releases the GIL around the call, so a vCPU thread inside KVM_RUN does
not stop the rest of the program.
"""

from __future__ import annotations

import errno
import os

from ..core.cffi_types import declared_ffi
from .uapi import Ioctl

_libc_ffi = declared_ffi(__file__, "libc_ioctl", "int ioctl(int fd, unsigned long request, ...);")
_libc = _libc_ffi.dlopen(None)


class KvmError(OSError):
    """A KVM operation failed; `ioctl` names the request (None for open())."""

    def __init__(self, err: int, ioctl: str | None, detail: str = ""):
        message = os.strerror(err)
        if ioctl:
            message = f"{ioctl}: {message}"
        if detail:
            message = f"{message} ({detail})"
        super().__init__(err, message)
        self.ioctl = ioctl


class KvmUnavailable(KvmError):
    """/dev/kvm is missing, not accessible, or speaks another API version."""


def ioctl(fd: int, request: Ioctl, arg=None, *, retry_on_eintr: bool = True) -> int:
    """Issue `request` on `fd` and return the kernel's non-negative result.

    `arg` is a cffi pointer (passed as is), an int (passed by value as an
    unsigned long) or None (0). Errors raise KvmError carrying the request's
    name. EINTR is retried unless `retry_on_eintr` is false (KVM_RUN, where an
    interruption is the point of a kick).
    """
    if arg is None:
        arg = _ZERO
    elif isinstance(arg, int):
        arg = _libc_ffi.cast("unsigned long", arg)
    while True:
        result = _libc.ioctl(fd, request, arg)
        if result >= 0:
            return result
        err = _libc_ffi.errno
        if err == errno.EINTR and retry_on_eintr:
            continue
        raise KvmError(err, getattr(request, "name", hex(request)))


_ZERO = _libc_ffi.cast("unsigned long", 0)
