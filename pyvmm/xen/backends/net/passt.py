"""User networking: a guest NIC on passt, the user-mode network stack
(docs/NETWORKING.md), over a UNIX stream socket (stream.py).

`open_user_network(spec, key)` gives a vif its FrameStream:

- socket=PATH: connected to a passt the user started (`passt -s PATH`,
  with its own -t/-u forwards); it stays running when pyvmm ends.
- otherwise pyvmm starts passt itself: a socketpair, one end handed to
  `passt --foreground --quiet --stderr --fd N` with a -t/-u option per
  hostfwd. passt is ready once it has written its PID file (it binds the
  forwarded ports before); if it exits first, PasstError carries its last
  line, e.g. "Failed to bind any port for '-t 8080:80'" for a port in use.

passt ends with pyvmm whatever the way: with --fd it quits when the socket
reaches end-of-file, which the kernel makes happen when pyvmm's end is
closed, also by SIGKILL (pyvmm's end is close-on-exec, so no other program
holds it). PR_SET_PDEATHSIG (SIGTERM) is asked for besides; passt loses it
when it changes user. Started as root, passt is told to run as nobody
(--runas), which is what it would do anyway.

One passt serves a NIC for the whole run, across guest reboots: a reboot
builds the next boot's devices before closing the last one's (runner.py),
so `open_user_network` hands out the same FrameStream again under the same
key and counts its users; the last `release()` closes the socket and, when
the VMM may still wait for a child (not under the sandbox's lockdown:
pyvmm/sandbox.py), waits for passt to exit (SIGKILL after 2 s). Under the
lockdown it cannot: closing the socket is what ends passt, and the exited
process is reaped by init when pyvmm ends. passt must be started before the
lockdown, which the first boot does.

Threads: everything here runs on the main thread, which builds and closes
the devices (docs/ARCHITECTURE.md, "Threads"); the registry has a lock
anyway.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass

from pyvmm.core.kept import KEPT
from .spec import PASST, PASST_PACKAGE, NicSpec
from .stream import FrameStream

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0  # seconds for passt to be ready (a loaded, emulated test host is slow)
STOP_TIMEOUT = 2.0  # seconds for passt to exit once its socket closed, before SIGKILL
PR_SET_PDEATHSIG = 1


class PasstError(OSError):
    """passt is missing, did not start, or its socket cannot be reached:
    str() is one line for the user."""

    def __init__(self, spec: NicSpec, message: str, code: int = errno.EIO):
        super().__init__(code, message, str(spec.source()))
        self.spec = spec

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


def passt_command(spec: NicSpec, fd: int, pidfile: str, program: str = PASST,
                  runas: tuple[int, int] | None = None) -> list[str]:
    """passt's command line for a NIC `spec`, talking over descriptor `fd`
    (`runas`: the user and group it drops to, started as root)."""
    command = [program, "--foreground", "--quiet", "--stderr", "--fd", str(fd), "--pid", pidfile]
    if runas is not None:
        command += ["--runas", f"{runas[0]}:{runas[1]}"]
    if spec.pcap:
        command += ["--pcap", os.path.abspath(spec.pcap)]
    for forward in spec.hostfwd:
        command += forward.passt_option()
    return command


def _noise(line: str) -> bool:
    # Without a syslog socket (containers, test hosts) passt says so for every message.
    return not line.strip() or (line.startswith("Failed to send ") and line.rstrip().endswith(" to syslog"))


def passt_messages(text: str) -> list[str]:
    """passt's stderr, without its complaints about a missing syslog."""
    return [line.strip() for line in text.splitlines() if not _noise(line)]


def unprivileged_user() -> tuple[int, int]:
    """Who passt runs as when pyvmm is root: nobody, as passt itself would choose."""
    import pwd

    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


def _set_parent_death_signal() -> None:
    # In the child, between fork and exec (the main thread's child: the
    # signal comes when that thread ends, which is when pyvmm does).
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class PasstProcess:
    """A passt started by pyvmm, and the file its stderr goes to."""

    process: subprocess.Popen
    stderr: object  # a file object

    @property
    def pid(self) -> int:
        return self.process.pid

    def messages(self) -> list[str]:
        try:
            self.stderr.seek(0)
            return passt_messages(self.stderr.read().decode(errors="replace"))
        except (OSError, ValueError):
            return []

    def stop(self, may_wait: bool) -> None:
        """The socket is closed already: passt is on its way out."""
        process = self.process
        if may_wait:
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("passt (pid %d) did not exit when its socket closed: killing it", process.pid)
                process.kill()
                process.wait()
        else:
            # Under the lockdown waitpid() is not allowed: init reaps passt once pyvmm
            # ends. Marked done, so that Popen's finaliser does not try either.
            process.returncode = 0
        try:
            self.stderr.close()
        except OSError:
            pass


def start_passt(spec: NicSpec, program: str = PASST) -> tuple[socket.socket, PasstProcess]:
    """Start passt for `spec`: (pyvmm's end of the socket, the process). Raises PasstError."""
    path = shutil.which(program)
    if path is None:
        raise PasstError(spec, f"passt is not installed (not found in PATH); on Debian or Ubuntu: "
                               f"apt install {PASST_PACKAGE}", errno.ENOENT)
    KEPT.check_unlocked("start passt")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    directory = tempfile.mkdtemp(prefix="pyvmm-passt-")
    pidfile = os.path.join(directory, "passt.pid")
    stderr = tempfile.TemporaryFile()
    process = None
    try:
        runas = None
        if os.geteuid() == 0:
            # passt drops to this user before it writes its PID file: the directory must be its.
            runas = unprivileged_user()
            os.chown(directory, *runas)
        command = passt_command(spec, theirs.fileno(), pidfile, path, runas)
        log.debug("starting %s", " ".join(command))
        on_main = threading.current_thread() is threading.main_thread()
        try:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                       pass_fds=(theirs.fileno(),),
                                       preexec_fn=_set_parent_death_signal if on_main else None)
        except OSError as error:
            raise PasstError(spec, f"cannot run {path}: {error.strerror}", error.errno) from None
        theirs.close()
        passt = PasstProcess(process, stderr)
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(pidfile):
            if process.poll() is not None or time.monotonic() > deadline:
                if process.returncode is None:
                    process.kill()
                    process.wait()
                    why = f"it was not ready after {START_TIMEOUT:.0f} s"
                else:
                    messages = passt.messages()
                    why = (messages[-1] if messages else f"it exited with status {process.returncode}")
                    if "bind" in why.lower():
                        why += " (is the port in use?)"
                    elif "interface" in why.lower():
                        why += (" (passt takes the guest's address and gateway from the host's interface with "
                                "the default route: docs/NETWORKING.md)")
                raise PasstError(spec, f"passt did not start: {why}")
            time.sleep(0.005)
        log.info("passt started (pid %d)%s", process.pid,
                 "".join(f", forwarding {forward}" for forward in spec.hostfwd))
        return ours, passt
    except BaseException:
        ours.close()
        theirs.close()
        if process is not None and process.returncode is None:
            process.kill()
            process.wait()
        stderr.close()
        raise
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def connect_passt(spec: NicSpec) -> socket.socket:
    """A connection to the passt listening on spec.socket. Raises PasstError."""
    KEPT.check_unlocked(f"connect to passt at {spec.socket}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(spec.socket)
    except OSError as error:
        sock.close()
        hint = " (start it first: passt -s PATH)" if error.errno in (errno.ENOENT, errno.ECONNREFUSED) else ""
        raise PasstError(spec, f"cannot connect to passt at {spec.socket}: {error.strerror}{hint}",
                         error.errno) from None
    return sock


class UserNetwork:
    """One NIC's passt connection, shared by the boots that use it."""

    def __init__(self, key: tuple, stream: FrameStream, process: PasstProcess | None):
        self.key = key
        self.stream = stream
        self.process = process
        self.users = 0

    def release(self) -> None:
        with _LOCK:
            self.users -= 1
            if self.users > 0:
                return
            _NETWORKS.pop(self.key, None)
        self.stream.close()
        if self.process is not None:
            self.process.stop(may_wait=not KEPT.locked)
            log.info("passt (pid %d) stopped", self.process.pid)


_LOCK = threading.Lock()
_NETWORKS: dict[tuple, UserNetwork] = {}


def open_user_network(spec: NicSpec, key: tuple) -> UserNetwork:
    """The user network for `spec` under `key` (the VM's name and the NIC's
    index): the one already open, or a new passt or connection. Every call
    is matched by one release()."""
    key = (*key, spec.option_text())
    with _LOCK:
        network = _NETWORKS.get(key)
        if network is not None:
            network.users += 1
            return network
    if spec.socket is not None:
        sock, process = connect_passt(spec), None
        name = f"passt at {spec.socket}"
    else:
        sock, process = start_passt(spec)
        name = f"passt (pid {process.pid})"
    network = UserNetwork(key, FrameStream(sock, name), process)
    network.users = 1
    with _LOCK:
        _NETWORKS[key] = network
    return network
