"""Retained events: the store on its own, the router's use of it, and the broker.

The pure tests need no event loop: a :class:`RetainedStore` with small bounds,
and a :class:`Router` whose endpoints have a recording sink. The others run a
real broker on a Unix socket, with the late subscriber in a separate process
where the point is that it knows nothing of what came before it.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from conftest import AGENT, PROCMOND, TEST_CONFIG, WORKERS, worker_env

from daemoneye.eventbus.v1 import control_pb2, events_pb2, frames_pb2, registry
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationFilter
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode
from daemoneye_eventbus.access import Identity, PeerCredentials, TopicAccess
from daemoneye_eventbus.broker import Broker, BrokerConfig
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.correlation import new_correlation
from daemoneye_eventbus.errors import EventBusError, LimitExceeded, RequestTimeout
from daemoneye_eventbus.protocol import build_publish
from daemoneye_eventbus.retained import RETAINED_COST, RetainedStore, retained_cost
from daemoneye_eventbus.router import Endpoint, Published, Router, SubscriptionEntry
from daemoneye_eventbus.stamps import Stamp

EC = ErrorCode
CONFIG = registry.CONTROL_COLLECTOR_CONFIG  # retained, privileged: agent -> collectors
STATUS = registry.CONTROL_HEALTH_STATUS  # retained, public
POLICY = registry.CONTROL_AGENT_POLICY  # retained, privileged
LIFECYCLE = registry.EVENTS_PROCESS_LIFECYCLE  # not retained

ROOT = PeerCredentials(os.getpid(), 0, 0)
AGENT_ID = Identity(ROOT, AGENT, privileged=True)
PROCMOND_ID = Identity(ROOT, PROCMOND)
ANONYMOUS_ID = Identity(PeerCredentials(1, 1000, 1000))


def config(version: int, collector: str = "procmond-1") -> control_pb2.ConfigurationUpdate:
    return control_pb2.ConfigurationUpdate(
        collector_id=collector, config_version=version, settings={"scan": "on"}
    )


def status(text: str) -> control_pb2.ComponentStatus:
    return control_pb2.ComponentStatus(
        component_id="procmond-1", state=control_pb2.HEALTH_STATE_HEALTHY, message=text
    )


# -- the store on its own ---------------------------------------------------------------------


@dataclass
class Counts:
    delivered: int = 0
    dropped: int = 0


@dataclass(frozen=True)
class What:
    control: bool = True
    access: TopicAccess = field(default_factory=lambda: TopicAccess(STATUS.access))
    counts: Counts = field(default_factory=Counts)


def publish(topic: str, payload: bytes) -> frames_pb2.Publish:
    return frames_pb2.Publish(topic=topic, payload_type="t", payload=payload)


def keep(store: RetainedStore, message: Published, stamp: Stamp) -> None:
    topic = message.topic
    refusal = store.refusal(topic, message, message.ByteSize())
    if refusal is not None:
        raise refusal
    store.keep(topic, message, message.SerializeToString(), stamp, What())


def test_the_store_keeps_the_last_event_of_each_topic_and_counts_its_bytes() -> None:
    store = RetainedStore(BrokerConfig())
    one, two, three = publish("a.b", b"1"), publish("a.c", b"22"), publish("a.b", b"333")
    keep(store, one, Stamp(1, 10))
    keep(store, two, Stamp(2, 20))
    assert len(store) == 2
    assert store.encoded_bytes == one.ByteSize() + two.ByteSize()
    assert store.bytes == retained_cost(one.ByteSize()) + retained_cost(two.ByteSize())
    keep(store, three, Stamp(3, 30))  # replaces a.b, which moves after a.c
    assert [e.topic for e in store] == ["a.c", "a.b"]
    replaced = store.get("a.b")
    assert replaced is not None
    assert (replaced.message().payload, replaced.stamp.event_id) == (b"333", 3)
    assert store.encoded_bytes == two.ByteSize() + three.ByteSize()
    assert store.bytes == store.encoded_bytes + 2 * RETAINED_COST


def test_an_empty_payload_clears_the_topic() -> None:
    store = RetainedStore(BrokerConfig())
    keep(store, publish("a.b", b"1"), Stamp(1, 10))
    keep(store, publish("a.b", b""), Stamp(2, 20))
    assert store.get("a.b") is None
    assert (len(store), store.bytes, store.encoded_bytes) == (0, 0, 0)
    keep(store, publish("a.c", b""), Stamp(3, 30))  # clearing nothing is fine
    assert len(store) == 0
    assert not store.clear("a.c")


def test_a_batch_retains_its_last_event_with_its_own_id() -> None:
    store = RetainedStore(BrokerConfig())
    batch = frames_pb2.PublishBatch(topic="a.b", payload_type="t", payloads=[b"1", b"2", b"3"])
    batch.correlation.CopyFrom(new_correlation("c-1"))
    keep(store, batch, Stamp(10, 99))
    event = store.get("a.b")
    assert event is not None
    message = event.message()
    assert (message.payload, message.correlation.correlation_id) == (b"3", "c-1")
    assert (event.stamp.event_id, event.stamp.time_ns, event.stamp.retained) == (12, 99, False)
    assert store.encoded_bytes == message.ByteSize()
    # A batch whose last event is empty clears the topic.
    keep(
        store,
        frames_pb2.PublishBatch(topic="a.b", payload_type="t", payloads=[b"4", b""]),
        Stamp(13, 1),
    )
    assert store.get("a.b") is None


def test_a_full_store_refuses_a_new_topic_but_replaces_and_clears() -> None:
    store = RetainedStore(BrokerConfig(max_retained_events=2))
    keep(store, publish("a.a", b"1"), Stamp(1, 1))
    keep(store, publish("a.b", b"1"), Stamp(2, 1))
    with pytest.raises(LimitExceeded, match="max_retained_events") as refused:
        keep(store, publish("a.c", b"1"), Stamp(3, 1))
    assert refused.value.code == EC.ERROR_CODE_LIMIT_EXCEEDED
    keep(store, publish("a.b", b"2"), Stamp(4, 1))  # replacing is fine
    keep(store, publish("a.c", b""), Stamp(5, 1))  # so is clearing (a topic with none)
    keep(store, publish("a.a", b""), Stamp(6, 1))
    keep(store, publish("a.c", b"1"), Stamp(7, 1))  # room again
    assert [e.topic for e in store] == ["a.b", "a.c"]


def test_the_byte_bound_counts_the_replaced_event_out() -> None:
    small = publish("a.a", b"x" * 130)
    limit = retained_cost(small.ByteSize()) + retained_cost(publish("a.b", b"x" * 200).ByteSize())
    store = RetainedStore(BrokerConfig(max_retained_bytes=limit))
    keep(store, small, Stamp(1, 1))
    keep(store, publish("a.b", b"x" * 200), Stamp(2, 1))
    assert store.bytes == limit
    with pytest.raises(LimitExceeded, match="max_retained_bytes"):
        keep(store, publish("a.b", b"x" * 201), Stamp(3, 1))  # one byte more than it replaces
    keep(store, publish("a.b", b"x" * 150), Stamp(4, 1))
    keep(store, publish("a.a", b"x" * 180), Stamp(5, 1))  # the 50 bytes a.b gave back
    assert store.bytes == limit
    assert store.get("a.b") is not None
    with pytest.raises(LimitExceeded):
        keep(store, publish("a.c", b"x"), Stamp(6, 1))


def test_matching_finds_topics_by_filter() -> None:
    store = RetainedStore(BrokerConfig())
    for n, topic in enumerate(("control.health.status", "control.collector.config"), 1):
        keep(store, publish(topic, b"1"), Stamp(n, 1))
    assert [e.topic for e in store.matching("#")] == [
        "control.health.status",
        "control.collector.config",
    ]
    assert [e.topic for e in store.matching("control.+.config")] == ["control.collector.config"]
    assert [e.topic for e in store.matching("control.health.status")] == ["control.health.status"]
    assert list(store.matching("control.health")) == []
    assert list(store.matching("events.#")) == []


# -- the router ---------------------------------------------------------------------------------


class Sink:
    """Records what it is handed: (subscription, first sequence, count, payloads, stamp)."""

    def __init__(self) -> None:
        self.got: list[tuple[int, int, int, tuple[bytes, ...], Stamp]] = []

    def enqueue(
        self,
        sub: SubscriptionEntry,
        message: Published,
        data: bytes,
        first: int,
        count: int,
        lossless: bool,
        stamp: Stamp,
    ) -> int:
        payloads = (
            tuple(message.payloads)
            if isinstance(message, frames_pb2.PublishBatch)
            else (message.payload,)
        )
        self.got.append((sub.subscription_id, first, count, payloads, stamp))
        return 1

    def resume(self) -> None:
        pass


def endpoint(identity: Identity) -> tuple[Endpoint, Sink]:
    sink = Sink()
    return Endpoint(sink, identity=identity), sink


def test_the_router_retains_declared_topics_only_and_replays_them_numbered() -> None:
    router = Router(BrokerConfig())
    agent, _ = endpoint(AGENT_ID)
    procmond, _ = endpoint(PROCMOND_ID)
    router.route(agent, build_publish(CONFIG, config(1)))
    router.route(procmond, build_publish(LIFECYCLE, events_pb2.ProcessEvent(pid=1)))
    assert [e.topic for e in router.retained] == [CONFIG.name]
    collector, sink = endpoint(PROCMOND_ID)
    sub = router.subscribe(collector, 1, "control.#")
    assert router.retained.replay(sub) == 1
    ((sid, first, count, payloads, stamp),) = sink.got
    assert (sid, first, count) == (1, 1, 1)
    assert control_pb2.ConfigurationUpdate.FromString(payloads[0]) == config(1)
    assert (stamp.event_id, stamp.retained) == (1, True)
    # The next live event follows in the subscription's sequence.
    router.route(agent, build_publish(CONFIG, config(2)))
    assert [(g[1], g[4].event_id, g[4].retained) for g in sink.got] == [(1, 1, True), (2, 3, False)]
    assert (sub.sequence, sub.delivered) == (2, 2)
    assert router.topic_counts()[CONFIG.name].delivered == 2


def test_a_batch_on_a_retained_topic_retains_its_last_event() -> None:
    router = Router(BrokerConfig())
    agent, _ = endpoint(AGENT_ID)
    batch = frames_pb2.PublishBatch(
        topic=CONFIG.name,
        payload_type=CONFIG.payload_name,
        payloads=[config(v).SerializeToString() for v in (1, 2, 3)],
    )
    procmond, _ = endpoint(PROCMOND_ID)
    router.route(procmond, build_publish(LIFECYCLE, events_pb2.ProcessEvent(pid=1)))  # id 1
    router.route(agent, batch)  # ids 2, 3, 4
    reader, sink = endpoint(PROCMOND_ID)
    router.retained.replay(router.subscribe(reader, 1, CONFIG.name))
    ((_, _, _, payloads, stamp),) = sink.got
    assert control_pb2.ConfigurationUpdate.FromString(payloads[0]).config_version == 3
    assert (stamp.event_id, stamp.retained) == (4, True)


def test_replay_applies_the_control_rule_access_and_the_correlation_filter() -> None:
    router = Router(BrokerConfig())
    agent, _ = endpoint(AGENT_ID)
    router.route(agent, build_publish(CONFIG, config(1), new_correlation("cfg-1")))
    router.route(agent, build_publish(STATUS, status("ok")))
    router.route(agent, build_publish(POLICY, control_pb2.PolicyUpdate(policy_id="p")))

    def replayed(identity: Identity, filter: str, **kwargs: Any) -> list[str]:
        ep, sink = endpoint(identity)
        sub = router.subscribe(ep, 1, filter, **kwargs)
        router.retained.replay(sub)
        topics = []
        for _, _, _, payloads, _ in sink.got:
            (event,) = [e for e in router.retained if e.message().payload == payloads[0]]
            topics.append(event.topic)
        return topics

    # '#' wants no control topics unless asked.
    assert replayed(PROCMOND_ID, "#") == []
    assert replayed(PROCMOND_ID, "#", include_control=True) == [
        CONFIG.name,
        STATUS.name,
        POLICY.name,
    ]
    # An anonymous peer reads only the public status; the agent reads what it subscribes to.
    assert replayed(ANONYMOUS_ID, "#", include_control=True) == [STATUS.name]
    assert replayed(ANONYMOUS_ID, "control.health.+") == [STATUS.name]
    # The agent does not read collector configuration, only the status and policy.
    assert replayed(AGENT_ID, "control.#") == [STATUS.name, POLICY.name]
    # The correlation filter, as for a live event (no metadata: no match for a filter).
    only = CorrelationFilter(correlation_ids=["cfg-1"])
    other = CorrelationFilter(correlation_ids=["cfg-2"])
    assert replayed(PROCMOND_ID, "control.#", correlation_filter=only) == [CONFIG.name]
    assert replayed(PROCMOND_ID, "control.#", correlation_filter=other) == []


def test_a_publish_the_store_cannot_keep_is_refused_whole() -> None:
    router = Router(BrokerConfig(max_retained_events=1))
    agent, _ = endpoint(AGENT_ID)
    reader, sink = endpoint(PROCMOND_ID)
    router.subscribe(reader, 1, "control.#")
    router.route(agent, build_publish(STATUS, status("ok")))
    with pytest.raises(LimitExceeded, match="max_retained_events") as refused:
        router.route(agent, build_publish(CONFIG, config(1)))
    assert refused.value.code == EC.ERROR_CODE_LIMIT_EXCEEDED
    assert len(sink.got) == 1  # the refused event went to no one
    assert router.refusals() == {EC.ERROR_CODE_LIMIT_EXCEEDED: 1}
    assert router.topic_counts()[CONFIG.name].published == 0
    router.route(agent, build_publish(STATUS, status("still ok")))  # replacing: fine
    router.route(agent, build_publish(STATUS, control_pb2.ComponentStatus()))  # clears
    router.route(agent, build_publish(CONFIG, config(1)))  # room again
    assert [e.topic for e in router.retained] == [CONFIG.name]
    assert len(sink.got) == 4


# -- the broker -------------------------------------------------------------------------------


async def _worker(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, str(WORKERS), *args, stdout=asyncio.subprocess.PIPE, env=worker_env()
    )


async def _line(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 20)
    assert line, "the worker ended early"
    record: dict[str, Any] = json.loads(line)
    return record


async def test_a_late_subscriber_in_another_process_gets_the_retained_config_first(
    broker: Broker, sock_path: str
) -> None:
    async with Client(sock_path, component=AGENT) as agent:
        await agent.publish(CONFIG, config(1))
        await agent.publish(CONFIG, config(2))  # replaces the first
        await agent.flush()
        first_id = broker.statistics().published  # ids count every accepted event
        proc = await _worker(
            "watch", "--socket", sock_path, "--component", PROCMOND, "--filter", CONFIG.name,
            "--count", "2",
        )  # fmt: skip
        try:
            assert (await _line(proc))["ready"]
            retained = await _line(proc)
            await agent.publish(CONFIG, config(3))
            live = await _line(proc)
            assert (await _line(proc))["done"] == 2
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
    assert retained["retained"] is True
    assert retained["seq"] == 1
    assert retained["payload"]["configVersion"] == "2"
    assert 0 < retained["eid"] <= first_id
    assert (live["retained"], live["seq"], live["payload"]["configVersion"]) == (False, 2, "3")
    assert live["eid"] > retained["eid"]
    assert live["at"] >= retained["at"]


async def test_an_anonymous_peer_gets_the_public_retained_status_but_never_the_config(
    broker: Broker, sock_path: str
) -> None:
    async with Client(sock_path, component=AGENT) as agent:
        await agent.publish(CONFIG, config(1))
        await agent.publish(STATUS, status("ok"))
        await agent.publish(POLICY, control_pb2.PolicyUpdate(policy_id="p"))
        await agent.flush()
    async with (
        Client(sock_path) as anonymous,
        await anonymous.subscribe("#", include_control=True) as sub,
    ):
        event = await sub.get(timeout=5)
        assert (event.topic, event.retained, event.sequence) == (STATUS.name, True, 1)
        assert event.message() == status("ok")
        await anonymous.flush()
        with pytest.raises(RequestTimeout):
            await sub.get(timeout=0.2)


async def test_the_correlation_filter_applies_to_retained_delivery(
    broker: Broker, sock_path: str
) -> None:
    async with Client(sock_path, component=AGENT) as agent:
        await agent.publish(CONFIG, config(1), correlation=new_correlation("rollout-7"))
        await agent.flush()
    async with Client(sock_path, component=PROCMOND) as collector:
        other = await collector.subscribe(
            CONFIG, correlation_filter=CorrelationFilter(correlation_ids=["rollout-8"])
        )
        same = await collector.subscribe(
            CONFIG, correlation_filter=CorrelationFilter(correlation_id_patterns=["rollout-*"])
        )
        event = await same.get(timeout=5)
        assert event.retained
        assert event.correlation is not None
        assert event.correlation.correlation_id == "rollout-7"
        await collector.flush()
        with pytest.raises(RequestTimeout):
            await other.get(timeout=0.2)


async def test_an_empty_payload_clears_the_retained_event_and_is_delivered_live(
    broker: Broker, sock_path: str
) -> None:
    async with (
        Client(sock_path, component=AGENT) as agent,
        Client(sock_path, component=PROCMOND) as collector,
    ):
        await agent.publish(CONFIG, config(1))
        await agent.flush()
        sub = await collector.subscribe(CONFIG)
        assert (await sub.get(timeout=5)).retained
        assert broker.statistics().retained_events == 1
        await agent.publish(CONFIG, control_pb2.ConfigurationUpdate())  # empty: clears
        cleared = await sub.get(timeout=5)
        assert (cleared.payload, cleared.retained) == (b"", False)
        stats = await agent.broker_statistics()
        assert (stats.retained_events, stats.retained_bytes) == (0, 0)
        late = await collector.subscribe(CONFIG)
        await collector.flush()
        with pytest.raises(RequestTimeout):
            await late.get(timeout=0.2)


async def test_a_full_store_refuses_the_publish_with_limit_exceeded(sock_path: str) -> None:
    errors: list[EventBusError] = []
    async with (
        Broker(sock_path, replace(TEST_CONFIG, max_retained_events=1)) as broker,
        Client(sock_path, component=AGENT) as agent,
        Client(sock_path, component=PROCMOND) as collector,
    ):
        agent.on_error = errors.append
        live = await collector.subscribe("control.#")
        await agent.publish(STATUS, status("ok"))
        await agent.publish(CONFIG, config(1))  # a second retained topic: refused
        await agent.publish(STATUS, status("better"))  # replaces: fine
        await agent.flush()
        (error,) = errors
        assert isinstance(error, LimitExceeded)
        assert error.code == EC.ERROR_CODE_LIMIT_EXCEEDED
        assert "max_retained_events" in str(error)
        got = [await live.get(timeout=5) for _ in range(2)]
        assert [e.topic for e in got] == [STATUS.name, STATUS.name]
        stats = broker.statistics()
        assert stats.retained_events == 1
        assert stats.retained_bytes == broker.router.retained.encoded_bytes > 0


async def test_an_in_process_subscriber_gets_retained_events_first(
    broker: Broker, sock_path: str
) -> None:
    async with Client(sock_path, component=AGENT) as agent:
        await agent.publish(STATUS, status("ok"))
        await agent.flush()
    local = broker.local_session("agent", AGENT)
    sub = await local.subscribe(STATUS)
    event = await sub.get(timeout=5)
    assert (event.retained, event.sequence, event.message()) == (True, 1, status("ok"))
    # And what an in-process publisher retains, a socket subscriber gets.
    await local.publish(STATUS, status("from the agent"))
    async with (
        Client(sock_path) as anonymous,
        await anonymous.subscribe(STATUS) as remote,
    ):
        event = await remote.get(timeout=5)
        assert (event.retained, event.message()) == (True, status("from the agent"))
    await local.close()


async def test_statistics_and_metrics_report_the_retained_events(
    broker: Broker, sock_path: str
) -> None:
    async with Client(sock_path, component=AGENT) as agent:
        await agent.publish(STATUS, status("ok"))
        await agent.publish(CONFIG, config(1))
        await agent.flush()
        stats = await agent.broker_statistics()
    store = broker.router.retained
    assert stats.retained_events == 2
    assert stats.retained_bytes == store.encoded_bytes
    assert store.bytes == store.encoded_bytes + 2 * RETAINED_COST
    from prometheus_client import generate_latest

    text = generate_latest(broker.metrics_registry()).decode()
    assert "daemoneye_eventbus_retained_events 2.0" in text
    assert f"daemoneye_eventbus_retained_bytes {float(store.encoded_bytes)}" in text
