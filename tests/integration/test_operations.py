"""Operating a running Xen guest: xl.cfg, pyvmm list/ctl, and Debian's xenstore-utils.

The guest's script talks to the xenstore through the kernel's xenbus device
(/dev/xen/xenbus) with raw wire-protocol messages built by busybox printf,
so no xenstore tools are needed inside the guest.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from initrd import XS_SHELL, make_test_initrd
from vmm import REPO, LiveGuest, run_pyvmm, xen_guest_assets

pytestmark = [pytest.mark.guest, pytest.mark.xen]

BOOT_TIMEOUT = 900

GUEST_LOOP = XS_SHELL + r"""
i=0
while :; do
    i=$((i + 1))
    echo "tick $i"
    v=$(xs 2 data/from-host)
    if [ "$v" = hello ] && [ -z "$done" ]; then
        xs 11 data/from-guest world >/dev/null
        echo "guest-sees=$v"
        done=1
    fi
    sleep 0.5
done
"""


@pytest.fixture(scope="module")
def assets():
    return xen_guest_assets()


def pyvmm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyvmm", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_guest_started_from_an_xl_config(assets, tmp_path):
    initrd = make_test_initrd(assets["initramfs"], tmp_path / "initrd", "echo from-xl-cfg; cat /proc/cmdline\npoweroff -f\n")
    config = tmp_path / "guest.cfg"
    config.write_text(
        "# an HVM guest as xl would start it\n"
        'type = "hvm"\n'
        'name = "xlguest"\n'
        "memory = 384\n"
        "vcpus = 2\n"
        f'kernel = "{assets["vmlinuz"]}"\n'
        f'ramdisk = "{initrd}"\n'
        'extra = "console=hvc0 marker=xl"\n'
        'on_reboot = "destroy"\n'
        'serial = "pty"\n'
    )
    result = run_pyvmm("run", str(config), timeout=BOOT_TIMEOUT)
    assert result.status == 0, str(result)
    assert "from-xl-cfg" in result.stdout and "marker=xl" in result.stdout, str(result)


def start_guest(assets, tmp_path, name: str, script: str) -> LiveGuest:
    """pyvmm run in the background, named `name`, running `script`."""
    initrd = make_test_initrd(assets["initramfs"], tmp_path / "initrd", script)
    return LiveGuest(["run", "--kernel", str(assets["vmlinuz"]), "--initrd", str(initrd),
                      "--append", "console=hvc0", "--vcpus", "2", "--name", name, "--timeout", "800"], stdin=False)


def ticks(guest: LiveGuest) -> int:
    return sum(1 for line in guest.lines if line.startswith("tick "))


def test_list_ctl_pause_resume_xenstore_tools_and_shutdown(assets, tmp_path):
    if shutil.which("xenstore-write") is None:
        pytest.skip("Debian's xenstore-utils are not installed (scripts/bootstrap installs them)")
    guest = start_guest(assets, tmp_path, "optest", GUEST_LOOP)
    try:
        guest.wait_for("tick 3")

        listed = json.loads(pyvmm("list", "--json").stdout)
        assert [vm["name"] for vm in listed if vm["name"] == "optest"], listed
        status = json.loads(pyvmm("ctl", "--json", "optest", "status").stdout)
        assert status["state"] == "running" and status["vcpus"] == 2 and status["xen"], status
        env = dict(os.environ, XENSTORED_PATH=status["xenstore_socket"])

        # Pause: the guest makes no progress; resume: it goes on.
        assert pyvmm("ctl", "optest", "pause").returncode == 0
        time.sleep(0.5)
        paused_at = ticks(guest)
        assert json.loads(pyvmm("ctl", "--json", "optest", "status").stdout)["state"] == "paused"
        time.sleep(4)
        assert ticks(guest) == paused_at, "the guest ticked while paused"
        assert pyvmm("ctl", "optest", "resume").returncode == 0
        guest.wait_for(f"tick {paused_at + 2}", timeout=120)

        # Debian's xenstore tools against the running guest's store.
        ls = subprocess.run(["xenstore-ls", "/local/domain/1"], env=env, capture_output=True, text=True, timeout=60)
        assert ls.returncode == 0 and 'name = "optest"' in ls.stdout, ls
        watch = subprocess.Popen(
            ["xenstore-watch", "-n", "2", "/local/domain/1/data/from-guest"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        time.sleep(1)  # let the watch register (its first event is the registration)
        write = subprocess.run(["xenstore-write", "/local/domain/1/data/from-host", "hello"], env=env,
                               capture_output=True, text=True, timeout=60)
        assert write.returncode == 0, write
        guest.wait_for("guest-sees=hello", timeout=120)  # the host's value, read in the guest
        out, err = watch.communicate(timeout=120)  # the guest's write, seen by a host watch
        assert watch.returncode == 0 and "/local/domain/1/data/from-guest" in out, (out, err)
        read = subprocess.run(["xenstore-read", "/local/domain/1/data/from-guest"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert read.stdout.strip() == "world", read
        assert pyvmm("ctl", "optest", "xenstore", "read", "/local/domain/1/data/from-guest").stdout.strip() == "world"
        ports = json.loads(pyvmm("ctl", "--json", "optest", "evtchn", "list").stdout)
        assert ports, ports

        # An orderly shutdown through xenstore: the guest powers off, status 0.
        done = pyvmm("ctl", "--timeout", "300", "optest", "shutdown", timeout=400)
        assert done.returncode == 0, done
        assert guest.proc.wait(timeout=120) == 0
        assert any("Power down" in line for line in guest.lines), guest.lines[-10:]
    finally:
        guest.kill()
    assert "optest" not in pyvmm("list").stdout


def test_destroy_stops_at_once_with_status_4(assets, tmp_path):
    guest = start_guest(assets, tmp_path, "desttest", "while :; do echo tick; sleep 1; done\n")
    try:
        guest.wait_for("tick")
        assert pyvmm("ctl", "desttest", "destroy").returncode == 0
        assert guest.proc.wait(timeout=60) == 4
    finally:
        guest.kill()
