"""What the benchmark scripts (scripts/bench, bench-blk, bench-xen-latency) and
scripts/soak share: running one VMM boot with its timings and peak RSS, the
commit measured, where the guests can run and what they run on."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import selectors
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

REPO = Path(__file__).resolve().parents[2]

# scripts/qemu-xen -v reports QEMU's own peak RSS (it is QEMU's parent).
QEMU_PEAK_RSS = re.compile(rb"qemu-xen: QEMU peak RSS (\d+) KiB")


# Linux's printk line when it starts the first userspace program, with its
# own timestamp (CONFIG_PRINTK_TIME): the guest's clock at /init, whatever
# the VMM's start-up cost before the guest ran.
GUEST_INIT_LINE = re.compile(r"^\[\s*(\d+\.\d+)\] Run (\S+) as init process", re.MULTILINE)


def guest_clock_init_s(console: str) -> float | None:
    """The guest kernel's timestamp (seconds of its own clock) of the line
    `Run /init as init process`, or None if the console has none."""
    found = GUEST_INIT_LINE.search(console)
    return float(found.group(1)) if found else None


def vmm_startup_s(stats_json: Path) -> float | None:
    """pyvmm's start-up (process start to first KVM_RUN) from a `pyvmm run
    --stats-json` file, or None when the file is missing or has none."""
    import json

    try:
        startup = json.loads(stats_json.read_text()).get("startup_ns")
    except (OSError, ValueError, AttributeError):
        return None
    return None if startup is None else round(startup / 1e9, 3)


def load_script(name: str) -> ModuleType:
    """A script under scripts/ (no .py suffix) as a module."""
    loader = importlib.machinery.SourceFileLoader(f"pyvmm_script_{name.replace('-', '_')}",
                                                  str(REPO / "scripts" / name))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = module
    loader.exec_module(module)
    return module


def run_vmm(command: list[str], marker: bytes | None = None, limit: float = 3600, *,
            stall: float | None = None, progress: re.Pattern | None = None,
            on_console: Callable[[bytes, float], bytes | None] | None = None, grace: float = 10.0,
            console_input: bool = False, before_stop: Callable[[int], str] | None = None) -> dict:
    """Run one VMM (`python3 -m pyvmm run ...` or `scripts/qemu-xen ... -v`) to its end.

    Returns its status, console (stdout) and stderr, the wall-clock seconds
    to its end, to its first console output and to `marker` on the console,
    and the VMM process's peak RSS in KiB: ru_maxrss of the pyvmm process
    itself (os.wait4), or the QEMU process's as scripts/qemu-xen reports it.
    `limit` is a last resort; both VMMs have their own --timeout. With
    `stall`, a VMM whose console has been silent that many seconds is
    stopped too; with `progress` as well, once the console has shown that
    pattern (a guest's heartbeat) only new matches count as output, so a
    kernel that keeps printing stall reports is not taken for progress. A stopped VMM loses its whole process tree (SIGTERM, then
    SIGKILL after `grace` seconds), QEMU under scripts/qemu-xen included; "stopped" says why
    ("limit", "stall") or is None. `on_console(data, seconds)` sees the
    console as it arrives; with `console_input`, the VMM's stdin is a pipe
    (kept open to the end) and the bytes on_console returns are typed there.
    `before_stop(pid)`, called before a stop for the limit or a stall, returns
    text for the end of the stderr (what the VMM can still say about its
    guest, e.g. `pyvmm ctl NAME diagnose`).
    """
    started = time.monotonic()
    proc = subprocess.Popen(command, stdin=subprocess.PIPE if console_input else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    console_fd, stderr_fd = proc.stdout.fileno(), proc.stderr.fileno()
    output = {console_fd: bytearray(), stderr_fd: bytearray()}
    first_output = marker_at = stopped = None
    last_output = 0.0
    progressing = False  # `progress` seen at least once
    selector = selectors.DefaultSelector()
    for stream in (proc.stdout, proc.stderr):
        selector.register(stream.fileno(), selectors.EVENT_READ)
    while selector.get_map():
        now = time.monotonic() - started
        left = limit - now
        if stall is not None:
            left = min(left, stall - (now - last_output))
        if left <= 0:
            stopped = "limit" if now >= limit else "stall"
            if before_stop is not None:
                try:
                    said = before_stop(proc.pid)
                except Exception as error:  # the report is a bonus; the stop must happen
                    said = f"failed: {error!r}"
                output[stderr_fd] += f"\n--- before the stop ({stopped}):\n{said}\n".encode()
            stop_tree(proc.pid, grace)
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
                matched = progress is not None and progress.search(bytes(buffer[-(len(data) + 256):]))
                if matched or not progressing:
                    last_output = now
                progressing = progressing or bool(matched)
                if marker and marker_at is None and marker in buffer[-len(data) - len(marker):]:
                    marker_at = now
                if on_console is not None:
                    typed = on_console(data, now)
                    if typed and console_input:
                        _type(proc, typed)
    selector.close()
    if proc.stdin is not None:
        try:
            proc.stdin.close()
        except OSError:
            pass
    reaped = _reap(proc.pid, REAP_SECONDS)
    if reaped is None:  # it closed its streams (or was stopped) and lingers on
        stop_tree(proc.pid, grace)
        reaped = _reap(proc.pid, REAP_SECONDS)
    unstoppable = None
    if reaped is None:
        # Unkillable: a thread stuck in the kernel. What each one waits for
        # is the only evidence there will be; the caller decides what next.
        unstoppable = stuck_report([proc.pid] + descendants(proc.pid))
        output[stderr_fd] += (f"\n--- not gone {REAP_SECONDS:.0f} s after SIGKILL; its threads in the kernel:\n"
                              f"{unstoppable}\n").encode()
    wall = time.monotonic() - started
    proc.returncode = None if reaped is None else os.waitstatus_to_exitcode(reaped[0])
    proc.stdout.close()
    proc.stderr.close()
    stderr = bytes(output[stderr_fd])
    reported = QEMU_PEAK_RSS.search(stderr)
    return {
        "status": proc.returncode,
        "unstoppable": unstoppable,
        "console": bytes(output[console_fd]).decode(errors="replace"),
        "stderr": stderr.decode(errors="replace"),
        "wall_s": round(wall, 2),
        "first_output_s": None if first_output is None else round(first_output, 2),
        "marker_s": None if marker_at is None else round(marker_at, 2),
        "peak_rss_kib": int(reported.group(1)) if reported else (reaped[1].ru_maxrss if reaped else None),
        "stopped": stopped,
    }


REAP_SECONDS = 60.0  # a VMM that closed its streams, or was SIGKILLed, has this long to be gone


def _reap(pid: int, seconds: float):
    """(wait status, rusage) of child `pid` once it has ended, or None if
    it has not within `seconds` (a process stuck in the kernel cannot be
    reaped, and waiting for it would hang the caller for good)."""
    deadline = time.monotonic() + seconds
    while True:
        done, wait_status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return wait_status, usage
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def stuck_report(pids: list[int]) -> str:
    """Each thread of `pids`: its name, state, what it waits in (wchan) and
    its kernel stack (root only), from /proc."""
    lines = []
    for pid in pids:
        for task in sorted(Path(f"/proc/{pid}/task").glob("*"), key=lambda path: int(path.name)):
            def read(name: str) -> str:
                try:
                    return (task / name).read_text().strip()
                except OSError as error:
                    return f"({error.strerror})"
            stat = read("stat")
            state = _state(stat) if ")" in stat else "?"
            lines.append(f"{pid}/{task.name} {read('comm')} state {state} wchan {read('wchan')}")
            lines += ["    " + frame for frame in read("stack").splitlines()[:24]]
    return "\n".join(lines) or "(none left in /proc)"


def _type(proc: subprocess.Popen, data: bytes) -> None:
    """A few bytes for the guest's console; a VMM that has stopped reading is no error."""
    try:
        proc.stdin.write(data)
        proc.stdin.flush()
    except (BrokenPipeError, OSError):
        pass


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (children first, then theirs), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses.
        parent = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def stop_tree(pid: int, grace: float = 10.0) -> None:
    """SIGTERM `pid` and every process below it (a VMM's helpers, QEMU in
    its own session), then SIGKILL whatever is left after `grace` seconds,
    and wait (as long again at most) until it is gone. The caller reaps
    `pid` itself."""
    tree = [pid] + descendants(pid)
    for target in tree:
        _signal(target, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        tree = [target for target in tree if _alive(target)]
        if not tree:
            return
        time.sleep(0.2)
    tree += descendants(pid)
    for target in tree:
        _signal(target, signal.SIGKILL)
    deadline = time.monotonic() + grace  # SIGKILL takes effect asynchronously
    while any(_alive(target) for target in tree) and time.monotonic() < deadline:
        time.sleep(0.05)


def _signal(pid: int, number: int) -> None:
    try:
        os.kill(pid, number)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    """Running and not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return _state(stat) != "Z"


def _state(stat: str) -> str:
    """The state letter of a /proc stat line: its comm may hold spaces and parentheses."""
    return stat[stat.rindex(")") + 2]


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


def byte_compile_pyvmm() -> None:
    """Measure pyvmm as installed: with its modules byte-compiled, as pip and
    distribution packages leave them (a PYTHONDONTWRITEBYTECODE environment
    would otherwise make every start compile them all from source)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "pyvmm")], check=True)


def qemu_version() -> str:
    qemu = os.environ.get("PYVMM_QEMU", "qemu-system-x86_64")
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return "(not found)"
    return out.split("\n")[0].replace("QEMU emulator version ", "") or "(unknown)"


def host_cpu() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


# --- the rows' table (scripts/bench-snapshot, scripts/bench-image) ----------------------------

def median_of(values) -> float | None:
    """The median of the values that are not None; None if there are none."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"


def rows_table(title: str, rows: list[dict]) -> str:
    """`title`, then one line per row: name, unit, pyvmm, QEMU, their ratio, note."""
    header = ["row", "unit", "pyvmm", "QEMU", "pyvmm/QEMU", "note"]
    lines = [[r["name"], r["unit"], fmt(r["pyvmm"]), fmt(r["qemu"]),
              "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}", r["note"]] for r in rows]
    widths = [max(len(line[i]) for line in [header] + lines) for i in range(len(header))]
    rule = "  ".join("-" * w for w in widths)
    out = [title, rule, "  ".join(c.ljust(w) for c, w in zip(header, widths)), rule]
    for line in lines:
        out.append("  ".join(c.rjust(w) if 2 <= i <= 4 else c.ljust(w)
                             for i, (c, w) in enumerate(zip(line, widths))).rstrip())
    out.append(rule)
    return "\n".join(out)
