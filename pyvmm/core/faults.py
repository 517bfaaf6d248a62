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
default 0, so a run repeats). Each target adds its own filters: dir=
(evtchn: to-guest|from-guest), port=N (evtchn: the guest's port),
path=PREFIX (xenstore watches); the device kinds' targets and theirs (blk:
vdev=, op=, sectors=; net: dir=, vif=) are declared with each backend
(pyvmm/xen/backends/*/kind.py) and added by `register_target`. Durations
take ms, s or us (plain numbers: ms).

Each VM has one FaultInjector: the runner makes it from the VM's config
(--fault) for the whole run, reboots included, the control socket's fault-*
commands change that VM's rules, and it is handed down to the parts that
ask it (the event channels, the xenstore; the backends reach it through
their xenstore, `XenStore.faults`). The injector here only decides; the
parts ask it through one cheap flag per target (`if self._faults.blk:`),
then a question its target declares (`self._faults.blk_request(...)`), and
carry out the outcome. Every fault that fires is traced (category "fault",
on the injector's Tracer) and counted per rule. A part built alone (a unit
test) gets `NULL_FAULTS`, which never has a rule.

The targets themselves (TARGETS, filled by `register_target`) are what
rules may say, the same for every VM: no rule or counter lives there.
"""

from __future__ import annotations

import random
import re
import threading
from dataclasses import dataclass, field
from typing import Callable

from .trace import NULL_TRACE, Tracer

_TAKES_DURATION = {"delay", "delay-watch"}
_COMMON_KEYS = {"count", "every", "rate", "seed"}
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


def choice(*values: str) -> Callable[[str], str]:
    """A filter's parser that takes one of `values`."""
    def parse(text: str) -> str:
        if text not in values:
            raise FaultSpecError(f"{text!r}: one of {', '.join(values)}")
        return text
    return parse


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise FaultSpecError(f"{text!r}: expected a positive integer")
    return int(text)


@dataclass(frozen=True)
class FaultTarget:
    """What one target's rules may say, and what its backend asks.

    `filters`: KEY -> (the rule's attribute, parse(value)) for the
    KEY=VALUE filters beyond the common ones; a rule without the filter
    has None there. `questions`: name -> function(injector, ...) that a
    backend calls as a method of its VM's injector
    (`self._faults.blk_request(...)`), built on FaultInjector.first() and
    .holds()."""

    name: str
    actions: tuple[str, ...]
    filters: dict[str, tuple[str, Callable[[str], object]]] = field(default_factory=dict)
    questions: dict[str, Callable] = field(default_factory=dict)


# What rules may say, for every VM alike (definitions, never rules or
# counters): by name, in the order registered, and name -> its actions.
TARGETS: dict[str, FaultTarget] = {}
TARGET_ACTIONS: dict[str, tuple[str, ...]] = {}
_QUESTIONS: dict[str, Callable] = {}  # every registered target's questions, by name


def register_target(target: FaultTarget) -> None:
    """Accept rules for `target` from now on: every FaultInjector gets its
    flag (off until the injector has a rule for it) and its questions as
    methods."""
    known = TARGETS.get(target.name)
    if known is not None and known != target:
        raise ValueError(f"a fault target {target.name!r} is registered already")
    clash = set(target.questions) & set(_QUESTIONS) - set(known.questions if known else ())
    if clash or any(hasattr(FaultInjector, name) for name in target.questions if name not in _QUESTIONS):
        raise ValueError(f"fault target {target.name!r}: question names taken: {', '.join(sorted(target.questions))}")
    TARGETS[target.name] = target
    TARGET_ACTIONS[target.name] = target.actions
    _QUESTIONS.update(target.questions)
    for name, question in target.questions.items():
        setattr(FaultInjector, name, question)  # a method: question(injector, ...)
    if not hasattr(FaultInjector, target.name):
        setattr(FaultInjector, target.name, False)


def unregister_target(name: str) -> None:
    """Forget a target (tests that register one of their own)."""
    target = TARGETS.pop(name, None)
    TARGET_ACTIONS.pop(name, None)
    if target is not None:
        for question in target.questions:
            if _QUESTIONS.pop(question, None) is not None and question in FaultInjector.__dict__:
                delattr(FaultInjector, question)
        if name in FaultInjector.__dict__ and name not in ("xenstore", "evtchn"):
            delattr(FaultInjector, name)


@dataclass
class FaultRule:
    """One parsed rule with its counters; match() decides and counts."""

    spec: str
    target: str
    action: str
    delay: float = 0.0
    filters: dict = field(default_factory=dict)  # the target's filters this rule sets, by attribute
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

    def __getattr__(self, name: str):
        """A filter of the rule's target (rule.vdev, rule.direction, ...): None when not given."""
        target = TARGETS.get(self.__dict__.get("target", ""))
        if target is not None and any(attribute == name for attribute, _ in target.filters.values()):
            return self.__dict__.get("filters", {}).get(name)
        raise AttributeError(name)

    @classmethod
    def parse(cls, spec: str) -> "FaultRule":
        spec = spec.strip()
        head, *options = spec.split(",")
        target, _, action_text = head.partition(":")
        if target not in TARGETS:
            raise FaultSpecError(f"{spec!r}: unknown target {target!r}; one of {', '.join(TARGETS)}")
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
            keys = set(TARGETS[target].filters) | _COMMON_KEYS
            if not equals or key not in keys:
                raise FaultSpecError(f"{spec!r}: {option!r} is not one of {', '.join(sorted(keys))} =VALUE")
            rule._set(key, value.strip())
        return rule

    def _set(self, key: str, value: str) -> None:
        filters = TARGETS[self.target].filters
        if key in filters:
            attribute, parse = filters[key]
            try:
                self.filters[attribute] = parse(value)
            except FaultSpecError as error:
                raise FaultSpecError(f"{key}={error}") from None
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
    """One VM's fault rules. Per-target flags (xenstore, evtchn and one per
    registered target: blk, net, ...) are true while this injector has a
    rule for that target: test them first. The targets' questions are its
    methods too (register_target puts them on the class, with each flag's
    default, off; an injector made before a target was registered, such as
    NULL_FAULTS, answers False for it)."""

    xenstore = evtchn = False

    def __init__(self, trace: Tracer = NULL_TRACE) -> None:
        self._trace = trace  # where fired faults are recorded
        for name in TARGETS:  # every registered target's flag, off: no rule yet
            setattr(self, name, False)
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
        for target in TARGETS:
            setattr(self, target, target in targets)

    def _changed(self) -> None:
        for listener in list(self._listeners):
            listener()

    def first(self, target: str, actions: tuple[str, ...], context: dict,
              matches: Callable[[FaultRule], bool]) -> FaultRule | None:
        """The first rule of `target` with one of `actions` whose filters
        `matches` and that fires (counted, traced with `context`), or None."""
        with self._lock:
            for rule in self._rules:
                if rule.target == target and rule.action in actions and matches(rule) and rule.fires():
                    break
            else:
                return None
        if self._trace.fault:
            self._trace.emit("fault", rule.action, rule=rule.id, spec=rule.spec, **context)
        return rule

    def holds(self, target: str, action: str, matches: Callable[[FaultRule], bool]) -> bool:
        """Some rule of `target` with `action` matches: a state, not an event
        (neither counted nor traced)."""
        with self._lock:
            return any(rule.target == target and rule.action == action and matches(rule) for rule in self._rules)

    # --- questions the hypervisor interface and the xenstore ask ------------------------

    def xenstore_commit(self, domid: int, tx: int) -> FaultRule | None:
        """An EAGAIN rule for this transaction commit."""
        return self.first("xenstore", ("eagain",), {"domid": domid, "tx": tx}, lambda rule: True)

    def watch_delay(self, path: str, token: str) -> FaultRule | None:
        return self.first("xenstore", ("delay-watch",), {"path": path, "token": token},
                           lambda rule: rule.path is None or path.startswith(rule.path))

    def evtchn_notification(self, direction: str, port: int | None) -> FaultRule | None:
        """A drop or delay rule for a notification to or from the guest's `port`."""
        return self.first("evtchn", ("drop", "delay"), {"dir": direction, "port": port},
                           lambda rule: rule.direction in (None, direction) and rule.port in (None, port))


def corrupt(data: bytearray, rule: FaultRule) -> None:
    """Flip one bit of `data` at a place the rule's RNG picks (net corrupt)."""
    if data:
        bit = rule.rng.randrange(len(data) * 8)
        data[bit // 8] ^= 1 << (bit % 8)


register_target(FaultTarget("xenstore", ("eagain", "delay-watch"), {"path": ("path", str)}))
register_target(FaultTarget("evtchn", ("drop", "delay"), {"dir": ("direction", choice("to-guest", "from-guest")),
                                                          "port": ("port", positive_int)}))


class _NullFaults(FaultInjector):
    """Never a rule: the default of parts built without their VM's injector."""

    def add(self, spec: str) -> FaultRule:
        raise RuntimeError("NULL_FAULTS takes no rules: give the part its VM's FaultInjector")

    def subscribe(self, listener: Callable[[], None]) -> None:
        pass  # its rules never change

    def use_loop(self, loop) -> None:
        pass


NULL_FAULTS: FaultInjector = _NullFaults()
