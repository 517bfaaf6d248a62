"""Atomic operations on memory the guest shares with us.

Event-channel bitmaps, vcpu_info flags and grant-entry flags are updated by
the guest with locked instructions at the same time as we update them; a
plain read-modify-write from Python could lose the guest's change. The
compiler runtime's libatomic gives real atomic instructions, called through
cffi on host addresses (e.g. GuestMemory.host_address()).

The memory order is always sequentially consistent: these are not on paths
where the cost of a weaker order would show.
"""

from __future__ import annotations

import ctypes

from .cffi_types import declared_ffi

_ffi = declared_ffi(__file__, "atomic", """
    uint8_t  __atomic_fetch_or_1(void *p, uint8_t v, int order);
    uint16_t __atomic_fetch_or_2(void *p, uint16_t v, int order);
    uint32_t __atomic_fetch_or_4(void *p, uint32_t v, int order);
    uint64_t __atomic_fetch_or_8(void *p, uint64_t v, int order);
    uint8_t  __atomic_fetch_and_1(void *p, uint8_t v, int order);
    uint16_t __atomic_fetch_and_2(void *p, uint16_t v, int order);
    uint32_t __atomic_fetch_and_4(void *p, uint32_t v, int order);
    uint64_t __atomic_fetch_and_8(void *p, uint64_t v, int order);
    uint8_t  __atomic_exchange_1(void *p, uint8_t v, int order);
    uint16_t __atomic_exchange_2(void *p, uint16_t v, int order);
    uint32_t __atomic_exchange_4(void *p, uint32_t v, int order);
    uint64_t __atomic_exchange_8(void *p, uint64_t v, int order);
    _Bool __atomic_compare_exchange_2(void *p, uint16_t *expected, uint16_t desired, _Bool weak, int s, int f);
    _Bool __atomic_compare_exchange_4(void *p, uint32_t *expected, uint32_t desired, _Bool weak, int s, int f);
    _Bool __atomic_compare_exchange_8(void *p, uint64_t *expected, uint64_t desired, _Bool weak, int s, int f);
    """)
try:
    _lib = _ffi.dlopen("libatomic.so.1")
except OSError as error:  # pragma: no cover - Debian installs it with gcc's runtime
    raise ImportError("pyvmm needs libatomic.so.1 (Debian package libatomic1)") from error

SEQ_CST = 5
_EXPECTED_TYPE = {2: "uint16_t *", 4: "uint32_t *", 8: "uint64_t *"}
_FETCH_OR = {1: _lib.__atomic_fetch_or_1, 2: _lib.__atomic_fetch_or_2, 4: _lib.__atomic_fetch_or_4, 8: _lib.__atomic_fetch_or_8}
_FETCH_AND = {1: _lib.__atomic_fetch_and_1, 2: _lib.__atomic_fetch_and_2, 4: _lib.__atomic_fetch_and_4, 8: _lib.__atomic_fetch_and_8}
_EXCHANGE = {1: _lib.__atomic_exchange_1, 2: _lib.__atomic_exchange_2, 4: _lib.__atomic_exchange_4, 8: _lib.__atomic_exchange_8}
_CMPXCHG = {2: _lib.__atomic_compare_exchange_2, 4: _lib.__atomic_compare_exchange_4, 8: _lib.__atomic_compare_exchange_8}

_fence = _ffi.new("uint32_t *")  # a word of our own for full_barrier's locked instruction
_fetch_or_4 = _lib.__atomic_fetch_or_4


def full_barrier() -> None:
    """A full memory barrier (Xen's mb()): no load or store crosses a
    locked instruction, here on a private word."""
    _fetch_or_4(_fence, 0, SEQ_CST)


def fetch_or(address: int, size: int, bits: int) -> int:
    """*address |= bits; returns the old value."""
    return _FETCH_OR[size](_ffi.cast("void *", address), bits, SEQ_CST)


def fetch_and(address: int, size: int, bits: int) -> int:
    """*address &= bits; returns the old value."""
    return _FETCH_AND[size](_ffi.cast("void *", address), bits, SEQ_CST)


def exchange(address: int, size: int, value: int) -> int:
    """Stores value; returns the old one."""
    return _EXCHANGE[size](_ffi.cast("void *", address), value, SEQ_CST)


def compare_exchange(address: int, size: int, expected: int, desired: int) -> tuple[bool, int]:
    """If *address == expected, store desired. Returns (swapped, value seen)."""
    seen = _ffi.new(_EXPECTED_TYPE[size].replace(" *", "[1]"), [expected])
    swapped = _CMPXCHG[size](_ffi.cast("void *", address), seen, desired, False, SEQ_CST, SEQ_CST)
    return bool(swapped), seen[0]


def test_and_set_bit(address: int, bit: int) -> bool:
    """Sets bit `bit` counted from `address` (a bitmap); returns its old value."""
    byte = address + bit // 8
    mask = 1 << (bit % 8)
    return bool(fetch_or(byte, 1, mask) & mask)


def test_and_clear_bit(address: int, bit: int) -> bool:
    byte = address + bit // 8
    mask = 1 << (bit % 8)
    return bool(fetch_and(byte, 1, 0xFF & ~mask) & mask)


class SharedWords:
    """The 32-bit words of a shared buffer (ring indices), each loaded and
    stored as one aligned access. struct packs and unpacks byte by byte, so
    a peer on another CPU could see, or hand us, an index half updated
    (0x2d00 on the way from 0x2dff to 0x2e00: behind where it was)."""

    def __init__(self, buffer):
        view = memoryview(buffer).cast("B")
        self._words = (ctypes.c_uint32 * (len(view) // 4)).from_buffer(view)

    def load(self, offset: int) -> int:
        return self._words[offset >> 2]

    def store(self, offset: int, value: int) -> None:
        self._words[offset >> 2] = value & 0xFFFF_FFFF


class AtomicArray:
    """Atomic operations on the `size`-byte elements of a shared array (the
    grant table's entries), for hot paths: the address is cast to a typed
    pointer once and compare_exchange reuses one cell for the expected
    value, so an operation is one foreign call instead of three.

    The cell makes an instance unsafe to use from two threads at once; its
    owner serializes the calls (the grant table holds its lock)."""

    def __init__(self, address: int, size: int):
        pointer_type = _EXPECTED_TYPE[size]
        self._pointer = _ffi.cast(pointer_type, address)
        self._expected = _ffi.new(pointer_type.replace(" *", "[1]"))
        self._compare_exchange = _CMPXCHG[size]
        self._fetch_and = _FETCH_AND[size]

    def compare_exchange(self, index: int, expected: int, desired: int) -> tuple[bool, int]:
        """If element `index` == expected, store desired. Returns (swapped, value seen)."""
        cell = self._expected
        cell[0] = expected
        swapped = self._compare_exchange(self._pointer + index, cell, desired, False, SEQ_CST, SEQ_CST)
        return bool(swapped), cell[0]

    def fetch_and(self, index: int, bits: int) -> int:
        """Element `index` &= bits; returns the old value."""
        return self._fetch_and(self._pointer + index, bits, SEQ_CST)
