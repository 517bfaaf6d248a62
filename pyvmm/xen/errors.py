"""Errors Xen returns to its guests.

Hypercall results are negative errno values with Linux's numbering (Xen's
public errno.h uses the same numbers on x86). A Xen subsystem raises
XenError; the hypercall dispatcher turns it into the guest's return value,
so no guest mistake ever escapes as a Python exception.
"""

from __future__ import annotations

import errno as _errno

EPERM = _errno.EPERM
ENOENT = _errno.ENOENT
ESRCH = _errno.ESRCH
EINTR = _errno.EINTR
EIO = _errno.EIO
E2BIG = _errno.E2BIG
EDOM = _errno.EDOM
EAGAIN = _errno.EAGAIN
ENOMEM = _errno.ENOMEM
EACCES = _errno.EACCES
EFAULT = _errno.EFAULT
EBUSY = _errno.EBUSY
EEXIST = _errno.EEXIST
EXDEV = _errno.EXDEV
ENODEV = _errno.ENODEV
EINVAL = _errno.EINVAL
ENOSPC = _errno.ENOSPC
ERANGE = _errno.ERANGE
ENOSYS = _errno.ENOSYS
EOPNOTSUPP = _errno.EOPNOTSUPP
ETIME = _errno.ETIME
ETIMEDOUT = _errno.ETIMEDOUT


class XenError(Exception):
    """A failure to report to the guest as -errno."""

    def __init__(self, errno: int, message: str = ""):
        super().__init__(message or _errno.errorcode.get(errno, str(errno)))
        self.errno = errno

    @property
    def result(self) -> int:
        return -self.errno
