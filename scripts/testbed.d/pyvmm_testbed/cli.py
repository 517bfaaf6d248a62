"""Command line of scripts/testbed (see docs/TESTBED.md)."""

import argparse
import fcntl
import os
import sys
import time

from pyvmm_testbed import host, provision

EXIT_TIMEOUT = 124
EXIT_TESTBED_FAILED = 125
EXIT_USAGE = 2
DEFAULT_BOOT_TIMEOUT = 300
DEFAULT_RUN_LOCK = "/tmp/pyvmm-testbed-run.lock"  # one L1 at a time per host


TCG_THREADS = ("multi", "single")
L1_IDLE = ("halt", "poll")
L1_THP = ("always", "never")


def parse_arguments(argv, environ=None):
    parser = argparse.ArgumentParser(
        prog="testbed",
        usage="%(prog)s [options] -- CMD [ARGS...]\n       %(prog)s --prepare\n       %(prog)s --check",
        description="Run CMD inside an L1 Linux whose KVM can run Xen HVM guests "
                    "(QEMU TCG, emulated AMD SVM). The host's root is visible read-only; "
                    "the git top-level of the current directory and --rw paths are writable.",
        epilog="Exit status: CMD's; 124 on --timeout; 125 if the testbed itself failed.")
    parser.add_argument("--memory", type=int, default=4096, metavar="MiB",
                        help="L1 memory (default %(default)s)")
    parser.add_argument("--cpus", type=int, metavar="N",
                        help="L1 vCPUs (default $PYVMM_TESTBED_CPUS, else 2)")
    parser.add_argument("--tcg-threads", choices=TCG_THREADS, metavar="multi|single",
                        help="QEMU's TCG: one host thread per L1 vCPU (multi) or one for all (single; "
                             "slower) (default $PYVMM_TESTBED_TCG_THREADS, else multi)")
    parser.add_argument("--l1-idle", choices=L1_IDLE, metavar="halt|poll",
                        help="how L1's idle CPUs wait: halt (the kernel's own) or poll (idle=poll: they spin, "
                             "so no interrupt has to wake a halted emulated CPU) "
                             "(default $PYVMM_TESTBED_L1_IDLE, else %s)" % host.DEFAULT_L1_IDLE)
    parser.add_argument("--l1-thp", choices=L1_THP, metavar="always|never",
                        help="transparent huge pages in L1: always (Debian's) or never (transparent_hugepage=never: "
                             "no khugepaged collapsing the VMMs' guest RAM) (default $PYVMM_TESTBED_L1_THP, else %s)"
                        % host.DEFAULT_L1_THP)
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="stop CMD after this long (counted from its start, not L1's boot); exit 124")
    parser.add_argument("--rw", action="append", default=[], metavar="PATH",
                        help="also make this host directory writable inside L1 (repeatable)")
    parser.add_argument("--modules", default="", metavar="m1,m2",
                        help="extra L1 kernel modules to load (with their dependencies)")
    parser.add_argument("--l1-kernel", choices=provision.KERNEL_SUITES, metavar="SUITE",
                        help="the Debian suite whose linux-image-amd64 L1 boots: %s (default $%s, else %s)"
                        % (", ".join(provision.KERNEL_SUITES), provision.KERNEL_ENVIRONMENT,
                           provision.DEFAULT_KERNEL_SUITE))
    parser.add_argument("--l1-silence", type=float, metavar="SECONDS",
                        help="give L1 up as frozen (exit 125) when its agent, which speaks every 10 s, has "
                             "been silent this long while CMD runs; 0: never (default $PYVMM_TESTBED_L1_SILENCE, "
                             "else %g)" % host.DEFAULT_L1_SILENCE)
    parser.add_argument("--verbose", action="store_true",
                        help="show progress, the QEMU command and the L1 console on stderr")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--prepare", action="store_true",
                      help="install, download and build everything (refreshing the kernel); boot nothing")
    mode.add_argument("--check", action="store_true",
                      help="boot L1 and report its KVM's Xen capabilities; exit 0 if usable")
    parser.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.command[:1] == ["--"]:
        options.command = options.command[1:]
    if options.prepare or options.check:
        if options.command:
            parser.error("--prepare and --check take no command")
    elif not options.command:
        parser.error("no command given (put it after --)")
    environ = os.environ if environ is None else environ

    def from_environ(value, name, default, convert, what):
        """An option's value: given, else $name's, else `default`."""
        if value is not None:
            return value
        text = environ.get(name)
        if not text:
            return default
        try:
            return convert(text)
        except ValueError:
            parser.error("%s=%s: not %s" % (name, text, what))

    def one_of(choices):
        def convert(text):
            if text not in choices:
                raise ValueError(text)
            return text
        return convert

    options.cpus = from_environ(options.cpus, "PYVMM_TESTBED_CPUS", 2, int, "a number")
    options.tcg_threads = from_environ(options.tcg_threads, "PYVMM_TESTBED_TCG_THREADS", "multi", one_of(TCG_THREADS),
                                       "one of " + ", ".join(TCG_THREADS))
    options.l1_idle = from_environ(options.l1_idle, "PYVMM_TESTBED_L1_IDLE", host.DEFAULT_L1_IDLE, one_of(L1_IDLE),
                                   "one of " + ", ".join(L1_IDLE))
    options.l1_thp = from_environ(options.l1_thp, "PYVMM_TESTBED_L1_THP", host.DEFAULT_L1_THP, one_of(L1_THP),
                                  "one of " + ", ".join(L1_THP))
    options.l1_silence = from_environ(options.l1_silence, "PYVMM_TESTBED_L1_SILENCE", host.DEFAULT_L1_SILENCE,
                                      float, "a number of seconds")
    if options.memory < 256:
        parser.error("--memory must be at least 256 MiB")
    if not 1 <= options.cpus <= 64:
        parser.error("--cpus must be between 1 and 64")
    if options.timeout is not None and options.timeout <= 0:
        parser.error("--timeout must be positive")
    if options.l1_silence < 0 or 0 < options.l1_silence < 30:
        parser.error("--l1-silence must be 0 (never) or at least 30 s (the agent speaks every 10 s)")
    for path in options.rw:
        if not os.path.isdir(path):
            parser.error("--rw %s: not an existing directory" % path)
    options.modules = [name for name in options.modules.split(",") if name.strip()]
    try:
        options.l1_kernel = provision.kernel_suite(options.l1_kernel, environ)
    except provision.ProvisionError as error:
        parser.error(str(error))
    return options


def say(message):
    sys.stderr.write("testbed: %s\n" % message)
    sys.stderr.flush()


KEEP_CONSOLE_LOGS = 20  # the newest failures' whole L1 consoles


def keep_console(console_log, directory=None):
    """The whole L1 console of a failed run (its last 256 KiB: a panic's
    full text, which the tail on stderr cuts) in a file of its own, named
    on stderr; only the newest KEEP_CONSOLE_LOGS are kept. None if there
    was nothing to keep or nowhere to keep it."""
    if not console_log:
        return None
    if directory is None:
        directory = os.environ.get("PYVMM_TESTBED_LOGS") or os.path.join(
            provision.cache_directory(os.environ), "failed-runs")
    try:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "l1-console-%s-%d.log" % (time.strftime("%Y%m%d-%H%M%S"), os.getpid()))
        with open(path, "wb") as handle:
            handle.write(console_log)
        logs = sorted(name for name in os.listdir(directory) if name.startswith("l1-console-"))
        for name in logs[:-KEEP_CONSOLE_LOGS]:
            os.unlink(os.path.join(directory, name))
    except OSError as error:
        say("cannot keep the L1 console: %s" % error)
        return None
    say("the whole L1 console: %s" % path)
    return path


def fail(message, console_log=b"", appendix=b""):
    """Say why the testbed failed, show the console's tail and keep the
    whole console, with `appendix` (QEMU's monitor's answer) after it."""
    say(message)
    tail = host.console_tail(console_log)
    if tail:
        sys.stderr.write("testbed: last lines of the L1 console:\n")
        sys.stderr.write("".join("  | %s\n" % line for line in tail))
    keep_console(console_log + appendix)
    return EXIT_TESTBED_FAILED


def boot_timeout():
    try:
        return float(os.environ.get("PYVMM_TESTBED_BOOT_TIMEOUT", DEFAULT_BOOT_TIMEOUT))
    except ValueError:
        return DEFAULT_BOOT_TIMEOUT


def build_job(options, writable):
    cwd = os.getcwd()
    plan = host.terminal_plan(*(os.isatty(fd) for fd in (0, 1, 2)))
    size = host.terminal_size(0) if plan["stdin"] else None
    if size:
        plan["rows"], plan["cols"] = size
    return {
        "kind": "run",
        "argv": options.command,
        # The command sees the settings L1 runs with, options and defaults
        # included (the soak records them).
        "env": host.job_environment(dict(os.environ, PWD=cwd, PYVMM_TESTBED_TCG_THREADS=options.tcg_threads,
                                         PYVMM_TESTBED_L1_IDLE=options.l1_idle,
                                         PYVMM_TESTBED_L1_THP=options.l1_thp), writable),
        "cwd": cwd,
        "tty": plan,
        "mounts": [["rw%d" % index, path] for index, path in enumerate(writable)],
        "tmp_size": "%dm" % (options.memory // 2),
        "rw_cache": rw_cache(),
    }


RW_CACHE_ENVIRONMENT = "PYVMM_TESTBED_RW_CACHE"


def rw_cache():
    """How L1 caches the writable 9p mounts (the repository): "loose" (the
    default) keeps what L1 has read, so a Python start imports the
    repository's modules from L1's page cache after the first run (a pyvmm
    start to its first KVM_RUN took 6.5-7.7 s instead of 10.9-12.4 s with
    "mmap", `pyvmm ctl` 2.3-3.7 s instead of 3.8-5.2 s: docs/TESTBED.md).
    Files changed on the host during a run are not seen by L1 then; L1's
    writes reach the host at an fsync and when the agent syncs at the end.
    "mmap" asks the host at every file access."""
    value = os.environ.get(RW_CACHE_ENVIRONMENT, "loose")
    if value not in ("mmap", "loose"):
        raise SystemExit("testbed: %s must be mmap or loose, not %r" % (RW_CACHE_ENVIRONMENT, value))
    return value


def take_run_lock(path):
    """Waits until no other testbed runs on this host, and returns the held lock.

    Two L1s under TCG on a small host halve each other's speed and push
    both past their timeouts, so runs take turns. The lock dies with the
    process, whatever way it exits."""
    lock = open(path, "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        say("waiting for another testbed run on this host to end (lock %s)" % path)
        fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def report_check(result):
    print("L1 kernel:        %s" % result.get("release"))
    if "error" in result:
        print("/dev/kvm:         %s" % result["error"])
        return 1
    bits = result.get("xen_hvm", 0)
    print("KVM API version:  %s" % result.get("api_version"))
    print("nested paging:    %s" % {True: "enabled", False: "disabled"}.get(result.get("nested_paging"), "unknown"))
    print("KVM_CREATE_VM:    %s" % result.get("create_vm"))
    print("KVM_CAP_XEN_HVM:  %#x %s" % (bits, " ".join(host.xen_flag_names(bits)) or "(none)"))
    usable = host.xen_usable(bits) and result.get("create_vm") == "ok"
    print("Xen HVM guests:   %s" % ("supported" if usable else
                                    "NOT supported (need %s)" % "|".join(host.XEN_REQUIRED)))
    return 0 if usable else 1


def main(argv=None):
    options = parse_arguments(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    host.install_signal_handlers()
    provisioner = provision.Provisioner(provision.cache_directory(os.environ), say, options.l1_kernel)
    run = None
    try:
        artifacts = provisioner.ensure(refresh=options.prepare)
        if options.prepare:
            say("ready: %s, kernel %s (%s), %s" % (artifacts.qemu, artifacts.kernel["release"],
                                                  options.l1_kernel, artifacts.initramfs))
            return 0
        if options.check:
            writable, job = [], {"kind": "check"}
        else:
            writable = host.writable_paths(os.getcwd(), options.rw)
            job = build_job(options, writable)
        job["modules"] = artifacts.extra_modules(options.modules)
        job.setdefault("tmp_size", "%dm" % (options.memory // 2))
        job.setdefault("mounts", [])
        run_lock = take_run_lock(os.environ.get("PYVMM_TESTBED_LOCK", DEFAULT_RUN_LOCK))  # noqa: F841 held until exit
        run = host.Run(artifacts, job, options.memory, options.cpus, writable, options.timeout,
                       boot_timeout(), say, options.verbose, silence=options.l1_silence,
                       tcg_threads=options.tcg_threads, idle=options.l1_idle, thp=options.l1_thp)
        status = run.execute()
        if options.verbose:
            now = time.monotonic()
            say("L1 booted in %.1fs; command ran %.1fs; total %.1fs" % (
                run.booted_at - run.t0, now - run.started_at if run.started_at else 0.0,
                now - started))
        if options.check:
            return report_check(run.check_result)
        return status
    except (provision.ProvisionError, host.TestbedError, provision.build.BuildError) as error:
        return fail(str(error), bytes(run.console_log) if run else b"", bytes(run.monitor_log) if run else b"")
    except OSError as error:
        return fail("%s" % error, bytes(run.console_log) if run else b"")
    except host.TimedOut:
        run.flush_outputs()
        say("timed out: the command ran longer than %g s" % options.timeout)
        keep_console(bytes(run.console_log))
        return EXIT_TIMEOUT
    except host.Interrupted as interrupt:
        say("interrupted by signal %d; L1 stopped" % interrupt.signum)
        return 128 + interrupt.signum
