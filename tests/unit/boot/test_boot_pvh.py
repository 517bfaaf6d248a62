"""PVH loader, exercised with firmware/pvh-test built on the fly."""

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.core import layout
from pyvmm.boot import pvh
from pyvmm.boot.cpustate import CR0_PE, CR0_PG
from pyvmm.boot.e820 import build_e820, to_pvh_memmap
from pyvmm.boot.errors import BootError
from pyvmm.boot.loader import load_kernel
from pyvmm.devices.pvpanic import PANICKED
from pyvmm.core.memory import GuestMemory

MiB = 1 << 20
RSDP = 0xE0000
SOURCE_DIR = Path(__file__).resolve().parents[3] / "firmware" / "pvh-test"
TEST_KERNEL_BASE = 0x100000  # the linker script's load address

needs_toolchain = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("gcc", "ld", "objcopy")),
    reason="building the PVH test kernel needs gcc, ld and objcopy",
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("pvh-test")
    subprocess.run(["sh", str(SOURCE_DIR / "build.sh"), str(out)], check=True)
    return {"elf64": out / "pvh-test.elf64", "elf32": out / "pvh-test.elf32"}


def guest(mem_size=64 * MiB, fill=None):
    mem = GuestMemory(layout.ram_ranges(mem_size))
    if fill is not None:
        mem.fill(TEST_KERNEL_BASE, 2 * MiB, fill)
    return mem, build_e820(mem_size)


def phdrs(image: bytes):
    """(offset of each program header, field offsets) for ELF32 or ELF64."""
    if image[4] == 2:
        phoff, phentsize, phnum = struct.unpack_from("<Q", image, 32)[0], *struct.unpack_from("<HH", image, 54)
        fields = {"type": (0, "<I"), "paddr": (24, "<Q"), "memsz": (40, "<Q")}
    else:
        phoff, phentsize, phnum = struct.unpack_from("<I", image, 28)[0], *struct.unpack_from("<HH", image, 42)
        fields = {"type": (0, "<I"), "paddr": (12, "<I"), "memsz": (20, "<I")}
    return [phoff + i * phentsize for i in range(phnum)], fields


def patch_phdr(image: bytes, index: int, field: str, value: int) -> bytes:
    out = bytearray(image)
    offsets, fields = phdrs(image)
    where, fmt = fields[field]
    struct.pack_into(fmt, out, offsets[index] + where, value)
    return bytes(out)


NOTE = struct.pack("<III", 4, 4, 18) + b"Xen\0"


def patch_entry_note(image: bytes, entry: int) -> bytes:
    at = image.index(NOTE) + len(NOTE)
    return image[:at] + struct.pack("<I", entry) + image[at + 4 :]


@needs_toolchain
@pytest.mark.parametrize("variant, elfclass", [("elf64", 64), ("elf32", 32)])
def test_test_kernel_loads(built, variant, elfclass):
    image = built[variant].read_bytes()
    assert image[4] == (2 if elfclass == 64 else 1)
    assert struct.unpack_from("<H", image, 18)[0] == 62  # EM_X86_64 in both containers
    parsed = pvh.parse_pvh_elf(image)
    assert parsed.elfclass == elfclass and parsed.entry == TEST_KERNEL_BASE

    mem, e820 = guest(fill=0xAA)
    initrd = b"initrd-bytes" * 100
    state = pvh.load_pvh(mem, image, initrd, b"hello pvh", RSDP, e820)

    # Entry state per the PVH ABI.
    assert state.rip == TEST_KERNEL_BASE and state.rbx == layout.BOOT_PARAMS
    assert state.cr0 & CR0_PE and not state.cr0 & CR0_PG
    assert state.cr4 == 0 and state.efer == 0 and not state.rflags & (1 << 9)
    assert (state.cs.selector, state.cs.type, state.cs.db, state.cs.l) == (0x08, 0xB, 1, 0)
    assert (state.cs.base, state.cs.limit, state.cs.g) == (0, 0xFFFFFFFF, 1)
    for seg in (state.ds, state.es, state.ss):
        assert (seg.selector, seg.type, seg.base, seg.limit, seg.db) == (0x10, 0x3, 0, 0xFFFFFFFF, 1)
    assert (state.tr.type, state.tr.limit, state.tr.present, state.tr.unusable) == (11, 0x67, 1, 0)
    assert mem.read_int(layout.BOOT_GDT + 0x08, 8) == 0x00CF9B000000FFFF
    assert mem.read_int(layout.BOOT_GDT + 0x10, 8) == 0x00CF93000000FFFF
    assert mem.read_int(layout.BOOT_GDT + 0x18, 8) == state.tr.descriptor()

    # Segments: text copied from the file, the bss-only segment zeroed.
    segs = parsed.segments
    text = next(s for s in segs if s.filesz)
    assert mem.read(text.paddr, text.filesz) == image[text.offset : text.offset + text.filesz]
    bss = next(s for s in segs if not s.filesz)
    assert mem.read(bss.paddr, bss.memsz) == bytes(bss.memsz)
    assert mem.read(bss.paddr + bss.memsz, 1) == b"\xaa"  # nothing beyond it touched

    # hvm_start_info and what it points at.
    (magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, entries, _) = (
        mem.read_struct(layout.BOOT_PARAMS, "<IIIIQQQQII"))
    assert (magic, version, flags, nr_modules, rsdp) == (0x336EC578, 1, 0, 1, RSDP)
    assert mem.read(cmdline, 10) == b"hello pvh\0"
    assert entries == len(e820) and mem.read(memmap, 24 * entries) == to_pvh_memmap(e820)
    addr, size, mod_cmdline, _ = mem.read_struct(modlist, "<QQQQ")
    assert size == len(initrd) and mod_cmdline == 0 and addr % 4096 == 0
    assert mem.read(addr, size) == initrd
    assert addr >= bss.paddr + bss.memsz


@needs_toolchain
def test_load_kernel_prefers_pvh_for_elf(built):
    mem, e820 = guest()
    state = load_kernel(mem, built["elf32"], None, "console=hvc0", RSDP, e820)
    assert state.rip == TEST_KERNEL_BASE and state.rbx == layout.BOOT_PARAMS
    start_info = mem.read_struct(layout.BOOT_PARAMS, "<IIIIQQQQII")
    assert start_info[3] == 0 and start_info[4] == 0  # no initrd, no module list


@needs_toolchain
def test_i386_kernel_in_a_32_bit_elf_loads(built):
    image = built["elf32"].read_bytes()
    image = image[:18] + struct.pack("<H", 3) + image[20:]  # EM_386, as a 32-bit PVH kernel is built
    assert pvh.parse_pvh_elf(image).entry == TEST_KERNEL_BASE
    mem, e820 = guest()
    state = pvh.load_pvh(mem, image, None, b"", RSDP, e820)
    assert state.rip == TEST_KERNEL_BASE and state.rbx == layout.BOOT_PARAMS and state.efer == 0


@needs_toolchain
def test_note_found_through_sections_when_no_pt_note(built):
    image = built["elf64"].read_bytes()
    offsets, _ = phdrs(image)
    note_index = next(i for i in range(len(offsets)) if struct.unpack_from("<I", image, offsets[i])[0] == 4)
    image = patch_phdr(image, note_index, "type", 0)  # PT_NOTE -> PT_NULL
    assert pvh.parse_pvh_elf(image).entry == TEST_KERNEL_BASE


@needs_toolchain
@pytest.mark.parametrize("variant", ["elf64", "elf32"])
def test_malformed_elf_kernels(built, variant):
    image = built[variant].read_bytes()
    mem, e820 = guest()

    def fails(data, message, *, mem_size=64 * MiB, initrd=None):
        m, e = guest(mem_size)
        with pytest.raises(BootError, match=message) as info:
            pvh.load_pvh(m, data, initrd, b"", RSDP, e)
        assert "\n" not in str(info.value)

    fails(image.replace(NOTE, struct.pack("<III", 4, 4, 17) + b"Xen\0"), "no Xen PVH entry note")
    fails(image[:18] + struct.pack("<H", 40) + image[20:], "EM_ARM, not x86")
    if variant == "elf64":  # i386 code only comes in 32-bit ELF files
        fails(image[:18] + struct.pack("<H", 3) + image[20:], "EM_386, not x86")
    fails(image[:40], "malformed ELF|truncated")
    fails(image[:0x1010], "truncated")
    fails(patch_entry_note(image, 0x200000), "entry point 0x200000 is outside")
    def move_text(paddr):  # the text segment and the entry point with it
        return patch_entry_note(patch_phdr(image, 0, "paddr", paddr), paddr)

    fails(move_text(0xF000_0000), "outside guest RAM")
    fails(move_text(0xA_0000), "outside guest RAM")  # the EBDA/BIOS area
    fails(move_text(64 * MiB - 0x100), "outside guest RAM")  # runs past the end
    fails(move_text(layout.BOOT_PARAMS), "overlaps the start_info page")
    fails(move_text(layout.BOOT_CMDLINE + 0x100), "overlaps the command line")
    fails(move_text(layout.BOOT_GDT), "overlaps the boot GDT")
    fails(image, "initrd .* do not fit", mem_size=4 * MiB, initrd=b"x" * (3 * MiB))
    with pytest.raises(BootError, match="command line"):
        pvh.load_pvh(mem, image, None, b"x" * layout.BOOT_CMDLINE_MAX, RSDP, e820)


@needs_toolchain
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_elf_loads_or_raises_boot_error(built, data):
    image = bytearray(built["elf64"].read_bytes())
    cut = data.draw(st.integers(0, len(image)))
    for _ in range(data.draw(st.integers(0, 4))):
        image[data.draw(st.integers(0, min(len(image), 0x1200) - 1))] = data.draw(st.integers(0, 255))
    mem, e820 = guest(8 * MiB)
    try:
        pvh.load_pvh(mem, bytes(image[:cut]), None, b"", RSDP, e820)
    except BootError as exc:
        assert "\n" not in str(exc)


def test_source_constants_match_layout():
    source = (SOURCE_DIR / "pvh-test.S").read_text()
    defines = dict(re.findall(r"^#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)\s*$", source, re.M))
    assert int(defines["COM1_PORT"], 0) == layout.COM1_PORT
    assert int(defines["ACPI_PM1A_CNT_BLK"], 0) == layout.ACPI_PM1A_CNT_BLK
    assert int(defines["ACPI_S5_SLP_TYP"], 0) == layout.ACPI_S5_SLP_TYP
    assert int(defines["START_INFO_MAGIC"], 0) == pvh.START_INFO_MAGIC
    assert int(defines["XEN_ELFNOTE_PHYS32_ENTRY"], 0) == pvh.XEN_ELFNOTE_PHYS32_ENTRY
    assert int(defines["PVPANIC_PORT"], 0) == layout.PVPANIC_PORT
    assert int(defines["PVPANIC_PANICKED"], 0) == PANICKED


def test_iter_notes_parses_padding_and_rejects_overruns():
    blob = struct.pack("<III", 5, 3, 7) + b"Hello\0\0\0" + b"abc\0" + NOTE + b"\x00\x00\x10\x00"
    assert list(pvh.iter_notes(blob)) == [(b"Hello", 7, b"abc"), (b"Xen", 18, b"\x00\x00\x10\x00")]
    with pytest.raises(BootError, match="runs past"):
        list(pvh.iter_notes(struct.pack("<III", 4, 64, 18) + b"Xen\0"))
