"""Fault injection: rules that change what a backend does to the guest.

A rule is written TARGET:ACTION[=ARG][,KEY=VALUE]... , the same for
`pyvmm run --fault` and the control socket's `fault-add`:

    blk:error,op=write,sectors=2048-4095     fail writes touching that range
    blk:eopnotsupp,op=discard                answer discards EOPNOTSUPP
    blk:delay=200ms,op=read,every=10          answer every 10th read late
    blk:drop,op=flush,count=1                 never answer one flush
    blk:stall,vdev=xvdb                       take no requests off the ring
    net:drop,dir=tx,rate=0.05                 (also delay=D, duplicate, corrupt)
    xenstore:eagain,count=3                   the next 3 commits fail EAGAIN
    xenstore:delay-watch=500ms,path=/local/domain/0/backend
    evtchn:drop,dir=to-guest,port=5,count=1   (also delay=D; dir=from-guest)

Keys every rule takes: count=N (fire at most N times), every=N (only every
Nth match), rate=P (fire with probability P, from a RNG seeded by seed=S,
default 0, so a run repeats), vdev=xvdX (blk), op=read+write (blk:
read, write, flush, barrier, discard), sectors=A-B (blk, inclusive; a
request fires when it overlaps), dir= (net: tx|rx, evtchn: to-guest|
from-guest), vif=N (net), port=N (evtchn: the guest's port), path=PREFIX
(xenstore watches). Durations take ms, s or us (plain numbers: ms).

Each VM has one FaultInjector: the runner makes it from the VM's config
(--fault) for the whole run, reboots included, the control socket's fault-*
commands change that VM's rules, and it is handed down to the parts that
ask it (the event channels, the xenstore; the backends reach it through
their xenstore, `XenStore.faults`). The injector here only decides; the
parts ask it through one cheap flag per target (`if self._faults.blk:`)
and carry out the outcome. Every fault that fires is traced (category
"fault", on the injector's Tracer) and counted per rule. A part built alone
(a unit test) gets `NULL_FAULTS`, which never has a rule.
"""

from __future__ import annotations

import random
import re
import threading
from dataclasses import dataclass, field
from typing import Callable

from .trace import NULL_TRACE, Tracer

TARGET_ACTIONS = {
    "blk": ("error", "eopnotsupp", "delay", "drop", "stall"),
    "net": ("drop", "delay", "duplicate", "corrupt"),
    "xenstore": ("eagain", "delay-watch"),
    "evtchn": ("drop", "delay"),
}
_TAKES_DURATION = {"delay", "delay-watch"}
BLK_OPS = ("read", "write", "barrier", "flush", "discard")
_KEYS = {
    "blk": {"op", "sectors", "vdev"},
    "net": {"dir", "vif"},
    "xenstore": {"path"},
    "evtchn": {"dir", "port"},
}
_COMMON_KEYS = {"count", "every", "rate", "seed"}
_DIRECTIONS = {"net": ("tx", "rx"), "evtchn": ("to-guest", "from-guest")}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s)?")


class FaultSpecError(ValueError):
    """A fault rule that cannot be parsed; the message says why."""


def parse_duration(text: str) -> float:
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise FaultSpecError(f"{text!r} is not a duration like 200ms, 1.5s or 50us")
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, None: 1e-3}[match.group(2)]
    return float(match.group(1)) * scale


def _positive_int(key: str, text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise FaultSpecError(f"{key}={text!r}: expected a positive integer")
    return int(text)


@dataclass
class FaultRule:
    """One parsed rule with its counters; match() decides and counts."""

    spec: str
    target: str
    action: str
    delay: float = 0.0
    ops: frozenset[str] | None = None
    sectors: tuple[int, int] | None = None
    vdev: str | None = None
    direction: str | None = None
    vif: str | None = None
    port: int | None = None
    path: str | None = None
    count: int | None = None
    every: int | None = None
    rate: float = 1.0
    seed: int = 0
    id: int = 0
    seen: int = 0  # matches of the filters
    fired: int = 0  # faults injected
    rng: random.Random = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    @classmethod
    def parse(cls, spec: str) -> "FaultRule":
        spec = spec.strip()
        head, *options = spec.split(",")
        target, _, action_text = head.partition(":")
        if target not in TARGET_ACTIONS:
            raise FaultSpecError(f"{spec!r}: unknown target {target!r}; one of {', '.join(TARGET_ACTIONS)}")
        action, has_arg, argument = action_text.partition("=")
        if action not in TARGET_ACTIONS[target]:
            raise FaultSpecError(f"{spec!r}: {target} faults are {', '.join(TARGET_ACTIONS[target])}")
        rule = cls(spec, target, action)
        if action in _TAKES_DURATION:
            if not has_arg:
                raise FaultSpecError(f"{spec!r}: {action} needs a duration ({action}=200ms)")
            rule.delay = parse_duration(argument)
        elif has_arg:
            raise FaultSpecError(f"{spec!r}: {action} takes no argument")
        for option in options:
            key, equals, value = option.partition("=")
            key = key.strip()
            if not equals or key not in _KEYS[target] | _COMMON_KEYS:
                raise FaultSpecError(f"{spec!r}: {option!r} is not one of "
                                     f"{', '.join(sorted(_KEYS[target] | _COMMON_KEYS))} =VALUE")
            rule._set(key, value.strip())
        return rule

    def _set(self, key: str, value: str) -> None:
        if key == "op":
            ops = frozenset(value.split("+"))
            if not ops <= set(BLK_OPS):
                raise FaultSpecError(f"op={value!r}: operations are {', '.join(BLK_OPS)} (joined with +)")
            self.ops = ops
        elif key == "sectors":
            first, dash, last = value.partition("-")
            if not first.isdigit() or (dash and not last.isdigit()):
                raise FaultSpecError(f"sectors={value!r}: expected FIRST-LAST or SECTOR")
            self.sectors = (int(first), int(last) if dash else int(first))
            if self.sectors[1] < self.sectors[0]:
                raise FaultSpecError(f"sectors={value!r}: the range ends before it starts")
        elif key == "dir":
            if value not in _DIRECTIONS[self.target]:
                raise FaultSpecError(f"dir={value!r}: one of {', '.join(_DIRECTIONS[self.target])}")
            self.direction = value
        elif key == "port":
            self.port = _positive_int(key, value)
        elif key in ("count", "every"):
            setattr(self, key, _positive_int(key, value))
        elif key == "rate":
            try:
                self.rate = float(value)
            except ValueError:
                self.rate = -1.0
            if not 0.0 < self.rate <= 1.0:
                raise FaultSpecError(f"rate={value!r}: expected a probability in (0, 1]")
        elif key == "seed":
            if not value.isdigit():
                raise FaultSpecError(f"seed={value!r}: expected a number")
            self.seed = int(value)
            self.rng = random.Random(self.seed)
        else:  # vdev, vif, path: plain strings
            setattr(self, key, value)

    @property
    def exhausted(self) -> bool:
        return self.count is not None and self.fired >= self.count

    def fires(self) -> bool:
        """The filters matched: count it, then apply every/count/rate."""
        self.seen += 1
        if self.every is not None and self.seen % self.every:
            return False
        if self.exhausted:
            return False
        if self.rate < 1.0 and self.rng.random() >= self.rate:
            return False
        self.fired += 1
        return True

    def describe(self) -> dict:
        return {"id": self.id, "spec": self.spec, "seen": self.seen, "fired": self.fired,
                "exhausted": self.exhausted}


class FaultInjector:
    """One VM's fault rules. Per-target flags (blk, net, xenstore, evtchn)
    are true while a rule for that target exists: test them first."""

    blk = net = xenstore = evtchn = False

    def __init__(self, trace: Tracer = NULL_TRACE) -> None:
        self._trace = trace  # where fired faults are recorded
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = []
        self._next_id = 1
        # Run a callback after a delay on the event thread; the runner
        # installs the loop's. Without one, delayed work runs at once.
        self.call_later: Callable[[float, Callable[[], None]], None] = lambda delay, callback: callback()
        # Called after every change of the rules (a stall lifted: serve the ring).
        self._listeners: list[Callable[[], None]] = []

    @classmethod
    def from_specs(cls, specs, trace: Tracer = NULL_TRACE) -> "FaultInjector":
        """A VM's injector holding these rules (--fault); FaultSpecError on a bad one."""
        injector = cls(trace)
        for spec in specs:
            injector.add(spec)
        return injector

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call `listener` after every change of the rules."""
        self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def use_loop(self, loop) -> None:
        """Schedule delayed outcomes on `loop` (an EventLoop), from any thread."""
        self.call_later = loop.call_later_threadsafe

    # --- rules ------------------------------------------------------------------------

    def add(self, spec: str) -> FaultRule:
        rule = FaultRule.parse(spec)
        with self._lock:
            rule.id = self._next_id
            self._next_id += 1
            self._rules.append(rule)
            self._update_flags()
        self._changed()
        return rule

    def remove(self, rule_id: int) -> bool:
        with self._lock:
            before = len(self._rules)
            self._rules = [rule for rule in self._rules if rule.id != rule_id]
            removed = len(self._rules) != before
            self._update_flags()
        if removed:
            self._changed()
        return removed

    def clear(self) -> int:
        with self._lock:
            count = len(self._rules)
            self._rules = []
            self._update_flags()
        self._changed()
        return count

    def rules(self) -> list[dict]:
        with self._lock:
            return [rule.describe() for rule in self._rules]

    def _update_flags(self) -> None:
        targets = {rule.target for rule in self._rules}
        for target in TARGET_ACTIONS:
            setattr(self, target, target in targets)

    def _changed(self) -> None:
        for listener in list(self._listeners):
            listener()

    def _first(self, target: str, actions: tuple[str, ...], context: dict, matches: Callable[[FaultRule], bool]):
        with self._lock:
            for rule in self._rules:
                if rule.target == target and rule.action in actions and matches(rule) and rule.fires():
                    break
            else:
                return None
        if self._trace.fault:
            self._trace.emit("fault", rule.action, rule=rule.id, spec=rule.spec, **context)
        return rule

    # --- questions the backends ask ------------------------------------------------------

    def blk_request(self, vdev: str, op: str, sector: int, sectors: int) -> FaultRule | None:
        """The rule that replaces this block request's outcome, if any
        (error, eopnotsupp, delay or drop)."""
        last = sector + max(sectors, 1) - 1

        def matches(rule: FaultRule) -> bool:
            return ((rule.vdev is None or rule.vdev == vdev) and (rule.ops is None or op in rule.ops)
                    and (rule.sectors is None or (sector <= rule.sectors[1] and last >= rule.sectors[0])))

        return self._first("blk", ("error", "eopnotsupp", "delay", "drop"),
                           {"vdev": vdev, "op": op, "sector": sector, "sectors": sectors}, matches)

    def blk_stalled(self, vdev: str) -> bool:
        """A stall rule holds this disk's rings (not counted or traced per call)."""
        with self._lock:
            return any(rule.target == "blk" and rule.action == "stall" and rule.vdev in (None, vdev)
                       for rule in self._rules)

    def xenstore_commit(self, domid: int, tx: int) -> FaultRule | None:
        """An EAGAIN rule for this transaction commit."""
        return self._first("xenstore", ("eagain",), {"domid": domid, "tx": tx}, lambda rule: True)

    def watch_delay(self, path: str, token: str) -> FaultRule | None:
        return self._first("xenstore", ("delay-watch",), {"path": path, "token": token},
                           lambda rule: rule.path is None or path.startswith(rule.path))

    def evtchn_notification(self, direction: str, port: int | None) -> FaultRule | None:
        """A drop or delay rule for a notification to or from the guest's `port`."""
        return self._first("evtchn", ("drop", "delay"), {"dir": direction, "port": port},
                           lambda rule: rule.direction in (None, direction) and rule.port in (None, port))

    def net_packet(self, direction: str, vif: str, length: int,
                   actions: tuple[str, ...] = TARGET_ACTIONS["net"]) -> FaultRule | None:
        """For the network backend, once per packet: None, or the rule whose
        action (drop, delay, duplicate, corrupt; those in `actions`, what the
        backend can do in that direction) to apply to it."""
        return self._first("net", actions, {"dir": direction, "vif": vif, "len": length},
                           lambda rule: rule.direction in (None, direction) and rule.vif in (None, vif))


def corrupt(data: bytearray, rule: FaultRule) -> None:
    """Flip one bit of `data` at a place the rule's RNG picks (net corrupt)."""
    if data:
        bit = rule.rng.randrange(len(data) * 8)
        data[bit // 8] ^= 1 << (bit % 8)


class _NullFaults(FaultInjector):
    """Never a rule: the default of parts built without their VM's injector."""

    def add(self, spec: str) -> FaultRule:
        raise RuntimeError("NULL_FAULTS takes no rules: give the part its VM's FaultInjector")

    def subscribe(self, listener: Callable[[], None]) -> None:
        pass  # its rules never change

    def use_loop(self, loop) -> None:
        pass


NULL_FAULTS: FaultInjector = _NullFaults()
