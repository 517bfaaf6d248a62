"""The VMM's sandbox: an unprivileged user, no capabilities, no_new_privs and
a seccomp allow-list (docs/SANDBOX.md).

`pyvmm run` (runner.py) starts the sandbox's monitor first, while the VMM is
still one thread; it opens /dev/kvm, the kernel, disks, TAPs and every
listening socket for the first boot (pyvmm/core/kept.py keeps them for reboots);
then `Sandbox.lock()` drops to the unprivileged user, clears every
capability, sets no_new_privs and loads the filter, before the first vCPU,
worker or gdb thread exists, so every thread inherits it.

The filter (built with libseccomp, through its Python binding) has three
outcomes besides "allowed":

- refused (EACCES): calls that name a file: opening, creating, removing.
  The one Python call fails with PermissionError and the VMM goes on; a
  traceback logged by a device's bug keeps working (it looks its source
  lines up by name).
- ENOSYS: clone3, whose flags live in memory a filter cannot read; the C
  library then uses clone, whose flags it can (threads only, no fork).
- forbidden (everything else, e.g. execve, fork, socket, connect, ptrace,
  setuid): the call is held and the monitor is told (a seccomp user
  notification). The monitor, a small process forked before any thread
  started, prints `pyvmm: sandbox: forbidden system call NAME (NR)`, kills
  the VMM with SIGSYS (exit status 159, 128 + SIGSYS; SIGKILL if it has not
  died 3 s later) and removes the VMM's sockets. Nothing waits on Python
  code in a signal handler; if the monitor itself is gone, the kernel fails
  the held call with ENOSYS instead, so no thread can hang on it.

`PYVMM_SANDBOX_AUDIT=1` makes the monitor let every call that is not
allowed go on and print its name once (`PYVMM_SANDBOX_AUDIT=FILE`: append
the lines to FILE): how the allow-list is measured.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import signal
import socket
import stat
import struct
import sys
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

EXIT_SANDBOX = 128 + signal.SIGSYS  # 159: the monitor killed the VMM at a forbidden call
DEFAULT_USER = "nobody"
AUDIT_VARIABLE = "PYVMM_SANDBOX_AUDIT"
FD_WAIT_SECONDS = 10.0  # how long the monitor waits for the filter once the VMM says it loads it
KILL_GRACE_SECONDS = 3.0  # SIGSYS, then SIGKILL

# --- the policy ---------------------------------------------------------------------------
# One group per reason. Names are x86-64 system calls; pyvmm runs nowhere else.

ALLOWED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("memory: the allocator, guest RAM and kvm_run mappings, thread stacks",
     ("brk", "mmap", "munmap", "mremap", "mprotect", "madvise")),
    ("threads and locks: Python's threads, the GIL, queues and events",
     ("futex", "set_robust_list", "rseq", "set_tid_address", "sched_yield", "sched_getaffinity",
      "gettid", "getpid", "exit", "exit_group", "restart_syscall")),
    ("signals: SIGTERM/SIGHUP handlers, the vCPU kick's handler and mask",
     ("rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack")),
    ("time: timers, timeouts, the RTC and Xen's clocks",
     ("clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday")),
    ("I/O on descriptors opened before the lockdown: disks (pread/pwrite, flush, discard), TAPs, "
     "eventfds, pipes, the console and log",
     ("read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2",
      "lseek", "fsync", "fdatasync", "fallocate", "close", "dup", "dup3", "fcntl", "fstat", "pipe2",
      "eventfd2", "getrandom")),
    ("waiting: the event loop's epoll, the gdb stub's and workers' poll/select",
     ("epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll", "select",
      "pselect6")),
    ("sockets already listening: the control, xenstore and gdb sockets' clients",
     ("accept", "accept4", "recvfrom", "recvmsg", "sendto", "sendmsg", "shutdown", "getsockopt", "setsockopt",
      "getsockname", "getpeername")),
    ("metadata by name: tracebacks look up their source lines (size and time only, no contents)",
     ("newfstatat", "stat", "lstat", "statx", "getcwd")),
    ("who we are: harmless questions",
     ("getuid", "geteuid", "getgid", "getegid", "getppid", "uname")),
)

# Calls that name a file: refused with EACCES. Nothing pyvmm does after the
# lockdown opens a file (pyvmm/core/kept.py); a missed lazy import or a traceback's
# source line fails alone instead of stopping the guest.
REFUSED: tuple[str, ...] = (
    "open", "openat", "openat2", "creat", "access", "faccessat", "faccessat2", "readlink", "readlinkat",
    "mkdir", "mkdirat", "rmdir", "unlink", "unlinkat", "rename", "renameat", "renameat2", "link", "linkat",
    "symlink", "symlinkat", "chmod", "fchmodat", "chown", "lchown", "fchownat", "truncate", "utimensat",
    "mknod", "mknodat", "statfs", "chdir", "getdents64",
)

ENOSYS_CALLS: tuple[str, ...] = ("clone3",)

# The calls a running guest makes most (KVM_RUN, locks, eventfds, the loop).
HOT_CALLS = ("ioctl", "futex", "read", "write", "epoll_wait", "ppoll", "poll", "pread64", "pwrite64")

CLONE_THREAD = 0x00010000
AT_EMPTY_PATH = 0x1000

# ioctl's request numbers carry a type byte (bits 8-15): only these types.
IOCTL_TYPES = {
    0xAE: "KVM: the VM, its vCPUs, irqchip, memslots, Xen state",
    0x54: "'T': the terminal (raw console), TAP (TUNSET*), FIONBIO/FIONREAD",
}


@dataclass(frozen=True)
class Conditional:
    """An allowed call with a condition on one argument: (arg & mask) == value."""

    name: str
    arg: int
    mask: int
    value: int
    reason: str


def conditional_rules(pid: int) -> list[Conditional]:
    rules = [
        Conditional("clone", 0, CLONE_THREAD, CLONE_THREAD, "new threads only (no fork)"),
        Conditional("tgkill", 0, 0xFFFFFFFF, pid, "the vCPU kick (SIGUSR2) to our own threads only"),
    ]
    for kind, reason in IOCTL_TYPES.items():
        rules.append(Conditional("ioctl", 1, 0xFF00, kind << 8, reason))
    return rules


def allowed_names() -> list[str]:
    return [name for _, names in ALLOWED for name in names]


# --- options ----------------------------------------------------------------------------


class SandboxError(Exception):
    """The sandbox cannot be set up; the message says why and what to do."""


@dataclass(frozen=True)
class SandboxOptions:
    enabled: bool = True
    user: str | None = None  # NAME[:GROUP], numeric ids allowed; default: nobody when root
    audit: bool = False

    @staticmethod
    def parse_user(text: str) -> tuple[str, str | None]:
        user, sep, group = text.partition(":")
        if not user or (sep and not group) or ":" in group:
            raise SandboxError(f"--user {text!r}: expected NAME or NAME:GROUP")
        return user, group or None


def resolve_identity(text: str | None) -> tuple[int, int] | None:
    """(uid, gid) to run as, or None to stay who we are (not root, no --user)."""
    import grp
    import pwd

    if text is None:
        if os.geteuid() != 0:
            return None
        text = DEFAULT_USER
    user, group = SandboxOptions.parse_user(text)
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        uid, gid = entry.pw_uid, entry.pw_gid
    except KeyError:
        if not user.isdigit():
            raise SandboxError(f"--user: no user {user!r} on this host") from None
        uid, gid = int(user), int(user)
    if group is not None:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise SandboxError(f"--user: no group {group!r} on this host") from None
    if uid == 0:
        raise SandboxError("--user: the sandbox's user must not be root")
    if os.geteuid() != 0 and (uid, gid) != (os.getuid(), os.getgid()):
        raise SandboxError("--user needs root (only root can become another user)")
    return uid, gid


# --- the binding ----------------------------------------------------------------------------


def binding():
    """libseccomp's Python binding: the official one (Debian's python3-seccomp)
    or pyseccomp (PyPI, the same API over the shared library)."""
    try:
        import seccomp  # type: ignore[import-not-found]

        return seccomp
    except ImportError:
        pass
    try:
        import pyseccomp
    except (ImportError, RuntimeError, OSError) as error:
        raise SandboxError(f"the sandbox needs libseccomp and its Python binding (pip install pyseccomp; "
                           f"apt install libseccomp2): {error}; or run with --no-sandbox") from None
    return pyseccomp


def availability() -> tuple[bool, str]:
    """Whether the sandbox can run here, and what it uses or what is missing."""
    try:
        lib = binding()
        api = lib.get_api() if hasattr(lib, "get_api") else 0
    except SandboxError as error:
        return False, str(error)
    except Exception as error:  # noqa: BLE001 - reported, not raised
        return False, f"libseccomp: {error}"
    if api < 5:
        return False, (f"libseccomp reports API level {api}: user notification (level 5: kernel 5.5 and "
                       f"libseccomp 2.5) is missing")
    return True, f"seccomp through {lib.__name__}, libseccomp API level {api}"


def build_filter(lib, pid: int, audit: bool = False):
    forbidden = lib.NOTIFY
    refused = lib.NOTIFY if audit else lib.ERRNO(errno.EACCES)
    nosys = lib.NOTIFY if audit else lib.ERRNO(errno.ENOSYS)
    flt = lib.SyscallFilter(forbidden)
    # A call through another ABI (int 0x80, x32) kills the whole process: the
    # library's default kills one thread, which could leave the rest waiting on it.
    flt.set_attr(lib.Attr.ACT_BADARCH, lib.KILL_PROCESS)
    try:
        flt.set_attr(lib.Attr.CTL_OPTIMIZE, 2)  # a binary tree: KVM_RUN's ioctl is checked in a few steps
    except (AttributeError, OSError):
        for name in HOT_CALLS:  # libseccomp < 2.5: test the busiest calls first
            flt.syscall_priority(name, 255)
    for name in allowed_names():
        flt.add_rule(lib.ALLOW, name)
    for rule in conditional_rules(pid):
        flt.add_rule(lib.ALLOW, rule.name, lib.Arg(rule.arg, lib.MASKED_EQ, rule.mask, rule.value))
    for action, names in ((refused, REFUSED), (nosys, ENOSYS_CALLS)):
        if action != forbidden:  # libseccomp refuses a rule that repeats the default action
            for name in names:
                flt.add_rule(action, name)
    return flt


def _notify_fd(lib, flt) -> int:
    if hasattr(flt, "get_notify_fd"):
        return flt.get_notify_fd()
    fd = lib._libseccomp.seccomp_notify_fd(flt._filter)  # pyseccomp has no public accessor
    if fd < 0:
        raise SandboxError(f"libseccomp gave no notification descriptor ({os.strerror(-fd)})")
    return fd


def syscall_name(number: int) -> str:
    try:
        lib = binding()
        name = lib.resolve_syscall(0, number)  # 0: the native architecture
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # noqa: BLE001 - a number is still a name
        return f"syscall_{number}"


# --- the kernel's user-notification interface (used by the monitor) ------------------------

# struct seccomp_notif { u64 id; u32 pid; u32 flags; struct seccomp_data { int nr;
# u32 arch; u64 instruction_pointer; u64 args[6]; } } and the response
# { u64 id; s64 val; s32 error; u32 flags; }.
_NOTIF = struct.Struct("=QIIiIQ6Q")
_NOTIF_RESP = struct.Struct("=QqiI")
_IOC_READ_WRITE = 3


def _iowr(kind: int, number: int, size: int) -> int:
    return (_IOC_READ_WRITE << 30) | (size << 16) | (kind << 8) | number


SECCOMP_IOCTL_NOTIF_RECV = _iowr(ord("!"), 0, _NOTIF.size)
SECCOMP_IOCTL_NOTIF_SEND = _iowr(ord("!"), 1, _NOTIF_RESP.size)
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1

# prctl(2)
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


# --- the VMM's side ---------------------------------------------------------------------------


class Sandbox:
    """One run's sandbox: start() before anything, lock() before the first thread."""

    def __init__(self, options: SandboxOptions):
        self.options = options
        audit = os.environ.get(AUDIT_VARIABLE, "")
        self.audit = options.audit or audit not in ("", "0")
        self.audit_file = audit if audit not in ("", "0", "1") else None
        self.locked = False
        self.identity: tuple[int, int] | None = None
        self._lib = None
        self._channel: socket.socket | None = None
        self._monitor_pid: int | None = None

    def start(self) -> None:
        """Check what the sandbox needs and fork the monitor (one thread only)."""
        ok, what = availability()
        if not ok:
            raise SandboxError(f"{what}; or run with --no-sandbox")
        self._lib = binding()
        self.identity = resolve_identity(self.options.user)
        _check_single_thread("the sandbox's monitor is forked")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        vmm = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the monitor: never returns
            code = 0
            try:
                ours.close()
                Monitor(theirs.detach(), vmm, self.audit, self.audit_file).run()
            except BaseException:  # noqa: BLE001 - whatever happens, leave without running the VMM's code
                code = 1
            finally:
                os._exit(code)
        theirs.close()
        self._channel = ours
        self._monitor_pid = pid
        log.debug("sandbox: monitor is process %d", pid)

    def lock(self, unix_sockets: list[str], unused: tuple[str, ...] = ()) -> None:
        """Drop privileges and load the filter; from here on the allow-list
        holds. `unused`: the subsystems (GDB_STUB, XEN, STATS) this run never
        imports, left out of preload()."""
        preload(unused)
        _check_single_thread("the sandbox is locked down")
        self._send(b"P" + json.dumps([[path, *_inode(path)] for path in unix_sockets]).encode())
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a killed VMM must not dump guest memory
        _prctl(PR_SET_DUMPABLE, 0)
        _drop_privileges(self.identity)
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        flt = build_filter(self._lib, os.getpid(), self.audit)
        self._send(b"L")
        flt.load()
        # Between load() and here only allowed calls run (sendmsg, close);
        # the monitor stops the VMM should the descriptor never come.
        notify = _notify_fd(self._lib, flt)
        socket.send_fds(self._channel, [b"N"], [notify])
        os.close(notify)
        self.locked = True
        from .core.kept import KEPT

        KEPT.lock()
        who = f"uid {os.getuid()} gid {os.getgid()}"
        log.info("sandbox: locked down as %s: %d system calls allowed%s", who,
                 len(allowed_names()) + len({rule.name for rule in conditional_rules(0)}),
                 " (audit: nothing is refused)" if self.audit else "")

    def finish(self, unix_sockets: list[str]) -> None:
        """The run is over: the monitor removes the sockets the VMM may no
        longer unlink (it waits at most 2 s for the monitor's answer)."""
        channel = self._channel
        if channel is None:
            return
        if self.locked and unix_sockets:
            try:
                channel.settimeout(2.0)
                channel.send(b"U")
                channel.recv(16)
            except OSError as error:
                log.warning("sandbox: the monitor did not remove the sockets: %s", error)
        if not self.locked:
            # Not locked: the monitor has nothing to watch; it leaves on EOF.
            channel.close()
            self._channel = None
            self._reap()
        # Locked: the channel stays open until the process ends, so the
        # monitor outlives every call the VMM still makes.

    def _reap(self) -> None:
        if self._monitor_pid is None:
            return
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            pid, _ = os.waitpid(self._monitor_pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.01)
        self._monitor_pid = None

    def _send(self, message: bytes) -> None:
        self._channel.send(message)


def _inode(path: str) -> tuple[int, int]:
    try:
        info = os.lstat(path)
    except OSError:
        return (-1, -1)
    return info.st_dev, info.st_ino


def _check_single_thread(when: str) -> None:
    others = [thread.name for thread in threading.enumerate() if thread is not threading.current_thread()]
    try:
        tasks = len(os.listdir("/proc/self/task"))
    except OSError:
        tasks = 1
    if others or tasks != 1:
        raise SandboxError(f"{when} while other threads run ({', '.join(others) or f'{tasks} tasks'}); "
                           f"a bug: every thread must start after the lockdown")


_libc = None


def _libc_call(name: str, *args) -> int:
    global _libc
    import ctypes

    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    result = getattr(_libc, name)(*args)
    if result == -1:
        error = ctypes.get_errno()
        raise OSError(error, f"{name}: {os.strerror(error)}")
    return result


def _prctl(option: int, arg2: int = 0) -> None:
    import ctypes

    _libc_call("prctl", ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(0), ctypes.c_ulong(0),
               ctypes.c_ulong(0))


def _drop_privileges(identity: tuple[int, int] | None) -> None:
    """Become `identity` (when root) and keep no capability at all."""
    if identity is not None and os.geteuid() == 0:
        # The bounding set first: dropping it needs CAP_SETPCAP, gone after setuid.
        last = _last_capability()
        for cap in range(last + 1):
            try:
                _prctl(PR_CAPBSET_DROP, cap)
            except OSError as error:
                if error.errno != errno.EINVAL:
                    raise
        uid, gid = identity
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
            raise SandboxError(f"could not become uid {uid} gid {gid}")
        try:
            os.setresuid(0, 0, 0)
        except PermissionError:
            pass
        else:
            raise SandboxError("root could be regained after dropping it")
    try:
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError as error:
        if error.errno != errno.EINVAL:  # kernels without ambient capabilities
            raise
    _clear_capabilities()


def _last_capability() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as file:
            return int(file.read())
    except (OSError, ValueError):
        return 63


def _clear_capabilities() -> None:
    """capset(): no effective, permitted or inheritable capability."""
    import ctypes

    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # two of {effective, permitted, inheritable}
    _libc_call("capset", header, data)


# Modules pyvmm may import lazily, loaded before the lockdown: after it an
# import that reaches the filesystem fails (the open is refused).
_STDLIB_PRELOAD = (
    "traceback", "linecache", "json", "queue", "selectors", "resource", "termios", "fcntl",
)
# Codecs are found by name and imported on first use; the trace's byte
# summaries use unicode_escape.
_CODECS_PRELOAD = ("ascii", "latin-1", "utf-8", "unicode_escape", "raw_unicode_escape")
# What no run executes after its lockdown: the entry point, and the code of
# the other commands (an xl.cfg file is read before the lockdown).
NEVER_AFTER_LOCKDOWN = ("pyvmm.__main__", "pyvmm.cli", "pyvmm.xlcfg", "pyvmm.hostcheck", "pyvmm.debug.trace_show")
# Subsystems a run that does not use them never imports after the lockdown,
# skipped through preload(unused=...) (runner.py says which a run uses):
GDB_STUB = "pyvmm.debug.gdbstub"  # only with --gdb
XEN = "pyvmm.xen"  # only with Xen: a --no-xen run keeps the part it imported already (device kinds, specs)
STATS = "pyvmm.vmm.exit_stats"  # only with --stats or --stats-json


def pyvmm_modules() -> list[str]:
    """Every module of the pyvmm package, by name, from its files: a
    listing, much cheaper than pkgutil.walk_packages, which imports each
    package to find its path."""
    import pyvmm

    root = os.path.dirname(pyvmm.__file__)
    names = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if os.path.isfile(os.path.join(folder, d, "__init__.py")))
        relative = os.path.relpath(folder, root)
        package = ".".join(["pyvmm", *([] if relative == "." else relative.split(os.sep))])
        for name in sorted(files):
            if name.endswith(".py"):
                stem = name[:-3]
                names.append(package if stem == "__init__" else f"{package}.{stem}")
    return names


def _skipped(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def preload(unused: tuple[str, ...] = ()) -> None:
    """Import what the run may import lazily after the lockdown: every pyvmm
    module but those of NEVER_AFTER_LOCKDOWN and of the `unused` subsystems
    (GDB_STUB, XEN, STATS) that are not imported already."""
    import codecs
    import importlib
    import linecache

    import pyvmm

    for name in _STDLIB_PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    for name in _CODECS_PRELOAD:
        codecs.lookup(name)
    skipped = NEVER_AFTER_LOCKDOWN + tuple(unused)
    for name in pyvmm_modules():
        if name not in sys.modules and not _skipped(name, skipped):
            try:
                importlib.import_module(name)
            except Exception as error:  # noqa: BLE001 - a module this run cannot use is not needed by it
                log.debug("sandbox: not preloading %s: %s", name, error)
    # Tracebacks logged later show pyvmm's source lines (linecache keeps them).
    for module in list(sys.modules.values()):
        filename = getattr(module, "__file__", None) or ""
        if filename.endswith(".py") and filename.startswith(os.path.dirname(pyvmm.__file__)):
            _cache_source(linecache.cache, filename)


def _cache_source(cache: dict, filename: str) -> None:
    """Put a pyvmm source file's lines in linecache's cache as
    linecache.updatecache() would, with one read: updatecache() opens the
    file twice (tokenize's encoding check, then the lines), for ~130 files at
    every start (0.9 s of a profiled start inside scripts/testbed). pyvmm's
    sources are UTF-8 (PEP 3120's default; none declares another)."""
    try:
        info = os.stat(filename)
        with open(filename, encoding="utf-8") as source:
            lines = source.readlines()
    except (OSError, UnicodeDecodeError):
        return  # the traceback shows no line for this file, as linecache would
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    cache[filename] = (info.st_size, info.st_mtime, lines, filename)


# --- the monitor ------------------------------------------------------------------------------


class Monitor:
    """The forked process that names a forbidden call and stops the VMM.

    It watches three things with poll(): the channel to the VMM (the
    sockets to remove, the filter's notification descriptor), the VMM's
    pidfd (it has ended) and the notification descriptor. It leaves as soon
    as the VMM has ended, and checks once a second that its parent is still
    the VMM, so it can neither outlive the VMM nor wait forever.
    """

    def __init__(self, channel_fd: int, vmm: int, audit: bool, audit_file: str | None = None):
        self.channel_socket = socket.socket(fileno=channel_fd)
        self.channel = channel_fd
        self.vmm = vmm
        self.audit = audit
        self.audit_file = audit_file
        self.notify: int | None = None
        self.locked = False
        self.load_deadline: float | None = None
        self.sockets: list[tuple[str, int, int]] = []
        self.terminal = None
        self.seen: set[int] = set()

    def run(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGTSTP):
            signal.signal(signum, signal.SIG_IGN)
        self._keep_terminal()
        self.pidfd = os.pidfd_open(self.vmm)
        if os.getppid() != self.vmm:
            return
        self._close_other_fds()
        try:
            self._watch()
        finally:
            self._remove_sockets()

    def _keep_terminal(self) -> None:
        """The terminal's settings before the VMM makes it raw, to restore them."""
        import termios

        try:
            if os.isatty(0):
                self.terminal = (os.dup(0), termios.tcgetattr(0))
        except (OSError, termios.error):
            self.terminal = None

    def _close_other_fds(self) -> None:
        keep = {2, self.channel, self.pidfd} | ({self.terminal[0]} if self.terminal else set())
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1):
            os.dup2(null, fd)
        keep |= {0, 1}
        try:
            open_fds = [int(name) for name in os.listdir("/proc/self/fd")]
        except OSError:  # no /proc: close a generous range
            open_fds = list(range(3, 4096))
        for fd in open_fds:
            if fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _watch(self) -> None:
        poller = select.poll()
        poller.register(self.channel, select.POLLIN)
        poller.register(self.pidfd, select.POLLIN)
        while True:
            for fd, events in poller.poll(1000):
                if fd == self.pidfd:
                    return  # the VMM has ended
                if fd == self.channel:
                    if not self._on_channel():
                        poller.unregister(self.channel)
                        if not self.locked:
                            return
                    elif self.notify is not None and not self._registered:
                        poller.register(self.notify, select.POLLIN)
                        self._registered = True
                elif fd == self.notify:
                    if events & select.POLLIN:
                        self._on_notification()
                    elif events & (select.POLLHUP | select.POLLERR):
                        return  # no task uses the filter any more
            if os.getppid() != self.vmm:
                return
            if self.load_deadline is not None and self.notify is None and time.monotonic() > self.load_deadline:
                self._say("the sandbox's filter was loaded but never handed over; stopping the VMM")
                self._stop_vmm()
                return

    _registered = False

    def _on_channel(self) -> bool:
        """One message from the VMM; False at end of file."""
        try:
            data, fds, _, _ = socket.recv_fds(self.channel_socket, 65536, 1)
        except OSError:
            return False
        if not data:
            return False
        kind, body = data[:1], data[1:]
        # Once the VMM is locked down it may be a guest's: from then on it can
        # only ask for what was settled before (remove the sockets it listed),
        # never name new paths for this (possibly root) process to remove.
        taken = False
        if kind == b"P" and not self.locked:
            self.sockets = [(str(path), int(dev), int(ino)) for path, dev, ino in json.loads(body)]
        elif kind == b"L":
            self.locked = True
            self.load_deadline = time.monotonic() + FD_WAIT_SECONDS
        elif kind == b"N" and fds and self.locked and self.notify is None:
            self.notify = fds[0]
            taken = True
        elif kind == b"U":
            self._remove_sockets()
            self.channel_socket.send(b"u")
        for fd in fds[1:] if taken else fds:
            os.close(fd)
        return True

    def _on_notification(self) -> None:
        import fcntl

        buffer = bytearray(_NOTIF.size)
        try:
            fcntl.ioctl(self.notify, SECCOMP_IOCTL_NOTIF_RECV, buffer, True)
        except OSError:
            return  # the call's thread is gone (e.g. the VMM is ending)
        ident, pid, _flags, number, _arch, _ip, *args = _NOTIF.unpack(buffer)
        name = syscall_name(number)
        if self.audit:
            if number not in self.seen:
                self.seen.add(number)
                kind = ("refused (EACCES)" if name in REFUSED else
                        "refused (ENOSYS)" if name in ENOSYS_CALLS else "forbidden")
                line = f"audit: {name} ({number}) would be {kind}; let through"
                if self.audit_file is None:
                    self._say(line)
                else:
                    with open(self.audit_file, "a") as file:
                        file.write(f"{line}\n")
            response = _NOTIF_RESP.pack(ident, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE)
            try:
                fcntl.ioctl(self.notify, SECCOMP_IOCTL_NOTIF_SEND, bytearray(response), True)
            except OSError:
                pass
            return
        self._say(f"forbidden system call {name} ({number}) by thread {pid}; stopping the VMM "
                  f"(exit status {EXIT_SANDBOX}; docs/SANDBOX.md, --no-sandbox to debug)")
        self._stop_vmm()

    def _stop_vmm(self) -> None:
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGSYS)
        except OSError:
            return
        ready, _, _ = select.select([self.pidfd], [], [], KILL_GRACE_SECONDS)
        if not ready:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except OSError:
                pass
            select.select([self.pidfd], [], [], KILL_GRACE_SECONDS)
        self._restore_terminal()

    def _restore_terminal(self) -> None:
        if self.terminal is None:
            return
        import termios

        fd, settings = self.terminal
        try:
            termios.tcsetattr(fd, termios.TCSADRAIN, settings)
        except (OSError, termios.error):
            pass

    def _remove_sockets(self) -> None:
        """Unlink the VMM's sockets, each only if it is still the one it bound."""
        for path, dev, ino in self.sockets:
            try:
                info = os.lstat(path)
                if stat.S_ISSOCK(info.st_mode) and (info.st_dev, info.st_ino) == (dev, ino):
                    os.unlink(path)
            except OSError:
                pass
        self.sockets = []

    @staticmethod
    def _say(text: str) -> None:
        try:
            os.write(2, f"pyvmm: sandbox: {text}\n".encode())
        except OSError:
            pass

# --- the suite's probe (runner.py, PYVMM_TEST_SANDBOX_CALL) -----------------------------------


def try_forbidden_call(call: str) -> None:
    """Try `call` on the calling (VMM) thread: `execve`, `open` or `socket`."""
    log.warning("sandbox test: %s trying %s", threading.current_thread().name, call)
    try:
        if call == "execve":
            os.execv("/bin/true", ["true"])
        elif call == "open":
            with open("/etc/hostname", "rb"):
                pass
        elif call == "socket":
            socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
        else:
            log.warning("sandbox test: unknown call %r", call)
            return
    except OSError as error:
        log.warning("sandbox test: %s failed: %s", call, error)
        return
    log.warning("sandbox test: %s succeeded", call)
