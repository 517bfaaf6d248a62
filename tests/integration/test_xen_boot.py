"""Debian's kernel boots as a Xen HVM guest on pyvmm (the Xen platform's acceptance tests).

Each boot runs a /test.sh that reports what the guest sees of Xen; the
console is the PV console (hvc0) unless a test says otherwise, so the shell
output itself proves hvc0 works.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from initrd import make_test_initrd
from vmm import LiveGuest, Result, run_pyvmm, xen_guest_assets

pytestmark = [pytest.mark.guest, pytest.mark.xen]

BOOT_TIMEOUT = 900

REPORT = r"""
echo "hypervisor=$(cat /sys/hypervisor/type)"
dmesg > /tmp/dmesg
grep -m1 -i "Xen HVM callback vector\|Xen version" /tmp/dmesg | sed 's/^/dmesg: /'
grep -m1 "Grant table initialized" /tmp/dmesg | sed 's/^/dmesg: /'
grep -m1 "xen:events" /tmp/dmesg | sed 's/^/dmesg: /'
echo "uuid=$(cat /sys/hypervisor/uuid)"
# A raw XS_READ of "domid" through the kernel's xenbus device: a round trip
# to the VMM's xenstore over the store ring and its event channel.
exec 3<>/dev/xen/xenbus
printf '\002\000\000\000\007\000\000\000\000\000\000\000\006\000\000\000domid\000' >&3
echo "xenstore-domid=$(dd bs=64 count=1 <&3 2>/dev/null | tail -c +17)"
exec 3<&-
snapshot() { grep -E "timer|resched|callfunc|xen" /proc/interrupts | sed "s/^/$1: /"; }
snapshot before
sleep 1
taskset -c 1 true 2>/dev/null; echo 1 > /proc/sys/vm/drop_caches
snapshot after
echo "cpus=$(grep -c ^processor /proc/cpuinfo)"
echo "console=$(tty)"
"""


@pytest.fixture(scope="module")
def assets():
    return xen_guest_assets()


def boot(assets, tmp_path, script, append="", *extra):
    initrd = make_test_initrd(assets["initramfs"], tmp_path / "initrd", script)
    return run_pyvmm(
        "run", "--xen", "--kernel", str(assets["vmlinuz"]), "--initrd", str(initrd),
        "--append", f"console=hvc0 panic=-1 {append}".strip(), "--vcpus", "2", "--no-reboot", *extra,
        timeout=BOOT_TIMEOUT,
    )


def interrupt_counts(stdout: str, phase: str) -> dict[str, list[int]]:
    """{'timer0': [cpu0, cpu1], ...} from the /proc/interrupts snapshot lines."""
    counts = {}
    for line in stdout.splitlines():
        if not line.startswith(f"{phase}: "):
            continue
        fields = line[len(phase) + 2 :].split()
        if len(fields) < 4:
            continue
        name = fields[-1]
        counts[name] = [int(n) for n in fields[1:3] if n.isdigit()]
    return counts


def check_xen_guest(result, abi="2-level ABI"):
    assert result.status == 0, str(result)
    out = result.stdout
    assert "hypervisor=xen" in out, str(result)
    assert "Grant table initialized" in out, str(result)
    assert f"xen:events: Using {abi}" in out, str(result)
    uuid = re.search(r"uuid=([0-9a-f-]{36})", out)
    assert uuid and uuid.group(1) != "00000000-0000-0000-0000-000000000000", str(result)
    assert "xenstore-domid=1" in out, str(result)
    assert "cpus=2" in out, str(result)
    return out


def test_xen_guest_detects_xen_runs_on_the_pv_console_and_sigterm_powers_it_off(assets, tmp_path):
    """The guest reports what it sees of Xen, then waits. pyvmm's first
    SIGTERM writes control/shutdown=poweroff; the guest's xenbus watch fires
    and it powers off in order (status 0)."""
    import signal

    initrd = make_test_initrd(assets["initramfs"], tmp_path / "initrd",
                              REPORT + "echo waiting-for-sigterm\nwhile :; do sleep 1; done\n")
    with LiveGuest(["run", "--xen", "--kernel", str(assets["vmlinuz"]), "--initrd", str(initrd),
                    "--append", "console=hvc0 panic=-1", "--vcpus", "2", "--no-reboot", "--timeout", "600"],
                   stdin=False) as guest:
        guest.wait_for("waiting-for-sigterm")
        guest.proc.send_signal(signal.SIGTERM)
        status = guest.finish(timeout=300)
    result = Result(status, guest.stdout, guest.stderr)
    check_interrupts_flow(check_xen_guest(result), result)
    assert "Power down" in result.stdout, str(result)


@pytest.mark.parametrize("extra", [(), pytest.param(("--no-xen-accel",), marks=pytest.mark.slow)],
                         ids=["accel", "no-xen-accel"])  # 51 s and 73 s in the testbed
def test_fifo_event_channels_when_offered(assets, tmp_path, extra):
    """Linux takes FIFO when offered: its timers, IPIs, xenstore and console
    then go through pyvmm's FIFO queues (with KVM's 2-level paths taken back)."""
    result = boot(assets, tmp_path, REPORT + "poweroff -f\n", "", "--xen-fifo", "-v", *extra)
    out = check_xen_guest(result, abi="FIFO-based ABI")
    assert "the guest switched to the FIFO ABI" in result.stderr, str(result)
    check_interrupts_flow(out, result)


def check_interrupts_flow(out, result):
    assert "console=/dev/hvc0" in out, str(result)
    before, after = interrupt_counts(out, "before"), interrupt_counts(out, "after")
    # Both CPUs take Xen timer interrupts and IPIs, and the counts rise.
    timers = [name for name in after if name.startswith("timer")]
    assert timers, str(result)
    for cpu in (0, 1):
        assert any(after[n][cpu] > before.get(n, [0, 0])[cpu] for n in timers), (cpu, before, after)
    ipis = [name for name in after if name.startswith(("resched", "callfunc"))]
    for cpu in (0, 1):
        assert any(after[n][cpu] > 0 for n in ipis), (cpu, after)


def test_sysrq_crash_gives_status_3(assets, tmp_path):
    # Since Linux 5.5 an HVM guest only reports a panic to Xen (instead of
    # resetting) when booted with xen_legacy_crash.
    result = boot(assets, tmp_path, "echo crashing-now\necho c > /proc/sysrq-trigger\n", "xen_legacy_crash")
    assert result.status == 3, str(result)
    assert "crashing-now" in result.stdout


def pvpanic_modules(assets, tmp_path) -> dict[str, bytes]:
    """Debian builds pvpanic as modules: take them from the guest kernel's package."""
    debs = sorted((assets["dir"].parent / "debs").glob(f"linux-image-{assets['kernel_release']}_*.deb"))
    if not debs:
        pytest.skip(f"the guest kernel's package is not next to the guest assets ({assets['dir'].parent / 'debs'})")
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(tmp_path / "kernel")], check=True)
    directory = tmp_path / "kernel/lib/modules" / assets["kernel_release"] / "kernel/drivers/misc/pvpanic"
    return {f"/{name}.ko": (directory / f"{name}.ko").read_bytes() for name in ("pvpanic", "pvpanic-mmio")}


def test_sysrq_crash_reported_through_pvpanic_gives_status_3(assets, tmp_path):
    # No xen_legacy_crash: without pvpanic this panic is a reset (status 2).
    script = (
        "insmod /pvpanic.ko && insmod /pvpanic-mmio.ko\n"
        "echo \"pvpanic-bound: $(ls /sys/bus/platform/drivers/pvpanic-mmio | grep QEMU0001)\"\n"
        "echo crashing-now\necho c > /proc/sysrq-trigger\n"
    )
    initrd = make_test_initrd(assets["initramfs"], tmp_path / "initrd", script, pvpanic_modules(assets, tmp_path))
    result = run_pyvmm(
        "run", "--xen", "--kernel", str(assets["vmlinuz"]), "--initrd", str(initrd),
        "--append", "console=hvc0 panic=-1", "--vcpus", "2", "--no-reboot", timeout=BOOT_TIMEOUT,
    )
    assert "pvpanic-bound: QEMU0001:00" in result.stdout, str(result)
    assert "crashing-now" in result.stdout, str(result)
    assert result.status == 3, str(result)
    assert "guest reported a panic (pvpanic)" in result.stderr, str(result)


@pytest.mark.parametrize(
    "append,extra",
    [
        ("xen_no_vector_callback", ()),
        ("noapic", ()),
        ("", ("--no-xen-accel",)),
    ],
    ids=["xen_no_vector_callback", "noapic", "no-xen-accel"],
)
def test_boot_variants(assets, tmp_path, append, extra):
    result = boot(assets, tmp_path, REPORT + "poweroff -f\n", append, *extra)
    check_xen_guest(result)


def test_interactive_shell_on_hvc0_reads_stdin(assets):
    """Without a test script the guest gives a shell on the PV console; what
    the operator types (here: piped) reaches it through the console ring."""
    result = run_pyvmm(
        "run", "--xen", "--kernel", str(assets["vmlinuz"]), "--initrd", str(assets["initramfs"]),
        "--append", "console=hvc0 quiet", "--vcpus", "2", "--no-reboot", "--timeout", "600",
        stdin=b"echo typed-$((6 * 7))\npoweroff -f\n", timeout=BOOT_TIMEOUT,
    )
    assert result.status == 0, str(result)
    assert "typed-42" in result.stdout, str(result)
