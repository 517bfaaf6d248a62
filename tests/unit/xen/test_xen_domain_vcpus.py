"""VCPUOP_up/down/is_up in the domain, and what a CPU going offline and back
needs of the in-kernel timer (no KVM: the machine and its vCPUs are fakes)."""

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from frontends.evtchn import Rig
from pyvmm.config import VmConfig
from pyvmm.core.console import ConsoleOutput
from pyvmm.core.faults import NULL_FAULTS
from pyvmm.core.stop import StopReason
from pyvmm.core.trace import NULL_TRACE
from pyvmm.kvm import uapi
from pyvmm.vmm.machine import Machine as RealMachine
from pyvmm.xen import abi
from pyvmm.xen import domain as domain_module
from pyvmm.xen.domain import XenDomain
from pyvmm.xen.errors import XenError

RUNNABLE, WAIT_SIPI = uapi.KVM_MP_STATE_RUNNABLE, uapi.KVM_MP_STATE_UNINITIALIZED


class Machine:
    def __init__(self, states):
        self.states = list(states)
        self.down = [False] * len(states)
        self.stops = []

    def run_on_vcpu(self, index, function, timeout=10.0):
        return function(SimpleNamespace(index=index, get_mp_state=lambda: self.states[index]))

    def set_vcpu_down(self, index, down):
        self.down[index] = down

    def vcpu_down(self, index):
        return self.down[index]

    def request_stop(self, reason, detail=None):
        self.stops.append(reason)


def make(states):
    domain = XenDomain.__new__(XenDomain)
    domain.vcpu_count = len(states)
    domain.machine = Machine(states)
    domain._limited = SimpleNamespace(info=lambda *a, **k: None)
    domain._updown_lock = threading.Lock()
    return domain


class ThreadedVcpu:
    """A vCPU whose state only its own thread may read, as KVM's."""

    def __init__(self, machine, index):
        self.machine, self.index = machine, index

    def kick(self):
        pass

    def get_mp_state(self):
        assert self.machine.current_vcpu() == self.index, "read from another thread"
        time.sleep(0.01)  # an ioctl: other vCPU threads run meanwhile
        return RUNNABLE


def on_vcpu_threads(hypercalls):
    """Run each hypercall on its own fake vCPU thread, all at once, each
    thread inside its handler (not serving its queue between exits, as a
    real vCPU thread in a hypercall); the domain over a real Machine."""
    machine = RealMachine(VmConfig(kernel=Path("/nonexistent"), vcpus=len(hypercalls)), ConsoleOutput(None),
                          trace=NULL_TRACE, faults=NULL_FAULTS)
    machine._vcpus = [ThreadedVcpu(machine, index) for index in range(len(hypercalls))]
    machine.loop.stop = lambda: None  # no loop runs here
    domain = make([RUNNABLE] * len(hypercalls))
    domain.machine = machine
    start = threading.Barrier(len(hypercalls))
    outcomes = {}
    lock, finished, all_done = threading.Lock(), [], threading.Event()

    def vcpu_thread(index):
        machine._vcpu_of_thread[threading.get_ident()] = index
        start.wait()
        try:
            outcomes[index] = hypercalls[index](domain)
        except Exception as error:
            outcomes[index] = error
        with lock:
            finished.append(index)
            if len(finished) == len(hypercalls):
                all_done.set()
        # Back in its loop: what is queued for it runs between "KVM_RUNs".
        while not all_done.is_set():
            machine.preempt_point(index)
            all_done.wait(0.001)

    threads = [threading.Thread(target=vcpu_thread, args=(index,), daemon=True) for index in range(len(hypercalls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return machine, outcomes


def test_is_up_follows_down_and_the_sipi():
    domain = make([RUNNABLE, WAIT_SIPI])
    assert domain.vcpu_is_up(0) and not domain.vcpu_is_up(1)  # an AP before its INIT/SIPI is down, as on Xen
    with pytest.raises(XenError):
        domain.vcpu_up(1)  # never started: EINVAL
    domain.machine.states[1] = RUNNABLE
    domain.vcpu_down(1)
    assert domain.machine.down == [False, True] and not domain.vcpu_is_up(1)
    domain.vcpu_up(1)
    assert domain.machine.down == [False, False] and domain.vcpu_is_up(1)
    with pytest.raises(XenError):
        domain.vcpu_is_up(2)


def test_taking_the_last_vcpu_down_powers_off():
    domain = make([RUNNABLE, WAIT_SIPI])
    domain.vcpu_down(0)
    assert domain.machine.stops == [domain_module.StopReason.POWEROFF] and domain.machine.down == [False, False]


def test_two_vcpus_asking_whether_the_other_is_up_both_get_an_answer():
    # Each asks the other's thread for its mp_state while in its own
    # hypercall: neither may wait for the other (once, a 10 s stall each
    # and a failed hypercall).
    _, outcomes = on_vcpu_threads([lambda d: d.vcpu_is_up(1), lambda d: d.vcpu_is_up(0)])
    assert outcomes == {0: True, 1: True}


def test_vcpus_going_down_at_once_ask_each_other_and_both_get_an_answer():
    # vCPU 0 takes itself down, vCPU 1 takes vCPU 2 down: each first asks
    # the other whether it is up (it must not be the last one up).
    machine, outcomes = on_vcpu_threads([lambda d: d.vcpu_down(0), lambda d: d.vcpu_down(2), lambda d: None])
    assert outcomes == {0: None, 1: None, 2: None}
    assert machine._vcpu_down == [True, False, True] and machine.stop_reason is None


def test_two_vcpus_taking_each_other_down_never_leave_the_domain_without_one():
    machine, outcomes = on_vcpu_threads([lambda d: d.vcpu_down(1), lambda d: d.vcpu_down(0)])
    assert outcomes == {0: None, 1: None}
    # Whichever went first took the other down, and the other, down itself,
    # then took down the last vCPU up: the domain powers off, as on Xen.
    assert machine.stop_reason is StopReason.POWEROFF or not all(machine._vcpu_down)


def test_closing_a_cpus_timer_port_hands_its_timer_back_to_pyvmm(monkeypatch):
    # Linux closes VIRQ_TIMER when a CPU goes offline and binds it again,
    # perhaps at another port, when it comes back: KVM must not keep the old one.
    calls = []
    monkeypatch.setattr(domain_module.kvm_xen, "set_vcpu_attr",
                        lambda vcpu, kind, **union: calls.append((vcpu.index, union["timer"]["port"])))
    domain = make([RUNNABLE, RUNNABLE])
    domain.loop = None
    domain._init_timers()
    rig = Rig(vcpus=2, on_virq_closed=domain._virq_closed, immediate=True)
    domain.evtchn = rig.ev
    domain.kvm_features = SimpleNamespace(evtchn_send=True)
    port = rig.ev.bind_virq(abi.VIRQ_TIMER, 1)
    domain._arm_timer(1, 5_000, 0)
    assert domain._timer_ports[1] == port and calls == [(1, port)]
    other = rig.ev.bind_virq(abi.VIRQ_DEBUG, 0)
    rig.ev.close(other)
    assert calls == [(1, port)]  # not the timer's port
    rig.ev.close(port)
    assert calls[-1] == (1, 0) and domain._timer_ports[1] is None
    rig.ev.bind_ipi(1)  # the port number goes to something else
    new = rig.ev.bind_virq(abi.VIRQ_TIMER, 1)
    domain._arm_timer(1, 9_000, 0)
    assert calls[-1] == (1, new) and new != port
