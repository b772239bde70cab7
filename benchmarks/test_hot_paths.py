"""Micro benchmarks of the hot paths (pytest-benchmark).

These are benchmarks, not tests: nothing here asserts on time. The few
assertions only check that each benchmark measures what it says. Run::

    pytest benchmarks/test_hot_paths.py --benchmark-enable --benchmark-only

With ``--benchmark-disable`` (the project's default) each body runs once: a
smoke test.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from benchmarks.peers.daemoneye_peer import make_event
from daemoneye.eventbus.v1 import frames_pb2, registry
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationFilter, CorrelationMetadata
from daemoneye.eventbus.v1.frames_pb2 import Frame
from daemoneye_eventbus.broker import Broker, BrokerConfig
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.correlation import (
    CorrelationMatcher,
    correlation_filter,
    new_correlation,
    with_stage,
    with_tags,
)
from daemoneye_eventbus.frames import encode_deliver, encode_deliver_batch, encode_frame
from daemoneye_eventbus.protocol import PROTOCOL_VERSION, Connection, Role, State
from daemoneye_eventbus.topics import SubscriptionTrie

#: A 256-byte ProcessEvent: payloads are parsed by the broker (validation on).
PAYLOAD = make_event().SerializeToString()
TOPIC = registry.EVENTS_PROCESS_LIFECYCLE


def _publish() -> frames_pb2.Publish:
    """A ``Publish`` of a 256-byte payload on ``events.process.lifecycle``."""
    return frames_pb2.Publish(topic=TOPIC.name, payload_type=TOPIC.payload_name, payload=PAYLOAD)


# -- framing ----------------------------------------------------------------------


def test_encode_frame_publish(benchmark: BenchmarkFixture) -> None:
    frame = Frame(publish=_publish())
    data = benchmark(encode_frame, frame)
    assert len(data) > 256


def test_encode_deliver(benchmark: BenchmarkFixture) -> None:
    body = _publish().SerializeToString()
    data = benchmark(encode_deliver, 7, 123_456, body)
    assert data.endswith(body)


def _open_broker_connection() -> Connection:
    """A broker-side Connection taken to OPEN through the public API."""
    conn = Connection(Role.BROKER)
    hello = frames_pb2.Hello(protocol_version=PROTOCOL_VERSION, client_name="bench")
    conn.receive_data(encode_frame(Frame(hello=hello)))
    assert [f.WhichOneof("kind") for f in conn.events_received()] == ["hello"]
    welcome = frames_pb2.Welcome(protocol_version=PROTOCOL_VERSION, session_id="bench")
    conn.send(Frame(welcome=welcome))
    conn.data_to_send()
    assert conn.state is State.OPEN
    return conn


def test_receive_100_publish_frames(benchmark: BenchmarkFixture) -> None:
    conn = _open_broker_connection()
    buffer = encode_frame(Frame(publish=_publish())) * 100

    def receive() -> list[Frame]:
        conn.receive_data(buffer)
        return conn.events_received()

    frames = benchmark(receive)
    assert len(frames) == 100
    assert conn.state is State.OPEN
    assert conn.buffered_input == 0


# -- topic matching ----------------------------------------------------------------

_VOCABULARY = [f"w{i}" for i in range(32)]
_MATCH_TOPIC = "w1.w2.w3.w4"


@functools.cache
def _trie(size: int) -> SubscriptionTrie[int]:
    """``size`` filters of four levels over 32 words: a third exact, a third with
    one or two ``+``, a third ending in ``#``; a few of each match the topic."""
    rng = random.Random(size)
    trie: SubscriptionTrie[int] = SubscriptionTrie()
    for value in range(size):
        levels = [rng.choice(_VOCABULARY) for _ in range(4)]
        kind = value % 3
        if kind == 1:
            for i in rng.sample(range(4), rng.choice((1, 2))):
                levels[i] = "+"
        elif kind == 2:
            levels = [*levels[: rng.choice((1, 2, 3))], "#"]
        trie.insert(".".join(levels), value)
    # Matches whatever the size: one of each kind.
    for value, flt in enumerate(("w1.w2.w3.w4", "w1.+.w3.+", "w1.w2.#"), start=size):
        trie.insert(flt, value)
    return trie


@pytest.mark.parametrize("size", [10, 1_000, 100_000])
def test_subscription_trie_match(benchmark: BenchmarkFixture, size: int) -> None:
    trie = _trie(size)
    matched = benchmark(trie.match, _MATCH_TOPIC)
    assert {size, size + 1, size + 2} <= matched


# -- correlation -------------------------------------------------------------------


def _metadata() -> CorrelationMetadata:
    meta = new_correlation("scan-2024-000123")
    meta = with_stage(meta, "collection")
    return with_tags(meta, {"host": "web-01", "severity": "high", "source": "procmond"})


_FILTERS: dict[str, CorrelationFilter] = {
    "64-ids": correlation_filter(correlation_ids=[f"scan-2024-{i:06d}" for i in range(100, 164)]),
    "roots+stage+tags": correlation_filter(
        root_ids=["scan-2024-000123"],
        stages=["collection", "analysis"],
        required_tags={"host": "web-01", "source": "procmond"},
    ),
    "glob-patterns": correlation_filter(patterns=["audit-*", "scan-2023-*", "scan-2024-*"]),
}


@pytest.mark.parametrize("kind", list(_FILTERS))
def test_correlation_matcher_matches(benchmark: BenchmarkFixture, kind: str) -> None:
    matcher = CorrelationMatcher(_FILTERS[kind])
    meta = _metadata()
    assert benchmark(matcher.matches, meta) is True


# -- routing -----------------------------------------------------------------------


@pytest.mark.parametrize("validate", [True, False], ids=["validated", "not-validated"])
def test_broker_route_10_local_subscribers(benchmark: BenchmarkFixture, validate: bool) -> None:
    # Routing needs no running broker: no socket, no event loop. Validation
    # (on by default) parses the 256-byte payload once per publish.
    broker = Broker("/nonexistent/bench.sock", BrokerConfig(validate_payloads=validate))
    session = broker.local_session("bench")
    filters = ["events.process.lifecycle", "events.process.#", "events.+.lifecycle", "#"]
    queues = []
    for i in range(10):
        queue = session.new_queue()
        session.subscribe_queue(filters[i % len(filters)], queue)
        queues.append(queue)
    publish = _publish()

    def route() -> int:
        taken = broker.router.route(session.endpoint, publish)
        for queue in queues:  # keep the queues from filling up: 10 cheap pops
            queue.get_nowait()
        return taken

    assert benchmark(route) == 10
    assert broker.dropped == 0
    session.end()


# -- the client -----------------------------------------------------------------------


class _NullTransport:
    """Stands in for the client's socket, so that only the client's own work is timed."""

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


def _with_client(tmp_path: Path, body: Callable[[Client], Awaitable[None]]) -> None:
    """Run ``body`` with a client connected to a broker, in a running event loop."""

    async def main() -> None:
        path = str(tmp_path / "bench.sock")
        async with (
            Broker(path, BrokerConfig()),
            Client(path, component="daemoneye-agent") as client,
        ):
            await body(client)

    asyncio.run(main())


def test_client_publish_nowait_in_a_burst(benchmark: BenchmarkFixture, tmp_path: Path) -> None:
    """One typed publish of a 256-byte event while a burst goes on: serialize,
    join the open batch (sealed and written every 64 KiB)."""

    async def body(client: Client) -> None:
        protocol = client._pump
        assert protocol is not None
        real = protocol.transport
        protocol.transport = cast(Any, _NullTransport())
        event = make_event()
        try:
            benchmark(client.publish_nowait, TOPIC, event)
        finally:
            protocol.transport = real
        assert client.statistics().published >= 1

    _with_client(tmp_path, body)


def test_client_receives_one_event(benchmark: BenchmarkFixture, tmp_path: Path) -> None:
    """A ``DeliverBatch`` of one event read from the socket, decoded, queued and
    taken from its subscription."""

    async def body(client: Client) -> None:
        sub = await client.subscribe(TOPIC)
        batch = frames_pb2.PublishBatch(
            topic=TOPIC.name, payload_type=TOPIC.payload_name, payloads=[PAYLOAD]
        )
        frame = encode_deliver_batch(sub.subscription_id, 1, batch.SerializeToString())

        def receive() -> bytes:
            client._data_received(frame)
            event = sub.get_nowait()
            assert event is not None
            return event.payload

        assert benchmark(receive) == PAYLOAD
        assert sub.dropped == 0

    _with_client(tmp_path, body)
