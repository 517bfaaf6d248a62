"""gdb remote protocol framing, arguments and the amd64 register file."""

from __future__ import annotations

import random
import xml.etree.ElementTree as ET

import pytest

from pyvmm.debug.gdbstub import protocol as p


def test_frame_checksums_and_escapes():
    assert p.frame(b"OK") == b"$OK#9a"
    framed = p.frame(b"a$b#c}d*e")
    assert framed.startswith(b"$a}\x04b}\x03c}]d}\x0ae#")
    events = p.PacketReader().feed(framed)
    assert events == [p.Packet(b"a$b#c}d*e")]


def test_reader_splits_acks_interrupts_and_packets_across_feeds():
    reader = p.PacketReader()
    stream = b"+" + p.frame(b"qSupported:swbreak+") + b"\x03-" + p.frame(b"g")
    events = []
    for i in range(len(stream)):  # one byte at a time
        events += reader.feed(stream[i : i + 1])
    assert events == [p.Ack(True), p.Packet(b"qSupported:swbreak+"), p.Interrupt(), p.Ack(False), p.Packet(b"g")]


@pytest.mark.parametrize("wire, reason", [
    (b"$g#00", "checksum mismatch"),
    (b"$g#zz", "bad checksum digits"),
    (b"$ab}#" + b"%02x" % p.checksum(b"ab}"), "packet ends in an escape"),
    (b"$abc$g#67", "packet restarted"),
])
def test_garbled_packets_become_bad_packet_events(wire, reason):
    events = p.PacketReader().feed(wire)
    assert isinstance(events[0], p.BadPacket) and reason in events[0].reason
    if wire.startswith(b"$abc$"):
        assert events[1] == p.Packet(b"g")  # the packet after the cut-off one survives


def test_oversized_packets_are_dropped_not_buffered():
    reader = p.PacketReader(limit=64)
    events = reader.feed(b"$" + b"A" * 1000)
    assert events == [p.BadPacket("packet too long")]
    assert reader.feed(b"#00" + p.frame(b"?")) == [p.Packet(b"?")]


def test_random_bytes_never_raise():
    rng = random.Random(7)
    reader = p.PacketReader(limit=256)
    for _ in range(2000):
        for event in reader.feed(rng.randbytes(rng.randrange(1, 64))):
            assert isinstance(event, (p.Packet, p.BadPacket, p.Interrupt, p.Ack))


def test_argument_parsers_reject_nonsense():
    assert p.parse_address_length(b"ffffffff81000000,10") == (0xFFFFFFFF81000000, 16)
    assert p.parse_breakpoint(b"0,ffffffff81000000,1;X1,0") == (0, 0xFFFFFFFF81000000, 1)
    assert p.parse_thread_id(b"-1") == -1 and p.parse_thread_id(b"p1.2") == 2
    for bad in (b"", b"12", b"x,1", b"1,", b"1" * 40 + b",1", b"-5,1"):
        with pytest.raises(p.ProtocolError):
            p.parse_address_length(bad)
    for bad in (b"0,1", b"0,zz,1", b"999,1,1"):
        with pytest.raises(p.ProtocolError):
            p.parse_breakpoint(bad)
    with pytest.raises(p.ProtocolError):
        p.hex_bytes(b"abc")


def test_register_file_matches_gdbs_amd64_layout():
    names = [reg.name for reg in p.REGISTERS]
    assert names[:16] == ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"] + [f"r{i}" for i in range(8, 16)]
    assert names[16:24] == ["rip", "eflags", "cs", "ss", "ds", "es", "fs", "gs"]
    assert p.REGISTER_INDEX["st0"] == 24 and p.REGISTER_INDEX["xmm0"] == 40 and p.REGISTER_INDEX["mxcsr"] == 56
    # 16 GPRs + rip, eflags and 6 selectors of 4 bytes, x87, SSE, fs/gs base
    assert p.G_PACKET_SIZE == 17 * 8 + 7 * 4 + 8 * 10 + 8 * 4 + 16 * 16 + 4 + 2 * 8


def test_registers_round_trip_and_unknown_ones_are_unavailable():
    values = {"rax": 0x1122334455667788, "rip": 0xFFFFFFFF81000000, "eflags": 0x246, "cs": 0x10}
    encoded = p.encode_registers(values)
    assert len(encoded) == 2 * p.G_PACKET_SIZE
    assert encoded.startswith(b"8877665544332211")
    assert encoded[2 * 8 : 2 * 16] == b"xx" * 8  # rbx: not given
    decoded = p.decode_registers(encoded.replace(b"xx", b"00"))
    assert {name: decoded[name] for name in values} == values
    assert p.decode_register(16, b"0000008100000000") == ("rip", 0x81000000)
    with pytest.raises(p.ProtocolError):
        p.decode_register(16, b"00")  # too short for rip
    with pytest.raises(p.ProtocolError):
        p.decode_register(len(p.REGISTERS), b"00")
    with pytest.raises(p.ProtocolError):
        p.decode_registers(b"00" * (p.G_PACKET_SIZE + 1))


def test_target_xml_lists_every_register_in_g_packet_order():
    root = ET.fromstring(p.target_xml().split(b"\n", 2)[2])
    regs = root.findall("./feature/reg")
    assert [(r.get("name"), int(r.get("bitsize")), int(r.get("regnum"))) for r in regs] == [
        (reg.name, reg.size * 8, number) for number, reg in enumerate(p.REGISTERS)
    ]
    assert [f.get("name") for f in root.findall("feature")] == [
        "org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse", "org.gnu.gdb.i386.segments"]


def test_xfer_slices_mark_the_last_chunk():
    assert p.xfer_slice(b"abcdef", 0, 4) == b"mabcd"
    assert p.xfer_slice(b"abcdef", 4, 4) == b"lef"
    assert p.xfer_slice(b"abcdef", 10, 4) == b"l"


def test_x87_tag_word_from_the_abridged_one():
    zero = bytes(10)
    one = (1 << 63).to_bytes(8, "little") + (0x3FFF).to_bytes(2, "little")
    stack = [one, zero] + [zero] * 6
    # TOP = 6: ST0 is physical register 6, ST1 is 7; the rest are empty.
    assert p.x87_tag_word(0b1100_0000, 6 << 11, stack) == 0b01_00_111111111111  # zero, valid, 6 empty
    assert p.x87_tag_word(0, 0, [zero] * 8) == 0xFFFF
