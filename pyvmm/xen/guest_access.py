"""Guest memory as a hypercall sees it: through the caller's page tables.

Pointer arguments of Xen hypercalls are guest *virtual* addresses. Every
access is translated page by page with the calling vCPU's current page
tables, so a buffer that crosses a page boundary may land on two unrelated
physical pages. Anything wrong (no mapping, a read-only mapping written to,
a physical address outside RAM, a size over the cap) raises GuestFault,
which the hypercall dispatcher answers with -EFAULT. Every check is made
before the first byte is written, so a failed write changes nothing.

Translations are cached per hypercall only: the guest may change its page
tables between two calls, so the dispatcher calls `forget()` for each one.
"""

from __future__ import annotations

from typing import Callable

from ..kvm.vcpu import Translation
from ..layout import PAGE_SIZE
from ..memory import GuestMemory, GuestMemoryError

_PAGE_MASK = PAGE_SIZE - 1
_ADDRESS_LIMIT = 1 << 64

# No hypercall we handle moves more than this in one go (the largest is
# add_to_physmap_batch: 65535 eight-byte indexes). A guest asking for more
# gets a fault, not a giant allocation.
MAX_ACCESS = 1 << 20


class GuestFault(Exception):
    """A guest virtual range that cannot be accessed as asked."""

    def __init__(self, gva: int, size: int, reason: str):
        super().__init__(f"guest access {gva:#x}+{size:#x}: {reason}")
        self.gva = gva
        self.size = size
        self.reason = reason


class GuestAccess:
    def __init__(
        self,
        translate: Callable[[int], Translation],
        memory: GuestMemory,
        max_access: int = MAX_ACCESS,
    ):
        self._translate = translate
        self.memory = memory
        self.max_access = max_access
        self._cache: dict[int, Translation] = {}

    def forget(self) -> None:
        """Drop cached translations (at the start of every hypercall)."""
        self._cache.clear()

    # --- translation -------------------------------------------------------------

    def _page(self, page: int) -> Translation:
        """Translate a page the cache does not hold yet."""
        translation = self._cache[page] = self._translate(page)
        return translation

    def _pieces(self, gva: int, size: int, write: bool) -> list[tuple[int, int]]:
        """(gpa, length) for each page of [gva, gva + size), each mapped as
        asked; whether the gpa is RAM is checked by the callers."""
        if size < 0 or size > self.max_access:
            raise GuestFault(gva, size, "size out of range")
        if gva < 0 or gva + size > _ADDRESS_LIMIT:
            raise GuestFault(gva, size, "address out of range")
        pieces: list[tuple[int, int]] = []
        end = gva + size
        cache = self._cache
        while gva < end:
            page = gva & ~_PAGE_MASK
            count = min(end, page + PAGE_SIZE) - gva
            translation = cache.get(page) or self._page(page)
            if not translation.valid:
                raise GuestFault(gva, size, "not mapped")
            if write and not translation.writeable:
                raise GuestFault(gva, size, "mapped read-only")
            pieces.append(((translation.gpa & ~_PAGE_MASK) + (gva - page), count))
            gva += count
        return pieces

    def _ram(self, gva: int, size: int, write: bool) -> list[memoryview]:
        """A view of the guest RAM behind each page of [gva, gva + size).
        Every page is translated and checked before the caller moves a byte."""
        view = self.memory.view
        views = []
        for gpa, count in self._pieces(gva, size, write):
            try:
                views.append(view(gpa, count))  # a page never straddles two RAM regions
            except GuestMemoryError:
                raise GuestFault(gva, size, f"maps {gpa:#x}, which is not RAM") from None
        return views

    def translate_gpa(self, gva: int, size: int = 1, write: bool = True) -> int:
        """The guest-physical address behind `gva`, for areas the guest
        registers by virtual address (runstate, vcpu_time_info) and we then
        hand to KVM by physical address. The `size` bytes must be RAM and,
        when they cross pages, physically contiguous: KVM follows such an
        area physically."""
        size = max(size, 1)
        self._ram(gva, size, write)
        pieces = self._pieces(gva, size, write)
        first = pieces[0][0]
        offset = 0
        for gpa, count in pieces:
            if gpa != first + offset:
                raise GuestFault(gva, size, "crosses into a physically distant page")
            offset += count
        return first

    # --- data --------------------------------------------------------------------

    def check(self, gva: int, size: int, write: bool = False) -> None:
        """Raise GuestFault unless the whole range is accessible."""
        self._ram(gva, size, write)

    def read(self, gva: int, size: int, *, for_update: bool = False) -> bytes:
        """Read `size` bytes. With `for_update`, the range must also be
        writeable, so the write-back of a result later cannot fault."""
        return b"".join(self._ram(gva, size, for_update))

    def write(self, gva: int, data: bytes | bytearray | memoryview) -> None:
        data = memoryview(data).cast("B")
        done = 0
        for view in self._ram(gva, len(data), True):
            count = len(view)
            view[:] = data[done : done + count]
            done += count

    def read_struct(self, gva: int, layout, compat: bool, *, for_update: bool = False):
        """Read one ABI structure (an `abi.Layout`) as a namedtuple."""
        views = self._ram(gva, layout.size(compat), for_update)
        return layout.unpack(views[0] if len(views) == 1 else b"".join(views), compat)

    def write_struct(self, gva: int, layout, record, compat: bool) -> None:
        self.write(gva, layout.pack(record, compat))

    def read_array(self, gva: int, count: int, item_size: int) -> list[int]:
        """`count` little-endian unsigned integers of `item_size` bytes."""
        if count < 0 or count * item_size > self.max_access:
            raise GuestFault(gva, count * item_size, "array too large")
        data = self.read(gva, count * item_size)
        return [int.from_bytes(data[i : i + item_size], "little") for i in range(0, len(data), item_size)]
