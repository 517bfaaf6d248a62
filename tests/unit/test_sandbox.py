"""The sandbox's policy, options and kept resources (pyvmm/sandbox.py,
pyvmm/core/kept.py); tests/integration/test_sandbox_host.py runs it for real."""

from __future__ import annotations

import os
import socket

import pytest
from click.testing import CliRunner

from pyvmm import sandbox
from pyvmm.cli import cli
from pyvmm.core.kept import KeptResources, NotKept
from pyvmm.sandbox import (ALLOWED, ENOSYS_CALLS, REFUSED, SandboxError, SandboxOptions, allowed_names,
                           conditional_rules, resolve_identity)

NEVER_ALLOWED = ("execve", "execveat", "fork", "vfork", "socket", "connect", "bind", "listen", "ptrace",
                 "setuid", "setresuid", "setgid", "setgroups", "capset", "mount", "kill", "process_vm_writev",
                 "process_vm_readv", "init_module", "bpf", "seccomp", "prctl", "memfd_create", "kexec_load",
                 "unshare", "setns", "chroot", "pivot_root", "open_by_handle_at", "keyctl", "userfaultfd",
                 "perf_event_open", "io_uring_setup", "personality", "fchmod", "fchown")


def test_every_group_has_a_reason_and_names_are_listed_once():
    names = allowed_names()
    assert len(names) == len(set(names))
    assert all(reason and calls for reason, calls in ALLOWED)
    assert not set(names) & set(REFUSED)
    assert not set(names) & set(ENOSYS_CALLS)
    assert not set(REFUSED) & set(ENOSYS_CALLS)
    conditional = {rule.name for rule in conditional_rules(1)}
    assert not conditional & set(names), "a conditional call must not also be allowed outright"


def test_dangerous_calls_are_never_allowed():
    allowed = set(allowed_names()) | {rule.name for rule in conditional_rules(1)}
    assert not allowed & set(NEVER_ALLOWED)
    assert "execve" not in REFUSED  # forbidden: it stops the VMM, it is not merely refused


def test_what_the_vmm_needs_is_allowed():
    allowed = set(allowed_names())
    # The vCPU kick, disks, eventfds, the event loop, the sockets, threads.
    for name in ("futex", "pread64", "pwritev", "preadv", "fdatasync", "fallocate", "eventfd2", "epoll_wait",
                 "accept4", "recvfrom", "sendmsg", "mmap", "munmap", "rt_sigprocmask", "exit", "clock_nanosleep"):
        assert name in allowed, name
    rules = {rule.name: rule for rule in conditional_rules(1234)}
    assert rules["tgkill"].value == 1234
    assert rules["clone"].mask == rules["clone"].value == sandbox.CLONE_THREAD
    kinds = sorted(rule.value >> 8 for rule in conditional_rules(1) if rule.name == "ioctl")
    assert kinds == sorted(sandbox.IOCTL_TYPES) and 0xAE in kinds


def test_opening_files_is_refused_not_forbidden():
    for name in ("open", "openat", "creat", "unlink", "mkdir"):
        assert name in REFUSED


def test_every_name_is_a_system_call_of_this_architecture():
    lib = pytest.importorskip("pyseccomp")
    for name in (*allowed_names(), *REFUSED, *ENOSYS_CALLS, *{rule.name for rule in conditional_rules(1)}):
        assert lib.resolve_syscall(0, name) >= 0, name


def test_the_filter_builds_in_both_modes():
    lib = pytest.importorskip("pyseccomp")
    for audit in (False, True):
        sandbox.build_filter(lib, os.getpid(), audit)  # built, not loaded


def test_notification_structures_match_the_kernel():
    assert sandbox.SECCOMP_IOCTL_NOTIF_RECV == 0xC0502100
    assert sandbox.SECCOMP_IOCTL_NOTIF_SEND == 0xC0182101
    assert sandbox.EXIT_SANDBOX == 159


@pytest.mark.parametrize("text,expected", [("nobody", ("nobody", None)), ("nobody:nogroup", ("nobody", "nogroup")),
                                           ("65534:65534", ("65534", "65534"))])
def test_user_option_parses(text, expected):
    assert SandboxOptions.parse_user(text) == expected


@pytest.mark.parametrize("text", ["", ":", "a:", ":b", "a:b:c"])
def test_bad_user_option_is_refused(text):
    with pytest.raises(SandboxError):
        SandboxOptions.parse_user(text)


def test_identity_defaults_to_nobody_for_root_and_refuses_root():
    if os.geteuid() != 0:
        assert resolve_identity(None) is None
        with pytest.raises(SandboxError, match="needs root"):
            resolve_identity("65534")
        return
    uid, gid = resolve_identity(None)
    assert uid == 65534
    with pytest.raises(SandboxError, match="must not be root"):
        resolve_identity("root")
    with pytest.raises(SandboxError, match="no user"):
        resolve_identity("no-such-user-here")
    with pytest.raises(SandboxError, match="no group"):
        resolve_identity("nobody:no-such-group-here")
    assert resolve_identity("4242") == (4242, 4242)


def test_cli_refuses_user_without_sandbox(tmp_path):
    kernel = tmp_path / "k"
    kernel.write_bytes(b"x")
    result = CliRunner().invoke(cli, ["run", "--kernel", str(kernel), "--no-sandbox", "--user", "nobody"])
    assert result.exit_code != 0
    assert "--user is the sandbox's user" in (result.output + str(result.exception))
    result = CliRunner().invoke(cli, ["run", "--kernel", str(kernel), "--user", "a:b:c"])
    assert result.exit_code != 0 and "NAME:GROUP" in (result.output + str(result.exception))


# --- kept resources ----------------------------------------------------------------------------


def test_inactive_kept_resources_open_afresh(tmp_path):
    kept = KeptResources()
    path = tmp_path / "f"
    path.write_bytes(b"data")
    fd = kept.open(path, os.O_RDONLY)
    os.close(fd)
    kept.lock()
    os.close(kept.open(path, os.O_RDONLY))  # not active: the lock means nothing
    assert kept.close() == []


def test_kept_files_are_duplicates_and_locked_misses_are_refused(tmp_path):
    kept = KeptResources()
    kept.activate()
    path = tmp_path / "kernel"
    path.write_bytes(b"0123456789")
    with kept.open_file(path) as file:
        assert file.read(4) == b"0123"
    kept.lock()
    path.unlink()  # gone from the file system: the kept descriptor still reads it
    with kept.open_file(path) as file:
        assert file.read() == b"0123456789"  # from the start again
    with pytest.raises(NotKept, match="allows no new files"):
        kept.open(tmp_path / "other", os.O_RDONLY)
    with pytest.raises(NotKept):
        kept.open(path, os.O_RDWR)  # other flags: another file as far as the sandbox goes
    assert kept.close() == []
    assert not kept.active


def test_kept_listener_outlives_its_users(tmp_path):
    kept = KeptResources()
    kept.activate()
    path = str(tmp_path / "s")

    def bind():
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(4)
        return listener

    first = kept.listener(("unix", path), bind)
    first.close()
    kept.lock()
    second = kept.listener(("unix", path), bind)  # the same socket, not bound again
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    connection, _ = second.accept()
    connection.close()
    client.close()
    second.close()
    assert kept.holds_listener(("unix", path))
    assert kept.unix_socket_paths() == [path]
    with pytest.raises(NotKept):
        kept.listener(("unix", path + "2"), bind)
    assert kept.close() == [path]


def test_kept_fd_by_key():
    kept = KeptResources()
    read_end, write_end = os.pipe()
    kept.keep_fd(("tap", "x"), write_end)  # inactive: nothing kept
    assert kept.kept_fd(("tap", "x")) is None
    kept.activate()
    kept.keep_fd(("tap", "x"), write_end)
    os.close(write_end)
    duplicate = kept.kept_fd(("tap", "x"))
    os.write(duplicate, b"ok")
    os.close(duplicate)
    assert os.read(read_end, 2) == b"ok"
    kept.close()
    assert os.read(read_end, 2) == b""  # every write end closed
    os.close(read_end)


# --- xl.cfg ------------------------------------------------------------------------------------


def test_xl_device_model_user_is_the_sandboxs_user():
    from pyvmm.xlcfg import xl_config_from_text

    config = xl_config_from_text('name="g"\ntype="hvm"\nkernel="/k"\ndevice_model_user="vmm:kvm"\ndm_restrict=1\n')
    assert config.to_run_options()["sandbox_user"] == "vmm:kvm"
    assert not config.warnings
    assert "sandbox_user" not in xl_config_from_text('name="g"\ntype="hvm"\nkernel="/k"\n').to_run_options()


def test_xl_dm_restrict_0_cannot_turn_the_sandbox_off():
    from pyvmm.xlcfg import xl_config_from_text

    config = xl_config_from_text('name="g"\ntype="hvm"\nkernel="/k"\ndm_restrict=0\n')
    assert any("dm_restrict=0 is ignored" in warning for warning in config.warnings)


def test_xl_bad_device_model_user_names_its_line():
    from pyvmm.config import ConfigError
    from pyvmm.xlcfg import xl_config_from_text

    with pytest.raises(ConfigError, match="device_model_user"):
        xl_config_from_text('name="g"\ntype="hvm"\nkernel="/k"\ndevice_model_user="a:b:c"\n')


# --- the monitor's channel ---------------------------------------------------------------------


def _bound_socket(path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    return listener


def test_monitor_removes_only_the_sockets_listed_before_the_lockdown(tmp_path):
    import json

    from pyvmm.sandbox import Monitor

    vmm, monitor_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    monitor = Monitor(monitor_end.detach(), os.getpid(), audit=False)
    listed, later = tmp_path / "vm.control", tmp_path / "other.socket"
    keep_file = tmp_path / "a-file"
    keep_file.write_text("not a socket")
    sockets = [_bound_socket(listed), _bound_socket(later)]

    def entry(path):
        info = os.lstat(path)
        return [str(path), info.st_dev, info.st_ino]

    vmm.send(b"P" + json.dumps([entry(listed)]).encode())
    assert monitor._on_channel()
    vmm.send(b"L")
    assert monitor._on_channel() and monitor.locked
    # Locked down, the VMM may be the guest's: a new list is ignored.
    vmm.send(b"P" + json.dumps([entry(later), entry(keep_file)]).encode())
    assert monitor._on_channel()
    vmm.send(b"U")
    assert monitor._on_channel()
    assert vmm.recv(16) == b"u"
    assert not listed.exists() and later.exists() and keep_file.exists()
    vmm.close()
    assert not monitor._on_channel()  # end of file
    for sock in sockets:
        sock.close()
    monitor.channel_socket.close()


def test_monitor_keeps_a_replaced_socket(tmp_path):
    import json

    from pyvmm.sandbox import Monitor

    vmm, monitor_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    monitor = Monitor(monitor_end.detach(), os.getpid(), audit=False)
    path = tmp_path / "vm.xenstore"
    first = _bound_socket(path)
    info = os.lstat(path)
    vmm.send(b"P" + json.dumps([[str(path), info.st_dev, info.st_ino]]).encode())
    assert monitor._on_channel()
    path.unlink()
    second = _bound_socket(path)  # another VMM's, now
    monitor._remove_sockets()
    assert path.exists()
    for sock in (first, second, vmm):
        sock.close()
    monitor.channel_socket.close()


def test_what_runs_after_the_lockdown_needs_no_file_after_preload():
    """After the lockdown nothing can be imported from a file (the open is
    refused): the codecs and modules pyvmm uses lazily must be loaded by
    preload(). Here a child process preloads, then loses every way to import
    from a file, then does what the running VMM does lazily: trace byte
    summaries (unicode_escape), JSON records, tracebacks."""
    import subprocess
    import sys
    import textwrap

    child = textwrap.dedent("""
        import sys
        from pyvmm.sandbox import preload
        preload()
        sys.path[:] = []
        sys.path_importer_cache.clear()
        sys.meta_path[:] = [finder for finder in sys.meta_path if getattr(finder, "__name__", "") in ("BuiltinImporter", "FrozenImporter")]
        from pyvmm.core.trace import summarize_bytes
        assert summarize_bytes(bytes(range(8)) + b"xenstore") == "\\\\x00\\\\x01\\\\x02\\\\x03\\\\x04\\\\x05\\\\x06\\\\x07xenstore"
        import json, traceback
        json.dumps({"a": 1})
        try:
            raise ValueError("x")
        except ValueError:
            traceback.format_exc()
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_the_module_listing_finds_what_pkgutil_finds():
    """preload() lists pyvmm's modules from its files, without importing
    packages: the same modules as pkgutil.walk_packages, none missed."""
    import pkgutil

    import pyvmm
    from pyvmm.sandbox import pyvmm_modules

    walked = {module.name for module in pkgutil.walk_packages(pyvmm.__path__, "pyvmm.")} | {"pyvmm"}
    assert set(pyvmm_modules()) == walked


_PRUNED_CHILD = """
import sys
from pyvmm.sandbox import GDB_STUB, XEN, preload
unused = tuple(name for name in sys.argv[1:])
preload(unused)
print(" ".join(sorted(name for name in sys.modules if name.startswith("pyvmm"))))
"""


def _preloaded(*unused: str) -> set[str]:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _PRUNED_CHILD, *unused], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_preload_leaves_out_the_subsystems_a_run_does_not_use():
    from pyvmm.sandbox import GDB_STUB, NEVER_AFTER_LOCKDOWN, STATS, XEN

    everything = _preloaded()
    pruned = _preloaded(GDB_STUB, XEN, STATS)
    assert {"pyvmm.debug.gdbstub.server", "pyvmm.xen.domain", "pyvmm.xen.hv.hypercalls"} <= everything
    assert not any(name == GDB_STUB or name.startswith(GDB_STUB + ".") for name in pruned)
    assert "pyvmm.xen.domain" not in pruned and "pyvmm.xen.hv.hypercalls" not in pruned
    # What every run may still import after the lockdown.
    assert "pyvmm.vmm.exit_stats" in everything and "pyvmm.vmm.exit_stats" not in pruned
    assert {"pyvmm.vmm.machine", "pyvmm.control.operations", "pyvmm.core.stats", "pyvmm.diagnose"} <= pruned
    for name in NEVER_AFTER_LOCKDOWN:
        assert name not in everything and name not in pruned


def test_a_run_without_xen_or_gdb_needs_neither_after_the_lockdown():
    """With Xen and the gdb stub left out of preload(), what such a run can
    still do after the lockdown (control commands that name Xen, describing
    a failure) must not try to import them."""
    import subprocess
    import sys
    import textwrap

    child = textwrap.dedent("""
        import sys
        from types import SimpleNamespace
        from pyvmm.sandbox import GDB_STUB, XEN, preload
        preload((GDB_STUB, XEN))
        sys.path[:] = []
        sys.path_importer_cache.clear()
        sys.meta_path[:] = [finder for finder in sys.meta_path if getattr(finder, "__name__", "") in ("BuiltinImporter", "FrozenImporter")]
        from pyvmm.control.operations import machine_commands
        from pyvmm.control.server import ControlError
        from pyvmm.runner import describe_failure
        commands = machine_commands(SimpleNamespace(xen=None))
        for name, args in (("xenstore-read", {"path": "a"}), ("xenbus-state", {"device": "xvda", "state": "closed"}),
                           ("evtchn-list", {})):
            try:
                commands[name](args)
            except ControlError as error:
                assert error.cls == "Unsupported", (name, error.cls)
            else:
                raise AssertionError(name)
        assert describe_failure(ValueError("a bug")) is None
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_runner_names_the_subsystems_a_run_leaves_unused():
    from pyvmm.config import GdbAddress, VmConfig
    from pyvmm.runner import _unused_subsystems
    from pyvmm.sandbox import GDB_STUB, STATS, XEN

    assert _unused_subsystems(VmConfig(kernel=None)) == (GDB_STUB, STATS)
    assert _unused_subsystems(VmConfig(kernel=None, xen=False)) == (GDB_STUB, XEN, STATS)
    assert _unused_subsystems(VmConfig(kernel=None, gdb=GdbAddress.parse("tcp:1234"), stats=True)) == ()
    assert _unused_subsystems(VmConfig(kernel=None, stats_json="s.json")) == (GDB_STUB,)


def test_preloaded_source_lines_are_what_linecache_itself_would_keep(tmp_path):
    """preload() fills linecache's cache with one read per file; a traceback
    after the lockdown must find the same entry linecache would have made
    (checkcache() compares its size and time with the file's)."""
    import linecache

    from pyvmm import sandbox

    source = tmp_path / "module.py"
    source.write_text("# ünïcode comment\nx = 1\r\ny = 2\n\fz = 3")  # no newline at the end
    ours: dict = {}
    sandbox._cache_source(ours, str(source))
    try:
        linecache.updatecache(str(source))
        assert ours[str(source)] == linecache.cache[str(source)]
    finally:
        linecache.cache.pop(str(source), None)
    sandbox._cache_source(ours, str(tmp_path / "gone.py"))
    assert str(tmp_path / "gone.py") not in ours
