"""The guest's side of 2-level event channels: shared_info (on page 0 of
an anonymous mapping) and the vcpu_info areas it registered (page 1), read
and written as Linux's events_2l.c does (pending and mask bits, the
per-vCPU selector and upcall_pending, cleared first by the upcall handler);
a fake of KVM's in-kernel event channels that records what it was asked,
and a rig that wires both to EventChannels with a hand-run event loop."""

from __future__ import annotations

from pyvmm.xen.hv.evtchn import EventChannels
from pyvmm.xen.hv.shared_info import layout

from .common import PAGE, HostPages

DOMID = 1


class EvtchnGuest:
    """shared_info on page 0; vcpu_info areas the guest registered on page 1."""

    def __init__(self, long_mode=True):
        pages = HostPages(2)
        self.memory = pages.map
        self.base = pages.address
        self.long_mode = long_mode
        self.mapped = True
        self.registered = {}

    def shared_info_address(self):
        return self.base if self.mapped else None

    def vcpu_info_address(self, vcpu):
        return self.registered.get(vcpu)

    def register_vcpu_info(self, vcpu):
        self.registered[vcpu] = self.base + PAGE + 64 * vcpu

    @property
    def abi(self):
        return layout(self.long_mode)

    def _vcpu_info(self, vcpu):
        address = self.registered.get(vcpu, self.base + 64 * vcpu)
        return address - self.base

    def _bit(self, offset, bit):
        return bool(self.memory[offset + bit // 8] & (1 << bit % 8))

    def _set(self, offset, bit, value):
        byte = self.memory[offset + bit // 8]
        mask = 1 << bit % 8
        self.memory[offset + bit // 8] = byte | mask if value else byte & ~mask

    def pending(self, port):
        return self._bit(self.abi.evtchn_pending, port)

    def set_pending(self, port, value=True):
        self._set(self.abi.evtchn_pending, port, value)

    def masked(self, port):
        return self._bit(self.abi.evtchn_mask, port)

    def mask(self, port, value=True):
        self._set(self.abi.evtchn_mask, port, value)

    def selector(self, vcpu):
        offset = self._vcpu_info(vcpu) + self.abi.pending_sel
        return int.from_bytes(self.memory[offset:offset + self.abi.word_bytes], "little")

    def upcall_pending(self, vcpu):
        return self.memory[self._vcpu_info(vcpu) + self.abi.upcall_pending]

    def acknowledge(self, vcpu):
        """What the guest's upcall handler does first."""
        offset = self._vcpu_info(vcpu)
        self.memory[offset + self.abi.upcall_pending] = 0
        self.memory[offset + self.abi.pending_sel:offset + self.abi.pending_sel + self.abi.word_bytes] = bytes(
            self.abi.word_bytes)


class FakeKernel:
    """KVM's in-kernel event channels: records each call, refuses those named in `refuse`."""

    def __init__(self, refuse=()):
        self.calls = []
        self.refuse = set(refuse)

    def _record(self, name, *args):
        self.calls.append((name, *args))
        if name in self.refuse:
            raise OSError(22, "refused")

    def delivers_to(self, vcpu):
        return True

    def send(self, port, vcpu):
        self._record("send", port, vcpu)

    def assign_eventfd(self, port, fd):
        self._record("assign_eventfd", port, fd)

    def assign_ipi(self, port, vcpu):
        self._record("assign_ipi", port, vcpu)

    def deassign(self, port):
        self._record("deassign", port)

    def reset(self):
        self._record("reset")

    def named(self, name):
        return [call[1:] for call in self.calls if call[0] == name]


class Rig:
    """EventChannels for domain DOMID with the fake guest, vCPU upcalls recorded and
    scheduled callbacks run by run_scheduled() (or at once, if `immediate`)."""

    def __init__(self, *, kernel=None, vcpus=4, long_mode=True, immediate=False, on_pending=None, **observers):
        self.guest = EvtchnGuest(long_mode)
        self.kernel = kernel
        self.upcalls = []
        self.queue = []
        self.readers = {}
        self.immediate = immediate
        self.ev = EventChannels(
            domid=DOMID,
            vcpu_count=vcpus,
            long_mode=lambda: self.guest.long_mode,
            shared_info_address=self.guest.shared_info_address,
            vcpu_info_address=self.guest.vcpu_info_address,
            upcall=self.upcalls.append,
            kernel=kernel,
            schedule=self.schedule,
            add_reader=self.readers.__setitem__,
            remove_reader=self.readers.pop,
            on_pending=on_pending,
            **observers,  # trace=, faults=: the VM's tracer and fault injector
        )

    def schedule(self, callback):
        if self.immediate:
            callback()
        else:
            self.queue.append(callback)

    def run_scheduled(self):
        while self.queue:
            self.queue.pop(0)()
