"""The stub's answers to each packet, and how breakpoints reach KVM's guest-debug state."""

from __future__ import annotations

import pytest

from fake_target import BASE, FakeTarget
from pyvmm.debug.gdbstub import protocol as p
from pyvmm.debug.gdbstub.breakpoints import Reinject, Stop
from pyvmm.debug.gdbstub.session import Session
from pyvmm.kvm import uapi


@pytest.fixture
def target():
    return FakeTarget()


@pytest.fixture
def session(target):
    return Session(target)


def test_handshake_queries(session):
    features = session.handle(b"qSupported:multiprocess+;swbreak+;hwbreak+;xmlRegisters=i386")
    assert b"PacketSize=4000" in features and b"qXfer:features:read+" in features
    assert session.handle(b"QStartNoAckMode") == b"OK" and session.no_ack
    assert session.handle(b"qAttached") == b"1"
    assert session.handle(b"qfThreadInfo") == b"m1,2" and session.handle(b"qsThreadInfo") == b"l"
    assert session.handle(b"?") == b"T05thread:1;"
    assert session.handle(b"vCont?") == b"vCont;c;C;s;S"
    assert session.handle(b"qXfer:features:read:target.xml:0,40").startswith(b"m<?xml")
    assert session.handle(b"qXfer:features:read:other.xml:0,40") == b"E00"
    assert session.handle(b"vMustReplyEmpty") == b"" and session.handle(b"qTStatus") == b""


def test_registers_follow_the_selected_thread(session, target):
    g = session.handle(b"g")
    assert p.decode_registers(g.replace(b"xx", b"00"))["rip"] == BASE + 0x100
    assert session.handle(b"Hg2") == b"OK"
    assert session.handle(b"p10") == (BASE + 0x200).to_bytes(8, "little").hex().encode()
    assert session.handle(b"P0=efbeadde00000000") == b"OK"
    assert target.regs[1]["rax"] == 0xDEADBEEF and "rax" not in target.regs[0]
    assert session.handle(b"qC") == b"QC2"
    assert session.handle(b"Hg3") == b"E16"  # no third vCPU
    assert session.handle(b"T2") == b"OK" and session.handle(b"T3") == b"E01"


def test_memory_reads_writes_and_faults(session, target):
    assert session.handle(b"m%x,4" % (BASE + 1)) == b"01020304"
    assert session.handle(b"M%x,2:aabb" % BASE) == b"OK" and target.memory[:2] == b"\xaa\xbb"
    assert session.handle(b"X%x,2:\x01\x02" % (BASE + 4)) == b"OK" and target.memory[4:6] == b"\x01\x02"
    assert session.handle(b"m1000,4") == b"E14"  # unmapped
    assert session.handle(b"M1000,1:00") == b"E14"
    # A read running off the end of what is mapped returns what is there.
    assert session.handle(b"m%x,10" % (BASE + 0x3000 - 4)) == b"fcfdfeff"
    assert session.handle(b"M%x,3:aabb" % BASE) == b"E16"  # length and data disagree


def test_software_breakpoint_writes_int3_and_restores(session, target):
    address = BASE + 0x10
    assert session.handle(b"Z0,%x,1" % address) == b"OK"
    assert target.memory[0x10] == 0xCC
    assert session.handle(b"m%x,1" % address) == b"10"  # gdb sees the guest's byte
    session.handle(b"c")
    assert session.running
    control, _ = target.resumes[-1][0]
    assert control == uapi.KVM_GUESTDBG_ENABLE | uapi.KVM_GUESTDBG_USE_SW_BP
    assert session.classify(1, 3, address, 0) == Stop(1, 5, "swbreak")
    assert session.classify(0, 3, BASE + 0x20, 0) == Reinject(3)  # the guest's own int3
    session.handle(b"qSupported:swbreak+")
    assert session.stop_reply(Stop(1, 5, "swbreak")) == b"T05thread:2;swbreak:;"
    assert session.vcpu == 1 and not session.running
    assert session.handle(b"z0,%x,1" % address) == b"OK" and target.memory[0x10] == 0x10
    assert session.handle(b"Z0,1000,1") == b"E14"  # no memory there


def test_hardware_breakpoints_and_watchpoints_fill_dr0_to_dr3(session, target):
    assert session.handle(b"Z1,%x,1" % BASE) == b"OK"
    assert session.handle(b"Z2,%x,4" % (BASE + 0x40)) == b"OK"
    assert session.handle(b"Z4,%x,8" % (BASE + 0x80)) == b"OK"
    assert session.handle(b"Z3,%x,2" % (BASE + 0xC0)) == b"OK"
    assert session.handle(b"Z1,%x,1" % (BASE + 1)) == b"E01"  # four slots only
    assert session.handle(b"Z2,%x,4" % (BASE + 2)) == b"E01"  # misaligned
    session.handle(b"c")
    control, debugregs = target.resumes[-1][0]
    assert control == uapi.KVM_GUESTDBG_ENABLE | uapi.KVM_GUESTDBG_USE_HW_BP
    assert debugregs[:4] == [BASE, BASE + 0x40, BASE + 0x80, BASE + 0xC0]
    dr7 = debugregs[7]
    assert dr7 & 0xFF == 0b10101010  # G0-G3
    assert (dr7 >> 16) & 0xF == 0b0000  # execute, 1 byte
    assert (dr7 >> 20) & 0xF == 0b1101  # write, 4 bytes
    assert (dr7 >> 24) & 0xF == 0b1011  # access, 8 bytes
    assert (dr7 >> 28) & 0xF == 0b0111  # access (x86 has no read-only), 2 bytes
    assert session.classify(0, 1, BASE, 0b0001) == Stop(0, 5, "hwbreak")
    assert session.classify(0, 1, BASE, 0b0010) == Stop(0, 5, "watch", BASE + 0x40)
    assert session.stop_reply(Stop(0, 5, "watch", BASE + 0x40)) == b"T05thread:1;watch:%x;" % (BASE + 0x40)
    assert session.classify(0, 1, BASE, 0) == Reinject(1)
    assert session.handle(b"z1,%x,1" % BASE) == b"OK"
    assert session.classify(0, 1, BASE, 0b0001) is None  # fired, then removed: dropped


def test_step_sets_singlestep_on_one_vcpu_only(session, target):
    session.handle(b"Hg2")
    assert session.handle(b"s") is None
    step = [control for control, _ in target.resumes[-1]]
    assert step[1] & uapi.KVM_GUESTDBG_SINGLESTEP and step[1] & uapi.KVM_GUESTDBG_BLOCKIRQ
    assert step[0] == 0
    assert session.classify(1, 1, BASE, 1 << 14) == Stop(1, 5)
    session.stop_reply(Stop(1, 5))
    assert session.handle(b"vCont;s:1;c") is None
    assert [control & uapi.KVM_GUESTDBG_SINGLESTEP for control, _ in target.resumes[-1]] == [
        uapi.KVM_GUESTDBG_SINGLESTEP, 0]
    assert session.handle(b"c%x" % (BASE + 8)) is None and target.regs[1]["rip"] == BASE + 8


def test_detach_removes_breakpoints_and_resumes_plainly(session, target):
    session.handle(b"Z0,%x,1" % BASE)
    session.handle(b"Z1,%x,1" % (BASE + 1))
    assert session.handle(b"D") == b"OK"
    assert target.memory[0] == 0 and session.detached
    assert target.resumes[-1] == [(0, [0] * 8)] * 2


def test_kill_stops_the_vm(session, target):
    session.handle(b"Z0,%x,1" % BASE)
    assert session.handle(b"k") is None
    assert target.killed and target.memory[0] == 0


def test_interrupt_reports_sigint(session, target):
    session.handle(b"c")
    assert session.interrupted() == b"T02thread:1;" and target.stops == 1


@pytest.mark.parametrize("payload", [
    b"m", b"mzz,1", b"M1,1", b"Mq,1:00", b"X1,2:a", b"p", b"pzz", b"p999", b"P", b"P0=zz", b"P10=00",
    b"G0", b"Gzz", b"Z", b"Z0", b"Z9,1,1", b"z0,1", b"Hx1", b"Hgzz", b"vCont;q", b"vCont;s:9",
    b"qXfer:features:read:target.xml:zz", b"qThreadExtraInfo,9", b"\xff\x00", b"T", b"czz",
])
def test_garbled_packets_get_an_error_or_empty_reply(session, payload):
    reply = session.handle(payload)
    assert reply is not None and (reply == b"" or reply.startswith(b"E")), (payload, reply)
    assert not session.running


def test_breakpoints_in_debug_registers_leave_guest_memory_alone(target):
    target.breakpoints_in_debug_registers = True
    session = Session(target)
    session.handle(b"qSupported:swbreak+")
    for i in range(4):
        assert session.handle(b"Z0,%x,1" % (BASE + i)) == b"OK"
    assert session.handle(b"Z0,%x,1" % (BASE + 4)) == b"E01"  # four debug registers
    assert target.memory[:5] == bytes(range(5))
    session.handle(b"c")
    control, debugregs = target.resumes[-1][0]
    assert control == uapi.KVM_GUESTDBG_ENABLE | uapi.KVM_GUESTDBG_USE_HW_BP
    assert debugregs[:4] == [BASE, BASE + 1, BASE + 2, BASE + 3] and debugregs[7] & 0xFFFF0000 == 0
    assert session.classify(0, 1, BASE + 2, 0b0100) == Stop(0, 5, "swbreak")
    assert session.handle(b"z0,%x,1" % (BASE + 2)) == b"OK"
    assert session.breakpoints.hardware[2] is None
