"""Snapshots and restores on this host's /dev/kvm (docs/SNAPSHOTS.md), with
the PVH test kernel of firmware/pvh-test counting (action=c: it counts in
`spin_count` to 65536, one VM exit per step, prints "count N" at every
1024 and powers off).

A snapshot taken while it counts, restored in two new processes at once,
must go on counting in both from the value the snapshot holds, without
booting again, and reach its poweroff; `pyvmm ctl NAME snapshot` works on
a running VM, which goes on (or stops with --stop); and a file that is
not a snapshot this host can restore is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time

import pytest
from elftools.elf.elffile import ELFFile

from vmm import REPO, LiveGuest, run_pyvmm

from pyvmm.core import snapfile
from pyvmm.core.snapfile import open_snapshot

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm on this host")

STEP = 1024  # pvh-test.S: COUNT_STEP
END = 64 * STEP  # COUNT_END
TIMEOUT = "600"
CONSOLE_BEFORE: dict = {}  # a snapshot's path: what its VM printed up to the snapshot


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    out = tmp_path_factory.mktemp("pvh")
    subprocess.run(["bash", str(REPO / "firmware/pvh-test/build.sh"), str(out)], check=True, capture_output=True)
    return out / "pvh-test.elf64"


@pytest.fixture(autouse=True)
def runtime_dir(tmp_path, monkeypatch):
    """The VMs' control sockets in a directory of this test's own."""
    directory = tmp_path / "run"
    directory.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(directory))


def spin_count(path, kernel) -> int:
    """`spin_count` as the snapshot at `path` holds it (its RAM, read from the file)."""
    with open(kernel, "rb") as stream:
        address = ELFFile(stream).get_section_by_name(".symtab").get_symbol_by_name("spin_count")[0]["st_value"]
    with open_snapshot(path) as snapshot:
        for gpa, size, offset in snapshot.regions:
            if gpa <= address < gpa + size:
                return struct.unpack("<I", os.pread(snapshot.fd, 4, offset + address - gpa))[0]
    raise AssertionError("spin_count is not in the snapshot's RAM")


def counts(console: str) -> list[int]:
    return [int(n) for n in re.findall(r"count (\d+)", console)]


def digest(path) -> str:
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def copy(path, to):
    subprocess.run(["cp", "--sparse=always", str(path), str(to)], check=True)
    return to


@pytest.fixture(scope="module")
def counting_snapshot(kernel, tmp_path_factory):
    """A 512 MiB guest's snapshot, taken (and the VM stopped) when it prints 'count 4096'."""
    path = tmp_path_factory.mktemp("snap") / "counting.snap"
    result = run_pyvmm("run", "--no-xen", "--kernel", str(kernel), "--append", "action=c", "--memory", "512M",
                       "--snapshot-on", "count 4096,stop", "--snapshot-file", str(path), "--timeout", TIMEOUT,
                       timeout=900)
    assert result.status == 0, str(result)
    assert "pyvmm: snapshot written to" in result.stderr, str(result)
    assert "count 4096" in result.stdout and "counted" not in result.stdout, str(result)
    CONSOLE_BEFORE[path] = result.stdout
    return path


def test_the_snapshot_is_sparse_and_holds_the_guest_mid_count(counting_snapshot, kernel):
    info = os.stat(counting_snapshot)
    assert info.st_size > 512 << 20  # all of RAM is there ...
    assert info.st_blocks * 512 < 8 << 20  # ... as holes, but for the pages the guest touched
    assert 4096 <= spin_count(counting_snapshot, kernel) < END


def test_restored_twice_at_once_both_count_on_from_the_saved_value(counting_snapshot, kernel):
    saved = spin_count(counting_snapshot, kernel)
    before = digest(counting_snapshot)
    guests = [subprocess.Popen([sys.executable, "-m", "pyvmm", "run", "--restore", str(counting_snapshot),
                                "--name", f"restored-{n}", "--timeout", TIMEOUT],
                               cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
              for n in range(2)]
    results = [guest.communicate(timeout=900) for guest in guests]
    for guest, (out, err) in zip(guests, results):
        console, log = out.decode(errors="replace"), err.decode(errors="replace")
        assert guest.returncode == 0, f"{console[-2000:]}\n{log[-2000:]}"
        assert "magic ok" not in console, "the restored guest booted again"
        first = (saved // STEP + 1) * STEP
        assert counts(console) == list(range(first, END + 1, STEP)), console[-2000:]
        assert console.rstrip().endswith("counted, powering off"), console[-500:]
    assert results[0][0] == results[1][0]  # both did the same from the same point
    assert digest(counting_snapshot) == before  # restoring never writes the file


def test_the_console_before_and_after_is_one_uninterrupted_run(counting_snapshot, kernel):
    """Not a byte lost or written twice: the vCPU completed the port write it
    was in before its state was saved (Machine._settle), so the restored
    guest neither repeats it nor misses it."""
    whole = run_pyvmm("run", "--no-xen", "--kernel", str(kernel), "--append", "action=c", "--memory", "512M",
                      "--timeout", TIMEOUT, timeout=900)
    assert whole.status == 0, whole
    restored = run_pyvmm("run", "--restore", str(counting_snapshot), "--timeout", TIMEOUT, timeout=900)
    assert restored.status == 0, str(restored)
    assert CONSOLE_BEFORE[counting_snapshot] + restored.stdout == whole.stdout


def test_ctl_snapshot_of_a_running_vm_then_with_stop(kernel, tmp_path):
    first, second = tmp_path / "first.snap", tmp_path / "second.snap"
    with LiveGuest(["run", "--no-xen", "--kernel", str(kernel), "--append", "action=c", "--memory", "256M",
                    "--name", "counter", "--timeout", TIMEOUT], stdin=False) as guest:
        guest.wait_for("count 2048", timeout=300)
        taken = run_pyvmm("ctl", "--json", "counter", "snapshot", str(first))
        assert taken.status == 0, taken
        summary = json.loads(taken.stdout)
        assert summary["bytes"] == os.path.getsize(first) and not summary["stopped"]
        assert not [name for name in os.listdir(tmp_path) if name.endswith(".partial")]
        status = run_pyvmm("ctl", "--json", "counter", "status")
        assert json.loads(status.stdout)["state"] == "running", status  # it runs on
        guest.wait_for("count 6144", timeout=300)  # some counting later
        stopped = run_pyvmm("ctl", "counter", "snapshot", "--stop", str(second))
        assert stopped.status == 0 and "the VM stopped" in stopped.stdout, stopped
        assert guest.finish(timeout=120) == 0, guest  # a VM stopped after its snapshot exits 0
        assert "counted" not in guest.stdout
        before = guest.stdout
    saved = spin_count(second, kernel)
    assert spin_count(first, kernel) < saved
    restored = run_pyvmm("run", "--restore", str(second), "--timeout", TIMEOUT, timeout=900)
    assert restored.status == 0, str(restored)
    # The snapshot may fall in the middle of a "count N" line (one port write
    # per byte): the restored guest finishes that line. So the console before
    # and after, joined, is one run that went on from the saved value.
    assert counts(before + restored.stdout) == list(range(STEP, END + 1, STEP)), str(restored)
    assert counts(before)[-1] <= saved < counts(restored.stdout)[-1], str(restored)


def test_a_snapshot_written_over_an_existing_file_is_never_half_there(kernel, tmp_path):
    """ctl snapshot writes beside FILE and renames: a VM restored from the
    old FILE goes on with its own copy."""
    target = tmp_path / "vm.snap"
    target.write_bytes(b"an old file")
    with LiveGuest(["run", "--no-xen", "--kernel", str(kernel), "--append", "action=l", "--memory", "64M",
                    "--name", "spinner", "--timeout", TIMEOUT], stdin=False) as guest:
        guest.wait_for("looping forever", timeout=300)
        assert run_pyvmm("ctl", "spinner", "snapshot", "--stop", str(target)).status == 0
        assert guest.finish(timeout=120) == 0
    with open_snapshot(target) as snapshot:
        assert snapshot.header["memory"] == 64 << 20
    # Its guest spins without a VM exit (action=l); restored, it spins on from where it was.
    later = tmp_path / "later.snap"
    with LiveGuest(["run", "--restore", str(target), "--name", "respinner", "--timeout", TIMEOUT],
                   stdin=False) as restored:
        time.sleep(2)
        assert run_pyvmm("ctl", "respinner", "snapshot", "--stop", str(later)).status == 0
        assert restored.finish(timeout=120) == 0, str(restored)
        assert "magic ok" not in restored.stdout
    assert spin_count(later, kernel) > spin_count(target, kernel) > 0


# --- refusals: one line, status 1, nothing started ---------------------------------------------

def refused(path, *extra) -> str:
    result = run_pyvmm("run", "--restore", str(path), "--timeout", "60", *extra, timeout=300)
    assert result.status == 1, str(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyvmm: error: "), str(result)
    assert not result.stdout, str(result)
    return lines[0]


def rewrite_header(path, change) -> None:
    """Change the snapshot's header JSON (which is not checksummed) in place."""
    with open_snapshot(path) as snapshot:
        header = change(dict(snapshot.header))
        room = snapshot.header_size - snapfile.FIXED_SIZE
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= room
    with open(path, "r+b") as stream:
        fixed = bytearray(stream.read(snapfile.FIXED_SIZE))
        struct.pack_into("<Q", fixed, 16, len(text))
        stream.seek(0)
        stream.write(bytes(fixed) + text)


def test_a_truncated_or_damaged_snapshot_is_refused(counting_snapshot, tmp_path):
    truncated = copy(counting_snapshot, tmp_path / "truncated.snap")
    os.truncate(truncated, os.path.getsize(truncated) // 2)
    assert "truncated" in refused(truncated)
    damaged = copy(counting_snapshot, tmp_path / "damaged.snap")
    with open_snapshot(damaged) as snapshot:
        offset = snapshot.state_offset + snapshot.state_length // 2
    with open(damaged, "r+b") as stream:
        stream.seek(offset)
        byte = stream.read(1)
        stream.seek(offset)
        stream.write(bytes([byte[0] ^ 0x20]))
    assert "does not match its checksum" in refused(damaged)
    empty = tmp_path / "empty.snap"
    empty.write_bytes(b"")
    assert "empty" in refused(empty)
    assert "No such file" in refused(tmp_path / "missing.snap")


def test_another_format_is_refused(counting_snapshot, tmp_path):
    other = copy(counting_snapshot, tmp_path / "format.snap")
    with open(other, "r+b") as stream:
        stream.seek(8)
        stream.write(struct.pack("<I", snapfile.FORMAT_VERSION + 1))
    assert f"snapshot format {snapfile.FORMAT_VERSION + 1}" in refused(other)


@pytest.mark.parametrize("change,words", [
    (lambda host: {**host, "vendor": "GenuineIntel" if host["vendor"] != "GenuineIntel" else "AuthenticAMD"},
     "CPU, and this host's is"),
    (lambda host: {**host, "model": host["model"] + 1}, "another CPU model"),
    (lambda host: {**host, "kvm": "kvm_other"}, "taken under kvm_other"),
    (lambda host: {**host, "features": {**host["features"], "0x7.0.ebx": 0xFFFFFFFF}}, "lacks CPU features"),
])
def test_another_host_is_refused(counting_snapshot, tmp_path, change, words):
    other = copy(counting_snapshot, tmp_path / "host.snap")
    rewrite_header(other, lambda header: {**header, "host": change(header["host"])})
    assert words in refused(other)


def test_the_shape_comes_from_the_snapshot(counting_snapshot):
    message = refused(counting_snapshot, "--memory", "1G")
    assert "--memory cannot be given with --restore" in message


def test_snapshot_info(counting_snapshot, tmp_path):
    info = run_pyvmm("snapshot", "info", "--json", str(counting_snapshot))
    assert info.status == 0, info
    described = json.loads(info.stdout)
    assert described["memory"] == 512 << 20 and described["parts"] == ["acpi_pm", "i8042", "pci", "rtc", "serial"]
    assert described["restorable_here"] is True
    other = copy(counting_snapshot, tmp_path / "other-host.snap")
    rewrite_header(other, lambda header: {**header, "host": {**header["host"], "kvm": "kvm_other"}})
    elsewhere = run_pyvmm("snapshot", "info", str(other))
    assert elsewhere.status == 1 and "restorable_here: False" in elsewhere.stdout, elsewhere
    assert "taken under kvm_other" in elsewhere.stdout
    truncated = copy(counting_snapshot, tmp_path / "t.snap")
    os.truncate(truncated, 4096)
    bad = run_pyvmm("snapshot", "info", str(truncated))
    assert bad.status == 1 and "truncated" in bad.stderr, bad


def test_a_restored_vm_can_be_snapshotted_again(counting_snapshot, kernel, tmp_path):
    """A restored guest's RAM is mapped from its snapshot: a snapshot of it
    holds what the guest changed since and what it did not."""
    again = tmp_path / "again.snap"
    result = run_pyvmm("run", "--restore", str(counting_snapshot), "--snapshot-on", f"count {8 * STEP},stop",
                       "--snapshot-file", str(again), "--timeout", TIMEOUT, timeout=900)
    assert result.status == 0 and "snapshot written" in result.stderr, str(result)
    assert spin_count(again, kernel) >= 8 * STEP
    final = run_pyvmm("run", "--restore", str(again), "--timeout", TIMEOUT, timeout=900)
    assert final.status == 0, final
    assert counts(final.stdout)[0] == (spin_count(again, kernel) // STEP + 1) * STEP
    assert counts(final.stdout)[-1] == END


def test_measure(counting_snapshot, kernel, tmp_path):
    """Not a check: the numbers docs/SNAPSHOTS.md quotes, printed (pytest -s)."""
    started = time.monotonic()
    result = run_pyvmm("run", "--restore", str(counting_snapshot), "--stats-json", str(tmp_path / "stats.json"),
                       "--timeout", TIMEOUT, timeout=900)
    assert result.status == 0
    print(f"\nrestore and run to the end: {time.monotonic() - started:.2f} s; "
          f"stats: {json.loads((tmp_path / 'stats.json').read_text()).get('startup')}")


def test_a_restored_guest_that_resets_boots_its_kernel_again(kernel, tmp_path):
    """Under the sandbox, which opens no file once the guest runs: the kernel
    is kept for a reboot from the start of the restore."""
    path = tmp_path / "fault.snap"
    first = run_pyvmm("run", "--no-xen", "--kernel", str(kernel), "--append", "action=t", "--memory", "64M",
                      "--snapshot-on", "magic ok,stop", "--snapshot-file", str(path), "--timeout", TIMEOUT,
                      timeout=900)
    assert first.status == 0 and "triple fault" not in first.stdout, first
    restored = run_pyvmm("run", "--restore", str(path), "--expect", "magic ok", "--timeout", TIMEOUT, timeout=900)
    assert restored.status == 0, restored  # the restored guest triple-faulted, and its kernel booted again
    assert "triple fault" in restored.stdout and "magic ok" in restored.stdout, str(restored)
    assert restored.stdout.index("triple fault") < restored.stdout.index("magic ok")


@pytest.mark.guest  # scripts/test runs it in the testbed, whose KVM emulates Xen; no Linux guest
@pytest.mark.xen
def test_a_xen_mode_guest_saved_and_restored_whole(kernel, tmp_path):
    """A Xen-mode PVH guest: KVM's Xen attributes and the Xen domain's own
    state (event channels, grant table, xenstore, platform device) saved and
    restored in a whole machine, and the guest counts on."""
    from pyvmm.hostcheck import probe

    if not probe().can_run_xen:
        pytest.skip("this host's KVM cannot run Xen guests")
    path = tmp_path / "xen.snap"
    first = run_pyvmm("run", "--kernel", str(kernel), "--append", "action=c", "--memory", "256M",
                      "--snapshot-on", "count 2048,stop", "--snapshot-file", str(path), "--timeout", TIMEOUT,
                      timeout=900)
    assert first.status == 0 and "snapshot written" in first.stderr, first
    with open_snapshot(path) as snapshot:
        state = snapshot.state()
    xen = state["kvm"]["xen"]
    assert xen["vm"]["version"] == 1 and len(xen["vcpus"]) == 1
    restored = run_pyvmm("run", "--restore", str(path), "--timeout", TIMEOUT, timeout=900)
    assert restored.status == 0, str(restored)
    assert counts(restored.stdout)[0] == (spin_count(path, kernel) // STEP + 1) * STEP, str(restored)
    assert counts(restored.stdout)[-1] == END


def test_a_guest_with_a_vcpu_still_waiting_for_its_sipi(kernel, tmp_path):
    """vCPU 1 never started (the PVH test kernel starts no AP): it is saved
    and restored waiting, and the guest counts on on vCPU 0."""
    path = tmp_path / "two.snap"
    first = run_pyvmm("run", "--no-xen", "--kernel", str(kernel), "--append", "action=c", "--memory", "128M",
                      "--vcpus", "2", "--snapshot-on", "count 2048,stop", "--snapshot-file", str(path),
                      "--timeout", TIMEOUT, timeout=900)
    assert first.status == 0, first
    with open_snapshot(path) as snapshot:
        vcpus = snapshot.state()["kvm"]["vcpus"]
    assert [vcpu["mp_state"] for vcpu in vcpus][1] != 0  # not runnable: waiting for INIT/SIPI
    restored = run_pyvmm("run", "--restore", str(path), "--timeout", TIMEOUT, timeout=900)
    assert restored.status == 0 and counts(restored.stdout)[-1] == END, str(restored)
