"""SCHEDOP_poll and SCHEDOP_block as the domain carries them out when they
reach pyvmm: the vCPU is halted in KVM (faked here: its run state is
recorded) and made runnable again on every userspace path that must wake it."""

import heapq
from types import SimpleNamespace

import pytest

from frontends.evtchn import FakeKernel, Rig
from pyvmm.core.eventloop import EventLoop
from pyvmm.core.ratelimit import DEFAULT_LOG_RATE
from pyvmm.kvm import uapi
from pyvmm.xen.abi import DOMID_SELF
from pyvmm.xen.domain import XenDomain
from pyvmm.xen.errors import XenError

SECOND = 1_000_000_000
HALTED, RUNNABLE = uapi.KVM_MP_STATE_HALTED, uapi.KVM_MP_STATE_RUNNABLE


class FakeVcpu:
    def __init__(self):
        self.mp_state = RUNNABLE

    def get_mp_state(self):
        return self.mp_state

    def set_mp_state(self, state):
        self.mp_state = state


class FakeMachine:
    """vCPU threads reduced to their work queues: run_work() is what each
    thread does when it leaves KVM_RUN."""

    def __init__(self, count):
        self.vcpus = [FakeVcpu() for _ in range(count)]
        self.work = [[] for _ in range(count)]
        self.kicks = []

    def run_on_vcpu(self, index, function, timeout=10.0):
        return function(self.vcpus[index])

    def post_to_vcpu(self, index, function):
        self.work[index].append(function)
        self.kicks.append(index)

    def kick_vcpu(self, index):
        self.kicks.append(index)

    def run_work(self):
        for index, queue in enumerate(self.work):
            while queue:
                queue.pop(0)(self.vcpus[index])

    def states(self):
        return [v.mp_state for v in self.vcpus]


@pytest.fixture
def loop():
    loop = EventLoop()
    yield loop
    loop.close()


def make_domain(loop, *, vcpus=2, kernel=None, now=1_000 * SECOND):
    domain = XenDomain.__new__(XenDomain)  # the poll state only, no VM
    domain.vcpu_count = vcpus
    domain.loop = loop
    domain.machine = FakeMachine(vcpus)
    domain.kvm_features = SimpleNamespace(evtchn_send=kernel is not None)
    domain._limited = DEFAULT_LOG_RATE.limited(__import__("logging").getLogger("test"))
    domain._guest_time_ns = lambda: now
    domain._init_timers()
    domain._per_vcpu_vector = [0] * vcpus
    domain.callback = None
    rig = Rig(vcpus=vcpus, kernel=kernel, on_pending=domain._port_pending, immediate=True)
    rig.ev._upcall = domain._upcall
    domain.evtchn = rig.ev
    return domain, rig


def run_due_timers(loop):
    loop.call_soon_threadsafe(loop.stop)
    loop.run()
    loop._stopped.clear()


def fire_next(loop):
    _, _, handle = heapq.heappop(loop._timers)
    handle._queued = False
    handle.callback()


def test_poll_on_a_pending_port_returns_without_halting(loop):
    domain, rig = make_domain(loop)
    a = rig.ev.alloc_unbound(DOMID_SELF, DOMID_SELF)
    rig.guest.set_pending(a)
    domain.poll(0, [a], 0)
    assert domain.machine.states() == [RUNNABLE, RUNNABLE] and not domain.vcpu_blocked(0)


def test_a_masked_port_made_pending_by_pyvmm_wakes_the_poller(loop):
    # The xenstore's reply to a guest that masked its store port and polls it.
    domain, rig = make_domain(loop)
    channel = rig.ev.connect_backend(lambda: None)
    port = channel.guest_port
    rig.guest.mask(port)
    domain.poll(1, [port], 0)
    assert domain.machine.states() == [RUNNABLE, HALTED] and domain.vcpu_blocked(1)
    channel.notify()
    assert rig.guest.pending(port)
    domain.machine.run_work()
    assert domain.machine.states() == [RUNNABLE, RUNNABLE] and not domain.vcpu_blocked(1)


def test_an_unmasked_port_wakes_the_poller_through_its_upcall(loop):
    domain, rig = make_domain(loop)
    channel = rig.ev.connect_backend(lambda: None)
    domain.poll(0, [channel.guest_port], 0)
    channel.notify()
    domain.machine.run_work()
    assert domain.machine.states()[0] == RUNNABLE


def test_a_port_nobody_polls_wakes_nobody(loop):
    domain, rig = make_domain(loop)
    mine = rig.ev.connect_backend(lambda: None)
    other = rig.ev.connect_backend(lambda: None)
    rig.guest.mask(other.guest_port)
    domain.poll(0, [mine.guest_port], 0)
    other.notify()
    domain.machine.run_work()
    assert domain.machine.states()[0] == HALTED and domain.vcpu_blocked(0)


def test_the_timeout_is_xen_system_time_and_wakes_the_vcpu(loop):
    domain, rig = make_domain(loop)
    port = rig.ev.alloc_unbound(DOMID_SELF, DOMID_SELF)
    domain.poll(0, [port], 1_000 * SECOND + SECOND // 2)  # half a second from the guest's now
    assert domain.machine.states()[0] == HALTED
    run_due_timers(loop)  # arms the loop's timer
    assert loop.timer_count == 1
    fire_next(loop)
    domain.machine.run_work()
    assert domain.machine.states()[0] == RUNNABLE and not domain.vcpu_blocked(0)


def test_a_timeout_already_past_does_not_halt(loop):
    domain, rig = make_domain(loop)
    port = rig.ev.alloc_unbound(DOMID_SELF, DOMID_SELF)
    domain.poll(0, [port], 999 * SECOND)
    assert domain.machine.states()[0] == RUNNABLE and not domain.vcpu_blocked(0)


def test_a_bad_port_leaves_no_wait_behind(loop):
    domain, rig = make_domain(loop)
    rig.guest.long_mode = False  # 1024 ports now
    with pytest.raises(XenError):
        domain.poll(0, [2000], 0)
    assert not domain.vcpu_blocked(0) and domain.machine.states()[0] == RUNNABLE


def test_block_halts_until_an_event_for_that_vcpu(loop):
    domain, rig = make_domain(loop)
    ipi0 = rig.ev.bind_ipi(0)
    ipi1 = rig.ev.bind_ipi(1)
    domain.block(1)
    assert domain.machine.states() == [RUNNABLE, HALTED]
    rig.ev.send(ipi0)  # vCPU 0's event
    domain.machine.run_work()
    assert domain.machine.states() == [RUNNABLE, HALTED]
    rig.ev.send(ipi1)
    domain.machine.run_work()
    assert domain.machine.states() == [RUNNABLE, RUNNABLE]


def test_a_wake_never_unhalts_a_vcpu_that_is_not_halted(loop):
    domain, rig = make_domain(loop)
    port = rig.ev.alloc_unbound(DOMID_SELF, DOMID_SELF)
    domain.poll(0, [port], 0)
    domain.machine.vcpus[0].mp_state = uapi.KVM_MP_STATE_INIT_RECEIVED  # something else happened meanwhile
    domain.pollers.port_pending(port)
    domain.machine.run_work()
    assert domain.machine.states()[0] == uapi.KVM_MP_STATE_INIT_RECEIVED


def test_with_kvm_delivering_a_refused_delivery_kicks_in_kernel_pollers(loop):
    # KVM polls in the kernel; a delivery it refused and pyvmm made itself
    # would not end such a poll: every vCPU is kicked out of it.
    kernel = FakeKernel(refuse={"send"})
    domain, rig = make_domain(loop, kernel=kernel)
    channel = rig.ev.connect_backend(lambda: None)
    rig.guest.mask(channel.guest_port)
    channel.notify()
    assert rig.guest.pending(channel.guest_port)
    assert sorted(domain.machine.kicks) == [0, 1]
