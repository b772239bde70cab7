"""The router: which sessions get this publish? Pure code, no event loop.

The router checks each published event or batch (topic declared, publisher
allowed, size, payload type, payloads that parse, correlation metadata) and
asks its :class:`~daemoneye_eventbus.subscriptions.SubscriptionTable` which
subscriptions receive it: those whose filter
matches the topic, that opted in to control topics if it is one, whose owner
may read the topic (access control is checked at subscribe time and again
for every delivery, through a cache cleared whenever a subscription
changes), and whose correlation filter accepts the event's metadata. It then
hands the encoded event to each receiving session's sink, numbered per
subscription.

It keeps the last event of each topic declared ``retained`` in its
:class:`~daemoneye_eventbus.retained.RetainedStore` (bounded; a publish the
store cannot keep is refused), which new subscriptions get first.

It counts as it goes, for the broker's metrics: events published, delivered
and dropped and bytes published per topic label (:meth:`Router.topic_counts`:
a declared topic's name, a template's pattern, or ``"undeclared"``, so as many
labels as the schema has topics), and refusals by wire error code
(:meth:`Router.refusals`).

Sessions, socket or in-process, are :class:`Endpoint` objects to the router:
an identity, the subscriptions it owns, and a :class:`Sink` that queues
deliveries. Every refusal is a typed
:class:`~daemoneye_eventbus.errors.EventBusError` carrying its wire error code
[protocol §7], so a socket session sends ``exc.code`` in an ``Error`` frame and
an in-process caller gets the very same exception.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final, NoReturn

from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage

from daemoneye.eventbus.v1 import frames_pb2, registry
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationFilter, CorrelationMetadata
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode
from daemoneye.eventbus.v1.options_pb2 import AccessLevel
from daemoneye_eventbus.access import (
    AuditLog,
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
    ServerError,
)
from daemoneye_eventbus.flow import HELD
from daemoneye_eventbus.frames import batch_budget, event_budget, request_budget
from daemoneye_eventbus.registry_runtime import RequestTopic
from daemoneye_eventbus.retained import RetainedStore
from daemoneye_eventbus.rpc import RequestRouter
from daemoneye_eventbus.stamps import EventClock
from daemoneye_eventbus.statistics import TopicFigures
from daemoneye_eventbus.subscriptions import (
    Endpoint,
    Published,
    Sink,
    SubscriptionEntry,
    SubscriptionTable,
)
from daemoneye_eventbus.topics import validate_topic

__all__ = [
    "Endpoint",
    "Published",
    "Router",
    "RouterCounts",
    "Sink",
    "SubscriptionEntry",
    "TopicCounts",
    "TopicInfo",
    "UNDECLARED_LABEL",
]

# Topics whose publish permission an endpoint remembers; cleared when full.
_PUBLISH_CHECKS_SIZE: Final = 1024
# A cache miss, distinct from "allowed" (None).
_UNCHECKED: Final = "\0unchecked"
# Topics whose checks are remembered; the cache is cleared when it grows past this.
_TOPIC_CACHE_SIZE: Final = 4096

# Undeclared topics, where the broker allows them, are public.
_UNDECLARED_ACCESS: Final = TopicAccess(AccessLevel.ACCESS_LEVEL_PUBLIC)

#: The topic label of every undeclared topic (allowed by ``allow_undeclared_topics``).
UNDECLARED_LABEL: Final = "undeclared"


class TopicCounts:
    """The router's running counts of one topic label (see :meth:`Router.topic_counts`)."""

    __slots__ = ("delivered", "dropped", "published", "published_bytes")

    def __init__(self) -> None:
        self.published = 0
        self.delivered = 0
        self.dropped = 0
        self.published_bytes = 0

    def snapshot(self) -> TopicFigures:
        return TopicFigures(self.published, self.delivered, self.dropped, self.published_bytes)


class RouterCounts:
    """What a router counts: events and bytes per topic label, refusals per error code.

    A label is a declared topic's name, the pattern of the template a topic
    was built from (``control.collector.task.{type}.{id}``), or
    :data:`UNDECLARED_LABEL`. The hot path increments the label's
    :class:`TopicCounts`, cached in each topic's :class:`TopicInfo`; totals
    are sums over the labels.
    """

    __slots__ = ("labels", "refusals")

    def __init__(self) -> None:
        #: Per topic label; outlives the router's topic cache, which is cleared when full.
        self.labels: dict[str, TopicCounts] = {}
        #: Refusals (publishes, subscribes, unsubscribes) by wire error code.
        self.refusals: dict[int, int] = {}

    def label(self, label: str) -> TopicCounts:
        """The counts of ``label``, made at its first use."""
        counts = self.labels.get(label)
        if counts is None:
            counts = self.labels[label] = TopicCounts()
        return counts

    def refuse(self, code: int) -> None:
        self.refusals[code] = self.refusals.get(code, 0) + 1

    def total(self, name: str) -> int:
        """One field of :class:`TopicCounts` summed over every label."""
        return sum(getattr(counts, name) for counts in self.labels.values())

    def snapshot(self) -> dict[str, TopicFigures]:
        return {label: counts.snapshot() for label, counts in self.labels.items()}


@dataclass(frozen=True, slots=True)
class TopicInfo:
    """What routing needs to know about a published topic, cached per name."""

    payload_type: str | None
    control: bool
    access: TopicAccess
    #: The payload type's class, to check that payloads parse (None for an
    #: undeclared topic: its payloads stay opaque). Each check parses into a
    #: new message: one reused would keep every parse in its arena (upb).
    parser: type[ProtoMessage] | None = None
    #: The counts of the topic's label, shared by every topic of that label.
    counts: TopicCounts = field(default_factory=TopicCounts)
    #: Declared lossless: held, not dropped, for a credit-based subscriber.
    lossless: bool = False
    #: Declared retained: its last event is kept for new subscriptions.
    retained: bool = False
    #: A request topic's reply type (None for any other topic): only requests
    #: may use it, never a plain publish.
    reply: type[ProtoMessage] | None = None


class Router:
    """Subscriptions, access checks and fan-out for one broker.

    ``published``, ``delivered``, ``dropped`` and ``refused`` count events
    (a batch counts once per event) and refusals since the router was made;
    :meth:`topic_counts` and :meth:`refusals` break them down by topic label
    and by error code.
    """

    def __init__(self, config: BrokerConfig, audit: AuditLog | None = None) -> None:
        self.config = config
        #: Structured, rate-limited log of access refusals.
        self.audit = audit or AuditLog()
        #: Events and bytes by topic label, refusals by error code.
        self.counts = RouterCounts()
        #: Who subscribed to what (its refusals count in ``counts``).
        self.table = SubscriptionTable(config, self.audit, self.counts.refuse)
        # The table's cache of receivers by topic, read first on every publish.
        self._receivers = self.table.route_cache
        self._topic_cache: dict[str, TopicInfo] = {}
        self._validate = config.validate_payloads
        self._trust_local = config.trust_local_payloads
        self._event_limit = event_budget(config.max_frame_bytes)
        self._batch_limit = batch_budget(config.max_frame_bytes)
        #: Published events refused because a payload did not parse.
        self.invalid_payloads = 0
        #: The broker's event ids and receive times (one stamp per accepted publish).
        self.clock = EventClock()
        #: Requests waiting for replies, and who answers them.
        self.requests = RequestRouter(self)
        #: The last event of each retained topic, replayed to new subscriptions.
        self.retained = RetainedStore(config)

    def _refuse(self, exc: EventBusError) -> NoReturn:
        self.counts.refuse(exc.code)
        raise exc

    # -- subscriptions (the table's) ----------------------------------------------

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
        """Add a subscription; raise a typed error with the reason if refused (``lossless``,
        ``window`` and ``respond``: see :meth:`SubscriptionTable.subscribe`)."""
        return self.table.subscribe(
            endpoint,
            subscription_id,
            filter,
            correlation_filter,
            include_control,
            lossless,
            window,
            respond,
        )

    def unsubscribe(self, endpoint: Endpoint, subscription_id: int) -> None:
        """Remove a subscription; raise if the endpoint has no such subscription."""
        self.table.unsubscribe(endpoint, subscription_id)

    def detach(self, endpoint: Endpoint) -> None:
        """Drop every subscription and request of ``endpoint`` (its session has ended)."""
        self.table.detach(endpoint)
        self.requests.detach(endpoint)

    def subscriptions(self) -> Iterator[SubscriptionEntry]:
        """Every subscription, in no particular order."""
        return self.table.subscriptions()

    def __len__(self) -> int:
        """The number of subscriptions."""
        return len(self.table)

    @property
    def subscription_bytes(self) -> int:
        """Broker memory all subscriptions are charged."""
        return self.table.subscription_bytes

    @property
    def published(self) -> int:
        """Events accepted."""
        return self.counts.total("published")

    @property
    def delivered(self) -> int:
        """Events subscribers' queues took (one per event and receiving subscription)."""
        return self.counts.total("delivered")

    @property
    def dropped(self) -> int:
        """Events dropped because a subscriber's queue was full."""
        return self.counts.total("dropped")

    @property
    def refused(self) -> int:
        """Requests refused: publishes here, subscribes and unsubscribes in the table."""
        return sum(self.counts.refusals.values())

    def refusals(self) -> dict[int, int]:
        """Requests refused (as :attr:`refused`) by wire ``ErrorCode`` number."""
        return dict(self.counts.refusals)

    def topic_counts(self) -> dict[str, TopicFigures]:
        """Events and bytes by topic label (see :class:`RouterCounts`), for labels seen so far."""
        return self.counts.snapshot()

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
            counts = self.counts.label(declared.template or declared.name)
            info = TopicInfo(
                declared.payload_name,
                declared.control,
                access,
                declared.payload_type,
                counts,
                declared.lossless,
                declared.retained,
                declared.reply_type if isinstance(declared, RequestTopic) else None,
            )
        elif cfg.allow_undeclared_topics:
            info = TopicInfo(
                None, False, _UNDECLARED_ACCESS, None, self.counts.label(UNDECLARED_LABEL)
            )
        else:
            self._refuse(
                InvalidTopic(
                    f"topic {topic!r} is not declared in the schema",
                    code=ErrorCode.ERROR_CODE_INVALID_TOPIC,
                )
            )
        if len(self._topic_cache) >= _TOPIC_CACHE_SIZE:
            self._topic_cache.clear()
        self._topic_cache[topic] = info
        return info

    def route(self, endpoint: Endpoint, message: Published) -> int:
        """Check and route one published event or batch; return how many
        events queues took (or hold: a lossless subscriber without credit
        holds them and ``endpoint`` with them, see :mod:`~daemoneye_eventbus.flow`).

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
        topic = message.topic
        info = self._topic_cache.get(topic) or self.topic_info(topic)
        size = len(data)
        subs = self._accept(endpoint, message, topic, info, correlation, size, limit, count)
        counts = info.counts
        counts.published += count
        counts.published_bytes += size
        lossless = info.lossless
        stamp = self.clock.stamp(count)
        if info.retained:
            self.retained.keep(topic, message, data, stamp, info)
        taken = 0
        for sub in subs:
            if sub.matcher is not None and not sub.matcher.matches(correlation):
                continue
            first = sub.sequence + 1
            sub.sequence += count
            queued = sub.enqueue(sub, message, data, first, count, lossless, stamp)
            if queued:
                sub.delivered += count
                taken += count
                if queued == HELD and sub.flow is not None:
                    sub.flow.wait(endpoint)  # the publisher waits for this subscriber
            else:
                sub.dropped += count
                counts.dropped += count
        counts.delivered += taken
        return taken

    def _accept(
        self,
        endpoint: Endpoint,
        message: Published,
        topic: str,
        info: TopicInfo,
        correlation: CorrelationMetadata | None,
        size: int,
        limit: int,
        count: int,
    ) -> tuple[SubscriptionEntry, ...]:
        """Check the ``count`` events of ``message`` (``size`` bytes encoded) on
        ``topic`` (``info``: what the schema says of it).

        Returns the subscriptions that may receive them (correlation filters
        not yet applied); raises a typed error when they are refused.
        """
        _check(self, endpoint, message, topic, info, correlation, size, limit, count)
        if info.retained and (full := self.retained.refusal(topic, message, size)) is not None:
            self._refuse(full)  # refused whole: the store cannot keep its (last) event
        endpoint.published += count
        subs = self._receivers.get(topic)
        if subs is None:
            # Cached until a subscription changes, so every delivery is checked.
            subs = self.table.receivers(topic, info.control, info.access)
        return subs

    def check_request(self, endpoint: Endpoint, publish: frames_pb2.Publish) -> TopicInfo:
        """Check the ``Publish`` of ``endpoint``'s request as a publish on a
        request topic (unknown fields discarded); what the schema says of its
        topic. Raises the typed refusal [protocol §5, "Request/reply"]."""
        publish.DiscardUnknownFields()
        topic = publish.topic
        info = self._topic_cache.get(topic) or self.topic_info(topic)
        correlation = publish.correlation if publish.HasField("correlation") else None
        size = publish.ByteSize()
        limit = request_budget(self.config.max_frame_bytes)
        _check(self, endpoint, publish, topic, info, correlation, size, limit, 1, request=True)
        return info


def _check(
    router: Router,
    endpoint: Endpoint,
    message: Published,
    topic: str,
    info: TopicInfo,
    correlation: CorrelationMetadata | None,
    size: int,
    limit: int,
    count: int,
    request: bool = False,
) -> None:
    """The checks of a publish [protocol §5] (of a request's publish with
    ``request``): raises the typed refusal, counted."""
    if (info.reply is not None) != request:
        why = "is a request topic: send a Request" if request is False else "is not a request topic"
        router._refuse(
            InvalidTopic(f"topic {topic!r} {why}", code=ErrorCode.ERROR_CODE_INVALID_TOPIC)
        )
    payload_type = message.payload_type
    checks = endpoint.publish_checks
    denied = checks.get(topic, _UNCHECKED)
    if denied is _UNCHECKED:
        # The identity is fixed at the handshake: remember the verdict per topic.
        denied = may_publish(endpoint.identity, info.access)
        if len(checks) >= _PUBLISH_CHECKS_SIZE:
            checks.clear()
        checks[topic] = denied
    if denied is not None:
        router.audit.record(
            "publish_refused",
            endpoint.peer,
            session=endpoint.session_id,
            component=endpoint.identity.component or "-",
            topic=topic,
            reason=denied,
        )
        router._refuse(
            AccessDenied(f"publish on {topic!r}: {denied}", code=ErrorCode.ERROR_CODE_ACCESS_DENIED)
        )
    if size > limit:
        what = f"event of {size} bytes" if count == 1 else f"batch of {count} events"
        router._refuse(
            LimitExceeded(
                f"{what} cannot be delivered within the frame limit; "
                f"an encoded event or batch may be at most {limit} bytes, this is {size}",
                code=ErrorCode.ERROR_CODE_FRAME_TOO_LARGE,
            )
        )
    if info.payload_type is not None and payload_type != info.payload_type:
        router._refuse(
            PayloadTypeMismatch(
                f"topic {topic!r} carries {info.payload_type}, not {payload_type!r}",
                code=ErrorCode.ERROR_CODE_PAYLOAD_MISMATCH,
            )
        )
    parser = info.parser
    if (
        parser is not None
        and router._validate
        and not (router._trust_local and endpoint.identity.trusted)
    ):
        try:
            if isinstance(message, frames_pb2.Publish):
                parser.FromString(message.payload)
            else:
                parse = parser.FromString
                for payload in message.payloads:
                    parse(payload)
        except (DecodeError, RecursionError):
            router._refuse(_invalid_payload(router, endpoint, parser, topic, payload_type, message))
    if correlation is not None:
        try:
            validate_metadata(correlation)
        except InvalidCorrelation as exc:
            router._refuse(
                InvalidCorrelation(str(exc), code=ErrorCode.ERROR_CODE_INVALID_CORRELATION)
            )


def _invalid_payload(
    router: Router,
    endpoint: Endpoint,
    parser: type[ProtoMessage],
    topic: str,
    payload_type: str,
    message: Published,
) -> InvalidPayload:
    """The refusal of an event or batch whose payloads do not all parse as
    ``parser``'s type, counted (``invalid_payloads``) and audited.

    A batch with one bad payload is refused whole, like any other refusal
    of a batch: its good events are not delivered either [protocol §5].
    """
    payloads = (message.payload,) if isinstance(message, frames_pb2.Publish) else message.payloads
    count = len(payloads)
    parse = parser.FromString
    for index, payload in enumerate(payloads):
        try:
            parse(payload)
        except (DecodeError, RecursionError) as exc:
            where = "payload" if count == 1 else f"payload {index} of the batch"
            reason = f"{where} does not parse as {payload_type}: {exc}"
            break
    else:  # pragma: no cover - called only after a payload failed to parse
        reason = "a payload does not parse"
    endpoint.invalid_payloads += count
    router.invalid_payloads += count
    router.audit.record(
        "payload_refused",
        endpoint.peer,
        session=endpoint.session_id,
        component=endpoint.identity.component or "-",
        topic=topic,
        reason=reason,
    )
    return InvalidPayload(
        f"publish on {topic!r}: {reason}",
        topic=topic,
        payload_type=payload_type,
        code=ErrorCode.ERROR_CODE_INVALID_PAYLOAD,
    )
