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
    ((), "no kernel and no disk: give --kernel, or --disk IMAGE"),
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


def test_an_iso_is_not_a_boot_disk(tmp_path, monkeypatch):
    iso = bytearray(0x9000)
    iso[0x8001:0x8006] = b"CD001"
    (tmp_path / "debian.iso").write_bytes(bytes(iso))
    status, stderr, _ = run(tmp_path, monkeypatch, "--disk", "debian.iso")
    assert status == 1 and "is an ISO 9660 image (a CD-ROM)" in stderr


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
