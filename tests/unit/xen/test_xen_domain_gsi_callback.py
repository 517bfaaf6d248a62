"""The GSI / PCI INTx callback's line, with KVM's in-kernel event channels
on: asserted while vCPU 0's evtchn_upcall_pending is set, looked at again
on the guest's EOI.

The domain is a real XenDomain; KVM is a stand-in that delivers
KVM_XEN_HVM_EVTCHN_SEND as kvm_xen_set_evtchn_fast does (2-level, 64-bit),
including its deferred case: when the vCPU's cached vcpu_info mapping is
invalid (after any memslot change, or the host moving the page) KVM keeps
the selector bit in the kernel and sets upcall_pending only when that vCPU
next enters the guest (kvm_xen_inject_pending_events), with no word to the
VMM. The line is the irqfd's trigger eventfd: a write asserts it."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from pyvmm.config import VmConfig
from pyvmm.core.eventloop import drain_eventfd
from pyvmm.core.trace import Tracer
from pyvmm.kvm import uapi
from pyvmm.xen import abi
from pyvmm.xen.abi import PAGE_SHIFT
from pyvmm.xen.domain import Callback, XenDomain

from test_xen_domain_lifecycle import RAM, SHARED_INFO_GFN, FakeMachine, FakeVm

EVTCHN_PENDING = 0x800  # shared_info, 64-bit
EVTCHN_MASK = 0xA00
PENDING_SEL = 8  # vcpu_info, 64-bit
INTX_CALLBACK = (abi.HVM_PARAM_CALLBACK_TYPE_PCI_INTX << 56) | (3 << 11)  # slot 3, INTA


class KvmXenVm(FakeVm):
    """FakeVm plus KVM's in-kernel delivery and the irqfds."""

    def __init__(self):
        super().__init__()
        self.domain = None
        self.sends = []
        self.irqfds = {}  # gsi -> (trigger, resample)
        self.vcpu_info_cached = True  # KVM's cache of the vCPUs' vcpu_info pages is valid
        self.deferred_sel = {}  # vCPU -> selector bits KVM keeps until that vCPU enters

    def irqfd(self, eventfd, gsi, resample_fd=None):
        self.irqfds[gsi] = (eventfd, resample_fd)

    def irqfd_remove(self, eventfd, gsi):
        self.irqfds.pop(gsi, None)

    def _bit(self, gpa, bit, set_it=False):
        byte = self.domain.memory.read(gpa + bit // 8, 1)[0]
        if set_it:
            self.domain.memory.write(gpa + bit // 8, bytes([byte | 1 << bit % 8]))
        return bool(byte & 1 << bit % 8)

    def xen_evtchn_send(self, port, vcpu):
        self.sends.append((port, vcpu))
        shared_info = self.domain.shared_info_gfn << PAGE_SHIFT
        if self._bit(shared_info + EVTCHN_PENDING, port, set_it=True) or self._bit(shared_info + EVTCHN_MASK, port):
            return
        if not self.vcpu_info_cached:
            self.deferred_sel[vcpu] = self.deferred_sel.get(vcpu, 0) | 1 << port // 64
            return  # KVM kicks the vCPU; nothing the VMM can see changed
        vcpu_info = self.domain._vcpu_info_gpa_of(vcpu)
        if not self._bit(vcpu_info + PENDING_SEL, port // 64, set_it=True):
            self.domain.memory.write(vcpu_info, b"\x01")

    def enter_guest(self, vcpu):
        """What KVM does first when `vcpu` next enters (kvm_xen_inject_pending_events)."""
        bits = self.deferred_sel.pop(vcpu, 0)
        if bits:
            self.vcpu_info_cached = True  # refreshed on the vCPU's own thread
            vcpu_info = self.domain._vcpu_info_gpa_of(vcpu)
            sel = int.from_bytes(self.domain.memory.read(vcpu_info + PENDING_SEL, 8), "little") | bits
            self.domain.memory.write(vcpu_info + PENDING_SEL, sel.to_bytes(8, "little"))
            self.domain.memory.write(vcpu_info, b"\x01")


@pytest.fixture
def machine():
    config = VmConfig(kernel=Path("/nonexistent"), memory=RAM, vcpus=2, name="gsi", cmdline="console=hvc0")
    machine = FakeMachine(config)
    vm = KvmXenVm()
    vm.regions, vm.memslots = machine.vm.regions, machine.vm.memslots  # where guest memory was mapped
    machine.vm = vm
    machine.kvm = SimpleNamespace(xen_capabilities=lambda: (uapi.KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL
                                                            | uapi.KVM_XEN_HVM_CONFIG_SHARED_INFO
                                                            | uapi.KVM_XEN_HVM_CONFIG_EVTCHN_SEND))
    yield machine
    machine.loop.close()
    machine.memory.close()


@pytest.fixture
def domain(machine):
    domain = XenDomain(machine)
    machine.vm.domain = domain
    domain.note_long_mode(True)
    domain.map_shared_info(SHARED_INFO_GFN)
    yield domain
    domain.close()


def upcall_pending(domain, vcpu=0):
    return domain.memory.read(domain._vcpu_info_gpa_of(vcpu), 1)[0]


def acknowledge(domain, vcpu=0):
    """The guest's upcall handler: upcall_pending, then the selector, cleared."""
    gpa = domain._vcpu_info_gpa_of(vcpu)
    domain.memory.write(gpa, b"\x00")
    domain.memory.write(gpa + PENDING_SEL, bytes(8))


def intx_callback(domain):
    """The guest picks the INTx callback, with nothing pending; returns the line."""
    acknowledge(domain)
    domain.hvm_set_param(abi.HVM_PARAM_CALLBACK_IRQ, INTX_CALLBACK)
    assert domain.callback is Callback.GSI
    trigger, resample = domain.vm.irqfds[domain._platform_intx_gsi]
    drain_eventfd(trigger)
    return trigger, resample


def test_the_line_is_raised_when_kvm_would_have_set_upcall_pending_later(domain):
    """A send while KVM's vcpu_info cache is stale (a memslot changed): were
    it made through KVM, upcall_pending would be set at vCPU 0's next entry
    and the line never raised."""
    trigger, _ = intx_callback(domain)
    domain.vm.vcpu_info_cached = False
    domain.store_channel.notify()  # xenstore's reply
    domain.vm.enter_guest(0)
    assert upcall_pending(domain) == 1
    assert drain_eventfd(trigger), "vCPU 0 has an event pending and its callback line was never raised"


def test_eoi_raises_the_line_again_only_while_upcall_pending_is_set(domain):
    trigger, resample = intx_callback(domain)
    domain.store_channel.notify()
    assert upcall_pending(domain) == 1 and drain_eventfd(trigger)
    # An event arrives while the guest handles the last one: at its EOI the line goes up again.
    acknowledge(domain)
    domain.console_channel.notify()
    os.eventfd_write(resample, 1)
    domain._callback_resampled()
    assert drain_eventfd(trigger)
    # Handled and nothing new: the EOI leaves the line low.
    acknowledge(domain)
    os.eventfd_write(resample, 1)
    domain._callback_resampled()
    assert not drain_eventfd(trigger)
    assert not drain_eventfd(resample)  # the resample fd was read


def test_kvm_still_delivers_where_it_injects_itself(domain):
    """The other vCPUs, and vCPU 0 with a per-vCPU vector (Linux then still
    names a GSI): KVM's path, deferred delivery included, needs no VMM."""
    intx_callback(domain)
    evtchn = domain.evtchn._kernel
    assert not evtchn.delivers_to(0) and evtchn.delivers_to(1)
    domain.set_evtchn_upcall_vector(0, 0xF3)
    assert evtchn.delivers_to(0)
    domain.store_channel.notify()
    assert domain.vm.sends == [(domain.store_channel.guest_port, 0)]


def test_vector_callback_keeps_kvms_delivery(domain):
    domain.hvm_set_param(abi.HVM_PARAM_CALLBACK_IRQ, (abi.HVM_PARAM_CALLBACK_TYPE_VECTOR << 56) | 0xF3)
    acknowledge(domain)
    domain.store_channel.notify()
    assert domain.vm.sends == [(domain.store_channel.guest_port, 0)]


def test_a_send_kvm_would_not_wake_a_poller_for_kicks_the_vcpu(domain, machine):
    """KVM wakes a vCPU polling an unmasked port only through the kick that
    raises its upcall, so not while the guest leaves upcall_pending and the
    selector set (interrupts off, no callback), as a small guest polling
    the store port for each reply does; Xen wakes pollers on every send."""
    kicks = []
    machine.kick_vcpu = kicks.append
    shared_info = domain.shared_info_gfn << PAGE_SHIFT
    port = domain.store_channel.guest_port

    def take_reply():  # the guest reads the ring and clears the port, not its upcall flags
        byte = domain.memory.read(shared_info + EVTCHN_PENDING + port // 8, 1)[0]
        domain.memory.write(shared_info + EVTCHN_PENDING + port // 8, bytes([byte & ~(1 << port % 8) & 0xFF]))

    acknowledge(domain)
    domain.store_channel.notify()  # the first reply: KVM sets the selector and kicks the vCPU itself
    assert upcall_pending(domain) == 1 and kicks == []
    take_reply()
    domain.store_channel.notify()  # the second: KVM would leave the poller asleep
    assert kicks == [0]
    domain.store_channel.notify()  # still pending: KVM changes nothing, the poller is awake already
    assert kicks == [0]
    take_reply()
    domain.memory.write(shared_info + EVTCHN_MASK + port // 8, bytes([1 << port % 8]))
    domain.store_channel.notify()  # masked: KVM wakes the port's poller itself
    assert kicks == [0] and len(domain.vm.sends) == 4


def test_trace_records_the_upcall_and_the_line(domain, machine):
    tracer = Tracer()
    stream = io.StringIO()
    tracer.attach({"evtchn"}, stream)
    domain.trace = tracer
    machine.if_flag_at_last_exit = lambda index: index == 0
    try:
        intx_callback(domain)
        domain.store_channel.notify()
        tracer.flush()
    finally:
        tracer.close()
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    upcalls = [r for r in records if r["ev"] == "upcall"]
    assert [(r["target_vcpu"], r["via"], r["if_at_last_exit"]) for r in upcalls] == [(0, "gsi", True)]
    assert [r["gsi"] for r in records if r["ev"] == "callback-assert"] == [domain._platform_intx_gsi]


def test_moving_from_the_vector_to_a_line_takes_the_vector_back_from_kvm(domain):
    """KVM injects the HVM-wide vector while it is set: a guest that moves
    its callback to a line (a kexec'd kernel choosing INTx) must not also
    keep getting the vector it had."""
    domain.hvm_set_param(abi.HVM_PARAM_CALLBACK_IRQ, (abi.HVM_PARAM_CALLBACK_TYPE_VECTOR << 56) | 0xF3)
    intx_callback(domain)
    vectors = [attr["u"]["vector"] for attr in domain.vm.attrs
               if attr["type"] == uapi.KVM_XEN_ATTR_TYPE_UPCALL_VECTOR]
    assert vectors[-2:] == [0xF3, 0] and domain.callback is Callback.GSI
