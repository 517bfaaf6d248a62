"""A PVH-entry ELF kernel of our own (firmware/pvh-test) boots on this host's KVM.

It is tiny, so it runs even on a software-only /dev/kvm: it checks the
hvm_start_info magic, prints the command line and memory map size on COM1
and powers off through the ACPI PM1a control register.
"""

import os
import subprocess

import pytest

from vmm import REPO, run_pyvmm

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm on this host")


@pytest.fixture(scope="module")
def pvh_kernels(tmp_path_factory):
    out = tmp_path_factory.mktemp("pvh")
    subprocess.run(["bash", str(REPO / "firmware/pvh-test/build.sh"), str(out)], check=True, capture_output=True)
    # The 32-bit ELF relabelled EM_386, as i386 PVH kernels (XTF's 32-bit tests) come.
    image = (out / "pvh-test.elf32").read_bytes()
    (out / "pvh-test.i386").write_bytes(image[:18] + (3).to_bytes(2, "little") + image[20:])
    return {"elf64": out / "pvh-test.elf64", "elf32": out / "pvh-test.elf32", "i386": out / "pvh-test.i386"}


@pytest.mark.parametrize("variant", ["elf64", "elf32", "i386"])
def test_pvh_kernel_boots_prints_and_powers_off(pvh_kernels, variant):
    result = run_pyvmm("run", "--no-xen", "--kernel", str(pvh_kernels[variant]), "--append", "console=ttyS0 marker=42", timeout=120)
    assert result.status == 0, str(result)
    assert "pyvmm-pvh-test: magic ok" in result.stdout, str(result)
    assert "cmdline: console=ttyS0 marker=42" in result.stdout, str(result)
    # 512 MiB guest: RAM below the EBDA, the reserved BIOS area, RAM from 1 MiB, Xen's special pages.
    assert "memmap entries: 4" in result.stdout, str(result)


def test_expect_pattern_stops_the_guest_with_status_0(pvh_kernels):
    result = run_pyvmm("run", "--no-xen", "--kernel", str(pvh_kernels["elf64"]), "--expect", r"magic (ok|bad)", timeout=120)
    assert result.status == 0, str(result)
    assert "magic ok" in result.stdout


def test_guest_ending_without_expect_pattern_gives_5(pvh_kernels):
    result = run_pyvmm("run", "--no-xen", "--kernel", str(pvh_kernels["elf64"]), "--expect", "never printed", timeout=120)
    assert result.status == 5, str(result)


def test_serial_to_file(pvh_kernels, tmp_path):
    log = tmp_path / "console.log"
    result = run_pyvmm("run", "--no-xen", "--kernel", str(pvh_kernels["elf32"]), "--serial", f"file:{log}", timeout=120)
    assert result.status == 0, str(result)
    assert "magic ok" in log.read_text()
    assert "magic ok" not in result.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--kernel", "/nonexistent/vmlinuz"], "is not a readable file"),
        (["--kernel", "{garbage}"], "cannot boot the kernel"),
        (["--kernel", "{elf64}", "--memory", "8M"], "too little"),
        (["--kernel", "{elf64}", "--memory", "lots"], "not a size"),
        (["--kernel", "{elf64}", "--vcpus", "0"], "--vcpus"),
        (["--kernel", "{elf64}", "--serial", "tcp:1"], "--serial"),
        (["--kernel", "{elf64}", "--initrd", "/nonexistent"], "initrd"),
    ],
)
def test_bad_command_lines_fail_with_one_clear_line(pvh_kernels, tmp_path, args, message):
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x7fELF not really" + bytes(600))
    args = [a.format(garbage=garbage, elf64=pvh_kernels["elf64"]) for a in args]
    result = run_pyvmm("run", "--no-xen", *args, timeout=60)
    assert result.status == 1, str(result)
    assert message in result.stderr, str(result)
    assert "Traceback" not in result.stderr, str(result)


def test_xen_on_a_host_without_kvm_xen_names_what_is_missing(pvh_kernels):
    from pyvmm.hostcheck import probe

    if probe().can_run_xen:
        pytest.skip("this host's KVM supports Xen")
    result = run_pyvmm("run", "--xen", "--kernel", str(pvh_kernels["elf64"]), timeout=60)
    assert result.status == 1, str(result)
    assert "KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL" in result.stderr, str(result)
    assert "scripts/testbed" in result.stderr, str(result)
    assert "Traceback" not in result.stderr, str(result)
