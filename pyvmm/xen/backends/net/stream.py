"""Ethernet frames over a UNIX stream socket, the way passt (and QEMU's
`-netdev stream`) carry them: each frame behind its length, 4 bytes,
big-endian. No virtio_net_hdr crosses this socket, so there is no checksum
offload and no GSO on it.

`FrameStream` is a vif's transport (vif.py) like a TapDevice: the
NetBackend calls `writev([virtio_net_hdr, *fragments])` and
`readv([virtio_net_hdr, page, page, ...])`, and this module turns those
into frames on the socket:

- Transmit. A frame whose virtio_net_hdr asks for a checksum
  (VIRTIO_NET_HDR_F_NEEDS_CSUM, from the guest's NETTXF_csum_blank) is
  copied out of the guest's pages first and its TCP/UDP checksum completed
  in the copy; others go out as they are. GSO is refused (the vif does not
  offer it on a stream: vif.py). A frame the socket takes only in part has
  its rest kept in a bounded backlog that the vif's event loop flushes
  (`flush()`) before anything else is sent; when the backlog is full, or
  the socket takes nothing, the frame is refused with EAGAIN (dropped, as
  a full TAP queue drops it).
- Receive. Whatever the socket has is read into one bounded buffer
  (FrameDecoder), and complete frames are copied from there into the
  guest's pages, one per readv(). The lengths are the peer's word, checked:
  a frame above `max_frame` or below an Ethernet header breaks the stream
  (it cannot be resynchronised); the socket is then treated as closed.
  Frames arrive with full checksums (passt computes them): the header
  given back asks for nothing and vouches for nothing.

Threads: a FrameStream is used by its vif's event thread only.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct

from .netif import ETH_HLEN
from .tap import VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, VNET_HDR, VNET_HDR_SIZE

log = logging.getLogger(__name__)

LENGTH = struct.Struct(">I")
MAX_FRAME = 65535 + ETH_HLEN  # the largest frame either way: an IP packet of 64 KiB and its Ethernet header
BACKLOG_LIMIT = 4 * (LENGTH.size + MAX_FRAME)  # transmit bytes kept while the socket is full
SOCKET_BUFFER = 1 << 20  # asked for each way; the kernel caps it (net.core.wmem_max/rmem_max)
_NO_OFFLOAD = bytes(VNET_HDR_SIZE)


class StreamBroken(Exception):
    """The peer sent a length no frame can have: the stream cannot go on."""


def encode_length(length: int) -> bytes:
    """The 4-byte prefix of a frame of `length` bytes."""
    return LENGTH.pack(length)


class FrameDecoder:
    """Length-prefixed frames out of a byte stream that arrives in pieces of
    any size. One buffer of `capacity` bytes (at least one whole frame with
    its prefix): `space()` is where the next bytes go, `filled(n)` says how
    many came, `next_frame()` gives a complete frame (a view, valid until
    the next call) or None."""

    def __init__(self, max_frame: int = MAX_FRAME, capacity: int | None = None, min_frame: int = ETH_HLEN):
        self.max_frame = max_frame
        self.min_frame = min_frame
        size = capacity if capacity is not None else 2 * (LENGTH.size + max_frame)
        if size < LENGTH.size + max_frame:
            raise ValueError("the buffer must hold the largest frame")
        self._buffer = bytearray(size)
        self._view = memoryview(self._buffer)
        self._start = 0  # the first byte not yet given out
        self._end = 0  # the end of what arrived
        self.short_frames = 0  # frames below min_frame, skipped

    @property
    def buffered(self) -> int:
        return self._end - self._start

    def space(self) -> memoryview:
        """The free end of the buffer (moving what is left to its start when
        less than a largest frame fits behind it)."""
        if len(self._buffer) - self._end < LENGTH.size + self.max_frame and self._start:
            left = self._end - self._start
            self._buffer[:left] = self._view[self._start:self._end]
            self._start, self._end = 0, left
        return self._view[self._end:]

    def filled(self, count: int) -> None:
        if count < 0 or self._end + count > len(self._buffer):
            raise ValueError("more bytes than there was room for")
        self._end += count

    def feed(self, data: bytes) -> None:
        """space() and filled() in one, for bytes already at hand (tests)."""
        data = memoryview(data)
        while data:
            room = self.space()
            if not room:
                raise BufferError("the buffer is full: take frames out first")
            count = min(len(room), len(data))
            room[:count] = data[:count]
            self.filled(count)
            data = data[count:]

    def has_frame(self) -> bool:
        """A whole frame is buffered (raises StreamBroken on a bad length)."""
        while True:
            if self.buffered < LENGTH.size:
                return False
            (length,) = LENGTH.unpack_from(self._buffer, self._start)
            if length > self.max_frame:
                raise StreamBroken(f"a frame of {length} bytes, above the limit of {self.max_frame}")
            if self.buffered < LENGTH.size + length:
                return False
            if length >= self.min_frame:
                return True
            self.short_frames += 1  # a runt: skipped, the stream goes on
            self._start += LENGTH.size + length

    def next_frame(self) -> memoryview | None:
        if not self.has_frame():
            return None
        (length,) = LENGTH.unpack_from(self._buffer, self._start)
        begin = self._start + LENGTH.size
        self._start = begin + length
        if self._start == self._end:
            self._start = self._end = 0
        return self._view[begin:begin + length]


class StreamSender:
    """Frames onto a non-blocking stream descriptor, never cut: the rest of a
    frame the socket took only in part waits in a backlog of at most
    `limit` bytes, and goes out (flush()) before any other frame."""

    def __init__(self, fd: int, limit: int = BACKLOG_LIMIT, write=os.writev):
        self.fd = fd
        self.limit = limit
        self._write = write
        self._backlog = bytearray()

    @property
    def backlogged(self) -> int:
        return len(self._backlog)

    def flush(self) -> bool:
        """Send what waits; True when nothing waits any more."""
        while self._backlog:
            try:
                count = self._write(self.fd, [self._backlog])
            except BlockingIOError:
                return False
            del self._backlog[:count]
        return True

    def send(self, parts: list) -> int:
        """One frame (its length prefix and bytes in `parts`). Raises
        BlockingIOError (EAGAIN) when it cannot be taken now, OSError when
        the socket is broken."""
        total = sum(len(part) for part in parts)
        if not self.flush():
            if len(self._backlog) + total > self.limit:
                raise BlockingIOError(errno.EAGAIN, "the stream's backlog is full")
            for part in parts:
                self._backlog += part
            return total
        count = self._write(self.fd, parts)  # BlockingIOError: nothing of it went
        if count < total:
            skip = count
            for part in parts:
                if skip >= len(part):
                    skip -= len(part)
                    continue
                self._backlog += memoryview(part)[skip:]
                skip = 0
        return total


def complete_checksum(frame: bytearray, start: int, offset: int) -> None:
    """Fill in a TCP or UDP checksum left to the device (CHECKSUM_PARTIAL):
    the 16-bit one's complement sum of frame[start:], whose checksum field
    at start + offset holds the pseudo-header's sum, complemented and
    stored there. Raises ValueError when the field is not in the frame."""
    field = start + offset
    if start < ETH_HLEN or offset < 0 or field + 2 > len(frame):
        raise ValueError(f"checksum at {start}+{offset} outside a frame of {len(frame)} bytes")
    data = frame[start:]
    if len(data) & 1:
        data.append(0)
    # 2**16 = 1 (mod 0xFFFF): the words' sum modulo 0xFFFF is the number's.
    remainder = int.from_bytes(data, "big") % 0xFFFF
    checksum = (0xFFFF - remainder) % 0xFFFF
    if checksum == 0 and offset == 6:
        checksum = 0xFFFF  # UDP: zero would mean "no checksum"
    frame[field:field + 2] = checksum.to_bytes(2, "big")


class FrameStream:
    """A vif's connection to passt: a connected UNIX stream socket (owned:
    close() closes it). The NetBackend's readv/writev on a TAP, over the
    length-prefixed frames of the socket (the module's docstring)."""

    offers_gso = False  # no virtio_net_hdr on the socket: the guest is not offered TSO
    set_offload = None  # nothing to tell the peer
    rx_frame_max = MAX_FRAME

    def __init__(self, sock: socket.socket, name: str = "passt"):
        self.name = name
        self.sock = sock
        sock.setblocking(False)
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            except OSError:
                pass
        self.fd = sock.fileno()
        self.decoder = FrameDecoder(MAX_FRAME)
        self.sender = StreamSender(self.fd)
        self.eof = False  # the peer is gone (or broke the framing)
        self.refused = 0  # frames not sent: GSO, a bad checksum request, too large

    # --- transmit ------------------------------------------------------------------

    def writev(self, parts: list) -> int:
        """[virtio_net_hdr, *fragments] -> one frame on the socket."""
        if self.eof:
            raise BrokenPipeError(errno.EPIPE, "passt is gone")
        flags, gso_type, _, _, start, offset = VNET_HDR.unpack(bytes(parts[0][:VNET_HDR_SIZE]))
        fragments = parts[1:]
        length = sum(len(fragment) for fragment in fragments)
        if gso_type != VIRTIO_NET_HDR_GSO_NONE:
            self.refused += 1
            raise OSError(errno.EINVAL, "GSO on a stream (not offered to the guest)")
        if length > MAX_FRAME:
            self.refused += 1
            raise OSError(errno.EMSGSIZE, f"a frame of {length} bytes")
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            frame = bytearray(length)
            position = 0
            for fragment in fragments:
                frame[position:position + len(fragment)] = fragment
                position += len(fragment)
            try:
                complete_checksum(frame, start, offset)
            except ValueError as error:
                self.refused += 1
                raise OSError(errno.EINVAL, str(error)) from None
            fragments = [frame]
        try:
            return self.sender.send([encode_length(length), *fragments])
        except BlockingIOError:
            raise
        except OSError as error:
            self._gone(f"sending failed: {error.strerror}")
            raise

    @property
    def backlogged(self) -> bool:
        return self.sender.backlogged > 0

    def flush(self) -> bool:
        """Push the backlog; True when it is empty (or the socket is gone)."""
        if self.eof:
            return True
        try:
            return self.sender.flush()
        except OSError as error:
            self._gone(f"sending failed: {error.strerror}")
            return True

    # --- receive ---------------------------------------------------------------------

    def has_pending(self) -> bool:
        """A whole frame is buffered here (the socket may not be readable)."""
        try:
            return not self.eof and self.decoder.has_frame()
        except StreamBroken:
            return True  # readv() reports it

    def _next_frame(self) -> memoryview | None:
        decoder = self.decoder
        while True:
            try:
                frame = decoder.next_frame()
            except StreamBroken as error:
                self._gone(f"broken framing: {error}")
                return None
            if frame is not None or self.eof:
                return frame
            room = decoder.space()
            if not room:  # cannot be: a buffer that full holds a whole frame
                return None
            try:
                count = self.sock.recv_into(room)
            except BlockingIOError:
                return None
            except OSError as error:
                self._gone(f"receiving failed: {error.strerror}")
                return None
            if count == 0:
                self._gone("it closed the connection")
                return None
            decoder.filled(count)

    def readv(self, buffers: list) -> int:
        """One frame into [virtio_net_hdr, page, ...] (a TAP's readv):
        returns the header's size plus the frame's; a frame larger than the
        pages is dropped (only the header's size is returned). Raises
        BlockingIOError when no whole frame is there."""
        frame = self._next_frame()
        if frame is None:
            raise BlockingIOError(errno.EAGAIN, "no whole frame yet")
        header = buffers[0]
        header[:VNET_HDR_SIZE] = _NO_OFFLOAD
        pages = buffers[1:]
        if len(frame) > sum(len(page) for page in pages):
            return VNET_HDR_SIZE
        position = 0
        for page in pages:
            if position >= len(frame):
                break
            count = min(len(page), len(frame) - position)
            page[:count] = frame[position:position + count]
            position += count
        return VNET_HDR_SIZE + len(frame)

    def _gone(self, why: str) -> None:
        if not self.eof:
            self.eof = True
            log.warning("%s: %s; the guest's network is down", self.name, why)

    def close(self) -> None:
        self.eof = True
        self.sock.close()
