"""Event channels against the fake guest of tests/frontends/evtchn.py:
shared_info and vcpu_info live in an anonymous mapping, the kernel, the
event loop and the vCPU kicks are fakes that record what they were asked
to do."""

import os
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from frontends.evtchn import DOMID, FakeKernel, Rig
from pyvmm.xen.abi import (
    DOMID_SELF,
    EVTCHNSTAT_closed,
    EVTCHNSTAT_interdomain,
    EVTCHNSTAT_ipi,
    EVTCHNSTAT_unbound,
    EVTCHNSTAT_virq,
    VIRQ_CONSOLE,
    VIRQ_DEBUG,
    VIRQ_TIMER,
)
from pyvmm.xen.errors import EEXIST, EINVAL, ENOENT, ENOSPC, EPERM, ESRCH, XenError
from pyvmm.xen.hv.evtchn import EvtchnStatus


@pytest.fixture
def rig():
    return Rig()


def raises(errno, call, *args):
    with pytest.raises(XenError) as info:
        call(*args)
    assert info.value.errno == errno, info.value
    return info.value


def loopback(ev):
    a = ev.alloc_unbound(DOMID_SELF, DOMID_SELF)
    b = ev.bind_interdomain(DOMID_SELF, a)
    return a, b


# --- allocation and status ------------------------------------------------------


def test_alloc_unbound_and_status(rig):
    ev = rig.ev
    port = ev.alloc_unbound(DOMID_SELF, 0)
    assert port == 1  # port 0 is reserved
    assert ev.status(DOMID_SELF, port) == EvtchnStatus(EVTCHNSTAT_unbound, 0, remote_dom=0)
    own = ev.alloc_unbound(DOMID, DOMID_SELF)
    assert ev.status(DOMID, own).remote_dom == DOMID  # DOMID_SELF is resolved
    assert ev.status(DOMID_SELF, 0) == EvtchnStatus(EVTCHNSTAT_closed)
    assert ev.status(DOMID_SELF, 4095).status == EVTCHNSTAT_closed


def test_domains_the_guest_may_not_name(rig):
    ev = rig.ev
    raises(EPERM, ev.alloc_unbound, 0, 0)
    raises(ESRCH, ev.alloc_unbound, 7, 0)
    raises(ESRCH, ev.alloc_unbound, DOMID_SELF, 7)
    raises(EPERM, ev.status, 0, 1)
    raises(ESRCH, ev.status, 0x7FF1, 1)
    raises(ESRCH, ev.bind_interdomain, 2, 1)
    raises(EPERM, ev.reset, 0)
    raises(ESRCH, ev.reset, 9)


@pytest.mark.parametrize("long_mode,limit", [(True, 4096), (False, 1024)])
def test_port_space_is_the_abi_limit(long_mode, limit):
    ev = Rig(long_mode=long_mode).ev
    ports = [ev.alloc_unbound(DOMID_SELF, 0) for _ in range(limit - 1)]
    assert ports == list(range(1, limit))
    raises(ENOSPC, ev.alloc_unbound, DOMID_SELF, 0)
    raises(ENOSPC, ev.bind_ipi, 0)
    raises(EINVAL, ev.status, DOMID_SELF, limit)
    raises(EINVAL, ev.close, limit)
    raises(EINVAL, ev.send, -1)
    ev.close(5)
    assert ev.bind_ipi(0) == 5  # the lowest free port is reused
    ev.close(9)
    ev.close(3)
    assert [ev.alloc_unbound(DOMID_SELF, 0) for _ in range(2)] == [3, 9]
    raises(ENOSPC, ev.alloc_unbound, DOMID_SELF, 0)


def test_switching_to_compat_shrinks_the_port_space(rig):
    ev, guest = rig.ev, rig.guest
    for _ in range(1500):
        high = ev.alloc_unbound(DOMID_SELF, 0)
    guest.long_mode = False
    raises(EINVAL, ev.status, DOMID_SELF, high)
    raises(EINVAL, ev.close, high)
    raises(ENOSPC, ev.bind_ipi, 0)
    ev.reset(DOMID_SELF)
    guest.long_mode = True
    assert ev.status(DOMID_SELF, high).status == EVTCHNSTAT_closed


def test_close_errors(rig):
    ev = rig.ev
    raises(EINVAL, ev.close, 0)  # reserved
    raises(EINVAL, ev.close, 3)  # free
    port = ev.bind_ipi(0)
    ev.close(port)
    raises(EINVAL, ev.close, port)
    assert ev.status(DOMID_SELF, port).status == EVTCHNSTAT_closed


# --- interdomain loopback ------------------------------------------------------------


def test_loopback_connects_both_ends_and_delivers_both_ways(rig):
    ev, guest = rig.ev, rig.guest
    a, b = loopback(ev)
    assert ev.status(DOMID_SELF, a) == EvtchnStatus(EVTCHNSTAT_interdomain, 0, DOMID, b)
    assert ev.status(DOMID_SELF, b) == EvtchnStatus(EVTCHNSTAT_interdomain, 0, DOMID, a)
    assert guest.pending(b) and not guest.pending(a)  # Xen's make-up event on bind
    ev.send(b)
    assert guest.pending(a)
    guest.set_pending(b, False)
    ev.send(a)
    assert guest.pending(b)


def test_closing_one_end_leaves_the_other_unbound(rig):
    ev, guest = rig.ev, rig.guest
    a, b = loopback(ev)
    ev.close(a)
    assert ev.status(DOMID_SELF, b) == EvtchnStatus(EVTCHNSTAT_unbound, 0, remote_dom=DOMID)
    guest.set_pending(b, False)
    ev.send(b)  # dropped without error, as Xen does on unbound ports
    assert not guest.pending(a) and not guest.pending(b)
    c = ev.bind_interdomain(DOMID, b)  # the unbound end can be bound again
    assert ev.status(DOMID_SELF, b).remote_port == c


def test_bind_interdomain_errors(rig):
    ev = rig.ev
    for_dom0 = ev.alloc_unbound(DOMID_SELF, 0)
    raises(EINVAL, ev.bind_interdomain, DOMID_SELF, for_dom0)  # not offered to us
    raises(EINVAL, ev.bind_interdomain, DOMID_SELF, 77)  # free
    raises(EINVAL, ev.bind_interdomain, DOMID_SELF, 0)
    raises(EINVAL, ev.bind_interdomain, DOMID_SELF, 1 << 40)
    a, _ = loopback(ev)
    raises(EINVAL, ev.bind_interdomain, DOMID_SELF, a)  # already connected
    raises(EINVAL, ev.bind_interdomain, 0, 1)  # no such dom0 port
    assert ev.status(DOMID_SELF, 4).status == EVTCHNSTAT_closed  # failures leak nothing


# --- VIRQs -----------------------------------------------------------------------


def test_per_vcpu_virqs_bind_once_per_vcpu(rig):
    ev = rig.ev
    ports = [ev.bind_virq(VIRQ_TIMER, vcpu) for vcpu in range(4)]
    assert len(set(ports)) == 4
    assert ev.status(DOMID_SELF, ports[2]) == EvtchnStatus(EVTCHNSTAT_virq, 2, virq=VIRQ_TIMER)
    raises(EEXIST, ev.bind_virq, VIRQ_TIMER, 2)
    assert ev.virq_port(VIRQ_TIMER, 3) == ports[3]
    ev.close(ports[2])
    assert ev.virq_port(VIRQ_TIMER, 2) is None
    ev.bind_virq(VIRQ_TIMER, 2)


def test_virq_errors(rig):
    ev = rig.ev
    raises(EINVAL, ev.bind_virq, 24, 0)
    raises(EINVAL, ev.bind_virq, -1, 0)
    raises(EINVAL, ev.bind_virq, VIRQ_CONSOLE, 1)  # global VIRQs bind on vCPU 0 only
    raises(ENOENT, ev.bind_virq, VIRQ_TIMER, 4)
    raises(ENOENT, ev.bind_virq, VIRQ_DEBUG, -1)
    port = ev.bind_virq(VIRQ_CONSOLE, 0)
    raises(EEXIST, ev.bind_virq, VIRQ_CONSOLE, 0)
    raises(EINVAL, ev.send, port)  # nobody sends on a VIRQ


def test_send_virq_goes_where_the_guest_bound_it(rig):
    ev, guest = rig.ev, rig.guest
    timer = ev.bind_virq(VIRQ_TIMER, 1)
    console = ev.bind_virq(VIRQ_CONSOLE, 0)
    ev.send_virq(VIRQ_TIMER, 0)  # not bound on vCPU 0: nothing
    assert not guest.pending(timer)
    ev.send_virq(VIRQ_TIMER, 1)
    assert guest.pending(timer) and rig.upcalls == [1]
    ev.bind_vcpu(console, 3)  # global VIRQs may move
    ev.send_virq(VIRQ_CONSOLE)
    assert guest.pending(console) and rig.upcalls == [1, 3]
    assert ev.virq_port(VIRQ_CONSOLE, 2) == console  # found however the caller names the vCPU
    raises(EEXIST, ev.bind_virq, VIRQ_CONSOLE, 0)
    ev.send_virq(5)  # never bound: ignored


# --- IPIs and bind_vcpu ------------------------------------------------------------


def test_ipi_goes_to_its_vcpu(rig):
    ev, guest = rig.ev, rig.guest
    port = ev.bind_ipi(2)
    assert ev.status(DOMID_SELF, port) == EvtchnStatus(EVTCHNSTAT_ipi, 2)
    ev.send(port)
    assert guest.pending(port)
    assert guest.selector(2) == 1 << (port // 64) and guest.upcall_pending(2) == 1
    assert guest.selector(0) == 0 and rig.upcalls == [2]
    raises(ENOENT, ev.bind_ipi, 4)


def test_bind_vcpu_rules(rig):
    ev = rig.ev
    ipi = ev.bind_ipi(0)
    timer = ev.bind_virq(VIRQ_TIMER, 0)
    unbound = ev.alloc_unbound(DOMID_SELF, 0)
    a, _ = loopback(ev)
    raises(EINVAL, ev.bind_vcpu, ipi, 1)
    raises(EINVAL, ev.bind_vcpu, timer, 1)
    raises(EINVAL, ev.bind_vcpu, 99, 1)  # free
    raises(EINVAL, ev.bind_vcpu, 5000, 1)
    raises(ENOENT, ev.bind_vcpu, unbound, 4)  # vCPU checked first, as in Xen
    raises(ENOENT, ev.bind_vcpu, 5000, -1)
    ev.bind_vcpu(unbound, 3)
    ev.bind_vcpu(a, 2)
    assert ev.status(DOMID_SELF, unbound).vcpu == 3
    assert ev.status(DOMID_SELF, a).vcpu == 2


def test_delivery_follows_bind_vcpu(rig):
    ev, guest = rig.ev, rig.guest
    a, b = loopback(ev)
    rig.upcalls.clear()
    ev.bind_vcpu(a, 1)
    ev.send(b)
    assert guest.selector(1) and rig.upcalls == [1]


# --- the delivery rules --------------------------------------------------------------


def test_delivery_sets_pending_selector_and_upcall_once(rig):
    ev, guest = rig.ev, rig.guest
    port = ev.bind_ipi(0)
    ev.send(port)
    ev.send(port)  # already pending: nothing more
    assert rig.upcalls == [0]
    guest.acknowledge(0)
    guest.set_pending(port, False)
    ev.send(port)
    assert rig.upcalls == [0, 0]


def test_no_upcall_while_the_selector_bit_is_set(rig):
    ev, guest = rig.ev, rig.guest
    first, second = ev.bind_ipi(0), ev.bind_ipi(0)  # same selector word
    ev.send(first)
    guest.memory[0] = 0  # the guest cleared upcall_pending and is about to scan
    ev.send(second)
    assert guest.upcall_pending(0) == 0 and rig.upcalls == [0]


def test_no_second_upcall_while_one_is_pending(rig):
    ev, guest = rig.ev, rig.guest
    low = ev.bind_ipi(0)
    for _ in range(70):
        high = ev.bind_ipi(0)  # another selector word
    ev.send(low)
    ev.send(high)
    assert guest.selector(0) == 0b11 and rig.upcalls == [0]


def test_masked_port_only_becomes_pending_until_unmasked(rig):
    ev, guest = rig.ev, rig.guest
    port = ev.bind_ipi(1)
    guest.mask(port)
    ev.send(port)
    assert guest.pending(port) and guest.selector(1) == 0 and rig.upcalls == []
    ev.unmask(port)
    assert not guest.masked(port)
    assert guest.selector(1) == 1 << (port // 64) and guest.upcall_pending(1) and rig.upcalls == [1]


def test_unmask_without_a_pending_event_is_quiet(rig):
    ev, guest = rig.ev, rig.guest
    port = ev.bind_ipi(0)
    guest.mask(port)
    ev.unmask(port)
    ev.unmask(port)  # not masked: nothing to do
    assert not guest.masked(port) and rig.upcalls == []
    guest.set_pending(port)
    ev.unmask(port)  # pending but was not masked: Xen does nothing either
    assert rig.upcalls == []
    raises(EINVAL, ev.unmask, 4096)
    ev.unmask(4000)  # any valid port, bound or not


def test_unmask_of_a_free_port_signals_vcpu_0(rig):
    guest = rig.guest
    guest.mask(9)
    guest.set_pending(9)
    rig.ev.unmask(9)
    assert rig.upcalls == [0]


def test_compat_layout_is_used_in_32_bit_mode():
    rig = Rig(long_mode=False)
    ev, guest = rig.ev, rig.guest
    for _ in range(40):
        port = ev.bind_ipi(0)
    guest.mask(port)
    assert guest.memory[0x880 + port // 8]  # the compat mask array
    ev.send(port)
    assert guest.memory[0x800 + port // 8] and rig.upcalls == []
    ev.unmask(port)
    assert guest.memory[4] == 1 << (port // 32)  # evtchn_pending_sel at offset 4, bit 1
    assert rig.upcalls == [0]


def test_nothing_is_delivered_before_shared_info_is_mapped(rig):
    ev, guest = rig.ev, rig.guest
    guest.mapped = False
    port = ev.bind_ipi(0)
    ev.send(port)
    ev.unmask(port)
    assert not ev.is_pending(port) and rig.upcalls == []
    guest.mapped = True
    assert not guest.pending(port)
    ev.send(port)
    assert guest.pending(port) and rig.upcalls == [0]


def test_registered_vcpu_info_is_used_and_high_vcpus_need_one():
    rig = Rig(vcpus=40)
    ev, guest = rig.ev, rig.guest
    guest.register_vcpu_info(3)
    ev.send(ev.bind_ipi(3))
    assert guest.selector(3) and guest.memory[3 * 64 + 8] == 0  # not the legacy slot
    high = ev.bind_ipi(35)
    ev.send(high)  # no vcpu_info for vCPU 35: the event cannot be delivered
    assert not guest.pending(high)
    guest.register_vcpu_info(35)
    ev.send(high)
    assert guest.pending(high) and rig.upcalls == [3, 35]


def test_close_clears_a_pending_event(rig):
    ev, guest = rig.ev, rig.guest
    port = ev.bind_ipi(0)
    ev.send(port)
    ev.close(port)
    assert not guest.pending(port)


def test_on_pending_sees_masked_events_too():
    seen = []
    rig = Rig(on_pending=seen.append)
    port = rig.ev.bind_ipi(0)
    rig.guest.mask(port)
    rig.ev.send(port)
    rig.ev.send(port)
    assert seen == [port]


def test_is_pending_and_any_pending(rig):
    ev, guest = rig.ev, rig.guest
    guest.set_pending(70)
    assert ev.is_pending(70) and not ev.is_pending(71)
    assert ev.any_pending([3, 70, 99999])  # stops at the first pending port, like Xen's poll
    assert not ev.any_pending([])
    raises(EINVAL, ev.any_pending, [3, 4096])
    raises(EINVAL, ev.is_pending, -1)
    guest.mapped = False
    assert not ev.is_pending(70)


# --- backend channels (the VMM as domain 0) -----------------------------------------------


def test_connect_backend_both_directions(rig):
    ev, guest = rig.ev, rig.guest
    notified = []
    channel = ev.connect_backend(lambda: notified.append(1))
    port = channel.guest_port
    assert ev.status(DOMID_SELF, port) == EvtchnStatus(EVTCHNSTAT_interdomain, 0, 0, channel.dom0_port)
    rig.run_scheduled()
    assert notified == [1]  # the make-up notification on bind
    ev.send(port)
    assert notified == [1]  # on_notify runs on the event thread, not here
    rig.run_scheduled()
    assert notified == [1, 1]
    channel.notify()
    assert guest.pending(port) and rig.upcalls == [0]


def test_bind_backend_to_a_frontend_port(rig):
    ev = rig.ev
    port = ev.alloc_unbound(DOMID_SELF, 0)
    first = ev.connect_backend(lambda: None)
    channel = ev.bind_backend(port, lambda: None)
    assert channel.guest_port == port and channel.dom0_port != first.dom0_port
    assert ev.status(DOMID_SELF, port).remote_port == channel.dom0_port
    raises(EINVAL, ev.bind_backend, port, lambda: None)  # already connected
    raises(EINVAL, ev.bind_backend, ev.alloc_unbound(DOMID_SELF, DOMID_SELF), lambda: None)
    raises(EINVAL, ev.bind_backend, 300, lambda: None)
    raises(EINVAL, ev.bind_backend, 5000, lambda: None)


def test_guest_closing_its_end_and_binding_again(rig):
    ev, guest = rig.ev, rig.guest
    channel = ev.connect_backend(lambda: None)
    old = channel.guest_port
    ev.close(old)
    assert channel.guest_port is None and not channel.connected
    channel.notify()  # dropped: nobody to deliver to
    assert rig.upcalls == []
    ipi = ev.bind_ipi(0)  # reuses the number: must not receive the backend's events
    assert ipi == old
    channel.notify()
    assert not guest.pending(ipi)
    new = ev.bind_interdomain(0, channel.dom0_port)
    assert channel.guest_port == new and guest.pending(new)
    raises(EINVAL, ev.bind_interdomain, 0, channel.dom0_port)  # connected now


def test_backend_closing_its_end(rig):
    ev = rig.ev
    channel = ev.connect_backend(lambda: None)
    port = channel.guest_port
    channel.close()
    channel.close()  # idempotent
    assert ev.status(DOMID_SELF, port) == EvtchnStatus(EVTCHNSTAT_unbound, 0, remote_dom=0)
    ev.send(port)  # unbound: dropped
    raises(EINVAL, ev.bind_interdomain, 0, channel.dom0_port)  # that dom0 port is gone
    again = ev.bind_backend(port, lambda: None)  # still offered to domain 0
    assert again.guest_port == port


def test_immediate_schedule_may_reenter(rig):
    """on_notify may call back into EventChannels: nothing runs under the lock."""
    rig = Rig(immediate=True)
    replies = []

    def on_notify():
        replies.append(1)
        channel.notify()

    channel = rig.ev.connect_backend(lambda: None)
    channel.on_notify = on_notify
    rig.ev.send(channel.guest_port)
    assert replies == [1] and rig.guest.pending(channel.guest_port)


# --- the kernel path --------------------------------------------------------------------


def test_kernel_path_ipi_stays_in_kernel():
    kernel = FakeKernel()
    rig = Rig(kernel=kernel)
    ev, guest = rig.ev, rig.guest
    port = ev.bind_ipi(2)
    assert kernel.named("assign_ipi") == [(port, 2)]
    ev.send(port)  # only if the guest's send still reached userspace
    assert kernel.named("send") == [(port, 2)]
    assert not guest.pending(port) and rig.upcalls == []  # the kernel did it
    ev.close(port)
    assert kernel.named("deassign") == [(port,)]


def test_kernel_path_loopback_and_virq():
    kernel = FakeKernel()
    rig = Rig(kernel=kernel)
    ev = rig.ev
    a, b = loopback(rig.ev)
    ev.bind_vcpu(a, 3)
    ev.send(b)
    timer = ev.bind_virq(VIRQ_TIMER, 1)
    ev.send_virq(VIRQ_TIMER, 1)
    assert kernel.named("send") == [(b, 0), (a, 3), (timer, 1)]
    assert kernel.named("assign_eventfd") == [] and kernel.named("deassign") == []


def test_kernel_path_backend_eventfd():
    kernel = FakeKernel()
    rig = Rig(kernel=kernel)
    ev = rig.ev
    notified = []
    channel = ev.connect_backend(lambda: notified.append(1))
    rig.run_scheduled()
    notified.clear()
    [(port, fd)] = kernel.named("assign_eventfd")
    assert port == channel.guest_port and rig.readers[fd] == channel._eventfd_ready
    os.eventfd_write(fd, 3)  # what KVM does on the guest's EVTCHNOP_send
    rig.readers[fd]()
    assert notified == [1]
    with pytest.raises(BlockingIOError):
        os.eventfd_read(fd)  # drained
    rig.readers[fd]()  # spurious wake-up: no notification
    assert notified == [1]
    channel.notify()
    assert kernel.named("send") == [(port, 0)]

    ev.close(port)  # the guest closes its end: the kernel forgets the port
    assert kernel.named("deassign") == [(port,)]
    new = ev.bind_interdomain(0, channel.dom0_port)
    assert kernel.named("assign_eventfd")[-1] == (new, fd)  # same eventfd, new port

    channel.close()
    assert kernel.named("deassign")[-1] == (new,)
    assert fd not in rig.readers
    with pytest.raises(OSError):
        os.fstat(fd)  # closed


def test_kernel_path_unmask_stays_in_userspace():
    kernel = FakeKernel()
    rig = Rig(kernel=kernel)
    ev, guest = rig.ev, rig.guest
    port = ev.bind_ipi(1)
    guest.mask(port)
    guest.set_pending(port)  # the kernel set it while masked
    ev.unmask(port)
    assert guest.selector(1) and rig.upcalls == [1]


def test_kernel_refusals_fall_back_to_userspace():
    kernel = FakeKernel(refuse={"assign_ipi", "send", "assign_eventfd"})
    rig = Rig(kernel=kernel)
    ev, guest = rig.ev, rig.guest
    port = ev.bind_ipi(0)
    ev.send(port)
    assert guest.pending(port) and rig.upcalls == [0]
    ev.close(port)
    assert kernel.named("deassign") == []  # never registered
    notified = []
    channel = ev.connect_backend(lambda: notified.append(1))
    rig.run_scheduled()
    ev.send(channel.guest_port)  # exits to userspace: schedule() path
    rig.run_scheduled()
    assert notified == [1, 1]
    channel.close()


def test_kernel_path_reset_forgets_everything_at_once():
    kernel = FakeKernel()
    rig = Rig(kernel=kernel)
    ev = rig.ev
    ipi = ev.bind_ipi(0)
    channel = ev.connect_backend(lambda: None)
    ev.reset(DOMID_SELF)
    assert kernel.named("reset") == [()] and kernel.named("deassign") == []
    assert ev.status(DOMID_SELF, ipi).status == EVTCHNSTAT_closed
    assert not channel.connected
    channel.close()


# --- reset -----------------------------------------------------------------------------


def test_reset_closes_every_port(rig):
    ev = rig.ev
    loopback(ev)
    ev.bind_virq(VIRQ_TIMER, 0)
    ev.bind_ipi(1)
    channel = ev.connect_backend(lambda: None)
    ev.alloc_unbound(DOMID, 0)
    ev.reset(DOMID)
    assert all(ev.status(DOMID_SELF, port).status == EVTCHNSTAT_closed for port in range(1, 10))
    assert channel.guest_port is None and ev.virq_port(VIRQ_TIMER, 0) is None
    ev.bind_virq(VIRQ_TIMER, 0)
    assert ev.bind_interdomain(0, channel.dom0_port) == 2


# --- threads -----------------------------------------------------------------------------


def test_concurrent_senders_lose_nothing_and_never_deadlock():
    rig = Rig(immediate=True)
    ev, guest = rig.ev, rig.guest
    ipis = [ev.bind_ipi(vcpu) for vcpu in range(4)]
    channel = ev.connect_backend(lambda: None)
    channel.on_notify = channel.notify  # the backend answers every request
    errors = []

    def vcpu_thread(port):
        try:
            for _ in range(300):
                ev.send(port)
                ev.send(channel.guest_port)
                ev.unmask(port)
                guest.set_pending(port, False)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=vcpu_thread, args=(port,)) for port in ipis]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads) and errors == []
    assert set(rig.upcalls) <= {0, 1, 2, 3} and guest.pending(channel.guest_port)


# --- a hostile guest -------------------------------------------------------------------------

numbers = st.one_of(
    st.integers(-2, 10),
    st.sampled_from([DOMID, DOMID_SELF, 0x7FF1, 1023, 1024, 4095, 4096, 2**16, 2**32 - 1, 2**63]),
    st.integers(-(2**64), 2**64),
)
ops = st.lists(
    st.tuples(
        st.sampled_from([
            "alloc_unbound", "bind_interdomain", "bind_virq", "bind_ipi", "close", "send",
            "unmask", "status", "bind_vcpu", "reset", "is_pending", "mode",
            "connect", "bind_backend", "notify", "backend_close",
        ]),
        numbers,
        numbers,
    ),
    max_size=60,
)


def check_invariants(ev):
    for port, record in ev._ports.items():
        if record.state == EVTCHNSTAT_interdomain and record.remote_dom == DOMID:
            peer = ev._ports[record.remote_port]
            assert (peer.state, peer.remote_port) == (EVTCHNSTAT_interdomain, port)
        elif record.state == EVTCHNSTAT_interdomain:
            assert ev._backends[record.remote_port].guest_port == port
        assert 0 <= record.vcpu < ev.vcpu_count and port != 0
    for (virq, vcpu), port in ev._virqs.items():
        assert ev._ports[port].virq == virq
    for dom0_port, channel in ev._backends.items():
        if channel.guest_port is not None:
            assert ev._ports[channel.guest_port].remote_port == dom0_port


@pytest.mark.parametrize("accelerated", [False, True])
@settings(max_examples=150, deadline=None)
@given(script=ops)
def test_hostile_sequences_only_ever_raise_xen_errors(accelerated, script):
    rig = Rig(kernel=FakeKernel() if accelerated else None)
    ev, guest = rig.ev, rig.guest
    channels = []
    guest_ops = {
        "alloc_unbound": ev.alloc_unbound, "bind_interdomain": ev.bind_interdomain,
        "bind_virq": ev.bind_virq, "bind_ipi": lambda a, b: ev.bind_ipi(a),
        "close": lambda a, b: ev.close(a), "send": lambda a, b: ev.send(a),
        "unmask": lambda a, b: ev.unmask(a), "status": ev.status, "bind_vcpu": ev.bind_vcpu,
        "reset": lambda a, b: ev.reset(a), "is_pending": lambda a, b: ev.any_pending([a, b]),
    }
    try:
        for op, a, b in script:
            if op == "mode":
                guest.long_mode = not guest.long_mode
            elif op == "connect":
                try:
                    channels.append(ev.connect_backend(lambda: None))
                except XenError:
                    pass
            elif op == "bind_backend":
                try:
                    channels.append(ev.bind_backend(a, lambda: None))
                except XenError:
                    pass
            elif op in ("notify", "backend_close") and channels:
                channel = channels[a % len(channels)]
                channel.notify() if op == "notify" else channel.close()
            elif op in guest_ops:
                try:
                    guest_ops[op](a, b)
                except XenError:
                    pass
            check_invariants(ev)
            rig.run_scheduled()
    finally:
        for channel in channels:
            channel.close()


def test_guest_sends_to_a_backend_are_merged_until_served(rig):
    # 100,000 EVTCHNOP_send on a backend port used to queue 100,000 callbacks.
    ev = rig.ev
    notified = []
    channel = ev.connect_backend(lambda: notified.append("notified"))
    rig.run_scheduled()
    notified.clear()
    for _ in range(100_000):
        ev.send(channel.guest_port)
    assert len(rig.queue) == 1
    rig.run_scheduled()
    assert notified == ["notified"]
    ev.send(channel.guest_port)  # served already: a new send is a new notification
    assert len(rig.queue) == 1
    rig.run_scheduled()
    assert notified == ["notified"] * 2


def test_a_send_while_the_backend_runs_is_not_lost(rig):
    # The backend may have looked at its ring before the guest's latest
    # request: a send made while on_notify runs must schedule another.
    ev = rig.ev
    runs = []

    def on_notify():
        runs.append(len(runs))
        if len(runs) == 1:
            ev.send(channel.guest_port)  # the guest, on another vCPU, meanwhile
            ev.send(channel.guest_port)

    channel = ev.connect_backend(lambda: None)
    rig.run_scheduled()
    channel.on_notify = on_notify
    ev.send(channel.guest_port)
    rig.run_scheduled()
    assert runs == [0, 1] and rig.queue == []


def test_sends_to_different_backends_are_not_merged(rig):
    ev = rig.ev
    notified = []
    one = ev.connect_backend(lambda: notified.append("one"))
    two = ev.connect_backend(lambda: notified.append("two"))
    rig.run_scheduled()
    notified.clear()
    for _ in range(3):
        ev.send(one.guest_port)
        ev.send(two.guest_port)
    rig.run_scheduled()
    assert sorted(notified) == ["one", "two"]
