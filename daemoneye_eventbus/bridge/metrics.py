"""Prometheus metrics of a bridge, read at scrape time.

:class:`BridgeCollector` is a ``prometheus_client`` collector: on each scrape
it reads :meth:`Bridge.statistics <daemoneye_eventbus.bridge.runner.Bridge.statistics>`
(the counts the bridge keeps anyway) and its latest forward latencies, so
metrics cost nothing per event. :func:`bridge_registry` returns a registry
holding one, with a ``ProcessCollector`` namespaced ``daemoneye_bridge`` (so
that it never clashes with an embedding agent's own ``process_*`` series);
an agent mounts it on its endpoint (``make_asgi_app(registry)``,
``generate_latest(registry)``), and ``daemoneye-eventbus bridge
--metrics-listen`` serves it with
:func:`~daemoneye_eventbus.metrics.serve_metrics`.

Every family is named ``daemoneye_bridge_…`` and has no labels but the
``quantile`` of ``daemoneye_bridge_forward_latency_seconds`` (0.5 and 0.99).

A scrape from another thread (an HTTP server's) reads the figures on the
bridge's event loop (``call_soon_threadsafe``), as the broker's collector
does; on the loop's own thread, or before the bridge has started, it reads
them at once. :meth:`~daemoneye_eventbus.bridge.runner.Bridge.statistics`
alone would be safe from another thread: it reads plain ints (the counters,
the forwarder's queue counts, the spool's cached depth and bytes -- never
SQLite) and ``len()`` of the sender's in-flight dictionary, each read atomic.
But the latencies are a deque the loop appends to, and copying it while it
grows can raise ("deque mutated during iteration") where threads run in
parallel (free-threaded builds); and on the loop the counts are those of
one moment between two of its steps. Only the copy is made on the loop: the
samples are sorted for their quantiles in the scraping thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, Protocol

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from daemoneye_eventbus.bridge.stats import LATENCY_SAMPLES, BridgeCounters, BridgeStatistics
from daemoneye_eventbus.statistics import nearest_rank

__all__ = [
    "COUNTERS",
    "GAUGES",
    "NAMESPACE",
    "QUANTILES",
    "BridgeCollector",
    "BridgeSource",
    "bridge_registry",
]

#: The prefix of every metric name.
NAMESPACE: Final = "daemoneye_bridge"
#: The quantiles of the forward latency reported.
QUANTILES: Final = (0.5, 0.99)
#: Seconds a scrape from another thread waits for the bridge's event loop.
READ_TIMEOUT: Final = 5.0

#: The counters (``daemoneye_bridge_{name}_total``): the :class:`BridgeStatistics`
#: field of each, and what it counts.
COUNTERS: Final[tuple[tuple[str, str], ...]] = (
    ("received", "Events the bridge received from the local bus."),
    (
        "missed",
        "Events the broker dropped for the bridge before it read them (0 with lossless delivery).",
    ),
    ("spooled", "Events written to the spool."),
    (
        "unforwardable",
        "Events that could not be forwarded at all (no event id, or the spool refused them): lost.",
    ),
    ("forwarded", "Events published to JetStream for the first time."),
    ("acknowledged", "Events JetStream acknowledged (stored, or a duplicate it already had)."),
    ("duplicates", "Acknowledgements of a re-sent copy JetStream had already stored."),
    (
        "resent",
        "Events published to JetStream again (not acknowledged in time, or the link dropped).",
    ),
    (
        "spool_dropped",
        "Events the full spool dropped, oldest first, to make room (kept across restarts).",
    ),
    ("disconnects", "Times the link to NATS went down."),
    ("inbound_received", "Control messages received from the fleet."),
    ("inbound_published", "Control messages from the fleet published on the local bus."),
    (
        "inbound_refused",
        "Control messages from the fleet refused, by the bridge's checks or by the broker.",
    ),
    ("requests_answered", "Fleet requests a local responder answered."),
    (
        "requests_failed",
        "Fleet requests that failed: no responder, timed out, or refused by the broker.",
    ),
)

#: The gauges of the spool and the link: the :class:`BridgeStatistics` field of
#: each, and what it measures.
GAUGES: Final[tuple[tuple[str, str], ...]] = (
    ("spool_depth", "Events in the spool: received, not yet acknowledged by JetStream."),
    ("spool_bytes", "Bytes of the events in the spool (subject, headers and payload)."),
    ("in_flight", "Events published to JetStream and not yet acknowledged."),
    ("link_up", "1 while the bridge is connected to NATS, 0 while not."),
)


class BridgeSource(Protocol):
    """What the collector reads of a bridge (:class:`~daemoneye_eventbus.bridge.runner.Bridge`)."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop the bridge runs on (None before it starts)."""
        ...

    def statistics(self) -> BridgeStatistics: ...

    def latencies(self) -> list[float]:
        """The latest forward latencies, in seconds."""
        ...


@dataclass(frozen=True, slots=True)
class _Reading:
    """What one scrape reads of the bridge."""

    statistics: BridgeStatistics
    latencies: list[float]


_NOTHING: Final = _Reading(
    BridgeCounters().snapshot(
        missed=0, spool_dropped=0, spool_depth=0, spool_bytes=0, in_flight=0, link_up=False
    ),
    [],
)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class BridgeCollector(Collector):
    """The bridge's figures as Prometheus metric families, read at scrape time."""

    def __init__(self, bridge: BridgeSource, *, timeout: float = READ_TIMEOUT) -> None:
        self.bridge = bridge
        self.timeout = timeout

    def _reading(self) -> _Reading:
        return _Reading(self.bridge.statistics(), self.bridge.latencies())

    def read(self) -> tuple[BridgeStatistics, list[float]]:
        """The bridge's statistics and latencies, read on its loop whatever thread asks.

        Raises ``TimeoutError`` when the loop does not get to it within ``timeout``.
        """
        loop = self.bridge.loop
        if loop is None or not loop.is_running() or _running_loop() is loop:
            reading = self._reading()
            return reading.statistics, reading.latencies
        future: concurrent.futures.Future[_Reading] = concurrent.futures.Future()

        def read_on_loop() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(self._reading())
            except Exception as exc:
                future.set_exception(exc)

        loop.call_soon_threadsafe(read_on_loop)
        try:
            reading = future.result(self.timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(
                f"the bridge's event loop did not answer a scrape within {self.timeout} s"
            ) from None
        return reading.statistics, reading.latencies

    def collect(self) -> Iterator[Metric]:
        return _families(*self.read())

    def describe(self) -> Iterator[Metric]:
        """The metric families without their figures (names, for the registry)."""
        return _families(_NOTHING.statistics, _NOTHING.latencies)


def _name(name: str) -> str:
    return f"{NAMESPACE}_{name}"


def _families(stats: BridgeStatistics, latencies: list[float]) -> Iterator[Metric]:
    for field, doc in COUNTERS:
        yield CounterMetricFamily(_name(field), doc, value=getattr(stats, field))
    for field, doc in GAUGES:
        yield GaugeMetricFamily(_name(field), doc, value=float(getattr(stats, field)))
    latency = GaugeMetricFamily(
        _name("forward_latency_seconds"),
        "Seconds from the broker accepting an event to JetStream acknowledging it, over "
        f"the latest acknowledged events (at most {LATENCY_SAMPLES:,}), by quantile; NaN "
        "before the first.",
        labels=["quantile"],
    )
    ordered = sorted(latencies)
    for quantile in QUANTILES:
        latency.add_metric([str(quantile)], nearest_rank(ordered, quantile))
    yield latency


def bridge_registry(bridge: BridgeSource) -> CollectorRegistry:
    """A registry of ``bridge``'s figures and of this process (``daemoneye_bridge_process_*``)."""
    registry = CollectorRegistry()
    registry.register(BridgeCollector(bridge))
    ProcessCollector(namespace=NAMESPACE, registry=registry)
    return registry
