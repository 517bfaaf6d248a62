"""The host side of a testbed run: starts QEMU with L1, relays the command's I/O.

Channels between the host and QEMU are socketpairs handed over as file
descriptors, so nothing is created in the file system:
- the L1 serial console (kernel messages, init's errors) is kept as a log;
- one virtio-serial port carries framed messages to and from the L1 agent;
- QEMU's human monitor, asked for L1's registers when L1 stops responding.
"""

import bisect
import ctypes
import errno
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import termios
import time
import tty
import zlib

from pyvmm_testbed import wire

FATAL_MARKER = b"PYVMM-TESTBED-FATAL: "
CONSOLE_TAIL_LINES = 25
CONSOLE_KEEP_BYTES = 256 << 10
STDIN_WINDOW = 1 << 20          # stdin bytes in flight before the agent acknowledges
OUTPUT_BACKLOG_LIMIT = 4 << 20  # stop reading from L1 while this much output is unwritten
READ_CHUNK = 65536
WRITE_CHUNK = 4096              # at most PIPE_BUF: a writable pipe takes it without blocking
# The agent says it is alive every 10 s; this long without a word from it
# (while its command runs) means L1 froze: seen with both vCPUs busy in TCG
# and no console output for 10 minutes, no soft-lockup report either.
DEFAULT_L1_SILENCE = 180.0
MONITOR_WAIT = 10.0             # for QEMU's monitor to answer "info registers"
# L1's kernel reports a task stuck in the kernel every 120 s. Seen in CI:
# khugepaged blocked for 20 minutes while the command (a guest test) neither
# ended nor timed out (its VMM could not be killed), L1's agent still
# speaking. At the first report L1 puts its blocked tasks' stacks and its
# CPUs' backtraces on the console; a task blocked this long means L1 is stuck.
HUNG_TASK = re.compile(rb"INFO: task (\S+) blocked for more than (\d+) seconds")
L1_STUCK_SECONDS = 240
STACKS_WAIT = 15.0              # for L1's console to print the stacks asked for

# Variables describing things of the caller's session that do not exist in L1.
DROPPED_ENVIRONMENT = frozenset({
    "DISPLAY", "WAYLAND_DISPLAY", "XAUTHORITY",
    "SSH_AUTH_SOCK", "SSH_AGENT_PID", "SSH_CONNECTION", "SSH_CLIENT", "SSH_TTY",
    "GPG_AGENT_INFO", "DBUS_SESSION_BUS_ADDRESS", "XDG_RUNTIME_DIR", "XDG_SESSION_ID",
    "TMUX", "TMUX_PANE", "STY", "WINDOWID",
    "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET",
    "INVOCATION_ID", "JOURNAL_STREAM",
})

XEN_HVM_FLAGS = (
    "HYPERCALL_MSR", "INTERCEPT_HCALL", "SHARED_INFO", "RUNSTATE", "EVTCHN_2LEVEL",
    "EVTCHN_SEND", "RUNSTATE_UPDATE_FLAG", "PVCLOCK_TSC_UNSTABLE", "SHARED_INFO_HVA",
)
XEN_REQUIRED = ("INTERCEPT_HCALL", "SHARED_INFO")


class TestbedError(Exception):
    """The testbed itself failed (exit status 125)."""


class TimedOut(Exception):
    pass


class Interrupted(Exception):
    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


# -- pure helpers -------------------------------------------------------------

def git_toplevel(directory):
    """The nearest directory at or above `directory` holding .git, else None."""
    while True:
        if os.path.exists(os.path.join(directory, ".git")):
            return directory
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent


def writable_paths(cwd, extra):
    """Host directories exported read-write: the git top-level (or cwd) and --rw paths.

    The root directory is never exported writable: that would undo the read-only root.
    """
    paths = []
    for path in [git_toplevel(cwd) or cwd] + list(extra):
        path = os.path.realpath(path)
        if path != "/" and path not in paths:
            paths.append(path)
    return paths


def is_within(path, directory):
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def job_environment(environ, writable):
    """The caller's environment minus what makes no sense inside L1."""
    env = {key: value for key, value in environ.items() if key not in DROPPED_ENVIRONMENT}
    tmpdir = env.get("TMPDIR")
    # L1's /tmp starts empty; a TMPDIR elsewhere exists inside only if exported writable.
    if tmpdir and tmpdir.rstrip("/") != "/tmp" and not any(is_within(tmpdir, p) for p in writable):
        del env["TMPDIR"]
    return env


def terminal_plan(stdin_tty, stdout_tty, stderr_tty):
    """Which of the command's stdin/stdout/stderr get L1's terminal.

    Only with a terminal on stdin; then stdout and stderr each follow the caller's.
    """
    if not stdin_tty:
        return {"stdin": False, "stdout": False, "stderr": False}
    return {"stdin": True, "stdout": stdout_tty, "stderr": stderr_tty}


def qemu_option_value(text):
    """Escapes a value for QEMU's comma-separated option syntax."""
    return text.replace(",", ",,")


# How L1's idle CPUs wait (--l1-idle): the kernel's own "halt" until the
# guest suite has run green with "poll" (docs/TESTBED.md).
DEFAULT_L1_IDLE = "halt"
# Transparent huge pages in L1 (--l1-thp): Debian's kernel has them "always"
# on, so khugepaged collapses the VMMs' guest RAM behind L1's KVM, which
# then flushes its nested page tables (docs/TESTBED.md, "A stuck L1").
DEFAULT_L1_THP = "always"


def kernel_command_line(python, quiet=True, idle=DEFAULT_L1_IDLE, thp=DEFAULT_L1_THP):
    if any(character.isspace() for character in python) or not python.isprintable():
        raise TestbedError("the Python interpreter's path %r contains blanks or control "
                           "characters; the L1 kernel command line cannot carry it" % python)
    # mitigations=off: the CPU is emulated, the mitigations only cost time.
    # nokaslr: the addresses QEMU's monitor reports for a frozen L1 then match the kallsyms of an earlier run.
    # idle=poll: L1's idle CPUs spin instead of halting, so nothing depends
    # on the emulator waking a halted CPU for an interrupt (docs/TESTBED.md).
    return "console=ttyS0 %spanic=-1 mitigations=off nokaslr %s%spyvmm.python=%s" % (
        "quiet " if quiet else "", "idle=poll " if idle == "poll" else "",
        "" if thp == DEFAULT_L1_THP else "transparent_hugepage=%s " % thp, python)


def qemu_command(qemu, vmlinuz, initramfs, memory, cpus, python, console_fd, agent_fd, writable,
                 quiet=True, monitor_fd=None, tcg_threads="multi", idle=DEFAULT_L1_IDLE, thp=DEFAULT_L1_THP):
    command = [
        qemu, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-machine", "pc", "-accel", "tcg,thread=%s" % tcg_threads, "-cpu", "EPYC,+svm",
        "-smp", str(cpus), "-m", str(memory),
        "-kernel", vmlinuz, "-initrd", initramfs, "-append", kernel_command_line(python, quiet, idle, thp),
        "-chardev", "socket,id=console,fd=%d" % console_fd, "-serial", "chardev:console",
        "-device", "virtio-serial-pci,id=agentbus",
        "-chardev", "socket,id=agent,fd=%d" % agent_fd,
        "-device", "virtserialport,bus=agentbus.0,chardev=agent,name=org.pyvmm.testbed",
        "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
    ]
    if monitor_fd is not None:
        command += ["-chardev", "socket,id=monitor,fd=%d" % monitor_fd, "-mon", "chardev=monitor,mode=readline"]
    for index, path in enumerate(writable):
        command += ["-fsdev", "local,id=rw%d,path=%s,security_model=none"
                    % (index, qemu_option_value(path)),
                    "-device", "virtio-9p-pci,fsdev=rw%d,mount_tag=rw%d" % (index, index)]
    return command


def xen_flag_names(bits):
    names = [name for index, name in enumerate(XEN_HVM_FLAGS) if bits & (1 << index)]
    unknown = bits & ~((1 << len(XEN_HVM_FLAGS)) - 1)
    if unknown:
        names.append("unknown %#x" % unknown)
    return names


def xen_usable(bits):
    return all(bits & (1 << XEN_HVM_FLAGS.index(name)) for name in XEN_REQUIRED)


def console_tail(log, lines=CONSOLE_TAIL_LINES):
    text = log.decode(errors="replace").replace("\r", "")
    return [line for line in text.splitlines() if line.strip()][-lines:]


def read_symbols(path):
    """A kernel's text symbols from a System.map or /proc/kallsyms copy:
    sorted [(address, name)], a module's names as "name [module]"."""
    symbols = []
    try:
        with open(path) as file:
            for line in file:
                fields = line.split()
                if len(fields) >= 3 and fields[1] in ("t", "T"):
                    symbols.append((int(fields[0], 16), " ".join(fields[2:])))
    except (OSError, ValueError):
        return []
    symbols.sort()
    return symbols


def symbolize(address, symbols):
    """'name+0xoff' for a kernel text address, None outside the map."""
    index = bisect.bisect_right(symbols, (address, "\uffff")) - 1
    if index < 0 or not symbols or address > symbols[-1][0] + (1 << 20):
        return None
    start, name = symbols[index]
    return "%s+%#x" % (name, address - start)


def cpu_summary(registers, symbols):
    """One line per vCPU from QEMU's "info registers -a": where it was, and
    whether halted; kernel addresses named from L1's symbols (a vCPU
    that was running an L2 guest shows the guest's registers: the monitor
    cannot tell them apart, so such a name can be wrong)."""
    lines = []
    for block in re.split(r"(?m)^CPU#", registers)[1:]:
        number = block.split("\n", 1)[0].strip()
        rip = re.search(r"[RE]IP=([0-9a-f]+)", block)
        halted = re.search(r"HLT=(\d)", block)
        cpl = re.search(r"CPL=(\d)", block)
        if not rip:
            continue
        address = int(rip.group(1), 16)
        where = symbolize(address, symbols) if address >= 0xffff800000000000 else None
        lines.append("vCPU %s at %#x%s, CPL %s%s" % (
            number, address, " (%s)" % where if where else "", cpl.group(1) if cpl else "?",
            ", halted" if halted and halted.group(1) == "1" else ""))
    return lines


def fatal_reason(log):
    """The reason L1's init gave for stopping, if it gave one."""
    for line in reversed(log.replace(b"\r", b"").split(b"\n")):
        index = line.find(FATAL_MARKER)
        if index >= 0:
            return line[index + len(FATAL_MARKER):].decode(errors="replace").strip()
    return None


# -- the run --------------------------------------------------------------------

class Output:
    """Bytes waiting to be written to one of the caller's file descriptors."""

    def __init__(self, fd):
        self.fd = fd
        self.pending = bytearray()
        self.broken = False


def _die_with_parent():
    # QEMU must not outlive us even if we are killed with SIGKILL.
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1

    def arm():
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    return arm


class Run:
    def __init__(self, artifacts, job, memory, cpus, writable, timeout, boot_timeout, say, verbose,
                 silence=None, tcg_threads="multi", idle=DEFAULT_L1_IDLE, thp=DEFAULT_L1_THP):
        self.artifacts = artifacts
        self.job = job
        self.memory, self.cpus, self.writable = memory, cpus, writable
        self.timeout, self.boot_timeout = timeout, boot_timeout
        self.say, self.verbose = say, verbose
        self.console_log = bytearray()
        self.monitor_log = bytearray()  # kept after the console in a failed run's log
        self.qemu_errors = bytearray()
        self.decoder = wire.Decoder()
        self.to_agent = bytearray()
        self.stdin_in_flight = 0
        self.stdin_done = False
        self.outputs = {}
        self.exit_status = None
        self.check_result = None
        self.booted_at = None
        self.started_at = None
        self.terminal_saved = None
        self.tty_fd = None
        self.qemu = None
        self.silence = DEFAULT_L1_SILENCE if silence is None else silence  # 0: never give up on L1
        self.last_word = None       # when the agent last sent anything
        self.l1_load = b""          # L1's /proc/loadavg, from its last ALIVE
        self.monitor = None
        self.console_partial = b""  # the console's last line, until its end arrives
        self.stacks_asked = False
        self.stuck = None           # (reason, when to give up on L1) once L1's kernel says it is stuck
        self.tcg_threads = tcg_threads
        self.idle = idle  # L1's idle loop: "poll" or "halt" (the kernel's own default)
        self.thp = thp    # L1's transparent huge pages: "always" (Debian's) or "never"

    # -- output routing --

    def _output(self, fd):
        if fd not in self.outputs:
            self.outputs[fd] = Output(fd)
        return self.outputs[fd]

    def _terminal_output_fd(self):
        plan = self.job.get("tty") or {}
        if plan.get("stdout"):
            return 1
        if plan.get("stderr"):
            return 2
        if self.tty_fd is None:
            try:
                self.tty_fd = os.open("/dev/tty", os.O_WRONLY | os.O_NOCTTY)
            except OSError:
                self.tty_fd = 2
        return self.tty_fd

    def _backlog(self):
        return sum(len(output.pending) for output in self.outputs.values())

    # -- frames from the agent --

    def _handle_frame(self, kind, payload):
        self.last_word = time.monotonic()
        if kind == wire.ALIVE:
            self.l1_load = payload
        elif kind == wire.KALLSYMS:
            self._keep_symbols(payload)
        elif kind == wire.HELLO:
            self.booted_at = time.monotonic()
            if self.verbose:
                self.say("L1 up after %.1fs (kernel %s)" % (self.booted_at - self.t0,
                                                            payload.decode(errors="replace")))
        elif kind == wire.STARTED:
            self.started_at = time.monotonic()
        elif kind in (wire.STDOUT, wire.STDERR, wire.TTY):
            fd = {wire.STDOUT: 1, wire.STDERR: 2}.get(kind) or self._terminal_output_fd()
            output = self._output(fd)
            if not output.broken:
                output.pending += payload
        elif kind == wire.STDIN_ACK:
            self.stdin_in_flight -= wire.U32.unpack(payload)[0]
        elif kind == wire.EXIT:
            self.exit_status = wire.I32.unpack(payload)[0]
        elif kind == wire.CHECK:
            self.check_result = json.loads(payload)
        elif kind == wire.FAILED:
            raise TestbedError(payload.decode(errors="replace"))
        else:
            raise TestbedError("the L1 agent sent an unknown message type %d" % kind)

    def _send(self, kind, payload=b""):
        self.to_agent += wire.encode(kind, payload)

    # -- main loop --

    def execute(self):
        self.t0 = time.monotonic()
        console_host, console_qemu = socket.socketpair()
        agent_host, agent_qemu = socket.socketpair()
        self.monitor, monitor_qemu = socket.socketpair()
        command = qemu_command(self.artifacts.qemu, self.artifacts.vmlinuz, self.artifacts.initramfs,
                               self.memory, self.cpus, sys.executable,
                               console_qemu.fileno(), agent_qemu.fileno(), self.writable,
                               quiet=not self.verbose, monitor_fd=monitor_qemu.fileno(),
                               tcg_threads=self.tcg_threads, idle=self.idle, thp=self.thp)
        if self.verbose:
            self.say("starting L1: " + " ".join(command))
        try:
            self.qemu = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(console_qemu.fileno(), agent_qemu.fileno(), monitor_qemu.fileno()),
                start_new_session=True, preexec_fn=_die_with_parent())
        except OSError as error:
            raise TestbedError("cannot start %s: %s" % (self.artifacts.qemu, error.strerror))
        console_qemu.close()
        agent_qemu.close()
        monitor_qemu.close()
        try:
            return self._relay(console_host, agent_host)
        finally:
            self._stop_qemu()
            self._restore_terminal()
            console_host.close()
            agent_host.close()
            self.monitor.close()

    def _relay(self, console, agent):
        if self.job.get("kind") != "check" and not os.path.exists(self.symbols_path()):
            self.job = dict(self.job, kallsyms=True)
        self._send(wire.JOB, json.dumps(self.job).encode())
        console.setblocking(False)
        agent.setblocking(False)
        # poll, not epoll: the caller's stdin/stdout may be regular files.
        selector = selectors.PollSelector()
        selector.register(console, selectors.EVENT_READ, "console")
        selector.register(self.qemu.stderr, selectors.EVENT_READ, "qemu-stderr")
        pidfd = os.pidfd_open(self.qemu.pid)
        selector.register(pidfd, selectors.EVENT_READ, "qemu-exit")
        wakeup_read, wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        selector.register(wakeup_read, selectors.EVENT_READ, "signal")
        old_wakeup = signal.set_wakeup_fd(wakeup_write, warn_on_full_buffer=False)
        stdin_registered = False
        plan = self.job.get("tty") or {}
        try:
            if plan.get("stdin"):
                self._enter_raw_mode()
            agent_events = None
            output_events = {}
            while self.exit_status is None and self.check_result is None:
                # What we want from the agent socket depends on our buffers.
                wanted = 0
                if self._backlog() < OUTPUT_BACKLOG_LIMIT:
                    wanted |= selectors.EVENT_READ
                if self.to_agent:
                    wanted |= selectors.EVENT_WRITE
                if wanted != agent_events:
                    if agent_events:
                        selector.unregister(agent)
                    if wanted:
                        selector.register(agent, wanted, "agent")
                    agent_events = wanted
                for fd, output in self.outputs.items():
                    want_write = bool(output.pending) and not output.broken
                    if want_write != output_events.get(fd, False):
                        if want_write:
                            selector.register(fd, selectors.EVENT_WRITE, ("output", output))
                        else:
                            selector.unregister(fd)
                        output_events[fd] = want_write
                want_stdin = (self.booted_at is not None and not self.stdin_done
                              and self.stdin_in_flight < STDIN_WINDOW)
                if want_stdin != stdin_registered:
                    if want_stdin:
                        try:
                            selector.register(0, selectors.EVENT_READ, "stdin")
                        except (OSError, ValueError):      # stdin closed or unpollable
                            self._stdin_ended()
                            want_stdin = False
                    else:
                        selector.unregister(0)
                    stdin_registered = want_stdin

                for key, events in selector.select(self._next_deadline()):
                    self._dispatch(key.data, key.fileobj, events, console, agent)
                self._check_deadlines()
            self.flush_outputs()
            return self.exit_status
        finally:
            signal.set_wakeup_fd(old_wakeup)
            selector.close()
            os.close(pidfd)
            os.close(wakeup_read)
            os.close(wakeup_write)

    def _dispatch(self, what, fileobj, events, console, agent):
        if what == "console":
            self._read_console(console)
        elif what == "qemu-stderr":
            data = os.read(self.qemu.stderr.fileno(), READ_CHUNK)
            self.qemu_errors += data
            del self.qemu_errors[:-CONSOLE_KEEP_BYTES]
            if self.verbose and data:
                # TCG lists the EPYC model's features it cannot emulate; L1 does without them.
                lines = [line for line in data.splitlines(keepends=True)
                         if b"TCG doesn't support requested feature" not in line]
                os.write(2, b"".join(lines))
        elif what == "qemu-exit":
            self._qemu_exited(console, agent)
        elif what == "signal":
            os.read(fileobj, 512)   # the handlers already ran; see install_signal_handlers
        elif what == "agent":
            if events & selectors.EVENT_WRITE:
                try:
                    sent = agent.send(self.to_agent)
                    del self.to_agent[:sent]
                except BlockingIOError:
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    self.to_agent.clear()   # QEMU is gone; its exit is handled on its own
            if events & selectors.EVENT_READ:
                self._read_agent(agent)
        elif what == "stdin":
            self._read_stdin()
        else:
            self._write_output(what[1])
        if signals.window_changed:
            signals.window_changed = False
            size = terminal_size(0)
            if size:
                self._send(wire.WINSIZE, wire.WINSIZE_FORMAT.pack(*size))

    def _read_console(self, console):
        try:
            data = console.recv(READ_CHUNK)
        except BlockingIOError:
            return
        except ConnectionResetError:    # QEMU is gone; its exit is handled on its own
            return
        if data:
            self.console_log += data
            del self.console_log[:-CONSOLE_KEEP_BYTES]
            if self.verbose:
                os.write(2, data)
            self._watch_hung_tasks(data)

    def _watch_hung_tasks(self, data):
        lines = (self.console_partial + data).split(b"\n")
        self.console_partial = lines.pop()[-1024:]
        for line in lines:
            report = HUNG_TASK.search(line)
            if not report:
                continue
            seconds = int(report.group(2))
            now_stuck = seconds >= L1_STUCK_SECONDS and self.stuck is None
            if not self.stacks_asked or now_stuck:
                self._send(wire.SHOW_STACKS)    # again when stuck: did the stacks move?
                self.stacks_asked = True
            if now_stuck:
                reason = ("L1 is stuck: its kernel reports task %s blocked for more than %d s "
                          "(its blocked tasks' stacks and its CPUs' backtraces are in the kept console)"
                          % (report.group(1).decode(errors="replace"), seconds))
                self.stuck = (reason, time.monotonic() + STACKS_WAIT)

    def _read_agent(self, agent):
        try:
            data = agent.recv(READ_CHUNK)
        except BlockingIOError:
            return
        except ConnectionResetError:
            return
        if not data:
            return      # QEMU is going away; its exit is handled on its own
        try:
            frames = self.decoder.feed(data)
        except wire.ProtocolError as error:
            raise TestbedError("garbled message from the L1 agent: %s" % error)
        for kind, payload in frames:
            self._handle_frame(kind, payload)

    def _read_stdin(self):
        try:
            data = os.read(0, READ_CHUNK)
        except OSError:
            data = b""
        if data:
            self.stdin_in_flight += len(data)
            self._send(wire.STDIN, data)
        else:
            self._stdin_ended()

    def _stdin_ended(self):
        self.stdin_done = True
        self._send(wire.STDIN_EOF)

    def _write_output(self, output):
        try:
            written = os.write(output.fd, output.pending[:WRITE_CHUNK])
            del output.pending[:written]
        except BlockingIOError:
            pass
        except OSError as error:
            if error.errno not in (errno.EPIPE, errno.EBADF, errno.EIO):
                raise
            # Nobody reads this any more: drop it, and let the command get SIGPIPE.
            output.broken = True
            output.pending.clear()
            if output.fd in (1, 2):
                self._send(wire.STDOUT if output.fd == 1 else wire.STDERR)

    def flush_outputs(self):
        for output in self.outputs.values():
            while output.pending and not output.broken:
                self._write_output(output)

    def _qemu_exited(self, console, agent):
        # Collect what QEMU wrote before it went; it may explain why.
        for reader in (lambda: self._read_console(console), lambda: self._read_agent(agent)):
            for _ in range(64):
                before = len(self.console_log), self.decoder.pending
                reader()
                if (len(self.console_log), self.decoder.pending) == before:
                    break
        if self.exit_status is not None or self.check_result is not None:
            return
        status = self.qemu.wait()
        reason = fatal_reason(bytes(self.console_log))
        if reason:
            raise TestbedError("L1 stopped: " + reason)
        qemu_message = [line for line in self.qemu_errors.decode(errors="replace").splitlines()
                        if line.strip() and "warning:" not in line]
        if status != 0 and qemu_message:
            raise TestbedError("QEMU failed (status %d): %s" % (status, qemu_message[-1]))
        if self.booted_at is None:
            raise TestbedError("L1 failed to boot (QEMU exited with status %d)" % status)
        raise TestbedError("L1 stopped before the command finished (QEMU exited with status %d)"
                           % status)

    def symbols_path(self):
        """Where L1's kallsyms is kept (beside its kernel), the first run of
        a kernel having sent it."""
        return os.path.join(os.path.dirname(self.artifacts.vmlinuz), "kallsyms-" + self.artifacts.kernel["release"])

    def _keep_symbols(self, compressed):
        try:
            text = zlib.decompress(compressed)
        except zlib.error:
            return
        path = self.symbols_path()
        try:
            with open(path + ".tmp", "wb") as file:
                file.write(text)
            os.replace(path + ".tmp", path)
        except OSError:
            pass    # no names then, only addresses

    def _silence_deadline(self):
        """When L1 counts as frozen if the agent stays silent, or None."""
        if not self.silence or self.started_at is None or self.exit_status is not None:
            return None
        if self._backlog() >= OUTPUT_BACKLOG_LIMIT:
            # We stopped reading the agent (the caller reads its output
            # slowly): its silence is ours, and counts from when we read again.
            self.last_word = time.monotonic()
            return None
        return max(self.last_word or 0.0, self.started_at) + self.silence

    def _next_deadline(self):
        now = time.monotonic()
        if self.started_at is not None:
            deadlines = [None if self.timeout is None else self.started_at + self.timeout,
                         self._silence_deadline()]
        else:
            deadlines = [self.t0 + self.boot_timeout]
        deadlines = [d for d in deadlines + [self.stuck and self.stuck[1]] if d]
        return max(0.0, min(deadlines) - now) if deadlines else None

    def _check_deadlines(self):
        now = time.monotonic()
        if self.stuck and now > self.stuck[1]:
            raise TestbedError(self.stuck[0])
        if self.started_at is None and now > self.t0 + self.boot_timeout:
            stage = "boot" if self.booted_at is None else "start the command"
            raise TestbedError("L1 did not %s within %d s" % (stage, self.boot_timeout))
        if self.started_at is not None and self.timeout is not None \
                and now > self.started_at + self.timeout:
            raise TimedOut()
        silence_deadline = self._silence_deadline()
        if silence_deadline is not None and now > silence_deadline:
            cpus = self._l1_cpus()
            raise TestbedError("L1 stopped responding: no word from its agent for %d s (its last load "
                               "average: %s); %s" % (now - (silence_deadline - self.silence),
                                                     self.l1_load.decode(errors="replace") or "none",
                                                     "; ".join(cpus)))

    def _l1_cpus(self):
        """Where L1's vCPUs are, from QEMU's monitor; its whole answer goes
        into monitor_log, which a failed run keeps after the console."""
        answer = bytearray()
        deadline = time.monotonic() + MONITOR_WAIT
        try:
            self.monitor.settimeout(MONITOR_WAIT)
            self.monitor.sendall(b"info registers -a\n")
            # The answer is complete at the prompt after the last vCPU's block.
            while not (answer.count(b"CPU#") >= self.cpus and answer.rstrip().endswith(b"(qemu)")):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.monitor.settimeout(left)
                data = self.monitor.recv(READ_CHUNK)
                if not data:
                    break
                answer += data
        except OSError:     # socket.timeout included
            pass
        text = answer.decode(errors="replace").replace("\r", "")
        self.monitor_log += ("\n--- QEMU monitor, info registers -a, after L1 went silent ---\n%s\n" % text).encode()
        if "CPU#" not in text:
            return ["QEMU's monitor did not answer within %d s either" % MONITOR_WAIT]
        symbols = read_symbols(self.symbols_path())
        return cpu_summary(text, symbols) + ["names from L1's kallsyms (wrong for a vCPU in an L2 guest)"]

    # -- terminal --

    def _enter_raw_mode(self):
        try:
            self.terminal_saved = termios.tcgetattr(0)
        except termios.error:
            return
        tty.setraw(0, termios.TCSANOW)

    def _restore_terminal(self):
        if self.terminal_saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, self.terminal_saved)
            self.terminal_saved = None
        if self.tty_fd not in (None, 2):
            os.close(self.tty_fd)
            self.tty_fd = None

    def _stop_qemu(self):
        if self.qemu and self.qemu.poll() is None:
            self.qemu.kill()
        if self.qemu:
            self.qemu.wait()
            self.qemu.stderr.close()


def terminal_size(fd):
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return None
    return size.lines, size.columns


class _Signals:
    window_changed = False


signals = _Signals()


def install_signal_handlers():
    """SIGINT/SIGTERM/SIGHUP unwind (stopping QEMU on the way); SIGWINCH is noted for the loop."""
    def stop(signum, _frame):
        raise Interrupted(signum)

    def resized(_signum, _frame):
        signals.window_changed = True

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    signal.signal(signal.SIGWINCH, resized)
