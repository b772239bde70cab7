"""The frame codec, sans I/O and without state: bytes of frames, and their size budget.

Framing [protocol §1]: each frame is one serialized ``Frame`` message preceded
by its length as a protobuf varint (the "delimited" form). The hot-path frames
(``Publish``, ``PublishBatch``, ``Deliver``, ``DeliverBatch``) are built here
by hand from cached fields, byte-identical to what protobuf would write, so
that the broker forwards a publisher's bytes without re-encoding them
[protocol §5]. :func:`event_budget` and :func:`batch_budget` are the one place
that says how large an event or a batch may be under a frame limit.

The connection state machine that uses this codec is in
:mod:`daemoneye_eventbus.protocol`.
"""

from __future__ import annotations

from typing import Final

from daemoneye.eventbus.v1 import frames_pb2
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode, Frame
from daemoneye_eventbus.errors import LimitExceeded, LocalProtocolError, RemoteProtocolError

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "DELIVER_BATCH_OVERHEAD",
    "DELIVER_OVERHEAD",
    "HANDSHAKE_MAX_FRAME_BYTES",
    "MAX_ERROR_MESSAGE",
    "MAX_PREFIX_BYTES",
    "PublishBatcher",
    "REQUEST_DELIVER_OVERHEAD",
    "batch_budget",
    "decode_varint",
    "encode_deliver",
    "encode_deliver_batch",
    "encode_frame",
    "encode_publish",
    "encode_varint",
    "error_frame",
    "event_budget",
    "publish_body",
    "publish_header",
    "request_budget",
]

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
#: id and sequence fields (1 + 5 and 1 + 10), and the event id, receive time and
#: retained fields after it (1 + 10, 1 + 8 and 2). A broker refuses a publish
#: whose body exceeds ``max_frame_bytes - DELIVER_OVERHEAD`` [protocol §5].
DELIVER_OVERHEAD: Final = 51
#: The most a ``DeliverBatch`` frame adds around the ``PublishBatch`` it
#: carries: the Frame tag (2 bytes: field 16) and length (5), the subscription
#: id and first sequence fields (1 + 5 and 1 + 10), the batch tag and length
#: (1 + 5), the first event id and receive time (1 + 10 and 1 + 8). A broker
#: refuses a batch whose encoding exceeds ``max_frame_bytes -
#: DELIVER_BATCH_OVERHEAD`` [protocol §5].
DELIVER_BATCH_OVERHEAD: Final = 50
#: The most a ``RequestDeliver`` frame adds around the request's ``Publish``:
#: the Frame tag and length (1 + 5), the subscription id (1 + 5), the token
#: (1 + 10), the Publish tag and length (1 + 5), ``remaining_ms`` (1 + 5), the
#: event id (1 + 10), the receive time (1 + 8) and the requester's component
#: (1 + 2 + 512: 128 characters of up to 4 bytes). A broker refuses a request
#: whose ``Publish`` exceeds ``max_frame_bytes - REQUEST_DELIVER_OVERHEAD``
#: [protocol §5, "Request/reply"].
REQUEST_DELIVER_OVERHEAD: Final = 570


def event_budget(frame_limit: int) -> int:
    """The largest encoded ``Publish`` (one event) that a broker can deliver
    within ``frame_limit`` bytes of frame body [protocol §5]."""
    return frame_limit - DELIVER_OVERHEAD


def batch_budget(frame_limit: int) -> int:
    """The largest encoded ``PublishBatch`` that a broker can deliver within
    ``frame_limit`` bytes of frame body [protocol §5]."""
    return frame_limit - DELIVER_BATCH_OVERHEAD


def request_budget(frame_limit: int) -> int:
    """The largest encoded request ``Publish`` that a broker can deliver to a
    responder within ``frame_limit`` bytes of frame body."""
    return frame_limit - REQUEST_DELIVER_OVERHEAD


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


def _encode_delivery(
    frame_tag: bytes, subscription_id: int, sequence: int, body: bytes, suffix: bytes
) -> bytes:
    """A length-prefixed ``Frame`` holding a ``Deliver`` or ``DeliverBatch`` around
    ``body``, followed by the encoded fields after it (``suffix``: the event id,
    receive time and retained flag, see :mod:`daemoneye_eventbus.stamps`)."""
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
    inner_len = len(head) + len(body) + len(suffix)
    inner_prefix = varint(inner_len)
    body_len = len(frame_tag) + len(inner_prefix) + inner_len
    return b"".join((varint(body_len), frame_tag, inner_prefix, head, body, suffix))


def encode_deliver(
    subscription_id: int, sequence: int, publish: bytes, suffix: bytes = b""
) -> bytes:
    """A length-prefixed ``Frame(deliver=Deliver(...))`` around an encoded ``Publish``.

    The broker forwards the publisher's event without decoding its payload or
    re-encoding the ``Publish`` for every subscriber [protocol §5]; the bytes
    are exactly what ``encode_frame`` would produce for the same message.
    ``suffix`` holds the fields after ``publish`` (:attr:`Stamp.suffix
    <daemoneye_eventbus.stamps.Stamp.suffix>`), encoded once per event.
    """
    return _encode_delivery(_TAG_FRAME_DELIVER, subscription_id, sequence, publish, suffix)


def encode_deliver_batch(
    subscription_id: int, first_sequence: int, batch: bytes, suffix: bytes = b""
) -> bytes:
    """A length-prefixed ``Frame(deliver_batch=DeliverBatch(...))`` around an encoded
    ``PublishBatch``, byte-identical to :func:`encode_frame` of the same message.

    Every subscriber of a batch gets the same ``batch`` bytes; only this
    header differs [protocol §5].
    """
    return _encode_delivery(
        _TAG_FRAME_DELIVER_BATCH, subscription_id, first_sequence, batch, suffix
    )


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


def error_frame(
    code: ErrorCode.ValueType,
    message: str,
    *,
    fatal: bool,
    subscription_id: int = 0,
    topic: str = "",
    limit: int | None = None,
    request_id: int = 0,
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
            request_id=request_id,
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
