from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.core import layout
from pyvmm.devices import acpi_pm as a
from pyvmm.devices.acpi_pm import AcpiPm


class Irq:
    def __init__(self):
        self.level = False
        self.changes = []

    def set_level(self, asserted):
        assert asserted != self.level
        self.level = asserted
        self.changes.append(asserted)


class Clock:
    def __init__(self):
        self.ns = 5_000_000_000

    def __call__(self):
        return self.ns


def make():
    sci, clock = Irq(), Clock()
    events = []
    pm = AcpiPm(sci, lambda: events.append("off"), lambda: events.append("reset"), clock)
    return pm, sci, clock, events


def sleep_value(slp_typ, enable=True):
    return (slp_typ << a.CNT_SLP_TYP_SHIFT) | (a.CNT_SLP_EN if enable else 0)


def test_offsets_match_layout():
    assert layout.ACPI_PM_BASE + a.PM1_CNT == layout.ACPI_PM1A_CNT_BLK
    assert layout.ACPI_PM_BASE + a.PM_TMR == layout.ACPI_PM_TMR_BLK
    assert layout.ACPI_PM_BASE + a.RESET_REG == layout.ACPI_RESET_REG


def test_pm_timer_rate_and_wrap():
    pm, _, clock, _ = make()
    assert pm.read(a.PM_TMR, 4) == 0
    clock.ns += 1_000_000_000
    assert pm.read(a.PM_TMR, 4) == a.PM_TIMER_HZ
    clock.ns += 10 * 1_000_000_000  # 35.8 M ticks: wrapped past 2**24
    value = pm.read(a.PM_TMR, 4)
    assert value == (11 * a.PM_TIMER_HZ) & 0xFFFFFF
    assert value < 1 << 24
    pm.write(a.PM_TMR, 4, 0)  # read-only
    assert pm.read(a.PM_TMR, 4) == value


@given(st.integers(0, 1 << 50))
def test_the_timers_whole_read_is_its_bytes_read_apart(elapsed_ns):
    pm, _, clock, _ = make()
    clock.ns += elapsed_ns
    low, high = pm.read(a.PM_TMR, 2), pm.read(a.PM_TMR + 2, 2)  # the general path, byte by byte
    assert pm.read(a.PM_TMR, 4) == low | high << 16  # the clocksource's path
    assert pm.read(a.PM_TMR - 4, 8) >> 32 == low | high << 16


def test_sci_en_always_reads_one():
    pm, _, _, _ = make()
    assert pm.read(a.PM1_CNT, 2) & a.CNT_SCI_EN
    pm.write(a.PM1_CNT, 2, 0)
    assert pm.read(a.PM1_CNT, 2) & a.CNT_SCI_EN


def test_status_write_one_to_clear_and_sci():
    pm, sci, _, _ = make()
    pm.press_power_button()
    assert pm.read(a.PM1_STS, 2) & a.STS_PWRBTN
    assert not sci.level  # not enabled yet
    pm.write(a.PM1_EN, 2, a.EN_PWRBTN)
    assert sci.level
    pm.write(a.PM1_STS, 2, 0)  # writing zeros clears nothing
    assert sci.level
    pm.write(a.PM1_STS, 2, a.STS_PWRBTN)
    assert not sci.level
    assert pm.read(a.PM1_STS, 2) == 0
    assert sci.changes == [True, False]


def test_dword_access_to_event_block():
    pm, _, _, _ = make()
    pm.press_power_button()
    pm.write(a.PM1_STS, 4, a.EN_PWRBTN << 16)  # enable only, clears nothing
    assert pm.read(a.PM1_STS, 4) == a.STS_PWRBTN | a.EN_PWRBTN << 16


def test_s5_powers_off_once():
    pm, _, _, events = make()
    pm.write(a.PM1_CNT, 2, sleep_value(layout.ACPI_S5_SLP_TYP, enable=False))
    assert events == []  # SLP_TYP alone does nothing
    pm.write(a.PM1_CNT, 2, sleep_value(layout.ACPI_S5_SLP_TYP))
    assert events == ["off"]
    assert not pm.read(a.PM1_CNT, 2) & a.CNT_SLP_EN  # write-only


def test_s5_by_byte_write():
    pm, _, _, events = make()
    pm.write(a.PM1_CNT + 1, 1, sleep_value(layout.ACPI_S5_SLP_TYP) >> 8)
    assert events == ["off"]


def test_other_sleep_states_are_ignored(caplog):
    pm, _, _, events = make()
    for slp_typ in range(8):
        if slp_typ != layout.ACPI_S5_SLP_TYP:
            pm.write(a.PM1_CNT, 2, sleep_value(slp_typ))
    assert events == []
    assert "not supported" in caplog.text


def test_reset_register():
    pm, _, _, events = make()
    pm.write(a.RESET_REG, 1, 0x01)
    assert events == []
    pm.write(a.RESET_REG, 1, layout.ACPI_RESET_VALUE)
    assert events == ["reset"]


def test_callbacks_run_outside_the_lock():
    sci = Irq()
    seen = []

    def poweroff():
        seen.append(pm.read(a.PM1_CNT, 2))  # would deadlock if the lock were held

    pm = AcpiPm(sci, poweroff, lambda: None)
    pm.write(a.PM1_CNT, 2, sleep_value(layout.ACPI_S5_SLP_TYP))
    assert len(seen) == 1


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(-2, 20), st.sampled_from([0, 1, 2, 3, 4, 8]), st.integers(0, 2**64 - 1)),
        max_size=50,
    )
)
def test_hostile_accesses_never_raise(sequence):
    pm, sci, clock, events = make()
    for is_write, offset, size, value in sequence:
        if is_write:
            pm.write(offset, size, value)
        else:
            assert 0 <= pm.read(offset, size) < 1 << (8 * size) or size == 0
        clock.ns += value % 1000
        assert sci.level == bool(pm._status & pm._enable)
