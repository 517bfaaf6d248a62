"""A vCPU thread parked by VCPUOP_down or a pause, and a long hypercall's
preemption point: they serve queued work and end with the VM (no KVM: the
machine's run state only, with vCPUs that record kicks). A snapshot saves
no vCPU in the middle of a hypercall (with fake KVM vCPUs)."""

import errno
import os
import struct
import threading
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest

from pyvmm.config import VmConfig
from pyvmm.core.console import ConsoleOutput
from pyvmm.core.faults import NULL_FAULTS
from pyvmm.core.memory import GuestMemory
from pyvmm.core.snapfile import Written
from pyvmm.core.snapshot import SnapshotError
from pyvmm.core.stop import StopReason
from pyvmm.core.trace import NULL_TRACE
from pyvmm.kvm.exits import InterruptedExit, XenHypercallExit
from pyvmm.kvm.uapi import KVM_MP_STATE_HALTED
from pyvmm.kvm.vcpu import Translation
from pyvmm.vmm import machine as machine_module
from pyvmm.vmm import snapshot as snapshot_module
from pyvmm.vmm.machine import Machine
from pyvmm.xen import abi
from pyvmm.xen.hv.guest_access import GuestAccess
from pyvmm.xen.hv.hypercalls import HypercallDispatcher


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


def test_a_vcpu_restored_down_parks_once_the_vm_runs():
    # A restore takes vCPUs down (XenDomain.restore_state) before their threads exist.
    m = machine()
    m._vcpus = [None, None]
    m.set_vcpu_down(1, True)
    m._running.clear()  # as run() holds a restored guest until its state is back
    m._vcpus = [Vcpu(), Vcpu()]
    m._set_running()
    assert not m._must_park(0) and m._must_park(1)
    done = parked_thread(m, 1)
    assert m.run_on_vcpu(1, lambda vcpu: "served", timeout=5) == "served"  # e.g. VCPUOP_is_up's mp state
    m.set_vcpu_down(1, False)  # VCPUOP_up
    assert done.wait(5) and not m._must_park(1)


# --- a snapshot and the hypercall a vCPU is in ---------------------------------------------
#
# The vCPU threads run the machine's own loop (Machine._vcpu_thread) over a
# fake KVM vCPU whose guest makes one hypercall, handled by the real
# dispatcher; the snapshot is Machine.snapshot_to with its capture and
# writing stood in for (they save each vCPU on its own thread, as capture()).

PAGE = 4096
RAM = 1 << 20
BUF, ARRAY = 0x10000, 0x20000  # a memory_op's argument, its frame list
OPS = 0x40000  # GNTTABOP_copy's structures
SRC, DST = 0x90, 0x91  # the frames a copy copies between
VMCALL_RIP = 0x1000


class KvmVcpu:
    """A vCPU whose guest makes one hypercall, then idles until kicked. As
    KVM does with a KVM_EXIT_XEN, the result reaches RAX, and RIP moves past
    the VMCALL, only at the next KVM_RUN (immediate_exit or not)."""

    def __init__(self, number, *params):
        self.index = 0
        self.rip, self.rax = VMCALL_RIP, number
        self._call = (number, params + (0,) * (6 - len(params)))
        self._exit = None  # the hypercall KVM still has to complete
        self._kicked = threading.Event()
        self.halted = False  # KVM_MP_STATE_HALTED: runs again once woken (here: kicked)

    def _complete(self):
        if self._exit is not None:
            self.rax, self.rip, self._exit = self._exit.result, self.rip + 3, None

    def run(self):
        self._complete()
        if self._call is not None and not self._kicked.is_set() and not self.halted:
            number, params = self._call
            self._call = None
            self._exit = XenHypercallExit(True, 0, number, params, memoryview(bytearray(8)))
            return self._exit
        self._kicked.wait()
        self._kicked.clear()
        return InterruptedExit()

    def settle(self):
        self._complete()
        self._kicked.clear()  # as KVM_RUN clears immediate_exit
        return InterruptedExit()

    def kick(self):
        self._kicked.set()

    def set_mp_state(self, state):
        self.halted = state == KVM_MP_STATE_HALTED

    def save(self):
        return {"rip": self.rip, "rax": self.rax, "in_hypercall": self._exit is not None, "halted": self.halted}


class Domain:
    """What decrease_reservation and GNTTABOP_copy need of the domain; the
    preempt points are the machine's."""

    domid = 1
    vcpu_count = 1

    def __init__(self, memory):
        self.memory = memory
        self.machine = None
        self.given_back = []
        self.first_batch = threading.Event()  # the hypercall is under way
        self.go_on = threading.Event()  # ... and may go on
        self.preempted = 0
        self.preempt_seen = threading.Condition()

    def note_long_mode(self, long_mode):
        pass

    def poll(self, vcpu, ports, timeout):
        # XenDomain.poll: nothing pending, so the vCPU halts once the hypercall completes.
        self.polled = ports
        self.machine.run_on_vcpu(vcpu, lambda v: v.set_mp_state(KVM_MP_STATE_HALTED))

    def decrease_reservation(self, gpfns, order):
        if not self.given_back:
            self.first_batch.set()
            self.go_on.wait()
        done = 0
        for gpfn in gpfns:
            if gpfn in self.given_back:
                break  # XenDomain's: it stops at a frame given back already
            self.given_back.append(gpfn)
            done += 1
        return done

    def ram_page(self, gfn):
        return self.memory.view(gfn * PAGE, PAGE)

    def preempt(self, vcpu):
        with self.preempt_seen:
            self.preempted += 1
            self.preempt_seen.notify_all()
        return self.machine.preempt_point(vcpu)

    def wait_preempted(self, more_than):
        with self.preempt_seen:
            assert self.preempt_seen.wait_for(lambda: self.preempted > more_than, timeout=10)
            return self.preempted


def run_guest(monkeypatch, tmp_path, kvm_vcpu, memory, translate=lambda gva: Translation(gva, True, True)):
    """A one-vCPU machine running `kvm_vcpu` on its own thread over
    `memory`; the snapshots it takes are kept in `m.snapshots` (the vCPUs'
    saved state, and what the domain had given back when its state was
    saved)."""
    domain = Domain(memory)
    m = machine(1)
    domain.machine = m
    m._vcpus = [None]
    m.kvm, m.pio, m.mmio, m.boot_state = None, None, None, None
    m.memory = memory
    clock = SimpleNamespace(clock=1)
    m.vm = SimpleNamespace(create_vcpu=lambda index: kvm_vcpu, get_clock=lambda: clock, set_clock=lambda value: None)
    dispatcher = HypercallDispatcher(domain)
    m.xen = SimpleNamespace(configure_vcpu=lambda vcpu, index: None, cpuid_leaves=lambda index: [],
                            hypercall_handler=lambda index, vcpu: partial(dispatcher.handle, vcpu=index,
                                                                          access=GuestAccess(translate, memory)))
    m.loop.stop = lambda: None  # no loop runs here
    monkeypatch.setattr(machine_module, "configure_vcpu", lambda *args, **kwargs: None)
    m.snapshots = []

    def capture(machine, saved):
        given_back = list(domain.given_back)  # the parts first, as capture()
        vcpus = [machine.run_on_vcpu(index, lambda vcpu: vcpu.save(), timeout=10)
                 for index in range(machine.config.vcpus)]
        return {}, {"vcpus": vcpus, "given_back": given_back}

    monkeypatch.setattr(snapshot_module, "capture", capture)
    monkeypatch.setattr(snapshot_module, "write_snapshot",
                        lambda fd, header, state, memory: m.snapshots.append(state) or Written(1, 0, 0))
    thread = threading.Thread(target=m._vcpu_thread, args=(0,), daemon=True)
    thread.start()
    m._ready.wait()
    m.thread = thread

    def snapshot(name="vm.snap"):
        fd = os.open(tmp_path / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            return m.snapshot_to(fd)
        finally:
            os.close(fd)

    m.snapshot = snapshot
    return m, domain


def stop(m):
    m.request_stop(StopReason.DESTROYED)
    m.thread.join(10)
    assert not m.thread.is_alive()


def wait_until(predicate):
    for _ in range(10000):
        if predicate():
            return
        time.sleep(0.001)
    raise AssertionError("never happened")


@pytest.mark.parametrize("paused_first", [False, True], ids=["running", "paused-by-the-operator"])
def test_a_snapshot_does_not_save_a_vcpu_in_the_middle_of_decrease_reservation(monkeypatch, tmp_path,
                                                                               paused_first):
    # Restored before its VMCALL, the guest would give the first frames back
    # again, be told fewer extents than it asked for, and Linux's balloon
    # driver would BUG.
    extents = 1300  # several preempt points (hypercalls.RESERVATION_BATCH extents apart)
    vcpu = KvmVcpu(abi.HYPERCALL_memory_op, abi.XENMEM_decrease_reservation, BUF)
    memory = GuestMemory([(0, RAM)])
    memory.write(ARRAY, struct.pack(f"<{extents}Q", *range(0x100, 0x100 + extents)))
    memory.write(BUF, abi.MEMORY_RESERVATION.pack(abi.MEMORY_RESERVATION.record(
        extent_start=ARRAY, nr_extents=extents, extent_order=0, mem_flags=0, domid=abi.DOMID_SELF), False))
    m, domain = run_guest(monkeypatch, tmp_path, vcpu, memory)
    assert domain.first_batch.wait(10)
    if paused_first:
        m.pause()
        domain.go_on.set()  # the vCPU reaches a preempt point and parks there, mid-call
        summary = m.snapshot()
        assert m.paused  # as the operator left it
        m.resume()
    else:
        done = []
        snapshot = threading.Thread(target=lambda: done.append(m.snapshot()), daemon=True)
        snapshot.start()
        wait_until(lambda: m.paused)
        domain.go_on.set()
        snapshot.join(30)
        summary = done[0]
        assert not m.paused
    assert summary["stopped"] is False
    [state] = m.snapshots
    assert state["vcpus"] == [{"rip": VMCALL_RIP + 3, "rax": extents, "in_hypercall": False, "halted": False}]
    assert state["given_back"] == list(range(0x100, 0x100 + extents))
    assert vcpu.rax == extents and domain.given_back == list(range(0x100, 0x100 + extents))
    stop(m)


def test_a_vcpu_halted_in_sched_poll_is_saved_with_its_poll_returned(monkeypatch, tmp_path):
    # Saved after its VMCALL with 0 in RAX, and halted: a restore that wakes
    # it (XenDomain.finish_restore) gives the guest a spurious wake-up, which
    # Xen allows, and no poll is made twice.
    memory = GuestMemory([(0, RAM)])
    memory.write(ARRAY, struct.pack("<I", 5))
    memory.write(BUF, abi.SCHED_POLL.pack(abi.SCHED_POLL.record(ports=ARRAY, nr_ports=1, timeout=0), False))
    vcpu = KvmVcpu(abi.HYPERCALL_sched_op, abi.SCHEDOP_poll, BUF)
    m, domain = run_guest(monkeypatch, tmp_path, vcpu, memory)
    wait_until(lambda: vcpu.halted)
    m.snapshot()
    assert m.snapshots[0]["vcpus"] == [{"rip": VMCALL_RIP + 3, "rax": 0, "in_hypercall": False, "halted": True}]
    assert domain.polled == [5] and not m.paused
    stop(m)


def endless_copies(gva):
    """GNTTABOP_copy's structures as the guest's page tables show them: 40
    pages (4096 structures) seen again and again, so a count of 2**31 - 1
    never runs out of structures."""
    if gva < OPS:
        return Translation(gva, True, True)
    page = (gva - OPS) // PAGE % 40
    return Translation(OPS + page * PAGE + gva % PAGE, True, True)


def test_an_endless_copy_batch_fails_the_snapshot_loudly_and_the_guest_runs_on(monkeypatch, tmp_path):
    monkeypatch.setattr(machine_module, "SNAPSHOT_SETTLE_WAIT", 0.2, raising=False)
    vcpu = KvmVcpu(abi.HYPERCALL_grant_table_op, abi.GNTTABOP_copy, OPS, (1 << 31) - 1)
    op = abi.GNTTAB_COPY.pack(abi.GNTTAB_COPY.record(
        source_u=SRC, source_domid=abi.DOMID_SELF, source_offset=0, dest_u=DST, dest_domid=abi.DOMID_SELF,
        dest_offset=0, len=8, flags=0, status=99), False)
    memory = GuestMemory([(0, RAM)])
    memory.write(OPS, op * 4096)
    m, domain = run_guest(monkeypatch, tmp_path, vcpu, memory, translate=endless_copies)
    seen = domain.wait_preempted(0)
    with pytest.raises(SnapshotError, match=r"vCPU 0 did not end its hypercall .* within 0.2 s"):
        m.snapshot()
    assert not m.snapshots and not m.paused  # nothing written; the guest goes on
    domain.wait_preempted(seen + 1)  # ... in its batch, still
    # Paused by the operator, it stays so, and the batch parks at its next preempt point.
    m.pause()
    with pytest.raises(SnapshotError, match="vCPU 0 did not end its hypercall"):
        m.snapshot("again.snap")
    assert m.paused and not m.snapshots
    m.resume()
    domain.wait_preempted(domain.preempted + 1)
    stop(m)
    assert vcpu._exit.result == -errno.EINTR & (1 << 64) - 1  # the batch ended by the stop
    assert memory.read(OPS + abi.GNTTAB_COPY_STATUS_OFFSET[False], 2) == struct.pack("<h", abi.GNTST_okay)


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
        threading.Thread(target=lambda: (m._park(0, settled=False), done.set()),
                         daemon=True).start()
        assert not done.wait(0.1)
    assert done.wait(5)  # back to the loop, which settles it before parking on
    assert m._must_park(0)
    settled = parked_thread(m, 0)
    assert not settled.wait(0.1)  # parked on, settled, while paused
    m._set_running()
    assert settled.wait(5)
