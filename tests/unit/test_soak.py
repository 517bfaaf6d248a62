"""scripts/soak's schedule and boot classification (pure logic: no guests, no KVM)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests" / "integration"))

from benchlib import load_script  # noqa: E402
from initrd import reported_exit_status  # noqa: E402

soak = load_script("soak")

SHA_UP, SHA_DOWN = "a" * 64, "b" * 64


def clean_console(host_token="h1"):
    return "\n".join([
        "pyvmm-guest: init started",
        "soak: stage xenstore",
        "soak: xs domid=1 guest=g1",
        "soak: stage disk",
        "soak: disk verified",
        "soak: stage net",
        f"soak: net up sha={SHA_UP}",
        f"soak: net down sha={SHA_DOWN} bytes=4194304",
        "soak: stage xenstore-host",
        f"soak: xs host={host_token}",
        "soak: stage end",
        "pyvmm-guest: test exit 0",
    ])


def transfers(up=SHA_UP, down=SHA_DOWN):
    return {"guest->host": {"sha": up, "count": 4 << 20, "error": None},
            "host->guest": {"sha": down, "count": 4 << 20, "error": None}}


HOST_XS = {"started": True, "guest_key": "g1", "guest_key_ok": True, "host_key_written": True, "host_token": "h1"}


def boot(vmm="pyvmm", console=None, status=0, stopped=None, stderr="", testbed=None, **changes):
    console = clean_console() if console is None else console
    record = {"vmm": vmm, "status": status, "stopped": stopped, "stall_s": 120, "stderr": stderr,
              "test_exit": reported_exit_status(console), "last_stage": soak.last_stage(console),
              "testbed": testbed}
    record["problems"] = soak.guest_checks(vmm, console, changes.pop("transfers", transfers()),
                                           changes.pop("host_xs", HOST_XS if vmm == "pyvmm" else None))
    record.update(changes)
    return record


def test_a_boot_that_did_everything_is_clean():
    assert soak.classify(boot()) == ("clean", "")
    assert soak.classify(boot("qemu", host_xs=None)) == ("clean", "")


def test_a_silent_or_timed_out_boot_is_hung_and_names_its_last_stage():
    console = "pyvmm-guest: init started\nsoak: stage xenstore\nsoak: stage disk\n"
    kind, reason = soak.classify(boot(console=console, stopped="stall", status=0))
    assert kind == "hung" and "120" in reason and "disk" in reason
    assert soak.classify(boot(console=console, stopped="limit", status=-9))[0] == "hung"
    assert soak.classify(boot(console=console, status=124))[0] == "hung"
    traced = "pyvmm: ERROR: vcpu0: hypercall 0x18 failed\nTraceback (most recent call last):\n"
    kind, reason = soak.classify(boot(console=console, status=124, stderr=traced))
    assert kind == "hung" and reason.endswith("(and a traceback in the VMM's stderr)")
    kind, reason = soak.classify(boot(console=console, status=None, stopped="stall", unstoppable=True))
    assert kind == "hung" and reason.startswith("the VMM could not be stopped") and "disk" in reason


def test_the_soak_inside_stops_after_a_vmm_it_could_not_stop(tmp_path, monkeypatch):
    """Its threads are stuck in L1's kernel: no later boot there is worth counting."""
    plan = soak.schedule(3, ["pyvmm"], ["vcpu-vector"])
    records = iter([{"class": "clean", "reason": "", "seconds": 1.0, "unstoppable": False},
                    {"class": "hung", "reason": "the VMM could not be stopped", "seconds": 9.0, "unstoppable": True}])
    monkeypatch.setattr(soak, "boot_once", lambda entry, prepared, args, run_dir: dict(entry, **next(records)))
    monkeypatch.setattr(soak, "qemu_version", lambda: None)
    monkeypatch.setattr(soak, "pyvmm_location", lambda: "here")
    out = tmp_path / "boots.jsonl"
    assert soak.run_inside(SimpleNamespace(start=0), {}, plan, out) is False
    host, boots, started = soak.read_stream(out)
    assert [b["class"] for b in boots] == ["clean", "hung"] and started is None


def test_a_guest_stopped_for_a_vcpu_holding_state_not_its_own_is_hung_as_qemus_would_be():
    from pyvmm import diagnose
    assert soak.FOREIGN_CR3 == diagnose.FOREIGN_CR3
    stderr = ("pyvmm: WARNING: pyvmm.vmm.machine: vCPU 0 at rip=0xffffffffc03a80b0 with cr3=0x1011c8000 "
              f"({diagnose.FOREIGN_CR3}: ...)")
    kind, reason = soak.classify(boot(console="soak: stage disk\n", status=3, stderr=stderr))
    assert kind == "hung" and "not the guest's" in reason and "disk" in reason
    assert soak.classify(boot(status=3))[0] == "guest-failure"  # any other crash stays the guest's


def test_a_guest_restart_is_a_reset():
    console = "pyvmm-guest: init started\nsoak: stage disk\n"
    assert soak.classify(boot(console=console, status=2)) == ("reset", "the guest reset (status 2)")
    assert soak.classify(boot("qemu", console=console, status=2, host_xs=None))[0] == "reset"
    assert soak.classify(boot(console=console, status=6))[0] == "reset"


def test_a_vmm_that_fails_or_raises_is_a_vmm_error():
    assert soak.classify(boot(status=1)) == ("vmm-error", "the VMM exited with status 1")
    traceback = "Traceback (most recent call last):\n  File ...\nValueError: x\n"
    assert soak.classify(boot(stderr=traceback))[0] == "vmm-error"


def test_what_the_guest_got_wrong_is_a_guest_failure():
    checks = {
        "fio": boot(console=clean_console().replace("soak: disk verified", "soak-error: fio status 1")),
        "up": boot(transfers=transfers(up="c" * 64)),
        "down": boot(transfers=transfers(down="c" * 64)),
        "no connection": boot(transfers={"guest->host": {"sha": None, "count": 0, "error": "no connection"},
                                         "host->guest": transfers()["host->guest"]}),
        "host read": boot(host_xs=dict(HOST_XS, guest_key="other", guest_key_ok=False)),
        "guest read": boot(console=clean_console(host_token="none")),
        "never reported": boot(host_xs={"started": False, "host_token": "h1"}),
        "test exit": boot(console=clean_console().replace("test exit 0", "test exit 1")),
        "crash": boot(status=3),
        "no end marker": boot(console="pyvmm-guest: init started\n"),
    }
    for name, record in checks.items():
        kind, reason = soak.classify(record)
        assert kind == "guest-failure" and reason, (name, kind, reason)


def test_qemu_is_not_asked_for_the_host_xenstore_exchange():
    console = clean_console().replace("soak: stage xenstore-host\nsoak: xs host=h1\n", "")
    assert soak.classify(boot("qemu", console=console, host_xs=None)) == ("clean", "")
    assert soak.classify(boot("pyvmm", console=console))[0] == "guest-failure"


def test_a_boot_l1_died_in_is_a_testbed_failure_whatever_else_it_shows():
    tail = "[  420.87] Kernel panic - not syncing: corrupted stack end\ntestbed: L1 stopped before the command finished"
    record = soak.testbed_failure(125, tail, {"index": 3, "vmm": "qemu", "mode": "intx"},
                                  "pyvmm-guest: init started\nsoak: stage xenstore\n")
    assert record["class"] == "testbed"
    assert "Kernel panic" in record["reason"] and record["last_stage"] == "xenstore"
    assert soak.classify(boot(status=2, testbed="L1 died"))[0] == "testbed"


def test_the_schedule_alternates_the_vmms_and_cycles_the_modes():
    plan = soak.schedule(4, ["pyvmm", "qemu"], ["vcpu-vector", "hvm-vector", "intx", "userspace"])
    assert [(e["vmm"], e["slot"]) for e in plan] == [
        ("pyvmm", "vcpu-vector"), ("qemu", "vcpu-vector"),
        ("qemu", "hvm-vector"), ("pyvmm", "hvm-vector"),
        ("pyvmm", "intx"), ("qemu", "intx"),
        ("qemu", "userspace"), ("pyvmm", "userspace")]
    # QEMU has no userspace event channels: it runs its default in that slot.
    assert [e["mode"] for e in plan if e["vmm"] == "qemu"] == ["vcpu-vector", "hvm-vector", "intx", "vcpu-vector"]
    assert [e["index"] for e in plan] == list(range(8))


def test_the_intx_tsc_mode_puts_this_hosts_tsc_rate_on_the_command_line(monkeypatch):
    monkeypatch.setattr(soak, "guest_tsc_khz", lambda: 2445426)
    prepared = {"kernel": "vmlinuz", "initrd": "initrd"}
    for vmm in soak.VMMS:
        argv = soak.vmm_command(vmm, "intx-tsc", prepared, Path("disk"), Path("xs"), 60)
        append = argv[argv.index("--append") + 1].split()
        assert {"xen_no_vector_callback", "tsc_early_khz=2445426", "tsc=reliable"} <= set(append)
    assert set(soak.DEFAULT_MODES) <= set(soak.MODES)


def test_a_stream_cut_short_names_the_boot_in_progress(tmp_path):
    stream = tmp_path / "boots.jsonl"
    stream.write_text('{"event": "host", "cpus": 2}\n'
                      '{"event": "start", "index": 0}\n{"event": "boot", "index": 0, "class": "clean"}\n'
                      '{"event": "start", "index": 1}\n{"event": "boot", "ind')
    host, boots, started = soak.read_stream(stream)
    assert host == {"cpus": 2} and [b["index"] for b in boots] == [0] and started == {"index": 1}


def test_the_summary_counts_each_class_per_vmm_and_mode():
    boots = [{"vmm": "pyvmm", "mode": "intx", "class": "clean", "seconds": 30.0},
             {"vmm": "pyvmm", "mode": "intx", "class": "hung", "seconds": 250.0},
             {"vmm": "pyvmm", "mode": "vcpu-vector", "class": "clean", "seconds": 40.0, "lost_upcalls": 2},
             {"vmm": "qemu", "mode": "intx", "class": "testbed", "seconds": None}]
    rows = {(r["vmm"], r["mode"]): r for r in soak.summarize(boots, ["pyvmm", "qemu"])}
    assert rows["pyvmm", "all"]["lost_upcall"] == 1 and rows["pyvmm", "intx"]["lost_upcall"] == 0
    assert rows["pyvmm", "intx"]["clean"] == 1 and rows["pyvmm", "intx"]["hung"] == 1
    assert rows["pyvmm", "intx"]["max_s"] == 250.0
    assert rows["pyvmm", "all"]["boots"] == 3 and rows["pyvmm", "all"]["median_s"] == 40.0
    assert rows["qemu", "all"]["testbed"] == 1 and rows["qemu", "all"]["median_s"] is None


def test_the_reason_quotes_the_guest_kernels_first_complaint():
    console = ("soak: stage disk\n[ 50.95] BUG: ENTRY_TRAMPOLINE stack guard page was hit at 0\n"
               "[ 51.36] Kernel panic - not syncing: Fatal exception in interrupt\n")
    record = boot(console=console, status=2, guest_panic=soak.guest_panic(console))
    kind, reason = soak.classify(record)
    assert kind == "reset" and "after: BUG: ENTRY_TRAMPOLINE stack guard page" in reason
    stalled = "soak: stage net\n[ 80.1] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\n"
    kind, reason = soak.classify(boot(console=stalled, stopped="stall", guest_panic=soak.guest_panic(stalled)))
    assert kind == "hung" and "last stage: net" in reason and "detected stalls" in reason
    assert soak.guest_panic(clean_console()) is None


def test_tally_counts_the_boots_of_several_reports_and_names_each_run(tmp_path, capsys):
    def report(name, commit, classes):
        boots = [{"vmm": vmm, "mode": "vcpu-vector", "class": cls, "seconds": 40.0} for vmm, cls in classes]
        path = tmp_path / name
        path.write_text(soak.json.dumps({"date": "2026-12-06T00:00:00+00:00", "commit": commit, "planned": len(boots),
                                         "settings": {"vmms": ["pyvmm", "qemu"], "modes": ["vcpu-vector"]},
                                         "boots": boots}))
        return path

    first = report("a.json", "aaaa", [("pyvmm", "clean"), ("qemu", "clean")])
    second = report("b.json", "bbbb", [("pyvmm", "hung"), ("qemu", "testbed"), ("pyvmm", "clean")])
    rows = {(r["vmm"], r["mode"]): r for r in soak.tally([first, second])}
    assert rows["pyvmm", "all"]["boots"] == 3 and rows["pyvmm", "all"]["clean"] == 2 and rows["pyvmm", "all"]["hung"] == 1
    assert rows["qemu", "all"]["boots"] == 2 and rows["qemu", "all"]["testbed"] == 1
    out = capsys.readouterr().out
    assert "commit aaaa, 2 of 2 boots" in out and "commit bbbb, 3 of 3 boots" in out


def test_tally_counts_the_stream_of_a_run_stopped_before_its_report(tmp_path, capsys):
    stream = tmp_path / "boots.jsonl"
    records = [{"event": "host", "kernel": "6.12", "tcg_threads": "single"},
               {"event": "start", "vmm": "pyvmm"}, {"event": "boot", "vmm": "pyvmm", "mode": "intx-tsc",
                                                    "class": "clean", "seconds": 50.0},
               {"event": "start", "vmm": "qemu"}, {"event": "boot", "vmm": "qemu", "mode": "intx-tsc",
                                                   "class": "reset", "seconds": 20.0},
               {"event": "start", "vmm": "qemu"}]
    stream.write_text("".join(soak.json.dumps(record) + "\n" for record in records) + '{"event": "bo')
    rows = {(r["vmm"], r["mode"]): r for r in soak.tally([stream])}
    assert rows["pyvmm", "all"]["clean"] == 1 and rows["qemu", "all"]["reset"] == 1
    assert [vmm for vmm, mode in rows if mode == "all"] == ["pyvmm", "qemu"]
    out = capsys.readouterr().out
    assert "stopped after 2 boots (and one in progress, not counted)" in out and "TCG threads single" in out
    assert "L1 idle halt" in out  # recorded before the testbed had the choice
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SystemExit, match="not a soak stream"):
        soak.tally([tmp_path / "empty.jsonl"])


def test_tally_refuses_what_is_not_a_report(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit, match="not a soak report"):
        soak.tally([bad])


def _fake_testbed(monkeypatch, tmp_path, outcomes):
    """run_testbed with scripts/testbed replaced: each run appends its
    records to the stream and returns (status, stderr tail)."""
    runs = []

    def testbed_run(args, prepared, start, stream, plan_size):
        records, status, tail = outcomes[len(runs)]
        runs.append(start)
        with stream.open("a") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
        return status, tail

    monkeypatch.setattr(soak, "testbed_run", testbed_run)
    monkeypatch.setattr(soak, "REPO", tmp_path)
    return runs


def test_a_dying_l1_costs_one_boot_and_the_soak_goes_on_but_not_after_its_own_crash(monkeypatch, tmp_path):
    import argparse
    plan = soak.schedule(2, ["pyvmm", "qemu"], ["vcpu-vector"])
    args = argparse.Namespace(keep_going=True)
    start = lambda i: dict(plan[i], event="start")  # noqa: E731
    done = lambda i: dict(plan[i], event="boot", **{"class": "clean"})  # noqa: E731
    runs = _fake_testbed(monkeypatch, tmp_path, [
        ([start(0), done(0), start(1)], 125, "testbed: L1 stopped responding: ..."),
        ([start(2), done(2), start(3), done(3)], 0, ""),
    ])
    _, boots, testbed_runs = soak.run_testbed(args, {}, plan, tmp_path)
    assert runs == [0, 2] and [b["class"] for b in boots] == ["clean", "testbed", "clean", "clean"]
    assert "L1 stopped responding" in boots[1]["reason"]

    (tmp_path / "boots.jsonl").unlink()
    runs = _fake_testbed(monkeypatch, tmp_path, [
        ([start(0), done(0), start(1)], 1, "Traceback (most recent call last):\nNameError: name 'x'"),
    ])
    _, boots, _ = soak.run_testbed(args, {}, plan, tmp_path)
    assert runs == [0] and [b["class"] for b in boots] == ["clean"]  # no boot blamed, no second run


def test_a_stalled_qemu_boot_asks_for_its_registers_through_a_signal(tmp_path):
    import subprocess
    import time
    path = tmp_path / "registers"
    child = subprocess.Popen([sys.executable, "-c", f"""
import signal, time
def dump(number, frame):
    open({str(path)!r} + ".partial", "w").write("CPU#0\\nRIP=ffffffff81a03db3 RFL=00000046\\n")
    __import__("os").replace({str(path)!r} + ".partial", {str(path)!r})
signal.signal(signal.SIGUSR1, dump)
print("ready", flush=True)
time.sleep(30)
"""], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"ready\n"
        text = soak.qemu_registers(child.pid, path)
        assert text.startswith("QEMU's `info registers -a`:") and "RIP=ffffffff81a03db3" in text
        assert not path.exists()
    finally:
        child.kill()
        child.wait()
    started = time.monotonic()
    assert soak.qemu_registers(child.pid, path, wait=0.5) in (
        "QEMU's registers: scripts/qemu-xen has gone", "QEMU's registers: none written within 0 s")
    assert time.monotonic() - started < 5
