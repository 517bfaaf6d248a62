"""Who may do what with a xenstore node: access letters and permission entries.

A node's permission list is a sequence of `Permission`s; the store enforces
it (store.py), the wire protocol carries it as text ("b0", "r1", ...).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .errors import XenStoreError


class Access(enum.IntFlag):
    NONE = 0
    READ = 1
    WRITE = 2
    OWNER = 4  # never stored: granted to a node's owner and to privileged callers


_LETTER_TO_ACCESS = {"n": Access.NONE, "r": Access.READ, "w": Access.WRITE,
                     "b": Access.READ | Access.WRITE}
_ACCESS_TO_LETTER = {access: letter for letter, access in _LETTER_TO_ACCESS.items()}


@dataclass(frozen=True, slots=True)
class Permission:
    """One entry of a node's permission list, written "<n|r|w|b><domid>".

    The first entry names the owner and, through its access letter, the
    access of every domain not listed after it.
    """

    domid: int
    access: Access

    def __post_init__(self) -> None:
        if not 0 <= self.domid <= 0xFFFF:
            raise ValueError(f"domid {self.domid} out of range")
        if self.access not in _ACCESS_TO_LETTER:
            raise ValueError(f"access {self.access!r} cannot be stored in a node")

    @classmethod
    def parse(cls, text: str) -> "Permission":
        access = _LETTER_TO_ACCESS.get(text[:1])
        digits = text[1:]
        if access is None or not digits.isascii() or not digits.isdigit() or len(digits) > 5:
            raise XenStoreError("EINVAL", f"bad permission {text!r}")
        domid = int(digits)
        if domid > 0xFFFF:
            raise XenStoreError("EINVAL", f"bad permission {text!r}")
        return cls(domid, access)

    def __str__(self) -> str:
        return f"{_ACCESS_TO_LETTER[self.access]}{self.domid}"
