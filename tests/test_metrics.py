"""Prometheus metrics: a real broker, real clients, the exposition parsed back.

The broker's registry is scraped with ``generate_latest`` (on the loop's own
thread, and from another thread as an HTTP server would), and ``serve
--metrics-listen`` in its own process is scraped over TCP and over a Unix
socket. Every scrape is parsed with ``prometheus_client``'s own parser.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import os
import socket
import stat
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from conftest import AGENT, PROCMOND, TEST_CONFIG, peer_published
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from rawpeer import RawPeer, hello
from serving import broker_process

from daemoneye.eventbus.v1 import control_pb2, events_pb2, frames_pb2, registry
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode, Frame
from daemoneye_eventbus.access import SCHEMA_COMPONENTS, Policy
from daemoneye_eventbus.broker import Broker
from daemoneye_eventbus.cli import main
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.errors import EventBusError
from daemoneye_eventbus.metrics import listen_address, reason_label

EC = ErrorCode
LIFECYCLE = registry.EVENTS_PROCESS_LIFECYCLE
TEMPLATE = registry.CONTROL_COLLECTOR_TASK_TARGETED
NS = "daemoneye_eventbus"

#: Every value a label may take: bounded by the schema, the policy and the error codes.
TOPIC_LABELS = {*registry.TOPICS, *(t.pattern for t in registry.TEMPLATES), "undeclared"}
DECLARED: list[registry.Topic[Any] | registry.TopicTemplate[Any]] = [
    *registry.TOPICS.values(),
    *registry.TEMPLATES,
]
COMPONENT_LABELS = {
    *(c for t in DECLARED for c in t.publishers | t.subscribers),
    "anonymous",
    "other",
}
REASON_LABELS = {reason_label(code) for code in EC.values()}
LABELS = {"topic": TOPIC_LABELS, "component": COMPONENT_LABELS, "reason": REASON_LABELS}


def samples(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(found: Iterable[Sample], name: str, **labels: str) -> float:
    """The one sample called ``name`` with exactly ``labels``."""
    (match,) = [s.value for s in found if s.name == name and s.labels == labels]
    return match


def assert_bounded_labels(found: Iterable[Sample], session_ids: set[str]) -> None:
    for s in found:
        if s.name.startswith(f"{NS}_process_"):
            assert not s.labels, s
            continue
        for label, text in s.labels.items():
            assert label in LABELS, s
            assert text in LABELS[label], s
            assert text not in session_ids, s


def scrape(broker: Broker) -> list[Sample]:
    return samples(generate_latest(broker.metrics_registry()).decode())


async def test_a_scrape_reports_the_broker_figures(broker: Broker, sock_path: str) -> None:
    errors: list[EventBusError] = []
    async with (
        Client(sock_path, component=AGENT) as agent,
        Client(sock_path, component=PROCMOND) as procmond,
        Client(sock_path) as anonymous,
    ):
        procmond.on_error = anonymous.on_error = errors.append
        sub = await agent.subscribe(LIFECYCLE)
        tasks = await procmond.subscribe("control.collector.task.#")
        for pid in range(3):
            await procmond.publish(LIFECYCLE, events_pb2.ProcessEvent(pid=pid))
        await procmond.flush()  # else the next one would join their batch, refused whole
        # Two topics of one template; the label is the template's pattern.
        for collector in ("c1", "c2"):
            topic = TEMPLATE.build(type="scan", id=collector)
            await agent.publish(topic, control_pb2.TaskAssignment())
        # Refusals: a payload that does not parse, an anonymous publish on a restricted topic.
        await procmond.publish_raw(LIFECYCLE.name, LIFECYCLE.payload_name, b"\xff\xff\xff\xff")
        await anonymous.publish(LIFECYCLE, events_pb2.ProcessEvent(pid=9))
        for client in (procmond, anonymous, agent):
            await client.flush()
        assert [(await sub.get(timeout=5)).message().pid for _ in range(3)] == [0, 1, 2]
        assert [(await tasks.get(timeout=5)).topic for _ in range(2)] == [
            "control.collector.task.scan.c1",
            "control.collector.task.scan.c2",
        ]
        assert sorted(type(e).__name__ for e in errors) == ["AccessDenied", "InvalidPayload"]
        # Handshakes refused: a claim too long, a protocol version this broker does not speak.
        async with await RawPeer.connect(sock_path, handshake=False) as peer:
            await peer.send(hello(component="p" * 129))
            await peer.expect_fatal(EC.ERROR_CODE_ACCESS_DENIED)
        async with await RawPeer.connect(sock_path, handshake=False) as peer:
            await peer.send(hello(version=99))
            await peer.expect_fatal(EC.ERROR_CODE_UNSUPPORTED_VERSION)

        found = scrape(broker)
        session_ids = {s.session_id for s in broker.sessions()}
        assert {agent.session_id, procmond.session_id, anonymous.session_id} <= session_ids
        stats = broker.statistics()

    lifecycle = {"topic": LIFECYCLE.name}
    assert value(found, f"{NS}_events_published_total", **lifecycle) == 3
    assert value(found, f"{NS}_events_delivered_total", **lifecycle) == 3
    assert value(found, f"{NS}_events_dropped_total", **lifecycle) == 0
    assert value(found, f"{NS}_published_bytes_total", **lifecycle) > 3 * 4
    template = {"topic": TEMPLATE.pattern}
    assert value(found, f"{NS}_events_published_total", **template) == 2
    assert value(found, f"{NS}_events_delivered_total", **template) == 2
    # Every declared topic has its series, at 0 until used.
    assert value(found, f"{NS}_events_published_total", topic="events.network.connections") == 0
    # The per-topic figures add up to the broker's statistics (still there as before),
    # the broker's own presence events included: one per connection made, one per end.
    published = [s for s in found if s.name == f"{NS}_events_published_total"]
    assert sum(s.value for s in published) == stats.published
    assert peer_published(stats) == 5
    presence = value(found, f"{NS}_events_published_total", topic="control.presence")
    assert presence == stats.published - 5 > 0

    refused = f"{NS}_events_refused_total"
    assert value(found, refused, reason="invalid_payload") == 1
    assert value(found, refused, reason="access_denied") == 2  # the publish, the claim
    assert value(found, refused, reason="unsupported_version") == 1
    assert value(found, refused, reason="connection_limit") == 0
    assert sum(s.value for s in found if s.name == refused) == stats.refused == 4
    assert value(found, f"{NS}_payload_validation_failures_total") == 1
    assert value(found, f"{NS}_handshake_failures_total") == 2

    connections = f"{NS}_connections"
    assert value(found, connections, component=AGENT) == 1
    assert value(found, connections, component=PROCMOND) == 1
    assert value(found, connections, component="anonymous") == 1
    # A name neither the schema nor the policy declares is refused at the handshake:
    # no connection is labelled "other".
    assert {s.labels["component"] for s in found if s.name == connections} == {
        *SCHEMA_COMPONENTS,
        "anonymous",
    }
    assert value(found, connections, component="netmond") == 0
    assert value(found, f"{NS}_queue_depth_max_messages") >= 0
    assert value(found, f"{NS}_queue_depth_max_bytes") >= 0
    assert value(found, f"{NS}_component_queue_depth_max_messages", component=AGENT) >= 0

    assert value(found, f"{NS}_process_resident_memory_bytes") > 0
    assert value(found, f"{NS}_event_loop_lag_seconds") >= 0
    assert value(found, f"{NS}_event_loop_lag_max_seconds") >= 0
    assert_bounded_labels(found, session_ids)


async def test_queue_depth_of_the_fullest_subscriber(broker: Broker, sock_path: str) -> None:
    # An in-process subscriber that does not read: its queue holds what it was sent.
    local = broker.local_session("agent", AGENT)
    await local.subscribe(LIFECYCLE)
    async with Client(sock_path, component=PROCMOND) as procmond:
        for pid in range(5):
            await procmond.publish(LIFECYCLE, events_pb2.ProcessEvent(pid=pid))
        await procmond.flush()
        found = scrape(broker)
    assert value(found, f"{NS}_queue_depth_max_messages") == 5
    assert value(found, f"{NS}_queue_depth_max_bytes") > 0
    assert value(found, f"{NS}_component_queue_depth_max_messages", component=AGENT) == 5
    assert value(found, f"{NS}_component_queue_depth_max_messages", component=PROCMOND) == 0
    assert value(found, f"{NS}_connections", component=AGENT) == 0  # in process: no socket
    local.end()


async def test_held_events_and_publishers_of_a_lossless_subscriber(
    broker: Broker, sock_path: str
) -> None:
    local = broker.local_session("agent", AGENT)
    sub = await local.subscribe(LIFECYCLE, lossless=True, window=1)
    async with Client(sock_path, component=PROCMOND) as procmond:
        for pid in range(5):  # each in its own frame
            await procmond.publish(LIFECYCLE, events_pb2.ProcessEvent(pid=pid))
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # not read: one queued, one held with the publisher
        found = scrape(broker)
        assert value(found, f"{NS}_held_events", component=AGENT) >= 1
        assert value(found, f"{NS}_held_publishers", component=PROCMOND) == 1
        for _ in range(5):
            await sub.get(timeout=5)
        found = scrape(broker)
    assert value(found, f"{NS}_held_events", component=AGENT) == 0
    assert value(found, f"{NS}_held_publishers", component=PROCMOND) == 0
    local.end()


async def test_event_loop_lag_and_its_maximum_since_the_last_scrape(broker: Broker) -> None:
    await asyncio.sleep(0.3)  # a few housekeeping ticks (every 0.125 s with TEST_CONFIG)
    scrape(broker)
    time.sleep(0.4)  # noqa: ASYNC251 - block the loop: the tick due meanwhile wakes up late
    await asyncio.sleep(0.3)
    late = scrape(broker)
    stall = value(late, f"{NS}_event_loop_lag_max_seconds")
    assert stall >= 0.4 - 0.125 - 0.01  # the stall, less the tick's own period
    assert stall >= value(late, f"{NS}_event_loop_lag_seconds")
    await asyncio.sleep(0.3)
    # The maximum is per scrape interval: the stall is not reported again.
    assert value(scrape(broker), f"{NS}_event_loop_lag_max_seconds") < stall


async def test_a_scrape_from_another_thread_reads_on_the_broker_loop(
    broker: Broker, sock_path: str
) -> None:
    registry_ = broker.metrics_registry()
    assert broker.metrics_registry() is registry_
    async with Client(sock_path, component=PROCMOND) as procmond:
        await procmond.publish(LIFECYCLE, events_pb2.ProcessEvent(pid=1))
        await procmond.flush()
        # As an HTTP server's thread would: the loop answers while this task awaits.
        text = await asyncio.to_thread(generate_latest, registry_)
    found = samples(text.decode())
    assert value(found, f"{NS}_events_published_total", topic=LIFECYCLE.name) == 1
    assert value(found, f"{NS}_connections", component=PROCMOND) == 1


def test_listen_addresses() -> None:
    assert listen_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert listen_address("[::1]:9464") == ("::1", 9464)
    assert listen_address("/run/daemoneye/metrics.sock") == "/run/daemoneye/metrics.sock"
    assert listen_address("./metrics.sock") == "./metrics.sock"
    for bad in ("9464", ":9464", "localhost", "host:port", "host:70000"):
        with pytest.raises(ValueError, match="neither HOST:PORT nor a Unix socket path"):
            listen_address(bad)


def test_serve_refuses_a_bad_metrics_address(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--metrics-listen", "localhost"])
    assert exit_.value.code == 2
    assert "neither HOST:PORT nor a Unix socket path" in capsys.readouterr().err


# -- serve --metrics-listen, in its own process ------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=5)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(self.path)
        self.sock = sock


def get_tcp(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        body: bytes = response.read()
        return body.decode()


def get_unix(path: str) -> str:
    conn = UnixHTTPConnection(path)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        return response.read().decode()
    finally:
        conn.close()


async def fetch(get: Callable[[str], str], where: str) -> str:
    """GET the metrics, retrying a few seconds while the endpoint comes up."""
    for _ in range(50):
        try:
            text: str = await asyncio.to_thread(get, where)
            return text
        except (ConnectionRefusedError, FileNotFoundError, urllib.error.URLError):
            await asyncio.sleep(0.1)
    raise AssertionError(f"no metrics at {where}")


async def publish_two(sock_path: str) -> None:
    async with Client(sock_path, component=AGENT) as agent:
        sub = await agent.subscribe(LIFECYCLE)
        async with Client(sock_path, component=PROCMOND) as procmond:
            for pid in (1, 2):
                await procmond.publish(LIFECYCLE, events_pb2.ProcessEvent(pid=pid))
            await procmond.flush()
        for _ in range(2):
            await sub.get(timeout=5)


@pytest.mark.timeout(60)
async def test_serve_metrics_over_tcp(sock_path: str) -> None:
    port = free_port()
    async with broker_process(sock_path, "--metrics-listen", f"127.0.0.1:{port}"):
        await publish_two(sock_path)
        text = await fetch(get_tcp, f"http://127.0.0.1:{port}/metrics")
    found = samples(text)
    assert value(found, f"{NS}_events_published_total", topic=LIFECYCLE.name) == 2
    assert value(found, f"{NS}_events_delivered_total", topic=LIFECYCLE.name) == 2
    assert value(found, f"{NS}_process_resident_memory_bytes") > 0
    assert value(found, f"{NS}_event_loop_lag_seconds") >= 0
    assert_bounded_labels(found, set())


@pytest.mark.timeout(60)
async def test_serve_metrics_on_a_unix_socket(sock_dir: Path, sock_path: str) -> None:
    metrics = str(sock_dir / "metrics.sock")
    async with broker_process(sock_path, "--metrics-listen", metrics):
        await publish_two(sock_path)
        text = await fetch(get_unix, metrics)
        # As private as the broker's own socket (--socket-mode, 0600 by default).
        assert stat.S_IMODE(os.stat(metrics).st_mode) == 0o600
        assert stat.S_ISSOCK(os.stat(metrics).st_mode)
    assert not os.path.exists(metrics)  # removed on exit
    found = samples(text)
    assert value(found, f"{NS}_events_published_total", topic=LIFECYCLE.name) == 2
    assert value(found, f"{NS}_connections", component="anonymous") == 0
    assert value(found, f"{NS}_process_resident_memory_bytes") > 0
    assert_bounded_labels(found, set())


async def test_throttled_seconds_by_component(sock_path: str) -> None:
    uid = os.geteuid()
    policy = Policy.from_mapping(
        {
            "components": {
                "procmond": {
                    "uids": [uid],
                    "rate": {"events_per_second": 1000, "burst_events": 100},
                },
                "daemoneye-agent": {"uids": [uid], "privileged": True},
            }
        }
    )
    config = dataclasses.replace(TEST_CONFIG, policy=policy)
    async with Broker(sock_path, config) as broker:
        async with await RawPeer.connect(sock_path, component=PROCMOND) as peer:
            event = events_pb2.ProcessEvent(pid=1).SerializeToString()
            frame = frames_pb2.Publish(
                topic=registry.EVENTS_PROCESS_LIFECYCLE.name,
                payload_type=registry.EVENTS_PROCESS_LIFECYCLE.payload_name,
                payload=event,
            )
            # 600 events at once: 100 in the burst, 500 over the limit (0.5 s).
            await peer.send(*([Frame(publish=frame)] * 600))
            await peer.roundtrip()
        found = samples(generate_latest(broker.metrics_registry()).decode())
        throttled = value(found, "daemoneye_eventbus_throttled_seconds_total", component="procmond")
        assert 0.3 < throttled < 2.0
        assert broker.statistics().throttled_seconds == pytest.approx(throttled)
