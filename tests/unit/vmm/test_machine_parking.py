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
        m._park(index)
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


def test_a_vcpu_waiting_for_another_serves_only_what_other_vcpus_wait_for():
    # vCPU 0, in a hypercall, waits for vCPU 1; vCPU 1, in one of its own,
    # waits for vCPU 0. Each serves the other's request while it waits.
    # Work from the event thread (a snapshot reading the vCPU) waits until
    # vCPU 0's hypercall is over: its state is not whole before that.
    m = machine()
    event_thread_work = []
    m._post(0, lambda: event_thread_work.append("ran"))
    start = threading.Barrier(2)
    answers = {}

    def in_hypercall(me, other):
        m._vcpu_of_thread[threading.get_ident()] = me
        start.wait()
        answers[me] = m.run_on_vcpu(other, lambda vcpu: (me, m.current_vcpu()), timeout=30)
        answers[f"{me} saw event-thread work"] = bool(event_thread_work)

    threads = [threading.Thread(target=in_hypercall, args=(i, 1 - i), daemon=True) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert answers == {0: (0, 1), 1: (1, 0), "0 saw event-thread work": False, "1 saw event-thread work": False}
    assert m.preempt_point(0) is False and event_thread_work == ["ran"]  # back in its loop


def test_a_vcpu_waiting_for_another_stops_waiting_when_the_vm_stops():
    m = machine()
    m._vcpu_of_thread[threading.get_ident()] = 0
    m.loop.stop = lambda: None
    threading.Timer(0.1, m.request_stop, args=(StopReason.DESTROYED,)).start()
    try:
        m.run_on_vcpu(1, lambda vcpu: None, timeout=30)
    except TimeoutError as error:
        assert "stopping" in str(error)
    else:
        raise AssertionError("vCPU 1 never ran it, yet it returned")


def test_debug_threads_catches_a_preemption_point_on_another_vcpus_thread(monkeypatch):
    from pyvmm.core.eventloop import WrongThread
    from pyvmm.vmm import machine as machine_module

    monkeypatch.setattr(machine_module, "DEBUG_THREADS", True)
    m = machine()
    m._vcpu_of_thread[threading.get_ident()] = 1
    assert m.preempt_point(1) is False
    try:
        m.preempt_point(0)
    except WrongThread:
        pass
    else:
        raise AssertionError("vCPU 0's preemption point ran on vCPU 1's thread")


def test_vcpus_asking_each_other_at_random_are_all_answered_on_the_right_thread():
    # A small stress of the rule above: four vCPU threads, each in its
    # hypercall sending requests to the others at random and now and then
    # back between two KVM_RUNs (a preemption point). The first request
    # that fails ends the run.
    import random

    count, requests = 4, 300
    m = machine(count)
    m.loop.stop = lambda: None
    failures, finished, lock, all_done = [], [], threading.Lock(), threading.Event()

    def vcpu_thread(me):
        m._vcpu_of_thread[threading.get_ident()] = me
        rng = random.Random(me)
        for _ in range(requests):
            if failures:
                break
            target = rng.choice([other for other in range(count) if other != me])
            try:
                ran_on = m.run_on_vcpu(target, lambda vcpu: m.current_vcpu(), timeout=30)
                if ran_on != target:
                    failures.append(f"vCPU {target}'s request ran on vCPU {ran_on}'s thread")
            except TimeoutError as error:
                failures.append(f"vCPU {me}: {error}")
            if rng.random() < 0.3:
                m.preempt_point(me)
        with lock:
            finished.append(me)
            if len(finished) == count:
                all_done.set()
        while not all_done.is_set():
            m.preempt_point(me)
            all_done.wait(0.001)

    threads = [threading.Thread(target=vcpu_thread, args=(index,), daemon=True) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == [] and sorted(finished) == list(range(count))
