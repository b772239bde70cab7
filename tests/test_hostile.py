"""Hostile input and fault tolerance: a real broker attacked over a real socket.

Every test attacks a broker the way a hostile (or broken) local client would,
through a raw Unix socket, and checks four things:

* the offender gets a clear answer: the ``Error`` frame the protocol
  specifies (docs/protocol.md §7), then the connection is closed;
* the broker stays up and never lets an exception escape into its event loop
  (``loop_errors`` records every exception the loop reports, and every ERROR
  log line of the package, and fails the test on any);
* its memory stays bounded (``tracemalloc`` around the attack; the broker of
  the ``broker`` fixture runs in this process);
* it keeps serving everyone else: a well-behaved publisher and subscriber
  (:class:`GoodPair`) exchange events before, during and after the attack,
  and the subscriber sees every event, in order, with no gap in its sequence
  numbers (and nothing the attacker sent).

Tests marked ``xfail(strict=True)`` with a ``# BUG:`` comment document a
broker or client bug they reveal; they turn into failures once it is fixed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import os
import signal
import socket
import stat
import sys
import threading
import tracemalloc
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import TEST_CONFIG, peer_published, worker_env
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rawpeer import HANDSHAKE_LIMIT, RawPeer, describe, framed, hello, kind, ping, read_varint

from daemoneye.eventbus.v1 import control_pb2, events_pb2, frames_pb2, registry
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationFilter, CorrelationMetadata
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode, Frame
from daemoneye_eventbus.broker import Broker, BrokerConfig
from daemoneye_eventbus.client import Client, Subscription
from daemoneye_eventbus.errors import (
    AccessDenied,
    BrokerAlreadyRunning,
    BrokerError,
    LimitExceeded,
)
from daemoneye_eventbus.frames import encode_frame, encode_varint
from daemoneye_eventbus.protocol import State
from daemoneye_eventbus.sessions import SocketSession

T = TypeVar("T")

KiB = 1024
MiB = 1024 * KiB
EC = ErrorCode
LIFECYCLE = registry.EVENTS_PROCESS_LIFECYCLE
ANOMALY = registry.EVENTS_PROCESS_ANOMALY
PROCESS_EVENT = events_pb2.ProcessEvent.DESCRIPTOR.full_name
HOSTILE_WORKERS = Path(__file__).resolve().parent / "hostile_workers.py"
# Frames a client may send once OPEN, and before (docs/protocol.md §2).
CLIENT_OPEN_KINDS = frozenset(
    {"publish", "subscribe", "unsubscribe", "ping", "pong", "error", "goodbye", "stats_request"}
)
CLIENT_CONNECTING_KINDS = frozenset({"hello", "goodbye"})


# -- wire helpers specific to these attacks (the shared ones are in rawpeer) ------------------


def tag(number: int, wire_type: int) -> bytes:
    return encode_varint(number << 3 | wire_type)


def len_field(number: int, value: bytes) -> bytes:
    """A length-delimited field, built by hand so that it may hold anything."""
    return tag(number, 2) + encode_varint(len(value)) + value


def publish(topic: str = ANOMALY.name, pid: int = 0, payload: bytes | None = None) -> Frame:
    data = events_pb2.ProcessEvent(pid=pid).SerializeToString() if payload is None else payload
    return Frame(publish=frames_pb2.Publish(topic=topic, payload_type=PROCESS_EVENT, payload=data))


def subscribe(sid: int, flt: str) -> Frame:
    return Frame(subscribe=frames_pb2.Subscribe(subscription_id=sid, filter=flt))


def unsubscribe(sid: int) -> Frame:
    return Frame(unsubscribe=frames_pb2.Unsubscribe(subscription_id=sid))


# -- the well-behaved pair -------------------------------------------------------------------


class GoodPair:
    """A publisher and a subscriber that must keep working whatever else happens.

    By default ``procmond`` publishes ``events.process.lifecycle`` and
    ``daemoneye-agent`` subscribes to it; with ``public=True`` two anonymous
    clients use ``events.process.anomaly``, where an attacker's event that
    was wrongly routed would show up. Every event received is checked: the
    right topic, the next pid the publisher sent and the next sequence number.
    """

    def __init__(self, path: str, *, public: bool = False) -> None:
        self.topic = ANOMALY if public else LIFECYCLE
        self.pub = Client(path, name="good-publisher", component="" if public else "procmond")
        self.sub_client = Client(
            path, name="good-subscriber", component="" if public else "daemoneye-agent"
        )
        self.sent = 0
        self.got = 0
        self._flow: asyncio.Task[None] | None = None

    async def __aenter__(self) -> GoodPair:
        await self.pub.connect()
        await self.sub_client.connect()
        self.sub = await self.sub_client.subscribe(self.topic)
        await self.exchange(3)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop_flow()
        await self.pub.close()
        await self.sub_client.close()

    async def _publish_one(self) -> None:
        await self.pub.publish(self.topic, events_pb2.ProcessEvent(pid=self.sent, name="good"))
        self.sent += 1

    async def _receive_all(self, timeout: float = 5.0) -> None:
        while self.got < self.sent:
            event = await self.sub.get(timeout=timeout)
            msg = event.message()
            assert (event.topic, msg.name) == (self.topic.name, "good"), (event, msg)
            assert (event.sequence, msg.pid) == (self.got + 1, self.got), "gap or foreign event"
            self.got += 1
        assert (self.sub.missed, self.sub.dropped) == (0, 0)

    async def exchange(self, n: int = 10) -> None:
        """Publish ``n`` events and receive them all, in order, without gaps."""
        for _ in range(n):
            await self._publish_one()
        await self.pub.flush()
        await self._receive_all()

    def start(self, interval: float = 0.01) -> None:
        """Keep publishing in the background (during an attack) until :meth:`stop`."""

        async def flow() -> None:
            while True:
                await self._publish_one()
                await asyncio.sleep(interval)

        self._flow = asyncio.create_task(flow())

    async def _stop_flow(self) -> None:
        if self._flow is not None:
            self._flow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flow  # re-raises whatever made the flow fail
            self._flow = None

    async def stop(self) -> None:
        """Stop the background flow, check everything arrived, and exchange some more."""
        await self._stop_flow()
        await self.pub.flush()
        await self._receive_all()
        await self.exchange(5)


# -- fixtures and small helpers ------------------------------------------------------------------


class _ErrorLogs(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def watch_loop(loop: asyncio.AbstractEventLoop) -> Iterator[list[dict[str, Any]]]:
    """Record what ``loop`` reports to its exception handler, and ERROR logs of the package."""
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    logs = _ErrorLogs()
    logger = logging.getLogger("daemoneye_eventbus")
    logger.addHandler(logs)
    try:
        yield seen
    finally:
        logger.removeHandler(logs)
        loop.set_exception_handler(previous)
    assert not seen, f"exceptions escaped into the event loop: {seen}"
    assert not logs.records, [r.getMessage() for r in logs.records]


@pytest.fixture(autouse=True)
def _close_raw_peers() -> Iterator[None]:
    yield
    for peer in list(RawPeer.open_peers):
        peer.close()


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    with watch_loop(asyncio.get_running_loop()) as seen:
        yield seen


@pytest.fixture
async def bus(loop_errors: list[dict[str, Any]], broker: Broker) -> Broker:
    """The in-process ``broker`` of conftest (TEST_CONFIG), watched by ``loop_errors``."""
    assert broker.protobuf_backend == "upb"
    return broker


def config(**changes: Any) -> BrokerConfig:
    return dataclasses.replace(TEST_CONFIG, **changes)


async def eventually(
    predicate: Callable[[], bool], timeout: float = 5.0, what: str = "a condition"
) -> None:
    """Wait until ``predicate()`` holds; fail after ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                if predicate():
                    return
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"waited {timeout} s in vain for {what}") from None


async def settle(broker: Broker, connections: int, timeout: float = 5.0) -> None:
    """Wait until the broker holds exactly ``connections`` socket connections."""
    try:
        await eventually(lambda: broker.statistics().connections == connections, timeout)
    except AssertionError:
        have = broker.statistics().connections
        raise AssertionError(f"{have} connections after {timeout} s, not {connections}") from None


async def new_session(broker: Broker, before: set[SocketSession]) -> SocketSession:
    """The broker's session for a connection opened after ``before`` was taken."""
    await eventually(lambda: bool(broker._sessions - before), what="a new session")
    (session,) = broker._sessions - before
    return session


@dataclasses.dataclass
class Growth:
    current: int
    peak: int


@contextlib.contextmanager
def traced() -> Iterator[Callable[[], Growth]]:
    """Trace Python allocations; yields a function giving the growth since entry."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    gc.collect()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]

    def growth() -> Growth:
        current, peak = tracemalloc.get_traced_memory()
        return Growth(current - base, peak - base)

    try:
        yield growth
    finally:
        if started:
            tracemalloc.stop()


def subscriptions(broker: Broker) -> list[tuple[str, int, str]]:
    return sorted(
        (s.session_id, s.subscription_id, s.filter) for s in broker.statistics().subscription_stats
    )


async def spawn_worker(*args: str) -> asyncio.subprocess.Process:
    """A well-behaved client process (not under test: no asyncio debug mode)."""
    env = worker_env()
    env.pop("PYTHONASYNCIODEBUG", None)
    return await asyncio.create_subprocess_exec(
        sys.executable, str(HOSTILE_WORKERS), *args, stdout=asyncio.subprocess.PIPE, env=env
    )


async def read_json(proc: asyncio.subprocess.Process, timeout: float = 30.0) -> dict[str, Any]:
    assert proc.stdout is not None
    async with asyncio.timeout(timeout):
        line = await proc.stdout.readline()
    assert line, "the worker exited without output"
    result: dict[str, Any] = json.loads(line)
    return result


async def finish(proc: asyncio.subprocess.Process, timeout: float = 30.0) -> dict[str, Any]:
    """The worker's summary line, once it has exited successfully."""
    async with asyncio.timeout(timeout):
        out, _ = await proc.communicate()
    assert proc.returncode == 0, out
    result: dict[str, Any] = json.loads(out.splitlines()[-1])
    return result


async def reap(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    await proc.communicate()


# == 1. A length prefix far above the limit ====================================================

HUGE_PREFIXES = {
    "256MiB": encode_varint(256 * MiB),
    "32GiB-in-5-bytes": b"\xff\xff\xff\xff\x7f",
    "prefix-over-5-bytes": b"\xff\xff\xff\xff\xff",
}


@pytest.mark.parametrize("handshake", [False, True], ids=["before-hello", "after-hello"])
@pytest.mark.parametrize("prefix", HUGE_PREFIXES.values(), ids=HUGE_PREFIXES.keys())
async def test_huge_length_prefix_is_refused_at_once_without_allocating(
    bus: Broker, sock_path: str, prefix: bytes, handshake: bool
) -> None:
    async with GoodPair(sock_path) as pair:
        pair.start()
        baseline = bus.statistics().connections
        peer = await RawPeer.connect(sock_path, handshake=handshake)
        with traced() as growth:
            await peer.write(prefix)  # and no body at all
            await peer.expect_fatal(EC.ERROR_CODE_FRAME_TOO_LARGE, timeout=3.0)
            peak = growth().peak
        peer.close()
        assert peak < 1 * MiB, f"{peak} bytes allocated for a frame that was never sent"
        await settle(bus, baseline)
        await pair.stop()


async def test_handshake_frame_limit_is_exactly_4096_bytes(bus: Broker, sock_path: str) -> None:
    def hello_of(size: int) -> bytes:
        body = hello("n" * (size - 8)).SerializeToString()  # 8 bytes of tags and lengths
        assert len(body) == size
        return framed(body)

    ok = await RawPeer.connect(sock_path, handshake=False)
    await ok.write(hello_of(HANDSHAKE_LIMIT))
    await ok.expect("welcome")
    await ok.roundtrip()
    too_big = await RawPeer.connect(sock_path, handshake=False)
    await too_big.write(hello_of(HANDSHAKE_LIMIT + 1))
    await too_big.expect_fatal(EC.ERROR_CODE_FRAME_TOO_LARGE)
    ok.close()
    too_big.close()


# == 2. Many oversized prefixes in parallel before the handshake ===============================


async def connect_many(broker: Broker, path: str, n: int) -> list[RawPeer]:
    """``n`` connections without handshake, opened in bursts the listen queue can take."""
    peers: list[RawPeer] = []
    baseline = broker.statistics().connections
    while len(peers) < n:
        burst = min(50, n - len(peers))
        peers += await asyncio.gather(
            *(RawPeer.connect(path, handshake=False) for _ in range(burst))
        )
        await settle(broker, baseline + len(peers))
    return peers


async def test_parallel_oversized_prefixes_before_hello(bus: Broker, sock_path: str) -> None:
    n = 200
    async with GoodPair(sock_path) as pair:
        pair.start()
        baseline = bus.statistics().connections
        with traced() as growth:
            peers = await connect_many(bus, sock_path, n)
            try:
                for i, peer in enumerate(peers):
                    await peer.write(encode_varint(256 * MiB + i))
                await asyncio.gather(
                    *(p.expect_fatal(EC.ERROR_CODE_FRAME_TOO_LARGE, timeout=10) for p in peers)
                )
                peak = growth().peak
            finally:
                for peer in peers:
                    peer.close()
        # The bookkeeping of 200 connections (both ends are in this process), but
        # nothing like 200 x 256 MiB.
        assert peak < 16 * MiB, peak
        await settle(bus, baseline)
        await pair.stop()


# == 3. Zero-length frames, split prefixes, truncated bodies ===================================


@pytest.mark.parametrize("handshake", [False, True], ids=["before-hello", "after-hello"])
async def test_zero_length_frame_is_malformed(bus: Broker, sock_path: str, handshake: bool) -> None:
    async with GoodPair(sock_path) as pair:
        peer = await RawPeer.connect(sock_path, handshake=handshake)
        await peer.write(b"\x00")
        await peer.expect_fatal(EC.ERROR_CODE_MALFORMED_FRAME)
        peer.close()
        await pair.exchange()


async def test_frames_split_anywhere_are_reassembled(bus: Broker, sock_path: str) -> None:
    async def trickle(peer: RawPeer, data: bytes) -> None:
        for b in data:
            await peer.write(bytes([b]))
            await asyncio.sleep(0.002)

    before = set(bus._sessions)
    peer = await RawPeer.connect(sock_path, handshake=False)
    session = await new_session(bus, before)
    # A hello, one byte per write.
    await trickle(peer, encode_frame(hello("split")))
    await peer.expect("welcome")
    # A non-minimal 5-byte prefix (allowed, §1), one byte per write.
    body = ping(77).SerializeToString()
    await peer.write(bytes([len(body) | 0x80, 0x80, 0x80]))
    await eventually(lambda: session.conn.buffered_input == 3)
    await trickle(peer, b"\x80\x00" + body)
    assert (await peer.expect("pong")).pong.nonce == 77
    # A 2-byte prefix split in its middle, then a body split in two.
    sub = await RawPeer.connect(sock_path)
    await sub.send(subscribe(1, ANOMALY.name))
    await sub.expect("subscribe_ack")
    payload = events_pb2.ProcessEvent(pid=1, name="n" * 500).SerializeToString()
    data = encode_frame(publish(payload=payload))
    assert data[0] & 0x80
    await peer.write(data[:1])
    await eventually(lambda: session.conn.buffered_input == 1)
    await peer.write(data[1:100])
    await eventually(lambda: session.conn.buffered_input == 98)  # the body only
    await peer.write(data[100:])
    assert (await sub.expect("deliver")).deliver.publish.payload == payload
    assert session.conn.buffered_input == 0
    peer.close()
    sub.close()


TRUNCATIONS = {
    "half-a-prefix": (b"\x80", 1),
    "part-of-a-body": (encode_varint(100) + b"\x0a" * 40, 40),
}


@pytest.mark.parametrize("handshake", [False, True], ids=["before-hello", "after-hello"])
@pytest.mark.parametrize("how", ["eof", "close"])
@pytest.mark.parametrize(("data", "buffered"), TRUNCATIONS.values(), ids=TRUNCATIONS.keys())
async def test_truncated_frame_then_eof_frees_the_connection(
    bus: Broker, sock_path: str, data: bytes, buffered: int, how: str, handshake: bool
) -> None:
    async with GoodPair(sock_path) as pair:
        baseline = bus.statistics().connections
        before = set(bus._sessions)
        peer = await RawPeer.connect(sock_path, handshake=handshake)
        session = await new_session(bus, before)
        await peer.write(data)
        await eventually(lambda: session.conn.buffered_input == buffered, what="buffered")
        if how == "eof":
            peer.sock.shutdown(socket.SHUT_WR)
            # End of file inside a frame just closes (§2): no Error frame.
            assert await peer.until_eof() == []
        peer.close()
        await settle(bus, baseline)
        assert session not in bus._sessions
        assert session.conn.state is State.CLOSED
        assert session.conn.buffered_input == 0
        assert not session.endpoint.subscriptions
        await pair.exchange()


# == 4. A handshake sent one byte at a time ====================================================


async def test_trickled_handshakes_hit_the_deadline(bus: Broker, sock_path: str) -> None:
    deadline = TEST_CONFIG.handshake_timeout
    async with GoodPair(sock_path) as pair:
        pair.start()
        baseline = bus.statistics().connections
        data = encode_frame(hello("slowloris-" + "z" * 60))
        loop = asyncio.get_running_loop()
        start = loop.time()
        peers = await asyncio.gather(
            *(RawPeer.connect(sock_path, handshake=False) for _ in range(20))
        )

        async def trickle(peer: RawPeer) -> None:
            for b in data:  # 5 bytes a second: 15 s for the whole hello
                if not await peer.write(bytes([b])):
                    return
                await asyncio.sleep(0.2)

        tricklers = [asyncio.create_task(trickle(p)) for p in peers]
        try:
            await asyncio.gather(
                *(p.expect_fatal(EC.ERROR_CODE_HANDSHAKE_TIMEOUT, deadline + 5) for p in peers)
            )
            elapsed = loop.time() - start
        finally:
            for t in tricklers:
                t.cancel()
            await asyncio.gather(*tricklers, return_exceptions=True)
            for peer in peers:
                peer.close()
        assert elapsed < deadline + 4.0
        await settle(bus, baseline)
        await pair.stop()


# == 5. Frames before Hello, a second Hello ====================================================

PRE_HELLO: dict[str, tuple[bytes, ErrorCode.ValueType | None]] = {
    "publish": (encode_frame(publish()), EC.ERROR_CODE_UNEXPECTED_FRAME),
    "subscribe": (encode_frame(subscribe(1, "#")), EC.ERROR_CODE_UNEXPECTED_FRAME),
    "unsubscribe": (encode_frame(unsubscribe(1)), EC.ERROR_CODE_UNEXPECTED_FRAME),
    "ping": (encode_frame(ping(1)), EC.ERROR_CODE_UNEXPECTED_FRAME),
    "stats_request": (
        encode_frame(Frame(stats_request=frames_pb2.StatsRequest(request_id=1))),
        EC.ERROR_CODE_UNEXPECTED_FRAME,
    ),
    "fatal-error": (
        encode_frame(Frame(error=frames_pb2.Error(code=EC.ERROR_CODE_INTERNAL, fatal=True))),
        EC.ERROR_CODE_UNEXPECTED_FRAME,
    ),
    "deliver": (
        encode_frame(Frame(deliver=frames_pb2.Deliver(subscription_id=1, sequence=1))),
        EC.ERROR_CODE_UNEXPECTED_FRAME,
    ),
    "welcome": (
        encode_frame(Frame(welcome=frames_pb2.Welcome(protocol_version=1))),
        EC.ERROR_CODE_UNEXPECTED_FRAME,
    ),
    "hello+publish-in-one-write": (
        encode_frame(hello()) + encode_frame(publish()),
        EC.ERROR_CODE_UNEXPECTED_FRAME,
    ),
    "hello+subscribe-in-one-write": (
        encode_frame(hello()) + encode_frame(subscribe(1, "#")),
        EC.ERROR_CODE_UNEXPECTED_FRAME,
    ),
    "version-2": (encode_frame(hello(version=2)), EC.ERROR_CODE_UNSUPPORTED_VERSION),
    "version-0": (encode_frame(hello(version=0)), EC.ERROR_CODE_UNSUPPORTED_VERSION),
    "goodbye": (encode_frame(Frame(goodbye=frames_pb2.Goodbye(reason="x"))), None),
}


@pytest.mark.parametrize("case", PRE_HELLO)
async def test_frames_before_hello_are_refused_and_never_routed(
    bus: Broker, sock_path: str, case: str
) -> None:
    data, code = PRE_HELLO[case]
    async with GoodPair(sock_path, public=True) as pair:
        subs_before = subscriptions(bus)
        peer = await RawPeer.connect(sock_path, handshake=False)
        await peer.write(data)
        frames = await peer.until_eof()
        peer.close()
        if code is None:  # a goodbye before hello just ends the connection
            assert frames == []
        else:  # no Welcome, only the fatal Error
            assert [kind(f) for f in frames] == ["error"], describe(frames)
            assert (frames[0].error.code, frames[0].error.fatal) == (code, True), describe(frames)
        assert subscriptions(bus) == subs_before  # nothing registered
        assert peer_published(bus.statistics()) == pair.sent  # nothing accepted
        await pair.exchange()  # nothing routed: the public subscriber sees only the pair


async def test_second_hello_is_unexpected(bus: Broker, sock_path: str) -> None:
    async with GoodPair(sock_path, public=True) as pair:
        peer = await RawPeer.connect(sock_path)
        await peer.send(hello("again"))
        await peer.expect_fatal(EC.ERROR_CODE_UNEXPECTED_FRAME)
        peer.close()
        await pair.exchange()
        assert peer_published(bus.statistics()) == pair.sent


# == 6. Random bytes and mutated valid frames (hypothesis) =====================================

FUZZ_CONFIG = config(max_frame_bytes=16 * KiB)
FUZZ_NONCE = 0x5EED_F00D_1234
FUZZ_TAIL = b"\x00" * (FUZZ_CONFIG.max_frame_bytes + 16)
# Benign frames first: hypothesis favours the first elements of sampled_from.
VALID_FRAMES = [
    encode_frame(f)
    for f in (
        publish(pid=7),
        ping(1),
        subscribe(7, "events.#"),
        Frame(stats_request=frames_pb2.StatsRequest(request_id=1)),
        Frame(
            publish=frames_pb2.Publish(
                topic="control.health.heartbeat",
                payload_type=control_pb2.Heartbeat.DESCRIPTOR.full_name,
                payload=control_pb2.Heartbeat(sequence=3).SerializeToString(),
                correlation=CorrelationMetadata(correlation_id="c", root_correlation_id="c"),
            )
        ),
        Frame(
            subscribe=frames_pb2.Subscribe(
                subscription_id=8,
                filter="+.process.anomaly",
                correlation_filter=CorrelationFilter(correlation_id_patterns=["*a*b*"]),
            )
        ),
        unsubscribe(7),
        Frame(pong=frames_pb2.Pong(nonce=1)),
        Frame(error=frames_pb2.Error(code=EC.ERROR_CODE_INTERNAL, message="x", fatal=False)),
        hello("fuzz"),
        hello("fuzz", component="netmond"),
        Frame(goodbye=frames_pb2.Goodbye(reason="bye")),
        Frame(error=frames_pb2.Error(code=EC.ERROR_CODE_INTERNAL, message="x", fatal=True)),
        Frame(deliver=frames_pb2.Deliver(subscription_id=1, sequence=1)),
    )
]


@dataclasses.dataclass
class Prediction:
    """What the broker must do with a byte stream, by the rules of docs/protocol.md."""

    #: The code of the fatal Error that ends the connection; None: it ends silently.
    code: ErrorCode.ValueType | None = None
    #: The stream ends inside a frame: the broker waits for more.
    incomplete: bool = False
    #: A hello was parsed: what follows depends on how the broker's reads split.
    ambiguous: bool = False
    #: Our trailing ping is a frame of its own, with nothing wrong before it.
    pong: bool = False


def predict(stream: bytes, *, handshake: bool, ping_at: int) -> Prediction:
    """An independent model of the broker's parser: framing, decoding, state (§1, §2)."""
    pos = 0
    while pos < len(stream):
        start = pos
        try:
            prefix = read_varint(stream, pos, 5)
        except ValueError:
            return Prediction(EC.ERROR_CODE_FRAME_TOO_LARGE)
        if prefix is None:
            return Prediction(incomplete=True)
        length, pos = prefix
        if length > (FUZZ_CONFIG.max_frame_bytes if handshake else HANDSHAKE_LIMIT):
            return Prediction(EC.ERROR_CODE_FRAME_TOO_LARGE)
        if length == 0:
            return Prediction(EC.ERROR_CODE_MALFORMED_FRAME)
        if pos + length > len(stream):
            return Prediction(incomplete=True)
        try:
            frame = Frame.FromString(stream[pos : pos + length])
        except DecodeError:
            return Prediction(EC.ERROR_CODE_MALFORMED_FRAME)
        pos += length
        k = kind(frame)
        if k is None:
            return Prediction(EC.ERROR_CODE_MALFORMED_FRAME)
        if k not in (CLIENT_OPEN_KINDS if handshake else CLIENT_CONNECTING_KINDS):
            return Prediction(EC.ERROR_CODE_UNEXPECTED_FRAME)
        if k == "hello":
            return Prediction(ambiguous=True)
        if k == "goodbye" or (k == "error" and frame.error.fatal):
            return Prediction(None)
        if start == ping_at:
            return Prediction(pong=True)
    return Prediction(incomplete=True)


@st.composite
def attacks(draw: st.DrawFn) -> tuple[bool, bytes]:
    """A payload for a fresh connection, with or without a handshake first."""
    handshake = draw(st.sampled_from([True, False]))  # mostly after a handshake
    if draw(st.booleans()):
        return handshake, draw(st.binary(min_size=1, max_size=600))
    frames = draw(st.lists(st.sampled_from(VALID_FRAMES), min_size=1, max_size=5))
    data = bytearray(b"".join(frames))
    mutation = st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete", "truncate", "repeat"]),
        st.integers(0, 1 << 16),
        st.integers(0, 255),
    )
    for op, where, value in draw(st.lists(mutation, max_size=3)):
        i = where % (len(data) + 1)
        if op == "flip" and i < len(data):
            data[i] ^= 1 << (value % 8)
        elif op == "set" and i < len(data):
            data[i] = value
        elif op == "insert":
            data[i:i] = bytes([value])
        elif op == "delete":
            del data[i : i + 1 + value % 4]
        elif op == "truncate":
            del data[i:]
        elif op == "repeat":
            data[i:i] = data[i : i + value % 32] * 2
    return handshake, bytes(data) or b"\x01"


class LoopThread:
    """An event loop in a background thread, for a synchronous hypothesis test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="hostile-broker")

    def __enter__(self) -> LoopThread:
        self.thread.start()
        return self

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


async def fuzz_one(broker: Broker, path: str, handshake: bool, payload: bytes) -> None:
    """One connection, one attack: it works or ends with the specified fatal Error."""
    baseline = broker.statistics().connections
    peer = await RawPeer.connect(path, handshake=handshake, name="fuzz")
    try:
        stream = payload + encode_frame(ping(FUZZ_NONCE))
        expected = predict(stream, handshake=handshake, ping_at=len(payload))
        await peer.write(stream)
        frames: list[Frame] = []
        if expected.pong:  # the connection works: our ping is answered ...
            while True:
                frame = await peer.recv(timeout=10)
                frames.append(frame)
                assert not (kind(frame) == "error" and frame.error.fatal), describe(frames)
                if kind(frame) == "pong" and frame.pong.nonce == FUZZ_NONCE:
                    break
            expected = Prediction(EC.ERROR_CODE_MALFORMED_FRAME)  # ... until the zeros below
        elif expected.incomplete:
            expected = predict(stream + FUZZ_TAIL, handshake=handshake, ping_at=len(payload))
            assert not expected.incomplete
        # Zeros complete any pending frame, then make a zero-length frame: the
        # connection always ends.
        await peer.write(FUZZ_TAIL)
        frames += await peer.until_eof(timeout=10)
    finally:
        peer.close()
    fatal = [f.error for f in frames if kind(f) == "error" and f.error.fatal]
    assert all(f.error.code != EC.ERROR_CODE_INTERNAL for f in frames if kind(f) == "error")
    assert len(fatal) <= 1, describe(frames)
    assert [kind(f) for f in frames].count("welcome") <= (0 if handshake else 1)
    if fatal:
        assert kind(frames[-1]) == "error", describe(frames)
    if expected.ambiguous:
        assert not fatal or fatal[0].code in (
            EC.ERROR_CODE_FRAME_TOO_LARGE,
            EC.ERROR_CODE_MALFORMED_FRAME,
            EC.ERROR_CODE_UNEXPECTED_FRAME,
            EC.ERROR_CODE_UNSUPPORTED_VERSION,
        ), describe(frames)
    elif expected.code is None:
        assert not fatal, describe(frames)  # the client said goodbye, or sent a fatal error
    else:
        assert fatal, f"expected {EC.Name(expected.code)}: {describe(frames)}"
        assert fatal[0].code == expected.code, describe(frames)
    await settle(broker, baseline, timeout=10)


def test_fuzzed_frames_never_hurt_the_broker(sock_path: str) -> None:
    with LoopThread() as lt, watch_loop(lt.loop):
        stack = contextlib.AsyncExitStack()
        broker = lt.run(stack.enter_async_context(Broker(sock_path, FUZZ_CONFIG)))
        try:
            assert broker.protobuf_backend == "upb"
            pair = lt.run(stack.enter_async_context(GoodPair(sock_path)))
            lt.loop.call_soon_threadsafe(pair.start)
            examples = 0

            @settings(
                max_examples=100,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow],
            )
            @given(attack=attacks())
            def attack_once(attack: tuple[bool, bytes]) -> None:
                nonlocal examples
                examples += 1
                lt.run(fuzz_one(broker, sock_path, *attack))

            attack_once()
            assert examples >= 100
            lt.run(pair.stop())
        finally:
            lt.run(stack.aclose())


# == 7. Deeply nested or lying protobuf ========================================================


def nested_groups(depth: int, number: int = 100) -> bytes:
    """``depth`` unknown groups, each inside the previous one."""
    return tag(number, 3) * depth + tag(number, 4) * depth


def nested_messages(depth: int, number: int = 99) -> bytes:
    """Unknown length-delimited fields, each the whole content of the previous one."""
    data = b""
    for _ in range(depth):
        data = len_field(number, data)
    return data


NESTED: dict[str, tuple[bool, bytes]] = {
    "1000-groups-before-hello": (False, nested_groups(1000)),
    "100k-groups-after-hello": (True, nested_groups(100_000)),
    "ping-beside-101-groups": (True, ping(1).SerializeToString() + nested_groups(101)),
    "groups-inside-publish": (True, len_field(3, nested_groups(5000))),
    "groups-inside-correlation": (True, len_field(3, len_field(2, nested_groups(5000)))),
    "unbalanced-end-group": (True, tag(100, 4)),
    "mismatched-end-group": (True, tag(100, 3) + tag(101, 4)),
    "publish-claims-2GiB": (True, tag(3, 2) + encode_varint(2**31) + b"\x0a\x01a"),
    "topic-longer-than-publish": (True, b"\x1a\x02\x0a\x05"),
    "11-byte-varint-length": (True, b"\x1a" + b"\xff" * 10 + b"\x01"),
    "correlation-longer-than-publish": (
        True,
        len_field(3, len_field(1, ANOMALY.name.encode()) + b"\x12\x7f\x0a\x01c"),
    ),
    "invalid-wire-type-7": (True, ping(1).SerializeToString() + tag(20, 7)),
}


@pytest.mark.parametrize("case", NESTED)
async def test_nested_or_lying_protobuf_is_malformed(
    bus: Broker, sock_path: str, case: str
) -> None:
    handshake, body = NESTED[case]
    async with GoodPair(sock_path) as pair:
        peer = await RawPeer.connect(sock_path, handshake=handshake)
        with traced() as growth:
            await peer.write(framed(body))
            await peer.expect_fatal(EC.ERROR_CODE_MALFORMED_FRAME, timeout=10)
            peak = growth().peak
        peer.close()
        assert peak < 4 * len(body) + 1 * MiB, peak  # nothing the lengths ask for
        await pair.exchange()


async def test_deep_nesting_is_harmless_where_opaque_or_shallow(
    bus: Broker, sock_path: str
) -> None:
    # Unknown fields beside a kind are ignored when they decode (§1) ...
    peer = await RawPeer.connect(sock_path)
    await peer.write(
        framed(ping(9).SerializeToString() + nested_groups(50) + nested_messages(5000))
    )
    assert (await peer.expect("pong")).pong.nonce == 9
    # ... and a payload nested past the parser's limit is refused, not
    # delivered, without harm: the connection stays usable.
    sub = await RawPeer.connect(sock_path)
    await sub.send(subscribe(1, ANOMALY.name))
    await sub.expect("subscribe_ack")
    await peer.send(publish(payload=nested_groups(100_000)))
    error = (await peer.expect("error")).error
    assert (error.code, error.fatal) == (ErrorCode.ERROR_CODE_INVALID_PAYLOAD, False)
    await peer.send(publish(pid=5))
    assert (await sub.expect("deliver")).deliver.publish.payload == proc_bytes(5)
    peer.close()
    sub.close()


async def test_with_validation_off_payloads_travel_verbatim(sock_path: str) -> None:
    # A payload is then never decoded: 100k nested groups travel verbatim.
    async with Broker(sock_path, config(validate_payloads=False)):
        peer = await RawPeer.connect(sock_path)
        sub = await RawPeer.connect(sock_path)
        await sub.send(subscribe(1, ANOMALY.name))
        await sub.expect("subscribe_ack")
        payload = nested_groups(100_000)
        await peer.send(publish(payload=payload))
        assert (await sub.expect("deliver")).deliver.publish.payload == payload
        peer.close()
        sub.close()


def proc_bytes(pid: int) -> bytes:
    return events_pb2.ProcessEvent(pid=pid).SerializeToString()


# == 8. Semantically invalid frames ============================================================

NO_KIND = {
    "unknown-varint": tag(99, 0) + b"\x01",
    "unknown-bytes": len_field(99, b"hello"),
    "unknown-group": tag(99, 3) + tag(99, 4),
    "unknown-fixed64": tag(99, 1) + b"\x00" * 8,
}


@pytest.mark.parametrize("handshake", [False, True], ids=["before-hello", "after-hello"])
@pytest.mark.parametrize("body", NO_KIND.values(), ids=NO_KIND.keys())
async def test_frame_without_a_kind_is_malformed(
    bus: Broker, sock_path: str, body: bytes, handshake: bool
) -> None:
    async with GoodPair(sock_path) as pair:
        peer = await RawPeer.connect(sock_path, handshake=handshake)
        await peer.write(framed(body))
        await peer.expect_fatal(EC.ERROR_CODE_MALFORMED_FRAME)
        peer.close()
        await pair.exchange()


def error_body(code: bytes, fatal: bool) -> bytes:
    """An Error frame body whose code is the raw varint ``code``."""
    return len_field(
        11, tag(1, 0) + code + len_field(2, b"what?") + (b"\x18\x01" if fatal else b"")
    )


async def test_error_frames_with_unknown_codes_from_a_client(bus: Broker, sock_path: str) -> None:
    async with GoodPair(sock_path) as pair:
        baseline = bus.statistics().connections
        # Non-fatal, with codes this schema does not know (one of them negative):
        # logged, nothing changes.
        peer = await RawPeer.connect(sock_path)
        for code in (encode_varint(9999), encode_varint(2**32 - 1), b"\xff" * 9 + b"\x01"):
            await peer.write(framed(error_body(code, fatal=False)))
            await peer.roundtrip()
        # Fatal, with an unknown code: the broker closes without answering (§7).
        await peer.write(framed(error_body(encode_varint(2**31 - 1), fatal=True)))
        assert await peer.until_eof() == []
        peer.close()
        # Before the handshake, any Error from the client is unexpected.
        peer = await RawPeer.connect(sock_path, handshake=False)
        await peer.write(framed(error_body(encode_varint(9999), fatal=False)))
        await peer.expect_fatal(EC.ERROR_CODE_UNEXPECTED_FRAME)
        peer.close()
        await settle(bus, baseline)
        await pair.exchange()


@pytest.mark.parametrize(
    "body",
    [
        len_field(3, len_field(3, PROCESS_EVENT.encode())),
        len_field(3, len_field(1, b"") + len_field(3, PROCESS_EVENT.encode())),
        len_field(3, b""),
    ],
    ids=["no-topic-field", "empty-topic-field", "empty-publish"],
)
async def test_publish_without_topic_is_refused_and_harmless(
    bus: Broker, sock_path: str, body: bytes
) -> None:
    async with GoodPair(sock_path, public=True) as pair:
        peer = await RawPeer.connect(sock_path)
        await peer.write(framed(body))
        error = (await peer.expect("error")).error
        assert (error.code, error.fatal, error.topic, error.subscription_id) == (
            EC.ERROR_CODE_INVALID_TOPIC,
            False,
            "",
            0,
        )
        assert "empty" in error.message
        await peer.roundtrip()  # still usable
        peer.close()
        assert peer_published(bus.statistics()) == pair.sent
        await pair.exchange()


BAD_UTF8 = b"events.\xff\xfe"
INVALID_UTF8: dict[str, tuple[bool, bytes]] = {
    "hello-client-name": (False, len_field(1, b"\x08\x01" + len_field(2, BAD_UTF8))),
    "hello-component": (False, len_field(1, b"\x08\x01" + len_field(3, b"procmond\xc0"))),
    "goodbye-reason-surrogate": (False, len_field(12, len_field(1, b"\xed\xa0\x80"))),
    "publish-topic": (True, len_field(3, len_field(1, BAD_UTF8))),
    "publish-payload-type": (True, len_field(3, len_field(1, b"a") + len_field(3, BAD_UTF8))),
    "correlation-id": (True, len_field(3, len_field(2, len_field(1, b"\x80")))),
    "correlation-tag-key": (
        True,
        len_field(3, len_field(2, len_field(5, len_field(1, b"\xf8\x88\x80\x80\x80")))),
    ),
    "subscribe-filter": (True, len_field(5, b"\x08\x01" + len_field(2, BAD_UTF8))),
    "filter-pattern": (
        True,
        len_field(5, b"\x08\x01" + len_field(2, b"#") + len_field(3, len_field(2, b"*\xff*"))),
    ),
    "error-message": (True, len_field(11, len_field(2, b"\xc3\x28"))),
}


@pytest.mark.parametrize("case", INVALID_UTF8)
async def test_invalid_utf8_in_any_string_is_malformed(
    bus: Broker, sock_path: str, case: str
) -> None:
    handshake, body = INVALID_UTF8[case]
    async with GoodPair(sock_path, public=True) as pair:
        subs_before = subscriptions(bus)
        peer = await RawPeer.connect(sock_path, handshake=handshake)
        await peer.write(framed(body))
        await peer.expect_fatal(EC.ERROR_CODE_MALFORMED_FRAME)
        peer.close()
        assert subscriptions(bus) == subs_before
        assert peer_published(bus.statistics()) == pair.sent
        await pair.exchange()


async def test_unknown_fields_in_a_publish_are_not_forwarded(bus: Broker, sock_path: str) -> None:
    marker = b"SMUGGLED"
    payload = events_pb2.ProcessEvent(pid=5).SerializeToString() + len_field(999, marker + b"-p")
    correlation = len_field(1, b"cid") + len_field(3, b"cid") + len_field(77, marker + b"-c")
    inner = b"".join(
        (
            len_field(1, ANOMALY.name.encode()),
            len_field(2, correlation),
            len_field(3, PROCESS_EVENT.encode()),
            len_field(4, payload),
            len_field(15, marker + b"-publish"),
            tag(16, 3) + len_field(1, marker + b"-group") + tag(16, 4),
            tag(17, 5) + b"\x01\x02\x03\x04",
            tag(18, 0) + encode_varint(2**63),
        )
    )
    # Unknown fields beside the kind, in the Frame itself, too.
    body = len_field(3, inner) + len_field(99, marker + b"-frame")
    async with GoodPair(sock_path) as pair:
        sub = await RawPeer.connect(sock_path)
        await sub.send(subscribe(1, ANOMALY.name))
        await sub.expect("subscribe_ack")
        peer = await RawPeer.connect(sock_path)
        await peer.write(framed(body))
        raw = await sub.recv_body()  # read raw: the Deliver exactly as the broker sent it
        deliver = Frame.FromString(raw).deliver
        assert deliver.publish.topic == ANOMALY.name
        assert deliver.publish.correlation.correlation_id == "cid"
        # The payload is opaque: forwarded byte for byte, unknown fields and all ...
        assert deliver.publish.payload == payload
        # ... but nothing else the publisher smuggled in reaches the subscriber.
        assert raw.count(marker) == 1, raw
        assert (
            deliver.publish.SerializeToString()
            == frames_pb2.Publish(
                topic=ANOMALY.name,
                correlation=CorrelationMetadata(correlation_id="cid", root_correlation_id="cid"),
                payload_type=PROCESS_EVENT,
                payload=payload,
            ).SerializeToString()
        )
        for p in (peer, sub):
            await p.roundtrip()
            p.close()
        await pair.exchange()


# == 9. Invalid topics and filters =============================================================

MAX_FRAME = TEST_CONFIG.max_frame_bytes


def largest(make: Callable[[int], bytes], limit: int = MAX_FRAME) -> int:
    """The largest ``n`` for which the body ``make(n)`` is at most ``limit`` bytes."""
    n = limit
    while len(make(n)) > limit:
        n -= len(make(n)) - limit
    assert limit - 4 <= len(make(n)) <= limit
    return n


def _subscribe_body(n: int) -> bytes:
    return subscribe(5, "a" * n).SerializeToString()


def _publish_topic_body(n: int) -> bytes:
    return publish(topic="a" * n).SerializeToString()


def _publish_payload_body(n: int) -> bytes:
    return publish(payload=b"p" * n).SerializeToString()


BAD_FILTERS: dict[str, tuple[str, ErrorCode.ValueType]] = {
    "hash-not-last": ("events.#.anomaly", EC.ERROR_CODE_INVALID_FILTER),
    "a.#.b": ("a.#.b", EC.ERROR_CODE_INVALID_FILTER),
    "a.b#": ("a.b#", EC.ERROR_CODE_INVALID_FILTER),
    "+a": ("+a", EC.ERROR_CODE_INVALID_FILTER),
    "##": ("##", EC.ERROR_CODE_INVALID_FILTER),
    "empty": ("", EC.ERROR_CODE_INVALID_FILTER),
    "empty-level": ("events..anomaly", EC.ERROR_CODE_INVALID_FILTER),
    "trailing-dot": ("events.", EC.ERROR_CODE_INVALID_FILTER),
    "nul": ("events.\x00.anomaly", EC.ERROR_CODE_INVALID_FILTER),
    "non-ascii": ("événements.#", EC.ERROR_CODE_INVALID_FILTER),
    "space": ("events process", EC.ERROR_CODE_INVALID_FILTER),
    "17-levels": (".".join(["+"] * 17), EC.ERROR_CODE_INVALID_FILTER),
    "10000-levels": (".".join(["a"] * 10_000), EC.ERROR_CODE_INVALID_FILTER),
    "256-bytes": ("a" * 256, EC.ERROR_CODE_INVALID_FILTER),
    "largest-in-a-frame": ("a" * largest(_subscribe_body), EC.ERROR_CODE_INVALID_FILTER),
    "1MiB-frame-over-the-limit": ("a" * MiB, EC.ERROR_CODE_FRAME_TOO_LARGE),
}


@pytest.mark.parametrize("case", BAD_FILTERS)
async def test_invalid_filters_are_refused_and_nothing_half_registered(
    bus: Broker, sock_path: str, case: str
) -> None:
    flt, code = BAD_FILTERS[case]
    fatal = code == EC.ERROR_CODE_FRAME_TOO_LARGE
    async with GoodPair(sock_path, public=True) as pair:
        subs_before = subscriptions(bus)
        peer = await RawPeer.connect(sock_path)
        await peer.send(subscribe(5, flt))
        if fatal:  # the frame itself is over the limit: a violation
            await peer.expect_fatal(code)
        else:
            error = (await peer.expect("error", timeout=10)).error
            assert (error.code, error.fatal, error.subscription_id) == (code, False, 5)
            assert error.topic == flt[:256]
            assert 0 < len(error.message) <= 512
            assert subscriptions(bus) == subs_before
            # The connection is usable, and id 5 was never taken.
            await peer.send(subscribe(5, ANOMALY.name), unsubscribe(5))
            await peer.expect("subscribe_ack")
            await peer.expect("unsubscribe_ack")
        peer.close()
        assert subscriptions(bus) == subs_before
        await pair.exchange()


BAD_PUBLISHES: dict[str, tuple[Frame, ErrorCode.ValueType]] = {
    "hash": (publish(topic="events.process.#"), EC.ERROR_CODE_INVALID_TOPIC),
    "plus": (publish(topic="events.+.anomaly"), EC.ERROR_CODE_INVALID_TOPIC),
    "hash-alone": (publish(topic="#"), EC.ERROR_CODE_INVALID_TOPIC),
    "nul": (publish(topic="events.process.\x00"), EC.ERROR_CODE_INVALID_TOPIC),
    "empty-level": (publish(topic="events..anomaly"), EC.ERROR_CODE_INVALID_TOPIC),
    "10000-levels": (publish(topic=".".join(["a"] * 10_000)), EC.ERROR_CODE_INVALID_TOPIC),
    "undeclared": (publish(topic="events.process.nope"), EC.ERROR_CODE_INVALID_TOPIC),
    "largest-topic-in-a-frame": (
        publish(topic="a" * largest(_publish_topic_body)),
        EC.ERROR_CODE_INVALID_TOPIC,
    ),
    "no-room-for-the-deliver-envelope": (
        publish(payload=b"p" * largest(_publish_payload_body)),
        EC.ERROR_CODE_FRAME_TOO_LARGE,
    ),
    "1MiB-topic-over-the-frame-limit": (publish(topic="a" * MiB), EC.ERROR_CODE_FRAME_TOO_LARGE),
}


@pytest.mark.parametrize("case", BAD_PUBLISHES)
async def test_invalid_publishes_are_refused_and_routed_nowhere(
    bus: Broker, sock_path: str, case: str
) -> None:
    frame, code = BAD_PUBLISHES[case]
    fatal = len(frame.SerializeToString()) > MAX_FRAME
    async with GoodPair(sock_path, public=True) as pair:
        published = peer_published(bus.statistics())
        peer = await RawPeer.connect(sock_path)
        await peer.send(frame)
        if fatal:
            await peer.expect_fatal(code)
        else:
            error = (await peer.expect("error", timeout=10)).error
            assert (error.code, error.fatal, error.subscription_id) == (code, False, 0)
            assert error.topic == frame.publish.topic[:256]
            assert 0 < len(error.message) <= 512
            await peer.roundtrip()
        peer.close()
        assert peer_published(bus.statistics()) == published
        await pair.exchange()  # nothing reached the public subscriber


# == 10. 100,000 subscribe requests on one connection ==========================================


async def test_subscription_flood_is_capped_then_freed(
    loop_errors: list[dict[str, Any]], sock_path: str
) -> None:
    # Every filter may differ. The deadlines are the defaults: the attacker, its
    # reader and the pair share this process's event loop with the broker, and on
    # a loaded machine one 256 KiB read of requests keeps that loop busy for about
    # a second, longer than TEST_CONFIG lets a client leave its socket unread.
    cfg = dataclasses.replace(BrokerConfig(), allow_undeclared_topics=True)
    cap = cfg.max_subscriptions
    async with Broker(sock_path, cfg) as broker, GoodPair(sock_path) as pair:
        pair.start()
        subs_before = subscriptions(broker)
        peer = await RawPeer.connect(sock_path)

        async def flood(n: int) -> None:
            """Subscribe ids 1..n, pipelined, raw: acks up to the cap, refusals after."""
            requests = b"".join(
                encode_frame(subscribe(i, f"flood.s{i}.#")) for i in range(1, n + 1)
            )
            sending = asyncio.create_task(peer.write(requests))
            pongs: list[asyncio.Task[bool]] = []
            i = 0
            async with asyncio.timeout(60):
                while i < n:
                    bodies = peer.complete_bodies()
                    if not bodies:
                        assert await peer.read_some(), "the broker hung up"
                    for body in bodies:
                        frame = Frame.FromString(body)
                        if kind(frame) == "ping":  # answered once the requests are out
                            pong = Frame(pong=frames_pb2.Pong(nonce=frame.ping.nonce))
                            pongs.append(asyncio.create_task(peer.send(pong)))
                            continue
                        i += 1
                        if i <= cap:
                            assert kind(frame) == "subscribe_ack", describe([frame])
                            assert frame.subscribe_ack.subscription_id == i
                        else:
                            err = frame.error
                            assert (kind(frame), err.code, err.fatal, err.subscription_id) == (
                                "error",
                                EC.ERROR_CODE_LIMIT_EXCEEDED,
                                False,
                                i,
                            ), describe([frame])
                assert await sending
                await asyncio.gather(*pongs)
            assert len(subscriptions(broker)) == len(subs_before) + cap
            await peer.roundtrip()  # still responsive

        async def unsubscribe_all() -> None:
            await peer.write(b"".join(encode_frame(unsubscribe(i)) for i in range(1, cap + 1)))
            for i in range(1, cap + 1):
                frame = await peer.expect("unsubscribe_ack", timeout=30)
                assert frame.unsubscribe_ack.subscription_id == i
            assert subscriptions(broker) == subs_before
            await peer.roundtrip()

        await flood(100_000)
        await pair.exchange()
        await unsubscribe_all()
        # The same again under tracemalloc (which slows everything down, hence
        # fewer refusals): what the subscriptions take comes back when they go.
        with traced() as growth:
            await flood(cap + 5000)
            full = growth()
            await unsubscribe_all()
            gc.collect()
            freed = growth()
        peer.close()
        await pair.stop()
    assert full.current > 512 * KiB, full
    assert freed.current < full.current // 4, (full, freed)
    assert full.peak < 32 * MiB, full


# == 11. Slow and stuck subscribers under a flood ==============================================


async def test_stuck_subscribers_are_bounded_dropped_and_disconnected(
    loop_errors: list[dict[str, Any]], sock_path: str
) -> None:
    cfg = config(
        max_queue_bytes=256 * KiB,
        socket_send_buffer=64 * KiB,
        slow_consumer_timeout=6.0,
        idle_timeout=30.0,
    )
    # 0.5 MB/s: a subscriber process keeps up even on a loaded machine (the broker's
    # own stalls, in this busy process, come back as bursts), while a stuck one is
    # offered several MB before the broker gives up on it.
    n, rate, size = 4000, 500, 1024
    async with Broker(sock_path, cfg) as broker:
        # Three stuck subscribers: one never reads, one reads a byte a second, and
        # one stops reading until the broker gives up on it, then drains its socket.
        stuck: list[RawPeer] = []
        sessions: list[SocketSession] = []
        for _ in range(3):
            before = set(broker._sessions)
            peer = await RawPeer.connect(sock_path, component="daemoneye-agent")
            sessions.append(await new_session(broker, before))
            await peer.send(subscribe(1, LIFECYCLE.name))
            await peer.expect("subscribe_ack")
            stuck.append(peer)
        never, slow, late = stuck
        stuck_ids = {s.session_id for s in sessions}
        good = await spawn_worker("subscribe", "--socket", sock_path, "--count", str(n))
        publisher = None
        try:
            assert await read_json(good) == {"ready": True}
            # The last figures seen for each subscription: (delivered, dropped).
            figures: dict[str, tuple[int, int]] = {}

            async def sample() -> None:
                while True:
                    for s in broker.statistics().subscription_stats:
                        figures[s.session_id] = (s.delivered, s.dropped)
                    await asyncio.sleep(0.05)

            async def one_byte_a_second() -> None:
                while True:
                    if not await slow.read_some(1):
                        return
                    await asyncio.sleep(1.0)

            with traced() as growth:
                publisher = await spawn_worker(
                    *("publish", "--socket", sock_path, "--count", str(n)),
                    *("--rate", str(rate), "--size", str(size)),
                )
                helpers = [asyncio.create_task(sample()), asyncio.create_task(one_byte_a_second())]
                try:
                    await eventually(lambda: sessions[2].conn.close_expected, timeout=30)
                    await late.drain()
                    late_frames = await late.until_eof(allow_truncated=True)
                    result = await finish(publisher, timeout=60)
                    summary = await finish(good, timeout=60)
                    await settle(broker, 0, timeout=cfg.slow_consumer_timeout + 10)
                finally:
                    for h in helpers:
                        h.cancel()
                    await asyncio.gather(*helpers, return_exceptions=True)
                peak = growth().peak
        finally:
            for proc in (good, publisher):
                if proc is not None:
                    await reap(proc)
        stats = broker.statistics()
    # The publisher was never held up; the good subscriber got everything.
    assert (result["published"], result["closed"]) == (n, None), result
    assert result["elapsed"] < n / rate + 30
    assert summary == {
        "received": n,
        "missed": 0,
        "dropped": 0,
        "last_seq": n,
        "ordered": True,
        "closed": None,
    }
    # Drops were counted, and only for the stuck subscribers.
    stuck_drops = sum(d for sid, (_, d) in figures.items() if sid in stuck_ids)
    assert stuck_drops > 0
    assert stats.dropped >= stuck_drops
    assert all(d == 0 for sid, (_, d) in figures.items() if sid not in stuck_ids), figures
    # Memory: a subscriber costs at most its queue and the transport's buffer (its
    # high-water mark, 256 KiB, plus one flush of the queue), never the flood; 1 MiB
    # more for the rest (the late reader's buffer, the publisher's reads, ...).
    bound = 4 * (2 * cfg.max_queue_bytes + 256 * KiB) + 1 * MiB
    assert peak < bound, peak
    offered = sum(sum(f) for sid, f in figures.items() if sid in stuck_ids)
    assert offered * size > 2 * bound, offered  # what unbounded queues would have held
    # The late reader got a prefix of its events, then why it was cut off (unless,
    # on a very loaded machine, it did not drain in time and was aborted, §8).
    if not late.truncated:
        assert kind(late_frames[-1]) == "error", describe(late_frames[-3:])
        assert late_frames[-1].error.code == EC.ERROR_CODE_SLOW_CONSUMER
    seqs = [f.deliver.sequence for f in late_frames if kind(f) == "deliver"]
    assert seqs[0] == 1
    assert seqs == sorted(set(seqs))
    # The others find what the kernel held, then the end (an abort may cut the
    # last frame short); gaps, if any, are drops.
    for peer in (never, slow):
        frames = await peer.until_eof(timeout=10, allow_truncated=True)
        seqs = [f.deliver.sequence for f in frames if kind(f) == "deliver"]
        assert seqs == sorted(set(seqs))
        assert all(
            f.error.code == EC.ERROR_CODE_SLOW_CONSUMER for f in frames if kind(f) == "error"
        )
    for peer in stuck:
        peer.close()


async def test_peer_that_never_reads_its_replies_is_cut_off(
    loop_errors: list[dict[str, Any]], sock_path: str
) -> None:
    cfg = config(max_queue_bytes=256 * KiB, socket_send_buffer=64 * KiB, idle_timeout=30.0)
    async with Broker(sock_path, cfg) as broker, GoodPair(sock_path) as pair:
        pair.start()
        before = set(broker._sessions)
        peer = await RawPeer.connect(sock_path)
        session = await new_session(broker, before)
        # Refused requests: each reply (~380 bytes) quotes the 255-byte filter.
        requests = encode_frame(subscribe(1, "!" + "a" * 254)) * 100
        with traced() as growth:

            async def ask_forever() -> None:
                while True:
                    if session.conn.close_expected or not await peer.write(requests):
                        return
                    await asyncio.sleep(0.001)

            asking = asyncio.create_task(ask_forever())
            try:
                await eventually(lambda: session.conn.close_expected, timeout=30)
                peak = growth().peak  # what the broker held, before we read anything
            finally:
                asking.cancel()
                await asyncio.gather(asking, return_exceptions=True)
        await peer.drain()
        frames = await peer.until_eof(allow_truncated=True)
        peer.close()
        assert all(
            f.error.code == EC.ERROR_CODE_INVALID_FILTER for f in frames[:-1] if kind(f) == "error"
        )
        if not peer.truncated:  # unless, on a very loaded machine, it was aborted (§8)
            assert kind(frames[-1]) == "error", describe(frames[-3:])
            assert frames[-1].error.code == EC.ERROR_CODE_SLOW_CONSUMER
        assert session.conn.error is not None
        assert session.conn.error.code == EC.ERROR_CODE_SLOW_CONSUMER
        assert peak < cfg.max_queue_bytes + 4 * 256 * KiB + 2 * MiB, peak
        await settle(broker, 2)
        await pair.stop()


# == 12. Connection floods =====================================================================


@pytest.mark.parametrize("limit", ["max_connections", "max_connections_per_uid"])
async def test_connection_flood_is_refused_and_slots_come_back(
    loop_errors: list[dict[str, Any]], sock_path: str, limit: str
) -> None:
    slots = 8
    async with Broker(sock_path, config(**{limit: slots})) as broker, GoodPair(sock_path) as pair:
        pair.start()
        for _ in range(3):
            holders = [await RawPeer.connect(sock_path) for _ in range(slots - 2)]
            refused = broker.statistics().refused
            extras = await asyncio.gather(
                *(RawPeer.connect(sock_path, handshake=False) for _ in range(20))
            )
            errors = await asyncio.gather(
                *(e.expect_fatal(EC.ERROR_CODE_CONNECTION_LIMIT) for e in extras)
            )
            per_user = limit == "max_connections_per_uid"
            assert all(("per user" in e.error.message) is per_user for e in errors)
            client = Client(sock_path)
            with pytest.raises(LimitExceeded, match="connection limit"):
                await client.connect()
            await client.close()
            assert broker.statistics().refused == refused + 21
            assert broker.statistics().connections == slots
            for p in (*holders, *extras):
                p.close()
            await settle(broker, 2)
            await pair.exchange()
        # Silent connections hold their slots only until the handshake deadline.
        squatters = [await RawPeer.connect(sock_path, handshake=False) for _ in range(slots - 2)]
        await asyncio.gather(
            *(s.expect_fatal(EC.ERROR_CODE_HANDSHAKE_TIMEOUT, timeout=5) for s in squatters)
        )
        for s in squatters:
            s.close()
        await settle(broker, 2)
        async with Client(sock_path) as late:
            await late.flush()
        await pair.stop()


# == 13. Clients stopped or killed =============================================================


@pytest.mark.parametrize("how", ["sigstop-idle", "sigstop-flooded", "sigkill"])
async def test_stopped_or_killed_client_is_cleaned_up(
    loop_errors: list[dict[str, Any]], sock_path: str, how: str
) -> None:
    cfg = config(max_queue_bytes=256 * KiB, socket_send_buffer=64 * KiB)
    async with Broker(sock_path, cfg) as broker, GoodPair(sock_path, public=True) as pair:
        before = set(broker._sessions)
        victim = await spawn_worker("subscribe", "--socket", sock_path, "--timeout", "60")
        try:
            assert await read_json(victim) == {"ready": True}
            session = await new_session(broker, before)
            assert broker.statistics().connections == 3
            if how == "sigkill":
                victim.kill()
                await victim.wait()
                await settle(broker, 2, timeout=2.0)  # at once: the kernel closes its socket
            else:
                victim.send_signal(signal.SIGSTOP)
                if how == "sigstop-flooded":
                    big = events_pb2.ProcessEvent(name="x" * 1000)
                    async with Client(sock_path, component="procmond") as flooder:
                        async with asyncio.timeout(cfg.idle_timeout + 5):
                            while session in broker._sessions:  # until it is cut off
                                for _ in range(200):
                                    await flooder.publish(LIFECYCLE, big)
                                await flooder.flush()
                await settle(broker, 2, timeout=cfg.idle_timeout + 3)
                # Its queue aged past slow_consumer_timeout, or it stopped answering pings.
                expected = {
                    "sigstop-idle": EC.ERROR_CODE_IDLE_TIMEOUT,
                    "sigstop-flooded": EC.ERROR_CODE_SLOW_CONSUMER,
                }[how]
                assert session.conn.error is not None
                assert session.conn.error.code == expected, session.conn.error
                victim.send_signal(signal.SIGCONT)
                summary = await finish(victim, timeout=20)
                assert summary["closed"], summary
                if how == "sigstop-idle":  # the Error frame waited in its socket
                    assert "IDLE_TIMEOUT" in summary["closed"], summary
            assert [s.filter for s in broker.statistics().subscription_stats] == [ANOMALY.name]
            await pair.exchange()
        finally:
            with contextlib.suppress(ProcessLookupError):
                victim.send_signal(signal.SIGCONT)
            await reap(victim)


# == 14. SIGTERM to a standalone broker under load =============================================

DRAIN_TIMEOUT = 5.0


async def serve(path: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "daemoneye_eventbus.cli", "serve", "--socket", path),
        *("--drain-timeout", str(DRAIN_TIMEOUT)),
        # As root the broker refuses to run on without --user or --allow-root.
        *(["--allow-root"] if os.geteuid() == 0 else []),
        stdout=asyncio.subprocess.PIPE,
        env=worker_env(),
    )
    assert proc.stdout is not None
    async with asyncio.timeout(20):
        line = await proc.stdout.readline()
    assert b"listening" in line, line
    return proc


async def test_sigterm_under_load_drains_and_restarts(sock_path: str) -> None:
    broker = await serve(sock_path)
    sub = pub = None
    try:
        sub = await spawn_worker("subscribe", "--socket", sock_path)
        assert await read_json(sub) == {"ready": True}
        pub = await spawn_worker("publish", "--socket", sock_path, "--size", "200")
        assert await read_json(pub) == {"connected": True}
        await asyncio.sleep(0.5)  # let it flood
        loop = asyncio.get_running_loop()
        start = loop.time()
        broker.send_signal(signal.SIGTERM)
        # It stops accepting: the socket file goes at once, nobody can connect.
        await eventually(lambda: not os.path.lexists(sock_path), timeout=DRAIN_TIMEOUT)
        with pytest.raises((FileNotFoundError, ConnectionRefusedError)):
            await RawPeer.connect(sock_path, handshake=False)
        async with asyncio.timeout(DRAIN_TIMEOUT + 10):
            out, _ = await broker.communicate()
        assert loop.time() - start < DRAIN_TIMEOUT + 5
        assert broker.returncode == 0, out
        published = await finish(pub)
        received = await finish(sub)
    finally:
        for proc in (broker, sub, pub):
            if proc is not None:
                await reap(proc)
    assert not os.path.lexists(sock_path)
    # Both saw the broker's goodbye; everything queued was delivered before it.
    assert "goodbye" in published["closed"], published
    assert "goodbye" in received["closed"], received
    assert received["ordered"]
    line = out.decode().split("broker stopped: ")[1]
    counts = {name: int(value) for value, name in (part.split() for part in line.split(", "))}
    assert received["received"] + received["dropped"] == counts["delivered"]
    assert received["missed"] <= counts["dropped"]
    assert received["last_seq"] == counts["delivered"] + received["missed"]
    # An immediate restart on the same path works.
    again = await serve(sock_path)
    try:
        async with GoodPair(sock_path) as pair:
            await pair.exchange()
        again.send_signal(signal.SIGTERM)
        async with asyncio.timeout(DRAIN_TIMEOUT + 10):
            await again.communicate()
        assert again.returncode == 0
    finally:
        await reap(again)


# == 15. Start-up on a hostile path ============================================================


def _unix_socket_file(path: Path) -> None:
    """Leave a socket file at ``path`` with nobody listening (a stale socket)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()


def _prepare(path: Path, what: str) -> Callable[[], object]:
    """Put ``what`` at ``path``; return a snapshot function to check it is left alone."""
    other = path.parent / "other"
    if what == "file":
        path.write_text("keep me")
    elif what == "symlink-to-file":
        other.write_text("keep me")
        path.symlink_to(other)
    elif what == "dangling-symlink":
        path.symlink_to(other)
    elif what == "symlink-to-stale-socket":
        _unix_socket_file(other)
        path.symlink_to(other)
    elif what == "directory":
        path.mkdir()
        (path / "inside").write_text("keep me")
    elif what == "fifo":
        os.mkfifo(path)

    def snapshot() -> object:
        st = os.lstat(path)
        extra: object = None
        if stat.S_ISLNK(st.st_mode):
            extra = (os.readlink(path), os.path.lexists(other) and os.lstat(other).st_ino)
        elif stat.S_ISREG(st.st_mode):
            extra = path.read_text()
        elif stat.S_ISDIR(st.st_mode):
            extra = sorted(p.name for p in path.iterdir())
        return st.st_ino, st.st_mode, extra

    return snapshot


@pytest.mark.parametrize(
    "what",
    ["file", "symlink-to-file", "dangling-symlink", "symlink-to-stale-socket", "directory", "fifo"],
)
async def test_startup_refuses_a_foreign_file_and_leaves_it_alone(
    loop_errors: list[dict[str, Any]], sock_dir: Path, what: str
) -> None:
    path = sock_dir / "bus.sock"
    snapshot = _prepare(path, what)
    before = snapshot()
    broker = Broker(str(path), TEST_CONFIG)
    with pytest.raises(BrokerError, match="refusing") as info:
        await broker.start()
    assert not isinstance(info.value, BrokerAlreadyRunning)
    assert not broker.is_serving
    assert snapshot() == before


async def test_startup_reclaims_a_stale_socket(
    loop_errors: list[dict[str, Any]], sock_dir: Path
) -> None:
    path = sock_dir / "bus.sock"
    _unix_socket_file(path)
    async with Broker(str(path), TEST_CONFIG), GoodPair(str(path)) as pair:
        await pair.exchange()
    assert not os.path.lexists(path)


async def test_startup_refuses_a_live_socket(
    loop_errors: list[dict[str, Any]], sock_dir: Path
) -> None:
    path = sock_dir / "bus.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as squatter:
        squatter.bind(str(path))
        squatter.listen(1)
        inode = os.lstat(path).st_ino
        with pytest.raises(BrokerAlreadyRunning):
            await Broker(str(path), TEST_CONFIG).start()
        assert os.lstat(path).st_ino == inode  # not stolen
    path.unlink()
    # A live broker is no different, and it keeps serving.
    async with Broker(str(path), TEST_CONFIG), GoodPair(str(path)) as pair:
        inode = os.lstat(path).st_ino
        with pytest.raises(BrokerAlreadyRunning):
            await Broker(str(path), TEST_CONFIG).start()
        assert os.lstat(path).st_ino == inode
        await pair.exchange()


# == Order of processing: frames before a violation or a goodbye (§1, §8) ======================


async def next_pid(watcher: Client, sub: Subscription[events_pb2.ProcessEvent]) -> int:
    """The pid of the first event ``sub`` has, with a marker (pid 999) published last.

    Whatever the broker routed before the marker arrives before it.
    """
    await watcher.publish(ANOMALY, events_pb2.ProcessEvent(pid=999))
    return (await sub.get(timeout=5)).message().pid


async def test_publish_before_a_violation_in_the_same_read_is_routed(
    bus: Broker, sock_path: str
) -> None:
    # Found by this suite (they were dropped); fixed since: keep as a regression test.
    async with Client(sock_path) as watcher:
        sub = await watcher.subscribe(ANOMALY)
        peer = await RawPeer.connect(sock_path)
        await peer.write(encode_frame(publish(pid=41)) + b"\x00")  # then a zero-length frame
        await peer.expect_fatal(EC.ERROR_CODE_MALFORMED_FRAME)  # and no answer before it
        peer.close()
        assert await next_pid(watcher, sub) == 41


async def test_publish_before_goodbye_in_the_same_read_is_routed(
    bus: Broker, sock_path: str
) -> None:
    async with Client(sock_path) as watcher:
        sub = await watcher.subscribe(ANOMALY)
        peer = await RawPeer.connect(sock_path)
        await peer.send(publish(pid=42), ping(1), Frame(goodbye=frames_pb2.Goodbye()))
        assert await peer.until_eof() == []  # handled, not answered: no pong
        peer.close()
        assert await next_pid(watcher, sub) == 42


async def test_client_close_delivers_what_was_published(bus: Broker, sock_path: str) -> None:
    # Client.close() used to write its Goodbye before the publishes still buffered.
    async with Client(sock_path) as watcher:
        sub = await watcher.subscribe(ANOMALY)
        async with Client(sock_path) as publisher:
            await publisher.publish(ANOMALY, events_pb2.ProcessEvent(pid=43))
        assert await next_pid(watcher, sub) == 43


# == Bugs found on the way =====================================================================


# A component claim longer than 128 characters is refused at the handshake
# (docs/protocol.md §3), with an Error that fits the handshake frame limit; it
# once was echoed whole in a Welcome larger than a client accepts.
async def test_overlong_component_claim_is_refused(bus: Broker, sock_path: str) -> None:
    component = "c" * 4080  # the Hello is 4088 bytes: within the handshake limit
    peer = await RawPeer.connect(sock_path, handshake=False)
    await peer.write(encode_frame(hello("", component=component)))
    error = (await peer.expect("error")).error
    peer.close()
    assert error.code == ErrorCode.ERROR_CODE_ACCESS_DENIED
    assert "at most 128 characters" in error.message
    with pytest.raises(AccessDenied, match="at most 128 characters"):
        await Client(sock_path, name="", component=component).connect()
    # The longest claim passes the length check: it is refused only as a name nobody declares.
    with pytest.raises(AccessDenied, match=r"^unknown component 'c{63}…'"):
        await Client(sock_path, name="", component="c" * 128).connect()


# The listen backlog is 512 (once asyncio's create_unix_server re-listened with
# its default of 100, so a burst of connects from restarting collectors failed).
async def test_listen_queue_takes_a_burst_of_connects(bus: Broker, sock_path: str) -> None:
    socks: list[socket.socket] = []
    refused = 0
    try:
        for _ in range(300):  # no await in between: the broker cannot accept meanwhile
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(sock_path)
            except BlockingIOError:
                refused += 1
                s.close()
            else:
                socks.append(s)
    finally:
        for s in socks:
            s.close()
    assert refused == 0, f"{refused} of 300 connects found the listen queue full"
