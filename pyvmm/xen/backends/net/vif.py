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
from pyvmm.core.snapshot import SavesNoStateYet

if TYPE_CHECKING:
    from pyvmm.core.eventloop import EventLoop
    from pyvmm.xen.hv.evtchn import BackendChannel, EventChannels

log = logging.getLogger(__name__)

XEN_OUI = (0x00, 0x16, 0x3E)
FLUSH_RETRY = 0.001  # seconds between tries to send the rest of a frame the stream took in part


def generated_mac(vm_name: str, index: int) -> str:
    """A MAC in Xen's OUI that stays the same for the same VM name and vif."""
    digest = hashlib.sha256(f"{vm_name}/vif{index}".encode()).digest()
    return ":".join(f"{octet:02x}" for octet in (*XEN_OUI, digest[0] & 0x7F, digest[1], digest[2]))


class VifDevice(XenbusBackendDevice, SavesNoStateYet):  # until its save_state() is written (core/snapshot.py)
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
        tx_page = self._map_ring("tx-ring-ref")
        rx_page = self._map_ring("rx-ring-ref")
        self._generation += 1
        generation = self._generation
        if self.read_frontend("event-channel-tx") is not None:
            tx_channel = self._bind("event-channel-tx", partial(self._tx_notified, generation))
            rx_channel = self._bind("event-channel-rx", partial(self._rx_notified, generation))
        else:
            tx_channel = rx_channel = self._bind("event-channel", partial(self._notified, generation))
        try:
            self.backend.attach([tx_page], [rx_page], features, notify_tx=tx_channel.notify,
                                notify_rx=rx_channel.notify)
        except (ValueError, RingBroken) as error:
            raise FrontendError(f"rings: {error}") from None
        self._limited.info("%s: connected to %s (mac %s, %s, offload %#x)", self.backend.name, self.tap.name, self.mac,
                      "split event channels" if tx_channel is not rx_channel else "one event channel",
                      features.tun_offload())
        self._tx_notified(generation)  # anything queued before we looked

    def _map_ring(self, key: str) -> memoryview:
        return self.map_ring_page(key, self.read_frontend_uint(key))

    def _bind(self, key: str, callback: Callable[[], None]) -> "BackendChannel":
        return self.bind_channel(key, self.read_frontend_uint(key), callback)

    def disconnect(self) -> None:
        self._generation += 1
        self.backend.detach()
        self.release_connection()

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
