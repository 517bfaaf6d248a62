import pytest

from pyvmm.bus import Bus
from pyvmm.exit_handler import ExitHandler
from pyvmm.kvm import exits as kx
from pyvmm.stop import StopReason


class Port:
    def __init__(self, value=0):
        self.value = value
        self.writes = []

    def read(self, offset, size):
        return self.value

    def write(self, offset, size, value):
        self.writes.append((offset, size, value))


@pytest.fixture
def setup():
    pio, mmio = Bus("pio", 1 << 16), Bus("mmio", 1 << 64)
    port, reg = Port(0xA5), Port(0x11223344)
    pio.register(0x3F8, 8, port)
    mmio.register(0xFEB0_0000, 0x1000, reg)
    return ExitHandler(pio, mmio), port, reg


def test_out_and_rep_outs_reach_the_device(setup):
    handler, port, _ = setup
    assert handler.handle(kx.IoExit(0x3F8, 1, True, 3, memoryview(bytearray(b"abc")))) is None
    assert port.writes == [(0, 1, ord("a")), (0, 1, ord("b")), (0, 1, ord("c"))]


def test_in_fills_the_exit_buffer_in_place(setup):
    handler, _, _ = setup
    data = bytearray(4)
    handler.handle(kx.IoExit(0x3F9, 2, False, 2, memoryview(data)))
    assert data == bytes([0xA5, 0, 0xA5, 0])
    handler.handle(kx.IoExit(0x80, 1, False, 1, memoryview(data)))  # nobody there
    assert data[0] == 0xFF


def test_mmio_read_and_write(setup):
    handler, _, reg = setup
    data = bytearray(8)
    handler.handle(kx.MmioExit(0xFEB0_0010, 4, False, memoryview(data)))
    assert data[:4] == (0x11223344).to_bytes(4, "little")
    handler.handle(kx.MmioExit(0xFEB0_0008, 2, True, memoryview(bytearray(b"\x34\x12" + bytes(6)))))
    assert reg.writes == [(8, 2, 0x1234)]


@pytest.mark.parametrize(
    "exit,reason",
    [
        (kx.ShutdownExit(), StopReason.TRIPLE_FAULT),
        (kx.SystemEventExit(1, ()), StopReason.POWEROFF),
        (kx.SystemEventExit(2, ()), StopReason.REBOOT),
        (kx.SystemEventExit(3, ()), StopReason.CRASH),
        (kx.InternalErrorExit(1, ()), StopReason.CRASH),
        (kx.FailEntryExit(0x80000021, 0), StopReason.CRASH),
        (kx.UnknownExit(99), StopReason.CRASH),
        (kx.InterruptedExit(), None),
    ],
)
def test_stop_reasons(setup, exit, reason):
    handler, _, _ = setup
    assert handler.handle(exit) is reason


def test_debug_exits_go_to_the_debugger_and_crash_without_one():
    pio, mmio = Bus("pio", 1 << 16), Bus("mmio", 1 << 64)
    exit = kx.DebugExit(3, 0xFFFFFFFF81000000, 0, 0)
    assert ExitHandler(pio, mmio).handle(exit) is StopReason.CRASH
    seen = []
    assert ExitHandler(pio, mmio, debug=seen.append).handle(exit) is None
    assert seen == [exit]


def _hypercall_exit(result: bytearray) -> kx.XenHypercallExit:
    return kx.XenHypercallExit(True, 0, 17, (1, 2, 0, 0, 0, 0), memoryview(result))


def test_hypercall_exits_reach_the_xen_handler():
    seen = []
    handler = ExitHandler(Bus("pio", 1 << 16), Bus("mmio", 1 << 64), hypercall=seen.append)
    exit = _hypercall_exit(bytearray(8))
    assert handler.handle(exit) is None
    assert seen == [exit]


def test_hypercall_without_xen_returns_enosys():
    result = bytearray(8)
    handler = ExitHandler(Bus("pio", 1 << 16), Bus("mmio", 1 << 64))
    assert handler.handle(_hypercall_exit(result)) is None
    assert int.from_bytes(result, "little") == (1 << 64) - 38  # -ENOSYS in RAX
