"""The Xen hypercalls KVM leaves to userspace.

`HypercallDispatcher.handle()` decodes one KVM_EXIT_XEN hypercall, checks
everything the guest passed, calls the domain (the `XenDomainOps` below) and
stores the result: a value, or a negative errno as Xen returns it. The guest
is not trusted: every pointer goes through GuestAccess (a bad one is
-EFAULT), every count, index and domain id is checked before use, unknown
hypercalls and sub-ops are -ENOSYS, and nothing raised inside a handler
ever reaches the vCPU loop.

Arguments follow the calling ABI: a 64-bit guest's registers as they are,
a 32-bit guest's truncated to 32 bits, with compat structure layouts. Where
Xen declares an argument `int` or `unsigned int`, only its low 32 bits count
in both ABIs, as in Xen.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import time
from typing import Callable, Protocol, Sequence

from pyvmm.core.trace import NULL_TRACE, Tracer
from pyvmm.core.stats import Counters
from .. import abi
from ..errors import (
    EDOM,
    EEXIST,
    EFAULT,
    EINTR,
    EINVAL,
    ENOENT,
    ENOSYS,
    EOPNOTSUPP,
    EPERM,
    ESRCH,
    XenError,
)
from .gnttab import ENTRY_SIZE as GRANT_ENTRY_SIZE, GrantError
from .guest_access import GuestAccess, GuestFault

log = logging.getLogger(__name__)

_U32 = 0xFFFF_FFFF
_U64 = (1 << 64) - 1
_S64_LIMIT = 1 << 63

MS = 1_000_000
# set_timer_op: a timeout more than 2^50 ns (about 13 days) ahead, or
# negative, is a guest bug Xen answers with a timer 100 ms from now.
TIMER_OP_HORIZON_SHIFT = 50
TIMER_OP_FALLBACK_NS = 100 * MS

CONSOLE_WRITE_MAX = 64 * 1024  # bytes in one CONSOLEIO_write
MAX_GPFN = 1 << 40  # 52-bit guest-physical addresses
# A long batch (GNTTABOP_copy) lets a pause or a stop in every so many items.
PREEMPT_BATCH = 64
# Ballooning's batch: Linux's balloon driver hands in up to 512 frames (a
# page of them) per hypercall; the domain changes the guest's map once per
# batch, so a smaller one would cost more memslot changes and vCPU pauses.
RESERVATION_BATCH = 512
# XENMEM_{decrease,increase}_reservation, populate_physmap: Xen refuses more
# extents than fit its continuation's count (UINT_MAX >> MEMOP_EXTENT_SHIFT).
MEMOP_MAX_EXTENTS = 0xFFFF_FFFF >> abi.MEMOP_EXTENT_SHIFT

# What XENVER_* reports about "this Xen" apart from its version number.
XEN_EXTRAVERSION = b".0"
XEN_COMPILE_INFO = (b"python", b"pyvmm", b"", b"")
XEN_CAPABILITIES = b"xen-3.0-x86_64 hvm-3.0-x86_32 hvm-3.0-x86_32p hvm-3.0-x86_64"
XEN_CHANGESET = b"pyvmm"
XEN_DENIED = b"<denied>"  # what Xen shows an unprivileged guest instead

_EVTCHN_STATES = {value: name[len("EVTCHNSTAT_"):] for name, value in vars(abi).items()
                  if name.startswith("EVTCHNSTAT_")}  # --stats' names of port states


# --- what the dispatcher needs from the rest of the VMM -----------------------------


class EvtchnStatus(Protocol):
    status: int  # EVTCHNSTAT_*
    vcpu: int
    remote_dom: int  # unbound, interdomain
    remote_port: int  # interdomain
    virq: int
    pirq: int


class EventChannelOps(Protocol):
    """Event channels. Every method raises XenError for the guest's mistakes.
    Domain ids arrive with DOMID_SELF already replaced by the domain's id."""

    def alloc_unbound(self, dom: int, remote_dom: int) -> int: ...
    def bind_interdomain(self, remote_dom: int, remote_port: int) -> int: ...
    def bind_virq(self, virq: int, vcpu: int) -> int: ...
    def bind_ipi(self, vcpu: int) -> int: ...
    def close(self, port: int) -> None: ...
    def send(self, port: int) -> None: ...
    def unmask(self, port: int) -> None: ...
    def status(self, dom: int, port: int) -> EvtchnStatus: ...
    def bind_vcpu(self, port: int, vcpu: int) -> None: ...
    def reset(self, dom: int) -> None: ...
    # FIFO: -ENOSYS / -EOPNOTSUPP when not offered or not in use.
    fifo_offered: bool
    def init_control(self, vcpu: int, gfn: int, offset: int) -> int: ...  # the link bits
    def expand_array(self, gfn: int) -> None: ...
    def set_priority(self, port: int, priority: int) -> None: ...


class GrantTableOps(Protocol):
    def set_version(self, version: int) -> int: ...  # the version now in use
    def get_version(self) -> int: ...
    def nr_status_frames(self) -> int: ...  # 0 under version 1
    def query_size(self) -> tuple[int, int]: ...  # (nr_frames, max_nr_frames)
    # The page granted by `ref` to `grantee`, pinned until released; raises GrantError.
    def map(self, ref: int, writable: bool, *, grantee: int | None = None): ...


class XenDomainOps(Protocol):
    """The Xen domain as hypercalls see it. Any method may raise XenError,
    which becomes the guest's -errno.

    Guest-physical addresses of registered areas are abi.INVALID_GPA when
    the guest unregisters one (a null address). vCPU numbers are checked
    against vcpu_count before any call."""

    domid: int
    vcpu_count: int
    version: int  # (major << 16) | minor
    handle: bytes  # the domain's 16-byte handle: its UUID

    def note_long_mode(self, long_mode: bool) -> None: ...
    def features(self, submap: int) -> int: ...

    evtchn: EventChannelOps
    gnttab: GrantTableOps

    def map_shared_info(self, gpfn: int) -> None: ...
    def map_grant_frame(self, idx: int, gpfn: int) -> None: ...  # idx may carry XENMAPIDX_grant_table_status
    def grant_status_gfns(self, count: int) -> list[int]: ...  # where status frames 0.. are; INVALID_GFN if nowhere
    def remove_from_physmap(self, gpfn: int) -> None: ...  # an overlay page; XenError otherwise
    # Ballooning: the extents of 2**order pages starting at each of `gpfns`,
    # in the guest's order: how many, from the first, were done.
    def decrease_reservation(self, gpfns: list[int], order: int) -> int: ...
    def populate_physmap(self, gpfns: list[int], order: int) -> int: ...
    def hvm_get_param(self, index: int) -> int: ...
    def hvm_set_param(self, index: int, value: int) -> None: ...
    def set_evtchn_upcall_vector(self, vcpu: int, vector: int) -> None: ...
    def register_vcpu_info(self, vcpu: int, gpa: int) -> None: ...
    def register_vcpu_time_info(self, vcpu: int, gpa: int) -> None: ...
    def register_runstate_area(self, vcpu: int, gpa: int) -> None: ...
    def set_runstate_update_flag(self, enabled: bool) -> None: ...  # XenError(EINVAL) if unsupported
    # Timeouts are absolute Xen system time in ns, never negative.
    def set_singleshot_timer(self, vcpu: int, timeout_abs_ns: int, future: bool) -> None: ...
    def stop_singleshot_timer(self, vcpu: int) -> None: ...
    def set_periodic_timer(self, vcpu: int, period_ns: int) -> None: ...
    def stop_periodic_timer(self, vcpu: int) -> None: ...
    def set_timer_op(self, vcpu: int, timeout_abs_ns: int) -> None: ...  # 0 stops
    # SCHEDOP_shutdown: the hypercall's result when the guest runs on (0;
    # SHUTDOWN_suspend answers 1, "suspend cancelled"); None means 0.
    def shutdown(self, reason: int) -> int | None: ...
    # SCHEDOP_watchdog (hv/watchdog.py): a new watchdog's id, or 0.
    def watchdog(self, wid: int, timeout: int) -> int: ...
    # VCPUOP_is_up, VCPUOP_up (XenError(EINVAL): never started), VCPUOP_down.
    def vcpu_is_up(self, vcpu: int) -> bool: ...
    def vcpu_up(self, vcpu: int) -> None: ...
    def vcpu_down(self, vcpu: int) -> None: ...
    def sched_yield(self, vcpu: int) -> None: ...
    # Both halt the vCPU once the hypercall completes, until an event (or the timeout) wakes it.
    def poll(self, vcpu: int, ports: list[int], timeout_abs_ns: int) -> None: ...  # 0: none
    def block(self, vcpu: int) -> None: ...
    def console_write(self, data: bytes) -> None: ...
    # The guest's RAM page at `gfn` (None: no RAM there now: ballooned, an overlay, MMIO).
    def ram_page(self, gfn: int) -> memoryview | None: ...
    # Between the items of a long batch, on the calling vCPU's thread: serve
    # a pause (waiting it out) and queued work; True when the VM is stopping.
    def preempt(self, vcpu: int) -> bool: ...


# --- one hypercall in flight ----------------------------------------------------------


class _Call:
    __slots__ = ("vcpu", "compat", "args", "access")

    def __init__(self, vcpu: int, compat: bool, args: tuple[int, ...], access: GuestAccess):
        self.vcpu = vcpu
        self.compat = compat
        self.args = args
        self.access = access

    def read(self, gva: int, layout: abi.Layout, for_update: bool = False):
        return self.access.read_struct(gva, layout, self.compat, for_update=for_update)

    def write(self, gva: int, layout: abi.Layout, record) -> None:
        self.access.write_struct(gva, layout, record, self.compat)


Handler = Callable[[_Call], int]
SubHandler = Callable[[_Call, int], int]  # (call, pointer argument)


class _Throttle:
    """Log a repeated complaint at its 1st, 2nd, 4th, 8th... occurrence.
    Keys come from the guest, so their number is bounded too."""

    MAX_KEYS = 256

    def __init__(self):
        self._seen: dict[object, int] = {}

    def __call__(self, level: int, key, message: str, *args, exc_info=False) -> None:
        if key not in self._seen and len(self._seen) >= self.MAX_KEYS:
            key = "other"
        count = self._seen.get(key, 0) + 1
        self._seen[key] = count
        if count & (count - 1) == 0:
            suffix = f" (x{count})" if count > 1 else ""
            log.log(level, message + suffix, *args, exc_info=exc_info)


def _read_frames(access: GuestAccess, base: int, first: int, count: int, item: int) -> list[int]:
    """Up to `count` frame numbers of `item` bytes from entry `first` of the
    guest's list at `base`, stopping before the first it cannot read: the
    entries on one page are read together."""
    frames: list[int] = []
    index, end = first, first + count
    while index < end:
        gva = base + index * item
        on_page = (abi.PAGE_SIZE - (gva & (abi.PAGE_SIZE - 1))) // item
        chunk = max(1, min(on_page, end - index))  # 1: an entry across two pages
        try:
            frames.extend(access.read_array(gva, chunk, item))
        except GuestFault:
            break  # the page (the whole chunk is on it) cannot be read
        index += chunk
    return frames


class _MappedPage:
    """A grant mapping as a context manager giving its page, released on exit."""

    def __init__(self, mapping):
        self._mapping = mapping

    def __enter__(self) -> memoryview:
        return self._mapping.view

    def __exit__(self, *exc) -> None:
        self._mapping.release()


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= _S64_LIMIT else value


class HypercallDispatcher:
    """Handles the hypercalls of one domain, from any of its vCPUs.

    `xen_time_ns`, when given, reads Xen system time (the guest's pvclock):
    set_timer_op needs it to apply Xen's rule for absurd timeouts.
    """

    def __init__(self, domain: XenDomainOps, *, xen_time_ns: Callable[[], int] | None = None,
                 trace: Tracer = NULL_TRACE):
        self.domain = domain
        self._trace = trace  # the VM's (pyvmm/core/trace.py)
        self.xen_time_ns = xen_time_ns
        self.calls = [0] * abi.NR_HYPERCALLS
        self._complain = _Throttle()
        self._shutdown_code: int | None = None
        # Name → handler: wrap an entry to trace that hypercall.
        self.handlers: dict[str, Handler] = {
            "set_timer_op": self._set_timer_op,
            "xen_version": self._subops(abi.HYPERCALL_xen_version, self._xen_version_ops()),
            "console_io": self._console_io,
            "vm_assist": self._vm_assist,
            "memory_op": self._memory_op,
            "grant_table_op": self._grant_table_op,
            "vcpu_op": self._vcpu_op,
            "sched_op": self._subops(abi.HYPERCALL_sched_op, self._sched_ops()),
            "event_channel_op": self._subops(abi.HYPERCALL_event_channel_op, self._evtchn_ops()),
            "physdev_op": self._physdev_op,
            "hvm_op": self._hvm_op,
        }

    def count_sends(self, vcpus: Sequence[Counters]) -> None:
        """--stats: count each EVTCHNOP_send that reaches userspace, with its
        time, by what its port is bound to, into `vcpus[call.vcpu]` (owned
        by that vCPU's thread). Swaps the event_channel_op handler once, so
        without it the hypercall path is untouched."""
        table = self._evtchn_ops()
        now = time.perf_counter_ns
        evtchn = self.domain.evtchn

        def send(call: _Call, arg: int) -> int:
            start = now()
            port = call.read(arg, abi.EVTCHN_PORT).port
            try:
                evtchn.send(port)
            finally:
                vcpus[call.vcpu].add("evtchn-send", self._binding(port), now() - start)
            return 0

        table[abi.EVTCHNOP_send] = send
        self.handlers["event_channel_op"] = self._subops(abi.HYPERCALL_event_channel_op, table)

    def _binding(self, port: int) -> str:
        """What a port is bound to, in a word, for --stats."""
        try:
            status = self.domain.evtchn.status(self.domain.domid, port)
        except XenError:
            return "invalid port"
        kind = _EVTCHN_STATES.get(status.status, str(status.status))
        if status.status == abi.EVTCHNSTAT_interdomain:
            kind += " (loopback)" if status.remote_dom == self.domain.domid else " (to a backend)"
        return f"port {port}: {kind}"

    def counts(self) -> dict[str, int]:
        """Calls so far per hypercall (including refused ones)."""
        return {abi.hypercall_name(nr): n for nr, n in enumerate(self.calls) if n}

    # --- entry point ---------------------------------------------------------------

    def handle(self, exit, vcpu: int, access: GuestAccess) -> None:
        """Handle one hypercall exit and set exit.result."""
        try:
            result = self._handle(exit, vcpu, access)
        except Exception as error:  # a bug of ours must not kill the vCPU
            self._complain(
                logging.ERROR, ("crash", type(error).__name__),
                "vcpu%d: hypercall %#x failed: %r", vcpu, exit.input, error, exc_info=True,
            )
            result = -EINVAL
        exit.result = result
        if self._trace.hypercall:
            self._trace_call(exit, vcpu, result)

    def _trace_call(self, exit, vcpu: int, result: int) -> None:
        mask = _U64 if exit.longmode else _U32
        number = exit.input & mask
        args = [p & mask for p in exit.params]
        fields = {"name": abi.hypercall_name(number), "args": [hex(a) for a in args], "result": result}
        if number in abi.SUBOP_NAMES and args:
            fields["op"] = abi.subop_name(number, args[0] & _U32)
        self._trace.emit("hypercall", "call", vcpu=vcpu, **fields)

    def _handle(self, exit, vcpu: int, access: GuestAccess) -> int:
        if exit.cpl != 0:
            # Before latching the ABI: a 32-bit process under a 64-bit kernel
            # would otherwise flip it.
            return -EPERM
        long_mode = bool(exit.longmode)
        self.domain.note_long_mode(long_mode)
        if long_mode:  # KVM's registers are 64-bit already
            number, args = exit.input, tuple(exit.params)
        else:
            number, args = exit.input & _U32, tuple(p & _U32 for p in exit.params)
        if number >= abi.NR_HYPERCALLS:
            self._complain(logging.WARNING, "number", "vcpu%d: hypercall %#x does not exist", vcpu, number)
            return -ENOSYS
        self.calls[number] += 1
        name = abi.HYPERCALL_NAMES.get(number)
        handler = self.handlers.get(name) if name else None
        if handler is None:
            self._complain(logging.WARNING, number, "vcpu%d: unhandled hypercall %s", vcpu, abi.hypercall_name(number))
            return -ENOSYS
        access.forget()
        try:
            return int(handler(_Call(vcpu, not long_mode, args, access)))
        except GuestFault as fault:
            self._complain(logging.DEBUG, ("fault", number), "vcpu%d: %s: %s", vcpu, name, fault)
            return -EFAULT
        except XenError as error:
            return -error.errno

    # --- common checks -----------------------------------------------------------

    def _unknown(self, hypercall: int, op: int) -> int:
        self._complain(
            logging.WARNING, (hypercall, op), "unhandled %s sub-op %s",
            abi.hypercall_name(hypercall), abi.subop_name(hypercall, op),
        )
        return -ENOSYS

    def _subops(self, hypercall: int, table: dict[int, SubHandler]) -> Handler:
        """A handler for hypercalls shaped (int cmd, void *arg)."""

        def handler(call: _Call) -> int:
            op = call.args[0] & _U32
            sub = table.get(op)
            return sub(call, call.args[1]) if sub else self._unknown(hypercall, op)

        return handler

    def _domid(self, dom: int) -> int:
        return self.domain.domid if dom == abi.DOMID_SELF else dom

    def _check_own_domain(self, dom: int) -> None:
        """Only our own domain may be named (DOMID_SELF or its id)."""
        if self._domid(dom) != self.domain.domid:
            raise XenError(ESRCH)

    def _check_vcpu(self, vcpu: int) -> None:
        if not 0 <= vcpu < self.domain.vcpu_count:
            raise XenError(ENOENT)

    def _now(self) -> int | None:
        return self.xen_time_ns() if self.xen_time_ns is not None else None

    # --- set_timer_op (s_time_t timeout) -------------------------------------------

    def _set_timer_op(self, call: _Call) -> int:
        if call.compat:  # a 32-bit guest passes the 64-bit time in two registers
            timeout = call.args[0] | (call.args[1] << 32)
        else:
            timeout = call.args[0]
        if timeout != 0:
            timeout = self._timer_op_timeout(_signed64(timeout))
        self.domain.set_timer_op(call.vcpu, timeout)
        return 0

    def _timer_op_timeout(self, timeout: int) -> int:
        now = self._now()
        if now is None:
            return max(timeout, 1)  # no clock: a negative time is simply past
        if timeout < 0 or (timeout - now) >> TIMER_OP_HORIZON_SHIFT > 0:
            return now + TIMER_OP_FALLBACK_NS
        return timeout  # possibly past: the timer fires at once

    # --- xen_version (int cmd, void *arg) --------------------------------------------

    def _xen_version_ops(self) -> dict[int, SubHandler]:
        def fixed(data: bytes, size: int) -> SubHandler:
            blob = data[: size - 1].ljust(size, b"\0")
            return lambda call, arg: self._write_bytes(call, arg, blob)

        return {
            abi.XENVER_version: lambda call, arg: self.domain.version & _U32,
            abi.XENVER_extraversion: fixed(XEN_EXTRAVERSION, abi.XEN_EXTRAVERSION_LEN),
            abi.XENVER_compile_info: self._xenver_compile_info,
            abi.XENVER_capabilities: fixed(XEN_CAPABILITIES, abi.XEN_CAPABILITIES_INFO_LEN),
            abi.XENVER_changeset: fixed(XEN_CHANGESET, abi.XEN_CHANGESET_INFO_LEN),
            abi.XENVER_platform_parameters: self._xenver_platform_parameters,
            abi.XENVER_get_features: self._xenver_get_features,
            abi.XENVER_pagesize: lambda call, arg: -EINVAL if arg else abi.PAGE_SIZE,
            # The domain handle is the domain's UUID (/sys/hypervisor/uuid).
            abi.XENVER_guest_handle: self._xenver_guest_handle,
            # Xen shows an unprivileged guest a placeholder, not its command line.
            abi.XENVER_commandline: fixed(XEN_DENIED, len(XEN_DENIED) + 1),
            abi.XENVER_build_id: lambda call, arg: -EPERM,
            abi.XENVER_extraversion2: lambda call, arg: -EPERM,
            abi.XENVER_capabilities2: lambda call, arg: -EPERM,
            abi.XENVER_changeset2: lambda call, arg: -EPERM,
            abi.XENVER_commandline2: lambda call, arg: -EPERM,
        }

    def _xenver_guest_handle(self, call: _Call, arg: int) -> int:
        handle = getattr(self.domain, "handle", b"")
        if not isinstance(handle, (bytes, bytearray)):
            handle = b""
        return self._write_bytes(call, arg, bytes(handle).ljust(abi.XEN_DOMAIN_HANDLE_LEN, b"\0")[: abi.XEN_DOMAIN_HANDLE_LEN])

    @staticmethod
    def _write_bytes(call: _Call, arg: int, data: bytes) -> int:
        call.access.write(arg, data)
        return 0

    def _xenver_compile_info(self, call: _Call, arg: int) -> int:
        call.write(arg, abi.COMPILE_INFO, abi.COMPILE_INFO.record(*XEN_COMPILE_INFO))
        return 0

    def _xenver_platform_parameters(self, call: _Call, arg: int) -> int:
        # HVM guests have no hypervisor hole in their address space.
        call.write(arg, abi.PLATFORM_PARAMETERS, abi.PLATFORM_PARAMETERS.record(0))
        return 0

    def _xenver_get_features(self, call: _Call, arg: int) -> int:
        info = call.read(arg, abi.FEATURE_INFO, for_update=True)
        if info.submap_idx >= abi.XENFEAT_NR_SUBMAPS:
            return -EINVAL
        submap = self.domain.features(info.submap_idx) & _U32
        call.write(arg, abi.FEATURE_INFO, info._replace(submap=submap))
        return 0

    # --- console_io (unsigned cmd, unsigned count, char *buffer) -----------------------

    def _console_io(self, call: _Call) -> int:
        cmd, count, buffer = call.args[0] & _U32, call.args[1] & _U32, call.args[2]
        if cmd == abi.CONSOLEIO_write:
            if count > CONSOLE_WRITE_MAX:
                return -EINVAL
            self.domain.console_write(call.access.read(buffer, count))
            return 0
        if cmd == abi.CONSOLEIO_read:
            return 0  # nothing is ever typed at the hypervisor's console
        return self._unknown(abi.HYPERCALL_console_io, cmd)

    # --- vm_assist (unsigned cmd, unsigned type) -------------------------------------

    def _vm_assist(self, call: _Call) -> int:
        cmd, kind = call.args[0] & _U32, call.args[1] & _U32
        if cmd not in (abi.VMASST_CMD_enable, abi.VMASST_CMD_disable):
            return -EINVAL
        if kind != abi.VMASST_TYPE_runstate_update_flag:
            return -EINVAL  # as Xen: the only assist an HVM guest may ask for
        self.domain.set_runstate_update_flag(cmd == abi.VMASST_CMD_enable)
        return 0

    # --- hvm_op (unsigned long op, void *arg) ---------------------------------------

    def _hvm_op(self, call: _Call) -> int:
        op, arg = call.args[0] & abi.HVMOP_op_mask, call.args[1]  # Xen ignores the rest
        if op == abi.HVMOP_set_param:
            return self._hvm_set_param(call, arg)
        if op == abi.HVMOP_get_param:
            return self._hvm_get_param(call, arg)
        if op == abi.HVMOP_set_evtchn_upcall_vector:
            return self._hvm_set_evtchn_upcall_vector(call, arg)
        if op == abi.HVMOP_pagetable_dying:
            return -ENOSYS  # Linux probes it and does without
        return self._unknown(abi.HYPERCALL_hvm_op, op)

    def _hvm_param_checks(self, param) -> None:
        if param.index >= abi.HVM_NR_PARAMS or param.index in abi.HVM_PARAMS_DEPRECATED:
            raise XenError(EINVAL)
        self._check_own_domain(param.domid)

    def _hvm_set_param(self, call: _Call, arg: int) -> int:
        param = call.read(arg, abi.HVM_PARAM)
        self._hvm_param_checks(param)
        if param.index in abi.HVM_PARAMS_READ_ONLY:
            return -EEXIST
        if param.index not in abi.HVM_PARAMS_GUEST_SETTABLE:
            return -EPERM
        self.domain.hvm_set_param(param.index, param.value)
        return 0

    def _hvm_get_param(self, call: _Call, arg: int) -> int:
        param = call.read(arg, abi.HVM_PARAM, for_update=True)
        self._hvm_param_checks(param)
        if param.index not in abi.HVM_PARAMS_GUEST_READABLE:
            return -EPERM
        value = self.domain.hvm_get_param(param.index) & _U64
        call.write(arg, abi.HVM_PARAM, param._replace(value=value))
        return 0

    def _hvm_set_evtchn_upcall_vector(self, call: _Call, arg: int) -> int:
        request = call.read(arg, abi.HVM_EVTCHN_UPCALL_VECTOR)
        if request.vector < abi.MIN_UPCALL_VECTOR:
            return -EINVAL
        self._check_vcpu(request.vcpu)
        self.domain.set_evtchn_upcall_vector(request.vcpu, request.vector)
        return 0

    # --- vcpu_op (int cmd, unsigned vcpuid, void *arg) ---------------------------------

    def _vcpu_op(self, call: _Call) -> int:
        cmd, target, arg = call.args[0] & _U32, call.args[1] & _U32, call.args[2]
        self._check_vcpu(target)  # Xen checks the vCPU before the command
        domain = self.domain
        if cmd == abi.VCPUOP_is_up:
            return int(domain.vcpu_is_up(target))
        if cmd == abi.VCPUOP_up:
            domain.vcpu_up(target)
            return 0
        if cmd == abi.VCPUOP_down:
            domain.vcpu_down(target)
            return 0
        if cmd == abi.VCPUOP_register_vcpu_info:
            return self._register_vcpu_info(call, target, arg)
        if cmd == abi.VCPUOP_register_vcpu_time_memory_area:
            gpa = self._registered_area(call, arg, abi.VCPU_TIME_INFO_SIZE, may_cross=False)
            domain.register_vcpu_time_info(target, gpa)
            return 0
        if cmd == abi.VCPUOP_register_runstate_memory_area:
            size = abi.RUNSTATE_INFO_SIZE[call.compat]
            domain.register_runstate_area(target, self._registered_area(call, arg, size, may_cross=True))
            return 0
        if cmd == abi.VCPUOP_set_periodic_timer:
            period = call.read(arg, abi.VCPU_SET_PERIODIC_TIMER).period_ns
            if period < MS or period >= _S64_LIMIT:
                return -EINVAL
            domain.set_periodic_timer(target, period)
            return 0
        if cmd == abi.VCPUOP_stop_periodic_timer:
            domain.stop_periodic_timer(target)
            return 0
        if cmd in (abi.VCPUOP_set_singleshot_timer, abi.VCPUOP_stop_singleshot_timer):
            if target != call.vcpu:  # Xen: only a vCPU's own singleshot timer
                return -EINVAL
            if cmd == abi.VCPUOP_stop_singleshot_timer:
                domain.stop_singleshot_timer(target)
                return 0
            timer = call.read(arg, abi.VCPU_SET_SINGLESHOT_TIMER)
            future = bool(timer.flags & abi.VCPU_SSHOTTMR_future)
            timeout = timer.timeout_abs_ns
            if timeout >= _S64_LIMIT:
                # Negative as Xen's s_time_t: expired already, and Xen's
                # unsigned comparison never calls that ETIME.
                timeout, future = 1, False
            domain.set_singleshot_timer(target, timeout, future)
            return 0
        return self._unknown(abi.HYPERCALL_vcpu_op, cmd)

    def _register_vcpu_info(self, call: _Call, target: int, arg: int) -> int:
        info = call.read(arg, abi.VCPU_REGISTER_VCPU_INFO)
        # The whole vcpu_info within one page, naturally aligned for the
        # atomic updates of evtchn_pending_sel, and in RAM.
        if info.mfn >= MAX_GPFN or info.offset > abi.PAGE_SIZE - abi.VCPU_INFO_SIZE:
            return -EINVAL
        if info.offset % abi.XEN_ULONG_SIZE[call.compat]:
            return -EINVAL
        gpa = (info.mfn << abi.PAGE_SHIFT) + info.offset
        if not call.access.memory.contains(gpa, abi.VCPU_INFO_SIZE):
            return -EINVAL
        self.domain.register_vcpu_info(target, gpa)
        return 0

    def _registered_area(self, call: _Call, arg: int, size: int, may_cross: bool) -> int:
        """The guest-physical address of an area registered by virtual
        address; INVALID_GPA for a null one (which unregisters)."""
        gva = call.read(arg, abi.VCPU_REGISTER_AREA).addr
        if gva == 0:
            return abi.INVALID_GPA
        if not may_cross and (gva % abi.PAGE_SIZE) + size > abi.PAGE_SIZE:
            raise XenError(EINVAL)  # KVM maps this area as one page
        return call.access.translate_gpa(gva, size, write=True)

    # --- sched_op (int cmd, void *arg) ----------------------------------------------

    def _sched_ops(self) -> dict[int, SubHandler]:
        return {
            abi.SCHEDOP_yield: self._sched_yield,
            abi.SCHEDOP_block: self._sched_block,
            abi.SCHEDOP_shutdown: self._sched_shutdown,
            abi.SCHEDOP_shutdown_code: self._sched_shutdown_code,
            abi.SCHEDOP_remote_shutdown: self._sched_remote_shutdown,
            abi.SCHEDOP_poll: self._sched_poll,
            abi.SCHEDOP_watchdog: self._sched_watchdog,
        }

    def _sched_yield(self, call: _Call, arg: int) -> int:
        self.domain.sched_yield(call.vcpu)
        return 0

    def _sched_block(self, call: _Call, arg: int) -> int:
        self.domain.block(call.vcpu)
        return 0

    @staticmethod
    def _shutdown_reason(reason: int) -> int:
        if reason > abi.SHUTDOWN_MAX:
            raise XenError(EINVAL)
        return reason

    def _shutdown(self, reason: int) -> int:
        # A code recorded earlier (SCHEDOP_shutdown_code) wins, as in Xen.
        if self._shutdown_code is not None:
            reason = self._shutdown_code
        result = self.domain.shutdown(reason) or 0
        if reason in (abi.SHUTDOWN_suspend, abi.SHUTDOWN_soft_reset):
            self._shutdown_code = None  # the domain runs on: Xen's domain_resume() forgets the code
        return result

    def _sched_shutdown(self, call: _Call, arg: int) -> int:
        return self._shutdown(self._shutdown_reason(call.read(arg, abi.SCHED_SHUTDOWN).reason))

    @property
    def shutdown_code(self) -> int | None:
        """The reason SCHEDOP_shutdown_code recorded, which the next shutdown
        takes (None: none); the domain's snapshot holds it."""
        return self._shutdown_code

    @shutdown_code.setter
    def shutdown_code(self, reason: int | None) -> None:
        if reason is not None and not (type(reason) is int and 0 <= reason <= abi.SHUTDOWN_MAX):
            raise ValueError(f"shutdown reason {reason!r:.20}")
        self._shutdown_code = reason

    def _sched_shutdown_code(self, call: _Call, arg: int) -> int:
        reason = self._shutdown_reason(call.read(arg, abi.SCHED_SHUTDOWN).reason)
        if self._shutdown_code is None:
            self._shutdown_code = reason
        return 0

    def _sched_remote_shutdown(self, call: _Call, arg: int) -> int:
        request = call.read(arg, abi.SCHED_REMOTE_SHUTDOWN)
        reason = self._shutdown_reason(request.reason)
        if request.domain_id == self.domain.domid:
            return self._shutdown(reason)
        if request.domain_id == 0:
            return -EPERM  # the backends' domain exists, but is not ours to stop
        return -ESRCH

    def _sched_watchdog(self, call: _Call, arg: int) -> int:
        request = call.read(arg, abi.SCHED_WATCHDOG)
        return self.domain.watchdog(request.id, request.timeout)

    def _sched_poll(self, call: _Call, arg: int) -> int:
        poll = call.read(arg, abi.SCHED_POLL)
        if poll.nr_ports > abi.SCHED_POLL_MAX_PORTS:
            return -EINVAL
        ports = call.access.read_array(poll.ports, poll.nr_ports, 4)
        limit = abi.EVTCHN_2L_NR_CHANNELS[call.compat]
        if any(port >= limit for port in ports):
            return -EINVAL
        timeout = poll.timeout
        if timeout >= _S64_LIMIT:
            timeout = 1  # negative: already expired
        self.domain.poll(call.vcpu, ports, timeout)
        return 0

    # --- event_channel_op (int cmd, void *arg) ----------------------------------------

    def _evtchn_ops(self) -> dict[int, SubHandler]:
        return {
            abi.EVTCHNOP_alloc_unbound: self._evtchn_alloc_unbound,
            abi.EVTCHNOP_bind_interdomain: self._evtchn_bind_interdomain,
            abi.EVTCHNOP_bind_virq: self._evtchn_bind_virq,
            abi.EVTCHNOP_bind_ipi: self._evtchn_bind_ipi,
            abi.EVTCHNOP_close: lambda call, arg: self._evtchn_port_op(call, arg, self.domain.evtchn.close),
            abi.EVTCHNOP_send: lambda call, arg: self._evtchn_port_op(call, arg, self.domain.evtchn.send),
            abi.EVTCHNOP_unmask: lambda call, arg: self._evtchn_port_op(call, arg, self.domain.evtchn.unmask),
            abi.EVTCHNOP_status: self._evtchn_status,
            abi.EVTCHNOP_bind_vcpu: self._evtchn_bind_vcpu,
            abi.EVTCHNOP_reset: self._evtchn_reset,
            abi.EVTCHNOP_init_control: self._evtchn_init_control,
            abi.EVTCHNOP_expand_array: self._evtchn_expand_array,
            abi.EVTCHNOP_set_priority: self._evtchn_set_priority,
        }

    def _evtchn_init_control(self, call: _Call, arg: int) -> int:
        """Checked as Xen does (vCPU, offset, then the frame), also when FIFO
        is not offered: then a valid request is -ENOSYS and Linux stays with
        2-level. The link bits are written back only on success, as Xen."""
        request = call.read(arg, abi.EVTCHN_INIT_CONTROL, for_update=True)
        gfn = request.control_gfn
        evtchn = self.domain.evtchn
        if not evtchn.fifo_offered:
            self._check_vcpu(request.vcpu)
            if request.offset % 8 or request.offset > abi.PAGE_SIZE - abi.EVTCHN_FIFO_CONTROL_BLOCK_SIZE:
                return -EINVAL
            if gfn >= MAX_GPFN or not call.access.memory.contains(gfn << abi.PAGE_SHIFT, abi.PAGE_SIZE):
                return -EINVAL  # Xen cannot map a control block there
            return -ENOSYS
        link_bits = evtchn.init_control(request.vcpu, gfn, request.offset)
        call.write(arg, abi.EVTCHN_INIT_CONTROL, request._replace(link_bits=link_bits))
        return 0

    def _evtchn_expand_array(self, call: _Call, arg: int) -> int:
        self.domain.evtchn.expand_array(call.read(arg, abi.EVTCHN_EXPAND_ARRAY).array_gfn)
        return 0

    def _evtchn_set_priority(self, call: _Call, arg: int) -> int:
        request = call.read(arg, abi.EVTCHN_SET_PRIORITY)
        self.domain.evtchn.set_priority(request.port, request.priority)
        return 0

    def _evtchn_alloc_unbound(self, call: _Call, arg: int) -> int:
        request = call.read(arg, abi.EVTCHN_ALLOC_UNBOUND, for_update=True)
        port = self.domain.evtchn.alloc_unbound(self._domid(request.dom), self._domid(request.remote_dom))
        call.write(arg, abi.EVTCHN_ALLOC_UNBOUND, request._replace(port=port & _U32))
        return 0

    def _evtchn_bind_interdomain(self, call: _Call, arg: int) -> int:
        request = call.read(arg, abi.EVTCHN_BIND_INTERDOMAIN, for_update=True)
        port = self.domain.evtchn.bind_interdomain(self._domid(request.remote_dom), request.remote_port)
        call.write(arg, abi.EVTCHN_BIND_INTERDOMAIN, request._replace(local_port=port & _U32))
        return 0

    def _evtchn_bind_virq(self, call: _Call, arg: int) -> int:
        request = call.read(arg, abi.EVTCHN_BIND_VIRQ, for_update=True)
        if request.virq >= abi.NR_VIRQS:
            return -EINVAL
        self._check_vcpu(request.vcpu)
        port = self.domain.evtchn.bind_virq(request.virq, request.vcpu)
        call.write(arg, abi.EVTCHN_BIND_VIRQ, request._replace(port=port & _U32))
        return 0

    def _evtchn_bind_ipi(self, call: _Call, arg: int) -> int:
        request = call.read(arg, abi.EVTCHN_BIND_IPI, for_update=True)
        self._check_vcpu(request.vcpu)
        port = self.domain.evtchn.bind_ipi(request.vcpu)
        call.write(arg, abi.EVTCHN_BIND_IPI, request._replace(port=port & _U32))
        return 0

    @staticmethod
    def _evtchn_port_op(call: _Call, arg: int, op: Callable[[int], None]) -> int:
        op(call.read(arg, abi.EVTCHN_PORT).port)
        return 0

    def _evtchn_status(self, call: _Call, arg: int) -> int:
        request = call.read(arg, abi.EVTCHN_STATUS, for_update=True)
        status = self.domain.evtchn.status(self._domid(request.dom), request.port)
        kind = status.status
        u0 = u1 = 0
        if kind in (abi.EVTCHNSTAT_unbound, abi.EVTCHNSTAT_interdomain):
            u0 = status.remote_dom & 0xFFFF
            if kind == abi.EVTCHNSTAT_interdomain:
                u1 = status.remote_port & _U32
        elif kind == abi.EVTCHNSTAT_pirq:
            u0 = status.pirq & _U32
        elif kind == abi.EVTCHNSTAT_virq:
            u0 = status.virq & _U32
        reply = request._replace(status=kind & _U32, vcpu=status.vcpu & _U32, u0=u0, u1=u1)
        call.write(arg, abi.EVTCHN_STATUS, reply)
        return 0

    def _evtchn_bind_vcpu(self, call: _Call, arg: int) -> int:
        request = call.read(arg, abi.EVTCHN_BIND_VCPU)
        self._check_vcpu(request.vcpu)
        self.domain.evtchn.bind_vcpu(request.port, request.vcpu)
        return 0

    def _evtchn_reset(self, call: _Call, arg: int) -> int:
        self.domain.evtchn.reset(self._domid(call.read(arg, abi.EVTCHN_RESET).dom))
        return 0

    # --- grant_table_op (unsigned cmd, void *uop, unsigned count) ------------------------

    def _grant_table_op(self, call: _Call) -> int:
        cmd, uop, count = call.args[0] & _U32, call.args[1], call.args[2] & _U32
        if cmd & ~abi.GNTTABOP_CMD_MASK or count >= 1 << 31:
            return -EINVAL  # continuation bits, or a negative count, as Xen
        if cmd == abi.GNTTABOP_copy:
            return self._gnttab_copy(call, uop, count)
        handler = {
            abi.GNTTABOP_set_version: self._gnttab_set_version,
            abi.GNTTABOP_get_version: self._gnttab_get_version,
            abi.GNTTABOP_query_size: self._gnttab_query_size,
            abi.GNTTABOP_get_status_frames: self._gnttab_get_status_frames,
            abi.GNTTABOP_setup_table: self._gnttab_setup_table,
        }.get(cmd)
        if handler is None:
            return self._unknown(abi.HYPERCALL_grant_table_op, cmd)
        if count != 1:  # each of these takes exactly one structure
            return -EINVAL
        return handler(call, uop)

    def _gnttab_copy(self, call: _Call, uop: int, count: int) -> int:
        """GNTTABOP_copy: `count` copies, each answered in its own status
        field, as Xen. A structure that cannot be read or answered ends the
        call with -EFAULT (those before it are done). Xen preempts a long
        batch with a continuation the guest never sees; here the vCPU thread
        stops at every PREEMPT_BATCH copies to serve a pause or a stop, so a
        count of 2**31 costs the guest's own vCPU time and holds nothing else."""
        size = abi.GNTTAB_COPY.size(call.compat)
        status_at = abi.GNTTAB_COPY_STATUS_OFFSET[call.compat]
        for index in range(count):
            if index and index % PREEMPT_BATCH == 0 and self.domain.preempt(call.vcpu):
                return -EINTR  # the VM is stopping: nobody reads this
            at = uop + index * size
            status = self._copy_one(call.read(at, abi.GNTTAB_COPY, for_update=True))
            call.access.write(at + status_at, struct.pack("<h", status))
        return 0

    def _copy_one(self, op) -> int:
        """One gnttab_copy: its GNTST_* status. Xen's order of checks: both
        domains, then the source, then the destination, then the ranges."""
        source_gref = bool(op.flags & abi.GNTCOPY_source_gref)
        dest_gref = bool(op.flags & abi.GNTCOPY_dest_gref)
        for domid, gref in ((op.source_domid, source_gref), (op.dest_domid, dest_gref)):
            if domid != abi.DOMID_SELF and not gref:
                return abi.GNTST_permission_denied  # only DOMID_SELF names a frame directly
            if domid not in (abi.DOMID_SELF, self.domain.domid, 0):
                return abi.GNTST_bad_domain
        try:
            with self._copy_buffer(op.source_u, op.source_domid, source_gref, writable=False) as source, \
                    self._copy_buffer(op.dest_u, op.dest_domid, dest_gref, writable=True) as dest:
                if op.source_offset + op.len > abi.PAGE_SIZE or op.dest_offset + op.len > abi.PAGE_SIZE:
                    return abi.GNTST_bad_copy_arg
                data = bytes(source[op.source_offset:op.source_offset + op.len])  # the two may overlap
                dest[op.dest_offset:op.dest_offset + op.len] = data
        except GrantError as error:
            return error.status
        return abi.GNTST_okay

    def _copy_buffer(self, pointer: int, domid: int, gref: bool, writable: bool):
        """A context manager giving the page one side of a copy names."""
        if not gref:
            view = self.domain.ram_page(pointer) if pointer < MAX_GPFN else None
            if view is None:
                raise GrantError(abi.GNTST_bad_page, f"gfn {pointer:#x} is not guest RAM")
            return contextlib.nullcontext(view)
        if domid == 0:
            # Domain 0 exists, but the VMM grants the guest nothing.
            raise GrantError(abi.GNTST_general_error, "domain 0 grants the guest nothing")
        gnttab = self.domain.gnttab
        frames = max(gnttab.query_size()[0], 1)  # Xen: entries of the frames the table has grown to
        if pointer >= frames * abi.PAGE_SIZE // GRANT_ENTRY_SIZE:
            raise GrantError(abi.GNTST_bad_gntref, f"grant ref {pointer} is beyond the table")
        try:
            mapping = gnttab.map(pointer, writable, grantee=self.domain.domid)
        except GrantError as error:
            # Xen answers every entry it cannot pin (flags, domain, read-only) so.
            raise GrantError(abi.GNTST_general_error if error.status == abi.GNTST_permission_denied
                             else error.status, str(error)) from None
        return _MappedPage(mapping)

    def _gnttab_set_version(self, call: _Call, uop: int) -> int:
        request = call.read(uop, abi.GNTTAB_SET_VERSION, for_update=True)
        gnttab = self.domain.gnttab
        try:
            if request.version not in (1, 2):
                raise XenError(EINVAL)
            version, result = gnttab.set_version(request.version), 0
        except XenError as error:
            version, result = gnttab.get_version(), -error.errno
        # Xen reports the version in use even when the change failed.
        call.write(uop, abi.GNTTAB_SET_VERSION, request._replace(version=version & _U32))
        return result

    def _gnttab_get_version(self, call: _Call, uop: int) -> int:
        request = call.read(uop, abi.GNTTAB_GET_VERSION, for_update=True)
        dom = self._domid(request.dom)
        if dom != self.domain.domid:
            return -EPERM if dom == 0 else -ESRCH
        version = self.domain.gnttab.get_version()
        call.write(uop, abi.GNTTAB_GET_VERSION, request._replace(version=version & _U32))
        return 0

    def _gnttab_get_status_frames(self, call: _Call, uop: int) -> int:
        """Where the guest mapped its v2 status frames. Xen answers through
        the status field: GNTST_general_error for more frames than the
        table has (any under version 1), GNTST_bad_virt_addr for a list it
        cannot write (an HVM guest's handle is not checked beforehand)."""
        request = call.read(uop, abi.GNTTAB_GET_STATUS_FRAMES, for_update=True)
        dom = self._domid(request.dom)
        if dom != self.domain.domid:
            status = abi.GNTST_permission_denied if dom == 0 else abi.GNTST_bad_domain
        elif request.nr_frames > self.domain.gnttab.nr_status_frames():
            status = abi.GNTST_general_error  # so the loop below is bounded by the table's size
        else:
            status = abi.GNTST_okay
            for index, gfn in enumerate(self.domain.grant_status_gfns(request.nr_frames)):
                try:
                    call.access.write(request.frame_list + 8 * index, struct.pack("<Q", gfn))
                except GuestFault:
                    status = abi.GNTST_bad_virt_addr
        call.write(uop, abi.GNTTAB_GET_STATUS_FRAMES, request._replace(status=status))
        return 0

    def _gnttab_setup_table(self, call: _Call, uop: int) -> int:
        """Grow the table to nr_frames and tell where each shared frame is
        in the guest's physical map, as Xen's gnttab_setup_table for a
        translated guest: answered through the status field.

        - Another domain: Xen's rcu_lock_domain_by_any_id finds none
          (GNTST_bad_domain) but domain 0, which XSM refuses to a guest
          (GNTST_permission_denied).
        - More frames than max-grant-frames (or, for a 32-bit guest, than
          Xen's compat translation area holds): GNTST_general_error, before
          anything grows or is written.
        - Frame i's GFN, or INVALID_GFN (all ones in the guest's xen_pfn_t)
          where the guest has not mapped it. Xen 4.18 and later refuse a
          GFN a 32-bit guest's xen_pfn_t cannot hold (GNTST_address_too_big,
          stopping there) rather than truncate it.
        - A list it cannot write: GNTST_bad_virt_addr, stopping there (an
          HVM guest's handle is not checked beforehand, so not -EFAULT).
        - The structure unreadable, or its status unwritable: -EFAULT (the
          table may have grown meanwhile, as on Xen)."""
        request = call.read(uop, abi.GNTTAB_SETUP_TABLE)
        dom = self._domid(request.dom)
        gnttab = self.domain.gnttab
        limit = gnttab.query_size()[1]
        if call.compat:
            limit = min(limit, abi.COMPAT_SETUP_TABLE_MAX_FRAMES)
        if dom != self.domain.domid:
            status = abi.GNTST_permission_denied if dom == 0 else abi.GNTST_bad_domain
        elif request.nr_frames > limit:
            status = abi.GNTST_general_error  # also bounds the list below
        else:
            gnttab.grow(request.nr_frames)
            status = self._write_frame_list(call, request.frame_list,
                                            self.domain.grant_frame_gfns(request.nr_frames))
        if call.compat:
            # Xen's compat wrapper copies back the whole structure it read
            # (the status changed): all of it must be writable.
            call.access.check(uop, abi.GNTTAB_SETUP_TABLE.size(True), write=True)
        call.access.write(uop + abi.GNTTAB_SETUP_TABLE_STATUS_OFFSET, struct.pack("<h", status))
        return 0

    @staticmethod
    def _write_frame_list(call: _Call, frame_list: int, gfns: list[int]) -> int:
        """Write `gfns` as the guest's xen_pfn_t array: its GNTST_* status."""
        item = abi.XEN_ULONG_SIZE[call.compat]
        all_ones = (1 << 8 * item) - 1
        data = bytearray()
        status = abi.GNTST_okay
        for gfn in gfns:
            if gfn == abi.INVALID_GPA:  # INVALID_GFN: all ones too
                gfn = all_ones
            elif gfn > all_ones:
                status = abi.GNTST_address_too_big
                break
            data += gfn.to_bytes(item, "little")
        try:
            call.access.write(frame_list, data)  # all or nothing
        except GuestFault:
            # Xen writes one frame at a time and stops at the first it cannot.
            for index in range(len(data) // item):
                try:
                    call.access.write(frame_list + index * item, data[index * item:(index + 1) * item])
                except GuestFault:
                    return abi.GNTST_bad_virt_addr
        return status

    def _gnttab_query_size(self, call: _Call, uop: int) -> int:
        request = call.read(uop, abi.GNTTAB_QUERY_SIZE, for_update=True)
        dom = self._domid(request.dom)
        if dom == self.domain.domid:
            nr_frames, max_frames = self.domain.gnttab.query_size()
            reply = request._replace(nr_frames=nr_frames & _U32, max_nr_frames=max_frames & _U32, status=abi.GNTST_okay)
        else:  # Xen answers through the status field, not the return value
            status = abi.GNTST_permission_denied if dom == 0 else abi.GNTST_bad_domain
            reply = request._replace(status=status)
        call.write(uop, abi.GNTTAB_QUERY_SIZE, reply)
        return 0

    # --- memory_op (unsigned long cmd, void *arg) ---------------------------------------

    def _memory_op(self, call: _Call) -> int:
        cmd, arg = call.args[0], call.args[1]
        op, start_extent = cmd & abi.MEMOP_CMD_MASK, cmd >> abi.MEMOP_EXTENT_SHIFT
        if op in (abi.XENMEM_add_to_physmap, abi.XENMEM_add_to_physmap_batch):
            # Xen's continuation index: meaningless here, but bounded as in Xen.
            if start_extent > 0xFFFF:
                return -EDOM
            if op == abi.XENMEM_add_to_physmap:
                return self._add_to_physmap(call, arg)
            return self._add_to_physmap_batch(call, arg)
        if op == abi.XENMEM_remove_from_physmap:
            return self._remove_from_physmap(call, arg)
        if op == abi.XENMEM_increase_reservation:
            # Pages held outside the guest's map (all an HVM guest gets from
            # it): the domain never grows past its RAM, so none, as Xen
            # answers a domain at its limit, whatever the request says.
            return start_extent
        if op == abi.XENMEM_decrease_reservation:
            return self._reservation(call, arg, start_extent, self.domain.decrease_reservation, aligned=False)
        if op == abi.XENMEM_populate_physmap:
            return self._reservation(call, arg, start_extent, self.domain.populate_physmap, aligned=True)
        return self._unknown(abi.HYPERCALL_memory_op, op)

    def _reservation(self, call: _Call, arg: int, start_extent: int, op: Callable[[list[int], int], int],
                     aligned: bool) -> int:
        """decrease_reservation and populate_physmap: the number of extents
        done, counting from Xen's continuation index and stopping at the
        first that cannot be done or whose frame number cannot be read, as
        Xen. Whatever Xen refuses before looking at the extents (the
        request unreadable, another domain, more extents than its
        continuation can count, too large an order, an address width
        below a page, populate-on-demand for oneself) is answered the way
        Xen answers it: with the continuation index, nothing done. The
        frame numbers go to the domain a batch at a time, so that it can
        change the guest's map once per batch (Linux hands in 512 at once)."""
        request = self._reservation_request(call, arg, start_extent, populate=aligned)
        if request is None:
            return start_extent
        item = abi.XEN_ULONG_SIZE[call.compat]
        per_extent = 1 << request.extent_order
        done = start_extent
        while done < request.nr_extents:
            if done > start_extent and self.domain.preempt(call.vcpu):
                break  # the VM is stopping
            wanted = min(RESERVATION_BATCH, request.nr_extents - done)
            batch = _read_frames(call.access, request.extent_start, done, wanted, item)
            valid = len(batch)
            for index, gpfn in enumerate(batch):
                if gpfn >= MAX_GPFN or (aligned and gpfn % per_extent):
                    valid = index
                    break
            finished = op(batch[:valid], request.extent_order) if valid else 0
            done += finished
            if finished < wanted:
                break  # a frame it could not read or take
        return done

    def _reservation_request(self, call: _Call, arg: int, start_extent: int, populate: bool):
        """A xen_memory_reservation with extents left to do, or None where
        Xen returns the continuation index without looking at the extents."""
        try:
            request = call.read(arg, abi.MEMORY_RESERVATION)
        except GuestFault:
            return None
        if (request.nr_extents > MEMOP_MAX_EXTENTS or start_extent >= request.nr_extents
                or self._domid(request.domid) != self.domain.domid
                or request.extent_order > abi.MAX_GUEST_EXTENT_ORDER
                or 0 < request.mem_flags & abi.XENMEMF_ADDRESS_BITS_MASK <= abi.PAGE_SHIFT
                or (populate and request.mem_flags & abi.XENMEMF_populate_on_demand)):
            return None
        return request

    def _remove_from_physmap(self, call: _Call, arg: int) -> int:
        request = call.read(arg, abi.REMOVE_FROM_PHYSMAP)
        self._check_own_domain(request.domid)
        if request.gpfn >= MAX_GPFN:
            return -EINVAL
        self.domain.remove_from_physmap(request.gpfn)
        return 0

    def _add_to_physmap(self, call: _Call, arg: int) -> int:
        request = call.read(arg, abi.ADD_TO_PHYSMAP)
        if request.space == abi.XENMAPSPACE_gmfn_foreign:
            return -ENOSYS  # only through the batch, as in Xen
        self._check_own_domain(request.domid)
        self._map_one(request.space, request.idx, request.gpfn)
        return 0

    def _add_to_physmap_batch(self, call: _Call, arg: int) -> int:
        request = call.read(arg, abi.ADD_TO_PHYSMAP_BATCH)
        if request.space == abi.XENMAPSPACE_gmfn_range:
            return -EOPNOTSUPP
        self._check_own_domain(request.domid)
        if request.space == abi.XENMAPSPACE_gmfn_foreign:
            return -ENOSYS
        if request.res0:
            return -EINVAL
        size = request.size  # at most 65535: the arrays are bounded
        item = abi.XEN_ULONG_SIZE[call.compat]
        idxs = call.access.read_array(request.idxs, size, item)
        gpfns = call.access.read_array(request.gpfns, size, item)
        call.access.check(request.errs, 4 * size, write=True)  # before any mapping changes
        errs = []
        for idx, gpfn in zip(idxs, gpfns):
            try:
                self._map_one(request.space, idx, gpfn)
                errs.append(0)
            except XenError as error:
                errs.append(-error.errno)
        call.access.write(request.errs, struct.pack(f"<{size}i", *errs))
        return 0

    def _map_one(self, space: int, idx: int, gpfn: int) -> None:
        """One page of add_to_physmap; raises XenError."""
        if gpfn >= MAX_GPFN:
            raise XenError(EINVAL)
        if space == abi.XENMAPSPACE_shared_info:
            if idx != 0:
                raise XenError(EINVAL)
            self.domain.map_shared_info(gpfn)
        elif space == abi.XENMAPSPACE_grant_table:
            if idx > _U32:
                raise XenError(EINVAL)
            # Status frames exist only with grant table v2.
            if idx & abi.XENMAPIDX_grant_table_status and self.domain.gnttab.get_version() != 2:
                raise XenError(EINVAL)
            self.domain.map_grant_frame(idx, gpfn)
        else:
            raise XenError(EINVAL)  # no RAM remapping, no foreign or MMIO mappings

    # --- physdev_op (int cmd, void *arg) --------------------------------------------

    def _physdev_op(self, call: _Call) -> int:
        # No physical IRQs: XENFEAT_hvm_pirqs is not advertised.
        return self._unknown(abi.HYPERCALL_physdev_op, call.args[0] & _U32)
