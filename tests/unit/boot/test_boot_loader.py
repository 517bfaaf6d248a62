"""Format sniffing and error reporting of load_kernel."""

import gzip
import re

import pytest

from pyvmm.core import layout
from pyvmm.boot.e820 import build_e820
from pyvmm.boot.errors import BootError
from pyvmm.boot.loader import detect_format, load_kernel
from pyvmm.core.memory import GuestMemory

MiB = 1 << 20


def attempt(tmp_path, content: bytes, cmdline="", initrd=None, e820=None):
    kernel = tmp_path / "kernel"
    kernel.write_bytes(content)
    mem = GuestMemory(layout.ram_ranges(32 * MiB))
    with pytest.raises(BootError) as info:
        load_kernel(mem, kernel, initrd, cmdline, 0xE0000, e820 or build_e820(32 * MiB))
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(kernel))
    return message


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "an empty file"),
        (gzip.compress(b"vmlinux"), "gzip"),
        (b"\xfd7zXZ\x00" + bytes(600), "xz"),
        (b"070701" + bytes(600), "cpio"),
        (b"MZ" + bytes(600), "PE/EFI"),
        (b"hello", "5-byte file"),
        (bytes(range(256)) * 4, "unknown format .first bytes 00 01 02"),
    ],
)
def test_unrecognised_files_say_what_they_look_like(tmp_path, content, expected):
    message = attempt(tmp_path, content)
    assert "not a bootable kernel" in message and re.search(expected, message), message


def test_detect_format():
    assert detect_format(b"\x7fELF" + bytes(60)) == "pvh-elf"
    image = bytearray(0x300)
    image[0x1FE:0x200] = b"\x55\xaa"
    assert detect_format(bytes(image)) == "bzimage"  # the parser then reports the missing HdrS
    image[0x202:0x206] = b"HdrS"
    assert detect_format(bytes(image)) == "bzimage"


def test_boot_flag_without_header_magic(tmp_path):
    image = bytearray(0x400)
    image[0x1FE:0x200] = b"\x55\xaa"
    assert "header magic" in attempt(tmp_path, bytes(image))


def test_elf_without_pvh_note(tmp_path):
    assert "malformed ELF" in attempt(tmp_path, b"\x7fELF" + bytes(10))


def test_missing_files(tmp_path):
    mem = GuestMemory(layout.ram_ranges(32 * MiB))
    with pytest.raises(BootError, match="cannot read kernel .*nope: No such file"):
        load_kernel(mem, tmp_path / "nope", None, "", 0, build_e820(32 * MiB))
    (tmp_path / "k").write_bytes(b"x")
    with pytest.raises(BootError, match="cannot read initrd"):
        load_kernel(mem, tmp_path / "k", tmp_path / "missing-initrd", "", 0, build_e820(32 * MiB))


def test_nul_in_command_line(tmp_path):
    mem = GuestMemory(layout.ram_ranges(32 * MiB))
    (tmp_path / "k").write_bytes(b"x")
    with pytest.raises(BootError, match="NUL"):
        load_kernel(mem, tmp_path / "k", None, "a\0b", 0, build_e820(32 * MiB))


def test_memory_map_larger_than_guest_memory(tmp_path):
    """RAM promised by the E820 map but missing from guest memory is a BootError."""
    kernel = tmp_path / "k"
    kernel.write_bytes(b"\x7fELF")  # any format: the failure must still be one line
    image = bytearray(0x1000)
    image[0x1F1] = 1
    image[0x1FE:0x200] = b"\x55\xaa"
    image[0x200:0x206] = b"\xeb\x6aHdrS"
    image[0x206:0x208] = (0x020F).to_bytes(2, "little")
    image[0x211] = 1
    image[0x234] = 1
    image[0x230:0x234] = (2 * MiB).to_bytes(4, "little")
    image[0x236] = 1
    image[0x238:0x23C] = (255).to_bytes(4, "little")
    image[0x258:0x260] = (16 * MiB).to_bytes(8, "little")
    image[0x260:0x264] = (1 * MiB).to_bytes(4, "little")
    kernel.write_bytes(bytes(image))
    mem = GuestMemory(layout.ram_ranges(8 * MiB))
    with pytest.raises(BootError, match="not RAM|past the end"):
        load_kernel(mem, kernel, None, "", 0xE0000, build_e820(64 * MiB))
