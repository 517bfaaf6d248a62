"""The CPUID table each vCPU sees, derived from KVM_GET_SUPPORTED_CPUID.

Pure functions over CpuidEntry lists, so they are tested with synthetic
tables. The guest topology is one package of `cpu_count` single-thread
cores; vCPU i has APIC ID i (the machine creates vCPU i with KVM id i).

The hypervisor range 0x40000000.. starts with KVM's paravirt leaves. A Xen
guest looks for Xen's signature there instead, so callers can place other
hypervisor leaves at 0x40000000 and move KVM's to 0x40000100 (guests scan
the range in steps of 0x100) or drop them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable

from .uapi import KVM_CPUID_FLAG_SIGNIFCANT_INDEX

HYPERVISOR_BASE = 0x4000_0000
HYPERVISOR_END = 0x5000_0000
HYPERVISOR_STRIDE = 0x100  # guests probe every 0x100 leaves for a signature
KVM_ALTERNATE_BASE = HYPERVISOR_BASE + HYPERVISOR_STRIDE
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"

# Bits this module sets or reads.
LEAF1_ECX_HYPERVISOR = 1 << 31
LEAF1_EDX_HTT = 1 << 28
EXT1_ECX_CMP_LEGACY = 1 << 1
TOPOLOGY_LEVEL_SMT = 1
TOPOLOGY_LEVEL_CORE = 2


class CpuidError(ValueError):
    """An impossible topology or conflicting hypervisor leaves."""


@dataclass(slots=True)
class CpuidEntry:
    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0

    @property
    def key(self) -> tuple[int, int]:
        return (self.function, self.index)


def signature_leaf(base: int, signature: bytes, max_leaf: int) -> CpuidEntry:
    """Leaf `base` announcing a hypervisor: EAX = highest leaf, then the
    12-byte signature in EBX, ECX, EDX."""
    if len(signature) != 12:
        raise CpuidError(f"a hypervisor signature is 12 bytes, not {len(signature)}")
    ebx, ecx, edx = (int.from_bytes(signature[i : i + 4], "little") for i in (0, 4, 8))
    return CpuidEntry(base, eax=max_leaf, ebx=ebx, ecx=ecx, edx=edx)


def kvm_features(supported: Iterable[CpuidEntry]) -> int:
    """KVM's paravirt feature bits (leaf 0x40000001 EAX) as supported."""
    for entry in supported:
        if entry.function == HYPERVISOR_BASE + 1:
            return entry.eax
    return 0


def kvm_leaves(base: int, features: int) -> list[CpuidEntry]:
    return [
        signature_leaf(base, KVM_SIGNATURE, base + 1),
        CpuidEntry(base + 1, eax=features),
    ]


def vcpu_cpuid(
    supported: Iterable[CpuidEntry],
    cpu_index: int,
    cpu_count: int,
    *,
    hypervisor_leaves: Iterable[CpuidEntry] = (),
    kvm_base: int | None = HYPERVISOR_BASE,
) -> list[CpuidEntry]:
    """The CPUID table for vCPU `cpu_index` of `cpu_count`.

    `hypervisor_leaves` are added as given (e.g. Xen's at 0x40000000);
    KVM's paravirt leaves go to `kvm_base`, or are left out when it is None.
    """
    if not 0 < cpu_count <= 255:
        raise CpuidError(f"{cpu_count} vCPUs do not fit 8-bit APIC IDs")
    if not 0 <= cpu_index < cpu_count:
        raise CpuidError(f"vCPU {cpu_index} is not one of {cpu_count}")
    supported = list(supported)
    features = kvm_features(supported)
    entries = [replace(e) for e in supported if not _is_hypervisor_leaf(e.function)]

    topology = _Topology(cpu_index, cpu_count)
    entries = topology.apply(entries)

    extra = [replace(e) for e in hypervisor_leaves]
    _check_hypervisor_leaves(extra, kvm_base)
    entries += extra
    if kvm_base is not None:
        entries += kvm_leaves(kvm_base, features)
    entries.sort(key=lambda e: e.key)
    return entries


def _is_hypervisor_leaf(function: int) -> bool:
    return HYPERVISOR_BASE <= function < HYPERVISOR_END


def _check_hypervisor_leaves(entries: list[CpuidEntry], kvm_base: int | None) -> None:
    seen: set[tuple[int, int]] = set()
    for entry in entries:
        if not _is_hypervisor_leaf(entry.function):
            raise CpuidError(f"leaf {entry.function:#x} is outside the hypervisor range")
        if entry.key in seen:
            raise CpuidError(f"leaf {entry.function:#x}.{entry.index} given twice")
        seen.add(entry.key)
        if kvm_base is not None and kvm_base <= entry.function < kvm_base + HYPERVISOR_STRIDE:
            raise CpuidError(f"leaf {entry.function:#x} collides with KVM's leaves at {kvm_base:#x}")
    if kvm_base is not None and (kvm_base % HYPERVISOR_STRIDE or not _is_hypervisor_leaf(kvm_base)):
        raise CpuidError(f"KVM's leaves cannot start at {kvm_base:#x}")


class _Topology:
    """n single-thread cores in one package; the APIC ID is the vCPU index."""

    def __init__(self, cpu_index: int, cpu_count: int):
        self.apic_id = cpu_index
        self.count = cpu_count
        # Width of the core field of the APIC ID: IDs 0..count-1 must fit.
        self.core_bits = (cpu_count - 1).bit_length()

    def apply(self, entries: list[CpuidEntry]) -> list[CpuidEntry]:
        out: list[CpuidEntry] = []
        for entry in entries:
            if entry.function in (0xB, 0x1F):
                if entry.index == 0:  # replaced by a full set of subleaves
                    out += self._extended_topology(entry.function)
                continue
            handler = self._edits.get(entry.function)
            if handler is not None:
                handler(self, entry)
            out.append(entry)
        return out

    def _leaf1(self, entry: CpuidEntry) -> None:
        addressable = 1 << self.core_bits
        entry.ebx = (entry.ebx & 0x0000_FFFF) | (addressable << 16) | (self.apic_id << 24)
        entry.ecx |= LEAF1_ECX_HYPERVISOR
        if self.count > 1:
            entry.edx |= LEAF1_EDX_HTT
        else:
            entry.edx &= ~LEAF1_EDX_HTT

    def _leaf4(self, entry: CpuidEntry) -> None:
        if entry.eax & 0x1F == 0:  # no cache at this subleaf
            return
        cores_minus_one = (1 << self.core_bits) - 1
        level = (entry.eax >> 5) & 0x7
        sharing_minus_one = cores_minus_one if level >= 3 else 0  # L3 is per package
        entry.eax = (entry.eax & 0x3FFF) | (sharing_minus_one << 14) | (cores_minus_one << 26)

    def _extended_topology(self, function: int) -> list[CpuidEntry]:
        def level(index, shift, processors, level_type):
            return CpuidEntry(
                function, index, KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                eax=shift, ebx=processors, ecx=index | (level_type << 8), edx=self.apic_id,
            )

        return [
            level(0, 0, 1, TOPOLOGY_LEVEL_SMT),
            level(1, self.core_bits, self.count, TOPOLOGY_LEVEL_CORE),
            level(2, 0, 0, 0),  # level type 0 ends the enumeration
        ]

    def _ext1(self, entry: CpuidEntry) -> None:
        if self.count > 1:
            entry.ecx |= EXT1_ECX_CMP_LEGACY
        else:
            entry.ecx &= ~EXT1_ECX_CMP_LEGACY

    def _ext8(self, entry: CpuidEntry) -> None:
        # ECX: NC (cores - 1) in [7:0], ApicIdCoreIdSize in [15:12].
        entry.ecx = (entry.ecx & ~0xF0FF) | (self.count - 1) | (self.core_bits << 12)

    def _ext1e(self, entry: CpuidEntry) -> None:
        entry.eax = self.apic_id  # extended APIC ID
        entry.ebx = self.apic_id & 0xFF  # compute unit ID; one thread per unit
        entry.ecx = 0  # node 0, one node
        entry.edx = 0

    _edits = {
        0x1: _leaf1,
        0x4: _leaf4,
        0x8000_0001: _ext1,
        0x8000_0008: _ext8,
        0x8000_001E: _ext1e,
    }
