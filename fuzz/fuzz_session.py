"""Fuzz target: the broker's per-connection handling, without sockets.

Run::

    python -m fuzz.fuzz_session [-max_total_time=SECONDS] [libFuzzer flags] [corpus dirs]

A real :class:`~daemoneye_eventbus.broker.Broker` (never started: no socket, no
housekeeping task) gets two client connections, ``A`` and ``B``, each a real
``SocketSession`` on a :class:`FakeTransport` (records what the broker writes,
simulates a backed-up socket), plus one in-process ``LocalSession``. The input
chooses the configuration, the peers' credentials and claimed components,
then a list of operations: raw bytes or well-formed frames from a client,
backed-up and drained sockets, clock ticks (heartbeats, idle and handshake
deadlines, slow consumers), end of file, resets, reconnects, in-process
publishes and subscriptions, shutdown goodbyes, statistics. The format is in
``fuzz/README.md``; every byte string is a valid input.

Everything runs inside one event loop per process (``SocketSession`` needs a
running loop for its timers), from one coroutine per input.

Invariants, checked after every operation:

* no exception escapes the broker's protocol callbacks; the in-process API
  raises nothing but :class:`EventBusError` subclasses;
* what the broker writes to each connection is what a conforming client
  accepts: a client-role ``Connection`` reading it never finds a violation
  (frame kinds and sizes, including the handshake limit before ``welcome``),
  nothing follows a ``goodbye`` or a fatal ``error``, no ``ERROR_CODE_INTERNAL``;
  the transport is never written after it was closed;
* acks and deliveries are consistent: ``subscribe_ack`` only for an id not
  active, ``unsubscribe_ack`` only for an active one, ``deliver`` only for an
  active subscription, with increasing sequence numbers, on a valid declared
  (or allowed undeclared) topic with its declared payload type, readable by
  the receiving identity;
* statistics: ``connections`` equals the connections admitted and not lost,
  each connection holds at most ``max_subscriptions`` subscriptions, the
  active subscriptions of an open, drained connection are exactly those acked,
  totals never decrease and cover the per-connection figures, session ids are
  unique, and ``StatsResponse`` fits the frame limit it is cut to;
* queues stay bounded (socket sessions by ``max_queue_bytes`` + 256 KiB plus
  one frame, local queues by both bounds);
* once every connection is gone, nothing is left: no connection, no
  subscription, no per-uid count.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from google.protobuf.message import Message

from daemoneye.eventbus.v1 import frames_pb2, registry
from daemoneye.eventbus.v1.correlation_pb2 import (
    CorrelationFilter,
    CorrelationMetadata,
    SequenceRange,
)
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode, Frame
from daemoneye_eventbus.access import ComponentRule, PeerCredentials, Policy, TopicAccess, may_read
from daemoneye_eventbus.broker import Broker, BrokerConfig
from daemoneye_eventbus.delivery import EventQueue
from daemoneye_eventbus.errors import EventBusError, InvalidTopic
from daemoneye_eventbus.frames import HANDSHAKE_MAX_FRAME_BYTES, decode_varint, encode_frame
from daemoneye_eventbus.protocol import PROTOCOL_VERSION, Connection, Role, State
from daemoneye_eventbus.sessions import LocalSession, SocketSession
from daemoneye_eventbus.topics import validate_topic
from fuzz.common import ByteReader, check, fail, quiet_logging, reported_bugs, run_fuzzer

__all__ = ["FakeTransport", "Op", "main", "run_one", "shutdown", "test_one_input"]

# The broker's own figures (broker.py): write buffer high-water mark.
_WRITE_HIGH: Final = 256 * 1024

UID: Final = os.geteuid()
#: Peer credentials an input may give a connection: the broker's own uid (trusted
#: by the default policy), another uid, unknown credentials, root.
PEERS: Final[tuple[PeerCredentials | None, ...]] = (
    PeerCredentials(os.getpid(), UID, os.getgid()),
    PeerCredentials(4242, 4242 if UID != 4242 else 4243, 4242),
    None,
    PeerCredentials(1, 0, 0),
)
COMPONENTS: Final = ("procmond", "daemoneye-agent", "", "netmond", "not-a-component")

TOPICS: Final[tuple[str, ...]] = (
    *registry.TOPICS,
    "control.collector.task.scan.c1",
    "events.undeclared.topic",
    "events..process",
    "events.process.#",
    "",
    "a" * 300,
    ".".join("x" * 17),
)
FILTERS: Final = (
    "events.process.#",
    "#",
    "events.+.lifecycle",
    "control.#",
    "control.collector.task.+.+",
    "events.process.lifecycle",
    "+.health.status",
    "events.#.x",
    "a..b",
    "",
    "events.undeclared.#",
    "x" * 256,
)
PAYLOAD_TYPES: Final = (
    "daemoneye.eventbus.v1.ProcessEvent",
    "daemoneye.eventbus.v1.Heartbeat",
    "",
    "nope",
)


def _policies() -> tuple[Policy, ...]:
    mine = frozenset({UID})
    return (
        Policy.default(UID),
        Policy(
            components={
                "procmond": ComponentRule(uids=mine),
                "daemoneye-agent": ComponentRule(uids=mine, privileged=True),
            },
            source="fuzz-rules",
        ),
        Policy(trusted_uids=frozenset({UID, 0}), allow_anonymous=False, source="fuzz-no-anon"),
        Policy(
            components={"procmond": ComponentRule(uids=mine, executables=frozenset({"/no/such"}))},
            source="fuzz-exe",
        ),
    )


POLICIES: Final = _policies()


def _config(selector: int) -> BrokerConfig:
    small = bool(selector & 0x08)
    return BrokerConfig(
        policy=POLICIES[selector & 0x03],
        allow_undeclared_topics=bool(selector & 0x04),
        max_subscriptions=3 if small else 1024,
        max_queue_messages=4 if small else 1000,
        max_queue_bytes=4096 if small else 8 * 1024 * 1024,
        max_frame_bytes=512 if small else 1 << 20,
        handshake_max_frame_bytes=256 if small else 4096,
        max_connections=1 if selector & 0x10 else 1024,
        max_connections_per_uid=1 if selector & 0x20 else 256,
        handshake_timeout=2.0,
        heartbeat_interval=5.0,
        idle_timeout=15.0,
        slow_consumer_timeout=10.0,
        drain_timeout=5.0,
    )


class FakeTransport(asyncio.Transport):
    """A transport that keeps what is written; test scaffolding, not broker code.

    ``backed_up`` stands for a socket whose kernel buffer is full: writes then
    count in :meth:`get_write_buffer_size`, as in asyncio's transports.
    """

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False
        self.aborted = False
        self.backed_up = False
        self.buffered = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        check(not self.closing, "the broker wrote to a transport it had closed")
        check(len(data) > 0, "the broker wrote an empty chunk")
        self.written += data
        if self.backed_up:
            self.buffered += len(data)

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True
        self.aborted = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        # The broker writes nothing after it and discards what it reads until
        # the peer closes: for this harness the connection is closing.
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


@dataclass(slots=True)
class _Slot:
    """One client connection and what its client has seen of it."""

    name: str
    session: SocketSession
    transport: FakeTransport
    monitor: Connection
    #: A second parser fed the same reads as the session's, to know which
    #: frames each read held.
    shadow: Connection
    read_pos: int = 0
    lost: bool = False
    #: Whether the broker admitted the connection (a refusal closes it at once).
    admitted: bool = True
    #: A goodbye or fatal error was written: nothing may follow.
    ended: bool = False
    active: set[int] = field(default_factory=set)
    last_sequence: dict[int, int] = field(default_factory=dict)
    connected_at: float = 0.0


class _Harness:
    def __init__(
        self, reader: ByteReader, loop: asyncio.AbstractEventLoop, report: frozenset[str]
    ) -> None:
        self.reader = reader
        self.loop = loop
        #: The known bugs (fuzz.common.KNOWN_BUGS) to report.
        self.report = report
        selector = reader.u8()
        peers = reader.u8()
        claims = reader.u8()
        self.config = _config(selector)
        self.broker = Broker("/nonexistent/daemoneye-fuzz.sock", self.config)
        self.offset = 0.0
        self.local: LocalSession = self.broker.local_session("fuzz-local", "daemoneye-agent")
        self.local_queue: EventQueue[Message] = self.local.new_queue()
        self.local_subs: list[int] = []
        self.last_totals = (0, 0, 0, 0, 0)
        self.slots: list[_Slot] = []
        for index in range(2):
            peer = PEERS[(peers >> (2 * index)) & 0x03]
            component = COMPONENTS[((claims >> (4 * index)) & 0x07) % len(COMPONENTS)]
            if index == 1:
                component = COMPONENTS[(((claims >> 4) & 0x07) + 1) % len(COMPONENTS)]
            handshake = not (claims >> (3 + 4 * index)) & 0x01
            self.slots.append(self._connect("AB"[index], peer, component, handshake))

    # -- connections -------------------------------------------------------------

    def _connect(
        self, name: str, peer: PeerCredentials | None, component: str, handshake: bool
    ) -> _Slot:
        session = SocketSession(self.broker)
        session.endpoint.peer = peer  # what connection_made reads from the socket
        transport = FakeTransport()
        # The client side applies the real handshake limit: a refusal must fit it.
        monitor = Connection(
            Role.CLIENT,
            max_frame_bytes=self.config.max_frame_bytes,
            handshake_max_frame_bytes=HANDSHAKE_MAX_FRAME_BYTES,
        )
        shadow = Connection(
            Role.BROKER,
            max_frame_bytes=self.config.max_frame_bytes,
            handshake_max_frame_bytes=self.config.handshake_max_frame_bytes,
        )
        slot = _Slot(name, session, transport, monitor, shadow, connected_at=self.offset)
        session.connection_made(transport)
        # A refused connection gets its Error at once and is closed.
        slot.admitted = not transport.closing
        self._settle(slot)
        if handshake and not slot.lost:
            # Subscriber B takes batches as they come; A gets them one by one.
            hello = frames_pb2.Hello(
                protocol_version=PROTOCOL_VERSION,
                client_name=f"fuzz-{name}",
                component=component,
                accept_batches=name == "B",
            )
            self._feed(slot, encode_frame(Frame(hello=hello)))
            if name == "B" and not slot.lost:
                sub = frames_pb2.Subscribe(subscription_id=1, filter="events.process.#")
                self._feed(slot, encode_frame(Frame(subscribe=sub)))
        return slot

    def _feed(self, slot: _Slot, data: bytes) -> None:
        # asyncio stops reading once the transport is closing, and never
        # calls data_received with nothing.
        if slot.lost or slot.transport.closing or not data:
            return
        conn, shadow = slot.session.conn, slot.shadow
        if conn.state is State.OPEN and shadow.state is State.CONNECTING:
            shadow.send(_WELCOME)  # the broker sent its Welcome: the parser's limits change
            shadow.data_to_send()
        was_open = conn.state is State.OPEN
        published, refused = slot.session.published, self.broker.refused
        slot.session.data_received(data)
        shadow.receive_data(data)
        parsed = shadow.events_received()
        # Every publish the read held before a goodbye, a fatal error or a violation
        # is routed or refused [protocol §1 "Order of processing", §7, §8].
        publishes = (
            sum(1 for f in parsed if f.WhichOneof("kind") in ("publish", "publish_batch"))
            if was_open
            else 0
        )
        handled = slot.session.published - published + self.broker.refused - refused
        check(
            handled >= publishes,
            f"{slot.name}: a read held {publishes} publishes, only {handled} were handled"
            + (" (the read closed the connection)" if conn.close_expected else ""),
        )
        self._settle(slot)

    def _lose(self, slot: _Slot) -> None:
        if not slot.lost:
            slot.lost = True
            slot.session.connection_lost(None)
            check(slot.session.closed.done(), "closed future not resolved on connection_lost")

    def _settle(self, slot: _Slot) -> None:
        """Read what the broker wrote; a closed transport that drained is lost."""
        self._read_output(slot)
        if slot.transport.closing and (not slot.transport.backed_up or slot.transport.aborted):
            self._lose(slot)

    # -- what the broker wrote ----------------------------------------------------

    def _read_output(self, slot: _Slot) -> None:
        data = bytes(slot.transport.written[slot.read_pos :])
        slot.read_pos = len(slot.transport.written)
        pos = 0
        while pos < len(data):
            prefix = decode_varint(data, pos)
            check(prefix is not None, f"{slot.name}: the broker wrote part of a length prefix")
            assert prefix is not None
            length, body = prefix
            check(body + length <= len(data), f"{slot.name}: the broker wrote part of a frame")
            check(not slot.ended, f"{slot.name}: a frame after the broker's goodbye/fatal error")
            raw = data[pos : body + length]
            pos = body + length
            slot.monitor.receive_data(raw)
            check(
                slot.monitor.error is None,
                f"{slot.name}: a client finds the broker's output invalid: {slot.monitor.error}",
            )
            for frame in slot.monitor.events_received():
                self._client_sees(slot, frame)

    def _client_sees(self, slot: _Slot, frame: Frame) -> None:
        kind = frame.WhichOneof("kind")
        if kind == "welcome":
            # What the reference client does with the announced limit.
            slot.monitor.max_frame_bytes = frame.welcome.limits.max_frame_bytes
            check(
                frame.welcome.limits.max_frame_bytes == self.config.max_frame_bytes,
                "Welcome announces another frame limit",
            )
        elif kind == "error":
            check(
                frame.error.code != ErrorCode.ERROR_CODE_INTERNAL,
                f"{slot.name}: internal error in the broker: {frame.error.message}",
            )
            if frame.error.fatal:
                slot.ended = True
        elif kind == "goodbye":
            slot.ended = True
        elif kind == "subscribe_ack":
            sid = frame.subscribe_ack.subscription_id
            check(sid not in slot.active, f"{slot.name}: subscribe_ack for active id {sid}")
            slot.active.add(sid)
            slot.last_sequence[sid] = 0
        elif kind == "unsubscribe_ack":
            sid = frame.unsubscribe_ack.subscription_id
            check(sid in slot.active, f"{slot.name}: unsubscribe_ack for inactive id {sid}")
            slot.active.discard(sid)
        elif kind == "deliver":
            deliver = frame.deliver
            sid = deliver.subscription_id
            check(sid in slot.active, f"{slot.name}: deliver for inactive subscription {sid}")
            check(
                deliver.sequence > slot.last_sequence[sid],
                f"{slot.name}: sequence {deliver.sequence} after {slot.last_sequence[sid]}",
            )
            slot.last_sequence[sid] = deliver.sequence
            self._check_delivered(slot.session.endpoint.identity, deliver.publish, slot.name)
        elif kind == "deliver_batch":
            many = frame.deliver_batch
            sid = many.subscription_id
            check(sid in slot.active, f"{slot.name}: deliver batch for inactive subscription {sid}")
            check(len(many.batch.payloads) > 0, f"{slot.name}: an empty deliver batch")
            check(
                many.first_sequence > slot.last_sequence[sid],
                f"{slot.name}: sequence {many.first_sequence} after {slot.last_sequence[sid]}",
            )
            slot.last_sequence[sid] = many.first_sequence + len(many.batch.payloads) - 1
            shape = frames_pb2.Publish(topic=many.batch.topic, payload_type=many.batch.payload_type)
            self._check_delivered(slot.session.endpoint.identity, shape, slot.name)

    def _check_delivered(self, identity: Any, publish: frames_pb2.Publish, who: str) -> None:
        topic = publish.topic
        try:
            validate_topic(
                topic,
                max_bytes=self.config.max_topic_bytes,
                max_levels=self.config.max_topic_levels,
            )
        except InvalidTopic as exc:
            raise AssertionError(f"{who}: delivered an invalid topic {topic!r}: {exc}") from None
        declared = registry.lookup(topic)
        if declared is None:
            check(self.config.allow_undeclared_topics, f"{who}: delivered undeclared {topic!r}")
            return
        check(
            publish.payload_type == declared.payload_name,
            f"{who}: delivered {publish.payload_type!r} on {topic!r}",
        )
        access = TopicAccess(declared.access, declared.publishers, declared.subscribers)
        check(may_read(identity, access), f"{who}: delivered {topic!r} to {identity}")

    # -- operations --------------------------------------------------------------------

    def op_data(self, slot: _Slot) -> None:
        self._feed(slot, self.reader.blob())

    def op_frame(self, slot: _Slot) -> None:
        self._feed(slot, encode_frame(build_frame(self.reader)))

    def op_back_up(self, slot: _Slot) -> None:
        t = slot.transport
        if not slot.lost and not t.backed_up:
            t.backed_up = True
            t.buffered = _WRITE_HIGH + 1
            slot.session.pause_writing()
            self._settle(slot)

    def op_drain(self, slot: _Slot) -> None:
        t = slot.transport
        if not slot.lost and t.backed_up:
            t.backed_up = False
            t.buffered = 0
            slot.session.resume_writing()
            self._settle(slot)

    def op_tick(self, slot: _Slot) -> None:
        self.offset += self.reader.u8() * 0.1
        now = self.loop.time() + self.offset
        for s in self.slots:
            if s.lost:
                continue
            timer = s.session._handshake_timer
            if timer is not None and self.offset - s.connected_at >= self.config.handshake_timeout:
                timer.cancel()  # the timer fires
                s.session._handshake_expired()
            s.session.check(now)  # the broker's housekeeping
            if s.transport.closing and s.transport.backed_up:
                s.transport.abort()  # the abort timer fires
            self._settle(s)

    def op_eof(self, slot: _Slot) -> None:
        if not slot.lost:
            check(slot.session.eof_received() is None, "eof_received keeps the transport open")
            self._lose(slot)

    def op_reset(self, slot: _Slot) -> None:
        self._lose(slot)

    def op_reconnect(self, slot: _Slot) -> None:
        flags = self.reader.u8()
        if not slot.lost:
            return
        index = self.slots.index(slot)
        peer = PEERS[flags & 0x03]
        component = COMPONENTS[((flags >> 2) & 0x07) % len(COMPONENTS)]
        self.slots[index] = self._connect(slot.name, peer, component, not flags & 0x20)

    def op_local_publish(self, slot: _Slot) -> None:
        publish = build_publish(self.reader)
        with contextlib.suppress(EventBusError):  # documented: refusals raise typed errors
            self.local.publish_frame(publish)

    def op_local_subscribe(self, slot: _Slot) -> None:
        action = self.reader.u8()
        try:
            if action & 1 and self.local_subs:
                sid = self.local_subs.pop(action % len(self.local_subs))
                self.local.unsubscribe_id(sid)
            else:
                flt = build_correlation_filter(self.reader) if action & 2 else None
                sid = self.local.subscribe_queue(
                    pick_filter(self.reader), self.local_queue, flt, bool(action & 4)
                )
                self.local_subs.append(sid)
        except EventBusError:
            pass

    def op_local_read(self, slot: _Slot) -> None:
        count = self.reader.u8()
        for _ in range(count):
            event = self.local_queue.get_nowait()
            if event is None:
                break
            publish = frames_pb2.Publish(
                topic=event.topic, payload_type=event.payload_type, payload=event.payload
            )
            self._check_delivered(self.local.identity, publish, "local")

    def op_goodbye(self, slot: _Slot) -> None:
        if not slot.lost:
            slot.session.goodbye("broker shutting down")  # what Broker.close does
            self._settle(slot)

    def op_stats(self, slot: _Slot) -> None:
        budget = 64 + self.reader.u16()
        stats = self.broker.statistics()
        out = stats.to_proto(7, budget)
        if out.connection_stats or out.subscription_stats:
            size = Frame(stats_response=out).ByteSize()
            check(size <= budget, f"StatsResponse of {size} bytes cut to fit {budget}")
        full = stats.to_proto(7, None)
        check(
            len(out.connection_stats) <= len(full.connection_stats)
            and len(out.subscription_stats) <= len(full.subscription_stats),
            "truncated statistics hold more than the full ones",
        )

    def settle_all(self) -> None:
        for s in self.slots:
            self._settle(s)

    # -- invariants ------------------------------------------------------------------------

    def check_state(self) -> None:
        cfg = self.config
        stats = self.broker.statistics()
        live = [s for s in self.slots if not s.lost and s.admitted]
        # A connection counts from its admission; admission is decided at once.
        if stats.connections != len(live):
            fail(f"statistics count {stats.connections} connections, {len(live)} are open")
        check(stats.connections <= cfg.max_connections, "more connections than max_connections")
        totals = (
            stats.connections_total,
            stats.published,
            stats.delivered,
            stats.dropped,
            stats.refused,
        )
        if not all(a >= b for a, b in zip(totals, self.last_totals, strict=True)):
            fail(f"a total went down: {self.last_totals} -> {totals}")
        self.last_totals = totals
        ids = [c.session_id for c in stats.connection_stats]
        check(len(ids) == len(set(ids)), "two connections share a session id")
        per_session: dict[str, set[int]] = {}
        for sub in stats.subscription_stats:
            per_session.setdefault(sub.session_id, set()).add(sub.subscription_id)
        for session_id, subs in per_session.items():
            if len(subs) > cfg.max_subscriptions:
                fail(f"session {session_id} holds {len(subs)} > {cfg.max_subscriptions} subs")
        check(
            sum(s.delivered for s in stats.subscription_stats) <= stats.delivered
            and sum(s.dropped for s in stats.subscription_stats) <= stats.dropped
            and sum(c.published for c in stats.connection_stats) <= stats.published,
            "per-connection figures exceed the totals",
        )
        reply_bound = cfg.max_queue_bytes + _WRITE_HIGH + cfg.max_frame_bytes + 2 * 4096
        for s in self.slots:
            if s.lost:
                if s.session.session_id in per_session:
                    fail(f"{s.name}: lost, still subscribed")
                continue
            conn = s.session.conn
            if conn.buffered_bytes > reply_bound:
                fail(f"{s.name}: {conn.buffered_bytes} bytes queued")
            if (
                conn.state is State.OPEN
                and not s.transport.closing
                and not s.transport.backed_up
                and not s.ended
            ):
                broker_view = per_session.get(s.session.session_id, set())
                if broker_view != s.active:
                    fail(
                        f"{s.name}: broker holds subscriptions {sorted(broker_view)}, "
                        f"the client was acked {sorted(s.active)}"
                    )
                if conn.buffered_frames:
                    fail(
                        f"{s.name}: {conn.buffered_frames} frames held while the socket is "
                        "not backed up"
                    )
        queue = self.local_queue
        check(len(queue) <= cfg.max_queue_messages, "local queue over max_queue_messages")
        check(queue.nbytes <= cfg.max_queue_bytes, "local queue over max_queue_bytes")

    def finish(self) -> None:
        for s in self.slots:
            self._lose(s)
        self.local.end()
        stats = self.broker.statistics()
        check(stats.connections == 0, f"{stats.connections} connections left after all closed")
        check(not stats.subscription_stats, "subscriptions left after every session closed")
        per_uid = self.broker.connections_per_uid()
        check(not per_uid, f"per-uid counts leak: {per_uid}")
        check(not list(self.broker.sessions()), "sessions left after every connection was lost")
        check(not len(self.broker.router), "the router still holds subscriptions")


@dataclass(frozen=True, slots=True)
class Op:
    name: str
    run: Callable[[_Harness, _Slot], None]


OPS: Final[tuple[Op, ...]] = (
    Op("data", _Harness.op_data),
    Op("frame", _Harness.op_frame),
    Op("frame", _Harness.op_frame),
    Op("back_up", _Harness.op_back_up),
    Op("drain", _Harness.op_drain),
    Op("tick", _Harness.op_tick),
    Op("eof", _Harness.op_eof),
    Op("reset", _Harness.op_reset),
    Op("reconnect", _Harness.op_reconnect),
    Op("local_publish", _Harness.op_local_publish),
    Op("local_subscribe", _Harness.op_local_subscribe),
    Op("local_read", _Harness.op_local_read),
    Op("goodbye", _Harness.op_goodbye),
    Op("stats", _Harness.op_stats),
)


# -- well-formed frames from the input -------------------------------------------------------


def pick_filter(reader: ByteReader) -> str:
    choice = reader.u8()
    if choice < 0xE0:
        return str(FILTERS[choice % len(FILTERS)])
    return reader.text()


def _strings(reader: ByteReader, limit: int = 4) -> list[str]:
    return [reader.text() for _ in range(reader.u8() % (limit + 1))]


def build_correlation(reader: ByteReader) -> CorrelationMetadata:
    flags = reader.u8()
    meta = CorrelationMetadata(
        correlation_id=reader.text() if flags & 1 else "c1",
        root_correlation_id=reader.text() if flags & 2 else "root",
        sequence_number=reader.u16(),
    )
    if flags & 4:
        meta.parent_correlation_id = reader.text()
    if flags & 8:
        meta.workflow_stage = reader.text()
    for _ in range((flags >> 4) & 0x03):
        meta.tags[reader.text()] = reader.text()
    return meta


def build_correlation_filter(reader: ByteReader) -> CorrelationFilter:
    flags = reader.u8()
    flt = CorrelationFilter()
    if flags & 1:
        flt.correlation_ids.extend(_strings(reader))
    if flags & 2:
        flt.correlation_id_patterns.extend(_strings(reader))
    if flags & 4:
        flt.root_correlation_ids.extend(_strings(reader))
    if flags & 8:
        flt.workflow_stages.extend(_strings(reader))
    if flags & 16:
        flt.required_tags[reader.text()] = reader.text()
    if flags & 32:
        flt.any_tags[reader.text()] = reader.text()
    if flags & 64:
        flt.sequence_range.CopyFrom(SequenceRange(min=reader.u16(), max=reader.u16()))
    if flags & 128:
        flt.parent_correlation_ids.extend(_strings(reader))
    return flt


def build_publish(reader: ByteReader) -> frames_pb2.Publish:
    flags = reader.u8()
    topic = TOPICS[reader.u8() % len(TOPICS)] if not flags & 1 else reader.text()
    declared = registry.lookup(topic)
    if flags & 2 or declared is None:
        payload_type = PAYLOAD_TYPES[reader.u8() % len(PAYLOAD_TYPES)]
    else:
        payload_type = declared.payload_name
    publish = frames_pb2.Publish(topic=topic, payload_type=payload_type, payload=reader.blob())
    if flags & 4:
        publish.correlation.CopyFrom(build_correlation(reader))
    return publish


def build_publish_batch(reader: ByteReader) -> frames_pb2.PublishBatch:
    """Like :func:`build_publish`, with 0 to 4 payloads (none is refused)."""
    one = build_publish(reader)
    batch = frames_pb2.PublishBatch(topic=one.topic, payload_type=one.payload_type)
    batch.payloads.append(one.payload)
    batch.payloads.extend(reader.blob() for _ in range(reader.u8() % 5 - 1))
    if one.HasField("correlation"):
        batch.correlation.CopyFrom(one.correlation)
    return batch


def _sub_id(reader: ByteReader) -> int:
    choice = reader.u8()
    return choice % 4 if choice < 0xF0 else (reader.u16() << 16) | reader.u16()


def build_frame(reader: ByteReader) -> Frame:
    """A well-formed frame, legal or not in the connection's state."""
    code = reader.u8()
    # Codes 0xFE and 0xFF are the batch frames; the rest keep their meaning
    # from before batches existed, so that older corpus inputs still say
    # what they said.
    if code == 0xFE:
        return Frame(publish_batch=build_publish_batch(reader))
    if code == 0xFF:
        many = frames_pb2.DeliverBatch(
            subscription_id=1, first_sequence=1, batch=build_publish_batch(reader)
        )
        return Frame(deliver_batch=many)
    kind = code % 12
    if kind == 0:
        return Frame(publish=build_publish(reader))
    if kind == 1:
        flags = reader.u8()
        sub = frames_pb2.Subscribe(
            subscription_id=_sub_id(reader),
            filter=pick_filter(reader),
            include_control=bool(flags & 1),
        )
        if flags & 2:
            sub.correlation_filter.CopyFrom(build_correlation_filter(reader))
        return Frame(subscribe=sub)
    if kind == 2:
        return Frame(unsubscribe=frames_pb2.Unsubscribe(subscription_id=_sub_id(reader)))
    if kind == 3:
        return Frame(ping=frames_pb2.Ping(nonce=reader.u16()))
    if kind == 4:
        return Frame(pong=frames_pb2.Pong(nonce=reader.u16()))
    if kind == 5:
        return Frame(stats_request=frames_pb2.StatsRequest(request_id=reader.u16()))
    if kind == 6:
        return Frame(goodbye=frames_pb2.Goodbye(reason=reader.text()))
    if kind == 7:
        flags = reader.u8()
        error = frames_pb2.Error(
            code=ErrorCode.ValueType(flags >> 1), message=reader.text(), fatal=bool(flags & 1)
        )
        return Frame(error=error)
    if kind == 8:
        flags = reader.u8()
        component = COMPONENTS[flags % len(COMPONENTS)] if flags < 0xC0 else reader.text()
        hello = frames_pb2.Hello(
            protocol_version=(1, 1, 0, 2)[(flags >> 3) & 0x03],
            client_name=reader.text(),
            component=component,
            accept_batches=bool(flags & 0x20),
        )
        return Frame(hello=hello)
    if kind == 9:
        return Frame(welcome=frames_pb2.Welcome(protocol_version=1, session_id=reader.text()))
    if kind == 10:
        deliver = frames_pb2.Deliver(subscription_id=1, sequence=1, publish=build_publish(reader))
        return Frame(deliver=deliver)
    return Frame(subscribe_ack=frames_pb2.SubscribeAck(subscription_id=_sub_id(reader)))


_WELCOME: Final = Frame(welcome=frames_pb2.Welcome(protocol_version=PROTOCOL_VERSION))


# -- the target ----------------------------------------------------------------------------------

_loop: asyncio.AbstractEventLoop | None = None


async def _run(data: bytes, report: frozenset[str]) -> None:
    reader = ByteReader(data)
    harness = _Harness(reader, asyncio.get_running_loop(), report)
    try:
        harness.check_state()
        while reader.remaining:
            code = reader.u8()
            op = OPS[(code & 0x7F) % len(OPS)]
            slot = harness.slots[code >> 7]
            op.run(harness, slot)
            # Deliveries wait for a flush the broker scheduled with call_soon (an
            # in-process publish): one turn of the loop runs it.
            if harness.broker.outbox.pending:
                await asyncio.sleep(0)
            harness.settle_all()
            harness.check_state()
    finally:
        # Cancel the sessions' timers, even after a finding.
        for s in harness.slots:
            if not s.lost:
                s.lost = True
                s.session.connection_lost(None)
        harness.local.end()
    harness.finish()


def test_one_input(data: bytes) -> None:
    """One fuzz input (the atheris entry point); raises on any finding."""
    run_one(data)


def run_one(data: bytes, *, strict: bool | None = None) -> None:
    """One input; raises on any finding.

    Known bugs (``fuzz.common.KNOWN_BUGS``) are reported only if ``strict``;
    by default ``FUZZ_STRICT`` in the environment decides (see
    :func:`fuzz.common.reported_bugs`).
    """
    global _loop
    if _loop is None or _loop.is_closed():
        quiet_logging()
        _loop = asyncio.new_event_loop()
    _loop.run_until_complete(_run(data, reported_bugs(strict)))


def shutdown() -> None:
    """Close the event loop :func:`test_one_input` uses (for test suites)."""
    global _loop
    if _loop is not None and not _loop.is_closed():
        _loop.close()
    _loop = None


def main(argv: list[str] | None = None) -> None:
    run_fuzzer(test_one_input, sys.argv if argv is None else argv)


if __name__ == "__main__":
    main()
