"""A device kind: everything the rest of pyvmm needs to know about one backend.

Each backend folder (pyvmm/xen/backends/blk, net, console) declares one
`DeviceKind` in its `kind.py`, and pyvmm/xen/backends/__init__.py lists
them. Whoever would otherwise name disks or NICs loops over the registry:

    option      `pyvmm run`'s option (--disk): its grammar -> a DeviceSpec
    xl          the xl.cfg key (disk = [...]): its grammar -> a DeviceSpec
    trace       the trace categories its backend emits (blk)
    faults      the fault targets its backend obeys (blk:error,...)
    create      how its devices are made on a domain: their xenstore
                nodes (the xenbus device type, frontend and backend
                directories) come from the device class it builds

Both grammars produce the same spec type (a `pyvmm.config.DeviceSpec`),
so `pyvmm run` and an xl.cfg file describe a device the same way and a
spec carries its `Origin` for messages. `register()` makes the trace
categories and fault targets known to pyvmm.core (definitions only: every
VM's own Tracer and FaultInjector then has them, as flags that are off
until that VM turns them on); the CLI and the xl.cfg reader read `kinds()`
whenever they run, and the domain builds the devices of every kind in the
order registered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from pyvmm.config import DeviceSpec
from pyvmm.core import faults, trace


@dataclass(frozen=True)
class CliOption:
    """A repeatable `pyvmm run` option, one device per use."""

    name: str  # "--disk"
    dest: str  # the keyword of `run`'s callback: "disks"
    metavar: str
    help: str
    parse: Callable[[str, int], DeviceSpec]  # (its value, how many of this option came before) -> spec


@dataclass(frozen=True)
class XlKey:
    """An xl.cfg key holding a list of devices (disk = [...])."""

    key: str  # "disk"
    attr: str  # XlConfig's attribute and to_run_options()'s key for the specs: "disks"
    parse: Callable[[str], tuple[DeviceSpec, list[str]]]  # one entry -> (spec, warnings); raises ConfigError
    unique: tuple[str, Callable[[DeviceSpec], str]] | None = None  # what no two entries may share ("vdev", get)


@dataclass(frozen=True)
class DeviceKind:
    name: str  # blk, net, console
    summary: str  # one line: what the guest gets
    option: CliOption | None = None
    xl: XlKey | None = None
    trace: tuple[tuple[str, str], ...] = ()  # (category, what it records)
    faults: tuple[faults.FaultTarget, ...] = ()
    # (domain, this kind's specs) -> its started devices (xenbus backends);
    # on an error it closes what it made and raises. None: the domain
    # builds the device itself (the primary console).
    create: Callable[[object, Sequence[DeviceSpec]], list] | None = None


_KINDS: dict[str, DeviceKind] = {}


def register(*kinds: DeviceKind) -> tuple[DeviceKind, ...]:
    """Add device kinds (with their trace categories and fault targets); returns them."""
    for kind in kinds:
        if kind.name in _KINDS and _KINDS[kind.name] is not kind:
            raise ValueError(f"a device kind {kind.name!r} is registered already")
        for category, description in kind.trace:
            trace.register_category(category, description)
        for target in kind.faults:
            faults.register_target(target)
        _KINDS[kind.name] = kind
    return kinds


def unregister(name: str) -> None:
    """Forget a kind (tests that register one of their own)."""
    kind = _KINDS.pop(name, None)
    if kind is not None:
        for category, _ in kind.trace:
            trace.unregister_category(category)
        for target in kind.faults:
            faults.unregister_target(target.name)


def kinds() -> tuple[DeviceKind, ...]:
    """Every registered kind, in the order registered."""
    return tuple(_KINDS.values())


def with_option() -> Iterable[DeviceKind]:
    return (kind for kind in kinds() if kind.option is not None)


def with_xl_key() -> Iterable[DeviceKind]:
    return (kind for kind in kinds() if kind.xl is not None)

