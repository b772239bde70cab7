"""The wire protocol, sans I/O: bytes in, frames out; frames in, bytes out.

A :class:`Connection` holds the state of one end of a connection and never
touches a socket or an event loop. The asyncio layer feeds it what it reads
(:meth:`Connection.receive_data`, :meth:`Connection.receive_eof`), handles what
it parsed (:meth:`Connection.events_received`), and writes what it produced
(:meth:`Connection.data_to_send`). The rules implemented here are those of
``docs/protocol.md``; comments cite its sections as ``[protocol §N]``.

Framing [protocol §1]: each frame is one serialized ``Frame`` message preceded
by its length as a protobuf varint (the "delimited" form). The declared length
is checked against the limit as soon as the prefix is read, before any byte of
the body is kept.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Final, NoReturn

from google.protobuf.message import DecodeError

from daemoneye.eventbus.v1 import frames_pb2
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode, Frame
from daemoneye_eventbus.errors import (
    AccessDenied,
    EventBusError,
    InvalidCorrelation,
    InvalidTopic,
    LimitExceeded,
    LocalProtocolError,
    PayloadTypeMismatch,
    RemoteProtocolError,
    ServerError,
    UnknownSubscription,
)

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "DELIVER_BATCH_OVERHEAD",
    "DELIVER_OVERHEAD",
    "HANDSHAKE_MAX_FRAME_BYTES",
    "MAX_PREFIX_BYTES",
    "PROTOCOL_VERSION",
    "PublishBatcher",
    "RECEIVABLE",
    "SENDABLE",
    "TRANSITIONS",
    "Connection",
    "Role",
    "State",
    "decode_varint",
    "error_for_code",
    "encode_deliver",
    "encode_deliver_batch",
    "encode_frame",
    "encode_publish",
    "encode_varint",
    "error_frame",
    "publish_body",
    "publish_header",
]

#: The protocol version this implementation speaks [protocol §3].
PROTOCOL_VERSION: Final = 1
#: Default limit on a frame body, in bytes [protocol §1].
DEFAULT_MAX_FRAME_BYTES: Final = 1 << 20
#: Limit on a frame body before the handshake completes [protocol §1].
HANDSHAKE_MAX_FRAME_BYTES: Final = 4096
#: Longest message of an Error frame this side sends, in characters: even in
#: UTF-8 (at most 4 bytes each) it fits the handshake frame limit.
MAX_ERROR_MESSAGE: Final = 512
#: A length prefix is at most 5 bytes: 35 bits cover every allowed length.
MAX_PREFIX_BYTES: Final = 5
#: The most a ``Deliver`` frame adds around the ``Publish`` it carries: the
#: Frame and Publish tags and lengths (1 + 5 and 1 + 5) and the subscription
#: id and sequence fields (1 + 5 and 1 + 10). A broker refuses a publish whose
#: body exceeds ``max_frame_bytes - DELIVER_OVERHEAD`` [protocol §5].
DELIVER_OVERHEAD: Final = 29
#: The most a ``DeliverBatch`` frame adds around the ``PublishBatch`` it
#: carries: the Frame tag (2 bytes: field 16) and length (5), the subscription
#: id and first sequence fields (1 + 5 and 1 + 10), the batch tag and length
#: (1 + 5). A broker refuses a batch whose encoding exceeds
#: ``max_frame_bytes - DELIVER_BATCH_OVERHEAD`` [protocol §5].
DELIVER_BATCH_OVERHEAD: Final = 30


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

# One-byte varints, prebuilt: most lengths, ids and tags on the hot path are
# small. With the continuation bit set, they also make up longer varints.
_ONE_BYTE: Final = tuple(bytes((i,)) for i in range(0x80))
_MORE: Final = tuple(bytes((i | 0x80,)) for i in range(0x80))


def encode_varint(value: int) -> bytes:
    """Encode a non-negative integer as a protobuf varint."""
    if 0 <= value < 0x80:
        return _ONE_BYTE[value]
    if value < 0:
        raise ValueError("a varint cannot be negative")
    if value < 0x4000:  # lengths of most frames
        return _MORE[value & 0x7F] + _ONE_BYTE[value >> 7]
    if value < 0x200000:  # sequence numbers spend most of their life here
        return bytes(((value & 0x7F) | 0x80, ((value >> 7) & 0x7F) | 0x80, value >> 14))
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_varint(data: bytes | bytearray | memoryview, pos: int = 0) -> tuple[int, int] | None:
    """Decode a length prefix at ``pos``: ``(value, next_pos)``, or None if incomplete.

    Raises :class:`RemoteProtocolError` if the prefix is longer than
    :data:`MAX_PREFIX_BYTES` [protocol §1].
    """
    value = 0
    shift = 0
    end = len(data)
    while pos < end:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 7 * MAX_PREFIX_BYTES:
            raise RemoteProtocolError(
                f"length prefix longer than {MAX_PREFIX_BYTES} bytes",
                ErrorCode.ERROR_CODE_FRAME_TOO_LARGE,
            )
    return None


def encode_frame(frame: Frame) -> bytes:
    """Serialize ``frame`` with its length prefix [protocol §1]."""
    body = frame.SerializeToString()
    return encode_varint(len(body)) + body


# Field tags (field number << 3 | wire type) of the frames built by hand below.
# Deliver and DeliverBatch lay out their fields alike: subscription id (1,
# varint), sequence or first sequence (2, varint), the Publish or PublishBatch
# (3, length-delimited).
_TAG_FRAME_DELIVER: Final = b"\x22"  # Frame.deliver = 4, length-delimited
_TAG_FRAME_DELIVER_BATCH: Final = b"\x82\x01"  # Frame.deliver_batch = 16: two bytes
_TAG_DELIVER_SUB: Final = b"\x08"
_TAG_DELIVER_SEQ: Final = b"\x10"
_TAG_DELIVER_PUB: Final = b"\x1a"


def _encode_delivery(frame_tag: bytes, subscription_id: int, sequence: int, body: bytes) -> bytes:
    """A length-prefixed ``Frame`` holding a ``Deliver`` or ``DeliverBatch`` around ``body``."""
    varint = encode_varint
    head = b"".join(
        (
            _TAG_DELIVER_SUB,
            varint(subscription_id),
            _TAG_DELIVER_SEQ,
            varint(sequence),
            _TAG_DELIVER_PUB,
            varint(len(body)),
        )
    )
    inner_len = len(head) + len(body)
    inner_prefix = varint(inner_len)
    body_len = len(frame_tag) + len(inner_prefix) + inner_len
    return b"".join((varint(body_len), frame_tag, inner_prefix, head, body))


def encode_deliver(subscription_id: int, sequence: int, publish: bytes) -> bytes:
    """A length-prefixed ``Frame(deliver=Deliver(...))`` around an encoded ``Publish``.

    The broker forwards the publisher's event without decoding its payload or
    re-encoding the ``Publish`` for every subscriber [protocol §5]; the bytes
    are exactly what ``encode_frame`` would produce for the same message.
    """
    return _encode_delivery(_TAG_FRAME_DELIVER, subscription_id, sequence, publish)


def encode_deliver_batch(subscription_id: int, first_sequence: int, batch: bytes) -> bytes:
    """A length-prefixed ``Frame(deliver_batch=DeliverBatch(...))`` around an encoded
    ``PublishBatch``, byte-identical to :func:`encode_frame` of the same message.

    Every subscriber of a batch gets the same ``batch`` bytes; only this
    header differs [protocol §5].
    """
    return _encode_delivery(_TAG_FRAME_DELIVER_BATCH, subscription_id, first_sequence, batch)


# Field tags of Publish (numbers 1-4) and of Frame.publish (3), for encode_publish.
# PublishBatch numbers its fields the same way (payloads is the repeated 4).
_TAG_PUB_TOPIC: Final = b"\x0a"
_TAG_PUB_CORRELATION: Final = b"\x12"
_TAG_PUB_TYPE: Final = b"\x1a"
_TAG_PUB_PAYLOAD: Final = b"\x22"
_TAG_FRAME_PUBLISH: Final = b"\x1a"


def publish_header(topic: str, payload_type: str) -> tuple[bytes, bytes]:
    """The encoded topic and payload-type fields of a ``Publish``, for :func:`encode_publish`.

    A publisher computes them once per topic.
    """
    t = topic.encode()
    p = payload_type.encode()
    # proto3 leaves empty strings and bytes out of the encoding; so do we.
    return (
        _TAG_PUB_TOPIC + encode_varint(len(t)) + t if t else b"",
        _TAG_PUB_TYPE + encode_varint(len(p)) + p if p else b"",
    )


def publish_body(
    header: tuple[bytes, bytes], payload: bytes, correlation: bytes | None = None
) -> bytes:
    """An encoded ``Publish`` message (no frame around it), built without messages.

    ``header`` comes from :func:`publish_header`, ``correlation`` is a
    serialized ``CorrelationMetadata`` (or None for none). Fields come in
    field-number order, as protobuf writes them.
    """
    topic_field, type_field = header
    parts = [topic_field]
    if correlation is not None:
        parts += (_TAG_PUB_CORRELATION, encode_varint(len(correlation)), correlation)
    parts.append(type_field)
    if payload:
        parts += (_TAG_PUB_PAYLOAD, encode_varint(len(payload)), payload)
    return b"".join(parts)


def encode_publish(
    header: tuple[bytes, bytes], payload: bytes, correlation: bytes | None = None
) -> bytes:
    """A length-prefixed ``Frame(publish=Publish(...))`` around :func:`publish_body`.

    The bytes equal ``encode_frame`` of the same frame.
    """
    varint = encode_varint
    inner = publish_body(header, payload, correlation)
    inner_prefix = varint(len(inner))
    return b"".join(
        (varint(1 + len(inner_prefix) + len(inner)), _TAG_FRAME_PUBLISH, inner_prefix, inner)
    )


_TAG_FRAME_PUBLISH_BATCH: Final = b"\x7a"  # Frame.publish_batch = 15
#: The tag and length of a payload field, by payload length, as they are needed.
_PAYLOAD_PREFIXES: Final[dict[int, bytes]] = {}
#: Lengths below this have their prefix cached (at most 16,384 entries).
_PREFIX_CACHE_BELOW: Final = 0x4000


def _payload_prefix(length: int) -> bytes:
    """The tag and length of a ``PublishBatch.payloads`` field of ``length`` bytes."""
    prefix = _PAYLOAD_PREFIXES.get(length)
    if prefix is None:
        prefix = _TAG_PUB_PAYLOAD + encode_varint(length)
        if length < _PREFIX_CACHE_BELOW:
            _PAYLOAD_PREFIXES[length] = prefix
    return prefix


def _frame_publish_batch(inner: bytes) -> bytes:
    """The length-prefixed ``Frame`` around an encoded ``PublishBatch``."""
    inner_prefix = encode_varint(len(inner))
    return b"".join(
        (
            encode_varint(1 + len(inner_prefix) + len(inner)),
            _TAG_FRAME_PUBLISH_BATCH,
            inner_prefix,
            inner,
        )
    )


class PublishBatcher:
    """Gathers consecutive publishes into ``PublishBatch`` frames [protocol §5].

    Events join the open batch while they share its topic, payload type and
    correlation and it stays within ``target`` bytes; otherwise the open batch
    is sealed first. One event alone may use up to ``max_body`` bytes (the
    frame limit less :data:`DELIVER_BATCH_OVERHEAD`), and a batch holds at most
    ``max_events`` events (the broker's ``max_queue_messages``). Sans I/O: the
    caller queues the sealed frames, in order, with
    :meth:`Connection.send_encoded`.
    """

    def __init__(self, max_body: int, target: int, max_events: int) -> None:
        if max_events < 1:
            raise ValueError("a batch must be allowed at least one event")
        self.max_body = max_body
        self.target = min(target, max_body)
        self.max_events = max_events
        self._header: tuple[bytes, bytes] | None = None
        self._correlation: bytes | None = None
        #: The open batch's encoded fields: its header, then each payload
        #: field's tag and length followed by the payload.
        self._parts: list[bytes] = []
        self._events = 0
        self._size = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes of the open batch's body so far (0 when none is open)."""
        return self._size

    @property
    def pending_events(self) -> int:
        return self._events

    def add(
        self, header: tuple[bytes, bytes], payload: bytes, correlation: bytes | None = None
    ) -> tuple[bytes, int] | None:
        """Add one event (``header`` from :func:`publish_header`).

        Returns the sealed ``(frame, events)`` the event could not join, if
        any. Raises :class:`LimitExceeded` for an event that cannot travel even
        alone; nothing changes then.
        """
        n = len(payload)
        prefix = _PAYLOAD_PREFIXES.get(n) or _payload_prefix(n)
        entry = len(prefix) + n
        if (
            self._events
            and header == self._header
            and correlation == self._correlation
            and self._size + entry <= self.target
            and self._events < self.max_events
        ):  # the common case: one more event for the open batch
            parts = self._parts
            parts.append(prefix)
            parts.append(payload)
            self._events += 1
            self._size += entry
            return None
        parts, size = self._first(header, prefix, payload, correlation)
        sealed = self.seal()
        self._parts = parts
        self._header = header
        self._correlation = correlation
        self._events = 1
        self._size = size
        return sealed

    def single(
        self, header: tuple[bytes, bytes], payload: bytes, correlation: bytes | None = None
    ) -> bytes:
        """One event as a ``PublishBatch`` frame of its own, with no batch open.

        For an event that leaves at once; the same limit as :meth:`add`.
        """
        if self._events:
            raise LocalProtocolError("a batch is open: add() the event or seal() first")
        n = len(payload)
        prefix = _PAYLOAD_PREFIXES.get(n) or _payload_prefix(n)
        parts, _ = self._first(header, prefix, payload, correlation)
        return _frame_publish_batch(b"".join(parts))

    def _first(
        self, header: tuple[bytes, bytes], prefix: bytes, payload: bytes, correlation: bytes | None
    ) -> tuple[list[bytes], int]:
        """The encoded fields of a batch holding one event, and their size.

        Raises :class:`LimitExceeded` if the event cannot travel even alone.
        """
        topic_field, type_field = header
        if correlation is None:
            parts = [topic_field, type_field, prefix, payload]
        else:
            corr_field = _TAG_PUB_CORRELATION + encode_varint(len(correlation)) + correlation
            parts = [topic_field, corr_field, type_field, prefix, payload]
        size = sum(map(len, parts))
        if size > self.max_body:
            raise LimitExceeded(
                f"event of about {size} bytes exceeds the limit of {self.max_body} bytes"
            )
        return parts, size

    def seal(self) -> tuple[bytes, int] | None:
        """The open batch as an encoded frame and its event count; None if none is open."""
        events = self._events
        if not events:
            return None
        frame = _frame_publish_batch(b"".join(self._parts))
        self.discard()
        return frame, events

    def discard(self) -> None:
        """Forget the open batch (its connection is gone)."""
        self._parts = []
        self._events = 0
        self._size = 0


_ERRORS: Final[dict[int, Callable[[str], EventBusError]]] = {
    ErrorCode.ERROR_CODE_INVALID_TOPIC: InvalidTopic,
    ErrorCode.ERROR_CODE_INVALID_FILTER: InvalidTopic,
    ErrorCode.ERROR_CODE_INVALID_CORRELATION: InvalidCorrelation,
    ErrorCode.ERROR_CODE_ACCESS_DENIED: AccessDenied,
    ErrorCode.ERROR_CODE_LIMIT_EXCEEDED: LimitExceeded,
    ErrorCode.ERROR_CODE_CONNECTION_LIMIT: LimitExceeded,
    ErrorCode.ERROR_CODE_FRAME_TOO_LARGE: LimitExceeded,
    ErrorCode.ERROR_CODE_PAYLOAD_MISMATCH: PayloadTypeMismatch,
    ErrorCode.ERROR_CODE_UNKNOWN_SUBSCRIPTION: UnknownSubscription,
    ErrorCode.ERROR_CODE_INVALID_SUBSCRIPTION_ID: UnknownSubscription,
}


def error_for_code(code: int, message: str) -> EventBusError:
    """The typed exception for an error code [protocol §7]; :class:`ServerError` by default."""
    factory = _ERRORS.get(code)
    return factory(message) if factory is not None else ServerError(message, code)


def error_frame(
    code: ErrorCode.ValueType,
    message: str,
    *,
    fatal: bool,
    subscription_id: int = 0,
    topic: str = "",
    limit: int | None = None,
) -> Frame:
    """An ``Error`` frame; within ``limit`` bytes of body if one is given.

    Messages quote what the peer sent, so they must still fit a small frame
    limit: the topic goes first (the message names it too), then the end of
    the message (cut at a character boundary and marked with "…").
    """
    frame = Frame(
        error=frames_pb2.Error(
            code=code,
            message=message,
            fatal=fatal,
            subscription_id=subscription_id,
            topic=topic,
        )
    )
    if limit is not None and frame.ByteSize() > limit:
        frame.error.topic = ""
        excess = frame.ByteSize() - limit
        if excess > 0:
            data = message.encode()
            # 8 bytes spare: the cut message's length prefix may shrink, "…" is 3.
            keep = max(0, len(data) - excess - 8)
            frame.error.message = data[:keep].decode(errors="ignore") + "…"
    return frame


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
        self._sendable = SENDABLE.get((self.role, new), frozenset())

    @property
    def frame_limit(self) -> int:
        """The frame size limit in force now [protocol §1]."""
        if self.state is State.CONNECTING:
            return self.handshake_max_frame_bytes
        return self.max_frame_bytes

    # -- receiving -----------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the peer; parse as many whole frames as they hold."""
        if self.close_expected or not data:
            return
        buf = self._buffer
        # Parse straight from ``data`` when no partial frame waits (the common
        # case); otherwise from the buffer it joins.
        if buf:
            buf += data
            src: bytes | bytearray | memoryview = buf
        else:
            src = data
        size = len(src)
        pos = 0
        try:
            while pos < size:
                length = self._body_len
                if length is None:
                    prefix = decode_varint(src, pos)
                    if prefix is None:
                        break
                    length, pos = prefix
                    if not 0 < length <= self.frame_limit:
                        self._refuse_length(length)
                end = pos + length
                if end > size:
                    self._body_len = length
                    break
                self._body_len = None
                closing = self._receive_frame(src[pos:end])
                pos = end
                if closing:
                    break
        except RemoteProtocolError as exc:
            self.fail(exc)
            return
        if self.close_expected:
            # The peer said goodbye (or a fatal error): what follows is never read.
            buf.clear()
            self._body_len = None
        elif src is buf:
            del buf[:pos]
        elif pos < size:
            buf += src[pos:]

    def _refuse_length(self, length: int) -> NoReturn:
        if length == 0:
            raise RemoteProtocolError(
                "empty frame: a frame must set exactly one kind",
                ErrorCode.ERROR_CODE_MALFORMED_FRAME,
            )
        raise RemoteProtocolError(
            f"frame of {length} bytes exceeds the limit of {self.frame_limit} bytes",
            ErrorCode.ERROR_CODE_FRAME_TOO_LARGE,
        )

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
        self._body_len = None
        self._set_state(State.CLOSED)

    def events_received(self) -> list[Frame]:
        """The frames parsed since the last call, in order."""
        events, self._events = self._events, []
        return events

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
        :meth:`PublishBatcher.seal` with ``messages`` events).

        For the client's publish hot path, which builds frames without protobuf
        objects; only while open, and the caller checks the size.
        """
        if self.state is not State.OPEN:
            raise LocalProtocolError(f"cannot send while {self.state.value}")
        self._append(data, messages)

    def send_deliver(self, subscription_id: int, sequence: int, publish: bytes) -> int:
        """Queue a ``Deliver`` frame (broker side, open state); return its size."""
        return self._send_delivery(
            _TAG_FRAME_DELIVER, DELIVER_OVERHEAD, subscription_id, sequence, publish, 1
        )

    def send_deliver_batch(
        self, subscription_id: int, first_sequence: int, batch: bytes, count: int
    ) -> int:
        """Queue a ``DeliverBatch`` frame of ``count`` events; return its size.

        Broker side, open state. The frame counts as ``count`` messages in
        :attr:`buffered_messages`.
        """
        return self._send_delivery(
            _TAG_FRAME_DELIVER_BATCH,
            DELIVER_BATCH_OVERHEAD,
            subscription_id,
            first_sequence,
            batch,
            count,
        )

    def _send_delivery(
        self,
        frame_tag: bytes,
        overhead: int,
        subscription_id: int,
        sequence: int,
        body: bytes,
        count: int,
    ) -> int:
        if self.state is not State.OPEN or self.role is not Role.BROKER:
            raise LocalProtocolError(f"cannot deliver while {self.state.value}")
        if len(body) > self.max_frame_bytes - overhead:
            raise LocalProtocolError(
                f"a delivery of a {len(body)}-byte event or batch would exceed the limit "
                f"of {self.max_frame_bytes} bytes"
            )
        data = _encode_delivery(frame_tag, subscription_id, sequence, body)
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
        self._body_len = None
        if self.state is not State.CLOSED:
            self._set_state(State.CLOSED)
