"""Typed results of Vcpu.run(): one small class per kind of exit.

Vcpu.run() decodes kvm_run once, so exit handlers never touch the union.
Exits that carry data the guest waits for (IN data, MMIO read data, RDMSR
value, hypercall result) hold views into the vCPU's kvm_run page: the
handler writes its answer there before the next run(), with no copy.
These objects are only valid until that next run().
"""

from __future__ import annotations

import struct

from . import uapi


class VcpuExit:
    """Base class of every exit."""

    __slots__ = ()

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields())
        return f"{type(self).__name__}({fields})"

    def _fields(self):
        for cls in type(self).__mro__:
            yield from (s for s in getattr(cls, "__slots__", ()) if not s.startswith("_"))


class IoExit(VcpuExit):
    """Port I/O. `data` holds size * count bytes: OUT data to consume, or the
    buffer an IN handler fills in place."""

    __slots__ = ("port", "size", "is_write", "count", "data")

    def __init__(self, port: int, size: int, is_write: bool, count: int, data: memoryview):
        self.port = port
        self.size = size
        self.is_write = is_write
        self.count = count
        self.data = data


class MmioExit(VcpuExit):
    """An access to guest-physical memory no slot backs. A read handler
    fills `data` (length bytes) in place."""

    __slots__ = ("address", "length", "is_write", "data")

    def __init__(self, address: int, length: int, is_write: bool, data: memoryview):
        self.address = address
        self.length = length
        self.is_write = is_write
        self.data = data


class HltExit(VcpuExit):
    """The guest executed HLT (only seen without an in-kernel LAPIC)."""

    __slots__ = ()


class ShutdownExit(VcpuExit):
    """Triple fault: the vCPU is unusable until it is reset."""

    __slots__ = ()


class SystemEventExit(VcpuExit):
    """KVM_SYSTEM_EVENT_* (shutdown, reset, crash...) with its data words."""

    __slots__ = ("type", "data")

    def __init__(self, type: int, data: tuple[int, ...]):
        self.type = type
        self.data = data


class XenHypercallExit(VcpuExit):
    """A Xen hypercall KVM did not handle itself. Setting `result` stores the
    value KVM loads into RAX when the vCPU resumes."""

    __slots__ = ("longmode", "cpl", "input", "params", "_result")

    def __init__(self, longmode: bool, cpl: int, input: int, params: tuple[int, ...], result: memoryview):
        self.longmode = longmode
        self.cpl = cpl
        self.input = input
        self.params = params
        self._result = result  # the 8 bytes of kvm_run's hcall.result

    @property
    def result(self) -> int:
        return _U64.unpack(self._result)[0]

    @result.setter
    def result(self, value: int) -> None:
        # Hypercalls return negative errnos; RAX holds their two's complement.
        self._result[:] = _U64.pack(value & 0xFFFF_FFFF_FFFF_FFFF)


class MsrExit(VcpuExit):
    """RDMSR/WRMSR forwarded to userspace (KVM_CAP_X86_USER_SPACE_MSR).

    For a read, set `data` to the value the guest gets; set `error = True`
    to make the instruction raise #GP instead."""

    __slots__ = ("index", "is_write", "reason", "_msr")

    def __init__(self, msr, is_write: bool):
        self._msr = msr
        self.index = msr.index
        self.is_write = is_write
        self.reason = msr.reason

    @property
    def data(self) -> int:
        return self._msr.data

    @data.setter
    def data(self, value: int) -> None:
        self._msr.data = value

    @property
    def error(self) -> bool:
        return bool(self._msr.error)

    @error.setter
    def error(self, value: bool) -> None:
        self._msr.error = 1 if value else 0


class InternalErrorExit(VcpuExit):
    """KVM could not handle the exit itself (e.g. emulation failure)."""

    __slots__ = ("suberror", "data")

    def __init__(self, suberror: int, data: tuple[int, ...]):
        self.suberror = suberror
        self.data = data


class FailEntryExit(VcpuExit):
    """The hardware refused to enter the guest (bad guest state)."""

    __slots__ = ("reason", "cpu")

    def __init__(self, reason: int, cpu: int):
        self.reason = reason
        self.cpu = cpu


class DebugExit(VcpuExit):
    """A debug event requested with set_guest_debug."""

    __slots__ = ("exception", "pc", "dr6", "dr7")

    def __init__(self, exception: int, pc: int, dr6: int, dr7: int):
        self.exception = exception
        self.pc = pc
        self.dr6 = dr6
        self.dr7 = dr7


class InterruptedExit(VcpuExit):
    """KVM_RUN returned early: kick(), or another signal reached the thread."""

    __slots__ = ()


class UnknownExit(VcpuExit):
    """An exit reason this layer does not decode."""

    __slots__ = ("reason",)

    def __init__(self, reason: int):
        self.reason = reason


# Exits without data are the same every time: share one instance each.
HLT = HltExit()
SHUTDOWN = ShutdownExit()
INTERRUPTED = InterruptedExit()


# --- decoding kvm_run ---------------------------------------------------------

_MMIO_DATA_OFFSET = uapi.ffi.offsetof("struct kvm_run", "mmio", "data")

# A hypercall exit is read with one unpack rather than a dozen cffi lookups.
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_XEN_TYPE_OFFSET = uapi.ffi.offsetof("struct kvm_run", "xen", "type")
_HCALL_OFFSET = uapi.ffi.offsetof("struct kvm_run", "xen", "u", "hcall")
_HCALL_RESULT_OFFSET = uapi.ffi.offsetof("struct kvm_run", "xen", "u", "hcall", "result")
_HCALL = struct.Struct("<IIQQ6Q")  # longmode cpl input result params[6]
assert _HCALL_OFFSET + _HCALL.size == _XEN_TYPE_OFFSET + uapi.ffi.sizeof("struct kvm_xen_exit")


def decode_exit(run, run_bytes: memoryview) -> VcpuExit:
    """The exit described by `run` (a `struct kvm_run *`) after KVM_RUN
    returned; `run_bytes` is the same page as a memoryview. Port I/O,
    MMIO and hypercalls come first: they are most of a guest's exits."""
    reason = run.exit_reason
    if reason == uapi.KVM_EXIT_IO:
        io = run.io
        size = io.size
        count = io.count
        offset = io.data_offset
        data = run_bytes[offset : offset + size * count]
        return IoExit(io.port, size, io.direction == uapi.KVM_EXIT_IO_OUT, count, data)
    if reason == uapi.KVM_EXIT_MMIO:
        mmio = run.mmio
        length = mmio.len
        data = run_bytes[_MMIO_DATA_OFFSET : _MMIO_DATA_OFFSET + length]
        return MmioExit(mmio.phys_addr, length, bool(mmio.is_write), data)
    if reason == uapi.KVM_EXIT_XEN:
        return _xen(run_bytes)
    decode = _DECODERS.get(reason)
    return decode(run) if decode is not None else UnknownExit(reason)


def _system_event(run) -> SystemEventExit:
    event = run.system_event
    return SystemEventExit(event.type, tuple(event.data[0 : min(event.ndata, 16)]))


def _xen(run_bytes: memoryview) -> VcpuExit:
    if _U32.unpack_from(run_bytes, _XEN_TYPE_OFFSET)[0] != uapi.KVM_EXIT_XEN_HCALL:
        return UnknownExit(uapi.KVM_EXIT_XEN)
    fields = _HCALL.unpack_from(run_bytes, _HCALL_OFFSET)
    result = run_bytes[_HCALL_RESULT_OFFSET : _HCALL_RESULT_OFFSET + 8]
    return XenHypercallExit(bool(fields[0]), fields[1], fields[2], fields[4:], result)


def _internal_error(run) -> InternalErrorExit:
    internal = run.internal
    return InternalErrorExit(internal.suberror, tuple(internal.data[0 : min(internal.ndata, 16)]))


def _fail_entry(run) -> FailEntryExit:
    return FailEntryExit(run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu)


def _debug(run) -> DebugExit:
    arch = run.debug.arch
    return DebugExit(arch.exception, arch.pc, arch.dr6, arch.dr7)


_DECODERS = {
    uapi.KVM_EXIT_HLT: lambda run: HLT,
    uapi.KVM_EXIT_SHUTDOWN: lambda run: SHUTDOWN,
    uapi.KVM_EXIT_INTR: lambda run: INTERRUPTED,
    uapi.KVM_EXIT_SYSTEM_EVENT: _system_event,
    uapi.KVM_EXIT_X86_RDMSR: lambda run: MsrExit(run.msr, is_write=False),
    uapi.KVM_EXIT_X86_WRMSR: lambda run: MsrExit(run.msr, is_write=True),
    uapi.KVM_EXIT_INTERNAL_ERROR: _internal_error,
    uapi.KVM_EXIT_FAIL_ENTRY: _fail_entry,
    uapi.KVM_EXIT_DEBUG: _debug,
}
