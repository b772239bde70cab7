"""The reference API (``daemoneye_eventbus.bus``): in process and over the socket."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import AGENT, PROCMOND, TEST_CONFIG, peer_published, worker_env

from daemoneye.eventbus.v1 import control_pb2, events_pb2, registry
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationFilter
from daemoneye.eventbus.v1.events_pb2 import CollectionEvent, ProcessEvent, ProcessEventKind
from daemoneye_eventbus.broker import Broker, BrokerConfig, BrokerStatistics
from daemoneye_eventbus.bus import (
    DEFAULT_EVENT_PATTERNS,
    BusEvent,
    DaemoneyeBroker,
    DaemoneyeEventBus,
    EventBus,
    EventReceiver,
    EventSubscription,
    topic_for_event,
)
from daemoneye_eventbus.correlation import new_correlation
from daemoneye_eventbus.errors import (
    ClosedResourceError,
    ConnectionClosed,
    EventBusError,
    InvalidTopic,
    RequestTimeout,
    SubscriptionExists,
    UnknownSubscription,
)

MODES = ["local", "socket"]
#: Generous: these waits only end early when something is wrong.
WAIT = 5.0

# What the reference API promises, written out rather than read from bus.py.
KIND_TOPICS: dict[ProcessEventKind.ValueType, str] = {
    ProcessEventKind.PROCESS_EVENT_KIND_UNSPECIFIED: "events.process.lifecycle",
    ProcessEventKind.PROCESS_EVENT_KIND_START: "events.process.lifecycle",
    ProcessEventKind.PROCESS_EVENT_KIND_STOP: "events.process.lifecycle",
    ProcessEventKind.PROCESS_EVENT_KIND_EXIT: "events.process.lifecycle",
    ProcessEventKind.PROCESS_EVENT_KIND_SNAPSHOT: "events.process.lifecycle",
    ProcessEventKind.PROCESS_EVENT_KIND_METADATA_UPDATE: "events.process.metadata",
    ProcessEventKind.PROCESS_EVENT_KIND_TREE_CHANGE: "events.process.tree",
    ProcessEventKind.PROCESS_EVENT_KIND_INTEGRITY_CHECK: "events.process.integrity",
    ProcessEventKind.PROCESS_EVENT_KIND_ANOMALY: "events.process.anomaly",
}

ROUTES: list[tuple[str, CollectionEvent, str]] = [
    *(
        (
            f"process-{ProcessEventKind.Name(kind).removeprefix('PROCESS_EVENT_KIND_').lower()}",
            CollectionEvent(process=ProcessEvent(pid=100 + kind, name="p", kind=kind)),
            topic,
        )
        for kind, topic in KIND_TOPICS.items()
    ),
    (
        "network",
        CollectionEvent(network=events_pb2.NetworkEvent(local_port=443)),
        "events.network.connections",
    ),
    (
        "filesystem",
        CollectionEvent(filesystem=events_pb2.FilesystemEvent(path="/etc/passwd")),
        "events.filesystem.changes",
    ),
    (
        "performance",
        CollectionEvent(performance=events_pb2.PerformanceEvent(process_count=7)),
        "events.performance.metrics",
    ),
    (
        "process_batch",
        CollectionEvent(
            process_batch=events_pb2.ProcessBatch(processes=[ProcessEvent(pid=1, name="init")])
        ),
        "events.process.batch",
    ),
]


#: Process events of this kind go to events.process.anomaly, a public topic: any peer
#: may publish and receive them. Used where one socket bus both publishes and
#: receives, since no component may do both on the restricted process topics.
ANOMALY = ProcessEventKind.PROCESS_EVENT_KIND_ANOMALY


def proc_event(
    pid: int, kind: ProcessEventKind.ValueType = ProcessEventKind.PROCESS_EVENT_KIND_UNSPECIFIED
) -> CollectionEvent:
    return CollectionEvent(process=ProcessEvent(pid=pid, name=f"p{pid}", kind=kind))


def publisher_of(topic: str) -> str:
    """The component the schema lets publish on ``topic`` ("" for a public topic)."""
    declared = registry.lookup(topic)
    assert declared is not None, topic
    assert len(declared.publishers) <= 1, topic
    return next(iter(declared.publishers), "")


def pid_of(event: BusEvent) -> int:
    assert event.event is not None
    assert event.event.WhichOneof("event") == "process"
    return event.event.process.pid


@asynccontextmanager
async def open_bus(
    mode: str, broker: Broker, component: str = "", **kwargs: Any
) -> AsyncIterator[DaemoneyeEventBus]:
    """An in-process bus on ``broker`` or one connected to its socket.

    Over the socket, the bus claims ``component`` (anonymous if ""); in process,
    the bus is trusted and ``component`` does not apply.
    """
    if mode == "local":
        bus = await DaemoneyeEventBus.from_broker(broker, **kwargs)
    else:
        bus = await DaemoneyeEventBus.connect(broker.path, component=component, **kwargs)
    try:
        yield bus
    finally:
        await bus.shutdown()


async def sync(bus: DaemoneyeEventBus) -> None:
    """Make sure the broker has routed everything ``bus`` published so far."""
    await bus.flush()


async def recv_until(receiver: EventReceiver, last_pid: int) -> list[BusEvent]:
    """Events up to and including the process event with ``last_pid`` (a sentinel)."""
    out: list[BusEvent] = []
    while True:
        event = await receiver.recv(timeout=WAIT)
        out.append(event)
        which = None if event.event is None else event.event.WhichOneof("event")
        if which == "process" and event.event is not None and event.event.process.pid == last_pid:
            return out


# -- protocol ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_both_buses_are_event_buses(broker: Broker, mode: str) -> None:
    async with open_bus(mode, broker) as bus:
        assert isinstance(bus, EventBus)


async def test_daemoneye_broker(sock_path: str) -> None:
    broker = await DaemoneyeBroker.new(sock_path, TEST_CONFIG)
    async with broker:
        assert broker.path == sock_path
        assert os.path.exists(sock_path)
        async with await DaemoneyeEventBus.from_broker(broker) as bus:
            receiver = await bus.subscribe(EventSubscription("s"))
            await bus.publish(proc_event(1))
            assert pid_of(await receiver.recv(timeout=WAIT)) == 1
        assert broker.statistics().published == 1
    assert not os.path.exists(sock_path)


def test_constructor_needs_exactly_one_backend() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        DaemoneyeEventBus()


# -- routing by event type -------------------------------------------------------------------


def test_every_process_kind_has_a_route() -> None:
    assert set(KIND_TOPICS) == set(ProcessEventKind.values())
    oneof = CollectionEvent.DESCRIPTOR.oneofs_by_name["event"]
    assert {f.name for f in oneof.fields} == {
        "process",
        "network",
        "filesystem",
        "performance",
        "process_batch",
    }


@pytest.mark.parametrize(("event", "topic"), [r[1:] for r in ROUTES], ids=[r[0] for r in ROUTES])
def test_topic_for_event(event: CollectionEvent, topic: str) -> None:
    declared, payload = topic_for_event(event)
    assert declared.name == topic
    assert declared is registry.lookup(topic)
    which = event.WhichOneof("event")
    assert which is not None
    assert payload == getattr(event, which)
    assert isinstance(payload, declared.payload_type)


def test_topic_for_empty_event() -> None:
    with pytest.raises(ValueError, match="no event"):
        topic_for_event(CollectionEvent())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("event", "topic"), [r[1:] for r in ROUTES], ids=[r[0] for r in ROUTES])
async def test_publish_routes_by_type_and_kind(
    broker: Broker, mode: str, event: CollectionEvent, topic: str
) -> None:
    async with (
        open_bus("local", broker) as observer,
        open_bus(mode, broker, publisher_of(topic)) as bus,
    ):
        everything = await observer.subscribe(EventSubscription("all", ["#"]))
        exact = await observer.subscribe(EventSubscription("exact", [topic]))
        await bus.publish(event, "route-1")
        for receiver in (everything, exact):
            got = await receiver.recv(timeout=WAIT)
            assert got.topic == topic
            assert got.event == event
            assert got.correlation is not None
            assert got.correlation.correlation_id == "route-1"
            assert got.subscriber_id == receiver.subscriber_id
    assert peer_published(broker.statistics()) == 1


# -- in process <-> socket ---------------------------------------------------------------------


@pytest.mark.parametrize(("pub_mode", "sub_mode"), [("local", "socket"), ("socket", "local")])
async def test_cross_transport_delivery(broker: Broker, pub_mode: str, sub_mode: str) -> None:
    async with (
        open_bus(sub_mode, broker, AGENT) as sub_bus,
        open_bus(pub_mode, broker, PROCMOND) as pub_bus,
    ):
        receiver = await sub_bus.subscribe(EventSubscription("sub", ["events.process.#"]))
        meta = new_correlation("wf-7")
        await pub_bus.publish(proc_event(1, ProcessEventKind.PROCESS_EVENT_KIND_START), "corr-1")
        await pub_bus.publish(proc_event(2, ProcessEventKind.PROCESS_EVENT_KIND_ANOMALY), meta)
        await pub_bus.publish(proc_event(3))
        first, second, third = [await receiver.recv(timeout=WAIT) for _ in range(3)]
    assert (first.topic, second.topic, third.topic) == (
        "events.process.lifecycle",
        "events.process.anomaly",
        "events.process.lifecycle",
    )
    assert [pid_of(e) for e in (first, second, third)] == [1, 2, 3]
    assert first.event is not None
    assert first.event.process.kind == ProcessEventKind.PROCESS_EVENT_KIND_START
    assert isinstance(first.message, ProcessEvent)
    assert first.message == first.event.process
    assert first.correlation is not None
    assert first.correlation.correlation_id == "corr-1"
    assert first.correlation.root_correlation_id == "corr-1"
    assert second.correlation == meta
    assert third.correlation is None
    assert [first.sequence, second.sequence, third.sequence] == [1, 2, 3]
    assert {e.subscriber_id for e in (first, second, third)} == {"sub"}


# -- subscriptions ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_correlation_filter_applied(broker: Broker, mode: str) -> None:
    async with open_bus(mode, broker, AGENT) as bus, open_bus("local", broker) as pub:
        receiver = await bus.subscribe(
            EventSubscription("wanted", correlation_filter=CorrelationFilter(correlation_ids=["a"]))
        )
        await pub.publish(proc_event(1), "a")
        await pub.publish(proc_event(2), "b")
        await pub.publish(proc_event(3))
        await pub.publish(proc_event(4), new_correlation("a"))
        await pub.publish(proc_event(5), "a")  # the sentinel: order is kept
        got = await recv_until(receiver, 5)
    assert [pid_of(e) for e in got] == [1, 4, 5]
    assert {e.correlation.correlation_id for e in got if e.correlation} == {"a"}
    assert [e.sequence for e in got] == [1, 2, 3]  # the broker never queued the others


@pytest.mark.parametrize("mode", MODES)
async def test_control_topics_need_include_control(broker: Broker, mode: str) -> None:
    async with open_bus(mode, broker, AGENT) as bus, open_bus("local", broker) as pub:
        plain = await bus.subscribe(EventSubscription("plain", ["#"]))
        control = await bus.subscribe(EventSubscription("control", ["#"], include_control=True))
        default = await bus.subscribe(EventSubscription("default"))
        heartbeat = control_pb2.Heartbeat(component_id="procmond", sequence=9)
        await pub.publish_to(registry.CONTROL_HEALTH_HEARTBEAT, heartbeat)
        await pub.publish(proc_event(1))
        plain_got = await recv_until(plain, 1)
        control_got = await recv_until(control, 1)
        default_got = await recv_until(default, 1)
    assert [e.topic for e in plain_got] == ["events.process.lifecycle"]
    assert [e.topic for e in default_got] == ["events.process.lifecycle"]
    assert [e.topic for e in control_got] == [
        "control.health.heartbeat",
        "events.process.lifecycle",
    ]
    hb = control_got[0]
    assert hb.event is None  # a control message is not a CollectionEvent
    assert hb.message == heartbeat


@pytest.mark.parametrize("mode", MODES)
async def test_explicit_control_pattern(broker: Broker, mode: str) -> None:
    async with open_bus(mode, broker) as bus, open_bus("local", broker) as pub:
        receiver = await bus.subscribe(EventSubscription("health", ["control.health.#"]))
        await pub.publish_to(registry.CONTROL_HEALTH_HEARTBEAT, control_pb2.Heartbeat(sequence=1))
        got = await receiver.recv(timeout=WAIT)
    assert got.topic == "control.health.heartbeat"
    assert isinstance(got.message, control_pb2.Heartbeat)


@pytest.mark.parametrize("mode", MODES)
async def test_several_patterns_one_receiver(broker: Broker, mode: str) -> None:
    async with open_bus(mode, broker, AGENT) as bus, open_bus("local", broker) as pub:
        receiver = await bus.subscribe(
            EventSubscription("multi", ["events.network.#", "events.process.anomaly"])
        )
        await pub.publish(CollectionEvent(network=events_pb2.NetworkEvent(local_port=1)))
        await pub.publish(proc_event(1))  # lifecycle: not subscribed
        await pub.publish(CollectionEvent(network=events_pb2.NetworkEvent(local_port=2)))
        await pub.publish(proc_event(2, ProcessEventKind.PROCESS_EVENT_KIND_ANOMALY))
        got = await recv_until(receiver, 2)
        stats = await bus.statistics()
    assert [e.topic for e in got] == [
        "events.network.connections",
        "events.network.connections",
        "events.process.anomaly",
    ]
    assert got[0].event is not None
    assert got[0].event.network.local_port == 1
    assert stats.subscribers == 1
    assert stats.received == 3


def test_default_patterns() -> None:
    assert tuple(DEFAULT_EVENT_PATTERNS) == ("events.#",)
    sub = EventSubscription("x")
    assert tuple(sub.topic_patterns) == ()
    assert sub.correlation_filter is None
    assert sub.include_control is False


async def publish_marker(bus: DaemoneyeEventBus, pub: DaemoneyeEventBus, pid: int) -> None:
    """Publish a process event and wait until a second subscriber of ``bus`` has it.

    The broker routes in order, so by then the subscribers of ``bus`` have been handed
    every event published before it.
    """
    probe = await bus.subscribe(EventSubscription("probe"))
    await pub.publish(proc_event(pid))
    await recv_until(probe, pid)
    await bus.unsubscribe("probe")


@pytest.mark.parametrize("mode", MODES)
async def test_unsubscribe_ends_iteration(broker: Broker, mode: str) -> None:
    async with open_bus(mode, broker, AGENT) as bus, open_bus("local", broker) as pub:
        receiver = await bus.subscribe(EventSubscription("it"))

        async def consume() -> list[int]:
            return [pid_of(e) async for e in receiver]

        consumer = asyncio.create_task(consume())
        await pub.publish(proc_event(1))
        await pub.publish(proc_event(2))
        await publish_marker(bus, pub, 3)
        await bus.unsubscribe("it")  # the consumer is (most likely) waiting in the loop
        pids = await asyncio.wait_for(consumer, WAIT)
        assert pids in ([1, 2], [1, 2, 3])
        with pytest.raises(ClosedResourceError):
            await receiver.recv(timeout=WAIT)
        with pytest.raises(UnknownSubscription):
            await bus.unsubscribe("it")
        assert (await bus.statistics()).subscribers == 0


async def test_unsubscribe_keeps_queued_events(broker: Broker) -> None:
    async with open_bus("local", broker) as bus:
        receiver = await bus.subscribe(EventSubscription("q"))
        for pid in range(3):
            await bus.publish(proc_event(pid))
        await bus.unsubscribe("q")
        await bus.publish(proc_event(99))  # after unsubscribe: not delivered
        assert [pid_of(e) async for e in receiver] == [0, 1, 2]
    assert broker.statistics().subscription_stats == ()


@pytest.mark.parametrize("mode", MODES)
async def test_duplicate_subscriber_id(broker: Broker, mode: str) -> None:
    async with open_bus(mode, broker, AGENT) as bus:
        receiver = await bus.subscribe(EventSubscription("dup", ["events.process.#"]))
        with pytest.raises(SubscriptionExists, match="dup"):
            await bus.subscribe(EventSubscription("dup", ["events.network.#"]))
        assert issubclass(SubscriptionExists, EventBusError)
        # The first subscription is intact and the second left nothing behind.
        await bus.publish(proc_event(1, ANOMALY))
        assert pid_of(await receiver.recv(timeout=WAIT)) == 1
        assert (await bus.statistics()).subscribers == 1
        await sync(bus)
        assert [s.filter for s in broker.statistics().subscription_stats] == ["events.process.#"]


# -- statistics and lifecycle --------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_statistics(broker: Broker, mode: str) -> None:
    async with open_bus(mode, broker, AGENT) as bus:
        empty = await bus.statistics()
        assert (empty.published, empty.received, empty.dropped, empty.subscribers) == (0, 0, 0, 0)
        receiver = await bus.subscribe(EventSubscription("s"))
        for pid in range(3):
            await bus.publish(proc_event(pid, ANOMALY))
        for _ in range(3):
            await receiver.recv(timeout=WAIT)
        stats = await bus.statistics()
    assert stats.published == 3
    assert stats.received == 3
    assert stats.dropped == 0
    assert stats.subscribers == 1
    if mode == "local":
        assert isinstance(stats.broker, BrokerStatistics)
        assert stats.broker.published == 3
        assert stats.broker.delivered == 3
    else:
        assert stats.broker is None


@pytest.mark.parametrize("mode", MODES)
async def test_shutdown_is_idempotent(broker: Broker, mode: str) -> None:
    bus = await (
        DaemoneyeEventBus.from_broker(broker)
        if mode == "local"
        else DaemoneyeEventBus.connect(broker.path, component=AGENT)
    )
    receiver = await bus.subscribe(EventSubscription("s"))
    await bus.shutdown()
    await bus.shutdown()
    assert [e async for e in receiver] == []  # the receiver ended
    with pytest.raises(ClosedResourceError):
        await bus.publish(proc_event(1))
    with pytest.raises(ClosedResourceError):
        await bus.subscribe(EventSubscription("t"))
    async with bus:  # the context manager's shutdown is one more no-op
        pass
    for _ in range(250):
        stats = broker.statistics()
        if stats.connections == 0 and not stats.subscription_stats:
            break
        await asyncio.sleep(0.02)
    assert broker.statistics().connections == 0
    assert broker.statistics().subscription_stats == ()


@pytest.mark.parametrize("mode", MODES)
async def test_shutdown_after_broker_closed(sock_path: str, mode: str) -> None:
    broker = await DaemoneyeBroker.new(sock_path, TEST_CONFIG)
    try:
        async with open_bus(mode, broker.broker, AGENT) as bus:
            receiver = await bus.subscribe(EventSubscription("agent"))
            await broker.shutdown()
            # The receiver ends (over the socket, with the broker's goodbye).
            with pytest.raises(ConnectionClosed):
                await receiver.recv(timeout=WAIT)
            await bus.shutdown()
            with pytest.raises(ClosedResourceError):
                await bus.publish(proc_event(1))
    finally:
        await broker.shutdown()


@pytest.mark.parametrize("mode", MODES)
async def test_failed_subscribe_leaves_nothing_behind(broker: Broker, mode: str) -> None:
    async with open_bus(mode, broker, AGENT) as bus:
        with pytest.raises(InvalidTopic):
            await bus.subscribe(EventSubscription("bad", ["events.process.#", "events.#.x"]))
        assert (await bus.statistics()).subscribers == 0
        await sync(bus)
        assert broker.statistics().subscription_stats == ()
        # The id is free again.
        receiver = await bus.subscribe(EventSubscription("bad", ["events.process.#"]))
        await bus.publish(proc_event(1, ANOMALY))
        assert pid_of(await receiver.recv(timeout=WAIT)) == 1


async def test_slow_local_subscriber_drops(sock_path: str) -> None:
    n, bound = 50, 10
    async with (
        Broker(sock_path, BrokerConfig(max_queue_messages=bound)) as broker,
        open_bus("local", broker) as bus,
    ):
        # At most once: filters that reach no topic declared lossless.
        slow = await bus.subscribe(EventSubscription("slow", ["events.process.lifecycle"]))
        fast = await bus.subscribe(EventSubscription("fast", ["events.process.lifecycle"]))
        fast_pids = []
        for pid in range(n):
            await bus.publish(proc_event(pid))
            fast_pids.append(pid_of(await fast.recv(timeout=WAIT)))
        assert fast_pids == list(range(n))
        assert fast.dropped == 0
        assert slow.dropped == n - bound
        stats = await bus.statistics()
        assert stats.dropped == n - bound
        assert stats.received == n + bound
        assert stats.broker is not None
        assert stats.broker.dropped == n - bound
        assert stats.broker.delivered == n + bound
        # The slow subscriber kept the oldest events, numbered without gaps.
        kept = [slow.queue.get_nowait() for _ in range(bound)]
        assert slow.queue.get_nowait() is None
        assert [e.sequence for e in kept if e is not None] == list(range(1, bound + 1))
        # Once it reads again, new events come through, after a visible gap.
        await bus.publish(proc_event(n))
        event = await slow.recv(timeout=WAIT)
        assert pid_of(event) == n
        assert event.sequence == n + 1


# -- a subscriber in another process ------------------------------------------------------------

SUBSCRIBER_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys

    from daemoneye_eventbus.bus import DaemoneyeEventBus, EventSubscription

    async def main(path: str, count: int) -> None:
        async with await DaemoneyeEventBus.connect(
            path, name="remote-subscriber", component="daemoneye-agent"
        ) as bus:
            receiver = await bus.subscribe(
                EventSubscription("remote", ["events.process.#", "events.network.#"])
            )
            print(json.dumps({"ready": True}), flush=True)
            for _ in range(count):
                event = await receiver.recv(timeout=30)
                assert event.event is not None
                which = event.event.WhichOneof("event")
                print(json.dumps({
                    "topic": event.topic,
                    "which": which,
                    "pid": event.event.process.pid if which == "process" else None,
                    "port": event.event.network.local_port if which == "network" else None,
                    "correlation": event.correlation.correlation_id if event.correlation else None,
                    "sequence": event.sequence,
                }), flush=True)
            stats = await bus.statistics()
            print(json.dumps({"received": stats.received, "dropped": stats.dropped}), flush=True)

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


async def test_subscriber_in_another_process(broker: Broker, tmp_path: Path) -> None:
    script = tmp_path / "subscriber.py"
    script.write_text(SUBSCRIBER_SCRIPT)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        broker.path,
        "3",
        stdout=asyncio.subprocess.PIPE,
        env=worker_env(),
    )
    try:
        assert proc.stdout is not None
        ready = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert json.loads(ready) == {"ready": True}
        async with open_bus("local", broker) as bus:
            await bus.publish(proc_event(10, ProcessEventKind.PROCESS_EVENT_KIND_EXIT), "job-1")
            await bus.publish(CollectionEvent(network=events_pb2.NetworkEvent(local_port=22)))
            await bus.publish(proc_event(11, ProcessEventKind.PROCESS_EVENT_KIND_TREE_CHANGE))
            await bus.publish(CollectionEvent(filesystem=events_pb2.FilesystemEvent(path="/x")))
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()
        raise
    assert proc.returncode == 0
    records = [json.loads(line) for line in out.decode().splitlines()]
    assert records == [
        {
            "topic": "events.process.lifecycle",
            "which": "process",
            "pid": 10,
            "port": None,
            "correlation": "job-1",
            "sequence": 1,
        },
        {
            "topic": "events.network.connections",
            "which": "network",
            "pid": None,
            "port": 22,
            "correlation": None,
            "sequence": 1,
        },
        {
            "topic": "events.process.tree",
            "which": "process",
            "pid": 11,
            "port": None,
            "correlation": None,
            "sequence": 2,
        },
        {"received": 3, "dropped": 0},
    ]


async def test_recv_timeout(broker: Broker) -> None:
    async with open_bus("local", broker) as bus:
        receiver = await bus.subscribe(EventSubscription("idle"))
        with pytest.raises(RequestTimeout):
            await receiver.recv(timeout=0.05)


@pytest.mark.parametrize("mode", MODES)
async def test_a_lossless_subscriber_gets_every_event_of_a_faster_publisher(
    broker: Broker, mode: str
) -> None:
    n = 3000
    # A small client queue over the socket (in process, the broker's queue
    # bound): without lossless delivery the slow receiver would lose events.
    small = {"max_pending": 100} if mode == "socket" else {}
    async with (
        open_bus(mode, broker, AGENT, **small) as agent,
        open_bus(mode, broker, PROCMOND) as collector,
    ):
        receiver = await agent.subscribe(
            EventSubscription("slow", ["events.process.lifecycle"], lossless=True)
        )

        async def publish() -> None:
            for pid in range(n):
                await collector.publish(proc_event(pid))
            await collector.flush()

        publishing = asyncio.create_task(publish())
        pids = []
        for count in range(n):
            pids.append(pid_of(await receiver.recv(timeout=WAIT)))
            if count % 300 == 299:
                await asyncio.sleep(0.02)  # slower than the publisher
        await publishing
    assert pids == list(range(n))
    assert receiver.dropped == 0
