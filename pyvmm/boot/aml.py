"""A small encoder for the ACPI Machine Language (ACPI spec, chapter 20).

Just what pyvmm's DSDT needs: names, integers, strings, packages, scopes,
devices, methods that return a value, and buffers holding resource templates
(ACPI spec, section 6.4). Every function returns the encoded bytes; Python
ints and strs given as data objects are encoded as AML integers and strings.
"""

from __future__ import annotations

import struct

ZERO_OP = 0x00
ONE_OP = 0x01
ONES_OP = 0xFF
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
METHOD_OP = 0x14
RETURN_OP = 0xA4
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82  # after EXT_OP_PREFIX
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
ROOT_CHAR = b"\\"
PARENT_CHAR = b"^"

Data = int | str | bytes


# --- Encodings of the grammar's building blocks -----------------------------

def pkg_length(payload_len: int) -> bytes:
    """PkgLength for `payload_len` bytes following it; it counts itself too."""
    if payload_len + 1 < 1 << 6:
        return bytes([payload_len + 1])
    for extra in (1, 2, 3):
        total = payload_len + 1 + extra
        if total < 1 << (4 + 8 * extra):
            rest = total >> 4
            return bytes([(extra << 6) | (total & 0xF)]) + rest.to_bytes(extra, "little")
    raise ValueError(f"AML package of {payload_len} bytes is too large")


def _name_seg(seg: str) -> bytes:
    if not 1 <= len(seg) <= 4 or not (seg[0].isupper() or seg[0] == "_"):
        raise ValueError(f"bad ACPI name segment {seg!r}")
    if not all(c.isupper() or c.isdigit() or c == "_" for c in seg):
        raise ValueError(f"bad ACPI name segment {seg!r}")
    return seg.ljust(4, "_").encode()


def name_string(path: str) -> bytes:
    r"""Encode a name such as "_S5", "\_SB.PCI0" or "^FOO"."""
    prefix = b""
    while path.startswith(("\\", "^")):
        prefix += path[0].encode()
        path = path[1:]
    segs = [_name_seg(s) for s in path.split(".")] if path else []
    if not segs:
        return prefix + b"\0"  # NullName
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


def integer(value: int) -> bytes:
    """The shortest encoding of an unsigned integer constant."""
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    for prefix, fmt, limit in (
        (BYTE_PREFIX, "<B", 0xFF),
        (WORD_PREFIX, "<H", 0xFFFF),
        (DWORD_PREFIX, "<I", 0xFFFF_FFFF),
        (QWORD_PREFIX, "<Q", 0xFFFF_FFFF_FFFF_FFFF),
    ):
        if 0 <= value <= limit:
            return bytes([prefix]) + struct.pack(fmt, value)
    raise ValueError(f"AML integer {value} out of range")


def string(text: str) -> bytes:
    raw = text.encode("ascii")
    if b"\0" in raw:
        raise ValueError("AML strings cannot contain NUL")
    return bytes([STRING_PREFIX]) + raw + b"\0"


def eisa_id(text: str) -> bytes:
    """EISAID("PNP0A03"): three letters and four hex digits packed in a DWORD."""
    if len(text) != 7 or not text[:3].isalpha() or not text[:3].isupper():
        raise ValueError(f"bad EISA id {text!r}")
    letters = [(ord(c) - 0x40) & 0x1F for c in text[:3]]
    vendor = (letters[0] << 10) | (letters[1] << 5) | letters[2]
    product = int(text[3:], 16)
    # Stored big-endian in the byte stream.
    return integer(int.from_bytes(struct.pack(">HH", vendor, product), "little"))


def data(value: Data) -> bytes:
    if isinstance(value, bool):
        raise TypeError("use 0/1 for AML booleans")
    if isinstance(value, int):
        return integer(value)
    if isinstance(value, str):
        return string(value)
    return bytes(value)


# --- Named objects and control --------------------------------------------

def name(path: str, value: Data) -> bytes:
    return bytes([NAME_OP]) + name_string(path) + data(value)


def package(*elements: Data) -> bytes:
    if len(elements) > 255:
        raise ValueError("a Package holds at most 255 elements")
    body = bytes([len(elements)]) + b"".join(data(e) for e in elements)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


def scope(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


def method(path: str, *terms: bytes, args: int = 0, serialized: bool = False) -> bytes:
    if not 0 <= args <= 7:
        raise ValueError("a Method takes 0 to 7 arguments")
    flags = args | (int(serialized) << 3)
    body = name_string(path) + bytes([flags]) + b"".join(terms)
    return bytes([METHOD_OP]) + pkg_length(len(body)) + body


def return_(value: Data) -> bytes:
    return bytes([RETURN_OP]) + data(value)


def buffer(contents: bytes) -> bytes:
    body = integer(len(contents)) + contents
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


# --- Resource descriptors (ACPI spec 6.4) -----------------------------------

RESOURCE_MEMORY = 0
RESOURCE_IO = 1
RESOURCE_BUS = 2

# General flags of address space descriptors.
ADDR_CONSUMER = 1 << 0  # clear: the device produces (bridges) this range
ADDR_MIN_FIXED = 1 << 2
ADDR_MAX_FIXED = 1 << 3
# Type-specific flags.
IO_ENTIRE_RANGE = 0x3
MEM_READ_WRITE = 0x1
MEM_CACHEABLE = 0x1 << 1


def _large(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + struct.pack("<H", len(body)) + body


def word_address_space(
    kind: int, minimum: int, maximum: int, *, type_flags: int = 0,
    general_flags: int = ADDR_MIN_FIXED | ADDR_MAX_FIXED, translation: int = 0,
    granularity: int = 0,
) -> bytes:
    """Word Address Space Descriptor (WordIO, WordBusNumber)."""
    length = maximum - minimum + 1
    body = struct.pack(
        "<BBBHHHHH", kind, general_flags, type_flags, granularity, minimum, maximum,
        translation, length,
    )
    return _large(0x88, body)


def dword_address_space(
    kind: int, minimum: int, maximum: int, *, type_flags: int = 0,
    general_flags: int = ADDR_MIN_FIXED | ADDR_MAX_FIXED, translation: int = 0,
    granularity: int = 0,
) -> bytes:
    """DWord Address Space Descriptor (DWordMemory, DWordIO)."""
    length = maximum - minimum + 1
    body = struct.pack(
        "<BBBIIIII", kind, general_flags, type_flags, granularity, minimum, maximum,
        translation, length,
    )
    return _large(0x87, body)


def word_bus_number(minimum: int, maximum: int) -> bytes:
    return word_address_space(RESOURCE_BUS, minimum, maximum)


def word_io(minimum: int, maximum: int) -> bytes:
    return word_address_space(RESOURCE_IO, minimum, maximum, type_flags=IO_ENTIRE_RANGE)


def dword_memory(minimum: int, maximum: int, *, cacheable: bool = False) -> bytes:
    flags = MEM_READ_WRITE | (MEM_CACHEABLE if cacheable else 0)
    return dword_address_space(RESOURCE_MEMORY, minimum, maximum, type_flags=flags)


def io(minimum: int, maximum: int, alignment: int, length: int, *, decode16: bool = True) -> bytes:
    """I/O Port Descriptor (small item 0x08, 7 bytes of body)."""
    return struct.pack("<BBHHBB", 0x47, int(decode16), minimum, maximum, alignment, length)


def irq(*irqs: int) -> bytes:
    """IRQ Descriptor for ISA IRQs 0..15, edge triggered active high."""
    mask = 0
    for n in irqs:
        if not 0 <= n < 16:
            raise ValueError(f"ISA IRQ {n} out of range")
        mask |= 1 << n
    return struct.pack("<BH", 0x22, mask)


def extended_interrupt(
    *gsis: int, consumer: bool = True, level: bool = True, active_low: bool = False,
    shared: bool = False,
) -> bytes:
    """Extended Interrupt Descriptor (large item 0x09)."""
    if not 1 <= len(gsis) <= 255:
        raise ValueError("an extended interrupt descriptor lists 1 to 255 interrupts")
    flags = (
        int(consumer) | (int(not level) << 1) | (int(active_low) << 2) | (int(shared) << 3)
    )
    body = struct.pack("<BB", flags, len(gsis)) + b"".join(struct.pack("<I", g) for g in gsis)
    return _large(0x89, body)


def end_tag() -> bytes:
    return bytes([0x79, 0])  # checksum 0: "treat as correct"


def resource_template(*descriptors: bytes) -> bytes:
    """A Buffer holding the descriptors and the end tag."""
    return buffer(b"".join(descriptors) + end_tag())
