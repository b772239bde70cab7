"""Presence events and last wills: what the broker announces about sessions (pure).

When a socket session completes its handshake the broker publishes a
``PresenceEvent`` (``CONNECTED``) on ``control.presence``; when it ends, after
publishing the session's last will if it has one and ended without a goodbye,
it publishes another (``DISCONNECTED``) saying how the session ended and
whether the will was published [protocol §5, "Presence and last will"].

The broker publishes them through its router as the component
``daemoneye-eventbus`` (:data:`~daemoneye_eventbus.access.BROKER_COMPONENT`,
which no peer may claim), so the topic's access rules decide who reads them:
the schema lets only ``daemoneye-agent`` subscribe.

The seam: a socket session keeps a :class:`SessionPresence` (when its
handshake completed, its checked will, how it ended: :meth:`SessionPresence.note`
for a goodbye received or sent at shutdown, :meth:`SessionPresence.finish`
when the connection closes); the broker's :class:`Presence` reads it when the
session opens and once it has been released. :func:`check_will` is the
handshake's check of ``Hello.last_will``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from daemoneye.eventbus.v1 import frames_pb2, registry
from daemoneye.eventbus.v1.control_pb2 import DisconnectReason, PresenceEvent, PresenceState
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode
from daemoneye.eventbus.v1.options_pb2 import AccessLevel
from daemoneye_eventbus.access import (
    BROKER_COMPONENT,
    Identity,
    PeerCredentials,
    TopicAccess,
    may_publish,
)
from daemoneye_eventbus.config import BrokerConfig
from daemoneye_eventbus.correlation import validate_metadata
from daemoneye_eventbus.errors import (
    AccessDenied,
    EventBusError,
    InvalidCorrelation,
    InvalidPayload,
    InvalidTopic,
    LimitExceeded,
    PayloadTypeMismatch,
    RemoteProtocolError,
)
from daemoneye_eventbus.flow import DROPPED, Published
from daemoneye_eventbus.frames import event_budget
from daemoneye_eventbus.protocol import build_publish
from daemoneye_eventbus.registry_runtime import RequestTopic
from daemoneye_eventbus.router import Endpoint, Router
from daemoneye_eventbus.stamps import Stamp
from daemoneye_eventbus.subscriptions import SubscriptionEntry
from daemoneye_eventbus.topics import validate_topic

__all__ = [
    "BROKER_IDENTITY",
    "GOODBYE",
    "SHUTDOWN",
    "Announced",
    "Presence",
    "SessionEnd",
    "SessionPresence",
    "check_will",
    "ended_by_error",
    "said_goodbye",
]

log = logging.getLogger("daemoneye_eventbus.broker")

#: Who the broker is when it publishes presence events: the reserved component.
BROKER_IDENTITY: Final = Identity(None, BROKER_COMPONENT, privileged=True)

_CONNECTED: Final = PresenceState.PRESENCE_STATE_CONNECTED
_DISCONNECTED: Final = PresenceState.PRESENCE_STATE_DISCONNECTED
#: The reasons of a session that ended without a goodbye: its will is published.
_WILL_REASONS: Final = frozenset(
    {
        DisconnectReason.DISCONNECT_REASON_CONNECTION_LOST,
        DisconnectReason.DISCONNECT_REASON_HEARTBEAT_TIMEOUT,
        DisconnectReason.DISCONNECT_REASON_REFUSED,
    }
)
_PUBLIC: Final = TopicAccess(AccessLevel.ACCESS_LEVEL_PUBLIC)


@dataclass(frozen=True, slots=True)
class SessionEnd:
    """How a session ended, as its ``DISCONNECTED`` presence event says it."""

    reason: DisconnectReason.ValueType
    #: The error that ended it (REFUSED, HEARTBEAT_TIMEOUT), else unspecified.
    error: ErrorCode.ValueType = ErrorCode.ERROR_CODE_UNSPECIFIED
    #: For logs.
    detail: str = ""

    @property
    def publishes_will(self) -> bool:
        """The session ended without a goodbye (its own or the broker's at shutdown)."""
        return self.reason in _WILL_REASONS


#: The broker said goodbye to the session: it is shutting down.
SHUTDOWN: Final = SessionEnd(
    DisconnectReason.DISCONNECT_REASON_SHUTDOWN, detail="broker shutting down"
)
#: The client said goodbye, with no reason given.
GOODBYE: Final = SessionEnd(DisconnectReason.DISCONNECT_REASON_GOODBYE, detail="goodbye")


def said_goodbye(reason: str) -> SessionEnd:
    """The client sent ``Goodbye{reason}``: a clean end."""
    if not reason:
        return GOODBYE
    return SessionEnd(DisconnectReason.DISCONNECT_REASON_GOODBYE, detail=f"goodbye: {reason[:256]}")


def ended_by_error(error: RemoteProtocolError) -> SessionEnd:
    """The end of a session the broker closed with the fatal ``error``."""
    code = ErrorCode.ValueType(error.code)
    if code == ErrorCode.ERROR_CODE_IDLE_TIMEOUT:
        reason = DisconnectReason.DISCONNECT_REASON_HEARTBEAT_TIMEOUT
    elif code == ErrorCode.ERROR_CODE_SHUTTING_DOWN:
        reason = DisconnectReason.DISCONNECT_REASON_SHUTDOWN
    else:
        reason = DisconnectReason.DISCONNECT_REASON_REFUSED
    return SessionEnd(reason, code, str(error)[:512])


class SessionPresence:
    """What a socket session records of its own life, for the broker's announcements."""

    __slots__ = ("connected_at", "end", "last_will")

    def __init__(self) -> None:
        #: Wall-clock time its handshake completed, in ns since the epoch (0: not yet).
        self.connected_at = 0
        #: How it ended, once known (the first reason noted wins).
        self.end: SessionEnd | None = None
        #: Its ``Hello.last_will``, as checked at the handshake.
        self.last_will: frames_pb2.Publish | None = None

    def note(self, end: SessionEnd) -> None:
        """Record how the session ends, unless that is already known."""
        if self.end is None:
            self.end = end

    def finish(self, error: RemoteProtocolError | None, exc: BaseException | None) -> SessionEnd:
        """The connection closed: its end is what was noted, else the broker's fatal
        ``error``, else a connection lost (``exc``: the transport's reason, if any)."""
        if self.end is None:
            if error is not None:
                self.end = ended_by_error(error)
            else:
                detail = f"connection lost: {exc}" if exc else "connection closed without a goodbye"
                self.end = SessionEnd(
                    DisconnectReason.DISCONNECT_REASON_CONNECTION_LOST, detail=detail[:512]
                )
        return self.end


class Announced(Protocol):
    """A session the broker announces (a socket session)."""

    client_name: str
    endpoint: Endpoint
    presence: SessionPresence

    @property
    def session_id(self) -> str: ...

    @property
    def component(self) -> str: ...

    @property
    def peer(self) -> PeerCredentials | None: ...


class _Silent:
    """The sink of the broker's own endpoint: it subscribes to nothing."""

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
        return DROPPED  # pragma: no cover - the broker's endpoint has no subscriptions

    def resume(self) -> None:
        pass


class Presence:
    """Publishes presence events on ``control.presence`` and the wills of sessions
    that end without a goodbye, through ``router``; ``flush`` has the deliveries
    written (the broker's outbox)."""

    def __init__(self, router: Router, flush: Callable[[], None]) -> None:
        self.router = router
        self.flush = flush
        #: The broker's own place in the router, as the publisher of presence events.
        self.endpoint = Endpoint(_Silent(), identity=BROKER_IDENTITY, session_id="broker")
        #: Last wills published so far.
        self.wills = 0

    def connected(self, session: Announced) -> None:
        """``session`` completed its handshake."""
        self._publish(_event(session, _CONNECTED))

    def disconnected(self, session: Announced, *, wills: bool = True) -> None:
        """``session`` ended and was released (its subscriptions are gone): publish
        its will if it ended without a goodbye (and ``wills``: not at shutdown),
        then its ``DISCONNECTED`` event. Nothing for a session that never
        completed its handshake."""
        state = session.presence
        if not state.connected_at:
            return
        end = state.finish(None, None)
        will = state.last_will
        published = False
        if will is not None and wills and end.publishes_will:
            try:
                self.router.route(session.endpoint, will)
            except EventBusError as exc:  # e.g. the retained store is full now
                log.warning(
                    "session %s: last will on %r refused: %s", session.session_id, will.topic, exc
                )
            else:
                published = True
                self.wills += 1
        event = _event(session, _DISCONNECTED)
        event.reason = end.reason
        event.error = end.error
        event.detail = end.detail
        event.last_will_published = published
        self._publish(event)

    def _publish(self, event: PresenceEvent) -> None:
        try:
            self.router.route(self.endpoint, build_publish(registry.CONTROL_PRESENCE, event))
        except EventBusError:  # pragma: no cover - the schema lets the broker publish it
            log.exception("presence event refused")
            return
        self.flush()


def _event(session: Announced, state: PresenceState.ValueType) -> PresenceEvent:
    """The presence event of ``session`` in ``state``, with who it is."""
    peer = session.peer
    event = PresenceEvent(
        state=state,
        session_id=session.session_id,
        component=session.component,
        client_name=session.client_name,
        peer_pid=peer.pid if peer is not None and peer.pid > 0 else 0,
        peer_uid=peer.uid if peer is not None and peer.uid >= 0 else 0,
        peer_sid=(peer.sid or "") if peer is not None else "",
    )
    at = Timestamp()
    at.FromNanoseconds(session.presence.connected_at)
    event.connected_at.CopyFrom(at)
    return event


def check_will(
    config: BrokerConfig, identity: Identity, will: frames_pb2.Publish
) -> frames_pb2.Publish:
    """``Hello.last_will`` checked as a publish by ``identity`` would be: returns the
    will to keep (unknown fields discarded), or raises the typed refusal with its
    wire code [protocol §3]: a malformed or undeclared topic, or a request topic
    (``INVALID_TOPIC``); a topic the peer may not publish on (``ACCESS_DENIED``);
    a payload of another type (``PAYLOAD_MISMATCH``) or that does not parse
    (``INVALID_PAYLOAD``, with validation on); correlation metadata out of its
    bounds (``INVALID_CORRELATION``); too large to deliver (``FRAME_TOO_LARGE``)."""
    kept = frames_pb2.Publish()
    kept.CopyFrom(will)
    kept.DiscardUnknownFields()
    topic = kept.topic
    try:
        validate_topic(topic, max_bytes=config.max_topic_bytes, max_levels=config.max_topic_levels)
    except InvalidTopic as exc:
        raise InvalidTopic(str(exc), code=ErrorCode.ERROR_CODE_INVALID_TOPIC) from None
    declared = registry.lookup(topic)
    if declared is None and not config.allow_undeclared_topics:
        raise InvalidTopic(
            f"topic {topic!r} is not declared in the schema",
            code=ErrorCode.ERROR_CODE_INVALID_TOPIC,
        )
    if isinstance(declared, RequestTopic):
        raise InvalidTopic(
            f"topic {topic!r} is a request topic; a last will is an event",
            code=ErrorCode.ERROR_CODE_INVALID_TOPIC,
        )
    access = (
        _PUBLIC
        if declared is None
        else TopicAccess(declared.access, declared.publishers, declared.subscribers)
    )
    denied = may_publish(identity, access)
    if denied is not None:
        raise AccessDenied(
            f"publish on {topic!r}: {denied}", code=ErrorCode.ERROR_CODE_ACCESS_DENIED
        )
    if kept.ByteSize() > event_budget(config.max_frame_bytes):
        raise LimitExceeded(
            f"a last will of {kept.ByteSize()} bytes cannot be delivered within the frame limit",
            code=ErrorCode.ERROR_CODE_FRAME_TOO_LARGE,
        )
    if declared is not None:
        if kept.payload_type != declared.payload_name:
            raise PayloadTypeMismatch(
                f"topic {topic!r} carries {declared.payload_name}, not {kept.payload_type!r}",
                code=ErrorCode.ERROR_CODE_PAYLOAD_MISMATCH,
            )
        if config.validate_payloads:
            try:
                declared.payload_type.FromString(kept.payload)
            except (DecodeError, RecursionError) as exc:
                raise InvalidPayload(
                    f"payload does not parse as {kept.payload_type}: {exc}",
                    topic=topic,
                    payload_type=kept.payload_type,
                    code=ErrorCode.ERROR_CODE_INVALID_PAYLOAD,
                ) from None
    if kept.HasField("correlation"):
        try:
            validate_metadata(kept.correlation)
        except InvalidCorrelation as exc:
            raise InvalidCorrelation(
                str(exc), code=ErrorCode.ERROR_CODE_INVALID_CORRELATION
            ) from None
    return kept
