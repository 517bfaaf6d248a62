"""The netif protocol: Ethernet frames on a pair of Xen shared rings.

Layouts (xen/include/public/io/netif.h), offsets in bytes; they are the
same for every ABI (no 64-bit fields):

    tx request   u32 gref, u16 offset, u16 flags, u16 id, u16 size   12 bytes
    tx response  u16 id, s16 status                                    4 bytes
    rx request   u16 id, u16 pad, u32 gref                             8 bytes
    rx response  u16 id, u16 offset, u16 flags, s16 status             8 bytes
    extra info   u8 type, u8 flags, 6 bytes of type-specific data      8 bytes
                 GSO: u16 size (the MSS), u8 type, u8 pad, u16 features

A slot holds a request or its response, so the tx ring has 12-byte slots
and the rx ring 8-byte ones: 256 of each in one page.

Transmit (guest -> backend). A packet is a chain of requests: the first
one's `size` is the whole packet's length, every later one's is its own
fragment's; NETTXF_more_data on a request says another follows. When the
first carries NETTXF_extra_info, extra-info entries follow it at once
(each with XEN_NETIF_EXTRA_FLAG_MORE if another extra follows) before the
next fragment. Every request is answered in ring order, the extra-info
slots with XEN_NETIF_RSP_NULL.

Receive (backend -> guest). The frontend posts empty pages (rx requests);
the backend fills them in order and answers each at the same ring position:
`status` is the byte count (or an error), NETRXF_more_data chains the
slots of one packet, and when the first response has NETRXF_extra_info,
the next slot holds an extra-info entry (GSO) instead of a response.

Parsing never raises for anything the frontend wrote; the callers judge
the values.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from .abi import PAGE_SIZE

# Transmit request flags.
NETTXF_csum_blank = 1 << 0  # the L4 checksum is only the pseudo-header's: complete it
NETTXF_data_validated = 1 << 1
NETTXF_more_data = 1 << 2
NETTXF_extra_info = 1 << 3

# Receive response flags.
NETRXF_data_validated = 1 << 0
NETRXF_csum_blank = 1 << 1
NETRXF_more_data = 1 << 2
NETRXF_extra_info = 1 << 3
NETRXF_gso_prefix = 1 << 4

# Extra-info types and flags.
XEN_NETIF_EXTRA_TYPE_NONE = 0
XEN_NETIF_EXTRA_TYPE_GSO = 1
XEN_NETIF_EXTRA_TYPE_MAX = 6
XEN_NETIF_EXTRA_FLAG_MORE = 1 << 0

XEN_NETIF_GSO_TYPE_NONE = 0
XEN_NETIF_GSO_TYPE_TCPV4 = 1
XEN_NETIF_GSO_TYPE_TCPV6 = 2

# Response statuses.
XEN_NETIF_RSP_DROPPED = -2
XEN_NETIF_RSP_ERROR = -1
XEN_NETIF_RSP_OKAY = 0
XEN_NETIF_RSP_NULL = 1  # the answer to an extra-info slot

ETH_HLEN = 14
MAX_PACKET = 0xFFFF  # a tx request's u16 size: the largest packet the protocol carries
# Linux's netfront never needs more than this many slots for one packet
# (XEN_NETBK_LEGACY_SLOTS_MAX); more is refused.
MAX_SLOTS_PER_PACKET = 18

TX_REQUEST = struct.Struct("<IHHHH")
TX_RESPONSE = struct.Struct("<Hh")
RX_REQUEST = struct.Struct("<HxxI")
RX_RESPONSE = struct.Struct("<HHHh")
EXTRA = struct.Struct("<BB6s")
GSO_EXTRA = struct.Struct("<BBHBxH")

TX_ENTRY_SIZE = TX_REQUEST.size
RX_ENTRY_SIZE = RX_REQUEST.size


class TxRequest(NamedTuple):  # a tuple: cheap to make, one per slot
    gref: int
    offset: int
    flags: int
    id: int
    size: int

    @property
    def more_data(self) -> bool:
        return bool(self.flags & NETTXF_more_data)


class Extra(NamedTuple):
    type: int
    flags: int
    data: bytes  # the 6 type-specific bytes

    @property
    def more(self) -> bool:
        return bool(self.flags & XEN_NETIF_EXTRA_FLAG_MORE)

    def gso(self) -> tuple[int, int]:
        """(gso size, gso type) of a GSO extra."""
        size, gso_type = struct.unpack_from("<HB", self.data)
        return size, gso_type


def parse_tx_request(data: bytes) -> TxRequest:
    return TxRequest._make(TX_REQUEST.unpack_from(data))


def parse_extra(data: bytes) -> Extra:
    return Extra._make(EXTRA.unpack_from(data))


def pack_tx_response(request_id: int, status: int) -> bytes:
    return TX_RESPONSE.pack(request_id, status)


def parse_rx_request(data: bytes) -> tuple[int, int]:
    """(id, gref)."""
    return RX_REQUEST.unpack_from(data)


def pack_rx_response(request_id: int, offset: int, flags: int, status: int) -> bytes:
    return RX_RESPONSE.pack(request_id, offset, flags, status)


def pack_gso_extra(gso_size: int, gso_type: int, flags: int = 0) -> bytes:
    return GSO_EXTRA.pack(XEN_NETIF_EXTRA_TYPE_GSO, flags, gso_size, gso_type, 0)


# --- what a frontend writes (for tests and fake frontends) -------------------------

def pack_tx_request(gref: int, offset: int, flags: int, request_id: int, size: int) -> bytes:
    return TX_REQUEST.pack(gref, offset, flags, request_id, size)


def pack_rx_request(request_id: int, gref: int) -> bytes:
    return RX_REQUEST.pack(request_id, gref)


def parse_tx_response(data: bytes) -> tuple[int, int]:
    return TX_RESPONSE.unpack_from(data)


def parse_rx_response(data: bytes) -> tuple[int, int, int, int]:
    """(id, offset, flags, status)."""
    return RX_RESPONSE.unpack_from(data)
