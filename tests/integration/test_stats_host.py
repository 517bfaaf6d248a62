"""`pyvmm run --stats` on this host's KVM, with our PVH test kernel: the kinds
of exits it makes are counted where they happen (no timing is checked)."""

import json
import os
import re
import subprocess

import pytest

from vmm import REPO, run_pyvmm

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm on this host")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    out = tmp_path_factory.mktemp("pvh")
    subprocess.run(["bash", str(REPO / "firmware/pvh-test/build.sh"), str(out)], check=True, capture_output=True)
    return str(out / "pvh-test.elf64")


def stats_lines(stderr: str) -> list[str]:
    return [line[len("pyvmm: "):] for line in stderr.splitlines()
            if line.startswith("pyvmm:   ") or line.startswith("pyvmm: run statistics")]


def test_stats_count_the_serial_port_and_the_acpi_power_off(kernel, tmp_path):
    report_file = tmp_path / "stats.json"
    # Under the sandbox (the default as root): the JSON file is opened before the lockdown.
    result = run_pyvmm("run", "--no-xen", "--kernel", kernel, "--append", "console=ttyS0", "--vcpus", "2",
                       "--timeout", "120", "--stats", "--stats-json", str(report_file), timeout=300)
    assert result.status == 0, str(result)
    lines = stats_lines(result.stderr)
    assert lines[0] == "run statistics (--stats):", str(result)
    assert re.fullmatch(r"  start-up \(process start to first KVM_RUN\): \d+\.\d ms .*", lines[1]), lines
    assert re.fullmatch(r"  vCPU 0: \d+\.\d ms in KVM_RUN, \d+\.\d ms in the VMM .*; \d+ exits, \d+ KVM_RUNs", lines[2])
    assert lines[3].startswith("  vCPU 1: "), lines

    report = json.loads(report_file.read_text())
    counters = {(c["kind"], c["detail"]): c["count"] for c in report["counters"]}
    # Every byte the kernel printed is one OUT to COM1's data register.
    assert counters[("io", "COM1 0x3f8-0x3ff")] >= len(result.stdout.encode()), counters
    # It powers off by writing SLP_EN to the ACPI PM1a control register.
    assert counters[("io", "ACPI PM 0x600-0x60f")] >= 1, counters
    assert not any(kind == "hypercall" for kind, _ in counters), counters  # --no-xen
    assert report["startup_ns"] > 0
    # Each KVM_RUN ends in one exit, and without Xen every counter is an exit's.
    assert [v["kvm_runs"] for v in report["vcpus"]] == [v["exits"] for v in report["vcpus"]]
    assert sum(v["exits"] for v in report["vcpus"]) == sum(counters.values())
    # stderr's table is the JSON's, row for row.
    for c in report["counters"]:
        assert any(line.split()[:len(f"{c['kind']} {c['detail']}".split())] == f"{c['kind']} {c['detail']}".split()
                   and str(c["count"]) in line.split() for line in lines[4:]), (c, lines)


def test_without_stats_nothing_is_printed(kernel):
    result = run_pyvmm("run", "--no-xen", "--kernel", kernel, "--append", "console=ttyS0", "--timeout", "120",
                       timeout=300)
    assert result.status == 0, str(result)
    assert "run statistics" not in result.stderr and "KVM_RUN" not in result.stderr, str(result)


def test_stats_add_up_every_boot_of_the_run(kernel, tmp_path):
    report_file = tmp_path / "stats.json"
    # A triple fault resets the guest, which boots again: the pattern spans both boots.
    result = run_pyvmm("run", "--no-xen", "--kernel", kernel, "--append", "console=ttyS0 action=t",
                       "--timeout", "120", "--expect", r"(?s)triple fault.*magic ok.*triple fault",
                       "--stats-json", str(report_file), timeout=300)
    assert result.status == 0 and result.stdout.count("magic ok") == 2, str(result)
    assert "run statistics" not in result.stderr  # --stats-json alone prints nothing
    counters = {(c["kind"], c["detail"]): c["count"] for c in json.loads(report_file.read_text())["counters"]}
    assert counters[("triple-fault", "")] == 1, counters  # the first boot's
    # The same guest for one boot only (--no-reboot): it printed less, so it made fewer COM1 exits.
    one_boot = run_pyvmm("run", "--no-xen", "--kernel", kernel, "--append", "console=ttyS0 action=t",
                         "--timeout", "120", "--no-reboot", "--stats-json", str(report_file), timeout=300)
    assert one_boot.status == 6 and one_boot.stdout.count("magic ok") == 1, one_boot
    single = {(c["kind"], c["detail"]): c["count"] for c in json.loads(report_file.read_text())["counters"]}
    assert single[("triple-fault", "")] == 1, single
    assert counters[("io", "COM1 0x3f8-0x3ff")] > single[("io", "COM1 0x3f8-0x3ff")], (counters, single)
