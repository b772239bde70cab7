"""Lossless delivery in a session: credit, held events, held publishers.

A subscription with a :class:`~daemoneye_eventbus.flow.Flow` (its client
grants credit, see :mod:`daemoneye_eventbus.flow`) is delivered through a
session's :class:`FlowDelivery`: events go out while the subscriber has
credit and room; otherwise a lossless event is held, in order, and the
router holds its publisher. An event that is not lossless goes within the
credit and the usual at-most-once bounds, or is dropped.
Credit coming back (a ``Credit`` frame, or an in-process queue read) sends
what was held, and once a flow holds nothing its publishers go on. Socket
and in-process sessions share this; each says what "room" and "deliver"
mean for it (:class:`FlowHost`).
"""

from __future__ import annotations

from typing import Protocol

from daemoneye_eventbus.flow import DROPPED, HELD, QUEUED, Flow, Published
from daemoneye_eventbus.router import SubscriptionEntry
from daemoneye_eventbus.stamps import Stamp

__all__ = ["FlowDelivery", "FlowHost"]


class FlowHost(Protocol):
    """What a session offers its :class:`FlowDelivery`."""

    @property
    def delivering(self) -> bool:
        """The session is open and may queue deliveries."""
        ...

    def room(self, size: int, may_flush: bool) -> bool:
        """Whether ``size`` more bytes of events fit the subscriber's output now
        (``may_flush``: writing what is queued first is allowed)."""
        ...

    def deliver(
        self,
        sub: SubscriptionEntry,
        message: Published,
        data: bytes,
        first: int,
        count: int,
        stamp: Stamp,
    ) -> None:
        """Queue the events for the subscriber, whatever its bounds."""
        ...

    def deliver_at_most_once(
        self,
        sub: SubscriptionEntry,
        message: Published,
        data: bytes,
        first: int,
        count: int,
        stamp: Stamp,
    ) -> bool:
        """Queue the events within the at-most-once bounds; False if they do not fit."""
        ...

    def may_hold(self) -> bool:
        """Whether the broker has memory to hold more events for this session
        (if not, the host ends the session as a slow consumer)."""
        ...


class FlowDelivery:
    """The flows of one session's credit-based subscriptions."""

    __slots__ = ("holding", "host")

    def __init__(self, host: FlowHost) -> None:
        self.host = host
        #: Subscriptions with held events (one that ended may linger until
        #: the next look: its flow then holds nothing).
        self.holding: set[SubscriptionEntry] = set()

    @property
    def held_bytes(self) -> int:
        """Bytes of encoded events held for this session's subscriptions."""
        return sum(sub.flow.held_bytes for sub in self.holding if sub.flow is not None)

    def enqueue(
        self,
        sub: SubscriptionEntry,
        flow: Flow,
        message: Published,
        data: bytes,
        first: int,
        count: int,
        lossless: bool,
        stamp: Stamp,
    ) -> int:
        """Send, hold or drop events for ``sub`` (see the module's description);
        ``lossless``: their topic is declared lossless."""
        host = self.host
        if not host.delivering:
            return DROPPED
        if not (flow.lossless or lossless):
            # At most once, within the usual bounds, and within the credit.
            if flow.can_send() and host.deliver_at_most_once(
                sub, message, data, first, count, stamp
            ):
                flow.sent(count)
                return QUEUED
            return DROPPED
        if flow.can_send() and host.room(len(data), True):
            host.deliver(sub, message, data, first, count, stamp)
            flow.sent(count)
            return QUEUED
        if not host.may_hold():
            return DROPPED
        flow.hold(message, data, first, count, stamp)
        self.holding.add(sub)
        return HELD

    def grant(self, sub: SubscriptionEntry, events: int) -> None:
        """The subscriber took ``events`` events of ``sub``: send what that allows."""
        flow = sub.flow
        if flow is None or events <= 0:
            return
        flow.grant(events)
        if flow.held:
            self.pump(sub, flow, True)

    def pump(self, sub: SubscriptionEntry, flow: Flow, may_flush: bool) -> bool:
        """Send held events of ``sub`` while credit and room allow; release its
        publishers once nothing is held. True if anything was sent."""
        host = self.host
        held = flow.held
        sent = False
        while held and flow.credit > 0 and host.delivering:
            if not host.room(len(held[0][1]), may_flush):
                break
            host.deliver(sub, *flow.take())
            sent = True
        if not held:
            self.holding.discard(sub)
            flow.release()
        return sent

    def pump_all(self) -> bool:
        """:meth:`pump` every holding subscription without flushing (the caller
        writes); True if anything was sent."""
        sent = False
        for sub in list(self.holding):
            flow = sub.flow
            if flow is None or not flow.held:  # it ended: its flow let go
                self.holding.discard(sub)
            elif flow.credit > 0:
                sent = self.pump(sub, flow, False) or sent
        return sent

    def stalled(self, now: float, timeout: float) -> SubscriptionEntry | None:
        """A subscription that has held events without credit coming back for
        more than ``timeout`` seconds (loop time ``now``), if any."""
        for sub in list(self.holding):
            flow = sub.flow
            if flow is None or not flow.held:  # it ended: its flow let go
                self.holding.discard(sub)
            elif flow.stalled_since is None:
                flow.stalled_since = now
            elif now - flow.stalled_since > timeout:
                return sub
        return None
