"""Batches: many events per frame, on the wire and through a real broker [protocol §5]."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
from conftest import AGENT, PROCMOND, TEST_CONFIG, peer_published, pid_of
from rawpeer import RawPeer, hello
from test_broker import drain, proc

from daemoneye.eventbus.v1 import events_pb2, frames_pb2, registry
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationFilter
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode, Frame
from daemoneye_eventbus.broker import Broker
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.correlation import new_correlation
from daemoneye_eventbus.delivery import EventQueue, ReceivedEvent, received_batch
from daemoneye_eventbus.errors import LimitExceeded, LocalProtocolError
from daemoneye_eventbus.frames import (
    DELIVER_BATCH_OVERHEAD,
    PublishBatcher,
    encode_deliver_batch,
    encode_frame,
    encode_varint,
    publish_header,
)
from daemoneye_eventbus.protocol import Connection, Role, State

LIFECYCLE = registry.EVENTS_PROCESS_LIFECYCLE
ANOMALY = registry.EVENTS_PROCESS_ANOMALY
PROCESS_EVENT = LIFECYCLE.payload_name


def header(topic: Any = LIFECYCLE) -> tuple[bytes, bytes]:
    return publish_header(topic.name, topic.payload_name)


def split(data: bytes) -> list[Frame]:
    """The frames of an encoded stream."""
    conn = Connection(Role.BROKER)
    conn._set_state(State.OPEN)
    conn.receive_data(data)
    assert conn.error is None
    return conn.events_received()


# -- encoding ------------------------------------------------------------------------


@pytest.mark.parametrize("with_correlation", [False, True])
@pytest.mark.parametrize("sizes", [[0], [1, 0, 300], [200] * 700])
def test_hand_built_batch_frames_equal_protobuf(with_correlation: bool, sizes: list[int]) -> None:
    payloads = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    corr = new_correlation("wf-1") if with_correlation else None
    batch = frames_pb2.PublishBatch(
        topic=LIFECYCLE.name, payload_type=PROCESS_EVENT, payloads=payloads
    )
    if corr is not None:
        batch.correlation.CopyFrom(corr)
    corr_bytes = corr.SerializeToString() if corr is not None else None
    batcher = PublishBatcher(max_body=1 << 20, target=1 << 20, max_events=10_000)
    assert all(batcher.add(header(), p, corr_bytes) is None for p in payloads)
    sealed = batcher.seal()
    assert sealed is not None
    assert sealed == (encode_frame(Frame(publish_batch=batch)), len(payloads))
    body = batch.SerializeToString()
    for sid, first in [(1, 1), (2**32 - 1, 2**64 - len(sizes))]:
        deliver = frames_pb2.DeliverBatch(subscription_id=sid, first_sequence=first, batch=batch)
        frame = encode_deliver_batch(sid, first, body)
        assert frame == encode_frame(Frame(deliver_batch=deliver))
        # The overhead bound holds even at the largest ids.
        assert len(frame) - len(body) <= DELIVER_BATCH_OVERHEAD + 5


def test_batcher_groups_by_topic_and_correlation_in_order() -> None:
    batcher = PublishBatcher(max_body=1 << 20, target=64 * 1024, max_events=1000)
    wf = new_correlation("wf").SerializeToString()
    sealed = [
        batcher.add(header(), b"a"),
        batcher.add(header(), b"b"),
        batcher.add(header(ANOMALY), b"c"),  # another topic: seals a, b
        batcher.add(header(ANOMALY), b"d", wf),  # another correlation: seals c
        batcher.add(header(ANOMALY), b"e", wf),
    ]
    assert batcher.pending_events == 2
    last = batcher.seal()
    assert batcher.seal() is None
    assert batcher.pending_bytes == 0
    frames = [(f, n) for f, n in (s for s in [*sealed, last] if s is not None)]
    assert [n for _, n in frames] == [2, 1, 2]
    decoded = [split(f)[0].publish_batch for f, _ in frames]
    assert [(b.topic, list(b.payloads), b.HasField("correlation")) for b in decoded] == [
        (LIFECYCLE.name, [b"a", b"b"], False),
        (ANOMALY.name, [b"c"], False),
        (ANOMALY.name, [b"d", b"e"], True),
    ]


def test_batcher_seals_at_the_target_and_refuses_what_cannot_travel_alone() -> None:
    batcher = PublishBatcher(max_body=10_000, target=1_000, max_events=1000)
    sealed = [batcher.add(header(), b"x" * 400) for _ in range(7)]
    counts = [s[1] for s in sealed if s is not None]
    assert counts == [2, 2, 2]  # the header and three 400-byte events exceed 1,000 bytes
    for frame, _ in (s for s in sealed if s is not None):
        assert len(split(frame)[0].publish_batch.SerializeToString()) <= 1_000
    # A big event travels alone, up to max_body ...
    big = batcher.add(header(), b"y" * 9_000)
    assert big is not None
    assert big[1] == 1
    assert batcher.pending_events == 1
    # ... and one that cannot is refused without touching the open batch.
    with pytest.raises(LimitExceeded, match="exceeds the limit of 10000 bytes"):
        batcher.add(header(), b"z" * 10_000)
    assert batcher.pending_events == 1
    final = batcher.seal()
    assert final is not None
    assert len(split(final[0])[0].publish_batch.SerializeToString()) <= 10_000


@pytest.mark.parametrize("with_correlation", [False, True])
def test_a_single_event_frame_is_a_sealed_batch_of_one(with_correlation: bool) -> None:
    corr = new_correlation("wf-1").SerializeToString() if with_correlation else None
    batcher = PublishBatcher(max_body=1 << 20, target=64 * 1024, max_events=1000)
    assert batcher.add(header(), b"payload", corr) is None
    sealed = batcher.seal()
    assert sealed is not None
    assert batcher.single(header(), b"payload", corr) == sealed[0]
    assert batcher.pending_events == 0  # single() leaves no batch open


def test_a_single_event_takes_the_limit_of_a_batch() -> None:
    limit = 10_000
    fixed = sum(map(len, header())) + 1  # the topic and type fields, the payload tag
    fits = next(n for n in range(limit, 0, -1) if fixed + len(encode_varint(n)) + n <= limit)
    for n, ok in [(fits, True), (fits + 1, False)]:
        batcher = PublishBatcher(max_body=limit, target=limit, max_events=1000)
        if ok:
            frame = batcher.single(header(), b"x" * n)
            assert len(split(frame)[0].publish_batch.SerializeToString()) == limit
            assert batcher.add(header(), b"x" * n) is None
        else:
            with pytest.raises(LimitExceeded, match="exceeds the limit of 10000 bytes"):
                batcher.single(header(), b"x" * n)
            with pytest.raises(LimitExceeded, match="exceeds the limit of 10000 bytes"):
                batcher.add(header(), b"x" * n)
    # An open batch goes first: single() would put the event before it.
    assert batcher.add(header(), b"y") is None
    with pytest.raises(LocalProtocolError, match="a batch is open"):
        batcher.single(header(), b"z")


def test_batcher_seals_at_the_event_limit() -> None:
    batcher = PublishBatcher(max_body=1 << 20, target=64 * 1024, max_events=3)
    sealed = [batcher.add(header(), b"") for _ in range(7)]
    assert [s[1] for s in sealed if s is not None] == [3, 3]
    assert batcher.pending_events == 1
    with pytest.raises(ValueError, match="at least one event"):
        PublishBatcher(max_body=1 << 20, target=64 * 1024, max_events=0)


def test_connection_counts_batched_events_as_messages() -> None:
    conn = Connection(Role.BROKER)
    conn._set_state(State.OPEN)
    conn.send_deliver_batch(
        1, 1, frames_pb2.PublishBatch(payloads=[b"a"] * 3).SerializeToString(), 3
    )
    conn.send(Frame(ping=frames_pb2.Ping(nonce=1)))
    assert (conn.buffered_frames, conn.buffered_messages) == (2, 4)
    conn.data_to_send()
    assert (conn.buffered_frames, conn.buffered_messages) == (0, 0)


# -- the receiving queue ---------------------------------------------------------------


def events(first: int, n: int, sid: int = 1) -> list[ReceivedEvent[Any]]:
    return received_batch(LIFECYCLE.name, PROCESS_EVENT, [bytes(10)] * n, None, first, sid)


def test_received_batch_builds_what_the_constructor_builds() -> None:
    corr = new_correlation("wf")
    built = received_batch(
        LIFECYCLE.name, PROCESS_EVENT, [b"a", b"b"], corr, 7, 3, events_pb2.ProcessEvent
    )
    assert built == [
        ReceivedEvent(LIFECYCLE.name, PROCESS_EVENT, p, corr, seq, 3, events_pb2.ProcessEvent)
        for p, seq in [(b"a", 7), (b"b", 8)]
    ]
    with pytest.raises(AttributeError):
        built[0].sequence = 1  # type: ignore[misc]


def test_queue_takes_or_drops_a_batch_whole_and_counts_gaps() -> None:
    queue: EventQueue[Any] = EventQueue(max_messages=10, max_bytes=1000)
    assert queue.put_batch(events(1, 4))
    assert not queue.put_batch(events(5, 7))  # 4 + 7 > 10
    assert (len(queue), queue.dropped, queue.missed) == (4, 7, 0)
    assert queue.put_batch(events(20, 6))  # 12..19 never arrived
    assert (len(queue), queue.missed, queue.received, queue.nbytes) == (10, 8, 10, 100)
    assert [queue.get_nowait().sequence for _ in range(10)] == [  # type: ignore[union-attr]
        1, 2, 3, 4, 20, 21, 22, 23, 24, 25,
    ]  # fmt: skip
    assert queue.nbytes == 0
    small: EventQueue[Any] = EventQueue(max_messages=100, max_bytes=25)
    assert not small.put_batch(events(1, 3))  # 30 bytes > 25
    assert small.dropped == 3


@pytest.mark.parametrize("count", [1, 3])
def test_put_payloads_queues_what_put_batch_queues(count: int) -> None:
    corr = new_correlation("wf")
    payloads = [bytes([i]) * 10 for i in range(count)]
    args = (LIFECYCLE.name, PROCESS_EVENT, payloads, corr, 5, 2, events_pb2.ProcessEvent)
    by_payloads: EventQueue[Any] = EventQueue(max_messages=count, max_bytes=10 * count)
    by_batch: EventQueue[Any] = EventQueue(max_messages=count, max_bytes=10 * count)
    assert by_payloads.put_payloads(*args)
    assert by_batch.put_batch(received_batch(*args))
    # A full queue drops the next delivery whole, one event or a batch alike.
    assert not by_payloads.put_payloads(*args)
    assert not by_batch.put_batch(received_batch(*args))
    counters = [(q.received, q.dropped, q.missed, q.nbytes) for q in (by_payloads, by_batch)]
    assert counters[0] == counters[1] == (count, count, 4, 10 * count)  # 1..4 never came
    assert [by_payloads.get_nowait() for _ in range(count)] == received_batch(*args)


# -- through a broker -------------------------------------------------------------------


async def raw_subscriber(path: str, flt: str, *, accept_batches: bool) -> RawPeer:
    peer = await RawPeer.connect(path, handshake=False)
    await peer.send(hello(component=AGENT, accept_batches=accept_batches))
    welcome = await peer.expect("welcome")
    assert welcome.welcome.batches
    await peer.send(Frame(subscribe=frames_pb2.Subscribe(subscription_id=1, filter=flt)))
    assert (await peer.recv()).WhichOneof("kind") == "subscribe_ack"
    return peer


async def answer(peer: RawPeer) -> Frame:
    """The next frame that is not a heartbeat (which is answered)."""
    while True:
        frame = await peer.recv()
        if frame.WhichOneof("kind") != "ping":
            return frame
        await peer.send(Frame(pong=frames_pb2.Pong(nonce=frame.ping.nonce)))


async def read_events(peer: RawPeer, n: int) -> tuple[list[str], list[tuple[int, int]]]:
    """Frame kinds seen and (sequence, pid) of each event, until ``n`` events."""
    kinds: list[str] = []
    got: list[tuple[int, int]] = []
    while len(got) < n:
        frame = await answer(peer)
        kind = frame.WhichOneof("kind")
        assert kind is not None
        kinds.append(kind)
        if kind == "deliver":
            payload = frame.deliver.publish.payload
            got.append((frame.deliver.sequence, events_pb2.ProcessEvent.FromString(payload).pid))
        else:
            many = frame.deliver_batch
            for i, payload in enumerate(many.batch.payloads):
                pid = events_pb2.ProcessEvent.FromString(payload).pid
                got.append((many.first_sequence + i, pid))
    return kinds, got


@pytest.mark.parametrize("accept_batches", [True, False], ids=["batches", "one-by-one"])
async def test_a_burst_arrives_whole_and_in_order(
    broker: Broker, sock_path: str, accept_batches: bool
) -> None:
    n = 2_000
    peer = await raw_subscriber(sock_path, "events.process.#", accept_batches=accept_batches)
    async with Client(sock_path, component=PROCMOND) as pub:
        for i in range(n):
            pub.publish_nowait(LIFECYCLE, proc(i, "n" * 100))
        await pub.flush()
    kinds, got = await read_events(peer, n)
    peer.close()
    assert got == [(i + 1, i) for i in range(n)]
    if accept_batches:
        # Published in one loop turn: a few batches of about 64 KiB, not 2,000 frames.
        assert set(kinds) == {"deliver_batch"}
        assert len(kinds) < 20
    else:
        assert set(kinds) == {"deliver"}
        assert len(kinds) == n
    stats = broker.statistics()
    assert (peer_published(stats), stats.delivered, stats.dropped) == (n, n, 0)


async def test_order_holds_across_topics_and_single_frames(broker: Broker, sock_path: str) -> None:
    async with (
        Client(sock_path, component=AGENT) as sub_client,
        Client(sock_path, component=PROCMOND) as pub,
    ):
        sub = await sub_client.subscribe("events.process.#")
        for i in range(3):
            await pub.publish(LIFECYCLE, proc(i))
        await pub.publish(ANOMALY, events_pb2.ProcessEvent(pid=100))
        # publish_raw events join batches like the typed ones, in call order.
        raw = proc(101).SerializeToString()
        await pub.publish_raw(LIFECYCLE.name, PROCESS_EVENT, raw)
        for i in range(3, 6):
            await pub.publish(LIFECYCLE, proc(i))
        await pub.close()  # the open batch goes before the goodbye
        got = await drain(sub)
    assert [pid_of(e) for e in got] == [0, 1, 2, 100, 101, 3, 4, 5]
    assert [e.sequence for e in got] == list(range(1, 9))
    assert [e.topic for e in got][3] == ANOMALY.name


async def test_correlation_of_a_batch_and_filters(broker: Broker, sock_path: str) -> None:
    async with (
        Client(sock_path, component=AGENT) as sub_client,
        Client(sock_path, component=PROCMOND) as pub,
    ):
        wanted = await sub_client.subscribe(
            LIFECYCLE, correlation_filter=CorrelationFilter(root_correlation_ids=["wf-a"])
        )
        a, b = new_correlation("wf-a"), new_correlation("wf-b")
        for i in range(6):
            await pub.publish(LIFECYCLE, proc(i), correlation=a if i < 3 else b)
        for i in range(6, 9):
            await pub.publish(LIFECYCLE, proc(i), correlation=a)
        await pub.flush()
        got = await drain(wanted)
    assert [e.message().pid for e in got] == [0, 1, 2, 6, 7, 8]
    assert [e.sequence for e in got] == [1, 2, 3, 4, 5, 6]
    for e in got:
        assert e.correlation is not None
        assert e.correlation.correlation_id == a.correlation_id
    stats = broker.statistics()
    assert (peer_published(stats), stats.delivered) == (9, 6)


async def test_bad_batches_are_refused_and_the_connection_lives(
    broker: Broker, sock_path: str
) -> None:
    peer = await RawPeer.connect(sock_path, component=PROCMOND)
    cases: list[tuple[frames_pb2.PublishBatch, int]] = [
        (
            frames_pb2.PublishBatch(topic=LIFECYCLE.name, payload_type=PROCESS_EVENT),
            ErrorCode.ERROR_CODE_MALFORMED_FRAME,
        ),
        (
            frames_pb2.PublishBatch(topic="events..x", payload_type=PROCESS_EVENT, payloads=[b""]),
            ErrorCode.ERROR_CODE_INVALID_TOPIC,
        ),
        (
            frames_pb2.PublishBatch(topic=LIFECYCLE.name, payload_type="x.Y", payloads=[b""]),
            ErrorCode.ERROR_CODE_PAYLOAD_MISMATCH,
        ),
        (  # procmond may not publish the agent's control topics
            frames_pb2.PublishBatch(
                topic=registry.CONTROL_COLLECTOR_CONFIG.name,
                payload_type=registry.CONTROL_COLLECTOR_CONFIG.payload_name,
                payloads=[b""],
            ),
            ErrorCode.ERROR_CODE_ACCESS_DENIED,
        ),
    ]
    for batch, code in cases:
        await peer.send(Frame(publish_batch=batch))
        error = (await answer(peer)).error
        assert (error.code, error.fatal) == (code, False), error
        assert error.topic == batch.topic
    await peer.send(Frame(ping=frames_pb2.Ping(nonce=5)))
    assert (await answer(peer)).pong.nonce == 5
    peer.close()
    assert peer_published(broker.statistics()) == 0


async def test_batch_over_the_queue_bound_is_refused(sock_path: str) -> None:
    """A batch is queued whole, so it may hold at most max_queue_messages events.

    Without the bound a 1 MiB frame of empty payloads (half a million events)
    would become as many Deliver frames for a subscriber without batches.
    """
    config = dataclasses.replace(TEST_CONFIG, max_queue_messages=100)
    async with Broker(sock_path, config) as broker:
        sub = await raw_subscriber(sock_path, "events.process.#", accept_batches=False)
        peer = await RawPeer.connect(sock_path, component=PROCMOND)
        flood = frames_pb2.PublishBatch(
            topic=LIFECYCLE.name, payload_type=PROCESS_EVENT, payloads=[b""] * 500_000
        )
        await peer.send(Frame(publish_batch=flood))
        error = (await answer(peer)).error
        assert (error.code, error.fatal) == (ErrorCode.ERROR_CODE_LIMIT_EXCEEDED, False)
        assert "500000 events exceeds max_queue_messages (100)" in error.message
        peer.close()
        # The client keeps to the announced bound by itself.
        async with Client(sock_path, component=PROCMOND) as pub:
            for i in range(250):
                pub.publish_nowait(LIFECYCLE, proc(i))
            await pub.flush()
        kinds, got = await read_events(sub, 250)
        sub.close()
        assert got == [(i + 1, i) for i in range(250)]
        assert set(kinds) == {"deliver"}
        stats = broker.statistics()
        assert (peer_published(stats), stats.delivered, stats.refused) == (250, 250, 1)


async def test_batch_over_the_deliver_limit_is_refused(sock_path: str) -> None:
    limit = 16 * 1024
    config = dataclasses.replace(TEST_CONFIG, max_frame_bytes=limit)
    async with Broker(sock_path, config):
        peer = await RawPeer.connect(sock_path, component=PROCMOND)
        # The frame itself is within the limit; delivering it would not be.
        batch = frames_pb2.PublishBatch(
            topic=LIFECYCLE.name, payload_type=PROCESS_EVENT, payloads=[b""]
        )
        base = len(batch.SerializeToString()) + 1  # the payload length takes 2 bytes
        batch.payloads[0] = b"x" * (limit - DELIVER_BATCH_OVERHEAD + 10 - base)
        assert len(batch.SerializeToString()) == limit - DELIVER_BATCH_OVERHEAD + 10
        assert len(encode_frame(Frame(publish_batch=batch))) <= limit
        await peer.send(Frame(publish_batch=batch))
        error = (await answer(peer)).error
        assert error.code == ErrorCode.ERROR_CODE_FRAME_TOO_LARGE
        assert f"may be at most {limit - DELIVER_BATCH_OVERHEAD} bytes" in error.message
        peer.close()
        # The client never builds such a batch: it refuses the event itself.
        async with Client(sock_path, component=PROCMOND) as pub:
            with pytest.raises(LimitExceeded):
                await pub.publish(LIFECYCLE, proc(1, "n" * limit))


async def test_a_full_queue_drops_a_batch_whole_as_a_sequence_gap(sock_path: str) -> None:
    config = dataclasses.replace(TEST_CONFIG, max_queue_messages=100)
    async with Broker(sock_path, config) as broker:
        local = broker.local_session("agent", AGENT)
        queue = local.new_queue()
        # At most once: a filter that reaches no topic declared lossless.
        local.subscribe_queue(LIFECYCLE.name, queue)
        peer = await RawPeer.connect(sock_path, component=PROCMOND)
        for first, count in [(0, 60), (60, 60), (120, 5)]:  # the second does not fit
            batch = frames_pb2.PublishBatch(
                topic=LIFECYCLE.name,
                payload_type=PROCESS_EVENT,
                payloads=[proc(pid).SerializeToString() for pid in range(first, first + count)],
            )
            await peer.send(Frame(publish_batch=batch))
        await peer.send(Frame(ping=frames_pb2.Ping(nonce=1)))
        assert (await answer(peer)).pong.nonce == 1
        peer.close()
        got = []
        while (event := queue.get_nowait()) is not None:
            got.append(event)
        local.end()
    assert [e.sequence for e in got] == [*range(1, 61), *range(121, 126)]
    assert [pid_of(e) for e in got] == [*range(60), *range(120, 125)]
    # An in-process queue is the broker's queue: its drops are counted there.
    assert queue.dropped == 60
    assert queue.missed == 0
    stats = broker.statistics()
    assert (peer_published(stats), stats.delivered, stats.dropped) == (125, 65, 60)


async def test_first_publish_of_a_turn_is_written_at_once(broker: Broker, sock_path: str) -> None:
    """A lone event is not held for the end of the loop turn; what follows it in
    the same turn is (one write per turn), and goes out when the turn ends."""
    async with Client(sock_path, component=PROCMOND) as pub:
        await asyncio.sleep(0)  # start a fresh turn
        batcher = pub._writer.batcher
        assert batcher is not None
        await pub.publish(LIFECYCLE, proc(1))  # no await yields here
        assert (batcher.pending_events, pub._conn.buffered_bytes) == (0, 0)
        await pub.publish(LIFECYCLE, proc(2))
        await pub.publish(LIFECYCLE, proc(3))
        assert batcher.pending_events == 2  # waiting for the end of this turn
        await asyncio.sleep(0)
        assert (batcher.pending_events, pub._conn.buffered_bytes) == (0, 0)
        await pub.flush()
    assert peer_published(broker.statistics()) == 3


async def test_in_a_burst_each_turn_leaves_in_one_write(broker: Broker, sock_path: str) -> None:
    """Once a turn ends with a batch of several events, the next turn's first
    event waits for the rest of its turn (one write per turn while the burst
    goes on); after a turn that ends with at most one, a lone event is written
    at once again."""
    async with Client(sock_path, component=PROCMOND) as pub:
        batcher = pub._writer.batcher
        assert batcher is not None
        await asyncio.sleep(0)
        for i in range(3):  # one alone, two in a batch
            await pub.publish(LIFECYCLE, proc(i))
        await asyncio.sleep(0)  # the turn ended with a batch of two: a burst
        await pub.publish(LIFECYCLE, proc(3))
        await pub.publish(LIFECYCLE, proc(4))
        assert batcher.pending_events == 2  # the first event of the turn waits too
        await asyncio.sleep(0)
        assert batcher.pending_events == 0  # written at the end of the turn
        await pub.publish(LIFECYCLE, proc(5))
        assert batcher.pending_events == 1  # still a burst: it waits for its turn's end
        await asyncio.sleep(0)  # that turn ended with one event: the burst is over
        await pub.publish(LIFECYCLE, proc(6))
        assert (batcher.pending_events, pub._conn.buffered_bytes) == (0, 0)  # written at once
        await pub.flush()
    assert peer_published(broker.statistics()) == 7


async def test_a_lone_event_and_the_rest_of_its_turn_arrive_in_order(
    broker: Broker, sock_path: str
) -> None:
    async with (
        Client(sock_path, component=AGENT) as sub_client,
        Client(sock_path, component=PROCMOND) as pub,
    ):
        sub = await sub_client.subscribe(LIFECYCLE)
        for turn in range(3):
            await asyncio.sleep(0)
            for i in range(4):  # one alone, three in a batch
                await pub.publish(LIFECYCLE, proc(4 * turn + i))
        await pub.flush()
        got = await drain(sub)
    assert [pid_of(e) for e in got] == list(range(12))
    assert [e.sequence for e in got] == list(range(1, 13))


async def test_publishing_while_the_connection_goes_is_not_an_error(
    broker: Broker, sock_path: str
) -> None:
    pub = Client(sock_path, component=PROCMOND)
    await pub.connect()
    await asyncio.sleep(0)
    assert pub._pump is not None
    transport = pub._pump.transport
    assert transport is not None
    transport.close()  # its connection_lost comes in a later turn
    # What the client still hands the closing transport (asyncio would drop
    # it quietly; other loops may not).
    written: list[bytes] = []
    transport.write = written.append  # type: ignore[method-assign, assignment]
    await pub.publish(LIFECYCLE, proc(1))  # at most once: this one is lost
    assert written == []
    await pub.close()
    assert pub.statistics().published == 1
    assert peer_published(broker.statistics()) == 0
