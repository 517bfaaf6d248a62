"""The PC devices' save_state()/restore_state() (pyvmm/core/snapshot.py):
drive a device into some state, save it (through JSON, as a snapshot
does), restore it into a freshly built device, then do the same to both
and see the same: every read, every byte sent, every interrupt level.
A damaged or foreign state is refused with SnapshotError, never half taken."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.core import layout
from pyvmm.core.bus import Bus
from pyvmm.core.snapshot import SnapshotError
from pyvmm.devices import acpi_pm, i8042, pci, rtc, serial
from pyvmm.devices.acpi_pm import AcpiPm
from pyvmm.devices.i8042 import I8042
from pyvmm.devices.pci import BarKind, PciDevice, PciHost
from pyvmm.devices.rtc import CmosRtc
from pyvmm.devices.serial import Serial16550


class Line:
    def __init__(self):
        self.level = False

    def set_level(self, asserted):
        self.level = asserted


def through_json(state: dict) -> dict:
    return json.loads(json.dumps(state, allow_nan=False))


# Operations on a device: ("r", offset) reads, ("w", offset, value) writes,
# plus each device's host-side operations.
def ops(offsets, extra=()):
    access = st.one_of(
        st.tuples(st.just("r"), st.sampled_from(offsets)),
        st.tuples(st.just("w"), st.sampled_from(offsets), st.integers(0, 255)),
        *extra,
    )
    return st.lists(access, max_size=60)


# --- 16550A -------------------------------------------------------------------------------

class Uart:
    def __init__(self):
        self.irq, self.out = Line(), bytearray()
        self.device = Serial16550(self.irq, self.out.extend)

    def do(self, op):
        if op[0] == "r":
            return self.device.read(op[1], 1)
        if op[0] == "w":
            self.device.write(op[1], 1, op[2])
            return None
        return self.device.receive(op[1])  # ("in", bytes)

    def observe(self):
        return bytes(self.out), self.irq.level


UART_OPS = ops(range(serial.REGISTER_COUNT), [st.tuples(st.just("in"), st.binary(max_size=20))])


def replay(make, before, after):
    original = make()
    for op in before:
        original.do(op)
    state = through_json(original.device.save_state())
    restored = make()
    restored.device.restore_state(state)
    original.out_mark = original.observe()
    assert restored.irq.level == original.irq.level, "the restored line is not where it was"
    for op in after:
        assert restored.do(op) == original.do(op), op
        assert restored.irq.level == original.irq.level, op
    return original, restored


@settings(max_examples=150, deadline=None)
@given(before=UART_OPS, after=UART_OPS)
def test_serial_behaves_the_same_after_a_restore(before, after):
    original, restored = replay(Uart, before, after)
    sent_before = len(original.out_mark[0])
    assert bytes(restored.out) == bytes(original.out)[sent_before:]


def test_serial_keeps_its_fifo_and_interrupt():
    uart = Uart()
    d = uart.device
    d.write(serial.IIR_FCR, 1, serial.FCR_ENABLE | (2 << 6))  # FIFO, trigger 8
    d.write(serial.MCR, 1, serial.MCR_OUT2)
    d.write(serial.IER, 1, serial.IER_ERBFI)
    d.receive(b"hello")
    assert uart.irq.level  # the timeout interrupt of a partly filled FIFO
    restored = Uart()
    restored.device.restore_state(through_json(d.save_state()))
    assert restored.irq.level
    assert bytes(restored.device.read(serial.RBR_THR, 1) for _ in range(5)) == b"hello"
    assert not restored.irq.level


# --- i8042 --------------------------------------------------------------------------------

class Kbc:
    def __init__(self):
        self.irq, self.aux, self.resets = Line(), Line(), []
        self.out = bytearray()
        self.device = I8042(lambda: self.resets.append(1), self.irq, self.aux)

    def do(self, op):
        port = i8042.DATA_PORT if op[1] == 0 else i8042.COMMAND_PORT
        if op[0] == "r":
            return self.device.port_read(port)
        self.device.port_write(port, op[2])
        return len(self.resets)

    def observe(self):
        return b"", (self.irq.level, self.aux.level)


KBC_COMMANDS = [0x20, 0x60, 0xA7, 0xA8, 0xAA, 0xAD, 0xAE, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xFE, 0x47]
KBC_OPS = st.lists(st.one_of(
    st.tuples(st.just("r"), st.sampled_from([0, 1])),
    st.tuples(st.just("w"), st.just(1), st.sampled_from(KBC_COMMANDS)),
    st.tuples(st.just("w"), st.just(0), st.integers(0, 255)),
), max_size=40)


@settings(max_examples=150, deadline=None)
@given(before=KBC_OPS, after=KBC_OPS)
def test_i8042_behaves_the_same_after_a_restore(before, after):
    original = Kbc()
    for op in before:
        original.do(op)
    restored = Kbc()
    restored.device.restore_state(through_json(original.device.save_state()))
    resets = len(original.resets)
    assert (restored.irq.level, restored.aux.level) == (original.irq.level, original.aux.level)
    for op in after:
        result = original.do(op)
        again = restored.do(op)
        if op[0] == "w":
            assert again == result - resets, op  # the same resets from here on
        else:
            assert again == result, op
        assert (restored.irq.level, restored.aux.level) == (original.irq.level, original.aux.level), op


def test_i8042_keeps_a_command_waiting_for_its_parameter():
    kbc = Kbc()
    kbc.device.port_write(i8042.COMMAND_PORT, 0x60)  # write the command byte: the parameter comes next
    restored = Kbc()
    restored.device.restore_state(through_json(kbc.device.save_state()))
    restored.device.port_write(i8042.DATA_PORT, 0x03)
    restored.device.port_write(i8042.COMMAND_PORT, 0x20)
    assert restored.device.port_read(i8042.DATA_PORT) == 0x03


# --- ACPI PM ------------------------------------------------------------------------------

class Pm:
    def __init__(self, clock):
        self.sci, self.requests, self.clock = Line(), [], clock
        self.device = AcpiPm(self.sci, lambda: self.requests.append("off"), lambda: self.requests.append("reset"),
                             monotonic_ns=lambda: self.clock[0])

    def do(self, op):
        if op[0] == "r":
            return self.device.read(op[1], 1)
        if op[0] == "w":
            self.device.write(op[1], 1, op[2])
            return len(self.requests)
        self.device.press_power_button()
        return None


PM_OPS = st.lists(st.one_of(
    st.tuples(st.just("r"), st.integers(0, acpi_pm.BLOCK_SIZE - 1)),
    st.tuples(st.just("w"), st.sampled_from([acpi_pm.PM1_STS, acpi_pm.PM1_STS + 1, acpi_pm.PM1_EN,
                                             acpi_pm.PM1_EN + 1, acpi_pm.PM1_CNT]), st.integers(0, 255)),
    st.tuples(st.just("button")),
), max_size=40)


@settings(max_examples=150, deadline=None)
@given(before=PM_OPS, after=PM_OPS, elapsed=st.integers(0, 10**12))
def test_acpi_pm_behaves_the_same_after_a_restore(before, after, elapsed):
    original = Pm([1_000])
    for op in before:
        original.do(op)
    original.clock[0] += elapsed
    state = through_json(original.device.save_state())
    # Another process: its monotonic clock has another origin.
    restored = Pm([77_000_000_000])
    restored.device.restore_state(state)
    requests = len(original.requests)
    assert restored.sci.level == original.sci.level
    for op in after:
        result, again = original.do(op), restored.do(op)
        if op[0] == "w":
            assert again == result - requests, op
        else:
            assert again == result, op
        assert restored.sci.level == original.sci.level


def test_the_pm_timer_goes_on_from_where_it_was():
    original = Pm([5_000_000_000])
    original.clock[0] += 123_456_789
    restored = Pm([42])
    restored.device.restore_state(through_json(original.device.save_state()))
    assert restored.device.read(acpi_pm.PM_TMR, 4) == original.device.read(acpi_pm.PM_TMR, 4)
    restored.clock[0] += 1_000_000
    assert restored.device.read(acpi_pm.PM_TMR, 4) - original.device.read(acpi_pm.PM_TMR, 4) == 3579


# --- RTC ----------------------------------------------------------------------------------

class Rtc:
    def __init__(self, now):
        self.irq, self.now = Line(), [now]
        self.device = CmosRtc(self.irq, lambda: self.now[0])

    def do(self, op):
        if op[0] == "r":
            return self.device.read(op[1], 1)
        if op[0] == "w":
            self.device.write(op[1], 1, op[2])
            return None
        self.now[0] += op[1]  # ("t", seconds)
        self.device.tick()
        return None


RTC_INDEXES = [rtc.SECONDS, rtc.MINUTES, rtc.HOURS, rtc.REG_A, rtc.REG_B, rtc.REG_C, rtc.REG_D, 0x20, rtc.CENTURY]
RTC_OPS = st.lists(st.one_of(
    st.tuples(st.just("w"), st.just(0), st.sampled_from(RTC_INDEXES)),
    st.tuples(st.just("r"), st.just(1)),
    st.tuples(st.just("w"), st.just(1), st.integers(0, 255)),
    st.tuples(st.just("t"), st.floats(0, 3)),
), max_size=40)


@settings(max_examples=150, deadline=None)
@given(before=RTC_OPS, after=RTC_OPS)
def test_rtc_behaves_the_same_after_a_restore(before, after):
    original = Rtc(1_700_000_000.25)
    for op in before:
        original.do(op)
    restored = Rtc(original.now[0])  # the same host time: this compares registers, not clocks
    restored.device.restore_state(through_json(original.device.save_state()))
    assert restored.irq.level == original.irq.level
    for op in after:
        if op[0] == "t":
            restored.now[0] = original.now[0]
        assert restored.do(op) == original.do(op), op
        assert restored.irq.level == original.irq.level, op


def test_a_restored_rtc_tells_real_time():
    original = Rtc(1_700_000_000.0)
    original.do(("w", 0, rtc.SECONDS))
    seconds = original.do(("r", 1))
    restored = Rtc(1_700_000_000.0 + 3600)  # restored an hour later
    restored.device.restore_state(through_json(original.device.save_state()))
    original.now[0] += 3600
    for index in (rtc.SECONDS, rtc.MINUTES, rtc.HOURS):
        original.do(("w", 0, index))
        restored.do(("w", 0, index))
        assert restored.do(("r", 1)) == original.do(("r", 1))
    assert seconds is not None


# --- PCI ----------------------------------------------------------------------------------

class Card(PciDevice):
    def __init__(self):
        super().__init__(0x5853, 0x0001, 0xFF8000, interrupt_pin=1, name="card")
        self.add_bar(0, 0x1000, BarKind.MEM32)
        self.add_bar(1, 0x100, BarKind.IO)


class Pci:
    def __init__(self):
        self.pio, self.mmio = Bus("pio", 1 << 16), Bus("mmio", 1 << 64)
        self.lines = {}
        self.device = PciHost(self.pio, self.mmio, lambda gsi: self.lines.setdefault(gsi, Line()))
        self.card = Card()
        self.device.add(self.card, slot=3)

    def config(self, slot, register, size=4, value=None):
        self.device.write(0, 4, 0x8000_0000 | (slot << 11) | (register & 0xFC))
        if value is None:
            return self.device.read(4 + (register & 3), size)
        self.device.write(4 + (register & 3), size, value)
        return None

    def mapped(self):
        return sorted((claim.base, claim.size) for claim in self.mmio.claims()) + \
            sorted((claim.base, claim.size) for claim in self.pio.claims())

    def levels(self):
        return {gsi: line.level for gsi, line in self.lines.items()}


def test_pci_keeps_the_guests_bars_commands_and_intx():
    host = Pci()
    host.config(3, pci.BAR0, value=0xE100_0000)
    host.config(3, pci.BAR0 + 4, value=0xD000)
    host.config(3, pci.COMMAND, 2, pci.COMMAND_MEMORY | pci.COMMAND_IO | pci.COMMAND_BUS_MASTER)
    host.config(3, pci.INTERRUPT_LINE, 1, 0x0B)
    host.card.set_intx(True)
    host.config(3, pci.COMMAND)  # leave the address register on the card
    state = through_json(host.device.save_state())

    restored = Pci()
    assert restored.mapped() != host.mapped()  # the fresh card's BARs are where pyvmm placed them
    restored.device.restore_state(state)
    assert restored.mapped() == host.mapped()
    assert restored.levels() == host.levels() and any(restored.levels().values())
    assert restored.device.read(0, 4) == host.device.read(0, 4)
    for register in range(0, pci.CONFIG_SPACE_SIZE, 4):
        assert restored.config(3, register) == host.config(3, register), hex(register)
    assert restored.card.bar_address(0) == 0xE100_0000
    restored.card.set_intx(False)
    assert not any(restored.levels().values())


def test_pci_refuses_a_state_of_other_devices():
    host = Pci()
    state = through_json(host.device.save_state())
    other = Pci()
    other.card.config[pci.DEVICE_ID] = 0x99
    with pytest.raises(SnapshotError, match="slot 3 held 5853:0001"):
        other.device.restore_state(state)
    bare_pio, bare_mmio = Bus("pio", 1 << 16), Bus("mmio", 1 << 64)
    with pytest.raises(SnapshotError, match="slot 3"):
        PciHost(bare_pio, bare_mmio, lambda gsi: Line()).restore_state(state)


# --- refusals, every device ---------------------------------------------------------------

def fresh_devices():
    return {
        "serial": Uart().device,
        "rtc": Rtc(1e9).device,
        "i8042": Kbc().device,
        "acpi_pm": Pm([0]).device,
        "pci": Pci().device,
    }


@pytest.mark.parametrize("name", ["serial", "rtc", "i8042", "acpi_pm", "pci"])
def test_a_newer_version_or_a_damaged_state_is_refused_whole(name):
    device = fresh_devices()[name]
    state = through_json(device.save_state())
    assert state["version"] == 1
    with pytest.raises(SnapshotError, match="version"):
        fresh_devices()[name].restore_state({**state, "version": 2})
    for key, value in state.items():
        if key == "version":
            continue
        target = fresh_devices()[name]
        before = json.dumps(target.save_state(), sort_keys=True)
        with pytest.raises(SnapshotError):
            target.restore_state({**state, key: "nonsense" if not isinstance(value, str) else 12})
        if name not in ("rtc", "acpi_pm"):  # whose saved clocks move on their own
            assert json.dumps(target.save_state(), sort_keys=True) == before, f"{key}: half taken"
        missing = dict(state)
        del missing[key]
        with pytest.raises(SnapshotError, match=key):
            fresh_devices()[name].restore_state(missing)


def test_layout_ports_are_what_the_tests_use():
    assert i8042.DATA_PORT == layout.I8042_DATA_PORT
