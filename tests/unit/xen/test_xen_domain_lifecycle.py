"""XenDomain's lifecycle hypercalls without KVM: SHUTDOWN_suspend (answered
"suspend cancelled"), the watchdog's shutdown and its on_watchdog actions,
and SHUTDOWN_soft_reset (kexec), which undoes every Xen interface the guest
set up while guest memory stays as it is.

The domain is a real XenDomain on a recording stand-in for KVM's VM and
vCPUs: its event channels (userspace delivery), grant table, xenstore and
console are the real ones."""

from __future__ import annotations

import contextlib
import ctypes
from errno import EINVAL
from functools import partial
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from pyvmm.config import VmConfig
from pyvmm.core import layout
from pyvmm.core.bus import Bus
from pyvmm.core.eventloop import EventLoop
from pyvmm.core.memory import GuestMemory
from pyvmm.core.stop import StopReason
from pyvmm.kvm import uapi
from pyvmm.kvm.memslots import MemslotTable, map_guest_memory
from pyvmm.xen import abi
from pyvmm.xen.abi import PAGE_SHIFT, PAGE_SIZE
from pyvmm.xen.backend.xenbus_backend import XenbusBackendDevice, XenbusState
from pyvmm.xen.domain import Callback, XenDomain
from pyvmm.xen.errors import XenError
from pyvmm.xen.hv import kvm_xen
from pyvmm.xen.hv.gnttab import GNTTAB_RESERVED_XENSTORE, GTF_permit_access
from pyvmm.xen.hv.watchdog import Expiry

RAM = 16 << 20
SHARED_INFO_GFN = 0x800
FRAME_GFN = 0x900  # a grant frame laid over RAM, as XTF does


class FakeVm:
    """What XenDomain asks of KVM's VM, recorded."""

    def __init__(self):
        self.attrs = []
        self.regions = {}
        self.memslots = MemslotTable(self._set_region, 64, page_size=PAGE_SIZE)
        self.clock_ns = 123 * 10**9  # the guest's clock (KVM_GET_CLOCK)

    def _set_region(self, slot, gpa, size, host_address, flags):
        if size == 0:
            del self.regions[slot]
        else:
            self.regions[slot] = (gpa, size, host_address)

    def backing(self, gpa):
        for base, size, host in self.regions.values():
            if base <= gpa < base + size:
                return host + gpa - base
        return None

    def xen_hvm_config(self, flags, msr):
        pass

    def xen_hvm_set_attr(self, attr):
        self.attrs.append(attr)

    def get_clock(self):
        return SimpleNamespace(clock=self.clock_ns)


class FakeMachine:
    def __init__(self, config: VmConfig):
        self.config = config
        self.kvm = SimpleNamespace(xen_capabilities=lambda: (uapi.KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL
                                                              | uapi.KVM_XEN_HVM_CONFIG_SHARED_INFO))
        self.vm = FakeVm()
        ranges = layout.ram_ranges(config.memory) + [(layout.XEN_SPECIAL_PAGES, layout.XEN_SPECIAL_PAGES_SIZE)]
        self.memory = GuestMemory(ranges)
        map_guest_memory(self.vm.memslots, self.memory)
        self.loop = EventLoop()
        self.pio = Bus("pio", 1 << 16)
        self.platform = SimpleNamespace(pci=SimpleNamespace(add=lambda device: 3), input_sink=None,
                                        input_wanted=lambda: None)
        self.console = SimpleNamespace(write=lambda data: None)
        from pyvmm.core.faults import NULL_FAULTS
        from pyvmm.core.trace import NULL_TRACE

        self.trace, self.faults = NULL_TRACE, NULL_FAULTS
        self.paused = False
        self.paused_clock = None
        self.down = [False] * config.vcpus
        self.stops = []
        self.events = []
        self.vcpu_attrs = []  # (vCPU index, attribute type, values), on the vCPU's "thread"

    def run_on_vcpu(self, index, function, timeout=10.0):
        return function(SimpleNamespace(
            index=index, xen_vcpu_set_attr=lambda attr: self.vcpu_attrs.append((index, attr["type"], attr["u"])),
            get_mp_state=lambda: uapi.KVM_MP_STATE_RUNNABLE))

    def vcpu_down(self, index):
        return self.down[index]

    def set_vcpu_down(self, index, down):
        self.down[index] = down

    def kick_vcpu(self, index):
        pass

    def request_stop(self, reason, detail=None):
        self.stops.append((reason, detail))

    def pause(self):
        self.paused = True

    def control_event(self, name, data):
        self.events.append((name, data))

    def others_held(self):  # memslot changes: no other vCPU here to hold out of KVM_RUN
        return contextlib.nullcontext()


class Device(XenbusBackendDevice):
    """A PV device that takes one ring page and one event channel."""

    device_type = "vtest"

    def __init__(self, domain):
        super().__init__(domain.store, domain.domid, 0)
        self.evtchn, self.grants = domain.evtchn, domain.gnttab
        self.connects = 0

    def connect(self):
        self.map_ring_page("ring-ref", self.read_frontend_uint("ring-ref"))
        self.bind_channel("event-channel", self.read_frontend_uint("event-channel"), lambda: None)
        self.connects += 1

    def disconnect(self):
        self.release_connection()


@pytest.fixture
def machine():
    config = VmConfig(kernel=Path("/nonexistent"), memory=RAM, vcpus=2, name="lifecycle", cmdline="console=hvc0")
    machine = FakeMachine(config)
    yield machine
    machine.loop.close()
    machine.memory.close()


@pytest.fixture
def domain(machine):
    domain = XenDomain(machine)
    yield domain
    domain.close()


def guest_path(domain, relative=""):
    return f"/local/domain/{domain.domid}/{relative}".rstrip("/")


# --- SHUTDOWN_suspend ------------------------------------------------------------------------


def test_suspend_is_cancelled_and_the_guest_runs_on(domain, machine, caplog):
    with caplog.at_level(logging.WARNING):
        assert domain.shutdown(abi.SHUTDOWN_suspend) == 1
    assert machine.stops == []
    assert "SHUTDOWN_suspend" in caplog.text and "suspend cancelled" in caplog.text


def test_feature_suspend_is_left_to_the_guest(domain):
    guest = domain.store.client(domain.domid)
    assert guest.read(guest_path(domain, "control/feature-suspend")) == b""
    guest.write(guest_path(domain, "control/feature-suspend"), "1")  # Linux's own announcement


# --- the watchdog's shutdown ----------------------------------------------------------------


@pytest.mark.parametrize("action", ["destroy", "restart"])
def test_an_expired_watchdog_stops_the_boot(machine, action, caplog):
    machine.config = VmConfig(kernel=Path("/nonexistent"), memory=RAM, name="w", on_watchdog=action)
    domain = XenDomain(machine)
    try:
        with caplog.at_level(logging.WARNING):
            domain._watchdog_expired(Expiry(2, 30))
        assert machine.stops == [(StopReason.WATCHDOG, "watchdog 2")]
        assert "Xen watchdog 2 of domain 1 expired" in caplog.text and "30 s" in caplog.text
    finally:
        domain.close()


def test_shutdown_watchdog_from_the_guest_stops_the_boot_too(domain, machine):
    assert domain.shutdown(abi.SHUTDOWN_watchdog) == 0
    assert machine.stops == [(StopReason.WATCHDOG, "shutdown")]


def test_on_watchdog_preserve_keeps_the_vm_paused(machine):
    machine.config = VmConfig(kernel=Path("/nonexistent"), memory=RAM, name="w", on_watchdog="preserve")
    domain = XenDomain(machine)
    try:
        domain._watchdog_expired(Expiry(1, 5))
        machine.loop.call_soon_threadsafe(machine.loop.stop)
        machine.loop.run()
        assert machine.stops == [] and machine.paused
        assert machine.events == [("SHUTDOWN", {"reason": "watchdog", "detail": "watchdog 1", "preserved": True})]
    finally:
        domain.close()


def test_watchdog_hypercall_reaches_the_domains_watchdogs(domain):
    assert domain.watchdog(0, 60) == 1
    assert list(domain.watchdogs.in_use()) == [1]


@pytest.mark.parametrize("action", ["destroy", "preserve"])
def test_a_restored_domains_watchdog_expires_with_the_configured_action(domain, machine, action):
    S = 10**9
    assert domain.watchdog(0, 30) == 1  # due 30 s of guest time from now
    machine.vm.clock_ns += 12 * S
    machine.paused, machine.paused_clock = True, machine.vm.clock_ns  # as ctl snapshot pauses
    state = json.loads(json.dumps(domain.save_state()))

    config = VmConfig(kernel=Path("/nonexistent"), memory=RAM, vcpus=2, name="restored", cmdline="console=hvc0",
                      on_watchdog=action)
    other = FakeMachine(config)
    restored = XenDomain(other)
    try:
        restored.restore_state(state)
        other.vm.clock_ns = machine.paused_clock  # KVM_SET_CLOCK, then finish_restore
        restored.finish_restore()
        assert restored.watchdogs.in_use() == {1: other.vm.clock_ns + 18 * S}
        other.vm.clock_ns += 18 * S  # the guest never pets it
        other.loop.call_soon_threadsafe(other.loop.stop)
        other.loop.run()
        if action == "destroy":
            assert other.stops == [(StopReason.WATCHDOG, "watchdog 1")]
        else:
            other.loop._stopped.clear()
            other.loop.call_soon_threadsafe(other.loop.stop)
            other.loop.run()
            assert other.stops == [] and other.paused
            assert other.events[-1] == ("SHUTDOWN", {"reason": "watchdog", "detail": "watchdog 1", "preserved": True})
    finally:
        restored.close()
        other.loop.close()
        other.memory.close()


def test_building_the_domain_leaves_the_rings_in_its_special_pages_alone(machine):
    """A restored domain is built over RAM mapped from the snapshot: the
    console and xenstore rings there, indices included, are the guest's.
    (Zeroing them left the restored xenstore server's own indices thousands
    of bytes ahead of the ring's, which it then took for a broken ring.)"""
    console, store = layout.XEN_SPECIAL_PAGES, layout.XEN_SPECIAL_PAGES + 4096
    machine.memory.write(console + 1024, b"hello")  # output data
    machine.memory.write(store + 2048, (8569).to_bytes(4, "little") * 4)  # req_cons, req_prod, rsp_cons, rsp_prod
    domain = XenDomain(machine)
    try:
        assert machine.memory.read(console + 1024, 5) == b"hello"
        assert machine.memory.read(store + 2048, 16) == (8569).to_bytes(4, "little") * 4
    finally:
        domain.close()


# --- SHUTDOWN_soft_reset ---------------------------------------------------------------------


def set_up_like_linux(domain, machine):
    """What a Linux guest sets up: shared_info, per-vCPU vcpu_info and
    upcall vectors, the callback, IPIs and a VIRQ, a grant frame, a
    connected PV device, a xenstore watch, a node of its own."""
    domain.map_shared_info(SHARED_INFO_GFN)
    domain.register_vcpu_info(1, 0x700_040)
    domain.set_evtchn_upcall_vector(0, 0xF3)
    domain.hvm_set_param(abi.HVM_PARAM_CALLBACK_IRQ, (abi.HVM_PARAM_CALLBACK_TYPE_VECTOR << 56) | 0xF3)
    ipi = domain.evtchn.bind_ipi(1)
    timer = domain.evtchn.bind_virq(abi.VIRQ_TIMER, 0)
    domain.map_grant_frame(0, FRAME_GFN)
    frame_ref = 8
    struct_at = domain.gnttab.frame_host_address(0)
    ctypes.memmove(struct_at + frame_ref * 8, bytes([GTF_permit_access, 0, 0, 0]) + (0x123).to_bytes(4, "little"), 8)
    domain.decrease_reservation([0x950], 0)
    # The PV device: the guest offers a ring and a channel, and connects.
    device = domain.backends.setdefault("vtest", [Device(domain)])[0]
    device.start()
    guest = domain.store.client(domain.domid)
    port = domain.evtchn.alloc_unbound(domain.domid, 0)
    guest.write(f"{device.frontend_path}/ring-ref", str(frame_ref))
    guest.write(f"{device.frontend_path}/event-channel", str(port))
    guest.write(f"{device.frontend_path}/state", str(int(XenbusState.CONNECTED)))
    assert device.connected and device.state == XenbusState.CONNECTED
    guest.write(guest_path(domain, "data/old-kernel"), "was here")
    return SimpleNamespace(device=device, ipi=ipi, timer=timer, device_port=port)


def test_soft_reset_leaves_a_domain_as_at_boot_and_memory_as_it_was(domain, machine):
    old = set_up_like_linux(domain, machine)
    machine.memory.write(0x100000, b"the next kernel")  # what kexec loaded
    machine.vcpu_attrs.clear()
    machine.vm.attrs.clear()

    assert domain.shutdown(abi.SHUTDOWN_soft_reset) == 0
    assert machine.stops == [] and domain.soft_resets == 1

    # Guest memory is untouched; the grant frame left the RAM it hid, and
    # the ballooned page is back.
    assert machine.memory.read(0x100000, 15) == b"the next kernel"
    assert machine.vm.backing(FRAME_GFN << PAGE_SHIFT) == machine.memory.host_address(FRAME_GFN << PAGE_SHIFT)
    assert machine.vm.backing(0x950 << PAGE_SHIFT) == machine.memory.host_address(0x950 << PAGE_SHIFT)
    # Nothing of Xen writes into it any more: no shared_info, no callback,
    # each vCPU's areas, upcall vector and timer gone in KVM.
    assert domain.shared_info_gfn is None and domain.callback is Callback.NONE
    assert {"type": uapi.KVM_XEN_ATTR_TYPE_SHARED_INFO,
            "u": {"shared_info": {"gfn": uapi.KVM_XEN_INVALID_GFN}}} in machine.vm.attrs
    assert {"type": uapi.KVM_XEN_ATTR_TYPE_UPCALL_VECTOR, "u": {"vector": 0}} in machine.vm.attrs
    for index in (0, 1):
        reset = {kind: values for vcpu, kind, values in machine.vcpu_attrs if vcpu == index}
        assert reset[uapi.KVM_XEN_VCPU_ATTR_TYPE_VCPU_INFO] == {"gpa": abi.INVALID_GPA}
        assert reset[uapi.KVM_XEN_VCPU_ATTR_TYPE_VCPU_TIME_INFO] == {"gpa": abi.INVALID_GPA}
    assert domain._vcpu_info_gpa == [None, None] and domain._per_vcpu_vector == [0, 0]
    assert domain.hvm_get_param(abi.HVM_PARAM_CALLBACK_IRQ) == 0
    # Every event channel the guest had is closed; xenstore and the console
    # have new ones, in the params and the domain's nodes.
    ports = {entry["port"]: entry for entry in domain.evtchn.snapshot()}
    assert set(ports) == {domain.store_channel.guest_port, domain.console_channel.guest_port}
    assert all(entry["state"] == "interdomain" and entry["backend"] for entry in ports.values())
    assert domain.hvm_get_param(abi.HVM_PARAM_STORE_EVTCHN) == domain.store_channel.guest_port
    assert domain.hvm_get_param(abi.HVM_PARAM_CONSOLE_EVTCHN) == domain.console_channel.guest_port
    guest = domain.store.client(domain.domid)
    assert guest.read(guest_path(domain, "store/port")) == str(domain.store_channel.guest_port).encode()
    assert guest.read(guest_path(domain, "console/port")) == str(domain.console_channel.guest_port).encode()
    assert guest.read(guest_path(domain, "vm")) == f"/vm/{domain.uuid}".encode()
    assert "old-kernel" not in guest.directory(guest_path(domain, "data"))  # the directory is made anew
    # The grant table is empty but for the toolstack's reserved entries.
    assert domain.gnttab.query_size()[0] == 0
    table = ctypes.string_at(domain.gnttab.frame_host_address(0), 16 * 8)
    assert table[8 * 8:9 * 8] == bytes(8)
    assert table[GNTTAB_RESERVED_XENSTORE * 8] == GTF_permit_access
    # The device let go of the guest and starts over for the next kernel.
    assert not old.device.connected and old.device.state == XenbusState.INIT_WAIT
    assert guest.read(f"{old.device.frontend_path}/state") == str(int(XenbusState.INITIALISING)).encode()
    assert "ring-ref" not in guest.directory(old.device.frontend_path)
    assert machine.events == [("RESET", {"reason": "soft-reset"})]


def test_the_next_kernel_sets_the_domain_up_again(domain, machine):
    old = set_up_like_linux(domain, machine)
    domain.shutdown(abi.SHUTDOWN_soft_reset)
    # The next kernel: shared_info elsewhere, its callback, a device again.
    domain.map_shared_info(SHARED_INFO_GFN + 1)
    domain.hvm_set_param(abi.HVM_PARAM_CALLBACK_IRQ, (abi.HVM_PARAM_CALLBACK_TYPE_VECTOR << 56) | 0xF3)
    assert domain.evtchn.bind_virq(abi.VIRQ_TIMER, 0) > 0  # bound afresh: no EEXIST
    domain.map_grant_frame(0, FRAME_GFN)
    guest = domain.store.client(domain.domid)
    port = domain.evtchn.alloc_unbound(domain.domid, 0)
    guest.write(f"{old.device.frontend_path}/ring-ref", "8")
    guest.write(f"{old.device.frontend_path}/event-channel", str(port))
    ctypes.memmove(domain.gnttab.frame_host_address(0) + 8 * 8, bytes([GTF_permit_access, 0, 0, 0])
                   + (0x123).to_bytes(4, "little"), 8)
    guest.write(f"{old.device.frontend_path}/state", str(int(XenbusState.INITIALISED)))
    assert old.device.connected and old.device.connects == 2


def test_a_soft_reset_that_fails_crashes_the_domain(domain, machine, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(22, "KVM said no")

    monkeypatch.setattr(kvm_xen, "set_hvm_upcall_vector", refuse)
    with pytest.raises(XenError):
        domain.shutdown(abi.SHUTDOWN_soft_reset)
    assert machine.stops == [(StopReason.CRASH, "soft-reset")]


def test_soft_reset_keeps_the_watchdogs_as_xen_does(domain):
    domain.watchdog(0, 60)
    domain.shutdown(abi.SHUTDOWN_soft_reset)
    assert list(domain.watchdogs.in_use()) == [1]


def test_a_soft_reset_waits_for_the_event_thread_as_long_as_the_vm_is_paused():
    # A paused VM's event thread may be taking a snapshot, which waits for
    # the resetting vCPU and gives up; the soft reset must not fail (and
    # crash the domain) meanwhile. Running, its wait is bounded.
    queued, ran = [], []
    domain = XenDomain.__new__(XenDomain)
    domain.loop = SimpleNamespace(on_owner_thread=lambda: False, call_soon_threadsafe=queued.append)
    asked = []

    class Machine:
        @property
        def paused(self):
            asked.append(True)
            if len(asked) == 3:  # the snapshot gave up: the event thread runs the reset
                queued.pop()()
            return True

    domain.machine = Machine()
    domain._on_event_thread(lambda: ran.append(domain.vcpu_waiting_for_event_thread), timeout=0.001)
    assert ran == [True] and not domain.vcpu_waiting_for_event_thread
    domain.machine = SimpleNamespace(paused=False)
    with pytest.raises(TimeoutError):
        domain._on_event_thread(lambda: None, timeout=0.001)
    assert not domain.vcpu_waiting_for_event_thread


# --- VCPUOP_register_vcpu_info that KVM does not take ------------------------------------------


def test_a_vcpu_info_move_kvm_did_not_take_leaves_pyvmm_and_kvm_on_the_old_one(machine, domain):
    """The guest's register_vcpu_info for another vCPU runs on that vCPU's
    thread. If that request is refused or times out, the guest is told
    -EINVAL and keeps its old vcpu_info (Linux falls back to shared_info's):
    pyvmm's record must stay there, and KVM too, even when the timed-out
    request runs late; otherwise every event KVM raises for that vCPU lands
    where the guest never looks."""
    domain.map_shared_info(SHARED_INFO_GFN)
    legacy = (SHARED_INFO_GFN << PAGE_SHIFT) + 1 * 64
    late, posted = [], []
    serve = machine.run_on_vcpu

    def timed_out(index, function, timeout=10.0):
        late.append(partial(serve, index, function))
        raise TimeoutError(f"vCPU {index} did not run queued work within {timeout}s")

    machine.run_on_vcpu = timed_out
    machine.post_to_vcpu = lambda index, function: posted.append(partial(serve, index, function))
    machine.vcpu_attrs.clear()
    with pytest.raises(XenError) as refused:
        domain.register_vcpu_info(1, 0x700_040)
    assert refused.value.errno == EINVAL
    assert domain._vcpu_info_gpa_of(1) == legacy
    for run in posted + late:  # the resync first, the late request after it: both land on the record
        run()
    assert [(index, gpa["gpa"]) for index, kind, gpa in machine.vcpu_attrs
            if kind == uapi.KVM_XEN_VCPU_ATTR_TYPE_VCPU_INFO] == [(1, legacy), (1, legacy)]

    machine.run_on_vcpu = serve
    machine.vcpu_attrs.clear()
    domain.register_vcpu_info(1, 0x700_040)
    assert domain._vcpu_info_gpa_of(1) == 0x700_040
    assert [(index, gpa["gpa"]) for index, kind, gpa in machine.vcpu_attrs
            if kind == uapi.KVM_XEN_VCPU_ATTR_TYPE_VCPU_INFO] == [(1, 0x700_040)]


# --- the upcall safety net ---------------------------------------------------------------------


def test_an_upcall_left_pending_is_raised_again_and_a_long_one_is_named_once(machine, domain, caplog):
    """KVM and Xen raise the upcall only when upcall_pending goes 0 -> 1: one
    the guest never got would leave its vCPU deaf to every event. The check
    raises it again from the second check that finds it set, in every
    delivery mode, and says so at WARNING once it has lasted a second on a
    vCPU that was interruptible at its last exit."""
    domain.map_shared_info(SHARED_INFO_GFN)
    domain.set_evtchn_upcall_vector(1, 0xF3)
    msis = []
    machine.vm.signal_msi = lambda address, data: msis.append((address, data)) or True
    machine.if_flag_at_last_exit = lambda index: True
    machine.loop.call_later = lambda delay, function: None  # the checks are run by hand
    vcpu1 = (SHARED_INFO_GFN << PAGE_SHIFT) + 64
    domain._recheck_upcalls()
    assert msis == []
    machine.memory.write(vcpu1, b"\x01")  # raised, never taken
    with caplog.at_level(logging.WARNING, logger="pyvmm.xen.domain"):
        for _ in range(12):
            domain._recheck_upcalls()
    assert msis == [(layout.LAPIC_BASE | 1 << 12, 0xF3)] * 11  # the first check only notes it
    assert domain.upcalls_raised_again == 11
    assert [r.getMessage() for r in caplog.records if "never taken" in r.getMessage()] == [
        "vCPU 1: an upcall pending for 1.0 s, interrupts on at its last exit, was never taken: raised again "
        "(9 raised again so far; per-vCPU vector 0xf3)"]
    machine.memory.write(vcpu1, b"\x00")  # taken: the count starts over
    domain._recheck_upcalls()
    machine.memory.write(vcpu1, b"\x01")
    domain._recheck_upcalls()
    assert len(msis) == 11
    # A callback line reaches vCPU 0 alone: vCPU 1's flag, with no vector of
    # its own, stays set for good and is nothing to raise or warn about.
    domain._per_vcpu_vector[1] = 0
    domain.callback = Callback.GSI
    for _ in range(12):
        domain._recheck_upcalls()
    assert len(msis) == 11 and domain.upcalls_raised_again == 11
