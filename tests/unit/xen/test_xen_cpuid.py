"""The Xen CPUID leaves: what the guest is told about the hypervisor."""

from __future__ import annotations

from pyvmm.xen.domain import (XEN_CPUID_BASE, XEN_HVM_CPUID_UPCALL_VECTOR, XEN_HVM_CPUID_VCPU_ID_PRESENT,
                              xen_cpuid_leaves)


def hvm_leaf(version: int, index: int = 0):
    leaves = {entry.function: entry for entry in xen_cpuid_leaves(version, index)}
    return leaves[XEN_CPUID_BASE + 4]


def test_per_vcpu_upcall_vectors_are_announced_from_xen_4_17():
    for version in ((4 << 16) | 17, (4 << 16) | 19, 5 << 16):
        assert hvm_leaf(version).eax & XEN_HVM_CPUID_UPCALL_VECTOR


def test_an_older_xen_leaves_the_guest_the_hvm_wide_vector():
    for version in ((4 << 16) | 16, (4 << 16) | 13, 3 << 16):
        assert not hvm_leaf(version).eax & XEN_HVM_CPUID_UPCALL_VECTOR


def test_version_and_vcpu_id_whatever_the_version():
    for version in ((4 << 16) | 16, (4 << 16) | 17):
        leaves = {entry.function: entry for entry in xen_cpuid_leaves(version, 3)}
        assert leaves[XEN_CPUID_BASE + 1].eax == version
        assert leaves[XEN_CPUID_BASE + 4].eax & XEN_HVM_CPUID_VCPU_ID_PRESENT
        assert leaves[XEN_CPUID_BASE + 4].ebx == 3
        assert leaves[XEN_CPUID_BASE].eax == XEN_CPUID_BASE + 4
