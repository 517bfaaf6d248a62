import calendar

from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.devices import rtc as r
from pyvmm.devices.rtc import CmosRtc

# Saturday 2024-02-03 13:45:56.250 UTC
T0 = calendar.timegm((2024, 2, 3, 13, 45, 56)) + 0.25


class Irq:
    def __init__(self):
        self.level = False
        self.changes = []

    def set_level(self, asserted):
        assert asserted != self.level
        self.level = asserted
        self.changes.append(asserted)


class Clock:
    def __init__(self, now=T0):
        self.now = now

    def __call__(self):
        return self.now


def make():
    irq, clock = Irq(), Clock()
    return CmosRtc(irq, clock), irq, clock


def get(dev, index):
    dev.write(0, 1, index)
    return dev.read(1, 1)


def put(dev, index, value):
    dev.write(0, 1, index)
    dev.write(1, 1, value)


def read_time(dev):
    return [get(dev, i) for i in (r.SECONDS, r.MINUTES, r.HOURS, r.DAY_OF_WEEK,
                                  r.DAY_OF_MONTH, r.MONTH, r.YEAR, r.CENTURY)]


def test_bcd_24_hour_by_default():
    dev, _, _ = make()
    assert get(dev, r.REG_B) == r.B_24H
    assert read_time(dev) == [0x56, 0x45, 0x13, 0x07, 0x03, 0x02, 0x24, 0x20]
    assert get(dev, r.REG_D) == r.D_VRT


def test_binary_and_12_hour_modes():
    dev, _, _ = make()
    put(dev, r.REG_B, r.B_DM_BINARY | r.B_24H)
    assert read_time(dev) == [56, 45, 13, 7, 3, 2, 24, 20]
    put(dev, r.REG_B, r.B_DM_BINARY)
    assert get(dev, r.HOURS) == 0x80 | 1  # 1 PM
    put(dev, r.REG_B, 0)
    assert get(dev, r.HOURS) == 0x81


def test_time_follows_the_host_clock():
    dev, _, clock = make()
    clock.now += 3600 * 24 * 30
    assert read_time(dev) == [0x56, 0x45, 0x13, 0x02, 0x04, 0x03, 0x24, 0x20]


def test_set_bit_freezes_and_guest_sets_the_time():
    dev, _, clock = make()
    put(dev, r.REG_B, r.B_24H | r.B_SET)
    clock.now += 10
    assert get(dev, r.SECONDS) == 0x56  # frozen
    for index, value in ((r.SECONDS, 0x00), (r.MINUTES, 0x30), (r.HOURS, 0x08),
                         (r.DAY_OF_MONTH, 0x31), (r.MONTH, 0x12), (r.YEAR, 0x99), (r.CENTURY, 0x19)):
        put(dev, index, value)
    clock.now += 10
    assert get(dev, r.SECONDS) == 0x00
    put(dev, r.REG_B, r.B_24H)
    clock.now += 5
    assert read_time(dev)[:3] == [0x05, 0x30, 0x08]
    assert read_time(dev)[4:] == [0x31, 0x12, 0x99, 0x19]
    clock.now += 16 * 3600  # rolls over into the year 2000
    assert read_time(dev)[4:] == [0x01, 0x01, 0x00, 0x20]


def test_linux_set_time_sequence_with_divider_reset():
    dev, _, clock = make()
    save_control = get(dev, r.REG_B)
    put(dev, r.REG_B, save_control | r.B_SET)
    save_freq = get(dev, r.REG_A)
    put(dev, r.REG_A, save_freq | 0x70)  # RTC_DIV_RESET2
    put(dev, r.SECONDS, 0x10)
    put(dev, r.MINUTES, 0x20)
    put(dev, r.HOURS, 0x23)
    put(dev, r.REG_B, save_control)
    clock.now += 3
    assert get(dev, r.SECONDS) == 0x10  # still held by the divider reset
    put(dev, r.REG_A, save_freq)
    clock.now += 0.4
    assert get(dev, r.SECONDS) == 0x10
    clock.now += 0.2  # the first update comes 500 ms after the reset ends
    assert get(dev, r.SECONDS) == 0x11
    assert get(dev, r.HOURS) == 0x23


def test_writing_one_field_of_a_running_clock():
    dev, _, clock = make()
    put(dev, r.MINUTES, 0x00)
    assert read_time(dev)[:3] == [0x56, 0x00, 0x13]
    clock.now += 4
    assert get(dev, r.SECONDS) == 0x00 and get(dev, r.MINUTES) == 0x01


def test_uip_just_before_an_update():
    dev, _, clock = make()
    assert not get(dev, r.REG_A) & r.A_UIP
    clock.now = int(clock.now) + 1 - 100e-6
    assert get(dev, r.REG_A) & r.A_UIP
    assert get(dev, r.REG_A) & 0x7F == 0x26
    put(dev, r.REG_B, r.B_SET | r.B_24H)
    assert not get(dev, r.REG_A) & r.A_UIP


def test_update_interrupt_and_register_c():
    dev, irq, clock = make()
    put(dev, r.REG_B, r.B_24H | r.B_UIE)
    assert dev.next_deadline() == int(T0) + 1
    dev.tick(T0 + 0.5)
    assert not irq.level
    clock.now = T0 + 1
    dev.tick()
    assert irq.level
    # PF is set too: the periodic flag runs at the rate in A even unasked.
    assert get(dev, r.REG_C) == r.C_IRQF | r.C_UF | r.C_PF
    assert not irq.level
    assert get(dev, r.REG_C) == 0


def test_flags_without_enable_raise_nothing():
    dev, irq, clock = make()
    clock.now += 1
    assert get(dev, r.REG_C) == r.C_UF | r.C_PF  # polled, no IRQF
    put(dev, r.REG_A, 0x20)  # rate 0: no periodic flag
    clock.now += 1
    assert get(dev, r.REG_C) == r.C_UF
    assert not irq.changes


def test_alarm_interrupt():
    dev, irq, clock = make()
    put(dev, r.SECONDS_ALARM, 0x00)
    put(dev, r.MINUTES_ALARM, 0x46)
    put(dev, r.HOURS_ALARM, 0xFF)  # any hour
    put(dev, r.REG_B, r.B_24H | r.B_AIE)
    dev.tick(T0 + 2)
    assert not irq.level
    dev.tick(T0 + 4)  # 13:46:00 has passed
    assert irq.level
    assert get(dev, r.REG_C) & (r.C_IRQF | r.C_AF) == r.C_IRQF | r.C_AF


def test_periodic_interrupt():
    dev, irq, clock = make()
    put(dev, r.REG_A, 0x2F)  # 2 Hz
    put(dev, r.REG_B, r.B_24H | r.B_PIE)
    deadline = dev.next_deadline()
    assert deadline is not None and T0 < deadline <= T0 + 0.5
    dev.tick(deadline)
    assert irq.level
    assert get(dev, r.REG_C) & r.C_PF


def test_index_port_and_nvram():
    dev, _, _ = make()
    dev.write(0, 1, 0x80 | 0x40)
    assert dev.nmi_disabled
    dev.write(1, 1, 0x5A)
    assert get(dev, 0x40) == 0x5A
    dev.write(0, 2, 0xA5 << 8 | 0x41)  # outw: index and data at once
    assert get(dev, 0x41) == 0xA5
    put(dev, r.REG_C, 0xFF)
    put(dev, r.REG_D, 0x00)
    assert get(dev, r.REG_D) == r.D_VRT


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["r", "w", "tick"]),
            st.integers(-2, 4),
            st.sampled_from([0, 1, 2, 4, 8]),
            st.integers(0, 2**64 - 1),
        ),
        max_size=60,
    )
)
def test_hostile_accesses_never_raise(sequence):
    dev, irq, clock = make()
    for kind, offset, size, value in sequence:
        if kind == "r":
            assert 0 <= dev.read(offset, size) < 1 << (8 * size) or size == 0
        elif kind == "w":
            dev.write(offset, size, value)
        else:
            clock.now += (value % 10**6) / 1000.0
            dev.tick()
            dev.next_deadline()
        with dev._lock:
            assert irq.level == dev._irq_pending()
