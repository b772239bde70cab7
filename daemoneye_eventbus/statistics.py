"""Frozen snapshots of the broker's figures, and what the broker tallies itself (pure).

:meth:`Broker.statistics <daemoneye_eventbus.broker.Broker.statistics>` returns a
:class:`BrokerStatistics`; :meth:`BrokerStatistics.to_proto` turns it into the
``StatsResponse`` a client asks for, within a frame limit.
:meth:`Router.topic_counts <daemoneye_eventbus.router.Router.topic_counts>`
returns a :class:`TopicFigures` per topic label, and the broker keeps a
:class:`BrokerTally` of the refusals it makes itself and of its event loop's
lag: both are read by :mod:`daemoneye_eventbus.metrics` at scrape time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from daemoneye.eventbus.v1 import frames_pb2
from daemoneye_eventbus.access import PeerCredentials
from daemoneye_eventbus.frames import event_budget

__all__ = [
    "nearest_rank",
    "BrokerStatistics",
    "BrokerTally",
    "ConnectionStatistics",
    "SubscriptionStatistics",
    "TopicFigures",
]


@dataclass(frozen=True, slots=True)
class TopicFigures:
    """A snapshot of the events on one topic label since the router was made.

    The label is the declared topic's name, a template's pattern for a topic
    built from it, or ``"undeclared"``: bounded by the schema.
    """

    published: int
    delivered: int
    dropped: int
    #: Encoded size of the accepted publishes (what is forwarded to each receiver).
    published_bytes: int


class BrokerTally:
    """What the broker counts beside its router: the refusals it makes itself
    (connections, handshakes) by wire error code, and its event loop's lag.

    The lag is how late the housekeeping's periodic sleep returns: the last
    one, and the largest since :meth:`take_lag_max` was last called (a scrape).
    """

    __slots__ = ("handshake_failures", "lag", "lag_max", "refusals")

    def __init__(self) -> None:
        #: Refusals by wire ``ErrorCode`` number.
        self.refusals: dict[int, int] = {}
        #: Handshakes that did not complete: refused claims, versions, timeouts.
        self.handshake_failures = 0
        #: Seconds: how late the last housekeeping tick woke up.
        self.lag = 0.0
        #: Seconds: the latest tick since the last :meth:`take_lag_max`.
        self.lag_max = 0.0

    @property
    def refused(self) -> int:
        """Every refusal counted here."""
        return sum(self.refusals.values())

    def refuse(self, code: int, *, handshake: bool = False) -> None:
        """Count a refusal with its wire error code; ``handshake``: of a handshake."""
        self.refusals[code] = self.refusals.get(code, 0) + 1
        if handshake:
            self.handshake_failures += 1

    def record_lag(self, seconds: float) -> None:
        """Note how late a periodic tick woke up (negative counts as 0)."""
        lag = max(0.0, seconds)
        self.lag = lag
        if lag > self.lag_max:
            self.lag_max = lag

    def take_lag_max(self) -> float:
        """The largest lag since the previous call; starts the next period at the last lag."""
        most = self.lag_max
        self.lag_max = self.lag
        return most


@dataclass(frozen=True, slots=True)
class SubscriptionStatistics:
    """A snapshot of one subscription's figures."""

    session_id: str
    subscription_id: int
    filter: str
    delivered: int
    dropped: int
    #: Lossless delivery (the subscription asked for it).
    lossless: bool = False
    #: Events held for it in the broker while its publishers wait for credit.
    held: int = 0


@dataclass(frozen=True, slots=True)
class ConnectionStatistics:
    """A snapshot of one connection's figures."""

    session_id: str
    client_name: str
    component: str
    peer: PeerCredentials | None
    queue_messages: int
    queue_bytes: int
    published: int
    #: Events it published whose payload did not parse (refused).
    invalid_payloads: int = 0
    #: Seconds the broker stopped reading from it for its rate limit.
    throttled_seconds: float = 0.0
    #: Its requests waiting for a reply.
    pending_requests: int = 0


@dataclass(frozen=True, slots=True)
class BrokerStatistics:
    """A snapshot of the broker's figures."""

    connections: int
    connections_total: int
    published: int
    delivered: int
    dropped: int
    refused: int
    connection_stats: tuple[ConnectionStatistics, ...]
    subscription_stats: tuple[SubscriptionStatistics, ...]
    #: Published events refused because a payload did not parse.
    invalid_payloads: int = 0
    #: Seconds reading was paused for rate limits, over every connection so far.
    throttled_seconds: float = 0.0
    #: Events by topic label (declared names, template patterns, "undeclared").
    topic_stats: tuple[tuple[str, TopicFigures], ...] = ()
    #: Retained events the broker holds now, and their encoded bytes (the memory
    #: they are charged is that plus RETAINED_COST each).
    retained_events: int = 0
    retained_bytes: int = 0
    #: Requests routed to a responder since the broker started.
    requests: int = 0
    #: Requests answered at once with ERROR_CODE_NO_RESPONDERS.
    no_responders: int = 0
    #: Requests whose deadline passed without a reply.
    request_timeouts: int = 0

    def to_proto(
        self, request_id: int = 0, max_bytes: int | None = None
    ) -> frames_pb2.StatsResponse:
        """The snapshot as a ``StatsResponse`` frame body of at most ``max_bytes``.

        When the per-connection and per-subscription lists do not fit, the
        longest is shortened until they do and ``truncated`` is set.
        """
        out = self._to_proto(request_id)
        if max_bytes is None:
            return out
        budget = event_budget(max_bytes)  # room for the Frame envelope
        while out.ByteSize() > budget:
            out.truncated = True
            conns, subs = out.connection_stats, out.subscription_stats
            if not conns and not subs:
                break
            if len(subs) >= len(conns):
                del subs[len(subs) // 2 :]
            else:
                del conns[len(conns) // 2 :]
        return out

    def _to_proto(self, request_id: int) -> frames_pb2.StatsResponse:
        return frames_pb2.StatsResponse(
            request_id=request_id,
            connections=self.connections,
            connections_total=self.connections_total,
            published=self.published,
            delivered=self.delivered,
            dropped=self.dropped,
            refused=self.refused,
            invalid_payloads=self.invalid_payloads,
            throttled_seconds=self.throttled_seconds,
            retained_events=self.retained_events,
            retained_bytes=self.retained_bytes,
            requests=self.requests,
            no_responders=self.no_responders,
            request_timeouts=self.request_timeouts,
            topic_stats=[
                frames_pb2.TopicStats(
                    topic=label,
                    published=t.published,
                    delivered=t.delivered,
                    dropped=t.dropped,
                    published_bytes=t.published_bytes,
                )
                for label, t in self.topic_stats
            ],
            connection_stats=[
                frames_pb2.ConnectionStats(
                    session_id=c.session_id,
                    client_name=c.client_name,
                    component=c.component,
                    peer_pid=c.peer.pid if c.peer else 0,
                    peer_uid=c.peer.uid if c.peer and c.peer.uid >= 0 else 0,
                    peer_sid=(c.peer.sid or "") if c.peer else "",
                    queue_messages=c.queue_messages,
                    queue_bytes=c.queue_bytes,
                    published=c.published,
                    invalid_payloads=c.invalid_payloads,
                    throttled_seconds=c.throttled_seconds,
                    pending_requests=c.pending_requests,
                )
                for c in self.connection_stats
            ],
            subscription_stats=[
                frames_pb2.SubscriptionStats(
                    session_id=s.session_id,
                    subscription_id=s.subscription_id,
                    filter=s.filter,
                    delivered=s.delivered,
                    dropped=s.dropped,
                    lossless=s.lossless,
                    held=s.held,
                )
                for s in self.subscription_stats
            ],
        )


def nearest_rank(ordered: Sequence[float], share: float) -> float:
    """The ``share`` quantile (0..1) of the sorted ``ordered`` by nearest rank;
    NaN if there is none."""
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]
