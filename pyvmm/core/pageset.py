"""A set of guest page frame numbers below a fixed limit, one byte per frame.

The pages a guest gave back by ballooning can be most of its RAM: as Python
ints in a set they would cost ~60 bytes each (a 16 GiB guest ballooned down
to nothing: 4 M pages, a quarter of a gigabyte of the VMM's memory). Here
they cost one byte per frame of the guest's RAM, allocated once, whatever
the guest does; runs of neighbours are found by a regular expression scan
in C, not page by page."""

from __future__ import annotations

import re
from typing import Iterable, Iterator

_RUN = re.compile(b"\x01+")


class PageSet:
    def __init__(self, limit: int, pages: Iterable[int] = ()):
        """Frames 0..limit-1 may be members."""
        if limit < 0:
            raise ValueError(f"page limit {limit} is negative")
        self.limit = limit
        self._bits = bytearray(limit)
        self._count = 0
        for page in pages:
            self.add(range(page, page + 1))

    def __len__(self) -> int:
        return self._count

    def __contains__(self, page: object) -> bool:
        return isinstance(page, int) and 0 <= page < self.limit and self._bits[page] == 1

    def __iter__(self) -> Iterator[int]:
        for first, count in self.runs():
            yield from range(first, first + count)

    def any_in(self, pages: range) -> bool:
        """Whether any frame of `pages` is a member."""
        start, stop = max(pages.start, 0), min(pages.stop, self.limit)
        return start < stop and self._bits.find(1, start, stop) >= 0

    def all_in(self, pages: range) -> bool:
        """Whether every frame of `pages` is a member (True for none)."""
        if not pages:
            return True
        if pages.start < 0 or pages.stop > self.limit:
            return False
        return self._bits.find(0, pages.start, pages.stop) < 0

    def add(self, pages: range) -> None:
        """Make every frame of `pages` (step 1) a member; ValueError beyond the limit."""
        self._check(pages)
        if pages:
            self._count += pages.stop - pages.start - self._bits.count(1, pages.start, pages.stop)
            self._bits[pages.start:pages.stop] = b"\x01" * len(pages)

    def remove(self, pages: range) -> None:
        """Make no frame of `pages` (step 1) a member."""
        self._check(pages)
        if pages:
            self._count -= self._bits.count(1, pages.start, pages.stop)
            self._bits[pages.start:pages.stop] = bytes(len(pages))

    def clear(self) -> None:
        self._bits = bytearray(self.limit)
        self._count = 0

    def runs(self, pages: range | None = None) -> list[tuple[int, int]]:
        """The members (of `pages`, if given) as (first, count) runs of
        neighbours, in ascending order."""
        start, stop = (0, self.limit) if pages is None else (max(pages.start, 0), min(pages.stop, self.limit))
        if start >= stop:
            return []
        return [(m.start(), m.end() - m.start()) for m in _RUN.finditer(self._bits, start, stop)]

    def _check(self, pages: range) -> None:
        if pages.step != 1 or (pages and (pages.start < 0 or pages.stop > self.limit)):
            raise ValueError(f"pages {pages} are not a run inside 0..{self.limit - 1}")

