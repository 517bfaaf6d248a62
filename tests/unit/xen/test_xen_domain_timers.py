"""XenDomain's Xen timers: the userspace side of KVM's in-kernel ones (no
KVM: the attribute calls are recorded) and the ones pyvmm runs on its event
loop when VIRQ_TIMER is not in the kernel."""

import heapq
from types import SimpleNamespace

import pytest

from pyvmm.core.eventloop import EventLoop
from pyvmm.kvm import uapi
from pyvmm.xen import abi
from pyvmm.xen import domain as domain_module
from pyvmm.xen.domain import MIN_PERIOD_NS, XenDomain
from pyvmm.xen.errors import XenError

SECOND = 1_000_000_000


@pytest.fixture
def loop():
    loop = EventLoop()
    yield loop
    loop.close()


def timer_domain(monkeypatch, timer_ports, loop=None, *, in_kernel=True):
    calls = []
    monkeypatch.setattr(domain_module.kvm_xen, "set_vcpu_attr",
                        lambda vcpu, kind, **union: calls.append((vcpu, kind, union)))
    domain = XenDomain.__new__(XenDomain)  # only the timer state, no VM
    domain.vcpu_count = len(timer_ports)
    domain.loop = loop
    domain._init_timers()
    domain._timer_ports = list(timer_ports)
    domain.machine = SimpleNamespace(run_on_vcpu=lambda index, function: function(f"vcpu{index}"))
    domain.kvm_features = SimpleNamespace(evtchn_send=in_kernel)
    domain._guest_time_ns = lambda: 1_000 * SECOND
    domain.evtchn = SimpleNamespace(virq_port=lambda virq, vcpu: None, fifo_active=False,
                                    send_virq=lambda virq, vcpu: calls.append(("virq", virq, vcpu)))
    return domain, calls


def fire_next(loop):
    """Run the earliest timer as the loop would once it is due."""
    _, _, handle = heapq.heappop(loop._timers)
    handle._queued = False
    handle.callback()


def run_pending(loop):
    """Run the calls handed over to the loop and the timers already due."""
    loop.call_soon_threadsafe(loop.stop)
    loop.run()
    loop._stopped.clear()


def test_stopping_an_in_kernel_timer_keeps_its_port(monkeypatch):
    # KVM takes the attribute's port as the timer's VIRQ port: stopping must
    # pass the same port with expiry 0, never another number.
    domain, calls = timer_domain(monkeypatch, [5, 9])
    domain.stop_singleshot_timer(1)
    assert calls == [("vcpu1", uapi.KVM_XEN_VCPU_ATTR_TYPE_TIMER,
                      {"timer": {"port": 9, "priority": domain_module.kvm_xen.EVTCHN_PRIORITY_2LEVEL,
                                 "expires_ns": 0}})]


def test_stopping_a_userspace_timer_needs_no_kernel_call(monkeypatch, loop):
    domain, calls = timer_domain(monkeypatch, [None, None], loop)
    domain.set_singleshot_timer(0, 2_000 * SECOND, future=True)
    domain.stop_singleshot_timer(0)
    run_pending(loop)
    assert not domain._singleshot[0].armed and calls == [] and loop.timer_count == 0


def test_re_arming_userspace_timers_holds_one_loop_entry_each(monkeypatch, loop):
    # Every VCPUOP_set_singleshot_timer / set_periodic_timer used to add an
    # event-loop entry that nothing cancelled: 100,000 calls held ~50 MB.
    domain, calls = timer_domain(monkeypatch, [None, None], loop, in_kernel=False)
    for i in range(100_000):
        far = (1 << 62) + i  # centuries away: honoured, as Xen does
        domain.set_singleshot_timer(0, far, future=True)
        domain.set_timer_op(1, 1_000 * SECOND + SECOND + i)
        domain.set_periodic_timer(i % 2, MIN_PERIOD_NS + i)
        assert len(loop._calls) <= 4  # at most one handover per timer in flight
    run_pending(loop)
    assert loop.timer_count <= 4  # a singleshot and a periodic timer per vCPU
    for i in range(100_000):
        domain.set_periodic_timer(0, MIN_PERIOD_NS + i)
        run_pending(loop)  # each re-arm reaches the loop: the old entry is cancelled
    assert loop.timer_count - loop._cancelled <= 4
    assert loop.timer_count <= 4 + 2 * 64


def test_a_userspace_singleshot_timer_fires_once(monkeypatch, loop):
    domain, calls = timer_domain(monkeypatch, [None], loop, in_kernel=False)
    domain.set_singleshot_timer(0, 0, future=False)  # already past: fires at once
    run_pending(loop)
    assert calls == [("virq", abi.VIRQ_TIMER, 0)]
    assert loop.timer_count == 0 and not domain._singleshot[0].armed


def test_a_periodic_timer_re_arms_itself_and_survives_the_singleshot_one(monkeypatch, loop):
    domain, calls = timer_domain(monkeypatch, [None], loop, in_kernel=False)
    domain.set_periodic_timer(0, 1_000 * SECOND)  # never due by itself here: the test fires it
    domain.set_singleshot_timer(0, 2_000 * SECOND, future=True)
    domain.stop_singleshot_timer(0)  # in Xen the two timers are separate
    run_pending(loop)
    assert loop.timer_count == 1 and domain._periodic[0].armed
    fire_next(loop)  # the period is up
    assert calls == [("virq", abi.VIRQ_TIMER, 0)]
    assert domain._periodic[0].armed and loop.timer_count - loop._cancelled == 1
    domain.stop_periodic_timer(0)
    run_pending(loop)
    assert loop.timer_count - loop._cancelled == 0


def test_a_periodic_period_below_a_millisecond_is_refused(monkeypatch, loop):
    domain, _ = timer_domain(monkeypatch, [None], loop, in_kernel=False)
    with pytest.raises(XenError):
        domain.set_periodic_timer(0, MIN_PERIOD_NS - 1)
    assert len(loop._calls) == 0


class _TimerVcpu:
    """A vCPU whose KVM timer has `expires_ns` armed."""

    def __init__(self, name, expires_ns):
        self.name = name
        self.expires_ns = expires_ns

    def xen_vcpu_get_attr(self, kind):
        assert kind == uapi.KVM_XEN_VCPU_ATTR_TYPE_TIMER
        return SimpleNamespace(u=SimpleNamespace(timer=SimpleNamespace(expires_ns=self.expires_ns)))

    def __repr__(self):
        return self.name


def test_fifo_takes_the_timers_back_from_kvm(monkeypatch, loop):
    import threading
    domain, calls = timer_domain(monkeypatch, [5, None], loop)
    vcpus = [_TimerVcpu("vcpu0", 1_000 * SECOND + SECOND // 2), _TimerVcpu("vcpu1", 0)]
    domain.machine = SimpleNamespace(run_on_vcpu=lambda index, function: function(vcpus[index]))
    configs = []
    monkeypatch.setattr(domain_module.kvm_xen, "enable", lambda vm, features, evtchn_send: configs.append(evtchn_send))
    domain._lock = threading.RLock()
    domain.vm = None
    domain._event_abi_changed(True)
    assert configs == [False]  # KVM's SCHEDOP_poll would wait on 2-level bits: a yield now
    assert calls == [(vcpus[0], uapi.KVM_XEN_VCPU_ATTR_TYPE_TIMER,
                      {"timer": {"port": 0, "priority": domain_module.kvm_xen.EVTCHN_PRIORITY_2LEVEL,
                                 "expires_ns": 0}})]
    assert domain._timer_ports == [None, None]
    assert domain._singleshot[0].armed and domain._singleshot[1].armed is False
    # From now on the timer hypercalls are pyvmm's, on userspace timers.
    domain.evtchn.fifo_active = True
    domain.evtchn.virq_port = lambda virq, vcpu: 5
    calls.clear()
    domain.set_timer_op(0, 1_001 * SECOND)
    assert calls == []
    domain._event_abi_changed(False)
    assert configs == [False, True]


def test_diagnosis_says_where_each_vcpus_timer_stands(monkeypatch, loop):
    # A stuck guest's last log says whether the timer that would tick it is armed, due or overdue.
    domain, _ = timer_domain(monkeypatch, [5, None], loop)
    domain._vcpu_info_gpa = [None, None]
    domain.shared_info_gfn = None
    domain._per_vcpu_vector = [0xF3, 0]
    domain.callback = domain_module.Callback.NONE
    domain.kvm_features.vcpu_attrs = False
    overdue = SimpleNamespace(xen_vcpu_get_attr=lambda kind: SimpleNamespace(
        u=SimpleNamespace(timer=SimpleNamespace(expires_ns=998 * SECOND))))
    assert domain.vcpu_diagnosis(overdue, 0) == (
        "Xen: timer overdue by 2.0 s (in KVM, port 5); upcall_pending=? pending_sel=? (per-vCPU vector 0xf3)")
    assert domain.vcpu_diagnosis(None, 1) == (
        "Xen: no timer (in pyvmm); upcall_pending=? pending_sel=? (callback none)")
    domain.set_singleshot_timer(1, 1_003 * SECOND, future=True)
    line = domain.vcpu_diagnosis(None, 1)
    assert line.startswith("Xen: timer due in ") and line.endswith(
        " s (in pyvmm); upcall_pending=? pending_sel=? (callback none)")


def test_diagnosis_reads_vcpu_info_and_names_a_kvm_copy_elsewhere(monkeypatch, loop):
    # Where KVM raises a vCPU's upcall flags must be where the guest reads
    # them: a diagnosis shows the flags and any disagreement.
    domain, _ = timer_domain(monkeypatch, [None, None], loop)
    memory = bytearray(0x3000)
    memory[0x2040:0x2050] = bytes([1]) + bytes(7) + (0x5).to_bytes(8, "little")
    domain.memory = SimpleNamespace(read=lambda gpa, size: bytes(memory[gpa:gpa + size]))
    domain.long_mode = True
    domain._vcpu_info_gpa = [None, 0x2040]
    domain.shared_info_gfn = 1
    domain._per_vcpu_vector = [0xF3, 0xF3]
    domain.callback = domain_module.Callback.NONE
    domain.kvm_features.vcpu_attrs = True
    kernel = {0: 0x1000, 1: 0x1040}  # vCPU 0: the legacy slot in shared_info, as pyvmm's record

    def vcpu(index):
        def get_attr(kind):
            assert kind == uapi.KVM_XEN_VCPU_ATTR_TYPE_VCPU_INFO
            return SimpleNamespace(u=SimpleNamespace(gpa=kernel[index]))
        return SimpleNamespace(xen_vcpu_get_attr=get_attr)

    assert domain.vcpu_diagnosis(vcpu(0), 0) == (
        "Xen: no timer (in pyvmm); upcall_pending=0 pending_sel=0x0 (per-vCPU vector 0xf3)")
    assert domain.vcpu_diagnosis(vcpu(1), 1) == (
        "Xen: no timer (in pyvmm); upcall_pending=1 pending_sel=0x5 (per-vCPU vector 0xf3); "
        "KVM's vcpu_info at 0x1040, not at 0x2040")
