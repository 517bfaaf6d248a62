import re
import threading
import time

import pytest

from pyvmm.config import ConfigError, SerialSpec, parse_size
from pyvmm.core.console import ConsoleOutput, EscapeFilter, ExpectWatcher
from pyvmm.core.eventloop import EventLoop


@pytest.mark.parametrize("text,value", [("512M", 512 << 20), ("2G", 2 << 30), ("1024", 1024 << 20), ("64MiB", 64 << 20), ("4096k", 4 << 20)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "lots", "-1M", "1.5G", "12Q"])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError):
        parse_size(text)


def test_serial_spec():
    assert SerialSpec.parse("stdio").kind == "stdio"
    assert str(SerialSpec.parse("file:/tmp/x").path) == "/tmp/x"
    for bad in ("file:", "tcp:1234", ""):
        with pytest.raises(ConfigError):
            SerialSpec.parse(bad)


def test_escape_filter():
    quits = []
    f = EscapeFilter(lambda: quits.append(1))
    assert f.filter(b"ab\x01\x01c") == b"ab\x01c"
    assert f.filter(b"x\x01") == b"x"  # escape pending across reads
    assert f.filter(b"q") == b""  # unknown key after Ctrl-A is swallowed
    assert quits == []
    assert f.filter(b"zz\x01xignored") == b"zz"
    assert quits == [1]


def test_expect_watcher_matches_across_writes_once():
    hits = []
    out = ConsoleOutput(None, [ExpectWatcher(re.compile(rb"login: \d+"), lambda: hits.append(1))])
    out.write(b"boot... log")
    out.write(b"in: 4")
    out.write(b"2 login: 7")
    assert hits == [1]


def test_event_loop_timers_and_cross_thread_calls():
    loop, seen = EventLoop(), []
    start = time.monotonic()  # before the timers: their delays count from call_later
    loop.call_later(0.05, lambda: seen.append("timer"))
    loop.call_later(0.10, loop.stop)
    threading.Thread(target=lambda: loop.call_soon_threadsafe(lambda: seen.append("call"))).start()
    loop.run()
    assert seen == ["call", "timer"]
    assert time.monotonic() - start >= 0.09
    loop.close()


def test_console_output_counts_what_reached_its_stream():
    import io

    stream = io.BytesIO()
    out = ConsoleOutput(stream)
    assert (out.written, out.last_write) == (0, None)
    out.write(b"[    0.000000] Command line: con")
    out.write(b"sole=hvc0\n")
    assert out.written == len(stream.getvalue()) == 42 and out.last_write is not None
    nowhere = ConsoleOutput(None)
    nowhere.write(b"dropped")
    assert nowhere.written == 0
