"""--stats' counters, their merge and the report (pyvmm/core/stats.py)."""

import io
import json
import time

from pyvmm.core import stats as st
from pyvmm.core.stats import Counters, RunStats, VcpuStats, format_report, process_start_ns, write_json


def test_add_counts_and_sums_time_per_kind_and_detail():
    counters = Counters()
    counters.add("io", "COM1", 100)
    counters.add("io", "COM1", 50)
    counters.add("io", "RTC", 7, count=2)
    assert counters.counters == {("io", "COM1"): [2, 150], ("io", "RTC"): [2, 7]}


def test_a_slot_is_the_counter_itself():
    counters = Counters()
    slot = counters.slot("hypercall", "sched_op:yield")
    slot[0] += 3
    slot[1] += 30
    assert counters.slot("hypercall", "sched_op:yield") is slot
    assert counters.counters[("hypercall", "sched_op:yield")] == [3, 30]


def test_details_a_guest_chooses_are_bounded(monkeypatch):
    monkeypatch.setattr(st, "MAX_DETAILS", 4)
    counters = Counters()
    for port in range(10):
        counters.add("io", f"unclaimed {port:#x}", 1)
    assert len(counters.counters) == 5  # four, then the kind's "other"
    assert counters.counters[("io", st.OTHER)] == [6, 6]


def test_report_merges_every_vcpu_and_the_event_thread():
    stats = RunStats(2)
    stats.vcpu(0).add("io", "COM1 0x3f8-0x3ff", 1000)
    stats.vcpu(1).add("io", "COM1 0x3f8-0x3ff", 3000)
    stats.vcpu(1).add("hypercall", "event_channel_op:send", 500)
    stats.vcpu(1).add("evtchn-send", "port 3: ipi", 200)  # inside the hypercall exit above
    stats.event.add("xenstore", "READ", 40, count=4)
    stats.vcpu(0).run_ns, stats.vcpu(0).vmm_ns, stats.vcpu(0).runs = 9000, 1000, 2
    report = stats.report()
    assert report["counters"] == [
        {"kind": "io", "detail": "COM1 0x3f8-0x3ff", "count": 2, "ns": 4000},
        {"kind": "hypercall", "detail": "event_channel_op:send", "count": 1, "ns": 500},
        {"kind": "evtchn-send", "detail": "port 3: ipi", "count": 1, "ns": 200},
        {"kind": "xenstore", "detail": "READ", "count": 4, "ns": 40},
    ]
    # A vCPU's exits are its KVM exits only: the send is part of a hypercall exit.
    assert report["vcpus"] == [
        {"vcpu": 0, "kvm_run_ns": 9000, "vmm_ns": 1000, "kvm_runs": 2, "exits": 1},
        {"vcpu": 1, "kvm_run_ns": 0, "vmm_ns": 0, "kvm_runs": 0, "exits": 2},
    ]


def test_kinds_never_seen_are_left_out():
    stats = RunStats(1)
    stats.vcpu(0).slot("halt", "")
    assert stats.report()["counters"] == []


def test_a_reboot_continues_the_same_vcpu_counters():
    stats = RunStats(1)
    first = stats.vcpu(0)
    stats.vcpu(2)
    assert stats.vcpu(0) is first and [v.index for v in stats.vcpus] == [0, 1, 2]


def test_startup_is_first_kvm_run_minus_process_start():
    stats = RunStats(1)
    stats.process_start_ns = 1_000
    assert stats.startup_ns() is None
    stats.note_first_run()
    first = stats.first_kvm_run_ns
    stats.note_first_run()  # a later boot's first run changes nothing
    assert stats.first_kvm_run_ns == first
    assert stats.startup_ns() == first - 1_000


def test_process_start_is_in_the_past_on_the_monotonic_clock():
    started = process_start_ns()
    assert started is not None
    # pytest has been running for a while; a process start in the future or
    # before boot would mean the clocks were mixed up.
    assert 0 <= started <= time.monotonic_ns()


def test_text_report_names_each_kind_with_count_time_and_average():
    stats = RunStats(1)
    stats.process_start_ns, stats.first_kvm_run_ns = 0, 250_000_000
    stats.vcpu(0).add("io", "COM1 0x3f8-0x3ff", 3_000_000, count=3)
    stats.vcpu(0).run_ns, stats.vcpu(0).vmm_ns, stats.vcpu(0).runs = 9_000_000, 3_000_000, 3
    lines = format_report(stats.report())
    assert lines[1] == "  start-up (process start to first KVM_RUN): 250.0 ms (to 10 ms, the kernel's process clock)"
    assert lines[2] == "  vCPU 0: 9.0 ms in KVM_RUN, 3.0 ms in the VMM (25.0% of its time); 3 exits, 3 KVM_RUNs"
    row = lines[-1].split()
    assert row[:3] == ["io", "COM1", "0x3f8-0x3ff"] and row[3] == "3" and row[4:] == ["3.0", "ms", "1000.0", "µs"]


def test_text_report_without_a_start_time():
    lines = format_report(RunStats(0).report() | {"startup_ns": None})
    assert lines[1].endswith(": unknown")


def test_json_report_round_trips():
    stats = RunStats(1)
    stats.event.add("xenstore", "WRITE", 10)
    out = io.StringIO()
    write_json(stats.report(), out)
    assert json.loads(out.getvalue())["counters"] == [{"kind": "xenstore", "detail": "WRITE", "count": 1, "ns": 10}]


def test_vcpu_exits_count_only_exit_kinds():
    vcpu = VcpuStats(0)
    vcpu.add("interrupted", "", 0)
    vcpu.add("xenstore", "READ", 0)
    assert vcpu.exits() == 1
