"""Port-I/O and MMIO buses: address range -> device.

A device claims [base, base + size). Overlapping claims are refused. An
access must fall entirely inside one claim; one that straddles the end of a
range, or hits no range at all, is unclaimed: reads return all-ones and
writes are dropped, each logged once per address so a guest probing for
hardware cannot flood the log.
"""

from __future__ import annotations

import bisect
import logging
import threading
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


class BusDevice(Protocol):
    """What a bus dispatches to. `offset` is relative to the claimed base."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class IrqLine(Protocol):
    """An interrupt input of the interrupt controller, as a device sees it."""

    def set_level(self, asserted: bool) -> None: ...


class BusError(Exception):
    """A device registration that conflicts with another."""


@dataclass(frozen=True)
class Claim:
    base: int
    size: int
    device: BusDevice
    name: str

    @property
    def end(self) -> int:
        return self.base + self.size


class Bus:
    def __init__(self, name: str, limit: int):
        self.name = name
        self.limit = limit  # addresses are below this (64 KiB for PIO)
        # Readers (vCPU threads) take one consistent snapshot without locking;
        # writers replace the whole tuple under the lock (copy on write).
        self._table: tuple[tuple[int, ...], tuple[Claim, ...]] = ((), ())
        self._lock = threading.Lock()
        self._reported: set[tuple[int, bool]] = set()

    def register(self, base: int, size: int, device: BusDevice, name: str | None = None) -> Claim:
        if size <= 0 or base < 0 or base + size > self.limit:
            raise BusError(f"{self.name}: range {base:#x}+{size:#x} is outside the bus")
        claim = Claim(base, size, device, name or type(device).__name__)
        with self._lock:
            bases, claims = self._table
            index = bisect.bisect_left(bases, base)
            for other in claims[max(index - 1, 0) : index + 1]:
                if other.base < claim.end and claim.base < other.end:
                    raise BusError(
                        f"{self.name}: {claim.name} at {base:#x}+{size:#x} overlaps "
                        f"{other.name} at {other.base:#x}+{other.size:#x}"
                    )
            self._table = (
                bases[:index] + (base,) + bases[index:],
                claims[:index] + (claim,) + claims[index:],
            )
        return claim

    def unregister(self, claim: Claim) -> None:
        with self._lock:
            bases, claims = self._table
            index = claims.index(claim)
            self._table = (bases[:index] + bases[index + 1 :], claims[:index] + claims[index + 1 :])

    def find(self, address: int, size: int = 1) -> Claim | None:
        """The claim containing all of [address, address+size), if any."""
        bases, claims = self._table
        index = bisect.bisect_right(bases, address) - 1
        if index < 0:
            return None
        claim = claims[index]
        if address + size <= claim.base + claim.size:  # not .end: this runs at every I/O exit
            return claim
        return None

    def read(self, address: int, size: int) -> int:
        claim = self.find(address, size)
        if claim is None:
            self._report_unclaimed(address, size, write=False)
            return (1 << (8 * size)) - 1
        return claim.device.read(address - claim.base, size) & ((1 << (8 * size)) - 1)

    def write(self, address: int, size: int, value: int) -> None:
        claim = self.find(address, size)
        if claim is None:
            self._report_unclaimed(address, size, write=True)
            return
        claim.device.write(address - claim.base, size, value & ((1 << (8 * size)) - 1))

    def read_string(self, address: int, size: int, count: int) -> bytes | None:
        """`count` reads of `size` bytes at one address (a REP INS), in one
        call when the device offers `read_string(offset, size, count)`;
        None when it does not (the caller reads one at a time)."""
        claim = self.find(address, size)
        reader = getattr(claim.device, "read_string", None) if claim is not None else None
        if reader is None:
            return None
        data = reader(address - claim.base, size, count)
        return data if data is not None and len(data) == size * count else None

    def write_string(self, address: int, size: int, data: bytes) -> bool:
        """A REP OUTS of len(data) // size writes, in one call when the device
        offers `write_string(offset, size, data)`; False when it does not."""
        claim = self.find(address, size)
        writer = getattr(claim.device, "write_string", None) if claim is not None else None
        if writer is None:
            return False
        return bool(writer(address - claim.base, size, data))

    def _report_unclaimed(self, address: int, size: int, write: bool) -> None:
        key = (address, write)
        if key in self._reported or len(self._reported) > 4096:
            return
        self._reported.add(key)
        log.debug("%s: unclaimed %s of %d bytes at %#x", self.name, "write" if write else "read", size, address)

    def claims(self) -> list[Claim]:
        return list(self._table[1])
