"""The diagnosis lines logged at --timeout and returned by `pyvmm ctl NAME diagnose`."""

import threading

from pyvmm import diagnose
from pyvmm.kvm import uapi


def test_vcpu_line_says_state_rip_interrupt_flag_and_where():
    state = {"mp_state": uapi.KVM_MP_STATE_HALTED, "rip": 0xFFFFFFFF81C0FFEE, "rflags": 0x246}
    assert diagnose.vcpu_line(0, state, None) == "vCPU 0: halted rip=0xffffffff81c0ffee IF=1, in the guest"
    state = {"mp_state": uapi.KVM_MP_STATE_INIT_RECEIVED, "rip": 0xFFF0, "rflags": 0x2}
    assert diagnose.vcpu_line(1, state, None) == "vCPU 1: wait-for-sipi rip=0xfff0 IF=0, in the guest"
    busy = "in a hypercall (xen/hv/hypercalls.py:10 in sched_op)"
    assert diagnose.vcpu_line(2, None, busy) == f"vCPU 2: did not answer, {busy}"


def test_xen_lines():
    ring = {"req_cons": 5, "req_prod": 9, "rsp_cons": 3, "rsp_prod": 3, "server_req_cons": 5,
            "server_rsp_prod": 3, "error": 0, "queued": 12, "answered": 7}
    line = diagnose.xenstore_ring_line(ring)
    assert line == ("xenstore ring: req_cons=5 req_prod=9 rsp_cons=3 rsp_prod=3; server's req_cons=5 rsp_prod=3; "
                    "error=0; 12 bytes queued for the guest; 7 requests answered")
    port = {"port": 2, "state": "interdomain", "vcpu": 0, "pending": True, "masked": False}
    assert diagnose.event_channel_line("xenstore", port) == (
        "event channel xenstore (port 2, interdomain, vCPU 0): pending=True, masked=False")
    assert diagnose.event_channel_line("console", None) == "event channel console: not bound"


def test_pending_ports_line_names_the_raised_ports_masked_or_not_up_to_a_limit():
    def port(number, pending, masked=False, vcpu=0):
        return {"port": number, "state": "interdomain", "vcpu": vcpu, "pending": pending, "masked": masked}

    assert diagnose.pending_ports_line([port(1, False), port(3, None)]) == "event channels pending: none"
    assert diagnose.pending_ports_line([port(1, False), port(4, True, vcpu=1), port(5, True, masked=True)]) == (
        "event channels pending: 4 (interdomain, vCPU 1), 5 (interdomain, vCPU 0, masked)")
    many = [port(number, True) for number in range(1, diagnose.MAX_PENDING_PORTS + 3)]
    line = diagnose.pending_ports_line(many)
    assert line.endswith(f"{diagnose.MAX_PENDING_PORTS} (interdomain, vCPU 0) and 2 more")


def test_vmm_activity_is_none_for_a_thread_outside_pyvmm_or_gone():
    started, release = threading.Event(), threading.Event()

    def wait():
        started.set()
        release.wait()

    thread = threading.Thread(target=wait)
    thread.start()
    started.wait()
    try:
        assert diagnose.vmm_activity(thread.ident) is None
    finally:
        release.set()
        thread.join()
    assert diagnose.vmm_activity(thread.ident) is None
    assert diagnose.vmm_activity(None) is None


def test_vmm_activity_names_a_thread_busy_in_pyvmm_code():
    # A thread inside pyvmm code but not in KVM_RUN (here: an event loop) is "in the VMM".
    from pyvmm.core.eventloop import EventLoop

    loop, running = EventLoop(), threading.Event()
    loop.call_soon_threadsafe(running.set)
    thread = threading.Thread(target=loop.run)
    thread.start()
    try:
        running.wait()  # from now until stop() the thread is inside loop.run()
        activity = diagnose.vmm_activity(thread.ident)
        assert activity is not None and activity.startswith("in the VMM (core/eventloop.py:"), activity
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def test_vcpu_line_adds_stack_page_tables_code_and_counters():
    state = {"mp_state": uapi.KVM_MP_STATE_RUNNABLE, "rip": 0xFFFFFFFFC05130B0, "rflags": 0x246,
             "rsp": 0xFFFFFFFF82A03E48, "cr3": 0x1C0A000, "code": bytes([0xF3, 0x90, 0xEB, 0xFC]),
             "stack": [0xFFFFFFFF81234567, 0]}
    line = diagnose.vcpu_line(0, state, None, "KVM exits 9 (+2 in the last 10 s: halt 1)")
    assert line == ("vCPU 0: runnable rip=0xffffffffc05130b0 IF=1, in the guest; rsp=0xffffffff82a03e48 "
                    "cr3=0x1c0a000; code at rip: f3 90 eb fc; stack: 0xffffffff81234567 0x0; "
                    "KVM exits 9 (+2 in the last 10 s: halt 1)")
    state.update(code=None, stack=None)
    assert "; code at rip: unreadable; KVM" in diagnose.vcpu_line(0, state, None, "KVM")
    assert diagnose.vcpu_line(1, None, None, "KVM counters unavailable") == (
        "vCPU 1: did not answer, in the guest; KVM counters unavailable")


def test_counters_text_shows_totals_and_what_grew():
    now = {"exits": 1500, "halt_exits": 40, "io_exits": 7, "irq_window_exits": 3}
    before = {"exits": 1000, "halt_exits": 40, "io_exits": 2, "irq_window_exits": 0}
    assert diagnose.counters_text(now, before, 10.2) == "KVM exits 1500 (+500 in the last 10 s: io 5, irq-window 3)"
    assert diagnose.counters_text(now, now, 4.0) == "KVM exits 1500 (+0 in the last 4 s)"
    assert diagnose.counters_text(now, None, None) == "KVM exits 1500 (no earlier sample)"
    assert diagnose.counters_text({}, before, 10.0) == "KVM counters unavailable"


def test_hypercalls_line_ranks_the_recent_ones():
    now = {"sched_op": 120, "event_channel_op": 40, "hvm_op": 5}
    before = {"sched_op": 20, "event_channel_op": 39, "hvm_op": 5}
    assert diagnose.hypercalls_line(now, before, 9.8) == (
        "hypercalls to pyvmm in the last 10 s: sched_op 100, event_channel_op 1 (165 in all)")
    assert diagnose.hypercalls_line(now, now, 9.8) == "hypercalls to pyvmm in the last 10 s: none (165 in all)"
    assert diagnose.hypercalls_line({"hvm_op": 2}, None, None) == "hypercalls to pyvmm so far: hvm_op 2 (2 in all)"
    many = {f"op{i}": i + 1 for i in range(diagnose.MAX_HYPERCALL_NAMES + 2)}
    assert diagnose.hypercalls_line(many, {}, 1.0).endswith("op2 3, 2 more (55 in all)")


def test_console_ring_line():
    ring = {"out_cons": 186, "out_prod": 186, "in_cons": 0, "in_prod": 0, "connection": 0, "taken": 186}
    assert diagnose.console_ring_line(ring, 186, 794.6) == (
        "console ring: out_cons=186 out_prod=186 in_cons=0 in_prod=0 connection=0; 186 bytes taken from it; "
        "186 bytes written to the console output, the last 795 s ago")
    assert diagnose.console_ring_line(ring, 0, None).endswith("0 bytes written to the console output, the last never")


class _Translation:
    def __init__(self, gpa, valid=True):
        self.gpa, self.valid = gpa, valid


class _Segment:
    base = 0


class _FakeVcpu:
    """Long mode, rip and rsp mapped 1:1 except where `holes` say."""

    def __init__(self, rip, rsp, holes=(), cr3=0x1000, cr0=diagnose.CR0_PG):
        self.rip, self.rsp, self.holes, self.cr3, self.cr0 = rip, rsp, set(holes), cr3, cr0

    def get_regs(self):
        return type("Regs", (), {"rip": self.rip, "rsp": self.rsp, "rflags": 0x2})()

    def get_sregs(self):
        return type("Sregs", (), {"cr3": self.cr3, "cr0": self.cr0, "efer": diagnose.EFER_LMA, "cs": _Segment,
                                  "ss": _Segment})()

    def get_mp_state(self):
        return uapi.KVM_MP_STATE_RUNNABLE

    def translate(self, linear):
        page = linear & ~0xFFF
        return _Translation(linear, page not in self.holes)


def test_read_run_state_reads_code_and_stack_through_the_page_tables():
    from pyvmm.core.memory import GuestMemory

    memory = GuestMemory([(0, 0x4000)])
    try:
        memory.write(0x1FFA, bytes(range(1, 7)))  # the last 6 bytes of a page: no more are read
        memory.write(0x2100, (0xFFFFFFFF81000000).to_bytes(8, "little") + (5).to_bytes(8, "little"))
        state = diagnose.read_run_state(_FakeVcpu(0x1FFA, 0x2100), memory)
        assert state["code"] == bytes(range(1, 7))
        assert state["stack"][:2] == [0xFFFFFFFF81000000, 5] and len(state["stack"]) == diagnose.STACK_WORDS
        assert state["callers"] == []
        assert (state["rip"], state["rsp"], state["cr3"]) == (0x1FFA, 0x2100, 0x1000)
        unmapped = diagnose.read_run_state(_FakeVcpu(0x1FFA, 0x2100, holes={0x1000, 0x2000}), memory)
        assert unmapped["code"] is None and unmapped["stack"] is None
        beyond_ram = diagnose.read_run_state(_FakeVcpu(0x9000, 0x2100), memory)
        assert beyond_ram["code"] is None
        assert not state["cr3_outside_ram"]
    finally:
        memory.close()


def test_a_page_table_root_outside_ram_is_called_not_the_guests():
    """The testbed's emulator has left its own L1 rip and cr3 in an L2
    vCPU (docs/TESTBED.md): a root the guest's RAM does not hold says so."""
    from pyvmm.core.memory import GuestMemory

    memory = GuestMemory([(0, 0x4000)])
    try:
        foreign = diagnose.read_run_state(_FakeVcpu(0x1000, 0x2000, cr3=0x1011C8000), memory)
        assert foreign["cr3_outside_ram"]
        assert diagnose.FOREIGN_CR3 in diagnose.vcpu_line(0, foreign, None)
        with_pcid = diagnose.read_run_state(_FakeVcpu(0x1000, 0x2000, cr3=0x3000 | 0x5), memory)
        assert not with_pcid["cr3_outside_ram"]  # the PCID bits are not part of the root
        unpaged = diagnose.read_run_state(_FakeVcpu(0x1000, 0x2000, cr3=0x1011C8000, cr0=0), memory)
        assert not unpaged["cr3_outside_ram"]  # cr3 means nothing with paging off
        assert diagnose.FOREIGN_CR3 not in diagnose.vcpu_line(0, unpaged, None)
    finally:
        memory.close()


def test_read_run_state_names_kernel_text_like_words_further_up_its_page():
    from pyvmm.core.memory import GuestMemory

    memory = GuestMemory([(0, 0x4000)])
    try:
        top = [0xFFFFFFFF81000000 + i for i in range(diagnose.STACK_WORDS)]
        # Above the words shown: small values and user addresses are left
        # out, high ones kept, and only those within rsp's page.
        above = [7, 0xFFFFFFFF81A03DB3, 0x7FFF12345678, 0xFFFFFFFFC03A80B0, 0xFFFFFFFF81000100]
        rsp = 0x2000 - 8 * (len(top) + len(above))
        memory.write(rsp, b"".join(word.to_bytes(8, "little") for word in top + above))
        memory.write(0x2000, (0xFFFFFFFF89999999).to_bytes(8, "little"))  # the next page: not read
        state = diagnose.read_run_state(_FakeVcpu(0x1000, rsp), memory)
        assert state["stack"] == top
        assert state["callers"] == [0xFFFFFFFF81A03DB3, 0xFFFFFFFFC03A80B0, 0xFFFFFFFF81000100]
        line = diagnose.vcpu_line(0, state, None)
        assert line.endswith("; kernel-text-like words above: 0xffffffff81a03db3 0xffffffffc03a80b0 "
                             "0xffffffff81000100")
        # At most MAX_CALLERS of them.
        memory.write(0x3000, b"".join((0xFFFFFFFF81000200 + i).to_bytes(8, "little") for i in range(100)))
        many = diagnose.read_run_state(_FakeVcpu(0x1000, 0x3000), memory)
        assert many["callers"] == [0xFFFFFFFF81000200 + i for i in range(diagnose.STACK_WORDS,
                                                                          diagnose.STACK_WORDS + diagnose.MAX_CALLERS)]
    finally:
        memory.close()


def test_lapic_text_names_the_vectors_in_service_and_requested():
    registers = bytearray(1024)
    registers[0xF1] = 1  # SVR: software-enabled
    registers[0x80] = 0x20  # TPR
    registers[0x100 + (0xF3 // 32) * 16 + (0xF3 % 32) // 8] |= 1 << (0xF3 % 8)  # ISR: 0xf3
    for vector in (0x30, 0xEC):
        registers[0x200 + (vector // 32) * 16 + (vector % 32) // 8] |= 1 << (vector % 8)  # IRR
    assert diagnose.lapic_text(bytes(registers)) == "LAPIC: TPR 0x20, in service 0xf3, requested 0x30 0xec"
    assert diagnose.lapic_text(bytes(1024)) == "LAPIC (software-disabled): TPR 0x0, in service none, requested none"


def test_read_run_state_adds_the_lapic_when_kvm_gives_it():
    class WithLapic(_FakeVcpu):
        def get_lapic(self):
            registers = bytearray(1024)
            registers[0xF1] = 1
            return registers

    state = diagnose.read_run_state(WithLapic(0x1000, 0x2000))
    assert state["lapic"] == "LAPIC: TPR 0x0, in service none, requested none"
    assert "lapic" not in diagnose.read_run_state(_FakeVcpu(0x1000, 0x2000))  # no get_lapic: left out
    line = diagnose.vcpu_line(1, dict(state, mp_state=uapi.KVM_MP_STATE_RUNNABLE), None)
    assert "; LAPIC: TPR 0x0, in service none, requested none" in line


def test_timer_text():
    assert diagnose.timer_text(0.0032, "in KVM, port 5") == "timer due in 3.2 ms (in KVM, port 5)"
    assert diagnose.timer_text(-812.34, "in KVM, port 5") == "timer overdue by 812.3 s (in KVM, port 5)"
    assert diagnose.timer_text(None, "in pyvmm") == "no timer (in pyvmm)"
    state = {"mp_state": uapi.KVM_MP_STATE_RUNNABLE, "rip": 0x10, "rflags": 0x2, "xen": "Xen: no timer (in pyvmm)"}
    assert diagnose.vcpu_line(0, state, None) == (
        "vCPU 0: runnable rip=0x10 IF=0, in the guest; Xen: no timer (in pyvmm)")
