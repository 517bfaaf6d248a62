"""One config model: `pyvmm run --disk/--net` and xl.cfg's disk/vif give the same
DeviceSpecs, and a refusal names what the person wrote, where they wrote it."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from pyvmm import cli
from pyvmm.config import ConfigError, VmConfig
from pyvmm.xen.backends.blk.spec import DiskSpec, parse_disk_option
from pyvmm.xen.backends.net.spec import NicSpec, parse_net_option
from pyvmm.xlcfg import xl_config_from_text

HVM = 'name = "g"\ntype = "hvm"\nkernel = "vmlinuz"\n'


def run(tmp_path, monkeypatch, *args):
    """`pyvmm run ARGS` in tmp_path up to the VM: (exit status, stderr, the VmConfig it would run)."""
    import pyvmm.runner

    seen = []
    monkeypatch.setattr(pyvmm.runner, "run_vm", lambda config: seen.append(config) or 0)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vmlinuz").write_bytes(b"x")
    result = CliRunner().invoke(cli.cli, ["run", "--no-sandbox", *args])
    return result.exit_code, result.stderr, seen[0] if seen else None


def cfg(tmp_path, text):
    (tmp_path / "vm.cfg").write_text(HVM + text)
    return "vm.cfg"


@pytest.mark.parametrize("vdev, message", [
    ("hde", "vm.cfg:4: disk 'vdev=hde, target=disk.img': vdev hde: an IDE controller has four disks, hda to hdd; "
            "name further disks as Xen PV disks (vdev=xvde)"),
    ("sdb", "vm.cfg:4: disk 'vdev=sdb, target=disk.img': vdev sdb names an emulated SCSI disk; pyvmm has no SCSI "
            "controller and gives the guest Xen PV disks, named xvda, xvdb, ... (vdev=xvdb)"),
    ("xvdb1", "vm.cfg:4: disk 'vdev=xvdb1, target=disk.img': vdev xvdb1 is a partition; pyvmm gives the guest "
              "whole disks only (vdev=xvdb)"),
])
def test_xl_cfg_vdev_refusals_name_the_file_line_and_entry(tmp_path, monkeypatch, vdev, message):
    (tmp_path / "disk.img").write_bytes(bytes(4096))
    status, stderr, config = run(tmp_path, monkeypatch, cfg(tmp_path, f'disk = [ "vdev={vdev}, target=disk.img" ]\n'))
    assert status == 1 and config is None
    assert stderr == f"pyvmm: error: {message}\n"
    assert "--disk" not in stderr  # an option the person never typed


def test_xl_cfg_target_with_a_comma_reaches_the_vm_unchanged(tmp_path, monkeypatch):
    (tmp_path / "seed, with comma.img").write_bytes(bytes(4096))
    status, stderr, config = run(tmp_path, monkeypatch, cfg(
        tmp_path, 'disk = [ "vdev=xvdb, access=r, target=seed, with comma.img" ]\n'))
    assert status == 0, stderr
    assert config.devices == (DiskSpec(Path("seed, with comma.img"), "xvdb", True),)
    assert str(config.devices[0].origin) == "vm.cfg:4: disk 'vdev=xvdb, access=r, target=seed, with comma.img'"


def test_xl_cfg_missing_target_with_a_comma_is_named_as_written(tmp_path, monkeypatch):
    status, stderr, _ = run(tmp_path, monkeypatch, cfg(tmp_path, 'disk = [ "vdev=xvdb, target=gone, x.img" ]\n'))
    assert status == 1
    assert stderr == ("pyvmm: error: vm.cfg:4: disk 'vdev=xvdb, target=gone, x.img': 'gone, x.img' is not a file "
                      "or block device\n")


def test_xl_cfg_vif_under_no_xen_names_the_entry(tmp_path, monkeypatch):
    status, stderr, _ = run(tmp_path, monkeypatch, "--no-xen", cfg(tmp_path, "vif = [ 'vifname=t0' ]\n"))
    assert status == 1
    assert stderr == ("pyvmm: error: vm.cfg:4: vif 'vifname=t0': needs Xen mode (it is a Xen PV device); "
                      "drop --no-xen\n")


def test_command_line_devices_win_over_the_file_and_keep_their_own_words(tmp_path, monkeypatch):
    (tmp_path / "a.img").write_bytes(bytes(4096))
    name = cfg(tmp_path, 'disk = [ "vdev=hda, target=a.img" ]\nvif = [ "vifname=t0" ]\n')
    status, stderr, config = run(tmp_path, monkeypatch, name, "--disk", "a.img,readonly=on")
    assert status == 0, stderr
    assert config.devices == (DiskSpec(Path("a.img"), "xvda", True), NicSpec("t0"))
    assert [str(device.source()) for device in config.devices] == ["--disk 'a.img,readonly=on'",
                                                                  "vm.cfg:5: vif 'vifname=t0'"]
    status, stderr, _ = run(tmp_path, monkeypatch, "--kernel", "vmlinuz", "--disk", "a.img",
                            "--disk", "a.img,vdev=xvda")
    assert stderr == "pyvmm: error: --disk 'a.img' and --disk 'a.img,vdev=xvda' share a vdev: xvda\n"


def test_both_grammars_give_the_same_specs():
    xl = xl_config_from_text(HVM + "disk = ['/x,raw,xvdb,ro']\nvif = ['vifname=t0,mac=00:16:3e:00:00:01']\n",
                             "vm.cfg")
    assert xl.devices == (parse_disk_option("/x,vdev=xvdb,readonly=on", 0),
                          parse_net_option("tap=t0,mac=00:16:3e:00:00:01"))


def test_specs_made_in_code_are_named_as_their_option(tmp_path):
    (tmp_path / "k").write_bytes(b"x")
    with pytest.raises(ConfigError) as caught:
        VmConfig(kernel=tmp_path / "k", devices=(DiskSpec(Path("/x"), "xvda"), DiskSpec(Path("/y"), "xvda"))).validate()
    assert str(caught.value) == "--disk '/x,vdev=xvda' and --disk '/y,vdev=xvda' share a vdev: xvda"
