"""The virtual network interface (vif): NetBackend behind the xenbus handshake.

At InitWait the backend advertises

    feature-rx-copy=1           the only receive mode (Linux's netfront
                                requires it; page flipping is not offered)
    feature-sg, feature-gso-tcpv4, feature-gso-tcpv6,
    feature-ipv6-csum-offload   what NetBackend takes from the guest
    feature-split-event-channels  one channel per direction if the
                                frontend wants

and the frontend directory gets `mac` and `handle` (what libxl writes).
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
left; the TAP's file descriptor is watched by the event loop while the
guest has receive buffers. RingBroken, or a bad key, fails this vif only.
"""

from __future__ import annotations

import errno
import hashlib
import logging
from functools import partial
from typing import TYPE_CHECKING, Callable, Iterable

from .tap import TapDevice
from pyvmm.xen.hv.gnttab import GrantTable
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


def generated_mac(vm_name: str, index: int) -> str:
    """A MAC in Xen's OUI that stays the same for the same VM name and vif."""
    digest = hashlib.sha256(f"{vm_name}/vif{index}".encode()).digest()
    return ":".join(f"{octet:02x}" for octet in (*XEN_OUI, digest[0] & 0x7F, digest[1], digest[2]))


class VifDevice(XenbusBackendDevice, SavesNoStateYet):  # until its save_state() is written (core/snapshot.py)
    device_type = "vif"
    reopen_as_connected = False  # netfront waits for Closed when it unloads

    def __init__(self, store: XenStore, domid: int, handle: int, tap: TapDevice, mac: str, grants: GrantTable,
                 evtchn: "EventChannels", loop: "EventLoop", *, backend_domid: int = 0):
        super().__init__(store, domid, handle, backend_domid=backend_domid)
        self.tap = tap
        self.mac = mac
        self.grants = grants
        self.evtchn = evtchn
        self.loop = loop
        self.backend = NetBackend(tap.fd, grants, watch_tap=self._watch_tap, set_offload=tap.set_offload,
                                  name=f"vif{domid}.{handle}",  # as in traces and `vif=` fault rules
                                  trace=self.trace, faults=self.faults)
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
            "feature-gso-tcpv4": "1",
            "feature-gso-tcpv6": "1",
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
        features = NetFeatures(sg=self._flag("feature-sg"), csum=not self._flag("feature-no-csum-offload"),
                               gso_tcpv4=self._flag("feature-gso-tcpv4"), gso_tcpv6=self._flag("feature-gso-tcpv6"))
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
        self.tap.close()
        stats = self.backend.stats
        log.info("%s: guest sent %d packets (%d bytes, %d refused), received %d (%d bytes, %d dropped)",
                 self.backend.name, stats.tx_packets, stats.tx_bytes, stats.tx_errors, stats.rx_packets,
                 stats.rx_bytes, stats.rx_dropped)

    # --- the data path ------------------------------------------------------------------

    def _watch_tap(self, on: bool) -> None:
        if on:
            self.loop.add_reader(self.tap.fd, self._tap_readable)
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

    def _rx_notified(self, generation: int) -> None:
        if generation != self._generation or self.closed or not self.backend.attached:
            return
        self._guarded("receive", self.backend.rx_notified)

    def _tap_readable(self) -> None:
        if self.closed or not self.backend.attached:
            self.loop.remove_reader(self.tap.fd)
            return
        self._guarded("receive", self.backend.process_rx)


def create_vifs(domain, nets: Iterable) -> list[VifDevice]:
    """One started VifDevice per NicSpec (tap, mac) of a XenDomain, its TAP
    device opened (created if needed) and up; on an error the ones already
    made are closed again."""
    devices: list[VifDevice] = []
    try:
        for index, net in enumerate(nets):
            mac = net.mac or generated_mac(domain.machine.config.name, index)
            tap = TapDevice.open(net.tap)
            try:
                device = VifDevice(domain.store, domain.domid, index, tap, mac, domain.gnttab, domain.evtchn,
                                   domain.loop)
            except BaseException:
                tap.close()
                raise
            devices.append(device)
            device.start()
            log.info("vif %d: tap %s, mac %s", index, net.tap, mac)
    except BaseException:
        for device in devices:
            device.close()
        raise
    return devices
