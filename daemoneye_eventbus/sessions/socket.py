"""One client connection: the asyncio pump around a sans-I/O Connection.

:class:`SocketSession` is the ``asyncio.Protocol`` of one accepted connection,
whatever the transport (asyncio hands Unix sockets and named pipes the same
interface). It feeds the bytes it reads to its
:class:`~daemoneye_eventbus.protocol.Connection`, hands each parsed frame to
the router or answers it, queues deliveries in the connection's bounded
output, and writes that output when the broker's outbox flushes. It also
enforces the session's deadlines: handshake, heartbeat, idle and slow
consumer [protocol §2, §6, §8].

Delivery is at most once by default [protocol §5]: when a subscriber's
queue is full, new events for it are dropped and counted, and its
per-subscription sequence numbers show the gap; the publisher and the other
subscribers are never held up. A subscriber whose socket stays backed up past
``slow_consumer_timeout`` is disconnected. Credit-based subscriptions go
through :class:`~daemoneye_eventbus.sessions.flows.FlowDelivery` instead: a
lossless event that finds no credit is held, and so is its publisher (this
session stops reading it until released, see :meth:`SocketSession.resume`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Final, cast

from daemoneye.eventbus.v1 import frames_pb2
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode, Frame
from daemoneye_eventbus.budget import Account, queued_cost
from daemoneye_eventbus.errors import (
    RemoteProtocolError,
)
from daemoneye_eventbus.presence import SHUTDOWN, SessionPresence
from daemoneye_eventbus.protocol import (
    Connection,
    Role,
    State,
)
from daemoneye_eventbus.router import Endpoint
from daemoneye_eventbus.sessions.base import Session, SessionHost
from daemoneye_eventbus.sessions.gate import ReadGate
from daemoneye_eventbus.sessions.handler import FrameHandler
from daemoneye_eventbus.sessions.output import SocketOutput

__all__ = ["SocketSession"]

log = logging.getLogger("daemoneye_eventbus.broker")

# Transport write buffer bounds: above HIGH the socket counts as backed up and
# frames wait in the session's bounded queue instead.
WRITE_HIGH: Final = 256 * 1024
WRITE_LOW: Final = 64 * 1024
_CLOSING_STATES: Final = (State.CLOSING, State.CLOSED)


class SocketSession(Session, asyncio.Protocol):
    """One client connection of the broker ``host``."""

    def __init__(self, host: SessionHost) -> None:
        self.host = host
        self.config = cfg = host.config
        self.router = host.router
        self.conn = Connection(
            Role.BROKER,
            max_frame_bytes=cfg.max_frame_bytes,
            handshake_max_frame_bytes=cfg.handshake_max_frame_bytes,
        )
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        #: The client decodes DeliverBatch frames (said in its Hello).
        self.accepts_batches = False
        self._paused_since: float | None = None
        self._last_rx = 0.0
        self._ping_sent = False
        self._nonce = itertools.count(1)
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._abort_timer: asyncio.TimerHandle | None = None
        self._handler = FrameHandler(self)
        self._turn_frames = cfg.max_frames_per_turn
        self._budget = budget = host.budget
        self._account = Account(budget)
        self._gate = ReadGate(self._continue)
        self._read = 0  # bytes read this turn, for the rate limit
        #: What is queued for the peer, within which bounds: the router's sink.
        self.output = SocketOutput(self, budget, host.outbox.pending.add, self.resume)
        self.endpoint = Endpoint(self.output, rpc=self.output)
        #: Credit-based subscriptions' deliveries (lossless delivery).
        self.flows = self.output.flows
        #: When the handshake completed, the last will, how the session ended.
        self.presence = SessionPresence()

    # asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's do not subclass asyncio.Transport.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        host = self.host
        listener = host.listener
        if listener is not None:
            self.endpoint.peer = listener.accept(transport)
        loop = asyncio.get_running_loop()
        self._last_rx = loop.time()
        refusal = host.admit(self)
        if refusal is not None:
            code = (
                ErrorCode.ERROR_CODE_SHUTTING_DOWN
                if host.closing
                else ErrorCode.ERROR_CODE_CONNECTION_LIMIT
            )
            host.count_refusal(code)
            host.audit.record("connection_refused", self.peer, reason=refusal)
            self._fail(code, refusal)
            return
        self._handshake_timer = loop.call_later(
            self.config.handshake_timeout, self._handshake_expired
        )

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        # At most max_frames_per_turn frames now; the rest wait for a later
        # turn, with reading paused meanwhile, so that other peers get theirs.
        held = conn.receive_data(data, self._turn_frames)
        self._read += len(data)
        self._last_rx = asyncio.get_running_loop().time()
        self._ping_sent = False
        if held or self._account.input:
            self._charge_input(held)
        self._handle_received()

    def _continue(self) -> None:
        """Handle the next share of input a frame limit or a rate limit held back."""
        self._charge_input(self.conn.parse_more(self._turn_frames))
        self._handle_received()

    def _charge_input(self, held: int) -> None:
        if self._account.hold_input(held):  # past the total: it goes
            limit = self._budget.input_limit
            message = f"the broker's memory for partial frames ({limit} bytes) is used up"
            self.conn.fail(RemoteProtocolError(message, ErrorCode.ERROR_CODE_LIMIT_EXCEEDED))
            self._account.hold_input(0)

    def _charge_output(self) -> None:
        """Charge what waits: frames with their overhead, and the transport's
        buffer (below WRITE_HIGH unless backed up; charged on every tick)."""
        conn, transport = self.conn, self.transport
        held = queued_cost(conn.buffered_bytes, conn.buffered_frames) + self.flows.held_bytes
        self._account.hold_output(held + (transport.get_write_buffer_size() if transport else 0))

    def _handle_received(self) -> None:
        self._handler.handle_received()
        if self._handler.held_back:  # frames a lossless subscriber holds back: input
            self._charge_input(self.conn.buffered_input + self._handler.held_back)
        self.host.outbox.flush()
        self.flush()
        nbytes, self._read = self._read, 0
        self._gate.after_turn(
            self.transport,
            self.conn.input_pending,
            self.endpoint.published,
            nbytes,
            self.endpoint.held_by > 0 and not self.conn.close_expected,
        )

    def eof_received(self) -> bool | None:
        self.conn.receive_eof()
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.close()
        for timer in (self._handshake_timer, self._abort_timer):
            if timer is not None:
                timer.cancel()
        self._gate.cancel()
        self._account.release()
        self.presence.finish(self.conn.error, exc)
        self.host.release(self)  # announces the end (after the last will, if due)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._paused_since = asyncio.get_running_loop().time()
        self._charge_output()

    def resume_writing(self) -> None:
        self._paused_since = None
        self.flows.pump_all()
        self.flush()

    # frames -------------------------------------------------------------------

    def send(self, frame: Frame) -> None:
        """Queue an answer for the peer (nothing once the connection is closing)."""
        # Frames parsed before a violation in the same read get no answer: the
        # connection is already closing with its Error frame [protocol §7].
        conn = self.conn
        if conn.close_expected:
            return
        conn.send(frame)
        # A peer that asks and never reads cannot grow this queue without
        # bound: its replies count with their overhead, and while it is backed
        # up, also against the broker's total.
        held = queued_cost(conn.buffered_bytes, conn.buffered_frames)
        if held > self.config.max_queue_bytes + WRITE_HIGH:
            self._fail(ErrorCode.ERROR_CODE_SLOW_CONSUMER, "peer does not read its replies")
        elif self._paused_since is not None and self._budget.output_full:
            self._fail(
                ErrorCode.ERROR_CODE_SLOW_CONSUMER,
                "peer does not read its replies and the broker's memory for pending "
                "output is used up",
            )

    # delivery ------------------------------------------------------------------

    @property
    def backed_up(self) -> bool:
        """The socket does not take more now (paused past the write buffer's mark)."""
        return self._paused_since is not None

    def grant(self, subscription_id: int, events: int) -> None:
        """A ``Credit`` frame: the client took ``events`` events of the subscription."""
        sub = self.endpoint.subscriptions.get(subscription_id)
        if sub is not None:  # one that just ended: nothing to grant
            self.flows.grant(sub, events)

    def resume(self) -> None:
        """No flow holds this session as a publisher any more: read it again."""
        if self.conn.state is State.OPEN:
            self._gate.release()

    def queue_depth(self) -> tuple[int, int]:
        buffered = self.transport.get_write_buffer_size() if self.transport else 0
        return self.conn.buffered_messages, self.conn.buffered_bytes + buffered

    @property
    def throttled(self) -> float:
        """Seconds reading was paused for this peer's rate limit."""
        return self._gate.throttled

    def handshake_complete(self) -> None:
        """The peer is authenticated and welcome: its rate limit applies, its
        handshake deadline no longer runs, the broker announces it."""
        self._gate.limit(self.endpoint.identity.rate)
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self.presence.connected_at = time.time_ns()
        self.host.opened(self)

    def flush(self) -> None:
        """Write what is queued, unless the socket is backed up."""
        conn = self.conn
        if not (conn.buffered_bytes or conn.close_expected):
            if self._account.output:  # what the transport held may have gone since
                self._charge_output()
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if (self._paused_since is None or conn.close_expected) and self._abort_timer is None:
            data = conn.data_to_send()
            if data:
                transport.write(data)
            # Held events that waited for room, now that the output is written.
            if self.flows.holding and self._paused_since is None and self.flows.pump_all():
                transport.write(conn.data_to_send())
        if self._paused_since is not None or self._account.output:  # else: on the next tick
            self._charge_output()
        if conn.close_expected:
            self._close_transport()

    def _close_transport(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self._abort_timer is not None:
            return
        drain = self.config.drain_timeout
        if self.conn.error is None and transport.can_write_eof():
            # After a goodbye: end our side once the queue is written and keep
            # reading (input is discarded) until the peer closes too, so that a
            # peer still writing reads the goodbye instead of a broken pipe.
            transport.write_eof()
            grace = drain
        else:
            transport.close()
            grace = 1.0 if self.conn.error is not None else drain
        # A peer that never reads (or never closes) is aborted: at once after
        # an error, after the drain deadline on goodbye.
        self._abort_timer = asyncio.get_running_loop().call_later(grace, transport.abort)

    def fail_slow(self, message: str) -> None:
        self._fail(ErrorCode.ERROR_CODE_SLOW_CONSUMER, message)

    def _fail(self, code: ErrorCode.ValueType, message: str) -> None:
        self.conn.fail(RemoteProtocolError(message, code))
        self._paused_since = None  # let the Error frame through the flush
        self.flush()

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if self.conn.state is State.CONNECTING:
            log.info("session %s: handshake deadline passed", self.session_id)
            self.host.count_refusal(ErrorCode.ERROR_CODE_HANDSHAKE_TIMEOUT, handshake=True)
            self._fail(
                ErrorCode.ERROR_CODE_HANDSHAKE_TIMEOUT,
                f"handshake not completed within {self.config.handshake_timeout} s",
            )

    def check(self, now: float) -> None:
        """Heartbeat, idle and slow-consumer checks, called by the housekeeper."""
        cfg = self.config
        if self.conn.state is not State.OPEN:
            return
        self._charge_output()
        stalled = self.flows.stalled(now, cfg.slow_consumer_timeout) if self.flows.holding else None
        if stalled is not None:
            log.warning("session %s: lossless subscriber stalled, disconnecting", self.session_id)
            self._fail(
                ErrorCode.ERROR_CODE_SLOW_CONSUMER,
                f"lossless subscription {stalled.subscription_id} granted no credit for "
                f"{cfg.slow_consumer_timeout} s while its publishers waited",
            )
            return
        if self._paused_since is not None and now - self._paused_since > cfg.slow_consumer_timeout:
            log.warning("session %s: slow consumer, disconnecting", self.session_id)
            self.conn.data_to_send()  # its backlog is dropped, not delivered
            self._fail(
                ErrorCode.ERROR_CODE_SLOW_CONSUMER,
                f"subscriber did not read for {cfg.slow_consumer_timeout} s",
            )
            return
        if self._gate.paused:  # not read on purpose (a turn, a rate limit): not silent
            self._last_rx = now
        silent = now - self._last_rx
        if silent > cfg.idle_timeout:
            self._fail(ErrorCode.ERROR_CODE_IDLE_TIMEOUT, f"peer silent for {silent:.1f} s")
        elif silent > cfg.heartbeat_interval and not self._ping_sent:
            self._ping_sent = True
            self.send(Frame(ping=frames_pb2.Ping(nonce=next(self._nonce))))
            self.flush()

    def goodbye(self, reason: str) -> None:
        """Tell the client the broker is going away, then close after the queue drains."""
        if self.conn.state is State.OPEN:
            self.presence.note(SHUTDOWN)
            self.conn.send(Frame(goodbye=frames_pb2.Goodbye(reason=reason)))
            self._paused_since = None
            self.flush()
        elif not self.conn.close_expected:
            self._fail(ErrorCode.ERROR_CODE_SHUTTING_DOWN, reason)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
