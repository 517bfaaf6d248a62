"""One QEMU process driven over QMP, for scripts/bench-snapshot: its console
read as it comes (with the time each part arrived), its state saved with
`stop` + `migrate` and loaded back with `-incoming` + `cont`."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

from . import REPO, stop_tree

CONNECT_SECONDS = 30.0
POLL_SECONDS = 0.005


class QmpError(RuntimeError):
    pass


class Qmp:
    """A QMP client: commands with arguments, events kept aside."""

    def __init__(self, path: str, proc: subprocess.Popen, deadline: float):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise QmpError("QEMU's QMP socket never answered") from None
                time.sleep(0.01)
        self.sock.settimeout(CONNECT_SECONDS)
        self.buffer = b""
        self.events: list[dict] = []
        self._message()  # the greeting
        self.command("qmp_capabilities")

    def _message(self) -> dict:
        while b"\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise QmpError("QMP closed")
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)

    def command(self, name: str, **arguments) -> dict:
        """The reply: {"return": ...} or {"error": {"class", "desc"}}."""
        request = {"execute": name}
        if arguments:
            request["arguments"] = arguments
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = self._message()
            if "event" in message:
                self.events.append(message)
            elif "return" in message or "error" in message:
                return message

    def close(self) -> None:
        self.sock.close()


class QemuVm:
    """QEMU started with a `-qmp unix:PATH,server=on,wait=on` command
    (scripts/qemu-xen's), stopped and its output logged on leaving."""

    def __init__(self, command: list[str], qmp_path: str, log_path: Path | None = None):
        self.command, self.log_path = command, log_path
        Path(qmp_path).unlink(missing_ok=True)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, cwd=REPO, start_new_session=True)
        self.console = bytearray()
        self.arrivals: list[tuple[int, float]] = []  # (console length after a read, seconds)
        self.stderr = bytearray()
        self.changed = threading.Condition()
        self.readers = [threading.Thread(target=self._read, args=(self.proc.stdout, True), daemon=True),
                        threading.Thread(target=self._read, args=(self.proc.stderr, False), daemon=True)]
        for reader in self.readers:
            reader.start()
        try:
            self.qmp = Qmp(qmp_path, self.proc, time.monotonic() + CONNECT_SECONDS)
        except (QmpError, OSError, ValueError):
            self.close()
            raise QmpError(f"QEMU did not start: {self.ended()}") from None
        finally:
            Path(qmp_path).unlink(missing_ok=True)

    def __enter__(self) -> "QemuVm":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _read(self, stream, is_console: bool) -> None:
        for data in iter(lambda: stream.read1(65536), b""):
            with self.changed:
                if is_console:
                    self.console += data
                    self.arrivals.append((len(self.console), self.elapsed()))
                else:
                    self.stderr += data
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_console(self, pattern: str, limit: float) -> float | None:
        """Seconds from QEMU's start to the console read that completed the
        first match of `pattern`, waiting up to `limit` seconds from its start;
        None if it never came or QEMU ended first."""
        regex = re.compile(pattern.encode())
        with self.changed:
            while True:
                found = regex.search(self.console)
                if found:
                    return console_arrival(self.arrivals, found.end())
                left = limit - self.elapsed()
                if left <= 0 or (self.proc.poll() is not None and not any(r.is_alive() for r in self.readers)):
                    return None
                self.changed.wait(min(left, 0.5))

    def save(self, uri: str, limit: float) -> dict:
        """Stop the guest and migrate it to `uri`: {"seconds"} from `stop`
        to query-migrate's "completed" (with QEMU's own figures), or {"error"}
        with QEMU's reason (a migration blocker, for one)."""
        begun = time.monotonic()
        stopped = self.qmp.command("stop")
        if "error" in stopped:
            return {"error": stopped["error"].get("desc", "stop failed")}
        reply = self.qmp.command("migrate", uri=uri)
        if "error" in reply:
            return {"error": reply["error"].get("desc", "migrate failed")}
        while time.monotonic() - begun < limit:
            state = self.qmp.command("query-migrate").get("return", {})
            status = state.get("status")
            if status == "completed":
                return {"seconds": time.monotonic() - begun, "qemu_total_ms": state.get("total-time"),
                        "qemu_downtime_ms": state.get("downtime"),
                        "transferred_bytes": state.get("ram", {}).get("transferred")}
            if status in ("failed", "cancelled"):
                return {"error": state.get("error-desc", f"migration {status}")}
            time.sleep(POLL_SECONDS)
        return {"error": f"migration not completed within {limit:.0f} s"}

    def resume_incoming(self, limit: float) -> dict:
        """For QEMU started with -incoming: wait until the state is loaded,
        then `cont` (a guest saved stopped stays paused). {"loaded_ms":
        start to loaded, "running_ms": start to running} or {"error"}."""
        while self.elapsed() < limit:
            try:
                status = self.qmp.command("query-status").get("return", {}).get("status")
            except (QmpError, OSError):
                return {"error": f"incoming migration failed: {self.ended()}"}
            if status != "inmigrate":
                break
            time.sleep(POLL_SECONDS)
        else:
            return {"error": f"incoming migration not done within {limit:.0f} s"}
        loaded = self.elapsed()
        if status != "running":
            reply = self.qmp.command("cont")
            if "error" in reply:
                return {"error": f"cont: {reply['error'].get('desc')}"}
        return {"loaded_ms": round(loaded * 1000, 1), "running_ms": round(self.elapsed() * 1000, 1),
                "loaded_status": status}

    def ended(self) -> str:
        status = self.proc.poll()
        tail = bytes(self.stderr).decode(errors="replace").strip().splitlines()[-3:]
        return ("QEMU running" if status is None else f"QEMU exited with status {status}") + \
            (": " + " | ".join(tail) if tail else "")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.qmp.command("quit")
                self.proc.wait(10)
            except (AttributeError, QmpError, OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            stop_tree(self.proc.pid)
        self.proc.wait()
        for reader in self.readers:
            reader.join(5)
        if getattr(self, "qmp", None) is not None:
            self.qmp.close()
        if self.log_path is not None:
            self.log_path.write_text(f"$ {' '.join(self.command)}\n--- console\n"
                                     f"{bytes(self.console).decode(errors='replace')}\n--- stderr\n"
                                     f"{bytes(self.stderr).decode(errors='replace')}\n"
                                     f"--- status {self.proc.returncode}, {self.elapsed():.1f} s\n")


def console_arrival(arrivals: list[tuple[int, float]], end: int) -> float | None:
    """When the console held its first `end` bytes: the time of the first
    read after which it was at least that long."""
    for length, seconds in arrivals:
        if length >= end:
            return round(seconds, 3)
    return None
