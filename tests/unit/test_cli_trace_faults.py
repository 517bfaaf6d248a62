"""`pyvmm run --trace/--trace-file/--fault` and `--stats/--stats-json`:
checked into the VmConfig, and made into the VM's own Tracer,
FaultInjector and RunStats by the runner."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from pyvmm import cli, runner
from pyvmm.config import VmConfig


def invoke(tmp_path, monkeypatch, *args, run_vm=None):
    seen = []
    monkeypatch.setattr(runner, "run_vm", run_vm or (lambda config: seen.append(config) or 0))
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"x")
    result = CliRunner().invoke(cli.cli, ["run", "--kernel", str(kernel), "--no-sandbox", *args])
    return result, seen


def test_options_reach_the_config(tmp_path, monkeypatch):
    path = tmp_path / "t.jsonl"
    result, (config,) = invoke(tmp_path, monkeypatch, "--trace", "blk,xenstore", "--trace-file", str(path),
                               "--fault", "blk:error,op=write", "--fault", "xenstore:eagain,count=1")
    assert result.exit_code == 0, result.output
    assert config.trace == {"blk", "xenstore"} and config.trace_file == path
    assert config.faults == ("blk:error,op=write", "xenstore:eagain,count=1")
    assert not path.exists()  # the runner opens it, not the command line


@pytest.mark.parametrize("args, message", [
    (("--trace", "blk"), "--trace and --trace-file go together"),
    (("--trace", "disk", "--trace-file", "t"), "unknown trace categories disk"),
    (("--fault", "blk:explode"), "blk faults are"),
])
def test_bad_options_are_usage_errors(tmp_path, monkeypatch, args, message):
    result, seen = invoke(tmp_path, monkeypatch, *args)
    assert result.exit_code == 1 and message in result.output and seen == []


def test_an_unopenable_trace_file_is_reported_before_anything_runs(tmp_path):
    config = VmConfig(kernel=tmp_path / "k", trace=frozenset({"blk"}), trace_file=tmp_path / "missing" / "t")
    with pytest.raises(runner.RunError, match=r"--trace-file .*missing/t.*: No such file"):
        runner.run_vm(config)


def test_each_run_gets_its_own_tracer_and_injector(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(runner, "_run_sandboxed",
                        lambda config, trace, faults, stats: made.append((trace, faults)) or 0)
    path = tmp_path / "t.jsonl"
    config = VmConfig(kernel=tmp_path / "k", trace=frozenset({"blk"}), trace_file=path, faults=("blk:stall",))
    assert runner.run_vm(config) == 0 and runner.run_vm(VmConfig(kernel=tmp_path / "k")) == 0
    (trace, faults), (other_trace, other_faults) = made
    assert trace is not other_trace and faults is not other_faults
    assert faults.blk and not other_faults.blk and other_trace.enabled == frozenset()
    assert trace.enabled == frozenset() and path.exists()  # closed at the end of the run


# --- --stats and --stats-json ------------------------------------------------------


def test_stats_options_reach_the_config(tmp_path, monkeypatch):
    path = tmp_path / "s.json"
    result, (plain,) = invoke(tmp_path, monkeypatch)
    assert result.exit_code == 0 and not plain.stats and plain.stats_json is None
    result, (config,) = invoke(tmp_path, monkeypatch, "--stats", "--stats-json", str(path))
    assert result.exit_code == 0, result.output
    assert config.stats and config.stats_json == path and not path.exists()


def fake_run(counted):
    """A run whose vCPU 0 counted `counted` exits on COM1 (no KVM)."""
    def run(config, trace, faults, stats):
        if stats is not None:
            stats.vcpu(0).add("io", "COM1 0x3f8-0x3ff", 5000, count=counted)
            stats.event.add("xenstore", "READ", 100)
        return 0
    return run


def test_stats_are_printed_and_written_at_the_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "_run_sandboxed", fake_run(3))
    path = tmp_path / "s.json"
    assert runner.run_vm(VmConfig(kernel=tmp_path / "k", stats=True, stats_json=path)) == 0
    err = capsys.readouterr().err
    assert "pyvmm: run statistics (--stats):" in err
    assert any(line.split()[1:4] == ["io", "COM1", "0x3f8-0x3ff"] and line.split()[4] == "3"
               for line in err.splitlines()), err
    import json

    report = json.loads(path.read_text())
    assert {(c["kind"], c["detail"], c["count"]) for c in report["counters"]} == {
        ("io", "COM1 0x3f8-0x3ff", 3), ("xenstore", "READ", 1)}


def test_stats_json_alone_prints_nothing_and_no_option_counts_nothing(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(runner, "_run_sandboxed", lambda config, trace, faults, stats: seen.append(stats) or 0)
    path = tmp_path / "s.json"
    runner.run_vm(VmConfig(kernel=tmp_path / "k", stats_json=path))
    runner.run_vm(VmConfig(kernel=tmp_path / "k"))
    assert seen[0] is not None and seen[1] is None
    assert "run statistics" not in capsys.readouterr().err and path.exists()


def test_an_unopenable_stats_file_is_reported_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "_run_sandboxed", lambda *args: pytest.fail("ran"))
    config = VmConfig(kernel=tmp_path / "k", stats_json=tmp_path / "missing" / "s.json")
    with pytest.raises(runner.RunError, match=r"--stats-json .*missing/s.json.*: No such file"):
        runner.run_vm(config)
