"""A PV network interface as `pyvmm run --net` and xl.cfg's `vif = [...]` describe it: NicSpec.

Two grammars, one spec: `--net tap=IFNAME[,mac=MAC]` or
`--net user[,mac=MAC][,hostfwd=...]...[,socket=PATH][,pcap=FILE]`
(parse_net_option) and xl's vif syntax, xl-network-configuration(5)
(parse_vif_spec), of which pyvmm honours vifname= (the host's TAP device)
and mac=, plus its own extension type=user with hostfwd=, socket= and pcap=
(real xl refuses those).

A user network is one passt process (docs/NETWORKING.md): pyvmm starts it,
or attaches to one started beforehand (socket=PATH). A host forward, as
QEMU writes it:

    hostfwd=[tcp|udp]:[HOSTADDR]:HOSTPORT-[:]GUESTPORT

HOSTADDR is an IPv4 address or an IPv6 one in brackets; empty: every
address of the host. The guest's address is the one passt gives it by
DHCP, so a guest address may not be named.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
from dataclasses import dataclass, field, replace

from pyvmm.config import ConfigError, DeviceSpec, Origin

PASST = "passt"  # the program, looked up in PATH
PASST_PACKAGE = "passt"  # Debian's and Ubuntu's package of it


@dataclass(frozen=True)
class HostForward:
    """One host port forwarded to the guest: protocol 'tcp' or 'udp', the
    host's address ('' for all) and port, the guest's port."""

    protocol: str
    host_port: int
    guest_port: int
    host_address: str = ""

    def __str__(self) -> str:
        address = self.host_address
        if ":" in address:
            address = f"[{address}]"
        return f"{self.protocol}:{address}:{self.host_port}-:{self.guest_port}"

    def passt_option(self) -> list[str]:
        """passt's -t/-u option for it: [ADDRESS/]HOSTPORT:GUESTPORT."""
        where = f"{self.host_address}/" if self.host_address else ""
        return ["-t" if self.protocol == "tcp" else "-u", f"{where}{self.host_port}:{self.guest_port}"]


_HOSTFWD = re.compile(r"(?:(tcp|udp):)?(\[[^\]]*\]|[^:\[\]-]*):([0-9]+)-:?([0-9]+)")


def parse_hostfwd(text: str) -> HostForward:
    """'tcp:127.0.0.1:8080-:80' -> HostForward. Raises ConfigError."""
    match = _HOSTFWD.fullmatch(text)
    usage = "expected [tcp|udp]:[HOSTADDR]:HOSTPORT-:GUESTPORT, e.g. tcp::2222-:22"
    if not match:
        if re.fullmatch(r"(?:(tcp|udp):)?[^-]*-[^:]+:[0-9]+", text):
            raise ConfigError(f"hostfwd {text!r}: the guest's address cannot be chosen (passt gives the guest "
                              f"its address); {usage}")
        raise ConfigError(f"hostfwd {text!r}: {usage}")
    protocol, address, host_port, guest_port = match.groups()
    address = address.strip("[]") if address.startswith("[") else address
    if address:
        try:
            address = str(ipaddress.ip_address(address))
        except ValueError:
            raise ConfigError(f"hostfwd {text!r}: {address!r} is not an IPv4 or IPv6 address") from None
    ports = []
    for port in (host_port, guest_port):
        number = int(port)
        if not 0 < number < 65536:
            raise ConfigError(f"hostfwd {text!r}: port {port} is not between 1 and 65535")
        ports.append(number)
    return HostForward(protocol or "tcp", ports[0], ports[1], address)


@dataclass(frozen=True)
class NicSpec(DeviceSpec):
    """A network interface for the guest: on the host's TAP device `tap`, or
    (tap None) on a user network through passt, with its port forwards, or
    attached to the passt listening on `socket`."""

    kind = "net"
    option = "--net"

    tap: str | None
    mac: str | None = None  # "00:16:3e:12:34:56"; None: a stable one made from the VM's name
    hostfwd: tuple[HostForward, ...] = ()
    socket: str | None = None  # a passt started by the user: its UNIX socket
    pcap: str | None = None  # the passt pyvmm starts writes the guest's frames here (passt --pcap)
    origin: Origin | None = field(default=None, compare=False, repr=False)

    @property
    def user(self) -> bool:
        return self.tap is None

    def _user_options(self) -> str:
        return "".join([*(f",hostfwd={forward}" for forward in self.hostfwd),
                        *([f",socket={self.socket}"] if self.socket else []),
                        *([f",pcap={self.pcap}"] if self.pcap else [])])

    def option_text(self) -> str:
        """The network option of `pyvmm run`: tap=IFNAME[,mac=MAC] or user[,...]."""
        mac = f",mac={self.mac}" if self.mac else ""
        if self.user:
            return "user" + mac + self._user_options()
        return f"tap={self.tap}" + mac

    def to_xl(self) -> str:
        mac = f",mac={self.mac}" if self.mac else ""
        if self.user:
            return "type=user" + mac + self._user_options()
        return f"vifname={self.tap}" + mac

    def unique(self) -> tuple[str, str] | None:
        if self.user:
            return ("passt socket", self.socket) if self.socket else None
        return ("TAP device", self.tap)

    def check(self) -> None:
        if self.user and self.socket is None and shutil.which(PASST) is None:
            raise self.error(f"a user network needs passt, which is not installed (in PATH); on Debian or "
                             f"Ubuntu: apt install {PASST_PACKAGE}")


def parse_net_option(text: str, index: int = 0) -> NicSpec:
    """One `--net tap=IFNAME[,mac=MAC]` or `--net user[,mac=MAC][,hostfwd=...]...[,socket=PATH][,pcap=FILE]`."""
    tap = mac = socket = pcap = None
    user = False
    forwards: list[HostForward] = []
    for position, option in enumerate(text.split(",")):
        key, equals, value = option.partition("=")
        try:
            if position == 0 and option == "user":
                user = True
            elif key == "tap" and valid_ifname(value):
                tap = value
            elif key == "mac":
                mac = parse_mac(value)
            elif key == "hostfwd" and user:
                forwards.append(parse_hostfwd(value))
            elif key == "socket" and user and value:
                socket = value
            elif key == "pcap" and user and value:
                pcap = value
            else:
                raise ConfigError(f"unknown or bad option {option!r} (tap=IFNAME or user, mac=MAC; "
                                  "with user: hostfwd=..., socket=PATH, pcap=FILE)")
        except ConfigError as error:
            raise ConfigError(f"--net {text!r}: {error}") from None
    if user and tap is not None:
        raise ConfigError(f"--net {text!r}: user and tap= exclude each other")
    if user:
        try:
            return _user_nic(mac, forwards, socket, pcap, Origin("--net", text))
        except ConfigError as error:
            raise ConfigError(f"--net {text!r}: {error}") from None
    if tap is None:
        raise ConfigError(f"--net {text!r}: expected tap=IFNAME[,mac=MAC] or user[,mac=MAC][,hostfwd=...]")
    return NicSpec(tap, mac, origin=Origin("--net", text))


def _user_nic(mac, forwards, socket, pcap, origin: Origin) -> NicSpec:
    """The user network's spec; raises ConfigError (its message without the origin)."""
    if socket is not None and forwards:
        raise ConfigError("hostfwd= forwards are set up by the passt pyvmm "
                          "starts; for one started beforehand (socket=), give them to it (passt -t/-u)")
    if socket is not None and pcap is not None:
        raise ConfigError("pcap= is written by the passt pyvmm starts; for one started beforehand "
                          "(socket=), give it --pcap FILE")
    seen: dict[tuple[str, str, int], HostForward] = {}
    for forward in forwards:
        # One host port can be bound once: the same one on all addresses and on one of them clash too.
        for other in seen.values():
            if (other.protocol, other.host_port) == (forward.protocol, forward.host_port) and (
                    not other.host_address or not forward.host_address
                    or other.host_address == forward.host_address):
                raise ConfigError(f"hostfwd {forward} and {other} forward the "
                                  "same host port")
        seen[(forward.protocol, forward.host_address, forward.host_port)] = forward
    return NicSpec(None, mac, tuple(forwards), socket, pcap, origin=origin)


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
    tap = mac = socket = pcap = None
    bridge = None
    user = False
    forwards: list[HostForward] = []
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
            if value == "user":
                user = True
            elif value not in ("vif", "ioemu"):
                raise _SpecError(f"type {value!r}: expected vif, ioemu or (pyvmm's) user")
        elif key == "hostfwd":
            try:
                forwards.append(parse_hostfwd(value))
            except ConfigError as error:
                raise _SpecError(str(error)) from None
        elif key == "socket":
            if not value:
                raise _SpecError("socket= needs the path of passt's socket")
            socket = value
        elif key == "pcap":
            if not value:
                raise _SpecError("pcap= needs the path of the capture file")
            pcap = value
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
    if (forwards or socket or pcap) and not user:
        raise _SpecError("hostfwd=, socket= and pcap= belong to a user network: add type=user")
    if user:
        if tap is not None or bridge is not None:
            raise _SpecError("type=user is a user network through passt: it has no vifname= or bridge=")
        try:
            return _user_nic(mac, forwards, socket, pcap, Origin("vif", spec)), warnings
        except ConfigError as error:
            raise _SpecError(str(error)) from None
    if tap is None:
        raise _SpecError("no vifname=: pyvmm connects each vif to an existing tap device named by vifname= "
                         "(create one with: ip tuntap add dev NAME mode tap), or type=user for a user "
                         "network through passt")
    if bridge is not None:
        warnings.append(f"bridge={bridge}: pyvmm does not add {tap} to a bridge; do it beforehand "
                        f"(ip link set {tap} master {bridge})")
    return NicSpec(tap, mac), warnings
