"""What the benchmark scripts (scripts/bench, bench-blk, bench-xen-latency) share:
running one VMM boot with its timings and peak RSS, the commit measured,
and where the guests can run."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]

# scripts/qemu-xen -v reports QEMU's own peak RSS (it is QEMU's parent).
QEMU_PEAK_RSS = re.compile(rb"qemu-xen: QEMU peak RSS (\d+) KiB")


def load_script(name: str) -> ModuleType:
    """A script under scripts/ (no .py suffix) as a module."""
    loader = importlib.machinery.SourceFileLoader(f"pyvmm_script_{name.replace('-', '_')}",
                                                  str(REPO / "scripts" / name))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = module
    loader.exec_module(module)
    return module


def run_vmm(command: list[str], marker: bytes | None = None, limit: float = 3600) -> dict:
    """Run one VMM (`python3 -m pyvmm run ...` or `scripts/qemu-xen ... -v`) to its end.

    Returns its status, console (stdout) and stderr, the wall-clock seconds
    to its end, to its first console output and to `marker` on the console,
    and the VMM process's peak RSS in KiB: ru_maxrss of the pyvmm process
    itself (os.wait4), or the QEMU process's as scripts/qemu-xen reports it.
    `limit` is a last resort; both VMMs have their own --timeout.
    """
    started = time.monotonic()
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO)
    console_fd, stderr_fd = proc.stdout.fileno(), proc.stderr.fileno()
    output = {console_fd: bytearray(), stderr_fd: bytearray()}
    first_output = marker_at = None
    selector = selectors.DefaultSelector()
    for stream in (proc.stdout, proc.stderr):
        selector.register(stream.fileno(), selectors.EVENT_READ)
    while selector.get_map():
        left = limit - (time.monotonic() - started)
        if left <= 0:
            proc.send_signal(signal.SIGKILL)
            break
        for key, _ in selector.select(min(left, 1.0)):
            data = os.read(key.fd, 65536)
            if not data:
                selector.unregister(key.fd)
                continue
            now = time.monotonic() - started
            buffer = output[key.fd]
            buffer += data
            if key.fd == console_fd:
                first_output = first_output if first_output is not None else now
                if marker and marker_at is None and marker in buffer[-len(data) - len(marker):]:
                    marker_at = now
    _, wait_status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(wait_status)
    proc.stdout.close()
    proc.stderr.close()
    stderr = bytes(output[stderr_fd])
    reported = QEMU_PEAK_RSS.search(stderr)
    return {
        "status": proc.returncode,
        "console": bytes(output[console_fd]).decode(errors="replace"),
        "stderr": stderr.decode(errors="replace"),
        "wall_s": round(wall, 2),
        "first_output_s": None if first_output is None else round(first_output, 2),
        "marker_s": None if marker_at is None else round(marker_at, 2),
        "peak_rss_kib": int(reported.group(1)) if reported else usage.ru_maxrss,
    }


def write_log(path: Path, command: list[str], run: dict) -> None:
    path.write_text(f"$ {' '.join(command)}\n--- console\n{run['console']}\n--- stderr\n{run['stderr']}"
                    f"\n--- status {run['status']}, {run['wall_s']:.1f} s, peak RSS {run['peak_rss_kib']} KiB\n")


def git_commit() -> str | None:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, cwd=REPO).stdout.strip()
    return result.stdout.strip() + ("+dirty" if dirty else "")


def can_run_xen_here() -> bool:
    result = subprocess.run([sys.executable, "-m", "pyvmm", "check", "--can-run-xen"],
                            capture_output=True, cwd=REPO)
    return result.returncode == 0
