"""Per-domain limits on what a guest can make pyvmm hold or do.

One `Limits` object per VM (`VmConfig.limits`), set with `pyvmm run --limit
NAME=VALUE` or the same names in an xl.cfg file (with `_` for `-`), flows
into the parts that enforce it: the event channels, the grant table, the
xenstore (as its `Quotas`) and every rate-limited log line the guest can
cause (as a `LogRate`). docs/XEN.md ("Per-domain limits") says what each
one bounds, what the guest is answered beyond it and what Xen and
cxenstored allow by default.

Parsing raises `LimitError` with a message that does not repeat what the
person typed; the caller (command line, xl.cfg loader) says where it came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from typing import Callable, Iterable, Mapping

from .core.ratelimit import BURST, PER_SECOND, LogRate

MAX_EVENT_CHANNEL_PORT = 4095  # the 2-level ABI's last port for a 64-bit guest (1023 in compat mode)
MAX_FIFO_EVENT_CHANNEL_PORT = (1 << 17) - 1  # the FIFO ABI's last port (--xen-fifo)
MAX_GRANT_FRAMES = 1024  # grant frames are mapped into the platform device's 16 MiB BAR1


class LimitError(ValueError):
    """A --limit NAME=VALUE or xl.cfg limit that cannot be used."""


@dataclass(frozen=True)
class Limits:
    """The limits of one domain; the defaults are pyvmm's (docs/XEN.md)."""

    max_event_channels: int = MAX_EVENT_CHANNEL_PORT  # highest port the guest may allocate
    max_grant_frames: int = 64
    # The xenstore's, as cxenstored's -Q defaults (the store's Quotas take them from here).
    xenstore_nodes: int = 1000
    xenstore_node_size: int = 2048
    xenstore_node_permissions: int = 5
    xenstore_watches: int = 128
    xenstore_transactions: int = 10
    xenstore_transaction_nodes: int = 1024
    xenstore_memory: int = 2 * 1024 * 1024 + 512 * 1024
    xenstore_transaction_seconds: float = 60.0  # cxenstored has none: see docs/XEN.md
    xenstore_event_backlog: int = 64 * 1024
    log_burst: int = BURST
    log_lines_per_second: float = PER_SECOND

    def __post_init__(self) -> None:
        for spec in SPECS.values():
            try:
                spec.check(getattr(self, spec.field))
            except LimitError as error:
                raise LimitError(f"{spec.name}: {error}") from None

    @property
    def log_rate(self) -> LogRate:
        return LogRate(self.log_burst, self.log_lines_per_second)

    def with_settings(self, settings: Mapping[str, str | int | float]) -> "Limits":
        """These limits with some replaced: {NAME: VALUE} with NAME as in
        `--limit` (or xl.cfg's spelling) and VALUE text or a number."""
        changes = {}
        for name, value in settings.items():
            spec = spec_of(name)
            changes[spec.field] = spec.parse(value)
        return replace(self, **changes)

    def describe(self) -> dict[str, str]:
        """{NAME: value as a person would write it}, for every limit."""
        return {spec.name: spec.format(getattr(self, spec.field)) for spec in SPECS.values()}


_SIZE = re.compile(r"(\d+)\s*([KMG]?)i?B?", re.IGNORECASE)


def _count(text: str) -> int:
    if not re.fullmatch(r"\d+", text):
        raise LimitError("expected a whole number")
    return int(text)


def _bytes(text: str) -> int:
    match = _SIZE.fullmatch(text)
    if not match:
        raise LimitError("expected a number of bytes, e.g. 4096, 64K or 2M")
    return int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2).upper()]


def _real(text: str) -> float:
    if not re.fullmatch(r"\d+(\.\d*)?|\.\d+", text):
        raise LimitError("expected a positive number, e.g. 30 or 0.5")
    return float(text)


@dataclass(frozen=True)
class LimitSpec:
    name: str  # as on the command line; xl.cfg writes "_" for "-"
    field: str
    unit: str
    minimum: float
    maximum: float
    xen_default: str
    what: str
    convert: Callable[[str], float] = _count

    @property
    def xl_key(self) -> str:
        return self.name.replace("-", "_")

    @property
    def default(self):
        return next(f.default for f in fields(Limits) if f.name == self.field)

    def parse(self, value: str | int | float) -> float:
        if isinstance(value, bool):
            raise LimitError("expected a number")
        number = value if isinstance(value, (int, float)) else self.convert(str(value).strip())
        self.check(number)
        return number

    def check(self, number) -> None:
        if not self.minimum <= number <= self.maximum:
            raise LimitError(f"must be between {self.format(self.minimum)} and {self.format(self.maximum)} "
                             f"{self.unit}")

    def format(self, number) -> str:
        if self.convert is _real:
            return f"{number:g}"
        number = int(number)
        if self.convert is _bytes and number >= 4096:
            for shift, suffix in ((30, "G"), (20, "M"), (10, "K")):
                if number % (1 << shift) == 0:
                    return f"{number >> shift}{suffix}"
        return str(number)


_XS = "cxenstored: "
SPECS: dict[str, LimitSpec] = {spec.name: spec for spec in (
    LimitSpec("max-event-channels", "max_event_channels", "ports", 1, MAX_FIFO_EVENT_CHANNEL_PORT,
              "Xen: xl.cfg max_event_channels = 1023",
              "event channel ports the guest may allocate: 1 to N (beyond 4095 only under FIFO)"),
    LimitSpec("max-grant-frames", "max_grant_frames", "frames", 1, MAX_GRANT_FRAMES,
              "Xen: xl.cfg max_grant_frames = 64", "grant table frames, 512 entries each"),
    LimitSpec("xenstore-nodes", "xenstore_nodes", "nodes", 1, 1 << 30, _XS + "-Q nodes = 1000",
              "xenstore nodes the domain owns"),
    LimitSpec("xenstore-node-size", "xenstore_node_size", "bytes", 64, 1 << 20, _XS + "-Q node-size = 2048",
              "one node: value, children's names, 8 bytes per permission", _bytes),
    LimitSpec("xenstore-node-permissions", "xenstore_node_permissions", "permissions", 1, 1024,
              _XS + "-Q node-permissions = 5", "permissions of one node"),
    LimitSpec("xenstore-watches", "xenstore_watches", "watches", 1, 1 << 20, _XS + "-Q watches = 128",
              "xenstore watches the domain holds"),
    LimitSpec("xenstore-transactions", "xenstore_transactions", "transactions", 1, 1 << 16,
              _XS + "-Q transactions = 10", "xenstore transactions open at once"),
    LimitSpec("xenstore-transaction-nodes", "xenstore_transaction_nodes", "nodes", 1, 1 << 20,
              _XS + "-Q transaction-nodes = 1024", "nodes one transaction touches"),
    LimitSpec("xenstore-memory", "xenstore_memory", "bytes", 64 << 10, 1 << 30,
              _XS + "-Q memory = 2560K (hard)", "xenstore memory the domain holds", _bytes),
    LimitSpec("xenstore-transaction-seconds", "xenstore_transaction_seconds", "seconds", 1, 86400,
              "cxenstored: no such limit", "lifetime of a transaction", _real),
    LimitSpec("xenstore-event-backlog", "xenstore_event_backlog", "bytes", 4 << 10, 64 << 20,
              "cxenstored: counted in -Q memory", "watch events queued for the guest", _bytes),
    LimitSpec("log-burst", "log_burst", "lines", 1, 1 << 20, "Xen: printk burst 10",
              "lines one log site may write at once for the guest"),
    LimitSpec("log-lines-per-second", "log_lines_per_second", "lines/s", 0.001, 1e6, "Xen: printk 10 per 5 s",
              "lines one log site may write per second after the burst", _real),
)}


def spec_of(name: str) -> LimitSpec:
    spec = SPECS.get(name.replace("_", "-"))
    if spec is None:
        raise LimitError(f"unknown limit {name!r} (pyvmm run --limit help lists them)")
    return spec


def parse_assignment(text: str) -> tuple[str, float]:
    """'xenstore-nodes=200' -> ('xenstore-nodes', 200)."""
    name, equals, value = text.partition("=")
    if not equals or not name.strip():
        raise LimitError("expected NAME=VALUE (pyvmm run --limit help lists the names)")
    spec = spec_of(name.strip())
    return spec.name, spec.parse(value)


def help_text() -> Iterable[str]:
    yield "Per-domain limits (--limit NAME=VALUE, repeatable; in an xl.cfg file: name_with_underscores = VALUE):"
    width = max(map(len, SPECS))
    for spec in SPECS.values():
        yield (f"  {spec.name:<{width}}  {spec.format(spec.default) + ' ' + spec.unit:<18} {spec.what} "
               f"[{spec.xen_default}]")
    yield "Sizes take K, M or G. docs/XEN.md, \"Per-domain limits\", says what the guest sees beyond each."


DEFAULT_LIMITS = Limits()
