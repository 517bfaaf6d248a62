"""The CD-ROM drive as SeaBIOS, GRUB and Linux's sr/libata drive it: probe, packets, PIO, DMA, sense."""

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.core.bus import Bus
from pyvmm.core.memory import GuestMemory
from pyvmm.devices.ide import ata, atapi
from pyvmm.devices.ide.atapi import AtapiChannel, IsoImage
from pyvmm.devices.ide.piix import BM_COMMAND, BM_ERROR, BM_INTERRUPT, BM_PRD, BM_START, BM_STATUS, \
    BM_TO_MEMORY, PRD_END, BusMaster

BASE, CONTROL, BM = 0x170, 0x376, 0xC008
BLOCKS = 40


def block(n: int) -> bytes:
    return bytes([n]) * 2048


@pytest.fixture
def iso(tmp_path):
    path = tmp_path / "cd.iso"
    path.write_bytes(b"".join(block(i) for i in range(BLOCKS)))
    image = IsoImage(path)
    yield image
    image.close()


class Rig:
    def __init__(self, image):
        self.levels = []
        self.memory = GuestMemory([(0, 1 << 20)])
        self.master = BusMaster(self.memory)
        self.channel = AtapiChannel(image, self.levels.append, dma=self.master)
        self.master.attach(self.channel)
        self.bus = Bus("pio", 1 << 16)
        self.bus.register(BASE, 8, self.channel)
        self.bus.register(CONTROL, 1, self.channel.control_port())
        self.bus.register(BM, 8, self.master)

    def reg(self, offset):
        return self.bus.read(BASE + offset, 1)

    def status(self):
        return self.reg(7)

    def reason(self):
        return self.reg(ata.SECTOR_COUNT) & (atapi.IO | atapi.COD)

    def byte_count(self):
        return self.reg(ata.LBA_MID) | self.reg(ata.LBA_HIGH) << 8

    def packet(self, cdb, limit=0xFFFE, dma=False):
        """PACKET, then the CDB into the data port; True if the drive took it."""
        self.bus.write(BASE + 1, 1, 1 if dma else 0)
        self.bus.write(BASE + 4, 1, limit & 0xFF)
        self.bus.write(BASE + 5, 1, limit >> 8)
        self.bus.write(BASE + 6, 1, 0)
        self.bus.write(BASE + 7, 1, atapi.CMD_PACKET)
        assert self.status() & ata.DRQ and self.reason() == atapi.COD
        cdb = bytes(cdb).ljust(12, b"\0")
        for at in range(0, 12, 2):
            self.bus.write(BASE, 2, int.from_bytes(cdb[at : at + 2], "little"))

    def read_all(self):
        """Every DRQ block of the data-in phase: (their byte counts, the data)."""
        counts, data = [], b""
        while self.status() & ata.DRQ:
            assert self.reason() == atapi.IO
            count = self.byte_count()
            counts.append(count)
            data += self.bus.read_string(BASE, 2, (count + 1) // 2)[:count]
        return counts, data

    def done(self, ok=True):
        status = self.status()
        assert self.reason() == atapi.IO | atapi.COD
        assert not status & ata.DRQ
        return bool(status & ata.ERR) != ok

    def sense(self):
        self.packet([atapi.REQUEST_SENSE, 0, 0, 0, 18])
        _, data = self.read_all()
        assert self.done()
        return data[2] & 0x0F, data[12], data[13]


def read10(lba, count):
    return [atapi.READ_10, 0, *lba.to_bytes(4, "big"), 0, *count.to_bytes(2, "big"), 0]


def test_signature_after_reset_and_identify_device_aborts(iso):
    rig = Rig(iso)
    assert (rig.reg(2), rig.reg(3), rig.reg(4), rig.reg(5)) == (1, 1, 0x14, 0xEB)
    rig.bus.write(BASE + 4, 1, 0)
    rig.bus.write(BASE + 5, 1, 0)
    rig.bus.write(CONTROL, 1, ata.SRST)
    rig.bus.write(CONTROL, 1, 0)
    assert (rig.reg(4), rig.reg(5)) == (0x14, 0xEB)
    rig.bus.write(BASE + 7, 1, ata.CMD_IDENTIFY)
    assert rig.status() & ata.ERR and rig.reg(1) & ata.ABRT
    assert (rig.reg(4), rig.reg(5)) == (0x14, 0xEB)


def test_device_reset_restores_the_signature_without_an_interrupt(iso):
    rig = Rig(iso)
    rig.bus.write(BASE + 4, 1, 0x55)
    rig.bus.write(BASE + 7, 1, atapi.CMD_DEVICE_RESET)
    assert (rig.reg(4), rig.reg(5)) == (0x14, 0xEB)
    assert True not in rig.levels


def test_identify_packet_device(iso):
    rig = Rig(iso)
    rig.bus.write(BASE + 7, 1, atapi.CMD_IDENTIFY_PACKET)
    assert rig.status() & ata.DRQ
    data = b"".join(rig.bus.read(BASE, 2).to_bytes(2, "little") for _ in range(256))
    words = struct.unpack("<256H", data)
    assert words[0] >> 14 == 2 and (words[0] >> 8) & 0x1F == 5 and words[0] & 3 == 0  # ATAPI CD, 12-byte CDB
    assert words[0] & 0x60 != 0x20  # no interrupt before the CDB
    assert words[49] & (1 << 8)
    assert data[54:62] == b"YPMV MVD"
    assert sum(data) & 0xFF == 0
    assert rig.status() == ata.DRDY | ata.DSC


def test_other_drive_is_absent(iso):
    rig = Rig(iso)
    rig.bus.write(BASE + 6, 1, ata.DEVICE_DRV)
    assert rig.status() == 0


def test_inquiry_and_allocation_length(iso):
    rig = Rig(iso)
    rig.packet([atapi.INQUIRY, 0, 0, 0, 36])
    assert rig.levels[-1] is True or rig.status()
    _, data = rig.read_all()
    assert rig.done()
    assert data[0] == 0x05 and data[1] & 0x80 and data[8:13] == b"PYVMM"
    rig.packet([atapi.INQUIRY, 0, 0, 0, 5])
    counts, data = rig.read_all()
    assert counts == [5] and len(data) == 5 and rig.done()


def test_test_unit_ready_and_no_data_commands(iso):
    rig = Rig(iso)
    for cdb in ([atapi.TEST_UNIT_READY], [atapi.PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 1],
                [atapi.START_STOP_UNIT, 0, 0, 0, 1]):
        rig.packet(cdb)
        assert rig.done() and rig.levels[-1] is False  # the status read acknowledged it


def test_read_capacity(iso):
    rig = Rig(iso)
    rig.packet([atapi.READ_CAPACITY_10])
    _, data = rig.read_all()
    assert rig.done() and struct.unpack(">II", data) == (BLOCKS - 1, 2048)


def test_partial_last_block_reads_zero_padded(tmp_path):
    path = tmp_path / "odd.iso"
    path.write_bytes(block(1) * 2 + b"\x07" * 100)
    image = IsoImage(path)
    rig = Rig(image)
    rig.packet([atapi.READ_CAPACITY_10])
    assert struct.unpack(">II", rig.read_all()[1]) == (2, 2048)
    rig.packet(read10(2, 1))
    assert rig.read_all()[1] == b"\x07" * 100 + bytes(1948) and rig.done()
    image.close()


@pytest.mark.parametrize("limit, expected", [(2048, [2048] * 3), (0xFFFE, [6144]), (5000, [5000, 1144]),
                                             (5001, [5000, 1144]), (0, [6144])])
def test_read10_pio_splits_by_the_byte_count_limit(iso, limit, expected):
    rig = Rig(iso)
    rig.packet(read10(4, 3), limit=limit)
    counts, data = rig.read_all()
    assert counts == expected
    assert data == block(4) + block(5) + block(6)
    assert rig.done()


def test_read10_word_by_word_raises_an_interrupt_per_block_and_at_the_end(iso):
    rig = Rig(iso)
    rig.packet(read10(1, 2), limit=2048)
    raised = rig.levels.count(True)
    for n in (1, 2):
        assert rig.reason() == atapi.IO and rig.byte_count() == 2048
        data = b"".join(rig.bus.read(BASE, 2).to_bytes(2, "little") for _ in range(1024))
        assert data == block(n)
    assert rig.levels.count(True) == raised + 2  # the second block, then the status phase
    assert rig.done()


def test_read12(iso):
    rig = Rig(iso)
    rig.packet([atapi.READ_12, 0, 0, 0, 0, BLOCKS - 1, 0, 0, 0, 1])
    assert rig.read_all()[1] == block(BLOCKS - 1) and rig.done()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # read-only image
@given(lba=st.integers(0, (1 << 32) - 1), count=st.integers(0, 0xFFFF))
def test_reads_past_the_end_are_lba_out_of_range(iso, lba, count):
    rig = Rig(iso)
    rig.packet(read10(lba, count))
    if lba + count <= BLOCKS:
        rig.read_all()
        assert rig.done()
        return
    assert rig.done(ok=False) and rig.reg(ata.ERROR_FEATURES) >> 4 == atapi.ILLEGAL_REQUEST
    assert rig.sense() == (atapi.ILLEGAL_REQUEST, 0x21, 0x00)
    assert rig.sense() == (0, 0, 0)  # REQUEST SENSE cleared it


def test_read12_with_a_huge_count_fails_cleanly(iso):
    rig = Rig(iso)
    rig.packet([atapi.READ_12, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF])
    assert rig.done(ok=False)
    assert rig.sense() == (atapi.ILLEGAL_REQUEST, 0x21, 0x00)


@pytest.mark.parametrize("opcode", [0x51, 0xBD, 0x2A, 0x55, 0xFF, 0xAD])
def test_unknown_commands_are_invalid_opcode(iso, opcode):
    rig = Rig(iso)
    rig.packet([opcode, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF])
    assert rig.done(ok=False)
    assert rig.sense() == (atapi.ILLEGAL_REQUEST, 0x20, 0x00)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cdb=st.binary(min_size=12, max_size=12), limit=st.integers(0, 0xFFFF), dma=st.booleans())
def test_any_cdb_ends_in_a_status_phase(iso, cdb, limit, dma):
    rig = Rig(iso)
    rig.memory.write(0x8000, struct.pack("<II", 0x10000, PRD_END | 0xF000))  # 60 KiB
    rig.bus.write(BM + BM_PRD, 4, 0x8000)
    rig.bus.write(BM + BM_COMMAND, 1, BM_START | BM_TO_MEMORY)
    rig.packet(cdb, limit=limit, dma=dma)
    if not dma:
        for _ in range(200):  # a bounded number of blocks: stop reading a long READ early
            if not rig.status() & ata.DRQ:
                break
            rig.bus.read_string(BASE, 2, (rig.byte_count() + 1) // 2)
        else:
            return
    assert not rig.status() & ata.DRQ
    assert rig.reason() == atapi.IO | atapi.COD


def test_mode_sense_capabilities_page(iso):
    rig = Rig(iso)
    rig.packet([atapi.MODE_SENSE_10, 0, 0x2A, 0, 0, 0, 0, 0, 128])
    _, data = rig.read_all()
    assert rig.done()
    assert struct.unpack(">H", data[:2])[0] == len(data) - 2
    assert data[8] == 0x2A and data[9] == len(data) - 10
    rig.packet([atapi.MODE_SENSE_10, 0, 0xC0 | 0x2A, 0, 0, 0, 0, 0, 128])
    assert rig.done(ok=False) and rig.sense() == (atapi.ILLEGAL_REQUEST, 0x39, 0)
    rig.packet([atapi.MODE_SENSE_10, 0, 0x05, 0, 0, 0, 0, 0, 128])
    assert rig.done(ok=False) and rig.sense() == (atapi.ILLEGAL_REQUEST, 0x24, 0)


def test_read_toc_format_0_and_session_info(iso):
    rig = Rig(iso)
    rig.packet([atapi.READ_TOC, 0, 0, 0, 0, 0, 0, 0, 100])
    _, data = rig.read_all()
    assert rig.done() and data[:4] == bytes([0, 18, 1, 1])
    assert data[6] == 1 and data[8:12] == bytes(4)
    assert data[14] == 0xAA and struct.unpack(">I", data[16:20])[0] == BLOCKS
    rig.packet([atapi.READ_TOC, 0x02, 0, 0, 0, 0, 0, 0, 100])  # MSF
    _, data = rig.read_all()
    assert data[8:12] == bytes([0, 0, 2, 0]) and rig.done()
    rig.packet([atapi.READ_TOC, 0, 0, 0, 0, 0, 0, 0, 12, 0x40])  # session info, the old way Linux asks
    _, data = rig.read_all()
    assert rig.done() and data[:4] == bytes([0, 10, 1, 1]) and data[6] == 1
    rig.packet([atapi.READ_TOC, 0, 0, 0, 0, 0, 5, 0, 100])
    assert rig.done(ok=False)


def test_get_configuration_and_event_status(iso):
    rig = Rig(iso)
    rig.packet([atapi.GET_CONFIGURATION, 0, 0, 0, 0, 0, 0, 0, 64])
    _, data = rig.read_all()
    assert rig.done() and struct.unpack(">I", data[:4])[0] == len(data) - 4
    assert struct.unpack(">H", data[6:8])[0] == atapi.PROFILE_CD_ROM
    rig.packet([atapi.GET_EVENT_STATUS_NOTIFICATION, 1, 0, 0, 0x10, 0, 0, 0, 8])
    _, data = rig.read_all()
    assert rig.done() and data[2] == 4 and data[5] & 0x02
    rig.packet([atapi.GET_EVENT_STATUS_NOTIFICATION, 0, 0, 0, 0x10, 0, 0, 0, 8])
    assert rig.done(ok=False)


def test_dma_read(iso):
    rig = Rig(iso)
    rig.memory.write(0x8000, struct.pack("<IIII", 0x10000, 2048, 0x20000, PRD_END | 2048))
    rig.bus.write(BM + BM_PRD, 4, 0x8000)
    rig.packet(read10(7, 2), dma=True)
    assert rig.memory.read(0x10000, 4) == bytes(4)  # nothing before the engine starts
    rig.bus.write(BM + BM_COMMAND, 1, BM_START | BM_TO_MEMORY)
    assert rig.memory.read(0x10000, 2048) == block(7)
    assert rig.memory.read(0x20000, 2048) == block(8)
    assert rig.bus.read(BM + BM_STATUS, 1) & (BM_INTERRUPT | BM_ERROR | 1) == BM_INTERRUPT
    assert rig.done()


def test_dma_with_a_short_table_fails_with_sense(iso):
    rig = Rig(iso)
    rig.memory.write(0x8000, struct.pack("<II", 0x10000, PRD_END | 2048))
    rig.bus.write(BM + BM_PRD, 4, 0x8000)
    rig.bus.write(BM + BM_COMMAND, 1, BM_START | BM_TO_MEMORY)
    rig.packet(read10(0, 4), dma=True)
    assert rig.bus.read(BM + BM_STATUS, 1) & BM_ERROR
    assert rig.done(ok=False)
    assert rig.sense()[0] == atapi.ABORTED_COMMAND


def test_missing_image_means_no_drive():
    rig = Rig(None)
    assert rig.status() == 0
    rig.bus.write(BASE + 7, 1, atapi.CMD_IDENTIFY_PACKET)
    assert rig.status() == 0


def test_data_port_outside_a_transfer_reads_zero_and_ignores_writes(iso):
    rig = Rig(iso)
    rig.bus.write(BASE, 2, 0x1234)
    assert rig.bus.read(BASE, 2) == 0
    assert rig.status() == ata.DRDY | ata.DSC


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8), st.sampled_from([1, 2, 4]), st.integers(0, 2**32 - 1)), max_size=60))
def test_hostile_register_traffic_never_raises(tmp_path_factory, accesses):
    path = tmp_path_factory.mktemp("cd") / "cd.iso"
    path.write_bytes(bytes(2048 * 4))
    image = IsoImage(path)
    rig = Rig(image)
    for offset, size, value in accesses:
        if offset == 8:
            rig.channel.control_port().write(0, 1, value)
        else:
            rig.channel.write(offset, size, value)
            assert 0 <= rig.channel.read(offset, size) < 1 << (8 * size)
    image.close()


def test_dword_string_reads_of_an_odd_block(iso):
    rig = Rig(iso)
    rig.packet([atapi.INQUIRY, 0, 0, 0, 7])
    assert rig.byte_count() == 7
    data = rig.bus.read_string(BASE, 4, 2)
    rig.packet([atapi.INQUIRY, 0, 0, 0, 7])
    words = b"".join(rig.bus.read(BASE, 2).to_bytes(2, "little") for _ in range(4))
    assert data == words[:7] + b"\0" and data[:2] == b"\x05\x80"  # the odd byte padded alike
    assert rig.done()
