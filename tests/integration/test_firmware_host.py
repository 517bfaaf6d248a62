"""A firmware boot's bad input, refused before any guest runs (any host)."""

from __future__ import annotations

from vmm import run_pyvmm


def test_wrong_firmware_is_one_line(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(510) + b"\x55\xaa" + bytes(1 << 20))
    bios = tmp_path / "bios.bin"
    bios.write_bytes(bytes(100))
    result = run_pyvmm("run", "--disk", str(disk), "--firmware", str(bios), "--no-sandbox", timeout=60)
    assert result.status == 1, str(result)
    assert result.stderr == (f"pyvmm: error: cannot boot the disk image: firmware {bios} is 100 bytes; "
                             "a BIOS image (SeaBIOS) is 128 KiB or 256 KiB\n"), result


def test_qcow2_is_refused(tmp_path):
    image = tmp_path / "vm.qcow2"
    image.write_bytes(b"QFI\xfb" + bytes(4096))
    result = run_pyvmm("run", str(image), "--no-sandbox", timeout=60)
    assert result.status == 1, str(result)
    assert "is a qcow2 image; pyvmm serves raw images and block devices only" in result.stderr, str(result)
    assert result.stderr.count("\n") == 1


def test_a_firmware_machine_is_wired_as_seabios_expects(tmp_path):
    """MachineBuilder on this host's /dev/kvm, no guest run: the firmware's
    two copies, fw_cfg, the host bridge's subsystem and the IDE disk."""
    import os

    import pytest

    from pyvmm.boot.firmware import DEFAULT_FIRMWARE
    from pyvmm.config import SerialSpec, VmConfig
    from pyvmm.core import layout
    from pyvmm.core.console import ConsoleOutput
    from pyvmm.devices import fw_cfg
    from pyvmm.devices.ide import ata
    from pyvmm.vmm.builder import MachineBuilder
    from pyvmm.xen.backends.blk.spec import DiskSpec

    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this host")
    if not DEFAULT_FIRMWARE.exists():
        pytest.skip("Debian's seabios package is not installed")
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\xab" * 512 + bytes(1 << 20))
    config = VmConfig(kernel=None, xen=False, memory=64 << 20, serial=SerialSpec("none"),
                      devices=(DiskSpec(disk, "xvda"),))
    console = ConsoleOutput(None, [])
    machine = MachineBuilder.for_boot(config, console)
    try:
        image = DEFAULT_FIRMWARE.read_bytes()
        assert machine.memory.read(0x10_0000 - len(image), len(image)) == image
        assert bytes(machine.firmware_rom.mapping[-16:]) == image[-16:]
        state = machine.boot_state
        assert (state.cs.base + state.rip, state.cr0 & 1) == (0xFFFF_FFF0, 0)
        pio = machine.pio
        pio.write(layout.FW_CFG_PORT, 2, fw_cfg.SIGNATURE)
        assert bytes(pio.read(layout.FW_CFG_PORT + 1, 1) for _ in range(4)) == b"QEMU"
        pio.write(layout.FW_CFG_PORT, 2, fw_cfg.NB_CPUS)
        assert pio.read(layout.FW_CFG_PORT + 1, 1) == 1
        pio.write(layout.PCI_CONFIG_ADDRESS_PORT, 4, 0x8000_002C)  # 00:00.0 subsystem
        assert pio.read(layout.PCI_CONFIG_DATA_PORT, 4) == 0x1100_1AF4
        base = layout.IDE_CHANNELS[0][0]
        for register, value in ((2, 1), (3, 0), (4, 0), (5, 0), (6, 0x40), (7, ata.CMD_READ_SECTORS)):
            pio.write(base + register, 1, value)
        assert pio.read(base + 7, 1) & ata.DRQ
        assert pio.read_string(base, 2, 256)[:4] == b"\xab" * 4
        assert pio.read(layout.IDE_CHANNELS[1][0] + 7, 1) == ata.FLOATING  # the empty secondary
        machine.platform.unplug_ide_disks()
        assert pio.read(base + 7, 1) == ata.FLOATING
    finally:
        machine.close()
        console.close()


def test_a_cdrom_is_the_secondary_master_and_survives_the_unplug(tmp_path):
    """MachineBuilder on this host's /dev/kvm, no guest run: --cdrom's ISO
    answers as an ATAPI drive on the secondary channel, after the disk's unplug too."""
    import os

    import pytest

    from pyvmm.boot.firmware import DEFAULT_FIRMWARE
    from pyvmm.config import SerialSpec, VmConfig
    from pyvmm.core import layout
    from pyvmm.core.console import ConsoleOutput
    from pyvmm.devices.ide import ata, atapi
    from pyvmm.vmm.builder import MachineBuilder
    from pyvmm.xen.backends.blk.spec import DiskSpec

    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this host")
    if not DEFAULT_FIRMWARE.exists():
        pytest.skip("Debian's seabios package is not installed")
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    iso = bytearray(20 * 2048)
    iso[0x8001:0x8006] = b"CD001"
    iso[19 * 2048:] = b"\xcd" * 2048
    (tmp_path / "cd.iso").write_bytes(bytes(iso))
    config = VmConfig(kernel=None, xen=False, memory=64 << 20, serial=SerialSpec("none"),
                      devices=(DiskSpec(disk, "xvda"),), cdrom=tmp_path / "cd.iso")
    console = ConsoleOutput(None, [])
    machine = MachineBuilder.for_boot(config, console)
    try:
        pio = machine.pio
        base = layout.IDE_CHANNELS[1][0]
        assert (pio.read(base + 4, 1), pio.read(base + 5, 1)) == (0x14, 0xEB)  # the packet signature
        machine.platform.unplug_ide_disks()
        assert pio.read(layout.IDE_CHANNELS[0][0] + 7, 1) == ata.FLOATING  # the disk is gone
        for register, value in ((1, 0), (4, 0), (5, 8), (6, 0), (7, atapi.CMD_PACKET)):
            pio.write(base + register, 1, value)
        assert pio.read(base + 7, 1) & ata.DRQ
        pio.write_string(base, 2, bytes([atapi.READ_10, 0, 0, 0, 0, 19, 0, 0, 1, 0, 0, 0]))
        assert pio.read(base + 2, 1) == atapi.IO and pio.read(base + 4, 1) | pio.read(base + 5, 1) << 8 == 2048
        assert pio.read_string(base, 2, 1024) == b"\xcd" * 2048
        assert pio.read(base + 7, 1) == ata.DRDY | ata.DSC and pio.read(base + 2, 1) == atapi.IO | atapi.COD
    finally:
        machine.close()
        console.close()
