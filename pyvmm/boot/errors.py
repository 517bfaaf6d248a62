"""The one exception the boot code raises for anything a user can get wrong."""

from __future__ import annotations


class BootError(Exception):
    """A kernel, initrd, command line or machine size that cannot be booted.

    The message is a single line meant to be shown to the user as is.
    """


class FirmwareError(BootError):
    """A firmware image (--firmware) that cannot boot a disk image."""
