"""Which --stats counter each exit goes to (pyvmm/vmm/exit_stats.py)."""

from pyvmm.core.bus import Bus
from pyvmm.core.stats import VcpuStats
from pyvmm.kvm import exits as kx
from pyvmm.kvm import uapi
from pyvmm.vmm.exit_stats import ExitCounters
from pyvmm.xen import abi


class Device:
    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        pass


def counters():
    pio, mmio = Bus("pio", 1 << 16), Bus("mmio", 1 << 64)
    pio.register(0x3F8, 8, Device(), "COM1")
    mmio.register(0xFEB0_0000, 0x1000, Device(), "xen-platform BAR")
    stats = VcpuStats(0)
    return ExitCounters(stats, pio, mmio), stats, pio


def count(exit_counters, exit, ns=10):
    slot = exit_counters.slot(exit)
    slot[0] += 1
    slot[1] += ns


def seen(stats):
    """The counters that counted something (the plain kinds' exist from the start)."""
    return {key: value for key, value in stats.counters.items() if value[0]}


def hypercall(number, *params, longmode=True):
    params = tuple(params) + (0,) * (6 - len(params))
    return kx.XenHypercallExit(longmode, 0, number, params, memoryview(bytearray(8)))


def test_port_io_by_device_and_range():
    exits, stats, _ = counters()
    count(exits, kx.IoExit(0x3F8, 1, True, 1, memoryview(bytearray(1))))
    count(exits, kx.IoExit(0x3FD, 1, False, 1, memoryview(bytearray(1))))
    count(exits, kx.IoExit(0x80, 1, True, 1, memoryview(bytearray(1))))
    assert seen(stats) == {("io", "COM1 0x3f8-0x3ff"): [2, 20], ("io", "unclaimed"): [1, 10]}


def test_mmio_by_device():
    exits, stats, _ = counters()
    count(exits, kx.MmioExit(0xFEB0_0010, 4, False, memoryview(bytearray(8))))
    assert seen(stats) == {("mmio", "xen-platform BAR 0xfeb00000-0xfeb00fff"): [1, 10]}


def test_a_moved_claim_is_counted_under_its_new_range():
    exits, stats, pio = counters()
    claim = pio.register(0xC000, 0x40, Device(), "BAR")
    count(exits, kx.IoExit(0xC004, 4, True, 1, memoryview(bytearray(4))))
    pio.unregister(claim)
    pio.register(0xC100, 0x40, Device(), "BAR")
    count(exits, kx.IoExit(0xC104, 4, True, 1, memoryview(bytearray(4))))
    count(exits, kx.IoExit(0xC004, 4, True, 1, memoryview(bytearray(4))))
    assert stats.counters[("io", "BAR 0xc000-0xc03f")] == [1, 10]
    assert stats.counters[("io", "BAR 0xc100-0xc13f")] == [1, 10]
    assert stats.counters[("io", "unclaimed")] == [1, 10]


def test_hypercalls_by_name_and_sub_op():
    exits, stats, _ = counters()
    count(exits, hypercall(abi.HYPERCALL_event_channel_op, abi.EVTCHNOP_send, 0x1000))
    count(exits, hypercall(abi.HYPERCALL_event_channel_op, abi.EVTCHNOP_send, 0x2000))
    count(exits, hypercall(abi.HYPERCALL_set_timer_op, 123456789))
    # A 32-bit guest's registers: only their low halves count.
    count(exits, hypercall((1 << 32) | abi.HYPERCALL_sched_op, (1 << 32) | abi.SCHEDOP_yield, longmode=False))
    # memory_op carries a continuation index above its command.
    count(exits, hypercall(abi.HYPERCALL_memory_op, (5 << abi.MEMOP_EXTENT_SHIFT) | abi.XENMEM_add_to_physmap))
    assert seen(stats) == {
        ("hypercall", "event_channel_op:send"): [2, 20],
        ("hypercall", "set_timer_op"): [1, 10],
        ("hypercall", "sched_op:yield"): [1, 10],
        ("hypercall", "memory_op:add_to_physmap"): [1, 10],
    }


def test_unknown_hypercalls_and_sub_ops_are_named_by_number():
    exits, stats, _ = counters()
    count(exits, hypercall(60))
    count(exits, hypercall(abi.HYPERCALL_sched_op, 999))
    assert set(seen(stats)) == {("hypercall", "hypercall_60"), ("hypercall", "sched_op:999")}


def test_other_exits_by_kind():
    exits, stats, _ = counters()
    for exit in (kx.INTERRUPTED, kx.INTERRUPTED, kx.HLT, kx.SHUTDOWN, kx.DebugExit(1, 0, 0, 0),
                 kx.SystemEventExit(uapi.KVM_SYSTEM_EVENT_SHUTDOWN, ()), kx.SystemEventExit(99, ()),
                 kx.UnknownExit(77)):
        count(exits, exit)
    assert {key: value[0] for key, value in seen(stats).items()} == {
        ("interrupted", ""): 2, ("halt", ""): 1, ("triple-fault", ""): 1, ("debug", ""): 1,
        ("system-event", "shutdown"): 1, ("system-event", "99"): 1, ("unknown", ""): 1,
    }
