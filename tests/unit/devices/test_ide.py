"""The IDE disk as SeaBIOS, GRUB and Linux's ata_piix drive it: PIO, DMA, flush, unplug."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.core.bus import Bus
from pyvmm.core.memory import GuestMemory
from pyvmm.devices.ide import ata
from pyvmm.devices.ide.ata import AtaChannel, ImageFile
from pyvmm.devices.ide.piix import BM_COMMAND, BM_ERROR, BM_INTERRUPT, BM_PRD, BM_START, BM_STATUS, \
    BM_TO_MEMORY, PRD_END, BusMaster

BASE, CONTROL = 0x1F0, 0x3F6
SECTORS = 2048


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(b"".join(bytes([i & 0xFF]) * 512 for i in range(SECTORS)))
    disk = ImageFile(path)
    yield disk
    disk.close()


class Rig:
    def __init__(self, disk):
        self.levels = []
        self.memory = GuestMemory([(0, 1 << 20)])
        self.master = BusMaster(self.memory)
        self.channel = AtaChannel(disk, self.levels.append, dma=self.master)
        self.master.attach(self.channel)
        self.bus = Bus("pio", 1 << 16)
        self.bus.register(BASE, 8, self.channel)
        self.bus.register(CONTROL, 1, self.channel.control_port())
        self.bus.register(0xC000, 8, self.master)

    def status(self):
        return self.bus.read(BASE + 7, 1)

    def command(self, command, lba=0, count=1, lba48=False):
        if lba48:
            for register, shift in ((2, 8), (3, 24), (4, 32), (5, 40)):
                self.bus.write(BASE + register, 1, ((count if register == 2 else lba) >> shift) & 0xFF)
        self.bus.write(BASE + 2, 1, count & 0xFF)
        self.bus.write(BASE + 3, 1, lba & 0xFF)
        self.bus.write(BASE + 4, 1, (lba >> 8) & 0xFF)
        self.bus.write(BASE + 5, 1, (lba >> 16) & 0xFF)
        self.bus.write(BASE + 6, 1, 0x40 | (0 if lba48 else (lba >> 24) & 0x0F))
        self.bus.write(BASE + 7, 1, command)

    def read_words(self, count):
        return b"".join(self.bus.read(BASE, 2).to_bytes(2, "little") for _ in range(count))


def test_identify_reports_size_and_lba48(image):
    rig = Rig(image)
    rig.command(ata.CMD_IDENTIFY)
    assert rig.status() & ata.DRQ and rig.levels[-1] is False  # acknowledged by the status read
    data = rig.read_words(256)
    words = struct.unpack("<256H", data)
    assert words[60] | words[61] << 16 == SECTORS
    assert words[100] == SECTORS and words[83] & (1 << 10)
    assert data[54:62] == b"YPMV MAH"  # "PYVMM HA", each word byte-swapped
    assert sum(data) & 0xFF == 0
    assert rig.status() == ata.DRDY | ata.DSC


def test_pio_read_sectors_block_by_block(image):
    rig = Rig(image)
    rig.command(ata.CMD_READ_SECTORS, lba=5, count=3)
    for sector in (5, 6, 7):
        assert rig.status() & ata.DRQ
        assert rig.read_words(256) == bytes([sector]) * 512
    assert rig.status() == ata.DRDY | ata.DSC


def test_pio_read_multiple_with_dword_accesses(image):
    rig = Rig(image)
    rig.command(ata.CMD_SET_MULTIPLE, count=4)
    rig.command(ata.CMD_READ_MULTIPLE_EXT, lba=1000, count=6, lba48=True)
    data = b"".join(rig.bus.read(BASE, 4).to_bytes(4, "little") for _ in range(6 * 128))
    assert data == b"".join(bytes([s & 0xFF]) * 512 for s in range(1000, 1006))
    assert not rig.status() & ata.DRQ


def test_pio_write_lands_on_the_image_and_flush_syncs(image, monkeypatch):
    rig = Rig(image)
    rig.command(ata.CMD_WRITE_SECTORS, lba=9, count=2)
    assert rig.status() & ata.DRQ
    for word in range(512):
        rig.bus.write(BASE, 2, 0xBEEF)
    assert rig.status() == ata.DRDY | ata.DSC
    assert image.read(9 * 512, 1024) == b"\xef\xbe" * 512
    synced = []
    monkeypatch.setattr(image, "flush", lambda: synced.append(True))
    rig.command(ata.CMD_FLUSH_CACHE_EXT)
    assert synced == [True] and rig.status() == ata.DRDY | ata.DSC


def test_a_failed_flush_is_reported_to_the_guest(image, monkeypatch):
    rig = Rig(image)

    def fail():
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(image, "flush", fail)
    rig.channel._on_error = lambda message: None
    rig.command(ata.CMD_FLUSH_CACHE)
    assert rig.status() & ata.ERR


@pytest.mark.parametrize("lba, count", [(SECTORS - 1, 2), (SECTORS, 1), (1 << 27, 0)])
def test_sectors_past_the_end_are_id_not_found(image, lba, count):
    rig = Rig(image)
    rig.command(ata.CMD_READ_SECTORS, lba=lba, count=count)
    assert rig.status() & ata.ERR and rig.bus.read(BASE + 1, 1) == ata.IDNF
    assert rig.read_words(1) == b"\0\0"


def test_unknown_and_packet_commands_abort(image):
    rig = Rig(image)
    for command in (0xA0, ata.CMD_IDENTIFY_PACKET, 0x00):
        rig.command(command)
        assert rig.status() & ata.ERR and rig.bus.read(BASE + 1, 1) == ata.ABRT


def test_software_reset_leaves_the_ata_signature(image):
    rig = Rig(image)
    rig.bus.write(CONTROL, 1, ata.SRST | ata.NIEN)
    rig.bus.write(CONTROL, 1, ata.NIEN)
    assert [rig.bus.read(BASE + r, 1) for r in (2, 3, 4, 5)] == [1, 1, 0, 0]
    assert rig.bus.read(CONTROL, 1) == ata.DRDY | ata.DSC


def test_nien_masks_the_line(image):
    rig = Rig(image)
    rig.bus.write(CONTROL, 1, ata.NIEN)
    rig.command(ata.CMD_READ_VERIFY, lba=0, count=1)
    assert True not in rig.levels
    rig.bus.write(CONTROL, 1, 0)
    assert rig.levels[-1] is True


def test_no_drive_and_a_missing_slave_read_zero(image):
    empty = AtaChannel(None, lambda level: None)
    assert empty.read(7, 1) == ata.FLOATING
    rig = Rig(image)
    rig.bus.write(BASE + 6, 1, 0xB0)  # select the slave
    assert rig.status() == 0
    rig.bus.write(BASE + 7, 1, ata.CMD_IDENTIFY)
    assert rig.bus.read(BASE + 6, 1) & ata.DEVICE_DRV and rig.status() == 0


def test_unplugged_disk_stops_answering(image):
    rig = Rig(image)
    rig.command(ata.CMD_READ_SECTORS, lba=0, count=1)
    rig.channel.unplug()
    assert rig.status() == ata.FLOATING and rig.bus.read(CONTROL, 1) == ata.FLOATING
    rig.command(ata.CMD_IDENTIFY)
    assert rig.status() == ata.FLOATING and rig.read_words(1) == b"\0\0"


def prd(rig, entries, at=0x8000):
    rig.memory.write(at, b"".join(struct.pack("<II", address, flags) for address, flags in entries))
    rig.bus.write(0xC000 + BM_PRD, 4, at)


def test_dma_read_scatters_into_the_prd_regions(image):
    rig = Rig(image)
    prd(rig, [(0x10000, 512), (0x20000, 1024 | PRD_END)])
    rig.command(ata.CMD_READ_DMA, lba=100, count=3)
    assert rig.memory.read(0x10000, 4) == bytes(4)  # nothing before the engine starts
    rig.bus.write(0xC000 + BM_COMMAND, 1, BM_START | BM_TO_MEMORY)
    assert rig.memory.read(0x10000, 512) == bytes([100]) * 512
    assert rig.memory.read(0x20000, 1024) == bytes([101]) * 512 + bytes([102]) * 512
    assert rig.bus.read(0xC000 + BM_STATUS, 1) & (BM_INTERRUPT | BM_ERROR | 1) == BM_INTERRUPT
    assert rig.status() == ata.DRDY | ata.DSC
    rig.bus.write(0xC000 + BM_STATUS, 1, BM_INTERRUPT)
    assert rig.bus.read(0xC000 + BM_STATUS, 1) & BM_INTERRUPT == 0


def test_dma_write_started_first_then_command(image):
    rig = Rig(image)
    rig.memory.write(0x30000, b"\x5a" * 1024)
    prd(rig, [(0x30000, 1024 | PRD_END)])
    rig.bus.write(0xC000 + BM_COMMAND, 1, BM_START)
    rig.command(ata.CMD_WRITE_DMA_EXT, lba=1500, count=2, lba48=True)
    assert image.read(1500 * 512, 1024) == b"\x5a" * 1024
    assert not rig.status() & ata.ERR


def test_dma_with_a_short_or_bad_table_is_an_error(image):
    rig = Rig(image)
    prd(rig, [(0x10000, 512 | PRD_END)])
    rig.command(ata.CMD_READ_DMA, lba=0, count=2)
    rig.bus.write(0xC000 + BM_COMMAND, 1, BM_START | BM_TO_MEMORY)
    assert rig.bus.read(0xC000 + BM_STATUS, 1) & BM_ERROR and rig.status() & ata.ERR
    rig = Rig(image)
    prd(rig, [((1 << 20) - 256, 512 | PRD_END)])  # runs past RAM
    rig.command(ata.CMD_READ_DMA, lba=0, count=1)
    rig.bus.write(0xC000 + BM_COMMAND, 1, BM_START | BM_TO_MEMORY)
    assert rig.status() & ata.ERR
    assert rig.memory.read((1 << 20) - 256, 256) == bytes(256)


def test_dma_direction_must_match(image):
    rig = Rig(image)
    prd(rig, [(0x10000, 512 | PRD_END)])
    rig.command(ata.CMD_WRITE_DMA, lba=0, count=1)
    rig.bus.write(0xC000 + BM_COMMAND, 1, BM_START | BM_TO_MEMORY)
    assert rig.status() & ata.ERR and image.read(0, 4) == bytes(4)


def test_readonly_disk_refuses_writes(tmp_path):
    path = tmp_path / "ro.img"
    path.write_bytes(bytes(512 * 8))
    disk = ImageFile(path, readonly=True)
    rig = Rig(disk)
    rig.command(ata.CMD_WRITE_SECTORS, lba=0, count=1)
    assert rig.status() & ata.ERR
    disk.close()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8), st.sampled_from([1, 2, 4]), st.integers(0, 2**32 - 1)), max_size=40))
def test_hostile_register_traffic_never_raises(tmp_path_factory, accesses):
    path = tmp_path_factory.mktemp("ide") / "d.img"
    path.write_bytes(bytes(512 * 16))
    disk = ImageFile(path)
    rig = Rig(disk)
    for offset, size, value in accesses:
        if offset == 8:
            rig.channel.control_port().write(0, 1, value)
        else:
            rig.channel.write(offset, size, value)
            assert 0 <= rig.channel.read(offset, size) < 1 << (8 * size)
    disk.close()


def test_string_reads_cross_blocks_like_single_words(image):
    rig = Rig(image)
    rig.command(ata.CMD_READ_SECTORS, lba=3, count=3)
    # REP INSW of a sector and a half, then the rest a word at a time.
    first = rig.bus.read_string(BASE, 2, 384)
    rest = rig.read_words(256 * 3 - 384)
    assert first + rest == bytes([3]) * 512 + bytes([4]) * 512 + bytes([5]) * 512
    assert rig.status() == ata.DRDY | ata.DSC
    assert rig.bus.read_string(BASE, 2, 4) == bytes(8)  # no DRQ: zeros
    assert rig.bus.read_string(BASE + 7, 1, 4) is None  # not the data port


def test_string_writes(image):
    rig = Rig(image)
    rig.command(ata.CMD_WRITE_SECTORS, lba=20, count=2)
    assert rig.bus.write_string(BASE, 4, b"\x11" * 1024)
    assert image.read(20 * 512, 1024) == b"\x11" * 1024 and rig.status() == ata.DRDY | ata.DSC
