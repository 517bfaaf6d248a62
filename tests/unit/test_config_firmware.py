"""Choosing a firmware boot on the command line and in xl.cfg, and the images refused."""

import pytest
from click.testing import CliRunner

from pyvmm import cli

MBR_DISK = bytes(510) + b"\x55\xaa" + bytes(4096)


def run(tmp_path, monkeypatch, *args):
    """`pyvmm run ARGS` in tmp_path up to the VM: (exit status, stderr, the VmConfig it would run)."""
    import pyvmm.runner

    seen = []
    monkeypatch.setattr(pyvmm.runner, "run_vm", lambda config: seen.append(config) or 0)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli.cli, ["run", "--no-sandbox", *args])
    return result.exit_code, result.stderr, seen[0] if seen else None


def test_a_disk_without_a_kernel_boots_through_firmware(tmp_path, monkeypatch):
    (tmp_path / "disk.img").write_bytes(MBR_DISK)
    status, stderr, config = run(tmp_path, monkeypatch, "--disk", "disk.img")
    assert status == 0, stderr
    assert config.firmware_boot and config.kernel is None and config.firmware is None
    (tmp_path / "bios.bin").write_bytes(b"x")
    status, _, config = run(tmp_path, monkeypatch, "--disk", "disk.img", "--firmware", "bios.bin")
    assert status == 0 and str(config.firmware) == "bios.bin"


def test_an_image_given_as_the_config_file_is_the_first_disk(tmp_path, monkeypatch):
    (tmp_path / "disk.img").write_bytes(MBR_DISK)
    (tmp_path / "data.img").write_bytes(bytes(4096))
    status, stderr, config = run(tmp_path, monkeypatch, "disk.img", "--disk", "data.img")
    assert status == 0, stderr
    assert [str(d.path) for d in config.devices_of("blk")] == ["disk.img", "data.img"]
    assert [d.vdev for d in config.devices_of("blk")] == ["xvda", "xvdb"]


def test_xl_cfg_hvm_with_a_disk_and_no_kernel_boots_through_firmware(tmp_path, monkeypatch):
    (tmp_path / "disk.img").write_bytes(MBR_DISK)
    (tmp_path / "vm.cfg").write_text('name = "g"\ntype = "hvm"\ndisk = [ "format=raw, vdev=xvda, target=disk.img" ]\n')
    status, stderr, config = run(tmp_path, monkeypatch, "vm.cfg")
    assert status == 0, stderr
    assert config.firmware_boot


@pytest.mark.parametrize("args, message", [
    ((), "no kernel and no disk: give --kernel, or --disk IMAGE or --cdrom ISO"),
    (("--disk", "disk.img", "--append", "quiet"), "--initrd and --append need --kernel"),
    (("--kernel", "vmlinuz", "--firmware", "bios.bin"), "--firmware boots a disk image; it does not go with --kernel"),
    (("--disk", "disk.img", "--firmware", "missing.bin"), "firmware 'missing.bin' is not a readable file"),
])
def test_contradictions_are_one_line(tmp_path, monkeypatch, args, message):
    (tmp_path / "disk.img").write_bytes(MBR_DISK)
    (tmp_path / "vmlinuz").write_bytes(b"x")
    (tmp_path / "bios.bin").write_bytes(b"x")
    status, stderr, config = run(tmp_path, monkeypatch, *args)
    assert status == 1 and config is None
    assert message in stderr and stderr.count("\n") == 1


@pytest.mark.parametrize("header, what", [
    (b"QFI\xfb\x00\x00\x00\x03", "a qcow2 image"),
    (b"KDMV\x01\x00\x00\x00", "a VMDK image"),
    (b"conectix", "a VHD image"),
])
def test_foreign_image_formats_are_refused(tmp_path, monkeypatch, header, what):
    (tmp_path / "vm.qcow2").write_bytes(header + bytes(4096))
    status, stderr, config = run(tmp_path, monkeypatch, "--disk", "vm.qcow2")
    assert status == 1 and config is None
    assert f"is {what}; pyvmm serves raw images and block devices only" in stderr


def iso_image(size=0x9000):
    iso = bytearray(size)
    iso[0x8001:0x8006] = b"CD001"
    return bytes(iso)


def test_an_iso_given_as_a_disk_is_refused_with_the_option_to_use(tmp_path, monkeypatch):
    (tmp_path / "debian.iso").write_bytes(iso_image())
    status, stderr, _ = run(tmp_path, monkeypatch, "--disk", "debian.iso")
    assert status == 1 and "is an ISO 9660 image (a CD-ROM), not a disk: give it as --cdrom" in stderr


def test_an_iso_given_as_the_config_file_boots_from_the_cdrom(tmp_path, monkeypatch):
    from pyvmm.vmm.builder import boot_order

    (tmp_path / "debian.iso").write_bytes(iso_image())
    status, stderr, config = run(tmp_path, monkeypatch, "debian.iso")
    assert status == 0, stderr
    assert str(config.cdrom) == "debian.iso" and not config.devices_of("blk") and config.boots_cdrom
    assert boot_order(3, config) == b"/pci@i0cf8/ide@3/drive@1/disk@0\nHALT"


def test_cdrom_and_disk_boot_order(tmp_path, monkeypatch):
    from pyvmm.vmm.builder import boot_order

    (tmp_path / "cd.iso").write_bytes(iso_image())
    (tmp_path / "disk.img").write_bytes(MBR_DISK)
    disk, cdrom = "/pci@i0cf8/ide@5/drive@0/disk@0", "/pci@i0cf8/ide@5/drive@1/disk@0"
    status, stderr, config = run(tmp_path, monkeypatch, "--disk", "disk.img", "--cdrom", "cd.iso")
    assert status == 0, stderr
    assert boot_order(5, config).decode().split("\n") == [disk, cdrom, "HALT"]
    status, stderr, config = run(tmp_path, monkeypatch, "--disk", "disk.img", "--cdrom", "cd.iso", "--boot", "cdrom")
    assert status == 0, stderr
    assert boot_order(5, config).decode().split("\n") == [cdrom, disk, "HALT"]


def test_xl_cfg_cdrom_and_boot_d(tmp_path, monkeypatch):
    (tmp_path / "cd.iso").write_bytes(iso_image())
    (tmp_path / "disk.img").write_bytes(MBR_DISK)
    (tmp_path / "vm.cfg").write_text('name = "g"\ntype = "hvm"\nboot = "d"\n'
                                     'disk = [ "disk.img,raw,hda,w", "cd.iso,raw,hdc:cdrom,r" ]\n')
    status, stderr, config = run(tmp_path, monkeypatch, "vm.cfg")
    assert status == 0, stderr
    assert str(config.cdrom) == "cd.iso" and config.boot == "cdrom" and config.boots_cdrom
    assert [d.vdev for d in config.devices_of("blk")] == ["hda"]  # the CD-ROM is no PV disk


@pytest.mark.parametrize("args, message", [
    (("--cdrom", "missing.iso"), "--cdrom 'missing.iso' is not a readable file"),
    (("--cdrom", "disk.img"), "--cdrom 'disk.img' is not an ISO 9660 image (no CD001 at byte 0x8001)"),
    (("--kernel", "vmlinuz", "--cdrom", "cd.iso"), "--cdrom is a drive for the firmware to boot from; it does not "
                                                   "go with --kernel"),
    (("--kernel", "vmlinuz", "--boot", "disk"), "--boot chooses what the firmware boots"),
    (("--disk", "disk.img", "--boot", "cdrom"), "--boot cdrom needs --cdrom ISO"),
    (("--cdrom", "cd.iso", "--boot", "disk"), "--boot disk needs --disk IMAGE"),
])
def test_cdrom_contradictions_are_one_line(tmp_path, monkeypatch, args, message):
    (tmp_path / "disk.img").write_bytes(MBR_DISK)
    (tmp_path / "cd.iso").write_bytes(iso_image())
    (tmp_path / "vmlinuz").write_bytes(b"x")
    status, stderr, config = run(tmp_path, monkeypatch, *args)
    assert status == 1 and config is None
    assert message in stderr and stderr.count("\n") == 1


def test_xl_cfg_hda_is_the_ide_boot_disk_and_the_pv_disk_xvda(tmp_path, monkeypatch):
    from pyvmm.xen.backends.blk.vbd import vdev_to_devid

    (tmp_path / "disk.img").write_bytes(MBR_DISK)
    (tmp_path / "data.img").write_bytes(MBR_DISK)
    (tmp_path / "vm.cfg").write_text('name = "g"\ntype = "hvm"\ndisk = [ "data.img,raw,xvdb,w", "disk.img,raw,hda,w" ]\n')
    status, stderr, config = run(tmp_path, monkeypatch, "vm.cfg")
    assert status == 0, stderr
    assert [d.vdev for d in config.devices_of("blk")] == ["xvdb", "hda"]
    assert vdev_to_devid("hda") == 768 and vdev_to_devid("hdd") == 22 << 8 | 64
    # hda is xvda in the guest: the two names cannot both be given.
    (tmp_path / "vm.cfg").write_text('name = "g"\ntype = "hvm"\ndisk = [ "data.img,raw,xvda,w", "disk.img,raw,hda,w" ]\n')
    status, stderr, _ = run(tmp_path, monkeypatch, "vm.cfg")
    assert status == 1 and "share a vdev: xvda" in stderr


def test_without_xen_the_firmwares_ide_disk_is_the_only_disk(tmp_path, monkeypatch):
    (tmp_path / "disk.img").write_bytes(MBR_DISK)
    (tmp_path / "data.img").write_bytes(bytes(4096))
    status, stderr, config = run(tmp_path, monkeypatch, "--no-xen", "--disk", "disk.img")
    assert status == 0, stderr
    assert config.ide_disk is config.devices_of("blk")[0]
    status, stderr, _ = run(tmp_path, monkeypatch, "--no-xen", "--disk", "disk.img", "--disk", "data.img")
    assert status == 1 and stderr == ("pyvmm: error: --disk 'data.img': needs Xen mode (it is a Xen PV device; "
                                      "without Xen a firmware boot has one disk, the IDE disk); drop --no-xen\n"), stderr
