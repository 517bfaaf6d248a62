"""How unexpected stops are reported: triple-fault warnings, exit statuses."""

import io
import json
import logging
import re

import pytest

from pyvmm.core.bus import Bus
from pyvmm.config import VmConfig
from pyvmm.vmm.exit_handler import ExitHandler
from pyvmm.kvm import exits as kx
from pyvmm.runner import STATUS_FOR_REASON, _exit_status
from pyvmm.core.stop import StopReason
from pyvmm.core.trace import Tracer
from pyvmm.vcpu_state import format_registers

REGISTERS = {"rip": 0xFFFFFFFF81000123, "rsp": 0xFFFFC90000003F58, "rflags": 0x10046, "cr0": 0x80050033,
             "cr2": 0, "cr3": 0x1C0A000, "cr4": 0x3506F0, "efer": 0xD01, "cs": 0x10, "ss": 0x18}


def handler(registers=None, vcpu=1, **options):
    return ExitHandler(Bus("pio", 1 << 16), Bus("mmio", 1 << 64), vcpu=vcpu, registers=registers, **options)


def test_triple_fault_is_its_own_reason_with_a_warning_naming_the_registers(caplog):
    with caplog.at_level(logging.INFO, logger="pyvmm.vmm.exit_handler"):
        assert handler(lambda: REGISTERS).handle(kx.ShutdownExit()) is StopReason.TRIPLE_FAULT
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "vCPU 1 triple-faulted (an unexpected CPU reset)" in message
    for text in ("rip=0xffffffff81000123", "cr3=0x1c0a000", "efer=0xd01", "cs=0x0010", "ss=0x0018",
                 "rflags=0x10046"):
        assert text in message, text


def test_a_triple_fault_whose_registers_are_the_power_on_state_says_the_faulting_state_is_lost(caplog):
    reset = {"rip": 0xFFF0, "rsp": 0, "rflags": 0x2, "cr0": 0x10, "cr2": 0, "cr3": 0, "cr4": 0, "efer": 0,
             "cs": 0xF000, "ss": 0}
    with caplog.at_level(logging.WARNING, logger="pyvmm.vmm.exit_handler"):
        handler(lambda: reset).handle(kx.ShutdownExit())
        handler(lambda: REGISTERS).handle(kx.ShutdownExit())
    after_reset, real = (r.getMessage() for r in caplog.records)
    assert "rip=0xfff0" in after_reset and "KVM had already reset the vCPU" in after_reset
    assert "already reset" not in real


def test_triple_fault_still_stops_when_the_registers_cannot_be_read(caplog):
    def broken():
        raise OSError(5, "I/O error")

    with caplog.at_level(logging.WARNING, logger="pyvmm.vmm.exit_handler"):
        assert handler(broken).handle(kx.ShutdownExit()) is StopReason.TRIPLE_FAULT
        assert handler(None).handle(kx.ShutdownExit()) is StopReason.TRIPLE_FAULT
    assert any("registers unavailable" in r.getMessage() for r in caplog.records)


def test_triple_fault_is_traced_in_the_stop_category():
    out = io.StringIO()
    tracer = Tracer()
    tracer.attach({"io"}, out)  # any category turns "stop" on
    try:
        assert tracer.stop
        handler(lambda: REGISTERS, trace=tracer).handle(kx.ShutdownExit())
        tracer.flush()
    finally:
        tracer.close()
    record = json.loads(out.getvalue().splitlines()[-1])
    assert (record["cat"], record["ev"], record["rip"], record["cr4"]) == ("stop", "triple-fault", "0xffffffff81000123",
                                                                           "0x3506f0")


def test_format_registers_keeps_a_fixed_order_and_skips_missing_ones():
    assert format_registers({"ss": 0x18, "rip": 0x10}) == "rip=0x10 ss=0x0018"
    assert format_registers(REGISTERS).split()[0].startswith("rip=")


def config(**changes):
    return VmConfig(kernel="k", **changes)


@pytest.mark.parametrize(
    "reason,options,status",
    [
        (StopReason.TRIPLE_FAULT, {}, 6),
        (StopReason.TRIPLE_FAULT, {"expect": re.compile(b"login:")}, 6),  # more telling than "pattern never came"
        (StopReason.REBOOT, {}, 2),
        (StopReason.REBOOT, {"expect": re.compile(b"login:")}, 5),
        (StopReason.CRASH, {}, 3),
        (StopReason.TIMEOUT, {}, 124),
        (StopReason.WATCHDOG, {}, 7),
        (StopReason.WATCHDOG, {"expect": re.compile(b"login:")}, 7),
        (StopReason.WATCHDOG, {"on_watchdog": "restart", "no_reboot": True}, 7),
    ],
)
def test_exit_status_of_each_reason(reason, options, status):
    assert _exit_status(config(**options), reason, []) == status


def test_no_two_reasons_share_a_status_but_the_ones_that_mean_success():
    success = {StopReason.POWEROFF, StopReason.EXPECT_MATCHED, StopReason.SNAPSHOT}  # each exits 0
    assert {STATUS_FOR_REASON[reason] for reason in success} == {0}
    statuses = [STATUS_FOR_REASON[reason] for reason in StopReason if reason is not StopReason.QUIT
                and reason not in success]
    assert len(set(statuses)) == len(statuses) and 0 not in statuses


@pytest.mark.parametrize(
    "reason,options,again",
    [
        (StopReason.REBOOT, {}, True),
        (StopReason.REBOOT, {"no_reboot": True}, False),
        (StopReason.TRIPLE_FAULT, {}, True),
        (StopReason.WATCHDOG, {}, False),  # on_watchdog destroy, xl's default
        (StopReason.WATCHDOG, {"on_watchdog": "restart"}, True),
        (StopReason.WATCHDOG, {"on_watchdog": "restart", "no_reboot": True}, False),
        (StopReason.CRASH, {}, False),
    ],
)
def test_which_stops_boot_again(reason, options, again):
    from pyvmm.runner import _boots_again

    assert _boots_again(config(**options), reason) is again


def test_no_other_reason_shares_the_triple_fault_status():
    statuses = {reason: STATUS_FOR_REASON[reason] for reason in StopReason if reason is not StopReason.QUIT}
    assert statuses[StopReason.TRIPLE_FAULT] not in {s for r, s in statuses.items() if r is not StopReason.TRIPLE_FAULT}


def test_stop_events_name_the_detail_only_when_there_is_one():
    from pyvmm.runner import _with_detail

    assert _with_detail({"reason": "crash", "status": 3}, "pvpanic") == {"reason": "crash", "status": 3,
                                                                        "detail": "pvpanic"}
    assert _with_detail({"reason": "poweroff"}, None) == {"reason": "poweroff"}
