"""Snapshots of a guest booted through firmware, on this host's /dev/kvm
(no Xen needed: without Xen the firmware's IDE disk is the only disk).

SeaBIOS boots firmware/boot-test's boot sector from the emulated IDE disk;
it reads the disk through the BIOS's INT 13h (SeaBIOS driving the IDE
controller), checks every sector, prints "boot-test: count N" every 256
reads and writes N into a mark sector, then reads the mark back and prints
"boot-test: done". A snapshot taken at any moment, in the firmware or in
the middle of an IDE command, restored from a copy of the disk, must go on
to "done" with every count in order and nothing done twice.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys

import pytest

from vmm import REPO, LiveGuest, run_pyvmm

from pyvmm.boot.firmware import DEFAULT_FIRMWARE

pytestmark = [
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm on this host"),
    pytest.mark.skipif(not DEFAULT_FIRMWARE.exists(), reason="Debian's seabios package is not installed"),
]

STEP, END = 256, 4096  # boot-test.S: COUNT_STEP, COUNT_END
SPAN = 64
MARK_LBA = SPAN + 8
SECTOR = 512
TIMEOUT = "300"
ALL_COUNTS = list(range(STEP, END + 1, STEP))


@pytest.fixture(scope="module")
def boot_sector(tmp_path_factory):
    out = tmp_path_factory.mktemp("boot-test")
    subprocess.run(["sh", str(REPO / "firmware/boot-test/build.sh"), str(out)], check=True, capture_output=True)
    return (out / "boot-test.bin").read_bytes()


@pytest.fixture(autouse=True)
def runtime_dir(tmp_path, monkeypatch):
    directory = tmp_path / "run"
    directory.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(directory))


def make_disk(path, boot_sector):
    """The boot sector, then sector k starting with the 16-bit number k."""
    sectors = [boot_sector] + [struct.pack("<H", k).ljust(SECTOR, b"\xee") for k in range(1, 2 * MARK_LBA)]
    path.write_bytes(b"".join(sectors))
    return path


def mark(path) -> int:
    with open(path, "rb") as disk:
        disk.seek(MARK_LBA * SECTOR)
        return struct.unpack("<H", disk.read(2))[0]


def counts(console: str) -> list[int]:
    return [int(n) for n in re.findall(r"boot-test: count (\d+)", console)]


def test_a_firmware_boot_snapshot_at_a_marker_restores_twice_at_once(boot_sector, tmp_path):
    disk = make_disk(tmp_path / "disk.img", boot_sector)
    snapshot = tmp_path / "fw.snap"
    first = run_pyvmm("run", "--no-xen", "--disk", str(disk), "--snapshot-on", "count 1024,stop",
                      "--snapshot-file", str(snapshot), "--timeout", TIMEOUT, timeout=600)
    assert first.status == 0 and "snapshot written" in first.stderr, str(first)
    assert "Booting from Hard Disk" in first.stdout and counts(first.stdout) == ALL_COUNTS[:4], str(first)
    at_snapshot = mark(disk)  # the guest may or may not have written 1024 before the pause took it
    assert at_snapshot in (768, 1024)
    copies = [shutil.copyfile(disk, tmp_path / f"disk-{n}.img") for n in range(2)]
    guests = [subprocess.Popen([sys.executable, "-m", "pyvmm", "run", "--restore", str(snapshot), "--disk",
                                str(copy), "--name", f"fw-{n}", "--timeout", TIMEOUT, "--expect", "boot-test: done"],
                               cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
              for n, copy in enumerate(copies)]
    results = [guest.communicate(timeout=600) for guest in guests]
    for guest, copy, (out, err) in zip(guests, copies, results):
        console = out.decode(errors="replace")
        assert guest.returncode == 0, f"{console[-2000:]}\n{err.decode(errors='replace')[-2000:]}"
        assert "SeaBIOS" not in console and "started" not in console, "the restored guest booted again"
        assert counts(first.stdout + console) == ALL_COUNTS, console
        assert "boot-test: done" in console and "bad read" not in console
        assert mark(copy) == END  # its writes went to its own copy ...
    assert mark(disk) == at_snapshot  # ... and none to the disk the snapshot was taken with
    assert results[0][0] == results[1][0]
    info = run_pyvmm("snapshot", "info", "--json", str(snapshot))
    described = json.loads(info.stdout)
    assert described["kernel"] is None and "bios-256k.bin (SHA-256 " in described["firmware"], info
    assert {"fw_cfg", "ide0", "ide1"} <= set(described["parts"])


def test_snapshots_taken_at_any_moment_of_a_firmware_boot_restore(boot_sector, tmp_path):
    """`ctl snapshot` as the firmware starts and twice while the sector
    reads go on (each with the VM paused, so that the disk copied beside it
    is the disk of that moment), the last with --stop: every one restores
    and runs to "done"; the stopped one's console before and after is one run."""
    disk = make_disk(tmp_path / "disk.img", boot_sector)
    taken = []
    with LiveGuest(["run", "--no-xen", "--disk", str(disk), "--name", "fwboot", "--timeout", TIMEOUT],
                   stdin=False) as guest:
        for moment, pattern in enumerate(("SeaBIOS", "count 256", "count 2048")):
            guest.wait_for(pattern, timeout=300)
            snapshot, copy = tmp_path / f"at-{moment}.snap", tmp_path / f"at-{moment}.img"
            stop = moment == 2
            if not stop:
                assert run_pyvmm("ctl", "fwboot", "pause").status == 0
            result = run_pyvmm("ctl", "fwboot", "snapshot", *(["--stop"] if stop else []), str(snapshot))
            assert result.status == 0, result
            if stop:
                assert guest.finish(timeout=120) == 0, guest
            shutil.copyfile(disk, copy)
            if not stop:
                assert run_pyvmm("ctl", "fwboot", "resume").status == 0
            taken.append((snapshot, copy))
        before_stop = guest.stdout
    for snapshot, copy in taken:
        restored = run_pyvmm("run", "--restore", str(snapshot), "--disk", str(copy), "--timeout", TIMEOUT,
                             "--expect", "boot-test: done", timeout=600)
        assert restored.status == 0, str(restored)
        assert "bad read" not in restored.stdout and "boot-test: done" in restored.stdout, str(restored)
        after = counts(restored.stdout)
        assert after == ALL_COUNTS[len(ALL_COUNTS) - len(after):], str(restored)  # in order, to the end
        assert mark(copy) == END
    assert counts(before_stop + restored.stdout) == ALL_COUNTS, str(restored)


def test_a_firmware_snapshot_refuses_another_cdrom_or_none(boot_sector, tmp_path):
    from iso_image import make_eltorito_iso, print_boot_code

    disk = make_disk(tmp_path / "disk.img", boot_sector)
    iso = make_eltorito_iso(tmp_path / "cd.iso", print_boot_code(b"a CD\r\n"))
    snapshot = tmp_path / "fw.snap"
    first = run_pyvmm("run", "--no-xen", "--disk", str(disk), "--cdrom", str(iso), "--snapshot-on",
                      "count 512,stop", "--snapshot-file", str(snapshot), "--timeout", TIMEOUT, timeout=600)
    assert first.status == 0, str(first)
    other = make_eltorito_iso(tmp_path / "other.iso", print_boot_code(b"another CD\r\n"))
    iso.rename(tmp_path / "away.iso")
    other.rename(iso)
    refused = run_pyvmm("run", "--restore", str(snapshot), "--disk", str(disk), "--timeout", TIMEOUT, timeout=120)
    assert refused.status == 1, str(refused)
    assert f"CD-ROM {iso} is not the image the snapshot was taken with" in refused.stderr, str(refused)
    assert refused.stderr.count("\n") == 1, str(refused)
    given = run_pyvmm("run", "--restore", str(snapshot), "--disk", str(disk), "--cdrom", str(iso), timeout=120)
    assert given.status != 0 and "--cdrom cannot be given with --restore" in given.stderr, str(given)
