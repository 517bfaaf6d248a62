import logging

from hypothesis import given
from hypothesis import strategies as st

from pyvmm.core import layout
from pyvmm.core.bus import Bus
from pyvmm.devices.pvpanic import CRASH_LOADED, PANICKED, SUPPORTED_EVENTS, PvPanic
from pyvmm.core.ratelimit import DEFAULT_LOG_RATE
from pyvmm.platform import Platform
from pyvmm.core.stop import StopReason
from pyvmm.core.trace import NULL_TRACE


def test_reading_the_port_announces_the_supported_events():
    bus = Bus("pio", 1 << 16)
    bus.register(layout.PVPANIC_PORT, 1, PvPanic(lambda events: None))
    assert bus.read(layout.PVPANIC_PORT, 1) == SUPPORTED_EVENTS == PANICKED | CRASH_LOADED == 0b11


def test_a_panic_as_linux_reports_it():
    # Linux's pvpanic driver reads the port, then on panic writes the event
    # it has (PANICKED, or CRASH_LOADED with a crash kernel loaded).
    events = []
    device = PvPanic(events.append)
    supported = device.read(0, 1)
    device.write(0, 1, PANICKED & supported)
    device.write(0, 1, CRASH_LOADED & supported)
    assert events == [PANICKED, CRASH_LOADED]


def test_unknown_bits_and_zero_writes_report_nothing():
    events = []
    device = PvPanic(events.append)
    device.write(0, 1, 0)
    device.write(0, 1, 0b1111_1100)
    device.write(0, 1, 0b0000_0101)
    assert events == [PANICKED]


@given(st.integers(-3, 3), st.sampled_from([0, 1, 2, 4, 8]), st.integers(0, 2**64 - 1))
def test_hostile_accesses(offset, size, value):
    events = []
    device = PvPanic(events.append)
    device.write(offset, size, value)
    assert events in ([], [value & SUPPORTED_EVENTS])
    if events:
        assert offset == 0 and size >= 1
    result = device.read(offset, size)
    assert 0 <= result < 1 << (8 * size) or size == 0


class FakeMachine:
    def __init__(self):
        self.stops = []

    def request_stop(self, reason, detail=None):
        self.stops.append((reason, detail))


def platform_panic_handler(machine):
    # Only the callback under test: Platform.__init__ needs a whole VM.
    platform = Platform.__new__(Platform)
    platform.machine = machine
    platform._trace = NULL_TRACE
    platform._limited = DEFAULT_LOG_RATE.limited(logging.getLogger("pyvmm.platform"))
    return platform._guest_panicked


def test_panicked_stops_the_vm_as_a_crash_with_a_warning(caplog):
    machine = FakeMachine()
    with caplog.at_level(logging.WARNING, logger="pyvmm.platform"):
        platform_panic_handler(machine)(PANICKED)
    assert machine.stops == [(StopReason.CRASH, "pvpanic")]
    assert "guest reported a panic (pvpanic)" in caplog.text


def test_crash_loaded_alone_lets_the_crash_kernel_run(caplog):
    machine = FakeMachine()
    with caplog.at_level(logging.WARNING, logger="pyvmm.platform"):
        platform_panic_handler(machine)(CRASH_LOADED)
    assert machine.stops == []
    assert "crash kernel" in caplog.text
