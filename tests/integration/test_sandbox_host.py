"""The sandbox (docs/SANDBOX.md) on this host's KVM, with our PVH test kernel:
a VMM thread that tries a forbidden call is stopped, one that tries to open
a file is refused, and a normal run (console, control socket, reboot, gdb on
loopback) works with the sandbox on."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from vmm import REPO

from pyvmm.sandbox import EXIT_SANDBOX, availability

pytestmark = [
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm on this host"),
    pytest.mark.skipif(not availability()[0], reason=f"no sandbox here: {availability()[1]}"),
]


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    out = tmp_path_factory.mktemp("pvh")
    subprocess.run(["bash", str(REPO / "firmware/pvh-test/build.sh"), str(out)], check=True, capture_output=True)
    return str(out / "pvh-test.elf64")


def start(kernel, tmp_path, name, action="l", *extra, env=None):
    """A VM whose guest loops forever (action=l) until the test ends it."""
    environment = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path), **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvmm", "run", "--no-xen", "--kernel", kernel, "--append",
         f"console=ttyS0 action={action}", "--name", name, "--timeout", "120", *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=environment,
    )
    return proc, environment


def wait_for_output(proc, text: bytes) -> None:
    for line in proc.stdout:
        if text in line:
            return
    raise AssertionError(f"the guest never printed {text!r}; stderr: {proc.stderr.read().decode()[-3000:]}")


def ctl(env, name, *args):
    return subprocess.run([sys.executable, "-m", "pyvmm", "ctl", name, *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env=env)


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as file:
        return dict(line.rstrip("\n").split(":\t", 1) for line in file if ":\t" in line)


def finish(proc):
    if proc.poll() is None:
        proc.kill()
    stdout, stderr = proc.communicate(timeout=60)
    return stderr.decode(errors="replace")


@pytest.mark.parametrize("call", ["execve", "socket"])
def test_a_forbidden_call_on_a_vcpu_thread_stops_the_vmm_and_is_named(kernel, tmp_path, call):
    name = f"sbx-{call}-{os.getpid()}"
    proc, env = start(kernel, tmp_path, name, env={"PYVMM_TEST_SANDBOX_CALL": call})
    try:
        status = proc.wait(timeout=60)
        stderr = finish(proc)
    finally:
        finish(proc)
    assert status == -signal.SIGSYS, stderr  # a shell shows 128 + 31
    assert EXIT_SANDBOX == 159
    assert "sandbox test: vcpu0 trying " + call in stderr, stderr
    assert re.search(rf"pyvmm: sandbox: forbidden system call {call} \(\d+\) by thread \d+; stopping the VMM", stderr), \
        stderr
    assert f"{call} succeeded" not in stderr, stderr
    # The monitor removed the control socket the VMM left behind.
    deadline = time.monotonic() + 10
    while (tmp_path / "pyvmm" / f"{name}.control").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (tmp_path / "pyvmm" / f"{name}.control").exists()


def test_opening_a_file_is_refused_and_the_vm_goes_on(kernel, tmp_path):
    name = f"sbx-open-{os.getpid()}"
    proc, env = start(kernel, tmp_path, name, env={"PYVMM_TEST_SANDBOX_CALL": "open"})
    try:
        wait_for_output(proc, b"looping forever")
        time.sleep(2)  # the probe runs half a second after the lockdown
        assert proc.poll() is None, finish(proc)
        status = ctl(env, name, "status")
        assert status.returncode == 0, status.stderr
        assert ctl(env, name, "destroy").returncode == 0
        assert proc.wait(timeout=60) == 4
    finally:
        stderr = finish(proc)
    assert "sandbox test: open failed: [Errno 13] Permission denied" in stderr, stderr
    assert "forbidden system call" not in stderr, stderr


def test_the_sandboxed_vmm_runs_unprivileged_with_seccomp_and_serves_its_control_socket(kernel, tmp_path):
    name = f"sbx-on-{os.getpid()}"
    proc, env = start(kernel, tmp_path, name, "l", "-v")
    try:
        wait_for_output(proc, b"looping forever")
        status = proc_status(proc.pid)
        assert status["Seccomp"] == "2", status  # filter mode
        assert status["NoNewPrivs"] == "1", status
        assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0, status
        assert int(status["CapBnd"], 16) == 0 and int(status["CapAmb"], 16) == 0, status
        if os.geteuid() == 0:
            assert status["Uid"].split() == ["65534"] * 4, status
        for command in ("status", "diagnose", "pause", "resume", "status"):
            result = ctl(env, name, command)
            assert result.returncode == 0, (command, result.stderr)
        assert "state: running" in ctl(env, name, "status").stdout
        listed = subprocess.run([sys.executable, "-m", "pyvmm", "list"], capture_output=True, text=True, timeout=60,
                                cwd=REPO, env=env)
        assert name in listed.stdout, listed
        assert ctl(env, name, "destroy").returncode == 0
        assert proc.wait(timeout=60) == 4
    finally:
        stderr = finish(proc)
    assert "sandbox: locked down as uid" in stderr, stderr
    assert not (tmp_path / "pyvmm" / f"{name}.control").exists(), "the control socket was left behind"


def test_no_sandbox_runs_as_before(kernel, tmp_path):
    name = f"sbx-off-{os.getpid()}"
    proc, env = start(kernel, tmp_path, name, "l", "--no-sandbox")
    try:
        wait_for_output(proc, b"looping forever")
        status = proc_status(proc.pid)
        assert status["Seccomp"] == "0" and status["Uid"].split()[0] == str(os.getuid()), status
        assert ctl(env, name, "destroy").returncode == 0
        assert proc.wait(timeout=60) == 4
    finally:
        finish(proc)


def test_reboots_keep_working_under_the_sandbox(kernel, tmp_path):
    # The first boot's /dev/kvm, kernel and control socket are kept for the next.
    result = subprocess.run(
        [sys.executable, "-m", "pyvmm", "run", "--no-xen", "--kernel", kernel, "--append", "console=ttyS0 action=t",
         "--timeout", "120", "-v", "--expect", r"(?s)triple fault.*magic ok.*triple fault.*magic ok.*triple fault"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "sandbox: locked down" in result.stderr
    assert "forbidden system call" not in result.stderr and "Permission denied" not in result.stderr, result.stderr


@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed (apt-get install gdb)")
@pytest.mark.parametrize("where", ["tcp", "unix"])
def test_gdb_on_loopback_or_a_unix_socket_under_the_sandbox(kernel, tmp_path, where):
    name = f"sbx-gdb-{where}-{os.getpid()}"
    socket_path = tmp_path / "guest.gdb"
    address = "tcp:127.0.0.1:0" if where == "tcp" else f"unix:{socket_path}"
    proc, env = start(kernel, tmp_path, name, "p", "--gdb", address, "--gdb-wait")
    try:
        target = None
        for line in proc.stderr:
            found = re.search(rb"gdb stub listening on (tcp:127\.0\.0\.1:(\d+)|unix:\S+)", line)
            if found:
                target = f"127.0.0.1:{int(found.group(2))}" if where == "tcp" else str(socket_path)
                break
        assert target is not None
        gdb = subprocess.run(["gdb", "-nx", "-batch", "-ex", "set architecture i386:x86-64", "-ex",
                              f"target remote {target}", "-ex", "info registers rip", "-ex", "continue"],
                             capture_output=True, text=True, timeout=120)
        assert "rip" in gdb.stdout, gdb.stdout + gdb.stderr
        assert proc.wait(timeout=60) == 3  # the guest ran on and reported its panic
    finally:
        stderr = finish(proc)
    assert "forbidden system call" not in stderr, stderr
    # The monitor removed what the unprivileged VMM could not.
    assert not socket_path.exists() and not (tmp_path / "pyvmm" / f"{name}.control").exists()
