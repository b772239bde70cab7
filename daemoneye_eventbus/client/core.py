"""The client: connection lifecycle and reconnect, what it receives, its API.

Publishing goes through the :class:`~daemoneye_eventbus.client.writer.PublishWriter`,
answers to requests through
:class:`~daemoneye_eventbus.client.requests.PendingRequests`, events to
:class:`~daemoneye_eventbus.subscription.Subscription` queues, request/reply
through :class:`~daemoneye_eventbus.client.rpc.ClientRpc`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from google.protobuf.message import Message

from daemoneye.eventbus.v1 import frames_pb2
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationFilter, CorrelationMetadata
from daemoneye.eventbus.v1.frames_pb2 import Frame
from daemoneye_eventbus.client.connection import ClientConnection
from daemoneye_eventbus.client.requests import RequestKey, RequestKind
from daemoneye_eventbus.client.rpc import ClientRpc
from daemoneye_eventbus.delivery import EventQueue
from daemoneye_eventbus.errors import EventBusError, LimitExceeded
from daemoneye_eventbus.registry_runtime import Publication, Topic
from daemoneye_eventbus.responders import RequestReply
from daemoneye_eventbus.subscription import Subscription, subscription_target
from daemoneye_eventbus.topics import (
    DEFAULT_MAX_TOPIC_BYTES,
    DEFAULT_MAX_TOPIC_LEVELS,
    validate_topic,
    validate_topic_filter,
)
from daemoneye_eventbus.transports import DEFAULT_ADDRESS

__all__ = ["Client", "ClientStatistics", "connect"]

log = logging.getLogger("daemoneye_eventbus.client")

P = TypeVar("P", bound=Message)
#: What a topic's call takes: the message, and the correlation by keyword.
A = ParamSpec("A")

_SUBSCRIBE = RequestKind.SUBSCRIBE
_UNSUBSCRIBE = RequestKind.UNSUBSCRIBE


@dataclass(frozen=True, slots=True)
class ClientStatistics:
    """A snapshot of a client's figures."""

    published: int
    received: int
    #: Events dropped by this client because a subscription's queue was full.
    dropped: int
    #: Events the broker dropped, as seen from sequence gaps.
    missed: int
    #: Requests the broker refused (non-fatal ``Error`` frames).
    refused: int
    subscriptions: int
    reconnects: int


class Client(ClientConnection, RequestReply[ClientRpc]):
    """A connection to a broker.

    Not re-entrant: one ``async with`` at a time. With ``reconnect=True`` the
    client reconnects after the broker goes away (with back-off) and
    subscribes again (responders too); events published while disconnected
    raise :class:`ConnectionClosed`. ``request()`` and ``serve()`` are
    request/reply (:class:`~daemoneye_eventbus.responders.RequestReply`).
    ``last_will=topic(message, correlation=…)``: an event the broker publishes
    for this client when a connection ends without a goodbye (the process
    died, or went silent); :meth:`close` says goodbye.
    """

    # -- publishing ---------------------------------------------------------------

    def _publish_nowait(
        self, topic: Topic[P], message: P, /, *, correlation: CorrelationMetadata | None = None
    ) -> None:
        """Queue one event without waiting.

        Raises :class:`LimitExceeded` when more than ``max_buffer_bytes`` wait
        to be written (the broker is not reading fast enough).
        """
        self._check_open()
        if self._writer.waiting_bytes > self.max_buffer_bytes:
            raise LimitExceeded(f"more than {self.max_buffer_bytes} bytes wait to be written")
        self._writer.queue_publish(topic, message, correlation)

    async def _publish(
        self, topic: Topic[P], message: P, /, *, correlation: CorrelationMetadata | None = None
    ) -> None:
        """Publish one event, waiting only while the socket is backed up.

        Delivery is at most once: there is no acknowledgement. A refusal by the
        broker (say, access denied) arrives later as a non-fatal error, counted
        in :meth:`statistics` and passed to :attr:`on_error`; :meth:`flush`
        waits until the broker has handled everything published before it.
        """
        pump = self._publishing()
        if pump.paused:
            await pump.drain()
            self._check_open()
        self._writer.queue_publish(topic, message, correlation)

    # mypy checks a call against the signatures below, run time calls the methods
    # above (the same arguments: the message positional, correlation by keyword).
    # The message's type comes from the topic alone, so that a wrong one is
    # reported as "Argument 2 ... has incompatible type "NetworkEvent"; expected
    # "ProcessEvent"" rather than as a type parameter that cannot be inferred.
    if TYPE_CHECKING:

        def publish_nowait(
            self, topic: Callable[A, Publication[Any]], /, *args: A.args, **kwargs: A.kwargs
        ) -> None:
            """``publish_nowait(topic, message, *, correlation=None)``.

            See :meth:`_publish_nowait`, which run time calls.
            """

        async def publish(
            self, topic: Callable[A, Publication[Any]], /, *args: A.args, **kwargs: A.kwargs
        ) -> None:
            """``publish(topic, message, *, correlation=None)``.

            See :meth:`_publish`, which run time calls.
            """

    else:
        publish_nowait = _publish_nowait
        publish = _publish

    async def publish_raw(
        self,
        topic: str,
        payload_type: str,
        payload: bytes,
        *,
        correlation: CorrelationMetadata | None = None,
    ) -> None:
        """Publish an already serialized payload on a topic given by name (untyped).

        It travels like :meth:`publish`'s events; the broker checks the topic,
        the payload type and the access rules all the same.
        """
        key = (topic, payload_type)
        header = self._writer.cached_header(key)
        if header is None:
            validate_topic(topic)
            header = self._writer.header(key, topic, payload_type)
        pump = self._publishing()
        if pump.paused:
            await pump.drain()
            self._check_open()
        self._writer.queue_encoded(header, payload, correlation)

    # -- requests -----------------------------------------------------------------

    async def _request(self, key: RequestKey, frame: Frame) -> Any:
        return await self._rpc.ask(key, frame)

    @overload
    async def subscribe(
        self,
        filter: Topic[P],
        *,
        correlation_filter: CorrelationFilter | None = None,
        include_control: bool = False,
        max_pending: int | None = None,
        queue: EventQueue[P] | None = None,
        lossless: bool = False,
        window: int | None = None,
    ) -> Subscription[P]: ...

    @overload
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

    async def subscribe(
        self,
        filter: Topic[Any] | str,
        *,
        correlation_filter: CorrelationFilter | None = None,
        include_control: bool = False,
        max_pending: int | None = None,
        queue: EventQueue[Any] | None = None,
        lossless: bool = False,
        window: int | None = None,
    ) -> Subscription[Any]:
        """Subscribe to a topic or a filter with ``+`` / ``#`` wildcards.

        With a :class:`Topic`, events decode to its payload type. A
        ``correlation_filter`` is applied by the broker, so events it rejects
        never cross the socket. Control topics reach a wildcard filter only
        with ``include_control=True``.

        ``lossless=True`` asks for lossless delivery: when the application
        reads slower than events come, the broker holds their publishers
        (their ``publish`` waits) instead of dropping events, and disconnects
        this client as a slow consumer only if it reads nothing for the
        broker's ``slow_consumer_timeout``. ``window`` is how many events may
        be on their way beyond what was read (default: the queue's size).
        Subscriptions reaching a topic the schema declares lossless get the
        same for that topic's events without asking.
        """
        text, cls = subscription_target(filter)
        validate_topic_filter(
            text,
            max_bytes=self.limits.max_topic_bytes or DEFAULT_MAX_TOPIC_BYTES,
            max_levels=self.limits.max_topic_levels or DEFAULT_MAX_TOPIC_LEVELS,
        )
        sub: Subscription[Any] = Subscription(
            self,
            next(self._ids),
            text,
            correlation_filter,
            include_control,
            cls,
            queue if queue is not None else self.new_queue(max_pending),
            lossless,
            window or 0,
        )
        self._subs[sub.subscription_id] = sub
        try:
            await self._request_subscribe(sub)
        except BaseException:
            self._subs.pop(sub.subscription_id, None)
            raise
        return sub

    def new_queue(self, max_pending: int | None = None) -> EventQueue[Any]:
        """An empty event queue of ``max_pending`` events (the client's default if None)."""
        return EventQueue(max_pending or self.max_pending)

    async def _resubscribe(self) -> None:
        """Make every subscription (responders included) again on a new connection."""
        for sub in list(self._subs.values()):
            sub.queue.restart_sequence(sub.subscription_id)
            try:
                await self._request_subscribe(sub)
            except EventBusError as exc:
                self._subs.pop(sub.subscription_id, None)
                sub.end(exc)
        await self._rpc.resubscribe()

    async def _request_subscribe(self, sub: Subscription[Any]) -> None:
        req = frames_pb2.Subscribe(
            subscription_id=sub.subscription_id,
            filter=sub.filter,
            include_control=sub.include_control,
            lossless=sub.lossless,
            window=sub.requested_window or sub.queue.max_messages,
        )
        if sub.correlation_filter is not None:
            req.correlation_filter.CopyFrom(sub.correlation_filter)
        ack: frames_pb2.SubscribeAck = await self._request(
            RequestKey(_SUBSCRIBE, sub.subscription_id), Frame(subscribe=req)
        )
        # A new session numbers and credits the subscription afresh.
        sub.credit_based(ack.window, ack.lossless or sub.lossless, self._credits)

    async def unsubscribe(self, sub: Subscription[Any]) -> None:
        """End a subscription; events still queued for it are kept for reading."""
        if self._subs.pop(sub.subscription_id, None) is None:
            sub.end(None)
            return
        sub.end(None)
        self._credits.forget(sub.subscription_id)
        if self.is_connected:
            frame = Frame(unsubscribe=frames_pb2.Unsubscribe(subscription_id=sub.subscription_id))
            await self._request(RequestKey(_UNSUBSCRIBE, sub.subscription_id), frame)

    async def flush(self) -> float:
        """Round trip to the broker: when it returns, everything sent before was handled.

        Returns the round-trip time in seconds.
        """
        loop = asyncio.get_running_loop()
        nonce = next(self._nonces)
        start = loop.time()
        ping = Frame(ping=frames_pb2.Ping(nonce=nonce))
        await self._request(RequestKey(RequestKind.PING, nonce), ping)
        return loop.time() - start

    ping = flush

    async def broker_statistics(self) -> frames_pb2.StatsResponse:
        """The broker's statistics."""
        rid = next(self._nonces)
        stats: frames_pb2.StatsResponse = await self._request(
            RequestKey(RequestKind.STATS, rid),
            Frame(stats_request=frames_pb2.StatsRequest(request_id=rid)),
        )
        return stats

    def statistics(self) -> ClientStatistics:
        """A frozen snapshot of this client's figures."""
        subs = list(self._subs.values())
        queues = {id(s.queue): s.queue for s in subs}.values()
        return ClientStatistics(
            published=self._writer.published,
            received=sum(q.received for q in queues),
            dropped=sum(q.dropped for q in queues),
            missed=sum(q.missed for q in queues),
            refused=self._refused,
            subscriptions=len(subs),
            reconnects=self._reconnects,
        )


async def connect(path: str = DEFAULT_ADDRESS, **kwargs: Any) -> Client:
    """Connect to the broker at ``path``; use the result as an async context manager."""
    client = Client(path, **kwargs)
    await client.connect()
    return client
