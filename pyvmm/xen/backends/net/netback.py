"""The network backend: one virtual interface (vif) between a guest's netif
rings and a TAP device.

This is the device model only; pyvmm/xen/backends/net/vif.py runs the xenbus handshake,
maps the ring pages, binds the event channel(s) and calls `attach()`,
`process_tx()` when the frontend notifies and `process_rx()` when the TAP
device is readable (or the frontend posted receive buffers while the
backend was waiting for them).

Data never passes through Python objects:

- Transmit: the grant of every slot of a packet is mapped read-only and
  the packet goes to the TAP with one os.writev() of the virtio_net_hdr
  followed by memoryviews of the granted fragments. When the header is
  derived from the packet's own headers (checksum or GSO offload), those
  are read once into a private copy, judged there, and the copy is what
  is written: the guest can change its pages at any time, and must not be
  able to send headers other than the ones the virtio_net_hdr was made for.
- Receive: the frontend's posted pages are mapped writable as they are
  taken off the ring, and a frame is read from the TAP with one os.readv()
  straight into them: [virtio_net_hdr, page 0, page 2, page 3, ...].
  Slot 1 is skipped because a GSO packet needs it for its extra-info entry
  (the protocol puts that right after the first data slot); a frame that
  turns out to need several slots and is not GSO (an MTU above one page)
  has its pages moved down one slot, a rare path.

The grants of a round (one process_rx() or process_tx() call) are mapped
in batches (GrantTable.map_many) and its responses written to the ring at
once; the receive buffers' grants are given back just before the
responses are published, since the frontend ends its access when it sees
them.

Offloads travel in the headers: a guest's NETTXF_csum_blank becomes
VIRTIO_NET_HDR_F_NEEDS_CSUM with the checksum's position found from the
packet's IPv4/IPv6 and TCP/UDP headers (netif carries only the flag), and
its GSO extra becomes the header's gso_type/gso_size, so a 64 KiB TCP
segment reaches the host's stack in one write. The other way, the TAP's
NEEDS_CSUM / DATA_VALID become NETRXF_csum_blank / data_validated and its
GSO packets get a GSO extra, as far as the frontend said it can take them
(`set_features`, which also tells the TAP through TUNSETOFFLOAD).

A hostile frontend. A packet with a bad grant, a slot leaving its page, a
size below an Ethernet header or a fragment sum above the first slot's
size, too many slots, an unknown extra or an unparseable checksum request
is answered XEN_NETIF_RSP_ERROR (every slot of it) and dropped. A receive
buffer whose grant cannot be mapped is answered with an error response of
its own. Ring indices that cannot be (a producer more than a ring ahead, a
packet whose chain runs past the published requests) raise RingBroken: the
caller disconnects this vif. Requests are copied off the ring before they
are looked at.

Threads: everything runs on the VMM's event thread.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from collections import deque
from dataclasses import dataclass
from itertools import islice
from operator import attrgetter
from typing import Callable, Sequence

from pyvmm.core.faults import NULL_FAULTS, FaultInjector, FaultRule, corrupt
from pyvmm.core.trace import NULL_TRACE, Tracer
from . import netif
from pyvmm.xen.hv.gnttab import GrantError, GrantMapping, GrantTable
from .netif import (
    ETH_HLEN,
    MAX_SLOTS_PER_PACKET,
    NETRXF_csum_blank,
    NETRXF_data_validated,
    NETRXF_extra_info,
    NETRXF_more_data,
    NETTXF_csum_blank,
    NETTXF_extra_info,
    NETTXF_more_data,
    PAGE_SIZE,
    RX_ENTRY_SIZE,
    TX_ENTRY_SIZE,
    XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_EXTRA_TYPE_MAX,
    XEN_NETIF_EXTRA_TYPE_NONE,
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
    XEN_NETIF_RSP_ERROR,
    XEN_NETIF_RSP_NULL,
    XEN_NETIF_RSP_OKAY,
)
from pyvmm.xen.backend.ring import BackRing, RingBroken
from .tap import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VNET_HDR,
    VNET_HDR_SIZE,
)

log = logging.getLogger(__name__)

__all__ = ["NetBackend", "NetFeatures", "RingBroken", "checksum_position"]

RX_BATCH = 64  # frames read from the TAP between two pushes of responses
TX_ROUNDS = 4  # ring drains per process_tx() call before yielding to the loop
MAX_FRAME = 0x10000 + ETH_HLEN  # the largest GSO frame the TAP hands out
GSO_RX_SLOTS = 1 + (MAX_FRAME + PAGE_SIZE - 1) // PAGE_SIZE  # 17 pages and the extra-info slot

_GSO_TO_VNET = {XEN_NETIF_GSO_TYPE_TCPV4: VIRTIO_NET_HDR_GSO_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6: VIRTIO_NET_HDR_GSO_TCPV6}
_VNET_TO_GSO = {value: key for key, value in _GSO_TO_VNET.items()}

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
IPPROTO_TCP = 6
IPPROTO_UDP = 17
_IPV6_EXTENSIONS = {0, 43, 60}  # hop-by-hop, routing, destination options: (len + 1) * 8 bytes
_IPV6_FRAGMENT = 44
HEADER_PEEK = 192  # bytes of a packet's start enough for its Ethernet, IP and L4 headers
_PLAIN_HEADER = bytes(VNET_HDR_SIZE)


@dataclass(frozen=True)
class NetFeatures:
    """What the frontend said it can take (its feature-* keys)."""

    sg: bool = False
    csum: bool = True  # not feature-no-csum-offload
    gso_tcpv4: bool = False
    gso_tcpv6: bool = False

    def tun_offload(self) -> int:
        flags = TUN_F_CSUM if self.csum else 0
        if self.csum and self.sg and self.gso_tcpv4:
            flags |= TUN_F_TSO4
        if self.csum and self.sg and self.gso_tcpv6:
            flags |= TUN_F_TSO6
        return flags


@dataclass
class NetStats:
    tx_packets: int = 0
    tx_bytes: int = 0
    tx_errors: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    rx_dropped: int = 0
    rx_errors: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class _Drop(Exception):
    """This packet is answered with an error and dropped."""


def checksum_position(header: bytes) -> tuple[int, int, int] | None:
    """(csum_start, csum_offset, l4 header length) of a TCP or UDP packet,
    from its first bytes (Ethernet, optional VLAN tag, IPv4 or IPv6 with
    extension headers); None when it is not one or the headers are cut."""
    try:
        offset = ETH_HLEN
        ethertype = int.from_bytes(header[12:14], "big")
        if ethertype == ETH_P_8021Q:
            ethertype = int.from_bytes(header[16:18], "big")
            offset += 4
        if ethertype == ETH_P_IP:
            ihl = (header[offset] & 0x0F) * 4
            if ihl < 20:
                return None
            protocol = header[offset + 9]
            offset += ihl
        elif ethertype == ETH_P_IPV6:
            protocol = header[offset + 6]
            offset += 40
            for _ in range(8):
                if protocol in _IPV6_EXTENSIONS:
                    protocol, offset = header[offset], offset + (header[offset + 1] + 1) * 8
                elif protocol == _IPV6_FRAGMENT:
                    protocol, offset = header[offset], offset + 8
                else:
                    break
        else:
            return None
        if protocol == IPPROTO_TCP:
            length = (header[offset + 12] >> 4) * 4
            if length < 20 or offset + length > len(header):
                return None
            return offset, 16, length
        if protocol == IPPROTO_UDP:
            if offset + 8 > len(header):
                return None
            return offset, 6, 8
    except IndexError:
        pass
    return None


class _RxBuffer:
    """A receive buffer the frontend posted, taken off the ring."""

    __slots__ = ("id", "ref", "mapping", "view", "error")

    def __init__(self, request_id: int, mapping: GrantMapping | None, error: str = "", ref: int | None = None):
        self.id = request_id
        self.ref = mapping.ref if mapping is not None else ref  # its grant (kept for a snapshot)
        self.mapping = mapping  # None: its grant could not be mapped (error says why)
        self.view = mapping.view if mapping is not None else None
        self.error = error


_buffer_view = attrgetter("view")
_pack_rx_response = netif.RX_RESPONSE.pack
# A tx response fills its whole 12-byte slot (the bytes after id and status
# are padding the frontend never reads), so a run of them is one copy.
_pack_tx_slot = struct.Struct(netif.TX_RESPONSE.format + f"{TX_ENTRY_SIZE - netif.TX_RESPONSE.size}x").pack
_parse_tx_request = netif.parse_tx_request


class _TxPacket:
    """One packet's slots: its data requests and its extra-info entries.
    In the ring the extras come right after the first data request."""

    __slots__ = ("data", "extras", "extra_ids")

    def __init__(self, first: netif.TxRequest):
        self.data = [first]
        self.extras: list[netif.Extra] = []
        self.extra_ids: list[int] = []  # the id field of each extra's slot, echoed in its RSP_NULL

    @property
    def slot_count(self) -> int:
        return len(self.data) + len(self.extras)


class NetBackend:
    """One vif's data path; `tap_fd` is a non-blocking TAP file descriptor
    with a 10-byte virtio_net_hdr (or, with `readv`/`writev` given, the
    descriptor of a transport that behaves as one), `grants` the guest's grant table.
    `watch_tap(on)` starts or stops calling process_rx() when the TAP is
    readable; `set_offload(flags)` is TUNSETOFFLOAD (None: nothing to tell)."""

    def __init__(self, tap_fd: int, grants: GrantTable, *, watch_tap: Callable[[bool], None],
                 set_offload: Callable[[int], None] | None = None, name: str = "vif",
                 trace: Tracer = NULL_TRACE, faults: FaultInjector = NULL_FAULTS,
                 readv: Callable[[list], int] | None = None, writev: Callable[[list], int] | None = None,
                 rx_frame_max: int = PAGE_SIZE):
        self.tap_fd = tap_fd
        # The transport (vif.py): a TAP's own readv/writev, or a stream's that
        # behave the same way (stream.py); rx_frame_max: the largest frame it
        # gives without GSO.
        self._readv = readv if readv is not None else lambda buffers: os.readv(self.tap_fd, buffers)
        self._writev = writev if writev is not None else lambda parts: os.writev(self.tap_fd, parts)
        self.rx_frame_max = rx_frame_max
        self._trace, self._faults = trace, faults  # the VM's
        self.grants = grants
        self.watch_tap = watch_tap
        self.set_offload = set_offload
        self.name = name
        self.features = NetFeatures()
        self.stats = NetStats()
        self.tx_ring: BackRing | None = None
        self.rx_ring: BackRing | None = None
        self.notify_tx: Callable[[], None] = _nothing
        self.notify_rx: Callable[[], None] = _nothing
        self._rx_posted: deque[_RxBuffer] = deque()
        self._rx_unusable = 0  # posted buffers whose grant could not be mapped
        # Buffers answered in this process_rx() round: their grants are given
        # back together, before the responses are published.
        self._rx_answered: list[GrantMapping] = []
        self._rx_responses = bytearray()  # this round's responses, written to the ring at its end
        self._rx_header = bytearray(VNET_HDR_SIZE)
        self._reading = False

    # --- connection -------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return self.tx_ring is not None

    def attach(self, tx_pages: Sequence[memoryview], rx_pages: Sequence[memoryview], features: NetFeatures, *,
               notify_tx: Callable[[], None], notify_rx: Callable[[], None]) -> None:
        """Take the frontend's rings (raises RingBroken or ValueError) and start receiving."""
        self.detach()
        tx_ring = BackRing(tx_pages, TX_ENTRY_SIZE)
        rx_ring = BackRing(rx_pages, RX_ENTRY_SIZE)
        self.tx_ring, self.rx_ring = tx_ring, rx_ring
        self.features = features
        self.notify_tx, self.notify_rx = notify_tx, notify_rx
        if self.set_offload is not None:
            self.set_offload(features.tun_offload())
        self._start_reading()

    def detach(self) -> None:
        was_attached = self.attached
        self._stop_reading()
        self.tx_ring = self.rx_ring = None
        self.notify_tx = self.notify_rx = _nothing
        posted, self._rx_posted = self._rx_posted, deque()
        self._rx_responses.clear()
        self._rx_unusable = 0
        self._rx_answered.extend(buffer.mapping for buffer in posted if buffer.mapping is not None)
        self._release_answered()
        if was_attached and self.set_offload is not None:
            try:
                self.set_offload(0)  # nobody to take offloaded frames
            except OSError:
                pass

    # --- snapshot (vif.py's save_state/restore_state) -----------------------------------

    def posted_rx_buffers(self) -> list[list[int]]:
        """The receive buffers taken off the ring and not answered yet, in
        ring order, as [id, gref]: a snapshot saves them (they are posted
        buffers the guest sees as given to the backend). None may be in
        flight: between two event-loop callbacks every round is complete
        (responses written and published), which is checked."""
        rings = (self.tx_ring, self.rx_ring)
        if any(ring is None for ring in rings) or self._rx_answered or self._rx_responses:
            raise ValueError("a receive round is in progress")
        if self.tx_ring.requests_unanswered or any(ring.responses_pending for ring in rings):
            raise ValueError("a transmit request or a response is in flight")
        if self.rx_ring.requests_unanswered != len(self._rx_posted):
            raise ValueError("the receive ring and the posted buffers disagree")
        return [[buffer.id, buffer.ref] for buffer in self._rx_posted]

    def repost_rx_buffers(self, posted: Sequence[tuple[int, int]]) -> None:
        """Just attached again (a restore): the buffers posted_rx_buffers()
        listed are taken off the ring again and their grants mapped, as when
        they were first taken. Raises RingBroken if the ring cannot hold them."""
        self.rx_ring.resume_taken(len(posted))
        mappings = self.grants.map_many([gref for _, gref in posted], writable=True)
        for (request_id, gref), mapping in zip(posted, mappings):
            if isinstance(mapping, GrantError):
                self._rx_posted.append(_RxBuffer(request_id, None, f"rx grant {gref}: {mapping}", gref))
                self._rx_unusable += 1
            else:
                self._rx_posted.append(_RxBuffer(request_id, mapping))

    @property
    def rx_slots_needed(self) -> int:
        """Receive buffers that must be at hand before a frame is read: the
        largest frame the TAP may give must fit."""
        if self._gso_layout:
            return GSO_RX_SLOTS
        if self.features.sg and self.rx_frame_max > PAGE_SIZE:
            return min(MAX_SLOTS_PER_PACKET, (self.rx_frame_max + PAGE_SIZE - 1) // PAGE_SIZE)
        return 1

    @property
    def _gso_layout(self) -> bool:
        """GSO frames may come: receive buffers leave slot 1 for the extra-info entry."""
        return bool(self.features.tun_offload() & (TUN_F_TSO4 | TUN_F_TSO6))

    def _start_reading(self) -> None:
        if not self._reading and self.attached:
            self._reading = True
            self.watch_tap(True)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self.watch_tap(False)

    # --- transmit: guest -> TAP ---------------------------------------------------------

    def process_tx(self) -> bool:
        """Send what the frontend queued; True if more may be waiting (call
        again from the event loop). Raises RingBroken."""
        ring = self.tx_ring
        if ring is None:
            return False
        for _ in range(TX_ROUNDS):
            requests = ring.take_requests()
            if requests:
                self._transmit(requests)
                if ring.push_responses():
                    self.notify_tx()
            if not ring.final_check_for_requests():
                return False
        return True

    def _transmit(self, requests: list[bytes]) -> None:
        responses = bytearray()
        try:
            self._transmit_packets(requests, responses)
        finally:
            self.tx_ring.put_responses(responses)

    def _transmit_packets(self, requests: list[bytes], responses: bytearray) -> None:
        position = 0
        while position < len(requests):
            packet, position = self._chain(requests, position)
            fault = None
            try:
                fault = self._send(packet)
                status = XEN_NETIF_RSP_OKAY
            except _Drop as error:
                log.debug("%s: tx packet dropped: %s", self.name, error)
                self.stats.tx_errors += 1
                status = XEN_NETIF_RSP_ERROR
            first = packet.data[0]
            if self._trace.net:
                net_packet(self._trace, "tx", self.name, first.size, flags=first.flags, slots=packet.slot_count,
                           status=status, fault=fault.spec if fault else None)
            responses += _pack_tx_slot(first.id, status)
            for extra_id in packet.extra_ids:
                responses += _pack_tx_slot(extra_id, XEN_NETIF_RSP_NULL)
            for request in islice(packet.data, 1, None):
                responses += _pack_tx_slot(request.id, status)

    def _chain(self, requests: list[bytes], position: int) -> tuple[_TxPacket, int]:
        """The packet starting at `position` (its data and extra slots), and
        where the next one starts. Raises RingBroken if it runs past the end."""
        end = len(requests)
        first = _parse_tx_request(requests[position])
        position += 1
        packet = _TxPacket(first)
        if first.flags & NETTXF_extra_info:
            while True:
                if position >= end:
                    raise RingBroken("a packet's slots run past the requests the frontend published")
                raw = requests[position]
                position += 1
                extra = netif.parse_extra(raw)
                packet.extras.append(extra)
                packet.extra_ids.append(_parse_tx_request(raw).id)
                if not extra.more:
                    break
        last = first
        while last.flags & NETTXF_more_data:
            if position >= end:
                raise RingBroken("a packet's slots run past the requests the frontend published")
            last = _parse_tx_request(requests[position])
            position += 1
            packet.data.append(last)
        return packet, position

    def _send(self, packet: _TxPacket) -> FaultRule | None:
        """Write the packet to the TAP; raises _Drop. Returns the injected
        fault that changed it, if one did."""
        data = packet.data
        first = data[0]
        if len(data) > MAX_SLOTS_PER_PACKET:
            raise _Drop(f"{len(data)} slots, at most {MAX_SLOTS_PER_PACKET}")
        if first.size < ETH_HLEN:
            raise _Drop(f"packet of {first.size} bytes, below an Ethernet header")
        if len(data) == 1:
            lengths = [first.size]
        else:
            rest = sum(request.size for request in islice(data, 1, None))
            if rest >= first.size:
                raise _Drop(f"fragments of {rest} bytes in a packet of {first.size}")
            lengths = [first.size - rest, *(request.size for request in islice(data, 1, None))]
        for request, length in zip(data, lengths):
            if request.offset + length > PAGE_SIZE:
                raise _Drop(f"slot of {length} bytes at offset {request.offset} leaves its page")
        gso_type = gso_size = 0
        for extra in packet.extras:
            if extra.type == XEN_NETIF_EXTRA_TYPE_NONE or extra.type >= XEN_NETIF_EXTRA_TYPE_MAX:
                raise _Drop(f"extra info of type {extra.type}")
            if extra.type == XEN_NETIF_EXTRA_TYPE_GSO:
                gso_size, gso_type = extra.gso()
                if gso_type not in _GSO_TO_VNET or gso_size == 0:
                    raise _Drop(f"GSO type {gso_type} size {gso_size}")
        mappings = self.grants.map_many([request.gref for request in data], writable=False)
        buffers: list[memoryview] = []
        rest: list[memoryview] = []
        try:
            for request, length, mapping in zip(data, lengths, mappings):
                if isinstance(mapping, GrantError):
                    raise _Drop(f"tx grant {request.gref}: {mapping}")
                buffers.append(mapping.view[request.offset : request.offset + length])
            header, judged = self._tx_header(first.flags, gso_type, gso_size, buffers)
            frame: list = buffers
            if judged:  # the bytes the header was made from, not the guest's pages again
                rest = _after(buffers, len(judged))
                frame = [judged, *rest]
            fault = self._faults.net_packet("tx", self.name, first.size) if self._faults.net else None
            try:
                if fault is None:
                    self._writev([header, *frame])
                else:
                    self._send_faulty(fault, header, frame)
            except OSError as error:
                if error.errno in (errno.EAGAIN, errno.ENOBUFS):
                    raise _Drop("the TAP queue is full") from None
                raise _Drop(f"the TAP refused it: {error.strerror}") from None
            self.stats.tx_packets += 1
            self.stats.tx_bytes += first.size
            return fault
        finally:
            for buffer in (*rest, *buffers):
                buffer.release()
            self.grants.release_many(mapping for mapping in mappings if not isinstance(mapping, GrantError))

    def _send_faulty(self, fault: FaultRule, header: bytes, buffers: list) -> None:
        """An injected fault on a transmitted packet (a copy: the grants are
        given back before a delayed write happens)."""
        if fault.action == "drop":
            return  # lost on the wire: the guest is told it was sent
        frame = bytearray(b"".join(buffers))
        if fault.action == "corrupt":
            corrupt(frame, fault)
        data = header + bytes(frame)
        if fault.action == "delay":
            self._faults.call_later(fault.delay, lambda: self._write_late(data))
            return
        self._writev([data[:VNET_HDR_SIZE], data[VNET_HDR_SIZE:]])
        if fault.action == "duplicate":
            self._writev([data[:VNET_HDR_SIZE], data[VNET_HDR_SIZE:]])

    def _write_late(self, data: bytes) -> None:
        if self.tx_ring is None:
            return  # detached meanwhile
        try:
            self._writev([data[:VNET_HDR_SIZE], data[VNET_HDR_SIZE:]])
        except OSError as error:
            log.debug("%s: a delayed packet was refused: %s", self.name, error.strerror)

    @staticmethod
    def _tx_header(flags: int, gso_type: int, gso_size: int, buffers: list[memoryview]) -> tuple[bytes, bytes]:
        """The virtio_net_hdr, and the copy of the packet's first bytes it was
        made from (empty when the packet's contents did not matter)."""
        if not (flags & NETTXF_csum_blank or gso_type):
            return _PLAIN_HEADER, b""
        peek = bytes(buffers[0][:HEADER_PEEK])
        if len(peek) < HEADER_PEEK and len(buffers) > 1:
            peek = b"".join(bytes(buffer[:HEADER_PEEK]) for buffer in buffers)[:HEADER_PEEK]
        position = checksum_position(peek)
        if position is None:
            raise _Drop("checksum offload asked for a packet that is not TCP or UDP over IP")
        start, offset, l4_length = position
        if gso_type:
            if offset != 16:
                raise _Drop("TCP segmentation asked for a packet that is not TCP")
            return VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, _GSO_TO_VNET[gso_type], start + l4_length, gso_size,
                                 start, offset), peek
        return VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, 0, 0, start, offset), peek

    # --- receive: TAP -> guest -------------------------------------------------------------

    def rx_notified(self) -> None:
        """The frontend posted receive buffers: resume if we were waiting."""
        if self.attached and not self._reading:
            self._start_reading()
            self.process_rx()

    def process_rx(self) -> None:
        """Move up to RX_BATCH frames from the TAP into the guest. Raises RingBroken."""
        ring = self.rx_ring
        if ring is None:
            return
        needed = self.rx_slots_needed
        gso_layout = self._gso_layout
        try:
            for _ in range(RX_BATCH):
                if not self._have_rx_buffers(needed):
                    self._stop_reading()  # until the frontend posts more (rx_notified)
                    if ring.final_check_for_requests() and self._have_rx_buffers(needed):
                        self._start_reading()
                        continue
                    break
                if not self._receive_one(needed, gso_layout):
                    break
        finally:
            self._release_answered()
            ring.put_responses(self._rx_responses)
            self._rx_responses.clear()
            if ring.push_responses():
                self.notify_rx()

    def _have_rx_buffers(self, needed: int) -> bool:
        posted = self._rx_posted
        while True:
            if len(posted) < needed:
                self._take_rx_buffers()
            if not self._rx_unusable:
                return len(posted) >= needed
            # A buffer that cannot take data is answered (with every one before it) first.
            bad = max((i for i in range(min(needed, len(posted))) if posted[i].view is None), default=-1)
            if bad < 0:
                return len(posted) >= needed
            for _ in range(bad + 1):
                buffer = posted.popleft()
                if buffer.view is None:
                    self._rx_unusable -= 1
                    log.debug("%s: %s", self.name, buffer.error)
                self.stats.rx_errors += 1
                self._respond(buffer, 0, XEN_NETIF_RSP_ERROR)

    def _take_rx_buffers(self) -> None:
        """Map the buffers the frontend posted since we last looked."""
        requests = self.rx_ring.take_requests()
        if not requests:
            return
        parsed = list(netif.RX_REQUEST.iter_unpack(b"".join(requests)))  # (id, gref) each
        mappings = self.grants.map_many([gref for _, gref in parsed], writable=True)
        posted = self._rx_posted
        for (request_id, gref), mapping in zip(parsed, mappings):
            if isinstance(mapping, GrantError):
                posted.append(_RxBuffer(request_id, None, f"rx grant {gref}: {mapping}", gref))
                self._rx_unusable += 1
            else:
                posted.append(_RxBuffer(request_id, mapping))

    def _release_answered(self) -> None:
        answered = self._rx_answered
        if answered:
            self.grants.release_many(answered)
            answered.clear()

    def _receive_one(self, needed: int, gso_layout: bool) -> bool:
        """Read one frame into the posted buffers; False when the TAP is empty."""
        posted = self._rx_posted
        pages = [posted[0].view]
        if needed > 1:
            # With GSO possible, slot 1 is left for the extra-info entry.
            pages.extend(map(_buffer_view, islice(posted, 2 if gso_layout else 1, needed)))
        try:
            count = self._readv([self._rx_header, *pages])
        except BlockingIOError:
            return False
        except OSError as error:
            log.warning("%s: reading the TAP failed: %s", self.name, error.strerror)
            return False
        length = count - VNET_HDR_SIZE
        if length < ETH_HLEN:
            self.stats.rx_dropped += 1
            return True
        if self._faults.net:
            # On receive the frame is already in the guest's pages: it can be
            # lost (the buffers stay posted) or damaged there, not held back.
            fault = self._faults.net_packet("rx", self.name, length, ("drop", "corrupt"))
            if fault is not None:
                net_packet(self._trace, "rx", self.name, length, fault=fault.spec)
                if fault.action == "drop":
                    self.stats.rx_dropped += 1
                    return True
                corrupt(pages[0][: min(length, PAGE_SIZE)], fault)
        vnet_flags, vnet_gso, _, gso_size, _, _ = VNET_HDR.unpack(self._rx_header)
        gso_type = _VNET_TO_GSO.get(vnet_gso & ~VIRTIO_NET_HDR_GSO_ECN)
        npages = (length + PAGE_SIZE - 1) // PAGE_SIZE
        if vnet_gso != VIRTIO_NET_HDR_GSO_NONE and (gso_type is None or needed == 1):
            self.stats.rx_dropped += 1  # nothing the frontend agreed to take
            return True
        if gso_type is None and npages > 1:
            if needed == 1:
                self.stats.rx_dropped += 1
                return True
            if gso_layout:
                for slot in range(1, npages):  # close the gap left for an extra-info slot
                    posted[slot].view[:] = posted[slot + 1].view
        flags = 0
        if vnet_flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            flags |= NETRXF_csum_blank | NETRXF_data_validated
        elif vnet_flags & VIRTIO_NET_HDR_F_DATA_VALID:
            flags |= NETRXF_data_validated
        if gso_type is not None:
            flags |= NETRXF_extra_info
        respond = self._respond
        remaining = length
        for slot in range(npages):
            chunk = min(remaining, PAGE_SIZE)
            remaining -= chunk
            slot_flags = (flags if slot == 0 else 0) | (NETRXF_more_data if remaining else 0)
            respond(posted.popleft(), slot_flags, chunk)
            if slot == 0 and gso_type is not None:
                self._rx_answered.append(posted.popleft().mapping)  # the extra-info slot's buffer
                self._rx_responses += netif.pack_gso_extra(gso_size, gso_type)
        self.stats.rx_packets += 1
        self.stats.rx_bytes += length
        if self._trace.net:
            net_packet(self._trace, "rx", self.name, length, flags=flags, slots=npages + (gso_type is not None))
        return True

    def _respond(self, buffer: _RxBuffer, flags: int, status: int) -> None:
        if buffer.mapping is not None:
            self._rx_answered.append(buffer.mapping)
        self._rx_responses += _pack_rx_response(buffer.id, 0, flags, status)


def _after(buffers: list[memoryview], skip: int) -> list[memoryview]:
    """Views of what follows the first `skip` bytes of the buffers, end to end."""
    views = []
    for buffer in buffers:
        if skip >= len(buffer):
            skip -= len(buffer)
            continue
        views.append(buffer[skip:])
        skip = 0
    return views


def _nothing() -> None:
    pass


def net_packet(trace: Tracer, direction: str, vif: str, length: int, *, flags: int = 0, slots: int = 1,
               status: int = 0, fault: str | None = None) -> None:
    """The network backend's trace hook (category "net"), one call per packet, on `trace` (the VM's).

    direction: "tx" (guest to host) or "rx" (host to guest); vif: the
    device ("vif0" or its xenstore id); length: bytes; flags: the netif
    request/response flags; slots: ring slots used; status: the netif
    status written back (NETIF_RSP_OKAY 0, ERROR -1, DROPPED -2); fault:
    the injected fault that changed this packet, if one did.
    """
    if trace.net:
        fields = {"dir": direction, "vif": vif, "len": length, "flags": flags, "slots": slots, "status": status}
        if fault:
            fields["fault"] = fault
        trace.emit("net", "packet", **fields)
