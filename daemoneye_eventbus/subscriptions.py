"""Subscriptions: who subscribed to what, and who may receive a topic (pure).

Sessions, socket or in-process, are :class:`Endpoint` objects here: an
identity, the subscriptions it owns, a :class:`Sink` that queues its
deliveries and a :class:`RequestSink` for its requests and replies.
:class:`SubscriptionTable` checks each subscribe request (grammar, declared
topics, access, limits, the memory it would hold) and keeps the subscriptions
in a topic trie, responder subscriptions (``Subscribe.respond``) in one of
their own; the :class:`~daemoneye_eventbus.router.Router` asks it who receives
a topic, and its :class:`~daemoneye_eventbus.rpc.RequestRouter` who may answer
a request. Refusals are typed errors carrying their wire code [protocol §7].
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, NoReturn, Protocol

from daemoneye.eventbus.v1 import frames_pb2, registry
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationFilter
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode
from daemoneye_eventbus.access import (
    ANONYMOUS,
    AuditLog,
    Identity,
    PeerCredentials,
    TopicAccess,
    filter_reach,
    may_read,
)
from daemoneye_eventbus.budget import subscription_cost
from daemoneye_eventbus.config import BrokerConfig
from daemoneye_eventbus.correlation import CorrelationMatcher
from daemoneye_eventbus.errors import (
    AccessDenied,
    EventBusError,
    InvalidCorrelation,
    InvalidTopic,
    LimitExceeded,
    SubscriptionExists,
    UnknownSubscription,
)
from daemoneye_eventbus.flow import Flow, Published
from daemoneye_eventbus.registry_runtime import RequestTopic, RequestTopicTemplate
from daemoneye_eventbus.stamps import Stamp
from daemoneye_eventbus.topics import SubscriptionTrie, validate_topic_filter

__all__ = [
    "DECLARED_TOPICS",
    "REQUEST_TOPICS",
    "Endpoint",
    "Published",
    "RequestSink",
    "Sink",
    "SubscriptionEntry",
    "SubscriptionTable",
]

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

#: The declared request topics and templates (those with a reply type), as
#: :data:`DECLARED_TOPICS`: what a responder subscription may reach.
REQUEST_TOPICS: Final[tuple[tuple[str, TopicAccess], ...]] = (
    *(
        (t.name, TopicAccess(t.access, t.publishers, t.subscribers))
        for t in registry.TOPICS.values()
        if isinstance(t, RequestTopic)
    ),
    *(
        (t.filter, TopicAccess(t.access, t.publishers, t.subscribers))
        for t in registry.TEMPLATES
        if isinstance(t, RequestTopicTemplate)
    ),
)

#: The declared topics and templates that are lossless, as :data:`DECLARED_TOPICS`.
LOSSLESS_TOPICS: Final[tuple[tuple[str, TopicAccess], ...]] = (
    *(
        (t.name, TopicAccess(t.access, t.publishers, t.subscribers))
        for t in registry.TOPICS.values()
        if t.lossless
    ),
    *(
        (t.filter, TopicAccess(t.access, t.publishers, t.subscribers))
        for t in registry.TEMPLATES
        if t.lossless
    ),
)


class Sink(Protocol):
    """Where the router hands one session's deliveries."""

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
        """Queue the ``count`` events of ``message`` (``data`` encoded), numbered
        from ``first``, for ``sub``, all or none: ``flow.QUEUED``, ``flow.DROPPED``
        (0), or ``flow.HELD`` for a lossless subscription without credit
        (``lossless``: the topic is declared lossless; ``stamp``: the broker's
        id and receive time of the first event)."""
        ...

    def resume(self) -> None:
        """Every flow that held this session as a publisher released it."""
        ...


class RequestSink(Protocol):
    """Where the router hands one session's requests (as a responder) and the
    answers to its own requests (as a requester) [protocol §5, "Request/reply"]."""

    def deliver_request(self, sub: SubscriptionEntry, deliver: frames_pb2.RequestDeliver) -> bool:
        """Queue a request for the responder subscription ``sub``; False if the
        session cannot take it now (closing, or its output is full)."""
        ...

    def deliver_reply(self, reply: frames_pb2.ReplyDeliver) -> None:
        """Queue the answer to one of the session's requests."""
        ...

    def request_failed(self, request_id: int, error: EventBusError) -> None:
        """One of the session's requests ended without a reply (its deadline passed)."""
        ...


class Endpoint:
    """One session as the router sees it: who it is, what it subscribed, its figures."""

    __slots__ = (
        "credit",
        "held_by",
        "identity",
        "invalid_payloads",
        "peer",
        "publish_checks",
        "published",
        "rpc",
        "session_id",
        "sink",
        "subscription_bytes",
        "subscriptions",
    )

    def __init__(
        self,
        sink: Sink,
        *,
        identity: Identity = ANONYMOUS,
        peer: PeerCredentials | None = None,
        session_id: str | None = None,
        rpc: RequestSink | None = None,
    ) -> None:
        self.sink = sink
        #: Where its requests and replies go (None: it takes part in no request).
        self.rpc = rpc
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
        #: Events it published whose payload did not parse (refused).
        self.invalid_payloads = 0
        #: Broker memory its subscriptions are charged (daemoneye_eventbus.budget).
        self.subscription_bytes = 0
        #: The session grants credit (its Hello said so): it may have flows.
        self.credit = False
        #: Flows holding this session as a publisher (see daemoneye_eventbus.flow).
        self.held_by = 0

    @property
    def component(self) -> str:
        """The accepted component, or "" for an anonymous peer."""
        return self.identity.component

    def unhold(self) -> None:
        """A flow released this publisher; its sink resumes it when none holds it."""
        self.held_by -= 1
        if not self.held_by:
            self.sink.resume()

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
    enqueue: Callable[[SubscriptionEntry, Published, bytes, int, int, bool, Stamp], int]
    #: Broker memory the subscription is charged.
    cost: int = 0
    #: Credit-based delivery, for a client that grants credit and a
    #: subscription that asked for lossless delivery or reaches a lossless topic.
    flow: Flow | None = None
    #: A responder subscription: it receives requests, never events.
    respond: bool = False
    sequence: int = 0
    delivered: int = 0
    dropped: int = 0

    def may_receive(self, control: bool, access: TopicAccess) -> bool:
        """Whether events of a topic this subscription's filter matches reach it:
        it wants control topics if the topic is one, and its owner may read it
        (its correlation filter is applied per event)."""
        return (self.wants_control or not control) and may_read(self.endpoint.identity, access)


class SubscriptionTable:
    """Every subscription of one broker, indexed by filter, with its costs.

    Also answers "which subscriptions may receive this topic" through a cache
    that any change of a subscription clears, so every delivery is checked
    against the current subscriptions and their owners' access.
    """

    def __init__(
        self, config: BrokerConfig, audit: AuditLog, count_refusal: Callable[[int], None]
    ) -> None:
        self.config = config
        self.audit = audit
        #: Counts a refusal by its wire error code (the router's tally).
        self._count_refusal = count_refusal
        self._trie: SubscriptionTrie[SubscriptionEntry] = SubscriptionTrie(
            max_bytes=config.max_topic_bytes, max_levels=config.max_topic_levels
        )
        #: Responder subscriptions, apart: they never receive events.
        self._responders: SubscriptionTrie[SubscriptionEntry] = SubscriptionTrie(
            max_bytes=config.max_topic_bytes, max_levels=config.max_topic_levels
        )
        #: Receivers by topic (see :meth:`receivers`); cleared on every change.
        self.route_cache: dict[str, tuple[SubscriptionEntry, ...]] = {}
        #: Responders by request topic (see :meth:`responders`); cleared likewise.
        self.responder_cache: dict[str, tuple[SubscriptionEntry, ...]] = {}
        #: Broker memory all subscriptions are charged.
        self.subscription_bytes = 0

    def _refuse(self, exc: EventBusError) -> NoReturn:
        self._count_refusal(exc.code)
        raise exc

    def subscribe(
        self,
        endpoint: Endpoint,
        subscription_id: int,
        filter: str,
        correlation_filter: CorrelationFilter | None = None,
        include_control: bool = False,
        lossless: bool = False,
        window: int = 0,
        respond: bool = False,
    ) -> SubscriptionEntry:
        """Add a subscription; raise a typed error with the reason if refused.

        ``lossless`` asks for lossless delivery of every event, ``window`` is
        the credit the client offers (0: the broker's ``max_credit_window``).
        ``respond`` makes it a responder subscription: it must reach a request
        topic the peer may read, and gets requests instead of events.
        """
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
        if respond:
            if lossless:
                self._refuse(
                    InvalidTopic(
                        "a responder subscription cannot be lossless (requests have deadlines)",
                        code=ErrorCode.ERROR_CODE_INVALID_FILTER,
                    )
                )
            # Undeclared topics have no reply type: a responder always needs a declared one.
            self._reach(endpoint, filter, REQUEST_TOPICS, "request topic")
        elif not cfg.allow_undeclared_topics:
            self._reach(endpoint, filter, DECLARED_TOPICS, "topic")
        corr_bytes = correlation_filter.ByteSize() if correlation_filter is not None else 0
        cost = subscription_cost(filter, corr_bytes)
        if endpoint.subscription_bytes + cost > cfg.max_subscription_bytes:
            self._refuse(
                LimitExceeded(
                    f"subscriptions of this connection would hold "
                    f"{endpoint.subscription_bytes + cost} bytes of broker memory; "
                    f"the limit is {cfg.max_subscription_bytes}",
                    code=ErrorCode.ERROR_CODE_LIMIT_EXCEEDED,
                )
            )
        if self.subscription_bytes + cost > cfg.max_total_subscription_bytes:
            self._refuse(
                LimitExceeded(
                    "the broker's memory for subscriptions is used up "
                    f"({cfg.max_total_subscription_bytes} bytes)",
                    code=ErrorCode.ERROR_CODE_LIMIT_EXCEEDED,
                )
            )
        matcher = None
        if corr_bytes and correlation_filter is not None:
            try:
                matcher = CorrelationMatcher(correlation_filter)
            except InvalidCorrelation as exc:
                self._refuse(
                    InvalidCorrelation(str(exc), code=ErrorCode.ERROR_CODE_INVALID_CORRELATION)
                )
        # A filter that names the control tree explicitly asks for control topics.
        wants_control = include_control or filter.startswith("control.") or filter == "control"
        flow = None if respond else self._flow(endpoint, filter, lossless, window)
        sub = SubscriptionEntry(
            endpoint, subscription_id, filter, matcher, wants_control, endpoint.sink.enqueue, cost
        )
        sub.flow = flow
        sub.respond = respond
        self._trie_of(sub).insert(filter, sub)
        endpoint.subscriptions[subscription_id] = sub
        endpoint.subscription_bytes += cost
        self.subscription_bytes += cost
        self._changed(sub)
        return sub

    def _reach(
        self,
        endpoint: Endpoint,
        filter: str,
        declared: tuple[tuple[str, TopicAccess], ...],
        what: str,
    ) -> None:
        """Refuse ``filter`` unless it can match a ``declared`` topic the peer may read."""
        identity = endpoint.identity
        reaches, readable = filter_reach(identity, filter, declared)
        if not reaches:
            self._refuse(
                InvalidTopic(
                    f"filter {filter!r} matches no {what} declared in the schema",
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
                    f"filter {filter!r} matches no {what} that "
                    f"{identity.component or 'an anonymous peer'} may read",
                    code=ErrorCode.ERROR_CODE_ACCESS_DENIED,
                )
            )

    def _trie_of(self, sub: SubscriptionEntry) -> SubscriptionTrie[SubscriptionEntry]:
        return self._responders if sub.respond else self._trie

    def _changed(self, sub: SubscriptionEntry) -> None:
        """``sub`` came or went: forget the routes it may change."""
        (self.responder_cache if sub.respond else self.route_cache).clear()

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
        self._trie_of(sub).remove(sub.filter, sub)
        endpoint.subscription_bytes -= sub.cost
        self.subscription_bytes -= sub.cost
        self._changed(sub)
        if sub.flow is not None:
            sub.dropped += sub.flow.discard()

    def _flow(self, endpoint: Endpoint, filter: str, lossless: bool, window: int) -> Flow | None:
        """The flow of a new subscription, None for at-most-once delivery; raises
        if lossless delivery was asked for and cannot be had."""
        identity = endpoint.identity
        if lossless and not endpoint.credit:
            self._refuse(
                LimitExceeded(
                    "lossless delivery needs a client that grants credit (Hello.credit)",
                    code=ErrorCode.ERROR_CODE_LIMIT_EXCEEDED,
                )
            )
        if lossless and not identity.component:
            # Held publishers wait for the subscriber: not for an anonymous one.
            self._refuse(
                AccessDenied(
                    "lossless delivery is for authenticated components, not anonymous peers",
                    code=ErrorCode.ERROR_CODE_ACCESS_DENIED,
                )
            )
        if not lossless:
            if not (endpoint.credit and identity.component and LOSSLESS_TOPICS):
                return None
            if not filter_reach(identity, filter, LOSSLESS_TOPICS)[1]:
                return None  # reaches no lossless topic it may read
        most = self.config.max_credit_window
        return Flow(min(window, most) if window > 0 else most, lossless)

    def detach(self, endpoint: Endpoint) -> None:
        """Drop every subscription of ``endpoint`` (its session has ended)."""
        subs = endpoint.subscriptions
        if not subs:
            return
        for sub in subs.values():
            self._trie_of(sub).remove(sub.filter, sub)
            if sub.flow is not None:
                sub.flow.discard()
        self.subscription_bytes -= endpoint.subscription_bytes
        endpoint.subscription_bytes = 0
        subs.clear()
        self.route_cache.clear()
        self.responder_cache.clear()

    def subscriptions(self) -> Iterator[SubscriptionEntry]:
        """Every subscription, responders included, in no particular order."""
        for _, sub in self._trie.items():
            yield sub
        for _, sub in self._responders.items():
            yield sub

    def __len__(self) -> int:
        """The number of subscriptions, responders included."""
        return len(self._trie) + len(self._responders)

    def receivers(
        self, topic: str, control: bool, access: TopicAccess
    ) -> tuple[SubscriptionEntry, ...]:
        """The subscriptions that match ``topic``, that want control topics if it
        is one, and whose owner may read it (correlation filters not applied)."""
        subs = self.route_cache.get(topic)
        if subs is None:
            subs = tuple(s for s in self._trie.match(topic) if s.may_receive(control, access))
            if len(self.route_cache) >= _ROUTE_CACHE_SIZE:
                self.route_cache.clear()
            self.route_cache[topic] = subs
        return subs

    def responders(self, topic: str, access: TopicAccess) -> tuple[SubscriptionEntry, ...]:
        """The responder subscriptions that match the request topic ``topic`` and
        whose owner may read it (correlation filters not applied), in a stable
        order; cached until a responder subscription changes."""
        subs = self.responder_cache.get(topic)
        if subs is None:
            subs = tuple(
                sorted(
                    (
                        s
                        for s in self._responders.match(topic)
                        if may_read(s.endpoint.identity, access)
                    ),
                    key=_responder_order,
                )
            )
            if len(self.responder_cache) >= _ROUTE_CACHE_SIZE:
                self.responder_cache.clear()
            self.responder_cache[topic] = subs
        return subs


def _responder_order(sub: SubscriptionEntry) -> tuple[str, int]:
    """A stable order of responders, for taking turns."""
    return sub.endpoint.session_id, sub.subscription_id
