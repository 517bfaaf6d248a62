"""User networking's pure parts: `--net user` and xl's type=user, the
hostfwd grammar, passt's command line, the length-prefixed framing (with
reads and writes cut anywhere), checksum completion, and the NetBackend on
a FrameStream against the fake netfront."""

import errno
import random
import socket
import struct

import pytest

from frontends.netfront import PAGE, Netfront as Frontend, tcp4_frame
from pyvmm.config import ConfigError
from pyvmm.xen.backends.net import netif
from pyvmm.xen.backends.net.netback import NetFeatures
from pyvmm.xen.backends.net.netif import NETRXF_more_data, NETTXF_csum_blank, XEN_NETIF_GSO_TYPE_TCPV4
from pyvmm.xen.backends.net.netif import XEN_NETIF_RSP_ERROR, XEN_NETIF_RSP_OKAY
from pyvmm.xen.backends.net.passt import passt_command, passt_messages
from pyvmm.xen.backends.net.spec import HostForward, NicSpec, parse_hostfwd, parse_net_option, parse_vif_spec
from pyvmm.xen.backends.net.stream import (
    MAX_FRAME,
    FrameDecoder,
    FrameStream,
    StreamBroken,
    StreamSender,
    complete_checksum,
    encode_length,
)

# --- the options -------------------------------------------------------------------------


def test_user_net_with_forwards_mac_and_round_trips():
    nic = parse_net_option("user,mac=00:16:3E:0:0:9,hostfwd=tcp::2222-:22,hostfwd=udp:127.0.0.1:5353-:53,"
                           "hostfwd=tcp:[::1]:8080-80")
    assert nic.user and nic.tap is None and nic.mac == "00:16:3e:00:00:09"
    assert nic.hostfwd == (HostForward("tcp", 2222, 22), HostForward("udp", 5353, 53, "127.0.0.1"),
                           HostForward("tcp", 8080, 80, "::1"))
    assert parse_net_option(nic.option_text()) == nic
    assert parse_vif_spec(nic.to_xl()) == (nic, [])
    assert nic.to_xl().startswith("type=user,")
    assert parse_net_option("user") == NicSpec(None)
    assert parse_net_option("user,socket=/run/passt.sock").socket == "/run/passt.sock"
    assert parse_net_option("tap=t0") == NicSpec("t0")  # unchanged


@pytest.mark.parametrize("text, expected", [
    ("tcp::80-:8080", HostForward("tcp", 80, 8080)),
    (":80-:8080", HostForward("tcp", 80, 8080)),
    ("udp:0.0.0.0:53-:5353", HostForward("udp", 53, 5353, "0.0.0.0")),
    ("tcp:[2001:db8::1]:1-65535", HostForward("tcp", 1, 65535, "2001:db8::1")),
])
def test_hostfwd_grammar(text, expected):
    assert parse_hostfwd(text) == expected
    assert parse_hostfwd(str(expected)) == expected


@pytest.mark.parametrize("text, message", [
    ("tcp::22-10.0.2.15:22", "guest's address cannot be chosen"),
    ("tcp::0-:22", "between 1 and 65535"),
    ("tcp::22-:65536", "between 1 and 65535"),
    ("sctp::22-:22", "expected"),
    ("tcp:22-:22", "not an IPv4 or IPv6"),  # read as HOSTADDR "tcp"
    ("tcp::22", "expected"),
    ("tcp:host.example:22-:22", "not an IPv4 or IPv6"),
    ("", "expected"),
])
def test_bad_hostfwd(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_hostfwd(text)


@pytest.mark.parametrize("text", [
    "user,hostfwd=tcp::22",
    "user,tap=t0",
    "tap=t0,hostfwd=tcp::1-:1",
    "tap=t0,socket=/x",
    "user,socket=",
    "user,socket=/x,hostfwd=tcp::1-:1",
    "user,socket=/x,pcap=/tmp/p.pcap",
    "user,pcap=",
    "tap=t0,pcap=/tmp/p.pcap",
    "user,hostfwd=tcp::80-:1,hostfwd=tcp:127.0.0.1:80-:2",
    "user,bogus=1",
    "mac=00:16:3e:00:00:01,user",
])
def test_bad_user_net_options(text):
    with pytest.raises(ConfigError, match="--net"):
        parse_net_option(text)


def test_same_port_over_tcp_and_udp_is_fine():
    assert len(parse_net_option("user,hostfwd=tcp::53-:53,hostfwd=udp::53-:53").hostfwd) == 2


@pytest.mark.parametrize("text, message", [
    ("type=user,vifname=t0", "no vifname"),
    ("hostfwd=tcp::1-:1,vifname=t0", "add type=user"),
    ("type=user,hostfwd=tcp::1", "expected"),
    ("type=bogus", "expected vif, ioemu"),
    ("vifname=t0,pcap=/tmp/p.pcap", "add type=user"),
    ("type=user,pcap=", "needs the path"),
])
def test_bad_xl_user_vifs(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_vif_spec(text)


def test_two_user_vifs_in_one_xl_file(tmp_path):
    from pyvmm.xlcfg import load_xl_config

    cfg = tmp_path / "vm.cfg"
    cfg.write_text("name = 'u'\ntype = 'hvm'\nkernel = '/k'\nvif = ['type=user,hostfwd=tcp::2222-:22', 'type=user']\n")
    config = load_xl_config(cfg)
    assert [nic.hostfwd for nic in config.vifs] == [(HostForward("tcp", 2222, 22),), ()]


def test_missing_passt_is_named_with_its_package(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match=r"passt.*not installed.*apt install passt"):
        parse_net_option("user").check()
    parse_net_option("user,socket=/x").check()  # someone else's passt: nothing to start


def test_passt_command_line():
    nic = parse_net_option("user,hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=udp::5353-:53")
    command = passt_command(nic, 7, "/run/x/passt.pid", "/usr/bin/passt")
    assert command[:1] == ["/usr/bin/passt"]
    assert command[command.index("--fd") + 1] == "7"
    assert command[command.index("--pid") + 1] == "/run/x/passt.pid"
    assert {"--foreground", "--quiet", "--stderr"} <= set(command)
    assert command[-4:] == ["-t", "127.0.0.1/8080:80", "-u", "5353:53"]


def test_pcap_goes_to_passt_and_round_trips(tmp_path):
    nic = parse_net_option(f"user,hostfwd=tcp::8080-:80,pcap={tmp_path}/guest.pcap")
    assert nic.pcap == f"{tmp_path}/guest.pcap"
    assert parse_net_option(nic.option_text()) == nic
    assert parse_vif_spec(nic.to_xl()) == (nic, [])
    command = passt_command(nic, 7, "/run/x/passt.pid", "/usr/bin/passt")
    assert command[command.index("--pcap") + 1] == f"{tmp_path}/guest.pcap"
    assert "--pcap" not in passt_command(parse_net_option("user"), 7, "/p", "/usr/bin/passt")


def test_passt_messages_drop_the_syslog_noise():
    text = "Failed to send 31 bytes to syslog\nDon't run as root.\nFailed to send 9 bytes to syslog\n\nBad thing\n"
    assert passt_messages(text) == ["Don't run as root.", "Bad thing"]


# --- framing -------------------------------------------------------------------------------


def frames_of(sizes, seed=0):
    rng = random.Random(seed)
    return [rng.randbytes(size) for size in sizes]


@pytest.mark.parametrize("cut", [1, 3, 4, 5, 7, 1000, 65536, 1 << 20])
def test_decoder_reassembles_frames_cut_anywhere(cut):
    frames = frames_of([14, 60, 1514, MAX_FRAME, 9000, 15, MAX_FRAME, 64])
    wire = b"".join(encode_length(len(frame)) + frame for frame in frames)
    decoder = FrameDecoder()
    out = []
    for start in range(0, len(wire), cut):
        piece = memoryview(wire)[start:start + cut]
        while piece:  # as much as there is room for, as a recv() would take
            room = decoder.space()
            count = min(len(room), len(piece))
            room[:count] = piece[:count]
            decoder.filled(count)
            piece = piece[count:]
            while (frame := decoder.next_frame()) is not None:
                out.append(bytes(frame))
    assert out == frames
    assert decoder.buffered == 0


def test_decoder_random_cuts_through_its_own_buffer():
    rng = random.Random(5)
    frames = frames_of([rng.randrange(14, 4000) for _ in range(300)], seed=5)
    wire = b"".join(encode_length(len(frame)) + frame for frame in frames)
    decoder = FrameDecoder(max_frame=4000)  # a small buffer: it wraps (compacts) often
    out, position = [], 0
    while position < len(wire):
        room = decoder.space()
        count = min(len(room), rng.randrange(1, 9000), len(wire) - position)
        room[:count] = wire[position:position + count]
        decoder.filled(count)
        position += count
        while (frame := decoder.next_frame()) is not None:
            out.append(bytes(frame))
    assert out == frames


def test_decoder_skips_runts_and_breaks_on_oversized_lengths():
    decoder = FrameDecoder()
    decoder.feed(encode_length(3) + b"abc" + encode_length(0) + encode_length(14) + b"x" * 14)
    assert bytes(decoder.next_frame()) == b"x" * 14
    assert decoder.short_frames == 2
    decoder.feed(encode_length(MAX_FRAME + 1))
    with pytest.raises(StreamBroken, match="above the limit"):
        decoder.next_frame()
    decoder = FrameDecoder()
    decoder.feed(b"\xff\xff\xff\xff")
    with pytest.raises(StreamBroken):
        decoder.has_frame()


def test_decoder_buffer_is_bounded():
    with pytest.raises(ValueError):
        FrameDecoder(max_frame=1000, capacity=1000)
    decoder = FrameDecoder(max_frame=100)
    assert len(decoder.space()) == 2 * (4 + 100)


class Writer:
    """A descriptor that takes at most `budget` bytes per call (then EAGAIN once)."""

    def __init__(self, budgets):
        self.budgets = list(budgets)
        self.data = bytearray()

    def __call__(self, fd, parts):
        budget = self.budgets.pop(0) if self.budgets else 1 << 30
        if budget == 0:
            raise BlockingIOError(errno.EAGAIN, "full")
        joined = b"".join(bytes(part) for part in parts)[:budget]
        self.data += joined
        return len(joined)


def test_sender_keeps_frames_whole_across_partial_writes():
    frames = frames_of([100, 5000, 70, 3000])
    writer = Writer([50, 0, 0, 2000, 0, 7, 0])
    sender = StreamSender(-1, limit=1 << 20, write=writer)
    for frame in frames:
        sender.send([encode_length(len(frame)), frame])
    while not sender.flush():
        pass
    decoder = FrameDecoder()
    decoder.feed(bytes(writer.data))
    assert [bytes(decoder.next_frame()) for _ in frames] == frames


def test_sender_refuses_a_frame_it_cannot_start_or_keep():
    writer = Writer([0])
    sender = StreamSender(-1, limit=100, write=writer)
    with pytest.raises(BlockingIOError):  # nothing of it went: dropped whole
        sender.send([encode_length(10), bytes(10)])
    writer.budgets = [5, 0]
    sender.send([encode_length(90), bytes(90)])  # 5 bytes went, 89 wait
    assert sender.backlogged == 89
    with pytest.raises(BlockingIOError, match="backlog"):
        sender.send([encode_length(20), bytes(20)])
    assert sender.flush()
    assert writer.data == encode_length(90) + bytes(90)


# --- checksums -----------------------------------------------------------------------------


def ones_complement_sum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ipv4_packet(protocol, payload_length, seed):
    rng = random.Random(seed)
    source, destination = rng.randbytes(4), rng.randbytes(4)
    header_length = 20 if protocol == 6 else 8
    l4 = bytearray(rng.randbytes(header_length + payload_length))
    if protocol == 6:
        l4[12] = 5 << 4
    else:
        l4[4:6] = len(l4).to_bytes(2, "big")
    checksum_at = 16 if protocol == 6 else 6
    pseudo = source + destination + bytes([0, protocol]) + len(l4).to_bytes(2, "big")
    l4[checksum_at:checksum_at + 2] = ones_complement_sum(pseudo).to_bytes(2, "big")  # CHECKSUM_PARTIAL's seed
    ip = bytes([0x45, 0]) + (20 + len(l4)).to_bytes(2, "big") + bytes(5) + bytes([protocol]) + bytes(2) \
        + source + destination
    frame = bytearray(bytes(12) + b"\x08\x00" + ip + l4)
    return frame, pseudo, checksum_at


@pytest.mark.parametrize("protocol", [6, 17])
@pytest.mark.parametrize("payload_length", [0, 1, 2, 1459, 65000])
def test_completed_checksums_verify(protocol, payload_length):
    for seed in range(4):
        frame, pseudo, checksum_at = ipv4_packet(protocol, payload_length, seed)
        complete_checksum(frame, 34, checksum_at)
        l4 = bytes(frame[34:])
        # The receiver's check: the sum over pseudo-header and segment is all ones.
        assert ones_complement_sum(pseudo + l4) == 0xFFFF
        assert int.from_bytes(l4[checksum_at:checksum_at + 2], "big") != 0 or protocol == 6


def test_checksum_outside_the_frame_is_refused():
    frame = bytearray(60)
    for start, offset in ((10, 16), (50, 16), (34, -1)):
        with pytest.raises(ValueError):
            complete_checksum(frame, start, offset)


# --- the backend on a stream -------------------------------------------------------------


class StreamFront(Frontend):
    """The fake netfront, its backend on a FrameStream over a socket pair
    (`peer`: passt's end, blocking)."""

    def __init__(self, features):
        ours, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.peer.settimeout(5)
        self.stream = FrameStream(ours, "test passt")
        super().__init__(features, readv=self.stream.readv, writev=self.stream.writev,
                         rx_frame_max=self.stream.rx_frame_max)

    def peer_frame(self):
        length = struct.unpack(">I", self.peer.recv(4, socket.MSG_WAITALL))[0]
        return self.peer.recv(length, socket.MSG_WAITALL)

    def close(self):
        super().close()
        self.stream.close()
        self.peer.close()


@pytest.fixture
def stream_front():
    front = StreamFront(NetFeatures(sg=True, csum=True))
    yield front
    front.close()


def test_guest_frames_reach_the_stream_checksummed(stream_front):
    front = stream_front
    frame, pseudo, _ = ipv4_packet(6, 9000, seed=9)
    front.send(bytes(frame), pieces=(4096, 4096), flags=NETTXF_csum_blank)
    plain = tcp4_frame(b"plain")
    front.send(plain, request_id=10)
    assert [status for _, status in front.tx_responses()] == [XEN_NETIF_RSP_OKAY] * 4
    sent = front.peer_frame()
    assert len(sent) == len(frame) and sent[:50] == frame[:50] and sent[54:] == frame[54:]
    assert ones_complement_sum(pseudo + sent[34:]) == 0xFFFF
    assert front.peer_frame() == plain  # as the guest wrote it


def test_gso_from_the_guest_is_refused_on_a_stream(stream_front):
    front = stream_front
    front.send(tcp4_frame(bytes(3000)), flags=NETTXF_csum_blank, gso=(1440, XEN_NETIF_GSO_TYPE_TCPV4))
    assert {status for _, status in front.tx_responses() if status != netif.XEN_NETIF_RSP_NULL} == \
        {XEN_NETIF_RSP_ERROR}
    assert front.stream.refused == 1


def test_large_and_small_frames_from_passt_reach_the_guest_in_order(stream_front):
    front = stream_front
    backend = front.backend
    assert backend.rx_slots_needed == 17  # a 64 KiB frame in pages, no slot kept for GSO
    frames = frames_of([MAX_FRAME, 60, 9014, 1514], seed=3)
    wire = b"".join(encode_length(len(frame)) + frame for frame in frames)
    front.post_rx(64)
    for start in range(0, len(wire), 7000):  # arriving in pieces
        front.peer.sendall(wire[start:start + 7000])
        backend.process_rx()
    responses = front.rx_responses()
    assert all(status > 0 for _, _, _, status in responses)
    packets, current = [], []
    for response in responses:
        current.append(response)
        if not response[2] & NETRXF_more_data:
            packets.append(front.rx_data(current))
            current = []
    assert packets == frames
    assert backend.stats.rx_packets == 4 and backend.stats.rx_dropped == 0


def test_a_guest_without_sg_gets_one_page_frames_only():
    front = StreamFront(NetFeatures(sg=False, csum=True))
    try:
        assert front.backend.rx_slots_needed == 1
        for frame in frames_of([5000, 1514], seed=4):
            front.peer.sendall(encode_length(len(frame)) + frame)
        front.post_rx(4)
        front.backend.process_rx()
        responses = front.rx_responses()
        assert len(responses) == 1 and responses[0][3] == 1514
        assert front.backend.stats.rx_dropped == 1
    finally:
        front.close()


def test_passt_going_away_is_noticed(stream_front):
    front = stream_front
    front.post_rx(20)
    front.peer.sendall(encode_length(60) + bytes(60) + encode_length(30))  # then the connection ends mid-frame
    front.peer.close()
    front.backend.process_rx()
    assert len(front.rx_responses()) == 1
    assert front.stream.eof
    front.send(tcp4_frame(b"x"))
    assert [status for _, status in front.tx_responses()] == [XEN_NETIF_RSP_ERROR]


def test_page_size_constant_matches():
    assert PAGE == netif.PAGE_SIZE
