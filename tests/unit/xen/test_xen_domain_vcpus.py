"""VCPUOP_up/down/is_up in the domain, and what a CPU going offline and back
needs of the in-kernel timer (no KVM: the machine and its vCPUs are fakes)."""

from types import SimpleNamespace

import pytest

from frontends.evtchn import Rig
from pyvmm.kvm import uapi
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
    return domain


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
