"""The PV disk as a device kind: what pyvmm's CLI, xl.cfg reader, tracing,
fault injection and domain know of it (pyvmm/xen/backend/kind.py)."""

from __future__ import annotations

from pyvmm.core.faults import FaultInjector, FaultRule, FaultSpecError, FaultTarget
from pyvmm.xen.backend.kind import CliOption, DeviceKind, XlKey
from .spec import DiskSpec, parse_disk_option, parse_disk_spec

OPS = ("read", "write", "barrier", "flush", "discard")  # blk rules' op= (blkif's operations)
_OUTCOMES = ("error", "eopnotsupp", "delay", "drop")  # replace a request's outcome; stall holds the rings


def _ops(text: str) -> frozenset[str]:
    ops = frozenset(text.split("+"))
    if not ops <= set(OPS):
        raise FaultSpecError(f"{text!r}: operations are {', '.join(OPS)} (joined with +)")
    return ops


def _sectors(text: str) -> tuple[int, int]:
    first, dash, last = text.partition("-")
    if not first.isdigit() or (dash and not last.isdigit()):
        raise FaultSpecError(f"{text!r}: expected FIRST-LAST or SECTOR")
    sectors = (int(first), int(last) if dash else int(first))
    if sectors[1] < sectors[0]:
        raise FaultSpecError(f"{text!r}: the range ends before it starts")
    return sectors


def blk_request(faults: FaultInjector, vdev: str, op: str, sector: int, sectors: int) -> FaultRule | None:
    """The rule that replaces this block request's outcome, if any
    (error, eopnotsupp, delay or drop)."""
    last = sector + max(sectors, 1) - 1

    def matches(rule: FaultRule) -> bool:
        return ((rule.vdev is None or rule.vdev == vdev) and (rule.ops is None or op in rule.ops)
                and (rule.sectors is None or (sector <= rule.sectors[1] and last >= rule.sectors[0])))

    return faults.first("blk", _OUTCOMES, {"vdev": vdev, "op": op, "sector": sector, "sectors": sectors}, matches)


def blk_stalled(faults: FaultInjector, vdev: str) -> bool:
    """A stall rule holds this disk's rings (not counted or traced per call)."""
    return faults.holds("blk", "stall", lambda rule: rule.vdev in (None, vdev))


def _create(domain, specs):
    from .vbd import create_vbds

    return create_vbds(domain, specs)


BLK = DeviceKind(
    name="blk",
    summary="a Xen PV disk (vbd) on a raw image or block device",
    option=CliOption("--disk", "disks", "PATH[,vdev=xvda][,readonly=on]",
                     "A Xen PV disk backed by a raw image or block device (repeatable).", parse_disk_option),
    xl=XlKey("disk", "disks", parse_disk_spec, unique=("vdev", lambda disk: disk.vdev)),
    trace=(("blk", "ring requests (op, sector, sectors, segments, id) and responses (status)"),),
    faults=(FaultTarget(
        "blk", _OUTCOMES + ("stall",),
        {"op": ("ops", _ops), "sectors": ("sectors", _sectors), "vdev": ("vdev", str)},
        {"blk_request": blk_request, "blk_stalled": blk_stalled}),),
    create=_create,
)

__all__ = ["BLK", "DiskSpec", "OPS"]
