"""Event channels: Xen's 2-level ABI for one guest, with the VMM as domain 0;
the FIFO ABI (evtchn_fifo.py) when offered and the guest asks for it.

The guest (domain `domid`, 1 by default) owns ports 1 .. max_ports-1
(4096 ports for a 64-bit guest, 1024 in compat mode; the mode is asked for
at every operation because the guest may switch it). Port 0 is reserved, as
in Xen: never allocated, "closed" to EVTCHNOP_status. Every port below the
limit is valid; a free one behaves as Xen's ECS_FREE.

The VMM plays domain 0 for backends, xenstore and the console. Its ports
exist only as BackendChannel objects (its end of an interdomain channel);
its "port numbers" are used for status and for the guest re-binding to them.

Delivering port p to its vCPU v follows Xen's evtchn_2l_set_pending: set
p in evtchn_pending (already set: done); if p is masked, done; set bit
p // bits_per_word in v's evtchn_pending_sel (already set: done); set v's
evtchn_upcall_pending and, if it was 0, call upcall(v). Every bit is changed
with an atomic instruction because the guest changes the same words
concurrently. While the guest has not mapped shared_info nothing can be
delivered and events are dropped, as with KVM before SHARED_INFO is set;
the same for a vCPU with no vcpu_info (>= 32 and not registered).

With `kernel` (KVM's Xen support) the kernel does the delivery
(KVM_XEN_HVM_EVTCHN_SEND), the guest's IPIs never leave the kernel, and a
backend channel's guest port is routed to an eventfd so that the guest's
EVTCHNOP_send signals the backend without an exit. Unmasking stays here:
KVM does not handle EVTCHNOP_unmask. A kernel call that fails is logged and
the userspace path is used instead, as it is for a vCPU the kernel object
says it does not deliver to (`delivers_to`: vCPU 0 under a GSI callback,
whose line only userspace raises).

Threads: guest operations come from vCPU threads, BackendChannel calls
from the event thread. One lock protects the port tables. The rule: under
the lock we only touch the tables, shared memory (atomics), the kernel
(ioctls that never call back) and the injected getters (long_mode,
shared_info_address, vcpu_info_address must be plain reads). Everything
that may run other code - upcall, schedule, add_reader/remove_reader,
on_pending - is queued and run after the lock is released. on_notify
itself always runs on the event thread (through schedule, or as the
eventfd's reader).

FIFO: once the guest's first EVTCHNOP_init_control succeeds, every port is
raised through FifoQueues (evtchn_fifo.py), under the same lock, until
EVTCHNOP_reset takes the guest back to 2-level. KVM's in-kernel delivery
knows only 2-level, so then nothing is raised by the kernel: IPI ports are
taken back from KVM (their sends exit to us) and KVM_XEN_HVM_EVTCHN_SEND is
not used; `on_abi_change(fifo)`, run after the lock, tells the domain, which
takes the timers back too. A guest's sends to a backend keep going to the
backend's eventfd in the kernel: that path does not touch the guest's bits.

A guest's sends to a backend that reach userspace are merged: while one
notification is scheduled and has not started, more sends add nothing
(the eventfd merges the kernel path's the same way). The flag is cleared,
under the lock, just before on_notify runs, so a send made while on_notify
runs schedules another and none is lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from functools import partial
from threading import Lock
from typing import Callable, Iterable, Iterator, Protocol

from pyvmm.core.eventloop import drain_eventfd
from pyvmm.core.faults import NULL_FAULTS, FaultInjector
from pyvmm.core.trace import NULL_TRACE, Tracer
from pyvmm.core import atomic
from ..errors import EEXIST, EINVAL, ENOENT, ENOSPC, ENOSYS, EOPNOTSUPP, EPERM, ESRCH, XenError
from .shared_info import SharedInfoLayout, layout
from .evtchn_fifo import EVTCHN_FIFO_LINK_BITS, EVTCHN_FIFO_NR_CHANNELS, FifoQueues
from ..abi import (
    DOMID_FIRST_RESERVED,
    DOMID_SELF,
    XEN_LEGACY_MAX_VCPUS,
    EVTCHNSTAT_closed,
    EVTCHNSTAT_unbound,
    EVTCHNSTAT_interdomain,
    EVTCHNSTAT_pirq,
    EVTCHNSTAT_virq,
    EVTCHNSTAT_ipi,
    VIRQ_TIMER,
    VIRQ_DEBUG,
    VIRQ_CONSOLE,
    VIRQ_DOM_EXC,
    VIRQ_TBUF,
    VIRQ_DEBUGGER,
    VIRQ_XENOPROF,
    VIRQ_CON_RING,
    VIRQ_PCPU_STATE,
    VIRQ_MEM_EVENT,
    VIRQ_ARGO,
    VIRQ_ENOMEM,
    VIRQ_XENPMU,
    VIRQ_ARCH_0,
    NR_VIRQS,
)
from pyvmm.core.ratelimit import DEFAULT_LOG_RATE, LogRate
from pyvmm.core.snapshot import SnapshotError, check_version, versioned

log = logging.getLogger(__name__)

DOM0 = 0

# Bound once per vCPU and never moved; every other VIRQ is global (x86 has
# no per-vCPU arch VIRQs): bound on vCPU 0 once, movable with bind_vcpu.
PER_VCPU_VIRQS = frozenset({VIRQ_TIMER, VIRQ_DEBUG, VIRQ_XENOPROF, VIRQ_XENPMU})

STATE_VERSION = 2  # 2: the FIFO queues
_STATE_OF_NAME = {"unbound": EVTCHNSTAT_unbound, "interdomain": EVTCHNSTAT_interdomain,
                  "virq": EVTCHNSTAT_virq, "ipi": EVTCHNSTAT_ipi}


class KernelEvtchn(Protocol):
    """KVM's in-kernel event channel paths (implemented over the VM fd).
    Methods raise OSError when the kernel refuses."""

    def delivers_to(self, vcpu: int) -> bool:
        """Whether send() may be used for `vcpu`'s ports; False sends them
        through the userspace path, which calls upcall() itself."""

    def send(self, port: int, vcpu: int) -> None:
        """KVM_XEN_HVM_EVTCHN_SEND: deliver `port` to `vcpu`."""

    def assign_eventfd(self, port: int, fd: int) -> None:
        """The guest's EVTCHNOP_send on `port` signals eventfd `fd`."""

    def assign_ipi(self, port: int, vcpu: int) -> None:
        """The guest's EVTCHNOP_send on `port` delivers it to `vcpu`."""

    def deassign(self, port: int) -> None: ...

    def reset(self) -> None:
        """Forget every port."""


@dataclass(frozen=True)
class EvtchnStatus:
    """EVTCHNOP_status's answer. Which of the union fields means something
    depends on `status`: unbound -> remote_dom (who may bind);
    interdomain -> remote_dom, remote_port; virq -> virq; pirq -> pirq."""

    status: int
    vcpu: int = 0
    remote_dom: int = 0
    remote_port: int = 0
    virq: int = 0
    pirq: int = 0


@dataclass
class _Port:
    state: int  # EVTCHNSTAT_unbound / interdomain / virq / ipi
    vcpu: int = 0  # where it is delivered (Xen's notify_vcpu_id)
    remote_dom: int = 0  # unbound, interdomain: DOM0 or our domid (loopback)
    remote_port: int = 0  # interdomain: dom0 port or our own port
    virq: int = 0
    in_kernel: bool = False  # registered with KVM: deassign on close


class BackendChannel:
    """Domain 0's end of an interdomain channel with the guest."""

    def __init__(self, owner: EventChannels, dom0_port: int, on_notify: Callable[[], None], eventfd: int | None,
                 loop_reads_eventfd: bool = True):
        self._owner = owner
        self._trace, self._faults = owner._trace, owner._faults  # the domain's
        self.dom0_port = dom0_port
        self.on_notify = on_notify
        self._guest_port: int | None = None
        self._eventfd = eventfd
        self._loop_reads_eventfd = loop_reads_eventfd
        self._closed = False
        self._notify_scheduled = False  # a send's notification is queued, not yet started (owner's lock)

    @property
    def eventfd(self) -> int | None:
        """The eventfd KVM signals when the guest sends on its end (None
        without in-kernel delivery). Bound with own_eventfd=True, the owner
        waits on it (and drains it) itself; close() closes it."""
        return self._eventfd

    @property
    def guest_port(self) -> int | None:
        """The guest's end, or None while the guest has closed it (then this
        end is unbound and the guest may bind to dom0_port again)."""
        return self._guest_port

    @property
    def connected(self) -> bool:
        return self._guest_port is not None

    def notify(self) -> None:
        """Raise the event in the guest; dropped while not connected, as
        Xen drops sends on an unbound port."""
        if self._trace.evtchn or self._faults.evtchn:
            self._traced_notify()
            return
        self._owner._notify_guest(self)

    def _traced_notify(self) -> None:
        fault = self._faults.evtchn_notification("to-guest", self._guest_port) if self._faults.evtchn else None
        if self._trace.evtchn:
            self._trace.emit("evtchn", "notify", port=self._guest_port, dom0_port=self.dom0_port,
                       kernel=self._owner._kernel is not None, fault=fault.spec if fault else None)
        if fault is None:
            self._owner._notify_guest(self)
        elif fault.action == "delay":
            self._faults.call_later(fault.delay, lambda: self._owner._notify_guest(self) if not self._closed else None)

    def _scheduled_notify(self) -> None:
        """A guest send's notification, on the event thread."""
        with self._owner._lock:
            self._notify_scheduled = False  # before on_notify: a send from now on is served again
        if self._trace.evtchn or self._faults.evtchn:
            self._from_guest(kernel=False)
        else:
            self.on_notify()

    def _from_guest(self, kernel: bool) -> None:
        """The guest sent on its end: run the backend (unless a fault says otherwise)."""
        if self.guest_sent(kernel):
            self.on_notify()

    def guest_sent(self, kernel: bool = True) -> bool:
        """Trace a notification from the guest and apply the event-channel
        faults to it: True means serve it now. (An owner of the eventfd,
        see own_eventfd, calls this for what it drained.) A delayed one is
        handed to on_notify later; a dropped one is gone."""
        if not (self._trace.evtchn or self._faults.evtchn):
            return True
        fault = self._faults.evtchn_notification("from-guest", self._guest_port) if self._faults.evtchn else None
        if self._trace.evtchn:
            self._trace.emit("evtchn", "guest-send", port=self._guest_port, dom0_port=self.dom0_port, kernel=kernel,
                       fault=fault.spec if fault else None)
        if fault is None:
            return True
        if fault.action == "delay":
            self._faults.call_later(fault.delay, lambda: self.on_notify() if not self._closed else None)
        return False

    def close(self) -> None:
        """Close our end: the guest's port becomes unbound (remote domain 0)."""
        self._owner._close_backend(self)

    def _eventfd_ready(self) -> None:
        fd = self._eventfd
        if fd is None:
            return  # closed while the loop was dispatching
        if not drain_eventfd(fd):
            return  # spurious wake-up
        if self._trace.evtchn or self._faults.evtchn:
            self._from_guest(kernel=True)
            return
        self.on_notify()


class EventChannels:
    def __init__(
        self,
        *,
        domid: int = 1,
        vcpu_count: int,
        long_mode: Callable[[], bool],
        shared_info_address: Callable[[], int | None],
        vcpu_info_address: Callable[[int], int | None],
        upcall: Callable[[int], None],
        kernel: KernelEvtchn | None = None,
        schedule: Callable[[Callable[[], None]], None],
        add_reader: Callable[[int, Callable[[], None]], None],
        remove_reader: Callable[[int], None],
        on_pending: Callable[[int], None] | None = None,
        wake_poller: Callable[[int], None] | None = None,
        on_virq_closed: Callable[[int, int, int], None] | None = None,
        max_port: int | None = None,
        fifo: bool = False,
        page_address: Callable[[int], int | None] | None = None,
        on_abi_change: Callable[[bool], None] | None = None,
        log_rate: LogRate = DEFAULT_LOG_RATE,
        trace: Tracer = NULL_TRACE,
        faults: FaultInjector = NULL_FAULTS,
    ):
        """`on_pending(port)`, if given, is called when userspace delivery
        made a port pending, masked or not: wake vCPUs in SCHEDOP_poll.
        `wake_poller(vcpu)`, if given, ends a SCHEDOP_poll KVM runs for
        `vcpu` (a kick: a spurious wake-up, the guest checks again) after a
        send through KVM that KVM would not wake it for (_send_in_kernel).
        `on_virq_closed(virq, vcpu, port)`, if given, is called when the
        guest closes a VIRQ's port (a CPU going offline closes its timer's).
        `max_port`: the highest port the guest may allocate (Xen's
        max_evtchn_port, xl's max_event_channels); None: all the ABI has.
        `fifo`: offer the FIFO ABI; `page_address(gfn)` is then the host
        address of a RAM page the guest may hand over (None otherwise), and
        `on_abi_change(fifo)` is told when the guest switches ABI."""
        if not 0 < domid < DOMID_FIRST_RESERVED:
            raise ValueError(f"domid {domid} cannot be a guest's")
        if vcpu_count < 1:
            raise ValueError("a domain has at least one vCPU")
        self.domid = domid
        self.vcpu_count = vcpu_count
        self._long_mode = long_mode
        self._shared_info_address = shared_info_address
        self._vcpu_info_address = vcpu_info_address
        self._upcall = upcall
        self._kernel = kernel
        self._schedule = schedule
        self._add_reader = add_reader
        self._remove_reader = remove_reader
        self._on_pending = on_pending
        self._wake_poller = wake_poller
        self._on_virq_closed = on_virq_closed
        if max_port is not None and max_port < 1:
            raise ValueError(f"max_port {max_port} leaves the guest no port")
        self.max_port = max_port
        self._limited = log_rate.limited(log)  # lines whose rate the guest sets
        self._trace = trace  # the VM's (pyvmm/core/trace.py)
        self._faults = faults  # the VM's (pyvmm/core/faults.py)
        self._lock = Lock()
        self._ports: dict[int, _Port] = {}
        # Every port below this one is in use: the search for the lowest
        # free port starts here (a guest allocating thousands of ports would
        # otherwise cost quadratic time).
        self._lowest_free = 1
        self._virqs: dict[tuple[int, int], int] = {}  # (virq, vcpu) -> port; global VIRQs on vCPU 0
        self._backends: dict[int, BackendChannel] = {}  # by dom0 port
        # Between restore_state() and finish_restore(): the restored backend
        # channels no backend has claimed yet (claim_backend), by dom0 port.
        self._restoring = False
        self._unclaimed: set[int] = set()
        if fifo and page_address is None:
            raise ValueError("FIFO event channels need the guest's pages")
        self.fifo_offered = fifo
        self._page_address = page_address
        self._on_abi_change = on_abi_change
        self._fifo: FifoQueues | None = None  # the guest's FIFO queues, once it switched

    # --- guest operations (EVTCHNOP_*) ---------------------------------------------

    def alloc_unbound(self, dom: int, remote_dom: int) -> int:
        self._check_own_domain(dom)
        remote = self._peer(remote_dom)
        with self._transaction():
            port = self._free_port()
            self._ports[port] = _Port(EVTCHNSTAT_unbound, remote_dom=remote)
        if self._trace.evtchn:
            self._trace.emit("evtchn", "alloc_unbound", port=port, kernel=False, remote_dom=remote_dom)
        return port

    def bind_interdomain(self, remote_dom: int, remote_port: int) -> int:
        remote = self._peer(remote_dom)
        with self._transaction() as after:
            port = self._free_port()
            if remote == DOM0:
                channel = self._backends.get(remote_port)
                if channel is None or channel.connected:
                    raise XenError(EINVAL, f"dom0 port {remote_port} is not offered to us")
                self._ports[port] = _Port(EVTCHNSTAT_interdomain, remote_dom=DOM0, remote_port=remote_port)
                channel._guest_port = port
                self._route_to_eventfd(port, channel)
            else:
                other = self._ports.get(remote_port) if self._in_range(remote_port) else None
                if other is None or other.state != EVTCHNSTAT_unbound or other.remote_dom != self.domid:
                    raise XenError(EINVAL, f"port {remote_port} is not unbound for us")
                self._ports[port] = _Port(EVTCHNSTAT_interdomain, remote_dom=self.domid, remote_port=remote_port)
                other.state = EVTCHNSTAT_interdomain
                other.remote_port = port
            # Sends on the unbound end were dropped; like Xen, make up for
            # them with one event on the new port.
            self._deliver(port, after)
        if self._trace.evtchn:
            self._trace.emit("evtchn", "bind_interdomain", port=port, kernel=self._ports[port].in_kernel,
                       remote_dom=remote_dom, remote_port=remote_port)
        return port

    def bind_virq(self, virq: int, vcpu: int) -> int:
        if not 0 <= virq < NR_VIRQS:
            raise XenError(EINVAL, f"no VIRQ {virq}")
        if virq not in PER_VCPU_VIRQS and vcpu != 0:
            raise XenError(EINVAL, f"global VIRQ {virq} binds on vCPU 0 only")
        self._check_vcpu(vcpu)
        with self._transaction():
            if (virq, vcpu) in self._virqs:
                raise XenError(EEXIST, f"VIRQ {virq} already bound on vCPU {vcpu}")
            port = self._free_port()
            self._ports[port] = _Port(EVTCHNSTAT_virq, vcpu=vcpu, virq=virq)
            self._virqs[(virq, vcpu)] = port
        if self._trace.evtchn:
            self._trace.emit("evtchn", "bind_virq", port=port, kernel=self._ports[port].in_kernel, virq=virq,
                       target_vcpu=vcpu)
        return port

    def bind_ipi(self, vcpu: int) -> int:
        self._check_vcpu(vcpu)
        with self._transaction():
            port = self._free_port()
            record = self._ports[port] = _Port(EVTCHNSTAT_ipi, vcpu=vcpu)
            if self._kernel is not None and self._fifo is None:
                record.in_kernel = self._kernel_call(self._kernel.assign_ipi, port, vcpu)
        if self._trace.evtchn:
            self._trace.emit("evtchn", "bind_ipi", port=port, kernel=self._ports[port].in_kernel, target_vcpu=vcpu)
        return port

    def close(self, port: int) -> None:
        with self._transaction() as after:
            record = self._bound(port)
            self._close(port, record)
            self._note_virq_closed(port, record, after)
        if self._trace.evtchn:
            self._trace.emit("evtchn", "close", port=port)

    def send(self, port: int) -> None:
        if self._trace.evtchn:
            self._trace.emit("evtchn", "send", port=port)
        with self._transaction() as after:
            record = self._bound(port)
            if record.state == EVTCHNSTAT_ipi:
                self._deliver(port, after)
            elif record.state == EVTCHNSTAT_interdomain and record.remote_dom == DOM0:
                channel = self._backends[record.remote_port]
                if not channel._notify_scheduled:
                    channel._notify_scheduled = True
                    after.append(partial(self._schedule, channel._scheduled_notify))
            elif record.state == EVTCHNSTAT_interdomain:
                self._deliver(record.remote_port, after)
            elif record.state != EVTCHNSTAT_unbound:  # Xen silently drops sends on unbound ports
                raise XenError(EINVAL, f"cannot send on port {port}")

    def unmask(self, port: int) -> None:
        """Clear the mask bit; an event that arrived while masked is then
        signalled the way a fresh one would be (Xen's evtchn_2l_unmask)."""
        with self._transaction() as after:
            self._check_port(port)
            if self._fifo is not None:
                record = self._ports.get(port)
                self._fifo_raised(port, record.vcpu if record else 0,
                                  self._fifo.unmask(port, record.vcpu if record else 0), after)
                return
            mapped = self._mapped()
            if mapped is None:
                return
            shared_info, abi = mapped
            if not atomic.test_and_clear_bit(shared_info + abi.evtchn_mask, port):
                return
            if not self._test_bit(shared_info + abi.evtchn_pending, port):
                return
            record = self._ports.get(port)
            self._select(record.vcpu if record else 0, port, shared_info, abi, after)

    def status(self, dom: int, port: int) -> EvtchnStatus:
        self._check_own_domain(dom)
        with self._lock:
            self._check_port(port)
            record = self._ports.get(port)
            if record is None:
                return EvtchnStatus(EVTCHNSTAT_closed)
            if record.state == EVTCHNSTAT_unbound:
                return EvtchnStatus(record.state, record.vcpu, remote_dom=record.remote_dom)
            if record.state == EVTCHNSTAT_interdomain:
                return EvtchnStatus(record.state, record.vcpu, record.remote_dom, record.remote_port)
            if record.state == EVTCHNSTAT_virq:
                return EvtchnStatus(record.state, record.vcpu, virq=record.virq)
            return EvtchnStatus(record.state, record.vcpu)

    def bind_vcpu(self, port: int, vcpu: int) -> None:
        """Deliver `port` to another vCPU from now on. Xen refuses IPIs and
        per-vCPU VIRQs (they belong to their vCPU) and free ports."""
        self._check_vcpu(vcpu)
        with self._lock:
            record = self._bound(port)
            movable = record.state in (EVTCHNSTAT_unbound, EVTCHNSTAT_interdomain) or (
                record.state == EVTCHNSTAT_virq and record.virq not in PER_VCPU_VIRQS
            )
            if not movable:
                raise XenError(EINVAL, f"port {port} cannot change vCPU")
            record.vcpu = vcpu

    # --- the FIFO ABI (EVTCHNOP_init_control, expand_array, set_priority) ----------

    @property
    def fifo_active(self) -> bool:
        return self._fifo is not None

    def init_control(self, vcpu: int, gfn: int, offset: int) -> int:
        """EVTCHNOP_init_control: `vcpu`'s control block at `offset` in guest
        page `gfn`; the first one switches the guest to FIFO. Returns the
        link bits. -ENOSYS (after Xen's argument checks) when not offered."""
        FifoQueues.check_control(self.vcpu_count, vcpu, offset)
        if not self.fifo_offered:
            raise XenError(ENOSYS, "FIFO event channels are not offered (--xen-fifo)")
        with self._transaction() as after:
            fifo = self._fifo
            if fifo is not None:
                fifo.map_control_block(vcpu, gfn, offset)
                return EVTCHN_FIFO_LINK_BITS
            fifo = FifoQueues(self.vcpu_count, self._page_address)
            fifo.map_control_block(vcpu, gfn, offset)  # may refuse: still 2-level then
            self._switch_to_fifo(fifo, after)
        log.info("event channels: the guest switched to the FIFO ABI")
        if self._trace.evtchn:
            self._trace.emit("evtchn", "init_control", vcpu=vcpu, gfn=gfn, offset=offset)
        return EVTCHN_FIFO_LINK_BITS

    def _switch_to_fifo(self, fifo: FifoQueues, after: list) -> None:
        """Lock held. Ports pending under 2-level are raised again once the
        event array covers them (Xen's setup_ports); KVM gives back the ports
        it raised itself."""
        mapped = self._mapped()
        if mapped is not None:
            shared_info, abi = mapped
            fifo.carry_over(port for port in self._ports
                            if port < abi.max_ports and self._test_bit(shared_info + abi.evtchn_pending, port))
        if self._kernel is not None:
            for port, record in self._ports.items():
                if record.in_kernel and record.state == EVTCHNSTAT_ipi:
                    self._kernel_call(self._kernel.deassign, port)
                    record.in_kernel = False
        self._fifo = fifo
        if self._on_abi_change is not None:
            after.append(partial(self._on_abi_change, True))

    def expand_array(self, gfn: int) -> None:
        """EVTCHNOP_expand_array: one more page of the event array."""
        with self._transaction() as after:
            fifo = self._fifo
            if fifo is None:
                raise XenError(EOPNOTSUPP, "the guest has not switched to FIFO")
            for port in fifo.add_array_page(gfn):
                record = self._ports.get(port)
                if record is not None:
                    self._fifo_raised(port, record.vcpu, fifo.set_pending(port, record.vcpu), after)

    def set_priority(self, port: int, priority: int) -> None:
        """EVTCHNOP_set_priority: -ENOSYS under 2-level, which has none."""
        with self._lock:
            self._check_port(port)
            if self._fifo is None:
                raise XenError(ENOSYS, "2-level event channels have no priorities")
            self._fifo.set_priority(port, priority)

    def _fifo_raised(self, port: int, vcpu: int, outcome: tuple[bool, bool], after: list) -> None:
        """What a FIFO set_pending asked for (lock held)."""
        newly_pending, upcall = outcome
        if newly_pending and self._on_pending is not None:
            after.append(partial(self._on_pending, port))
        if upcall:
            self._mark_events_pending(vcpu, after)

    def _mark_events_pending(self, vcpu: int, after: list) -> None:
        """Xen's vcpu_mark_events_pending: upcall_pending, and the upcall when it was clear."""
        mapped = self._mapped()
        if mapped is None:
            return  # no vcpu_info yet: register_vcpu_info marks everything pending later
        vcpu_info = self._vcpu_info(vcpu, *mapped)
        if vcpu_info is not None and atomic.exchange(vcpu_info + mapped[1].upcall_pending, 1, 1) == 0:
            after.append(partial(self._upcall, vcpu))

    def reset(self, dom: int) -> None:
        """EVTCHNOP_reset: close every port (kexec, soft reset); a FIFO
        guest is back on 2-level."""
        self._check_own_domain(dom)
        with self._transaction() as after:
            if self._kernel is not None:
                for record in self._ports.values():
                    record.in_kernel = False
                self._kernel_call(self._kernel.reset)
            for port in sorted(self._ports):
                record = self._ports.get(port)
                if record is not None:  # a loopback peer's close may have changed it, not freed it
                    self._close(port, record)
                    self._note_virq_closed(port, record, after)
            if self._fifo is not None:  # back to 2-level, as Xen's evtchn_reset
                self._fifo = None
                self._lowest_free = 1
                if self._on_abi_change is not None:
                    after.append(partial(self._on_abi_change, False))

    def is_pending(self, port: int) -> bool:
        """For SCHEDOP_poll: EINVAL for a port beyond the ABI's limit."""
        self._check_port(port)
        fifo = self._fifo
        if fifo is not None:
            return fifo.is_pending(port)
        mapped = self._mapped()
        return mapped is not None and self._test_bit(mapped[0] + mapped[1].evtchn_pending, port)

    def any_pending(self, ports: Iterable[int]) -> bool:
        """Like Xen's poll: ports are checked in order up to the first pending one."""
        return any(self.is_pending(port) for port in ports)

    # --- the VMM's side (domain 0) ------------------------------------------------

    def connect_backend(self, on_notify: Callable[[], None]) -> BackendChannel:
        """A new guest port already connected to a new dom0 port (what the
        toolstack sets up for xenstore and the console)."""

        def new_port() -> int:
            port = self._free_port()
            self._ports[port] = _Port(EVTCHNSTAT_unbound, remote_dom=DOM0)
            return port

        return self._attach_backend(on_notify, new_port)

    def bind_backend(self, guest_port: int, on_notify: Callable[[], None], *,
                     own_eventfd: bool = False) -> BackendChannel:
        """Dom0 binds to the guest's unbound port offered to domain 0 (a
        frontend's published event-channel).

        `on_notify` runs on the event thread for every notification the VMM
        sees in userspace. With own_eventfd the event loop does not watch
        the in-kernel eventfd (channel.eventfd): a worker thread blocks on
        it instead, so a notification reaches the backend without a detour
        through the event thread."""

        def offered_port() -> int:
            record = self._ports.get(guest_port) if self._in_range(guest_port) else None
            if record is None or record.state != EVTCHNSTAT_unbound or record.remote_dom != DOM0:
                raise XenError(EINVAL, f"guest port {guest_port} is not offered to domain 0")
            return guest_port

        return self._attach_backend(on_notify, offered_port, loop_reads_eventfd=not own_eventfd)

    def send_virq(self, virq: int, vcpu: int = 0) -> None:
        """Raise a VIRQ if the guest bound it (timers, console); for global
        VIRQs `vcpu` is ignored: they go where the guest bound them."""
        with self._transaction() as after:
            port = self._virqs.get(self._virq_key(virq, vcpu))
            if port is not None:
                self._deliver(port, after)

    def virq_port(self, virq: int, vcpu: int = 0) -> int | None:
        with self._lock:
            return self._virqs.get(self._virq_key(virq, vcpu))

    _STATE_NAMES = {
        EVTCHNSTAT_unbound: "unbound",
        EVTCHNSTAT_interdomain: "interdomain",
        EVTCHNSTAT_virq: "virq",
        EVTCHNSTAT_ipi: "ipi",
    }

    def snapshot(self) -> list[dict]:
        """Every port in use, in port order, as plain JSON-ready records (for
        `evtchn-list` on the control socket); changes nothing. `pending` and
        `masked` are None while the guest has not mapped shared_info (or,
        under FIFO, while its event array does not cover the port)."""
        records = []
        with self._lock:
            mapped = self._mapped()
            for port in sorted(self._ports):
                record = self._ports[port]
                entry = {
                    "port": port,
                    "state": self._STATE_NAMES.get(record.state, str(record.state)),
                    "vcpu": record.vcpu,
                    "in_kernel": record.in_kernel,
                    "pending": None,
                    "masked": None,
                }
                if record.state in (EVTCHNSTAT_unbound, EVTCHNSTAT_interdomain):
                    entry["remote_dom"] = record.remote_dom
                if record.state == EVTCHNSTAT_interdomain:
                    entry["remote_port"] = record.remote_port
                    entry["backend"] = record.remote_dom == DOM0
                if record.state == EVTCHNSTAT_virq:
                    entry["virq"] = record.virq
                if self._fifo is not None:
                    entry["priority"] = self._fifo.priority(port)
                    if port < self._fifo.nr_ports:
                        entry["pending"] = self._fifo.is_pending(port)
                        entry["masked"] = self._fifo.is_masked(port)
                elif mapped is not None and port < mapped[1].max_ports:
                    shared_info, abi = mapped
                    entry["pending"] = self._test_bit(shared_info + abi.evtchn_pending, port)
                    entry["masked"] = self._test_bit(shared_info + abi.evtchn_mask, port)
                records.append(entry)
        return records

    # --- snapshot (pyvmm/core/snapshot.py) --------------------------------------------

    def save_state(self) -> dict:
        """Every port in use and the dom0 ends of the backend channels.

        Pending and mask bits live in shared_info (guest RAM) and are not
        here; nor is which ports KVM delivers itself: finish_restore()
        registers them again, as the restored VM's kernel support allows."""
        with self._lock:
            ports = []
            for port in sorted(self._ports):
                record = self._ports[port]
                entry = {"port": port, "state": self._STATE_NAMES[record.state], "vcpu": record.vcpu}
                if record.state in (EVTCHNSTAT_unbound, EVTCHNSTAT_interdomain):
                    entry["remote_dom"] = record.remote_dom
                if record.state == EVTCHNSTAT_interdomain:
                    entry["remote_port"] = record.remote_port
                if record.state == EVTCHNSTAT_virq:
                    entry["virq"] = record.virq
                ports.append(entry)
            backends = [{"dom0_port": dom0_port, "guest_port": channel._guest_port}
                        for dom0_port, channel in sorted(self._backends.items())]
            fifo = self._fifo.save_state() if self._fifo is not None else None
        return versioned(STATE_VERSION, ports=ports, backends=backends, fifo=fifo)

    def restore_state(self, state: dict) -> None:
        """Take back the port table (before any vCPU runs; no kernel call yet).

        The backend channels this part was built with (the xenstore's and the
        console's, made by connect_backend) keep their objects and take back
        their guest ports. Every other saved backend channel waits for its
        backend to claim_backend() it; finish_restore() then registers the
        in-kernel ports and checks that none was left unclaimed."""
        check_version(state, "EventChannels", STATE_VERSION)
        fifo = None
        if state.get("fifo") is not None:
            if not self.fifo_offered:
                raise SnapshotError("EventChannels: the guest uses FIFO event channels, which this VM does not "
                                    "offer (--xen-fifo)")
            try:
                fifo = FifoQueues.restored(state["fifo"], self.vcpu_count, self._page_address)
            except XenError as error:
                raise SnapshotError(f"EventChannels: {error}") from None
        ports, virqs, backends = self._checked_state(state, fifo is not None)
        with self._transaction():
            self._fifo = fifo
            built = set(self._backends)
            if not built <= set(backends):
                raise SnapshotError(f"EventChannels: backend channel(s) {sorted(built - set(backends))} "
                                    "of this VM are not in the snapshot")
            for record in ports.values():
                record.in_kernel = False
            self._ports, self._virqs = ports, virqs
            self._lowest_free = 1
            for dom0_port, guest_port in backends.items():
                channel = self._backends.get(dom0_port)
                if channel is None:
                    # A placeholder until its backend claims it: sends the guest
                    # makes before that are not possible (no vCPU runs yet).
                    channel = BackendChannel(self, dom0_port, lambda: None, None)
                    self._backends[dom0_port] = channel
                    self._unclaimed.add(dom0_port)
                channel._guest_port = guest_port
                channel._notify_scheduled = False
            self._restoring = True

    def claim_backend(self, dom0_port: int, on_notify: Callable[[], None], *,
                      own_eventfd: bool = False) -> BackendChannel:
        """A backend's restore_state() takes back its channel (the dom0 port
        it saved), as bind_backend() gave it the first time."""
        with self._lock:
            if not self._restoring or dom0_port not in self._unclaimed:
                raise SnapshotError(f"EventChannels: no restored backend channel at dom0 port {dom0_port!r} to claim")
            self._unclaimed.discard(dom0_port)
            channel = self._backends[dom0_port]
            channel.on_notify = on_notify
            channel._loop_reads_eventfd = not own_eventfd
        if self._kernel is not None:
            channel._eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            if channel._loop_reads_eventfd:
                self._add_reader(channel._eventfd, channel._eventfd_ready)
        return channel

    def finish_restore(self) -> None:
        """After every part's restore_state() and after the machine restored
        KVM's own Xen attributes: register with KVM the ports it delivers
        itself (IPIs, backend channels' eventfds), as binding them did, and
        wake every connected backend once (a notification that was queued
        when the VM was saved is not in the snapshot; a spare one is harmless)."""
        with self._transaction() as after:
            if not self._restoring:
                raise SnapshotError("EventChannels: finish_restore() without restore_state()")
            if self._unclaimed:
                raise SnapshotError(f"EventChannels: backend channel(s) at dom0 port(s) {sorted(self._unclaimed)} "
                                    "were not claimed by any backend (a device missing from this VM?)")
            self._restoring = False
            if self._kernel is not None:
                self._kernel_call(self._kernel.reset)  # what the freshly built part registered
                for port, record in sorted(self._ports.items()):
                    if record.state == EVTCHNSTAT_ipi and self._fifo is None:  # KVM raises 2-level only
                        record.in_kernel = self._kernel_call(self._kernel.assign_ipi, port, record.vcpu)
            for channel in self._backends.values():
                if channel._guest_port is not None:
                    self._route_to_eventfd(channel._guest_port, channel)
                    after.append(partial(self._schedule, channel.on_notify))

    def _checked_state(self, state: dict, fifo: bool) -> tuple[dict[int, _Port], dict[tuple[int, int], int],
                                                                dict[int, int | None]]:
        """The port table, VIRQ index and backends of a saved state, every
        field checked; SnapshotError for anything a running table could not hold."""
        def fail(why: str):
            raise SnapshotError(f"EventChannels: {why}")

        def number(entry: dict, key: str, low: int, high: int) -> int:
            value = entry.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value < high:
                fail(f"{key} {value!r} of {entry!r:.120} is not in {low}..{high - 1}")
            return value

        # The wider ABI: a compat guest's table is a subset, a FIFO guest's the largest.
        end = EVTCHN_FIFO_NR_CHANNELS if fifo else layout(True).max_ports
        if self.max_port is not None:
            end = min(end, self.max_port + 1)
        raw_ports, raw_backends = state.get("ports"), state.get("backends")
        if not isinstance(raw_ports, list) or not isinstance(raw_backends, list):
            fail("no port or backend list")
        backends: dict[int, int | None] = {}
        for entry in raw_backends:
            if not isinstance(entry, dict):
                fail(f"backend {entry!r:.80} is not a record")
            dom0_port = number(entry, "dom0_port", 1, 1 << 31)
            guest_port = None if entry.get("guest_port") is None else number(entry, "guest_port", 1, end)
            if dom0_port in backends:
                fail(f"dom0 port {dom0_port} twice")
            backends[dom0_port] = guest_port
        ports: dict[int, _Port] = {}
        virqs: dict[tuple[int, int], int] = {}
        for entry in raw_ports:
            if not isinstance(entry, dict):
                fail(f"port {entry!r:.80} is not a record")
            port = number(entry, "port", 1, end)
            kind = _STATE_OF_NAME.get(entry.get("state"))
            if kind is None:
                fail(f"port {port}: no state {entry.get('state')!r:.40}")
            if port in ports:
                fail(f"port {port} twice")
            record = _Port(kind, vcpu=number(entry, "vcpu", 0, self.vcpu_count))
            if kind in (EVTCHNSTAT_unbound, EVTCHNSTAT_interdomain):
                record.remote_dom = entry.get("remote_dom")
                if record.remote_dom not in (DOM0, self.domid) or isinstance(record.remote_dom, bool):
                    fail(f"port {port}: remote domain {record.remote_dom!r:.40}")
            if kind == EVTCHNSTAT_interdomain:
                record.remote_port = number(entry, "remote_port", 1, 1 << 31)
            if kind == EVTCHNSTAT_virq:
                record.virq = number(entry, "virq", 0, NR_VIRQS)
                key = self._virq_key(record.virq, record.vcpu)
                if key in virqs:
                    fail(f"VIRQ {record.virq} bound twice")
                virqs[key] = port
            ports[port] = record
        # Both ends of every channel must agree.
        for port, record in ports.items():
            if record.state != EVTCHNSTAT_interdomain:
                continue
            if record.remote_dom == DOM0:
                if backends.get(record.remote_port, -1) != port:
                    fail(f"port {port}: dom0 port {record.remote_port} does not name it")
            else:
                peer = ports.get(record.remote_port)
                if (peer is None or peer.state != EVTCHNSTAT_interdomain or peer.remote_dom != self.domid
                        or peer.remote_port != port or record.remote_port == port):
                    fail(f"port {port}: its loopback peer {record.remote_port} does not name it")
        for dom0_port, guest_port in backends.items():
            record = ports.get(guest_port) if guest_port is not None else None
            if guest_port is not None and (record is None or record.state != EVTCHNSTAT_interdomain
                                           or record.remote_dom != DOM0 or record.remote_port != dom0_port):
                fail(f"dom0 port {dom0_port}: guest port {guest_port} is not its other end")
        return ports, virqs, backends

    # --- internals -------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[list[Callable[[], None]]]:
        """Hold the lock; run the queued outside calls once it is released."""
        after: list[Callable[[], None]] = []
        with self._lock:
            yield after
        for call in after:
            try:
                call()
            except Exception:  # a VMM bug: never the guest's failure
                log.exception("event channel callback %r failed", call)

    def _abi(self) -> SharedInfoLayout:
        return layout(self._long_mode())

    def _max_ports(self) -> int:
        return EVTCHN_FIFO_NR_CHANNELS if self._fifo is not None else self._abi().max_ports

    def _in_range(self, port: int) -> bool:
        return 0 <= port < self._max_ports()

    def _check_port(self, port: int) -> None:
        if not self._in_range(port):
            raise XenError(EINVAL, f"port {port} out of range")

    def _bound(self, port: int) -> _Port:
        self._check_port(port)
        record = self._ports.get(port)
        if record is None:
            raise XenError(EINVAL, f"port {port} is not in use")
        return record

    def _check_vcpu(self, vcpu: int) -> None:
        if not 0 <= vcpu < self.vcpu_count:
            raise XenError(ENOENT, f"no vCPU {vcpu}")

    def _check_own_domain(self, dom: int) -> None:
        """The guest may only name itself; domain 0 exists but is not its to
        touch (Xen's XSM answer), any other domain does not exist."""
        if dom not in (DOMID_SELF, self.domid):
            raise XenError(EPERM if dom == DOM0 else ESRCH, f"domain {dom}")

    def _peer(self, dom: int) -> int:
        """A remote end the guest may name: domain 0 or itself."""
        if dom == DOMID_SELF:
            return self.domid
        if dom not in (DOM0, self.domid):
            raise XenError(ESRCH, f"no domain {dom}")
        return dom

    def _free_port(self) -> int:
        end = self._max_ports()
        if self.max_port is not None:
            end = min(end, self.max_port + 1)
        for port in range(self._lowest_free, end):
            if port not in self._ports:
                self._lowest_free = port
                return port
        self._limited.warning("event channels: domain %d has no free port up to %d (limit max-event-channels): "
                              "answered -ENOSPC", self.domid, end - 1, key="max-event-channels")
        raise XenError(ENOSPC, "no free event channel")

    @staticmethod
    def _virq_key(virq: int, vcpu: int) -> tuple[int, int]:
        return (virq, vcpu if virq in PER_VCPU_VIRQS else 0)

    def _close(self, port: int, record: _Port) -> None:
        if record.state == EVTCHNSTAT_interdomain and record.remote_dom == DOM0:
            self._backends[record.remote_port]._guest_port = None  # dom0's end is now unbound
        elif record.state == EVTCHNSTAT_interdomain:
            peer = self._ports[record.remote_port]
            peer.state, peer.remote_port = EVTCHNSTAT_unbound, 0  # still offered to ourselves
        elif record.state == EVTCHNSTAT_virq:
            del self._virqs[self._virq_key(record.virq, record.vcpu)]
        if record.in_kernel:
            self._kernel_call(self._kernel.deassign, port)
        del self._ports[port]
        self._lowest_free = min(self._lowest_free, port)
        # Like Xen, so that the port's next user does not see a stale event.
        if self._fifo is not None:
            self._fifo.clear_pending(port)
            return
        mapped = self._mapped()
        if mapped is not None and port < mapped[1].max_ports:
            atomic.test_and_clear_bit(mapped[0] + mapped[1].evtchn_pending, port)

    def _note_virq_closed(self, port: int, record: _Port, after: list) -> None:
        if record.state == EVTCHNSTAT_virq and self._on_virq_closed is not None:
            after.append(partial(self._on_virq_closed, record.virq, record.vcpu, port))

    def _kernel_call(self, method, *args) -> bool:
        try:
            method(*args)
            return True
        except OSError as error:
            self._limited.warning("KVM refused %s%r: %s", method.__name__, args, error, key=method.__name__)
            return False

    def _mapped(self) -> tuple[int, SharedInfoLayout] | None:
        address = self._shared_info_address()
        return None if address is None else (address, self._abi())

    @staticmethod
    def _test_bit(bitmap: int, bit: int) -> bool:
        return bool(atomic.fetch_or(bitmap + bit // 8, 1, 0) & (1 << bit % 8))

    def _deliver(self, port: int, after: list, *, try_kernel: bool = True) -> None:
        """Raise guest port `port` on its vCPU (lock held); `try_kernel`
        False: KVM just refused, set the bits here."""
        record = self._ports[port]
        if not self._in_range(port):
            return  # left over from a wider ABI: unreachable until reset
        if self._fifo is not None:
            self._fifo_raised(port, record.vcpu, self._fifo.set_pending(port, record.vcpu), after)
            return
        if try_kernel and self._send_in_kernel(port):
            return
        mapped = self._mapped()
        if mapped is None:
            return  # no shared_info yet: the event is lost, as on KVM
        shared_info, abi = mapped
        if self._vcpu_info(record.vcpu, shared_info, abi) is None:
            return  # no vcpu_info: a pending bit nobody would ever select
        if atomic.test_and_set_bit(shared_info + abi.evtchn_pending, port):
            return
        if self._on_pending is not None:
            after.append(partial(self._on_pending, port))
        if self._test_bit(shared_info + abi.evtchn_mask, port):
            return
        self._select(record.vcpu, port, shared_info, abi, after)

    def _select(self, vcpu: int, port: int, shared_info: int, abi: SharedInfoLayout, after: list) -> None:
        """Point vCPU `vcpu` at `port`'s word and raise its upcall."""
        vcpu_info = self._vcpu_info(vcpu, shared_info, abi)
        if vcpu_info is None:
            return
        if atomic.test_and_set_bit(vcpu_info + abi.pending_sel, port // abi.bits_per_word):
            return  # the guest has yet to scan that word: it will see the port
        if atomic.exchange(vcpu_info + abi.upcall_pending, 1, 1) == 0:
            after.append(partial(self._upcall, vcpu))

    def _vcpu_info(self, vcpu: int, shared_info: int, abi: SharedInfoLayout) -> int | None:
        address = self._vcpu_info_address(vcpu)
        if address is None and vcpu < XEN_LEGACY_MAX_VCPUS:
            address = shared_info + abi.legacy_vcpu_info(vcpu)  # until VCPUOP_register_vcpu_info
        return address

    # --- backend channel plumbing -----------------------------------------------------

    def _attach_backend(self, on_notify: Callable[[], None], pick_port: Callable[[], int], *,
                        loop_reads_eventfd: bool = True) -> BackendChannel:
        # The eventfd comes first: the one step the host can fail, before
        # any table changes.
        eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if self._kernel is not None else None
        channel = BackendChannel(self, 0, on_notify, eventfd, loop_reads_eventfd)
        try:
            with self._transaction() as after:
                self._connect(channel, pick_port(), after)
        except XenError:
            if eventfd is not None:
                os.close(eventfd)
            raise
        return channel

    def _connect(self, channel: BackendChannel, guest_port: int, after: list) -> None:
        channel.dom0_port = next(port for port in range(1, len(self._backends) + 2) if port not in self._backends)
        self._backends[channel.dom0_port] = channel
        record = self._ports[guest_port]
        record.state, record.remote_port = EVTCHNSTAT_interdomain, channel.dom0_port
        channel._guest_port = guest_port
        self._route_to_eventfd(guest_port, channel)
        if channel._eventfd is not None and channel._loop_reads_eventfd:
            after.append(partial(self._add_reader, channel._eventfd, channel._eventfd_ready))
        # Like Xen's bind: the guest may have sent while the port was unbound.
        after.append(partial(self._schedule, channel.on_notify))

    def _route_to_eventfd(self, guest_port: int, channel: BackendChannel) -> None:
        # KVM takes only 2-level port numbers (a FIFO port beyond: served here).
        if self._kernel is not None and channel._eventfd is not None and guest_port < self._abi().max_ports:
            self._ports[guest_port].in_kernel = self._kernel_call(
                self._kernel.assign_eventfd, guest_port, channel._eventfd
            )

    def _send_in_kernel(self, port: int) -> bool:
        """KVM raises `port` on its vCPU (lock held); False without the
        kernel path, for a vCPU whose events the kernel must not raise
        (KernelEvtchn.delivers_to), or when KVM refused."""
        if self._kernel is None or self._fifo is not None:
            return False
        vcpu = self._ports[port].vcpu
        if not self._kernel.delivers_to(vcpu):
            return False
        poller_left_asleep = self._wake_poller is not None and self._kernel_skips_poller(port, vcpu)
        if not self._kernel_call(self._kernel.send, port, vcpu):
            return False
        if poller_left_asleep:
            self._wake_poller(vcpu)
        return True

    def _kernel_skips_poller(self, port: int, vcpu: int) -> bool:
        """Whether KVM's send of `port` will leave `vcpu` asleep in a
        SCHEDOP_poll on it. Xen wakes a port's pollers on every send; KVM
        only for a masked port, or through the kick that raises the upcall
        when it sets the port's selector bit: not when that bit (and
        upcall_pending) is already set. A guest that polls an unmasked port
        and leaves its upcall flags set (interrupts off, no callback) would
        sleep through every later event. Read before the send: the
        port unmasked, not yet pending, upcall_pending and the selector set."""
        mapped = self._mapped()
        if mapped is None:
            return False
        shared_info, abi = mapped
        vcpu_info = self._vcpu_info(vcpu, shared_info, abi)
        if vcpu_info is None or not atomic.fetch_or(vcpu_info + abi.upcall_pending, 1, 0):
            return False  # the common case: KVM sets the flags and kicks
        return (self._test_bit(vcpu_info + abi.pending_sel, port // abi.bits_per_word)
                and not self._test_bit(shared_info + abi.evtchn_mask, port)
                and not self._test_bit(shared_info + abi.evtchn_pending, port))

    def _notify_guest(self, channel: BackendChannel) -> None:
        # The common case, kept short (backends notify after every batch):
        # KVM raises the port itself and nothing is left to run after the lock.
        in_kernel = self._kernel is not None and self._fifo is None
        if in_kernel:
            with self._lock:
                port = channel._guest_port
                if port is None:
                    return
                if self._in_range(port) and self._send_in_kernel(port):
                    return
        with self._transaction() as after:
            if channel._guest_port is not None:
                self._deliver(channel._guest_port, after, try_kernel=not in_kernel)

    def _close_backend(self, channel: BackendChannel) -> None:
        with self._transaction() as after:
            if channel._closed:
                return
            channel._closed = True
            del self._backends[channel.dom0_port]
            if channel._guest_port is not None:
                record = self._ports[channel._guest_port]
                record.state, record.remote_port = EVTCHNSTAT_unbound, 0  # offered to dom0 again
                if record.in_kernel:
                    self._kernel_call(self._kernel.deassign, channel._guest_port)
                    record.in_kernel = False
                channel._guest_port = None
            if channel._eventfd is not None:
                after.append(partial(self._release_eventfd, channel._eventfd, channel._loop_reads_eventfd))
                channel._eventfd = None

    def _release_eventfd(self, fd: int, loop_reads: bool = True) -> None:
        if loop_reads:
            self._remove_reader(fd)
        os.close(fd)
