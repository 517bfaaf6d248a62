"""scripts/bench-snapshot's parsing and table, and its QMP driver against a
stand-in for QEMU (no guests, no KVM, no QEMU)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

from benchlib import load_script  # noqa: E402
from benchlib.qmp import QemuVm, console_arrival  # noqa: E402

bench = load_script("bench-snapshot")

BLOCKED = "State blocked by non-migratable device 'xen_xenstore'"

# A stand-in for QEMU: serves QMP on the -qmp socket, prints a ready line,
# then a tick each time it is continued; refuses `migrate` when argv[1]
# says so, else writes the "exec:cat > FILE" file itself.
FAKE_QEMU = r"""
import json, os, socket, sys
refuse = sys.argv[1] == "refuse"
path = sys.argv[sys.argv.index("-qmp") + 1].split("unix:")[1].split(",")[0]
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen(1)
incoming = "-incoming" in sys.argv
if not incoming:
    print("bench-snapshot: guest ready", flush=True)
conn, _ = server.accept()
stream = conn.makefile("rwb")
def send(message):
    stream.write(json.dumps(message).encode() + b"\n")
    stream.flush()
send({"QMP": {"version": {}, "capabilities": []}})
status = "inmigrate" if incoming else "running"
for line in stream:
    request = json.loads(line)
    name, arguments = request["execute"], request.get("arguments", {})
    if name == "migrate":
        if refuse:
            send({"error": {"class": "GenericError", "desc": "%s"}})
            continue
        open(arguments["uri"].split("> ")[1], "wb").write(b"x" * 8192)
    elif name == "query-migrate":
        send({"return": {"status": "completed", "total-time": 3}})
        continue
    elif name == "query-status":
        send({"return": {"status": status}})
        status = "paused"
        continue
    elif name == "cont":
        print("bench-snapshot: tick 1", flush=True)
    elif name == "quit":
        send({"return": {}})
        break
    send({"return": {}})
""" % BLOCKED


def fake_qemu(tmp_path: Path, mode: str, *extra: str) -> list[str]:
    return [sys.executable, "-c", FAKE_QEMU, mode, "-qmp", f"unix:{tmp_path / 'qmp.sock'},server=on,wait=on", *extra]


def test_qmp_save_reports_qemus_refusal(tmp_path):
    with QemuVm(fake_qemu(tmp_path, "refuse"), str(tmp_path / "qmp.sock"), tmp_path / "log") as vm:
        assert vm.wait_console(bench.READY, 30) is not None
        assert vm.save(f"exec:cat > {tmp_path / 'image'}", 30) == {"error": BLOCKED}
    assert not (tmp_path / "image").exists()
    assert "bench-snapshot: guest ready" in (tmp_path / "log").read_text()


def test_qmp_save_then_incoming_and_cont(tmp_path):
    image = tmp_path / "image"
    with QemuVm(fake_qemu(tmp_path, "save"), str(tmp_path / "qmp.sock")) as vm:
        saved = vm.save(f"exec:cat > {image}", 30)
    assert saved["qemu_total_ms"] == 3 and saved["seconds"] >= 0
    assert image.stat().st_size == 8192
    with QemuVm(fake_qemu(tmp_path, "save", "-incoming", f"exec:cat {image}"), str(tmp_path / "qmp.sock")) as vm:
        restored = vm.resume_incoming(30)
        assert restored["loaded_status"] == "paused"
        assert restored["loaded_ms"] <= restored["running_ms"]
        assert vm.wait_console(bench.TICK, 30) is not None
        assert vm.wait_console("never printed", 0.2) is None


def test_console_arrival_is_the_read_that_completed_the_match():
    arrivals = [(10, 0.5), (25, 1.0), (40, 2.0)]
    assert console_arrival(arrivals, 10) == 0.5
    assert console_arrival(arrivals, 11) == 1.0
    assert console_arrival(arrivals, 41) is None


def test_pyvmm_lines_are_parsed():
    stderr = ("pyvmm: INFO: pyvmm.vmm.machine: restored from /tmp/a.snap: the machine rebuilt and its state "
              "back in 27.5 ms (vCPUs restored 3.1 ms)\n"
              "pyvmm: snapshot written to /tmp/a.snap (536875008 bytes, 49152 of RAM data, in 0.013 s)\n")
    assert bench.parse_snapshot_line(stderr) == {"bytes": 536875008, "data_bytes": 49152, "seconds": 0.013}
    assert bench.parse_state_back_ms(stderr) == 27.5
    assert bench.parse_snapshot_line("pyvmm: error: no snapshot") is None
    assert bench.parse_state_back_ms("") is None
    mark = "STARTUP-FIRST-KVM-RUN "
    assert bench.first_kvm_run_s(f"noise\n{mark}1500000000 7\n", mark, 1_000_000_000) == 0.5
    assert bench.first_kvm_run_s("noise\n", mark, 0) is None


def test_the_guest_prints_what_the_benchmark_waits_for():
    script = bench.test_script()
    assert bench.READY in script
    assert re.search(bench.TICK, "bench-snapshot: tick 12")
    assert bench.GUESTS["debian"]["ready"] == bench.READY


def test_without_xen_keeps_the_machine_and_drops_xen():
    qemu_xen = load_script("qemu-xen")
    command = qemu_xen.qemu_command(qemu_xen.parse_args(["--kernel", "K", "--initrd", "I", "--vcpus", "2"]), "S")
    tcg = bench.without_xen(command)
    assert tcg[tcg.index("-accel") + 1] == "tcg"
    assert tcg[tcg.index("-cpu") + 1] == "max"
    assert tcg[tcg.index("-append") + 1] == "console=ttyS0"
    assert not any(word.startswith("xen-") for word in tcg)
    assert tcg[tcg.index("-smp") + 1] == "2" and "-qmp" in tcg


def runs_with_qemu_refusing():
    pyvmm = [{"vmm": "pyvmm", "round": n, "cold_boot_s": cold, "snapshot_ms": 10.0, "size_bytes": 512 << 20,
              "disk_bytes": 1 << 20, "running_ms": running, "restore_ms": 30.0, "first_output_s": 0.9}
             for n, cold, running in ((1, 20.0, 300.0), (2, 30.0, 200.0), (3, 10.0, 400.0))]
    qemu = [{"vmm": "qemu", "round": n, "cold_boot_s": 5.0, "unsupported": BLOCKED} for n in (1, 2, 3)]
    return pyvmm + qemu


def test_summary_has_medians_and_qemus_reason():
    rows = {r["name"]: r for r in bench.summarize(runs_with_qemu_refusing(), ["pyvmm", "qemu"])}
    assert len(rows) == len(bench.ROWS)
    cold = rows["cold boot: process start to ready"]
    assert (cold["pyvmm"], cold["qemu"], cold["ratio"]) == (20.0, 5.0, 4.0)
    assert "not supported" not in cold["note"]
    running = rows["restore: process start to guest running"]
    assert running["pyvmm"] == 300.0 and running["qemu"] is None
    assert f"not supported by QEMU ({BLOCKED})" in running["note"]
    assert rows["snapshot file size"]["pyvmm"] == 512.0
    assert rows["snapshot file on disk"]["pyvmm"] == 1.0
    assert rows["restore to running / cold boot"]["pyvmm"] == 1.5  # 300 ms of 20 s


def test_table_prints_every_row():
    report = {"guest": "debian 6.1", "qemu": "QEMU 10 (Xen emulation)", "where": "here", "runs_per_vmm": 3,
              "rows": bench.summarize(runs_with_qemu_refusing(), ["pyvmm", "qemu"])}
    text = bench.table(report)
    for _, name, *_ in bench.ROWS:
        assert name in text
    assert "n/a" in text and BLOCKED in text
