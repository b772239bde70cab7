"""The bridge's figures: counters while it runs, and frozen snapshots of them.

Pure code. The outbound and inbound halves count into one
:class:`BridgeCounters`; :meth:`BridgeCounters.snapshot` gives a
:class:`BridgeStatistics` for the metrics endpoint, the command line and the
tests.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

__all__ = ["LATENCY_SAMPLES", "BridgeCounters", "BridgeStatistics"]

#: How many of the latest forward latencies the bridge keeps (for p50 / p99).
LATENCY_SAMPLES = 100_000


@dataclass(frozen=True, slots=True)
class BridgeStatistics:
    """A snapshot of the bridge's figures (counts since the bridge started,
    but ``spool_dropped``, which the spool keeps across restarts)."""

    #: Events the bridge received from the local bus.
    received: int
    #: Events the broker dropped for the bridge before it could read them
    #: (gaps in its subscriptions' sequence numbers; 0 with lossless delivery).
    missed: int
    #: Events written to the spool.
    spooled: int
    #: Events that could not be forwarded at all (no event id), not spooled.
    unforwardable: int
    #: Events published to JetStream for the first time in this run.
    forwarded: int
    #: Events JetStream acknowledged.
    acknowledged: int
    #: Acknowledgements that said "duplicate": a re-sent copy JetStream dropped.
    duplicates: int
    #: Events published again (not acknowledged in time, or the link dropped).
    resent: int
    #: Events the spool dropped, oldest first, to stay within its bounds.
    spool_dropped: int
    #: Events in the spool now: not yet acknowledged by JetStream.
    spool_depth: int
    spool_bytes: int
    #: Events sent and not yet acknowledged.
    in_flight: int
    #: Whether the bridge is connected to NATS.
    link_up: bool
    #: Times the link to NATS went down.
    disconnects: int
    #: Control messages received from the fleet.
    inbound_received: int
    #: Control messages published on the local bus.
    inbound_published: int
    #: Control messages refused (by the bridge's checks or by the broker).
    inbound_refused: int
    #: Fleet requests answered by a local responder.
    requests_answered: int
    #: Fleet requests that failed (no responder, timeout, refused by the broker).
    requests_failed: int


@dataclass(slots=True)
class BridgeCounters:
    """The running counts; the bridge's halves add to them."""

    received: int = 0
    spooled: int = 0
    unforwardable: int = 0
    forwarded: int = 0
    acknowledged: int = 0
    duplicates: int = 0
    resent: int = 0
    disconnects: int = 0
    inbound_received: int = 0
    inbound_published: int = 0
    inbound_refused: int = 0
    requests_answered: int = 0
    requests_failed: int = 0
    #: The latest forward latencies (local receive to JetStream ack), in seconds.
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))

    def snapshot(
        self,
        *,
        missed: int,
        spool_dropped: int,
        spool_depth: int,
        spool_bytes: int,
        in_flight: int,
        link_up: bool,
    ) -> BridgeStatistics:
        """A frozen copy, with the figures the counters do not hold."""
        return BridgeStatistics(
            received=self.received,
            missed=missed,
            spooled=self.spooled,
            unforwardable=self.unforwardable,
            forwarded=self.forwarded,
            acknowledged=self.acknowledged,
            duplicates=self.duplicates,
            resent=self.resent,
            spool_dropped=spool_dropped,
            spool_depth=spool_depth,
            spool_bytes=spool_bytes,
            in_flight=in_flight,
            link_up=link_up,
            disconnects=self.disconnects,
            inbound_received=self.inbound_received,
            inbound_published=self.inbound_published,
            inbound_refused=self.inbound_refused,
            requests_answered=self.requests_answered,
            requests_failed=self.requests_failed,
        )
