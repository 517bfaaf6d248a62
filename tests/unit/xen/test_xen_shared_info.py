"""The shared_info/vcpu_info offsets, checked against ctypes transcriptions
of Xen's public xen.h and arch-x86 headers for both guest ABIs."""

import ctypes

import pytest

from pyvmm.xen.abi import VCPU_INFO_SIZE
from pyvmm.xen.abi import XEN_LEGACY_MAX_VCPUS as LEGACY_VCPUS
from pyvmm.xen.shared_info import COMPAT, LONG_MODE, SharedInfoLayout, layout


def abi_structs(ulong):
    class VcpuTimeInfo(ctypes.Structure):
        _fields_ = [
            ("version", ctypes.c_uint32), ("pad0", ctypes.c_uint32),
            ("tsc_timestamp", ctypes.c_uint64), ("system_time", ctypes.c_uint64),
            ("tsc_to_system_mul", ctypes.c_uint32), ("tsc_shift", ctypes.c_int8),
            ("pad1", ctypes.c_int8 * 3),
        ]

    # arch_vcpu_info: cr2 plus padding that makes vcpu_info 64 bytes
    pad = 1 if ulong is ctypes.c_uint64 else 5

    class VcpuInfo(ctypes.Structure):
        _fields_ = [
            ("evtchn_upcall_pending", ctypes.c_uint8), ("evtchn_upcall_mask", ctypes.c_uint8),
            ("evtchn_pending_sel", ulong),
            ("cr2", ulong), ("arch_pad", ulong * pad),
            ("time", VcpuTimeInfo),
        ]

    bits = ctypes.sizeof(ulong) * 8
    arch = [(name, ulong) for name in ("max_pfn", "pfn_to_mfn_frame_list_list", "nmi_reason",
                                      "p2m_cr3", "p2m_vaddr", "p2m_generation")]
    wc_hi_inline = [("wc_sec_hi", ctypes.c_uint32)] if ulong is ctypes.c_uint64 else []
    wc_hi_in_arch = [] if ulong is ctypes.c_uint64 else [("wc_sec_hi", ctypes.c_uint32)]

    class SharedInfo(ctypes.Structure):
        _fields_ = [
            ("vcpu_info", VcpuInfo * 32),
            ("evtchn_pending", ulong * bits), ("evtchn_mask", ulong * bits),
            ("wc_version", ctypes.c_uint32), ("wc_sec", ctypes.c_uint32), ("wc_nsec", ctypes.c_uint32),
            *wc_hi_inline, *arch, *wc_hi_in_arch,
        ]

    return VcpuInfo, SharedInfo


@pytest.mark.parametrize("abi,ulong", [(LONG_MODE, ctypes.c_uint64), (COMPAT, ctypes.c_uint32)])
def test_offsets_match_the_public_headers(abi, ulong):
    VcpuInfo, SharedInfo = abi_structs(ulong)
    assert ctypes.sizeof(VcpuInfo) == VCPU_INFO_SIZE == 64
    assert VcpuInfo.evtchn_upcall_pending.offset == abi.upcall_pending
    assert VcpuInfo.evtchn_upcall_mask.offset == abi.upcall_mask
    assert VcpuInfo.evtchn_pending_sel.offset == abi.pending_sel
    assert VcpuInfo.time.offset == abi.vcpu_time_info
    for field in ("evtchn_pending", "evtchn_mask", "wc_version", "wc_sec", "wc_nsec", "wc_sec_hi"):
        assert getattr(SharedInfo, field).offset == getattr(abi, field), field
    assert ctypes.sizeof(SharedInfo) <= 4096
    assert abi.max_ports == abi.bits_per_word ** 2 == ctypes.sizeof(ulong) * 8 * ctypes.sizeof(ulong) * 8


def test_the_documented_numbers():
    assert (LONG_MODE.evtchn_pending, LONG_MODE.evtchn_mask, LONG_MODE.wc_version, LONG_MODE.wc_sec_hi) == (
        0x800, 0xA00, 0xC00, 0xC0C)
    assert (COMPAT.evtchn_pending, COMPAT.evtchn_mask, COMPAT.wc_version, COMPAT.wc_sec_hi) == (
        0x800, 0x880, 0x900, 0x924)
    assert (LONG_MODE.pending_sel, COMPAT.pending_sel) == (8, 4)
    assert (LONG_MODE.max_ports, COMPAT.max_ports) == (4096, 1024)
    assert (LONG_MODE.bits_per_word, COMPAT.bits_per_word) == (64, 32)


def test_legacy_vcpu_info_slots():
    assert LONG_MODE.legacy_vcpu_info(0) == 0
    assert COMPAT.legacy_vcpu_info(31) == 31 * 64
    for vcpu in (-1, LEGACY_VCPUS):
        with pytest.raises(ValueError):
            LONG_MODE.legacy_vcpu_info(vcpu)


def test_layout_picks_the_abi():
    assert layout(True) is LONG_MODE and layout(False) is COMPAT
    assert SharedInfoLayout(1).long_mode is True
    with pytest.raises(AttributeError):
        LONG_MODE.max_ports_extra = 1  # slotted: no stray attributes
