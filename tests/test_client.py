"""The client's parts on their own, the client against a real broker, and the
in-process session that offers the same shape.

``PendingRequests`` and ``RequestKey`` are tested alone; the
``PublishWriter`` over a real connection, watched from a raw subscriber that
sees the frames the broker delivers; the ``Client`` against the ``broker``
fixture; and one body runs over both a ``Client`` and a ``LocalSession``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from conftest import AGENT, PROCMOND, TEST_CONFIG, peer_published, pid_of, proc
from rawpeer import RawPeer, kind

from daemoneye.eventbus.v1 import events_pb2, frames_pb2, registry
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode, Frame
from daemoneye_eventbus.broker import Broker
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.client.requests import PendingRequests, RequestKey, RequestKind
from daemoneye_eventbus.correlation import new_correlation
from daemoneye_eventbus.delivery import ReceivedEvent
from daemoneye_eventbus.errors import (
    AccessDenied,
    BrokenResourceError,
    ClosedResourceError,
    ConnectionClosed,
    EventBusError,
    InvalidTopic,
    LimitExceeded,
    PayloadTypeMismatch,
)
from daemoneye_eventbus.sessions import LocalSession
from daemoneye_eventbus.subscription import Subscription

EC = ErrorCode
LIFECYCLE = registry.EVENTS_PROCESS_LIFECYCLE
#: Public: anonymous peers may publish and read it.
ANOMALY = registry.EVENTS_PROCESS_ANOMALY
PROCESS_EVENT = LIFECYCLE.payload_name


def queued(sub: Subscription[Any]) -> list[ReceivedEvent[Any]]:
    out = []
    while (event := sub.get_nowait()) is not None:
        out.append(event)
    return out


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``check()`` holds, polling (the state is in the library's objects)."""
    async with asyncio.timeout(timeout):
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def delivered(frame: Frame) -> tuple[int, list[int]]:
    """The first sequence number and the pids of a Deliver or DeliverBatch frame."""
    if kind(frame) == "deliver":
        payloads = [frame.deliver.publish.payload]
        first = frame.deliver.sequence
    else:
        assert kind(frame) == "deliver_batch", frame
        payloads = list(frame.deliver_batch.batch.payloads)
        first = frame.deliver_batch.first_sequence
    return first, [events_pb2.ProcessEvent.FromString(p).pid for p in payloads]


# -- PendingRequests and RequestKey --------------------------------------------------------------


def test_request_keys_compare_by_kind_and_id() -> None:
    key = RequestKey(RequestKind.SUBSCRIBE, 1)
    assert key == RequestKey(RequestKind.SUBSCRIBE, 1)
    assert hash(key) == hash(RequestKey(RequestKind.SUBSCRIBE, 1))
    assert key != RequestKey(RequestKind.UNSUBSCRIBE, 1)
    assert key != RequestKey(RequestKind.SUBSCRIBE, 2)
    table = {key: "a", RequestKey(RequestKind.UNSUBSCRIBE, 1): "b"}
    assert table[RequestKey(RequestKind.SUBSCRIBE, 1)] == "a"
    assert len({RequestKey(k, 1) for k in RequestKind}) == len(RequestKind) == 5


async def test_pending_request_is_resolved_by_its_own_key_only() -> None:
    pending = PendingRequests()
    fut = pending.open(RequestKey(RequestKind.SUBSCRIBE, 1))
    assert len(pending) == 1
    pending.resolve(RequestKey(RequestKind.UNSUBSCRIBE, 1), "other kind")
    pending.resolve(RequestKey(RequestKind.SUBSCRIBE, 2), "other id")
    assert not fut.done()
    pending.resolve(RequestKey(RequestKind.SUBSCRIBE, 1), "ack")  # a key built anew
    assert await fut == "ack"
    assert len(pending) == 0
    pending.resolve(RequestKey(RequestKind.SUBSCRIBE, 1), "late")  # nobody waits: ignored
    assert fut.result() == "ack"


async def test_pending_request_rejected() -> None:
    pending = PendingRequests()
    key = RequestKey(RequestKind.SUBSCRIBE, 3)
    fut = pending.open(key)
    error = AccessDenied("no", code=EC.ERROR_CODE_ACCESS_DENIED)
    assert pending.reject(key, error) is True
    with pytest.raises(AccessDenied) as info:
        await fut
    assert info.value is error
    assert len(pending) == 0
    # Absent now, or never opened: False, so the caller handles the error otherwise.
    assert pending.reject(key, error) is False
    assert pending.reject(RequestKey(RequestKind.PING, 3), error) is False


async def test_pending_request_whose_waiter_gave_up() -> None:
    pending = PendingRequests()
    a = pending.open(RequestKey(RequestKind.PING, 1))
    b = pending.open(RequestKey(RequestKind.PING, 2))
    a.cancel()
    b.cancel()
    pending.resolve(RequestKey(RequestKind.PING, 1), None)  # no InvalidStateError
    assert pending.reject(RequestKey(RequestKind.PING, 2), EventBusError("late")) is False
    assert len(pending) == 0


async def test_pending_requests_fail_all() -> None:
    pending = PendingRequests()
    waiting = [pending.open(RequestKey(RequestKind.STATS, i)) for i in range(3)]
    answered = pending.open(RequestKey(RequestKind.STATS, 9))
    answered.set_result("early")
    pending.fail_all(BrokenResourceError("gone"))
    assert len(pending) == 0
    for fut in waiting:
        with pytest.raises(BrokenResourceError, match="gone"):
            await fut
    assert answered.result() == "early"
    pending.fail_all(BrokenResourceError("again"))  # nothing left: nothing happens


async def test_pending_request_discarded() -> None:
    pending = PendingRequests()
    key = RequestKey(RequestKind.UNSUBSCRIBE, 4)
    fut = pending.open(key)
    pending.discard(key)
    pending.discard(key)  # again: fine
    assert len(pending) == 0
    pending.resolve(key, None)
    assert pending.reject(key, EventBusError("x")) is False
    assert not fut.done()  # discarding forgets the request, it does not answer it
    fut.cancel()


# -- the publish writer over a real connection ----------------------------------------------------


async def test_a_loop_turn_of_publishes_travels_as_one_event_then_one_batch(
    broker: Broker, sock_path: str
) -> None:
    async with (
        await RawPeer.connect(sock_path, accept_batches=True) as watcher,
        Client(sock_path, name="publisher") as pub,
    ):
        await watcher.send(
            Frame(subscribe=frames_pb2.Subscribe(subscription_id=1, filter=ANOMALY.name))
        )
        await watcher.expect("subscribe_ack")
        writer = pub._writer
        pub.publish_nowait(ANOMALY, proc(0))
        assert writer.waiting_bytes == 0  # the turn's first event went to the socket at once
        for pid in range(1, 100):
            pub.publish_nowait(ANOMALY, proc(pid))
        assert writer.waiting_bytes > 0  # the rest waits for the end of the turn
        await asyncio.sleep(0)
        assert writer.waiting_bytes == 0  # ... and left then, as one batch
        # That turn ended with a batch: while the burst goes on, a turn's first
        # event waits for the rest of its turn too.
        pub.publish_nowait(ANOMALY, proc(100))
        assert writer.waiting_bytes > 0
        for pid in range(101, 110):
            pub.publish_nowait(ANOMALY, proc(pid))
        assert await pub.flush() >= 0
        assert pub.statistics().published == 110
        assert peer_published(broker.statistics()) == 110
        # The broker forwards each event or batch whole, as it received them.
        frames = [delivered(await watcher.recv()) for _ in range(3)]
        assert frames == [
            (1, [0]),
            (2, list(range(1, 100))),
            (101, list(range(100, 110))),
        ]
        # A control frame (the flush's ping) ended the burst: a lone event leaves at once.
        pub.publish_nowait(ANOMALY, proc(110))
        assert writer.waiting_bytes == 0
        await pub.flush()
        assert delivered(await watcher.recv()) == (111, [110])


async def test_publishes_on_several_topics_in_one_turn_keep_their_order(
    broker: Broker, sock_path: str
) -> None:
    async with (
        Client(sock_path, component=AGENT) as agent,
        Client(sock_path, component=PROCMOND) as procmond,
    ):
        sub = await agent.subscribe("events.process.#")
        topics = [LIFECYCLE, ANOMALY, ANOMALY, LIFECYCLE, LIFECYCLE, ANOMALY]
        for pid, topic in enumerate(topics):
            procmond.publish_nowait(topic, proc(pid))
        await procmond.flush()
        got = [await sub.get(timeout=3) for _ in topics]
        assert [(e.topic, pid_of(e)) for e in got] == [
            (t.name, pid) for pid, t in enumerate(topics)
        ]
        assert [e.sequence for e in got] == list(range(1, len(topics) + 1))


async def test_flush_is_a_round_trip(broker: Broker, sock_path: str) -> None:
    async with Client(sock_path) as client:
        rtt = await client.flush()
        assert isinstance(rtt, float)
        assert 0 <= rtt < 5
        assert isinstance(await client.ping(), float)


async def test_publish_nowait_refuses_when_bytes_wait(broker: Broker, sock_path: str) -> None:
    async with Client(sock_path, max_buffer_bytes=0) as client:
        # The first event leaves at once; the second waits in the turn's batch; the
        # third finds those bytes waiting.
        client.publish_nowait(ANOMALY, proc(0))
        client.publish_nowait(ANOMALY, proc(1))
        with pytest.raises(LimitExceeded, match="wait to be written"):
            client.publish_nowait(ANOMALY, proc(2))
        assert client.statistics().published == 2
        await client.flush()  # the turn ended and the bytes left: room again
        client.publish_nowait(ANOMALY, proc(2))
        await client.flush()
        assert peer_published(broker.statistics()) == 3


# -- the client against a broker ------------------------------------------------------------------


async def test_refused_publish_arrives_through_on_error(broker: Broker, sock_path: str) -> None:
    errors: list[EventBusError] = []
    async with (
        Client(sock_path, component=AGENT) as agent,
        Client(sock_path, name="anonymous") as anon,
    ):
        sub = await agent.subscribe("events.process.#")
        anon.on_error = errors.append
        await anon.publish(LIFECYCLE, proc(1))  # restricted: only procmond publishes it
        await anon.flush()  # the refusal came before the answer to this
        assert len(errors) == 1
        error = errors[0]
        assert isinstance(error, AccessDenied)
        assert error.code == EC.ERROR_CODE_ACCESS_DENIED
        assert anon.last_error is error
        assert anon.statistics().refused == 1
        # Not fatal: the connection serves on, and the refused event reached nobody.
        assert anon.is_connected
        await anon.publish(ANOMALY, proc(2))
        event = await sub.get(timeout=3)
        assert (event.topic, pid_of(event), event.sequence) == (ANOMALY.name, 2, 1)
        assert peer_published(broker.statistics()) == 1
        assert broker.statistics().refused == 1


async def test_refused_raw_publishes_are_typed(broker: Broker, sock_path: str) -> None:
    errors: list[EventBusError] = []
    async with Client(sock_path, component=PROCMOND) as client:
        client.on_error = errors.append
        await client.publish_raw("events.process.unknown", PROCESS_EVENT, b"")
        await client.publish_raw(LIFECYCLE.name, "daemoneye.eventbus.v1.NetworkEvent", b"")
        await client.flush()
    assert [(type(e), e.code) for e in errors] == [
        (InvalidTopic, EC.ERROR_CODE_INVALID_TOPIC),
        (PayloadTypeMismatch, EC.ERROR_CODE_PAYLOAD_MISMATCH),
    ]


async def test_invalid_filter_is_refused_before_anything_is_sent(
    broker: Broker, sock_path: str
) -> None:
    async with Client(sock_path, component=AGENT) as client:
        for bad in ("events.#.x", "events..x", "", "a+.b"):
            with pytest.raises(InvalidTopic):
                await client.subscribe(bad)
        assert len(client._requests) == 0
        assert client.statistics().subscriptions == 0
        await client.flush()
        # Had any reached the broker, it would have refused and counted it.
        assert broker.statistics().refused == 0
        assert client.statistics().refused == 0
        sub = await client.subscribe(LIFECYCLE)  # ids and connection unharmed
        assert sub.active


async def test_refused_subscription_raises_the_brokers_typed_error(
    broker: Broker, sock_path: str
) -> None:
    async with Client(sock_path, name="anonymous") as anon:
        with pytest.raises(AccessDenied) as info:
            await anon.subscribe(LIFECYCLE)
        assert info.value.code == EC.ERROR_CODE_ACCESS_DENIED
        with pytest.raises(InvalidTopic) as info2:
            await anon.subscribe("nothing.declared.here")
        assert info2.value.code == EC.ERROR_CODE_INVALID_FILTER
        assert anon.statistics().subscriptions == 0
        assert anon.is_connected
        assert broker.statistics().refused == 2


async def test_close_twice_and_use_after_close(broker: Broker, sock_path: str) -> None:
    client = Client(sock_path)
    await client.connect()
    sub = await client.subscribe(ANOMALY)
    await client.close()
    await client.close()
    assert not client.is_connected
    assert not sub.active
    assert [e async for e in sub] == []  # the subscription ended with the client
    with pytest.raises(ClosedResourceError):
        await client.publish(ANOMALY, proc(1))
    with pytest.raises(ClosedResourceError):
        client.publish_nowait(ANOMALY, proc(1))
    with pytest.raises(ClosedResourceError):
        await client.publish_raw(ANOMALY.name, PROCESS_EVENT, b"")
    with pytest.raises(ClosedResourceError):
        await client.subscribe(ANOMALY)
    with pytest.raises(ClosedResourceError):
        await client.flush()
    await until(lambda: broker.statistics().connections == 0)


async def test_client_is_not_reentrant(broker: Broker, sock_path: str) -> None:
    client = Client(sock_path)
    async with client:
        with pytest.raises(RuntimeError, match="re-entrant"):
            await client.__aenter__()
        assert client.is_connected


async def test_reconnect_resubscribes_after_the_broker_restarts(sock_path: str) -> None:
    first = Broker(sock_path, TEST_CONFIG)
    await first.start()
    client = Client(sock_path, component=AGENT, reconnect=True, reconnect_delay=0.05)
    second: Broker | None = None
    try:
        await client.connect()
        sub = await client.subscribe(LIFECYCLE)
        old_session = client.session_id
        await first.close()
        await until(lambda: not client.is_connected)
        with pytest.raises(ConnectionClosed):  # while disconnected, publishing fails
            await client.publish(ANOMALY, proc(0))
        assert sub.active  # the subscription waits for the next broker

        second = Broker(sock_path, TEST_CONFIG)
        await second.start()
        await until(lambda: len(second.router) == 1)  # re-subscribed
        assert client.is_connected
        assert client.session_id != old_session
        assert client.statistics().reconnects == 1
        async with Client(sock_path, component=PROCMOND) as pub:
            await pub.publish(LIFECYCLE, proc(7))
            await pub.flush()
        event = await sub.get(timeout=5)
        assert pid_of(event) == 7
        assert event.sequence == 1  # the new session numbers from 1 again ...
        assert sub.missed == 0  # ... which is no gap
    finally:
        await client.close()
        await first.close()
        if second is not None:
            await second.close()


# -- the same shape in process --------------------------------------------------------------------

Session = Client | LocalSession


@contextlib.asynccontextmanager
async def session(
    how: str, broker: Broker, path: str, name: str, component: str
) -> AsyncIterator[Session]:
    if how == "client":
        async with Client(path, name=name, component=component) as client:
            yield client
    else:
        local = broker.local_session(name, component)
        try:
            yield local
        finally:
            await local.close()


@pytest.mark.parametrize("how", ["client", "local"])
async def test_same_shape_over_a_client_and_a_local_session(
    how: str, broker: Broker, sock_path: str
) -> None:
    async with (
        session(how, broker, sock_path, "collector", PROCMOND) as pub,
        session(how, broker, sock_path, "agent", AGENT) as agent,
    ):
        sub = await agent.subscribe("events.process.#")
        typed = await agent.subscribe(LIFECYCLE)
        for pid in (1, 2, 3):
            await pub.publish(LIFECYCLE, proc(pid))
        assert await pub.flush() >= 0
        got = [await sub.get(timeout=3) for _ in range(3)]
        assert [(e.topic, e.sequence, pid_of(e)) for e in got] == [
            (LIFECYCLE.name, n, n) for n in (1, 2, 3)
        ]
        message = (await typed.get(timeout=3)).message()  # decoded as the topic's type
        assert isinstance(message, events_pb2.ProcessEvent)
        assert message.pid == 1

        await pub.publish(LIFECYCLE, proc(4), correlation=new_correlation("c-4"))
        async for event in sub:
            assert (pid_of(event), event.sequence) == (4, 4)
            assert event.correlation is not None
            assert event.correlation.correlation_id == "c-4"
            break

        await agent.flush()  # every delivery sent so far has arrived
        await sub.unsubscribe()
        await agent.unsubscribe(typed)
        assert not sub.active
        assert not typed.active
        assert len(broker.router) == 0
        # Events already queued stay readable; then the subscription has ended.
        assert [pid_of(e) for e in queued(typed)] == [2, 3, 4]
        with pytest.raises(ClosedResourceError):
            await typed.get(timeout=1)
        assert [e async for e in sub] == []
        await pub.publish(LIFECYCLE, proc(5))
        await pub.flush()
        assert broker.statistics().dropped == 0  # nobody was left to take it

        # Refusals are the same typed errors.
        with pytest.raises(InvalidTopic):
            await agent.subscribe("events.#.x")
        with pytest.raises(InvalidTopic) as info:
            await agent.subscribe("nothing.declared.here")
        assert info.value.code == EC.ERROR_CODE_INVALID_FILTER

        late = await agent.subscribe(LIFECYCLE)
        await agent.close()
        await agent.close()
        assert not late.active
        with pytest.raises(ClosedResourceError):
            await agent.publish(ANOMALY, proc(6))
        with pytest.raises(ClosedResourceError):
            await agent.subscribe(ANOMALY)
        with pytest.raises(ClosedResourceError):
            await agent.flush()


async def test_local_session_refusals_are_raised_at_once(broker: Broker) -> None:
    local = broker.local_session("agent", AGENT)
    with pytest.raises(InvalidTopic) as info:
        await local.publish_raw("events.process.unknown", PROCESS_EVENT, b"")
    assert info.value.code == EC.ERROR_CODE_INVALID_TOPIC
    with pytest.raises(PayloadTypeMismatch) as info2:
        await local.publish_raw(LIFECYCLE.name, "daemoneye.eventbus.v1.NetworkEvent", b"")
    assert info2.value.code == EC.ERROR_CODE_PAYLOAD_MISMATCH
    assert broker.statistics().refused == 2
    assert broker.statistics().published == 0
    await local.close()


async def test_local_session_ends_with_the_broker(sock_path: str) -> None:
    async with Broker(sock_path, TEST_CONFIG) as broker:
        local = broker.local_session("agent", AGENT)
        sub = await local.subscribe(LIFECYCLE)
        await local.publish(LIFECYCLE, proc(1))
    assert local.is_closed
    assert not sub.active
    assert [pid_of(e) async for e in sub] == [1]  # what was queued is still read
    with pytest.raises(ClosedResourceError):
        broker.local_session("late")


# A refusal is reported once: to on_error when the application set it, else in
# the client's log (the CLI's pub once printed it both ways).
async def test_a_refusal_goes_to_on_error_or_to_the_log(
    broker: Broker, sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    errors: list[EventBusError] = []
    with caplog.at_level(logging.WARNING, logger="daemoneye_eventbus.client"):
        async with Client(sock_path) as handled, Client(sock_path) as unhandled:
            handled.on_error = errors.append
            for client in (handled, unhandled):
                await client.publish(LIFECYCLE, proc(1))  # anonymous: refused
                await client.flush()
            assert handled.last_error is errors[0]
            assert unhandled.last_error is not None
    assert [type(e) for e in errors] == [AccessDenied]
    (record,) = [r for r in caplog.records if r.name == "daemoneye_eventbus.client"]
    assert record.getMessage().startswith("broker refused a request: publish on")
