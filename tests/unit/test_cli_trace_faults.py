"""`pyvmm run --trace/--trace-file/--fault`: checked into the VmConfig, and
made into the VM's own Tracer and FaultInjector by the runner."""

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
    monkeypatch.setattr(runner, "_run_sandboxed", lambda config, trace, faults: made.append((trace, faults)) or 0)
    path = tmp_path / "t.jsonl"
    config = VmConfig(kernel=tmp_path / "k", trace=frozenset({"blk"}), trace_file=path, faults=("blk:stall",))
    assert runner.run_vm(config) == 0 and runner.run_vm(VmConfig(kernel=tmp_path / "k")) == 0
    (trace, faults), (other_trace, other_faults) = made
    assert trace is not other_trace and faults is not other_faults
    assert faults.blk and not other_faults.blk and other_trace.enabled == frozenset()
    assert trace.enabled == frozenset() and path.exists()  # closed at the end of the run
