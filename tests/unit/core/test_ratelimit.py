"""The rate-limited log used where a guest decides how often a line is logged."""

import logging

from pyvmm.core.ratelimit import RateLimitedLog

log = logging.getLogger("pyvmm.test-ratelimit")


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def records(caplog):
    return [record.getMessage() for record in caplog.records if record.name == log.name]


def test_a_flood_is_cut_to_the_burst_and_then_the_rate(caplog):
    clock = Clock()
    limited = RateLimitedLog(log, burst=5, per_second=2, clock=clock)
    with caplog.at_level(logging.INFO, logger=log.name):
        written = sum(limited.warning("event %d dropped", i) for i in range(100_000))
        assert written == 5 and len(records(caplog)) == 5
        clock.now += 1.0  # two more tokens
        for i in range(100_000):
            limited.warning("event %d dropped", i)
    lines = records(caplog)
    assert len(lines) == 7
    assert lines[5] == "event 0 dropped [99995 similar message(s) suppressed]"
    assert lines[6] == "event 1 dropped"


def test_keys_have_their_own_buckets_and_are_bounded(caplog):
    limited = RateLimitedLog(log, burst=1, per_second=0, max_keys=8, clock=Clock())
    with caplog.at_level(logging.INFO, logger=log.name):
        assert limited.info("one") and not limited.info("one")
        assert limited.info("two")
        for i in range(100_000):  # keys the guest picks
            limited.info("path %s", i, key=("path", i))
    assert len(limited._buckets) <= 9
    assert len(records(caplog)) <= 2 + 8


def test_nothing_is_counted_below_the_logger_level(caplog):
    limited = RateLimitedLog(log, burst=1, per_second=0, clock=Clock())
    with caplog.at_level(logging.WARNING, logger=log.name):
        assert not limited.info("quiet")
        assert limited.warning("loud")
    assert records(caplog) == ["loud"]
