"""The network backend against the fake netfront of tests/frontends/netfront.py:
real netif rings and grants in guest memory, and a SOCK_SEQPACKET socket pair
standing in for the TAP device (one message per frame, virtio_net_hdr first,
as a TAP has it)."""

import os
import random

import pytest

from frontends.netfront import PAGE, Netfront as Frontend, tcp4_frame, tcp6_frame
from pyvmm.xen.backends.net import tap as tapmod
from pyvmm.xen.backends.net import netback, netif
from pyvmm.xen.backends.net.netback import GSO_RX_SLOTS, HEADER_PEEK, NetFeatures, checksum_position
from pyvmm.xen.backends.net.netif import (
    NETRXF_csum_blank,
    NETRXF_data_validated,
    NETRXF_extra_info,
    NETRXF_more_data,
    NETTXF_csum_blank,
    NETTXF_extra_info,
    NETTXF_more_data,
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
    XEN_NETIF_RSP_ERROR,
    XEN_NETIF_RSP_NULL,
    XEN_NETIF_RSP_OKAY,
)
from pyvmm.xen.backend.ring import REQ_EVENT, REQ_PROD, BackRing, FrontRing, RingBroken


@pytest.fixture
def front():
    frontend = Frontend()
    yield frontend
    frontend.close()


def assert_grants_released(front):
    ring_refs = {mapping.ref for mapping in front.ring_maps}
    assert set(front.table._pins) <= ring_refs


# --- transmit -------------------------------------------------------------------------------


def test_offload_follows_the_frontend_features(front):
    assert front.offload == [tapmod.TUN_F_CSUM | tapmod.TUN_F_TSO4 | tapmod.TUN_F_TSO6]
    assert front.watching == [True]
    assert front.backend.rx_slots_needed == GSO_RX_SLOTS
    front.backend.detach()
    assert front.offload[-1] == 0 and front.watching[-1] is False


def test_single_slot_packet_reaches_the_tap(front):
    frame = tcp4_frame(b"hello")
    front.send(frame, request_id=7)
    assert front.tx_responses() == [(7, XEN_NETIF_RSP_OKAY)]
    header, data = front.tap_frame()
    assert header == (0, 0, 0, 0, 0, 0) and data == frame
    assert front.notified["tx"] == 1
    assert_grants_released(front)


def test_multi_slot_packet_is_one_frame(front):
    frame = tcp4_frame(random.Random(1).randbytes(9000))
    front.send(frame, pieces=(4096, 4000), request_id=1)
    assert front.tx_responses() == [(1, 0), (2, 0), (3, 0)]
    assert front.tap_frame()[1] == frame


def test_checksum_blank_becomes_needs_csum(front):
    front.send(tcp4_frame(b"x" * 100, tcp_options=bytes(12)), flags=NETTXF_csum_blank)
    front.tx_responses()
    header, _ = front.tap_frame()
    assert header == (tapmod.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 16)


def test_gso_extra_becomes_the_vnet_gso_header(front):
    frame = tcp6_frame(bytes(20000))
    front.send(frame, pieces=(4096,) * 4, flags=NETTXF_csum_blank, gso=(1440, XEN_NETIF_GSO_TYPE_TCPV6),
               request_id=10)
    # The extra-info slot is answered RSP_NULL, in ring order.
    assert front.tx_responses() == [(10, 0), (0, XEN_NETIF_RSP_NULL), (11, 0), (12, 0), (13, 0), (14, 0)]
    header, data = front.tap_frame()
    assert header == (tapmod.VIRTIO_NET_HDR_F_NEEDS_CSUM, tapmod.VIRTIO_NET_HDR_GSO_TCPV6, 74, 1440, 54, 16)
    assert data == frame


@pytest.mark.parametrize("case", ["bad grant", "runt", "zero length", "leaves the page", "too many slots",
                                  "fragments too big", "unknown extra", "gso size 0", "csum on non-IP"])
def test_hostile_packets_get_errors_and_the_next_one_goes_through(front, case):
    frame = tcp4_frame(bytes(200))
    if case == "bad grant":
        front.put_tx(netif.pack_tx_request(999, 0, 0, 5, len(frame)))
    elif case in ("runt", "zero length"):
        ref, _ = front.page(b"abc")
        front.put_tx(netif.pack_tx_request(ref, 0, 0, 5, 3 if case == "runt" else 0))
    elif case == "leaves the page":
        ref, _ = front.page(frame)
        front.put_tx(netif.pack_tx_request(ref, 4000, 0, 5, len(frame)))
    elif case == "too many slots":
        ref, _ = front.page(frame)
        requests = [netif.pack_tx_request(ref, 0, NETTXF_more_data, 5, 19 * 10)]
        requests += [netif.pack_tx_request(ref, 0, NETTXF_more_data if i < 17 else 0, 6 + i, 10) for i in range(18)]
        front.put_tx(*requests)
    elif case == "fragments too big":
        ref, _ = front.page(frame)
        front.put_tx(netif.pack_tx_request(ref, 0, NETTXF_more_data, 5, 100),
                     netif.pack_tx_request(ref, 0, 0, 6, 200))
    elif case == "unknown extra":
        ref, _ = front.page(frame)
        front.put_tx(netif.pack_tx_request(ref, 0, NETTXF_extra_info, 5, len(frame)), bytes([9, 0]) + bytes(10))
    elif case == "gso size 0":
        front.send(frame, flags=NETTXF_csum_blank, gso=(0, XEN_NETIF_GSO_TYPE_TCPV4), request_id=5)
    elif case == "csum on non-IP":
        front.send(bytes(12) + b"\x88\xcc" + bytes(50), flags=NETTXF_csum_blank, request_id=5)
    responses = front.tx_responses()
    assert responses and all(status in (XEN_NETIF_RSP_ERROR, XEN_NETIF_RSP_NULL) for _, status in responses)
    assert responses[0] == (5, XEN_NETIF_RSP_ERROR)
    assert front.tap_empty()
    assert front.backend.stats.tx_errors == 1
    front.send(frame, request_id=40)
    assert front.tx_responses() == [(40, XEN_NETIF_RSP_OKAY)]
    assert front.tap_frame()[1] == frame
    assert_grants_released(front)


def test_chain_past_the_published_requests_breaks_the_ring(front):
    ref, _ = front.page(bytes(100))
    front.put_tx(netif.pack_tx_request(ref, 0, NETTXF_more_data, 1, 100))
    with pytest.raises(RingBroken):
        front.backend.process_tx()


def test_producer_more_than_a_ring_ahead_breaks_the_ring(front):
    front.tx.shared.store(REQ_PROD, 1000)
    with pytest.raises(RingBroken):
        front.backend.process_tx()


# --- receive -----------------------------------------------------------------------------------


def test_frame_lands_in_the_posted_page(front):
    front.post_rx(GSO_RX_SLOTS)
    frame = tcp4_frame(b"to the guest")
    front.inject(frame, (tapmod.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 16))
    front.backend.process_rx()
    responses = front.rx_responses()
    assert responses == [(0, 0, NETRXF_csum_blank | NETRXF_data_validated, len(frame))]
    assert front.rx_data(responses) == frame
    assert front.notified["rx"] == 1
    assert front.backend.stats.rx_packets == 1


def test_gso_frame_fills_slots_with_the_extra_after_the_first(front):
    front.post_rx(GSO_RX_SLOTS)
    frame = tcp4_frame(random.Random(2).randbytes(60000))
    front.inject(frame, (tapmod.VIRTIO_NET_HDR_F_NEEDS_CSUM, tapmod.VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16))
    front.backend.process_rx()
    responses = front.rx_responses()
    first, extra, *rest = responses
    assert first[2] == NETRXF_csum_blank | NETRXF_data_validated | NETRXF_extra_info | NETRXF_more_data
    assert extra == ("extra", netif.pack_gso_extra(1448, XEN_NETIF_GSO_TYPE_TCPV4))
    assert [r[0] for r in rest] == list(range(2, 2 + len(rest)))
    assert all(r[2] & NETRXF_more_data for r in rest[:-1]) and not rest[-1][2] & NETRXF_more_data
    assert front.rx_data(responses) == frame
    assert sum(r[3] for r in [first, *rest]) == len(frame)


def test_large_frame_without_gso_uses_consecutive_slots(front):
    front.post_rx(GSO_RX_SLOTS)
    frame = tcp4_frame(random.Random(3).randbytes(9000))  # a jumbo frame: no extra slot
    front.inject(frame)
    front.backend.process_rx()
    responses = front.rx_responses()
    assert [r[0] for r in responses] == [0, 1, 2]
    assert front.rx_data(responses) == frame


def test_waits_for_buffers_and_resumes_when_posted(front):
    front.inject(tcp4_frame(b"early"))
    front.backend.process_rx()
    assert front.watching[-1] is False  # no buffers: the TAP is not watched
    assert front.rx.shared.load(REQ_EVENT) == 1  # and the frontend is asked to notify
    front.post_rx(2 * GSO_RX_SLOTS)
    front.backend.rx_notified()
    assert front.watching[-1] is True
    assert front.rx_data(front.rx_responses()) == tcp4_frame(b"early")


def test_bad_rx_grant_is_answered_with_an_error_and_the_frame_still_arrives(front):
    front.post_rx(GSO_RX_SLOTS + 2, bad={1})  # read-only: cannot be written
    frame = tcp4_frame(b"still delivered")
    front.inject(frame)
    front.backend.process_rx()
    responses = front.rx_responses()
    assert responses[:2] == [(0, 0, 0, XEN_NETIF_RSP_ERROR), (1, 0, 0, XEN_NETIF_RSP_ERROR)]
    assert responses[2][0] == 2 and front.rx_data(responses[2:]) == frame
    assert front.backend.stats.rx_errors == 2


def test_rx_producer_more_than_a_ring_ahead_breaks_the_ring(front):
    front.inject(tcp4_frame())
    front.rx.shared.store(REQ_PROD, 5000)
    with pytest.raises(RingBroken):
        front.backend.process_rx()


def test_detach_gives_the_rx_grants_back(front):
    front.post_rx(GSO_RX_SLOTS)
    front.inject(tcp4_frame())
    front.backend.process_rx()
    front.backend.detach()
    assert_grants_released(front)


def test_many_packets_each_way_across_the_ring_end(front):
    # 300 of each: both rings wrap, and each round's responses are written at once.
    frames = [tcp4_frame(bytes([n % 256]) * (60 + n)) for n in range(300)]
    for batch in range(3):
        for n in range(batch * 100, batch * 100 + 100):
            front.send(frames[n], request_id=n)
        assert front.tx_responses() == [(n, XEN_NETIF_RSP_OKAY) for n in range(batch * 100, batch * 100 + 100)]
        assert [front.tap_frame()[1] for _ in range(100)] == frames[batch * 100 : batch * 100 + 100]
    received = []
    while len(received) < 300:
        front.post_rx(front.rx.free_requests())
        for frame in frames[len(received) : len(received) + 8]:  # what the socket queue holds
            front.inject(frame)
        front.backend.process_rx()
        responses = front.rx_responses()
        received += [front.rx_data([response]) for response in responses]
    assert received == frames
    front.backend.detach()  # gives back the buffers still posted
    assert_grants_released(front)


@pytest.mark.parametrize("pages", [1, 2])
def test_responses_put_at_once_are_the_ones_put_singly(pages):
    memory = memoryview(bytearray(pages * PAGE))
    frontend = FrontRing(memory, netif.RX_ENTRY_SIZE)
    backend = BackRing(memory, netif.RX_ENTRY_SIZE)
    sent = 0
    for count in (100, 200, 150, 250):
        for _ in range(count):
            frontend.put_request(netif.pack_rx_request(sent & 0xFFFF, sent))
            sent += 1
        frontend.push_requests()
        requests = backend.take_requests()
        assert len(requests) == count
        ids = [netif.parse_rx_request(raw)[0] for raw in requests]
        backend.put_responses(b"".join(netif.pack_rx_response(i, 0, 0, i % 4096) for i in ids))
        backend.push_responses()
        assert [netif.parse_rx_response(raw) for raw in frontend.take_responses()] == [
            (i, 0, 0, i % 4096) for i in ids]
    frontend.put_request(netif.pack_rx_request(0, 0))
    frontend.push_requests()
    backend.take_requests()
    with pytest.raises(ValueError):
        backend.put_responses(bytes(2 * netif.RX_ENTRY_SIZE))  # two answers to one request
    with pytest.raises(ValueError):
        backend.put_responses(bytes(netif.RX_ENTRY_SIZE - 1))


# --- pieces ------------------------------------------------------------------------------------


def test_checksum_position():
    assert checksum_position(tcp4_frame()) == (34, 16, 20)
    assert checksum_position(tcp6_frame(hop_by_hop=True)) == (62, 16, 20)
    udp = bytes(12) + b"\x08\x00" + bytes([0x45]) + bytes(8) + b"\x11" + bytes(10) + bytes(8)
    assert checksum_position(udp) == (34, 6, 8)
    assert checksum_position(tcp4_frame()[:40]) is None  # cut short
    assert checksum_position(bytes(12) + b"\x08\x06" + bytes(28)) is None  # ARP


def test_features_to_offload():
    assert NetFeatures().tun_offload() == tapmod.TUN_F_CSUM
    assert NetFeatures(csum=False, sg=True, gso_tcpv4=True).tun_offload() == 0
    assert NetFeatures(sg=False, gso_tcpv4=True).tun_offload() == tapmod.TUN_F_CSUM


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an unprivileged user")
def test_tap_without_privileges_says_what_is_missing():
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # drop to nobody: no CAP_NET_ADMIN left
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            tapmod.TapDevice.open("pyvmm-noperm0")
            os.write(writer, b"opened")
        except tapmod.TapError as error:
            os.write(writer, str(error).encode())
        finally:
            os._exit(0)
    os.close(writer)
    os.waitpid(child, 0)
    message = os.read(reader, 4096).decode()
    os.close(reader)
    assert "pyvmm-noperm0" in message and "CAP_NET_ADMIN" in message


@pytest.mark.parametrize("split", [False, True], ids=["one-slot", "headers-across-slots"])
def test_headers_changed_after_they_were_judged_do_not_reach_the_tap(front, monkeypatch, split):
    # The backend reads the headers to build the virtio_net_hdr; a guest that
    # rewrites its pages right after (here: at the TAP write) must not get
    # other headers than those onto the wire.
    frame = tcp4_frame(random.Random(2).randbytes(9200 if split else 3000))
    pieces = (4096, 4096, len(frame) - 40 - 8192) if split else ()  # a 40-byte first slot
    hostile = udp_over_ipv6_lookalike(len(frame))
    first_length = len(frame) - sum(pieces)
    places = [(front.next_gfn, 100 if first_length <= PAGE - 100 else 0, first_length)]
    places += [(front.next_gfn + 1 + index, 0, length) for index, length in enumerate(pieces)]
    real_writev = os.writev

    def rewrite_then_write(fd, iov):
        position = 0
        for gfn, offset, length in places:
            front.memory.write(gfn * PAGE + offset, hostile[position : position + length])
            position += length
        return real_writev(fd, iov)

    monkeypatch.setattr(netback.os, "writev", rewrite_then_write)
    front.send(frame, pieces=pieces, flags=NETTXF_csum_blank, gso=(1440, XEN_NETIF_GSO_TYPE_TCPV4))
    assert all(status == XEN_NETIF_RSP_OKAY for _, status in front.tx_responses() if status != XEN_NETIF_RSP_NULL)
    header, data = front.tap_frame()
    assert header == (tapmod.VIRTIO_NET_HDR_F_NEEDS_CSUM, tapmod.VIRTIO_NET_HDR_GSO_TCPV4, 54, 1440, 34, 16)
    assert data[:HEADER_PEEK] == frame[:HEADER_PEEK]  # the headers judged, byte for byte
    # Only the headers are a copy: the payload is sent from the guest's pages.
    assert data[HEADER_PEEK:] == hostile[HEADER_PEEK:]
    assert_grants_released(front)


def udp_over_ipv6_lookalike(length):
    """Headers that would have made another virtio_net_hdr, padded to `length`."""
    eth = bytes(12) + b"\x86\xdd"
    ip = b"\x60" + bytes(5) + bytes([17, 64]) + bytes(32)
    return (eth + ip + bytes(8)).ljust(length, b"\xee")
