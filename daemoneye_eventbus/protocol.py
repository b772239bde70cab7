"""The wire protocol's connection state machine, sans I/O.

A :class:`Connection` holds the state of one end of a connection and never
touches a socket or an event loop. The asyncio layer feeds it what it reads
(:meth:`Connection.receive_data`, :meth:`Connection.receive_eof`), handles what
it parsed (:meth:`Connection.events_received`), and writes what it produced
(:meth:`Connection.data_to_send`). Everything that affects the state machine
lives here: the states and their transitions, which frames each role may send
and receive in each state, the handshake checks (:func:`check_hello`), and the
mapping between error codes and typed exceptions (:func:`error_for_code`,
:func:`error_from_frame`). The byte-level codec is
:mod:`daemoneye_eventbus.frames`. The rules implemented here are those of
``docs/protocol.md``; comments cite its sections as ``[protocol §N]``.
"""

from __future__ import annotations

import enum
from typing import Final, TypeVar

from google.protobuf.message import DecodeError, Message

from daemoneye.eventbus.v1 import frames_pb2
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationMetadata
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode, Frame
from daemoneye_eventbus.correlation import validate_metadata
from daemoneye_eventbus.errors import (
    AccessDenied,
    EventBusError,
    InvalidCorrelation,
    InvalidPayload,
    InvalidTopic,
    LimitExceeded,
    LocalProtocolError,
    NoResponders,
    PayloadTypeMismatch,
    RemoteProtocolError,
    RequestTimeout,
    ServerError,
    SubscriptionExists,
    UnknownRequest,
    UnknownSubscription,
)
from daemoneye_eventbus.frames import (
    DEFAULT_MAX_FRAME_BYTES,
    HANDSHAKE_MAX_FRAME_BYTES,
    MAX_ERROR_MESSAGE,
    batch_budget,
    decode_varint,
    encode_deliver,
    encode_deliver_batch,
    encode_frame,
    encode_varint,
    error_frame,
    event_budget,
)
from daemoneye_eventbus.registry_runtime import Topic

__all__ = [
    "MAX_CLIENT_NAME_CHARS",
    "PROTOCOL_VERSION",
    "RECEIVABLE",
    "SENDABLE",
    "TRANSITIONS",
    "Connection",
    "Role",
    "State",
    "build_publish",
    "check_hello",
    "error_for_code",
    "error_from_frame",
]

P = TypeVar("P", bound=Message)

#: The protocol version this implementation speaks [protocol §3].
PROTOCOL_VERSION: Final = 1
#: A client name is cut to this many characters [protocol §3].
MAX_CLIENT_NAME_CHARS: Final = 128


class Role(enum.Enum):
    """Which end of the connection this is."""

    CLIENT = "client"
    BROKER = "broker"


class State(enum.Enum):
    """Connection states [protocol §2]."""

    CONNECTING = "connecting"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


#: The legal state transitions, and the only ones [protocol §2].
TRANSITIONS: Final[dict[State, frozenset[State]]] = {
    State.CONNECTING: frozenset({State.OPEN, State.CLOSING, State.CLOSED}),
    State.OPEN: frozenset({State.CLOSING, State.CLOSED}),
    State.CLOSING: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}

_CLIENT_OPEN = frozenset(
    {
        "publish",
        "publish_batch",
        "subscribe",
        "unsubscribe",
        "ping",
        "pong",
        "error",
        "goodbye",
        "stats_request",
        "credit",
        "request",
        "reply",
    }
)
_BROKER_OPEN = frozenset(
    {
        "deliver",
        "deliver_batch",
        "subscribe_ack",
        "unsubscribe_ack",
        "ping",
        "pong",
        "error",
        "goodbye",
        "stats_response",
        "request_deliver",
        "reply_deliver",
    }
)

#: Frame kinds each role may send in each state [protocol §2]. Nothing is sent
#: once the connection is closing, except by :meth:`Connection.fail`.
SENDABLE: Final[dict[tuple[Role, State], frozenset[str]]] = {
    (Role.CLIENT, State.CONNECTING): frozenset({"hello", "goodbye"}),
    (Role.CLIENT, State.OPEN): _CLIENT_OPEN,
    (Role.BROKER, State.CONNECTING): frozenset({"welcome", "error"}),
    (Role.BROKER, State.OPEN): _BROKER_OPEN,
}

#: Frame kinds each role may receive in each state: what the peer may send.
RECEIVABLE: Final[dict[tuple[Role, State], frozenset[str]]] = {
    (Role.BROKER, State.CONNECTING): frozenset({"hello", "goodbye"}),
    (Role.BROKER, State.OPEN): _CLIENT_OPEN,
    (Role.CLIENT, State.CONNECTING): frozenset({"welcome", "error"}),
    (Role.CLIENT, State.OPEN): _BROKER_OPEN,
}


# Frame kinds that may change the state of the receiving end.
_HANDSHAKE_OR_END: Final = frozenset({"hello", "welcome", "goodbye", "error"})


_ERRORS: Final[dict[int, type[EventBusError]]] = {
    ErrorCode.ERROR_CODE_INVALID_TOPIC: InvalidTopic,
    ErrorCode.ERROR_CODE_INVALID_FILTER: InvalidTopic,
    ErrorCode.ERROR_CODE_INVALID_CORRELATION: InvalidCorrelation,
    ErrorCode.ERROR_CODE_ACCESS_DENIED: AccessDenied,
    ErrorCode.ERROR_CODE_LIMIT_EXCEEDED: LimitExceeded,
    ErrorCode.ERROR_CODE_CONNECTION_LIMIT: LimitExceeded,
    ErrorCode.ERROR_CODE_FRAME_TOO_LARGE: LimitExceeded,
    ErrorCode.ERROR_CODE_PAYLOAD_MISMATCH: PayloadTypeMismatch,
    ErrorCode.ERROR_CODE_UNKNOWN_SUBSCRIPTION: UnknownSubscription,
    ErrorCode.ERROR_CODE_INVALID_SUBSCRIPTION_ID: SubscriptionExists,
    ErrorCode.ERROR_CODE_INVALID_PAYLOAD: InvalidPayload,
    ErrorCode.ERROR_CODE_NO_RESPONDERS: NoResponders,
    ErrorCode.ERROR_CODE_REQUEST_TIMEOUT: RequestTimeout,
    ErrorCode.ERROR_CODE_UNKNOWN_REQUEST: UnknownRequest,
}


def error_for_code(code: int, message: str) -> EventBusError:
    """The typed exception for an error code [protocol §7], carrying that code;
    :class:`ServerError` for a code without a class of its own."""
    cls = _ERRORS.get(code)
    return cls(message, code=code) if cls is not None else ServerError(message, code)


def error_from_frame(error: frames_pb2.Error) -> EventBusError:
    """The typed exception for an ``Error`` frame from the broker."""
    name = ErrorCode.Name(error.code) if error.code in ErrorCode.values() else str(error.code)
    return error_for_code(error.code, f"{error.message} ({name})")


def build_publish(
    topic: Topic[P], message: P, correlation: CorrelationMetadata | None = None
) -> frames_pb2.Publish:
    """The ``Publish`` frame body for ``message`` on ``topic``.

    ``message`` must be of the topic's payload type: mypy checks it through
    the registry, and this function checks it again at run time.
    """
    if type(message) is not topic.payload_type:
        raise PayloadTypeMismatch(
            f"topic {topic.name!r} carries {topic.payload_name}, "
            f"not {type(message).DESCRIPTOR.full_name}",
            code=ErrorCode.ERROR_CODE_PAYLOAD_MISMATCH,
        )
    publish = frames_pb2.Publish(
        topic=topic.name,
        payload_type=topic.payload_name,
        payload=message.SerializeToString(),
    )
    if correlation is not None:
        validate_metadata(correlation)
        publish.correlation.CopyFrom(correlation)
    return publish


def check_hello(hello: frames_pb2.Hello) -> None:
    """The broker's checks of a ``Hello`` before its claim is authenticated
    [protocol §3]: raises :class:`RemoteProtocolError` for a version this
    implementation does not speak."""
    if hello.protocol_version != PROTOCOL_VERSION:
        raise RemoteProtocolError(
            f"protocol version {hello.protocol_version} is not supported; "
            f"this broker speaks {PROTOCOL_VERSION}",
            ErrorCode.ERROR_CODE_UNSUPPORTED_VERSION,
        )


def _bad_length(length: int, limit: int) -> RemoteProtocolError:
    """The error for a declared frame length of 0 or over ``limit`` [protocol §1]."""
    if length == 0:
        return RemoteProtocolError(
            "empty frame: a frame must set exactly one kind", ErrorCode.ERROR_CODE_MALFORMED_FRAME
        )
    return RemoteProtocolError(
        f"frame of {length} bytes exceeds the limit of {limit} bytes",
        ErrorCode.ERROR_CODE_FRAME_TOO_LARGE,
    )


def _undeliverable(conn: Connection, size: int) -> LocalProtocolError:
    """Why ``conn`` cannot queue a delivery of a ``size``-byte event or batch."""
    if conn.state is not State.OPEN or conn.role is not Role.BROKER:
        return LocalProtocolError(f"cannot deliver while {conn.state.value}")
    return LocalProtocolError(
        f"a delivery of a {size}-byte event or batch would exceed the limit "
        f"of {conn.max_frame_bytes} bytes"
    )


class Connection:
    """One end of a connection, as a state machine with byte buffers.

    ``max_frame_bytes`` applies once the handshake is complete;
    ``handshake_max_frame_bytes`` before [protocol §1]. A protocol violation by
    the peer queues a fatal ``Error`` frame, moves to ``CLOSING`` and is kept in
    :attr:`error`; the frames parsed before it are still returned by
    :meth:`events_received`. The caller writes :meth:`data_to_send` and closes
    the transport once :attr:`close_expected` is true.
    """

    def __init__(
        self,
        role: Role,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        handshake_max_frame_bytes: int = HANDSHAKE_MAX_FRAME_BYTES,
    ) -> None:
        self.role = role
        self.state = State.CONNECTING
        self.max_frame_bytes = max_frame_bytes
        self.handshake_max_frame_bytes = handshake_max_frame_bytes
        #: The peer's protocol violation, once there was one.
        self.error: RemoteProtocolError | None = None
        self._buffer = bytearray()
        self._body_len: int | None = None
        self._events: list[Frame] = []
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._out_frames = 0
        self._out_messages = 0
        self._hello_seen = False
        self._eof = False
        #: Parsing stopped at a ``max_frames`` limit with input left to parse.
        self.input_pending = False
        #: A broker side that is open: it may queue deliveries.
        self._delivering = False
        #: True once the transport should be closed after writing what is pending.
        self.close_expected = False
        # What may be received and sent in the current state (kept with it).
        self._receivable = RECEIVABLE[role, self.state]
        self._sendable = SENDABLE[role, self.state]

    # -- state ---------------------------------------------------------------

    def _set_state(self, new: State) -> None:
        if new is self.state:
            return
        if new not in TRANSITIONS[self.state]:
            raise LocalProtocolError(f"illegal transition {self.state.value} -> {new.value}")
        self.state = new
        self.close_expected = new is State.CLOSING or new is State.CLOSED
        self._receivable = RECEIVABLE.get((self.role, new), frozenset())
        self._delivering = new is State.OPEN and self.role is Role.BROKER
        self._sendable = SENDABLE.get((self.role, new), frozenset())

    @property
    def frame_limit(self) -> int:
        """The frame size limit in force now [protocol §1]."""
        if self.state is State.CONNECTING:
            return self.handshake_max_frame_bytes
        return self.max_frame_bytes

    # -- receiving -----------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview, max_frames: int = 0) -> int:
        """Feed bytes read from the peer and parse the whole frames they complete:
        all of them, or at most ``max_frames`` (the rest wait in the buffer for
        :meth:`parse_more`, and :attr:`input_pending` is set). Returns the bytes
        of input held in the buffer (a partial frame, or what waits)."""
        buf = self._buffer
        if self.close_expected or not (data or self.input_pending):
            return len(buf)
        # Parse straight from ``data`` when no partial frame waits (the common
        # case); otherwise from the buffer it joins.
        if buf:
            buf += data
            src: bytes | bytearray | memoryview = buf
        else:
            src = data
        self.input_pending = False
        size = len(src)
        pos = 0
        frames = 0
        try:
            while pos < size:
                length = self._body_len
                if length is None:
                    if frames == max_frames and frames:
                        self.input_pending = True  # this turn's share is used up
                        break
                    prefix = decode_varint(src, pos)
                    if prefix is None:
                        break
                    length, pos = prefix
                    if not 0 < length <= self.frame_limit:
                        raise _bad_length(length, self.frame_limit)
                end = pos + length
                if end > size:
                    self._body_len = length
                    break
                self._body_len = None
                closing = self._receive_frame(src[pos:end])
                pos = end
                frames += 1
                if closing:
                    break
        except RemoteProtocolError as exc:
            self.fail(exc)
            return 0
        if self.close_expected:
            # The peer said goodbye (or a fatal error): what follows is never read.
            buf.clear()
            self._body_len = None
            self.input_pending = False
        elif src is buf:
            del buf[:pos]
        elif pos < size:
            buf += src[pos:]
        return len(buf)

    def parse_more(self, max_frames: int = 0) -> int:
        """Parse frames that a ``max_frames`` limit left in the buffer; returns
        the bytes still held, like :meth:`receive_data`."""
        return self.receive_data(b"", max_frames)

    def _receive_frame(self, body: bytes | bytearray | memoryview) -> bool:
        """Decode and check one frame; True if the peer is closing the connection."""
        try:
            # upb parses (and copies out of) any bytes-like object; the stub says bytes.
            frame = Frame.FromString(body)  # type: ignore[arg-type]
        except (DecodeError, RecursionError) as exc:
            raise RemoteProtocolError(
                f"undecodable frame: {exc}", ErrorCode.ERROR_CODE_MALFORMED_FRAME
            ) from None
        kind = frame.WhichOneof("kind")
        if kind not in self._receivable:
            if kind is None:
                raise RemoteProtocolError(
                    "frame sets no known kind", ErrorCode.ERROR_CODE_MALFORMED_FRAME
                )
            raise RemoteProtocolError(
                f"{kind} frame not allowed while {self.state.value}",
                ErrorCode.ERROR_CODE_UNEXPECTED_FRAME,
            )
        if kind in _HANDSHAKE_OR_END:
            return self._state_frame(kind, frame)
        self._events.append(frame)
        return False

    def _state_frame(self, kind: str, frame: Frame) -> bool:
        """A frame that moves the state machine; True if the peer is closing."""
        if kind == "hello":
            if self._hello_seen:
                raise RemoteProtocolError(
                    "second hello frame", ErrorCode.ERROR_CODE_UNEXPECTED_FRAME
                )
            self._hello_seen = True
        elif kind == "welcome":
            self._set_state(State.OPEN)
        elif kind == "goodbye" or frame.error.fatal:
            self._set_state(State.CLOSING)
            self._events.append(frame)
            return True
        self._events.append(frame)
        return False

    def receive_eof(self) -> None:
        """The peer closed its side: the connection is closed."""
        self._eof = True
        self._buffer.clear()
        self.input_pending = False
        self._body_len = None
        self._set_state(State.CLOSED)

    def events_received(self) -> list[Frame]:
        """The frames parsed since the last call, in order."""
        events, self._events = self._events, []
        return events

    def hold_back(self, frames: list[Frame]) -> None:
        """Put back frames not handled yet: returned first next time (input pending)."""
        if frames:
            self._events[:0] = frames
            self.input_pending = True

    @property
    def buffered_input(self) -> int:
        """Bytes of an incomplete frame held in memory."""
        return len(self._buffer)

    # -- sending -------------------------------------------------------------

    def send(self, frame: Frame) -> None:
        """Queue ``frame`` for the peer; raise :class:`LocalProtocolError` if illegal now."""
        kind = frame.WhichOneof("kind")
        if kind is None:
            raise LocalProtocolError("cannot send a frame that sets no kind")
        if kind not in self._sendable:
            raise LocalProtocolError(f"cannot send a {kind} frame while {self.state.value}")
        body = frame.SerializeToString()
        if len(body) > self.max_frame_bytes:
            raise LocalProtocolError(
                f"{kind} frame of {len(body)} bytes exceeds the limit of "
                f"{self.max_frame_bytes} bytes"
            )
        self._append(encode_varint(len(body)) + body)
        if kind == "welcome":
            self._set_state(State.OPEN)
        elif kind == "goodbye" or (kind == "error" and frame.error.fatal):
            self._set_state(State.CLOSING)

    def send_encoded(self, data: bytes, messages: int = 1) -> None:
        """Queue a frame already encoded with its prefix (:func:`encode_publish`,
        :meth:`PublishBatcher.seal` with ``messages`` events): the client's
        publish hot path; only while open, and the caller checks the size."""
        if self.state is not State.OPEN:
            raise LocalProtocolError(f"cannot send while {self.state.value}")
        self._append(data, messages)

    def send_deliver(
        self, subscription_id: int, sequence: int, publish: bytes, suffix: bytes = b""
    ) -> int:
        """Queue a ``Deliver`` frame (broker side, open state), ``suffix`` after its
        ``publish`` (a stamp's event id, time, retained flag); return its size."""
        if self._delivering is not True or len(publish) > event_budget(self.max_frame_bytes):
            raise _undeliverable(self, len(publish))
        data = encode_deliver(subscription_id, sequence, publish, suffix)
        self._append(data)
        return len(data)

    def send_deliver_batch(
        self, subscription_id: int, first: int, batch: bytes, count: int, suffix: bytes = b""
    ) -> int:
        """Queue a ``DeliverBatch`` frame of ``count`` events (so many in
        :attr:`buffered_messages`), like :meth:`send_deliver`; return its size."""
        if self._delivering is not True or len(batch) > batch_budget(self.max_frame_bytes):
            raise _undeliverable(self, len(batch))
        data = encode_deliver_batch(subscription_id, first, batch, suffix)
        self._append(data, count)
        return len(data)

    def _append(self, data: bytes, messages: int = 1) -> None:
        self._out.append(data)
        self._out_bytes += len(data)
        self._out_frames += 1
        self._out_messages += messages

    def fail(self, exc: RemoteProtocolError) -> None:
        """Record the peer's violation, queue a fatal ``Error`` frame and start closing."""
        if self.close_expected:
            return
        self.error = exc
        self._buffer.clear()
        self.input_pending = False
        self._body_len = None
        code = ErrorCode.ValueType(exc.code)
        # Short enough for the peer's limit in force [protocol §1].
        message = str(exc)[:MAX_ERROR_MESSAGE]
        self._append(encode_frame(error_frame(code, message, fatal=True, limit=self.frame_limit)))
        self._set_state(State.CLOSING)

    def data_to_send(self) -> bytes:
        """Everything queued for the peer since the last call, as one chunk."""
        if not self._out:
            return b""
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        self._out_bytes = 0
        self._out_frames = 0
        self._out_messages = 0
        return data

    @property
    def buffered_bytes(self) -> int:
        """Bytes queued for the peer and not yet taken by :meth:`data_to_send`."""
        return self._out_bytes

    @property
    def buffered_frames(self) -> int:
        """Frames queued for the peer and not yet taken by :meth:`data_to_send`."""
        return self._out_frames

    @property
    def buffered_messages(self) -> int:
        """Like :attr:`buffered_frames`, with a batch counting once per event it holds."""
        return self._out_messages

    def close(self) -> None:
        """The transport is closed: no more frames either way."""
        self._buffer.clear()
        self.input_pending = False
        self._body_len = None
        if self.state is not State.CLOSED:
            self._set_state(State.CLOSED)
