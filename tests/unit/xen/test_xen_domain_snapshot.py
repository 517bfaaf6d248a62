"""XenDomain.save_state()/restore_state(): the domain's own copies and its
parts in one state; a restored domain has the saved guest-physical map
(grant frames over RAM, ballooned pages), callback, timers and parts. No
KVM: the domain is put together from its parts over fakes, as the physmap
tests do."""

import contextlib
import json
import logging
import threading
from types import SimpleNamespace

import pytest

from frontends.evtchn import Rig
from pyvmm.core.memory import GuestMemory
from pyvmm.core.pageset import PageSet
from pyvmm.core.snapshot import SnapshotError
from pyvmm.kvm.memslots import MemslotTable, map_guest_memory
from pyvmm.xen import abi
from pyvmm.xen.abi import PAGE_SHIFT, PAGE_SIZE
from pyvmm.xen.domain import Callback, XenDomain
from pyvmm.xen.hv.gnttab import GNTTAB_RESERVED_CONSOLE, GNTTAB_RESERVED_XENSTORE, GrantTable
from pyvmm.xen.hv.timers import UserTimer
from pyvmm.xen.hv.xen_platform import XenPlatformDevice
from pyvmm.xen.xenstore import XenStore, create_domain_nodes
from pyvmm.xen.xenstore.service import GuestStoreService

RAM = 64 * PAGE_SIZE
VCPUS = 2
STORE_PFN, CONSOLE_PFN = 60, 61


class FakeKvm:
    def __init__(self):
        self.live = {}

    def set_region(self, slot, gpa, size, host_address, flags):
        if size == 0:
            del self.live[slot]
            return
        self.live[slot] = (gpa, size, host_address)

    def backing(self, gpa):
        for base, size, host in self.live.values():
            if base <= gpa < base + size:
                return host + gpa - base
        return None


class Loop:
    def __init__(self):
        self.soon, self.later, self.readers = [], [], {}

    def call_soon_threadsafe(self, callback):
        self.soon.append(callback)

    def call_later(self, delay, callback):
        self.later.append((delay, callback))
        return SimpleNamespace(cancel=lambda: None)

    def add_reader(self, fd, callback):
        self.readers[fd] = callback

    def remove_reader(self, fd):
        self.readers.pop(fd, None)

    def assert_owner(self, what=""):
        pass


def built():
    """What MachineBuilder makes of a domain, without KVM."""
    kvm = FakeKvm()
    memory = GuestMemory([(0, RAM)])
    table = MemslotTable(kvm.set_region, 64, page_size=PAGE_SIZE)
    map_guest_memory(table, memory)
    loop = Loop()
    domain = XenDomain.__new__(XenDomain)
    domain.memory, domain.loop = memory, loop
    domain.irqfds = []
    domain.vm = SimpleNamespace(memslots=table, irqfd=lambda fd, gsi, resample_fd: domain.irqfds.append(gsi),
                                signal_msi=lambda *args: None)
    domain.machine = SimpleNamespace(kick_vcpu=lambda index: None, others_held=contextlib.nullcontext)
    domain._lock = threading.RLock()
    domain._limited = logging.getLogger("test")
    domain.version, domain.vcpu_count, domain.domid = (4 << 16) | 17, VCPUS, 1
    domain.long_mode, domain.shared_info_gfn = None, None
    domain._vcpu_info_gpa = [None] * VCPUS
    domain._per_vcpu_vector = [0] * VCPUS
    domain.callback, domain._callback_fds, domain._callback_gsi = Callback.NONE, None, 0
    domain._platform_intx_gsi = 28
    domain._singleshot = [UserTimer(loop, lambda: None) for _ in range(VCPUS)]
    domain._periodic = [UserTimer(loop, lambda: None) for _ in range(VCPUS)]
    domain._timer_ports = [None] * VCPUS
    domain._grant_frame_gpa, domain._grant_frame_at = {}, {}
    domain._ballooned = PageSet(max(region.end for region in memory.regions) >> PAGE_SHIFT)
    domain.gnttab = GrantTable(memory, max_frames=4)
    domain.gnttab.reserve(GNTTAB_RESERVED_CONSOLE, CONSOLE_PFN)
    domain.gnttab.reserve(GNTTAB_RESERVED_XENSTORE, STORE_PFN)
    rig = Rig(vcpus=VCPUS)
    domain.evtchn = rig.ev
    domain.platform_device = XenPlatformDevice()
    domain.store = XenStore()
    domain.xenstore = GuestStoreService(loop, domain.store, 1, memory.view(STORE_PFN << PAGE_SHIFT, PAGE_SIZE),
                                       recheck_seconds=None, check_threads=False)
    domain.console_channel = rig.ev.connect_backend(lambda: None)
    domain.store_channel = rig.ev.connect_backend(domain.xenstore.notified)
    create_domain_nodes(domain.store, 1, "guest", domain.store_channel.guest_port, STORE_PFN,
                        domain.console_channel.guest_port, CONSOLE_PFN)
    domain.uuid = "00000000-0000-4000-8000-000000000001"
    domain.params = {abi.HVM_PARAM_STORE_PFN: STORE_PFN, abi.HVM_PARAM_STORE_EVTCHN: domain.store_channel.guest_port,
                     abi.HVM_PARAM_CONSOLE_PFN: CONSOLE_PFN,
                     abi.HVM_PARAM_CONSOLE_EVTCHN: domain.console_channel.guest_port}
    domain.backends = {}
    return SimpleNamespace(domain=domain, kvm=kvm, memory=memory, rig=rig, loop=loop)


def busy(vm):
    domain = vm.domain
    domain.long_mode = True
    domain.shared_info_gfn = 3
    domain._vcpu_info_gpa[1] = 4 * PAGE_SIZE + 64
    domain._per_vcpu_vector = [0xF3, 0xF3]
    domain.uuid = "12345678-1234-4234-8234-123456789abc"
    domain.params[abi.HVM_PARAM_CALLBACK_IRQ] = 5  # GSI 5
    domain.map_grant_frame(0, 10)  # over RAM
    domain.map_grant_frame(1, 20)
    assert domain.decrease_reservation([30], 2)  # pages 30..33 given back
    domain._periodic[1].arm(5.0, 0.01)
    domain._timer_ports[0] = 7
    domain.evtchn.bind_ipi(1)
    domain.store.client(0).write("/local/domain/1/data", "x")


def test_a_restored_domain_has_the_saved_physical_map_and_copies():
    vm = built()
    busy(vm)
    state = json.loads(json.dumps(vm.domain.save_state()))
    new = built()
    new.domain.restore_state(state)
    domain = new.domain
    assert new.kvm.backing(10 * PAGE_SIZE) == domain.gnttab.frame_host_address(0)
    assert new.kvm.backing(20 * PAGE_SIZE) == domain.gnttab.frame_host_address(1)
    assert all(new.kvm.backing(page * PAGE_SIZE) is None for page in range(30, 34))
    assert new.kvm.backing(34 * PAGE_SIZE) == new.memory.host_address(34 * PAGE_SIZE)
    assert domain.populate_physmap([30], 2)  # ballooned pages come back as before
    assert new.kvm.backing(31 * PAGE_SIZE) == new.memory.host_address(31 * PAGE_SIZE)
    domain.remove_from_physmap(10)  # the frame's RAM is back
    assert new.kvm.backing(10 * PAGE_SIZE) == new.memory.host_address(10 * PAGE_SIZE)
    assert (domain.long_mode, domain.shared_info_gfn, domain._vcpu_info_gpa) == (True, 3, [None, 4 * PAGE_SIZE + 64])
    assert domain._per_vcpu_vector == [0xF3, 0xF3] and domain._timer_ports == [7, None]
    assert domain.callback is Callback.GSI and domain.irqfds == [5]
    assert domain._periodic[1].armed and not domain._singleshot[0].armed
    assert domain.uuid == "12345678-1234-4234-8234-123456789abc"
    assert domain.store.client(0).read("/local/domain/1/data") == b"x"
    ports = [(entry["port"], entry["state"], entry["vcpu"]) for entry in domain.evtchn.snapshot()]
    assert ports == [(entry["port"], entry["state"], entry["vcpu"]) for entry in vm.domain.evtchn.snapshot()]
    domain.finish_restore()


def corrupt(change):
    vm = built()
    busy(vm)
    state = json.loads(json.dumps(vm.domain.save_state()))
    change(state)
    return state


@pytest.mark.parametrize("change", [
    lambda s: s.update(version=5),
    lambda s: s["domain"].update(vcpus=3),
    lambda s: s["domain"].update(xen_version=1),
    lambda s: s["domain"].update(uuid="nope"),
    lambda s: s["domain"].update(shared_info_gfn=1 << 40),
    lambda s: s["domain"].update(vcpu_info_gpa=[4090, None]),  # straddles a page
    lambda s: s["domain"].update(upcall_vectors=[3, 0]),
    lambda s: s["domain"].update(upcall_vectors=[0]),
    lambda s: s["domain"]["params"].update({"99": 1}),
    lambda s: s["domain"]["params"].update({str(abi.HVM_PARAM_STORE_PFN): 5}),
    lambda s: s["domain"]["params"].update({"0": 7 << 56}),
    lambda s: s["domain"].update(ballooned=[[62, 5]]),  # beyond RAM
    lambda s: s["domain"]["grant_frames"].update({"9": 0x20000}),  # beyond max_frames
    lambda s: s["domain"]["grant_frames"].update({"2": 0x14000}),  # where frame 1 is
    lambda s: s["domain"]["grant_frames"].update({"2": 0x14001}),
    lambda s: s.update(backends={"vbd": []}),
])
def test_corrupt_states_are_refused(change):
    with pytest.raises(SnapshotError):
        built().domain.restore_state(corrupt(change))


class Backend:
    """A device that records what the domain asks of it."""

    def __init__(self, calls, name, refuse=False):
        self.calls, self.name, self.refuse = calls, name, refuse

    def save_state(self):
        self.calls.append(("save", self.name))
        if self.refuse:
            raise SnapshotError(f"{self.name}: a request in flight")
        return {"version": 1, "name": self.name}

    def restore_state(self, state):
        self.calls.append(("restore", state["name"]))

    def finish_restore(self):
        self.calls.append(("finish", self.name))

    def resume_after_save(self):
        self.calls.append(("resume", self.name))


def test_backends_are_saved_first_restored_last_and_resumed():
    vm = built()
    calls = []
    vm.domain.backends = {"vbd": [Backend(calls, "xvda"), Backend(calls, "xvdb")], "vif": [Backend(calls, "vif0")]}
    state = json.loads(json.dumps(vm.domain.save_state()))
    assert calls == [("save", "xvda"), ("save", "xvdb"), ("save", "vif0")]
    vm.domain.resume_after_save()
    assert calls[3:] == [("resume", "xvda"), ("resume", "xvdb"), ("resume", "vif0")]

    new = built()
    restored = []
    new.domain.backends = {"vbd": [Backend(restored, "a"), Backend(restored, "b")], "vif": [Backend(restored, "c")]}
    new.domain.restore_state(state)
    assert restored == [("restore", "xvda"), ("restore", "xvdb"), ("restore", "vif0")]  # in config order
    new.domain.finish_restore()
    assert restored[3:] == [("finish", "a"), ("finish", "b"), ("finish", "c")]


def test_a_refused_save_resumes_the_backends_already_quiesced():
    vm = built()
    calls = []
    vm.domain.backends = {"vbd": [Backend(calls, "xvda"), Backend(calls, "xvdb", refuse=True)]}
    with pytest.raises(SnapshotError, match="in flight"):
        vm.domain.save_state()
    assert ("resume", "xvda") in calls


def test_a_snapshot_with_other_devices_is_refused():
    vm = built()
    vm.domain.backends = {"vbd": [Backend([], "xvda")]}
    state = json.loads(json.dumps(vm.domain.save_state()))
    new = built()
    new.domain.backends = {"vbd": [Backend([], "xvda"), Backend([], "xvdb")]}
    with pytest.raises(SnapshotError, match="devices"):
        new.domain.restore_state(state)
