"""scripts/bench-image's console clock, results and table, the commands it
runs, and scripts/qemu-xen's firmware boot (no guests, no KVM, no QEMU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

from benchlib import load_script, run_vmm  # noqa: E402

bench = load_script("bench-image")
qemu_xen = load_script("qemu-xen")

# The console of a boot, in the order the markers come (taken from a boot
# of the image under QEMU; the prompt carries bash's bracketed-paste escape).
CONSOLE = [
    (0.5, b"\x1b[2JSeaBIOS (version 1.16.3)\r\nBooting from Hard "),
    (0.6, b"Disk...\r\nGRUB loading.\r\n"),
    (1.0, b"pyvmm-image: entry pyvmm-d from grubenv\r\n\r\nLoading /vmlinuz ...\r\n"),
    (9.0, b"[    0.000000] Linux version 6.1.0-57-cloud-amd64 (debian-kernel@lists.debian.org)\r\n"),
    (30.0, b"Debian GNU/Linux 12 pyvmm-image ttyS0\r\n\r\npyvmm-image login: root (automatic login)\r\n"),
    (31.0, b"[   38.6] pyvmm-check[273]: pyvmm-check: ok root=/dev/xvda1 fstype=ext4 disks=xvda "
           b"drivers=xen_blkfront hypervisor=xen multi-user=active boot=1 boot_id=b\r\n"),
    (32.0, b"\x1b[?2004hroot@pyvmm-image:~# "),
]


def feed(clock, parts):
    return [clock.feed(data, seconds) for seconds, data in parts]


def test_each_marker_is_timed_at_its_first_match_even_across_reads():
    clock = bench.ConsoleClock()
    typed = feed(clock, CONSOLE)
    assert clock.seen == {"seabios_s": 0.6, "grub_s": 1.0, "kernel_s": 9.0, "login_s": 30.0, "check_s": 31.0}
    assert typed == [None] * 6 + [b"poweroff\n"]
    assert clock.typed == [32.0]
    # A second prompt (the PV console's getty) is not a reason to type again.
    assert clock.feed(b"\r\nroot@pyvmm-image:~# ", 33.0) is None


def test_poweroff_is_typed_again_only_while_the_guest_stays_up():
    clock = bench.ConsoleClock()
    feed(clock, CONSOLE)
    assert clock.feed(b"still here\r\n", 32.0 + bench.RETYPE_SECONDS - 1) is None
    assert clock.feed(b"still here\r\n", 32.0 + bench.RETYPE_SECONDS) == b"poweroff\n"
    assert clock.feed(b"[  99.0] reboot: Power down\r\n", 32.0 + 3 * bench.RETYPE_SECONDS) is None
    assert len(clock.typed) == 2


def vmm_run(console: bytes, status=0, wall=40.0, stopped=None):
    return {"status": status, "console": console.decode(), "stderr": "", "wall_s": wall,
            "first_output_s": 0.5, "marker_s": None, "peak_rss_kib": 204800, "stopped": stopped}


def test_a_boot_to_power_off_gives_every_figure():
    clock = bench.ConsoleClock()
    feed(clock, CONSOLE)
    console = b"".join(data for _, data in CONSOLE) + b"\r\n[ 50.0] reboot: Power down\r\n"
    result = bench.run_result("pyvmm", 1, vmm_run(console), clock)
    assert "error" not in result, result
    assert result["end_s"] == 40.0 and result["typed_s"] == 32.0 and result["shutdown_s"] == 8.0
    assert result["root"] == "/dev/xvda1"
    assert result["login_s"] == 30.0


def test_a_boot_that_never_powered_off_or_missed_a_marker_is_an_error():
    clock = bench.ConsoleClock()
    feed(clock, CONSOLE[:4])  # up to the kernel's first line, then stopped
    console = b"".join(data for _, data in CONSOLE[:4])
    result = bench.run_result("qemu", 1, vmm_run(console, status=-15, wall=960.0, stopped="limit"), clock)
    assert result["end_s"] is None and "shutdown_s" not in result
    assert "stopped (limit)" in result["error"] and "no power-off" in result["error"]
    assert "check_s" in result["error"] and "login_s" in result["error"]


def runs():
    return ([{"vmm": "pyvmm", "round": n, "seabios_s": s, "login_s": login, "end_s": login + 20,
              "shutdown_s": 20.0, "peak_rss_kib": 200 << 10, "root": "/dev/xvda1"}
             for n, s, login in ((1, 2.0, 300.0), (2, 4.0, 340.0))]
            + [{"vmm": "qemu", "round": n, "seabios_s": 1.0, "login_s": 100.0, "end_s": 110.0,
                "shutdown_s": 10.0, "peak_rss_kib": 100 << 10, "root": "/dev/xvda1"} for n in (1, 2)])


def test_rows_hold_medians_ratios_and_the_root_device():
    rows = {r["name"]: r for r in bench.summarize(runs(), ["pyvmm", "qemu"])}
    assert len(rows) == len(bench.ROWS)
    login = rows["image boot: to the login prompt"]
    assert (login["pyvmm"], login["qemu"], login["ratio"]) == (320.0, 100.0, 3.2)
    assert rows["image boot: to SeaBIOS 'Booting from Hard Disk'"]["ratio"] == 3.0
    assert rows["peak RSS of the VMM: image boot"]["pyvmm"] == 200.0
    assert rows["image boot: to the kernel's 'Linux version'"]["pyvmm"] is None
    assert "pyvmm root /dev/xvda1" in rows["image boot: to 'pyvmm-check: ok'"]["note"]
    text = bench.table({"rows": bench.summarize(runs(), ["pyvmm", "qemu"]), "qemu": "QEMU 10",
                        "where": "here", "runs_per_vmm": 2})
    assert "3.20" in text and "n/a" in text


def test_a_vmm_not_run_leaves_its_column_empty():
    rows = bench.summarize([r for r in runs() if r["vmm"] == "pyvmm"], ["pyvmm"])
    assert all(r["qemu"] is None and r["ratio"] is None for r in rows)


def test_pyvmm_boots_the_copy_through_the_firmware():
    command = bench.pyvmm_command(Path("/tmp/c.raw"), 900)
    assert command[1:5] == ["-m", "pyvmm", "run", "/tmp/c.raw"]
    assert "--kernel" not in command and "--disk" not in command
    assert command[command.index("--memory") + 1] == "1024M"
    assert command[command.index("--vcpus") + 1] == "2"
    assert "--no-reboot" in command


def test_qemu_boots_the_same_file_from_ide_and_as_xen_disk():
    command = bench.qemu_command(Path("/tmp/c.raw"), "xen", Path("/tmp/hvc0.log"))
    assert command[command.index("-accel") + 1].startswith("kvm,xen-version=0x40011,kernel-irqchip=split")
    assert command[command.index("-machine") + 1] == "pc,graphics=off"
    assert "-kernel" not in command and "-append" not in command and "-qmp" not in command
    drives = [command[i + 1] for i, word in enumerate(command) if word == "-drive"]
    assert all(d.startswith("file=/tmp/c.raw,format=raw,file.locking=off,") for d in drives), drives
    assert any("if=ide,index=0" in d for d in drives) and any("id=bootdisk" in d for d in drives)
    assert "xen-disk,drive=bootdisk,vdev=xvda" in command
    # COM1 alone on stdio, so what is typed reaches ttyS0; hvc0 to a file.
    assert "stdio,id=console,signal=off" in command and "mux=on" not in " ".join(command)
    assert "file,id=pvconsole,path=/tmp/hvc0.log" in command
    assert command[command.index("-smp") + 1] == "2" and command[command.index("-m") + 1] == "1024"


def test_qemu_without_xen_keeps_the_ide_disk_only():
    command = bench.qemu_command(Path("/tmp/c.raw"), "tcg", Path("/tmp/hvc0.log"))
    assert command[command.index("-accel") + 1] == "tcg"
    assert command[command.index("-cpu") + 1] == "max"
    assert not any(word.startswith("xen-") or "bootdisk" in word or "pvconsole" in word for word in command)
    assert [command[i + 1] for i, w in enumerate(command) if w == "-drive"] == [
        "file=/tmp/c.raw,format=raw,file.locking=off,if=ide,index=0,media=disk"]


def test_qemu_xen_boot_disk_takes_no_kernel_and_comes_first_among_pv_disks():
    args = qemu_xen.parse_args(["--boot-disk", "a.raw", "--disk", "b.raw"])
    assert args.disk[0]["vdev"] == "xvdb" and args.append is None
    with pytest.raises(SystemExit):
        qemu_xen.parse_args(["--boot-disk", "a.raw", "--append", "quiet"])
    with pytest.raises(SystemExit):
        qemu_xen.parse_args(["--kernel", "k", "--pv-console-log", "f"])
    kernel = qemu_xen.qemu_command(qemu_xen.parse_args(["--kernel", "k"]), "S")
    assert kernel[kernel.index("-append") + 1] == "console=hvc0" and "-qmp" in kernel


# A console that needs an answer: prints a prompt, reads a line, echoes it.
ASKS = r"""
import sys
print("root@pyvmm-image:~# ", end="", flush=True)
line = sys.stdin.readline()
print("got " + line.strip(), flush=True)
sys.exit(0 if line == "poweroff\n" else 4)
"""


def test_run_vmm_types_what_the_console_callback_returns():
    clock = bench.ConsoleClock(markers=[])
    run = run_vmm([sys.executable, "-c", ASKS], limit=60, on_console=clock.feed, console_input=True)
    assert run["status"] == 0, run
    assert "got poweroff" in run["console"]
    assert len(clock.typed) == 1


def test_without_console_input_the_vmm_reads_end_of_file():
    run = run_vmm([sys.executable, "-c", ASKS], limit=60, on_console=lambda data, seconds: b"poweroff\n")
    assert run["status"] == 4


def test_scripts_bench_shows_the_image_rows_even_when_not_run():
    whole = load_script("bench")
    rows = whole.summarize({"boot": [], "latency": [], "blk": []}, {}, None, {"available": False,
                                                                               "reason": "--no-image"})
    image = [r for r in rows if r["name"].startswith("image ")]
    assert len(image) == len(bench.ROWS) - 1  # and the RSS row, among bench's RSS rows
    assert all(r["note"] == "not available: --no-image" for r in image)
    assert "peak RSS of the VMM: image boot" in {r["name"] for r in rows}


class _UnkillableQemu:
    """A QEMU that SIGTERM and SIGKILL do not end (stuck in the kernel)."""

    pid = 2**22 + 1  # no such process: the report says so

    def __init__(self):
        self.signals = []

    def poll(self):
        return None

    def terminate(self):
        self.signals.append("TERM")

    def kill(self):
        self.signals.append("KILL")

    def wait(self, timeout=None):
        assert timeout is not None, "an unbounded wait for a QEMU stuck in the kernel never returns"
        raise qemu_xen.subprocess.TimeoutExpired("qemu", timeout)


def test_qemu_xen_stop_gives_up_on_a_qemu_it_cannot_end(monkeypatch, capsys):
    monkeypatch.setattr(qemu_xen, "KILL_WAIT_SECONDS", 0.01)
    monkeypatch.setattr(qemu_xen, "STOP_GRACE_SECONDS", 0.01)
    qemu = _UnkillableQemu()
    assert qemu_xen.stop(qemu) is False
    assert qemu.signals == ["TERM", "KILL"]
    assert "could not be stopped" in capsys.readouterr().err
