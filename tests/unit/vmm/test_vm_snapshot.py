"""What refuses a restore (pyvmm/vmm/snapshot.py), and the config a
restored VM is given: each refusal is one line that names the file and
says what differs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyvmm.config import ConfigError, VmConfig
from pyvmm.core.snapshot import SnapshotError
from pyvmm.kvm.cpuid import CpuidEntry
from pyvmm.vmm import snapshot as snap
from pyvmm.xen import backends  # noqa: F401 - the device kinds
from pyvmm.xen.backends.blk.spec import DiskSpec
from pyvmm.xen.backends.net.spec import parse_net_option
from pyvmm.xen.backends.net.vif import generated_mac

HOST = {"vendor": "AuthenticAMD", "family": 25, "model": 1, "stepping": 1, "signature": "0x00a00f11",
        "model_name": "AMD EPYC", "kvm": "kvm_amd", "features": {"0x1.0.ecx": 0xF7F83203, "0x7.0.ebx": 0x219C03AB}}


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message and message.startswith("vm.snap: ")
    return message


def test_the_same_host_or_another_stepping_restores():
    snap.check_host(HOST, dict(HOST), "vm.snap")
    snap.check_host(HOST, {**HOST, "stepping": 2, "model_name": "AMD EPYC 2", "signature": "0x00a00f12"}, "vm.snap")
    more = {**HOST, "features": {"0x1.0.ecx": 0xFFFFFFFF, "0x7.0.ebx": 0x219C03AB, "0x7.0.ecx": 4}}
    snap.check_host(HOST, more, "vm.snap")


@pytest.mark.parametrize("change,words", [
    ({"kvm": "kvm_pvm"}, "taken under kvm_amd, and this host's KVM is kvm_pvm"),
    ({"vendor": "GenuineIntel"}, "taken on a AuthenticAMD CPU, and this host's is GenuineIntel"),
    ({"family": 23, "model": 49, "model_name": "AMD EPYC 7B12"}, "another CPU model: AuthenticAMD family 25 model 1"),
    ({"model": 17}, "this host has AuthenticAMD family 25 model 17"),
    ({"features": {"0x1.0.ecx": 0xF7F83203, "0x7.0.ebx": 0x219C0000}}, "CPUID 0x7.0.ebx 0x3ab"),
])
def test_another_host_is_refused(change, words):
    with pytest.raises(SnapshotError) as error:
        snap.check_host(HOST, {**HOST, **change}, "vm.snap")
    assert words in one_line(error)


def test_cpu_features_are_kvms_feature_words():
    supported = [CpuidEntry(1, 0, 0, 0xA00F11, 0, 0x1234, 0x5678), CpuidEntry(7, 0, 1, 0, 0xAB, 0xCD, 0xEF),
                 CpuidEntry(7, 1, 1, 0x99), CpuidEntry(0x8000_0001, 0, 0, 0, 0, 0x11, 0x22)]
    assert snap.cpu_features(supported) == {
        "0x1.0.ecx": 0x1234, "0x1.0.edx": 0x5678, "0x7.0.ebx": 0xAB, "0x7.0.ecx": 0xCD, "0x7.0.edx": 0xEF,
        "0x7.1.eax": 0x99, "0x80000001.0.ecx": 0x11, "0x80000001.0.edx": 0x22}


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as stream:
        stream.truncate(64 << 20)
        stream.seek(10 << 20)
        stream.write(b"filesystem" * 1000)
    return path


def config_with(*specs, name="vm") -> VmConfig:
    return VmConfig(kernel=Path("/nonexistent"), devices=tuple(specs), name=name)


def test_a_disk_is_known_by_its_size_and_content(image, tmp_path):
    saved = snap.disk_identities(config_with(DiskSpec(image, "xvda")))
    assert saved[0]["size"] == 64 << 20 and saved[0]["vdev"] == "xvda"
    copy = tmp_path / "copy.img"
    os.system(f"cp --sparse=always {image} {copy}")
    snap.check_disks(saved, config_with(DiskSpec(copy, "xvda")), "vm.snap")  # a copy is the same disk

    with open(copy, "r+b") as stream:
        stream.seek(0)
        stream.write(b"changed")
    with pytest.raises(SnapshotError) as error:
        snap.check_disks(saved, config_with(DiskSpec(copy, "xvda")), "vm.snap")
    assert "disk xvda: " in one_line(error) and "not the image the snapshot was taken with" in str(error.value)

    os.truncate(copy, 32 << 20)
    with pytest.raises(SnapshotError) as error:
        snap.check_disks(saved, config_with(DiskSpec(copy, "xvda")), "vm.snap")
    assert f"has {32 << 20} bytes; the guest's had {64 << 20}" in one_line(error)


def test_the_disks_must_be_the_same_set(image):
    saved = snap.disk_identities(config_with(DiskSpec(image, "xvda")))
    with pytest.raises(SnapshotError) as error:
        snap.check_disks(saved, config_with(DiskSpec(image, "xvdb")), "vm.snap")
    assert "the guest had disk(s) xvda; this VM is given xvdb" in one_line(error)
    with pytest.raises(SnapshotError) as error:
        snap.check_disks(saved, config_with(), "vm.snap")
    assert "this VM is given none" in one_line(error)
    with pytest.raises(SnapshotError) as error:
        snap.check_disks(saved, config_with(DiskSpec(image, "xvda", readonly=True)), "vm.snap")
    assert "was writable" in one_line(error)


def test_nics_keep_the_macs_the_guest_knows():
    config = config_with(parse_net_option("tap=tap0", 0), parse_net_option("tap=tap1,mac=00:16:3e:00:00:01", 1))
    saved = snap.nic_identities(config)
    assert saved == [{"index": 0, "mac": generated_mac("vm", 0)}, {"index": 1, "mac": "00:16:3e:00:00:01"}]
    # Restored under another name, on other TAPs: the MACs stay.
    nics = snap.restored_nics(saved, (parse_net_option("tap=tap7", 0), parse_net_option("tap=tap8", 1)), "vm.snap")
    assert [nic.mac for nic in nics] == [generated_mac("vm", 0), "00:16:3e:00:00:01"]
    assert [nic.tap for nic in nics] == ["tap7", "tap8"]
    with pytest.raises(SnapshotError) as error:
        snap.restored_nics(saved, (parse_net_option("tap=tap7", 0),), "vm.snap")
    assert "the guest had 2 NIC(s); this VM is given 1" in one_line(error)
    with pytest.raises(SnapshotError) as error:
        snap.restored_nics(saved[:1], (parse_net_option("tap=tap7,mac=00:16:3e:99:99:99", 0),), "vm.snap")
    assert "had MAC" in one_line(error)


def test_a_restored_config_takes_the_snapshots_shape_and_the_restores_own_settings(image, tmp_path):
    original = VmConfig(kernel=Path("/boot/vmlinuz"), initrd=Path("/boot/initrd"), cmdline="console=hvc0",
                        memory=1 << 30, vcpus=2, xen_version=(4 << 16) | 19, name="base",
                        limits=VmConfig.limits_from({"xenstore-nodes": 300}),
                        devices=(DiskSpec(image, "xvda"), parse_net_option("tap=tap0", 0)))
    state = {"config": snap.config_state(original)}
    header = {"disks": snap.disk_identities(original), "nics": snap.nic_identities(original)}
    restore = VmConfig(kernel=Path("/ignored"), name="copy1", timeout=30.0,
                       devices=(parse_net_option("tap=tap9", 0),))
    config = snap.restored_config("vm.snap", header, state, restore, given_kinds={"net"})
    assert (config.kernel, config.initrd, config.cmdline) == (Path("/boot/vmlinuz"), Path("/boot/initrd"),
                                                              "console=hvc0")
    assert (config.memory, config.vcpus, config.xen_version) == (1 << 30, 2, (4 << 16) | 19)
    assert config.limits.xenstore_nodes == 300
    assert (config.name, config.timeout) == ("copy1", 30.0)
    disks, nics = config.devices_of("blk"), config.devices_of("net")
    assert [(d.path, d.vdev) for d in disks] == [(image, "xvda")]  # not given: the snapshot's
    assert [(n.tap, n.mac) for n in nics] == [("tap9", generated_mac("base", 0))]  # given: its own, the old MAC


def test_a_restored_firmware_boot_keeps_its_firmware_cdrom_and_boot_order(image, tmp_path):
    original = VmConfig(kernel=None, xen=False, firmware=Path("/fw/bios.bin"), cdrom=Path("/cd.iso"), boot="cdrom",
                        devices=(DiskSpec(image, "xvda"),))
    state = {"config": snap.config_state(original)}
    config = snap.restored_config("vm.snap", {"disks": [], "nics": []}, state,
                                  VmConfig(kernel=Path("/ignored"), name="copy"), given_kinds=set())
    assert config.firmware_boot and config.kernel is None
    assert (config.firmware, config.cdrom, config.boot) == (Path("/fw/bios.bin"), Path("/cd.iso"), "cdrom")
    kernel_boot = snap.saved_boot(snap.config_state(VmConfig(kernel=Path("/boot/vmlinuz"))))
    assert kernel_boot == {"kernel": Path("/boot/vmlinuz"), "firmware": None, "cdrom": None, "boot": None}


def test_shape_options_are_refused_with_restore():
    snap.refuse_shape_options({"--memory": False, "--kernel": False})
    with pytest.raises(ConfigError, match="--memory, --vcpus cannot be given with --restore"):
        snap.refuse_shape_options({"--memory": True, "--vcpus": True, "--kernel": False})


def test_a_snapshot_of_an_unknown_device_kind_is_refused():
    with pytest.raises(SnapshotError, match="kind 'floppy'"):
        snap.saved_devices({"devices": [{"kind": "floppy", "option": "a.img"}]})


class HoldingPart:
    """A part that keeps something still after save_state() (as the Xen domain's disks do)."""

    def __init__(self):
        self.resumed = 0

    def resume_after_save(self):
        self.resumed += 1


def test_a_part_held_for_the_save_is_resumed_unless_the_vm_stops(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from pyvmm.core.snapfile import Written

    part = HoldingPart()

    def capture(machine, saved):
        saved.append(part)
        return {}, {}

    written = []
    monkeypatch.setattr(snap, "capture", capture)
    monkeypatch.setattr(snap, "write_snapshot", lambda fd, header, state, memory: written.append(fd) or Written(1, 0, 0))
    machine = SimpleNamespace(pause_for_snapshot=lambda: None, memory=None)
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        snap.take(machine, fd)
        assert part.resumed == 1  # the VM goes on
        snap.take(machine, fd, stopping=True)
        assert part.resumed == 1  # the VM stops: nothing to resume

        def fail(*args):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(snap, "write_snapshot", fail)
        with pytest.raises(OSError):
            snap.take(machine, fd, stopping=True)
        assert part.resumed == 2  # a failed snapshot: the VM goes on as it was
    finally:
        os.close(fd)


def test_no_snapshot_while_a_vcpu_waits_for_the_event_thread_in_a_soft_reset():
    # The snapshot runs on the event thread, which that vCPU's hypercall
    # waits for: waiting for the vCPU in turn would stall both.
    from types import SimpleNamespace

    def read_vcpus():
        raise AssertionError("a vCPU was asked for its state")

    machine = SimpleNamespace(paused=True, config=VmConfig(kernel=Path("/nonexistent")), stateful_parts=dict,
                              vcpu_capabilities=read_vcpus, xen=SimpleNamespace(vcpu_waiting_for_event_thread=True))
    with pytest.raises(SnapshotError, match="soft reset"):
        snap.capture(machine)
