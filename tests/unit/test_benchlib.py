"""scripts/benchlib and scripts/bench's table logic (no guests, no KVM)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

from benchlib import guest_clock_init_s, load_script, run_vmm, vmm_startup_s  # noqa: E402

CHILD = """
import sys
big = bytearray(48 << 20)  # touched: a peak RSS of at least 48 MiB
for i in range(0, len(big), 4096):
    big[i] = 1
print("booting", flush=True)

print("pyvmm-guest: init started", flush=True)
print("qemu-xen: QEMU peak RSS %s KiB" % sys.argv[1], file=sys.stderr, flush=True) if sys.argv[1] != "-" else None
sys.exit(3)
"""


def test_run_vmm_times_the_console_and_measures_the_process_itself():
    run = run_vmm([sys.executable, "-c", CHILD, "-"], marker=b"pyvmm-guest: init started")
    assert run["status"] == 3
    assert "booting" in run["console"]
    assert 0 < run["first_output_s"] <= run["marker_s"] <= run["wall_s"]
    assert run["peak_rss_kib"] >= 48 << 10


def test_run_vmm_takes_qemus_own_peak_rss_from_qemu_xen():
    run = run_vmm([sys.executable, "-c", CHILD, "1234"], marker=b"never printed")
    assert run["peak_rss_kib"] == 1234
    assert run["marker_s"] is None


NOISY = """
import time
print("booting", flush=True)
print("soak: alive 1.0", flush=True)
while True:  # a kernel that keeps complaining: output, but no heartbeat
    print("rcu: INFO: rcu_preempt detected stalls", flush=True)
    time.sleep(0.05)
"""


def test_once_a_heartbeat_began_only_the_heartbeat_is_progress():
    run = run_vmm([sys.executable, "-c", NOISY], limit=120, stall=1.0, progress=re.compile(rb"soak: alive "),
                  grace=1.0)
    assert run["stopped"] == "stall", run["stopped"]
    assert "detected stalls" in run["console"]


def test_ratio_and_missing_values():
    bench = load_script("bench")
    assert bench.row("x", "s", "lower", 3.0, 2.0)["ratio"] == 1.5
    assert bench.row("x", "s", "lower", None, 2.0)["ratio"] is None
    assert bench.row("x", "s", "lower", 3.0, 0)["ratio"] is None
    assert bench.median_of([None, 3, 1, 2]) == 2
    assert bench.median_of([None]) is None
    assert list(bench.alternating(2)) == [(1, "pyvmm"), (1, "qemu"), (2, "qemu"), (2, "pyvmm")]


# A Debian kernel's console around the first userspace program (hvc0, printk times on).
CONSOLE = """\
[    2.701203] Freeing unused kernel image (initmem) memory: 2916K
[    2.712345] Write protecting the kernel read-only data: 26624k
[    2.733518] Run /init as init process
[    2.733521]   with arguments:
pyvmm-guest: init started
"""


def test_guest_clock_at_init_is_the_kernels_own_timestamp():
    assert guest_clock_init_s(CONSOLE) == 2.733518
    assert guest_clock_init_s("[   12.5] Run /sbin/init as init process\n") == 12.5
    # No printk times, or a kernel that never got there.
    assert guest_clock_init_s("Run /init as init process\npyvmm-guest: init started\n") is None
    assert guest_clock_init_s(CONSOLE.replace("Run /init", "Trying /init")) is None
    # Only a line of its own: the init's own output quoting it is not the kernel's.
    assert guest_clock_init_s("echo [ 1.0] Run /init as init process\n") is None


def test_vmm_startup_from_the_stats_json(tmp_path):
    stats = tmp_path / "stats.json"
    stats.write_text('{"startup_ns": 1234567890, "vcpus": [], "counters": []}')
    assert vmm_startup_s(stats) == 1.235
    stats.write_text('{"startup_ns": null}')
    assert vmm_startup_s(stats) is None
    stats.write_text("{broken")
    assert vmm_startup_s(stats) is None
    assert vmm_startup_s(tmp_path / "missing.json") is None


def test_boot_rows_include_the_guest_clock_and_the_vmm_startup():
    bench = load_script("bench")
    boots = [{"vmm": "pyvmm", "status": 0, "init_s": 6.0, "first_output_s": 3.0, "guest_init_s": 2.7,
              "vmm_startup_s": 1.9, "peak_rss_kib": 1024},
             {"vmm": "pyvmm", "status": 5, "init_s": None, "first_output_s": 9.0, "guest_init_s": None,
              "vmm_startup_s": 9.9, "peak_rss_kib": 1024},
             {"vmm": "qemu", "status": 0, "init_s": 4.0, "first_output_s": 1.0, "guest_init_s": 2.1,
              "vmm_startup_s": None, "peak_rss_kib": 2048}]
    rows = {r["name"]: r for r in bench.summarize({"boot": boots, "latency": [], "blk": []}, {})
            if r["name"].startswith(("boot", "VMM"))}
    guest = rows["boot: guest clock at /init"]
    assert (guest["pyvmm"], guest["qemu"], guest["ratio"]) == (2.7, 2.1, round(2.7 / 2.1, 3))
    startup = rows["VMM start-up (process start to first KVM_RUN)"]
    assert (startup["pyvmm"], startup["qemu"], startup["ratio"]) == (1.9, None, None)  # a failed boot is left out
    assert rows["boot: VMM start to /init"]["pyvmm"] == 6.0


SILENT_AFTER_SPAWNING = """
import os, signal, subprocess, sys, time
# A grandchild in a session of its own that ignores SIGTERM (as QEMU sits
# under scripts/qemu-xen): only the process-tree stop reaches it.
helper = subprocess.Popen([sys.executable, "-c",
                           "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"],
                          start_new_session=True)
print("helper", helper.pid, flush=True)
time.sleep(600)
"""


def test_run_vmm_stops_a_silent_vmm_and_everything_below_it():
    seen = []
    run = run_vmm([sys.executable, "-c", SILENT_AFTER_SPAWNING], limit=300, stall=2, grace=1,
                  on_console=lambda data, seconds: seen.append(data))
    assert run["stopped"] == "stall"
    assert run["status"] != 0
    helper = int(run["console"].split()[1])
    assert b"".join(seen).decode() == run["console"]
    try:
        stat = Path(f"/proc/{helper}/stat").read_text()
    except OSError:
        stat = ""
    assert stat == "" or stat[stat.rindex(")") + 2] == "Z", stat


def test_run_vmm_reports_no_stop_for_a_vmm_that_ends():
    run = run_vmm([sys.executable, "-c", "print('done')"], stall=600)
    assert run["stopped"] is None and run["status"] == 0


def test_a_stalled_vmm_says_its_last_words_before_the_stop():
    run = run_vmm(["sh", "-c", "echo up; exec sleep 30"], stall=1.0, limit=20,
                           before_stop=lambda pid: "vCPU 0: halted")
    assert run["stopped"] == "stall"
    assert run["stderr"].endswith("--- before the stop (stall):\nvCPU 0: halted\n")
    broken = run_vmm(["sh", "-c", "exec sleep 30"], limit=1.0, before_stop=lambda pid: 1 / 0)
    assert broken["stopped"] == "limit" and "failed: ZeroDivisionError" in broken["stderr"]


LINGERS = """
import os, time
print("booting", flush=True)
os.close(1); os.close(2)  # its streams end, the process does not
time.sleep(60)
"""


def test_a_vmm_that_closes_its_streams_and_lingers_is_stopped_not_waited_for(monkeypatch):
    import benchlib
    monkeypatch.setattr(benchlib, "REAP_SECONDS", 1.0)
    run = run_vmm([sys.executable, "-c", LINGERS], limit=120, grace=1.0)
    assert run["status"] < 0 and run["unstoppable"] is None and run["wall_s"] < 30


def test_a_vmm_that_cannot_be_reaped_is_reported_with_its_threads_not_waited_for(monkeypatch):
    # A process stuck in the kernel cannot be made here: _reap is told it never ends.
    import benchlib
    monkeypatch.setattr(benchlib, "_reap", lambda pid, seconds: None)
    run = run_vmm(["sh", "-c", "echo up; exec sleep 30"], stall=1.0, limit=20, grace=0.5)
    assert run["status"] is None and run["peak_rss_kib"] is None
    assert run["unstoppable"] and "not gone" in run["stderr"]


def test_stuck_report_names_each_thread_its_state_and_wait():
    import benchlib
    report = benchlib.stuck_report([os.getpid()])
    assert f"{os.getpid()}/{os.getpid()} " in report and " state " in report and " wchan " in report


def test_each_callback_mode_gets_a_guest_clock_row_of_its_own(monkeypatch):
    bench = load_script("bench")
    boots = [{"vmm": "pyvmm", "mode": "intx", "status": 0, "guest_init_s": 9.0},
             {"vmm": "qemu", "mode": "intx", "status": 0, "guest_init_s": 3.0},
             {"vmm": "qemu", "mode": "intx", "status": 124, "guest_init_s": None},
             {"vmm": "pyvmm", "mode": "hvm-vector", "status": 0, "guest_init_s": 2.5},
             {"vmm": "qemu", "mode": "hvm-vector", "status": 0, "guest_init_s": 2.0}]
    rows = {r["name"]: r for r in bench.summarize({"boot": [], "callback_boots": boots, "latency": [], "blk": []},
                                                  {})}
    intx = rows["boot: guest clock at /init (intx)"]
    assert (intx["pyvmm"], intx["qemu"], intx["ratio"]) == (9.0, 3.0, 3.0)
    assert intx["note"].endswith("median of 1/1 boots")  # the failed boot is left out
    assert rows["boot: guest clock at /init (hvm-vector)"]["ratio"] == 1.25
    # Each mode's command: its kernel command line words and options for each VMM.
    monkeypatch.setitem(bench.mode_settings.__globals__, "guest_tsc_khz", lambda: 2445426)
    pyvmm = bench.vmm_command("pyvmm", "k", "i", "console=hvc0", 60, callback_mode="intx-tsc")
    assert pyvmm[pyvmm.index("--append") + 1] == "console=hvc0 xen_no_vector_callback tsc_early_khz=2445426 tsc=reliable"
    qemu = bench.vmm_command("qemu", "k", "i", "console=hvc0", 60, callback_mode="hvm-vector")
    assert qemu[qemu.index("--xen-version") + 1] == "4.16"
    assert "--xen-version" not in bench.vmm_command("pyvmm", "k", "i", "console=hvc0", 60)
    assert set(bench.DEFAULT_CALLBACK_MODES) <= set(bench.CALLBACK_MODES) and "userspace" not in bench.CALLBACK_MODES
