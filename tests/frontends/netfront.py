"""xen-netfront's side of a vif: tx and rx netif rings on granted pages of
guest RAM, every packet's pages and every receive buffer granted afresh as
netfront grants them, the first tx slot carrying the whole packet's size and
a GSO extra slot after it; a NetBackend attached to both rings, and a
SOCK_SEQPACKET socket pair standing in for the TAP device (one message per
frame, virtio_net_hdr first, as a TAP has it)."""

from __future__ import annotations

import socket
import struct

from pyvmm.xen.backends.net import netif
from pyvmm.xen.backends.net import tap as tapmod
from pyvmm.xen.backends.net.netback import NetBackend, NetFeatures
from pyvmm.xen.backends.net.netif import NETRXF_extra_info, NETTXF_extra_info, NETTXF_more_data

from .common import PAGE, GuestPages

RAM_PAGES = 1024
GSO_FEATURES = NetFeatures(sg=True, csum=True, gso_tcpv4=True, gso_tcpv6=True)


def tcp4_frame(payload=b"", *, tcp_options=b""):
    """Ethernet + IPv4 (20 bytes) + TCP (20 + options) + payload."""
    eth = bytes(6) + bytes.fromhex("00163e000001") + b"\x08\x00"
    ip = bytes([0x45, 0]) + struct.pack(">H", 20 + 20 + len(tcp_options) + len(payload)) + bytes(5) + b"\x06" \
        + bytes(10)
    tcp = bytes(12) + bytes([(20 + len(tcp_options)) // 4 << 4]) + bytes(7) + tcp_options
    return eth + ip + tcp + payload


def tcp6_frame(payload=b"", *, hop_by_hop=False):
    """Ethernet + IPv6 (+ an empty hop-by-hop header) + TCP (20 bytes) + payload."""
    eth = bytes(12) + b"\x86\xdd"
    next_header = 0 if hop_by_hop else 6
    ip = b"\x60" + bytes(5) + bytes([next_header, 64]) + bytes(32)
    extension = bytes([6, 0]) + bytes(6) if hop_by_hop else b""
    tcp = bytes(12) + b"\x50" + bytes(7)
    return eth + ip + extension + tcp + payload


class Netfront(GuestPages):
    """What xen-netfront does: rings, grants and pages in guest RAM."""

    def __init__(self, features=GSO_FEATURES, **backend_options):
        super().__init__(RAM_PAGES, first_gfn=16, max_frames=8)
        self.host, tap_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        tap_end.setblocking(False)
        self.host.settimeout(5)
        self.tap_end = tap_end
        self.watching = []
        self.offload = []
        self.notified = {"tx": 0, "rx": 0}
        self.backend = NetBackend(tap_end.fileno(), self.table, watch_tap=self.watching.append,
                                  set_offload=self.offload.append, name="test", **backend_options)
        self.tx, tx_refs = self.front_ring([2], netif.TX_ENTRY_SIZE)
        self.rx, rx_refs = self.front_ring([4], netif.RX_ENTRY_SIZE)
        self.ring_maps = self.map_for_backend(tx_refs + rx_refs)
        self.backend.attach([self.ring_maps[0].view], [self.ring_maps[1].view], features,
                            notify_tx=lambda: self._note("tx"), notify_rx=lambda: self._note("rx"))
        self.rx_pages = {}  # rx request id -> gfn

    def _note(self, what):
        self.notified[what] += 1

    def close(self):
        """Close both ends of the TAP stand-in."""
        self.host.close()
        self.tap_end.close()

    def page(self, data=b"", offset=0):
        gfn = self.new_gfn()
        self.memory.write(gfn * PAGE + offset, data)
        return self.grant(gfn, readonly=True), gfn

    # --- transmit ------------------------------------------------------------------

    def send(self, frame, *, pieces=(), flags=0, gso=None, request_id=0):
        """Queue `frame` as netfront does: the first slot carries the whole
        size; `pieces` are the lengths of the later slots' fragments."""
        first_length = len(frame) - sum(pieces)
        offset = 100 if first_length <= PAGE - 100 else 0  # not always page-aligned, as in Linux
        ref, _ = self.page(frame[:first_length], offset=offset)
        more = NETTXF_more_data if pieces else 0
        requests = [netif.pack_tx_request(ref, offset, flags | more | (NETTXF_extra_info if gso else 0), request_id,
                                          len(frame))]
        if gso:
            requests.append(netif.pack_gso_extra(*gso) + bytes(4))
        position = first_length
        for index, length in enumerate(pieces):
            ref, _ = self.page(frame[position : position + length])
            last = index == len(pieces) - 1
            requests.append(netif.pack_tx_request(ref, 0, 0 if last else NETTXF_more_data, request_id + 1 + index,
                                                  length))
            position += length
        self.put_tx(*requests)

    def put_tx(self, *requests):
        for request in requests:
            self.tx.put_request(request)
        self.tx.push_requests()

    def tx_responses(self):
        self.backend.process_tx()
        return [netif.parse_tx_response(raw) for raw in self.tx.take_responses()]

    def tap_frame(self):
        message = self.host.recv(1 << 17)
        return tapmod.VNET_HDR.unpack(message[:10]), message[10:]

    def tap_empty(self):
        self.host.setblocking(False)
        try:
            self.host.recv(1 << 17)
        except BlockingIOError:
            return True
        finally:
            self.host.settimeout(5)
        return False

    # --- receive --------------------------------------------------------------------

    def post_rx(self, count, *, bad=()):
        for _ in range(count):
            request_id = self.rx.req_prod_pvt & 0xFFFF
            gfn = self.new_gfn()
            ref = self.grant(gfn, readonly=request_id in bad)
            self.rx_pages[request_id] = gfn
            self.rx.put_request(netif.pack_rx_request(request_id, ref))
        self.rx.push_requests()

    def inject(self, frame, header=(0, 0, 0, 0, 0, 0)):
        self.host.send(tapmod.VNET_HDR.pack(*header) + frame)

    def rx_responses(self):
        """[(id, offset, flags, status) or ('extra', bytes)] for what the backend answered."""
        out, extra_next = [], False
        for raw in self.rx.take_responses():
            if extra_next:
                out.append(("extra", raw))
                extra_next = False
                continue
            response = netif.parse_rx_response(raw)
            out.append(response)
            extra_next = bool(response[2] & NETRXF_extra_info)
        return out

    def rx_data(self, responses):
        return b"".join(self.memory.read(self.rx_pages[r[0]] * PAGE + r[1], r[3]) for r in responses
                        if r[0] != "extra")
