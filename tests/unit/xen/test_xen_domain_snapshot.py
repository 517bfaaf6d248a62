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
from pyvmm.kvm import uapi
from pyvmm.kvm.memslots import MemslotTable, map_guest_memory
from pyvmm.xen import abi
from pyvmm.xen.abi import PAGE_SHIFT, PAGE_SIZE
from pyvmm.xen.domain import Callback, XenDomain
from pyvmm.xen.hv.gnttab import GNTTAB_RESERVED_CONSOLE, GNTTAB_RESERVED_XENSTORE, GrantTable
from pyvmm.xen.hv.hypercalls import HypercallDispatcher
from pyvmm.xen.hv.watchdog import Expiry, WatchdogTimers
from pyvmm.xen.hv.xen_platform import XenPlatformDevice
from pyvmm.xen.xenstore import XenStore, create_domain_nodes
from pyvmm.xen.xenstore.service import GuestStoreService

RAM = 64 * PAGE_SIZE
S = 1_000_000_000  # ns
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


class Machine:
    """What the domain asks of its machine here: memslot holds, kicks,
    which vCPUs are down, whether and when the pause froze the clock."""

    def __init__(self):
        self.down = [False] * VCPUS
        self.paused = False
        self.paused_clock = None
        self.others_held = contextlib.nullcontext
        self.mp_states = [uapi.KVM_MP_STATE_RUNNABLE] * VCPUS
        self.posted = [[] for _ in range(VCPUS)]  # work for each vCPU's thread

    def kick_vcpu(self, index):
        pass

    def vcpu_down(self, index):
        return self.down[index]

    def set_vcpu_down(self, index, down):
        self.down[index] = down

    def vcpu(self, index):
        return SimpleNamespace(get_mp_state=lambda: self.mp_states[index],
                               set_mp_state=lambda state: self.mp_states.__setitem__(index, state))

    def run_on_vcpu(self, index, function, timeout=10.0):
        return function(self.vcpu(index))

    def post_to_vcpu(self, index, function):
        self.posted[index].append(function)

    def run_posted(self):
        for index, queue in enumerate(self.posted):
            while queue:
                queue.pop(0)(self.vcpu(index))


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
    clock = SimpleNamespace(clock=1000 * S)  # the guest's: KVM_GET_CLOCK
    domain.vm = SimpleNamespace(memslots=table, irqfd=lambda fd, gsi, resample_fd: domain.irqfds.append(gsi),
                                signal_msi=lambda *args: None, get_clock=lambda: clock)
    domain.machine = machine = Machine()
    expired = []
    domain.watchdogs = WatchdogTimers(loop, clock=domain._guest_time_ns, paused=lambda: machine.paused,
                                      expire=expired.append)
    domain._lock = threading.RLock()
    domain._updown_lock = threading.Lock()
    domain._limited = logging.getLogger("test")
    domain.version, domain.vcpu_count, domain.domid = (4 << 16) | 17, VCPUS, 1
    domain.long_mode, domain.shared_info_gfn = None, None
    domain._vcpu_info_gpa = [None] * VCPUS
    domain._per_vcpu_vector = [0] * VCPUS
    domain.callback, domain._callback_fds, domain._callback_gsi = Callback.NONE, None, 0
    domain._platform_intx_gsi = 28
    domain._init_timers()
    domain._blocked_at_save = []
    domain.dispatcher = HypercallDispatcher(domain)
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
    return SimpleNamespace(domain=domain, kvm=kvm, memory=memory, rig=rig, loop=loop, clock=clock, machine=machine,
                           expired=expired)


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
    assert domain.watchdog(0, 30) == 1
    domain.vcpu_down(1)


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


def test_a_grant_table_v2_status_frame_is_back_where_the_guest_mapped_it():
    from pyvmm.xen.hv.gnttab import XENMAPIDX_grant_table_status

    vm = built()
    domain = vm.domain
    assert domain.gnttab.set_version(2) == 2
    domain.map_grant_frame(0, 10)
    domain.map_grant_frame(XENMAPIDX_grant_table_status | 0, 12)
    state = json.loads(json.dumps(domain.save_state()))
    new = built()
    new.domain.restore_state(state)
    assert new.domain.gnttab.get_version() == 2
    assert new.kvm.backing(12 * PAGE_SIZE) == new.domain.gnttab.frame_host_address(XENMAPIDX_grant_table_status | 0)
    assert new.domain.grant_status_gfns(1) == [12]
    state["domain"]["grant_frames"][str(XENMAPIDX_grant_table_status | 99)] = 40 * PAGE_SIZE
    with pytest.raises(SnapshotError, match="grant frame"):
        built().domain.restore_state(state)  # beyond the status frames it may have


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
    lambda s: s["domain"].update(vcpus_down=[True, True]),  # nobody left to run
    lambda s: s["domain"].update(vcpus_down=[0, 1]),
    lambda s: s["domain"].update(vcpus_down=[False]),
    lambda s: s["domain"].pop("vcpus_down"),
    lambda s: s["domain"].pop("watchdogs"),
    lambda s: s["domain"].update(vcpus_blocked=[1, False]),
    lambda s: s["domain"].pop("vcpus_blocked"),
    lambda s: s["domain"].update(shutdown_code=abi.SHUTDOWN_MAX + 1),
    lambda s: s["domain"].update(shutdown_code=-1),
    lambda s: s["domain"].update(shutdown_code=True),
    lambda s: s["domain"].update(shutdown_code="3"),
    lambda s: s["domain"]["watchdogs"].update(version=2),
    lambda s: s["domain"]["watchdogs"].update(watchdogs=[None]),
    lambda s: s["domain"]["watchdogs"].update(watchdogs=[[10, 10 * S + 1], None]),  # more left than its timeout
    lambda s: s["domain"]["watchdogs"].update(watchdogs=[[1 << 32, 0], None]),  # not a uint32_t
    lambda s: s["domain"]["watchdogs"].update(watchdogs=[[10, -1], None]),
    lambda s: s["domain"]["watchdogs"].update(watchdogs=[[10, 1.5], None]),
    lambda s: s["domain"]["watchdogs"].update(watchdogs=[[10], None]),
    lambda s: s["domain"]["watchdogs"].update(watchdogs=[[True, 0], None]),
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


# --- the watchdogs and the vCPUs taken down (state version 2) ------------------------------


def pause_at(vm, now_ns):
    """Pause as Machine.pause() does: the clock frozen at `now_ns` for the
    guest, while KVM's own clock runs on until resume sets it back."""
    vm.machine.paused, vm.machine.paused_clock = True, now_ns
    vm.clock.clock = now_ns + 7 * S


def restored(state, clock_at_restore=3 * S, clock_back=None):
    """A new domain restored from `state` as the machine does it: its
    restore_state() under a fresh VM's clock, then the clock set back
    (KVM_SET_CLOCK) and finish_restore()."""
    new = built()
    new.clock.clock = clock_at_restore
    new.domain.restore_state(state)
    assert new.loop.soon == [] and new.loop.later == []  # nothing armed on a clock not yet back
    new.clock.clock = clock_back
    new.domain.finish_restore()
    return new


def run_soon(vm):
    while vm.loop.soon:
        vm.loop.soon.pop(0)()


def saved_with_watchdogs():
    vm = built()
    assert vm.domain.watchdog(0, 30) == 1  # at 1000 s of guest time: due at 1030 s
    assert vm.domain.watchdog(0, 10) == 2
    vm.clock.clock = 1004 * S
    assert vm.domain.watchdog(2, 10) == 0  # petted: due at 1014 s
    vm.domain.vcpu_down(1)
    vm.domain.dispatcher.shutdown_code = abi.SHUTDOWN_crash  # as SCHEDOP_shutdown_code records it
    pause_at(vm, 1006 * S)
    return json.loads(json.dumps(vm.domain.save_state()))


def test_watchdogs_and_down_vcpus_are_saved_and_restored_as_they_were():
    state = saved_with_watchdogs()
    assert state["version"] == 2
    # Time left on the clock the pause froze, not on KVM's running one.
    assert state["domain"]["watchdogs"]["watchdogs"] == [[30, 24 * S], [10, 8 * S]]
    assert state["domain"]["vcpus_down"] == [False, True]
    new = restored(state, clock_back=1006 * S)
    assert new.domain.watchdogs.in_use() == {1: 1030 * S, 2: 1014 * S}
    assert new.machine.down == [False, True]
    assert new.domain.dispatcher.shutdown_code == abi.SHUTDOWN_crash
    pause_at(new, 1006 * S)
    again = json.loads(json.dumps(new.domain.save_state()))
    assert again["domain"] == state["domain"]


def test_the_time_left_counts_from_the_clock_the_restore_sets_back():
    new = restored(saved_with_watchdogs(), clock_back=5000 * S)
    assert new.domain.watchdogs.in_use() == {1: 5024 * S, 2: 5008 * S}


def test_a_restored_watchdog_not_petted_expires():
    new = restored(saved_with_watchdogs(), clock_back=1006 * S)
    run_soon(new)
    (delay, check), = new.loop.later
    assert delay == 8.0  # watchdog 2's 8 s of guest time left
    new.clock.clock = 1014 * S
    check()
    assert new.expired == [Expiry(2, 10)]


def test_a_restored_watchdog_petted_in_time_does_not_expire():
    new = restored(saved_with_watchdogs(), clock_back=1006 * S)
    run_soon(new)
    new.clock.clock = 1012 * S
    assert new.domain.watchdog(2, 10) == 0  # the guest pets it by the id it had: due at 1022 s
    assert new.domain.watchdog(1, 0) == 0  # and frees the other one
    run_soon(new)
    new.clock.clock = 1014 * S
    for _, check in list(new.loop.later):  # every check the loop had, run when due at 1014 s
        check()
    assert new.expired == []
    new.clock.clock = 1022 * S
    new.loop.later[-1][1]()
    assert new.expired == [Expiry(2, 10)]


def test_a_vcpu_down_stays_down_until_vcpuop_up():
    new = restored(saved_with_watchdogs(), clock_back=1006 * S)
    domain = new.domain
    assert domain.vcpu_is_up(0) and not domain.vcpu_is_up(1)
    domain.vcpu_up(1)
    assert new.machine.down == [False, False] and domain.vcpu_is_up(1)


def test_a_version_1_state_restores_with_no_watchdog_and_every_vcpu_up():
    state = saved_with_watchdogs()
    state["version"] = 1
    for key in ("watchdogs", "vcpus_down", "vcpus_blocked", "shutdown_code"):
        del state["domain"][key]
    new = restored(state, clock_back=1006 * S)
    assert new.domain.watchdogs.in_use() == {} and new.machine.down == [False, False]
    assert new.domain.dispatcher.shutdown_code is None
    run_soon(new)
    assert new.loop.later == []


def test_a_newer_state_is_refused():
    state = saved_with_watchdogs()
    state["version"] = 3
    with pytest.raises(SnapshotError, match="version 3"):
        built().domain.restore_state(state)


def test_a_vcpu_pyvmm_halted_in_schedop_block_is_woken_once_restored():
    # What it waited for is not saved: it wakes, as Xen allows, and waits again if it must.
    halted, runnable = uapi.KVM_MP_STATE_HALTED, uapi.KVM_MP_STATE_RUNNABLE
    vm = built()
    vm.domain.block(1)
    assert vm.machine.mp_states == [runnable, halted]
    pause_at(vm, 1006 * S)
    state = json.loads(json.dumps(vm.domain.save_state()))
    assert state["domain"]["vcpus_blocked"] == [False, True]
    new = built()
    new.domain.restore_state(state)
    new.machine.mp_states = [halted, halted]  # KVM's run states back: vCPU 0 in a plain HLT
    new.domain.finish_restore()
    new.machine.run_posted()
    assert new.machine.mp_states == [halted, runnable]
