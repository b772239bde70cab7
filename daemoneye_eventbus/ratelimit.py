"""Rate limits per publisher: token buckets for events and bytes (pure).

The policy file gives a component (or anonymous peers) a :class:`RateLimit`:
events per second and bytes per second, each with a burst. The broker keeps a
:class:`Throttle` per connection. What a peer sent is never refused or dropped
for its rate: it is handled, and the buckets go into debt; the broker then
stops reading from that peer until the debt is paid back, so that its
average stays within the limit while a burst still flows at full speed
(docs/security.md, "Rate limits").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from daemoneye_eventbus.errors import PolicyError

__all__ = ["RateLimit", "Throttle", "rate_limit_from_mapping"]


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Events and bytes per second a publisher may send on average (0: no limit),
    and the bursts it may send at full speed."""

    events_per_second: float = 0.0
    bytes_per_second: float = 0.0
    #: Events sent at once before the limit applies (default: one second's worth).
    burst_events: float = 0.0
    #: Bytes sent at once before the limit applies (default: one second's worth).
    burst_bytes: float = 0.0

    @property
    def limited(self) -> bool:
        return self.events_per_second > 0 or self.bytes_per_second > 0


class _Bucket:
    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst or rate  # one second's worth by default
        self.tokens = self.burst
        self.stamp = now

    def spend(self, amount: float, now: float) -> float:
        """Spend ``amount``; seconds until the bucket is out of debt (0 if it is not)."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= amount
        return -self.tokens / self.rate if self.tokens < 0 else 0.0


class Throttle:
    """One connection's buckets: how long to stop reading after it sent this much."""

    __slots__ = ("_buckets", "throttled")

    def __init__(self, limit: RateLimit, now: float) -> None:
        self._buckets: list[tuple[_Bucket, bool]] = []
        if limit.events_per_second > 0:
            bucket = _Bucket(limit.events_per_second, limit.burst_events, now)
            self._buckets.append((bucket, True))
        if limit.bytes_per_second > 0:
            bucket = _Bucket(limit.bytes_per_second, limit.burst_bytes, now)
            self._buckets.append((bucket, False))
        #: Seconds this connection was paused for its rate, in all.
        self.throttled = 0.0

    def spend(self, events: int, nbytes: int, now: float) -> float:
        """The peer sent ``events`` events in ``nbytes`` bytes: seconds to pause reading."""
        wait = 0.0
        for bucket, counts_events in self._buckets:
            wait = max(wait, bucket.spend(events if counts_events else nbytes, now))
        self.throttled += wait
        return wait


_KEYS = {"events_per_second", "bytes_per_second", "burst_events", "burst_bytes"}


def rate_limit_from_mapping(raw: Any, where: str) -> RateLimit:
    """A ``rate`` table of the policy file; raises :class:`PolicyError` naming what is wrong."""
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}: rate must be a table")
    unknown = set(raw) - _KEYS
    if unknown:
        raise PolicyError(f"{where}: unknown key(s) {sorted(unknown)} in rate")
    values: dict[str, float] = {}
    for key in _KEYS:
        value = raw.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise PolicyError(f"{where}: rate.{key} must be a non-negative number")
        values[key] = float(value)
    return RateLimit(**values)
