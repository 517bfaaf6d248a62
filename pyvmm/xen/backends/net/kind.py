"""The PV network interface as a device kind: what pyvmm's CLI, xl.cfg reader,
tracing, fault injection and domain know of it (pyvmm/xen/backend/kind.py)."""

from __future__ import annotations

from pyvmm.core.faults import FaultInjector, FaultRule, FaultTarget, choice
from pyvmm.xen.backend.kind import CliOption, DeviceKind, XlKey
from .spec import NicSpec, parse_net_option, parse_vif_spec

ACTIONS = ("drop", "delay", "duplicate", "corrupt")


def net_packet(faults: FaultInjector, direction: str, vif: str, length: int,
               actions: tuple[str, ...] = ACTIONS) -> FaultRule | None:
    """For the network backend, once per packet: None, or the rule whose
    action (drop, delay, duplicate, corrupt; those in `actions`, what the
    backend can do in that direction) to apply to it."""
    return faults.first("net", actions, {"dir": direction, "vif": vif, "len": length},
                        lambda rule: rule.direction in (None, direction) and rule.vif in (None, vif))


def _create(domain, specs):
    from .vif import create_vifs

    return create_vifs(domain, specs)


NET = DeviceKind(
    name="net",
    summary="a Xen PV network interface (vif) on the host's TAP device or a user network (passt)",
    option=CliOption("--net", "nets", "tap=IFNAME[,mac=MAC] | user[,mac=MAC][,hostfwd=[tcp|udp]:[HOSTADDR]:PORT-:PORT]...",
                     "A Xen PV network interface (repeatable): on a TAP device, created if missing (needs root), "
                     "or 'user': a user network through passt, no privilege needed, with host ports forwarded "
                     "to the guest (hostfwd=, repeatable) or attached to a running passt (socket=PATH); "
                     "docs/NETWORKING.md.",
                     parse_net_option),
    xl=XlKey("vif", "vifs", parse_vif_spec, unique=("vifname", lambda nic: nic.tap)),
    trace=(("net", "packets of the PV network backend: dir, vif, len, flags, slots, status, fault"),),
    faults=(FaultTarget("net", ACTIONS, {"dir": ("direction", choice("tx", "rx")), "vif": ("vif", str)},
                        {"net_packet": net_packet}),),
    create=_create,
)

__all__ = ["NET", "NicSpec"]
