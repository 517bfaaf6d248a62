"""A KVM virtual CPU: its registers and the KVM_RUN loop's single step.

Threading: create a Vcpu in the thread that will call run(), and call run()
only there. KVM binds a vCPU to the task that runs it, and kick() stops
KVM_RUN by signalling the creating thread. Every other method may be
called from any thread while the vCPU is not running.
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import threading
from typing import Iterable, Mapping, NamedTuple

from . import uapi
from .cpuid import CpuidEntry
from .exits import INTERRUPTED, VcpuExit, decode_exit
from .ioctl import KvmError, ioctl
from .stats import VcpuCounters
from .uapi import as_struct, enable_cap_struct, ffi

# The signal kick() sends. SIGUSR1 is left to debugging aids (faulthandler).
KICK_SIGNAL = signal.SIGUSR2

_kick_handler_lock = threading.Lock()
_kick_handler_installed = False


def _ignore_kick(signum, frame) -> None:
    """A handler must exist (SIG_IGN would not interrupt KVM_RUN); the kick's
    work is done by immediate_exit and the EINTR it causes."""


def install_kick_handler() -> None:
    """Install the no-op KICK_SIGNAL handler; idempotent. Python only lets
    the main thread install handlers, so this runs when the VM is created."""
    global _kick_handler_installed
    with _kick_handler_lock:
        if _kick_handler_installed:
            return
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "create the first VM in the main thread: it installs the vCPU kick signal handler"
            )
        signal.signal(KICK_SIGNAL, _ignore_kick)
        _kick_handler_installed = True


class Translation(NamedTuple):
    gpa: int
    valid: bool
    writeable: bool


class Vcpu:
    def __init__(self, vm, index: int, mmap_size: int):
        self.vm = vm
        self.index = index
        self.fd = ioctl(vm.fd, uapi.KVM_CREATE_VCPU, index)
        self._thread = threading.current_thread()
        self._thread_ident = threading.get_ident()
        try:
            self._run_map = mmap.mmap(
                self.fd, mmap_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        except BaseException:
            os.close(self.fd)
            raise
        self._run = ffi.from_buffer("struct kvm_run *", self._run_map)
        self._run_bytes = memoryview(self._run_map)
        # translate() runs for every pointer a hypercall passes: the vCPU's own
        # thread reuses one request instead of allocating one per call.
        self._translation = ffi.new("struct kvm_translation *")
        # KVM's counters of this vCPU's exits, for a diagnosis (None on old
        # kernels); opened here, on the vCPU's own thread, and read from any.
        self.counters = VcpuCounters.open(self.fd)

    def close(self) -> None:
        """Release the kvm_run mapping and the fd. Exit objects still holding
        views into kvm_run keep the mapping alive until they are dropped."""
        if self.fd < 0:
            return
        if self.counters is not None:
            self.counters.close()
        ffi.release(self._run)
        self._run_bytes.release()
        try:
            self._run_map.close()
        except BufferError:
            pass  # an exit's data view is still alive; the GC unmaps later
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> "Vcpu":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- running ----------------------------------------------------------------

    def run(self) -> VcpuExit:
        """Enter the guest until its next exit and return that exit, decoded."""
        return self._enter()

    def settle(self) -> VcpuExit:
        """Complete what the last exit left half done (the data of a port or
        MMIO read, a hypercall's result: KVM finishes them only when KVM_RUN
        is entered again) without running a guest instruction: KVM_RUN with
        immediate_exit. Returns InterruptedExit, or the exit a string I/O
        instruction still needs the VMM for. Own thread."""
        self._run.immediate_exit = 1
        return self._enter()

    def _enter(self) -> VcpuExit:
        run = self._run
        try:
            ioctl(self.fd, uapi.KVM_RUN, retry_on_eintr=False)
        except KvmError as error:
            if error.errno == errno.EAGAIN:
                # An application processor still waiting for INIT/SIPI: KVM
                # blocked until an event came and wants to be called again.
                return INTERRUPTED
            if error.errno != errno.EINTR:
                raise
            # Cleared only now, so a kick made between two runs is not lost:
            # it makes the following run return at once instead.
            run.immediate_exit = 0
            return INTERRUPTED
        return decode_exit(run, self._run_bytes)

    def kick(self) -> None:
        """Make run() return InterruptedExit soon; callable from any thread."""
        self._run.immediate_exit = 1
        if self._thread.is_alive():
            signal.pthread_kill(self._thread_ident, KICK_SIGNAL)

    @property
    def immediate_exit(self) -> bool:
        return bool(self._run.immediate_exit)

    @property
    def if_flag(self) -> bool:
        """RFLAGS.IF as KVM left it in kvm_run at the last exit (any thread;
        stale while the vCPU is inside KVM_RUN)."""
        return bool(self._run.if_flag)

    # --- registers ----------------------------------------------------------------

    def get_regs(self):
        """A `struct kvm_regs *`; edit it and pass it to set_regs()."""
        return self._get("struct kvm_regs *", uapi.KVM_GET_REGS)

    def set_regs(self, regs) -> None:
        ioctl(self.fd, uapi.KVM_SET_REGS, as_struct("struct kvm_regs *", regs))

    def get_sregs(self):
        return self._get("struct kvm_sregs *", uapi.KVM_GET_SREGS)

    def set_sregs(self, sregs) -> None:
        ioctl(self.fd, uapi.KVM_SET_SREGS, as_struct("struct kvm_sregs *", sregs))

    def get_fpu(self):
        return self._get("struct kvm_fpu *", uapi.KVM_GET_FPU)

    def set_fpu(self, fpu) -> None:
        ioctl(self.fd, uapi.KVM_SET_FPU, as_struct("struct kvm_fpu *", fpu))

    def get_sregs2(self):
        """A `struct kvm_sregs2 *` (KVM_CAP_SREGS2): kvm_sregs with the PAE
        PDPTRs and without the pending-interrupt bitmap (in the vCPU events)."""
        return self._get("struct kvm_sregs2 *", uapi.KVM_GET_SREGS2)

    def set_sregs2(self, sregs) -> None:
        ioctl(self.fd, uapi.KVM_SET_SREGS2, as_struct("struct kvm_sregs2 *", sregs))

    def get_xsave(self, size: int = 4096) -> bytes:
        """The XSAVE area, `size` bytes: 4096, or KVM_CAP_XSAVE2's size
        (KVM_GET_XSAVE2) when the guest's features need more."""
        if size < 4096:
            raise ValueError(f"an XSAVE area is at least 4096 bytes, not {size}")
        area = ffi.new("char[]", size)
        ioctl(self.fd, uapi.KVM_GET_XSAVE2 if size > 4096 else uapi.KVM_GET_XSAVE, ffi.cast("struct kvm_xsave *", area))
        return bytes(ffi.buffer(area))

    def set_xsave(self, area: bytes) -> None:
        """KVM reads as many bytes as the vCPU's XSAVE area holds (4096 or
        KVM_CAP_XSAVE2's size), so `area` must be that long."""
        if len(area) < 4096:
            raise ValueError(f"an XSAVE area is at least 4096 bytes, not {len(area)}")
        buffer = ffi.new("char[]", bytes(area))
        ioctl(self.fd, uapi.KVM_SET_XSAVE, ffi.cast("struct kvm_xsave *", buffer))

    def get_xcrs(self) -> dict[int, int]:
        """The extended control registers (XCR0), {index: value}."""
        xcrs = self._get("struct kvm_xcrs *", uapi.KVM_GET_XCRS)
        return {entry.xcr: entry.value for entry in xcrs.xcrs[0 : xcrs.nr_xcrs]}

    def set_xcrs(self, values: Mapping[int, int]) -> None:
        pairs = sorted(values.items())
        xcrs = ffi.new("struct kvm_xcrs *", {"nr_xcrs": len(pairs),
                                             "xcrs": [{"xcr": xcr, "value": value} for xcr, value in pairs]})
        ioctl(self.fd, uapi.KVM_SET_XCRS, xcrs)

    def get_vcpu_events(self):
        """A `struct kvm_vcpu_events *`: pending and injected exceptions,
        interrupts, NMIs and SMIs, the interrupt shadow, the SIPI vector."""
        return self._get("struct kvm_vcpu_events *", uapi.KVM_GET_VCPU_EVENTS)

    def set_vcpu_events(self, events) -> None:
        ioctl(self.fd, uapi.KVM_SET_VCPU_EVENTS, as_struct("struct kvm_vcpu_events *", events))

    def get_debugregs(self):
        return self._get("struct kvm_debugregs *", uapi.KVM_GET_DEBUGREGS)

    def set_debugregs(self, debugregs) -> None:
        ioctl(self.fd, uapi.KVM_SET_DEBUGREGS, as_struct("struct kvm_debugregs *", debugregs))

    def get_tsc_khz(self) -> int:
        """The guest's TSC frequency (KVM_CAP_GET_TSC_KHZ)."""
        return ioctl(self.fd, uapi.KVM_GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        """Needs KVM_CAP_TSC_CONTROL (TSC scaling) unless `khz` is the host's."""
        ioctl(self.fd, uapi.KVM_SET_TSC_KHZ, khz)

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        indices = list(indices)
        msrs = _msrs_struct([(index, 0) for index in indices])
        self._all_msrs(uapi.KVM_GET_MSRS, msrs, indices)
        return {entry.index: entry.data for entry in msrs.entries[0 : len(indices)]}

    def get_msrs_available(self, indices: Iterable[int]) -> dict[int, int]:
        """The MSRs of `indices` this vCPU lets the host read, in their
        order; those KVM refuses (a feature this guest's CPUID lacks, say)
        are left out, as KVM_GET_MSRS stops at the first one it refuses."""
        remaining = list(indices)
        values: dict[int, int] = {}
        while remaining:
            msrs = _msrs_struct([(index, 0) for index in remaining])
            done = ioctl(self.fd, uapi.KVM_GET_MSRS, msrs)
            for entry in msrs.entries[0:done]:
                values[entry.index] = entry.data
            remaining = remaining[done + 1 :]  # past the refused one
        return values

    def set_msrs(self, values: Mapping[int, int]) -> None:
        pairs = list(values.items())
        self._all_msrs(uapi.KVM_SET_MSRS, _msrs_struct(pairs), [index for index, _ in pairs])

    def _all_msrs(self, request, msrs, indices: list[int]) -> None:
        # KVM stops at the first MSR it refuses and returns how many it did.
        done = ioctl(self.fd, request, msrs)
        if done < len(indices):
            raise KvmError(errno.EINVAL, request.name, f"MSR {indices[done]:#x} refused")

    def get_cpuid(self) -> list[CpuidEntry]:
        return read_cpuid2(self.fd, uapi.KVM_GET_CPUID2)

    def set_cpuid(self, entries: Iterable[CpuidEntry]) -> None:
        entries = list(entries)
        table = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
        for c, e in zip(table.entries, entries):
            c.function, c.index, c.flags = e.function, e.index, e.flags
            c.eax, c.ebx, c.ecx, c.edx = e.eax, e.ebx, e.ecx, e.edx
        ioctl(self.fd, uapi.KVM_SET_CPUID2, table)

    def get_lapic(self) -> bytearray:
        """The 1 KiB LAPIC register page (in-kernel irqchip only)."""
        state = self._get("struct kvm_lapic_state *", uapi.KVM_GET_LAPIC)
        return bytearray(ffi.buffer(state.regs))

    def set_lapic(self, registers: bytes | bytearray) -> None:
        if len(registers) != 1024:
            raise ValueError(f"a LAPIC state is 1024 bytes, not {len(registers)}")
        state = ffi.new("struct kvm_lapic_state *")
        ffi.buffer(state.regs)[:] = registers
        ioctl(self.fd, uapi.KVM_SET_LAPIC, state)

    def get_mp_state(self) -> int:
        return self._get("struct kvm_mp_state *", uapi.KVM_GET_MP_STATE).mp_state

    def set_mp_state(self, state: int) -> None:
        ioctl(self.fd, uapi.KVM_SET_MP_STATE, ffi.new("struct kvm_mp_state *", {"mp_state": state}))

    def translate(self, gva: int) -> Translation:
        """Walk the guest's current page tables for `gva`."""
        if threading.get_ident() == self._thread_ident:
            request = self._translation
            request.linear_address = gva
        else:  # another thread (a debugger, while the vCPU is parked) gets its own
            request = ffi.new("struct kvm_translation *", {"linear_address": gva})
        ioctl(self.fd, uapi.KVM_TRANSLATE, request)
        return Translation(request.physical_address, bool(request.valid), bool(request.writeable))

    def set_guest_debug(self, control: int, debugregs: Iterable[int] = ()) -> None:
        debug = ffi.new("struct kvm_guest_debug *", {"control": control})
        for i, value in enumerate(debugregs):
            debug.arch.debugreg[i] = value
        ioctl(self.fd, uapi.KVM_SET_GUEST_DEBUG, debug)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        ioctl(self.fd, uapi.KVM_ENABLE_CAP, enable_cap_struct(cap, args, flags))

    # --- Xen ----------------------------------------------------------------------------

    def xen_vcpu_get_attr(self, attr_type: int):
        """A `struct kvm_xen_vcpu_attr *` holding attribute `attr_type`."""
        attr = ffi.new("struct kvm_xen_vcpu_attr *", {"type": attr_type})
        ioctl(self.fd, uapi.KVM_XEN_VCPU_GET_ATTR, attr)
        return attr

    def xen_vcpu_set_attr(self, attr) -> None:
        """`attr`: a cffi `struct kvm_xen_vcpu_attr *` or its initializer, e.g.
        {"type": KVM_XEN_VCPU_ATTR_TYPE_VCPU_INFO, "u": {"gpa": gpa}}."""
        ioctl(self.fd, uapi.KVM_XEN_VCPU_SET_ATTR, as_struct("struct kvm_xen_vcpu_attr *", attr))

    def _get(self, ctype: str, request):
        value = ffi.new(ctype)
        ioctl(self.fd, request, value)
        return value


def read_cpuid2(fd: int, request) -> list[CpuidEntry]:
    """Run a kvm_cpuid2-filling ioctl, growing the table while KVM says E2BIG."""
    capacity = 128
    while True:
        table = ffi.new("struct kvm_cpuid2 *", {"nent": capacity, "entries": capacity})
        try:
            ioctl(fd, request, table)
        except KvmError as error:
            if error.errno == errno.E2BIG and capacity < 4096:
                capacity *= 2
                continue
            raise
        return [
            CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
            for e in table.entries[0 : table.nent]
        ]


def _msrs_struct(pairs: list[tuple[int, int]]):
    return ffi.new(
        "struct kvm_msrs *",
        {"nmsrs": len(pairs), "entries": [{"index": i, "data": d} for i, d in pairs]},
    )
