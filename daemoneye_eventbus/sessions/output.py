"""What a socket session queues for its peer, and within which bounds.

:class:`SocketOutput` is the delivery half of a
:class:`~daemoneye_eventbus.sessions.socket.SocketSession`: it takes the
router's deliveries for the connection (it is the session endpoint's
:class:`~daemoneye_eventbus.subscriptions.Sink`: ``enqueue``, ``resume``), keeps them within the
session's queue bounds and the broker's total, and encodes them into the
connection's output (``DeliverBatch`` frames, or one ``Deliver`` per event for
a client without batches). At most once by default: what does not fit is
dropped [protocol §5]. Credit-based subscriptions go through its
:class:`~daemoneye_eventbus.sessions.flows.FlowDelivery` instead
[protocol §5, "Lossless delivery"]. It is the endpoint's
:class:`~daemoneye_eventbus.subscriptions.RequestSink` too: requests for its
responder subscriptions are queued within the same bounds as events, and the
answers to its own requests like the session's other replies
[protocol §5, "Request/reply"]. Writing the output is the session's (``flush``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from daemoneye.eventbus.v1 import frames_pb2
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode, Frame
from daemoneye_eventbus.budget import MemoryBudget
from daemoneye_eventbus.config import BrokerConfig
from daemoneye_eventbus.errors import EventBusError
from daemoneye_eventbus.flow import DROPPED, QUEUED, Published
from daemoneye_eventbus.frames import error_frame, publish_body, publish_header
from daemoneye_eventbus.protocol import Connection, State
from daemoneye_eventbus.router import SubscriptionEntry
from daemoneye_eventbus.sessions.flows import FlowDelivery
from daemoneye_eventbus.stamps import Stamp

__all__ = ["OutputOwner", "SocketOutput"]


class OutputOwner(Protocol):
    """The socket session whose output this is."""

    conn: Connection
    config: BrokerConfig
    #: The client decodes DeliverBatch frames (said in its Hello).
    accepts_batches: bool

    @property
    def backed_up(self) -> bool:
        """The socket does not take more now (its write buffer is over the mark)."""
        ...

    def flush(self) -> None: ...

    def send(self, frame: Frame) -> None:
        """Queue a reply for the peer (within the bounds of replies)."""
        ...

    def fail_slow(self, message: str) -> None:
        """End the connection with a fatal ``SLOW_CONSUMER`` error."""
        ...


class SocketOutput:
    """The deliveries of one socket session: bounds, drops, credit, encoding."""

    __slots__ = ("_budget", "_mark_pending", "flows", "resume", "session")

    def __init__(
        self,
        session: OutputOwner,
        budget: MemoryBudget,
        mark_pending: Callable[[OutputOwner], None],
        resume: Callable[[], None],
    ) -> None:
        self.session = session
        self._budget = budget
        self._mark_pending = mark_pending
        #: Credit-based subscriptions' deliveries (lossless delivery).
        self.flows = FlowDelivery(self)
        #: The session's endpoint is no longer held as a publisher (``Sink.resume``).
        self.resume = resume

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
        """The router's delivery of ``count`` events for ``sub`` (see ``Sink``)."""
        flow = sub.flow
        if flow is not None:
            return self.flows.enqueue(sub, flow, message, data, first, count, lossless, stamp)
        if not self._make_room(count, len(data)):
            return DROPPED
        self.deliver(sub, message, data, first, count, stamp)
        return QUEUED

    def deliver_at_most_once(
        self,
        sub: SubscriptionEntry,
        message: Published,
        data: bytes,
        first: int,
        count: int,
        stamp: Stamp,
    ) -> bool:
        """Queue the events if they fit the queue's bounds (flushing if need be)."""
        if not self._make_room(count, len(data)):
            return False
        self.deliver(sub, message, data, first, count, stamp)
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
        """Queue the events in the connection's output (the bounds are the caller's)."""
        session = self.session
        conn = session.conn
        sid = sub.subscription_id
        if isinstance(message, frames_pb2.Publish):
            conn.send_deliver(sid, first, data, stamp.suffix)
        elif session.accepts_batches:
            conn.send_deliver_batch(sid, first, data, count, stamp.suffix)
        else:
            # A client without batch support gets one Deliver per event.
            header = publish_header(message.topic, message.payload_type)
            corr = (
                message.correlation.SerializeToString() if message.HasField("correlation") else None
            )
            for index, payload in enumerate(message.payloads):
                body = publish_body(header, payload, corr)
                conn.send_deliver(sid, first + index, body, stamp.at(index).suffix)
        self._mark_pending(session)

    def deliver_request(self, sub: SubscriptionEntry, deliver: frames_pb2.RequestDeliver) -> bool:
        """A request for the responder subscription ``sub``: queued within the
        bounds of events (``RequestSink``); False if it does not fit."""
        frame = Frame(request_deliver=deliver)
        if not self._make_room(1, frame.ByteSize()):
            return False
        self.session.conn.send(frame)
        self._mark_pending(self.session)
        return True

    def deliver_reply(self, reply: frames_pb2.ReplyDeliver) -> None:
        """The answer to one of the peer's requests, queued like its other replies."""
        self.session.send(Frame(reply_deliver=reply))
        self._mark_pending(self.session)

    def request_failed(self, request_id: int, error: EventBusError) -> None:
        """One of the peer's requests ended without a reply: a non-fatal ``Error``."""
        session = self.session
        code = ErrorCode.ValueType(error.code)
        limit = session.conn.max_frame_bytes
        session.send(error_frame(code, str(error), fatal=False, request_id=request_id, limit=limit))
        self._mark_pending(session)

    @property
    def delivering(self) -> bool:
        return self.session.conn.state is State.OPEN

    def room(self, size: int, may_flush: bool) -> bool:
        """Whether ``size`` more bytes of credit-based events fit the output
        (credit bounds their number; the queue's bytes and the broker's total
        bound their size while the socket is backed up)."""
        session = self.session
        conn = session.conn
        most = session.config.max_queue_bytes
        if session.backed_up:
            return not self._budget.output_full and conn.buffered_bytes + size <= most
        if conn.buffered_bytes + size <= most or not conn.buffered_bytes:
            return True
        if may_flush:
            session.flush()
        return not session.backed_up and conn.buffered_bytes + size <= most

    def may_hold(self) -> bool:
        """Held events count in the broker's pending output: with that used up,
        a lossless subscriber that falls behind is the one that goes."""
        if not self._budget.output_full:
            return True
        self.session.fail_slow(
            "lossless subscriber fell behind while the broker's memory for pending output "
            "is used up"
        )
        return False

    def _make_room(self, count: int, size: int) -> bool:
        """Whether ``count`` more events (``size`` bytes) fit the queue, flushing if need be."""
        session = self.session
        conn = session.conn
        cfg = session.config
        if conn.state is not State.OPEN:
            return False
        if session.backed_up and self._budget.output_full:
            return False  # backed up while the broker's total is used up: drop
        if (
            conn.buffered_messages + count > cfg.max_queue_messages
            or conn.buffered_bytes + size > cfg.max_queue_bytes
        ):
            # The queue holds what waits while the socket is backed up; if it
            # is not, hand the batch to the socket now instead of dropping.
            if session.backed_up:
                return False
            session.flush()
            if session.backed_up and conn.buffered_messages + count > cfg.max_queue_messages:
                return False
        return True
