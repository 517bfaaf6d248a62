"""A Debian bookworm disk image boots the way a Xen HVM guest's image does:
SeaBIOS from the emulated IDE disk, GRUB on the serial console, Debian's
kernel and initramfs finding root by UUID, systemd to multi-user.

With its PV drivers Linux unplugs the emulated disk and root is on
xen-blkfront (/dev/xvda1); with them blacklisted (and the unplug turned
off, without which Linux would unplug the disk anyway) root stays on the
emulated disk through ata_piix (/dev/sda1).

The image is scripts/guest-image's, built on the host beforehand (the
testbed has no network): PYVMM_GUEST_IMAGE names it. Each test boots a
sparse copy whose grubenv picks GRUB's menu entry; the image's pyvmm-check
service prints where root is, records the boot in a file that the test
reads back from the copy, and powers the machine off.
"""

from __future__ import annotations

import os
import shutil

import pytest

from guest_image import (CHECK_FILE, HOTKEY_CHECK, HOTKEY_EMULATED_DISK, MARKER_POWERING_OFF,
                         GuestImageUnavailable, check_report, choose_entry, guest_image_copy,
                         read_image_file)
from vmm import BOOT_TIMEOUT, run_pyvmm

pytestmark = [pytest.mark.guest, pytest.mark.xen, pytest.mark.slow]

FIRMWARE = "/usr/share/seabios/bios-256k.bin"
UNPLUGGED = "emulated IDE disk 0 unplugged"


@pytest.fixture
def disk(tmp_path):
    """A private copy of the image, removed afterwards: the testbed's /tmp is
    in its RAM, and the copy holds about 400 MB."""
    from pyvmm.hostcheck import probe

    report = probe()
    if not report.can_run_xen:
        pytest.skip(f"this host's KVM cannot run Xen guests (missing {report.missing_xen or 'hardware virtualization'})")
    if not os.path.exists(FIRMWARE):
        pytest.skip(f"{FIRMWARE} is missing: apt-get install seabios")
    if shutil.which("debugfs") is None:
        pytest.skip("debugfs is missing: apt-get install e2fsprogs")
    try:
        copy = guest_image_copy(tmp_path)
    except GuestImageUnavailable as error:
        pytest.skip(f"no Debian disk image ({error}); build it on the host with scripts/guest-image "
                    f"and export PYVMM_GUEST_IMAGE=$(scripts/guest-image --print-path)")
    # A record from an earlier boot would prove nothing about this one.
    with pytest.raises(FileNotFoundError):
        read_image_file(copy, CHECK_FILE)
    yield copy
    copy.unlink(missing_ok=True)


def boot(disk, hotkey):
    """Boot `disk` through the firmware with GRUB's entry `hotkey`; the
    result and the check's report (None if it never printed one)."""
    choose_entry(disk, hotkey)
    result = run_pyvmm("run", str(disk), "--memory", "1G", "--no-reboot", "--timeout", str(BOOT_TIMEOUT), "-v",
                       timeout=BOOT_TIMEOUT + 120)
    out = result.stdout
    assert "Booting from Hard Disk" in out, result  # SeaBIOS, on COM1
    assert f"pyvmm-image: entry pyvmm-{hotkey} from grubenv" in out, result  # GRUB read the copy's grubenv
    return result, check_report(out)


def recorded(disk, report) -> dict[str, str]:
    """The check's file, read from the image on the host after the run; it
    must be this boot's (same boot id as on the console)."""
    lines = read_image_file(disk, CHECK_FILE).decode().splitlines()
    record = dict(line.split("=", 1) for line in lines[1:] if "=" in line)
    assert record.get("boot_id") == report["boot_id"], lines
    assert lines[0].startswith(f"root={report['root']} "), lines
    return record


def test_root_is_on_xen_blkfront_after_the_unplug(disk):
    result, report = boot(disk, HOTKEY_CHECK)
    assert report is not None, str(result)
    assert report["root"] == "/dev/xvda1", str(result)
    assert report["fstype"] == "ext4", str(result)
    disks = report["disks"].split(",")
    assert "xvda" in disks and not any(name.startswith(("sd", "hd")) for name in disks), str(result)
    assert "xen_blkfront" in report["drivers"].split(","), str(result)
    assert report["hypervisor"] == "xen", str(result)
    assert report["multi-user"] == "active", str(result)
    # Linux's Xen platform code wrote the unplug mask before its ATA drivers probed.
    assert UNPLUGGED in result.stderr, str(result)
    assert MARKER_POWERING_OFF in result.stdout, str(result)
    assert result.status == 0, result  # the guest's own ACPI power-off

    cmdline = recorded(disk, report)["cmdline"].split()
    assert any(word.startswith("root=UUID=") for word in cmdline), cmdline  # GRUB's, root by UUID
    assert "pyvmm.check=poweroff" in cmdline and "xen_emul_unplug=never" not in cmdline, cmdline


def test_root_is_on_the_emulated_disk_with_the_pv_drivers_blacklisted(disk):
    result, report = boot(disk, HOTKEY_EMULATED_DISK)
    assert report is not None, str(result)
    assert report["root"] == "/dev/sda1", str(result)
    assert report["fstype"] == "ext4", str(result)
    disks = report["disks"].split(",")
    assert "sda" in disks and not any(name.startswith("xvd") for name in disks), str(result)
    drivers = report["drivers"].split(",")
    assert "ata_piix" in drivers and "xen_blkfront" not in drivers, str(result)
    assert report["hypervisor"] == "xen", str(result)
    assert report["multi-user"] == "active", str(result)
    assert UNPLUGGED not in result.stderr, str(result)
    assert MARKER_POWERING_OFF in result.stdout, str(result)
    assert result.status == 0, str(result)

    cmdline = recorded(disk, report)["cmdline"].split()
    assert any(word.startswith("root=UUID=") for word in cmdline), cmdline
    assert "xen_emul_unplug=never" in cmdline, cmdline
    assert any(word.startswith("modprobe.blacklist=") and "xen_blkfront" in word for word in cmdline), cmdline
