"""Received events and the bounded queues they wait in.

Shared by the socket client and by in-process subscribers of the broker, so
both see the same types and the same drop accounting.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from datetime import UTC, datetime
from itertools import count, repeat
from operator import itemgetter
from typing import Any, Final, Generic, NamedTuple, TypeVar

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

from daemoneye.eventbus.v1.correlation_pb2 import CorrelationMetadata
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode
from daemoneye_eventbus.errors import (
    ClosedResourceError,
    InvalidPayload,
    PayloadTypeMismatch,
    RequestTimeout,
)

__all__ = [
    "Credits",
    "EventQueue",
    "ReceivedEvent",
    "message_class",
    "received_batch",
    "utc_datetime",
]

P = TypeVar("P", bound=Message)


def message_class(full_name: str) -> type[Message] | None:
    """The generated class of a message type, by its fully qualified name."""
    try:
        desc = descriptor_pool.Default().FindMessageTypeByName(full_name)
    except KeyError:
        return None
    return message_factory.GetMessageClass(desc)


class ReceivedEvent(NamedTuple, Generic[P]):
    """An event received on a subscription (an immutable named tuple)."""

    topic: str
    #: Fully qualified name of the payload type, as published.
    payload_type: str
    #: The serialized payload, as the publisher sent it.
    payload: bytes
    #: Correlation metadata, or None if the event had none. The events of one
    #: delivered batch share it: treat it as read-only.
    correlation: CorrelationMetadata | None
    #: Per-subscription sequence number from 1; a gap means events were dropped.
    sequence: int
    subscription_id: int
    payload_class: type[P] | None = None
    #: The broker's id of the event: unique for the broker's life, increasing in
    #: the order the broker accepted events, the same for every subscriber (0
    #: from a broker without ids) [protocol §5, "Event ids and receive times"].
    event_id: int = 0
    #: When the broker accepted the event, in nanoseconds since the Unix epoch.
    received_at_ns: int = 0
    #: The topic's retained event, delivered first because the subscription is new.
    retained: bool = False

    @property
    def received_at(self) -> datetime:
        """When the broker accepted the event (UTC)."""
        return utc_datetime(self.received_at_ns)

    def message(self) -> P:
        """Decode the payload into its message type.

        Raises :class:`InvalidPayload` (with the topic and sequence) if the
        payload does not parse as that type, :class:`PayloadTypeMismatch` if
        the type is unknown here.
        """
        cls: type[Any] | None = self.payload_class or message_class(self.payload_type)
        if cls is None:
            raise PayloadTypeMismatch(f"unknown payload type {self.payload_type!r}")
        try:
            msg: P = cls.FromString(self.payload)
        except (DecodeError, RecursionError) as exc:
            raise InvalidPayload(
                f"event #{self.sequence} on {self.topic!r} does not parse as "
                f"{self.payload_type}: {exc}",
                topic=self.topic,
                payload_type=self.payload_type,
                sequence=self.sequence,
                code=ErrorCode.ERROR_CODE_INVALID_PAYLOAD,
            ) from None
        return msg


def utc_datetime(ns: int) -> datetime:
    """A time in nanoseconds since the Unix epoch as an aware UTC datetime
    (to the microsecond)."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, UTC).replace(microsecond=nanos // 1000)


def received_batch(
    topic: str,
    payload_type: str,
    payloads: Iterable[bytes],
    correlation: CorrelationMetadata | None,
    first_sequence: int,
    subscription_id: int,
    payload_class: type[P] | None = None,
    first_event_id: int = 0,
    received_at_ns: int = 0,
) -> list[ReceivedEvent[P]]:
    """The events of one delivered batch, numbered from ``first_sequence``, with
    consecutive event ids from ``first_event_id`` (0: none).

    They share ``correlation`` (the batch's): treat it as read-only.
    """
    # tuple.__new__ with the fields in order builds exactly what the named
    # tuple's constructor builds, without its keyword handling; map and zip
    # keep the loop in C. The hot path of every subscriber.
    fields = zip(
        repeat(topic),
        repeat(payload_type),
        payloads,
        repeat(correlation),
        count(first_sequence),
        repeat(subscription_id),
        repeat(payload_class),
        count(first_event_id) if first_event_id else repeat(0),
        repeat(received_at_ns),
        repeat(False),
    )
    return list(map(tuple.__new__, repeat(ReceivedEvent), fields))


#: The payload of a ReceivedEvent (field 2 of the tuple).
_PAYLOAD: Final = itemgetter(2)


#: How early a timer may fire (libuv, under uvloop, counts whole milliseconds).
_TIMER_SLACK: Final = 0.001


class Credits:
    """Credit for credit-based subscriptions, granted as the application reads.

    The broker sends a credit-based subscription at most ``window`` events
    beyond what was granted back [protocol §5, "Lossless delivery"]; each read from a queue
    counts one event of its subscription, and every quarter window read is
    granted back through ``grant(subscription_id, events)`` (a ``Credit``
    frame, or the in-process session's flow).
    """

    __slots__ = ("_every", "_grant", "_taken")

    def __init__(self, grant: Callable[[int, int], None]) -> None:
        self._grant = grant
        self._every: dict[int, int] = {}
        self._taken: dict[int, int] = {}

    def track(self, subscription_id: int, window: int) -> None:
        """Count reads of ``subscription_id`` (credit-based, ``window`` events)."""
        self._every[subscription_id] = max(1, window // 4)
        self._taken[subscription_id] = 0

    def forget(self, subscription_id: int) -> None:
        self._every.pop(subscription_id, None)
        self._taken.pop(subscription_id, None)

    def every(self, subscription_id: int) -> int:
        """How many reads of ``subscription_id`` are granted back at once (0: none)."""
        return self._every.get(subscription_id, 0)

    def grant(self, subscription_id: int, events: int) -> None:
        """The application read ``events`` events of ``subscription_id``: grant them."""
        if subscription_id in self._every:
            self._grant(subscription_id, events)

    def took(self, subscription_id: int, events: int = 1) -> None:
        """The application read ``events`` events of ``subscription_id``; granted
        back once a quarter window is read."""
        every = self._every.get(subscription_id)
        if every is None:
            return
        taken = self._taken[subscription_id] + events
        if taken >= every:
            self._taken[subscription_id] = 0
            self._grant(subscription_id, taken)
        else:
            self._taken[subscription_id] = taken


class EventQueue(Generic[P]):
    """A queue of received events bounded in messages and bytes.

    :meth:`put_nowait` never blocks: when the queue is full the event is
    dropped and counted in :attr:`dropped`. Sequence gaps per subscription are
    counted in :attr:`missed`. Several subscriptions may share one queue.
    Events of credit-based subscriptions are put unbounded (the broker's
    window bounds them) and each read is counted in :attr:`credits`.
    """

    def __init__(self, max_messages: int, max_bytes: int | None = None) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._items: collections.deque[ReceivedEvent[P]] = collections.deque()
        self._bytes = 0
        #: Resolved with True by the timer of get(), with False by new events.
        self._waiter: asyncio.Future[bool] | None = None
        #: When the waiting get() times out (loop time), if it has a timeout.
        self._deadline: float | None = None
        #: The timer that checks the deadline, and when it is due.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._closed = False
        self._error: BaseException | None = None
        self._last_sequence: dict[int, int] = {}
        #: Events dropped because the queue was full.
        self.dropped = 0
        #: Events missing from the sequence numbers (dropped before reaching us).
        self.missed = 0
        #: Events accepted into the queue.
        self.received = 0
        #: Counts reads for credit-based subscriptions (see :meth:`count_reads`).
        self.credits: Credits | None = None
        # Reads since the last grant, the reads granted at once (0: not credit
        # based), and the one subscription they belong to (-1: several).
        self._reads = 0
        self._grant_at = 0
        self._credit_sid = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        """Bytes of payload waiting."""
        return self._bytes

    @property
    def closed(self) -> bool:
        return self._closed

    def put_nowait(self, event: ReceivedEvent[P], bounded: bool = True) -> bool:
        """Queue ``event``; return False (and count it) if it had to be dropped.

        Its payload's size counts against ``max_bytes`` (unless not ``bounded``).
        """
        size = len(event.payload)
        sid = event.subscription_id
        last = self._last_sequence.get(sid, 0)
        if event.sequence > last + 1:
            self.missed += event.sequence - last - 1
        self._last_sequence[sid] = event.sequence
        if self._closed or (
            bounded
            and (
                len(self._items) >= self.max_messages
                or (self.max_bytes is not None and self._bytes + size > self.max_bytes)
            )
        ):
            self.dropped += 1
            return False
        self._items.append(event)
        self._bytes += size
        self.received += 1
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(False)
        return True

    def put_batch(self, events: list[ReceivedEvent[P]], bounded: bool = True) -> bool:
        """Queue consecutive events of one subscription, all or none (past the
        bounds if not ``bounded``).

        Returns False (and counts them) if they had to be dropped; each event
        counts its payload's size against ``max_bytes``.
        """
        if not events:
            return True
        first = events[0]
        sid = first.subscription_id
        last = self._last_sequence.get(sid, 0)
        if first.sequence > last + 1:
            self.missed += first.sequence - last - 1
        self._last_sequence[sid] = events[-1].sequence
        count = len(events)
        size = sum(map(len, map(_PAYLOAD, events)))
        if self._closed or (
            bounded
            and (
                len(self._items) + count > self.max_messages
                or (self.max_bytes is not None and self._bytes + size > self.max_bytes)
            )
        ):
            self.dropped += count
            return False
        self._items.extend(events)
        self._bytes += size
        self.received += count
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(False)
        return True

    def put_payloads(
        self,
        topic: str,
        payload_type: str,
        payloads: Sequence[bytes],
        correlation: CorrelationMetadata | None,
        first_sequence: int,
        subscription_id: int,
        payload_class: type[P] | None = None,
        bounded: bool = True,
        first_event_id: int = 0,
        received_at_ns: int = 0,
        retained: bool = False,
    ) -> bool:
        """Queue the events of one delivery (see :func:`received_batch`), all or none."""
        if len(payloads) == 1:  # one event in flight: no batch machinery
            event = ReceivedEvent(
                topic,
                payload_type,
                payloads[0],
                correlation,
                first_sequence,
                subscription_id,
                payload_class,
                first_event_id,
                received_at_ns,
                retained,
            )
            return self.put_nowait(event, bounded)
        events = received_batch(
            topic,
            payload_type,
            payloads,
            correlation,
            first_sequence,
            subscription_id,
            payload_class,
            first_event_id,
            received_at_ns,
        )
        return self.put_batch(events, bounded)

    def count_reads(self, credits: Credits, subscription_id: int) -> None:
        """Grant ``credits`` back as the application reads ``subscription_id``'s
        events (a credit-based subscription). One such subscription per queue is
        counted inline; a queue shared by several counts each read by its id."""
        if self._credit_sid > 0 and self._credit_sid != subscription_id and self._reads:
            credits.took(self._credit_sid, self._reads)  # counted by id from now on
        self.credits = credits
        self._reads = 0
        if self._credit_sid in (0, subscription_id):
            self._credit_sid = subscription_id
            self._grant_at = credits.every(subscription_id)
        else:
            self._credit_sid = -1
            self._grant_at = 1

    def _grant(self, subscription_id: int) -> None:
        reads, self._reads = self._reads, 0
        if self.credits is None:
            return
        if self._credit_sid > 0:
            self.credits.grant(self._credit_sid, reads)
        else:
            self.credits.took(subscription_id)

    def restart_sequence(self, subscription_id: int) -> None:
        """A new session began for this subscription: its numbering starts again."""
        self._last_sequence.pop(subscription_id, None)

    def get_nowait(self) -> ReceivedEvent[P] | None:
        """The next event, or None if none is waiting."""
        if not self._items:
            return None
        event = self._items.popleft()
        self._bytes -= len(event.payload)
        if self._grant_at:  # credit based: counted inline, granted now and then
            self._reads += 1
            if self._reads >= self._grant_at:
                self._grant(event.subscription_id)
        return event

    async def get(self, timeout: float | None = None) -> ReceivedEvent[P]:
        """Wait for the next event.

        Raises :class:`ClosedResourceError` (or the error the queue was closed
        with) once the queue is closed and empty, and :class:`RequestTimeout`
        after ``timeout`` seconds.
        """
        while not self._items:
            if self._closed:
                raise self._error or ClosedResourceError("subscription ended")
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            if timeout is None:
                self._deadline = None
            else:
                # One timer serves successive waits, re-armed only for an
                # earlier deadline (when it fires early, _on_timer re-arms it):
                # a timer per wait would cost more than the rest of the wait.
                self._deadline = deadline = loop.time() + timeout
                if self._timer is None or deadline < self._timer_at:
                    self._arm(loop, deadline)
            try:
                expired = await waiter
            finally:
                self._waiter = None
            if expired:
                raise RequestTimeout(f"no event within {timeout} s")
        event = self._items.popleft()
        self._bytes -= len(event.payload)
        if self._grant_at:  # credit based: counted inline, granted now and then
            self._reads += 1
            if self._reads >= self._grant_at:
                self._grant(event.subscription_id)
        return event

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = loop.call_at(when, self._on_timer, loop)

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        """The timer is due: time the waiting get() out if its deadline has come."""
        self._timer = None
        waiter, deadline = self._waiter, self._deadline
        if waiter is None or waiter.done() or deadline is None:
            return  # no wait with a deadline: the timer lapses
        if loop.time() + _TIMER_SLACK >= deadline:
            waiter.set_result(True)
        else:  # a later wait moved the deadline
            self._arm(loop, deadline)

    def close(self, error: BaseException | None = None) -> None:
        """No more events will come; waiting readers wake up."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if error is not None and self._error is None:
            self._error = error
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(False)

    def __aiter__(self) -> AsyncIterator[ReceivedEvent[P]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[ReceivedEvent[P]]:
        while True:
            try:
                event = await self.get()
            except ClosedResourceError:
                return
            yield event
