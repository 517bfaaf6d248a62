"""Linux boot protocol loader, on synthetic bzImages built here."""

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.core import layout
from pyvmm.boot import bzimage
from pyvmm.boot.cpustate import CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME
from pyvmm.boot.e820 import build_e820, to_boot_params
from pyvmm.boot.errors import BootError
from pyvmm.boot.loader import load_kernel
from pyvmm.core.memory import GuestMemory

MiB = 1 << 20
SETUP_SECTS = 4
PAYLOAD = bytes(range(256)) * 32  # 8 KiB of recognisable protected-mode code
RSDP = 0xE0000


def make_bzimage(
    *, version=0x020F, loadflags=0x01 | 0x80 | 0x40, xloadflags=0x1, relocatable=1,
    pref_address=16 * MiB, init_size=4 * MiB, kernel_alignment=2 * MiB,
    initrd_addr_max=0x7FFFFFFF, cmdline_size=2047, payload=PAYLOAD,
) -> bytes:
    setup = bytearray((SETUP_SECTS + 1) * 512)
    setup[0x1F1] = SETUP_SECTS
    struct.pack_into("<I", setup, 0x1F4, len(payload) // 16)
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200:0x202] = bytes([0xEB, 0x6A])  # jmp past a 2.15 header (ends at 0x26c)
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, kernel_alignment)
    setup[0x234] = relocatable
    setup[0x235] = 21
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + payload


def guest(mem_size=64 * MiB):
    return GuestMemory(layout.ram_ranges(mem_size)), build_e820(mem_size)


def load(image, initrd=None, cmdline=b"console=ttyS0", mem_size=64 * MiB):
    mem, e820 = guest(mem_size)
    state = bzimage.load_bzimage(mem, image, initrd, cmdline, RSDP, e820)
    return mem, e820, state


def zp(mem, offset, fmt):
    return mem.read_struct(layout.BOOT_PARAMS + offset, fmt)[0]


def test_kernel_loaded_at_pref_address_with_64bit_entry_state():
    mem, _, state = load(make_bzimage())
    assert mem.read(16 * MiB, len(PAYLOAD)) == PAYLOAD
    assert state.rip == 16 * MiB + 0x200
    assert state.rsi == layout.BOOT_PARAMS
    assert state.cr0 & (CR0_PE | CR0_PG) == CR0_PE | CR0_PG
    assert state.cr4 & CR4_PAE and state.efer == EFER_LME | EFER_LMA
    assert state.cr3 == layout.BOOT_PML4
    assert (state.cs.selector, state.cs.l, state.cs.db, state.cs.type) == (0x10, 1, 0, 0xB)
    for seg in (state.ds, state.es, state.ss):
        assert (seg.selector, seg.base, seg.limit, seg.type) == (0x18, 0, 0xFFFFFFFF, 0x3)
    assert state.tr.type == 11 and state.tr.present and not state.tr.unusable
    assert not state.rflags & (1 << 9)  # interrupts off


def test_gdt_in_memory_matches_the_segments():
    mem, _, state = load(make_bzimage())
    assert state.gdt.base == layout.BOOT_GDT and state.gdt.limit == 31
    assert mem.read_int(layout.BOOT_GDT + 0x10, 8) == state.cs.descriptor() == 0x00AF9B000000FFFF
    assert mem.read_int(layout.BOOT_GDT + 0x18, 8) == state.ds.descriptor()


def test_zero_page_contents():
    image = make_bzimage()
    mem, e820, _ = load(image, cmdline=b"root=/dev/xvda1 console=ttyS0")
    page = mem.read(layout.BOOT_PARAMS, 4096)
    # The setup header is copied; only the loader-owned fields differ.
    assert page[0x1F1:0x210] == image[0x1F1:0x210]
    assert page[0x22C:0x26C] == image[0x22C:0x26C]
    assert page[0x26C:0x2D0] == bytes(0x2D0 - 0x26C)
    assert page[0x210] == 0xFF  # type_of_loader
    loadflags = page[0x211]
    assert loadflags & 0x01 and not loadflags & (0x40 | 0x80)
    assert zp(mem, 0x228, "<I") == layout.BOOT_CMDLINE
    assert mem.read(layout.BOOT_CMDLINE, 30) == b"root=/dev/xvda1 console=ttyS0\0"
    assert page[0x1E8] == len(e820)
    table = to_boot_params(e820)
    assert page[0x2D0 : 0x2D0 + len(table)] == table
    assert zp(mem, 0x070, "<Q") == RSDP
    assert zp(mem, 0x218, "<I") == 0 and zp(mem, 0x21C, "<I") == 0  # no initrd


def test_old_protocol_has_no_rsdp_field():
    mem, _, _ = load(make_bzimage(version=0x020C))
    assert zp(mem, 0x070, "<Q") == 0


def test_initrd_goes_high_page_aligned_below_initrd_addr_max():
    initrd = b"\x07" * 10000
    mem, _, _ = load(make_bzimage(initrd_addr_max=48 * MiB - 1), initrd)
    addr, size = zp(mem, 0x218, "<I"), zp(mem, 0x21C, "<I")
    assert size == len(initrd) and addr % 4096 == 0
    assert addr + size <= 48 * MiB and addr + size > 48 * MiB - 4096
    assert mem.read(addr, size) == initrd


def test_initrd_above_initrd_addr_max_when_kernel_can_be_above_4g():
    initrd = b"\x07" * 10000
    mem, _, _ = load(make_bzimage(initrd_addr_max=48 * MiB - 1, xloadflags=0x3), initrd)
    addr = zp(mem, 0x218, "<I")
    assert addr == 64 * MiB - 3 * 4096  # highest page-aligned spot in 64 MiB
    assert zp(mem, 0x0C0, "<I") == 0  # ext_ramdisk_image


def test_initrd_never_overlaps_the_kernel():
    initrd = b"\x01" * (3 * MiB)
    # 24 MiB RAM: kernel occupies 16..20 MiB; the initrd fits in 20..24 MiB.
    mem, _, _ = load(make_bzimage(), initrd, mem_size=24 * MiB)
    addr = zp(mem, 0x218, "<I")
    assert addr >= 20 * MiB and addr + len(initrd) <= 24 * MiB


def test_kernel_and_initrd_too_large():
    with pytest.raises(BootError, match="initrd .* do not fit"):
        load(make_bzimage(), b"\x01" * (5 * MiB), mem_size=24 * MiB)


def test_relocatable_kernel_moves_to_16mib_when_pref_address_does_not_fit():
    mem, _, state = load(make_bzimage(pref_address=62 * MiB))
    assert state.rip == 16 * MiB + 0x200
    assert mem.read(16 * MiB, 16) == PAYLOAD[:16]


def test_relocation_respects_kernel_alignment():
    _, _, state = load(make_bzimage(pref_address=62 * MiB, kernel_alignment=32 * MiB), mem_size=64 * MiB)
    assert state.rip == 32 * MiB + 0x200


def test_non_relocatable_kernel_must_fit_at_pref_address():
    with pytest.raises(BootError, match="does not fit"):
        load(make_bzimage(pref_address=62 * MiB, relocatable=0))


def test_kernel_too_large_for_memory():
    with pytest.raises(BootError, match="does not fit"):
        load(make_bzimage(init_size=60 * MiB))


def test_command_line_limits():
    load(make_bzimage(cmdline_size=10), cmdline=b"x" * 10)
    with pytest.raises(BootError, match="command line is 11 bytes"):
        load(make_bzimage(cmdline_size=10), cmdline=b"x" * 11)
    with pytest.raises(BootError, match="command line"):
        load(make_bzimage(cmdline_size=0xFFFFFFFF), cmdline=b"x" * layout.BOOT_CMDLINE_MAX)


@pytest.mark.parametrize(
    "image, message",
    [
        (make_bzimage()[:0x100], "truncated"),
        (make_bzimage()[:0x230], "truncated"),
        (make_bzimage()[:-16], "truncated"),
        (make_bzimage()[:0x1FE] + b"\x00\x00" + make_bzimage()[0x200:], "boot flag"),
        (make_bzimage()[:0x202] + b"HdrX" + make_bzimage()[0x206:], "header magic"),
        (make_bzimage(version=0x020B), "2.11 is too old"),
        (make_bzimage(xloadflags=0), "no 64-bit entry"),
        (make_bzimage(loadflags=0), "zImage"),
        (make_bzimage(kernel_alignment=3 * MiB), "power of two"),
    ],
)
def test_malformed_images(image, message):
    with pytest.raises(BootError, match=message) as info:
        load(image)
    assert "\n" not in str(info.value)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cut=st.integers(0, len(make_bzimage())),
    flips=st.lists(st.tuples(st.integers(0x1F1, 0x26B), st.integers(0, 255)), max_size=6),
)
def test_damaged_images_load_or_raise_boot_error(cut, flips):
    image = bytearray(make_bzimage())
    for offset, value in flips:
        image[offset] = value
    try:
        load(bytes(image[:cut]))
    except BootError as exc:
        assert "\n" not in str(exc)


def test_load_kernel_dispatches_bzimage(tmp_path):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(make_bzimage())
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"cpio" * 100)
    mem, e820 = guest()
    state = load_kernel(mem, kernel, initrd, "quiet", RSDP, e820)
    assert state.rip == 16 * MiB + 0x200 and state.efer & EFER_LMA
    assert mem.read(layout.BOOT_CMDLINE, 6) == b"quiet\0"


def test_load_kernel_prefixes_errors_with_the_path(tmp_path):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(make_bzimage(version=0x0200))
    mem, e820 = guest()
    with pytest.raises(BootError, match=r"vmlinuz: boot protocol 2.00 is too old"):
        load_kernel(mem, kernel, None, "", RSDP, e820)
