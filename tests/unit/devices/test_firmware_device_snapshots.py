"""A firmware boot's devices saved and restored (pyvmm/core/snapshot.py):
the IDE disk channel with its bus master, the ATAPI CD-ROM channel and
fw_cfg. As in test_device_snapshots.py: drive a device into some state,
save it through JSON, restore it into a freshly built one (on a copy of the
disk image and of guest RAM, as a restore has), then do the same to both
and see the same. A damaged state is refused whole with SnapshotError."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.core.bus import Bus
from pyvmm.core.memory import GuestMemory
from pyvmm.core.snapshot import SnapshotError
from pyvmm.devices import fw_cfg
from pyvmm.devices.fw_cfg import FwCfg
from pyvmm.devices.ide import ata, atapi
from pyvmm.devices.ide.ata import AtaChannel, ImageFile
from pyvmm.devices.ide.atapi import AtapiChannel, IsoImage
from pyvmm.devices.ide.piix import BM_COMMAND, BM_PRD, BM_START, BM_STATUS, BM_TO_MEMORY, PRD_END, BusMaster

BASE, CONTROL, BM = 0x1F0, 0x3F6, 0xC000
SECTORS = 64
RAM = 1 << 20
PRD_TABLE, DMA_BUFFER = 0x1000, 0x10000


def through_json(state: dict) -> dict:
    return json.loads(json.dumps(state, allow_nan=False))


class Channel:
    """A channel (disk or CD-ROM) with its bus master, on its own bus and RAM."""

    def __init__(self, kind, path):
        self.levels = [False]
        self.memory = GuestMemory([(0, RAM)])
        self.master = BusMaster(self.memory)
        self.image = ImageFile(path) if kind is AtaChannel else IsoImage(path)
        self.channel = kind(self.image, self.levels.append, dma=self.master)
        self.master.attach(self.channel)
        self.bus = Bus("pio", 1 << 16)
        self.bus.register(BASE, 8, self.channel)
        self.bus.register(CONTROL, 1, self.channel.control_port())
        self.bus.register(BM, 8, self.master)

    def do(self, op):
        kind = op[0]
        if kind == "r":
            return self.bus.read(BASE + op[1], 1)
        if kind == "rw":  # a data word
            return self.bus.read(BASE, 2)
        if kind == "rs":  # REP INSW of op[1] words
            return self.bus.read_string(BASE, 2, op[1])
        if kind == "w":
            self.bus.write(BASE + op[1], 1, op[2])
        elif kind == "ww":
            self.bus.write(BASE, 2, op[1])
        elif kind == "ctl":
            self.bus.write(CONTROL, 1, op[1])
        elif kind == "bm":
            self.bus.write(BM + op[1], 4 if op[1] == BM_PRD else 1, op[2])
        elif kind == "alt":
            return self.bus.read(CONTROL, 1)
        return None

    def observe(self):
        return (self.levels[-1], self.bus.read(BM + BM_STATUS, 1), self.bus.read(CONTROL, 1),
                self.memory.read(DMA_BUFFER, 4096))

    def close(self):
        self.image.close()


def restore_copy(original: Channel, kind, tmp_path) -> Channel:
    """A fresh channel on a copy of the original's image and RAM, given its saved state."""
    state = through_json(original.channel.save_state())
    copy = tmp_path / f"copy-{id(original)}.img"
    shutil.copyfile(original.image.path, copy)
    restored = Channel(kind, copy)
    restored.memory.write(0, original.memory.read(0, RAM))
    restored.channel.restore_state(state)
    return restored


def replay(kind, path, tmp_path, before, after):
    original = Channel(kind, path)
    prd_table(original.memory)  # for the DMA commands among the operations
    restored = None
    try:
        for op in before:
            original.do(op)
        restored = restore_copy(original, kind, tmp_path)
        assert restored.levels[-1] == original.levels[-1], "the restored line is not where it was"
        for op in after:
            assert restored.do(op) == original.do(op), op
            assert restored.observe() == original.observe(), op
        assert restored.image.read(0, SECTORS * ata.SECTOR) == original.image.read(0, SECTORS * ata.SECTOR)
    finally:
        original.close()
        if restored is not None:
            restored.close()


def disk_image(tmp_path):
    path = tmp_path / "disk.img"
    if not path.exists():
        path.write_bytes(b"".join(bytes([sector]) * ata.SECTOR for sector in range(SECTORS)))
    return path


def prd_table(memory, length=4096):
    memory.write(PRD_TABLE, (DMA_BUFFER).to_bytes(4, "little") + (PRD_END | length).to_bytes(4, "little"))


# Register writes that make commands of every data phase: the task file
# (sector count, LBA), then a command among PIO reads and writes (single and
# multiple), DMA, IDENTIFY, SET MULTIPLE, FLUSH and ones it aborts.
ATA_COMMANDS = [ata.CMD_READ_SECTORS, ata.CMD_READ_MULTIPLE, ata.CMD_WRITE_SECTORS, ata.CMD_WRITE_MULTIPLE,
                ata.CMD_READ_DMA, ata.CMD_WRITE_DMA, ata.CMD_IDENTIFY, ata.CMD_SET_MULTIPLE, ata.CMD_FLUSH_CACHE,
                ata.CMD_READ_SECTORS_EXT, ata.CMD_DIAGNOSTIC, 0x00]
ATA_OPS = st.lists(st.one_of(
    st.tuples(st.just("r"), st.integers(1, 7)),
    st.tuples(st.just("rw")),
    st.tuples(st.just("rs"), st.integers(1, 600)),
    st.tuples(st.just("w"), st.just(2), st.integers(0, 8)),
    st.tuples(st.just("w"), st.just(3), st.integers(0, SECTORS + 2)),
    st.tuples(st.just("w"), st.just(6), st.sampled_from([0x40, 0x50, 0xE0])),
    st.tuples(st.just("w"), st.just(7), st.sampled_from(ATA_COMMANDS)),
    st.tuples(st.just("ww"), st.integers(0, 0xFFFF)),
    st.tuples(st.just("ctl"), st.sampled_from([0, ata.NIEN, ata.SRST, ata.HOB])),
    st.tuples(st.just("bm"), st.just(BM_COMMAND), st.sampled_from([0, BM_START, BM_START | BM_TO_MEMORY])),
    st.tuples(st.just("bm"), st.just(BM_STATUS), st.integers(0, 0xFF)),
    st.tuples(st.just("bm"), st.just(BM_PRD), st.sampled_from([PRD_TABLE, 0xFFFF_F000])),
    st.tuples(st.just("alt")),
), min_size=3, max_size=40)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=ATA_OPS, after=ATA_OPS)
def test_an_ide_disk_channel_behaves_the_same_after_a_restore(tmp_path, before, after):
    path = tmp_path / "patterned.img"
    # Every byte tells its sector and place: a read resumed anywhere else differs.
    path.write_bytes(bytes((at * 7 + at // ata.SECTOR) & 0xFF for at in range(SECTORS * ata.SECTOR)))
    replay(AtaChannel, path, tmp_path, before, after)


def test_a_pio_read_saved_in_the_middle_of_a_sector_goes_on_where_it_was(tmp_path):
    original = Channel(AtaChannel, disk_image(tmp_path))
    for register, value in ((2, 3), (3, 5), (4, 0), (5, 0), (6, 0x40), (7, ata.CMD_READ_SECTORS)):
        original.do(("w", register, value))
    assert original.do(("rs", 100)) == bytes([5]) * 200
    restored = restore_copy(original, AtaChannel, tmp_path)
    assert restored.channel.alt_status() & ata.DRQ
    assert restored.do(("rs", 156)) == bytes([5]) * 312
    assert restored.do(("rs", 512)) == bytes([6]) * 512 + bytes([7]) * 512
    assert restored.do(("r", 7)) == ata.DRDY | ata.DSC
    original.close()
    restored.close()


def test_a_pio_write_saved_half_filled_lands_whole_after_the_restore(tmp_path):
    original = Channel(AtaChannel, disk_image(tmp_path))
    for register, value in ((2, 1), (3, 9), (4, 0), (5, 0), (6, 0x40), (7, ata.CMD_WRITE_SECTORS)):
        original.do(("w", register, value))
    for _ in range(100):
        original.do(("ww", 0xABAB))
    restored = restore_copy(original, AtaChannel, tmp_path)
    for _ in range(156):
        restored.do(("ww", 0xABAB))
    assert restored.image.read(9 * ata.SECTOR, ata.SECTOR) == b"\xab" * ata.SECTOR
    assert original.image.read(9 * ata.SECTOR, ata.SECTOR) == bytes([9]) * ata.SECTOR  # the original never wrote
    original.close()
    restored.close()


def test_a_dma_command_waiting_for_its_start_bit_runs_after_the_restore(tmp_path):
    original = Channel(AtaChannel, disk_image(tmp_path))
    prd_table(original.memory, 2 * ata.SECTOR)
    original.do(("bm", BM_PRD, PRD_TABLE))
    for register, value in ((2, 2), (3, 20), (4, 0), (5, 0), (6, 0x40), (7, ata.CMD_READ_DMA)):
        original.do(("w", register, value))
    restored = restore_copy(original, AtaChannel, tmp_path)
    restored.do(("bm", BM_COMMAND, BM_START | BM_TO_MEMORY))
    assert restored.memory.read(DMA_BUFFER, 2 * ata.SECTOR) == bytes([20]) * 512 + bytes([21]) * 512
    assert restored.levels[-1] and restored.do(("r", 7)) == ata.DRDY | ata.DSC
    original.close()
    restored.close()


def test_an_unplugged_disk_stays_unplugged(tmp_path):
    original = Channel(AtaChannel, disk_image(tmp_path))
    original.channel.unplug()
    restored = restore_copy(original, AtaChannel, tmp_path)
    assert restored.channel.unplugged and restored.do(("r", 7)) == ata.FLOATING
    original.close()
    restored.close()


# --- the CD-ROM drive ------------------------------------------------------------------

def cd_image(tmp_path, blocks=8):
    path = tmp_path / "cd.iso"
    if not path.exists():
        path.write_bytes(b"".join(bytes([block]) * atapi.BLOCK for block in range(blocks)))
    return path


def packet(channel: Channel, cdb, *, limit=0xFFFE, dma=False):
    for register, value in ((1, 1 if dma else 0), (4, limit & 0xFF), (5, limit >> 8), (6, 0),
                            (7, atapi.CMD_PACKET)):
        channel.do(("w", register, value))
    cdb = bytes(cdb).ljust(atapi.PACKET_SIZE, b"\0")
    for at in range(0, atapi.PACKET_SIZE, 2):
        channel.do(("ww", int.from_bytes(cdb[at : at + 2], "little")))


def read10(lba, count):
    return [atapi.READ_10, 0, *lba.to_bytes(4, "big"), 0, *count.to_bytes(2, "big"), 0]


def test_a_cd_read_saved_between_and_inside_its_drq_blocks_goes_on(tmp_path):
    original = Channel(AtapiChannel, cd_image(tmp_path))
    packet(original, read10(2, 3), limit=2048)
    assert original.do(("rs", 1024)) == bytes([2]) * 2048  # block 1 of 3
    assert original.do(("rs", 100)) == bytes([3]) * 200  # into block 2
    restored = restore_copy(original, AtapiChannel, tmp_path)
    assert restored.do(("rs", 924)) == bytes([3]) * 1848
    assert restored.do(("rs", 1024)) == bytes([4]) * 2048
    assert restored.do(("r", 2)) & (atapi.IO | atapi.COD) == atapi.IO | atapi.COD
    assert not restored.do(("r", 7)) & (ata.DRQ | ata.ERR)
    original.close()
    restored.close()


def test_a_half_written_packet_and_a_data_reply_survive(tmp_path):
    original = Channel(AtapiChannel, cd_image(tmp_path))
    packet(original, [atapi.INQUIRY, 0, 0, 0, 36])
    assert original.do(("rs", 4)) == original.channel._reply.data[:8]
    restored = restore_copy(original, AtapiChannel, tmp_path)
    assert restored.do(("rs", 14))[:20].startswith(b"PYVMM   PYVMM DVD-ROM"[:20])
    # A CDB half sent when saved is finished after the restore.
    for register, value in ((1, 0), (4, 0xFE), (5, 0xFF), (6, 0), (7, atapi.CMD_PACKET)):
        restored.do(("w", register, value))
    cdb = bytes(read10(7, 1)).ljust(12, b"\0")
    for at in range(0, 6, 2):
        restored.do(("ww", int.from_bytes(cdb[at : at + 2], "little")))
    again = restore_copy(restored, AtapiChannel, tmp_path)
    for at in range(6, 12, 2):
        again.do(("ww", int.from_bytes(cdb[at : at + 2], "little")))
    assert again.do(("rs", 1024)) == bytes([7]) * 2048
    for channel in (original, restored, again):
        channel.close()


def test_a_cd_dma_reply_waiting_for_the_bus_master_runs_after_the_restore(tmp_path):
    original = Channel(AtapiChannel, cd_image(tmp_path))
    prd_table(original.memory, atapi.BLOCK)
    original.do(("bm", BM_PRD, PRD_TABLE))
    packet(original, read10(5, 1), dma=True)
    restored = restore_copy(original, AtapiChannel, tmp_path)
    restored.do(("bm", BM_COMMAND, BM_START | BM_TO_MEMORY))
    assert restored.memory.read(DMA_BUFFER, atapi.BLOCK) == bytes([5]) * atapi.BLOCK
    assert restored.do(("r", 2)) & (atapi.IO | atapi.COD) == atapi.IO | atapi.COD
    original.close()
    restored.close()


# --- refusals ----------------------------------------------------------------------------

def saved_reading(tmp_path, kind=AtaChannel):
    channel = Channel(kind, disk_image(tmp_path) if kind is AtaChannel else cd_image(tmp_path))
    if kind is AtaChannel:
        for register, value in ((2, 2), (3, 5), (4, 0), (5, 0), (6, 0x40), (7, ata.CMD_READ_SECTORS)):
            channel.do(("w", register, value))
    else:
        packet(channel, read10(2, 3), limit=2048)
    state = through_json(channel.channel.save_state())
    channel.close()
    return state


@pytest.mark.parametrize("change", [
    lambda s: s.update(version=2),
    lambda s: s.update(transfer=["read", SECTORS, 5, 1]),  # past the disk's end
    lambda s: s.update(transfer=["dma", 0, 4, 1]),  # a DMA's direction is a bool
    lambda s: s.update(transfer=["format", 0, 1, 1]),
    lambda s: s.update(buffer="ab" * (ata.MAX_SAVED_BUFFER + 1)),
    lambda s: s.update(buffer_pos=10 ** 6),
    lambda s: s.update(lba=[1, 2]),
    lambda s: s.update(status=256),
    lambda s: s.update(multiple=ata.MAX_MULTIPLE + 1),
    lambda s: s.update(bus_master=None),
    lambda s: s["bus_master"].update(prd=2),
    lambda s: s.pop("nien"),
])
def test_a_damaged_disk_channel_state_is_refused(tmp_path, change):
    state = saved_reading(tmp_path)
    change(state)
    fresh = Channel(AtaChannel, disk_image(tmp_path))
    before = fresh.channel.save_state()
    with pytest.raises(SnapshotError):
        fresh.channel.restore_state(state)
    assert fresh.channel.save_state() == before  # nothing half taken
    fresh.close()


@pytest.mark.parametrize("change", [
    lambda s: s["reply"].update(start=7 * atapi.BLOCK),  # runs past the image's end
    lambda s: s["reply"].update(start=100),  # not on a block
    lambda s: s["reply"].update(position=10 ** 9),
    lambda s: s.update(transfer=["dma"], reply=None),
    lambda s: s.update(packet="00" * atapi.PACKET_SIZE),  # a whole CDB would have run
    lambda s: s.update(sense=[1, 2]),
    lambda s: s.update(unplugged=True),  # a CD-ROM is never unplugged
])
def test_a_damaged_cd_channel_state_is_refused(tmp_path, change):
    state = saved_reading(tmp_path, AtapiChannel)
    change(state)
    fresh = Channel(AtapiChannel, cd_image(tmp_path))
    before = fresh.channel.save_state()
    with pytest.raises(SnapshotError):
        fresh.channel.restore_state(state)
    assert fresh.channel.save_state() == before
    fresh.close()


# --- fw_cfg ------------------------------------------------------------------------------

def firmware_config(memory=None):
    device = FwCfg(memory)
    device.add_item(fw_cfg.RAM_SIZE, (64 << 20).to_bytes(8, "little"))
    device.add_file("etc/e820", bytes(range(200)))
    return device


def test_fw_cfg_goes_on_reading_the_selected_item_where_it_was():
    original = firmware_config()
    original.write(fw_cfg.SELECTOR, 2, fw_cfg.FILE_FIRST)
    first = bytes(original.read(fw_cfg.DATA, 1) for _ in range(50))
    restored = firmware_config()
    restored.restore_state(through_json(original.save_state()))
    assert first == bytes(range(50))
    assert bytes(restored.read(fw_cfg.DATA, 1) for _ in range(150)) == bytes(range(50, 200))
    assert restored.read(fw_cfg.SELECTOR, 2) == fw_cfg.FILE_FIRST


def test_fw_cfg_keeps_a_dma_address_half_written():
    memory = GuestMemory([(0, RAM)])
    original = firmware_config(memory)
    original.write(fw_cfg.DMA_HIGH, 4, 0)
    restored = firmware_config(memory)
    restored.restore_state(through_json(original.save_state()))
    access = 0x2000
    control = (fw_cfg.RAM_SIZE << 16) | fw_cfg.DMA_SELECT | fw_cfg.DMA_READ
    memory.write(access, fw_cfg.DMA_ACCESS.pack(control, 8, 0x3000))
    restored.write(fw_cfg.DMA_LOW, 4, int.from_bytes(access.to_bytes(4, "big"), "little"))
    assert memory.read(0x3000, 8) == (64 << 20).to_bytes(8, "little")
    assert memory.read(access, 4) == bytes(4)


@pytest.mark.parametrize("state", [
    {"version": 2, "selector": 0, "offset": 0, "dma_high": 0},
    {"version": 1, "selector": 0x10000, "offset": 0, "dma_high": 0},
    {"version": 1, "selector": 0, "offset": -1, "dma_high": 0},
    {"version": 1, "selector": 0, "offset": 0},
])
def test_a_damaged_fw_cfg_state_is_refused(state):
    with pytest.raises(SnapshotError):
        firmware_config().restore_state(state)
