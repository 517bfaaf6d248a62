"""How a xenstore operation fails: by the name of an errno, never a number.

The store raises `XenStoreError`; the wire protocol answers it with an ERROR
reply carrying the name, and the VMM's own callers catch it.
"""

from __future__ import annotations

# Only these names can appear in an ERROR reply (xsd_errors in xs_wire.h).
ERROR_NAMES = (
    "EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC", "EIO",
    "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN", "E2BIG",
)


class XenStoreError(Exception):
    """A failed xenstore operation; `name` is the wire errno name, e.g. "ENOENT"."""

    def __init__(self, name: str, detail: str = ""):
        if name not in ERROR_NAMES:
            raise ValueError(f"{name!r} is not a xenstore error name")
        super().__init__(f"{name}: {detail}" if detail else name)
        self.name = name
        self.detail = detail


class QuotaError(XenStoreError):
    """A request refused because it would take the domain past one of its
    limits; `limit` names the setting (pyvmm.limits), e.g. "xenstore-nodes"."""

    def __init__(self, name: str, detail: str, limit: str):
        super().__init__(name, detail)
        self.limit = limit
