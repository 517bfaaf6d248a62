"""The blkif protocol: block requests and responses on a Xen shared ring.

Layouts (xen/include/public/io/blkif.h), offsets in bytes, for the native
x86-64 ABI and the 32-bit x86 ABI (the frontend's xenstore `protocol` key:
"x86_64-abi" or "x86_32-abi"; absent means the backend's native ABI, which
here is x86-64). The two differ only in where the u64 `id` lands: i386
aligns it to 4 bytes, so everything after it moves up by 4.

    read/write/barrier/flush             x86_64   x86_32
      u8   operation                        0        0
      u8   nr_segments                      1        1
      u16  handle                           2        2
      u64  id                               8        4
      u64  sector_number                   16       12
      seg[11] {u32 gref; u8 first_sect;    24       20    8 bytes each
               u8 last_sect; u16 pad}
      size                                112      108

    discard: u8 flag at 1 (BLKIF_DISCARD_SECURE), id and sector_number as
      above, u64 nr_sectors right after sector_number (24 / 20).
    indirect: u8 indirect_op at 1, u16 nr_segments at 2, id and
      sector_number as above, u16 handle after sector_number (24 / 20),
      u32 indirect_grefs[8] 4 bytes later (28 / 24). Each indirect page
      holds 512 segments in the layout above.

    response: u64 id at 0, u8 operation at 8, s16 status at 10;
      16 bytes on x86_64, 12 on x86_32.

A ring slot holds either, so its size is the request's (112 / 108).

Sector quantities (sector_number, first_sect/last_sect, nr_sectors, and the
xenstore "sectors" key) are in 512-byte units whatever the disk's logical
"sector-size", as Linux's blkfront and blkback use them and as later
versions of blkif.h state. The "feature-large-sector-size" frontend node of
some blkif.h versions (sector-size units) is deprecated there and ignored
here.

Parsing never raises for anything the frontend wrote: a request that
cannot be carried out comes back with `status` already set (ERROR, or
EOPNOTSUPP for an operation the backend does not know) and a `reason`, so
the backend answers that request and carries on.
"""

from __future__ import annotations

import operator
import struct
from dataclasses import dataclass, field

from .abi import PAGE_SIZE

# Operations.
BLKIF_OP_READ = 0
BLKIF_OP_WRITE = 1
BLKIF_OP_WRITE_BARRIER = 2
BLKIF_OP_FLUSH_DISKCACHE = 3
BLKIF_OP_RESERVED_1 = 4
BLKIF_OP_DISCARD = 5
BLKIF_OP_INDIRECT = 6

OP_NAMES = {
    BLKIF_OP_READ: "read",
    BLKIF_OP_WRITE: "write",
    BLKIF_OP_WRITE_BARRIER: "barrier",
    BLKIF_OP_FLUSH_DISKCACHE: "flush",
    BLKIF_OP_DISCARD: "discard",
    BLKIF_OP_INDIRECT: "indirect",
}

BLKIF_DISCARD_SECURE = 1

# Response statuses.
BLKIF_RSP_EOPNOTSUPP = -2
BLKIF_RSP_ERROR = -1
BLKIF_RSP_OKAY = 0

# The xenstore "info" bits.
VDISK_CDROM = 0x1
VDISK_REMOVABLE = 0x2
VDISK_READONLY = 0x4

BLKIF_MAX_SEGMENTS_PER_REQUEST = 11
BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST = 8

SECTOR_SHIFT = 9
SECTOR_SIZE = 1 << SECTOR_SHIFT
SECTORS_PER_PAGE = PAGE_SIZE >> SECTOR_SHIFT
SEGMENT_SIZE = 8
SEGMENTS_PER_INDIRECT_PAGE = PAGE_SIZE // SEGMENT_SIZE
MAX_INDIRECT_SEGMENTS = BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * SEGMENTS_PER_INDIRECT_PAGE

PROTOCOL_X86_64 = "x86_64-abi"
PROTOCOL_X86_32 = "x86_32-abi"
PROTOCOL_NATIVE = PROTOCOL_X86_64

_SEGMENT = struct.Struct("<IBB2x")
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_RESPONSE_HEAD = struct.Struct("<QBxh")  # id, operation, status: 12 bytes


_DATA_OPS = frozenset((BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE))


class BlkifError(ValueError):
    """A protocol the backend does not speak, or a misuse of this module."""


@dataclass(frozen=True)
class BlkifAbi:
    """Where the fields sit for one ABI."""

    protocol: str
    id_offset: int
    request_size: int
    response_size: int

    def __post_init__(self) -> None:
        # Every offset is a plain attribute: the request loop reads them per request.
        sector = self.id_offset + 8
        derived = {
            "sector_offset": sector,
            "segments_offset": sector + 8,
            "nr_sectors_offset": sector + 8,  # discard
            "indirect_handle_offset": sector + 8,
            "indirect_grefs_offset": sector + 12,
            "entry_size": max(self.request_size, self.response_size),  # a ring slot: the union of both
            # A request's head (operation, nr_segments, handle, id, sector) in one unpack.
            "request_head": struct.Struct(f"<BBH{self.id_offset - 4}xQQ"),
            # The zeros that fill a response entry after its 12-byte head.
            "response_padding": bytes(self.response_size - _RESPONSE_HEAD.size),
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)


ABI_X86_64 = BlkifAbi(PROTOCOL_X86_64, id_offset=8, request_size=112, response_size=16)
ABI_X86_32 = BlkifAbi(PROTOCOL_X86_32, id_offset=4, request_size=108, response_size=12)
_ABIS = {PROTOCOL_X86_64: ABI_X86_64, PROTOCOL_X86_32: ABI_X86_32}


def abi_for_protocol(protocol: str | None) -> BlkifAbi:
    """The ABI named by the frontend's `protocol` key (None/"" for native)."""
    if not protocol:
        return _ABIS[PROTOCOL_NATIVE]
    try:
        return _ABIS[protocol]
    except KeyError:
        raise BlkifError(f"unsupported blkif protocol {protocol!r}") from None


# One page of a transfer: (gref, first_sect, last_sect), sectors first..last
# (inclusive) of the page granted by gref. Plain tuples, straight from
# struct.iter_unpack: thousands are made per second of disk traffic.
BlkSegment = tuple[int, int, int]


@dataclass(slots=True)
class BlkRequest:
    """One request as copied off the ring.

    `operation` is what the response must carry: for an indirect request
    it is the inner operation (what Linux's blkfront checks responses
    against), `indirect` says the segments are still to be read from the
    pages in `indirect_grefs` (parse_indirect_segments). A request with
    `status` set is not to be carried out: answer it with that status.
    """

    id: int
    operation: int
    handle: int = 0
    sector: int = 0
    nr_segments: int = 0
    segments: tuple[BlkSegment, ...] = ()
    indirect: bool = False
    indirect_grefs: tuple[int, ...] = ()
    nr_sectors: int = 0  # discard
    secure: bool = False  # discard
    status: int | None = None
    reason: str = field(default="", compare=False)
    data_sectors: int = 0  # 512-byte sectors the segments move (set when they are checked)
    whole_pages: bool = False  # every segment is a whole page (set when they are checked)

    @property
    def is_write(self) -> bool:
        """Does it carry data to the disk (or change the disk)?"""
        if self.operation == BLKIF_OP_DISCARD:
            return True
        data_ops = (BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE)
        return self.operation in data_ops and self.nr_segments > 0

    def fail(self, status: int, reason: str) -> "BlkRequest":
        self.status = status
        self.reason = reason
        return self


def parse_segments(data: bytes | memoryview, count: int, offset: int = 0) -> tuple[BlkSegment, ...]:
    raw = memoryview(data)[offset : offset + count * SEGMENT_SIZE]
    if len(raw) != count * SEGMENT_SIZE:
        raise BlkifError(f"{count} segments need {count * SEGMENT_SIZE} bytes, got {len(raw)}")
    return tuple(_SEGMENT.iter_unpack(raw))


def _check_segments(request: BlkRequest) -> BlkRequest:
    segments = request.segments
    if not segments:
        return request
    # Column-wise, so that the loops over up to 2048 segments run in C.
    _, firsts, lasts = zip(*segments)
    if max(lasts) >= SECTORS_PER_PAGE or not all(map(operator.le, firsts, lasts)):
        index, first, last = next((i, first, last) for i, (_, first, last) in enumerate(segments)
                                  if first > last or last >= SECTORS_PER_PAGE)
        return request.fail(BLKIF_RSP_ERROR, f"segment {index}: sectors {first}..{last} do not fit a page")
    request.data_sectors = sum(lasts) - sum(firsts) + len(segments)
    request.whole_pages = not any(firsts) and min(lasts) == SECTORS_PER_PAGE - 1
    return request


def parse_request(data: bytes, abi: BlkifAbi, *, max_indirect_segments: int = 0) -> BlkRequest:
    """Decode one ring entry (a private copy: `data` must not be shared memory).

    `max_indirect_segments` is what the backend advertised; 0 means no
    indirect support (BLKIF_OP_INDIRECT is then unknown: EOPNOTSUPP).
    """
    if len(data) < abi.request_size:
        raise BlkifError(f"a {abi.protocol} request needs {abi.request_size} bytes, got {len(data)}")
    op, count, handle, request_id, sector = abi.request_head.unpack_from(data)

    if op in _DATA_OPS:
        request = BlkRequest(request_id, op, handle, sector, count)
        if count > BLKIF_MAX_SEGMENTS_PER_REQUEST:
            return request.fail(BLKIF_RSP_ERROR, f"{count} segments, at most {BLKIF_MAX_SEGMENTS_PER_REQUEST}")
        if count == 0 and op in (BLKIF_OP_READ, BLKIF_OP_WRITE):
            return request.fail(BLKIF_RSP_ERROR, f"{OP_NAMES[op]} without segments")
        request.segments = parse_segments(data, count, abi.segments_offset)
        return _check_segments(request)

    if op == BLKIF_OP_DISCARD:
        return BlkRequest(
            request_id, op, handle=handle, sector=sector,
            nr_sectors=_U64.unpack_from(data, abi.nr_sectors_offset)[0],
            secure=bool(data[1] & BLKIF_DISCARD_SECURE))

    if op == BLKIF_OP_INDIRECT and max_indirect_segments > 0:
        inner, count = count, handle  # indirect: the inner operation, then a 16-bit segment count
        pages = -(-count // SEGMENTS_PER_INDIRECT_PAGE)
        grefs = struct.unpack_from(f"<{BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST}I", data, abi.indirect_grefs_offset)
        request = BlkRequest(
            request_id, inner, handle=_U16.unpack_from(data, abi.indirect_handle_offset)[0], sector=sector,
            nr_segments=count, indirect=True, indirect_grefs=tuple(grefs[:pages]))
        if inner not in (BLKIF_OP_READ, BLKIF_OP_WRITE):
            return request.fail(BLKIF_RSP_ERROR, f"indirect operation {inner} is neither read nor write")
        if not 1 <= count <= min(max_indirect_segments, MAX_INDIRECT_SEGMENTS):
            return request.fail(BLKIF_RSP_ERROR, f"{count} indirect segments, at most {max_indirect_segments}")
        return request

    # BLKIF_OP_RESERVED_1, indirect when not offered, anything else.
    return BlkRequest(request_id, op).fail(BLKIF_RSP_EOPNOTSUPP, f"unknown operation {op}")


def parse_indirect_segments(request: BlkRequest, pages: list[bytes | memoryview]) -> BlkRequest:
    """Fill in an indirect request's segments from copies of its pages."""
    if not request.indirect or request.status is not None:
        raise BlkifError("not an indirect request waiting for its segments")
    if len(pages) != len(request.indirect_grefs):
        raise BlkifError(f"{len(pages)} indirect pages for {len(request.indirect_grefs)} grants")
    segments: list[BlkSegment] = []
    remaining = request.nr_segments
    for page in pages:
        count = min(remaining, SEGMENTS_PER_INDIRECT_PAGE)
        segments.extend(parse_segments(page, count))
        remaining -= count
    request.segments = tuple(segments)
    return _check_segments(request)


def pack_response(abi: BlkifAbi, request_id: int, operation: int, status: int) -> bytes:
    """One response entry for `abi` (id echoed, operation as the request's)."""
    return _RESPONSE_HEAD.pack(request_id & 0xFFFF_FFFF_FFFF_FFFF, operation & 0xFF, status) + abi.response_padding


def parse_response(data: bytes, abi: BlkifAbi) -> tuple[int, int, int]:
    """(id, operation, status) of a response entry (what a frontend reads)."""
    return _RESPONSE_HEAD.unpack_from(data)


# --- building requests (a frontend's side; used by tests and tools) -----------


def pack_request(abi: BlkifAbi, operation: int, request_id: int, sector: int = 0,
                 segments: tuple[tuple[int, int, int], ...] | list = (), *, handle: int = 0,
                 nr_segments: int | None = None) -> bytes:
    """A read/write/barrier/flush request; `segments` are (gref, first, last)."""
    buffer = bytearray(abi.request_size)
    count = len(segments) if nr_segments is None else nr_segments
    struct.pack_into("<BBH", buffer, 0, operation, count, handle)
    _U64.pack_into(buffer, abi.id_offset, request_id)
    _U64.pack_into(buffer, abi.sector_offset, sector)
    for index, (gref, first, last) in enumerate(segments[:BLKIF_MAX_SEGMENTS_PER_REQUEST]):
        _SEGMENT.pack_into(buffer, abi.segments_offset + index * SEGMENT_SIZE, gref, first, last)
    return bytes(buffer)


def pack_discard(abi: BlkifAbi, request_id: int, sector: int, nr_sectors: int, *, secure: bool = False,
                 handle: int = 0) -> bytes:
    buffer = bytearray(abi.request_size)
    struct.pack_into("<BBH", buffer, 0, BLKIF_OP_DISCARD, BLKIF_DISCARD_SECURE if secure else 0, handle)
    _U64.pack_into(buffer, abi.id_offset, request_id)
    _U64.pack_into(buffer, abi.sector_offset, sector)
    _U64.pack_into(buffer, abi.nr_sectors_offset, nr_sectors)
    return bytes(buffer)


def pack_indirect(abi: BlkifAbi, operation: int, request_id: int, sector: int, nr_segments: int,
                  indirect_grefs: list[int] | tuple[int, ...], *, handle: int = 0) -> bytes:
    buffer = bytearray(abi.request_size)
    struct.pack_into("<BBH", buffer, 0, BLKIF_OP_INDIRECT, operation, nr_segments)
    _U64.pack_into(buffer, abi.id_offset, request_id)
    _U64.pack_into(buffer, abi.sector_offset, sector)
    _U16.pack_into(buffer, abi.indirect_handle_offset, handle)
    for index, gref in enumerate(indirect_grefs[:BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST]):
        _U32.pack_into(buffer, abi.indirect_grefs_offset + index * 4, gref)
    return bytes(buffer)


def pack_segments(segments: list[tuple[int, int, int]] | tuple) -> bytes:
    """Segment array as stored in indirect pages."""
    return b"".join(_SEGMENT.pack(*segment) for segment in segments)
