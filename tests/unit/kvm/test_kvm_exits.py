"""decode_exit against a synthetic kvm_run page, as KVM would fill it."""

import pytest

from pyvmm.kvm import uapi
from pyvmm.kvm.exits import (
    DebugExit,
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    InterruptedExit,
    IoExit,
    MmioExit,
    MsrExit,
    ShutdownExit,
    SystemEventExit,
    UnknownExit,
    XenHypercallExit,
    decode_exit,
)
from pyvmm.kvm.uapi import ffi

PAGE = 4096


@pytest.fixture
def page():
    buffer = bytearray(3 * PAGE)
    run = ffi.from_buffer("struct kvm_run *", buffer)
    return run, memoryview(buffer), buffer


def test_io_out(page):
    run, view, buffer = page
    run.exit_reason = uapi.KVM_EXIT_IO
    run.io.direction = uapi.KVM_EXIT_IO_OUT
    run.io.size, run.io.port, run.io.count, run.io.data_offset = 2, 0x3F8, 3, PAGE
    buffer[PAGE : PAGE + 6] = b"abcdef"
    exit = decode_exit(run, view)
    assert isinstance(exit, IoExit)
    assert (exit.port, exit.size, exit.is_write, exit.count) == (0x3F8, 2, True, 3)
    assert bytes(exit.data) == b"abcdef"


def test_io_in_is_filled_in_place(page):
    run, view, buffer = page
    run.exit_reason = uapi.KVM_EXIT_IO
    run.io.direction = uapi.KVM_EXIT_IO_IN
    run.io.size, run.io.port, run.io.count, run.io.data_offset = 4, 0xCFC, 1, PAGE
    exit = decode_exit(run, view)
    assert not exit.is_write
    exit.data[:] = b"\x78\x56\x34\x12"
    assert buffer[PAGE : PAGE + 4] == b"\x78\x56\x34\x12"


def test_mmio_read_is_filled_in_place(page):
    run, view, buffer = page
    run.exit_reason = uapi.KVM_EXIT_MMIO
    run.mmio.phys_addr, run.mmio.len, run.mmio.is_write = 0xFEC0_0010, 4, 0
    exit = decode_exit(run, view)
    assert isinstance(exit, MmioExit)
    assert (exit.address, exit.length, exit.is_write) == (0xFEC0_0010, 4, False)
    exit.data[:] = b"\x01\x02\x03\x04"
    assert bytes(run.mmio.data[0:4]) == b"\x01\x02\x03\x04"


def test_mmio_write(page):
    run, view, _ = page
    run.exit_reason = uapi.KVM_EXIT_MMIO
    run.mmio.phys_addr, run.mmio.len, run.mmio.is_write = 0x1000, 2, 1
    run.mmio.data[0], run.mmio.data[1] = 0xAA, 0xBB
    exit = decode_exit(run, view)
    assert exit.is_write and bytes(exit.data) == b"\xaa\xbb"


@pytest.mark.parametrize(
    "reason,cls",
    [(uapi.KVM_EXIT_HLT, HltExit), (uapi.KVM_EXIT_SHUTDOWN, ShutdownExit), (uapi.KVM_EXIT_INTR, InterruptedExit)],
)
def test_exits_without_data(page, reason, cls):
    run, view, _ = page
    run.exit_reason = reason
    assert isinstance(decode_exit(run, view), cls)


def test_xen_hypercall_and_result(page):
    run, view, _ = page
    run.exit_reason = uapi.KVM_EXIT_XEN
    run.xen.type = uapi.KVM_EXIT_XEN_HCALL
    hcall = run.xen.u.hcall
    hcall.longmode, hcall.cpl, hcall.input = 1, 0, 17
    for i in range(6):
        hcall.params[i] = 100 + i
    exit = decode_exit(run, view)
    assert isinstance(exit, XenHypercallExit)
    assert (exit.longmode, exit.cpl, exit.input) == (True, 0, 17)
    assert exit.params == (100, 101, 102, 103, 104, 105)
    exit.result = -38  # -ENOSYS
    assert bytes(view[56:64]) == (2**64 - 38).to_bytes(8, "little")
    assert exit.result == 2**64 - 38


def test_xen_exit_of_another_type_is_unknown(page):
    run, view, _ = page
    run.exit_reason = uapi.KVM_EXIT_XEN
    run.xen.type = 2
    assert isinstance(decode_exit(run, view), UnknownExit)


@pytest.mark.parametrize("reason,is_write", [(uapi.KVM_EXIT_X86_RDMSR, False), (uapi.KVM_EXIT_X86_WRMSR, True)])
def test_msr_exits(page, reason, is_write):
    run, view, _ = page
    run.exit_reason = reason
    run.msr.index, run.msr.reason, run.msr.data = 0x4000_0000, uapi.KVM_MSR_EXIT_REASON_UNKNOWN, 5
    exit = decode_exit(run, view)
    assert isinstance(exit, MsrExit)
    assert (exit.index, exit.is_write, exit.reason, exit.data) == (0x4000_0000, is_write, 2, 5)
    exit.data = 0x1234
    exit.error = True
    assert view[32] == 1 and int.from_bytes(view[48:56], "little") == 0x1234


def test_system_event(page):
    run, view, _ = page
    run.exit_reason = uapi.KVM_EXIT_SYSTEM_EVENT
    run.system_event.type, run.system_event.ndata = uapi.KVM_SYSTEM_EVENT_RESET, 1
    run.system_event.data[0] = 9
    exit = decode_exit(run, view)
    assert isinstance(exit, SystemEventExit)
    assert (exit.type, exit.data) == (uapi.KVM_SYSTEM_EVENT_RESET, (9,))


def test_internal_error_clamps_ndata(page):
    run, view, _ = page
    run.exit_reason = uapi.KVM_EXIT_INTERNAL_ERROR
    run.internal.suberror, run.internal.ndata = uapi.KVM_INTERNAL_ERROR_EMULATION, 99
    exit = decode_exit(run, view)
    assert isinstance(exit, InternalErrorExit)
    assert exit.suberror == 1 and len(exit.data) == 16


def test_fail_entry_and_debug(page):
    run, view, _ = page
    run.exit_reason = uapi.KVM_EXIT_FAIL_ENTRY
    run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu = 0x80000021, 1
    exit = decode_exit(run, view)
    assert isinstance(exit, FailEntryExit) and (exit.reason, exit.cpu) == (0x80000021, 1)
    run.exit_reason = uapi.KVM_EXIT_DEBUG
    run.debug.arch.exception, run.debug.arch.pc = 1, 0x1000
    exit = decode_exit(run, view)
    assert isinstance(exit, DebugExit) and (exit.exception, exit.pc) == (1, 0x1000)


def test_unknown_reason(page):
    run, view, _ = page
    run.exit_reason = 1234
    exit = decode_exit(run, view)
    assert isinstance(exit, UnknownExit) and exit.reason == 1234
    assert repr(exit) == "UnknownExit(reason=1234)"


def test_exits_have_no_instance_dict(page):
    run, view, _ = page
    run.exit_reason = uapi.KVM_EXIT_IO
    with pytest.raises(AttributeError):
        decode_exit(run, view).extra = 1
