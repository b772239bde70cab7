"""Retained events: the last event of each retained topic, for new subscriptions (pure).

A topic the schema declares ``retained`` (``TopicOptions.retained``:
``control.collector.config``, ``control.agent.policy``,
``control.health.status``) keeps its last accepted event in the broker, per
concrete topic. A new subscription gets, right after its ``SubscribeAck``
and before any live event, the retained event of every retained topic it
would receive a live event of (filter, control-topic rule, access, its
correlation filter), marked ``retained``, numbered in its sequence, with the
id and receive time of the event it repeats [protocol §5, "Retained events"].

* A batch on a retained topic retains its last event (id: the batch's first
  id + count - 1).
* An event with an empty payload clears its topic's retained event (it is
  delivered live like any other).
* The store is bounded by ``max_retained_events`` and ``max_retained_bytes``
  (:class:`~daemoneye_eventbus.config.BrokerConfig`); each event is charged
  its encoded ``Publish`` plus :data:`RETAINED_COST` bytes. A publish that
  would take the store over a bound is refused as a whole, before anything is
  delivered, with a non-fatal ``LIMIT_EXCEEDED`` (:meth:`RetainedStore.refusal`);
  replacing a topic's event only needs room for the difference in bytes, and
  clearing always passes.

The router asks :meth:`RetainedStore.refusal` among its checks of a publish
and hands every accepted event of a retained topic to :meth:`RetainedStore.keep`;
sessions call :meth:`RetainedStore.replay` once a new subscription is in
place.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final, Protocol

from daemoneye.eventbus.v1 import frames_pb2
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode
from daemoneye_eventbus.access import TopicAccess
from daemoneye_eventbus.config import BrokerConfig
from daemoneye_eventbus.errors import LimitExceeded
from daemoneye_eventbus.flow import Published
from daemoneye_eventbus.stamps import Stamp
from daemoneye_eventbus.subscriptions import SubscriptionEntry
from daemoneye_eventbus.topics import topic_matches

__all__ = ["RETAINED_COST", "RetainedEvent", "RetainedStore", "RetainedTopic", "retained_cost"]

#: Bytes of broker memory a retained event is charged beyond its encoded
#: ``Publish``: its entry, its stamp, its slot in the store, its topic as the
#: key and the bytes object's header, measured at about 400 with CPython 3.11
#: (tracemalloc, topics of 35 characters).
RETAINED_COST: Final = 512

# Filters with a wildcard level: the others name one topic.
_WILDCARDS: Final = frozenset("+#")


def retained_cost(encoded_bytes: int) -> int:
    """Bytes of broker memory a retained event of ``encoded_bytes`` is charged."""
    return encoded_bytes + RETAINED_COST


class Counted(Protocol):
    """A topic label's delivery counts (the router's ``TopicCounts``)."""

    delivered: int
    dropped: int


class RetainedTopic(Protocol):
    """What the store keeps of the topic of a retained event (the router's ``TopicInfo``)."""

    @property
    def control(self) -> bool: ...

    @property
    def access(self) -> TopicAccess: ...

    @property
    def counts(self) -> Counted: ...


class RetainedEvent:
    """The retained event of one topic: its encoded ``Publish`` and its stamp."""

    __slots__ = ("cost", "data", "stamp", "topic", "what")

    def __init__(self, topic: str, data: bytes, stamp: Stamp, what: RetainedTopic) -> None:
        self.topic = topic
        #: The ``Publish`` of one event as the broker encoded it.
        self.data = data
        #: The id and receive time of the event (not marked retained).
        self.stamp = stamp
        #: The topic's control flag, access and counts.
        self.what = what
        self.cost = retained_cost(len(data))

    def message(self) -> frames_pb2.Publish:
        """The event, decoded (a new message each time: receivers may keep it)."""
        return frames_pb2.Publish.FromString(self.data)


def _last_event(batch: frames_pb2.PublishBatch) -> frames_pb2.Publish:
    """The last event of ``batch`` as a ``Publish`` of its own."""
    last = frames_pb2.Publish(
        topic=batch.topic, payload_type=batch.payload_type, payload=batch.payloads[-1]
    )
    if batch.HasField("correlation"):
        last.correlation.CopyFrom(batch.correlation)
    return last


def _clears(message: Published) -> bool:
    """Whether ``message`` clears its topic's retained event: its (last) payload is empty."""
    if isinstance(message, frames_pb2.Publish):
        return not message.payload
    return not message.payloads[-1]


class RetainedStore:
    """The retained event of each concrete retained topic, within the config's bounds."""

    def __init__(self, config: BrokerConfig) -> None:
        self.max_events = config.max_retained_events
        self.max_bytes = config.max_retained_bytes
        # By topic, in the order of their event ids (a replaced topic moves to the end).
        self._events: dict[str, RetainedEvent] = {}
        #: Broker memory the retained events are charged (see :func:`retained_cost`).
        self.bytes = 0
        #: Their encoded size (``StatsResponse.retained_bytes``): :attr:`bytes`
        #: less :data:`RETAINED_COST` per event.
        self.encoded_bytes = 0

    def __len__(self) -> int:
        """The number of retained events."""
        return len(self._events)

    def __iter__(self) -> Iterator[RetainedEvent]:
        """The retained events, oldest first."""
        return iter(tuple(self._events.values()))

    def get(self, topic: str) -> RetainedEvent | None:
        """The retained event of ``topic``, if any."""
        return self._events.get(topic)

    # -- publishing ---------------------------------------------------------------

    def refusal(self, topic: str, message: Published, size: int) -> LimitExceeded | None:
        """Why the store cannot retain the event (the last one of a batch) that
        ``message``, ``size`` bytes encoded, would leave on ``topic``; None if it can."""
        if _clears(message):
            return None
        if not isinstance(message, frames_pb2.Publish):
            size = _last_event(message).ByteSize()
        old = self._events.get(topic)
        if old is None and len(self._events) >= self.max_events:
            return LimitExceeded(
                f"the broker already retains {len(self._events)} events, its limit "
                f"(max_retained_events); {topic!r} has none to replace",
                code=ErrorCode.ERROR_CODE_LIMIT_EXCEEDED,
            )
        total = self.bytes - (old.cost if old is not None else 0) + retained_cost(size)
        if total > self.max_bytes:
            return LimitExceeded(
                f"retaining this event on {topic!r} would take the broker's retained events "
                f"to {total} bytes, over its limit of {self.max_bytes} (max_retained_bytes)",
                code=ErrorCode.ERROR_CODE_LIMIT_EXCEEDED,
            )
        return None

    def keep(
        self, topic: str, message: Published, data: bytes, stamp: Stamp, what: RetainedTopic
    ) -> None:
        """Retain the accepted ``message`` (``data`` encoded, stamped ``stamp``) as
        ``topic``'s event: a batch's last event; an empty payload clears it."""
        self.clear(topic)
        if _clears(message):
            return
        if not isinstance(message, frames_pb2.Publish):
            data = _last_event(message).SerializeToString()
            stamp = stamp.at(len(message.payloads) - 1)
        event = RetainedEvent(topic, data, stamp, what)
        self._events[topic] = event
        self.bytes += event.cost
        self.encoded_bytes += len(data)

    def clear(self, topic: str) -> bool:
        """Forget ``topic``'s retained event; whether there was one."""
        old = self._events.pop(topic, None)
        if old is None:
            return False
        self.bytes -= old.cost
        self.encoded_bytes -= len(old.data)
        return True

    # -- subscribing ----------------------------------------------------------------

    def matching(self, filter: str) -> Iterator[RetainedEvent]:
        """The retained events whose topic ``filter`` matches, oldest first."""
        events = self._events
        if not events:
            return iter(())
        if _WILDCARDS.isdisjoint(filter):
            one = events.get(filter)
            return iter((one,) if one is not None else ())
        return (e for e in tuple(events.values()) if topic_matches(filter, e.topic))

    def replay(self, sub: SubscriptionEntry) -> int:
        """Deliver to the new subscription ``sub`` every retained event it would
        receive live (its filter, the control-topic rule, its owner's access, its
        correlation filter), marked retained, numbered in its sequence; return
        how many its queue took."""
        taken = 0
        for event in self.matching(sub.filter):
            what = event.what
            if not sub.may_receive(what.control, what.access):
                continue
            message = event.message()
            if sub.matcher is not None and not sub.matcher.matches(
                message.correlation if message.HasField("correlation") else None
            ):
                continue
            first = sub.sequence + 1
            sub.sequence = first
            counts = what.counts
            if sub.enqueue(sub, message, event.data, first, 1, False, event.stamp.as_retained()):
                sub.delivered += 1
                counts.delivered += 1
                taken += 1
            else:
                sub.dropped += 1
                counts.dropped += 1
        return taken
