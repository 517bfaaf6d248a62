"""The tracer (JSON lines, flags, threads) and `pyvmm trace show`."""

from __future__ import annotations

import io
import subprocess
import sys
import json
import threading

import pytest
from click.testing import CliRunner

from pyvmm.cli import cli
from pyvmm.core.trace import CATEGORIES, NULL_TRACE, TraceError, Tracer, open_trace, parse_categories, summarize_bytes
from pyvmm.xen.backends.net.netback import net_packet
from pyvmm.debug.trace_show import TraceFilter, TraceFormatError, render, show


def records(stream):
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_categories():
    assert parse_categories("blk, xenstore") == {"blk", "xenstore"}
    assert parse_categories("all") == set(CATEGORIES)
    for bad in ("", "blk,disk", ","):
        with pytest.raises(TraceError):
            parse_categories(bad)


def test_everything_is_off_by_default():
    tracer = Tracer()
    assert not any(getattr(tracer, name) for name in CATEGORIES)


def test_enabled_categories_and_fault_with_them():
    tracer = Tracer()
    stream = io.StringIO()
    tracer.attach({"blk"}, stream)
    assert tracer.blk and tracer.fault and not tracer.xenstore
    tracer.close()
    assert not tracer.blk and not tracer.fault


def test_records_are_json_lines_with_time_thread_and_vcpu():
    tracer = Tracer()
    stream = io.StringIO()
    tracer.attach({"hypercall", "io"}, stream)
    tracer.emit("hypercall", "call", vcpu=1, name="sched_op", args=["0x1"], result=0)
    worker = threading.Thread(target=lambda: tracer.emit("io", "pio", port=0x3F8, value=b"\x00A"), name="vcpu3")
    worker.start()
    worker.join()
    tracer.emit("io", "mmio", addr="0xfee00000")
    assert stream.getvalue() == ""  # buffered until flushed
    tracer.close()
    first, second, third = records(stream)
    assert first["cat"] == "hypercall" and first["vcpu"] == 1 and first["name"] == "sched_op"
    assert second["vcpu"] == 3 and second["thread"] == "vcpu3" and second["value"] == "\\x00A"
    assert "vcpu" not in third and third["thread"] == threading.current_thread().name
    assert first["t"] <= second["t"] <= third["t"]


def test_concurrent_writers_do_not_mix_lines():
    tracer = Tracer()
    stream = io.StringIO()
    tracer.attach({"evtchn"}, stream)

    def write(index):
        for n in range(2000):
            tracer.emit("evtchn", "send", port=index, n=n)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    tracer.close()
    seen = records(stream)
    assert len(seen) == 8000
    for port in range(4):
        assert [r["n"] for r in seen if r["port"] == port] == list(range(2000))


def test_open_writes_the_file(tmp_path):
    tracer = Tracer()
    path = tmp_path / "t.jsonl"
    tracer.open({"blk"}, path)
    tracer.emit("blk", "request", op="read", sector=8)
    tracer.close()
    assert json.loads(path.read_text())["sector"] == 8


def test_net_packet_hook():
    tracer = Tracer()
    stream = io.StringIO()
    net_packet(tracer, "tx", "0", 60)  # off: nothing happens
    tracer.attach({"net"}, stream)
    try:
        net_packet(tracer, "rx", "0", 1514, flags=4, slots=2, status=-2, fault="net:drop")
    finally:
        tracer.close()
    (record,) = records(stream)
    assert (record["dir"], record["len"], record["slots"], record["status"], record["fault"]) == (
        "rx", 1514, 2, -2, "net:drop")


def test_null_trace_cannot_be_turned_on():
    # Parts built alone share it: a test that could turn it on would trace for every other.
    with pytest.raises(RuntimeError):
        NULL_TRACE.attach({"blk"}, io.StringIO())
    with pytest.raises(RuntimeError):
        NULL_TRACE.enable({"io"})
    NULL_TRACE.close()
    assert NULL_TRACE.enabled == frozenset() and not any(getattr(NULL_TRACE, name) for name in CATEGORIES)


def test_open_trace_is_off_without_categories(tmp_path):
    tracer = open_trace(frozenset(), None)
    assert tracer.enabled == frozenset() and tracer is not NULL_TRACE
    tracer = open_trace(frozenset({"blk"}), tmp_path / "t.jsonl")
    assert tracer.blk and tracer.stop
    tracer.close()
    assert (tmp_path / "t.jsonl").exists()


def test_tracers_share_nothing():
    first, second = Tracer(), Tracer()
    first.attach({"blk"}, io.StringIO())
    assert first.blk and not second.blk and not second.stop
    first.close()


def test_summarize_bytes():
    assert summarize_bytes(b"ab\n") == "ab\\n"
    assert summarize_bytes(b"x" * 70, limit=4) == "xxxx...(+66 bytes)"


TRACE_TEXT = "\n".join(json.dumps(r) for r in [
    {"t": 1_000_000_000, "cat": "xenstore", "ev": "request", "thread": "MainThread", "op": "WRITE",
     "path": "/local/domain/1/device/vbd/51712/state", "value": "4", "tx": 0},
    {"t": 1_500_000_000, "cat": "blk", "ev": "request", "thread": "MainThread", "op": "read", "sector": 800,
     "sectors": 8, "disk": "xvda"},
    {"t": 2_000_000_000, "cat": "hypercall", "ev": "call", "thread": "vcpu0", "vcpu": 0, "name": "sched_op",
     "op": "block", "result": 0},
    {"t": 3_000_000_000, "cat": "blk", "ev": "response", "thread": "MainThread", "id": 5, "status": -1,
     "reason": "injected fault 1: blk:error", "fault": None},
]) + "\n"


def shown(wanted=TraceFilter(), as_json=False):
    out = io.StringIO()
    count = show(io.StringIO(TRACE_TEXT), out, wanted, as_json=as_json)
    lines = out.getvalue().splitlines()
    assert count == len(lines)
    return lines


def test_show_renders_one_line_per_event():
    lines = shown()
    assert len(lines) == 4
    assert lines[0].split() == ["0.000000", "MainThread", "xenstore", "request", "op=WRITE",
                                "path=/local/domain/1/device/vbd/51712/state", "value=4", "tx=0"]
    assert lines[2].split()[:4] == ["1.000000", "vcpu0", "hypercall", "call"]
    assert 'reason="injected fault 1: blk:error"' in lines[3] and "fault=" not in lines[3]


def test_show_filters():
    assert [line.split()[2] for line in shown(TraceFilter(frozenset({"blk"})))] == ["blk", "blk"]
    assert len(shown(TraceFilter(grep="sector"))) == 1
    assert [line.split()[0] for line in shown(TraceFilter(since=0.5, until=1.0))] == ["0.500000", "1.000000"]
    raw = shown(TraceFilter(frozenset({"hypercall"})), as_json=True)
    assert json.loads(raw[0])["name"] == "sched_op"


def test_show_refuses_what_is_not_a_trace():
    with pytest.raises(TraceFormatError, match="line 2"):
        show(io.StringIO('{"t": 1, "cat": "io"}\nnot json\n'), io.StringIO(), TraceFilter())
    with pytest.raises(TraceFormatError):
        show(io.StringIO('{"cat": "io"}\n'), io.StringIO(), TraceFilter())


def test_render_quotes_values_with_spaces():
    line = render({"t": 0, "cat": "console", "ev": "out", "thread": "x", "text": "a b"}, 0.0)
    assert line.endswith('text="a b"')


def test_trace_show_command(tmp_path):
    path = tmp_path / "boot.trace"
    path.write_text(TRACE_TEXT)
    result = CliRunner().invoke(cli, ["trace", "show", str(path), "-c", "blk", "--grep", "800"])
    assert result.exit_code == 0, result.output
    result_lines = [render(json.loads(TRACE_TEXT.splitlines()[1]), 0.5)]
    assert result.output.splitlines() == result_lines
    result = CliRunner().invoke(cli, ["trace", "show", str(path), "-c", "disk"])
    assert result.exit_code != 0 and "unknown category disk" in result.output
    # A fresh process, where nothing else has imported the device kinds that
    # add their categories (each command's module is imported alone).
    shown = subprocess.run([sys.executable, "-m", "pyvmm", "trace", "show", str(path), "-c", "blk", "--grep", "800"],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and shown.stdout.splitlines() == result_lines, shown.stderr
