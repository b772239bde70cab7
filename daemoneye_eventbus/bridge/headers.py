"""The NATS headers of a forwarded event, and the correlation of an inbound one.

Pure code: no event loop, no I/O. Every event the bridge forwards carries:

========================================  =============================================
``Nats-Msg-Id``                           ``{host}:{received_at_ns}:{event_id}``
                                          (:func:`~daemoneye_eventbus.bridge.subjects.msg_id`):
                                          JetStream drops a re-sent copy
``Daemoneye-Host``                        the host id
``Daemoneye-Topic``                       the bus topic (the subject is its escaped form)
``Daemoneye-Payload-Type``                the payload's fully qualified protobuf type
``Daemoneye-Event-Id``                    the broker's event id (decimal)
``Daemoneye-Received-At``                 when the broker accepted the event, ns since
                                          the Unix epoch (decimal)
``Daemoneye-Correlation-Id``              correlation metadata, when the event has it:
``Daemoneye-Parent-Correlation-Id``       the ids and the stage percent-encoded (UTF-8,
``Daemoneye-Root-Correlation-Id``         RFC 3986: letters, digits and ``-._~:/@`` read
``Daemoneye-Workflow-Stage``              as they are), the sequence number in decimal,
``Daemoneye-Sequence-Number``             the creation time in RFC 3339, the tags as one
``Daemoneye-Created-At``                  compact JSON object (ASCII)
``Daemoneye-Tags``
========================================  =============================================

The payload is the protobuf payload as the publisher sent it, unchanged.

Inbound control messages may carry the same correlation headers and
``Daemoneye-Payload-Type``; :func:`correlation_from_headers` reads them back
(and refuses what does not parse, :class:`InvalidHeader`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Final
from urllib.parse import quote, unquote

from google.protobuf import timestamp_pb2

from daemoneye.eventbus.v1.correlation_pb2 import CorrelationMetadata
from daemoneye_eventbus.bridge.subjects import msg_id
from daemoneye_eventbus.correlation import MAX_SEQUENCE_NUMBER, validate_metadata
from daemoneye_eventbus.errors import EventBusError

__all__ = [
    "CORRELATION_HEADERS",
    "CREATED_AT",
    "CORRELATION_ID",
    "ERROR",
    "ERROR_MESSAGE",
    "EVENT_ID",
    "HOST",
    "InvalidHeader",
    "MSG_ID",
    "PARENT_CORRELATION_ID",
    "PAYLOAD_TYPE",
    "RECEIVED_AT",
    "ROOT_CORRELATION_ID",
    "SEQUENCE_NUMBER",
    "STATUS",
    "TAGS",
    "TOPIC",
    "WORKFLOW_STAGE",
    "correlation_from_headers",
    "correlation_headers",
    "event_headers",
]

MSG_ID: Final = "Nats-Msg-Id"
HOST: Final = "Daemoneye-Host"
TOPIC: Final = "Daemoneye-Topic"
PAYLOAD_TYPE: Final = "Daemoneye-Payload-Type"
EVENT_ID: Final = "Daemoneye-Event-Id"
RECEIVED_AT: Final = "Daemoneye-Received-At"
CORRELATION_ID: Final = "Daemoneye-Correlation-Id"
PARENT_CORRELATION_ID: Final = "Daemoneye-Parent-Correlation-Id"
ROOT_CORRELATION_ID: Final = "Daemoneye-Root-Correlation-Id"
WORKFLOW_STAGE: Final = "Daemoneye-Workflow-Stage"
SEQUENCE_NUMBER: Final = "Daemoneye-Sequence-Number"
CREATED_AT: Final = "Daemoneye-Created-At"
TAGS: Final = "Daemoneye-Tags"
#: On the bridge's answers to inbound control: ``published``, ``refused`` or ``error``.
STATUS: Final = "Daemoneye-Status"
#: On a refused or failed answer: the bus's error code name (``ACCESS_DENIED`` …).
ERROR: Final = "Daemoneye-Error"
#: On a refused or failed answer: the reason, percent-encoded.
ERROR_MESSAGE: Final = "Daemoneye-Error-Message"

#: Every header that carries correlation metadata.
CORRELATION_HEADERS: Final = (
    CORRELATION_ID,
    PARENT_CORRELATION_ID,
    ROOT_CORRELATION_ID,
    WORKFLOW_STAGE,
    SEQUENCE_NUMBER,
    CREATED_AT,
    TAGS,
)

# Characters left as they are in a percent-encoded header value (besides
# letters, digits and "_.-~", which quote() never encodes).
_SAFE: Final = ":/@"


class InvalidHeader(EventBusError, ValueError):
    """A header of an inbound message does not parse; the message says which."""


def encode_value(value: str) -> str:
    """``value`` percent-encoded: a header value without control characters."""
    return quote(value, safe=_SAFE)


def decode_value(name: str, value: str) -> str:
    """The text of a percent-encoded header value (strict UTF-8)."""
    try:
        return unquote(value, errors="strict")
    except UnicodeDecodeError as exc:
        raise InvalidHeader(f"header {name}: not percent-encoded UTF-8: {exc}") from None


def correlation_headers(meta: CorrelationMetadata) -> dict[str, str]:
    """The headers that carry ``meta``."""
    out = {
        CORRELATION_ID: encode_value(meta.correlation_id),
        ROOT_CORRELATION_ID: encode_value(meta.root_correlation_id),
        SEQUENCE_NUMBER: str(meta.sequence_number),
    }
    if meta.HasField("parent_correlation_id"):
        out[PARENT_CORRELATION_ID] = encode_value(meta.parent_correlation_id)
    if meta.HasField("workflow_stage"):
        out[WORKFLOW_STAGE] = encode_value(meta.workflow_stage)
    if meta.HasField("created_at"):
        out[CREATED_AT] = meta.created_at.ToJsonString()
    if meta.tags:
        out[TAGS] = json.dumps(dict(sorted(meta.tags.items())), separators=(",", ":"))
    return out


def event_headers(
    host: str,
    topic: str,
    payload_type: str,
    event_id: int,
    received_at_ns: int,
    correlation: CorrelationMetadata | None,
) -> dict[str, str]:
    """The headers of one forwarded event (see the module's table)."""
    headers = {
        MSG_ID: msg_id(host, event_id, received_at_ns),
        HOST: host,
        TOPIC: topic,
        PAYLOAD_TYPE: payload_type,
        EVENT_ID: str(event_id),
        RECEIVED_AT: str(received_at_ns),
    }
    if correlation is not None:
        headers.update(correlation_headers(correlation))
    return headers


def _int(name: str, value: str, maximum: int) -> int:
    if not value.isascii() or not value.isdigit():
        raise InvalidHeader(f"header {name}: {value!r} is not a decimal number")
    # Checked on the digits first: int() refuses more than 4300 of them (ValueError).
    if len(value.lstrip("0")) > len(str(maximum)) or int(value) > maximum:
        raise InvalidHeader(f"header {name}: {value[:40]} is above {maximum}")
    return int(value)


def correlation_from_headers(headers: Mapping[str, str] | None) -> CorrelationMetadata | None:
    """The correlation metadata the headers carry, or None if they carry none.

    ``Daemoneye-Correlation-Id`` is required once any correlation header is
    present; the root id defaults to it (a first step). Raises
    :class:`InvalidHeader` if a header does not parse or the metadata breaks
    the bus's rules (sizes, sequence number).
    """
    if not headers or not any(name in headers for name in CORRELATION_HEADERS):
        return None
    if CORRELATION_ID not in headers:
        raise InvalidHeader(f"correlation headers without {CORRELATION_ID}")
    meta = CorrelationMetadata(correlation_id=decode_value(CORRELATION_ID, headers[CORRELATION_ID]))
    root = headers.get(ROOT_CORRELATION_ID)
    meta.root_correlation_id = (
        decode_value(ROOT_CORRELATION_ID, root) if root is not None else meta.correlation_id
    )
    if (parent := headers.get(PARENT_CORRELATION_ID)) is not None:
        meta.parent_correlation_id = decode_value(PARENT_CORRELATION_ID, parent)
    if (stage := headers.get(WORKFLOW_STAGE)) is not None:
        meta.workflow_stage = decode_value(WORKFLOW_STAGE, stage)
    if (number := headers.get(SEQUENCE_NUMBER)) is not None:
        meta.sequence_number = _int(SEQUENCE_NUMBER, number, MAX_SEQUENCE_NUMBER)
    if (created := headers.get(CREATED_AT)) is not None:
        stamp = timestamp_pb2.Timestamp()
        try:
            stamp.FromJsonString(created)
        except ValueError as exc:
            raise InvalidHeader(f"header {CREATED_AT}: not an RFC 3339 time: {exc}") from None
        meta.created_at.CopyFrom(stamp)
    if (tags := headers.get(TAGS)) is not None:
        try:
            parsed = json.loads(tags)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            raise InvalidHeader(f"header {TAGS}: not JSON: {exc}") from None
        if not isinstance(parsed, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in parsed.items()
        ):
            raise InvalidHeader(f"header {TAGS}: not a JSON object of strings")
        try:
            meta.tags.update(parsed)
        except UnicodeEncodeError:  # a lone surrogate: valid JSON, no UTF-8 text
            raise InvalidHeader(f"header {TAGS}: not UTF-8 text") from None
    try:
        validate_metadata(meta)
    except ValueError as exc:
        raise InvalidHeader(f"correlation headers: {exc}") from None
    return meta
