"""A vCPU thread parked by VCPUOP_down or a pause, and a long hypercall's
preemption point: they serve queued work and end with the VM (no KVM: the
machine's run state only, with vCPUs that record kicks)."""

import threading
import time
from pathlib import Path

from pyvmm.config import VmConfig
from pyvmm.core.console import ConsoleOutput
from pyvmm.core.faults import NULL_FAULTS
from pyvmm.core.stop import StopReason
from pyvmm.core.trace import NULL_TRACE
from pyvmm.vmm.machine import Machine


class Vcpu:
    def __init__(self):
        self.kicks = 0

    def kick(self):
        self.kicks += 1


def machine(vcpus=2):
    m = Machine(VmConfig(kernel=Path("/nonexistent"), vcpus=vcpus), ConsoleOutput(None), trace=NULL_TRACE,
                faults=NULL_FAULTS)
    m._vcpus = [Vcpu() for _ in range(vcpus)]
    return m


def parked_thread(m, index):
    done = threading.Event()

    def run():
        m._park(m._vcpu_work[index], index)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done


def test_a_vcpu_taken_down_parks_serves_work_and_comes_back_up():
    m = machine()
    m.set_vcpu_down(1, True)
    assert m.vcpu_down(1) and m._vcpus[1].kicks == 1
    done = parked_thread(m, 1)
    assert m.run_on_vcpu(1, lambda vcpu: "served", timeout=5) == "served"
    assert not done.is_set()
    m.set_vcpu_down(1, False)
    assert done.wait(5)


def test_a_down_vcpu_stops_with_the_vm():
    m = machine()
    m.set_vcpu_down(0, True)
    done = parked_thread(m, 0)
    m.loop.stop = lambda: None  # no loop runs here
    m.request_stop(StopReason.DESTROYED)
    assert done.wait(5)


def test_preempt_point_waits_out_a_pause_and_reports_a_stop():
    m = machine()
    m._vcpu_work[0].append(lambda: m.__dict__.setdefault("ran", True))
    assert m.preempt_point(0) is False and m.ran
    m._running.clear()  # paused
    result = []
    thread = threading.Thread(target=lambda: result.append(m.preempt_point(0)), daemon=True)
    thread.start()
    time.sleep(0.2)
    assert not result  # held while paused
    m._set_running()
    thread.join(5)
    assert result == [False]
    m.loop.stop = lambda: None
    m.request_stop(StopReason.DESTROYED)
    assert m.preempt_point(0) is True


def test_others_held_parks_every_other_vcpu_for_the_block():
    m = machine(3)
    me = threading.get_ident()
    m._vcpu_of_thread[me] = 1  # the caller is vCPU 1's thread
    with m.others_held():
        assert m._must_park(0) and m._must_park(2) and not m._must_park(1)
        assert [v.kicks for v in m._vcpus] == [1, 0, 1]
        done = parked_thread(m, 0)
        assert not done.wait(0.1)
    assert done.wait(5) and not any(m._must_park(i) for i in range(3))
    del m._vcpu_of_thread[me]
    with m.others_held():  # from the event thread: all of them
        assert all(m._must_park(i) for i in range(3))


def test_no_kvm_run_is_claimed_while_another_vcpu_holds_this_one():
    """Any KVM_RUN, a settling one too, completes the vCPU's last exit and
    may read guest memory (skipping a hypercall decodes the instruction):
    none may start while the holder has a RAM slot deleted."""
    m = machine()
    m._vcpu_of_thread[threading.get_ident()] = 1
    with m.others_held():
        assert not m._claim_kvm_run(0, m._must_park) and not m._claim_kvm_run(0, m._held_by_other)
        assert m._in_guest == [False, False]
    assert m._claim_kvm_run(0, m._must_park) and m._in_guest[0]
    m._in_guest[0] = False
    m._running.clear()  # paused: a parking vCPU still settles
    assert not m._claim_kvm_run(0, m._must_park) and m._claim_kvm_run(0, m._held_by_other)


def test_a_holder_waits_for_a_kvm_run_claimed_before_it():
    m = machine()
    assert m._claim_kvm_run(0, m._must_park)  # vCPU 0 is entering KVM_RUN
    held = threading.Event()

    def hold():
        m._vcpu_of_thread[threading.get_ident()] = 1
        with m.others_held():
            held.set()

    threading.Thread(target=hold, daemon=True).start()
    assert not held.wait(0.2) and m._vcpus[0].kicks == 1  # kicked, and waited for
    m._in_guest[0] = False  # the kicked KVM_RUN returned
    assert held.wait(5)


def test_a_vcpu_parked_unsettled_for_a_holder_comes_back_to_settle_for_a_pause():
    m = machine()
    m._vcpu_of_thread[threading.get_ident()] = 1
    with m.others_held():
        m._running.clear()  # a pause comes while vCPU 0 is held out, unsettled
        done = threading.Event()
        threading.Thread(target=lambda: (m._park(m._vcpu_work[0], 0, settled=False), done.set()),
                         daemon=True).start()
        assert not done.wait(0.1)
    assert done.wait(5)  # back to the loop, which settles it before parking on
    assert m._must_park(0)
    settled = parked_thread(m, 0)
    assert not settled.wait(0.1)  # parked on, settled, while paused
    m._set_running()
    assert settled.wait(5)
