"""The in-process session: the agent's own code on its embedded broker.

:class:`LocalSession` publishes and subscribes without a socket, through the
same router as socket sessions and within the same queue bounds. It offers
the socket client's shape (``publish``, ``publish_nowait``, ``publish_raw``,
``subscribe`` returning a :class:`~daemoneye_eventbus.subscription.Subscription`,
``unsubscribe``, ``close``), so code written against one runs on the other;
the difference is that a refusal is raised at once, as the typed error the
router raised, instead of arriving later from the broker. ``request()`` and
``serve()`` are request/reply, through its
:class:`~daemoneye_eventbus.sessions.local_rpc.LocalRpc`.

Lossless subscriptions work in process too: the queue's reads grant credit
straight to the session's flows, and an in-process publisher held by a
lossless subscriber waits in ``publish`` until it is released.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from google.protobuf.message import Message

from daemoneye.eventbus.v1 import frames_pb2
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationFilter, CorrelationMetadata
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode
from daemoneye_eventbus.access import Identity, PeerCredentials
from daemoneye_eventbus.delivery import Credits, EventQueue
from daemoneye_eventbus.errors import ClosedResourceError, LimitExceeded
from daemoneye_eventbus.flow import DROPPED, QUEUED
from daemoneye_eventbus.protocol import build_publish, error_for_code
from daemoneye_eventbus.registry_runtime import Publication, Topic
from daemoneye_eventbus.responders import RequestReply
from daemoneye_eventbus.router import Endpoint, Published, SubscriptionEntry
from daemoneye_eventbus.sessions.base import Session, SessionHost
from daemoneye_eventbus.sessions.flows import FlowDelivery
from daemoneye_eventbus.sessions.local_rpc import LocalRpc
from daemoneye_eventbus.stamps import Stamp
from daemoneye_eventbus.subscription import Subscription, subscription_target

__all__ = ["LocalSession"]

_HELD = "a lossless subscriber holds this publisher until it reads: await publish() waits for it"

P = TypeVar("P", bound=Message)
#: What a topic's call takes: the message, and the correlation by keyword.
A = ParamSpec("A")


def _own_credentials() -> PeerCredentials:
    """This process's pid, uid and gid (Windows: no uid or gid, -1)."""
    if sys.platform == "win32":
        return PeerCredentials(os.getpid(), -1, -1)
    return PeerCredentials(os.getpid(), os.getuid(), os.getgid())


class LocalSession(Session, RequestReply[LocalRpc]):
    """An in-process session: publishes and subscribes without a socket.

    Each subscription delivers into an :class:`EventQueue` (several may share
    one). The broker's ``max_queue_messages`` and ``max_queue_bytes`` bound
    every queue it creates; when one is full, events are dropped and counted
    exactly as for a socket subscriber.
    """

    def __init__(self, host: SessionHost, name: str, component: str) -> None:
        self.host = host
        self.router = host.router
        self.client_name = name
        # In-process code runs inside the agent and holds the broker itself.
        self.endpoint = Endpoint(
            self,
            identity=Identity(None, component, privileged=True, trusted=True),
            peer=_own_credentials(),
        )
        # In-process reads grant credit directly (see Credits).
        self.endpoint.credit = True
        self._subs: dict[int, Subscription[Any]] = {}
        self._ids = itertools.count(1)
        self._closed = False
        self._rpc = self.endpoint.rpc = LocalRpc(self, self._ids)  # request/reply
        #: Credit-based subscriptions' deliveries (lossless delivery).
        self.flows = FlowDelivery(_QueueOutput(self))
        self._credits = Credits(self.grant)
        #: Set while a lossless subscriber holds this session as a publisher.
        self._released: asyncio.Future[None] | None = None

    @property
    def identity(self) -> Identity:
        return self.endpoint.identity

    @property
    def is_closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError("local session is closed")

    def new_queue(self, max_pending: int | None = None) -> EventQueue[Any]:
        """An empty queue with the broker's bounds (or fewer messages)."""
        cfg = self.host.config
        return EventQueue(max_pending or cfg.max_queue_messages, cfg.max_queue_bytes)

    # -- publishing ---------------------------------------------------------------

    def publish_frame(self, publish: frames_pb2.Publish) -> int:
        """Route one ``Publish``; return how many subscriptions took it. Raises
        the router's typed error (an :class:`EventBusError`) when it is refused."""
        self._check_open()
        if self.endpoint.held_by:
            raise LimitExceeded(_HELD)
        taken = self.router.route(self.endpoint, publish)
        # Socket subscribers it reached get their frames at the end of this turn.
        self.host.outbox.schedule()
        return taken

    def _publish_nowait(
        self, topic: Topic[P], message: P, /, *, correlation: CorrelationMetadata | None = None
    ) -> int:
        """Publish one event now; return how many subscriptions took it."""
        return self.publish_frame(build_publish(topic, message, correlation))

    async def _publish(
        self, topic: Topic[P], message: P, /, *, correlation: CorrelationMetadata | None = None
    ) -> None:
        """Publish one event; waits only while a lossless subscriber holds this
        session (in process, delivery is otherwise a queue put)."""
        await self._until_released()
        self.publish_frame(build_publish(topic, message, correlation))

    # As for Client.publish: mypy checks calls against these signatures, which take
    # the message's type from the topic; run time calls the methods above.
    if TYPE_CHECKING:

        def publish_nowait(
            self, topic: Callable[A, Publication[Any]], /, *args: A.args, **kwargs: A.kwargs
        ) -> int:
            """``publish_nowait(topic, message, *, correlation=None)``: :meth:`_publish_nowait`."""

        async def publish(
            self, topic: Callable[A, Publication[Any]], /, *args: A.args, **kwargs: A.kwargs
        ) -> None:
            """``publish(topic, message, *, correlation=None)``: :meth:`_publish`."""

    else:
        publish_nowait = _publish_nowait
        publish = _publish

    async def _until_released(self) -> None:
        while self.endpoint.held_by and not self._closed:
            if self._released is None or self._released.done():
                self._released = asyncio.get_running_loop().create_future()
            await self._released

    def resume(self) -> None:  # no lossless subscriber holds this session any more
        if self._released is not None and not self._released.done():
            self._released.set_result(None)

    async def publish_raw(
        self,
        topic: str,
        payload_type: str,
        payload: bytes,
        *,
        correlation: CorrelationMetadata | None = None,
    ) -> None:
        """Publish an already serialized payload on a topic given by name (untyped)."""
        publish = frames_pb2.Publish(topic=topic, payload_type=payload_type, payload=payload)
        if correlation is not None:
            publish.correlation.CopyFrom(correlation)
        await self._until_released()
        self.publish_frame(publish)

    async def flush(self) -> float:
        """Like :meth:`Client.flush`: in process there is nothing to wait for (0.0 s)."""
        self._check_open()
        return 0.0

    # -- subscribing --------------------------------------------------------------

    def subscribe_queue(
        self,
        filter: str,
        queue: EventQueue[Any],
        correlation_filter: CorrelationFilter | None = None,
        include_control: bool = False,
        payload_class: type[Message] | None = None,
        lossless: bool = False,
    ) -> int:
        """Subscribe, delivering into ``queue``; returns the subscription id."""
        return self._subscribe(
            filter, queue, correlation_filter, include_control, payload_class, lossless, 0
        ).subscription_id

    def _subscribe(
        self,
        filter: str,
        queue: EventQueue[Any],
        correlation_filter: CorrelationFilter | None,
        include_control: bool,
        payload_class: type[Message] | None,
        lossless: bool,
        window: int | None,
    ) -> Subscription[Any]:
        self._check_open()
        sid = next(self._ids)
        sub: Subscription[Any] = Subscription(
            self, sid, filter, correlation_filter, include_control, payload_class, queue, lossless
        )
        entry = self.router.subscribe(
            self.endpoint,
            sid,
            filter,
            correlation_filter,
            include_control,
            lossless,
            window or queue.max_messages,
        )
        if entry.flow is not None:
            sub.credit_based(entry.flow.window, entry.flow.lossless, self._credits)
        self._subs[sid] = sub
        self.router.retained.replay(entry)  # the retained events it may read, first
        return sub

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
        """Subscribe to a topic or a filter, as :meth:`Client.subscribe` does
        (``lossless`` and ``window`` too: the window defaults to the queue's size)."""
        text, cls = subscription_target(filter)
        if queue is None:
            queue = self.new_queue(max_pending)
        return self._subscribe(
            text, queue, correlation_filter, include_control, cls, lossless, window
        )

    def unsubscribe_id(self, subscription_id: int) -> None:
        """End a subscription by id; events already queued stay readable."""
        sub = self._subs.pop(subscription_id, None)
        if not self._closed:  # else the session (or the broker) already ended everything
            self.router.unsubscribe(self.endpoint, subscription_id)
        self._credits.forget(subscription_id)
        if sub is not None:
            sub.end()

    async def unsubscribe(self, sub: Subscription[Any]) -> None:
        """End a subscription; events still queued for it are kept for reading."""
        if self._subs.get(sub.subscription_id) is not sub:
            sub.end()
            return
        self.unsubscribe_id(sub.subscription_id)

    # -- delivery -----------------------------------------------------------------

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
        local = self._subs.get(sub.subscription_id)
        if local is None or self._closed:
            return DROPPED
        flow = sub.flow
        if flow is not None:
            return self.flows.enqueue(sub, flow, message, data, first, count, lossless, stamp)
        return QUEUED if _put(local, message, first, stamp) else DROPPED

    def grant(self, subscription_id: int, events: int) -> None:
        """The application read ``events`` events of a credit-based subscription."""
        if (entry := self.endpoint.subscriptions.get(subscription_id)) and not self._closed:
            self.flows.grant(entry, events)

    def check(self, now: float) -> None:
        """End a lossless subscription whose reader stalled (broker's housekeeping)."""
        timeout = self.host.config.slow_consumer_timeout
        stalled = self.flows.stalled(now, timeout) if self.flows.holding else None
        if stalled is None:
            return
        if (local := self._subs.get(stalled.subscription_id)) is not None:
            why = f"lossless subscription {local.filter!r} was not read for {timeout} s"
            local.end(error_for_code(ErrorCode.ERROR_CODE_SLOW_CONSUMER, why))
        self.unsubscribe_id(stalled.subscription_id)

    def queue_depth(self) -> tuple[int, int]:
        queues = {id(s.queue): s.queue for s in self._subs.values()}.values()
        return sum(len(q) for q in queues), sum(q.nbytes for q in queues)

    # -- ending ---------------------------------------------------------------------

    def end(self) -> None:
        """End every subscription of this session; readers see the end of their queues."""
        if self._closed:
            return
        self._closed = True
        self.host.release(self)
        for sub in self._subs.values():
            sub.end()
        self._subs.clear()
        self._rpc.end()
        self.resume()  # a publish waiting for a lossless subscriber ends too

    async def close(self) -> None:
        """Like :meth:`Client.close`: end the session (idempotent)."""
        self.end()


class _QueueOutput:
    """What a :class:`FlowDelivery` needs of an in-process session: its queues
    always have room (a credit-based subscription's window bounds them)."""

    def __init__(self, session: LocalSession) -> None:
        self.session = session

    @property
    def delivering(self) -> bool:
        return not self.session.is_closed

    def room(self, size: int, may_flush: bool) -> bool:
        return True

    def may_hold(self) -> bool:
        return True

    def deliver(
        self,
        sub: SubscriptionEntry,
        message: Published,
        data: bytes,
        first: int,
        count: int,
        stamp: Stamp,
    ) -> None:
        if (local := self.session._subs.get(sub.subscription_id)) is not None:
            _put(local, message, first, stamp, bounded=False)

    def deliver_at_most_once(
        self,
        sub: SubscriptionEntry,
        message: Published,
        data: bytes,
        first: int,
        count: int,
        stamp: Stamp,
    ) -> bool:
        local = self.session._subs.get(sub.subscription_id)
        return local is not None and _put(local, message, first, stamp)


def _put(
    local: Subscription[Any],
    message: Published,
    first: int,
    stamp: Stamp,
    bounded: bool = True,
) -> bool:
    payloads: Sequence[bytes] = (
        message.payloads if isinstance(message, frames_pb2.PublishBatch) else (message.payload,)
    )
    # One copy of the correlation per subscriber: the publisher may reuse its message.
    correlation = _copy_correlation(message) if message.HasField("correlation") else None
    return local.deliver(
        message.topic,
        message.payload_type,
        payloads,
        correlation,
        first,
        bounded,
        stamp.event_id,
        stamp.time_ns,
        stamp.retained,
    )


def _copy_correlation(publish: Published) -> CorrelationMetadata:
    # Each subscriber gets its own copy: the publisher may reuse its message.
    copy = CorrelationMetadata()
    copy.CopyFrom(publish.correlation)
    return copy
