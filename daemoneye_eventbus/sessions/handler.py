"""What a socket session does with each frame its peer sends.

:class:`FrameHandler` turns the frames of an open connection into router
calls (publish, subscribe, unsubscribe, request, reply) and answers (acks,
pongs, statistics),
authenticates the ``Hello`` [protocol §3], and words refusals as non-fatal
``Error`` frames [protocol §7]. The pump around it is
:class:`~daemoneye_eventbus.sessions.socket.SocketSession`.
"""

from __future__ import annotations

import logging
from typing import Final, Protocol

from daemoneye.eventbus.v1 import frames_pb2
from daemoneye.eventbus.v1.control_pb2 import DisconnectReason
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode, Frame
from daemoneye_eventbus.access import PeerCredentials
from daemoneye_eventbus.config import BrokerConfig
from daemoneye_eventbus.errors import (
    EventBusError,
    LocalProtocolError,
    RemoteProtocolError,
)
from daemoneye_eventbus.frames import error_frame
from daemoneye_eventbus.presence import SessionEnd, SessionPresence, check_will, said_goodbye
from daemoneye_eventbus.protocol import (
    MAX_CLIENT_NAME_CHARS,
    PROTOCOL_VERSION,
    Connection,
    State,
    check_hello,
)
from daemoneye_eventbus.router import Endpoint, Router
from daemoneye_eventbus.sessions.base import SessionHost

__all__ = ["FrameHandler", "HandledSession"]

log = logging.getLogger("daemoneye_eventbus.broker")

_CLOSING_STATES: Final = (State.CLOSING, State.CLOSED)
# Error messages sent to peers are cut to this many characters.
_MAX_ERROR_MESSAGE: Final = 512


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _client_error(error: frames_pb2.Error) -> SessionEnd:
    """The end of a session whose client reported a fatal error: no goodbye."""
    detail = f"the client reported a fatal error: {error.message}"
    return SessionEnd(DisconnectReason.DISCONNECT_REASON_CONNECTION_LOST, detail=detail[:512])


class HandledSession(Protocol):
    """What the handler needs of its socket session."""

    host: SessionHost
    config: BrokerConfig
    router: Router
    endpoint: Endpoint
    conn: Connection
    client_name: str
    accepts_batches: bool
    #: When the handshake completed, the checked last will, how it ended.
    presence: SessionPresence

    @property
    def session_id(self) -> str: ...

    @property
    def component(self) -> str: ...

    @property
    def peer(self) -> PeerCredentials | None: ...

    def send(self, frame: Frame) -> None: ...

    def grant(self, subscription_id: int, events: int) -> None: ...

    def handshake_complete(self) -> None: ...


class FrameHandler:
    """Handles the frames of one socket session."""

    def __init__(self, session: HandledSession) -> None:
        self.session = session
        #: Bytes of the frames held back by the last call (a held publisher's).
        self.held_back = 0

    def handle_received(self) -> None:
        """Handle every frame the connection parsed since the last call."""
        conn = self.session.conn
        # Frames parsed before a goodbye or a violation in this read are handled
        # (their answers are not sent: the connection is closing) [protocol §1];
        # a violation found while *handling* a frame ends the read there.
        closing_already = conn.close_expected
        endpoint = self.session.endpoint
        self.held_back = 0
        frames = conn.events_received()
        for index, frame in enumerate(frames):
            if not closing_already and conn.state in _CLOSING_STATES:
                break
            if endpoint.held_by and not conn.close_expected:
                # A lossless subscriber holds this publisher: the rest waits,
                # except credit, which only ever lets deliveries go on.
                kept = []
                for held in frames[index:]:
                    if held.WhichOneof("kind") == "credit":
                        self.session.grant(held.credit.subscription_id, held.credit.events)
                    else:
                        kept.append(held)
                        self.held_back += held.ByteSize()
                conn.hold_back(kept)
                break
            try:
                self.handle(frame)
            except RemoteProtocolError as exc:
                conn.fail(exc)
            except LocalProtocolError as exc:  # a bug here must not take the broker down
                log.exception("session %s: internal error", self.session.session_id)
                conn.fail(
                    RemoteProtocolError(f"internal error: {exc}", ErrorCode.ERROR_CODE_INTERNAL)
                )
            except EventBusError as exc:  # refused by the router: the connection stays
                self.refuse(exc, frame)
        if conn.error is not None:
            log.info("session %s: protocol violation: %s", self.session.session_id, conn.error)

    def handle(self, frame: Frame) -> None:
        """Act on one frame from the peer; raises the router's typed refusals."""
        kind = frame.WhichOneof("kind")
        if kind == "publish_batch":
            self.session.router.route(self.session.endpoint, frame.publish_batch)
        elif kind == "publish":
            self.session.router.route(self.session.endpoint, frame.publish)
        elif kind == "credit":
            self.session.grant(frame.credit.subscription_id, frame.credit.events)
        elif kind == "request":
            self.session.router.requests.request(self.session.endpoint, frame.request)
        elif kind == "reply":
            self.session.router.requests.reply(self.session.endpoint, frame.reply)
        elif kind == "subscribe":
            req = frame.subscribe
            flt = req.correlation_filter if req.HasField("correlation_filter") else None
            sub = self.session.router.subscribe(
                self.session.endpoint,
                req.subscription_id,
                req.filter,
                flt,
                req.include_control,
                req.lossless,
                req.window,
                req.respond,
            )
            ack = frames_pb2.SubscribeAck(subscription_id=req.subscription_id)
            if sub.flow is not None:
                ack.window = sub.flow.window
                ack.lossless = sub.flow.lossless
            self.session.send(Frame(subscribe_ack=ack))
            if not req.respond:  # retained events first; a responder takes requests only
                self.session.router.retained.replay(sub)
        elif kind == "unsubscribe":
            sid = frame.unsubscribe.subscription_id
            self.session.router.unsubscribe(self.session.endpoint, sid)
            self.session.send(Frame(unsubscribe_ack=frames_pb2.UnsubscribeAck(subscription_id=sid)))
        elif kind == "ping":
            self.session.send(Frame(pong=frames_pb2.Pong(nonce=frame.ping.nonce)))
        elif kind == "pong":
            pass  # liveness is noted for every frame received
        elif kind == "hello":
            self._hello(frame.hello)
        elif kind == "stats_request":
            stats = self.session.host.statistics().to_proto(
                frame.stats_request.request_id, self.session.config.max_frame_bytes
            )
            if not self.session.endpoint.identity.privileged:
                # Who is connected and what they read is for the agent only.
                del stats.connection_stats[:]
                del stats.subscription_stats[:]
            self.session.send(Frame(stats_response=stats))
        elif kind == "goodbye":
            log.debug("session %s said goodbye: %s", self.session.session_id, frame.goodbye.reason)
            self.session.presence.note(said_goodbye(frame.goodbye.reason))
        elif kind == "error":
            log.info("session %s reported error: %s", self.session.session_id, frame.error.message)
            if frame.error.fatal:  # it leaves without a goodbye: its will stands
                self.session.presence.note(_client_error(frame.error))

    def _hello(self, hello: frames_pb2.Hello) -> None:
        host = self.session.host
        try:
            check_hello(hello)
        except RemoteProtocolError as exc:  # a version this broker does not speak
            host.count_refusal(exc.code, handshake=True)
            raise
        self.session.client_name = hello.client_name[:MAX_CLIENT_NAME_CHARS]
        self.session.accepts_batches = hello.accept_batches
        self.session.endpoint.credit = hello.credit
        claimed = hello.component
        policy = host.policy
        peer = self.session.peer
        executable = None
        if peer is not None and host.listener is not None and policy.needs_executable(claimed):
            executable = host.listener.executable(peer)
        what = "component claim"
        try:
            identity = policy.authenticate(peer, claimed, executable)
            if hello.HasField("last_will"):  # checked as a publish by this identity
                what = "last will"
                will = check_will(self.session.config, identity, hello.last_will)
                self.session.presence.last_will = will
        except EventBusError as exc:
            code = ErrorCode.ValueType(exc.code or ErrorCode.ERROR_CODE_ACCESS_DENIED)
            reason = str(exc) if what == "component claim" else f"{what} refused: {exc}"
            host.count_refusal(code, handshake=True)
            host.audit.record(
                "handshake_refused",
                peer,
                session=self.session.session_id,
                claimed=claimed[:MAX_CLIENT_NAME_CHARS] or "-",
                executable=executable or "-",
                reason=reason,
            )
            raise RemoteProtocolError(reason, code) from None
        self.session.endpoint.authenticate(identity)
        welcome = frames_pb2.Welcome(
            protocol_version=PROTOCOL_VERSION,
            session_id=self.session.session_id,
            limits=self.session.config.limits(),
            component=self.session.component,
            batches=True,
            requests=True,
        )
        self.session.send(Frame(welcome=welcome))
        self.session.handshake_complete()

    def refuse(self, exc: EventBusError, frame: Frame) -> None:
        """Answer a refused request with a non-fatal ``Error`` frame [protocol §7]."""
        code = ErrorCode.ValueType(exc.code or ErrorCode.ERROR_CODE_INTERNAL)
        if not exc.code:  # every refusal names its code: this one is a bug
            log.error("session %s: refusal without an error code: %r", self.session.session_id, exc)
        kind = frame.WhichOneof("kind")
        sub_id = request_id = 0
        topic = ""
        if kind == "request":
            request_id = frame.request.request_id
            topic = frame.request.publish.topic[:256]
        elif kind == "publish":
            topic = frame.publish.topic[:256]
        elif kind == "publish_batch":
            topic = frame.publish_batch.topic[:256]
        elif kind == "subscribe":
            sub_id = frame.subscribe.subscription_id
            topic = frame.subscribe.filter[:256]
        elif kind == "unsubscribe":
            sub_id = frame.unsubscribe.subscription_id
        # Messages quote what the peer sent: keep them short, and within the
        # frame limit however small it is configured.
        message = _shorten(str(exc), _MAX_ERROR_MESSAGE)
        error = error_frame(
            code,
            message,
            fatal=False,
            subscription_id=sub_id,
            topic=topic,
            limit=self.session.conn.max_frame_bytes,
            request_id=request_id,
        )
        self.session.send(error)
