"""A PV network interface as `pyvmm run --net` and xl.cfg's `vif = [...]` describe it: NicSpec.

Two grammars, one spec: `--net tap=IFNAME[,mac=MAC]` (parse_net_option)
and xl's vif syntax, xl-network-configuration(5) (parse_vif_spec), of
which pyvmm honours vifname= (the host's TAP device) and mac=.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from pyvmm.config import ConfigError, DeviceSpec, Origin


@dataclass(frozen=True)
class NicSpec(DeviceSpec):
    """A network interface for the guest, backed by the host's tap device `tap`."""

    kind = "net"
    option = "--net"

    tap: str
    mac: str | None = None  # "00:16:3e:12:34:56"; None: a stable one made from the VM's name
    origin: Origin | None = field(default=None, compare=False, repr=False)

    def option_text(self) -> str:
        """The network option of `pyvmm run`: tap=IFNAME[,mac=MAC]."""
        return f"tap={self.tap}" + (f",mac={self.mac}" if self.mac else "")

    def to_xl(self) -> str:
        return f"vifname={self.tap}" + (f",mac={self.mac}" if self.mac else "")

    def unique(self) -> tuple[str, str]:
        return ("TAP device", self.tap)


def parse_net_option(text: str, index: int = 0) -> NicSpec:
    """One `--net tap=IFNAME[,mac=MAC]`."""
    tap = mac = None
    for option in text.split(","):
        key, _, value = option.partition("=")
        if key == "tap" and valid_ifname(value):
            tap = value
        elif key == "mac":
            mac = parse_mac(value)
        else:
            raise ConfigError(f"--net {text!r}: unknown or bad option {option!r} (tap=IFNAME, mac=MAC)")
    if tap is None:
        raise ConfigError(f"--net {text!r}: expected tap=IFNAME[,mac=MAC]")
    return NicSpec(tap, mac, origin=Origin("--net", text))


class _SpecError(Exception):
    pass


_MAC = re.compile(r"([0-9a-fA-F]{1,2})[:-]([0-9a-fA-F]{1,2})[:-]([0-9a-fA-F]{1,2})[:-]"
                  r"([0-9a-fA-F]{1,2})[:-]([0-9a-fA-F]{1,2})[:-]([0-9a-fA-F]{1,2})")
_VIF_UNSUPPORTED = {"script", "backend", "rate", "mtu", "gatewaydev", "netdev", "vlan", "devid", "accel",
                    "forwarddev", "colo_sock_mirror_id", "colo_sock_mirror_ip", "colo_sock_mirror_port",
                    "colo_sock_compare_pri_in_id", "colo_sock_compare_pri_in_ip", "colo_checkpoint_host",
                    "colo_checkpoint_port"}


def valid_ifname(name: str) -> bool:
    """Linux's rule for a network interface name (IFNAMSIZ, no '/', ':' or whitespace)."""
    return (0 < len(name.encode("utf-8", "surrogateescape")) < 16 and name not in (".", "..")
            and not re.search(r"[/:\s,=]", name))


def parse_mac(text: str) -> str:
    """'00:16:3E:1:2:3' -> '00:16:3e:01:02:03'. Raises ConfigError."""
    match = _MAC.fullmatch(text.strip())
    if not match:
        raise ConfigError(f"mac {text!r} is not a MAC address like 00:16:3e:12:34:56")
    octets = [int(group, 16) for group in match.groups()]
    if octets[0] & 1:
        raise ConfigError(f"mac {text!r} is a multicast address; a network card needs a unicast one")
    return ":".join(f"{octet:02x}" for octet in octets)


def parse_vif_spec(spec: str) -> tuple[NicSpec, list[str]]:
    """One entry of xl.cfg's `vif = [...]` -> (NicSpec, warnings). Raises ConfigError."""
    try:
        nic, warnings = _parse_vif(spec)
    except _SpecError as error:
        raise ConfigError(f"vif {spec!r}: {error}") from None
    return replace(nic, origin=Origin("vif", spec)), warnings


def _parse_vif(spec: str) -> tuple[NicSpec, list[str]]:
    tap = mac = None
    bridge = None
    warnings: list[str] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        key, equals, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not equals:
            if key in ("trusted", "untrusted"):
                raise _SpecError(f"{key} is not supported by pyvmm")
            raise _SpecError(f"unknown vif parameter {key!r}")
        if key == "mac":
            try:
                mac = parse_mac(value)
            except ConfigError as error:
                raise _SpecError(str(error)) from None
        elif key == "vifname":
            if not valid_ifname(value):
                raise _SpecError(f"vifname {value!r} is not a valid network interface name (1 to 15 characters, "
                                 "no '/', ':', ',', '=' or spaces)")
            tap = value
        elif key == "bridge":
            bridge = value
        elif key == "type":
            if value not in ("vif", "ioemu"):
                raise _SpecError(f"type {value!r}: expected vif or ioemu")
        elif key == "model":
            warnings.append(f"model={value} is ignored: pyvmm emulates no network card, the guest must use "
                            "its Xen PV network driver (netfront)")
        elif key == "ip":
            warnings.append(f"ip={value} is ignored: pyvmm runs no hotplug scripts; configure addresses "
                            "and filtering on the tap device yourself")
        elif key in _VIF_UNSUPPORTED or key.startswith("colo_"):
            raise _SpecError(f"{key}= is not supported by pyvmm")
        else:
            raise _SpecError(f"unknown vif parameter {key}=")
    if tap is None:
        raise _SpecError("no vifname=: pyvmm connects each vif to an existing tap device named by vifname= "
                         "(create one with: ip tuntap add dev NAME mode tap)")
    if bridge is not None:
        warnings.append(f"bridge={bridge}: pyvmm does not add {tap} to a bridge; do it beforehand "
                        f"(ip link set {tap} master {bridge})")
    return NicSpec(tap, mac), warnings
