from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.core.bus import Bus
from pyvmm.devices import i8042 as k
from pyvmm.devices.i8042 import I8042


class Irq:
    def __init__(self):
        self.level = False

    def set_level(self, asserted):
        self.level = asserted


def make(with_irqs=True):
    resets = []
    kbd, aux = Irq(), Irq()
    controller = I8042(lambda: resets.append(1), kbd if with_irqs else None, aux if with_irqs else None)
    bus = Bus("pio", 1 << 16)
    bus.register(k.DATA_PORT, 1, controller.data_port())
    bus.register(k.COMMAND_PORT, 1, controller.command_port())
    return bus, resets, kbd, aux


def command(bus, cmd, param=None, reply=False):
    """Linux's i8042_command(): wait IBF clear, write, then param / reply."""
    assert not bus.read(k.COMMAND_PORT, 1) & k.STATUS_IBF
    bus.write(k.COMMAND_PORT, 1, cmd)
    if param is not None:
        bus.write(k.DATA_PORT, 1, param)
    if reply:
        status = bus.read(k.COMMAND_PORT, 1)
        assert status & k.STATUS_OBF, f"no reply to {cmd:#x}"
        return bus.read(k.DATA_PORT, 1), status
    return None, bus.read(k.COMMAND_PORT, 1)


def test_linux_probe_sequence():
    bus, resets, kbd, aux = make()
    # i8042_flush: nothing pending.
    assert not bus.read(k.COMMAND_PORT, 1) & k.STATUS_OBF
    assert command(bus, 0xAA, reply=True)[0] == k.SELF_TEST_OK
    ctr = command(bus, 0x20, reply=True)[0]
    assert ctr == command(bus, 0x20, reply=True)[0]
    ctr = (ctr & ~k.CTR_KBD_INT & ~k.CTR_AUX_INT) | k.CTR_KBD_DISABLE | k.CTR_AUX_DISABLE
    command(bus, 0x60, ctr)
    assert command(bus, 0x20, reply=True)[0] == ctr
    # i8042_check_aux: AUX loopback returns the byte as AUX data.
    value, status = command(bus, 0xD3, 0x5A, reply=True)
    assert value == 0x5A and status & k.STATUS_AUX
    command(bus, 0xA7)
    assert command(bus, 0x20, reply=True)[0] & k.CTR_AUX_DISABLE
    command(bus, 0xA8)
    assert not command(bus, 0x20, reply=True)[0] & k.CTR_AUX_DISABLE
    assert command(bus, 0xA9, reply=True)[0] == 0x00
    assert command(bus, 0xAB, reply=True)[0] == 0x00
    command(bus, 0xAD)
    assert command(bus, 0x20, reply=True)[0] & k.CTR_KBD_DISABLE
    command(bus, 0xAE)
    assert not command(bus, 0x20, reply=True)[0] & k.CTR_KBD_DISABLE
    assert resets == [] and not kbd.level and not aux.level


def test_aux_irq_delivery_test():
    bus, _, _, aux = make()
    ctr = command(bus, 0x20, reply=True)[0]
    command(bus, 0x60, ctr | k.CTR_AUX_INT)
    command(bus, 0xD3, 0xA5)  # loop a byte, expect IRQ 12
    assert aux.level
    assert bus.read(k.DATA_PORT, 1) == 0xA5
    assert not aux.level


def test_byte_for_missing_keyboard_times_out_at_once():
    bus, _, kbd, _ = make()
    bus.write(k.DATA_PORT, 1, 0xF2)  # GET ID
    status = bus.read(k.COMMAND_PORT, 1)
    assert status & k.STATUS_OBF and status & k.STATUS_TIMEOUT and not status & k.STATUS_AUX
    assert kbd.level  # CTR enables the keyboard interrupt by default
    assert bus.read(k.DATA_PORT, 1) == k.NO_DEVICE
    assert not bus.read(k.COMMAND_PORT, 1) & (k.STATUS_OBF | k.STATUS_TIMEOUT)
    assert not kbd.level
    command(bus, 0xD4, 0xFF)  # a byte for the mouse
    status = bus.read(k.COMMAND_PORT, 1)
    assert status & k.STATUS_AUX and status & k.STATUS_TIMEOUT


def test_pulse_reset_fires_once_per_request():
    bus, resets, _, _ = make()
    command(bus, 0xFE)
    assert resets == [1]
    command(bus, 0xFF)  # pulses nothing
    assert resets == [1]
    command(bus, 0xFE)
    assert resets == [1, 1]


def test_output_port_reset_bit():
    bus, resets, _, _ = make()
    command(bus, 0xD1, 0xDF)  # Linux's A20 enable: reset line stays high
    assert resets == []
    assert command(bus, 0xD0, reply=True)[0] & k.OUTPUT_RESET
    command(bus, 0xD1, 0xDE)
    assert resets == [1]


def test_works_without_irq_lines():
    bus, _, _, _ = make(with_irqs=False)
    bus.write(k.DATA_PORT, 1, 0xFF)
    assert bus.read(k.DATA_PORT, 1) == k.NO_DEVICE


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.booleans(),
            st.sampled_from([k.DATA_PORT, k.COMMAND_PORT]),
            st.integers(-1, 3),
            st.sampled_from([0, 1, 2, 4, 8]),
            st.integers(0, 2**64 - 1),
        ),
        max_size=80,
    )
)
def test_hostile_accesses_never_raise(sequence):
    resets = []
    controller = I8042(lambda: resets.append(1), Irq(), Irq())
    ports = {k.DATA_PORT: controller.data_port(), k.COMMAND_PORT: controller.command_port()}
    for is_write, port, offset, size, value in sequence:
        if is_write:
            ports[port].write(offset, size, value)
        else:
            assert 0 <= ports[port].read(offset, size) < 1 << (8 * size) or size == 0
        assert len(controller._queue) <= k.OUTPUT_QUEUE_LIMIT
