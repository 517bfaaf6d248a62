"""Assembles a VM from its parts and runs it until something stops it.

One Machine is one boot: a guest reboot builds a fresh Machine (see
runner.py), so no device ever has to implement a reset path of its own.
MachineBuilder (builder.py) builds it.

Threads: one per vCPU (each creates and runs its own KVM vCPU; the GIL is
released inside KVM_RUN) and the main thread running the event loop for
console input, device timers and stop requests.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import sys
import threading
import time
from functools import partial

from typing import TYPE_CHECKING, Callable

from .. import diagnose
from . import liveness
from ..core.bus import Bus
from ..config import VmConfig
from ..core.console import ConsoleOutput, EscapeFilter, RawTerminal
from ..core.eventloop import EventLoop, WrongThread
from .exit_handler import ExitHandler
from .liveness import DeadGuestDetector, ForeignStateDetector
from ..core.memory import GuestMemory
from ..platform import Platform
from ..core.snapshot import SnapshotError
from ..core.stop import StopReason
from ..core.faults import FaultInjector
from ..core.trace import Tracer
from ..core.stats import RunStats
from .vcpu_setup import apply_boot_state, configure_vcpu
from ..vcpu_state import read_registers
from ..kvm import state as kvm_state
from ..kvm.exits import InterruptedExit

if TYPE_CHECKING:
    from ..boot.cpustate import BootCpuState
    from ..kvm import Kvm, Vm
    from ..xen.domain import XenDomain
    from .snapshot import RestorePlan

log = logging.getLogger(__name__)

DIAGNOSE_WAIT = 0.5  # how long a diagnosis waits for each vCPU's thread
PARK_WAIT = 2.0  # how long pause() waits for every vCPU to leave KVM_RUN
SETTLE_RUNS = 64  # KVM_RUNs a parking vCPU may need to complete an instruction half done (rep ins/outs)
# How long a snapshot waits for every vCPU to end the hypercall it is in (a
# guest's longest legitimate batch takes milliseconds; a hostile GNTTABOP_copy
# of 2**31 copies would take hours: the snapshot fails instead).
SNAPSHOT_SETTLE_WAIT = 5.0
DEBUG_THREADS = os.environ.get("PYVMM_DEBUG_THREADS") == "1"  # docs/ARCHITECTURE.md, Threads


class Machine:
    """One VM for one boot. MachineBuilder (builder.py) makes it: the
    constructor sets up only the run state, and the builder's steps give it
    its KVM VM, memory, buses, devices, Xen domain, guest and debugger."""

    # Set by MachineBuilder's steps, in this order.
    kvm: Kvm
    vm: Vm
    memory: GuestMemory
    pio: Bus
    mmio: Bus
    platform: Platform
    xen: XenDomain | None
    boot_state: BootCpuState | None  # None for a machine restored from a snapshot

    def __init__(self, config: VmConfig, console: ConsoleOutput, *, trace: Tracer, faults: FaultInjector):
        """The run state only: the event loop, the stop and pause state and
        one slot per vCPU. `trace` and `faults` are the VM's (the runner's,
        for the whole run: every boot gets the same two)."""
        self.config = config
        self.console = console
        self.trace = trace
        self.faults = faults
        self.loop = EventLoop()
        self.loop.on_callback_error = self._event_callback_failed
        self._callback_failures: collections.Counter[str] = collections.Counter()
        self._stop_lock = threading.Lock()
        self.stop_reason: StopReason | None = None
        self.stop_detail: str | None = None  # what exactly, e.g. "pvpanic" for a CRASH
        self.xen = None
        self._threads: list[threading.Thread] = []
        self._vcpus: list = [None] * config.vcpus
        # Work that must run on a given vCPU's own thread (KVM serialises
        # vCPU ioctls with KVM_RUN, so another thread would block on it).
        self._vcpu_work: list[collections.deque] = [collections.deque() for _ in range(config.vcpus)]
        # The part of it another vCPU's thread waits for (run_on_vcpu from a
        # vCPU thread): served also while this vCPU itself waits for another,
        # so two vCPUs asking each other never wait for each other.
        self._peer_work: list[collections.deque] = [collections.deque() for _ in range(config.vcpus)]
        self._vcpu_of_thread: dict[int, int] = {}
        # Pausing parks every vCPU thread outside KVM_RUN; `_running` is set
        # while the guest may run.
        self._running = threading.Event()
        self._running.set()
        self._pause_lock = threading.Lock()
        self._paused_clock = None
        # A paused vCPU thread waits on `_parking`, still serving the work
        # queued for it. `_in_guest[i]` is True while vCPU i's thread is in
        # KVM_RUN (written by that thread only), so pause() knows when no
        # vCPU runs.
        self._parking = threading.Condition()
        self._in_guest = [False] * config.vcpus
        # `_at_exit[i]`: vCPU i's thread is parked between two exits, its
        # last one completed (_settle), so its saved state is whole: not
        # inside a hypercall's preempt point. `_finishing`: a snapshot waits
        # for every vCPU to get there, and preempt points do not park.
        # Both under `_parking`.
        self._at_exit = [False] * config.vcpus
        self._finishing = False
        # VCPUOP_down: vCPU i parks like a paused one until VCPUOP_up.
        self._vcpu_down = [False] * config.vcpus
        # others_held(): the vCPU whose thread holds every other one parked
        # (None: no holder); one holder at a time.
        self._holder: int | None = None
        self._hold_lock = threading.Lock()
        self.started_at = time.monotonic()  # the builder stamps it again once the machine is built
        self.control = None  # the run's ControlServer (runner.py), kept across reboots
        self.run_counts = {"reboots": 0, "triple_faults": 0}  # the whole run's, set by runner.py
        self.stats: RunStats | None = None  # the whole run's with --stats, set by runner.py before run()
        self._xenstore_server = None
        self.xenstore_socket_path = None
        self._listening = False
        self._ready = threading.Barrier(config.vcpus + 1)
        self._setup_errors: list[BaseException] = []
        self.gdb = None
        # A firmware boot's ROM copy of the BIOS and the image's SHA-256
        # (MachineBuilder; a snapshot refuses to restore with another image).
        self.firmware_rom = None
        self.firmware_digest: str | None = None
        # Set by MachineBuilder.from_snapshot: what run() restores once the
        # vCPUs exist, before the guest runs (pyvmm/vmm/snapshot.py).
        self.restore_plan: RestorePlan | None = None
        self._vcpu_caps: kvm_state.VcpuCapabilities | None = None
        self._vcpu_caps_lock = threading.Lock()
        # (when, each vCPU's KVM counters, hypercall counts): what a diagnosis
        # compares the present with (event thread only).
        self._activity: collections.deque = collections.deque(maxlen=diagnose.ACTIVITY_ROUNDS)

    def hold_vcpus(self) -> None:
        """Keep every vCPU from its first entry until resume() (--gdb-wait:
        until gdb says continue). Before run() only."""
        self._running.clear()

    # --- stopping -----------------------------------------------------------

    def request_stop(self, reason: StopReason, detail: str | None = None) -> None:
        """Stop the VM for `reason`; the first reason wins. Any thread may call."""
        with self._stop_lock:
            if self.stop_reason is not None:
                return
            self.stop_reason = reason
            self.stop_detail = detail
        self._set_running()  # a paused VM must be able to stop
        for vcpu in self._vcpus:
            if vcpu is not None:
                vcpu.kick()
        self.loop.stop()

    def _event_callback_failed(self, callback, error: Exception) -> None:
        # A bug in one device's callback must not take every other device
        # (and the guest) down with it: log it with its traceback the first
        # time, then only count, so a callback failing at every event cannot
        # flood the log.
        function = getattr(callback, "func", callback)  # a partial: name what it wraps
        name = getattr(function, "__qualname__", None) or type(function).__qualname__
        self._callback_failures[name] += 1
        count = self._callback_failures[name]
        if count == 1:
            log.error("event thread: %s failed; the VM goes on", name, exc_info=error)
        elif count in (10, 100, 1000) or count % 10000 == 0:
            log.error("event thread: %s has failed %d times (last: %s)", name, count, error)

    # --- running ------------------------------------------------------------

    def open_listeners(self) -> None:
        """Listen on the gdb and xenstore sockets: before any thread starts
        (runner.py locks the sandbox down between this and run())."""
        if self._listening:
            return
        self._listening = True
        if self.gdb is not None:
            self.gdb.listen()
        self._start_sockets()

    def run(self, deadline: float | None) -> StopReason:
        self.open_listeners()
        if self.stats is not None:
            self._count_into(self.stats)
        held = self.paused  # --gdb-wait: until gdb says continue
        if self.restore_plan is not None:
            self.restore_plan.step("the run's set-up (listeners, the sandbox's lockdown)")
            self.vcpu_capabilities()  # before the vCPU threads ask for it
            self._running.clear()  # the guest waits until every part of it is back
        for index in range(self.config.vcpus):
            thread = threading.Thread(target=self._vcpu_thread, args=(index,), name=f"vcpu{index}", daemon=True)
            self._threads.append(thread)
            thread.start()
        try:
            self._ready.wait()
            if self._setup_errors:
                raise self._setup_errors[0]
            if self.restore_plan is not None:
                self._finish_restore()
                if not held:
                    self._set_running()
            if self.gdb is not None:
                self.gdb.start()
            if deadline is not None:
                self.loop.call_later(max(0.0, deadline - time.monotonic()), self._timed_out)
            self.platform.start(self.loop)
            if self.xen is not None:
                self.xen.start()
            self._start_liveness_checks()
            self._note_activity()
            with self._console_input():
                self.loop.run()
        finally:
            # Whatever ended the loop, no vCPU may outlive it: close() unmaps
            # the memory they run on.
            self.request_stop(StopReason.ERROR)
            self._join()
        return self.stop_reason

    def _count_into(self, stats: RunStats) -> None:
        # Before any thread starts: each vCPU's counters are handed to its
        # thread by Thread.start(), and the event thread is this one.
        for index in range(self.config.vcpus):
            stats.vcpu(index)
        if self.xen is not None:
            self.xen.count_into(stats.event, stats.vcpus)

    # --- operator sockets ---------------------------------------------------------

    def _start_sockets(self) -> None:
        if self.xen is None:
            return
        from ..core.runtime import xenstore_socket_path
        from ..xen.xenstore.socket_server import XenstoreSocketServer

        config = self.config
        self.xenstore_socket_path = config.xenstore_socket or xenstore_socket_path(config.name)
        self._xenstore_server = XenstoreSocketServer(self.xenstore_socket_path, self.loop, self.xen.store)
        self._xenstore_server.start()

    def control_event(self, name: str, data: dict) -> None:
        """Tell every control client that `name` happened (event thread or after the loop)."""
        if self.control is not None:
            self.control.broadcast(name, data)

    def _vcpu_thread(self, index: int) -> None:
        try:
            vcpu = self.vm.create_vcpu(index)
            self._vcpu_of_thread[threading.get_ident()] = index
            if self.restore_plan is not None:
                if self.xen is not None:
                    self.xen.configure_vcpu(vcpu, index)
                try:
                    warnings = kvm_state.restore_vcpu(vcpu, self.restore_plan.vcpu_state(index),
                                                      self.vcpu_capabilities())
                except SnapshotError as error:
                    raise SnapshotError(f"{self.restore_plan.path}: vCPU {index}: {error}") from None
                for warning in warnings:
                    log.warning("restore: vCPU %d: %s", index, warning)
            elif self.xen is not None:
                configure_vcpu(self.kvm, vcpu, index, self.config.vcpus,
                               hypervisor_leaves=self.xen.cpuid_leaves(index), kvm_base=None)
                self.xen.configure_vcpu(vcpu, index)
            else:
                configure_vcpu(self.kvm, vcpu, index, self.config.vcpus)
            if index == 0 and self.boot_state is not None:
                apply_boot_state(vcpu, self.boot_state)
            self._vcpus[index] = vcpu
        except BaseException as error:  # reported by run() on the main thread
            self._setup_errors.append(error)
            self._ready.wait()
            return
        self._ready.wait()
        hypercall = None
        if self.xen is not None:
            hypercall = self.xen.hypercall_handler(index, vcpu)
        debug = None
        if self.gdb is not None:
            gdb = self.gdb
            debug = lambda exit: gdb.debug_exit(index, exit)  # noqa: E731
        handle = ExitHandler(self.pio, self.mmio, hypercall, debug, vcpu=index,
                             registers=lambda: read_registers(vcpu), trace=self.trace).handle
        settle_handle = handle  # a settling vCPU's rare exits are not counted by --stats
        work, peer_work = self._vcpu_work[index], self._peer_work[index]
        in_guest = self._in_guest
        run = vcpu.run
        finish = None
        if self.stats is not None:  # chosen once: without --stats nothing is timed or counted
            run, handle, finish = self._counted(index, run, handle)
        try:
            while self.stop_reason is None:
                if self._must_park(index):
                    # Settled before anything queued for the parked vCPU
                    # runs: what reads its state reads it whole. Not while
                    # another vCPU holds this one out (others_held): the
                    # settling KVM_RUN completes the last exit, which may
                    # read guest memory (skipping a hypercall instruction
                    # decodes it) while the holder has a RAM slot deleted.
                    # It settles once the holder is done, if it still parks.
                    settled = self._claim_kvm_run(index, self._held_by_other)
                    if settled:
                        try:
                            self._settle(vcpu, settle_handle)
                        finally:
                            in_guest[index] = False
                    self._park(index, settled=settled)
                    continue
                while work or peer_work:  # inline: this loop runs at every exit
                    (work if work else peer_work).popleft()()
                if not self._claim_kvm_run(index, self._must_park):
                    continue
                try:
                    vcpu_exit = run()
                finally:
                    in_guest[index] = False
                reason = handle(vcpu_exit)
                if reason is not None:
                    self.request_stop(reason)
        except Exception:
            log.exception("vCPU %d failed", index)
            self.request_stop(StopReason.ERROR)
        finally:
            if finish is not None:
                finish()

    def _settle(self, vcpu, handle) -> None:
        """Complete what KVM left half done at the vCPU's last exit before
        it parks: KVM finishes a port or MMIO read (its data), a hypercall
        (its result) or a string I/O instruction only when KVM_RUN is next
        entered, and keeps that in no state it lets anyone read. A KVM_RUN
        with immediate_exit completes it and runs no guest instruction
        (KVM's API documentation, KVM_RUN; Vcpu.settle). A `rep ins` may
        need the VMM again before it is done: its exits are handled as usual."""
        for _ in range(SETTLE_RUNS):
            vcpu_exit = vcpu.settle()
            if isinstance(vcpu_exit, InterruptedExit):
                return
            reason = handle(vcpu_exit)
            if reason is not None:
                self.request_stop(reason)
                return
        log.warning("vCPU %s: an instruction was still not complete after %d runs; its state may be mid-way",
                    getattr(vcpu, "index", "?"), SETTLE_RUNS)

    def _counted(self, index: int, run, handle):
        """`run` and `handle` for a run with --stats: timed, each exit counted
        by ExitCounters into this vCPU's VcpuStats (which only this vCPU's
        thread writes until the runner reads it after the join); and what
        to call when the loop ends."""
        from .exit_stats import ExitCounters  # only with --stats (the sandbox preloads it)

        run_stats = self.stats
        stats = run_stats.vcpu(index)
        slot_of = ExitCounters(stats, self.pio, self.mmio).slot
        now = time.perf_counter_ns
        # [end of the last KVM_RUN, vCPU 0's first KVM_RUN still to come
        # (it ends the start-up, after any --gdb-wait)]
        state = [now(), index == 0]

        def timed_run():
            if state[1]:
                run_stats.note_first_run()
                state[1] = False
            entered = now()
            try:
                return run()
            finally:
                returned = now()
                stats.vmm_ns += entered - state[0]
                stats.run_ns += returned - entered
                stats.runs += 1
                state[0] = returned

        def counted_handle(vcpu_exit):
            try:
                return handle(vcpu_exit)
            finally:
                slot = slot_of(vcpu_exit)
                slot[0] += 1
                slot[1] += now() - state[0]

        def finish():
            stats.vmm_ns += now() - state[0]

        return timed_run, counted_handle, finish

    def current_vcpu(self) -> int | None:
        """The index of the vCPU whose thread is calling, if any."""
        return self._vcpu_of_thread.get(threading.get_ident())

    def vcpu(self, index: int):
        """vCPU `index`; its ioctls from another thread only while it is parked."""
        return self._vcpus[index]

    def run_on_vcpu(self, index: int, function, timeout: float = 10.0):
        """Run `function(vcpu)` on vCPU `index`'s thread and return its result.

        From another vCPU's thread (a hypercall acting on vCPU `index`), the
        caller serves what other vCPUs queued for it while it waits: the
        target may be in a hypercall of its own, waiting for the caller."""
        vcpu = self._vcpus[index]
        me = self.current_vcpu()
        if me == index:
            return function(vcpu)
        done = threading.Event()
        outcome: list = []

        def job():
            try:
                outcome.append((True, function(vcpu)))
            except BaseException as error:  # handed to the caller
                outcome.append((False, error))
            done.set()
            if me is not None:
                with self._parking:
                    self._parking.notify_all()  # the waiting vCPU waits on it

        if me is None:
            self._post(index, job)
            finished = done.wait(timeout)
        else:
            self._post(index, job, self._peer_work)
            finished = self._wait_serving(me, done, timeout)
        if not finished:
            if self.stop_reason is not None:
                raise TimeoutError(f"vCPU {index} did not run queued work: the VM is stopping")
            raise TimeoutError(f"vCPU {index} did not run queued work within {timeout}s")
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    def post_to_vcpu(self, index: int, function) -> None:
        """Run `function(vcpu)` on vCPU `index`'s thread soon, without waiting
        for it; `function` must not raise (it would end the vCPU thread)."""
        vcpu = self._vcpus[index]
        self._post(index, lambda: function(vcpu))

    def _post(self, index: int, job, queues: list[collections.deque] | None = None) -> None:
        (self._vcpu_work if queues is None else queues)[index].append(job)
        self._vcpus[index].kick()
        with self._parking:
            self._parking.notify_all()  # a parked or waiting vCPU serves it too

    def _wait_serving(self, me: int, done: threading.Event, timeout: float) -> bool:
        """On vCPU `me`'s thread, outside KVM_RUN: wait until `done` is set
        (False: `timeout` passed or the VM stops), running meanwhile the work
        other vCPUs' threads wait for from this one (never the rest: a
        snapshot must read this vCPU only once its hypercall is complete)."""
        peer_work = self._peer_work[me]
        deadline = time.monotonic() + timeout
        with self._parking:
            while True:
                if peer_work:  # first: the vCPU that answered may be waiting for this one too
                    self._parking.release()
                    try:
                        while peer_work:
                            peer_work.popleft()()
                    finally:
                        self._parking.acquire()
                    continue
                if done.is_set():
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.stop_reason is not None:
                    return False
                self._parking.wait(remaining)

    @staticmethod
    def _serve(work: collections.deque, peer_work: collections.deque) -> None:
        while work or peer_work:
            (work if work else peer_work).popleft()()

    def preempt_point(self, index: int) -> bool:
        """For a long hypercall, between its items, on vCPU `index`'s own
        thread: run the work queued for it and wait out a pause, as the vCPU
        loop would between two KVM_RUNs. True when the VM is stopping (the
        hypercall should end at once).

        Not the pause of a snapshot: a vCPU saved here would be restored
        before the VMCALL (KVM writes the result and moves past it only at
        the next KVM_RUN) and run the whole hypercall again. So while a
        snapshot waits (pause_for_snapshot), the hypercall goes on to its end
        and the vCPU parks after it. (Ending it here with a continuation, as
        Xen does, would need the VMCALL executed again; but KVM completes a
        KVM_EXIT_XEN at the next KVM_RUN by writing RAX and skipping the
        VMCALL, and nothing in its API cancels that.)"""
        if DEBUG_THREADS and self.current_vcpu() != index:
            # Another thread would run this vCPU's queued ioctls, which KVM
            # blocks until the vCPU leaves KVM_RUN.
            raise WrongThread(f"preempt_point for vCPU {index} on {threading.current_thread().name}")
        self._serve(self._vcpu_work[index], self._peer_work[index])
        if not self._running.is_set() and not self._finishing:
            self._park(index, at_exit=False)
        return self.stop_reason is not None

    def _claim_kvm_run(self, index: int, stay_out: Callable[[int], bool]) -> bool:
        """Mark vCPU `index` as entering KVM_RUN (its own thread), unless
        `stay_out(index)`. Any KVM_RUN counts, even one that returns at
        once: KVM first completes the last exit, which may touch guest
        memory. The flag is set before the check and others_held() sets
        its holder before it reads the flags, so (each step atomic under
        the GIL) either this thread sees the holder and stays out, or the
        holder sees the flag and waits for this KVM_RUN to end (it was
        kicked)."""
        self._in_guest[index] = True
        if stay_out(index):
            self._in_guest[index] = False
            return False
        return True

    def _park(self, index: int, *, at_exit: bool = True, settled: bool = True) -> None:
        """Wait outside KVM_RUN until the VM runs again (and this vCPU is
        up); the vCPU's own thread. Work queued for the vCPU still runs
        meanwhile: a vCPU blocked in a hypercall may be waiting for it
        (run_on_vcpu). `at_exit`: parked by the vCPU loop; otherwise at a
        hypercall's preempt point, which a snapshot's wait ends
        (pause_for_snapshot). Not `settled` (parked by the loop for another
        vCPU's others_held, its last exit not completed): it returns once
        that holder is done, to settle before it parks on for a pause, and
        a snapshot does not count it as parked after a completed exit."""
        work, peer_work = self._vcpu_work[index], self._peer_work[index]
        completed = at_exit and settled
        with self._parking:
            if completed:
                self._at_exit[index] = True
                self._parking.notify_all()
            try:
                while self.stop_reason is None and self._must_park(index):
                    if not settled and not self._held_by_other(index):
                        return
                    if not at_exit and self._finishing:
                        return  # a snapshot waits for this hypercall to end
                    if work or peer_work:
                        self._parking.release()
                        try:
                            self._serve(work, peer_work)
                        finally:
                            self._parking.acquire()
                        continue
                    self._parking.wait()
            finally:
                if completed:
                    self._at_exit[index] = False

    def _set_running(self) -> None:
        self._running.set()
        with self._parking:
            self._parking.notify_all()

    def _wait_out_of_guest(self, timeout: float) -> bool:
        """Wait until no vCPU thread is inside KVM_RUN; False on timeout.
        Once `_running` is clear and every vCPU kicked, a thread that enters
        KVM_RUN after this has looked leaves it at once (immediate_exit)
        without running a guest instruction, and parks."""
        deadline = time.monotonic() + timeout
        while any(self._in_guest):
            if self.stop_reason is not None:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.0005)
        return True

    # --- snapshots (pyvmm/vmm/snapshot.py, pyvmm/core/snapshot.py) ---------------

    def stateful_parts(self) -> dict[str, object]:
        """The parts whose save_state()/restore_state() a snapshot holds, by
        name, in the order they are restored. The Xen domain is one part:
        it saves and restores what it is made of (event channels, grant
        table, xenstore, backends) itself, in the order they need."""
        platform = self.platform
        parts = {"serial": platform.serial, "rtc": platform.rtc, "i8042": platform.i8042,
                 "acpi_pm": platform.acpi_pm, "pci": platform.pci}
        if platform.fw_cfg is not None:  # a firmware boot: fw_cfg and the IDE channels
            parts["fw_cfg"] = platform.fw_cfg
            parts.update((f"ide{index}", channel) for index, channel in enumerate(platform.ide))
        if self.xen is not None:
            parts["xen"] = self.xen
        return parts

    def vcpu_capabilities(self) -> kvm_state.VcpuCapabilities:
        """What this KVM saves of a vCPU (asked once per machine)."""
        with self._vcpu_caps_lock:
            if self._vcpu_caps is None:
                self._vcpu_caps = kvm_state.VcpuCapabilities(self.kvm, self.vm)
            return self._vcpu_caps

    def snapshot_to(self, fd: int, *, stop: bool = False) -> dict:
        """Write a snapshot of the VM into `fd` (an empty regular file; the
        caller closes it), then stop the VM (`stop`) or let it run on as it
        was (a VM the operator paused stays paused). Event thread. A part
        that cannot save its state, or a failed write, raises SnapshotError
        and the VM goes on as it was. Tells control clients (SNAPSHOT)."""
        from .snapshot import take

        if self.stop_reason is not None:
            raise SnapshotError("the VM is stopping")
        was_paused = self.paused
        try:
            taken = take(self, fd, stopping=stop)
        except SnapshotError:
            if not was_paused:
                self.resume()
            raise
        except OSError as error:
            if not was_paused:
                self.resume()
            raise SnapshotError(f"writing the snapshot failed: {error.strerror or error}") from None
        summary = {"bytes": taken.written.file_length, "data_bytes": taken.written.data_bytes,
                   "state_bytes": taken.written.state_bytes, "seconds": round(taken.seconds, 4),
                   "paused_seconds": round(taken.paused_seconds, 4), "stopped": stop}
        log.info("snapshot written: %d bytes (%d of RAM data) in %.3f s%s", taken.written.file_length,
                 taken.written.data_bytes, taken.seconds, "; stopping the VM" if stop else "")
        self.control_event("SNAPSHOT", summary)
        if stop:
            self.request_stop(StopReason.SNAPSHOT)
        elif not was_paused:
            self.resume()
        return summary

    @property
    def paused_clock(self) -> int | None:
        """The guest's clock (kvmclock ns) as pause() froze it; None while running."""
        return self._paused_clock

    def _finish_restore(self) -> None:
        """The rest of a restore, once every vCPU holds its registers and
        before any runs: the guest's clock goes on from where it stood
        (KVM_SET_CLOCK: no jump in its monotonic time); then KVM's Xen
        attributes, which need that clock (KVM writes the wallclock into
        shared_info; a Xen timer's expiry is in guest time); then each
        part's finish_restore(), for what needs KVM's state back first."""
        plan = self.restore_plan
        plan.step("vCPUs restored")
        self.vm.set_clock(plan.kvm["clock"])
        if self.xen is not None:
            bits = self.kvm.xen_capabilities()
            host_address = self.memory.host_address
            kvm_state.xen_restore_vm(self.vm, plan.kvm["xen"]["vm"], bits, host_address)
            for index, saved in enumerate(plan.kvm["xen"]["vcpus"]):
                self.run_on_vcpu(index, partial(kvm_state.xen_restore_vcpu, state=saved, capabilities=bits,
                                                host_address=host_address))
        plan.step("clock and KVM's Xen attributes")
        for part in plan.parts.values():
            finish = getattr(part, "finish_restore", None)
            if finish is not None:
                finish()
        plan.step("parts finished")
        self.restore_plan = None
        log.info("restored from %s: the machine rebuilt and its state back in %.1f ms (%s)", plan.path,
                 (time.monotonic() - plan.started) * 1000, plan.timings())

    # --- diagnosis (pyvmm/diagnose.py) -----------------------------------------

    def _timed_out(self) -> None:
        # The last useful log of a run that went nowhere: taken before the
        # vCPUs stop, so it shows where they were.
        log.warning("--timeout expired; the guest's state:")
        for line in self.diagnostics():
            log.warning("  %s", line)
        if self.trace.stop:
            self.trace.emit("stop", "timeout")
        self.request_stop(StopReason.TIMEOUT)

    def diagnostics(self, wait: float = DIAGNOSE_WAIT) -> list[str]:
        """One line per vCPU (bounded), then Xen's xenstore ring and event
        channels. Event thread; waits at most `wait` for each vCPU."""
        threads = {index: ident for ident, index in self._vcpu_of_thread.items()}
        now, counters, calls = self._activity_now()
        then, earlier, earlier_calls = self._activity[0] if self._activity else (None, None, None)
        seconds = None if then is None else now - then

        def counted(index: int) -> str:
            before = earlier[index] if earlier is not None and index < len(earlier) else None
            return diagnose.counters_text(counters[index], before, seconds)

        lines = [self._vcpu_diagnosis(index, threads.get(index), wait, counted(index))
                 for index in range(min(self.config.vcpus, diagnose.MAX_VCPU_LINES))]
        if self.config.vcpus > diagnose.MAX_VCPU_LINES:
            lines.append(f"... and {self.config.vcpus - diagnose.MAX_VCPU_LINES} more vCPUs")
        if self.xen is not None:
            try:
                lines.append(diagnose.hypercalls_line(calls, earlier_calls, seconds))
                lines += self.xen.diagnostics()
            except Exception as error:  # a diagnosis must never be what fails
                lines.append(f"xen: unavailable ({error})")
        return lines

    def _vcpu_diagnosis(self, index: int, thread: int | None, wait: float, counters: str | None) -> str:
        def read(vcpu) -> dict:
            state = diagnose.read_run_state(vcpu, self.memory)
            if self.xen is not None:
                try:
                    state["xen"] = self.xen.vcpu_diagnosis(vcpu, index)
                except Exception as error:  # a diagnosis must never be what fails
                    state["xen"] = f"Xen: unavailable ({error})"
            return state

        activity = diagnose.vmm_activity(thread)
        state = None
        try:
            if self.paused:
                # Parked outside KVM_RUN, so its ioctls work from here; pause
                # and resume also run on this (the event) thread.
                state = read(self._vcpus[index])
            elif self._vcpus[index] is not None:
                state = self.run_on_vcpu(index, read, timeout=wait)
        except Exception as error:  # TimeoutError: busy in a handler; KvmError
            log.debug("vCPU %d: no state for the diagnosis: %s", index, error)
        return diagnose.vcpu_line(index, state, activity, counters)

    def _activity_now(self) -> tuple[float, list[dict[str, int]], dict[str, int]]:
        """Each vCPU's KVM counters and the hypercalls so far: a pread per
        vCPU, no ioctl, so it never waits for a vCPU."""
        counters = []
        for vcpu in self._vcpus:
            source = getattr(vcpu, "counters", None)  # None: not created yet, or a KVM without them
            try:
                counters.append(source.read() if source is not None else {})
            except OSError:
                counters.append({})
        calls = self.xen.dispatcher.counts() if self.xen is not None else {}
        return time.monotonic(), counters, calls

    def _note_activity(self) -> None:
        if self.stop_reason is not None:
            return
        self._activity.append(self._activity_now())
        self.loop.call_later(diagnose.ACTIVITY_SECONDS, self._note_activity)

    # --- noticing a guest that can never run again (pyvmm/vmm/liveness.py) ----

    def _start_liveness_checks(self) -> None:
        if self.gdb is not None:
            return  # a debugger may hold every vCPU stopped on purpose
        self._liveness = DeadGuestDetector()
        self._foreign_state = ForeignStateDetector()
        self._liveness_round: list = [None] * self.config.vcpus
        self.loop.call_later(liveness.CHECK_SECONDS, self._check_liveness)

    def _check_liveness(self) -> None:
        if self.stop_reason is not None:
            return
        samples, self._liveness_round = self._liveness_round, [None] * self.config.vcpus
        if self.paused:
            self._liveness.reset()
        elif self._liveness.observe(samples):
            state = liveness.describe(samples)
            self._stop_stuck_guest("halted", state, "every vCPU is halted with interrupts disabled, "
                                   f"so the guest can never run again: {state}")
            return
        foreign = self._foreign_state.observe(samples)
        if foreign:
            state = liveness.describe_foreign(foreign)
            self._stop_stuck_guest("foreign-state", state, f"{state}; the guest cannot go on: stopping it as crashed")
            return
        if not self.paused:
            for index in range(self.config.vcpus):
                self.post_to_vcpu(index, partial(self._sample_vcpu, self._liveness_round, index))
        self.loop.call_later(liveness.CHECK_SECONDS, self._check_liveness)

    def _sample_vcpu(self, round_: list, index: int, vcpu) -> None:
        try:
            sample = liveness.sample_vcpu(vcpu, self.memory)
            if sample.halted and self.xen is not None and self.xen.vcpu_blocked(index):
                sample = dataclasses.replace(sample, event_wakes=True)
            round_[index] = sample
        except Exception as error:  # an unanswered round only means "alive"
            log.debug("vCPU %d: liveness probe failed: %s", index, error)

    def _stop_stuck_guest(self, kind: str, state: str, message: str) -> None:
        """The liveness probe found a guest that cannot go on: say so, trace it, stop it as crashed."""
        log.warning("%s", message)
        if self.trace.stop:
            self.trace.emit("stop", kind, state=state)
        self.request_stop(StopReason.CRASH, detail=kind)

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def pause(self) -> None:
        """Stop every vCPU (and the guest's clock) until resume(); any thread."""
        with self._pause_lock:
            if not self._running.is_set():
                return
            self._running.clear()
            for vcpu in self._vcpus:
                if vcpu is not None:
                    vcpu.kick()
            # Freeze kvmclock (and with it Xen's pvclock) once no vCPU runs:
            # on resume the guest sees time continue from where it stopped,
            # as on QEMU's stop/cont. Read while a vCPU still ran, the clock
            # would step back on resume under a guest that already saw later
            # times. A kicked vCPU leaves KVM_RUN within microseconds; the
            # wait is bounded all the same.
            if not self._wait_out_of_guest(PARK_WAIT):
                log.warning("pause: a vCPU did not leave KVM_RUN within %.0f s; its clock may step back on resume",
                            PARK_WAIT)
            self._paused_clock = self.vm.get_clock().clock

    def pause_for_snapshot(self) -> None:
        """pause(), then wait until every vCPU is parked between two exits,
        its last one completed: a vCPU inside a hypercall (at a preempt
        point, or still working) goes on to the hypercall's end first. Event
        thread. SnapshotError when one is not there within
        SNAPSHOT_SETTLE_WAIT (an endless GNTTABOP_copy, a handler stuck):
        the VM is left paused, and a preempt point parks again."""
        self.pause()
        deadline = time.monotonic() + SNAPSHOT_SETTLE_WAIT
        with self._parking:
            self._finishing = True
            self._parking.notify_all()
            try:
                while True:
                    if self.stop_reason is not None:
                        raise SnapshotError("the VM is stopping")
                    busy = [index for index, vcpu in enumerate(self._vcpus)
                            if vcpu is not None and not self._at_exit[index]]
                    if not busy:
                        return
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise SnapshotError(
                            f"vCPU {', '.join(map(str, busy))} did not end its hypercall (or leave the VMM) within "
                            f"{SNAPSHOT_SETTLE_WAIT:g} s, so no snapshot is taken")
                    self._parking.wait(left)
            finally:
                self._finishing = False
                self._parking.notify_all()

    def resume(self) -> None:
        with self._pause_lock:
            if self._running.is_set():
                return
            if self._paused_clock is not None:
                self.vm.set_clock(self._paused_clock)
                self._paused_clock = None
            self._set_running()

    def _must_park(self, index: int) -> bool:
        return not self._running.is_set() or self._vcpu_down[index] or self._held_by_other(index)

    def _held_by_other(self, index: int) -> bool:
        holder = self._holder
        return holder is not None and holder != index

    @contextlib.contextmanager
    def others_held(self):
        """Every vCPU but the calling one parked outside KVM_RUN for the
        block (any thread; from the event thread, every vCPU). For changes
        KVM cannot make atomically under running vCPUs: splitting a RAM
        memslot deletes it before re-creating its parts, and a vCPU touching
        that RAM meanwhile would fetch or read nothing. The clock runs on:
        the block is short."""
        me = self.current_vcpu()
        with self._hold_lock:
            self._holder = -1 if me is None else me
            try:
                for index, vcpu in enumerate(self._vcpus):
                    if vcpu is not None and index != me:
                        vcpu.kick()
                deadline = time.monotonic() + PARK_WAIT
                while any(inside for index, inside in enumerate(self._in_guest) if index != me):
                    if self.stop_reason is not None:
                        break
                    if time.monotonic() > deadline:
                        log.warning("a vCPU did not leave KVM_RUN within %.0f s for a memory map change", PARK_WAIT)
                        break
                    time.sleep(0.0002)
                yield
            finally:
                with self._parking:
                    self._holder = None
                    self._parking.notify_all()

    def set_vcpu_down(self, index: int, down: bool) -> None:
        """VCPUOP_down / VCPUOP_up: vCPU `index` stops running guest code (its
        thread parks, still serving queued work) or runs again; any thread."""
        with self._parking:
            self._vcpu_down[index] = down
            self._parking.notify_all()
        if down:
            self.kick_vcpu(index)

    def vcpu_down(self, index: int) -> bool:
        return self._vcpu_down[index]

    def if_flag_at_last_exit(self, index: int) -> bool | None:
        """vCPU `index`'s RFLAGS.IF at its last exit (Vcpu.if_flag), None
        before it exists; any thread, for traces."""
        vcpu = self._vcpus[index]
        return None if vcpu is None else vcpu.if_flag

    def kick_vcpu(self, index: int) -> None:
        vcpu = self._vcpus[index]
        if vcpu is not None:
            vcpu.kick()

    def _join(self) -> None:
        for thread in self._threads:
            thread.join(timeout=5)
            if thread.is_alive():
                log.warning("%s did not stop", thread.name)

    def _vcpus_stopped(self) -> bool:
        return not any(thread.is_alive() for thread in self._threads)

    def _console_input(self):
        """Feed stdin to the serial port while the VM runs (stdio consoles only)."""
        if self.config.serial.kind != "stdio":
            return contextlib.nullcontext()
        fd = sys.stdin.fileno()
        escape = EscapeFilter(lambda: self.request_stop(StopReason.QUIT))
        self.platform.attach_console_input(self.loop, fd, escape if sys.stdin.isatty() else None)
        return RawTerminal(fd)

    def close(self) -> None:
        if self.gdb is not None:
            self.gdb.close()
        if self._xenstore_server is not None:
            self._xenstore_server.close()
        if self.xen is not None:
            self.xen.close()
        self.platform.close()
        self.loop.close()
        if not self._vcpus_stopped():
            # Leak rather than pull memory and kvm_run from under a vCPU.
            log.error("vCPU threads still running; not releasing the VM")
            return
        for vcpu in self._vcpus:
            if vcpu is not None:
                vcpu.close()
        self.vm.close()
        self.memory.close()
        self.kvm.close()
