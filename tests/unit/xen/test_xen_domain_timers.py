"""XenDomain's userspace side of KVM's in-kernel Xen timers (no KVM: the attribute calls are recorded)."""

from types import SimpleNamespace

from pyvmm.kvm import uapi
from pyvmm.xen import domain as domain_module
from pyvmm.xen.domain import XenDomain


def timer_domain(monkeypatch, timer_ports):
    calls = []
    monkeypatch.setattr(domain_module.kvm_xen, "set_vcpu_attr",
                        lambda vcpu, kind, **union: calls.append((vcpu, kind, union)))
    domain = XenDomain.__new__(XenDomain)  # only the timer state, no VM
    domain.vcpu_count = len(timer_ports)
    domain._timers = [None] * len(timer_ports)
    domain._timer_ports = list(timer_ports)
    domain.machine = SimpleNamespace(run_on_vcpu=lambda index, function: function(f"vcpu{index}"))
    return domain, calls


def test_stopping_an_in_kernel_timer_keeps_its_port(monkeypatch):
    # KVM takes the attribute's port as the timer's VIRQ port: stopping must
    # pass the same port with expiry 0, never another number.
    domain, calls = timer_domain(monkeypatch, [5, 9])
    domain.stop_singleshot_timer(1)
    assert calls == [("vcpu1", uapi.KVM_XEN_VCPU_ATTR_TYPE_TIMER,
                      {"timer": {"port": 9, "priority": domain_module.kvm_xen.EVTCHN_PRIORITY_2LEVEL,
                                 "expires_ns": 0}})]


def test_stopping_a_userspace_timer_needs_no_kernel_call(monkeypatch):
    domain, calls = timer_domain(monkeypatch, [None, None])
    domain._timers[0] = object()
    domain.stop_singleshot_timer(0)
    assert domain._timers[0] is None and calls == []
