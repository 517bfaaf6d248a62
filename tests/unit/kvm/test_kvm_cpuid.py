import pytest

from pyvmm.kvm.cpuid import (
    HYPERVISOR_BASE,
    KVM_ALTERNATE_BASE,
    CpuidEntry,
    CpuidError,
    signature_leaf,
    vcpu_cpuid,
)
from pyvmm.kvm.uapi import KVM_CPUID_FLAG_SIGNIFCANT_INDEX

KVM_FEATURES = 0x0100_7EFB


def supported():
    """A small table shaped like KVM_GET_SUPPORTED_CPUID's (AMD-like host)."""
    return [
        CpuidEntry(0x0, eax=0x1F, ebx=0x68747541, ecx=0x444D4163, edx=0x69746E65),
        CpuidEntry(0x1, eax=0x00B00F21, ebx=0x0102_0800, ecx=0x0120_2000, edx=0x178B_FBFF),
        CpuidEntry(0x4, 0, 1, eax=0x0000_0121),  # L1d
        CpuidEntry(0x4, 1, 1, eax=0x0000_0163),  # L3
        CpuidEntry(0x4, 2, 1),  # no more caches
        CpuidEntry(0xB, 0, 1, edx=1),
        CpuidEntry(0x1F, 0, 1, edx=1),
        CpuidEntry(0x1F, 1, 1, eax=9),
        CpuidEntry(0x4000_0000, eax=0x4000_0001, ebx=0x4B4D564B, ecx=0x564B4D56, edx=0x4D),
        CpuidEntry(0x4000_0001, eax=KVM_FEATURES),
        CpuidEntry(0x8000_0000, eax=0x8000_0021),
        CpuidEntry(0x8000_0001, ecx=0x0040_0393),
        CpuidEntry(0x8000_0008, eax=0x3030, ecx=0x0000_7001 | (0x3 << 16)),
        CpuidEntry(0x8000_001E, eax=0x55, ebx=0x55, ecx=0x55),
    ]


def leaf(table, function, index=0):
    matches = [e for e in table if e.function == function and e.index == index]
    assert len(matches) == 1, f"{function:#x}.{index}: {matches}"
    return matches[0]


def signature(entry):
    return b"".join(r.to_bytes(4, "little") for r in (entry.ebx, entry.ecx, entry.edx))


@pytest.mark.parametrize("index,count", [(0, 1), (0, 4), (3, 4), (2, 3), (7, 8)])
def test_leaf1_apic_id_and_logical_count(index, count):
    table = vcpu_cpuid(supported(), index, count)
    ebx = leaf(table, 1).ebx
    assert ebx >> 24 == index
    assert (ebx >> 16) & 0xFF >= count
    assert ebx & 0xFFFF == 0x0800  # CLFLUSH size etc. kept
    assert bool(leaf(table, 1).edx & (1 << 28)) == (count > 1)


def test_leaf1_sets_hypervisor_bit():
    assert leaf(vcpu_cpuid(supported(), 0, 1), 1).ecx & (1 << 31)


@pytest.mark.parametrize("function", [0xB, 0x1F])
@pytest.mark.parametrize("index,count,core_bits", [(0, 1, 0), (1, 2, 1), (2, 3, 2), (4, 5, 3), (3, 4, 2)])
def test_extended_topology(function, index, count, core_bits):
    table = vcpu_cpuid(supported(), index, count)
    levels = sorted((e for e in table if e.function == function), key=lambda e: e.index)
    assert [e.index for e in levels] == [0, 1, 2]
    smt, core, end = levels
    assert all(e.edx == index for e in levels), "x2APIC ID on every subleaf"
    assert all(e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX for e in levels)
    assert (smt.eax, smt.ebx & 0xFFFF, smt.ecx) == (0, 1, 0 | 1 << 8)
    assert (core.eax, core.ebx & 0xFFFF, core.ecx) == (core_bits, count, 1 | 2 << 8)
    assert (end.ebx, (end.ecx >> 8) & 0xFF) == (0, 0)
    # every APIC ID of the package fits below the shift of the core level
    assert (count - 1) >> core.eax == 0


def test_leaf4_core_counts():
    table = vcpu_cpuid(supported(), 0, 4)
    l1, l3, none = (leaf(table, 4, i) for i in range(3))
    assert l1.eax >> 26 == 3 and (l1.eax >> 14) & 0xFFF == 0
    assert l3.eax >> 26 == 3 and (l3.eax >> 14) & 0xFFF == 3
    assert l1.eax & 0x3FFF == 0x121
    assert none.eax == 0


def test_amd_core_count_leaves():
    table = vcpu_cpuid(supported(), 2, 3)
    ext8 = leaf(table, 0x8000_0008)
    assert ext8.ecx & 0xFF == 2
    assert (ext8.ecx >> 12) & 0xF == 2
    assert (ext8.ecx >> 16) & 0x3 == 3, "other bits kept"
    assert leaf(table, 0x8000_0001).ecx & 2
    assert leaf(table, 0x8000_001E).eax == 2
    assert not leaf(vcpu_cpuid(supported(), 0, 1), 0x8000_0001).ecx & 2


def test_kvm_leaves_by_default():
    table = vcpu_cpuid(supported(), 0, 1)
    base = leaf(table, HYPERVISOR_BASE)
    assert signature(base) == b"KVMKVMKVM\0\0\0"
    assert base.eax == HYPERVISOR_BASE + 1
    assert leaf(table, HYPERVISOR_BASE + 1).eax == KVM_FEATURES


def test_kvm_leaves_synthesized_when_missing():
    table = vcpu_cpuid([e for e in supported() if e.function < HYPERVISOR_BASE], 0, 1)
    assert signature(leaf(table, HYPERVISOR_BASE)) == b"KVMKVMKVM\0\0\0"
    assert leaf(table, HYPERVISOR_BASE + 1).eax == 0


def test_other_hypervisor_first_and_kvm_moved():
    xen = [
        signature_leaf(HYPERVISOR_BASE, b"XenVMMXenVMM", HYPERVISOR_BASE + 4),
        CpuidEntry(HYPERVISOR_BASE + 1, eax=0x0004_0011),
    ]
    table = vcpu_cpuid(supported(), 0, 2, hypervisor_leaves=xen, kvm_base=KVM_ALTERNATE_BASE)
    assert signature(leaf(table, HYPERVISOR_BASE)) == b"XenVMMXenVMM"
    assert leaf(table, HYPERVISOR_BASE + 1).eax == 0x0004_0011
    moved = leaf(table, KVM_ALTERNATE_BASE)
    assert signature(moved) == b"KVMKVMKVM\0\0\0"
    assert moved.eax == KVM_ALTERNATE_BASE + 1
    assert leaf(table, KVM_ALTERNATE_BASE + 1).eax == KVM_FEATURES


def test_kvm_leaves_dropped():
    table = vcpu_cpuid(supported(), 0, 1, kvm_base=None)
    assert not [e for e in table if e.function >= HYPERVISOR_BASE and e.function < 0x5000_0000]


def test_hypervisor_leaves_colliding_with_kvm_are_refused():
    with pytest.raises(CpuidError, match="collides"):
        vcpu_cpuid(supported(), 0, 1, hypervisor_leaves=[CpuidEntry(HYPERVISOR_BASE)])


@pytest.mark.parametrize("entry", [CpuidEntry(0x1), CpuidEntry(0x5000_0000)])
def test_hypervisor_leaves_must_be_in_range(entry):
    with pytest.raises(CpuidError):
        vcpu_cpuid(supported(), 0, 1, hypervisor_leaves=[entry], kvm_base=None)


def test_duplicate_hypervisor_leaves_are_refused():
    twice = [CpuidEntry(HYPERVISOR_BASE), CpuidEntry(HYPERVISOR_BASE)]
    with pytest.raises(CpuidError, match="twice"):
        vcpu_cpuid(supported(), 0, 1, hypervisor_leaves=twice, kvm_base=None)


@pytest.mark.parametrize("index,count", [(1, 1), (-1, 2), (0, 0), (0, 256)])
def test_impossible_topologies(index, count):
    with pytest.raises(CpuidError):
        vcpu_cpuid(supported(), index, count)


def test_input_table_is_not_modified():
    original = supported()
    vcpu_cpuid(original, 1, 2)
    assert original == supported()


def test_output_is_sorted_and_unique():
    table = vcpu_cpuid(supported(), 0, 2)
    keys = [e.key for e in table]
    assert keys == sorted(set(keys))


def test_signature_must_be_twelve_bytes():
    with pytest.raises(CpuidError):
        signature_leaf(HYPERVISOR_BASE, b"short", HYPERVISOR_BASE)
