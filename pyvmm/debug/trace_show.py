"""`pyvmm trace show`: read a --trace-file, filter it, render one line per event.

    12.345678 vcpu0  hypercall  call name=event_channel_op op=send args=[...] result=0

The time is seconds since the trace's first event. Filters: categories,
a text that must occur in the event (its JSON line), and a window
[since, until] in those seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Iterator, TextIO

_HEADER_KEYS = ("t", "cat", "ev", "thread", "vcpu")


@dataclass
class TraceFilter:
    categories: frozenset[str] = frozenset()
    grep: str | None = None
    since: float | None = None  # seconds after the first event
    until: float | None = None

    def keeps(self, record: dict, line: str, seconds: float) -> bool:
        if self.categories and record.get("cat") not in self.categories:
            return False
        if self.since is not None and seconds < self.since:
            return False
        if self.until is not None and seconds > self.until:
            return False
        return self.grep is None or self.grep in line


class TraceFormatError(ValueError):
    """A line that is not a trace record."""


def read_trace(lines: Iterable[str]) -> Iterator[tuple[dict, str]]:
    """(record, line) per non-empty line; TraceFormatError names a bad line."""
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise TraceFormatError(f"line {number}: not JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("t"), int) or "cat" not in record:
            raise TraceFormatError(f"line {number}: not a trace record")
        yield record, line


def render(record: dict, seconds: float) -> str:
    """One readable line: time, where, category, event, then the fields."""
    where = f"vcpu{record['vcpu']}" if "vcpu" in record else record.get("thread", "")
    fields = " ".join(f"{key}={_value(value)}" for key, value in record.items()
                      if key not in _HEADER_KEYS and value is not None)
    return f"{seconds:12.6f} {where:<10} {record['cat']:<9} {record.get('ev', '')} {fields}".rstrip()


def _value(value) -> str:
    if isinstance(value, str):
        return json.dumps(value) if (not value or " " in value or "=" in value) else value
    return json.dumps(value, separators=(",", ":"))


def show(source: TextIO, out: TextIO, wanted: TraceFilter, *, as_json: bool = False) -> int:
    """Write the events `wanted` keeps; returns how many."""
    start = None
    shown = 0
    for record, line in read_trace(source):
        if start is None:
            start = record["t"]
        seconds = (record["t"] - start) / 1e9
        if not wanted.keeps(record, line, seconds):
            continue
        out.write((line if as_json else render(record, seconds)) + "\n")
        shown += 1
    return shown
