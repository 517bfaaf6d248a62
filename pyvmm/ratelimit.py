"""Log lines a guest cannot flood.

A guest decides how often some lines are logged: a dropped watch event, a
broken or reconnected ring, a failed xenbus handshake, its own log port.
Such sites log through a RateLimitedLog. Each key (by default the format
string: one call site) has a token bucket that lets `burst` lines through
at once and `per_second` lines a second after that; the others are only
counted, and the next line let through says how many were suppressed.
Keys may come from the guest, so there are at most `max_keys` buckets;
further keys share one.

The rate is the domain's (`LogRate`, from `pyvmm.limits.Limits`: settings
log-burst and log-lines-per-second): each object that logs for the guest
makes its own RateLimitedLog with `rate.limited(logger)`.

Thread-safe: vCPU threads, ring workers and the event thread may share one.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable

BURST = 10  # lines let through at once, per key
PER_SECOND = 1.0  # lines per second after that, per key
MAX_KEYS = 256
_OTHER = object()  # the shared bucket of keys beyond MAX_KEYS


@dataclass(frozen=True)
class LogRate:
    """How many lines a key may log: `burst` at once, then `per_second`."""

    burst: int = BURST
    per_second: float = PER_SECOND
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)  # tests: one that stands still

    def limited(self, logger: logging.Logger) -> "RateLimitedLog":
        return RateLimitedLog(logger, burst=self.burst, per_second=self.per_second, clock=self.clock)


DEFAULT_LOG_RATE = LogRate()


class _Bucket:
    __slots__ = ("tokens", "stamp", "suppressed")

    def __init__(self, tokens: float, stamp: float):
        self.tokens = tokens
        self.stamp = stamp
        self.suppressed = 0


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, *, burst: int = BURST, per_second: float = PER_SECOND,
                 max_keys: int = MAX_KEYS, clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.burst = burst
        self.per_second = per_second
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[Hashable, _Bucket] = {}

    def log(self, level: int, message: str, *args, key: Hashable = None, exc_info=False) -> bool:
        """Log like logger.log(level, message, *args) unless this key is over
        its rate; True if the line was written."""
        if not self.logger.isEnabledFor(level):
            return False
        suppressed = self._take(message if key is None else key)
        if suppressed is None:
            return False
        if suppressed:
            message += " [%d similar message(s) suppressed]"
            args = (*args, suppressed)
        self.logger.log(level, message, *args, exc_info=exc_info)
        return True

    def debug(self, message: str, *args, key: Hashable = None) -> bool:
        return self.log(logging.DEBUG, message, *args, key=key)

    def info(self, message: str, *args, key: Hashable = None) -> bool:
        return self.log(logging.INFO, message, *args, key=key)

    def warning(self, message: str, *args, key: Hashable = None) -> bool:
        return self.log(logging.WARNING, message, *args, key=key)

    def error(self, message: str, *args, key: Hashable = None) -> bool:
        return self.log(logging.ERROR, message, *args, key=key)

    def _take(self, key: Hashable) -> int | None:
        """A token for `key`: the count suppressed before it, or None if none is left."""
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                if len(self._buckets) >= self.max_keys:
                    key = _OTHER
                    bucket = self._buckets.get(key)
                if bucket is None:
                    bucket = self._buckets[key] = _Bucket(self.burst, now)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.per_second)
            bucket.stamp = now
            if bucket.tokens < 1:
                bucket.suppressed += 1
                return None
            bucket.tokens -= 1
            suppressed, bucket.suppressed = bucket.suppressed, 0
            return suppressed
