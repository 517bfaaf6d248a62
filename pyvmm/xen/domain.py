"""The Xen HVM domain a guest sees: everything pyvmm emulates of Xen, wired together.

One XenDomain per boot. It enables KVM's Xen support, owns the subsystems
(event channels, grant table, xenstore, PV console, xen-platform device),
and implements the operations the hypercall dispatcher calls. The guest is
domain 1; the VMM plays domain 0 for every backend.

Threads: hypercalls arrive on vCPU threads; backends, the xenstore and
timers run on the event thread. KVM only accepts a vCPU's ioctls from the
thread running it, so per-vCPU attributes go through Machine.run_on_vcpu.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import threading
import time
import uuid
from functools import partial
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

from .. import diagnose
from ..core import layout
from ..core.bus import Bus
from ..core.console import ConsoleOutput
from ..core.eventloop import EventLoop, drain_eventfd
from ..core.faults import FaultInjector
from ..core.trace import Tracer
from ..core.stats import Counters
from ..kvm import CpuidEntry, Kvm, KvmError, MemslotError, Vm, uapi
from ..kvm.cpuid import signature_leaf
from .hv.xen_platform import UNPLUG_AUX_IDE_DISKS, UNPLUG_IDE_SCSI_DISKS, XenPlatformDevice
from . import abi
from .hv import kvm_xen
from .abi import PAGE_SHIFT, PAGE_SIZE, VCPU_INFO_SIZE, XEN_LEGACY_MAX_VCPUS
from .backends.console.pvconsole import PvConsole
from .errors import EINVAL, EPERM, ETIME, XenError
from .hv.evtchn import EventChannels
from .hv.gnttab import GNTTAB_RESERVED_CONSOLE, GNTTAB_RESERVED_XENSTORE, XENMAPIDX_grant_table_status, GrantTable
from .hv.guest_access import GuestAccess
from .hv.hypercalls import HypercallDispatcher
from .hv.kvm_xen import KernelEvtchn, XenFeatures
from .hv.poll import ANY_PORT, Pollers
from .hv.timers import UserTimer
from .hv.watchdog import Expiry, WatchdogTimers
from .backend import kind as device_kinds
from . import backends as _backends  # noqa: F401 - registers the device kinds
from .xenstore import Access, Permission, Quotas, XenStore
from .xenstore.domain import create_domain_nodes
from .xenstore.service import GuestStoreService
from ..core.memory import GuestMemory, GuestMemoryError
from ..core.pageset import PageSet
from ..core.stop import StopReason
from ..core.snapshot import SnapshotError, check_version, natural, versioned

if TYPE_CHECKING:
    from ..config import VmConfig
    from ..platform import Platform

log = logging.getLogger(__name__)

GUEST_DOMID = 1
XEN_CPUID_BASE = 0x40000000
XEN_SIGNATURE = b"XenVMMXenVMM"
# CPUID base+4 EAX: the vCPU id is in EBX; per-vCPU upcall vectors work.
XEN_HVM_CPUID_VCPU_ID_PRESENT = 1 << 3
XEN_HVM_CPUID_UPCALL_VECTOR = 1 << 6
# Xen advertises per-vCPU upcall vectors (HVMOP_set_evtchn_upcall_vector)
# from 4.17 on; a guest told it runs on an older Xen uses the HVM-wide
# callback vector instead, which is how `--xen-version 4.16` selects it.
UPCALL_VECTOR_SINCE = (4 << 16) | 17
MIN_PERIOD_NS = 1_000_000
# How long a soft reset's vCPU waits for the event thread's part.
EVENT_THREAD_WAIT = 10.0
UPCALL_RECHECK_SECONDS = 0.1
# An upcall left pending this many checks in a row, by a vCPU that was
# interruptible at its last exit, was lost on its way: said once at WARNING.
LOST_UPCALL_CHECKS = 10
# The PV console's safety net: guest output left untouched for a whole
# interval is taken without the event that should have announced it.
CONSOLE_RECHECK_SECONDS = 1.0
# Version 2 added the watchdogs, the vCPUs taken down (VCPUOP_down), those
# halted in SCHEDOP_poll/block by pyvmm and SCHEDOP_shutdown_code's reason;
# a version 1 state restores without them (no watchdog, every vCPU up, none
# woken, no code).
STATE_VERSION = 2

# Features Xen announces to HVM guests (XENVER_get_features submap 0).
# supervisor_mode_kernel must stay clear: Linux would think it is PVH.
HVM_FEATURES = (
    (1 << abi.XENFEAT_writable_page_tables)
    | (1 << abi.XENFEAT_writable_descriptor_tables)
    | (1 << abi.XENFEAT_auto_translated_physmap)
    | (1 << abi.XENFEAT_hvm_callback_vector)
    | (1 << abi.XENFEAT_hvm_safe_pvclock)
)


def xen_cpuid_leaves(version: int, index: int) -> list[CpuidEntry]:
    """The hypervisor CPUID leaves vCPU `index` sees on a Xen of `version` (major << 16 | minor)."""
    base = XEN_CPUID_BASE
    hvm = XEN_HVM_CPUID_VCPU_ID_PRESENT
    if version >= UPCALL_VECTOR_SINCE:
        hvm |= XEN_HVM_CPUID_UPCALL_VECTOR
    return [
        signature_leaf(base, XEN_SIGNATURE, base + 4),
        CpuidEntry(base + 1, eax=version),
        CpuidEntry(base + 2, eax=1, ebx=kvm_xen.HYPERCALL_MSR),
        CpuidEntry(base + 3),
        CpuidEntry(base + 4, eax=hvm, ebx=index),
    ]


class Callback(enum.Enum):
    NONE = "none"
    VECTOR = "vector"  # HVM-wide vector, injected by KVM
    GSI = "gsi"  # a level-triggered interrupt line, driven by vCPU 0's upcall_pending


class XenHost(Protocol):
    """What the domain needs of the VM it is part of (a Machine).

    The domain is built inside the machine and knows it only through this:
    the VM and its memory, buses and PC platform, the event loop, the
    console, the configuration, the VM's tracer and fault injector, and the
    vCPUs' threads."""

    kvm: Kvm
    vm: Vm
    memory: GuestMemory
    loop: EventLoop
    pio: Bus
    platform: Platform
    console: ConsoleOutput
    config: VmConfig
    trace: Tracer
    faults: FaultInjector

    def run_on_vcpu(self, index: int, function: Callable, timeout: float = 10.0): ...
    def post_to_vcpu(self, index: int, function: Callable) -> None: ...
    def preempt_point(self, index: int) -> bool: ...
    def set_vcpu_down(self, index: int, down: bool) -> None: ...
    def others_held(self) -> contextlib.AbstractContextManager: ...
    def vcpu_down(self, index: int) -> bool: ...
    def kick_vcpu(self, index: int) -> None: ...
    def request_stop(self, reason: StopReason, detail: str | None = None) -> None: ...
    @property
    def paused(self) -> bool: ...
    @property
    def paused_clock(self) -> int | None: ...
    def pause(self) -> None: ...
    def control_event(self, name: str, data: dict) -> None: ...
    def if_flag_at_last_exit(self, index: int) -> bool | None: ...  # for traces


class XenDomain:
    def __init__(self, machine: XenHost):
        self.machine = machine
        self.vm, self.memory, self.loop = machine.vm, machine.memory, machine.loop
        self.trace, self.faults = machine.trace, machine.faults  # the VM's, handed to every part below
        config = machine.config
        self.limits = limits = config.limits  # this domain's (pyvmm.limits)
        self._limited = limits.log_rate.limited(log)  # lines whose rate the guest sets
        self.vcpu_count = config.vcpus
        self.domid = GUEST_DOMID
        self.version = config.xen_version
        bits = machine.kvm.xen_capabilities()
        kvm_xen.require_xen(bits)
        self.kvm_features = XenFeatures(bits, accelerate=config.xen_accel)
        kvm_xen.enable(self.vm, self.kvm_features)
        if self.kvm_features.evtchn_send:
            kvm_xen.set_xen_version(self.vm, self.version)  # XENVER_version answered in the kernel
        log.info("Xen %d.%d on KVM capabilities %#x, in-kernel event channels %s",
                 self.version >> 16, self.version & 0xFFFF, bits, "on" if self.kvm_features.evtchn_send else "off")

        self._lock = threading.RLock()
        # VCPUOP_up/down: the check of which vCPUs are up and the change, as
        # one step (never held while waiting for a vCPU's thread).
        self._updown_lock = threading.Lock()
        # A vCPU's hypercall waits for the event thread (a soft reset): its
        # state is not whole until that is done.
        self.vcpu_waiting_for_event_thread = False
        self.long_mode: bool | None = None
        self.shared_info_gfn: int | None = None
        self._vcpu_info_gpa: list[int | None] = [None] * self.vcpu_count
        self._per_vcpu_vector = [0] * self.vcpu_count
        self._stale_upcalls = [0] * self.vcpu_count  # consecutive checks that found upcall_pending set
        self.upcalls_raised_again = 0  # by the safety net (_recheck_upcalls)
        self.callback = Callback.NONE
        self._callback_fds: tuple[int, int] | None = None  # the GSI callback's (trigger, resample)
        self._callback_gsi = 0
        self._init_timers()
        self.watchdogs = WatchdogTimers(self.loop, clock=self._guest_time_ns, paused=lambda: machine.paused,
                                        expire=self._watchdog_expired)
        self.params: dict[int, int] = {}
        self._grant_frame_gpa: dict[int, int] = {}  # grant frame index -> where the guest mapped it
        self._grant_frame_at: dict[int, int] = {}  # and back
        # RAM page frames the guest gave back: one byte per frame of RAM.
        self._ballooned = PageSet(max(region.end for region in self.memory.regions) >> PAGE_SHIFT)
        self.soft_resets = 0  # SHUTDOWN_soft_reset done (kexec, kdump)
        self._blocked_at_save: list[bool] = []  # restore_state() to finish_restore(): the vCPUs to wake

        self.evtchn = EventChannels(
            domid=self.domid,
            vcpu_count=self.vcpu_count,
            long_mode=lambda: self.long_mode is not False,
            shared_info_address=self._shared_info_address,
            vcpu_info_address=self._vcpu_info_address,
            upcall=self._upcall,
            kernel=_GsiAwareKernelEvtchn(self) if self.kvm_features.evtchn_send else None,
            on_pending=self._port_pending,
            wake_poller=lambda vcpu: self.machine.kick_vcpu(vcpu),
            on_virq_closed=self._virq_closed,
            schedule=self.loop.call_soon_threadsafe,
            add_reader=self.loop.add_reader,
            remove_reader=self.loop.remove_reader,
            max_port=limits.max_event_channels,
            fifo=config.xen_fifo,
            page_address=self._fifo_page_address,
            on_abi_change=self._event_abi_changed,
            log_rate=limits.log_rate,
            trace=self.trace,
            faults=self.faults,
        )
        self.gnttab = GrantTable(self.memory, max_frames=limits.max_grant_frames, log_rate=limits.log_rate,
                                 trace=self.trace, on_status_frames_gone=self._grant_status_frames_gone)

        # It logs what the guest says there, rate-limited; unplug masks take
        # the emulated disks away (a firmware boot's IDE disk).
        self.platform_device = XenPlatformDevice(log_rate=limits.log_rate, on_unplug=self._unplug)
        slot = machine.platform.pci.add(self.platform_device)
        self._platform_intx_gsi = layout.pci_intx_gsi(slot, 0)  # its INTA
        machine.pio.register(layout.XEN_PLATFORM_IO_PORT, 4, self.platform_device.fixed_ports(), "xen-platform ports")

        self._setup_special_pages(machine)
        self.backends = self._create_backends(config)  # kind -> its devices: one per DeviceSpec
        self.dispatcher = HypercallDispatcher(self, xen_time_ns=self._guest_time_ns, trace=self.trace)

    # --- set-up -------------------------------------------------------------------

    def _create_backends(self, config: VmConfig) -> dict[str, list]:
        """Every registered device kind's devices, built and started in the
        order registered; on an error those already made are closed again."""
        made: dict[str, list] = {}
        try:
            for kind in device_kinds.kinds():
                if kind.create is not None:
                    made[kind.name] = kind.create(self, config.devices_of(kind.name))
        except BaseException:
            for devices in made.values():
                for device in devices:
                    device.close()
            raise
        return made

    @property
    def xenbus_devices(self) -> list:
        """Every backend device of every kind (VbdDevice, VifDevice, ...)."""
        return [device for devices in self.backends.values() for device in devices]

    def _setup_special_pages(self, machine: XenHost) -> None:
        console_pfn = layout.XEN_SPECIAL_PAGES >> PAGE_SHIFT
        store_pfn = console_pfn + 1
        # Never filled here: the pages are fresh (zero) memory at a boot, and
        # at a restore they hold the guest's rings from the snapshot, whose
        # indices the restored xenstore server goes on from.
        # The toolstack grants both rings to domain 0 at fixed references.
        self.gnttab.reserve(GNTTAB_RESERVED_CONSOLE, console_pfn)
        self.gnttab.reserve(GNTTAB_RESERVED_XENSTORE, store_pfn)

        # The backends (vbd, vif) find the VM's tracer and injector on the store.
        self.store = XenStore(quotas=Quotas.from_limits(self.limits), log_rate=self.limits.log_rate,
                              trace=self.trace, faults=self.faults)
        self.dom0 = self.store.client(0)  # the VMM's own requests (operators', shutdown): one client
        self.xenstore = GuestStoreService(self.loop, self.store, self.domid, self.memory.view(store_pfn << PAGE_SHIFT, PAGE_SIZE))
        self._store_pfn, self._console_pfn = store_pfn, console_pfn
        self._connect_special_channels()
        # Through the attribute: a soft reset gives the console a new channel.
        self.pv_console = PvConsole(self.memory.view(console_pfn << PAGE_SHIFT, PAGE_SIZE),
                                    lambda: self.console_channel.notify(), machine.console.write, trace=self.trace)
        if primary_console(machine.config.cmdline).startswith("hvc"):
            machine.platform.input_sink = self.pv_console

        self._publish_vm_node(machine.config.name)
        self._create_domain_nodes()
        self.params.update({abi.HVM_PARAM_STORE_PFN: store_pfn, abi.HVM_PARAM_CONSOLE_PFN: console_pfn})

    def _connect_special_channels(self) -> None:
        """The xenstore's and the console's event channels, each a new guest
        port bound to domain 0, as the toolstack sets them up; their ports
        go into the HVM params the guest reads."""
        self.console_channel = self.evtchn.connect_backend(self._console_notified)
        self.store_channel = self.evtchn.connect_backend(self.xenstore.notified)
        self.xenstore.attach(self.store_channel.notify)
        self.params[abi.HVM_PARAM_STORE_EVTCHN] = self.store_channel.guest_port
        self.params[abi.HVM_PARAM_CONSOLE_EVTCHN] = self.console_channel.guest_port

    def _create_domain_nodes(self) -> None:
        """/local/domain/<domid> as the toolstack makes it for a new domain."""
        create_domain_nodes(
            self.store, self.domid, self.machine.config.name,
            store_port=self.store_channel.guest_port, store_ring_ref=self._store_pfn,
            console_port=self.console_channel.guest_port, console_ring_ref=self._console_pfn, client=self.dom0,
            memory_kib=self.machine.config.memory >> 10,
        )
        self.dom0.write(f"/local/domain/{self.domid}/vm", f"/vm/{self.uuid}")

    def _publish_vm_node(self, name: str) -> None:
        """/vm/<uuid>, as the toolstack makes it; Linux reads it for /sys/hypervisor/uuid."""
        self.uuid = str(uuid.uuid4())
        self.handle = uuid.UUID(self.uuid).bytes
        dom0 = self.dom0
        vm_path = f"/vm/{self.uuid}"
        dom0.write(f"{vm_path}/uuid", self.uuid)
        dom0.write(f"{vm_path}/name", name)
        dom0.set_perms(vm_path, [Permission(0, Access.READ)])
        dom0.set_perms(f"{vm_path}/uuid", [Permission(0, Access.READ)])
        dom0.set_perms(f"{vm_path}/name", [Permission(0, Access.READ)])
        log.info("guest uuid %s", self.uuid)

    def cpuid_leaves(self, index: int) -> list[CpuidEntry]:
        return xen_cpuid_leaves(self.version, index)

    def _unplug(self, mask: int) -> None:
        """The guest's unplug mask (docs/misc/hvm-emulated-unplug in Xen):
        bit 0 all IDE disks, bit 2 all but the primary master; NICs (bit 1)
        have no emulated device to take away."""
        self._limited.info("guest unplugged emulated devices (mask %#x)", mask)
        if mask & UNPLUG_IDE_SCSI_DISKS:
            self.machine.platform.unplug_ide_disks()
        elif mask & UNPLUG_AUX_IDE_DISKS:
            self.machine.platform.unplug_ide_disks(keep_primary_master=True)

    def configure_vcpu(self, vcpu, index: int) -> None:
        """Per-vCPU Xen state, on the vCPU's own thread before it first runs."""
        if self.kvm_features.vcpu_attrs:
            kvm_xen.set_vcpu_attr(vcpu, uapi.KVM_XEN_VCPU_ATTR_TYPE_VCPU_ID, vcpu_id=index)

    def start(self) -> None:
        self.xenstore.start()
        self._console_waiting_at_last_check = None
        self.console_lost_wakeups = 0
        self.loop.call_later(CONSOLE_RECHECK_SECONDS, self._recheck_console)
        self.loop.call_later(UPCALL_RECHECK_SECONDS, self._recheck_upcalls)

    def _recheck_console(self) -> None:
        """A guest that waits for its console output to be taken (XTF spins
        until it is) would wait forever if the notification went missing."""
        waiting = self.pv_console.output_waiting()
        if waiting is not None and waiting == self._console_waiting_at_last_check:
            self.console_lost_wakeups += 1
            level = logging.WARNING if self.console_lost_wakeups == 1 else logging.DEBUG
            log.log(level, "PV console: output waited %.0f s with no event announcing it (%d times so far)",
                    CONSOLE_RECHECK_SECONDS, self.console_lost_wakeups)
            self._console_notified()
            waiting = self.pv_console.output_waiting()
        self._console_waiting_at_last_check = waiting
        self.loop.call_later(CONSOLE_RECHECK_SECONDS, self._recheck_console)

    def _recheck_upcalls(self) -> None:
        """The safety net under every delivery path: an upcall left pending
        from one check to the next is raised again. Xen and KVM raise the
        upcall only when upcall_pending goes from 0 to 1, so one the guest
        could not take when it was raised (its LAPIC not yet enabled) or
        that was lost below us would leave that vCPU deaf to every event
        for good; raised again, the guest's handler finds the flag and
        clears it (a spare one finds nothing to do)."""
        for index in range(self.vcpu_count):
            if not (self._upcall_pending(index) and self._upcall_deliverable(index)):
                self._stale_upcalls[index] = 0
                continue
            self._stale_upcalls[index] += 1
            if self._stale_upcalls[index] < 2:
                continue
            self.upcalls_raised_again += 1
            if self._stale_upcalls[index] == LOST_UPCALL_CHECKS and self.machine.if_flag_at_last_exit(index):
                vector = self._per_vcpu_vector[index]
                self._limited.warning("vCPU %d: an upcall pending for %.1f s, interrupts on at its last exit, was "
                                      "never taken: raised again (%d raised again so far; %s)", index,
                                      LOST_UPCALL_CHECKS * UPCALL_RECHECK_SECONDS, self.upcalls_raised_again,
                                      f"per-vCPU vector {vector:#x}" if vector else f"callback {self.callback.value}",
                                      key="lost-upcall")
            self._upcall(index)
        self.loop.call_later(UPCALL_RECHECK_SECONDS, self._recheck_upcalls)

    def _upcall_deliverable(self, vcpu: int) -> bool:
        """Whether an upcall can reach `vcpu` at all: by its own vector, the
        HVM-wide one, or (vCPU 0 only) the callback line. A line's upcalls
        reach vCPU 0 alone; the others' flags stay set for good, as on Xen."""
        return bool(self._per_vcpu_vector[vcpu]) or self.callback is Callback.VECTOR or (
            self.callback is Callback.GSI and vcpu == 0)

    def close(self) -> None:
        for device in self.xenbus_devices:
            device.close()
        if self._callback_fds is not None:  # the loop has stopped: no thread uses them now
            self.loop.remove_reader(self._callback_fds[1])
            for fd in self._callback_fds:
                os.close(fd)
            self._callback_fds = None

    def count_into(self, event: Counters, vcpus: Sequence[Counters]) -> None:
        """--stats, before any thread runs: the guest's xenstore requests by
        type into `event` (the event thread serves them all) and the event
        channel sends that reach the dispatcher into `vcpus[i]` (vCPU i's
        thread makes them)."""
        self.xenstore.connection.count_requests(event)
        self.dispatcher.count_sends(vcpus)

    # --- hypercalls ------------------------------------------------------------------

    def hypercall_handler(self, index: int, vcpu) -> Callable[[object], None]:
        """What vCPU `index`'s thread calls with each of its hypercall exits.
        Its GuestAccess is made once; the dispatcher empties its translation
        cache at every call."""
        return partial(self.dispatcher.handle, vcpu=index, access=GuestAccess(vcpu.translate, self.memory))

    def note_long_mode(self, long_mode: bool) -> None:
        if long_mode != self.long_mode:
            with self._lock:
                if long_mode != self.long_mode:
                    kvm_xen.set_long_mode(self.vm, long_mode)
                    self.long_mode = long_mode

    def features(self, submap: int) -> int:
        return HVM_FEATURES if submap == 0 else 0

    # --- shared_info and vcpu_info -------------------------------------------------

    def map_shared_info(self, gpfn: int) -> None:
        """Make guest page `gpfn` the shared_info page.

        The page the guest names becomes shared_info in place: KVM writes the
        RAM page itself (by host address where the kernel supports it), so no
        memslot is split and the guest never sees the page unmapped.
        """
        gpa = gpfn << PAGE_SHIFT
        if not self.memory.contains(gpa, PAGE_SIZE) or gpa >= layout.PCI_HOLE_START and gpa < layout.HIGH_RAM_START:
            raise XenError(EINVAL, f"shared_info at {gpa:#x} is not guest RAM")
        with self._lock:
            old = self.shared_info_gfn
            if old == gpfn:
                return
            if old is None:
                self.memory.fill(gpa, PAGE_SIZE)
            else:
                self.memory.write(gpa, self.memory.read(old << PAGE_SHIFT, PAGE_SIZE))
            kvm_xen.set_shared_info(self.vm, self.kvm_features, gpfn, self.memory.host_address(gpa))
            self.shared_info_gfn = gpfn
        for index in range(min(self.vcpu_count, XEN_LEGACY_MAX_VCPUS)):
            if self._vcpu_info_gpa[index] is None:
                self.machine.run_on_vcpu(index, partial(self._sync_vcpu_info_attr, index))

    def _sync_vcpu_info_attr(self, index: int, vcpu) -> None:
        """Point KVM at vCPU `index`'s vcpu_info as pyvmm records it when
        this runs (on that vCPU's thread): a late run of an earlier request
        can then never leave KVM and pyvmm apart."""
        kvm_xen.set_vcpu_attr(vcpu, uapi.KVM_XEN_VCPU_ATTR_TYPE_VCPU_INFO, gpa=self._kernel_vcpu_info_gpa(index))

    def _kernel_vcpu_info_gpa(self, index: int) -> int:
        """What KVM's VCPU_INFO attribute should say for vCPU `index`."""
        gpa = self._vcpu_info_gpa_of(index)
        return abi.INVALID_GPA if gpa is None else gpa

    def _resync_vcpu_info_attr(self, index: int, vcpu) -> None:
        try:
            self._sync_vcpu_info_attr(index, vcpu)
        except OSError as error:
            log.error("vCPU %d: KVM refused its vcpu_info back at %s: %s", index, self._vcpu_info_gpa_of(index), error)

    def _ulong_size(self) -> int:
        """Bytes in a xen_ulong_t (evtchn_pending_sel): a 32-bit guest's are 4."""
        return 8 if self.long_mode is not False else 4

    def _shared_info_address(self) -> int | None:
        gfn = self.shared_info_gfn
        return None if gfn is None else self.memory.host_address(gfn << PAGE_SHIFT)

    def _vcpu_info_gpa_of(self, index: int) -> int | None:
        gpa = self._vcpu_info_gpa[index]
        if gpa is None and self.shared_info_gfn is not None and index < XEN_LEGACY_MAX_VCPUS:
            gpa = (self.shared_info_gfn << PAGE_SHIFT) + index * VCPU_INFO_SIZE
        return gpa

    def _vcpu_info_address(self, index: int) -> int | None:
        gpa = self._vcpu_info_gpa_of(index) if 0 <= index < self.vcpu_count else None
        return None if gpa is None else self.memory.host_address(gpa)

    def register_vcpu_info(self, vcpu: int, gpa: int) -> None:
        self._check_vcpu(vcpu)
        if not self.memory.contains(gpa, VCPU_INFO_SIZE) or (gpa & (PAGE_SIZE - 1)) + VCPU_INFO_SIZE > PAGE_SIZE:
            raise XenError(EINVAL, f"vcpu_info at {gpa:#x} is not inside one RAM page")
        recorded, old = self._vcpu_info_gpa[vcpu], self._vcpu_info_gpa_of(vcpu)
        if old is not None:
            self.memory.write(gpa, self.memory.read(old, VCPU_INFO_SIZE))
        self._vcpu_info_gpa[vcpu] = gpa
        try:
            self.machine.run_on_vcpu(vcpu, partial(self._sync_vcpu_info_attr, vcpu))
        except (OSError, TimeoutError) as error:
            # Refused, the guest keeps using the old vcpu_info (Linux falls
            # back to shared_info's): so must pyvmm and KVM, or every event
            # KVM raises lands where the guest never looks. A request that
            # only timed out may still run: the one posted after undoes it.
            self._vcpu_info_gpa[vcpu] = recorded
            self.machine.post_to_vcpu(vcpu, partial(self._resync_vcpu_info_attr, vcpu))
            raise XenError(EINVAL, f"KVM did not take vCPU {vcpu}'s vcpu_info at {gpa:#x}: {error}") from error
        # As Xen does: mark everything pending so no event is lost in the move.
        word = self._ulong_size()
        self.memory.write(gpa, b"\x01")
        self.memory.write(gpa + word, b"\xff" * word)
        self._upcall(vcpu)

    def register_vcpu_time_info(self, vcpu: int, gpa: int) -> None:
        self._check_vcpu(vcpu)
        if gpa != abi.INVALID_GPA and not self.memory.contains(gpa, 32):
            raise XenError(EINVAL)
        self.machine.run_on_vcpu(
            vcpu, lambda v: kvm_xen.set_vcpu_attr(v, uapi.KVM_XEN_VCPU_ATTR_TYPE_VCPU_TIME_INFO, gpa=gpa)
        )

    def register_runstate_area(self, vcpu: int, gpa: int) -> None:
        self._check_vcpu(vcpu)
        if gpa != abi.INVALID_GPA and not self.memory.contains(gpa, 48):
            raise XenError(EINVAL)
        if not self.kvm_features.runstate:
            self._limited.info("KVM has no runstate support: the guest's runstate area stays empty")
            return
        self.machine.run_on_vcpu(
            vcpu, lambda v: kvm_xen.set_vcpu_attr(v, uapi.KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_ADDR, gpa=gpa)
        )

    def set_runstate_update_flag(self, enabled: bool) -> None:
        """VMASST_TYPE_runstate_update_flag: KVM marks a runstate area
        XEN_RUNSTATE_UPDATE while it rewrites it, so other vCPUs can read it
        consistently."""
        if not self.kvm_features.runstate_update_flag:
            raise XenError(EINVAL, "KVM cannot set the runstate update flag")
        try:
            kvm_xen.set_runstate_update_flag(self.vm, enabled)
        except OSError as error:
            self._limited.warning("KVM refused the runstate update flag: %s", error)
            raise XenError(EINVAL, "KVM refused the runstate update flag") from error

    def _check_vcpu(self, vcpu: int) -> None:
        if not 0 <= vcpu < self.vcpu_count:
            raise XenError(EINVAL, f"no vCPU {vcpu}")

    # --- callbacks (how the guest learns of pending events) ------------------------

    def hvm_get_param(self, index: int) -> int:
        if not 0 <= index < abi.HVM_NR_PARAMS:
            raise XenError(EINVAL)
        return self.params.get(index, 0)

    def hvm_set_param(self, index: int, value: int) -> None:
        if not 0 <= index < abi.HVM_NR_PARAMS:
            raise XenError(EINVAL)
        if index != abi.HVM_PARAM_CALLBACK_IRQ:
            raise XenError(EPERM, f"HVM param {index} is the toolstack's")
        with self._lock:  # two vCPUs may race to set it
            self._set_callback(value)
            self.params[index] = value

    def _set_callback(self, value: int) -> None:
        kind, data = value >> 56, value & ((1 << 56) - 1)
        self._stop_gsi_callback()
        if value == 0 or kind != abi.HVM_PARAM_CALLBACK_TYPE_VECTOR:
            # KVM injects only a vector callback: a guest moving to a line
            # must not keep getting the vector it had before as well.
            kvm_xen.set_hvm_upcall_vector(self.vm, 0)
        if value == 0:
            self.callback = Callback.NONE
        elif kind == abi.HVM_PARAM_CALLBACK_TYPE_VECTOR:
            vector = data & 0xFF
            if vector < 0x10:
                raise XenError(EINVAL, f"callback vector {vector:#x}")
            kvm_xen.set_hvm_upcall_vector(self.vm, vector)
            self.callback = Callback.VECTOR
            for index in range(self.vcpu_count):
                self._upcall_if_pending(index)
        elif kind == abi.HVM_PARAM_CALLBACK_TYPE_GSI:
            if not 0 < data < layout.IOAPIC_PINS:
                raise XenError(EINVAL, f"callback GSI {data}")
            self._start_gsi_callback(data)
        elif kind == abi.HVM_PARAM_CALLBACK_TYPE_PCI_INTX:
            # Only the xen-platform device raises the callback; its INTx pin
            # is wired to a fixed GSI (the DSDT's _PRT says which).
            self._start_gsi_callback(self._platform_intx_gsi)
        else:
            raise XenError(EINVAL, f"callback type {kind}")
        self._limited.info("event channel callback: %s (%#x)", self.callback.value, value)

    def _start_gsi_callback(self, gsi: int) -> None:
        # A level-triggered line held while vCPU 0's upcall_pending is set:
        # irqfd asserts it, the guest's EOI deasserts it and signals the
        # resample fd, where we re-assert if events are still pending.
        # The two eventfds are made once and kept until close(): a guest
        # that switches callbacks only re-routes them, so no thread can
        # ever write to an fd that another one has closed.
        if self._callback_fds is None:
            trigger = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            resample = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._callback_fds = (trigger, resample)
            # We are on a vCPU thread (HVMOP_set_param): the loop registers its reader itself.
            self.loop.call_soon_threadsafe(partial(self._watch_resample, resample))
        trigger = self._callback_fds[0]
        drain_eventfd(trigger)  # asserts made while unrouted must not fire on their own
        self.vm.irqfd(trigger, gsi, resample_fd=self._callback_fds[1])
        self._callback_gsi = gsi
        self.callback = Callback.GSI
        self._assert_callback_if_pending()

    def _watch_resample(self, resample: int) -> None:
        if self._callback_fds is not None and self._callback_fds[1] == resample:
            self.loop.add_reader(resample, self._callback_resampled)

    def _stop_gsi_callback(self) -> None:
        if self.callback is not Callback.GSI or self._callback_fds is None:
            return
        self.callback = Callback.NONE
        self.vm.irqfd_remove(self._callback_fds[0], self._callback_gsi)

    def _callback_resampled(self) -> None:
        """The guest's EOI lowered the line (KVM's resampler); event thread."""
        fds = self._callback_fds
        if fds is None:
            return
        drain_eventfd(fds[1])
        if self.trace.evtchn:
            self.trace.emit("evtchn", "callback-eoi", gsi=self._callback_gsi, upcall_pending=self._upcall_pending(0))
        self._assert_callback_if_pending()

    def _assert_callback_if_pending(self) -> None:
        if self._per_vcpu_vector[0]:
            return  # per-vCPU vectors replace the GSI (Linux still names GSI 1 "to look enlightened")
        fds = self._callback_fds
        if fds is not None and self.callback is Callback.GSI and self._upcall_pending(0):
            os.eventfd_write(fds[0], 1)
            if self.trace.evtchn:
                self.trace.emit("evtchn", "callback-assert", gsi=self._callback_gsi)

    def set_evtchn_upcall_vector(self, vcpu: int, vector: int) -> None:
        self._check_vcpu(vcpu)
        if vector < 0x10 or vector > 0xFF:
            raise XenError(EINVAL)
        self._per_vcpu_vector[vcpu] = vector
        if self.kvm_features.vcpu_attrs:
            # Besides its own deliveries, KVM then re-injects a pending upcall
            # when the guest software-enables its LAPIC; an MSI sent before
            # that is dropped, and Linux picks its vector that early.
            self.machine.run_on_vcpu(
                vcpu, lambda v: kvm_xen.set_vcpu_attr(v, uapi.KVM_XEN_VCPU_ATTR_TYPE_UPCALL_VECTOR, vector=vector)
            )
        # As Xen does: events marked pending before the guest could take
        # them (e.g. by register_vcpu_info) are delivered now.
        self._upcall_if_pending(vcpu)

    def _upcall_pending(self, vcpu: int) -> bool:
        gpa = self._vcpu_info_gpa_of(vcpu)
        return gpa is not None and self.memory.read(gpa, 1)[0] != 0

    def _upcall_if_pending(self, vcpu: int) -> None:
        if self._upcall_pending(vcpu):
            self._upcall(vcpu)

    def _upcall(self, vcpu: int) -> None:
        """Userspace just set `vcpu`'s upcall_pending: make the guest take it."""
        self.pollers.vcpu_event(vcpu)  # Xen wakes a polling or blocked vCPU for any event
        vector = self._per_vcpu_vector[vcpu]
        if self.trace.evtchn:
            self._trace_upcall(vcpu, vector)
        if vector:
            # A fixed-delivery MSI to that vCPU's APIC (APIC ID = index).
            self.vm.signal_msi(layout.LAPIC_BASE | (vcpu << 12), vector)
        elif self.callback is Callback.VECTOR:
            self.machine.kick_vcpu(vcpu)  # KVM injects on the next entry
        elif self.callback is Callback.GSI and vcpu == 0:
            self._assert_callback_if_pending()

    def _trace_upcall(self, vcpu: int, vector: int) -> None:
        """The `evtchn` trace's record of an upcall userspace raised: how
        (`msi`: the per-vCPU vector, `kick`: KVM injects the HVM-wide vector
        on the vCPU's next entry, `gsi`: vCPU 0's line, `none`: nothing to
        raise), and the vCPU's RFLAGS.IF at its last exit from KVM_RUN
        (kvm_run's if_flag: no ioctl, stale while the vCPU runs)."""
        if vector:
            via = "msi"
        elif self.callback is Callback.VECTOR:
            via = "kick"
        elif self.callback is Callback.GSI and vcpu == 0:
            via = "gsi"
        else:
            via = "none"
        self.trace.emit("evtchn", "upcall", target_vcpu=vcpu, via=via, vector=vector or None,
                        if_at_last_exit=self.machine.if_flag_at_last_exit(vcpu))

    # --- timers ------------------------------------------------------------------

    def _init_timers(self) -> None:
        # Each vCPU's two timers, as in Xen; set_timer_op is the singleshot one.
        self._singleshot = [UserTimer(self.loop, partial(self._timer_fired, i)) for i in range(self.vcpu_count)]
        self._periodic = [UserTimer(self.loop, partial(self._timer_fired, i)) for i in range(self.vcpu_count)]
        self._timer_ports: list[int | None] = [None] * self.vcpu_count  # KVM runs the singleshot timer
        # SCHEDOP_poll's timeout, one per vCPU (hv/poll.py).
        poll_timers = [UserTimer(self.loop, partial(self._poll_expired, i)) for i in range(self.vcpu_count)]
        self.pollers = Pollers(self.vcpu_count, self._unhalt, poll_timers)

    def _guest_time_ns(self) -> int:
        return kvm_xen.clock_ns(self.vm)

    def set_singleshot_timer(self, vcpu: int, timeout_abs_ns: int, future: bool) -> None:
        self._check_vcpu(vcpu)
        now = self._guest_time_ns()
        if future and timeout_abs_ns < now:
            raise XenError(ETIME)
        self._arm_timer(vcpu, timeout_abs_ns, now)

    def stop_singleshot_timer(self, vcpu: int) -> None:
        self._check_vcpu(vcpu)
        self._singleshot[vcpu].stop()
        port = self._timer_ports[vcpu]
        if port is not None:
            # Expiry 0 stops KVM's timer and keeps its port (KVM takes the
            # port as the timer's VIRQ port: never pass anything else).
            self.machine.run_on_vcpu(vcpu, lambda v: self._kernel_timer(v, port, 0))

    def set_timer_op(self, vcpu: int, timeout_abs_ns: int) -> None:
        self._check_vcpu(vcpu)
        if timeout_abs_ns == 0:
            self.stop_singleshot_timer(vcpu)
            return
        # The dispatcher already applied Xen's range rule (far-off or
        # negative timeouts become +100 ms).
        self._arm_timer(vcpu, timeout_abs_ns, self._guest_time_ns())

    def _arm_timer(self, vcpu: int, deadline_ns: int, now_ns: int) -> None:
        kernel = self.kvm_features.evtchn_send and not self.evtchn.fifo_active  # KVM raises 2-level only
        port = self.evtchn.virq_port(abi.VIRQ_TIMER, vcpu) if kernel else None
        if port is not None:
            # From now on KVM runs this vCPU's timer hypercalls itself.
            self._timer_ports[vcpu] = port
            self.machine.run_on_vcpu(vcpu, lambda v: self._kernel_timer(v, port, deadline_ns))
            return
        # Xen keeps a far-off singleshot deadline as it is (only set_timer_op
        # has a range rule): it costs one loop entry, and never fires.
        self._singleshot[vcpu].arm(max(0.0, (deadline_ns - now_ns) / 1e9))

    def _kernel_timer(self, vcpu_object, port: int, deadline_ns: int) -> None:
        kvm_xen.set_vcpu_attr(
            vcpu_object, uapi.KVM_XEN_VCPU_ATTR_TYPE_TIMER,
            timer={"port": port, "priority": kvm_xen.EVTCHN_PRIORITY_2LEVEL, "expires_ns": deadline_ns},
        )

    def _virq_closed(self, virq: int, vcpu: int, port: int) -> None:
        """The guest closed a VIRQ's port. KVM, once given a vCPU's timer
        port, runs its timer hypercalls itself and would keep raising the
        closed port: a CPU taken offline and back (Linux closes and binds
        VIRQ_TIMER again, maybe at another port) would get no more ticks.
        Port 0 hands the timer back to pyvmm until the next timer call
        names the new port."""
        if virq != abi.VIRQ_TIMER or self._timer_ports[vcpu] != port:
            return
        self._timer_ports[vcpu] = None
        self.machine.run_on_vcpu(vcpu, lambda v: self._kernel_timer(v, 0, 0))
    def _take_kernel_timer(self, vcpu_object, vcpu: int) -> None:
        """On vCPU `vcpu`'s thread: KVM stops running its timer (port 0 turns
        KVM's timer hypercalls off) and a userspace timer takes its deadline.
        One KVM raised just before went to 2-level bits the guest no longer
        reads, so the userspace timer fires at least once: a spurious timer
        event is harmless, a lost one could leave the vCPU idle for good."""
        attr = vcpu_object.xen_vcpu_get_attr(uapi.KVM_XEN_VCPU_ATTR_TYPE_TIMER)
        deadline = attr.u.timer.expires_ns
        kvm_xen.set_vcpu_attr(vcpu_object, uapi.KVM_XEN_VCPU_ATTR_TYPE_TIMER,
                              timer={"port": 0, "priority": kvm_xen.EVTCHN_PRIORITY_2LEVEL, "expires_ns": 0})
        self._timer_ports[vcpu] = None
        now = self._guest_time_ns()
        self._singleshot[vcpu].arm(max(0.0, ((deadline or now) - now) / 1e9))

    def _event_abi_changed(self, fifo: bool) -> None:
        """The guest switched to FIFO event channels (or back to 2-level with
        EVTCHNOP_reset), on the vCPU thread of that hypercall. KVM's
        in-kernel paths raise 2-level events only, so under FIFO: its
        SCHEDOP_poll, which would wait on 2-level bits nobody sets, becomes
        a yield (KVM_XEN_HVM_CONFIG without EVTCHN_SEND) and its timers come
        back to userspace. Guests' sends to backends keep their eventfds."""
        if not self.kvm_features.evtchn_send:
            return  # every path is pyvmm's already
        with self._lock:
            kvm_xen.enable(self.vm, self.kvm_features, evtchn_send=not fifo)
        if not fifo:
            return  # timers go back to KVM at their next setting
        for vcpu, port in enumerate(self._timer_ports):
            if port is not None:
                try:
                    self.machine.run_on_vcpu(vcpu, partial(self._take_kernel_timer, vcpu=vcpu))
                except (OSError, TimeoutError) as error:
                    log.warning("vCPU %d: could not take its timer back from KVM: %s", vcpu, error)

    def _fifo_page_address(self, gfn: int) -> int | None:
        """A RAM page the guest may hand over for FIFO event channels (an
        event array page, a control block): not an overlay, not given back,
        not shared_info. Its host address stays valid for the VM's life."""
        gpa = gfn << PAGE_SHIFT
        if gfn >= 1 << 40 or not self.memory.contains(gpa, PAGE_SIZE):
            return None
        with self._lock:
            if gfn == self.shared_info_gfn or gfn in self._ballooned or gpa in self._grant_frame_at:
                return None
        return self.memory.host_address(gpa)

    def _timer_fired(self, vcpu: int) -> None:
        self.evtchn.send_virq(abi.VIRQ_TIMER, vcpu)

    def set_periodic_timer(self, vcpu: int, period_ns: int) -> None:
        self._check_vcpu(vcpu)
        if period_ns < MIN_PERIOD_NS:
            raise XenError(EINVAL)
        self._periodic[vcpu].arm(period_ns / 1e9, period_ns / 1e9)

    def stop_periodic_timer(self, vcpu: int) -> None:
        self._check_vcpu(vcpu)
        self._periodic[vcpu].stop()

    # --- scheduling and lifecycle ----------------------------------------------------

    def sched_yield(self, vcpu: int) -> None:
        os.sched_yield()

    def poll(self, vcpu: int, ports: list[int], timeout_abs_ns: int) -> None:
        """SCHEDOP_poll that reached userspace (KVM 6.0 and later answer it in
        the kernel, docs/XEN.md; an older KVM leaves it here): the vCPU halts until one of
        `ports` is pending, an event is raised for it, or the timeout (Xen
        system time; 0: none) passes. On the vCPU's own thread."""
        timeout_s = None
        if timeout_abs_ns:
            timeout_s = (timeout_abs_ns - self._guest_time_ns()) / 1e9
            if timeout_s <= 0:
                return  # Xen's timer fires at once
        self.pollers.start(vcpu, ports, timeout_s)
        try:
            pending = self.evtchn.any_pending(ports)
        except BaseException:
            self.pollers.cancel(vcpu)
            raise
        if pending:
            self.pollers.cancel(vcpu)
            return
        self._halt(vcpu)

    def block(self, vcpu: int) -> None:
        """SCHEDOP_block (KVM never handles it): halt until an event for the
        vCPU. An upcall the guest can take with interrupts on wakes it inside
        KVM; pyvmm's own deliveries wake it through the pollers."""
        self.pollers.start(vcpu, ANY_PORT, None)
        self._halt(vcpu)

    def _halt(self, vcpu: int) -> None:
        # The hypercall completes on the next KVM_RUN, which then halts the
        # vCPU as a HLT would: woken by interrupts, KVM's deliveries, kicks.
        self.machine.run_on_vcpu(vcpu, lambda v: v.set_mp_state(uapi.KVM_MP_STATE_HALTED))

    def _unhalt(self, vcpu: int) -> None:
        """End a poll or block: on the vCPU's thread, once it left KVM_RUN."""
        def runnable(v) -> None:
            try:
                if v.get_mp_state() == uapi.KVM_MP_STATE_HALTED:
                    v.set_mp_state(uapi.KVM_MP_STATE_RUNNABLE)
            except KvmError as error:  # never end the vCPU thread over a wake-up
                self._limited.warning("vCPU %d: cannot end its SCHEDOP_poll: %s", vcpu, error)

        self.machine.post_to_vcpu(vcpu, runnable)

    def _poll_expired(self, vcpu: int) -> None:
        self.pollers.expired(vcpu)

    def _port_pending(self, port: int) -> None:
        """pyvmm made `port` pending itself (EventChannels' on_pending)."""
        self.pollers.port_pending(port)
        if self.kvm_features.evtchn_send:
            # KVM refused this delivery, so a vCPU polling inside KVM was not
            # told: a kick ends its poll (a spurious wake-up; it checks again).
            for index in range(self.vcpu_count):
                self.machine.kick_vcpu(index)

    def vcpu_blocked(self, index: int) -> bool:
        """Whether vCPU `index` may be halted in SCHEDOP_poll/block by pyvmm:
        an event can still wake it, even with interrupts off."""
        return self.pollers.waiting(index)

    def vcpu_is_up(self, vcpu: int) -> bool:
        """VCPUOP_is_up: not taken down by VCPUOP_down, and started (an
        application processor is down until the guest's INIT/SIPI, as on Xen)."""
        self._check_vcpu(vcpu)
        return not self.machine.vcpu_down(vcpu) and self._started(vcpu)

    def vcpu_up(self, vcpu: int) -> None:
        """VCPUOP_up: only a vCPU that ran before (EINVAL otherwise, as Xen
        answers for one never initialised); its INIT/SIPI start is the guest's."""
        self._check_vcpu(vcpu)
        if not self.machine.vcpu_down(vcpu) and not self._started(vcpu):
            raise XenError(EINVAL, f"vCPU {vcpu} was never started")
        with self._updown_lock:
            self.machine.set_vcpu_down(vcpu, False)

    def vcpu_down(self, vcpu: int) -> None:
        """VCPUOP_down: the vCPU stops until VCPUOP_up (its own, or another's).
        Taking down the last vCPU still up powers the domain off, as Xen does.

        Whether the others started is KVM's (their mp_state, asked of their
        threads first, without the lock); which are down is pyvmm's, checked
        and changed under the lock: two vCPUs taking each other down at
        once leave one up, or power the domain off, never neither up."""
        self._check_vcpu(vcpu)
        started = [other for other in range(self.vcpu_count)
                   if other != vcpu and not self.machine.vcpu_down(other) and self._started(other)]
        with self._updown_lock:
            last = not any(not self.machine.vcpu_down(other) for other in started)
            if not last:
                self.machine.set_vcpu_down(vcpu, True)
        if last:
            self.shutdown(abi.SHUTDOWN_poweroff)

    def _started(self, vcpu: int) -> bool:
        """Whether the vCPU left its wait for INIT/SIPI (KVM's mp_state, read
        on its thread: from another vCPU's hypercall, Machine.run_on_vcpu
        serves that vCPU's own requests meanwhile, so two vCPUs asking each
        other both get their answer)."""
        state = self.machine.run_on_vcpu(vcpu, lambda v: v.get_mp_state())
        return state not in (uapi.KVM_MP_STATE_UNINITIALIZED, uapi.KVM_MP_STATE_INIT_RECEIVED)

    def shutdown(self, reason: int) -> int:
        """SCHEDOP_shutdown (on the calling vCPU's thread); the result for
        the guest when it runs on."""
        if reason == abi.SHUTDOWN_suspend:
            # Suspending means saving the domain for a later restore, which
            # pyvmm cannot do yet (so control/feature-suspend is not filled
            # in for the guest: xenstore/domain.py). Xen's toolstack answers
            # a suspend it cannot complete by resuming the domain in place
            # with the hypercall returning 1, "suspend cancelled"
            # (xc_domain_resume's cooperative resume); Linux then resumes its
            # devices and runs on.
            self._limited.warning("the guest asked to suspend (SHUTDOWN_suspend), which pyvmm cannot do yet (no "
                                  "save and restore): answered 1, suspend cancelled; the guest runs on")
            return 1
        if reason == abi.SHUTDOWN_soft_reset:
            self.soft_reset()
            return 0
        if reason == abi.SHUTDOWN_watchdog:
            self._limited.warning("the guest shut itself down with SHUTDOWN_watchdog")
            self._watchdog_shutdown("shutdown")
            return 0
        stop = {
            abi.SHUTDOWN_poweroff: StopReason.POWEROFF,
            abi.SHUTDOWN_reboot: StopReason.REBOOT,
            abi.SHUTDOWN_crash: StopReason.CRASH,
        }.get(reason)
        if stop is None:
            raise XenError(EINVAL, f"shutdown reason {reason} is not supported")
        self._limited.info("guest asked for shutdown: %s", stop.value)
        self.machine.request_stop(stop)
        return 0

    # --- the domain's watchdogs (hv/watchdog.py) -----------------------------------

    def watchdog(self, wid: int, timeout: int) -> int:
        """SCHEDOP_watchdog, on a vCPU thread."""
        return self.watchdogs.op(wid, timeout)

    def _watchdog_expired(self, expiry: Expiry) -> None:
        """A watchdog ran out (event thread): Xen shuts the domain down with SHUTDOWN_watchdog."""
        log.warning("Xen watchdog %d of domain %d expired: the guest did not pet it within %d s",
                    expiry.id, self.domid, expiry.timeout)
        self._watchdog_shutdown(f"watchdog {expiry.id}")

    def _watchdog_shutdown(self, detail: str) -> None:
        """The domain shut down for its watchdog: what on_watchdog says
        (--on-watchdog; xl.cfg's on_watchdog). "destroy" and "restart" stop
        this boot with StopReason.WATCHDOG (runner.py boots again for
        "restart" unless --no-reboot); "preserve" keeps the VM paused for
        inspection until it is destroyed."""
        if self.trace.stop:
            self.trace.emit("stop", "watchdog", detail=detail)
        if self.machine.config.on_watchdog == "preserve":
            self.loop.call_soon_threadsafe(partial(self._preserve_after_watchdog, detail))
            return
        self.machine.request_stop(StopReason.WATCHDOG, detail=detail)

    def _preserve_after_watchdog(self, detail: str) -> None:
        self.machine.pause()
        log.warning("on_watchdog=preserve: the VM is kept paused (pyvmm ctl %s diagnose, then destroy)",
                    self.machine.config.name)
        self.machine.control_event("SHUTDOWN", {"reason": StopReason.WATCHDOG.value, "detail": detail,
                                                "preserved": True})

    # --- soft reset (kexec and kdump) -------------------------------------------------

    def soft_reset(self) -> None:
        """SHUTDOWN_soft_reset, on the calling vCPU's thread.

        Linux in an HVM guest asks for it as the last step before kexec or
        kdump jump to the next kernel (xen_hvm_shutdown and
        xen_hvm_crash_shutdown, arch/x86/xen/enlighten_hvm.c) and goes on
        when the hypercall returns 0 (anything else is a BUG()). On Xen the
        domain pauses, xl's soft-reset action tears its devices down, Xen's
        domain_soft_reset() closes every event channel and unmaps
        shared_info and each vCPU's vcpu_info, time and runstate areas, and
        the toolstack makes the domain's xenstore directory, xenstore
        connection, console and devices anew before unpausing it, so that
        the vCPU goes on where it was. QEMU's Xen emulation
        (kvm_xen_soft_reset) also resets the grant table, the callback and
        each vCPU's upcall vector and timers. pyvmm does all of that, so the
        next kernel finds a domain as at boot and nothing of "Xen" writes
        into memory the old kernel once handed it; guest memory and every
        vCPU's registers stay as they are. Grant frames leave the guest's
        physical map (RAM they hid comes back) and pages given back by
        ballooning return, so the next kernel has the memory map it is
        told of. The domain's watchdogs are kept, as on Xen.

        If any step fails the domain crashes (StopReason.CRASH), as Xen's
        domain_crash() after a failed arch_domain_soft_reset()."""
        log.info("the guest asked for a soft reset (kexec or kdump): resetting its Xen state, keeping its "
                 "memory and vCPUs")
        if self.trace.stop:
            self.trace.emit("stop", "soft-reset")
        try:
            # First nothing may write into guest memory any more...
            self._reset_vcpus()
            self._reset_vm_wide()
            # ...then the parts the event thread owns.
            self._on_event_thread(self._reset_host_side)
        except Exception as error:
            log.error("soft reset failed: %s; the domain crashes", error, exc_info=True)
            self.machine.request_stop(StopReason.CRASH, detail="soft-reset")
            raise XenError(EINVAL, "soft reset failed") from None
        self.soft_resets += 1

    def _reset_vcpus(self) -> None:
        """Each vCPU's Xen state as at boot: no vcpu_info, time or runstate
        area, no upcall vector, timers stopped (KVM's on the vCPU's thread)."""
        for index in range(self.vcpu_count):
            self._singleshot[index].stop()
            self._periodic[index].stop()
            self._vcpu_info_gpa[index] = None
            self._per_vcpu_vector[index] = 0
            self._stale_upcalls[index] = 0
            self._timer_ports[index] = None
            self.machine.run_on_vcpu(index, self._reset_vcpu_attrs)

    def _reset_vcpu_attrs(self, vcpu) -> None:
        for kind in (uapi.KVM_XEN_VCPU_ATTR_TYPE_VCPU_INFO, uapi.KVM_XEN_VCPU_ATTR_TYPE_VCPU_TIME_INFO):
            kvm_xen.set_vcpu_attr(vcpu, kind, gpa=abi.INVALID_GPA)
        if self.kvm_features.runstate:
            kvm_xen.set_vcpu_attr(vcpu, uapi.KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_ADDR, gpa=abi.INVALID_GPA)
        if self.kvm_features.vcpu_attrs:
            kvm_xen.set_vcpu_attr(vcpu, uapi.KVM_XEN_VCPU_ATTR_TYPE_UPCALL_VECTOR, vector=0)
            # Port 0: KVM no longer runs this vCPU's timer (nor its hypercalls).
            kvm_xen.set_vcpu_attr(vcpu, uapi.KVM_XEN_VCPU_ATTR_TYPE_TIMER,
                                  timer={"port": 0, "priority": kvm_xen.EVTCHN_PRIORITY_2LEVEL, "expires_ns": 0})

    def _reset_vm_wide(self) -> None:
        """No callback, no shared_info, no grant frame in the guest's
        physical map, every RAM page back."""
        with self._lock:
            self._stop_gsi_callback()
            self.callback = Callback.NONE
            self.params.pop(abi.HVM_PARAM_CALLBACK_IRQ, None)
            kvm_xen.set_hvm_upcall_vector(self.vm, 0)
            if self.shared_info_gfn is not None:
                kvm_xen.clear_shared_info(self.vm, self.kvm_features)
                self.shared_info_gfn = None
            with self.machine.others_held():  # RAM slots are split and merged
                for gpa in list(self._grant_frame_at):
                    self._unmap_grant_frame(gpa)
                for first, count in self._region_runs(self._ballooned.runs()):
                    self._restore_ram(first << PAGE_SHIFT, count << PAGE_SHIFT)  # cleared when it was given back
            self._ballooned.clear()

    def _reset_host_side(self) -> None:
        """The event thread's part: as xl's soft-reset, the devices let go
        of the guest, then Xen closes every event channel; the grant table
        is emptied (its reserved entries stay), the xenstore connection and
        the console get new channels, the domain's xenstore directory is
        made anew and every device starts over in InitWait."""
        for device in self.xenbus_devices:
            device.drop_connection()
        self.evtchn.reset(self.domid)
        old_channels = (self.store_channel, self.console_channel)
        self.gnttab.reset()
        self.xenstore.reset()
        self._connect_special_channels()
        for channel in old_channels:
            channel.close()
        self.dom0.rm(f"/local/domain/{self.domid}")
        self._create_domain_nodes()
        for device in self.xenbus_devices:
            device.restart()
        log.info("soft reset done: xenstore on port %d, console on port %d", self.store_channel.guest_port,
                 self.console_channel.guest_port)
        self.machine.control_event("RESET", {"reason": "soft-reset"})

    def _on_event_thread(self, function: Callable[[], None], timeout: float = EVENT_THREAD_WAIT) -> None:
        """Run `function` on the event thread and wait for it (at most
        `timeout` while the VM runs): the calling vCPU stays in its hypercall
        meanwhile, as a Xen domain stays paused while the toolstack works.

        While the VM is paused the wait goes on: the event thread may be
        taking a snapshot, which itself waits (and gives up) for this vCPU
        to finish its hypercall; the soft reset must not fail for that."""
        if self.loop.on_owner_thread():
            function()
            return
        done = threading.Event()
        failure: list[BaseException] = []

        def job():
            try:
                function()
            except BaseException as error:  # handed to the waiting vCPU
                failure.append(error)
            finally:
                done.set()

        self.vcpu_waiting_for_event_thread = True  # a snapshot refuses meanwhile (snapshot.capture)
        try:
            self.loop.call_soon_threadsafe(job)
            while not done.wait(timeout):
                if not self.machine.paused:
                    raise TimeoutError(f"the event thread did not run {function.__name__} within {timeout:.0f} s")
        finally:
            self.vcpu_waiting_for_event_thread = False
        if failure:
            raise failure[0]

    def set_memory_target(self, target_kib: int) -> None:
        """The balloon target, as `xl mem-set` sets it: memory/target in KiB.
        The guest's balloon driver gives pages back (decrease_reservation)
        or takes them again (populate_physmap) until it holds that much;
        it never grows past its RAM (memory/static-max). Event thread."""
        if not 0 < target_kib <= self.machine.config.memory >> 10:
            raise ValueError(f"memory target {target_kib} KiB is not in 1..{self.machine.config.memory >> 10} KiB")
        self.dom0.write(f"/local/domain/{self.domid}/memory/target", str(target_kib))

    def memory_target_kib(self) -> int | None:
        """What memory/target says now (event thread)."""
        try:
            return int(self.dom0.read(f"/local/domain/{self.domid}/memory/target"))
        except Exception:  # removed or rewritten by someone: no target to report
            return None

    def ballooned_pages(self) -> int:
        """Pages the guest has given back and not taken again."""
        with self._lock:
            return len(self._ballooned)

    def request_guest_shutdown(self, kind: str = "poweroff") -> None:
        """Ask the guest to shut down in order, as xl shutdown does (any thread)."""

        def write():
            self.dom0.write(f"/local/domain/{self.domid}/control/shutdown", kind)

        self.loop.call_soon_threadsafe(write)

    def console_write(self, data: bytes) -> None:
        self.machine.console.write(data)

    def preempt(self, vcpu: int) -> bool:
        return self.machine.preempt_point(vcpu)

    def ram_page(self, gfn: int) -> memoryview | None:
        """The RAM page the guest sees at `gfn`, for a copy the guest asks
        for: None where no RAM shows (ballooned out, under an overlay)."""
        gpa = gfn << PAGE_SHIFT
        with self._lock:
            if gfn in self._ballooned or gpa in self._grant_frame_at:
                return None
        try:
            return self.memory.view(gpa, PAGE_SIZE)
        except GuestMemoryError:
            return None

    # --- grant frames ---------------------------------------------------------------

    def map_grant_frame(self, index: int, gpfn: int) -> None:
        """Show grant frame `index` at guest page `gpfn`.

        Anywhere the guest asks, as on Xen: in the xen-platform BAR, or over
        one of its RAM pages. An overlaid RAM page is hidden, not lost: it is
        back, with its contents, once the frame moves elsewhere or is removed
        (XENMEM_remove_from_physmap), as with QEMU's Xen overlays. Splitting a
        RAM slot is not atomic (pyvmm/kvm/memslots.py), so the other vCPUs
        are held out of KVM_RUN meanwhile.
        """
        gpa = gpfn << PAGE_SHIFT
        if gpfn == self.shared_info_gfn:
            raise XenError(EINVAL, "a grant frame cannot replace the shared_info page")
        self.gnttab.note_frame_mapped(index)
        with self._lock:
            table = self.vm.memslots
            # A frame lives at one address: mapping it again moves it (as on
            # Xen), so a guest cannot pile up memslots by remapping.
            old = self._grant_frame_gpa.get(index)
            if old == gpa:
                return
            with self.machine.others_held():
                if old is not None:
                    self._unmap_grant_frame(old)
                if gpa in self._grant_frame_at:
                    self._unmap_grant_frame(gpa)
                over_ram = self.memory.contains(gpa, PAGE_SIZE) and gpfn not in self._ballooned
                try:
                    if over_ram:
                        table.unmap(gpa, PAGE_SIZE)
                    try:
                        table.map(gpa, PAGE_SIZE, self.gnttab.frame_host_address(index))
                    except (KvmError, MemslotError):
                        if over_ram:
                            self._restore_ram(gpa)
                        raise
                except (KvmError, MemslotError) as error:  # an address KVM refuses, or no slot left
                    raise XenError(EINVAL, f"cannot map grant frame {index} at {gpa:#x}: {error}") from None
            self._grant_frame_gpa[index] = gpa
            self._grant_frame_at[gpa] = index

    def grant_frame_gfns(self, count: int) -> list[int]:
        """GNTTABOP_setup_table: where the guest put shared frames
        0..count-1 (Xen's INVALID_GFN, all ones, for one not mapped)."""
        with self._lock:
            return [self._grant_frame_gpa.get(index, abi.INVALID_GPA << PAGE_SHIFT) >> PAGE_SHIFT
                    for index in range(count)]

    def grant_status_gfns(self, count: int) -> list[int]:
        """GNTTABOP_get_status_frames: where the guest put status frames
        0..count-1 (Xen's INVALID_GFN, all ones, for one not mapped)."""
        with self._lock:
            return [self._grant_frame_gpa.get(XENMAPIDX_grant_table_status | index, abi.INVALID_GPA << PAGE_SHIFT)
                    >> PAGE_SHIFT for index in range(count)]

    def _grant_status_frames_gone(self) -> None:
        """The guest went back to grant table v1: its status frames leave its
        physical address space (RAM they covered comes back), as on Xen."""
        with self._lock:
            for index, gpa in list(self._grant_frame_gpa.items()):
                if index & XENMAPIDX_grant_table_status:
                    self._unmap_grant_frame(gpa)

    def remove_from_physmap(self, gpfn: int) -> None:
        """XENMEM_remove_from_physmap of an overlay page: the grant frame
        there goes, and RAM it covered comes back. Anything else, RAM
        included, is EINVAL (RAM is given back by decrease_reservation)."""
        gpa = gpfn << PAGE_SHIFT
        with self._lock:
            if gpa not in self._grant_frame_at:
                raise XenError(EINVAL, f"no overlay page at {gpa:#x}")
            with self.machine.others_held():
                self._unmap_grant_frame(gpa)

    # --- ballooning -----------------------------------------------------------------

    def decrease_reservation(self, gpfns: Sequence[int], order: int) -> int:
        """The guest gives back the extents of 2**order RAM pages starting at
        each of `gpfns` (as Xen: any order, not necessarily neighbours): they
        leave its physical address space (KVM sees a hole there) and their
        host memory is dropped. Returns how many, from the first, were given
        back: it stops before the first extent that is not all mapped RAM
        (beyond RAM, given back already or earlier in the list, an overlay,
        the shared_info page).

        The pages go in ascending runs of neighbours, whatever the list's
        order, with the other vCPUs held out of KVM_RUN once for the whole
        list: Linux's balloon driver hands in up to 512 single pages at a
        time, in descending order, and a memslot change per page would cost
        thousands of slot splits and pauses."""
        per_extent = 1 << order
        with self._lock:
            pages: list[range] = []
            starts: dict[int, list[int]] = {}  # earlier extents by first // per_extent: one named twice goes once
            for first in gpfns:
                extent = range(first, first + per_extent)
                bucket = first // per_extent
                if (not self.memory.contains(first << PAGE_SHIFT, per_extent << PAGE_SHIFT)
                        or self._pages_in_use(extent)
                        or any(abs(other - first) < per_extent
                               for near in (bucket - 1, bucket, bucket + 1) for other in starts.get(near, ()))):
                    break
                starts.setdefault(bucket, []).append(first)
                pages.append(extent)
            if not pages:
                return 0
            runs = self._region_runs(_merged((extent.start, len(extent)) for extent in pages))
            if len(runs) > self.vm.memslots.free_slots:
                # Scattered pages, few slots left: one extent at a time, in
                # the guest's order, so that a refusal stops at an extent.
                done = 0
                for extent in pages:
                    if not self._take_out([(extent.start, len(extent))]):
                        break
                    done += 1
                return done
            return len(pages) if self._take_out(runs) else 0

    def _take_out(self, runs: list[tuple[int, int]]) -> bool:
        """Take (first, count) runs of mapped RAM pages out of the guest and
        drop their contents; False, with nothing changed, when KVM has no
        slot left for them (under _lock)."""
        table = self.vm.memslots
        try:
            with self.machine.others_held():  # a split RAM slot is gone for an instant
                for index, (first, count) in enumerate(runs):
                    try:
                        table.unmap(first << PAGE_SHIFT, count << PAGE_SHIFT)
                    except (KvmError, MemslotError):
                        for back, back_count in runs[:index]:  # all or nothing
                            self._restore_ram(back << PAGE_SHIFT, back_count << PAGE_SHIFT)
                        raise
        except (KvmError, MemslotError) as error:
            self._limited.warning("cannot take %d run(s) of pages from %#x out of the guest: %s", len(runs),
                                  runs[0][0] << PAGE_SHIFT, error)
            return False
        for first, count in runs:
            self.memory.discard(first << PAGE_SHIFT, count << PAGE_SHIFT)
            self._ballooned.add(range(first, first + count))
        return True

    def populate_physmap(self, gpfns: Sequence[int], order: int) -> int:
        """The guest asks for the extents of 2**order pages starting at each
        of `gpfns`: pages it gave back return (zeroed), in ascending runs of
        neighbours with the other vCPUs held once. RAM present already is
        left as it is; beyond RAM there is no memory to give (the domain
        never grows past its size), nor under an overlay the guest put over
        a page it gave back. Returns how many extents, from the first, are
        done."""
        per_extent = 1 << order
        with self._lock:
            wanted: list[range] = []
            for first in gpfns:
                extent = range(first, first + per_extent)
                if not self.memory.contains(first << PAGE_SHIFT, per_extent << PAGE_SHIFT) or any(
                        (gpa >> PAGE_SHIFT) in extent and (gpa >> PAGE_SHIFT) in self._ballooned
                        for gpa in self._grant_frame_at):
                    break
                wanted.append(extent)
            back = self._region_runs(_merged(run for extent in wanted for run in self._ballooned.runs(extent)))
            if not back:
                return len(wanted)
            try:
                with self.machine.others_held():  # merging slots deletes them for an instant
                    for first, count in back:
                        self._restore_ram(first << PAGE_SHIFT, count << PAGE_SHIFT)
                        self._ballooned.remove(range(first, first + count))
            except (KvmError, MemslotError) as error:  # KVM refused: the guest may ask again
                self._limited.warning("cannot give pages from %#x back to the guest: %s", first << PAGE_SHIFT, error)
            done = 0
            for extent in wanted:  # those whose pages are all back
                if self._ballooned.any_in(extent):
                    break
                done += 1
            return done

    def _region_runs(self, runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Ascending (first, count) runs of RAM pages, cut where one RAM region ends."""
        cut = []
        for first, count in runs:
            while count:
                region = self.memory.region(first << PAGE_SHIFT)
                part = min(count, (region.end >> PAGE_SHIFT) - first)
                cut.append((first, part))
                first, count = first + part, count - part
        return cut

    def _pages_in_use(self, pages: range) -> bool:
        """Whether any of these frames is not plain mapped RAM (under _lock)."""
        if self.shared_info_gfn in pages or self._ballooned.any_in(pages):
            return True
        return any((p << PAGE_SHIFT) in self._grant_frame_at for p in pages)

    def _unmap_grant_frame(self, gpa: int) -> None:
        """Take the grant frame at `gpa` away, putting back any RAM it hid (under _lock)."""
        index = self._grant_frame_at.pop(gpa)
        del self._grant_frame_gpa[index]
        self.vm.memslots.unmap(gpa, PAGE_SIZE)
        if self.memory.contains(gpa, PAGE_SIZE) and (gpa >> PAGE_SHIFT) not in self._ballooned:
            self._restore_ram(gpa)

    def _restore_ram(self, gpa: int, size: int = PAGE_SIZE) -> None:
        table = self.vm.memslots
        region = self.memory.region(gpa)
        # Joined with the RAM around it at once: no slot more, even when all are in use.
        table.map_joined(gpa, size, self.memory.host_address(gpa), region.gpa, region.end)
        table.coalesce(gpa, region.gpa, region.end)  # no slot left behind per move

    # --- backends' notifications ----------------------------------------------------

    def _console_notified(self) -> None:
        self.pv_console.process()
        self.machine.platform.input_wanted()  # the guest may have made room for input

    # --- snapshot (pyvmm/core/snapshot.py) --------------------------------------------

    def save_state(self) -> dict:
        """The domain's own state and, under their names, every Xen part's
        (platform device, grant table, event channels, xenstore, the guest's
        store connection, each backend device by kind, in config order).

        The domain's own: the guest's uuid, long mode, where shared_info and
        each vcpu_info are, the per-vCPU upcall vectors, the HVM params (the
        callback among them), where each grant frame is mapped, the pages
        given back by ballooning, the userspace timers and the ports of the
        timers KVM runs, the watchdogs (time left on the guest's clock as
        the pause froze it), which vCPUs VCPUOP_down took down and which
        pyvmm halted in SCHEDOP_poll or SCHEDOP_block, the reason
        SCHEDOP_shutdown_code recorded. These are pyvmm's copies; KVM's own
        Xen attributes (shared_info, vcpu_info, time info, runstate, timers,
        upcall vectors, long mode) are saved by the machine through KVM.

        VM paused, event thread. A backend that cannot be drained refuses.
        The disks' queues stay quiesced afterwards: call resume_after_save()
        once guest RAM is saved if the VM goes on."""
        with self._lock:
            own = {
                "xen_version": self.version,
                "vcpus": self.vcpu_count,
                "uuid": self.uuid,
                "long_mode": self.long_mode,
                "shared_info_gfn": self.shared_info_gfn,
                "vcpu_info_gpa": list(self._vcpu_info_gpa),
                "upcall_vectors": list(self._per_vcpu_vector),
                "params": {str(index): value for index, value in sorted(self.params.items())},
                "grant_frames": {str(index): gpa for index, gpa in sorted(self._grant_frame_gpa.items())},
                "ballooned": [[first, count] for first, count in self._ballooned.runs()],
                "timer_ports": list(self._timer_ports),
            }
        own["vcpus_down"] = [self.machine.vcpu_down(index) for index in range(self.vcpu_count)]
        own["vcpus_blocked"] = [self.pollers.waiting(index) for index in range(self.vcpu_count)]
        own["shutdown_code"] = self.dispatcher.shutdown_code
        frozen = self.machine.paused_clock
        own["watchdogs"] = self.watchdogs.save_state(self._guest_time_ns() if frozen is None else frozen)
        own["singleshot_timers"] = [timer.save_state() for timer in self._singleshot]
        own["periodic_timers"] = [timer.save_state() for timer in self._periodic]
        try:
            # The backends first: they quiesce, so that nothing changes the
            # grant table (or guest RAM) while the rest is saved.
            backends = {kind: [device.save_state() for device in devices] for kind, devices in self.backends.items()}
            return versioned(
                STATE_VERSION, domain=own,
                platform=self.platform_device.save_state(),
                gnttab=self.gnttab.save_state(),
                evtchn=self.evtchn.save_state(),
                store=self.store.save_state(),
                xenstore=self.xenstore.save_state(),
                backends=backends,
            )
        except BaseException:
            self.resume_after_save()
            raise

    def resume_after_save(self) -> None:
        """The saved VM goes on (after the machine saved guest RAM and KVM's
        state): the backends quiesced by save_state() work again. Not needed
        after a save that raised (save_state() resumes them itself)."""
        for device in self.xenbus_devices:
            resume = getattr(device, "resume_after_save", None)
            if resume is not None:
                resume()

    def restore_state(self, state: dict) -> None:
        """On the domain MachineBuilder just built, after the machine put the
        guest's RAM back and before any vCPU or worker thread runs. Parts in
        order: the platform device, the grant table and the frames' places
        in the guest's physical map, the domain's copies, event channels, the
        xenstore tree, the guest's store connection, then the backends
        (which map their rings and grants and claim their event channels).
        KVM's own Xen attributes come next (the machine's), then
        finish_restore()."""
        version = check_version(state, "XenDomain", STATE_VERSION)
        own = state.get("domain")
        if not isinstance(own, dict):
            raise SnapshotError("XenDomain: no domain state")
        if own.get("xen_version") != self.version or own.get("vcpus") != self.vcpu_count:
            raise SnapshotError(f"XenDomain: the snapshot is of Xen {own.get('xen_version')!r} with "
                                f"{own.get('vcpus')!r} vCPUs; this VM is {self.version:#x} with {self.vcpu_count}")
        backends = state.get("backends")
        if not isinstance(backends, dict) or {kind: len(devices) if isinstance(devices, list) else None
                                              for kind, devices in backends.items()} != \
                {kind: len(devices) for kind, devices in self.backends.items()}:
            raise SnapshotError("XenDomain: the snapshot's devices are not this VM's")
        copies = self._checked_copies(own)
        down = blocked = [False] * self.vcpu_count
        if version >= 2:
            down, blocked = self._checked_flags(own, "vcpus_down"), self._checked_flags(own, "vcpus_blocked")
            if all(down):
                raise SnapshotError("XenDomain: every vCPU is down (taking the last one down powers the domain off)")
            self.watchdogs.restore_state(own.get("watchdogs"))
            try:
                self.dispatcher.shutdown_code = own.get("shutdown_code")
            except ValueError as error:
                raise SnapshotError(f"XenDomain: bad shutdown_code: {error}") from None
        self.platform_device.restore_state(state.get("platform"))
        self.gnttab.restore_state(state.get("gnttab"))
        for timer, saved in zip(self._singleshot + self._periodic,
                                _list(own, "singleshot_timers", self.vcpu_count) + _list(own, "periodic_timers",
                                                                                        self.vcpu_count)):
            timer.restore_state(saved)
        with self._lock:
            (self.long_mode, self.shared_info_gfn, self._vcpu_info_gpa, self._per_vcpu_vector, params,
             self._timer_ports, ballooned, frames) = copies
            self._restore_physmap(ballooned, frames)
            self.params = params
            self._restore_callback(params.get(abi.HVM_PARAM_CALLBACK_IRQ, 0))
        self.evtchn.restore_state(state.get("evtchn"))
        self.store.restore_state(state.get("store"))
        self.uuid = own["uuid"]
        self.handle = uuid.UUID(self.uuid).bytes
        self.xenstore.restore_state(state.get("xenstore"))
        for kind, devices in self.backends.items():
            for device, saved in zip(devices, backends[kind]):
                device.restore_state(saved)
        for index, is_down in enumerate(down):
            if is_down:  # parks from its first entry on, until VCPUOP_up
                self.machine.set_vcpu_down(index, True)
        self._blocked_at_save = blocked

    def finish_restore(self) -> None:
        """After restore_state() and after the machine restored KVM's own
        state (vCPUs, irqchip, clock, its Xen attributes), before the vCPUs
        and ring workers start: the event channels KVM delivers are
        registered again, every backend is woken once, a pending GSI
        callback is raised, the watchdogs run again on the guest's clock
        (which is back now), and a vCPU pyvmm had halted in SCHEDOP_poll or
        SCHEDOP_block is woken: what it waited for is not saved, and Xen
        allows a spurious wake-up (the guest checks and waits again)."""
        if self.evtchn.fifo_active and self.kvm_features.evtchn_send:
            # As the switch to FIFO did (_event_abi_changed): KVM raises
            # 2-level events only. The timers were the VMM's when saved.
            with self._lock:
                kvm_xen.enable(self.vm, self.kvm_features, evtchn_send=False)
        self.evtchn.finish_restore()
        for device in self.xenbus_devices:
            resume = getattr(device, "finish_restore", None)
            if resume is not None:
                resume()
        if self.callback is Callback.GSI:
            self._assert_callback_if_pending()
        self.watchdogs.finish_restore()
        blocked, self._blocked_at_save = self._blocked_at_save, []
        for index, was_blocked in enumerate(blocked):
            if was_blocked:
                self._unhalt(index)

    def _checked_flags(self, own: dict, key: str) -> list[bool]:
        """One bool per vCPU (SnapshotError)."""
        flags = _list(own, key, self.vcpu_count)
        if not all(isinstance(flag, bool) for flag in flags):
            raise SnapshotError(f"XenDomain: bad {key}")
        return flags

    def _checked_copies(self, own: dict) -> tuple:
        """The domain's saved copies, each checked against this VM (SnapshotError)."""
        def fail(what: str):
            raise SnapshotError(f"XenDomain: bad {what}")

        long_mode = own.get("long_mode")
        if long_mode not in (None, True, False):
            fail("long_mode")
        text = own.get("uuid")
        try:
            uuid.UUID(text)
        except (TypeError, ValueError, AttributeError):
            fail("uuid")
        gfn = own.get("shared_info_gfn")
        if gfn is not None and (not natural(gfn) or not self.memory.contains(gfn << PAGE_SHIFT, PAGE_SIZE)):
            fail("shared_info_gfn")
        vcpu_info = _list(own, "vcpu_info_gpa", self.vcpu_count)
        if not all(gpa is None or (natural(gpa) and self.memory.contains(gpa, VCPU_INFO_SIZE)
                                   and (gpa & (PAGE_SIZE - 1)) + VCPU_INFO_SIZE <= PAGE_SIZE) for gpa in vcpu_info):
            fail("vcpu_info_gpa")
        vectors = _list(own, "upcall_vectors", self.vcpu_count)
        if not all(vector == 0 or (natural(vector) and 0x10 <= vector <= 0xFF) for vector in vectors):
            fail("upcall_vectors")
        ports = _list(own, "timer_ports", self.vcpu_count)
        if not all(port is None or (natural(port) and 0 < port < 4096) for port in ports):
            fail("timer_ports")
        raw = own.get("params")
        if not isinstance(raw, dict):
            fail("params")
        params = {}
        for key, value in raw.items():
            if not (isinstance(key, str) and key.isdecimal() and int(key) < abi.HVM_NR_PARAMS and natural(value)
                    and value < 1 << 64):
                fail(f"HVM param {key!r:.20}")
            params[int(key)] = value
        for index in (abi.HVM_PARAM_STORE_PFN, abi.HVM_PARAM_STORE_EVTCHN, abi.HVM_PARAM_CONSOLE_PFN,
                      abi.HVM_PARAM_CONSOLE_EVTCHN):
            if params.get(index) != self.params.get(index):
                fail(f"HVM param {index} (the toolstack's: {params.get(index)!r}, this VM {self.params.get(index)!r})")
        ballooned = PageSet(self._ballooned.limit)
        for run in own.get("ballooned") if isinstance(own.get("ballooned"), list) else fail("ballooned"):
            if not (isinstance(run, list) and len(run) == 2 and natural(run[0]) and natural(run[1]) and run[1] > 0
                    and self.memory.contains(run[0] << PAGE_SHIFT, run[1] << PAGE_SHIFT)):
                fail("ballooned pages")
            ballooned.add(range(run[0], run[0] + run[1]))
        raw_frames = own.get("grant_frames")
        if not isinstance(raw_frames, dict):
            fail("grant_frames")
        frames = {}
        def frame_index(key) -> bool:  # a table frame, or (v2) a status frame
            if not (isinstance(key, str) and key.isdecimal() and len(key) <= 10):
                return False
            index = int(key)
            if index & XENMAPIDX_grant_table_status:
                return index & ~XENMAPIDX_grant_table_status < self.gnttab.max_status_frames
            return index < self.gnttab.max_frames

        for key, gpa in raw_frames.items():
            if not (frame_index(key) and natural(gpa) and not gpa & (PAGE_SIZE - 1) and gpa < 1 << 52
                    and gpa not in frames.values()):
                fail(f"grant frame {key!r:.20}")
            frames[int(key)] = gpa
        return long_mode, gfn, vcpu_info, vectors, params, ports, ballooned, frames

    def _restore_physmap(self, ballooned: PageSet, frames: dict[int, int]) -> None:
        """Take ballooned pages out of the guest's map again and put the grant
        frames back where the guest had them (under _lock)."""
        try:
            for start, count in ballooned.runs():
                self.vm.memslots.unmap(start << PAGE_SHIFT, count << PAGE_SHIFT)
            self._ballooned = ballooned
            for index, gpa in sorted(frames.items()):
                self.map_grant_frame(index, gpa >> PAGE_SHIFT)
        except (KvmError, MemslotError, XenError) as error:
            raise SnapshotError(f"XenDomain: cannot rebuild the guest's physical map: {error}") from None

    def _restore_callback(self, value: int) -> None:
        """The callback method the guest chose (HVM_PARAM_CALLBACK_IRQ): a
        GSI's irqfd is this process's and is made again; the vector lives in
        KVM (restored by the machine)."""
        kind, data = value >> 56, value & ((1 << 56) - 1)
        if value == 0:
            self.callback = Callback.NONE
        elif kind == abi.HVM_PARAM_CALLBACK_TYPE_VECTOR and 0x10 <= data & 0xFF:
            self.callback = Callback.VECTOR
        elif kind == abi.HVM_PARAM_CALLBACK_TYPE_GSI and 0 < data < layout.IOAPIC_PINS:
            self._start_gsi_callback(data)
        elif kind == abi.HVM_PARAM_CALLBACK_TYPE_PCI_INTX:
            self._start_gsi_callback(self._platform_intx_gsi)
        else:
            raise SnapshotError(f"XenDomain: bad callback {value:#x}")

    # --- diagnosis ------------------------------------------------------------------

    def vcpu_diagnosis(self, vcpu, index: int) -> str:
        """vCPU `index`'s Xen timer and upcall state, for a stuck guest's
        last log: whether the event that would wake or tick it is armed or
        left pending. On its own thread (KVM's timer is a vCPU attribute)."""
        port = self._timer_ports[index]
        if port is not None:
            expires = vcpu.xen_vcpu_get_attr(uapi.KVM_XEN_VCPU_ATTR_TYPE_TIMER).u.timer.expires_ns
            due = None if expires == 0 else (expires - self._guest_time_ns()) / 1e9
            timer = diagnose.timer_text(due, f"in KVM, port {port}")
        else:
            timer = diagnose.timer_text(self._singleshot[index].due_in(), "in pyvmm")
            periodic = self._periodic[index].due_in()
            if periodic is not None:
                timer += "; " + diagnose.timer_text(periodic, "periodic")
        gpa = self._vcpu_info_gpa_of(index)
        pending = selector = "?"
        if gpa is not None:
            word = self._ulong_size()
            pending = self.memory.read(gpa, 1)[0]
            selector = f"{int.from_bytes(self.memory.read(gpa + word, word), 'little'):#x}"
        vector = self._per_vcpu_vector[index]
        via = f"per-vCPU vector {vector:#x}" if vector else f"callback {self.callback.value}"
        return (f"Xen: {timer}; upcall_pending={pending} pending_sel={selector} ({via})"
                + self._kernel_vcpu_info_text(vcpu, index))

    def _kernel_vcpu_info_text(self, vcpu, index: int) -> str:
        """Where KVM writes this vCPU's upcall flags, when that is not where
        pyvmm and the guest look (a vcpu_info move KVM missed would lose
        every event KVM raises there)."""
        if not self.kvm_features.vcpu_attrs:
            return ""
        try:
            kernel_gpa = vcpu.xen_vcpu_get_attr(uapi.KVM_XEN_VCPU_ATTR_TYPE_VCPU_INFO).u.gpa
        except OSError as error:
            return f"; KVM's vcpu_info unknown ({error.strerror})"
        wanted = self._kernel_vcpu_info_gpa(index)
        if kernel_gpa == wanted:
            return ""
        return f"; KVM's vcpu_info at {kernel_gpa:#x}, not at {'none' if wanted == abi.INVALID_GPA else hex(wanted)}"

    def diagnostics(self) -> list[str]:
        """The xenstore ring and the store and console event channels, a few
        lines for a stuck guest's last log (event thread)."""
        ports = {entry["port"]: entry for entry in self.evtchn.snapshot()}
        output = self.machine.console
        idle = None if output.last_write is None else time.monotonic() - output.last_write
        return [
            diagnose.xenstore_ring_line(self.xenstore.ring.snapshot())
            + f"; {self.xenstore.lost_wakeups} lost wake-up(s) found by the once-a-second check",
            diagnose.event_channel_line("xenstore", ports.get(self.store_channel.guest_port)),
            diagnose.console_ring_line(self.pv_console.snapshot(), output.written, idle)
            + f"; {self.console_lost_wakeups} lost wake-up(s) found by the once-a-second check",
            diagnose.event_channel_line("console", ports.get(self.console_channel.guest_port)),
            diagnose.pending_ports_line(ports.values()),
            f"upcalls raised again by the {UPCALL_RECHECK_SECONDS:g}-second check: {self.upcalls_raised_again}",
        ]


def _merged(runs) -> list[tuple[int, int]]:
    """(first, count) runs of pages, in any order and overlapping, as
    ascending runs with neither overlaps nor neighbours."""
    merged: list[tuple[int, int]] = []
    for first, count in sorted(runs):
        if merged and first <= merged[-1][0] + merged[-1][1]:
            last_first, last_count = merged[-1]
            merged[-1] = (last_first, max(last_count, first + count - last_first))
        else:
            merged.append((first, count))
    return merged


def _list(state: dict, key: str, length: int) -> list:
    value = state.get(key)
    if not isinstance(value, list) or len(value) != length:
        raise SnapshotError(f"XenDomain: {key} is not a list of {length}")
    return value


def primary_console(cmdline: str) -> str:
    """The console Linux makes /dev/console: the last console= on its command line."""
    consoles = [word.split("=", 1)[1] for word in cmdline.split() if word.startswith("console=")]
    return consoles[-1] if consoles else "tty0"


class _GsiAwareKernelEvtchn(KernelEvtchn):
    """KVM's delivery sets upcall_pending but only injects vector callbacks;
    a GSI callback's line is ours to raise.

    vCPU 0's events under a GSI callback are therefore not sent through
    KVM at all (delivers_to), as QEMU does: when KVM cannot reach a vCPU's
    vcpu_info at once (its cache of the page is invalid after any memslot
    change, or after the host moved the page), it keeps the selector bit in
    the kernel and sets upcall_pending only when that vCPU next enters the
    guest (kvm_xen_set_evtchn_fast, kvm_xen_inject_pending_events). A check
    of upcall_pending right after the send would find it clear, and the
    line would stay low while upcall_pending is set: until another send
    through KVM, as a delivery made here finds upcall_pending already set
    and raises nothing. The check after a send stays for a send that races
    with the guest switching to the GSI."""

    def __init__(self, domain: XenDomain):
        super().__init__(domain.vm)
        self._domain = domain

    def delivers_to(self, vcpu: int) -> bool:
        domain = self._domain
        return vcpu != 0 or domain.callback is not Callback.GSI or bool(domain._per_vcpu_vector[0])

    def send(self, port: int, vcpu: int) -> None:
        super().send(port, vcpu)
        if self._domain.callback is Callback.GSI:
            self._domain._assert_callback_if_pending()
