"""A firmware boot's bad input, refused before any guest runs (any host)."""

from __future__ import annotations

from vmm import run_pyvmm


def test_wrong_firmware_is_one_line(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(510) + b"\x55\xaa" + bytes(1 << 20))
    bios = tmp_path / "bios.bin"
    bios.write_bytes(bytes(100))
    result = run_pyvmm("run", "--disk", str(disk), "--firmware", str(bios), "--no-sandbox", timeout=60)
    assert result.status == 1, result
    assert result.stderr == (f"pyvmm: error: cannot boot the disk image: firmware {bios} is 100 bytes; "
                             "a BIOS image (SeaBIOS) is 128 KiB or 256 KiB\n"), result


def test_qcow2_is_refused(tmp_path):
    image = tmp_path / "vm.qcow2"
    image.write_bytes(b"QFI\xfb" + bytes(4096))
    result = run_pyvmm("run", str(image), "--no-sandbox", timeout=60)
    assert result.status == 1, result
    assert "is a qcow2 image; pyvmm serves raw images and block devices only" in result.stderr, result
    assert result.stderr.count("\n") == 1
