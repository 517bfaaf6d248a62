"""gdb's remote serial protocol: framing, hex and the amd64 register file.

Pure logic, no sockets and no KVM. A packet on the wire is
`$payload#xx`, xx being the payload's byte sum modulo 256 in hex; `}`
escapes `$ # } *` (the byte after it is XORed with 0x20); a lone 0x03
is an interrupt request; `+`/`-` acknowledge. gdb is a client we did not
write, and whatever reaches the port may not be gdb at all, so the reader
never raises: oversized or garbled input becomes a `BadPacket` event.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# The largest packet we accept, and the PacketSize we announce (gdb then
# never sends more). Memory replies are bounded by it too.
PACKET_SIZE = 0x4000
INTERRUPT = 0x03


class ProtocolError(Exception):
    """A packet whose arguments make no sense; answered with an error reply."""


def checksum(payload: bytes) -> int:
    return sum(payload) & 0xFF


def escape(payload: bytes) -> bytes:
    out = bytearray()
    for byte in payload:
        if byte in b"$#}*":
            out += bytes((0x7D, byte ^ 0x20))
        else:
            out.append(byte)
    return bytes(out)


def frame(payload: bytes) -> bytes:
    """`payload` as one packet on the wire."""
    body = escape(payload)
    return b"$" + body + b"#" + b"%02x" % checksum(body)


@dataclass(frozen=True)
class Packet:
    payload: bytes  # unescaped


@dataclass(frozen=True)
class BadPacket:
    reason: str  # answered with a `-` (retransmit) while acks are on


@dataclass(frozen=True)
class Interrupt:
    pass


@dataclass(frozen=True)
class Ack:
    positive: bool


class PacketReader:
    """Turns a byte stream into Packet / BadPacket / Interrupt / Ack events."""

    def __init__(self, limit: int = PACKET_SIZE):
        self.limit = limit
        self._body: bytearray | None = None  # inside a packet, before '#'
        self._sum: bytearray | None = None  # after '#': the two checksum digits

    def feed(self, data: bytes) -> list:
        events: list = []
        for byte in data:
            if self._sum is not None:
                self._sum.append(byte)
                if len(self._sum) == 2:
                    events.append(self._finish())
            elif self._body is not None:
                if byte == 0x23:  # '#'
                    self._sum = bytearray()
                elif byte == 0x24:  # '$' inside a packet: the old one was cut short
                    events.append(BadPacket("packet restarted"))
                    self._body = bytearray()
                elif len(self._body) >= 2 * self.limit:
                    events.append(BadPacket("packet too long"))
                    self._body = None
                else:
                    self._body.append(byte)
            elif byte == 0x24:
                self._body = bytearray()
            elif byte == INTERRUPT:
                events.append(Interrupt())
            elif byte in b"+-":
                events.append(Ack(byte == 0x2B))
            # Anything else between packets is line noise: ignored.
        return events

    def _finish(self):
        body, digits = bytes(self._body), bytes(self._sum)
        self._body = self._sum = None
        try:
            expected = int(digits, 16)
        except ValueError:
            return BadPacket(f"bad checksum digits {digits!r}")
        if checksum(body) != expected:
            return BadPacket("checksum mismatch")
        try:
            payload = unescape(body)
        except ProtocolError as error:
            return BadPacket(str(error))
        if len(payload) > self.limit:
            return BadPacket("packet too long")
        return Packet(payload)


def unescape(body: bytes) -> bytes:
    out = bytearray()
    escaped = False
    for byte in body:
        if escaped:
            out.append(byte ^ 0x20)
            escaped = False
        elif byte == 0x7D:
            escaped = True
        else:
            out.append(byte)
    if escaped:
        raise ProtocolError("packet ends in an escape")
    return bytes(out)


# --- arguments -----------------------------------------------------------------


def parse_hex(text: bytes, what: str = "number", bits: int = 64) -> int:
    if not text or len(text) > bits // 4 + 1:
        raise ProtocolError(f"bad {what} {text[:40]!r}")
    try:
        value = int(text, 16)
    except ValueError:
        raise ProtocolError(f"bad {what} {text[:40]!r}") from None
    if value < 0 or value >> bits:
        raise ProtocolError(f"{what} out of range")
    return value


def hex_bytes(text: bytes) -> bytes:
    try:
        return bytes.fromhex(text.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("bad hex data") from None


def parse_address_length(text: bytes) -> tuple[int, int]:
    """'ADDR,LENGTH' (m, M, X, qXfer offsets)."""
    address, comma, length = text.partition(b",")
    if not comma:
        raise ProtocolError("expected ADDR,LENGTH")
    return parse_hex(address, "address"), parse_hex(length, "length", 32)


def parse_breakpoint(text: bytes) -> tuple[int, int, int]:
    """'TYPE,ADDR,KIND' of Z/z packets (conditions after ';' are ignored)."""
    fields = text.split(b";", 1)[0].split(b",")
    if len(fields) != 3:
        raise ProtocolError("expected TYPE,ADDR,KIND")
    return parse_hex(fields[0], "type", 8), parse_hex(fields[1], "address"), parse_hex(fields[2], "kind", 8)


def parse_thread_id(text: bytes) -> int:
    """A thread id: -1 (all), 0 (any) or a positive id (pid.tid forms too)."""
    if text.startswith(b"p"):
        text = text.split(b".", 1)[1] if b"." in text else b"-1"
    if text == b"-1":
        return -1
    return parse_hex(text, "thread id", 32)


# --- the amd64 register file -----------------------------------------------------

GPR_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEGMENT_NAMES = ("cs", "ss", "ds", "es", "fs", "gs")
FPU_CONTROL_NAMES = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")


@dataclass(frozen=True)
class Register:
    name: str
    size: int  # bytes
    type: str  # the target.xml type
    feature: str


def _register_file() -> tuple[Register, ...]:
    core, sse, segments = "org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse", "org.gnu.gdb.i386.segments"
    regs = [Register(name, 8, "int64", core) for name in GPR_NAMES]
    regs[6] = Register("rbp", 8, "data_ptr", core)
    regs[7] = Register("rsp", 8, "data_ptr", core)
    regs.append(Register("rip", 8, "code_ptr", core))
    regs.append(Register("eflags", 4, "int32", core))
    regs += [Register(name, 4, "int32", core) for name in SEGMENT_NAMES]
    regs += [Register(f"st{i}", 10, "i387_ext", core) for i in range(8)]
    regs += [Register(name, 4, "int", core) for name in FPU_CONTROL_NAMES]
    regs += [Register(f"xmm{i}", 16, "uint128", sse) for i in range(16)]
    regs.append(Register("mxcsr", 4, "int", sse))
    regs += [Register(name, 8, "int", segments) for name in ("fs_base", "gs_base")]
    return tuple(regs)


REGISTERS = _register_file()
REGISTER_INDEX = {reg.name: number for number, reg in enumerate(REGISTERS)}
G_PACKET_SIZE = sum(reg.size for reg in REGISTERS)


def encode_registers(values: dict[str, int]) -> bytes:
    """The g reply: every register, little-endian hex; missing ones as 'xx'."""
    return b"".join(encode_register(number, values) for number in range(len(REGISTERS)))


def encode_register(number: int, values: dict[str, int]) -> bytes:
    reg = REGISTERS[number]
    value = values.get(reg.name)
    if value is None:
        return b"xx" * reg.size  # unavailable
    return (value & ((1 << (8 * reg.size)) - 1)).to_bytes(reg.size, "little").hex().encode()


def decode_registers(text: bytes) -> dict[str, int]:
    """A G packet's registers; a shorter packet sets a prefix of them."""
    data = hex_bytes(text)
    if len(data) > G_PACKET_SIZE:
        raise ProtocolError("G packet longer than the register file")
    values, offset = {}, 0
    for reg in REGISTERS:
        if offset + reg.size > len(data):
            break
        values[reg.name] = int.from_bytes(data[offset : offset + reg.size], "little")
        offset += reg.size
    return values


def decode_register(number: int, text: bytes) -> tuple[str, int]:
    if not 0 <= number < len(REGISTERS):
        raise ProtocolError(f"no register {number}")
    reg = REGISTERS[number]
    data = hex_bytes(text)
    if len(data) != reg.size:
        raise ProtocolError(f"{reg.name} is {reg.size} bytes, not {len(data)}")
    return reg.name, int.from_bytes(data, "little")


def target_xml() -> bytes:
    """The target description gdb fetches with qXfer:features:read."""
    lines = ['<?xml version="1.0"?>', '<!DOCTYPE target SYSTEM "gdb-target.dtd">', "<target>",
             "<architecture>i386:x86-64</architecture>"]
    feature = None
    for number, reg in enumerate(REGISTERS):
        if reg.feature != feature:
            if feature is not None:
                lines.append("</feature>")
            feature = reg.feature
            lines.append(f'<feature name="{feature}">')
        lines.append(f'<reg name="{reg.name}" bitsize="{reg.size * 8}" type="{reg.type}" regnum="{number}"/>')
    lines += ["</feature>", "</target>"]
    return "\n".join(lines).encode() + b"\n"


def xfer_slice(document: bytes, offset: int, length: int) -> bytes:
    """A qXfer reply: 'm' + a chunk while more follows, 'l' + the last one."""
    chunk = document[offset : offset + length]
    return (b"l" if offset + length >= len(document) else b"m") + chunk


# --- x87 state in the g packet ----------------------------------------------------


def x87_tag_word(abridged: int, fsw: int, registers: list[bytes]) -> int:
    """The full 16-bit tag word from FXSAVE's abridged one (bit set = valid)."""
    top = (fsw >> 11) & 7
    tags = 0
    for physical in range(8):
        if not abridged & (1 << physical):
            tag = 3  # empty
        else:
            st = registers[(physical - top) & 7]
            exponent = struct.unpack_from("<H", st, 8)[0] & 0x7FFF
            mantissa = struct.unpack_from("<Q", st, 0)[0]
            if exponent == 0x7FFF:
                tag = 2  # special
            elif exponent == 0:
                tag = 1 if mantissa == 0 else 2  # zero / denormal
            else:
                tag = 0 if mantissa >> 63 else 2
        tags |= tag << (2 * physical)
    return tags
