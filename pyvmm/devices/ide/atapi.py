"""A read-only ATAPI CD-ROM drive on one IDE channel, serving an ISO image.

The ATA side (ATA/ATAPI-6, packet feature set): the packet signature
(sector count 1, LBA 1, cylinder 0xEB14) after every reset, IDENTIFY
PACKET DEVICE, IDENTIFY DEVICE aborted with that signature (how a BIOS or
Linux tells a CD-ROM from a disk), PACKET, DEVICE RESET, SET FEATURES and
the power-management no-ops. Everything else is aborted.

The packet side (SPC-3/MMC-3, as SeaBIOS, GRUB and Linux's sr driver use
it): the command runs once its 12-byte CDB is in, and answers by PIO,
a DRQ block of at most the byte count limit the host put in the cylinder
registers at a time, or through the channel's bus master when the host
set the DMA bit of FEATURES. The sector count register carries the
interrupt reason (CoD/IO). A command that fails ends with CHECK CONDITION
(ERR, the sense key in the error register) and leaves its sense for
REQUEST SENSE; an unknown opcode is ILLEGAL REQUEST / INVALID COMMAND
OPERATION CODE. No command takes data from the host, so the drive never
writes. Sectors are 2048 bytes; a partial last sector of the image reads
as zero-padded.
"""

from __future__ import annotations

import os
import struct
from typing import Callable

from .. import SavedState
from .ata import ABRT, DRDY, DRQ, DSC, ERR, AtaChannel, DmaEngine, ImageFile, identify_block

BLOCK = 2048
PACKET_SIZE = 12
# Interrupt reason (sector count register) bits.
COD, IO = 0x01, 0x02
FEATURE_DMA = 0x01
MAX_BYTE_COUNT = 0xFFFE  # the largest even byte count limit
MAX_SAVED_REPLY = 64 * 1024  # a reply made of data (not of the image) is a few hundred bytes
SIGNATURE_MID, SIGNATURE_HIGH = 0x14, 0xEB

CMD_DEVICE_RESET = 0x08
CMD_PACKET = 0xA0
CMD_IDENTIFY_PACKET = 0xA1
CMD_IDENTIFY = 0xEC
CMD_SET_FEATURES = 0xEF
CMD_DIAGNOSTIC = 0x90
CMD_CHECK_POWER_MODE = 0xE5
_ATA_NO_DATA = {0x00, 0xE0, 0xE1, 0xE2, 0xE3, 0xE6, 0xE7}  # NOP, power management, FLUSH CACHE

# Packet command opcodes.
TEST_UNIT_READY = 0x00
REQUEST_SENSE = 0x03
INQUIRY = 0x12
MODE_SENSE_6 = 0x1A
START_STOP_UNIT = 0x1B
PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
READ_CAPACITY_10 = 0x25
READ_10 = 0x28
SEEK_10 = 0x2B
READ_TOC = 0x43
GET_CONFIGURATION = 0x46
GET_EVENT_STATUS_NOTIFICATION = 0x4A
MODE_SENSE_10 = 0x5A
READ_12 = 0xA8
SET_CD_SPEED = 0xBB

# Sense keys and (ASC, ASCQ).
NO_SENSE, ILLEGAL_REQUEST, ABORTED_COMMAND = 0x00, 0x05, 0x0B
INVALID_OPCODE = (0x20, 0x00)
LBA_OUT_OF_RANGE = (0x21, 0x00)
INVALID_FIELD_IN_CDB = (0x24, 0x00)
SAVING_NOT_SUPPORTED = (0x39, 0x00)
NO_ADDITIONAL_SENSE = (0x00, 0x00)

# Profiles (MMC-3 GET CONFIGURATION).
PROFILE_CD_ROM, PROFILE_DVD_ROM = 0x0008, 0x0010
CD_MAX_BLOCKS = 80 * 60 * 75  # an 80-minute CD; a larger image is a DVD
LEAD_OUT = 0xAA


class CheckCondition(Exception):
    """A packet command that fails: its sense key and (ASC, ASCQ)."""

    def __init__(self, key: int, code: tuple[int, int]):
        super().__init__(f"sense {key:#x}/{code[0]:#x}/{code[1]:#x}")
        self.key, self.code = key, code


def _illegal(code: tuple[int, int] = INVALID_FIELD_IN_CDB) -> CheckCondition:
    return CheckCondition(ILLEGAL_REQUEST, code)


class IsoImage(ImageFile):
    """An ISO image, read-only, in 2048-byte blocks (the last one zero-padded if partial)."""

    def __init__(self, path):
        super().__init__(path, readonly=True)
        size = os.fstat(self.fd).st_size
        self.blocks = -(-size // BLOCK)


def identify_packet_data(serial: str) -> bytes:
    """IDENTIFY PACKET DEVICE's 256 words for a CD-ROM drive."""
    words = [0] * 256
    # ATAPI, CD-ROM, removable, DRQ within 50 us of PACKET (no interrupt for the CDB), 12-byte CDBs.
    words[0] = 0x8000 | (0x05 << 8) | 0x80 | 0x40
    words[49] = (1 << 9) | (1 << 8)  # LBA, DMA
    words[53] = 0x0006  # words 64-70 and 88 are valid
    words[63] = 0x0007  # multiword DMA 0-2
    words[64] = 0x0003  # PIO 3 and 4
    words[65] = words[66] = words[67] = words[68] = 120
    words[80] = 0x007E  # ATA/ATAPI-1 .. 6
    words[82] = words[85] = (1 << 14) | (1 << 9) | (1 << 4)  # NOP, DEVICE RESET, PACKET
    words[83] = words[84] = words[87] = 1 << 14
    words[88] = 0x203F  # UDMA 0-5, mode 5 selected
    words[93] = 0x6001 | (1 << 13)  # an 80-wire cable
    return identify_block(words, serial, "PYVMM DVD-ROM")


class _Reply:
    """What a command sends the host: `length` bytes, of `data` or of the
    image from byte `start`, read a piece at a time. Plain data, so that a
    snapshot can hold a reply in flight."""

    def __init__(self, length: int, *, data: bytes | None = None, image: IsoImage | None = None, start: int = 0,
                 packet: bool = True):
        self.length, self.data, self.image, self.start, self.packet = length, data, image, start, packet
        self.position = 0

    @classmethod
    def of(cls, data: bytes, allocation: int | None = None) -> "_Reply":
        if allocation is not None:
            data = data[:allocation]
        return cls(len(data), data=data)

    def read(self, at: int, length: int) -> bytes:
        if self.data is not None:
            return self.data[at : at + length]
        return self.image.read(self.start + at, length)


def _msf(lba: int) -> bytes:
    lba += 150  # the 2-second pregap
    return bytes([0, lba // (60 * 75) % 256, lba // 75 % 60, lba % 75])


def _be16(cdb: bytes, at: int) -> int:
    return cdb[at] << 8 | cdb[at + 1]


def _be32(cdb: bytes, at: int) -> int:
    return int.from_bytes(cdb[at : at + 4], "big")


class AtapiChannel(AtaChannel):
    """One IDE channel with a CD-ROM drive as master (the slave absent).

    The register file, the interrupt line, the control block and the bus
    master are AtaChannel's; the commands and the data phases are the
    drive's. The Xen unplug protocol never takes a CD-ROM away, so
    `unplug()` is not meant for it (pyvmm/platform.py skips it).
    """

    def __init__(self, image: IsoImage | None, irq: Callable[[bool], None], *, dma: DmaEngine | None = None,
                 serial: str = "PYVMMCD0001", on_error: Callable[[str], None] | None = None):
        self.cdrom = image
        self._reply: _Reply | None = None
        self._packet: bytearray | None = None
        self._byte_limit = MAX_BYTE_COUNT
        self._dma_wanted = False
        self._sense = (NO_SENSE, NO_ADDITIONAL_SENSE)
        super().__init__(None, irq, dma=dma, serial=serial, on_error=on_error)

    # --- state -----------------------------------------------------------------

    def _present(self, drive: int) -> bool:
        return drive == 0 and self.cdrom is not None

    def _reset_registers(self) -> None:
        super()._reset_registers()
        self._signature()
        self._reply = None
        self._packet = None

    def _signature(self) -> None:
        self._count = 1
        self._lba = [1, SIGNATURE_MID, SIGNATURE_HIGH]

    def unplug(self) -> None:
        """The unplug protocol leaves CD-ROMs in place (Xen and QEMU alike)."""

    # --- snapshots: the drive's part of AtaChannel's state --------------------

    def _drive_state(self) -> dict:
        reply = self._reply
        return {
            "packet": bytes(self._packet).hex() if self._packet is not None else None,
            "byte_limit": self._byte_limit, "dma_wanted": self._dma_wanted, "sense": [self._sense[0], *self._sense[1]],
            "reply": None if reply is None else {
                "length": reply.length, "position": reply.position, "packet": reply.packet,
                "data": reply.data.hex() if reply.data is not None else None,
                "start": reply.start if reply.data is None else None},
        }

    def _restore_drive(self, saved: SavedState, state: dict) -> Callable[[], None]:
        packet = None if state.get("packet") is None else bytearray(saved.bytes("packet", maximum=PACKET_SIZE - 1))
        byte_limit = saved.int("byte_limit", 2, MAX_BYTE_COUNT)
        dma_wanted = saved.bool("dma_wanted")
        sense = saved.octets("sense", 3)  # key, ASC, ASCQ
        reply = self._saved_reply(saved, state.get("reply"))

        def take() -> None:
            self._packet, self._byte_limit, self._dma_wanted = packet, byte_limit, dma_wanted
            self._sense, self._reply = (sense[0], (sense[1], sense[2])), reply

        return take

    def _saved_reply(self, saved: SavedState, value) -> _Reply | None:
        if value is None:
            return None
        reply = SavedState(saved.kind, {"version": saved.version, **value} if isinstance(value, dict) else {},
                           saved.version)
        length = reply.int("length", 1, 1 << 40)
        position = reply.int("position", 0, length)
        packet = reply.bool("packet")
        if value.get("data") is not None:
            data = reply.bytes("data", maximum=MAX_SAVED_REPLY)
            if len(data) != length:
                reply.fail(f"a reply of {length} bytes holds {len(data)}")
            restored = _Reply(length, data=data, packet=packet)
        else:
            start = reply.int("start", 0, 1 << 48)
            if self.cdrom is None or start % BLOCK or start + length > self.cdrom.blocks * BLOCK:
                reply.fail(f"a reply of {length} bytes from byte {start} is not on this drive's image")
            restored = _Reply(length, image=self.cdrom, start=start, packet=packet)
        restored.position = position
        return restored

    def _saved_transfer(self, saved: SavedState, state: dict) -> tuple | None:
        value = state.get("transfer")
        if value is None:
            return None
        if value != ["dma"] or state.get("reply") is None:
            saved.fail(f"transfer {value!r} is not a CD-ROM drive's DMA reply")
        return ("dma",)

    # --- ATA commands ----------------------------------------------------------

    def _command(self, command: int) -> None:
        self._set_irq(False)
        self._error = 0
        self._transfer = None
        self._reply, self._packet = None, None
        if command == CMD_PACKET:
            self._start_packet()
        elif command == CMD_IDENTIFY_PACKET:
            self._send(_Reply.of(identify_packet_data(self._serial)), packet=False)
        elif command == CMD_DEVICE_RESET:
            # No interrupt, and DRDY stays clear until the next command (ATA-6).
            self._reset_registers()
            self._status = 0
        elif command == CMD_DIAGNOSTIC:
            self._reset_registers()
            self._raise_irq()
        elif command == CMD_CHECK_POWER_MODE:
            self._count = 0xFF
            self._complete()
        elif command == CMD_SET_FEATURES or command in _ATA_NO_DATA:
            self._complete()
        else:
            # IDENTIFY DEVICE and every disk command: aborted, with the packet
            # signature in the registers for whoever probes this way.
            self._signature()
            self._abort(ABRT)

    # --- the packet ------------------------------------------------------------

    def _start_packet(self) -> None:
        limit = self._lba[1] | self._lba[2] << 8
        # An odd limit is rounded down; 0 (not allowed) is taken as the largest.
        self._byte_limit = (limit & ~1) or MAX_BYTE_COUNT
        self._dma_wanted = bool(self._features & FEATURE_DMA)
        self._packet = bytearray()
        self._count = COD
        self._status = DRDY | DSC | DRQ  # the CDB goes in without an interrupt

    def _write_data(self, size: int, value: int) -> None:
        if self._packet is None or not self._status & DRQ:
            return
        self._packet += value.to_bytes(size, "little")
        if len(self._packet) >= PACKET_SIZE:
            cdb = bytes(self._packet[:PACKET_SIZE])
            self._packet = None
            self._run_packet(cdb)

    def _run_packet(self, cdb: bytes) -> None:
        try:
            reply = self._execute(cdb)
        except CheckCondition as failed:
            return self._check_condition(failed.key, failed.code)
        except OSError as error:
            self._on_error(f"CD-ROM: reading {getattr(self.cdrom, 'path', 'the image')} failed: {error}")
            return self._check_condition(ABORTED_COMMAND, NO_ADDITIONAL_SENSE)
        self._sense = (NO_SENSE, NO_ADDITIONAL_SENSE)
        if reply is None or reply.length == 0:
            return self._end_packet()
        if self._dma_wanted:
            if self.dma is None:
                return self._check_condition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
            self._reply = reply
            self._transfer = ("dma",)
            self._status = DRDY | DSC | DRQ
            self.dma.pending(self)
        else:
            self._send(reply)

    def _end_packet(self) -> None:
        self._count = IO | COD
        self._status = DRDY | DSC
        self._raise_irq()

    def _check_condition(self, key: int, code: tuple[int, int]) -> None:
        self._sense = (key, code)
        self._reply, self._transfer = None, None
        self._count = IO | COD
        self._error = key << 4 | (ABRT if key == ABORTED_COMMAND else 0)
        self._status = DRDY | DSC | ERR
        self._raise_irq()

    # --- PIO ---------------------------------------------------------------------

    def _send(self, reply: _Reply, packet: bool = True) -> None:
        reply.packet = packet
        self._reply = reply
        self._next_block()

    def _next_block(self) -> None:
        reply = self._reply
        left = reply.length - reply.position
        take = min(left, self._byte_limit) if reply.packet else left
        try:
            data = reply.read(reply.position, take)
        except OSError as error:
            self._on_error(f"CD-ROM: reading {getattr(self.cdrom, 'path', 'the image')} failed: {error}")
            return self._check_condition(ABORTED_COMMAND, NO_ADDITIONAL_SENSE)
        reply.position += take
        self._buffer, self._buffer_pos = data, 0
        self._status = DRDY | DSC | DRQ
        if reply.packet:
            self._count = IO
            self._lba[1], self._lba[2] = take & 0xFF, take >> 8
        self._raise_irq()

    def _block_done(self) -> None:
        reply = self._reply
        self._buffer, self._buffer_pos = b"", 0
        if reply.position < reply.length:
            return self._next_block()
        self._reply = None
        if reply.packet:
            self._end_packet()
        else:
            self._status = DRDY | DSC

    def _read_data(self, size: int) -> int:
        if self._reply is None or self._transfer is not None or not self._status & DRQ or not self._buffer:
            return 0
        chunk = self._buffer[self._buffer_pos : self._buffer_pos + size]
        self._buffer_pos += size
        if self._buffer_pos >= len(self._buffer):
            self._block_done()
        return int.from_bytes(chunk.ljust(size, b"\0"), "little")

    def read_string(self, offset: int, size: int, count: int) -> bytes | None:
        if offset != 0 or size not in (2, 4):
            return None
        with self._lock:
            wanted = size * count
            out = bytearray()
            while len(out) < wanted and self._reply is not None and self._transfer is None \
                    and self._status & DRQ and self._buffer:
                take = min(wanted - len(out), len(self._buffer) - self._buffer_pos)
                if take < size and self._buffer_pos + take < len(self._buffer):
                    break
                out += self._buffer[self._buffer_pos : self._buffer_pos + take]
                self._buffer_pos += take
                # An odd block's last word is padded: round out to the word.
                out += bytes(-len(out) % size) if self._buffer_pos >= len(self._buffer) else b""
                if self._buffer_pos >= len(self._buffer):
                    self._block_done()
            return bytes(out[:wanted].ljust(wanted, b"\0"))

    # --- DMA ---------------------------------------------------------------------

    def run_dma(self) -> None:
        with self._lock:
            if self._transfer is None or self._reply is None:
                return
            reply = self._reply
            self._transfer = None

            def source(length: int) -> bytes:
                length = min(length, reply.length - reply.position)
                data = reply.read(reply.position, length)
                reply.position += length
                return data

            try:
                ok = self.dma.transfer(True, source, None, reply.length)
            except OSError as error:
                self._on_error(f"CD-ROM: DMA from {getattr(self.cdrom, 'path', 'the image')} failed: {error}")
                ok = False
            self._reply = None
            if ok:
                self._end_packet()
            else:  # the PRD table did not cover the transfer, or was not RAM
                self._check_condition(ABORTED_COMMAND, NO_ADDITIONAL_SENSE)

    # --- packet commands ---------------------------------------------------------

    def _execute(self, cdb: bytes) -> _Reply | None:
        handler = _COMMANDS.get(cdb[0])
        if handler is None:
            raise _illegal(INVALID_OPCODE)
        return handler(self, cdb)

    @property
    def _blocks(self) -> int:
        return self.cdrom.blocks

    def _test_unit_ready(self, cdb: bytes) -> None:
        return None

    def _request_sense(self, cdb: bytes) -> _Reply:
        key, (asc, ascq) = self._sense
        data = bytearray(18)
        data[0], data[2], data[7], data[12], data[13] = 0x70, key, 10, asc, ascq
        self._sense = (NO_SENSE, NO_ADDITIONAL_SENSE)
        return _Reply.of(bytes(data), cdb[4])

    def _inquiry(self, cdb: bytes) -> _Reply:
        if cdb[1] & 0x01 or cdb[2]:
            raise _illegal()  # no vital product data pages
        data = bytearray(36)
        data[0], data[1], data[2], data[3], data[4] = 0x05, 0x80, 0x05, 0x02, 31  # CD/DVD, removable, SPC-3
        data[8:16] = b"PYVMM   "
        data[16:32] = b"PYVMM DVD-ROM".ljust(16)
        data[32:36] = b"1.0 "
        return _Reply.of(bytes(data), _be16(cdb, 3))

    def _read_capacity(self, cdb: bytes) -> _Reply:
        return _Reply.of(struct.pack(">II", max(self._blocks - 1, 0), BLOCK))

    def _read(self, cdb: bytes) -> _Reply | None:
        lba = _be32(cdb, 2)
        count = _be16(cdb, 7) if cdb[0] == READ_10 else _be32(cdb, 6)
        if lba + count > self._blocks:
            raise _illegal(LBA_OUT_OF_RANGE)
        if count == 0:
            return None
        return _Reply(count * BLOCK, image=self.cdrom, start=lba * BLOCK)

    def _seek(self, cdb: bytes) -> None:
        if _be32(cdb, 2) >= self._blocks:
            raise _illegal(LBA_OUT_OF_RANGE)

    def _no_data(self, cdb: bytes) -> None:
        return None  # the medium stays in: the drive has no tray to open

    def _mode_sense(self, cdb: bytes) -> _Reply:
        control, page = cdb[2] >> 6, cdb[2] & 0x3F
        if control == 3:
            raise CheckCondition(ILLEGAL_REQUEST, SAVING_NOT_SUPPORTED)
        pages = {0x01: self._error_recovery_page(), 0x2A: self._capabilities_page()}
        if page == 0x3F:
            body = b"".join(pages.values())
        elif page in pages:
            body = pages[page]
        else:
            raise _illegal()
        if control == 1:  # changeable values: none
            body = b"".join(bytes([p[0], p[1]]) + bytes(len(p) - 2) for p in
                            (pages.values() if page == 0x3F else [body]))
        if cdb[0] == MODE_SENSE_10:
            header = struct.pack(">HBBHH", len(body) + 6, 0x70, 0, 0, 0)  # medium: door closed, no disc type
            return _Reply.of(header + body, _be16(cdb, 7))
        header = bytes([len(body) + 3, 0x70, 0, 0])
        return _Reply.of(header + body, cdb[4])

    @staticmethod
    def _error_recovery_page() -> bytes:
        return bytes([0x01, 0x0A, 0x00, 0x05]) + bytes(8)

    @staticmethod
    def _capabilities_page() -> bytes:
        page = bytearray(22)
        page[0], page[1] = 0x2A, 20
        page[2] = 0x09  # reads CD-R and DVD-ROM media
        page[4] = 0x40  # multi-session
        page[6] = 0x29  # tray loading, eject, lock
        struct.pack_into(">HHHH", page, 8, 706, 0, 0, 706)  # speeds in kB/s (4x)
        return bytes(page)

    def _read_toc(self, cdb: bytes) -> _Reply:
        msf, track, allocation = bool(cdb[1] & 0x02), cdb[6], _be16(cdb, 7)
        form = cdb[2] & 0x0F or cdb[9] >> 6  # SFF-8020's format in the control byte, as older drivers send it

        def address(lba: int) -> bytes:
            return _msf(lba) if msf else struct.pack(">I", lba)

        if form == 0:
            if track > 1 and track != LEAD_OUT:
                raise _illegal()
            entries = b""
            if track <= 1:
                entries += bytes([0, 0x14, 1, 0]) + address(0)  # track 1: data, LBA 0
            entries += bytes([0, 0x14, LEAD_OUT, 0]) + address(self._blocks)
            return _Reply.of(struct.pack(">HBB", len(entries) + 2, 1, 1) + entries, allocation)
        if form == 1:  # multi-session information: one session, starting at track 1
            return _Reply.of(struct.pack(">HBB", 10, 1, 1) + bytes([0, 0x14, 1, 0]) + address(0), allocation)
        raise _illegal()

    def _get_configuration(self, cdb: bytes) -> _Reply:
        current = PROFILE_CD_ROM if self._blocks <= CD_MAX_BLOCKS else PROFILE_DVD_ROM
        body = b""
        if _be16(cdb, 2) == 0:  # the profile list feature, when the host starts from it
            profiles = b"".join(struct.pack(">HBB", profile, int(profile == current), 0)
                                for profile in (PROFILE_DVD_ROM, PROFILE_CD_ROM))
            body = struct.pack(">HBB", 0x0000, 0x03, len(profiles)) + profiles
        header = struct.pack(">IHH", 4 + len(body), 0, current)
        return _Reply.of(header + body, _be16(cdb, 7))

    def _event_status(self, cdb: bytes) -> _Reply:
        if not cdb[1] & 0x01:
            raise _illegal()  # only polled operation: there is no asynchronous notification
        media = 1 << 4
        if cdb[4] & media:
            data = struct.pack(">HBB", 6, 4, media) + bytes([0, 0x02, 0, 0])  # no change; medium present
        else:
            data = struct.pack(">HBB", 2, 0x80, media)  # no event of the classes asked for
        return _Reply.of(data, _be16(cdb, 7))


_COMMANDS: dict[int, Callable[[AtapiChannel, bytes], _Reply | None]] = {
    TEST_UNIT_READY: AtapiChannel._test_unit_ready,
    REQUEST_SENSE: AtapiChannel._request_sense,
    INQUIRY: AtapiChannel._inquiry,
    MODE_SENSE_6: AtapiChannel._mode_sense,
    MODE_SENSE_10: AtapiChannel._mode_sense,
    START_STOP_UNIT: AtapiChannel._no_data,
    PREVENT_ALLOW_MEDIUM_REMOVAL: AtapiChannel._no_data,
    SET_CD_SPEED: AtapiChannel._no_data,
    READ_CAPACITY_10: AtapiChannel._read_capacity,
    READ_10: AtapiChannel._read,
    READ_12: AtapiChannel._read,
    SEEK_10: AtapiChannel._seek,
    READ_TOC: AtapiChannel._read_toc,
    GET_CONFIGURATION: AtapiChannel._get_configuration,
    GET_EVENT_STATUS_NOTIFICATION: AtapiChannel._event_status,
}
# READ DISC INFORMATION (0x51), MECHANISM STATUS (0xBD) and everything else:
# ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE, as a plain CD-ROM drive answers.
