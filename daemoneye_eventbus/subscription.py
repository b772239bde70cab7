"""A subscription as its reader sees it: an async iterator over typed events.

The socket client and the broker's in-process session hand out the same
:class:`Subscription`: events wait in a bounded
:class:`~daemoneye_eventbus.delivery.EventQueue`, and ``unsubscribe()`` goes
back to whoever owns the subscription.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeVar

from google.protobuf.message import Message

from daemoneye.eventbus.v1 import frames_pb2
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationFilter, CorrelationMetadata
from daemoneye_eventbus.delivery import Credits, EventQueue, ReceivedEvent
from daemoneye_eventbus.errors import ConnectionClosed, InvalidPayload
from daemoneye_eventbus.registry_runtime import Topic

__all__ = ["Subscription", "SubscriptionOwner", "subscription_target"]

P = TypeVar("P", bound=Message)

log = logging.getLogger("daemoneye_eventbus.client")


def subscription_target(filter: Topic[Any] | str) -> tuple[str, type[Message] | None]:
    """The filter text of a topic or filter, and the payload class events decode to."""
    if isinstance(filter, Topic):
        return filter.name, filter.payload_type
    return filter, None


class SubscriptionOwner(Protocol):
    """Who ends a subscription: a client or an in-process session."""

    async def unsubscribe(self, sub: Subscription[Any]) -> None: ...


class Subscription(Generic[P]):
    """Events matching one filter: an async iterator and async context manager.

    Received events wait in an :class:`EventQueue` bounded by ``max_pending``;
    when the application does not keep up, new events are dropped and counted
    in :attr:`dropped`. A credit-based subscription (:attr:`window` > 0: it
    asked for lossless delivery, or reaches a topic declared lossless) never
    drops here: the broker sends at most a window beyond what the application
    has read, and holds the publishers of lossless events meanwhile. Events
    the broker dropped show as gaps in :attr:`ReceivedEvent.sequence` and are
    counted in :attr:`missed`. Several subscriptions may share one queue (pass
    ``queue=`` to ``subscribe``).
    """

    def __init__(
        self,
        owner: SubscriptionOwner,
        subscription_id: int,
        filter: str,
        correlation_filter: CorrelationFilter | None,
        include_control: bool,
        payload_class: type[P] | None,
        queue: EventQueue[P],
        lossless: bool = False,
        window: int = 0,
    ) -> None:
        #: The client or in-process session the subscription belongs to.
        self.owner = owner
        self.subscription_id = subscription_id
        self.filter = filter
        self.correlation_filter = correlation_filter
        self.include_control = include_control
        self.queue = queue
        self.payload_class = payload_class
        #: Called by :meth:`messages` with each event it skips because the
        #: payload does not decode (logged when None).
        self.on_invalid: Callable[[InvalidPayload], None] | None = None
        #: Events :meth:`messages` skipped because their payload did not decode.
        self.invalid = 0
        #: Lossless delivery was asked for (every event, whatever its topic).
        self.lossless = lossless
        #: The credit window the client offers (0: the owner's choice).
        self.requested_window = window
        #: The window the broker granted: 0 for at-most-once delivery.
        self.window = 0
        self._active = True

    def credit_based(self, window: int, lossless: bool, credits: Credits) -> None:
        """The broker made this subscription credit based (for the owner):
        reads of its queue are counted in ``credits`` from now on."""
        self.window = window
        self.lossless = lossless
        if window:
            credits.track(self.subscription_id, window)
            self.queue.count_reads(credits, self.subscription_id)
        else:
            credits.forget(self.subscription_id)

    @property
    def client(self) -> SubscriptionOwner:
        """The owner (kept under the name it had when only clients had subscriptions)."""
        return self.owner

    @property
    def active(self) -> bool:
        return self._active

    @property
    def dropped(self) -> int:
        """Events dropped here because the application did not keep up."""
        return self.queue.dropped

    @property
    def missed(self) -> int:
        """Events the broker dropped, from sequence gaps."""
        return self.queue.missed

    @property
    def received(self) -> int:
        return self.queue.received

    def deliver(
        self,
        topic: str,
        payload_type: str,
        payloads: Sequence[bytes],
        correlation: CorrelationMetadata | None,
        first_sequence: int,
        bounded: bool | None = None,
        first_event_id: int = 0,
        received_at_ns: int = 0,
        retained: bool = False,
    ) -> bool:
        """Queue delivered events, numbered from ``first_sequence`` (for the owner);
        within the queue's bounds unless credit based (or ``bounded`` says). The
        broker's event ids follow from ``first_event_id``."""
        return self.queue.put_payloads(
            topic,
            payload_type,
            payloads,
            correlation,
            first_sequence,
            self.subscription_id,
            self.payload_class,
            not self.window if bounded is None else bounded,
            first_event_id,
            received_at_ns,
            retained,
        )

    def deliver_frame(self, deliver: frames_pb2.Deliver) -> bool:
        """Queue the event of a ``Deliver`` frame (for the owner)."""
        publish = deliver.publish
        return self.deliver(
            publish.topic,
            publish.payload_type,
            (publish.payload,),
            publish.correlation if publish.HasField("correlation") else None,
            deliver.sequence,
            None,
            deliver.event_id,
            deliver.received_at_ns,
            deliver.retained,
        )

    def deliver_frame_batch(self, deliver_batch: frames_pb2.DeliverBatch) -> bool:
        """Queue the events of a ``DeliverBatch`` frame (for the owner)."""
        batch = deliver_batch.batch
        return self.deliver(
            batch.topic,
            batch.payload_type,
            batch.payloads,
            batch.correlation if batch.HasField("correlation") else None,
            deliver_batch.first_sequence,
            None,
            deliver_batch.first_event_id,
            deliver_batch.received_at_ns,
        )

    def end(self, error: BaseException | None = None) -> None:
        """No more events will come (for the owner); readers see the end of the queue."""
        self._active = False
        self.queue.close(error)

    def get_nowait(self) -> ReceivedEvent[P] | None:
        """The next queued event, or None."""
        return self.queue.get_nowait()

    async def get(self, timeout: float | None = None) -> ReceivedEvent[P]:
        """The next event; raises :class:`ConnectionClosed` once none can come."""
        return await self.queue.get(timeout)

    def __aiter__(self) -> AsyncIterator[ReceivedEvent[P]]:
        return aiter(self.queue)

    async def messages(self) -> AsyncIterator[tuple[ReceivedEvent[P], P]]:
        """Each event with its decoded message, skipping (and counting in
        :attr:`invalid`) those whose payload does not decode, so that bad data
        never ends the loop."""
        async for event in self.queue:
            try:
                message = event.message()
            except InvalidPayload as exc:
                self.invalid += 1
                if self.on_invalid is not None:
                    self.on_invalid(exc)
                else:
                    log.warning("subscription %s skipped an event: %s", self.filter, exc)
                continue
            yield event, message

    async def unsubscribe(self) -> None:
        """End the subscription (idempotent)."""
        if self._active:
            await self.owner.unsubscribe(self)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self.unsubscribe()
