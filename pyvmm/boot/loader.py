"""Load a guest kernel, whatever its format, and return the entry vCPU state.

ELF kernels boot through Xen's PVH entry (the path a Xen toolstack uses for
them); bzImages through Linux's 64-bit entry. Anything else is refused with
a message saying what the file looks like.
"""

from __future__ import annotations

import os

from pyvmm.core.kept import KEPT
from pyvmm.core.memory import GuestMemoryError

from .bzimage import is_bzimage, load_bzimage, parse_setup_header
from .cpustate import BootCpuState
from .errors import BootError
from .pvh import is_elf, load_pvh, parse_pvh_elf

# Leading bytes of files people pass by mistake, to say what we saw.
_KNOWN_MAGICS = [
    (b"\x1f\x8b", "a gzip file (a compressed vmlinux? pass the bzImage instead)"),
    (b"\xfd7zXZ\x00", "an xz file"),
    (b"\x28\xb5\x2f\xfd", "a zstd file"),
    (b"\x02\x21\x4c\x18", "an LZ4 legacy file"),
    (b"\x04\x22\x4d\x18", "an LZ4 file"),
    (b"070701", "a cpio archive (an initrd?)"),
    (b"MZ", "a PE/EFI executable without a Linux setup header"),
    (b"#!", "a script"),
]


def describe(data: bytes) -> str:
    if not data:
        return "an empty file"
    for magic, what in _KNOWN_MAGICS:
        if data.startswith(magic):
            return what
    if len(data) < 0x206:
        return f"a {len(data)}-byte file, too short for a kernel (truncated?)"
    return f"an unknown format (first bytes {data[:8].hex(' ')})"


def detect_format(data: bytes) -> str:
    """'pvh-elf', 'bzimage', or BootError naming what the data looks like."""
    if is_elf(data):
        return "pvh-elf"
    # A boot flag alone is enough to go on: the bzImage parser then says
    # precisely which part of the header is wrong.
    if is_bzimage(data) or data[0x1FE:0x200] == b"\x55\xaa":
        return "bzimage"
    raise BootError(f"not a bootable kernel: this is {describe(data)}")


def _read(path, what: str) -> bytes:
    try:
        with KEPT.open_file(path, "rb") as f:  # kept across reboots under the sandbox
            return f.read()
    except OSError as exc:
        raise BootError(f"cannot read {what} {os.fspath(path)}: {exc.strerror}") from None


def _encode_cmdline(cmdline: str | bytes) -> bytes:
    raw = cmdline.encode() if isinstance(cmdline, str) else bytes(cmdline)
    if b"\0" in raw:
        raise BootError("command line contains a NUL byte")
    return raw


def load_kernel(
    memory, kernel_path, initrd_path, cmdline: str | bytes, rsdp_address: int, e820: list
) -> BootCpuState:
    """Place kernel, initrd, command line and boot structures in `memory`.

    `e820` is the map from e820.build_e820(); `rsdp_address` comes from
    acpi.build_acpi().
    """
    image = _read(kernel_path, "kernel")
    initrd = _read(initrd_path, "initrd") if initrd_path else None
    raw_cmdline = _encode_cmdline(cmdline)
    try:
        kind = detect_format(image)
        load = load_pvh if kind == "pvh-elf" else load_bzimage
        return load(memory, image, initrd, raw_cmdline, rsdp_address, e820)
    except BootError as exc:
        raise BootError(f"{os.fspath(kernel_path)}: {exc}") from None
    except GuestMemoryError as exc:
        # The memory map promised RAM the guest memory does not have.
        raise BootError(f"{os.fspath(kernel_path)}: {exc}") from None


def check_kernel(kernel_path, initrd_path) -> None:
    """Read and parse the kernel (and read the initrd) as load_kernel()
    does, loading nothing; BootError if it could not boot. A restored guest
    has not booted its kernel, which a reboot of it will: under the sandbox,
    this opens the files to be kept and imports the parser while it still
    may (pyvmm/core/kept.py, pyvmm/sandbox.py)."""
    image = _read(kernel_path, "kernel")
    if initrd_path:
        _read(initrd_path, "initrd")
    try:
        if detect_format(image) == "pvh-elf":
            parse_pvh_elf(image)
        else:
            parse_setup_header(image)
    except BootError as exc:
        raise BootError(f"{os.fspath(kernel_path)}: {exc}") from None
