"""The virtual network interface (vif): NetBackend behind the xenbus handshake.

At InitWait the backend advertises

    feature-rx-copy=1           the only receive mode (Linux's netfront
                                requires it; page flipping is not offered)
    feature-sg, feature-gso-tcpv4, feature-gso-tcpv6,
    feature-ipv6-csum-offload   what NetBackend takes from the guest
    feature-split-event-channels  one channel per direction if the
                                frontend wants

and the frontend directory gets `mac` and `handle` (what libxl writes).
On a user network (a stream to passt, stream.py) feature-gso-tcpv4/6 are
0: no virtio_net_hdr crosses that socket, so GSO could only be undone here
in software; passt gives the guest a 65520-byte MTU by DHCP instead, which
needs feature-sg from the frontend (frames of many slots each way).
When the frontend is Initialised it reads, as Linux's netback does:

    tx-ring-ref, rx-ring-ref      one page each
    event-channel, or event-channel-tx and event-channel-rx
    request-rx-copy               must be 1
    feature-rx-notify             must be 1: the backend waits for receive
                                  buffers by asking to be notified
    feature-sg, feature-gso-tcpv4, feature-gso-tcpv6,
    feature-no-csum-offload       what the guest can receive
    multi-queue-num-queues        absent or 1 (multi-queue is not offered)

maps both rings, binds the channel(s) and attaches NetBackend. A transmit
notification runs process_tx(), again from the event loop while work is
left; the transport's file descriptor (the TAP's, or the socket to passt)
is watched by the event loop while the guest has receive buffers.
RingBroken, or a bad key, fails this vif only.

The transport is a TapDevice (tap.py) or a FrameStream (stream.py): `name`,
`fd`, `set_offload` (None: nothing to tell), `close()`; a FrameStream also
has `readv`/`writev` (a TAP's, over its framing), `offers_gso`,
`rx_frame_max`, `has_pending()` (whole frames buffered that the
descriptor's readiness no longer shows), `backlogged`/`flush()` (the rest
of a frame the socket took only in part) and `eof` (passt is gone: the
descriptor is no longer watched).
"""

from __future__ import annotations

import errno
import hashlib
import logging
from functools import partial
from typing import TYPE_CHECKING, Callable, Iterable

from .tap import TapDevice
from pyvmm.xen.hv.gnttab import GrantTable
from . import netif
from .netback import NetBackend, NetFeatures
from pyvmm.xen.backend.ring import RingBroken
from pyvmm.xen.backend.xenbus_backend import FrontendError, XenbusBackendDevice
from pyvmm.xen.xenstore import XenStore
from pyvmm.core.snapshot import SnapshotError, check_version, versioned

if TYPE_CHECKING:
    from pyvmm.core.eventloop import EventLoop
    from pyvmm.xen.hv.evtchn import BackendChannel, EventChannels

log = logging.getLogger(__name__)

XEN_OUI = (0x00, 0x16, 0x3E)
STATE_VERSION = 1
FLUSH_RETRY = 0.001  # seconds between tries to send the rest of a frame the stream took in part


def generated_mac(vm_name: str, index: int) -> str:
    """A MAC in Xen's OUI that stays the same for the same VM name and vif."""
    digest = hashlib.sha256(f"{vm_name}/vif{index}".encode()).digest()
    return ":".join(f"{octet:02x}" for octet in (*XEN_OUI, digest[0] & 0x7F, digest[1], digest[2]))


class VifDevice(XenbusBackendDevice):
    device_type = "vif"
    reopen_as_connected = False  # netfront waits for Closed when it unloads

    def __init__(self, store: XenStore, domid: int, handle: int, tap: TapDevice, mac: str, grants: GrantTable,
                 evtchn: "EventChannels", loop: "EventLoop", *, backend_domid: int = 0,
                 on_close: Callable[[], None] | None = None):
        """`tap`: the transport (a TapDevice or FrameStream); `on_close`:
        what gives it back instead of tap.close() (a shared user network)."""
        super().__init__(store, domid, handle, backend_domid=backend_domid)
        self.tap = tap
        self.mac = mac
        self.grants = grants
        self.evtchn = evtchn
        self.loop = loop
        self._on_close = on_close
        self.offers_gso = getattr(tap, "offers_gso", True)
        self.backend = NetBackend(tap.fd, grants, watch_tap=self._watch_tap, set_offload=tap.set_offload,
                                  name=f"vif{domid}.{handle}",  # as in traces and `vif=` fault rules
                                  trace=self.trace, faults=self.faults, readv=getattr(tap, "readv", None),
                                  writev=getattr(tap, "writev", None),
                                  rx_frame_max=getattr(tap, "rx_frame_max", None) or netif.PAGE_SIZE)
        self._watching = False
        self._flush_timer = None
        self._generation = 0  # bumped at every (dis)connect: stale callbacks do nothing
        self._tx_scheduled = False
        self._plan: dict | None = None  # what connect() attached (saved by a snapshot)

    # --- xenbus ---------------------------------------------------------------------

    def frontend_keys(self) -> dict[str, str]:
        return {"mac": self.mac, "handle": str(self.devid)}

    def backend_keys(self) -> dict[str, str]:
        return {
            "mac": self.mac,
            "handle": str(self.devid),
            "type": "vif",
            "feature-rx-copy": "1",
            "feature-rx-flip": "0",
            "feature-sg": "1",
            "feature-gso-tcpv4": "1" if self.offers_gso else "0",
            "feature-gso-tcpv6": "1" if self.offers_gso else "0",
            "feature-ipv6-csum-offload": "1",
            "feature-split-event-channels": "1",
        }

    def _flag(self, key: str) -> bool:
        return self.read_frontend_uint(key, 0) != 0

    def connect(self) -> None:
        if self.read_frontend_uint("multi-queue-num-queues", 1) != 1:
            raise FrontendError("multi-queue-num-queues: only one queue is offered")
        if not self._flag("request-rx-copy"):
            raise FrontendError("the frontend did not request rx-copy, the only receive mode offered", errno.EOPNOTSUPP)
        if not self._flag("feature-rx-notify"):
            raise FrontendError("the frontend lacks feature-rx-notify", errno.EOPNOTSUPP)
        gso = self.offers_gso
        features = NetFeatures(sg=self._flag("feature-sg"), csum=not self._flag("feature-no-csum-offload"),
                               gso_tcpv4=gso and self._flag("feature-gso-tcpv4"),
                               gso_tcpv6=gso and self._flag("feature-gso-tcpv6"))
        split = self.read_frontend("event-channel-tx") is not None
        plan = {"tx_ref": self.read_frontend_uint("tx-ring-ref"), "rx_ref": self.read_frontend_uint("rx-ring-ref"),
                "features": {"sg": bool(features.sg), "csum": bool(features.csum), "gso_tcpv4": bool(features.gso_tcpv4),
                             "gso_tcpv6": bool(features.gso_tcpv6)},
                "ports": ([self.read_frontend_uint("event-channel-tx"), self.read_frontend_uint("event-channel-rx")]
                          if split else [self.read_frontend_uint("event-channel")])}
        self._attach(plan)
        self._tx_notified(self._generation)  # anything queued before we looked

    def _attach(self, plan: dict, saved_channels: list | None = None) -> None:
        """Map both rings, bind (or, restoring, claim) the channel(s), attach."""
        tx_page = self.map_ring_page("tx-ring-ref", plan["tx_ref"])
        rx_page = self.map_ring_page("rx-ring-ref", plan["rx_ref"])
        self._generation += 1
        generation = self._generation
        split = len(plan["ports"]) == 2
        keys = ("event-channel-tx", "event-channel-rx") if split else ("event-channel",)
        callbacks = ((partial(self._tx_notified, generation), partial(self._rx_notified, generation)) if split
                     else (partial(self._notified, generation),))
        channels = []
        for index, (key, callback) in enumerate(zip(keys, callbacks)):
            if saved_channels is None:
                channels.append(self.bind_channel(key, plan["ports"][index], callback))
            else:
                saved = saved_channels[index]
                channels.append(self.claim_channel(key, saved["guest_port"], saved["dom0_port"], callback))
        tx_channel, rx_channel = channels[0], channels[-1]
        features = NetFeatures(**plan["features"])
        try:
            self.backend.attach([tx_page], [rx_page], features, notify_tx=tx_channel.notify,
                                notify_rx=rx_channel.notify)
        except (ValueError, RingBroken) as error:
            raise FrontendError(f"rings: {error}") from None
        self._plan = plan
        self._limited.info("%s: connected to %s (mac %s, %s, offload %#x)", self.backend.name, self.tap.name, self.mac,
                      "split event channels" if split else "one event channel", features.tun_offload())

    # --- snapshot (pyvmm/core/snapshot.py) --------------------------------------------

    def save_state(self) -> dict:
        """Its xenbus state and, while connected, what it attached: ring refs,
        channel(s) (both ends), the features the frontend asked for, and the
        receive buffers the guest posted that no frame has filled yet.
        Everything runs on the event thread, so between two callbacks no
        transmit request or response is in flight (checked). Frames on their
        way in the host's transport (the TAP, passt's socket) are not the
        guest's: they are not saved, as a real NIC's cable loses them."""
        connection = None
        if self.connected and self._plan is not None:
            try:
                posted = self.backend.posted_rx_buffers()
            except ValueError as error:
                raise SnapshotError(f"{self.backend.name}: {error}") from None
            connection = dict(self._plan, posted_rx=posted, channels=[
                {"guest_port": channel.guest_port, "dom0_port": channel.dom0_port} for channel in self._channels])
        return versioned(STATE_VERSION, xenbus=self.xenbus_state(), connection=connection)

    def restore_state(self, state: dict) -> None:
        """Into the device just built and started, after the grant table,
        event channels and xenstore are restored: both rings are attached
        again at the indexes in guest RAM, the channels claimed and the
        posted receive buffers taken back."""
        check_version(state, "VifDevice", STATE_VERSION)
        if not self.restore_xenbus_state(state.get("xenbus")):
            if state.get("connection") is not None:
                raise SnapshotError(f"{self.backend.name}: a connection saved for a device that was not connected")
            return
        plan = self._checked_plan(state.get("connection"))
        try:
            self._attach(plan, plan["channels"])
            self.backend.repost_rx_buffers([tuple(buffer) for buffer in plan["posted_rx"]])
        except (FrontendError, RingBroken) as error:
            self._disconnect()
            raise SnapshotError(f"{self.backend.name}: cannot attach the saved rings again: {error}") from None
        except SnapshotError:
            self._disconnect()
            raise
        self.connected = True

    def _checked_plan(self, plan) -> dict:
        def natural(value, end=1 << 32) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < end

        ok = isinstance(plan, dict)
        if ok:
            ports, channels, posted, features = (plan.get(key) for key in ("ports", "channels", "posted_rx",
                                                                            "features"))
            ok = (natural(plan.get("tx_ref")) and natural(plan.get("rx_ref")) and isinstance(ports, list)
                  and len(ports) in (1, 2) and all(natural(port) for port in ports)
                  and isinstance(channels, list) and len(channels) == len(ports)
                  and all(isinstance(c, dict) and natural(c.get("dom0_port"))
                          and (c.get("guest_port") is None or natural(c["guest_port"])) for c in channels)
                  and isinstance(posted, list) and len(posted) <= netif.PAGE_SIZE // netif.RX_ENTRY_SIZE
                  and all(isinstance(b, list) and len(b) == 2 and natural(b[0], 1 << 16) and natural(b[1])
                          for b in posted)
                  and isinstance(features, dict) and set(features) == {"sg", "csum", "gso_tcpv4", "gso_tcpv6"}
                  and all(isinstance(value, bool) for value in features.values()))
        if not ok:
            raise SnapshotError(f"{self.backend.name}: bad saved connection {plan!r:.200}")
        return plan

    def disconnect(self) -> None:
        self._generation += 1
        self.backend.detach()
        self.release_connection()
        self._plan = None

    def close(self) -> None:
        super().close()
        self._watch_tap(False)
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._on_close is not None:
            self._on_close()
        else:
            self.tap.close()
        stats = self.backend.stats
        log.info("%s: guest sent %d packets (%d bytes, %d refused), received %d (%d bytes, %d dropped)",
                 self.backend.name, stats.tx_packets, stats.tx_bytes, stats.tx_errors, stats.rx_packets,
                 stats.rx_bytes, stats.rx_dropped)

    # --- the data path ------------------------------------------------------------------

    def _watch_tap(self, on: bool) -> None:
        on = on and not getattr(self.tap, "eof", False)
        if on == self._watching:
            return
        self._watching = on
        if on:
            self.loop.add_reader(self.tap.fd, self._tap_readable)
            if getattr(self.tap, "has_pending", None) is not None and self.tap.has_pending():
                self.loop.call_later(0, self._tap_readable)  # frames already read off the socket
        else:
            self.loop.remove_reader(self.tap.fd)

    def _guarded(self, what: str, action: Callable[[], object]) -> object:
        try:
            return action()
        except RingBroken as error:
            self.fail(f"{what}: {error}", errno.EPROTO)
        except Exception as error:
            log.exception("%s: %s failed", self.backend.name, what)
            self.fail(f"internal error in {what}: {error}")
        return None

    def _notified(self, generation: int) -> None:
        self._tx_notified(generation)
        self._rx_notified(generation)

    def _tx_notified(self, generation: int) -> None:
        if generation != self._generation or self.closed or not self.backend.attached:
            return
        self._tx_scheduled = False
        if self._guarded("transmit", self.backend.process_tx) and not self._tx_scheduled:
            self._tx_scheduled = True
            self.loop.call_later(0, partial(self._tx_notified, generation))
        if getattr(self.tap, "backlogged", False) and self._flush_timer is None:
            self._flush_timer = self.loop.call_later(FLUSH_RETRY, self._flush)

    def _flush(self) -> None:
        """Retry sending the rest of a frame the stream took only in part."""
        self._flush_timer = None
        if not self.closed and not self.tap.flush():
            self._flush_timer = self.loop.call_later(FLUSH_RETRY, self._flush)

    def _rx_notified(self, generation: int) -> None:
        if generation != self._generation or self.closed or not self.backend.attached:
            return
        self._guarded("receive", self.backend.rx_notified)

    def _tap_readable(self) -> None:
        if self.closed or not self.backend.attached or not self._watching:
            self._watch_tap(False)
            return
        self._guarded("receive", self.backend.process_rx)
        tap = self.tap
        if getattr(tap, "eof", False):
            self._watch_tap(False)  # passt is gone: its socket stays readable (end-of-file)
        elif self._watching and getattr(tap, "has_pending", None) is not None and tap.has_pending():
            self.loop.call_later(0, self._tap_readable)  # read off the socket already, not readable any more


def create_vifs(domain, nets: Iterable) -> list[VifDevice]:
    """One started VifDevice per NicSpec of a XenDomain, its TAP device opened
    (created if needed) and up, or its user network's passt started or
    connected (passt.py); on an error the ones already made are closed again."""
    devices: list[VifDevice] = []
    try:
        for index, net in enumerate(nets):
            name = domain.machine.config.name
            mac = net.mac or generated_mac(name, index)
            on_close = None
            if net.user:
                from .passt import open_user_network

                network = open_user_network(net, (name, index))
                transport, on_close = network.stream, network.release
            else:
                transport = TapDevice.open(net.tap)
            try:
                device = VifDevice(domain.store, domain.domid, index, transport, mac, domain.gnttab, domain.evtchn,
                                   domain.loop, on_close=on_close)
            except BaseException:
                on_close() if on_close is not None else transport.close()
                raise
            devices.append(device)
            device.start()
            log.info("vif %d: %s, mac %s", index, transport.name if net.user else f"tap {net.tap}", mac)
    except BaseException:
        for device in devices:
            device.close()
        raise
    return devices
