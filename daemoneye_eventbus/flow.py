"""Credit-based delivery of one subscription: lossless by backpressure (pure).

A subscription whose client grants credit [protocol §5, "Lossless delivery"] gets a
:class:`Flow`: the broker may send it ``credit`` more events, and the client
grants more (``Credit`` frames, or the in-process queue's reads) as the
application takes them. While the credit is used up (or the subscriber's
output is full), a lossless event is not dropped: it is *held* here, in
order, and the endpoint that published it is *held* too (:meth:`Flow.wait`):
its session stops reading from it until every flow holding it has sent what
it held (:meth:`Flow.release`). An event that is not lossless (its topic is
not declared lossless and the subscription did not ask) is dropped as usual.

What a flow holds is bounded without a limit of its own: a held publisher
is not read any more, so each one adds at most the frame it was in. A
subscriber that grants no credit for ``slow_consumer_timeout`` seconds while
events are held is disconnected by its session, which releases its
publishers.
"""

from __future__ import annotations

import collections
from typing import Final, Protocol

from daemoneye.eventbus.v1 import frames_pb2
from daemoneye_eventbus.stamps import Stamp

__all__ = ["DROPPED", "HELD", "QUEUED", "Flow", "Holdable", "Published"]

#: What a sink's ``enqueue`` did with the events: dropped them (0, falsy),
#: queued them for the subscriber (1), or held them in the subscription's
#: flow, so that the publisher must be held too (2).
DROPPED: Final = 0
QUEUED: Final = 1
HELD: Final = 2

#: What a session publishes: one event or a batch of events on one topic.
Published = frames_pb2.Publish | frames_pb2.PublishBatch


class Holdable(Protocol):
    """A publisher a flow can hold (an :class:`~daemoneye_eventbus.subscriptions.Endpoint`)."""

    #: How many flows hold it; its session reads from it only at 0.
    held_by: int

    def unhold(self) -> None:
        """One flow released it (decrements ``held_by``; resumes it at 0)."""
        ...


class Flow:
    """The credit, held events and held publishers of one subscription."""

    __slots__ = ("credit", "held", "held_bytes", "lossless", "stalled_since", "waiting", "window")

    def __init__(self, window: int, lossless: bool) -> None:
        #: Events the client can take beyond what it has granted back.
        self.window = window
        #: Events the broker may send now; below 0 after a batch larger than
        #: what was left (a batch is sent whole).
        self.credit = window
        #: Every event is lossless (the subscription asked); otherwise only
        #: those of topics declared lossless.
        self.lossless = lossless
        #: Events waiting for credit, in order: (message, encoded, first, count, stamp).
        self.held: collections.deque[tuple[Published, bytes, int, int, Stamp]] = collections.deque()
        #: Bytes of the encoded events held.
        self.held_bytes = 0
        #: Publishers held until this flow has sent what it holds.
        self.waiting: set[Holdable] = set()
        #: Since when (loop time, set by the session's housekeeping) events
        #: are held without credit coming back; None when nothing is held.
        self.stalled_since: float | None = None

    def __repr__(self) -> str:
        return (
            f"Flow(window={self.window}, credit={self.credit}, held={len(self.held)}, "
            f"waiting={len(self.waiting)})"
        )

    @property
    def held_events(self) -> int:
        """Events held (a batch counts each of its events)."""
        return sum(item[3] for item in self.held)

    def can_send(self) -> bool:
        """Whether an event may go to the subscriber now: credit left and
        nothing held before it (events keep their order)."""
        return self.credit > 0 and not self.held

    def sent(self, count: int) -> None:
        """``count`` events went to the subscriber."""
        self.credit -= count

    def hold(self, message: Published, data: bytes, first: int, count: int, stamp: Stamp) -> None:
        """Keep ``count`` events (``data`` encoded), numbered from ``first``, for later."""
        self.held.append((message, data, first, count, stamp))
        self.held_bytes += len(data)

    def wait(self, publisher: Holdable) -> None:
        """Hold ``publisher`` until this flow releases it (once per flow)."""
        if publisher not in self.waiting:
            self.waiting.add(publisher)
            publisher.held_by += 1

    def grant(self, events: int) -> None:
        """The client took ``events`` more events: that much more credit (never
        more than the window)."""
        self.credit = min(self.credit + events, self.window)
        self.stalled_since = None

    def take(self) -> tuple[Published, bytes, int, int, Stamp]:
        """The first held event (or batch), taken off to be sent now; its
        events are spent from the credit (the caller checks :attr:`credit`)."""
        item = self.held.popleft()
        self.held_bytes -= len(item[1])
        self.credit -= item[3]
        return item

    def release(self) -> None:
        """Nothing is held any more: every held publisher may go on."""
        self.stalled_since = None
        waiting, self.waiting = self.waiting, set()
        for publisher in waiting:
            publisher.unhold()

    def discard(self) -> int:
        """The subscription ended: forget what is held, release the publishers;
        returns the number of events forgotten."""
        lost = self.held_events
        self.held.clear()
        self.held_bytes = 0
        self.release()
        return lost
