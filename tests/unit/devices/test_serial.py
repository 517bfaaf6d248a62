import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.devices import serial as s
from pyvmm.devices.serial import Serial16550


class Irq:
    def __init__(self):
        self.level = False
        self.changes = []

    def set_level(self, asserted):
        assert asserted != self.level, "level set without a change"
        self.level = asserted
        self.changes.append(asserted)


def make(**kwargs):
    irq, out = Irq(), []
    uart = Serial16550(irq, out.append, **kwargs)
    return uart, irq, out


def inb(uart, reg):
    return uart.read(reg, 1)


def outb(uart, reg, value):
    uart.write(reg, 1, value)


def linux_autoconfig(uart):
    """The register dance of Linux's 8250 autoconfig() / autoconfig_16550a()."""
    # IER must hold exactly the four enable bits.
    scratch = inb(uart, s.IER)
    outb(uart, s.IER, 0)
    scratch2 = inb(uart, s.IER) & 0x0F
    outb(uart, s.IER, 0x0F)
    scratch3 = inb(uart, s.IER) & 0x0F
    outb(uart, s.IER, scratch)
    if scratch2 != 0 or scratch3 != 0x0F:
        return "none"
    save_mcr = inb(uart, s.MCR)
    save_lcr = inb(uart, s.LCR)
    # Loopback test: RTS|OUT2 must come back as CTS|DCD.
    outb(uart, s.MCR, s.MCR_LOOP | 0x0A)
    status1 = inb(uart, s.MSR) & 0xF0
    outb(uart, s.MCR, save_mcr)
    if status1 != 0x90:
        return "none"
    outb(uart, s.LCR, 0xBF)
    outb(uart, 2, 0)  # EFR on enhanced parts
    outb(uart, s.LCR, 0)
    outb(uart, s.IIR_FCR, s.FCR_ENABLE)
    fifo = inb(uart, s.IIR_FCR) >> 6
    if fifo != 3:
        return {0: "8250", 1: "16550-broken", 2: "16550"}[fifo]
    # 16550A variants: EFR under DLAB, National SuperIO, TI16750, XScale.
    outb(uart, s.LCR, 0x80)
    if inb(uart, 2) == 0:
        return "16650-ish"
    outb(uart, s.LCR, 0xBF)
    if inb(uart, 2) == 0:
        return "16650-ish"
    outb(uart, s.LCR, 0)
    status1 = inb(uart, s.MCR)
    outb(uart, s.LCR, 0xE0)
    status2 = inb(uart, 2)
    if not (status2 ^ status1) & s.MCR_LOOP:
        outb(uart, s.LCR, 0)
        outb(uart, s.MCR, status1 ^ s.MCR_LOOP)
        outb(uart, s.LCR, 0xE0)
        status2 = inb(uart, 2)
        outb(uart, s.LCR, 0)
        outb(uart, s.MCR, status1)
        if (status2 ^ status1) & s.MCR_LOOP:
            return "ns16550"
    outb(uart, s.LCR, 0)
    outb(uart, s.IIR_FCR, s.FCR_ENABLE | 0x20)
    status1 = inb(uart, s.IIR_FCR) & 0xE0
    outb(uart, s.IIR_FCR, 0)
    outb(uart, s.LCR, 0x80)
    outb(uart, s.IIR_FCR, s.FCR_ENABLE | 0x20)
    status2 = inb(uart, s.IIR_FCR) & 0xE0
    outb(uart, s.IIR_FCR, 0)
    outb(uart, s.LCR, 0)
    if status1 == 0xC0 and status2 == 0xE0:
        return "16750"
    outb(uart, s.IER, 0)
    outb(uart, s.IER, 0x40)
    if inb(uart, s.IER) & 0x40:
        return "xscale"
    outb(uart, s.LCR, save_lcr)
    outb(uart, s.MCR, save_mcr)
    outb(uart, s.IIR_FCR, s.FCR_ENABLE | s.FCR_CLEAR_RX | s.FCR_CLEAR_TX)
    outb(uart, s.IIR_FCR, 0)
    inb(uart, s.RBR_THR)
    outb(uart, s.IER, 0)
    return "16550A"


def test_linux_autoconfig_identifies_16550a():
    uart, irq, out = make()
    assert linux_autoconfig(uart) == "16550A"
    assert out == []  # the probe transmits nothing
    assert not irq.level


def test_ier_keeps_only_enable_bits():
    uart, _, _ = make()
    outb(uart, s.IER, 0xFF)
    assert inb(uart, s.IER) == 0x0F


def test_thre_interrupt_when_etbei_enabled_and_rearmed():
    uart, irq, _ = make()
    outb(uart, s.MCR, s.MCR_OUT2)
    assert inb(uart, s.IIR_FCR) == s.IIR_NO_INT
    outb(uart, s.IER, s.IER_ETBEI)
    assert irq.level
    assert inb(uart, s.IIR_FCR) & 0x0F == s.IIR_THRI
    # Reading IIR acknowledged it.
    assert inb(uart, s.IIR_FCR) & 0x0F == s.IIR_NO_INT
    assert not irq.level
    # Linux's startup test: disabling and re-enabling ETBEI raises it again.
    outb(uart, s.IER, 0)
    outb(uart, s.IER, s.IER_ETBEI)
    assert inb(uart, s.IIR_FCR) & 0x0F == s.IIR_THRI


def test_thre_interrupt_follows_each_transmitted_byte():
    uart, irq, out = make()
    outb(uart, s.MCR, s.MCR_OUT2)
    outb(uart, s.IER, s.IER_ETBEI)
    assert inb(uart, s.IIR_FCR) & 0x0F == s.IIR_THRI
    assert not irq.level
    outb(uart, s.RBR_THR, ord("A"))
    assert out == [b"A"]
    assert irq.level
    assert inb(uart, s.LSR) & (s.LSR_THRE | s.LSR_TEMT) == s.LSR_THRE | s.LSR_TEMT


def test_irq_needs_out2_and_not_loopback():
    uart, irq, _ = make()
    outb(uart, s.IER, s.IER_ETBEI)
    assert not irq.level  # OUT2 low: the PC's IRQ buffer is off
    assert inb(uart, s.IIR_FCR) & 0x0F == s.IIR_THRI  # but IIR still reports it
    outb(uart, s.IER, 0)
    outb(uart, s.IER, s.IER_ETBEI)
    outb(uart, s.MCR, s.MCR_OUT2)
    assert irq.level
    outb(uart, s.MCR, s.MCR_OUT2 | s.MCR_LOOP)
    assert not irq.level


def test_receive_fifo_trigger_and_timeout():
    uart, irq, _ = make()
    outb(uart, s.MCR, s.MCR_OUT2)
    outb(uart, s.IIR_FCR, s.FCR_ENABLE | (2 << 6))  # trigger at 8
    outb(uart, s.IER, s.IER_ERBFI)
    assert uart.receive(b"abc") == 3
    assert irq.level
    assert inb(uart, s.IIR_FCR) == 0xC0 | s.IIR_TIMEOUT
    assert uart.receive(b"defgh") == 5
    assert inb(uart, s.IIR_FCR) == 0xC0 | s.IIR_RDI
    data = bytes(inb(uart, s.RBR_THR) for _ in range(8))
    assert data == b"abcdefgh"
    assert not inb(uart, s.LSR) & s.LSR_DR
    assert not irq.level


def test_receive_back_pressure():
    uart, _, _ = make()
    # 16450 mode (FIFO off) holds one byte.
    assert uart.receive(b"xy") == 1
    assert not uart.wants_input()
    assert inb(uart, s.RBR_THR) == ord("x")
    outb(uart, s.IIR_FCR, s.FCR_ENABLE)
    assert uart.receive(bytes(range(20))) == 16
    assert not uart.wants_input()
    assert uart.receive(b"z") == 0
    assert not inb(uart, s.LSR) & s.LSR_OE  # nothing was lost
    inb(uart, s.RBR_THR)
    assert uart.wants_input()
    assert uart.receive(b"z") == 1


def test_input_wanted_when_drained():
    calls = []
    uart, _, _ = make(input_wanted=lambda: calls.append(1))
    outb(uart, s.IIR_FCR, s.FCR_ENABLE)
    assert calls == [1]  # the FIFO grew from 1 to 16 bytes
    calls.clear()
    uart.receive(b"ab")
    inb(uart, s.RBR_THR)
    assert calls == []
    inb(uart, s.RBR_THR)
    assert calls == [1]
    inb(uart, s.RBR_THR)  # reading an empty FIFO is no news
    assert calls == [1]


def test_loopback_overrun_sets_oe_and_line_status_interrupt():
    uart, _, out = make()
    outb(uart, s.IIR_FCR, s.FCR_ENABLE)
    outb(uart, s.IER, s.IER_ELSI | s.IER_ERBFI | s.IER_ETBEI)
    outb(uart, s.MCR, s.MCR_LOOP)
    assert uart.receive(b"x") == 0  # input is disconnected in loopback
    for i in range(17):
        outb(uart, s.RBR_THR, i)
    assert out == []
    assert inb(uart, s.IIR_FCR) & 0x0F == s.IIR_RLSI  # highest priority
    lsr = inb(uart, s.LSR)
    assert lsr & s.LSR_OE and lsr & s.LSR_DR
    assert not inb(uart, s.LSR) & s.LSR_OE  # cleared by reading
    assert inb(uart, s.IIR_FCR) & 0x0F == s.IIR_RDI
    assert [inb(uart, s.RBR_THR) for _ in range(16)] == list(range(16))
    assert inb(uart, s.IIR_FCR) & 0x0F == s.IIR_THRI


def test_modem_status_deltas_in_loopback():
    uart, _, _ = make()
    outb(uart, s.IER, s.IER_EDSSI)
    outb(uart, s.MCR, s.MCR_LOOP)  # all host lines drop
    assert inb(uart, s.IIR_FCR) & 0x0F == s.IIR_MSI
    assert inb(uart, s.MSR) == s.MSR_DCTS | s.MSR_DDSR | s.MSR_DDCD
    assert inb(uart, s.MSR) == 0
    assert inb(uart, s.IIR_FCR) & 0x0F == s.IIR_NO_INT
    outb(uart, s.MCR, s.MCR_LOOP | s.MCR_OUT1)
    assert inb(uart, s.MSR) == s.MSR_RI  # rising RI is not a TERI event
    outb(uart, s.MCR, s.MCR_LOOP)
    assert inb(uart, s.MSR) == s.MSR_TERI
    outb(uart, s.MCR, 0)
    assert inb(uart, s.MSR) & 0xF0 == s.HOST_MODEM_LINES


def test_divisor_latch_is_separate():
    uart, _, out = make()
    outb(uart, s.IER, 0x05)
    outb(uart, s.LCR, s.LCR_DLAB | 0x03)
    outb(uart, 0, 0x01)
    outb(uart, 1, 0x00)
    assert (inb(uart, 0), inb(uart, 1)) == (1, 0)
    outb(uart, s.LCR, 0x03)
    assert inb(uart, s.IER) == 0x05
    assert out == []


def test_fcr_clears_rx_fifo():
    uart, _, _ = make()
    outb(uart, s.IIR_FCR, s.FCR_ENABLE)
    uart.receive(b"abc")
    outb(uart, s.IIR_FCR, s.FCR_ENABLE | s.FCR_CLEAR_RX)
    assert not inb(uart, s.LSR) & s.LSR_DR


def test_scratch_register():
    uart, _, _ = make()
    outb(uart, s.SCR, 0xA5)
    assert inb(uart, s.SCR) == 0xA5


def test_concurrent_receive_keeps_order():
    uart, _, _ = make()
    outb(uart, s.IIR_FCR, s.FCR_ENABLE)
    data = bytes(i % 251 for i in range(5000))
    got = bytearray()

    def producer():
        pending = data
        while pending:
            pending = pending[uart.receive(pending[:7]) :]

    thread = threading.Thread(target=producer)
    thread.start()
    while len(got) < len(data):
        if inb(uart, s.LSR) & s.LSR_DR:
            got.append(inb(uart, s.RBR_THR))
    thread.join()
    assert bytes(got) == data


ops = st.lists(
    st.tuples(
        st.sampled_from(["r", "w", "rx"]),
        st.integers(-4, 12),
        st.sampled_from([0, 1, 2, 3, 4, 8]),
        st.integers(0, 2**64 - 1),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_hostile_accesses_never_raise_and_irq_is_consistent(sequence):
    uart, irq, _ = make()
    for kind, offset, size, value in sequence:
        if kind == "r":
            result = uart.read(offset, size)
            assert 0 <= result < 1 << (8 * size) or size == 0
        elif kind == "w":
            uart.write(offset, size, value)
        else:
            uart.receive(value.to_bytes(8, "little")[: size])
        # The line is what IIR says, gated by OUT2 and loopback.
        with uart._lock:
            expected = (
                uart._interrupt_id() != s.IIR_NO_INT
                and bool(uart._mcr & s.MCR_OUT2)
                and not uart._mcr & s.MCR_LOOP
            )
        assert irq.level == expected
        assert len(uart._rx) <= s.FIFO_SIZE
