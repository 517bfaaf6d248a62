"""Running pyvmm as a user would (a subprocess), for integration tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 900  # a Linux guest's boot in the loaded testbed, with room to spare


@dataclass
class Result:
    status: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        """The ends of both streams: an assertion's message (pass str(result):
        pytest cuts any other object's repr to one line). A stopped guest's
        diagnosis is in stderr's last lines."""
        return f"status {self.status}\n--- stdout\n{self.stdout[-4000:]}\n--- stderr\n{self.stderr[-12000:]}"


def run_pyvmm(*args: str, timeout: float = 600, stdin: bytes | None = b"") -> Result:
    """`pyvmm ARGS...` with the console on stdout; waits at most `timeout`."""
    proc = subprocess.run(
        [sys.executable, "-m", "pyvmm", *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        cwd=REPO,
    )
    return Result(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))


def host_kvm_runs_linux() -> tuple[bool, str]:
    """Whether this host's /dev/kvm can boot Linux in reasonable time."""
    if not os.path.exists("/dev/kvm"):
        return False, "no /dev/kvm"
    if os.path.exists("/sys/module/kvm_pvm"):
        return False, "/dev/kvm is the software-only kvm_pvm (run the guest tests through scripts/testbed)"
    return True, ""


def require_linux_kvm() -> None:
    ok, why = host_kvm_runs_linux()
    if not ok:
        pytest.skip(why)


def xen_guest_assets() -> dict:
    """The guest kernel and initramfs, or a skip where Xen guests cannot run here."""
    from initrd import GuestAssetsUnavailable, guest_assets

    from pyvmm.hostcheck import probe

    report = probe()
    if not report.can_run_xen:
        pytest.skip(f"this host's KVM cannot run Xen guests (missing {report.missing_xen or 'hardware virtualization'})")
    try:
        return guest_assets()
    except GuestAssetsUnavailable as error:
        pytest.skip(str(error))


class LiveGuest:
    """`pyvmm ARGS...` running in a process group of its own, its console
    (stdout) and log (stderr) collected as they arrive, so that a test can
    act at a given moment of the guest's run: wait for a line, write to the
    console, inspect the disk image, kill the VMM.

    The one harness for driving a live guest; `run_pyvmm` is for runs that
    are only looked at when they end."""

    def __init__(self, args, prefix=(), *, stdin: bool = True):
        """`prefix`: what runs pyvmm, e.g. ("ip", "netns", "exec", NAME);
        `stdin` False: the console reads end-of-file at once."""
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "pyvmm", *args], cwd=REPO,
                                     stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self._output = bytearray()
        self._errors = bytearray()
        self._changed = threading.Condition()
        self._readers = [threading.Thread(target=self._pump, args=(stream, buffer), daemon=True)
                         for stream, buffer in ((self.proc.stdout, self._output), (self.proc.stderr, self._errors))]
        for reader in self._readers:
            reader.start()

    def _pump(self, stream, buffer):
        while chunk := stream.read1(65536):
            with self._changed:
                buffer += chunk
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def stdout(self) -> str:
        with self._changed:
            return self._output.decode(errors="replace")

    @property
    def stderr(self) -> str:
        """pyvmm's whole log so far (str() shows only its end)."""
        with self._changed:
            return self._errors.decode(errors="replace")

    @property
    def lines(self) -> list[str]:
        """The console's lines so far."""
        return [line.rstrip("\r") for line in self.stdout.splitlines()]

    def __str__(self):
        with self._changed:
            return (f"status {self.proc.returncode}\n--- stdout\n{self._output[-4000:].decode(errors='replace')}"
                    f"\n--- stderr\n{self._errors[-4000:].decode(errors='replace')}")

    def wait_for(self, pattern, timeout=BOOT_TIMEOUT, *, stderr: bool = False):
        """The first match of the regular expression `pattern` (bytes
        groups) on the console, or with `stderr` in pyvmm's log; fails the
        test if the VMM ends or `timeout` passes first."""
        regex = re.compile(pattern.encode())
        buffer = self._errors if stderr else self._output
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                match = regex.search(buffer)
                if match:
                    return match
                if self.proc.poll() is not None and not any(r.is_alive() for r in self._readers):
                    pytest.fail(f"the guest ended before printing {pattern!r}:\n{self}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no {pattern!r} within {timeout} s:\n{self}")
                self._changed.wait(1)

    def send(self, data: bytes):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def finish(self, timeout=BOOT_TIMEOUT):
        """Close the console's input and wait for the VMM's exit status."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        status = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(10)
        return status

    def kill(self):
        """SIGKILL to the whole process group: nothing of pyvmm survives."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        status = self.proc.wait(60)
        for reader in self._readers:
            reader.join(10)
        return status

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.kill()
