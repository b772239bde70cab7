"""The broker: sessions, routing, bounded queues, limits and shutdown.

The broker runs inside the caller's event loop (``async with Broker(...)`` or
``await broker.start()`` / ``await broker.close()``), or standalone through
``daemoneye-eventbus serve``. Each connection is a :class:`_SocketSession`, a
thin ``asyncio.Protocol`` pump around a sans-I/O
:class:`~daemoneye_eventbus.protocol.Connection`. In-process subscribers (the
agent itself, through :class:`~daemoneye_eventbus.bus.DaemoneyeEventBus`) are
:class:`LocalSession` objects that share the same routing and the same bounds.

Delivery is at most once [protocol §5]: every subscriber has an outbound queue
bounded in messages and bytes. When it is full, new events for it are dropped
and counted, and its per-subscription sequence numbers show the gap; the
publisher and the other subscribers are never held up. A subscriber whose
socket stays backed up past ``slow_consumer_timeout`` is disconnected.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import itertools
import logging
import os
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self, cast

from google.protobuf.message import Message

from daemoneye.eventbus.v1 import frames_pb2, registry
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationFilter, CorrelationMetadata
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode, Frame
from daemoneye_eventbus.access import (
    ANONYMOUS,
    AuditLog,
    Identity,
    Policy,
    TopicAccess,
    may_publish,
    may_read,
)
from daemoneye_eventbus.correlation import CorrelationMatcher, validate_metadata
from daemoneye_eventbus.delivery import EventQueue
from daemoneye_eventbus.errors import (
    AccessDenied,
    BrokerError,
    ClosedResourceError,
    EventBusError,
    InvalidCorrelation,
    InvalidTopic,
    LocalProtocolError,
    RemoteProtocolError,
)
from daemoneye_eventbus.protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    DELIVER_BATCH_OVERHEAD,
    DELIVER_OVERHEAD,
    HANDSHAKE_MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    Connection,
    Role,
    State,
    error_for_code,
    error_frame,
    publish_body,
    publish_header,
)
from daemoneye_eventbus.topics import (
    SubscriptionTrie,
    filters_overlap,
    validate_filter,
    validate_topic,
)
from daemoneye_eventbus.transport import (
    PeerCredentials,
    bind_unix_socket,
    peer_credentials,
    remove_socket,
)

__all__ = [
    "Broker",
    "BrokerConfig",
    "BrokerStatistics",
    "ConnectionStatistics",
    "LocalSession",
    "SubscriptionStatistics",
    "protobuf_backend",
]

log = logging.getLogger("daemoneye_eventbus.broker")

# Transport write buffer bounds: above HIGH the socket counts as backed up and
# frames wait in the session's bounded queue instead.
_WRITE_HIGH: Final = 256 * 1024
_WRITE_LOW: Final = 64 * 1024
# Topics whose publish permission a session remembers; cleared when full.
_PUBLISH_CHECKS_SIZE: Final = 1024
# A cache miss, distinct from "allowed" (None).
_UNCHECKED: Final = "\0unchecked"
_CLOSING_STATES: Final = (State.CLOSING, State.CLOSED)
# Connections the kernel queues before the broker accepts them.
_LISTEN_BACKLOG: Final = 512
# Error messages sent to peers are cut to this many characters.
_MAX_ERROR_MESSAGE: Final = 512
# Topics whose routing is remembered; the cache is cleared when it grows past
# this, and whenever a subscription is added or removed.
_ROUTE_CACHE_SIZE: Final = 4096


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Limits and deadlines of a broker. Every one is enforced."""

    #: Largest frame body after the handshake, in bytes.
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    #: Largest frame body before the handshake completes, in bytes.
    handshake_max_frame_bytes: int = HANDSHAKE_MAX_FRAME_BYTES
    #: Seconds a client has to complete the handshake, however slowly it sends.
    handshake_timeout: float = 2.0
    #: Open connections at most, in total.
    max_connections: int = 1024
    #: Open connections at most per peer uid.
    max_connections_per_uid: int = 256
    #: Subscriptions at most per connection.
    max_subscriptions: int = 1024
    #: Longest topic or filter, in bytes.
    max_topic_bytes: int = 255
    #: Most levels in a topic or filter.
    max_topic_levels: int = 16
    #: Messages queued at most for one subscriber before drops start.
    max_queue_messages: int = 1000
    #: Bytes queued at most for one subscriber before drops start.
    max_queue_bytes: int = 8 * 1024 * 1024
    #: Seconds a subscriber's socket may stay backed up before it is disconnected.
    slow_consumer_timeout: float = 10.0
    #: Seconds of silence after which the broker pings a client.
    heartbeat_interval: float = 5.0
    #: Seconds of silence after which the broker disconnects a client.
    idle_timeout: float = 15.0
    #: Seconds a graceful shutdown may spend draining queues.
    drain_timeout: float = 5.0
    #: Accept topics the schema does not declare (as public topics).
    allow_undeclared_topics: bool = False
    #: Permission bits of the socket file.
    socket_mode: int = 0o600
    #: Group of the socket file (gid), or None to keep the broker's.
    socket_group: int | None = None
    #: Which peers may act as which component; None for :meth:`Policy.default`.
    policy: Policy | None = None
    #: Kernel send buffer asked for on each connection (SO_SNDBUF), or None for
    #: the system default. A larger buffer absorbs a subscriber's short stalls
    #: without drops; the kernel caps it at net.core.wmem_max.
    socket_send_buffer: int | None = 1024 * 1024

    def limits(self) -> frames_pb2.Limits:
        """The limits as announced in ``Welcome``."""
        return frames_pb2.Limits(
            max_frame_bytes=self.max_frame_bytes,
            max_topic_bytes=self.max_topic_bytes,
            max_topic_levels=self.max_topic_levels,
            max_subscriptions=self.max_subscriptions,
            max_queue_messages=self.max_queue_messages,
            max_queue_bytes=self.max_queue_bytes,
            heartbeat_interval_ms=int(self.heartbeat_interval * 1000),
            idle_timeout_ms=int(self.idle_timeout * 1000),
        )


@dataclass(frozen=True, slots=True)
class SubscriptionStatistics:
    """A snapshot of one subscription's figures."""

    session_id: str
    subscription_id: int
    filter: str
    delivered: int
    dropped: int


@dataclass(frozen=True, slots=True)
class ConnectionStatistics:
    """A snapshot of one connection's figures."""

    session_id: str
    client_name: str
    component: str
    peer: PeerCredentials | None
    queue_messages: int
    queue_bytes: int
    published: int


@dataclass(frozen=True, slots=True)
class BrokerStatistics:
    """A snapshot of the broker's figures."""

    connections: int
    connections_total: int
    published: int
    delivered: int
    dropped: int
    refused: int
    connection_stats: tuple[ConnectionStatistics, ...]
    subscription_stats: tuple[SubscriptionStatistics, ...]

    def to_proto(
        self, request_id: int = 0, max_bytes: int | None = None
    ) -> frames_pb2.StatsResponse:
        """The snapshot as a ``StatsResponse`` frame body of at most ``max_bytes``.

        When the per-connection and per-subscription lists do not fit, the
        longest is shortened until they do and ``truncated`` is set.
        """
        out = self._to_proto(request_id)
        if max_bytes is None:
            return out
        budget = max_bytes - DELIVER_OVERHEAD  # room for the Frame envelope
        while out.ByteSize() > budget:
            out.truncated = True
            conns, subs = out.connection_stats, out.subscription_stats
            if not conns and not subs:
                break
            if len(subs) >= len(conns):
                del subs[len(subs) // 2 :]
            else:
                del conns[len(conns) // 2 :]
        return out

    def _to_proto(self, request_id: int) -> frames_pb2.StatsResponse:
        return frames_pb2.StatsResponse(
            request_id=request_id,
            connections=self.connections,
            connections_total=self.connections_total,
            published=self.published,
            delivered=self.delivered,
            dropped=self.dropped,
            refused=self.refused,
            connection_stats=[
                frames_pb2.ConnectionStats(
                    session_id=c.session_id,
                    client_name=c.client_name,
                    component=c.component,
                    peer_pid=c.peer.pid if c.peer else 0,
                    peer_uid=c.peer.uid if c.peer else 0,
                    queue_messages=c.queue_messages,
                    queue_bytes=c.queue_bytes,
                    published=c.published,
                )
                for c in self.connection_stats
            ],
            subscription_stats=[
                frames_pb2.SubscriptionStats(
                    session_id=s.session_id,
                    subscription_id=s.subscription_id,
                    filter=s.filter,
                    delivered=s.delivered,
                    dropped=s.dropped,
                )
                for s in self.subscription_stats
            ],
        )


@dataclass(eq=False, slots=True)
class _Subscription:
    """One subscription of one session; hashed by identity in the trie."""

    session: _Session
    subscription_id: int
    filter: str
    matcher: CorrelationMatcher | None
    #: Deliver control topics to this subscription.
    wants_control: bool
    sequence: int = 0
    delivered: int = 0
    dropped: int = 0


@dataclass(frozen=True, slots=True)
class _TopicInfo:
    """What routing needs to know about a published topic, cached per name."""

    payload_type: str | None
    control: bool
    access: TopicAccess


class _Session(abc.ABC):
    """What the router needs of a subscriber or publisher, socket or local."""

    session_id: str
    client_name: str = ""
    peer: PeerCredentials | None = None
    identity: Identity = ANONYMOUS
    published: int = 0

    @property
    def component(self) -> str:
        """The accepted component, or "" for an anonymous peer."""
        return self.identity.component

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.session_id = secrets.token_hex(8)
        self.subscriptions: dict[int, _Subscription] = {}
        #: may_publish's verdict per topic for this session's identity.
        self.publish_checks: dict[str, str | None] = {}

    @abc.abstractmethod
    def enqueue(
        self,
        sub: _Subscription,
        message: frames_pb2.Publish | frames_pb2.PublishBatch,
        data: bytes,
        first: int,
        count: int,
    ) -> bool:
        """Queue the ``count`` events of ``message`` (``data`` encoded), numbered
        from ``first``, for ``sub``: all or none; False if dropped."""

    @abc.abstractmethod
    def queue_depth(self) -> tuple[int, int]:
        """Messages and bytes waiting for this session."""


class Broker:
    """The message broker, listening on a Unix domain socket.

    Use as ``async with Broker(path) as broker:`` or call :meth:`start` and
    :meth:`close`. The socket file and a directory created for it are removed
    on close.
    """

    def __init__(self, path: str, config: BrokerConfig | None = None) -> None:
        self.path = path
        self.config = config or BrokerConfig()
        #: Who may act as which component (the default policy without a file).
        self.policy = self.config.policy or Policy.default(os.geteuid())
        #: Structured, rate-limited log of refusals.
        self.audit = AuditLog()
        self._trie: SubscriptionTrie[_Subscription] = SubscriptionTrie(
            max_bytes=self.config.max_topic_bytes, max_levels=self.config.max_topic_levels
        )
        self._route_cache: dict[str, tuple[_Subscription, ...]] = {}
        self._topic_cache: dict[str, _TopicInfo] = {}
        self._sessions: set[_SocketSession] = set()
        self._local_sessions: set[LocalSession] = set()
        self._per_uid: collections.Counter[int] = collections.Counter()
        self._dirty: set[_SocketSession] = set()
        self._flush_handle: asyncio.Handle | None = None
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self._housekeeper: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = asyncio.Event()
        #: The protobuf runtime, checked at start-up ("upb" expected).
        self.protobuf_backend = ""
        self.connections_total = 0
        self.published = 0
        self.delivered = 0
        self.dropped = 0
        self.refused = 0

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Bind the socket and start accepting connections."""
        if self._server is not None:
            raise BrokerError("broker already started")
        self.protobuf_backend = protobuf_backend()
        if self.protobuf_backend != "upb":
            # The pure-Python decoder is much slower and recurses on nesting.
            log.warning(
                "protobuf backend is %r, not the fast 'upb' one: install a protobuf "
                "wheel for this platform (PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION unset)",
                self.protobuf_backend,
            )
        loop = asyncio.get_running_loop()
        sock = bind_unix_socket(
            self.path, mode=self.config.socket_mode, group=self.config.socket_group
        )
        self._inode = os.stat(self.path).st_ino
        self._server = await loop.create_unix_server(
            lambda: _SocketSession(self), sock=sock, backlog=_LISTEN_BACKLOG
        )
        self._housekeeper = asyncio.create_task(
            self._housekeeping(), name=f"eventbus[broker {self.path}].housekeeping"
        )
        log.info("broker listening on %s", self.path)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def is_serving(self) -> bool:
        return self._server is not None and not self._closing

    async def close(self, timeout: float | None = None) -> None:
        """Shut down: stop accepting, say goodbye, drain within ``timeout``, close.

        ``timeout`` defaults to the configured ``drain_timeout``. The socket
        file is removed whatever happens.
        """
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        deadline = self.config.drain_timeout if timeout is None else timeout
        try:
            if self._server is not None:
                self._server.close()
            remove_socket(self.path, self._inode)
            for session in list(self._sessions):
                session.goodbye("broker shutting down")
            for local in list(self._local_sessions):
                local.close()
            if self._sessions:
                waiters = [s.closed for s in self._sessions]
                _, pending = await asyncio.wait(waiters, timeout=deadline)
                if pending:
                    log.warning("%d connections did not drain in time", len(pending))
                for session in list(self._sessions):
                    session.abort()
            if self._housekeeper is not None:
                self._housekeeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._housekeeper
            if self._server is not None:
                await self._server.wait_closed()
        finally:
            remove_socket(self.path, self._inode)
            self._closed.set()
            log.info("broker on %s closed", self.path)

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` has finished."""
        await self._closed.wait()

    # -- statistics -------------------------------------------------------------

    def statistics(self) -> BrokerStatistics:
        """A frozen snapshot of the broker's figures."""
        sessions: list[_Session] = [*self._sessions, *self._local_sessions]
        conns: list[ConnectionStatistics] = []
        subs: list[SubscriptionStatistics] = []
        for s in sessions:
            depth_msgs, depth_bytes = s.queue_depth()
            conns.append(
                ConnectionStatistics(
                    s.session_id,
                    s.client_name,
                    s.component,
                    s.peer,
                    depth_msgs,
                    depth_bytes,
                    s.published,
                )
            )
            subs.extend(
                SubscriptionStatistics(
                    s.session_id, sub.subscription_id, sub.filter, sub.delivered, sub.dropped
                )
                for sub in s.subscriptions.values()
            )
        return BrokerStatistics(
            connections=len(self._sessions),
            connections_total=self.connections_total,
            published=self.published,
            delivered=self.delivered,
            dropped=self.dropped,
            refused=self.refused,
            connection_stats=tuple(conns),
            subscription_stats=tuple(subs),
        )

    # -- sessions -------------------------------------------------------------

    def _admit(self, session: _SocketSession) -> str | None:
        """Count a new connection in, or say why it is refused."""
        if self._closing:
            return "broker is shutting down"
        if len(self._sessions) >= self.config.max_connections:
            return f"connection limit of {self.config.max_connections} reached"
        uid = session.peer.uid if session.peer else -1
        if self._per_uid[uid] >= self.config.max_connections_per_uid:
            return f"connection limit of {self.config.max_connections_per_uid} per user reached"
        self._sessions.add(session)
        self._per_uid[uid] += 1
        self.connections_total += 1
        return None

    def _forget(self, session: _SocketSession) -> None:
        if session in self._sessions:
            self._sessions.discard(session)
            uid = session.peer.uid if session.peer else -1
            self._per_uid[uid] -= 1
            if self._per_uid[uid] <= 0:
                del self._per_uid[uid]
        self._dirty.discard(session)
        self._drop_subscriptions(session)

    def _drop_subscriptions(self, session: _Session) -> None:
        for sub in session.subscriptions.values():
            self._trie.remove(sub.filter, sub)
        if session.subscriptions:
            session.subscriptions.clear()
            self._route_cache.clear()

    def local_session(self, name: str = "in-process", component: str = "") -> LocalSession:
        """A session for in-process publishers and subscribers (no socket)."""
        if self._closing:
            raise ClosedResourceError("broker is closed")
        session = LocalSession(self, name, component)
        self._local_sessions.add(session)
        return session

    # -- subscriptions ----------------------------------------------------------

    def subscribe(
        self,
        session: _Session,
        subscription_id: int,
        filter: str,
        correlation_filter: CorrelationFilter | None,
        include_control: bool = False,
    ) -> _Subscription:
        """Add a subscription; raise a typed error with the reason if refused."""
        cfg = self.config
        if subscription_id <= 0 or subscription_id in session.subscriptions:
            raise _Refusal(
                ErrorCode.ERROR_CODE_INVALID_SUBSCRIPTION_ID,
                f"subscription id {subscription_id} is 0 or already in use",
            )
        if len(session.subscriptions) >= cfg.max_subscriptions:
            raise _Refusal(
                ErrorCode.ERROR_CODE_LIMIT_EXCEEDED,
                f"subscription limit of {cfg.max_subscriptions} per connection reached",
            )
        try:
            validate_filter(filter, max_bytes=cfg.max_topic_bytes, max_levels=cfg.max_topic_levels)
        except InvalidTopic as exc:
            raise _Refusal(ErrorCode.ERROR_CODE_INVALID_FILTER, str(exc)) from None
        declared, readable = _filter_reach(session.identity, filter)
        if not cfg.allow_undeclared_topics and not declared:
            raise _Refusal(
                ErrorCode.ERROR_CODE_INVALID_FILTER,
                f"filter {filter!r} matches no topic declared in the schema",
            )
        if not cfg.allow_undeclared_topics and not readable:
            self.audit.record(
                "subscribe_refused",
                session.peer,
                session=session.session_id,
                component=session.identity.component or "-",
                filter=filter,
            )
            raise _Refusal(
                ErrorCode.ERROR_CODE_ACCESS_DENIED,
                f"filter {filter!r} matches no topic that "
                f"{session.identity.component or 'an anonymous peer'} may read",
            )
        matcher = None
        if correlation_filter is not None and correlation_filter.ByteSize():
            try:
                matcher = CorrelationMatcher(correlation_filter)
            except InvalidCorrelation as exc:
                raise _Refusal(ErrorCode.ERROR_CODE_INVALID_CORRELATION, str(exc)) from None
        # A filter that names the control tree explicitly asks for control topics.
        wants_control = include_control or filter.startswith("control.") or filter == "control"
        sub = _Subscription(session, subscription_id, filter, matcher, wants_control)
        self._trie.insert(filter, sub)
        session.subscriptions[subscription_id] = sub
        self._route_cache.clear()
        return sub

    def unsubscribe(self, session: _Session, subscription_id: int) -> None:
        """Remove a subscription; raise if the session has no such subscription."""
        sub = session.subscriptions.pop(subscription_id, None)
        if sub is None:
            raise _Refusal(
                ErrorCode.ERROR_CODE_UNKNOWN_SUBSCRIPTION,
                f"no subscription with id {subscription_id}",
            )
        self._trie.remove(sub.filter, sub)
        self._route_cache.clear()

    # -- routing ------------------------------------------------------------------

    def _topic_info(self, topic: str) -> _TopicInfo:
        info = self._topic_cache.get(topic)
        if info is not None:
            return info
        cfg = self.config
        try:
            validate_topic(topic, max_bytes=cfg.max_topic_bytes, max_levels=cfg.max_topic_levels)
        except InvalidTopic as exc:
            raise _Refusal(ErrorCode.ERROR_CODE_INVALID_TOPIC, str(exc)) from None
        declared = registry.lookup(topic)
        if declared is not None:
            access = TopicAccess(declared.access, declared.publishers, declared.subscribers)
            info = _TopicInfo(declared.payload_name, declared.control, access)
        elif cfg.allow_undeclared_topics:
            info = _TopicInfo(None, False, _UNDECLARED_ACCESS)
        else:
            raise _Refusal(
                ErrorCode.ERROR_CODE_INVALID_TOPIC,
                f"topic {topic!r} is not declared in the schema",
            )
        if len(self._topic_cache) >= _ROUTE_CACHE_SIZE:
            self._topic_cache.clear()
        self._topic_cache[topic] = info
        return info

    def route(
        self, session: _Session, message: frames_pb2.Publish | frames_pb2.PublishBatch
    ) -> int:
        """Check and route one published event or batch; return how many
        events queues took.

        Raises :class:`_Refusal` (an :class:`EventBusError`) with an error code
        when it is refused; nothing is delivered then. A batch is accepted or
        refused as a whole, and each subscriber takes or drops it as a whole:
        its events keep consecutive sequence numbers.
        """
        if isinstance(message, frames_pb2.PublishBatch):
            count = len(message.payloads)
            if not count:
                raise _Refusal(
                    ErrorCode.ERROR_CODE_MALFORMED_FRAME, "publish batch holds no events"
                )
            most = self.config.max_queue_messages
            if count > most:
                # A batch is queued whole: one larger than a queue could never be
                # held back, and a subscriber without batches gets a frame per event.
                raise _Refusal(
                    ErrorCode.ERROR_CODE_LIMIT_EXCEEDED,
                    f"publish batch of {count} events exceeds max_queue_messages ({most})",
                )
            limit = self.config.max_frame_bytes - DELIVER_BATCH_OVERHEAD
        else:
            count = 1
            limit = self.config.max_frame_bytes - DELIVER_OVERHEAD
        # Encoded once, for the size check and for every subscriber. Unknown
        # fields are never forwarded; the payloads stay opaque.
        message.DiscardUnknownFields()
        data = message.SerializeToString()
        correlation = message.correlation if message.HasField("correlation") else None
        subs = self._accept(
            session, message.topic, message.payload_type, correlation, len(data), limit, count
        )
        taken = 0
        for sub in subs:
            if sub.matcher is not None and not sub.matcher.matches(correlation):
                continue
            first = sub.sequence + 1
            sub.sequence += count
            if sub.session.enqueue(sub, message, data, first, count):
                sub.delivered += count
                taken += count
            else:
                sub.dropped += count
                self.dropped += count
        self.delivered += taken
        return taken

    def _accept(
        self,
        session: _Session,
        topic: str,
        payload_type: str,
        correlation: CorrelationMetadata | None,
        size: int,
        limit: int,
        count: int,
    ) -> tuple[_Subscription, ...]:
        """Check ``count`` events (``size`` bytes encoded) published on ``topic``.

        Returns the subscriptions that may receive them (correlation filters
        not yet applied); raises :class:`_Refusal` when they are refused.
        """
        info = self._topic_info(topic)
        checks = session.publish_checks
        denied = checks.get(topic, _UNCHECKED)
        if denied is _UNCHECKED:
            # The identity is fixed at the handshake: remember the verdict per topic.
            denied = may_publish(session.identity, info.access)
            if len(checks) >= _PUBLISH_CHECKS_SIZE:
                checks.clear()
            checks[topic] = denied
        if denied is not None:
            self.audit.record(
                "publish_refused",
                session.peer,
                session=session.session_id,
                component=session.identity.component or "-",
                topic=topic,
                reason=denied,
            )
            raise _Refusal(ErrorCode.ERROR_CODE_ACCESS_DENIED, f"publish on {topic!r}: {denied}")
        if size > limit:
            what = f"event of {size} bytes" if count == 1 else f"batch of {count} events"
            raise _Refusal(
                ErrorCode.ERROR_CODE_FRAME_TOO_LARGE,
                f"{what} cannot be delivered within the frame limit; "
                f"an encoded event or batch may be at most {limit} bytes, this is {size}",
            )
        if info.payload_type is not None and payload_type != info.payload_type:
            raise _Refusal(
                ErrorCode.ERROR_CODE_PAYLOAD_MISMATCH,
                f"topic {topic!r} carries {info.payload_type}, not {payload_type!r}",
            )
        if correlation is not None:
            try:
                validate_metadata(correlation)
            except InvalidCorrelation as exc:
                raise _Refusal(ErrorCode.ERROR_CODE_INVALID_CORRELATION, str(exc)) from None
        session.published += count
        self.published += count
        subs = self._route_cache.get(topic)
        if subs is None:
            # Who receives this topic: the subscriptions that match it, that want
            # control topics if it is one, and whose owner may read it. Cached
            # until a subscription changes, so every delivery is checked.
            subs = tuple(
                s
                for s in self._trie.match(topic)
                if (s.wants_control or not info.control)
                and may_read(s.session.identity, info.access)
            )
            if len(self._route_cache) >= _ROUTE_CACHE_SIZE:
                self._route_cache.clear()
            self._route_cache[topic] = subs
        return subs

    def _schedule_flush(self) -> None:
        """Write queued deliveries at the end of this loop turn (in-process publishes)."""
        if self._dirty and self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush_dirty)

    def _flush_dirty(self) -> None:
        self._flush_handle = None
        dirty = self._dirty
        while dirty:
            dirty.pop().flush()

    async def _housekeeping(self) -> None:
        """Heartbeats, idle peers and stuck subscribers, a few times a second."""
        cfg = self.config
        tick = max(0.02, min(0.25, cfg.heartbeat_interval / 4, cfg.slow_consumer_timeout / 4))
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            for session in list(self._sessions):
                session.check(now)


def protobuf_backend() -> str:
    """The protobuf runtime in use: 'upb' (fast, C), 'cpp' or 'python'."""
    from google.protobuf.internal import api_implementation

    return str(api_implementation.Type())


def _executable(pid: int) -> str | None:
    """The peer's executable, for policies that name executables (Linux only)."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


# Undeclared topics, where the broker allows them, are public.
_UNDECLARED_ACCESS: Final = TopicAccess(1)


# Every declared topic or template as (filter pattern, access), for subscribe checks.
_DECLARED: Final[tuple[tuple[str, TopicAccess], ...]] = (
    *(
        (t.name, TopicAccess(t.access, t.publishers, t.subscribers))
        for t in registry.TOPICS.values()
    ),
    *((t.filter, TopicAccess(t.access, t.publishers, t.subscribers)) for t in registry.TEMPLATES),
)


def _filter_reach(identity: Identity, filter: str) -> tuple[bool, bool]:
    """Whether ``filter`` can match any declared topic, and any that ``identity`` may read."""
    declared = readable = False
    for pattern, access in _DECLARED:
        if filters_overlap(filter, pattern):
            declared = True
            if may_read(identity, access):
                return True, True
    return declared, readable


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _Refusal(EventBusError):
    """A request refused with an error code; the connection stays open."""

    def __init__(self, code: ErrorCode.ValueType, message: str) -> None:
        super().__init__(message)
        self.code = code


class _SocketSession(_Session, asyncio.Protocol):
    """One client connection: the asyncio pump around a sans-I/O Connection."""

    def __init__(self, broker: Broker) -> None:
        super().__init__(broker)
        cfg = broker.config
        self.conn = Connection(
            Role.BROKER,
            max_frame_bytes=cfg.max_frame_bytes,
            handshake_max_frame_bytes=cfg.handshake_max_frame_bytes,
        )
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._paused_since: float | None = None
        self._last_rx = 0.0
        self._ping_sent = False
        self._nonce = itertools.count(1)
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._abort_timer: asyncio.TimerHandle | None = None
        #: The client decodes DeliverBatch frames (said in its Hello).
        self.accepts_batches = False

    # asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's do not subclass asyncio.Transport.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=_WRITE_HIGH, low=_WRITE_LOW)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                self.peer = peer_credentials(sock)
            if self.broker.config.socket_send_buffer:
                with contextlib.suppress(OSError):
                    sock.setsockopt(
                        socket.SOL_SOCKET, socket.SO_SNDBUF, self.broker.config.socket_send_buffer
                    )
        loop = asyncio.get_running_loop()
        self._last_rx = loop.time()
        refusal = self.broker._admit(self)
        if refusal is not None:
            self.broker.refused += 1
            self.broker.audit.record("connection_refused", self.peer, reason=refusal)
            code = (
                ErrorCode.ERROR_CODE_SHUTTING_DOWN
                if self.broker._closing
                else ErrorCode.ERROR_CODE_CONNECTION_LIMIT
            )
            self._fail(code, refusal)
            return
        self._handshake_timer = loop.call_later(
            self.broker.config.handshake_timeout, self._handshake_expired
        )

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        conn.receive_data(data)
        self._last_rx = asyncio.get_running_loop().time()
        self._ping_sent = False
        # Frames parsed before a goodbye or a violation in this read are handled
        # (their answers are not sent: the connection is closing) [protocol §1];
        # a violation found while *handling* a frame ends the read there.
        closing_already = conn.close_expected
        for frame in conn.events_received():
            if not closing_already and conn.state in _CLOSING_STATES:
                break
            try:
                self._handle(frame)
            except _Refusal as exc:
                self.broker.refused += 1
                self._refuse(exc, frame)
            except RemoteProtocolError as exc:
                conn.fail(exc)
            except LocalProtocolError as exc:  # a bug here must not take the broker down
                log.exception("session %s: internal error", self.session_id)
                conn.fail(
                    RemoteProtocolError(f"internal error: {exc}", ErrorCode.ERROR_CODE_INTERNAL)
                )
        if conn.error is not None:
            log.info("session %s: protocol violation: %s", self.session_id, conn.error)
        self.broker._flush_dirty()
        self.flush()

    def eof_received(self) -> bool | None:
        self.conn.receive_eof()
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.close()
        for timer in (self._handshake_timer, self._abort_timer):
            if timer is not None:
                timer.cancel()
        self.broker._forget(self)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._paused_since = asyncio.get_running_loop().time()

    def resume_writing(self) -> None:
        self._paused_since = None
        self.flush()

    # frames -------------------------------------------------------------------

    def _handle(self, frame: Frame) -> None:
        kind = frame.WhichOneof("kind")
        broker = self.broker
        if kind == "publish_batch":
            broker.route(self, frame.publish_batch)
        elif kind == "publish":
            broker.route(self, frame.publish)
        elif kind == "subscribe":
            req = frame.subscribe
            flt = req.correlation_filter if req.HasField("correlation_filter") else None
            broker.subscribe(self, req.subscription_id, req.filter, flt, req.include_control)
            self._send(
                Frame(subscribe_ack=frames_pb2.SubscribeAck(subscription_id=req.subscription_id))
            )
        elif kind == "unsubscribe":
            sid = frame.unsubscribe.subscription_id
            broker.unsubscribe(self, sid)
            self._send(Frame(unsubscribe_ack=frames_pb2.UnsubscribeAck(subscription_id=sid)))
        elif kind == "ping":
            self._send(Frame(pong=frames_pb2.Pong(nonce=frame.ping.nonce)))
        elif kind == "pong":
            pass  # liveness is noted for every frame received
        elif kind == "hello":
            self._hello(frame.hello)
        elif kind == "stats_request":
            stats = broker.statistics().to_proto(
                frame.stats_request.request_id, broker.config.max_frame_bytes
            )
            if not self.identity.privileged:
                # Who is connected and what they read is for the agent only.
                del stats.connection_stats[:]
                del stats.subscription_stats[:]
            self._send(Frame(stats_response=stats))
        elif kind == "goodbye":
            log.debug("session %s said goodbye: %s", self.session_id, frame.goodbye.reason)
        elif kind == "error":
            log.info("session %s reported error: %s", self.session_id, frame.error.message)

    def _hello(self, hello: frames_pb2.Hello) -> None:
        if hello.protocol_version != PROTOCOL_VERSION:
            raise RemoteProtocolError(
                f"protocol version {hello.protocol_version} is not supported; "
                f"this broker speaks {PROTOCOL_VERSION}",
                ErrorCode.ERROR_CODE_UNSUPPORTED_VERSION,
            )
        self.client_name = hello.client_name[:128]
        self.accepts_batches = hello.accept_batches
        claimed = hello.component
        policy = self.broker.policy
        executable = None
        if self.peer is not None and policy.needs_executable(claimed):
            executable = _executable(self.peer.pid)
        try:
            self.identity = policy.authenticate(self.peer, claimed, executable)
        except AccessDenied as exc:
            self.broker.refused += 1
            self.broker.audit.record(
                "handshake_refused",
                self.peer,
                session=self.session_id,
                claimed=claimed[:128] or "-",
                executable=executable or "-",
                reason=str(exc),
            )
            raise RemoteProtocolError(str(exc), ErrorCode.ERROR_CODE_ACCESS_DENIED) from None
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        welcome = frames_pb2.Welcome(
            protocol_version=PROTOCOL_VERSION,
            session_id=self.session_id,
            limits=self.broker.config.limits(),
            component=self.component,
            batches=True,
        )
        self._send(Frame(welcome=welcome))

    def _refuse(self, exc: _Refusal, frame: Frame) -> None:
        kind = frame.WhichOneof("kind")
        sub_id = 0
        topic = ""
        if kind == "publish":
            topic = frame.publish.topic[:256]
        elif kind == "publish_batch":
            topic = frame.publish_batch.topic[:256]
        elif kind == "subscribe":
            sub_id = frame.subscribe.subscription_id
            topic = frame.subscribe.filter[:256]
        elif kind == "unsubscribe":
            sub_id = frame.unsubscribe.subscription_id
        # Messages quote what the peer sent: keep them short, and within the
        # frame limit however small it is configured.
        message = _shorten(str(exc), _MAX_ERROR_MESSAGE)
        error = error_frame(
            exc.code,
            message,
            fatal=False,
            subscription_id=sub_id,
            topic=topic,
            limit=self.conn.max_frame_bytes,
        )
        self._send(error)

    def _send(self, frame: Frame) -> None:
        # Frames parsed before a violation in the same read get no answer: the
        # connection is already closing with its Error frame [protocol §7].
        if self.conn.close_expected:
            return
        self.conn.send(frame)
        # A peer that asks and never reads cannot grow this queue unbounded.
        if self.conn.buffered_bytes > self.broker.config.max_queue_bytes + _WRITE_HIGH:
            self._fail(ErrorCode.ERROR_CODE_SLOW_CONSUMER, "peer does not read its replies")

    # delivery ------------------------------------------------------------------

    def enqueue(
        self,
        sub: _Subscription,
        message: frames_pb2.Publish | frames_pb2.PublishBatch,
        data: bytes,
        first: int,
        count: int,
    ) -> bool:
        if not self._make_room(count, len(data)):
            return False
        conn = self.conn
        sid = sub.subscription_id
        if isinstance(message, frames_pb2.Publish):
            conn.send_deliver(sid, first, data)
        elif self.accepts_batches:
            conn.send_deliver_batch(sid, first, data, count)
        else:
            # A client without batch support gets one Deliver per event.
            header = publish_header(message.topic, message.payload_type)
            corr = (
                message.correlation.SerializeToString() if message.HasField("correlation") else None
            )
            for sequence, payload in enumerate(message.payloads, first):
                conn.send_deliver(sid, sequence, publish_body(header, payload, corr))
        self.broker._dirty.add(self)
        return True

    def _make_room(self, count: int, size: int) -> bool:
        """Whether ``count`` more events (``size`` bytes) fit the queue, flushing if need be."""
        conn = self.conn
        cfg = self.broker.config
        if conn.state is not State.OPEN:
            return False
        if (
            conn.buffered_messages + count > cfg.max_queue_messages
            or conn.buffered_bytes + size > cfg.max_queue_bytes
        ):
            # The queue holds what waits while the socket is backed up; if it
            # is not, hand the batch to the socket now instead of dropping.
            if self._paused_since is not None:
                return False
            self.flush()
            if (
                self._paused_since is not None
                and conn.buffered_messages + count > cfg.max_queue_messages
            ):
                return False
        return True

    def queue_depth(self) -> tuple[int, int]:
        buffered = self.transport.get_write_buffer_size() if self.transport else 0
        return self.conn.buffered_messages, self.conn.buffered_bytes + buffered

    def flush(self) -> None:
        """Write what is queued, unless the socket is backed up."""
        conn = self.conn
        if not (conn.buffered_bytes or conn.close_expected):
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if (self._paused_since is None or conn.close_expected) and self._abort_timer is None:
            data = conn.data_to_send()
            if data:
                transport.write(data)
        if conn.close_expected:
            self._close_transport()

    def _close_transport(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self._abort_timer is not None:
            return
        drain = self.broker.config.drain_timeout
        if self.conn.error is None and transport.can_write_eof():
            # After a goodbye: end our side once the queue is written and keep
            # reading (input is discarded) until the peer closes too, so that a
            # peer still writing reads the goodbye instead of a broken pipe.
            transport.write_eof()
            grace = drain
        else:
            transport.close()
            grace = 1.0 if self.conn.error is not None else drain
        # A peer that never reads (or never closes) is aborted: at once after
        # an error, after the drain deadline on goodbye.
        self._abort_timer = asyncio.get_running_loop().call_later(grace, transport.abort)

    def _fail(self, code: ErrorCode.ValueType, message: str) -> None:
        self.conn.fail(RemoteProtocolError(message, code))
        self._paused_since = None  # let the Error frame through the flush
        self.flush()

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if self.conn.state is State.CONNECTING:
            log.info("session %s: handshake deadline passed", self.session_id)
            self._fail(
                ErrorCode.ERROR_CODE_HANDSHAKE_TIMEOUT,
                f"handshake not completed within {self.broker.config.handshake_timeout} s",
            )

    def check(self, now: float) -> None:
        """Heartbeat, idle and slow-consumer checks, called by the housekeeper."""
        cfg = self.broker.config
        if self.conn.state is not State.OPEN:
            return
        if self._paused_since is not None and now - self._paused_since > cfg.slow_consumer_timeout:
            log.warning("session %s: slow consumer, disconnecting", self.session_id)
            self.conn.data_to_send()  # its backlog is dropped, not delivered
            self._fail(
                ErrorCode.ERROR_CODE_SLOW_CONSUMER,
                f"subscriber did not read for {cfg.slow_consumer_timeout} s",
            )
            return
        silent = now - self._last_rx
        if silent > cfg.idle_timeout:
            self._fail(ErrorCode.ERROR_CODE_IDLE_TIMEOUT, f"peer silent for {silent:.1f} s")
        elif silent > cfg.heartbeat_interval and not self._ping_sent:
            self._ping_sent = True
            self._send(Frame(ping=frames_pb2.Ping(nonce=next(self._nonce))))
            self.flush()

    def goodbye(self, reason: str) -> None:
        """Tell the client the broker is going away, then close after the queue drains."""
        if self.conn.state is State.OPEN:
            self.conn.send(Frame(goodbye=frames_pb2.Goodbye(reason=reason)))
            self._paused_since = None
            self.flush()
        elif not self.conn.close_expected:
            self._fail(ErrorCode.ERROR_CODE_SHUTTING_DOWN, reason)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class LocalSession(_Session):
    """An in-process session: publishes and subscribes without a socket.

    Each subscription delivers into an :class:`EventQueue` (several may share
    one). The broker's ``max_queue_messages`` and ``max_queue_bytes`` bound
    every queue it creates; when one is full, events are dropped and counted
    exactly as for a socket subscriber.
    """

    def __init__(self, broker: Broker, name: str, component: str) -> None:
        super().__init__(broker)
        self.client_name = name
        # In-process code runs inside the agent and holds the broker itself.
        self.identity = Identity(None, component, privileged=True, trusted=True)
        self.peer = PeerCredentials(os.getpid(), os.getuid(), os.getgid())
        self._queues: dict[int, EventQueue[Message]] = {}
        self._ids = itertools.count(1)
        self._closed = False

    @property
    def is_closed(self) -> bool:
        return self._closed

    def new_queue(self) -> EventQueue[Message]:
        """An empty queue with the broker's bounds."""
        cfg = self.broker.config
        return EventQueue(cfg.max_queue_messages, cfg.max_queue_bytes)

    def publish(self, publish: frames_pb2.Publish) -> int:
        """Route one event; raises :class:`EventBusError` subclasses when refused."""
        if self._closed:
            raise ClosedResourceError("local session is closed")
        try:
            taken = self.broker.route(self, publish)
        except _Refusal as exc:
            self.broker.refused += 1
            raise error_for_code(exc.code, str(exc)) from None
        # Socket subscribers it reached get their batch at the end of this turn.
        self.broker._schedule_flush()
        return taken

    def subscribe(
        self,
        filter: str,
        queue: EventQueue[Message],
        correlation_filter: CorrelationFilter | None = None,
        include_control: bool = False,
    ) -> int:
        """Subscribe, delivering into ``queue``; returns the subscription id."""
        if self._closed:
            raise ClosedResourceError("local session is closed")
        sid = next(self._ids)
        try:
            self.broker.subscribe(self, sid, filter, correlation_filter, include_control)
        except _Refusal as exc:
            raise error_for_code(exc.code, str(exc)) from None
        self._queues[sid] = queue
        return sid

    def unsubscribe(self, subscription_id: int) -> None:
        """End a subscription; events already queued stay readable."""
        if self._closed:  # the session (or the broker) already ended everything
            self._queues.pop(subscription_id, None)
            return
        try:
            self.broker.unsubscribe(self, subscription_id)
        except _Refusal as exc:
            raise error_for_code(exc.code, str(exc)) from None
        self._queues.pop(subscription_id, None)

    def enqueue(
        self,
        sub: _Subscription,
        message: frames_pb2.Publish | frames_pb2.PublishBatch,
        data: bytes,
        first: int,
        count: int,
    ) -> bool:
        queue = self._queues.get(sub.subscription_id)
        if queue is None or self._closed:
            return False
        payloads: Sequence[bytes] = (
            message.payloads if isinstance(message, frames_pb2.PublishBatch) else (message.payload,)
        )
        # One copy of the correlation per subscriber: the publisher may reuse its message.
        correlation = _copy_correlation(message) if message.HasField("correlation") else None
        return queue.put_payloads(
            message.topic, message.payload_type, payloads, correlation, first, sub.subscription_id
        )

    def queue_depth(self) -> tuple[int, int]:
        queues = {id(q): q for q in self._queues.values()}.values()
        return sum(len(q) for q in queues), sum(q.nbytes for q in queues)

    def close(self) -> None:
        """End every subscription of this session; readers see the end of their queues."""
        if self._closed:
            return
        self._closed = True
        self.broker._drop_subscriptions(self)
        self.broker._local_sessions.discard(self)
        for queue in self._queues.values():
            queue.close()
        self._queues.clear()


def _copy_correlation(publish: frames_pb2.Publish | frames_pb2.PublishBatch) -> CorrelationMetadata:
    # Each subscriber gets its own copy: the publisher may reuse its message.
    copy = CorrelationMetadata()
    copy.CopyFrom(publish.correlation)
    return copy
