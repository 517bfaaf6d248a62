"""The testbed agent: runs inside L1 (chrooted into the host's root) and runs one command.

Started by the L1 /init with a bare interpreter (-E -s -S), so it uses the
standard library only and imports little: Python is slow under emulation.
It talks to the host over one virtio-serial port (see wire.py): receives the
job, reports the command's output and exit status, and feeds it stdin.
"""

import errno
import fcntl
import json
import os
import select
import signal
import struct
import sys
import termios
import time

if not __package__:     # run as a script by the L1 init: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pyvmm_testbed import wire  # noqa: E402

PORT_NAME = "org.pyvmm.testbed"
BUSYBOX = "/run/pyvmm-testbed/busybox"
# After the command exits, output still buffered in pipes (or held open by
# processes it left behind) is collected for at most this long.
DRAIN_GRACE_SECONDS = 2.0
ALIVE_SECONDS = 10.0  # how often the host hears that L1 still runs (host.DEFAULT_L1_SILENCE)
READ_CHUNK = 65536
NINEP_RW_OPTIONS = "trans=virtio,version=9p2000.L,msize=512000,cache=%s"

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_CHECK_EXTENSION = 0xAE03
KVM_CAP_XEN_HVM = 38
KVM_CREATE_VCPU = 0xAE41
KVM_CREATE_IRQCHIP = 0xAE60
# struct kvm_xen_hvm_config: flags, msr, blob_addr_32, blob_addr_64,
# blob_size_32, blob_size_64, 30 bytes of padding (56 bytes).
XEN_HVM_CONFIG = struct.Struct("<IIQQBB30x")
KVM_XEN_HVM_CONFIG = 0x4000AE7A | (XEN_HVM_CONFIG.size << 16)
XEN_HYPERCALL_MSR = 0x40000000


class SetupError(Exception):
    """The testbed could not prepare L1 for the command."""


def log(message):
    # The agent's own stderr is the L1 console: it lands in the console log.
    print("testbed-agent: " + message, file=sys.stderr, flush=True)


def find_port(timeout=10.0):
    deadline = time.monotonic() + timeout
    base = "/sys/class/virtio-ports"
    while True:
        try:
            for entry in sorted(os.listdir(base)):
                with open(os.path.join(base, entry, "name")) as name_file:
                    if name_file.read().strip() == PORT_NAME:
                        return "/dev/" + entry
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SetupError("virtio-serial port %s not found" % PORT_NAME)
        time.sleep(0.05)


class Channel:
    """The framed link to the host."""

    def __init__(self, fd):
        self.fd = fd
        self.decoder = wire.Decoder()

    def send(self, kind, payload=b""):
        data = memoryview(wire.encode(kind, payload))
        while data:
            written = os.write(self.fd, data)
            data = data[written:]

    def receive(self):
        """Reads once; returns frames (empty list if none complete), None at EOF."""
        data = os.read(self.fd, READ_CHUNK)
        if not data:
            return None
        return self.decoder.feed(data)

    def wait_for(self, kind):
        while True:
            frames = self.receive()
            if frames is None:
                raise SetupError("the host closed the channel")
            for frame_kind, payload in frames:
                if frame_kind == kind:
                    return payload


def run_tool(argv):
    pid = os.posix_spawn(argv[0], argv, os.environ)
    _, status = os.waitpid(pid, 0)
    return wire.exit_status(status)


def mount(fstype, source, target, options):
    if run_tool([BUSYBOX, "mount", "-t", fstype, "-o", options, source, target]) != 0:
        raise SetupError("cannot mount %s (%s) on %s; see the L1 console log" % (source, fstype, target))


def prepare_filesystems(job):
    for path in job["modules"]:
        if run_tool([BUSYBOX, "insmod", path]) != 0:
            raise SetupError("cannot load kernel module %s" % path)
    # /tmp goes on after the modules: they may live in a cache under the host's /tmp.
    mount("tmpfs", "tmpfs", "/tmp", "mode=1777,size=%s" % job["tmp_size"])
    # Shallow paths first so that nested exports land on top of their parents.
    for tag, path in sorted(job["mounts"], key=lambda item: item[1].count("/")):
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as error:
            raise SetupError("cannot create mount point %s: %s" % (path, error.strerror))
        mount("9p", tag, path, NINEP_RW_OPTIONS % job.get("rw_cache", "loose"))


def hold_static_keys():
    """A VM that never runs, kept open for the whole testbed run: one vCPU
    whose in-kernel LAPIC stays software-disabled, and Xen support on.

    L1's KVM turns some of its code paths on and off with deferred static
    keys (apic_sw_disabled, kvm_xen_enabled): when the last VM using one
    goes away, or the guests enable their LAPICs, a second later the kernel
    patches its own text (int3, then the new bytes) while other vCPU threads
    run that code. Under QEMU's TCG that patching has killed L1 ("Oops:
    int3" in kvm_arch_vcpu_ioctl_run, at the apic_sw_disabled site). With
    this VM open, those keys never drop back to zero and that code is never
    patched during a run. Returns the fds to keep open, or [] if KVM
    refused (the testbed then runs as before)."""
    fds = []
    try:
        kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        fds.append(kvm)
        vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
        fds.append(vm)
        fcntl.ioctl(vm, KVM_CREATE_IRQCHIP, 0)
        fds.append(fcntl.ioctl(vm, KVM_CREATE_VCPU, 0))
        if fcntl.ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_XEN_HVM):
            fcntl.ioctl(vm, KVM_XEN_HVM_CONFIG, XEN_HVM_CONFIG.pack(0, XEN_HYPERCALL_MSR, 0, 0, 0, 0))
    except OSError as error:
        log("cannot hold KVM's static keys (%s): running without" % error.strerror)
        for fd in fds:
            os.close(fd)
        return []
    return fds


def check_kvm():
    """Reports what L1's /dev/kvm offers, for `testbed --check`."""
    result = {"release": os.uname().release}
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as error:
        result["error"] = "cannot open /dev/kvm: %s" % error.strerror
        return result
    try:
        result["api_version"] = fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)
        result["xen_hvm"] = fcntl.ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_XEN_HVM)
        try:
            os.close(fcntl.ioctl(fd, KVM_CREATE_VM, 0))
            result["create_vm"] = "ok"
        except OSError as error:
            result["create_vm"] = error.strerror
    finally:
        os.close(fd)
    try:
        with open("/sys/module/kvm_amd/parameters/npt") as npt:
            result["nested_paging"] = npt.read().strip() in ("Y", "1")
    except OSError:
        result["nested_paging"] = None
    return result


class Command:
    """The job's command: its process, and the pipes or terminal it talks through."""

    def __init__(self, job):
        self.job = job
        tty = job["tty"]
        self.master = None
        self.outputs = {}          # fd we read -> frame kind it is sent as
        self.stdin_fd = None       # fd we write the command's stdin into
        self.stdin_buffer = bytearray()
        self.stdin_eof = False
        child_fds = [None, None, None]
        close_in_parent = []
        if tty["stdin"]:
            self.master, slave = os.openpty()
            if tty.get("rows") and tty.get("cols"):
                self.resize(tty["rows"], tty["cols"])
            for index, name in enumerate(("stdin", "stdout", "stderr")):
                if tty[name]:
                    child_fds[index] = slave
            self.outputs[self.master] = wire.TTY
            self.stdin_fd = self.master
            close_in_parent.append(slave)
        if child_fds[0] is None:
            read_end, write_end = os.pipe()
            child_fds[0] = read_end
            self.stdin_fd = write_end
            close_in_parent.append(read_end)
        for index, kind in ((1, wire.STDOUT), (2, wire.STDERR)):
            if child_fds[index] is None:
                read_end, write_end = os.pipe()
                child_fds[index] = write_end
                self.outputs[read_end] = kind
                close_in_parent.append(write_end)
        self.pid = self._spawn(child_fds, tty["stdin"])
        for fd in close_in_parent:
            os.close(fd)
        os.set_blocking(self.stdin_fd, False)
        self.stdout_fd_by_kind = {kind: fd for fd, kind in self.outputs.items()}

    def _spawn(self, child_fds, with_terminal):
        argv = [os.fsencode(arg) for arg in self.job["argv"]]
        env = {os.fsencode(key): os.fsencode(value) for key, value in self.job["env"].items()}
        cwd = self.job["cwd"]
        error_read, error_write = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            try:
                os.setsid()
                if with_terminal:
                    fcntl.ioctl(child_fds[0], termios.TIOCSCTTY, 0)
                for target, fd in enumerate(child_fds):
                    os.dup2(fd, target)
                os.closerange(3, error_write)
                os.closerange(error_write + 1, 65536)
                # Python ignores these; exec would keep them ignored.
                signal.signal(signal.SIGPIPE, signal.SIG_DFL)
                signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
                stage = b"cwd"
                os.chdir(cwd)
                stage = b"exec"
                os.execvpe(argv[0], argv, env)
            except OSError as error:
                os.write(error_write, b"%s:%d" % (stage, error.errno or 0))
            except BaseException:
                os.write(error_write, b"other:0")
            finally:
                os._exit(127)
        os.close(error_write)
        report = b""
        while True:
            chunk = os.read(error_read, 64)
            if not chunk:
                break
            report += chunk
        os.close(error_read)
        if report:
            os.waitpid(pid, 0)
            stage, _, number = report.partition(b":")
            raise SpawnError(stage.decode(), int(number or 0), self.job["argv"][0], cwd)
        return pid

    def resize(self, rows, cols):
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class SpawnError(Exception):
    def __init__(self, stage, number, program, cwd):
        super().__init__(stage)
        self.stage, self.number, self.program, self.cwd = stage, number, program, cwd

    @property
    def status(self):
        # The shell's convention: 127 for "not found", 126 for "found but cannot run".
        return 127 if self.number == errno.ENOENT else 126

    def message(self):
        reason = os.strerror(self.number) if self.number else "unknown error"
        if self.stage == "cwd":
            return "cannot enter working directory %s: %s" % (self.cwd, reason)
        return "cannot run %s: %s" % (self.program, reason)


def text_symbols():
    """L1's code symbols ("address type name [module]" lines of /proc/kallsyms),
    zlib-compressed: the host names a frozen L1's instruction pointers with
    them (Debian ships no real System.map; L1 boots nokaslr, so they hold
    from run to run)."""
    import zlib
    try:
        with open("/proc/kallsyms", "rb") as file:
            lines = [line for line in file if line[17:18] in (b"t", b"T")]
    except OSError:
        return b""
    return zlib.compress(b"".join(lines), 6)


# The console log level first (L1 boots quiet, and sysrq prints the stacks
# at the level it finds), then the blocked tasks ("w"), then every CPU ("l").
SHOW_STACKS_WRITES = (("/proc/sys/kernel/printk", "8"), ("/proc/sysrq-trigger", "w"), ("/proc/sysrq-trigger", "l"))


def show_stacks(writes=SHOW_STACKS_WRITES):
    """L1's blocked tasks and CPUs on its console, which the host keeps:
    asked for when L1's kernel reports a task blocked for minutes."""
    for path, text in writes:
        try:
            with open(path, "w") as file:
                file.write(text)
        except OSError as error:
            log("cannot write %s to %s: %s" % (text, path, error))


def read_loadavg():
    try:
        with open("/proc/loadavg", "rb") as file:
            return file.read().strip()
    except OSError:
        return b""


def serve(channel, command):
    """Relays until the command has exited and its output is collected; returns its status."""
    exit_status = None
    drain_deadline = None
    pidfd = os.pidfd_open(command.pid)
    stdin_closed = False
    next_alive = time.monotonic()
    while command.outputs or exit_status is None:
        if exit_status is not None and time.monotonic() > drain_deadline:
            break
        readers = [channel.fd] + list(command.outputs)
        if exit_status is None:
            readers.append(pidfd)
        writers = [command.stdin_fd] if command.stdin_buffer and not stdin_closed else []
        now = time.monotonic()
        if now >= next_alive:
            channel.send(wire.ALIVE, read_loadavg())
            next_alive = now + ALIVE_SECONDS
        timeout = next_alive - now
        if drain_deadline is not None:
            timeout = min(timeout, max(0.0, drain_deadline - now))
        readable, writable, _ = select.select(readers, writers, [], timeout)
        if pidfd in readable:
            _, status = os.waitpid(command.pid, 0)
            exit_status = wire.exit_status(status)
            drain_deadline = time.monotonic() + DRAIN_GRACE_SECONDS
            os.close(pidfd)
        for fd in readable:
            if fd in command.outputs:
                try:
                    data = os.read(fd, READ_CHUNK)
                except BlockingIOError:
                    continue
                except OSError as error:
                    if error.errno != errno.EIO:   # EIO: the terminal's last user left
                        raise
                    data = b""
                if data:
                    channel.send(command.outputs[fd], data)
                else:
                    del command.outputs[fd]
                    if fd != command.master:
                        os.close(fd)
        if command.stdin_fd in writable:
            try:
                written = os.write(command.stdin_fd, command.stdin_buffer)
            except BrokenPipeError:
                written = len(command.stdin_buffer)     # nobody reads it any more
                stdin_closed = True
            except BlockingIOError:
                written = 0
            if written:
                del command.stdin_buffer[:written]
                channel.send(wire.STDIN_ACK, wire.U32.pack(written))
        if (command.stdin_eof and not command.stdin_buffer and not stdin_closed
                and command.stdin_fd != command.master):
            os.close(command.stdin_fd)
            stdin_closed = True
        if channel.fd in readable:
            frames = channel.receive()
            if frames is None:
                raise SetupError("the host closed the channel")
            for kind, payload in frames:
                handle_host_frame(channel, command, kind, payload, stdin_closed)
    return exit_status


def handle_host_frame(channel, command, kind, payload, stdin_closed):
    if kind == wire.STDIN:
        if stdin_closed:
            channel.send(wire.STDIN_ACK, wire.U32.pack(len(payload)))
        else:
            command.stdin_buffer += payload
    elif kind == wire.STDIN_EOF:
        command.stdin_eof = True
    elif kind == wire.SHOW_STACKS:
        show_stacks()
    elif kind == wire.WINSIZE and command.master is not None:
        rows, cols = wire.WINSIZE_FORMAT.unpack(payload)
        command.resize(rows, cols)
    elif kind in (wire.STDOUT, wire.STDERR):
        # The caller stopped reading that stream: close our end so the command gets SIGPIPE.
        fd = command.stdout_fd_by_kind.get(kind)
        if fd is not None and fd in command.outputs and fd != command.master:
            del command.outputs[fd]
            os.close(fd)


def main():
    channel = Channel(os.open(find_port(), os.O_RDWR | os.O_CLOEXEC))
    channel.send(wire.HELLO, os.uname().release.encode())
    job = json.loads(channel.wait_for(wire.JOB))
    if job["kind"] == "check":
        channel.send(wire.CHECK, json.dumps(check_kvm()).encode())
        return
    kept_vm = hold_static_keys()  # noqa: F841 - open until L1 stops
    try:
        prepare_filesystems(job)
        command = Command(job)
    except SetupError as error:
        channel.send(wire.FAILED, str(error).encode())
        return
    except SpawnError as error:
        channel.send(wire.STARTED)
        channel.send(wire.STDERR, ("testbed: %s\n" % error.message()).encode())
        channel.send(wire.EXIT, wire.I32.pack(error.status))
        return
    channel.send(wire.STARTED, str(command.pid).encode())
    if job.get("kallsyms"):
        channel.send(wire.KALLSYMS, text_symbols())
    status = serve(channel, command)
    # Writes to the writable 9p mounts may still be cached in L1; the host
    # stops L1 as soon as it has the exit status.
    os.sync()
    channel.send(wire.EXIT, wire.I32.pack(status))


if __name__ == "__main__":
    try:
        main()
    except Exception as error:   # last resort: say why on the console, then init stops L1
        log("failed: %r" % (error,))
        raise
    # Wait for the host to stop L1, rather than racing it with a shutdown.
    while True:
        time.sleep(3600)
