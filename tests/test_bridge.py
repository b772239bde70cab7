"""The NATS bridge against a real nats-server: outbound subjects, headers, stream, guarantees."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
from pathlib import Path

import pytest
from bridge_helpers import (
    HOST,
    STREAM,
    bridge_config,
    process_event,
    read_stream,
    stream_info,
    until,
)
from conftest import AGENT, PROCMOND
from nats_server import NatsServer, import_nats

from daemoneye.eventbus.v1 import control_pb2, events_pb2, registry
from daemoneye_eventbus.bridge import headers as h
from daemoneye_eventbus.bridge.config import BridgeConfigError, NatsOptions
from daemoneye_eventbus.bridge.runner import Bridge
from daemoneye_eventbus.bridge.spool import SpoolLocked
from daemoneye_eventbus.bridge.subjects import msg_id, topic_to_subject
from daemoneye_eventbus.broker import Broker
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.correlation import new_correlation, with_stage, with_tag

LIFECYCLE = registry.EVENTS_PROCESS_LIFECYCLE
ANOMALY = registry.EVENTS_PROCESS_ANOMALY


async def test_events_are_forwarded_with_their_subject_headers_and_payload(
    broker: Broker, sock_path: str, tmp_path: Path, nats_server: NatsServer
) -> None:
    correlation = with_tag(with_stage(new_correlation("wf 1/é"), "detection"), "case", "a\nb")
    async with (
        Bridge(bridge_config(tmp_path, sock_path, nats_server.url)) as bridge,
        Client(sock_path, component=AGENT) as agent,
        Client(sock_path, component=PROCMOND) as procmond,
    ):
        local = await agent.subscribe("events.#")
        await procmond.publish(LIFECYCLE, process_event(1), correlation=correlation)
        await procmond.publish(ANOMALY, process_event(2))
        # Control topics are never forwarded (their subjects are the inbound ones).
        await agent.publish(registry.CONTROL_HEALTH_STATUS, control_pb2.ComponentStatus())
        seen = [await local.get(timeout=10), await local.get(timeout=10)]
        await until(lambda: bridge.statistics().acknowledged == 2, "two acknowledgements")
        stats = bridge.statistics()
        assert (stats.received, stats.spooled, stats.forwarded, stats.resent) == (2, 2, 2, 0)
        # The bridge's subscription is lossless: the broker never drops its events.
        broker_stats = await agent.broker_statistics()
        bridges = {c.session_id for c in broker_stats.connection_stats if c.component == "bridge"}
        assert [
            (s.filter, s.lossless)
            for s in broker_stats.subscription_stats
            if s.session_id in bridges
        ] == [("events.#", True)]
        assert (stats.spool_depth, stats.in_flight, stats.link_up) == (0, 0, True)

    stored = await read_stream(nats_server.url, "daemoneye.>")
    assert [m.subject for m in stored] == [
        topic_to_subject(HOST, "events.process.lifecycle"),
        topic_to_subject(HOST, "events.process.anomaly"),
    ]
    for msg, event in zip(stored, seen, strict=True):
        assert msg.data == event.payload
        assert msg.headers is not None
        assert msg.headers[h.MSG_ID] == msg_id(HOST, event.event_id, event.received_at_ns)
        assert msg.headers[h.HOST] == HOST
        assert msg.headers[h.TOPIC] == event.topic
        assert msg.headers[h.PAYLOAD_TYPE] == "daemoneye.eventbus.v1.ProcessEvent"
        assert msg.headers[h.EVENT_ID] == str(event.event_id)
        assert msg.headers[h.RECEIVED_AT] == str(event.received_at_ns)
    first, second = stored
    assert first.headers is not None
    assert second.headers is not None
    assert h.correlation_from_headers(first.headers) == correlation
    assert first.headers[h.WORKFLOW_STAGE] == "detection"
    assert h.correlation_from_headers(second.headers) is None
    assert not any(name in second.headers for name in h.CORRELATION_HEADERS)


async def test_the_bridge_creates_its_stream_as_configured(
    broker: Broker, sock_path: str, tmp_path: Path, nats_server: NatsServer
) -> None:
    config = bridge_config(
        tmp_path,
        sock_path,
        nats_server.url,
        forward=("events.process.#", "events.network.connections"),
        max_age=3600.0,
        duplicate_window=120.0,
        stream_max_bytes=1 << 24,
    )
    async with Bridge(config) as bridge:
        await until(lambda: bridge.link_up, "the link")
        info = await stream_info(nats_server.url)
    assert sorted(info.config.subjects or []) == [
        "daemoneye.*.events.network.connections",
        "daemoneye.*.events.process",
        "daemoneye.*.events.process.>",
    ]
    assert info.config.max_age == 3600.0
    assert info.config.duplicate_window == 120.0
    assert info.config.max_bytes == 1 << 24


async def test_a_stream_that_does_not_store_the_forwarded_subjects_stops_the_bridge(
    broker: Broker, sock_path: str, tmp_path: Path, nats_server: NatsServer
) -> None:
    nats = import_nats()
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jetstream().add_stream(name=STREAM, subjects=["daemoneye.*.events.network.>"])
    finally:
        await nc.close()
    async with Bridge(bridge_config(tmp_path, sock_path, nats_server.url)) as bridge:
        with pytest.raises(BridgeConfigError, match="not the forwarded subject"):
            await bridge.wait()
    # Nor will it create a stream it may not create.
    config = bridge_config(
        tmp_path / "other", sock_path, nats_server.url, stream="OTHER", create_stream=False
    )
    (tmp_path / "other").mkdir()
    async with Bridge(config) as bridge:
        with pytest.raises(BridgeConfigError, match="may not create it"):
            await bridge.wait()


async def test_one_spool_one_bridge(
    broker: Broker, sock_path: str, tmp_path: Path, nats_server: NatsServer
) -> None:
    config = bridge_config(tmp_path, sock_path, nats_server.url)
    async with Bridge(config):
        with pytest.raises(SpoolLocked):
            await Bridge(config).start()


def test_a_bad_configuration_is_refused_before_anything_connects(tmp_path: Path) -> None:
    config = bridge_config(tmp_path, "/nonexistent", "nats://127.0.0.1:1")
    with pytest.raises(BridgeConfigError, match="control topics are not forwarded"):
        Bridge(dataclasses.replace(config, forward=("control.#",)))


async def test_unusable_nats_options_stop_the_bridge_with_the_reason(
    broker: Broker, sock_path: str, tmp_path: Path, nats_server: NatsServer
) -> None:
    # A secret file that cannot be read: an error of the start.
    options = NatsOptions(servers=(nats_server.url,), token_file=str(tmp_path / "missing"))
    config = bridge_config(tmp_path, sock_path, nats_server.url, nats=options)
    with pytest.raises(BridgeConfigError, match="cannot read"):
        await Bridge(config).start()
    # An nkey seed: without the nkeys package, refused at once; with it, a seed
    # nats-py cannot use fails the connection for good, and the bridge stops
    # saying why rather than spool for ever in silence.
    seed = tmp_path / "seed"
    seed.write_text("not a seed\n")
    options = NatsOptions(servers=(nats_server.url,), nkey_seed=str(seed))
    config = bridge_config(tmp_path, sock_path, nats_server.url, nats=options)
    if importlib.util.find_spec("nkeys") is None:
        with pytest.raises(BridgeConfigError, match="needs the nkeys package"):
            Bridge(config)
        return
    async with Bridge(config) as bridge:
        with pytest.raises(Exception, match=r"(?i)seed") as caught:
            await asyncio.wait_for(bridge.wait(), 30)
    assert not isinstance(caught.value, TimeoutError)


async def test_an_event_larger_than_the_spool_is_lost_alone_and_counted(
    broker: Broker, sock_path: str, tmp_path: Path, nats_server: NatsServer
) -> None:
    config = bridge_config(tmp_path, sock_path, nats_server.url, spool_max_bytes=4096)
    async with Bridge(config) as bridge, Client(sock_path, component=PROCMOND) as procmond:
        await procmond.publish(LIFECYCLE, process_event(1))
        big = process_event(2)
        big.name = "x" * 8192
        await procmond.publish(LIFECYCLE, big)
        await procmond.publish(LIFECYCLE, process_event(3))
        await until(lambda: bridge.statistics().received == 3, "three received")
        await until(lambda: bridge.statistics().acknowledged == 2, "two acknowledged")
        stats = bridge.statistics()
        assert (stats.spooled, stats.unforwardable) == (2, 1)
    stored = await read_stream(nats_server.url)
    assert [events_pb2.ProcessEvent.FromString(m.data).pid for m in stored] == [1, 3]
