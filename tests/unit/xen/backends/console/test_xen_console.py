"""The primary PV console ring: both directions, wraparound, hostile indices."""

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from frontends.console import ConsoleGuest as Guest
from pyvmm.xen.backends.console.pvconsole import (
    CONNECTION,
    IN_CONS,
    IN_PROD,
    IN_SIZE,
    OUT_CONS,
    OUT_OFFSET,
    OUT_PROD,
    OUT_SIZE,
    PvConsole,
)

MASK = 0xFFFF_FFFF


class Host:
    def __init__(self, start_index=0):
        self.page = memoryview(bytearray(4096))
        self.guest = Guest(self.page)
        for offset in (IN_CONS, IN_PROD, OUT_CONS, OUT_PROD):
            self.guest.set_u32(offset, start_index)
        self.out = []
        self.notifications = 0
        self.console = PvConsole(self.page, self._notify, self.out.append)

    def _notify(self):
        self.notifications += 1

    @property
    def output(self):
        return b"".join(self.out)


def test_layout_matches_console_h():
    assert (IN_CONS, IN_PROD, OUT_CONS, OUT_PROD) == (3072, 3076, 3080, 3084)
    assert (IN_SIZE, OUT_OFFSET, OUT_SIZE) == (1024, 1024, 2048)


def test_output_drained_and_notified():
    host = Host()
    host.page[CONNECTION] = 1  # disconnected, as the page may start out
    host.console = PvConsole(host.page, host._notify, host.out.append)
    assert host.page[CONNECTION] == 0
    host.guest.write(b"[    0.000000] Linux version\n")
    host.console.process()
    assert host.output == b"[    0.000000] Linux version\n"
    assert host.guest.u32(OUT_CONS) == host.guest.u32(OUT_PROD)
    assert host.notifications == 1
    host.console.process()  # nothing new: no output, no notification
    assert host.notifications == 1 and len(host.out) == 1


def test_output_waiting_names_the_indices_until_taken():
    host = Host(start_index=MASK - 1)
    assert host.console.output_waiting() is None
    host.guest.write(b"abc")
    assert host.console.output_waiting() == (MASK - 1, (MASK - 1 + 3) & MASK)
    host.console.process()
    assert host.console.output_waiting() is None


@pytest.mark.parametrize("start", [0, 1000, MASK - 5, MASK - 2047])
def test_output_wraps_indices_and_ring(start):
    host = Host(start)
    sent = b""
    for chunk in (b"a" * 700, bytes(range(256)) * 6, b"tail"):
        while chunk:
            taken = host.guest.write(chunk)
            sent += chunk[:taken]
            chunk = chunk[taken:]
            host.console.process()
    assert host.output == sent
    assert host.guest.u32(OUT_CONS) == (start + len(sent)) & MASK


def test_full_output_ring():
    host = Host(MASK - 100)
    data = bytes(i % 251 for i in range(OUT_SIZE))
    assert host.guest.write(data + b"more") == OUT_SIZE
    host.console.process()
    assert host.output == data


def test_input_with_back_pressure():
    host = Host(MASK - 10)
    assert host.console.receive(b"x" * 1000) == 1000
    assert host.console.receive(b"y" * 100) == 24  # the ring is full at 1024
    assert host.console.receive(b"z") == 0
    assert host.notifications == 2  # nothing taken, nobody woken
    assert host.guest.read() == b"x" * 1000 + b"y" * 24
    assert host.console.receive(b"ls\n") == 3
    assert host.guest.read() == b"ls\n"
    assert host.guest.u32(IN_PROD) == (MASK - 10 + 1027) & MASK


def test_broken_output_ring_is_logged_once_and_ignored(caplog):
    host = Host()
    host.guest.set_u32(OUT_PROD, OUT_SIZE + 1)
    with caplog.at_level(logging.WARNING):
        host.console.process()
        host.console.process()
    assert host.out == [] and host.notifications == 0
    assert host.guest.u32(OUT_CONS) == 0
    assert len([r for r in caplog.records if "output ring broken" in r.getMessage()]) == 1
    # The guest puts its ring right (e.g. a new kernel): output flows again.
    host.guest.set_u32(OUT_PROD, 0)
    host.guest.write(b"back")
    host.console.process()
    assert host.output == b"back"


def test_broken_input_ring():
    host = Host()
    host.guest.set_u32(IN_CONS, 5)  # consumer ahead of producer
    assert host.console.receive(b"abc") == 0
    assert host.guest.u32(IN_PROD) == 0 and host.notifications == 0


def test_rejects_unusable_pages():
    with pytest.raises(ValueError):
        PvConsole(memoryview(bytes(4096)), lambda: None, lambda data: None)
    with pytest.raises(ValueError):
        PvConsole(memoryview(bytearray(3000)), lambda: None, lambda data: None)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, MASK), min_size=4, max_size=4), st.binary(max_size=1500))
def test_hostile_indices_never_raise_or_overrun(indices, data):
    host = Host()
    for offset, value in zip((IN_CONS, IN_PROD, OUT_CONS, OUT_PROD), indices):
        host.guest.set_u32(offset, value)
    in_cons, in_prod, out_cons, out_prod = indices
    host.console.process()
    pending = (out_prod - out_cons) & MASK
    assert len(host.output) == (pending if pending <= OUT_SIZE else 0)
    taken = host.console.receive(data)
    queued = (in_prod - in_cons) & MASK
    assert taken == (min(len(data), IN_SIZE - queued) if queued <= IN_SIZE else 0)
    assert host.guest.u32(IN_PROD) == (in_prod + taken) & MASK
    assert bytes(host.page[(in_prod + i) % IN_SIZE] for i in range(taken)) == data[:taken]
    assert len(host.page) == 4096


def test_snapshot_shows_the_indices_and_what_was_taken():
    host = Host(start_index=MASK - 2)  # the indices wrap as the bytes are taken
    host.guest.write(b"[    0.000000] Command line: con")
    host.console.process()
    host.guest.write(b"sole=hvc0")
    snapshot = host.console.snapshot()
    assert snapshot == {"out_cons": (MASK - 2 + 32) & MASK, "out_prod": (MASK - 2 + 41) & MASK,
                        "in_cons": MASK - 2, "in_prod": MASK - 2, "connection": 0, "taken": 32}
