"""Prometheus metrics of a broker, read at scrape time, and an HTTP endpoint for them.

:class:`BrokerCollector` is a ``prometheus_client`` collector: on each scrape
it reads the figures the broker and its router keep anyway (counters the hot
path increments, the sessions' queue depths, the housekeeping's event-loop
lag), so metrics cost nothing per event beyond those counters.
:meth:`Broker.metrics_registry <daemoneye_eventbus.broker.Broker.metrics_registry>`
returns a registry holding one, with a ``ProcessCollector`` (namespaced, so it
never clashes with an embedding agent's own ``process_*`` series); an agent
mounts it on its endpoint (``make_asgi_app(registry)``, ``generate_latest(registry)``),
and ``daemoneye-eventbus serve --metrics-listen`` serves it with
:func:`serve_metrics`.

Labels have bounded values, whatever peers do: a topic label is a declared
topic's name, a template's pattern (``control.collector.task.{type}.{id}``) or
``undeclared``; a component label is a component the schema or the policy
names, ``anonymous`` or ``other``; a refusal reason is a wire ``ErrorCode``
name. Never a session id, a pid or a concrete template topic.

A scrape from another thread (an HTTP server's) reads the figures on the
broker's event loop (``call_soon_threadsafe``), so that it never sees a
dictionary the loop is changing; on the loop's own thread it reads them at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import os
import socket
import socketserver
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import (
    CollectorRegistry,
    ProcessCollector,
    make_wsgi_app,
    start_http_server,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from daemoneye.eventbus.v1 import registry as schema
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode
from daemoneye_eventbus.access import Policy
from daemoneye_eventbus.config import BrokerConfig
from daemoneye_eventbus.router import UNDECLARED_LABEL, Router
from daemoneye_eventbus.sessions import Session, SocketSession
from daemoneye_eventbus.statistics import BrokerTally, TopicFigures

if sys.platform != "win32":  # a metrics endpoint on a Unix socket
    from daemoneye_eventbus.transports.unix import bind_unix_socket, remove_socket

__all__ = [
    "ANONYMOUS_LABEL",
    "NAMESPACE",
    "OTHER_LABEL",
    "BrokerCollector",
    "Figures",
    "MetricsServer",
    "MetricsSource",
    "broker_registry",
    "listen_address",
    "reason_label",
    "serve_metrics",
]

log = logging.getLogger("daemoneye_eventbus.metrics")

#: The prefix of every metric name.
NAMESPACE: Final = "daemoneye_eventbus"
#: The component label of a peer that claimed none (or has not said Hello yet).
ANONYMOUS_LABEL: Final = "anonymous"
#: The component label of a component neither the schema nor the policy names:
#: the handshake refuses such a claim, so only an in-process session, named
#: by the embedding code, can carry one.
OTHER_LABEL: Final = "other"
#: Seconds a scrape from another thread waits for the broker's event loop.
READ_TIMEOUT: Final = 5.0

#: The topic label of every declared topic and template.
_DECLARED_LABELS: Final = (
    *schema.TOPICS,
    *(template.pattern for template in schema.TEMPLATES),
)


def reason_label(code: int) -> str:
    """The refusal reason of a wire error code: ``ERROR_CODE_ACCESS_DENIED`` → ``access_denied``."""
    try:
        name = ErrorCode.Name(ErrorCode.ValueType(code))
    except ValueError:
        name = "ERROR_CODE_UNSPECIFIED"
    return name.removeprefix("ERROR_CODE_").lower()


#: Every refusal reason a wire error code can give (UNSPECIFIED aside).
_REASONS: Final = tuple(
    reason_label(code) for code in ErrorCode.values() if code != ErrorCode.ERROR_CODE_UNSPECIFIED
)


class MetricsSource(Protocol):
    """What the collector reads of a broker (:class:`~daemoneye_eventbus.broker.Broker`)."""

    #: Refusals the broker makes itself and its event loop's lag.
    tally: BrokerTally

    @property
    def config(self) -> BrokerConfig: ...

    @property
    def policy(self) -> Policy: ...

    @property
    def router(self) -> Router: ...

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop the broker runs on (None before it starts)."""
        ...

    def sessions(self) -> Iterator[Session]: ...

    def throttled_by_component(self) -> dict[str, float]:
        """Seconds of rate limiting by component, over every connection so far."""
        ...

    @property
    def last_wills(self) -> int:
        """Last wills published so far."""
        ...


@dataclass(frozen=True, slots=True)
class Figures:
    """What one scrape reports, read on the broker's loop; every key is a label value."""

    #: Open socket connections by component label.
    connections: dict[str, int] = field(default_factory=dict)
    #: Events and bytes by topic label.
    topics: dict[str, TopicFigures] = field(default_factory=dict)
    #: Refusals by reason (router and broker).
    refusals: dict[str, int] = field(default_factory=dict)
    #: Published events refused because a payload did not parse.
    invalid_payloads: int = 0
    handshake_failures: int = 0
    #: The fullest session's queue: messages, and bytes.
    queue_max_messages: int = 0
    queue_max_bytes: int = 0
    #: The fullest queue of each component's sessions.
    component_queue_messages: dict[str, int] = field(default_factory=dict)
    component_queue_bytes: dict[str, int] = field(default_factory=dict)
    loop_lag: float = 0.0
    loop_lag_max: float = 0.0
    #: Seconds publishers were throttled for their rate limits, by component label.
    throttled: dict[str, float] = field(default_factory=dict)
    #: Events lossless subscriptions hold, by the subscriber's component label.
    held_events: dict[str, int] = field(default_factory=dict)
    #: Publishers a lossless subscriber holds now, by component label.
    held_publishers: dict[str, int] = field(default_factory=dict)
    #: Retained events the broker holds now, and their encoded bytes.
    retained_events: int = 0
    retained_bytes: int = 0
    #: Last wills published for sessions that ended without a goodbye.
    last_wills: int = 0
    #: Requests routed to a responder, answered at once with no responders,
    #: timed out; and waiting for a reply now.
    requests: int = 0
    no_responders: int = 0
    request_timeouts: int = 0
    pending_requests: int = 0


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class BrokerCollector(Collector):
    """The broker's figures as Prometheus metric families, read at scrape time."""

    def __init__(self, source: MetricsSource, *, timeout: float = READ_TIMEOUT) -> None:
        self.source = source
        self.timeout = timeout
        #: Component names that are their own label; any other is OTHER_LABEL.
        self.components = source.policy.known_components
        self._topic_labels: tuple[str, ...] = _DECLARED_LABELS
        if source.config.allow_undeclared_topics:
            self._topic_labels += (UNDECLARED_LABEL,)

    def component_label(self, component: str) -> str:
        if not component:
            return ANONYMOUS_LABEL
        return component if component in self.components else OTHER_LABEL

    def figures(self) -> Figures:
        """Read the figures now; call on the broker's event loop (see :meth:`collect`)."""
        source = self.source
        router = source.router
        tally = source.tally
        connections = dict.fromkeys((*sorted(self.components), ANONYMOUS_LABEL), 0)
        most_messages = most_bytes = 0
        by_messages: dict[str, int] = {}
        by_bytes: dict[str, int] = {}
        held = dict.fromkeys(connections, 0)
        publishers = dict.fromkeys(connections, 0)
        for session in source.sessions():
            label = self.component_label(session.component)
            if isinstance(session, SocketSession):
                connections[label] = connections.get(label, 0) + 1
            endpoint = session.endpoint
            if endpoint.held_by:
                publishers[label] = publishers.get(label, 0) + 1
            for sub in endpoint.subscriptions.values():
                if sub.flow is not None and sub.flow.held:
                    held[label] = held.get(label, 0) + sub.flow.held_events
            messages, nbytes = session.queue_depth()
            most_messages = max(most_messages, messages)
            most_bytes = max(most_bytes, nbytes)
            by_messages[label] = max(by_messages.get(label, 0), messages)
            by_bytes[label] = max(by_bytes.get(label, 0), nbytes)
        zero = TopicFigures(0, 0, 0, 0)
        topics = dict.fromkeys(self._topic_labels, zero)
        topics.update(router.topic_counts())
        refusals = dict.fromkeys(_REASONS, 0)
        for code, count in (*router.refusals().items(), *tally.refusals.items()):
            reason = reason_label(code)
            refusals[reason] = refusals.get(reason, 0) + count
        return Figures(
            connections=connections,
            topics=topics,
            refusals=refusals,
            invalid_payloads=router.invalid_payloads,
            handshake_failures=tally.handshake_failures,
            queue_max_messages=most_messages,
            queue_max_bytes=most_bytes,
            component_queue_messages=by_messages,
            component_queue_bytes=by_bytes,
            loop_lag=tally.lag,
            loop_lag_max=tally.take_lag_max(),
            throttled=self._throttled(source.throttled_by_component()),
            held_events=held,
            held_publishers=publishers,
            retained_events=len(router.retained),
            retained_bytes=router.retained.encoded_bytes,
            last_wills=source.last_wills,
            requests=router.requests.requests,
            no_responders=router.requests.no_responders,
            request_timeouts=router.requests.timeouts,
            pending_requests=len(router.requests.table),
        )

    def _throttled(self, by_component: dict[str, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        for component, seconds in by_component.items():
            label = self.component_label(component)
            out[label] = out.get(label, 0.0) + seconds
        return out

    def read(self) -> Figures:
        """:meth:`figures`, read on the broker's loop whatever thread asks.

        Raises ``TimeoutError`` when the loop does not get to it within ``timeout``.
        """
        loop = self.source.loop
        if loop is None or not loop.is_running() or _running_loop() is loop:
            return self.figures()
        future: concurrent.futures.Future[Figures] = concurrent.futures.Future()

        def read_on_loop() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(self.figures())
            except Exception as exc:
                future.set_exception(exc)

        loop.call_soon_threadsafe(read_on_loop)
        try:
            return future.result(self.timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(
                f"the broker's event loop did not answer a scrape within {self.timeout} s"
            ) from None

    def collect(self) -> Iterator[Metric]:
        return _families(self.read())

    def describe(self) -> Iterator[Metric]:
        """The metric families without their figures (names, for the registry)."""
        return _families(Figures())


def _name(name: str) -> str:
    return f"{NAMESPACE}_{name}"


def _families(f: Figures) -> Iterator[Metric]:
    def labelled(
        family: CounterMetricFamily | GaugeMetricFamily, values: Iterable[tuple[str, float]]
    ) -> CounterMetricFamily | GaugeMetricFamily:
        for label, value in values:
            family.add_metric([label], value)
        return family

    def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
        return GaugeMetricFamily(_name(name), doc, value=value)

    def per_component(name: str, doc: str, values: dict[str, int]) -> GaugeMetricFamily:
        family = GaugeMetricFamily(_name(name), doc, labels=["component"])
        for label, value in sorted(values.items()):
            family.add_metric([label], value)
        return family

    def per_topic(name: str, doc: str, pick: str) -> CounterMetricFamily | GaugeMetricFamily:
        family = CounterMetricFamily(_name(name), doc, labels=["topic"])
        return labelled(family, ((t, getattr(c, pick)) for t, c in sorted(f.topics.items())))

    yield labelled(
        GaugeMetricFamily(
            _name("connections"),
            "Open socket connections by component (anonymous: none claimed, or no Hello yet).",
            labels=["component"],
        ),
        sorted(f.connections.items()),
    )
    yield per_topic("events_published", "Events accepted, by topic.", "published")
    yield per_topic(
        "events_delivered",
        "Events subscribers' queues took (one per receiving subscription), by topic.",
        "delivered",
    )
    yield per_topic(
        "events_dropped", "Events dropped because a subscriber's queue was full.", "dropped"
    )
    yield per_topic(
        "published_bytes",
        "Encoded bytes of the accepted publishes (what is forwarded to each receiver).",
        "published_bytes",
    )
    yield labelled(
        CounterMetricFamily(
            _name("events_refused"),
            "Requests refused (publishes, subscriptions, connections, handshakes), by the "
            "wire error code's name.",
            labels=["reason"],
        ),
        sorted(f.refusals.items()),
    )
    yield CounterMetricFamily(
        _name("payload_validation_failures"),
        "Published events refused because a payload did not parse as its topic's type.",
        value=f.invalid_payloads,
    )
    yield CounterMetricFamily(
        _name("handshake_failures"),
        "Handshakes that failed: claim refused, protocol version, or deadline passed.",
        value=f.handshake_failures,
    )
    yield gauge(
        "queue_depth_max_messages",
        "Messages waiting for the fullest subscriber (socket or in-process).",
        f.queue_max_messages,
    )
    yield gauge(
        "queue_depth_max_bytes",
        "Bytes waiting for the fullest subscriber (socket or in-process).",
        f.queue_max_bytes,
    )
    yield per_component(
        "component_queue_depth_max_messages",
        "Messages waiting for the fullest subscriber of each component.",
        f.component_queue_messages,
    )
    yield per_component(
        "component_queue_depth_max_bytes",
        "Bytes waiting for the fullest subscriber of each component.",
        f.component_queue_bytes,
    )
    yield labelled(
        CounterMetricFamily(
            _name("throttled_seconds"),
            "Seconds the broker stopped reading from publishers over their rate limits, "
            "by component.",
            labels=["component"],
        ),
        sorted(f.throttled.items()),
    )
    yield per_component(
        "held_events",
        "Events held in the broker for lossless subscribers without credit, by the "
        "subscriber's component.",
        f.held_events,
    )
    yield per_component(
        "held_publishers",
        "Publisher connections not read now because a lossless subscriber holds their "
        "events, by component.",
        f.held_publishers,
    )
    yield CounterMetricFamily(
        _name("requests"), "Requests routed to a responder (request/reply).", value=f.requests
    )
    yield CounterMetricFamily(
        _name("requests_no_responders"),
        "Requests answered at once with no responders: none serves the topic, or may read it.",
        value=f.no_responders,
    )
    yield CounterMetricFamily(
        _name("request_timeouts"),
        "Requests whose deadline passed without a reply.",
        value=f.request_timeouts,
    )
    yield gauge("pending_requests", "Requests waiting for a reply now.", f.pending_requests)
    yield gauge(
        "retained_events",
        "Retained events the broker holds (the last event of each retained topic).",
        f.retained_events,
    )
    yield gauge(
        "retained_bytes",
        "Encoded bytes of the retained events (max_retained_bytes bounds them with 512 "
        "bytes more for each).",
        f.retained_bytes,
    )
    yield CounterMetricFamily(
        _name("last_wills_published"),
        "Last wills the broker published for sessions that ended without a goodbye.",
        value=f.last_wills,
    )
    yield gauge(
        "event_loop_lag_seconds",
        "How late the broker's last periodic housekeeping tick woke up.",
        f.loop_lag,
    )
    yield gauge(
        "event_loop_lag_max_seconds",
        "The latest housekeeping tick since the previous scrape.",
        f.loop_lag_max,
    )


def broker_registry(source: MetricsSource) -> CollectorRegistry:
    """A registry of ``source``'s figures and of this process (``daemoneye_eventbus_process_*``)."""
    registry = CollectorRegistry()
    registry.register(BrokerCollector(source))
    ProcessCollector(namespace=NAMESPACE, registry=registry)
    return registry


# -- serving over HTTP -------------------------------------------------------------------


def listen_address(text: str) -> str | tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9464`` for IPv6) as ``(host, port)``, or a Unix socket
    path (anything holding ``/``) as is; raise ``ValueError`` for anything else."""
    if "/" in text:
        if sys.platform == "win32":
            raise ValueError(f"{text!r}: no Unix sockets on Windows; give HOST:PORT")
        return text
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r} is neither HOST:PORT nor a Unix socket path (with a '/')")
    return host, int(port)


class _QuietHandler(WSGIRequestHandler):
    # A scraper that stalls does not hold its thread for ever.
    timeout = 10

    def log_message(self, format: str, *args: Any) -> None:
        pass


if sys.platform != "win32":  # a metrics endpoint on a Unix socket

    class _UnixWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
        """The standard library's WSGI server, on a Unix socket bound beforehand."""

        address_family = socket.AF_UNIX
        daemon_threads = True

        def __init__(self, sock: socket.socket, path: str) -> None:
            # Not bound here: the socket, bound beforehand, replaces the one made here.
            super().__init__(("localhost", 0), _QuietHandler, bind_and_activate=False)
            self.socket.close()
            self.socket = sock
            self.server_name = "localhost"
            self.server_port = 0
            self.setup_environ()

        def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
            conn, _ = self.socket.accept()
            return conn, ("local", 0)  # the handler wants a (host, port) pair


class MetricsServer:
    """A metrics endpoint served from a daemon thread; :meth:`close` stops it."""

    def __init__(
        self,
        server: WSGIServer,
        thread: threading.Thread,
        url: str,
        path: str | None = None,
        inode: int | None = None,
    ) -> None:
        self.server = server
        self.thread = thread
        #: ``http://host:port/metrics``, or ``unix:PATH``.
        self.url = url
        #: The Unix socket file (removed on close if still ours: ``inode``), or None.
        self.path = path
        self.inode = inode

    def close(self) -> None:
        """Stop serving, close the socket and remove the socket file (if ours still)."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
        if sys.platform != "win32" and self.path is not None:
            remove_socket(self.path, self.inode)


def serve_metrics(
    listen: str, registry: CollectorRegistry, *, mode: int = 0o600, group: int | None = None
) -> MetricsServer:
    """Serve ``registry`` over HTTP at ``listen`` (see :func:`listen_address`).

    Over TCP with ``prometheus_client.start_http_server``; on a Unix socket
    (created like the broker's: never more open than ``mode``, in ``group``)
    with ``make_wsgi_app`` and the standard library's WSGI server. Each runs
    in a daemon thread; scrapes read the broker's figures on its loop.
    """
    address = listen_address(listen)
    if isinstance(address, tuple):
        host, port = address
        if not _is_loopback(host):
            log.warning("metrics endpoint on %s: anyone who reaches it reads the figures", listen)
        server, thread = start_http_server(port, addr=host, registry=registry)
        bound = server.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        return MetricsServer(server, thread, f"http://{shown}:{bound}/metrics")
    if sys.platform != "win32":
        return _serve_on_unix_socket(address, registry, mode, group)
    raise ValueError(f"{listen!r}: no Unix sockets on Windows; give HOST:PORT")


if sys.platform != "win32":

    def _serve_on_unix_socket(
        address: str, registry: CollectorRegistry, mode: int, group: int | None
    ) -> MetricsServer:
        """Serve ``registry`` over HTTP on a Unix socket created at ``address``."""
        sock = bind_unix_socket(address, mode=mode, group=group)
        inode = os.stat(address).st_ino
        try:
            sock.setblocking(True)
            unix = _UnixWSGIServer(sock, address)
        except BaseException:
            sock.close()
            remove_socket(address, inode)
            raise
        unix.set_app(make_wsgi_app(registry))
        thread = threading.Thread(
            target=unix.serve_forever, name=f"eventbus metrics {address}", daemon=True
        )
        thread.start()
        return MetricsServer(unix, thread, f"unix:{address}", address, inode)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
