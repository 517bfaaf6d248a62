"""Firmware boot: SeaBIOS from Debian's package boots a partitioned disk image
through GRUB (on the serial line) to Linux, from pyvmm's emulated IDE disk;
the guest's PV drivers unplug that disk. GRUB's menu waits on the serial
console until a key picks its entry, as for an operator at `--serial stdio`.
A disk with nothing to boot ends the run with one clear line.

The image is made here (disk_image.py: MBR, ext2, GRUB for BIOS) around the
guest assets' kernel and an initramfs whose /test.sh prints a marker.
"""

from __future__ import annotations

import time

import pytest

from disk_image import DiskToolsMissing, make_grub_disk
from initrd import make_test_initrd
from vmm import LiveGuest, run_pyvmm, xen_guest_assets

# slow until its time in the testbed is measured (CI runs guest tests that
# are not slow; PYVMM_SLOW_TESTS=1 runs these too).
pytestmark = [pytest.mark.guest, pytest.mark.xen, pytest.mark.slow]

FIRMWARE = "/usr/share/seabios/bios-256k.bin"
TEST_SCRIPT = """
echo "firmware-boot: cmdline $(cat /proc/cmdline)"
grep -q marker=fw42 /proc/cmdline
"""


@pytest.fixture(scope="module")
def assets():
    return xen_guest_assets()


@pytest.fixture
def firmware():
    import os

    if not os.path.exists(FIRMWARE):
        pytest.skip(f"{FIRMWARE} is missing: apt-get install seabios")


def test_seabios_and_grub_boot_linux_from_the_image(tmp_path, assets, firmware):
    initrd = make_test_initrd(assets["initramfs"], tmp_path / "initrd", TEST_SCRIPT)
    try:
        disk = make_grub_disk(tmp_path / "disk.img", assets["vmlinuz"], initrd,
                              "console=ttyS0 panic=-1 marker=fw42", title="pyvmm firmware test")
    except DiskToolsMissing as error:
        pytest.skip(str(error))
    result = run_pyvmm("run", "--disk", str(disk), "--no-reboot", "--timeout", "300", "-v", timeout=400)
    assert result.status == 0, str(result)
    out = result.stdout
    assert "Booting from Hard Disk" in out, result  # SeaBIOS, on COM1
    assert "pyvmm firmware test" in out and "pyvmm-disk: loading the kernel" in out, result  # GRUB's menu
    assert "pyvmm-guest: test exit 0" in out, str(result)
    assert "firmware: SeaBIOS (version" in result.stderr, result  # its debug port, in the log
    # Linux's Xen platform code unplugs the emulated disk once PV drivers can take over.
    assert "emulated IDE disk 0 unplugged" in result.stderr, str(result)


def test_the_grub_menu_waits_on_the_serial_console_until_a_key_picks_the_entry(tmp_path, assets, firmware):
    initrd = make_test_initrd(assets["initramfs"], tmp_path / "initrd", TEST_SCRIPT)
    try:
        disk = make_grub_disk(tmp_path / "disk.img", assets["vmlinuz"], initrd,
                              "console=ttyS0 panic=-1 marker=fw42", title="pyvmm menu test", timeout=-1)
    except DiskToolsMissing as error:
        pytest.skip(str(error))
    with LiveGuest(["run", "--disk", str(disk), "--no-reboot", "--timeout", "400", "-v"]) as guest:
        guest.wait_for("pyvmm menu test", timeout=300)  # the menu, on COM1
        time.sleep(5)  # no timeout: GRUB waits for the operator
        assert "pyvmm-disk: loading the kernel" not in guest.stdout, str(guest)
        guest.send(b"\r")  # Enter, typed on pyvmm's stdin: the serial console
        guest.wait_for("pyvmm-disk: loading the kernel", timeout=120)
        guest.wait_for("pyvmm-guest: test exit 0", timeout=300)
        assert guest.finish() == 0, str(guest)


def test_a_disk_with_nothing_to_boot_fails_with_one_line(tmp_path, assets, firmware):
    disk = tmp_path / "blank.img"
    disk.write_bytes(bytes(1 << 20))
    result = run_pyvmm("run", "--disk", str(disk), "--timeout", "120", timeout=200)
    assert result.status == 1, str(result)
    assert "the firmware found nothing to boot" in result.stderr, str(result)
