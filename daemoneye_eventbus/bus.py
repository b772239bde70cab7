"""The reference API, in Python form.

Users of the Rust crate this project follows know these names::

    broker = await DaemoneyeBroker.new("/tmp/daemoneye.sock")
    event_bus = await DaemoneyeEventBus.from_broker(broker)
    await event_bus.publish(
        CollectionEvent(process=ProcessEvent(pid=1234, name="example_process")),
        "correlation-123",
    )

:class:`EventBus` is the protocol; :class:`DaemoneyeEventBus` implements it
twice: in process, on the agent's own broker (``from_broker``: no socket), and
over the socket from any other process (``connect``). Both route through the
same broker code, with correlation filters applied by the broker and control
topics delivered only to subscriptions that opt in. Either also asks and
answers requests (``request``, ``serve``: docs/protocol.md §5, "Request/reply").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, Final, ParamSpec, Protocol, Self, TypeVar, runtime_checkable

from google.protobuf.message import Message

from daemoneye.eventbus.v1 import registry
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationFilter, CorrelationMetadata
from daemoneye.eventbus.v1.events_pb2 import CollectionEvent
from daemoneye_eventbus.broker import Broker, BrokerConfig, BrokerStatistics
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.correlation import new_correlation
from daemoneye_eventbus.delivery import EventQueue, ReceivedEvent, utc_datetime
from daemoneye_eventbus.errors import (
    ClosedResourceError,
    InvalidPayload,
    SchemaError,
    SubscriptionExists,
    UnknownSubscription,
)
from daemoneye_eventbus.registry_runtime import (
    Publication,
    RequestTopic,
    RequestTopicTemplate,
    Topic,
)
from daemoneye_eventbus.responders import Responder
from daemoneye_eventbus.sessions import LocalSession
from daemoneye_eventbus.subscription import Subscription
from daemoneye_eventbus.transports import DEFAULT_ADDRESS

__all__ = [
    "DEFAULT_EVENT_PATTERNS",
    "BusEvent",
    "DaemoneyeBroker",
    "DaemoneyeEventBus",
    "EventBus",
    "EventBusStatistics",
    "EventReceiver",
    "EventSubscription",
    "topic_for_event",
]

log = logging.getLogger("daemoneye_eventbus.bus")

#: What a subscription without topic patterns listens to: every event topic.
DEFAULT_EVENT_PATTERNS: Final = ("events.#",)


# CollectionEvent's oneof field for each payload type, to rebuild it on receipt.
_EVENT_FIELDS: Final[dict[str, str]] = {
    f.message_type.full_name: f.name
    for f in CollectionEvent.DESCRIPTOR.oneofs_by_name["event"].fields
    if f.message_type is not None
}


def topic_for_event(event: CollectionEvent) -> tuple[Topic[Any], Message]:
    """The topic an event is published on, and the payload to publish.

    Process events go to the topic the schema names for their ``kind`` (the
    ``event_topic`` option of ``ProcessEventKind``); every other event type has
    exactly one topic in the registry.
    """
    which = event.WhichOneof("event")
    if which is None:
        raise ValueError("CollectionEvent holds no event")
    payload: Message = getattr(event, which)
    if which == "process":
        # The schema names the topic of each kind (the event_topic option);
        # a kind this build does not know goes to the lifecycle topic.
        topic = registry.PROCESS_EVENT_KIND_TOPICS.get(
            event.process.kind, registry.EVENTS_PROCESS_LIFECYCLE
        )
        return topic, payload
    topics = registry.topics_for_payload(type(payload))
    if len(topics) != 1:
        raise SchemaError(
            f"{type(payload).DESCRIPTOR.full_name} has {len(topics)} topics in the registry, "
            "expected exactly one"
        )
    return topics[0], payload


@dataclass(frozen=True, slots=True)
class EventSubscription:
    """What a subscriber wants to receive."""

    subscriber_id: str
    #: Topic filters with ``+`` / ``#``; empty means every event topic.
    topic_patterns: Sequence[str] = ()
    #: Only events whose correlation metadata matches (applied by the broker).
    correlation_filter: CorrelationFilter | None = None
    #: Deliver control topics that the patterns match through a wildcard.
    include_control: bool = False
    #: Called with each event skipped because its payload does not decode
    #: (logged when None); the receiver goes on with the next event.
    on_invalid: Callable[[InvalidPayload], None] | None = None
    #: Lossless delivery: when the receiver falls behind, the broker holds the
    #: publishers instead of dropping (docs/protocol.md §5, "Lossless delivery";
    #: for an authenticated component over a socket, always in process).
    lossless: bool = False


@dataclass(frozen=True, slots=True)
class BusEvent:
    """An event as a subscriber of the :class:`EventBus` sees it."""

    topic: str
    #: The event as a CollectionEvent, or None for a control message.
    event: CollectionEvent | None
    #: The payload message itself (ProcessEvent, Heartbeat, ...).
    message: Message
    correlation: CorrelationMetadata | None
    sequence: int
    subscriber_id: str
    #: The broker's id of the event (see :attr:`ReceivedEvent.event_id`).
    event_id: int = 0
    #: When the broker accepted it, in nanoseconds since the Unix epoch.
    received_at_ns: int = 0
    #: The topic's retained event, delivered first to the new subscription.
    retained: bool = False

    @property
    def received_at(self) -> datetime:
        """When the broker accepted the event (UTC)."""
        return utc_datetime(self.received_at_ns)


@dataclass(frozen=True, slots=True)
class EventBusStatistics:
    """A snapshot of the bus's figures as one subscriber side sees them."""

    published: int
    received: int
    dropped: int
    subscribers: int
    broker: BrokerStatistics | None = None


class EventReceiver:
    """The events of one :class:`EventSubscription`: an async iterator.

    An event whose payload does not decode (possible only behind a broker
    with payload validation off) never ends the iteration: it is counted in
    :attr:`invalid`, passed as an :class:`InvalidPayload` to the
    subscription's ``on_invalid`` (or logged when there is none), and the
    receiver goes on with the next event.
    """

    def __init__(
        self,
        subscriber_id: str,
        queue: EventQueue[Message],
        on_invalid: Callable[[InvalidPayload], None] | None = None,
    ) -> None:
        self.subscriber_id = subscriber_id
        self.queue = queue
        self.on_invalid = on_invalid
        #: Events skipped because their payload did not decode.
        self.invalid = 0

    def _convert(self, received: ReceivedEvent[Message]) -> BusEvent | None:
        try:
            message = received.message()
        except InvalidPayload as exc:
            self.invalid += 1
            if self.on_invalid is not None:
                self.on_invalid(exc)
            else:
                log.warning("subscriber %s skipped an event: %s", self.subscriber_id, exc)
            return None
        field_name = _EVENT_FIELDS.get(received.payload_type)
        event = None
        if field_name is not None and not received.topic.startswith("control."):
            event = CollectionEvent()
            getattr(event, field_name).CopyFrom(message)
        return BusEvent(
            received.topic,
            event,
            message,
            received.correlation,
            received.sequence,
            self.subscriber_id,
            received.event_id,
            received.received_at_ns,
            received.retained,
        )

    async def recv(self, timeout: float | None = None) -> BusEvent:
        """The next event that decodes; raises :class:`ClosedResourceError` once
        unsubscribed, :class:`RequestTimeout` when ``timeout`` seconds pass."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - loop.time())
            event = self._convert(await self.queue.get(left))
            if event is not None:
                return event

    def __aiter__(self) -> AsyncIterator[BusEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[BusEvent]:
        async for received in self.queue:
            event = self._convert(received)
            if event is not None:
                yield event

    @property
    def dropped(self) -> int:
        return self.queue.dropped


@runtime_checkable
class EventBus(Protocol):
    """What every event bus offers, in process or over the socket."""

    async def publish(
        self, event: CollectionEvent, correlation: str | CorrelationMetadata | None = None
    ) -> None:
        """Publish an event on the topic its type and kind call for."""

    async def subscribe(self, subscription: EventSubscription) -> EventReceiver:
        """Start receiving what ``subscription`` asks for."""

    async def unsubscribe(self, subscriber_id: str) -> None:
        """Stop a subscriber; its receiver ends."""

    async def statistics(self) -> EventBusStatistics:
        """A snapshot of the figures."""

    async def shutdown(self) -> None:
        """Stop every subscriber and release the bus."""


def _correlation(value: str | CorrelationMetadata | None) -> CorrelationMetadata | None:
    if value is None or isinstance(value, CorrelationMetadata):
        return value
    return new_correlation(value)


class DaemoneyeBroker:
    """A running broker, as the reference API names it."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    @classmethod
    async def new(
        cls, path: str = DEFAULT_ADDRESS, config: BrokerConfig | None = None
    ) -> DaemoneyeBroker:
        """Start a broker listening on ``path``."""
        broker = Broker(path, config)
        await broker.start()
        return cls(broker)

    @property
    def path(self) -> str:
        return self.broker.path

    def statistics(self) -> BrokerStatistics:
        return self.broker.statistics()

    async def shutdown(self) -> None:
        """Graceful shutdown: goodbye, drain, close, remove the socket."""
        await self.broker.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()


#: What a topic's call takes (Topic.__call__): the message, the correlation by keyword.
A = ParamSpec("A")
#: A request topic's request and reply types.
P = TypeVar("P", bound=Message)
R = TypeVar("R", bound=Message)


class _Backend(Protocol):
    """What the bus needs of a connection: a :class:`Client` or a :class:`LocalSession`."""

    async def publish(
        self, topic: Callable[A, Publication[Any]], /, *args: A.args, **kwargs: A.kwargs
    ) -> None: ...

    async def subscribe(
        self,
        filter: str,
        *,
        correlation_filter: CorrelationFilter | None = None,
        include_control: bool = False,
        max_pending: int | None = None,
        queue: EventQueue[Message] | None = None,
        lossless: bool = False,
        window: int | None = None,
    ) -> Subscription[Message]: ...

    def new_queue(self, max_pending: int | None = None) -> EventQueue[Any]: ...

    async def request(
        self,
        topic: RequestTopic[P, R],
        message: P,
        /,
        *,
        timeout: float | None = None,
        correlation: CorrelationMetadata | None = None,
    ) -> R: ...

    def serve(
        self,
        topic: RequestTopic[P, R] | RequestTopicTemplate[P, R],
        *,
        max_pending: int | None = None,
    ) -> Responder[P, R]: ...

    async def flush(self) -> float: ...

    async def close(self) -> None: ...


@dataclass
class _Subscriber:
    receiver: EventReceiver
    subscriptions: list[Subscription[Message]] = field(default_factory=list)


class DaemoneyeEventBus:
    """The :class:`EventBus`, in process (``from_broker``) or over the socket (``connect``).

    Either way it holds one backend with the same shape, a
    :class:`~daemoneye_eventbus.sessions.LocalSession` on the agent's own
    broker or a :class:`Client`, and treats both alike.
    """

    def __init__(
        self,
        *,
        local: LocalSession | None = None,
        client: Client | None = None,
        broker: Broker | None = None,
    ) -> None:
        backend: _Backend | None = local if local is not None else client
        if backend is None or (local is not None and client is not None):
            raise ValueError("give exactly one of local= or client=")
        self._backend = backend
        #: The embedded broker, for its statistics (in process only).
        self._broker = broker
        self._subscribers: dict[str, _Subscriber] = {}
        self._published = 0
        self._closed = False

    @classmethod
    async def from_broker(
        cls, broker: DaemoneyeBroker | Broker, *, name: str = "daemoneye-agent"
    ) -> DaemoneyeEventBus:
        """An in-process bus on the agent's own broker: no socket involved."""
        inner = broker.broker if isinstance(broker, DaemoneyeBroker) else broker
        return cls(local=inner.local_session(name=name, component=name), broker=inner)

    @classmethod
    async def connect(cls, path: str = DEFAULT_ADDRESS, **kwargs: Any) -> DaemoneyeEventBus:
        """A bus over the broker's socket, for another process. ``kwargs`` go to :class:`Client`."""
        client = Client(path, **kwargs)
        await client.connect()
        return cls(client=client)

    def _check(self) -> None:
        if self._closed:
            raise ClosedResourceError("event bus is shut down")

    async def publish(
        self, event: CollectionEvent, correlation: str | CorrelationMetadata | None = None
    ) -> None:
        """Publish an event; a string correlation becomes a new correlation with that id."""
        topic, payload = topic_for_event(event)
        await self.publish_to(topic, payload, correlation)

    async def publish_to(
        self,
        topic: Topic[Any],
        message: Message,
        correlation: str | CorrelationMetadata | None = None,
    ) -> None:
        """Publish any message (a control message, say) on an explicit topic."""
        self._check()
        await self._backend.publish(topic, message, correlation=_correlation(correlation))
        self._published += 1

    async def request(
        self,
        topic: RequestTopic[P, R],
        message: P,
        *,
        timeout: float | None = None,
        correlation: str | CorrelationMetadata | None = None,
    ) -> R:
        """Ask one responder of the request topic ``topic`` and return its typed
        reply (a string correlation becomes a new correlation with that id).

        Raises :class:`~daemoneye_eventbus.errors.RequestTimeout` past ``timeout``
        seconds (the broker's default if None), ``NoResponders`` at once when
        nobody may answer, ``RequestFailed`` when the responder could not.
        """
        self._check()
        return await self._backend.request(
            topic, message, timeout=timeout, correlation=_correlation(correlation)
        )

    def serve(
        self,
        topic: RequestTopic[P, R] | RequestTopicTemplate[P, R],
        *,
        max_pending: int | None = None,
    ) -> Responder[P, R]:
        """Answer the requests on ``topic`` (or on every topic of a template):
        ``async with bus.serve(topic) as requests: async for request in requests:
        await request.reply(answer)``."""
        self._check()
        return self._backend.serve(topic, max_pending=max_pending)

    async def flush(self) -> None:
        """Return once the broker has routed everything published before."""
        self._check()
        await self._backend.flush()

    async def subscribe(self, subscription: EventSubscription) -> EventReceiver:
        """Subscribe to every pattern of ``subscription``; one receiver gets them all."""
        self._check()
        if subscription.subscriber_id in self._subscribers:
            raise SubscriptionExists(
                f"subscriber {subscription.subscriber_id!r} is already subscribed"
            )
        patterns = list(subscription.topic_patterns) or list(DEFAULT_EVENT_PATTERNS)
        queue: EventQueue[Message] = self._backend.new_queue()
        subs: list[Subscription[Message]] = []
        try:
            for pattern in patterns:
                subs.append(
                    await self._backend.subscribe(
                        pattern,
                        correlation_filter=subscription.correlation_filter,
                        include_control=subscription.include_control,
                        queue=queue,
                        lossless=subscription.lossless,
                    )
                )
        except BaseException:
            await _release(subs)
            raise
        receiver = EventReceiver(subscription.subscriber_id, queue, subscription.on_invalid)
        self._subscribers[subscription.subscriber_id] = _Subscriber(receiver, subs)
        return receiver

    async def unsubscribe(self, subscriber_id: str) -> None:
        """Stop a subscriber; its receiver ends after the events already queued."""
        sub = self._subscribers.pop(subscriber_id, None)
        if sub is None:
            raise UnknownSubscription(f"no subscriber {subscriber_id!r}")
        await _release(sub.subscriptions)
        sub.receiver.queue.close()

    async def statistics(self) -> EventBusStatistics:
        """Figures of this bus; in process, the broker's snapshot too."""
        queues = [s.receiver.queue for s in self._subscribers.values()]
        return EventBusStatistics(
            published=self._published,
            received=sum(q.received for q in queues),
            dropped=sum(q.dropped for q in queues),
            subscribers=len(self._subscribers),
            broker=self._broker.statistics() if self._broker is not None else None,
        )

    async def shutdown(self) -> None:
        """Unsubscribe everyone and release the session or the connection."""
        if self._closed:
            return
        for subscriber_id in list(self._subscribers):
            with contextlib.suppress(ClosedResourceError):
                await self.unsubscribe(subscriber_id)
        self._closed = True
        await self._backend.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()


async def _release(subs: list[Subscription[Message]]) -> None:
    for sub in subs:
        with contextlib.suppress(ClosedResourceError):
            await sub.unsubscribe()
