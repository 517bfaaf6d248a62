"""KVM's own per-vCPU counters (the binary statistics of KVM_GET_STATS_FD).

KVM counts every exit, including those it handles itself (the Xen
hypercalls and event-channel sends it answers in the kernel, halts,
interrupt windows), at no cost to the VMM. A diagnosis reads them to tell a
vCPU that spins (exits climbing) from one that computes or sleeps.

The fd's layout (Documentation/virt/kvm/api.rst, "KVM_GET_STATS_FD"): a
header of six u32 (flags, name_size, num_desc, id_offset, desc_offset,
data_offset), then num_desc descriptors of (u32 flags, s16 exponent, u16
size, u32 offset, u32 bucket_size, char name[name_size]) and the data, u64
values at data_offset + offset. Only the first value of each counter is read.

The fd is opened on the vCPU's own thread (the ioctl waits for KVM_RUN to
return); reading it (pread) takes no vCPU lock, so any thread may.
"""

from __future__ import annotations

import os
import struct

from . import uapi
from .ioctl import KvmError, ioctl

# What a diagnosis shows, in this order (KVM's names; absent ones are skipped).
# hypercalls, insn_emulation and pf_taken tell a vCPU spinning through
# exits KVM handles itself (Xen hypercalls such as SCHEDOP_poll, emulated
# instructions, page faults) from one taking external interrupts.
WANTED = ("exits", "halt_exits", "io_exits", "mmio_exits", "irq_exits", "irq_window_exits", "signal_exits",
          "irq_injections", "hypercalls", "insn_emulation", "pf_taken")

_HEADER = struct.Struct("<6I")
_DESCRIPTOR = struct.Struct("<IhHII")
_MAX_DESCRIPTORS = 4096  # a sane bound on what the kernel describes


def parse_descriptors(blob: bytes, wanted=WANTED) -> tuple[int, dict[str, int]]:
    """(data_offset, {name: offset of its first u64 from data_offset}) for
    the `wanted` counters a stats fd's header and descriptors (its first
    bytes, `blob`) describe. ValueError if they do not add up."""
    if len(blob) < _HEADER.size:
        raise ValueError("short stats header")
    _flags, name_size, count, _id_offset, desc_offset, data_offset = _HEADER.unpack_from(blob)
    if count > _MAX_DESCRIPTORS or name_size == 0:
        raise ValueError(f"unlikely stats header: {count} descriptors, names of {name_size} bytes")
    step = _DESCRIPTOR.size + name_size
    if desc_offset + count * step > len(blob):
        raise ValueError("stats descriptors beyond what was read")
    offsets = {}
    for index in range(count):
        at = desc_offset + index * step
        _dflags, _exponent, size, offset, _bucket = _DESCRIPTOR.unpack_from(blob, at)
        raw = blob[at + _DESCRIPTOR.size : at + step]
        name = raw.split(b"\0", 1)[0].decode("ascii", "replace")
        if name in wanted and size >= 1:
            offsets[name] = offset
    return data_offset, offsets


class VcpuCounters:
    """One vCPU's KVM counters, read on demand from its stats fd."""

    def __init__(self, fd: int, data_offset: int, offsets: dict[str, int]):
        self._fd = fd
        self._data_offset = data_offset
        self._names = [name for name in WANTED if name in offsets]
        self._offsets = [offsets[name] for name in self._names]
        self._span = max(self._offsets, default=0) + 8

    @classmethod
    def open(cls, vcpu_fd: int) -> VcpuCounters | None:
        """On the vCPU's own thread; None where KVM has no binary stats (before Linux 5.14)."""
        try:
            fd = ioctl(vcpu_fd, uapi.KVM_GET_STATS_FD)
        except KvmError:
            return None
        try:
            header = os.pread(fd, _HEADER.size, 0)
            _flags, name_size, count, _id, desc_offset, _data = _HEADER.unpack(header)
            blob = os.pread(fd, desc_offset + min(count, _MAX_DESCRIPTORS) * (_DESCRIPTOR.size + name_size), 0)
            data_offset, offsets = parse_descriptors(blob)
        except (OSError, ValueError, struct.error):
            os.close(fd)
            return None
        return cls(fd, data_offset, offsets)

    def read(self) -> dict[str, int]:
        """{name: value} for the counters KVM has, one pread; {} once closed."""
        if self._fd < 0 or not self._names:
            return {}
        data = os.pread(self._fd, self._span, self._data_offset)
        return {name: int.from_bytes(data[offset : offset + 8], "little")
                for name, offset in zip(self._names, self._offsets) if offset + 8 <= len(data)}

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
