"""blkif request/response layouts for both x86 ABIs, and request validation."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.xen.backends.blk import blkif
from pyvmm.xen.backends.blk.blkif import (
    ABI_X86_32,
    ABI_X86_64,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BlkifError,
    abi_for_protocol,
    parse_request,
)

# The C layouts written out independently of the module: (header format,
# segment format). x86_64 pads before the u64 id; i386 does not.
RW_HEADER = {"x86_64-abi": "<BBHIQQ", "x86_32-abi": "<BBHQQ"}
DISCARD = {"x86_64-abi": "<BBHIQQQ", "x86_32-abi": "<BBHQQQ"}
INDIRECT = {"x86_64-abi": "<BBHIQQHH8II", "x86_32-abi": "<BBHQQHH8IQ"}
RESPONSE = {"x86_64-abi": "<QBxhI", "x86_32-abi": "<QBxh"}
SEGMENT = "<IBBH"
ABIS = {"x86_64-abi": ABI_X86_64, "x86_32-abi": ABI_X86_32}
PROTOCOLS = list(ABIS)


def c_rw(protocol, op, request_id, sector, segments, handle=0, nr=None):
    fields = (op, len(segments) if nr is None else nr, handle)
    if protocol == "x86_64-abi":
        fields += (0,)
    data = struct.pack(RW_HEADER[protocol], *fields, request_id, sector)
    data += b"".join(struct.pack(SEGMENT, g, f, l, 0) for g, f, l in segments)
    return data.ljust(ABIS[protocol].request_size, b"\0")


def c_indirect(protocol, op, request_id, sector, nr, grefs, handle=0):
    grefs = list(grefs) + [0] * (8 - len(grefs))
    if protocol == "x86_64-abi":
        data = struct.pack(INDIRECT[protocol], BLKIF_OP_INDIRECT, op, nr, 0, request_id, sector, handle, 0, *grefs, 0)
    else:
        data = struct.pack(INDIRECT[protocol], BLKIF_OP_INDIRECT, op, nr, request_id, sector, handle, 0, *grefs, 0)
    assert len(data) == 64
    return data.ljust(ABIS[protocol].request_size, b"\0")


def test_sizes_match_the_c_structs():
    assert struct.calcsize(RW_HEADER["x86_64-abi"]) + 11 * 8 == ABI_X86_64.request_size == 112
    assert struct.calcsize(RW_HEADER["x86_32-abi"]) + 11 * 8 == ABI_X86_32.request_size == 108
    assert struct.calcsize(RESPONSE["x86_64-abi"]) == ABI_X86_64.response_size == 16
    assert struct.calcsize(RESPONSE["x86_32-abi"]) == ABI_X86_32.response_size == 12
    assert ABI_X86_64.entry_size == 112 and ABI_X86_32.entry_size == 108
    assert blkif.MAX_INDIRECT_SEGMENTS == 4096 and blkif.SEGMENTS_PER_INDIRECT_PAGE == 512


def test_protocol_names():
    assert abi_for_protocol("x86_64-abi") is ABI_X86_64
    assert abi_for_protocol("x86_32-abi") is ABI_X86_32
    assert abi_for_protocol(None) is ABI_X86_64 and abi_for_protocol("") is ABI_X86_64
    for bad in ("arm-abi", "x86_64", "X86_32-ABI"):
        with pytest.raises(BlkifError):
            abi_for_protocol(bad)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("op", [BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE])
def test_parse_read_write(protocol, op):
    segments = [(0x1234_5678, 0, 7), (9, 3, 3), (0xFFFF_FFFF, 1, 6)]
    data = c_rw(protocol, op, 0xDEAD_BEEF_CAFE_F00D, 0x1_0000_0001, segments, handle=0x0301)
    request = parse_request(data, ABIS[protocol])
    assert request.status is None
    assert request.id == 0xDEAD_BEEF_CAFE_F00D and request.operation == op
    assert request.handle == 0x0301 and request.sector == 0x1_0000_0001
    assert request.segments == tuple(tuple(s) for s in segments)
    assert request.data_sectors == 8 + 1 + 6
    assert request.is_write == (op != BLKIF_OP_READ)
    # What the module packs is what the C layout says.
    assert blkif.pack_request(ABIS[protocol], op, 0xDEAD_BEEF_CAFE_F00D, 0x1_0000_0001, segments,
                              handle=0x0301) == data


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_flush_and_barrier_may_carry_no_data(protocol):
    for op in (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER):
        request = parse_request(c_rw(protocol, op, 5, 0, []), ABIS[protocol])
        assert request.status is None and request.segments == () and not request.is_write


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("op", [BLKIF_OP_READ, BLKIF_OP_WRITE])
def test_read_write_need_one_to_eleven_segments(protocol, op):
    abi = ABIS[protocol]
    assert parse_request(c_rw(protocol, op, 1, 0, []), abi).status == BLKIF_RSP_ERROR
    eleven = [(i, 0, 7) for i in range(11)]
    assert parse_request(c_rw(protocol, op, 1, 0, eleven), abi).status is None
    for count in (12, 200, 255):
        request = parse_request(c_rw(protocol, op, 77, 0, eleven, nr=count), abi)
        assert request.status == BLKIF_RSP_ERROR and request.id == 77 and request.operation == op
        assert "segments" in request.reason


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("first, last", [(1, 0), (7, 6), (0, 8), (8, 8), (255, 255), (3, 200)])
def test_segment_sectors_must_lie_in_the_page(protocol, first, last):
    data = c_rw(protocol, BLKIF_OP_READ, 1, 0, [(5, 0, 7), (6, first, last)])
    request = parse_request(data, ABIS[protocol])
    assert request.status == BLKIF_RSP_ERROR and "segment 1" in request.reason


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_parse_discard(protocol):
    fields = (BLKIF_OP_DISCARD, blkif.BLKIF_DISCARD_SECURE, 7)
    if protocol == "x86_64-abi":
        fields += (0,)
    data = struct.pack(DISCARD[protocol], *fields, 42, 1 << 40, 999).ljust(ABIS[protocol].request_size, b"\0")
    request = parse_request(data, ABIS[protocol])
    assert request.status is None and request.operation == BLKIF_OP_DISCARD
    assert (request.id, request.sector, request.nr_sectors, request.secure) == (42, 1 << 40, 999, True)
    assert blkif.pack_discard(ABIS[protocol], 42, 1 << 40, 999, secure=True, handle=7) == data
    plain = parse_request(blkif.pack_discard(ABIS[protocol], 1, 0, 8), ABIS[protocol])
    assert not plain.secure


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("op", [blkif.BLKIF_OP_RESERVED_1, 7, 8, 0x80, 0xFF])
def test_unknown_operations_are_not_supported(protocol, op):
    data = bytearray(c_rw(protocol, BLKIF_OP_READ, 0x55, 0, [(1, 0, 7)]))
    data[0] = op
    request = parse_request(bytes(data), ABIS[protocol])
    assert request.status == BLKIF_RSP_EOPNOTSUPP
    assert request.id == 0x55 and request.operation == op  # echoed in the response


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_parse_indirect(protocol):
    abi = ABIS[protocol]
    data = c_indirect(protocol, BLKIF_OP_WRITE, 9, 2048, 600, [100, 101, 0xEEEE], handle=3)
    assert blkif.pack_indirect(abi, BLKIF_OP_WRITE, 9, 2048, 600, [100, 101, 0xEEEE], handle=3) == data
    request = parse_request(data, abi, max_indirect_segments=1024)
    assert request.status is None and request.indirect
    assert request.operation == BLKIF_OP_WRITE  # the response carries the inner operation
    assert (request.id, request.sector, request.handle, request.nr_segments) == (9, 2048, 3, 600)
    assert request.indirect_grefs == (100, 101)  # 600 segments need two pages
    first = [(i, 0, 7) for i in range(512)]
    second = [(1000 + i, i % 8, 7) for i in range(88)]
    pages = [blkif.pack_segments(first), blkif.pack_segments(second).ljust(4096, b"\xff")]
    blkif.parse_indirect_segments(request, pages)
    assert request.status is None
    assert request.segments == tuple(tuple(s) for s in first + second)
    with pytest.raises(BlkifError):
        blkif.parse_indirect_segments(request, pages[:1])


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_indirect_validation(protocol):
    abi = ABIS[protocol]
    # Not offered: unknown operation.
    request = parse_request(c_indirect(protocol, BLKIF_OP_READ, 1, 0, 20, [5]), abi)
    assert request.status == BLKIF_RSP_EOPNOTSUPP and request.operation == BLKIF_OP_INDIRECT
    for nr in (0, 33, 4097, 0xFFFF):
        request = parse_request(c_indirect(protocol, BLKIF_OP_READ, 1, 0, nr, [5]), abi, max_indirect_segments=32)
        assert request.status == BLKIF_RSP_ERROR and request.operation == BLKIF_OP_READ
    for inner in (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_DISCARD, BLKIF_OP_INDIRECT, 200):
        request = parse_request(c_indirect(protocol, inner, 1, 0, 20, [5]), abi, max_indirect_segments=32)
        assert request.status == BLKIF_RSP_ERROR and request.operation == inner
    request = parse_request(c_indirect(protocol, BLKIF_OP_READ, 1, 0, 20, [5]), abi, max_indirect_segments=32)
    bad = blkif.pack_segments([(1, 0, 7)] * 19 + [(1, 6, 2)])
    blkif.parse_indirect_segments(request, [bad])
    assert request.status == BLKIF_RSP_ERROR and "segment 19" in request.reason


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_pack_response_matches_the_c_struct(protocol):
    abi = ABIS[protocol]
    data = blkif.pack_response(abi, 0x0102_0304_0506_0708, BLKIF_OP_WRITE, BLKIF_RSP_EOPNOTSUPP)
    assert len(data) == abi.response_size
    extra = (0,) if protocol == "x86_64-abi" else ()
    assert data == struct.pack(RESPONSE[protocol], 0x0102_0304_0506_0708, BLKIF_OP_WRITE, -2, *extra)
    assert blkif.parse_response(data, abi) == (0x0102_0304_0506_0708, BLKIF_OP_WRITE, -2)


def test_short_entries_are_a_caller_bug():
    with pytest.raises(BlkifError):
        parse_request(bytes(100), ABI_X86_64)


@settings(max_examples=300, deadline=None)
@given(protocol=st.sampled_from(PROTOCOLS), data=st.binary(min_size=112, max_size=112),
       max_indirect=st.sampled_from([0, 32, 256, 4096]))
def test_any_garbage_parses_to_an_answerable_request(protocol, data, max_indirect):
    abi = ABIS[protocol]
    request = parse_request(data[: abi.request_size], abi, max_indirect_segments=max_indirect)
    assert 0 <= request.id < 1 << 64 and 0 <= request.operation < 256
    assert request.status in (None, BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP)
    blkif.pack_response(abi, request.id, request.operation, request.status or 0)
    if request.status is None:
        if request.indirect:
            assert request.operation in (BLKIF_OP_READ, BLKIF_OP_WRITE)
            assert 1 <= request.nr_segments <= max_indirect
            assert len(request.indirect_grefs) == -(-request.nr_segments // 512)
        elif request.operation != BLKIF_OP_DISCARD:
            assert request.nr_segments <= 11 and len(request.segments) == request.nr_segments
            assert all(first <= last <= 7 for _, first, last in request.segments)
