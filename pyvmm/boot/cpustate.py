"""The vCPU state a boot protocol asks for, independent of KVM's structures.

The machine turns a BootCpuState into KVM_SET_REGS / KVM_SET_SREGS; keeping
it a plain dataclass lets the loaders be tested without /dev/kvm.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

# Control register and EFER bits the loaders use.
CR0_PE = 1 << 0
CR0_ET = 1 << 4  # hardwired to 1 on every x86-64 CPU
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1  # bit 1 always reads as 1

# Segment descriptor types (the 4-bit type field).
TYPE_DATA_RW = 0x3  # read/write, accessed
TYPE_CODE_XR = 0xB  # execute/read, accessed
TYPE_LDT = 0x2
TYPE_TSS_BUSY = 0xB  # busy 32-bit TSS (also the 64-bit TSS type in long mode)


@dataclass
class Segment:
    """A segment register's hidden part; `limit` is in bytes (not pages)."""

    base: int
    limit: int
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741 - the architectural name of the bit
    g: int
    avl: int = 0
    unusable: int = 0

    def descriptor(self) -> int:
        """The 8-byte GDT descriptor that loads this same hidden state."""
        limit = self.limit >> 12 if self.g else self.limit
        if limit > 0xFFFFF:
            raise ValueError(f"segment limit {self.limit:#x} does not fit a descriptor")
        access = self.type | (self.s << 4) | (self.dpl << 5) | (self.present << 7)
        flags = (self.avl << 0) | (self.l << 1) | (self.db << 2) | (self.g << 3)
        return (
            (limit & 0xFFFF)
            | (self.base & 0xFFFFFF) << 16
            | access << 40
            | ((limit >> 16) & 0xF) << 48
            | flags << 52
            | ((self.base >> 24) & 0xFF) << 56
        )


@dataclass
class DescriptorTable:
    base: int
    limit: int


def _null_segment() -> Segment:
    return Segment(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, unusable=1)


def ldt_segment() -> Segment:
    """The LDT register as the CPU has it after reset: valid but empty."""
    return Segment(0, 0xFFFF, 0, TYPE_LDT, 1, 0, 0, 0, 0, 0)


def tss_segment(selector: int) -> Segment:
    """A busy TSS at address 0: VM entry requires TR to hold one."""
    return Segment(0, 0x67, selector, TYPE_TSS_BUSY, 1, 0, 0, 0, 0, 0)


def flat_segment(selector: int, type_: int, *, long_mode: bool = False) -> Segment:
    """A 4 GiB flat ring-0 code or data segment."""
    return Segment(
        base=0, limit=0xFFFF_FFFF, selector=selector, type=type_, present=1, dpl=0,
        db=0 if long_mode else 1, s=1, l=1 if long_mode else 0, g=1,
    )


@dataclass
class BootCpuState:
    rip: int = 0
    rsp: int = 0
    rflags: int = RFLAGS_RESERVED
    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rbp: int = 0
    cs: Segment = field(default_factory=_null_segment)
    ds: Segment = field(default_factory=_null_segment)
    es: Segment = field(default_factory=_null_segment)
    fs: Segment = field(default_factory=_null_segment)
    gs: Segment = field(default_factory=_null_segment)
    ss: Segment = field(default_factory=_null_segment)
    tr: Segment = field(default_factory=lambda: tss_segment(0))
    ldt: Segment = field(default_factory=ldt_segment)
    gdt: DescriptorTable = field(default_factory=lambda: DescriptorTable(0, 0xFFFF))
    idt: DescriptorTable = field(default_factory=lambda: DescriptorTable(0, 0xFFFF))
    cr0: int = 0
    cr3: int = 0
    cr4: int = 0
    efer: int = 0


def gdt_bytes(entries: list[Segment | None]) -> bytes:
    """Serialise a GDT; None is an empty (null) slot."""
    return b"".join(
        struct.pack("<Q", 0 if seg is None else seg.descriptor()) for seg in entries
    )
