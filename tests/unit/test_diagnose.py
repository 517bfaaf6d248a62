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
