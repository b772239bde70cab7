"""The router: which sessions get this publish? Pure code, no event loop.

The router holds every subscription in a topic trie and answers, for each
published event or batch, which subscriptions receive it: those whose filter
matches the topic, that opted in to control topics if it is one, whose owner
may read the topic (access control is checked at subscribe time and again
for every delivery, through a cache cleared whenever a subscription
changes), and whose correlation filter accepts the event's metadata. It then
hands the encoded event to each receiving session's sink, numbered per
subscription.

Sessions, socket or in-process, are :class:`Endpoint` objects to the router:
an identity, the subscriptions it owns, and a :class:`Sink` that queues
deliveries. Every refusal is a typed
:class:`~daemoneye_eventbus.errors.EventBusError` carrying its wire error code
[protocol §7], so a socket session sends ``exc.code`` in an ``Error`` frame and
an in-process caller gets the very same exception.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, NoReturn, Protocol

from daemoneye.eventbus.v1 import frames_pb2, registry
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationFilter, CorrelationMetadata
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode
from daemoneye.eventbus.v1.options_pb2 import AccessLevel
from daemoneye_eventbus.access import (
    ANONYMOUS,
    AuditLog,
    Identity,
    PeerCredentials,
    TopicAccess,
    filter_reach,
    may_publish,
    may_read,
)
from daemoneye_eventbus.config import BrokerConfig
from daemoneye_eventbus.correlation import CorrelationMatcher, validate_metadata
from daemoneye_eventbus.errors import (
    AccessDenied,
    EventBusError,
    InvalidCorrelation,
    InvalidTopic,
    LimitExceeded,
    PayloadTypeMismatch,
    ServerError,
    SubscriptionExists,
    UnknownSubscription,
)
from daemoneye_eventbus.frames import batch_budget, event_budget
from daemoneye_eventbus.topics import SubscriptionTrie, validate_topic, validate_topic_filter

__all__ = [
    "DECLARED_TOPICS",
    "Endpoint",
    "Published",
    "Router",
    "Sink",
    "SubscriptionEntry",
    "TopicInfo",
]

#: What a session publishes: one event or a batch of events on one topic.
Published = frames_pb2.Publish | frames_pb2.PublishBatch

# Topics whose publish permission an endpoint remembers; cleared when full.
_PUBLISH_CHECKS_SIZE: Final = 1024
# A cache miss, distinct from "allowed" (None).
_UNCHECKED: Final = "\0unchecked"
# Topics whose routing is remembered; the cache is cleared when it grows past
# this, and whenever a subscription is added or removed.
_ROUTE_CACHE_SIZE: Final = 4096

#: Every declared topic or template as (filter pattern, access), for subscribe checks.
DECLARED_TOPICS: Final[tuple[tuple[str, TopicAccess], ...]] = (
    *(
        (t.name, TopicAccess(t.access, t.publishers, t.subscribers))
        for t in registry.TOPICS.values()
    ),
    *((t.filter, TopicAccess(t.access, t.publishers, t.subscribers)) for t in registry.TEMPLATES),
)

# Undeclared topics, where the broker allows them, are public.
_UNDECLARED_ACCESS: Final = TopicAccess(AccessLevel.ACCESS_LEVEL_PUBLIC)


class Sink(Protocol):
    """Where the router hands one session's deliveries."""

    def enqueue(
        self, sub: SubscriptionEntry, message: Published, data: bytes, first: int, count: int
    ) -> bool:
        """Queue the ``count`` events of ``message`` (``data`` encoded), numbered
        from ``first``, for ``sub``: all or none; False if dropped."""
        ...


class Endpoint:
    """One session as the router sees it: who it is, what it subscribed, its figures."""

    __slots__ = (
        "identity",
        "peer",
        "publish_checks",
        "published",
        "session_id",
        "sink",
        "subscriptions",
    )

    def __init__(
        self,
        sink: Sink,
        *,
        identity: Identity = ANONYMOUS,
        peer: PeerCredentials | None = None,
        session_id: str | None = None,
    ) -> None:
        self.sink = sink
        self.session_id = session_id or secrets.token_hex(8)
        #: Who the session is; set once its handshake is complete.
        self.identity = identity
        #: What the kernel said of the peer (for figures and audit lines).
        self.peer = peer
        self.subscriptions: dict[int, SubscriptionEntry] = {}
        #: may_publish's verdict per topic for this identity.
        self.publish_checks: dict[str, str | None] = {}
        #: Events this session published and the router accepted.
        self.published = 0

    @property
    def component(self) -> str:
        """The accepted component, or "" for an anonymous peer."""
        return self.identity.component

    def authenticate(self, identity: Identity) -> None:
        """Take the identity established at the handshake."""
        self.identity = identity
        self.publish_checks.clear()


@dataclass(eq=False, slots=True)
class SubscriptionEntry:
    """One subscription of one endpoint; hashed by identity in the trie."""

    endpoint: Endpoint
    subscription_id: int
    filter: str
    matcher: CorrelationMatcher | None
    #: Deliver control topics to this subscription.
    wants_control: bool
    #: The endpoint's sink's ``enqueue``, bound once for the delivery loop.
    enqueue: Callable[[SubscriptionEntry, Published, bytes, int, int], bool]
    sequence: int = 0
    delivered: int = 0
    dropped: int = 0


@dataclass(frozen=True, slots=True)
class TopicInfo:
    """What routing needs to know about a published topic, cached per name."""

    payload_type: str | None
    control: bool
    access: TopicAccess


class Router:
    """Subscriptions, access checks and fan-out for one broker.

    ``published``, ``delivered``, ``dropped`` and ``refused`` count events
    (a batch counts once per event) and refusals since the router was made.
    """

    def __init__(self, config: BrokerConfig, audit: AuditLog | None = None) -> None:
        self.config = config
        #: Structured, rate-limited log of access refusals.
        self.audit = audit or AuditLog()
        self._trie: SubscriptionTrie[SubscriptionEntry] = SubscriptionTrie(
            max_bytes=config.max_topic_bytes, max_levels=config.max_topic_levels
        )
        self._route_cache: dict[str, tuple[SubscriptionEntry, ...]] = {}
        self._topic_cache: dict[str, TopicInfo] = {}
        self._event_limit = event_budget(config.max_frame_bytes)
        self._batch_limit = batch_budget(config.max_frame_bytes)
        self.published = 0
        self.delivered = 0
        self.dropped = 0
        self.refused = 0

    def _refuse(self, exc: EventBusError) -> NoReturn:
        self.refused += 1
        raise exc

    # -- subscriptions -----------------------------------------------------------

    def subscribe(
        self,
        endpoint: Endpoint,
        subscription_id: int,
        filter: str,
        correlation_filter: CorrelationFilter | None = None,
        include_control: bool = False,
    ) -> SubscriptionEntry:
        """Add a subscription; raise a typed error with the reason if refused."""
        cfg = self.config
        if subscription_id <= 0 or subscription_id in endpoint.subscriptions:
            self._refuse(
                SubscriptionExists(
                    f"subscription id {subscription_id} is 0 or already in use",
                    code=ErrorCode.ERROR_CODE_INVALID_SUBSCRIPTION_ID,
                )
            )
        if len(endpoint.subscriptions) >= cfg.max_subscriptions:
            self._refuse(
                LimitExceeded(
                    f"subscription limit of {cfg.max_subscriptions} per connection reached",
                    code=ErrorCode.ERROR_CODE_LIMIT_EXCEEDED,
                )
            )
        try:
            validate_topic_filter(
                filter, max_bytes=cfg.max_topic_bytes, max_levels=cfg.max_topic_levels
            )
        except InvalidTopic as exc:
            self._refuse(InvalidTopic(str(exc), code=ErrorCode.ERROR_CODE_INVALID_FILTER))
        identity = endpoint.identity
        if not cfg.allow_undeclared_topics:
            declared, readable = filter_reach(identity, filter, DECLARED_TOPICS)
            if not declared:
                self._refuse(
                    InvalidTopic(
                        f"filter {filter!r} matches no topic declared in the schema",
                        code=ErrorCode.ERROR_CODE_INVALID_FILTER,
                    )
                )
            if not readable:
                self.audit.record(
                    "subscribe_refused",
                    endpoint.peer,
                    session=endpoint.session_id,
                    component=identity.component or "-",
                    filter=filter,
                )
                self._refuse(
                    AccessDenied(
                        f"filter {filter!r} matches no topic that "
                        f"{identity.component or 'an anonymous peer'} may read",
                        code=ErrorCode.ERROR_CODE_ACCESS_DENIED,
                    )
                )
        matcher = None
        if correlation_filter is not None and correlation_filter.ByteSize():
            try:
                matcher = CorrelationMatcher(correlation_filter)
            except InvalidCorrelation as exc:
                self._refuse(
                    InvalidCorrelation(str(exc), code=ErrorCode.ERROR_CODE_INVALID_CORRELATION)
                )
        # A filter that names the control tree explicitly asks for control topics.
        wants_control = include_control or filter.startswith("control.") or filter == "control"
        sub = SubscriptionEntry(
            endpoint, subscription_id, filter, matcher, wants_control, endpoint.sink.enqueue
        )
        self._trie.insert(filter, sub)
        endpoint.subscriptions[subscription_id] = sub
        self._route_cache.clear()
        return sub

    def unsubscribe(self, endpoint: Endpoint, subscription_id: int) -> None:
        """Remove a subscription; raise if the endpoint has no such subscription."""
        sub = endpoint.subscriptions.pop(subscription_id, None)
        if sub is None:
            self._refuse(
                UnknownSubscription(
                    f"no subscription with id {subscription_id}",
                    code=ErrorCode.ERROR_CODE_UNKNOWN_SUBSCRIPTION,
                )
            )
        self._trie.remove(sub.filter, sub)
        self._route_cache.clear()

    def detach(self, endpoint: Endpoint) -> None:
        """Drop every subscription of ``endpoint`` (its session has ended)."""
        subs = endpoint.subscriptions
        if not subs:
            return
        for sub in subs.values():
            self._trie.remove(sub.filter, sub)
        subs.clear()
        self._route_cache.clear()

    def subscriptions(self) -> Iterator[SubscriptionEntry]:
        """Every subscription, in no particular order."""
        for _, sub in self._trie.items():
            yield sub

    def __len__(self) -> int:
        """The number of subscriptions."""
        return len(self._trie)

    # -- routing -------------------------------------------------------------------

    def topic_info(self, topic: str) -> TopicInfo:
        """What the schema (or the config, for undeclared topics) says of ``topic``.

        Raises :class:`InvalidTopic` for a malformed or undeclared topic.
        """
        info = self._topic_cache.get(topic)
        if info is not None:
            return info
        cfg = self.config
        try:
            validate_topic(topic, max_bytes=cfg.max_topic_bytes, max_levels=cfg.max_topic_levels)
        except InvalidTopic as exc:
            self._refuse(InvalidTopic(str(exc), code=ErrorCode.ERROR_CODE_INVALID_TOPIC))
        declared = registry.lookup(topic)
        if declared is not None:
            access = TopicAccess(declared.access, declared.publishers, declared.subscribers)
            info = TopicInfo(declared.payload_name, declared.control, access)
        elif cfg.allow_undeclared_topics:
            info = TopicInfo(None, False, _UNDECLARED_ACCESS)
        else:
            self._refuse(
                InvalidTopic(
                    f"topic {topic!r} is not declared in the schema",
                    code=ErrorCode.ERROR_CODE_INVALID_TOPIC,
                )
            )
        if len(self._topic_cache) >= _ROUTE_CACHE_SIZE:
            self._topic_cache.clear()
        self._topic_cache[topic] = info
        return info

    def route(self, endpoint: Endpoint, message: Published) -> int:
        """Check and route one published event or batch; return how many
        events queues took.

        Raises a typed :class:`EventBusError` with its error code when it is
        refused; nothing is delivered then. A batch is accepted or refused as
        a whole, and each subscriber takes or drops it as a whole: its events
        keep consecutive sequence numbers.
        """
        if isinstance(message, frames_pb2.PublishBatch):
            count = len(message.payloads)
            if not count:
                self._refuse(
                    ServerError(
                        "publish batch holds no events", ErrorCode.ERROR_CODE_MALFORMED_FRAME
                    )
                )
            most = self.config.max_queue_messages
            if count > most:
                # A batch is queued whole: one larger than a queue could never be
                # held back, and a subscriber without batches gets a frame per event.
                self._refuse(
                    LimitExceeded(
                        f"publish batch of {count} events exceeds max_queue_messages ({most})",
                        code=ErrorCode.ERROR_CODE_LIMIT_EXCEEDED,
                    )
                )
            limit = self._batch_limit
        else:
            count = 1
            limit = self._event_limit
        # Encoded once, for the size check and for every subscriber. Unknown
        # fields are never forwarded; the payloads stay opaque.
        message.DiscardUnknownFields()
        data = message.SerializeToString()
        correlation = message.correlation if message.HasField("correlation") else None
        subs = self._accept(
            endpoint, message.topic, message.payload_type, correlation, len(data), limit, count
        )
        taken = 0
        for sub in subs:
            if sub.matcher is not None and not sub.matcher.matches(correlation):
                continue
            first = sub.sequence + 1
            sub.sequence += count
            if sub.enqueue(sub, message, data, first, count):
                sub.delivered += count
                taken += count
            else:
                sub.dropped += count
                self.dropped += count
        self.delivered += taken
        return taken

    def _accept(
        self,
        endpoint: Endpoint,
        topic: str,
        payload_type: str,
        correlation: CorrelationMetadata | None,
        size: int,
        limit: int,
        count: int,
    ) -> tuple[SubscriptionEntry, ...]:
        """Check ``count`` events (``size`` bytes encoded) published on ``topic``.

        Returns the subscriptions that may receive them (correlation filters
        not yet applied); raises a typed error when they are refused.
        """
        info = self._topic_cache.get(topic) or self.topic_info(topic)
        checks = endpoint.publish_checks
        denied = checks.get(topic, _UNCHECKED)
        if denied is _UNCHECKED:
            # The identity is fixed at the handshake: remember the verdict per topic.
            denied = may_publish(endpoint.identity, info.access)
            if len(checks) >= _PUBLISH_CHECKS_SIZE:
                checks.clear()
            checks[topic] = denied
        if denied is not None:
            self.audit.record(
                "publish_refused",
                endpoint.peer,
                session=endpoint.session_id,
                component=endpoint.identity.component or "-",
                topic=topic,
                reason=denied,
            )
            self._refuse(
                AccessDenied(
                    f"publish on {topic!r}: {denied}", code=ErrorCode.ERROR_CODE_ACCESS_DENIED
                )
            )
        if size > limit:
            what = f"event of {size} bytes" if count == 1 else f"batch of {count} events"
            self._refuse(
                LimitExceeded(
                    f"{what} cannot be delivered within the frame limit; "
                    f"an encoded event or batch may be at most {limit} bytes, this is {size}",
                    code=ErrorCode.ERROR_CODE_FRAME_TOO_LARGE,
                )
            )
        if info.payload_type is not None and payload_type != info.payload_type:
            self._refuse(
                PayloadTypeMismatch(
                    f"topic {topic!r} carries {info.payload_type}, not {payload_type!r}",
                    code=ErrorCode.ERROR_CODE_PAYLOAD_MISMATCH,
                )
            )
        if correlation is not None:
            try:
                validate_metadata(correlation)
            except InvalidCorrelation as exc:
                self._refuse(
                    InvalidCorrelation(str(exc), code=ErrorCode.ERROR_CODE_INVALID_CORRELATION)
                )
        endpoint.published += count
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
                and may_read(s.endpoint.identity, info.access)
            )
            if len(self._route_cache) >= _ROUTE_CACHE_SIZE:
                self._route_cache.clear()
            self._route_cache[topic] = subs
        return subs
