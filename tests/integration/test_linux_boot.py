"""Debian's cloud kernel boots on pyvmm without Xen (the foundation's acceptance tests).

Each test boots the real kernel with the project's initramfs and a /test.sh
of its own, and checks what a CI system would: the console and the status.
"""

from __future__ import annotations

import pytest

from initrd import GuestAssetsUnavailable, guest_assets, make_test_initrd
from vmm import require_linux_kvm, run_pyvmm

pytestmark = pytest.mark.guest

# quiet: the kernel's own log would go out byte by byte through the emulated
# UART (an exit to pyvmm per byte), tens of seconds per boot in the testbed; the
# tests read /test.sh's output, which quiet does not hold back.
CMDLINE = "console=ttyS0 panic=-1 quiet"
BOOT_TIMEOUT = 900  # generous: in the nested testbed a boot takes tens of seconds


@pytest.fixture(scope="module")
def assets():
    require_linux_kvm()
    try:
        return guest_assets()
    except GuestAssetsUnavailable as error:
        pytest.skip(str(error))


def boot(assets, tmp_path, script: str, *extra: str, timeout: float = BOOT_TIMEOUT):
    initrd = make_test_initrd(assets["initramfs"], tmp_path / "initrd", script)
    return run_pyvmm(
        "run", "--no-xen", "--kernel", str(assets["vmlinuz"]), "--initrd", str(initrd), "--append", CMDLINE, *extra,
        timeout=timeout,
    )


def test_two_vcpus_boot_to_userspace_and_expect_stops_the_guest_with_status_0(assets, tmp_path):
    script = 'echo "cpus=$(grep -c ^processor /proc/cpuinfo)"\necho "expect-me-$((40 + 2))"\nwhile :; do sleep 1; done\n'
    result = boot(assets, tmp_path, script, "--vcpus", "2", "--expect", r"expect-me-42", "--timeout", "600")
    assert result.status == 0, str(result)
    assert "pyvmm-guest: init started" in result.stdout, str(result)
    assert "cpus=2" in result.stdout, str(result)
    assert "expect-me-42" in result.stdout, str(result)


def test_reboot_under_no_reboot_gives_status_2(assets, tmp_path):
    result = boot(assets, tmp_path, "echo rebooting-now\nreboot -f\n", "--no-reboot")
    assert result.status == 2, str(result)
    assert "rebooting-now" in result.stdout, str(result)


def test_power_off_without_the_expected_line_gives_status_5(assets, tmp_path):
    result = boot(assets, tmp_path, "echo something-else\npoweroff -f\n", "--expect", "never-printed", "--no-reboot")
    assert result.status == 5, str(result)
    assert "something-else" in result.stdout


# --timeout's status 124 (and its last log of where each vCPU was) is
# tested with a small guest on any KVM: test_stops_host.py.
