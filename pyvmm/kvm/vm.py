"""A KVM virtual machine: memory slots, interrupt wiring, Xen settings, vCPUs.

Interrupt controller choice: pyvmm uses KVM's full in-kernel irqchip
(PIC + IOAPIC + LAPIC, KVM_CREATE_IRQCHIP) and the in-kernel PIT
(KVM_CREATE_PIT2). Interrupt delivery, EOIs, timers and IPIs then never
enter Python, which matters because every exit to this process costs far
more than the kernel spends on them. It is also what KVM's Xen support
wants: upcall vectors and in-kernel event-channel delivery need the
in-kernel LAPIC. Devices raise interrupts with irq_line() or, without a
syscall from their own thread, through an irqfd; a level-triggered line
that must be re-raised while the device still asserts it after the guest's
EOI uses an irqfd with a resample eventfd. create_irqchip() and
create_pit2() are plain methods: the machine calls them, before creating
vCPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Union

from . import uapi
from .ioctl import ioctl
from .memslots import MemslotTable
from .uapi import as_struct, enable_cap_struct, ffi
from .vcpu import Vcpu, install_kick_handler


# --- GSI routes (KVM_SET_GSI_ROUTING) -----------------------------------------

@dataclass(frozen=True)
class IrqchipRoute:
    gsi: int
    irqchip: int  # KVM_IRQCHIP_PIC_MASTER / _PIC_SLAVE / _IOAPIC
    pin: int


@dataclass(frozen=True)
class MsiRoute:
    gsi: int
    address: int
    data: int


@dataclass(frozen=True)
class XenEvtchnRoute:
    """Raising `gsi` (irqfd) delivers Xen event channel `port` to `vcpu`."""

    gsi: int
    port: int
    vcpu: int  # KVM vCPU id (= APIC ID)
    priority: int = uapi.KVM_IRQ_ROUTING_XEN_EVTCHN_PRIO_2LEVEL


Route = Union[IrqchipRoute, MsiRoute, XenEvtchnRoute]


def pc_irqchip_routes(ioapic_pins: int = 24) -> list[IrqchipRoute]:
    """The PC wiring of GSIs onto the PICs and the IOAPIC.

    Setting a routing table replaces KVM's default one, so callers adding
    their own routes start from this. As on every PC with an IOAPIC (and in
    the MADT's interrupt source override), the PIT's ISA IRQ 0 reaches
    IOAPIC pin 2: the in-kernel PIT raises GSI 0, so GSI 0 is routed to
    IOAPIC pin 2 and GSI 2 (the PIC cascade) has no IOAPIC route.
    """
    routes = []
    for irq in range(16):
        if irq == 2:
            continue  # the cascade input of the master PIC
        chip = uapi.KVM_IRQCHIP_PIC_MASTER if irq < 8 else uapi.KVM_IRQCHIP_PIC_SLAVE
        routes.append(IrqchipRoute(irq, chip, irq % 8))
    for gsi in range(ioapic_pins):
        if gsi == 2:
            continue
        routes.append(IrqchipRoute(gsi, uapi.KVM_IRQCHIP_IOAPIC, 2 if gsi == 0 else gsi))
    return routes


def _fill_route(entry, route: Route) -> None:
    if isinstance(route, IrqchipRoute):
        entry.type = uapi.KVM_IRQ_ROUTING_IRQCHIP
        entry.u.irqchip.irqchip = route.irqchip
        entry.u.irqchip.pin = route.pin
    elif isinstance(route, MsiRoute):
        entry.type = uapi.KVM_IRQ_ROUTING_MSI
        entry.u.msi.address_lo = route.address & 0xFFFF_FFFF
        entry.u.msi.address_hi = route.address >> 32
        entry.u.msi.data = route.data
    elif isinstance(route, XenEvtchnRoute):
        entry.type = uapi.KVM_IRQ_ROUTING_XEN_EVTCHN
        entry.u.xen_evtchn.port = route.port
        entry.u.xen_evtchn.vcpu = route.vcpu
        entry.u.xen_evtchn.priority = route.priority
    else:
        raise TypeError(f"not a GSI route: {route!r}")
    entry.gsi = route.gsi


IRQCHIP_STATE_SIZE = 512  # kvm_irqchip's union: a PIC's or the IOAPIC's state


@dataclass(frozen=True)
class ClockData:
    """KVM_GET_CLOCK: kvmclock in ns; realtime/host_tsc valid per `flags`."""

    clock: int
    flags: int
    realtime: int
    host_tsc: int


class Vm:
    def __init__(self, system_fd: int, vcpu_mmap_size: int, machine_type: int = 0):
        """A new VM of /dev/kvm's `system_fd` (made by Kvm.create_vm); each
        vCPU's kvm_run mapping is `vcpu_mmap_size` bytes."""
        # vCPU threads are kicked with a signal whose handler only the main
        # thread can install; the VM is created there, before any vCPU.
        install_kick_handler()
        self.fd = ioctl(system_fd, uapi.KVM_CREATE_VM, machine_type)
        self._vcpu_mmap_size = vcpu_mmap_size
        self._memslots: MemslotTable | None = None
        self.xen_hypercall_msr = 0  # KVM_XEN_HVM_CONFIG's MSR, once set

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_extension(self, cap: int) -> int:
        """Capabilities as this VM sees them (some differ per VM)."""
        return ioctl(self.fd, uapi.KVM_CHECK_EXTENSION, cap)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        ioctl(self.fd, uapi.KVM_ENABLE_CAP, enable_cap_struct(cap, args, flags))

    # --- x86 set-up -----------------------------------------------------------

    def set_tss_addr(self, address: int) -> None:
        """Three pages KVM needs for real-mode emulation on VMX; no RAM there."""
        ioctl(self.fd, uapi.KVM_SET_TSS_ADDR, address)

    def set_identity_map_addr(self, address: int) -> None:
        ioctl(self.fd, uapi.KVM_SET_IDENTITY_MAP_ADDR, ffi.new("uint64_t *", address))

    def create_irqchip(self) -> None:
        ioctl(self.fd, uapi.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = uapi.KVM_PIT_SPEAKER_DUMMY) -> None:
        """In-kernel i8254; the dummy speaker port (0x61) stays in the kernel too."""
        ioctl(self.fd, uapi.KVM_CREATE_PIT2, ffi.new("struct kvm_pit_config *", {"flags": flags}))

    def get_irqchip(self, chip: int) -> bytes:
        """The in-kernel PIC master, PIC slave or IOAPIC (`chip`: KVM_IRQCHIP_*)
        as KVM's 512-byte kvm_irqchip union holds it."""
        state = ffi.new("struct kvm_irqchip *", {"chip_id": chip})
        ioctl(self.fd, uapi.KVM_GET_IRQCHIP, state)
        return bytes(ffi.buffer(state.chip.dummy))

    def set_irqchip(self, chip: int, data: bytes) -> None:
        if len(data) != IRQCHIP_STATE_SIZE:
            raise ValueError(f"an irqchip state is 512 bytes, not {len(data)}")
        state = ffi.new("struct kvm_irqchip *", {"chip_id": chip})
        ffi.buffer(state.chip.dummy)[:] = data
        ioctl(self.fd, uapi.KVM_SET_IRQCHIP, state)

    def get_pit2(self):
        """A `struct kvm_pit_state2 *`: the in-kernel PIT's three channels."""
        state = ffi.new("struct kvm_pit_state2 *")
        ioctl(self.fd, uapi.KVM_GET_PIT2, state)
        return state

    def set_pit2(self, state) -> None:
        """Each channel's count restarts from now (KVM reloads it)."""
        ioctl(self.fd, uapi.KVM_SET_PIT2, as_struct("struct kvm_pit_state2 *", state))

    # --- memory ----------------------------------------------------------------

    def set_user_memory_region(
        self, slot: int, gpa: int, size: int, host_address: int, flags: int = 0
    ) -> None:
        """Create, change or (size 0) delete memory slot `slot`."""
        region = ffi.new(
            "struct kvm_userspace_memory_region *",
            {
                "slot": slot,
                "flags": flags,
                "guest_phys_addr": gpa,
                "memory_size": size,
                "userspace_addr": host_address,
            },
        )
        ioctl(self.fd, uapi.KVM_SET_USER_MEMORY_REGION, region)

    @property
    def memslots(self) -> MemslotTable:
        """The VM's slot table; map and unmap guest memory through it."""
        if self._memslots is None:
            limit = self.check_extension(uapi.KVM_CAP_NR_MEMSLOTS)
            self._memslots = MemslotTable(self.set_user_memory_region, limit)
        return self._memslots

    # --- interrupts -------------------------------------------------------------

    def irq_line(self, gsi: int, level: bool) -> None:
        ioctl(self.fd, uapi.KVM_IRQ_LINE, ffi.new("struct kvm_irq_level *", {"irq": gsi, "level": int(level)}))

    def signal_msi(self, address: int, data: int) -> bool:
        """Inject an MSI; False when the guest blocked it (masked/not delivered)."""
        msi = ffi.new(
            "struct kvm_msi *",
            {"address_lo": address & 0xFFFF_FFFF, "address_hi": address >> 32, "data": data},
        )
        return ioctl(self.fd, uapi.KVM_SIGNAL_MSI, msi) > 0

    def set_gsi_routing(self, routes: Iterable[Route]) -> None:
        """Replace the whole GSI routing table (see pc_irqchip_routes)."""
        routes = list(routes)
        table = ffi.new("struct kvm_irq_routing *", {"nr": len(routes), "entries": len(routes)})
        for entry, route in zip(table.entries, routes):
            _fill_route(entry, route)
        ioctl(self.fd, uapi.KVM_SET_GSI_ROUTING, table)

    def irqfd(self, eventfd: int, gsi: int, resample_fd: int | None = None) -> None:
        """Writing `eventfd` raises `gsi`. With `resample_fd` the line is level
        triggered: KVM lowers it on the guest's EOI and signals resample_fd so
        the device can raise it again if it still asserts it."""
        flags = 0 if resample_fd is None else uapi.KVM_IRQFD_FLAG_RESAMPLE
        self._irqfd(eventfd, gsi, flags, resample_fd or 0)

    def irqfd_remove(self, eventfd: int, gsi: int) -> None:
        self._irqfd(eventfd, gsi, uapi.KVM_IRQFD_FLAG_DEASSIGN, 0)

    def _irqfd(self, eventfd: int, gsi: int, flags: int, resample_fd: int) -> None:
        request = ffi.new(
            "struct kvm_irqfd *",
            {"fd": eventfd, "gsi": gsi, "flags": flags, "resamplefd": resample_fd},
        )
        ioctl(self.fd, uapi.KVM_IRQFD, request)

    def ioeventfd(
        self, eventfd: int, address: int, size: int, pio: bool, datamatch: int | None = None
    ) -> None:
        """A guest write of `size` bytes at `address` (port when `pio`) signals
        `eventfd` inside the kernel instead of exiting to userspace."""
        self._ioeventfd(eventfd, address, size, pio, datamatch, 0)

    def ioeventfd_remove(
        self, eventfd: int, address: int, size: int, pio: bool, datamatch: int | None = None
    ) -> None:
        self._ioeventfd(eventfd, address, size, pio, datamatch, uapi.KVM_IOEVENTFD_FLAG_DEASSIGN)

    def _ioeventfd(self, eventfd, address, size, pio, datamatch, flags) -> None:
        if pio:
            flags |= uapi.KVM_IOEVENTFD_FLAG_PIO
        if datamatch is not None:
            flags |= uapi.KVM_IOEVENTFD_FLAG_DATAMATCH
        request = ffi.new(
            "struct kvm_ioeventfd *",
            {"datamatch": datamatch or 0, "addr": address, "len": size, "fd": eventfd, "flags": flags},
        )
        ioctl(self.fd, uapi.KVM_IOEVENTFD, request)

    # --- clock ---------------------------------------------------------------------

    def get_clock(self) -> ClockData:
        data = ffi.new("struct kvm_clock_data *")
        ioctl(self.fd, uapi.KVM_GET_CLOCK, data)
        return ClockData(data.clock, data.flags, data.realtime, data.host_tsc)

    def set_clock(self, clock: int, realtime: int | None = None) -> None:
        """Set kvmclock; with `realtime` KVM advances it by the time elapsed
        since that CLOCK_REALTIME instant (KVM_CLOCK_REALTIME)."""
        fields = {"clock": clock}
        if realtime is not None:
            fields.update(flags=uapi.KVM_CLOCK_REALTIME, realtime=realtime)
        ioctl(self.fd, uapi.KVM_SET_CLOCK, ffi.new("struct kvm_clock_data *", fields))

    # --- Xen --------------------------------------------------------------------

    def xen_hvm_config(self, flags: int, msr: int) -> None:
        """KVM_XEN_HVM_CONFIG. `msr` is the hypercall-page MSR; set it even when
        hypercalls are intercepted (KVM keys interception off it)."""
        if flags & ~uapi.KVM_XEN_HVM_SETTABLE_FLAGS:
            raise ValueError(
                f"Xen config flags {flags:#x} include capability-only bits; "
                f"settable are {uapi.KVM_XEN_HVM_SETTABLE_FLAGS:#x}"
            )
        config = ffi.new("struct kvm_xen_hvm_config *", {"flags": flags, "msr": msr})
        ioctl(self.fd, uapi.KVM_XEN_HVM_CONFIG, config)
        self.xen_hypercall_msr = msr

    def xen_hvm_get_attr(self, attr_type: int):
        """A `struct kvm_xen_hvm_attr *` holding attribute `attr_type`."""
        attr = ffi.new("struct kvm_xen_hvm_attr *", {"type": attr_type})
        ioctl(self.fd, uapi.KVM_XEN_HVM_GET_ATTR, attr)
        return attr

    def xen_hvm_set_attr(self, attr) -> None:
        """`attr`: a cffi `struct kvm_xen_hvm_attr *` or its initializer, e.g.
        {"type": KVM_XEN_ATTR_TYPE_SHARED_INFO, "u": {"shared_info": {"gfn": n}}}."""
        ioctl(self.fd, uapi.KVM_XEN_HVM_SET_ATTR, as_struct("struct kvm_xen_hvm_attr *", attr))

    def xen_evtchn_send(
        self, port: int, vcpu: int, priority: int = uapi.KVM_IRQ_ROUTING_XEN_EVTCHN_PRIO_2LEVEL
    ) -> None:
        """Deliver event channel `port` to the guest (KVM_XEN_HVM_EVTCHN_SEND)."""
        send = ffi.new("struct kvm_irq_routing_xen_evtchn *")  # cheaper than initialising from a dict
        send.port, send.vcpu, send.priority = port, vcpu, priority
        ioctl(self.fd, uapi.KVM_XEN_HVM_EVTCHN_SEND, send)

    # --- vCPUs ---------------------------------------------------------------------

    def create_vcpu(self, index: int) -> Vcpu:
        """Create vCPU `index` (its KVM id and APIC ID). Call this from the
        thread that will run it: kick() signals the creating thread."""
        return Vcpu(self, index, self._vcpu_mmap_size)

