"""scripts/xtf's test selection, classification and regression check (pure logic: no guests, no KVM)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

from benchlib import load_script  # noqa: E402

xtf = load_script("xtf")

CONSOLE_OK = """--- Xen Test Framework ---
Environment: HVM 64bit (Long mode 4 levels)
Hello World
Test result: SUCCESS
"""


def test_discover_finds_each_variant(tmp_path):
    for name, variants in {"example": ["hvm64", "hvm32", "hvm32pae"], "fep": ["hvm32"]}.items():
        (tmp_path / "tests" / name).mkdir(parents=True)
        for variant in variants:
            (tmp_path / "tests" / name / f"test-{variant}-{name}").write_bytes(b"\x7fELF")
    (tmp_path / "tests" / "example" / "info.json").write_text("{}")
    ids = [t["id"] for t in xtf.discover(tmp_path)]
    assert ids == ["test-hvm64-example", "test-hvm32pae-example", "test-hvm32-example", "test-hvm32-fep"]
    assert {t["variant"] for t in xtf.discover(tmp_path)} == {"hvm64", "hvm32pae", "hvm32"}


@pytest.mark.parametrize("patterns, test_id, expected", [
    ([], "test-hvm64-example", True),
    (["example"], "test-hvm64-example", True),
    (["hvm32-*"], "test-hvm32-example", True),
    (["hvm32-*"], "test-hvm32pae-example", False),
    (["test-hvm64-xsa-*"], "test-hvm64-xsa-122", True),
    (["xsa-1*", "fep"], "test-hvm32-fep", True),
    (["msr"], "test-hvm64-example", False),
    (["cpuid"], "test-hvm64-cpuid-faulting", True),
    (["test-hvm64-cpuid"], "test-hvm64-cpuid-faulting", False),
    (["test-hvm64-cpuid"], "test-hvm64-cpuid", True),
    (["test-hvm32*-cpuid"], "test-hvm32pae-cpuid", True),
])
def test_patterns(patterns, test_id, expected):
    assert xtf.matches(test_id, patterns) is expected


def test_result_line_wins():
    assert xtf.classify("pyvmm", 0, CONSOLE_OK, "") == {"result": "SUCCESS", "reason": ""}
    # Even when the VMM's status says something else afterwards.
    assert xtf.classify("qemu", 124, CONSOLE_OK, "")["result"] == "SUCCESS"


def test_failure_reason_is_the_last_lines_before_the_result_without_repeats():
    console = ("--- Xen Test Framework ---\nEnvironment: HVM 32bit (No paging)\nA title\n"
               "Fail: vector 13 expected\nFail: vector 13 expected\nFail: got #PF\n"
               "Test result: FAILURE\n\nTest result: FAILURE\n")
    verdict = xtf.classify("pyvmm", 0, console, "")
    assert verdict == {"result": "FAILURE", "reason": "Fail: vector 13 expected | Fail: got #PF"}


def test_flagged_lines_are_preferred_and_the_title_is_left_out():
    console = ("Environment: HVM 64bit\nXTF Selftests\nTest: one\nFail: xtf_init_grant_table(1) returned -5\n"
               "Test: two\nTest result: FAILURE\n")
    assert xtf.classify("pyvmm", 0, console, "")["reason"] == "Fail: xtf_init_grant_table(1) returned -5"
    console = "Environment: HVM 32bit\nTest availability of HVM forced emulation prefix\nTest result: FAILURE\n"
    assert xtf.classify("qemu", 0, console, "")["reason"] == "(no message from the test)"


def test_skip_keeps_its_reason():
    verdict = xtf.classify("qemu", 0, "Environment: HVM\nFEP test\nSkip: no FEP support\nTest result: SKIP\n", "")
    assert verdict == {"result": "SKIP", "reason": "Skip: no FEP support"}


def test_timeout_crash_and_refused():
    assert xtf.classify("pyvmm", 124, "Environment: HVM\nstarting\n", "")["result"] == "TIMEOUT"
    assert xtf.classify("pyvmm", 0, "", "", stopped="limit")["result"] == "TIMEOUT"
    refused = xtf.classify("pyvmm", 1, "", "pyvmm: cannot boot the kernel: ELF kernel is for EM_386\n")
    assert refused == {"result": "REFUSED", "reason": "pyvmm: cannot boot the kernel: ELF kernel is for EM_386"}
    refused = xtf.classify("qemu", 1, "", "qemu-system-x86_64: -kernel x: bad\n")
    assert refused["result"] == "REFUSED" and "bad" in refused["reason"]
    crash = xtf.classify("pyvmm", 3, "****\nPANIC: PANIC: Unhandled exception at 0008:00101234\n****\n", "")
    assert crash == {"result": "CRASH", "reason": "the guest crashed; PANIC: Unhandled exception at 0008:00101234"}
    assert xtf.classify("pyvmm", 6, "Environment: HVM\n", "")["reason"].startswith("the guest triple-faulted")
    assert xtf.classify("pyvmm", 0, "Environment: HVM\n", "")["result"] == "CRASH"


def test_reasons_are_bounded():
    verdict = xtf.classify("pyvmm", 0, "x" * 5000 + "\nTest result: ERROR\n", "")
    assert verdict["result"] == "ERROR" and len(verdict["reason"]) <= xtf.REASON_CHARS


def entry(result, reason=""):
    return {"pyvmm": {"result": result, "reason": reason}}


def test_compare_flags_only_worse_results():
    expected = {"a": "SUCCESS", "b": "SKIP", "c": "FAILURE", "d": "CRASH", "e": "SUCCESS", "f": "SUCCESS",
                "g": "FAILURE", "not-run": "SUCCESS"}
    results = {"a": entry("SUCCESS"), "b": entry("SUCCESS"), "c": entry("TIMEOUT", "no result"),
               "d": entry("FAILURE"), "e": entry("SKIP"), "f": entry("REFUSED", "pyvmm: no"),
               "g": entry("ERROR")}
    regressions, changes = xtf.compare(expected, results)
    assert regressions == ["c: expected FAILURE, got TIMEOUT (no result)", "e: expected SUCCESS, got SKIP",
                           "f: expected SUCCESS, got REFUSED (pyvmm: no)"]
    assert changes == ["b: expected SKIP, got SUCCESS", "d: expected CRASH, got FAILURE",
                       "g: expected FAILURE, got ERROR"]


def test_markdown_table_lists_reasons_for_non_passing_results():
    report = {"xtf_commit": "453490d", "date": "2026-01-01T00:00:00+00:00", "commit": "abc", "qemu_version": "QEMU 10",
              "timeout": 30.0, "command": "scripts/xtf", "vmms": ["pyvmm", "qemu"],
              "results": {"test-hvm64-example": {"pyvmm": {"result": "SUCCESS", "reason": ""},
                                                 "qemu": {"result": "SUCCESS", "reason": ""}},
                          "test-hvm32-fep": {"pyvmm": {"result": "FAILURE", "reason": "Fail: a|b"},
                                             "qemu": {"result": "SKIP", "reason": "Skip: no FEP"}}}}
    table = xtf.markdown(report)
    assert "| test-hvm64-example | SUCCESS | SUCCESS |  |" in table
    assert "| test-hvm32-fep | FAILURE | SKIP | pyvmm: Fail: a\\|b |" in table
    assert "- pyvmm: SUCCESS 1, FAILURE 1 (of 2)" in table


def test_committed_expected_list_is_well_formed():
    path = REPO / "tests" / "xtf" / "expected.json"
    data = json.loads(path.read_text())
    assert data["pyvmm"] and set(data["pyvmm"].values()) <= set(xtf.RANK)
    assert all(name.startswith("test-hvm") for name in data["pyvmm"])
    assert set(data["fast"]) <= set(data["pyvmm"])


def test_bad_arguments():
    with pytest.raises(SystemExit):
        xtf.parse_args(["-j", "4"])
    with pytest.raises(SystemExit):
        xtf.parse_args(["--vmm", "xen"])
    assert xtf.parse_args(["--vmm", "qemu", "-j", "1"]).vmms == ["qemu"]


def test_a_run_reusing_qemu_results_writes_the_report_and_checks_expected(tmp_path, monkeypatch):
    for name in ("example", "fep"):
        (tmp_path / "xtf" / "tests" / name).mkdir(parents=True)
        (tmp_path / "xtf" / "tests" / name / f"test-hvm64-{name}").write_bytes(b"\x7fELF")
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"date": "then", "commit": "c0ffee", "results": {
        "test-hvm64-example": {"qemu": {"result": "SUCCESS", "reason": ""}},
        "test-hvm64-fep": {"qemu": {"result": "FAILURE", "reason": "no FEP"}}}}))
    expected = tmp_path / "expected.json"
    expected.write_text(json.dumps({"pyvmm": {"test-hvm64-example": "SUCCESS", "test-hvm64-fep": "SKIP"}}))
    ran = []

    def fake_run(vmm, test, timeout, logs):
        ran.append((vmm, test["id"]))
        return {"result": "SUCCESS" if "example" in test["id"] else "FAILURE", "reason": "", "wall_s": 1.0}

    monkeypatch.setattr(xtf, "can_run_xen_here", lambda: True)
    monkeypatch.setattr(xtf, "byte_compile_pyvmm", lambda: None)
    monkeypatch.setattr(xtf, "run_one", fake_run)
    out = tmp_path / "out"
    args = ["--xtf-dir", str(tmp_path / "xtf"), "--out", str(out), "--vmm", "pyvmm", "--reuse", f"qemu={earlier}",
            "--expected", str(expected), "--write-expected", str(tmp_path / "new.json")]
    assert xtf.main(args) == 1  # fep: SKIP expected, FAILURE now
    assert sorted(ran) == [("pyvmm", "test-hvm64-example"), ("pyvmm", "test-hvm64-fep")]
    report = json.loads((out / "xtf.json").read_text())
    assert report["vmms"] == ["pyvmm", "qemu"] and report["reused"]["qemu"]["commit"] == "c0ffee"
    assert report["results"]["test-hvm64-fep"]["qemu"]["reason"] == "no FEP"
    assert "QEMU's results are those of an earlier run (then, pyvmm commit c0ffee)." in (out / "xtf.md").read_text()
    written = json.loads((tmp_path / "new.json").read_text())["pyvmm"]
    assert written == {"test-hvm64-example": "SUCCESS", "test-hvm64-fep": "FAILURE"}


def test_logs_are_read_back_and_a_cut_short_run_resumes(tmp_path, monkeypatch):
    (tmp_path / "xtf" / "tests" / "example").mkdir(parents=True)
    for variant in ("hvm64", "hvm32"):
        (tmp_path / "xtf" / "tests" / "example" / f"test-{variant}-example").write_bytes(b"\x7fELF")
    out = tmp_path / "out"
    (out / "logs" / "pyvmm").mkdir(parents=True)
    (out / "logs" / "pyvmm" / "test-hvm64-example.log").write_text(
        "$ python3 -m pyvmm run --xen --kernel k\n--- console\nEnvironment: HVM\nExample\nFail: x\n"
        "Test result: FAILURE\n\n--- stderr\npyvmm: WARNING: something\n\n--- status 0, 12.5 s, FAILURE\n")
    ran = []
    monkeypatch.setattr(xtf, "can_run_xen_here", lambda: True)
    monkeypatch.setattr(xtf, "byte_compile_pyvmm", lambda: None)
    monkeypatch.setattr(xtf, "run_one", lambda vmm, test, timeout, logs: ran.append(test["id"]) or
                        {"result": "SUCCESS", "reason": "", "wall_s": 1.0})
    assert xtf.main(["--xtf-dir", str(tmp_path / "xtf"), "--out", str(out), "--vmm", "pyvmm", "--resume"]) == 0
    assert ran == ["test-hvm32-example"]
    report = json.loads((out / "xtf.json").read_text())
    assert report["complete"] and report["results"]["test-hvm64-example"]["pyvmm"]["reason"] == "Fail: x"
    assert report["results"]["test-hvm64-example"]["pyvmm"]["wall_s"] == 12.5
    ran.clear()
    assert xtf.main(["--xtf-dir", str(tmp_path / "xtf"), "--out", str(tmp_path / "again"), "--vmm", "pyvmm",
                     "--from-logs", str(out / "logs")]) == 0
    assert ran == []
    assert list(json.loads((tmp_path / "again" / "xtf.json").read_text())["results"]["test-hvm32-example"]) == []
