"""Per-domain limits (pyvmm.limits): parsing from the command line and xl.cfg,
and each limit, set small through the config, bounding what the guest gets,
with the guest's error and a bounded number of host log lines. Bounds only,
never times."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from click.testing import CliRunner

from frontends.xenstore import XenbusWire
from pyvmm import cli
from pyvmm.config import ConfigError, VmConfig, parse_limit_option
from pyvmm.xen.hv.xen_platform import XenPlatformDevice
from pyvmm.limits import DEFAULT_LIMITS, SPECS, Limits, LimitError, help_text, parse_assignment
from pyvmm.core.memory import GuestMemory
from pyvmm.core.ratelimit import LogRate
from pyvmm.xen.errors import EINVAL, ENOSPC, XenError
from pyvmm.xen.hv.evtchn import EventChannels
from pyvmm.xen.hv.gnttab import GrantTable
from pyvmm.xen.xenstore import Access, Op, Permission, Quotas, XenStore
from pyvmm.xlcfg import XlConfigError, xl_config_from_text

STILL = LogRate(clock=lambda: 0.0)  # full buckets and a clock that stands still


def limits(**settings) -> Limits:
    """Limits as `--limit NAME=VALUE` would set them."""
    return VmConfig.limits_from(dict(parse_limit_option(f"{name.replace('_', '-')}={value}")
                                     for name, value in settings.items()))


def still(limits: Limits) -> LogRate:
    return LogRate(limits.log_burst, limits.log_lines_per_second, clock=lambda: 0.0)


# --- parsing ----------------------------------------------------------------------------


def test_defaults_are_what_the_parts_had():
    assert Quotas.from_limits(DEFAULT_LIMITS) == Quotas()
    assert DEFAULT_LIMITS.max_event_channels == 4095 and DEFAULT_LIMITS.max_grant_frames == 64
    assert DEFAULT_LIMITS.log_rate == LogRate()
    assert set(DEFAULT_LIMITS.describe()) == set(SPECS)


@pytest.mark.parametrize("text, name, value", [
    ("xenstore-nodes=200", "xenstore-nodes", 200),
    ("xenstore_nodes = 200", "xenstore-nodes", 200),  # xl.cfg's spelling too
    ("xenstore-memory=4M", "xenstore-memory", 4 << 20),
    ("xenstore-node-size=4K", "xenstore-node-size", 4096),
    ("xenstore-event-backlog=128KiB", "xenstore-event-backlog", 128 << 10),
    ("xenstore-transaction-seconds=2.5", "xenstore-transaction-seconds", 2.5),
    ("log-lines-per-second=0.5", "log-lines-per-second", 0.5),
    ("max-event-channels=1023", "max-event-channels", 1023),
])
def test_limit_assignments(text, name, value):
    assert parse_assignment(text) == (name, value)


@pytest.mark.parametrize("text, message", [
    ("nodes=5", "--limit 'nodes=5': unknown limit 'nodes' (pyvmm run --limit help lists them)"),
    ("xenstore-nodes", "--limit 'xenstore-nodes': expected NAME=VALUE"),
    ("=5", "--limit '=5': expected NAME=VALUE"),
    ("xenstore-nodes=lots", "--limit 'xenstore-nodes=lots': expected a whole number"),
    ("xenstore-nodes=-1", "--limit 'xenstore-nodes=-1': expected a whole number"),
    ("xenstore-nodes=0", "--limit 'xenstore-nodes=0': must be between 1 and 1073741824 nodes"),
    ("max-event-channels=131072", "--limit 'max-event-channels=131072': must be between 1 and 131071 ports"),
    ("max-grant-frames=2000", "--limit 'max-grant-frames=2000': must be between 1 and 1024 frames"),
    ("xenstore-memory=1T", "--limit 'xenstore-memory=1T': expected a number of bytes"),
    ("log-lines-per-second=0", "--limit 'log-lines-per-second=0': must be between 0.001 and 1e+06 lines/s"),
])
def test_bad_limit_options_name_what_was_typed(text, message):
    with pytest.raises(ConfigError) as raised:
        parse_limit_option(text)
    assert str(raised.value).startswith(message)


def test_limits_check_themselves():
    with pytest.raises(LimitError, match="xenstore-watches: must be between"):
        Limits(xenstore_watches=0)


def test_help_lists_every_limit_with_its_default():
    text = "\n".join(help_text())
    for spec in SPECS.values():
        assert f"  {spec.name} " in text
    assert "1000 nodes" in text and "cxenstored: -Q nodes = 1000" in text


XL = 'name = "guest"\ntype = "hvm"\n'


def test_xl_cfg_limit_keys():
    config = xl_config_from_text(XL + 'max_event_channels = 1023\nxenstore_memory = "4M"\n'
                                      'xenstore_watches = 0x40\nlog_lines_per_second = "0.2"\n', "vm.cfg")
    assert config.to_run_options()["limits"] == {"max-event-channels": 1023, "xenstore-memory": 4 << 20,
                                                 "xenstore-watches": 64, "log-lines-per-second": 0.2}
    assert "limits" not in xl_config_from_text(XL).to_run_options()


@pytest.mark.parametrize("line, message", [
    ('xenstore_nodes = "many"', 'vm.cfg:3: xenstore_nodes="many": expected a whole number'),
    ("max_grant_frames = 0", "vm.cfg:3: max_grant_frames=0: must be between 1 and 1024 frames"),
    ("xenstore_watches = [1, 2]", "vm.cfg:3: xenstore_watches must be a single value, not a list"),
])
def test_xl_cfg_limit_errors_name_file_and_line(line, message):
    with pytest.raises(XlConfigError) as raised:
        xl_config_from_text(XL + line + "\n", "vm.cfg")
    assert str(raised.value) == message


def run_cli(tmp_path, monkeypatch, *args):
    """`pyvmm run` up to the VM: the VmConfig it would run."""
    import pyvmm.runner

    seen = []
    monkeypatch.setattr(pyvmm.runner, "run_vm", lambda config: seen.append(config) or 0)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"x")
    result = CliRunner().invoke(cli.cli, ["run", "--kernel", str(kernel), *args])
    assert result.exit_code == 0, result.output
    return seen[0]


def test_cli_limits_reach_the_config_and_win_over_the_file(tmp_path, monkeypatch):
    config = run_cli(tmp_path, monkeypatch, "--limit", "xenstore-nodes=50", "--limit", "log-burst=3",
                     "--limit", "xenstore-nodes=60")
    assert config.limits == Limits(xenstore_nodes=60, log_burst=3)
    cfg = tmp_path / "vm.cfg"
    cfg.write_text(XL + "xenstore_nodes = 10\nxenstore_watches = 20\n")
    config = run_cli(tmp_path, monkeypatch, str(cfg), "--limit", "xenstore-watches=30")
    assert config.limits == Limits(xenstore_nodes=10, xenstore_watches=30)
    assert run_cli(tmp_path, monkeypatch).limits == DEFAULT_LIMITS


def test_cli_limit_help_and_one_line_errors(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pyvmm", "run", "--limit", "help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "xenstore-transaction-nodes" in done.stdout, done.stderr
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"x")
    done = subprocess.run([sys.executable, "-m", "pyvmm", "run", "--kernel", str(kernel), "--limit", "watches=5"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr == "pyvmm: error: --limit 'watches=5': unknown limit 'watches' (pyvmm run --limit help " \
                          "lists them)\n"


# --- each limit, set small, bounds the guest ---------------------------------------------


class Guest(XenbusWire):
    """Domain 1 talking the xenstore wire protocol, as over its ring."""

    def __init__(self, limits: Limits, clock=None):
        self.store = XenStore(Quotas.from_limits(limits), log_rate=still(limits), **({"clock": clock} if clock else {}))
        dom0 = self.store.client(0)
        dom0.mkdir("/local/domain/1")
        dom0.set_perms("/local/domain/1", [Permission(1, Access.NONE)])
        super().__init__(self.store.connect(1))


def error(name: str) -> tuple[str, bytes]:
    return ("ERROR", name.encode() + b"\0")


def quota_lines(caplog, limit: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if f"its {limit} limit" in r.getMessage()]


@pytest.fixture
def caplog_warnings(caplog):
    with caplog.at_level(logging.WARNING, logger="pyvmm.xen.xenstore"):
        yield caplog


def test_xenstore_nodes(caplog_warnings):
    guest = Guest(limits(xenstore_nodes=5, log_burst=2))
    answers = [guest.write(f"/local/domain/1/n{i}") for i in range(20)]
    # The guest owns its home directory (as the toolstack makes it) and four more.
    assert answers[:4] == [("WRITE", b"OK\0")] * 4
    assert set(answers[4:]) == {error("ENOSPC")}
    lines = quota_lines(caplog_warnings, "xenstore-nodes")
    assert len(lines) == 2 and "domain 1 is at its xenstore-nodes limit" in lines[0] and "ENOSPC" in lines[0]


def test_xenstore_node_size_and_permissions(caplog_warnings):
    guest = Guest(limits(xenstore_node_size=100, xenstore_node_permissions=2))
    assert guest.write("/local/domain/1/small", b"x" * 80) == ("WRITE", b"OK\0")
    assert guest.write("/local/domain/1/big", b"x" * 100) == error("ENOSPC")
    assert guest.ask(Op.SET_PERMS, b"/local/domain/1/small", b"n1", b"r0") == ("SET_PERMS", b"OK\0")
    assert guest.ask(Op.SET_PERMS, b"/local/domain/1/small", b"n1", b"r0", b"r2") == error("ENOSPC")
    assert quota_lines(caplog_warnings, "xenstore-node-size")
    assert quota_lines(caplog_warnings, "xenstore-node-permissions")


def test_xenstore_watches(caplog_warnings):
    guest = Guest(limits(xenstore_watches=3, log_burst=1))
    answers = [guest.ask(Op.WATCH, b"/local/domain/1/w%d" % i, b"t") for i in range(10)]
    assert answers[:3] == [("WATCH", b"OK\0")] * 3
    assert set(answers[3:]) == {error("E2BIG")}
    assert len(quota_lines(caplog_warnings, "xenstore-watches")) == 1


def test_xenstore_transactions_and_their_nodes(caplog_warnings):
    guest = Guest(limits(xenstore_transactions=2, xenstore_transaction_nodes=4))
    first = guest.ask(Op.TRANSACTION_START, b"")
    assert first[0] == "TRANSACTION_START"
    assert guest.ask(Op.TRANSACTION_START, b"")[0] == "TRANSACTION_START"
    assert guest.ask(Op.TRANSACTION_START, b"") == error("ENOSPC")
    tx = int(first[1].rstrip(b"\0"))
    answers = [guest.write(f"/local/domain/1/t{i}", tx=tx) for i in range(8)]
    assert error("ENOSPC") in answers and answers[0] == ("WRITE", b"OK\0")
    assert quota_lines(caplog_warnings, "xenstore-transactions")
    assert quota_lines(caplog_warnings, "xenstore-transaction-nodes")


def test_xenstore_memory(caplog_warnings):
    guest = Guest(limits(xenstore_memory="64K", xenstore_nodes=100000))
    answers = [guest.write(f"/local/domain/1/m{i}", b"v" * 1000) for i in range(200)]
    assert error("ENOMEM") in answers
    assert guest.store.memory_of(1) <= 64 * 1024 + 8 * 1024  # passed by one node's change at most
    assert quota_lines(caplog_warnings, "xenstore-memory")


def test_xenstore_transaction_seconds(caplog_warnings):
    now = [1000.0]
    guest = Guest(limits(xenstore_transaction_seconds=5), clock=lambda: now[0])
    tx = int(guest.ask(Op.TRANSACTION_START, b"")[1].rstrip(b"\0"))
    now[0] += 4
    assert guest.write("/local/domain/1/a", tx=tx) == ("WRITE", b"OK\0")
    now[0] += 2
    assert guest.write("/local/domain/1/a", tx=tx) == error("EAGAIN")
    assert quota_lines(caplog_warnings, "xenstore-transaction-seconds")


def test_xenstore_event_backlog(caplog_warnings):
    guest = Guest(limits(xenstore_event_backlog="4K", log_burst=2))
    assert guest.ask(Op.WATCH, b"/local/domain/1/data", b"t") == ("WATCH", b"OK\0")
    guest.conn.take_output(1 << 20)
    for i in range(1000):
        guest.conn._queue_watch_event(f"/local/domain/1/data/n{i}", "t")
    queued = len(guest.conn.take_output(1 << 20))
    assert 4096 <= queued < 4096 + 100
    lines = [r for r in caplog_warnings.records if "event backlog full" in r.getMessage()]
    assert len(lines) == 2


def test_max_event_channels():
    config = limits(max_event_channels=10, log_burst=3)
    ev = EventChannels(vcpu_count=1, long_mode=lambda: True, shared_info_address=lambda: None,
                       vcpu_info_address=lambda vcpu: None, upcall=lambda vcpu: None, schedule=lambda f: f(),
                       add_reader=lambda fd, f: None, remove_reader=lambda fd: None,
                       max_port=config.max_event_channels, log_rate=still(config))
    ports = [ev.alloc_unbound(1, 0) for _ in range(10)]
    assert ports == list(range(1, 11))  # port 0 is never allocated; N is the highest
    with_log = []
    logger = logging.getLogger("pyvmm.xen.hv.evtchn")
    handler = logging.Handler()
    handler.emit = with_log.append
    logger.addHandler(handler)
    try:
        for _ in range(50):
            with pytest.raises(XenError) as raised:
                ev.alloc_unbound(1, 0)
            assert raised.value.errno == ENOSPC
    finally:
        logger.removeHandler(handler)
    assert len(with_log) == 3 and "max-event-channels" in with_log[0].getMessage()
    ev.close(5)
    assert ev.alloc_unbound(1, 0) == 5


def test_max_grant_frames(caplog):
    config = limits(max_grant_frames=2, log_burst=1)
    table = GrantTable(GuestMemory([(0, 1 << 20)]), max_frames=config.max_grant_frames, log_rate=still(config))
    assert table.query_size() == (0, 2) and table.nr_entries == 1024
    table.note_frame_mapped(1)
    with caplog.at_level(logging.WARNING, logger="pyvmm.xen.hv.gnttab"):
        for _ in range(20):
            with pytest.raises(XenError) as raised:
                table.note_frame_mapped(2)
            assert raised.value.errno == EINVAL
    assert table.query_size() == (2, 2)
    lines = [r.getMessage() for r in caplog.records if r.name == "pyvmm.xen.hv.gnttab"]
    assert len(lines) == 1 and "max-grant-frames" in lines[0]


def test_log_burst_and_rate(caplog):
    config = limits(log_burst=4, log_lines_per_second=0.001)  # no token comes back within the test
    device = XenPlatformDevice(log_rate=config.log_rate)
    ports = device.fixed_ports()
    with caplog.at_level(logging.INFO, logger="pyvmm.xen.hv.xen_platform"):
        for _ in range(1000):
            ports.write(2, 1, ord("x"))
            ports.write(2, 1, 0x0A)
    assert len([r for r in caplog.records if r.name == "pyvmm.xen.hv.xen_platform"]) == 4
