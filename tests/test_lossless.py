"""Lossless delivery: credit-based backpressure instead of drops, when asked.

The pure credit bookkeeping (:mod:`daemoneye_eventbus.flow`), then real
sockets: a slow lossless reader gets every event while its publisher waits,
topics declared lossless, the stall deadline that frees the publishers, the
refusals, in-process sessions on both sides, and separate processes for the
benchmark's workloads B (four publishers, one reader) and C (one publisher,
four readers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import AGENT, PROCMOND, TEST_CONFIG, WORKERS, pid_of, worker_env
from rawpeer import RawPeer, kind
from serving import broker_process

from daemoneye.eventbus.v1 import events_pb2, frames_pb2, registry
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode, Frame
from daemoneye_eventbus.broker import Broker
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.delivery import Credits, EventQueue, ReceivedEvent
from daemoneye_eventbus.errors import AccessDenied, ConnectionClosed, EventBusError, LimitExceeded
from daemoneye_eventbus.flow import Flow
from daemoneye_eventbus.stamps import Stamp
from daemoneye_eventbus.subscription import Subscription

LIFECYCLE = registry.EVENTS_PROCESS_LIFECYCLE
INTEGRITY = registry.EVENTS_PROCESS_INTEGRITY


# -- the credit bookkeeping (pure) ------------------------------------------------------


class Publisher:
    """A publisher as a flow sees it (an Endpoint's held_by and unhold)."""

    def __init__(self) -> None:
        self.held_by = 0
        self.resumed = 0

    def unhold(self) -> None:
        self.held_by -= 1
        if not self.held_by:
            self.resumed += 1


def test_credit_is_spent_and_granted_back_within_the_window() -> None:
    flow = Flow(window=10, lossless=True)
    assert flow.can_send()
    flow.sent(8)
    assert flow.credit == 2
    assert flow.can_send()
    flow.sent(5)  # a batch goes whole: the credit may go below 0
    assert flow.credit == -3
    assert not flow.can_send()
    flow.grant(100)
    assert flow.credit == 10  # never more than the window


def test_held_events_keep_their_order_and_hold_each_publisher_once() -> None:
    flow = Flow(window=2, lossless=True)
    a, b = Publisher(), Publisher()
    flow.sent(2)
    for first, publisher in ((3, a), (4, b), (5, a)):
        flow.hold(frames_pb2.Publish(topic="t"), b"x" * first, first, 1, Stamp(first, 0))
        flow.wait(publisher)
    assert (a.held_by, b.held_by) == (1, 1)
    assert flow.held_events == 3
    assert flow.held_bytes == 12
    assert not flow.can_send()  # nothing overtakes what is held
    flow.grant(2)
    taken = [flow.take()[2] for _ in range(2)]
    assert taken == [3, 4]
    assert flow.credit == 0
    assert a.resumed == b.resumed == 0  # still held: one event waits
    flow.grant(1)
    assert flow.take()[2] == 5
    assert not flow.held
    flow.release()
    assert (a.held_by, b.held_by, a.resumed, b.resumed) == (0, 0, 1, 1)


def test_a_publisher_held_by_two_flows_goes_on_when_both_let_go() -> None:
    one, two = Flow(1, True), Flow(1, True)
    publisher = Publisher()
    one.wait(publisher)
    two.wait(publisher)
    one.discard()
    assert publisher.held_by == 1
    assert not publisher.resumed
    assert two.discard() == 0
    assert (publisher.held_by, publisher.resumed) == (0, 1)


def _event(sid: int, sequence: int) -> ReceivedEvent[Any]:
    return ReceivedEvent(LIFECYCLE.name, "t", b"", None, sequence, sid)


def test_reads_are_granted_back_per_quarter_window_and_per_subscription() -> None:
    granted: list[tuple[int, int]] = []
    credits = Credits(lambda sid, events: granted.append((sid, events)))
    queue: EventQueue[Any] = EventQueue(100)
    credits.track(1, 8)  # a quarter window: 2 reads
    queue.count_reads(credits, 1)
    for n in range(1, 6):
        queue.put_nowait(_event(1, n), bounded=False)
    while queue.get_nowait() is not None:
        pass
    assert granted == [(1, 2), (1, 2)]  # the fifth read waits for a sixth
    # A second credit-based subscription on the same queue: each read by its id.
    credits.track(2, 4)
    queue.count_reads(credits, 2)
    for sid, n in ((2, 1), (1, 6), (2, 2)):
        queue.put_nowait(_event(sid, n), bounded=False)
    while queue.get_nowait() is not None:
        pass
    assert granted[2:] == [(2, 1), (1, 2), (2, 1)]
    credits.forget(2)  # ended: its reads grant nothing
    queue.put_nowait(_event(2, 3), bounded=False)
    queue.get_nowait()
    assert len(granted) == 5


# -- over real sockets -------------------------------------------------------------------


async def _read(sub: Subscription[Any], count: int, *, slow: float = 0.0) -> list[int]:
    """Read ``count`` events (sleeping ``slow`` every 100), returning their pids."""
    pids = []
    for n in range(count):
        event = await sub.get(timeout=10)
        pids.append(event.message().pid)
        if slow and n % 100 == 99:
            await asyncio.sleep(slow)
    return pids


async def _drain(sub: Subscription[Any], into: list[int]) -> None:
    """Read until the subscription ends (with its error), collecting the pids."""
    while True:
        into.append((await sub.get(timeout=5)).message().pid)


async def _publish(
    client: Client, count: int, topic: Any = LIFECYCLE, *, one_by_one: bool = False
) -> None:
    """Publish ``count`` events (batched as the client does, or each in its own frame)."""
    for pid in range(count):
        await client.publish(topic, events_pb2.ProcessEvent(pid=pid))
        if one_by_one:
            await client.flush()
    await client.flush()


async def test_a_slow_lossless_reader_gets_every_event_and_the_publisher_waits(
    broker: Broker, sock_path: str
) -> None:
    count = 20_000
    async with (
        Client(sock_path, component=AGENT) as reader,
        Client(sock_path, component=PROCMOND) as writer,
    ):
        sub = await reader.subscribe(LIFECYCLE, lossless=True, window=100)
        assert (sub.window, sub.lossless) == (100, True)
        publishing = asyncio.create_task(_publish(writer, count))
        first = await _read(sub, 500)
        await asyncio.sleep(0.3)  # the reader stops a while: the publisher must wait
        assert not publishing.done()
        (stats,) = broker.statistics().subscription_stats
        assert stats.lossless
        assert stats.held > 0
        rest = await _read(sub, count - 500, slow=0.001)
        await publishing
    assert first + rest == list(range(count))
    assert (sub.missed, sub.dropped) == (0, 0)
    assert writer.statistics().refused == 0
    assert writer.last_error is None
    assert broker.dropped == 0


async def test_the_same_reader_without_lossless_loses_events(
    broker: Broker, sock_path: str
) -> None:
    """The control case: at most once, the same slow reader misses events."""
    count = 20_000
    async with (
        Client(sock_path, component=AGENT) as reader,
        Client(sock_path, component=PROCMOND) as writer,
    ):
        sub = await reader.subscribe(LIFECYCLE, max_pending=100)
        assert sub.window == 0
        await _publish(writer, count)
        await asyncio.sleep(0.2)
        got = 0
        with contextlib.suppress(EventBusError):
            while True:
                await sub.get(timeout=0.3)
                got += 1
    assert got < count
    assert sub.missed + sub.dropped > 0


async def test_a_topic_declared_lossless_is_held_without_asking_and_others_still_drop(
    broker: Broker, sock_path: str
) -> None:
    assert INTEGRITY.lossless
    assert not LIFECYCLE.lossless
    async with (
        Client(sock_path, component=AGENT) as reader,
        Client(sock_path, component=PROCMOND) as writer,
    ):
        sub = await reader.subscribe("events.process.#", window=50)
        assert (sub.window, sub.lossless) == (50, False)
        # Not read yet: the credit of 50 goes to the first lifecycle events,
        # the rest of them are dropped (not lossless); the publisher goes on.
        # (Each in its own frame: a batch is sent whole if any credit is left.)
        await _publish(writer, 200, one_by_one=True)
        integrity = asyncio.create_task(_publish(writer, 300, INTEGRITY))
        await asyncio.sleep(0.3)
        assert not integrity.done()  # held: the reader has no credit left
        events: list[ReceivedEvent[Any]] = []
        while len(events) < 50 + 300:
            events.append(await sub.get(timeout=10))
        await integrity
    lifecycle = [pid_of(e) for e in events if e.topic == LIFECYCLE.name]
    held = [pid_of(e) for e in events if e.topic == INTEGRITY.name]
    assert lifecycle == list(range(50))
    assert held == list(range(300))
    assert sub.missed == 150  # the dropped lifecycle events, as a sequence gap


async def test_a_stalled_lossless_reader_is_disconnected_and_the_publisher_goes_on(
    sock_path: str,
) -> None:
    config = replace(TEST_CONFIG, slow_consumer_timeout=0.5)
    async with (
        Broker(sock_path, config) as broker,
        Client(sock_path, component=AGENT, name="stalled") as stalled,
        Client(sock_path, component=AGENT, name="reading") as reading,
        Client(sock_path, component=PROCMOND) as writer,
    ):
        never = await stalled.subscribe(LIFECYCLE, lossless=True, window=10)
        live = await reading.subscribe(LIFECYCLE, max_pending=5000)
        await asyncio.wait_for(_publish(writer, 2000), 10)  # held, then freed
        got = await _read(live, 2000)
        assert got == list(range(2000))
        assert writer.statistics().refused == 0
        with pytest.raises(ConnectionClosed, match="granted no credit"):
            await _drain(never, [])
        assert not stalled.is_connected
        assert broker.statistics().connections == 2


async def test_lossless_is_refused_to_anonymous_peers(broker: Broker, sock_path: str) -> None:
    anomaly = registry.EVENTS_PROCESS_ANOMALY  # public: anyone may read it
    async with Client(sock_path) as anonymous:
        with pytest.raises(AccessDenied, match="authenticated components"):
            await anonymous.subscribe(anomaly, lossless=True)
        at_most_once = await anonymous.subscribe(anomaly)
        assert at_most_once.window == 0


async def test_a_client_that_grants_no_credit_gets_at_most_once(
    broker: Broker, sock_path: str
) -> None:
    """A client whose Hello does not offer credit: lossless is refused, and a
    topic declared lossless is delivered at most once (no SubscribeAck window)."""
    async with await RawPeer.connect(sock_path, component=AGENT) as peer:
        sub = frames_pb2.Subscribe(subscription_id=1, filter=LIFECYCLE.name, lossless=True)
        await peer.send(Frame(subscribe=sub))
        error = await peer.recv()
        assert kind(error) == "error"
        assert error.error.code == ErrorCode.ERROR_CODE_LIMIT_EXCEEDED
        assert "Hello.credit" in error.error.message
        assert not error.error.fatal
        await peer.send(
            Frame(subscribe=frames_pb2.Subscribe(subscription_id=2, filter=INTEGRITY.name))
        )
        ack = await peer.recv()
        assert kind(ack) == "subscribe_ack"
        assert ack.subscribe_ack.window == 0


async def test_credit_above_the_window_and_for_unknown_subscriptions_is_harmless(
    broker: Broker, sock_path: str
) -> None:
    async with await RawPeer.connect(sock_path, component=AGENT) as peer:
        await peer.send(
            Frame(credit=frames_pb2.Credit(subscription_id=99, events=10**9)),
            Frame(ping=frames_pb2.Ping(nonce=7)),
        )
        pong = await peer.recv()
        assert kind(pong) == "pong"
        assert pong.pong.nonce == 7


async def test_an_in_process_lossless_reader_holds_a_socket_publisher(
    broker: Broker, sock_path: str
) -> None:
    local = broker.local_session("agent", AGENT)
    sub = await local.subscribe(LIFECYCLE, lossless=True, window=64)
    assert sub.window == 64
    async with Client(sock_path, component=PROCMOND) as writer:
        publishing = asyncio.create_task(_publish(writer, 5000))
        await asyncio.sleep(0.3)
        # At most the window and the rest of one batch (a batch goes whole).
        most = 64 + broker.config.max_queue_messages
        assert not publishing.done()
        assert len(sub.queue) <= most
        got = await _read(sub, 5000, slow=0.001)
        await publishing
    assert got == list(range(5000))
    assert sub.dropped == 0


async def test_an_in_process_publisher_waits_for_a_lossless_socket_reader(
    broker: Broker, sock_path: str
) -> None:
    local = broker.local_session("collector", PROCMOND)
    async with Client(sock_path, component=AGENT) as reader:
        sub = await reader.subscribe(LIFECYCLE, lossless=True, window=32)

        async def publish() -> None:
            for pid in range(3000):
                await local.publish(LIFECYCLE, events_pb2.ProcessEvent(pid=pid))

        publishing = asyncio.create_task(publish())
        await asyncio.sleep(0.3)
        assert not publishing.done()
        assert local.endpoint.held_by == 1
        with pytest.raises(LimitExceeded, match="await publish"):
            local.publish_nowait(LIFECYCLE, events_pb2.ProcessEvent(pid=99_999))
        got = await _read(sub, 3000)
        await publishing
    assert got == list(range(3000))


async def test_an_in_process_reader_that_stalls_loses_its_subscription(sock_path: str) -> None:
    config = replace(TEST_CONFIG, slow_consumer_timeout=0.3)
    async with Broker(sock_path, config) as broker:
        reader = broker.local_session("agent", AGENT)
        sub = await reader.subscribe(LIFECYCLE, lossless=True, window=8)
        writer = broker.local_session("collector", PROCMOND)
        for pid in range(100):
            await asyncio.wait_for(writer.publish(LIFECYCLE, events_pb2.ProcessEvent(pid=pid)), 5)
        assert not sub.active
        drained: list[int] = []
        with pytest.raises(EventBusError, match="was not read"):
            await _drain(sub, drained)
        assert len(drained) >= 8


# -- separate processes: the benchmark's workloads B and C ---------------------------------


async def _worker(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKERS),
        *args,
        stdout=asyncio.subprocess.PIPE,
        env=worker_env(),
    )


async def _ready(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 15)
    ready: dict[str, Any] = json.loads(line)
    assert ready["ready"]
    return ready


async def _summary(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0
    summary: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return summary


@pytest.mark.parametrize(("publishers", "readers"), [(4, 1), (1, 4)], ids=["B", "C"])
async def test_every_event_reaches_every_lossless_reader_across_processes(
    sock_dir: Path, publishers: int, readers: int
) -> None:
    path = str(sock_dir / "bus.sock")
    each = 10_000
    async with broker_process(path):
        subs = [
            await _worker(
                "subscribe",
                "--socket",
                path,
                "--filter",
                LIFECYCLE.name,
                "--lossless",
                "--count",
                str(each * publishers),
                "--quiet",
                "--timeout",
                "30",
                # One reader is much slower than the others (C) or the publishers (B).
                "--slow",
                "0.002" if n == 0 else "0",
            )
            for n in range(readers)
        ]
        for proc in subs:
            assert (await _ready(proc))["window"] > 0
        pubs = [
            await _worker("publish", "--socket", path, "--count", str(each), "--publisher", str(n))
            for n in range(publishers)
        ]
        for proc in pubs:
            assert (await _summary(proc))["published"] == each
        for proc in subs:
            summary = await _summary(proc)
            assert summary["done"] == each * publishers, summary
            assert (summary["missed"], summary["dropped"], summary["ordered"]) == (0, 0, True)


async def test_held_events_count_in_the_pending_output_total(sock_path: str) -> None:
    """With the broker's memory for pending output used up, a lossless reader
    that falls behind is disconnected instead of holding more."""
    config = replace(TEST_CONFIG, max_total_queue_bytes=32 * 1024)
    big = events_pb2.ProcessEvent(name="n" * 1000)
    async with (
        Broker(sock_path, config) as broker,
        Client(sock_path, component=AGENT) as reader,
        Client(sock_path, component=PROCMOND, name="one") as one,
        Client(sock_path, component=PROCMOND, name="two") as two,
    ):
        sub = await reader.subscribe(LIFECYCLE, lossless=True, window=1)
        for _ in range(100):  # batches of 100 KB in all: held, and charged
            one.publish_nowait(LIFECYCLE, big)
        # (no flush: its ping would wait behind the held publish)
        await asyncio.sleep(0.3)  # a housekeeping tick charges what is held
        assert broker.statistics().subscription_stats[0].held > 1
        await two.publish(LIFECYCLE, big)
        drained: list[int] = []
        with pytest.raises(ConnectionClosed, match="memory for pending output"):
            await _drain(sub, drained)
        await asyncio.wait_for(one.flush(), 5)  # released
