"""What the bridge does with a control message from the fleet: the checks before the bus.

Pure code: no event loop, no I/O. :func:`check_inbound` turns one NATS
message (subject, headers, payload, reply subject) into an
:class:`InboundCommand` for the local bus, or refuses it with a typed error:

1. the subject is ``daemoneye.{host}.control.…`` or ``daemoneye.all.control.…``
   (:func:`~daemoneye_eventbus.bridge.subjects.control_subject_to_topic`),
   else :class:`~daemoneye_eventbus.bridge.subjects.InvalidSubject`;
2. the topic is a control topic the schema declares, else
   :class:`~daemoneye_eventbus.errors.InvalidTopic`;
3. the schema lets the bridge's component publish it (public, or the
   component is among its publishers), else
   :class:`~daemoneye_eventbus.errors.AccessDenied`. A privileged topic also
   needs the component to be privileged in the broker's policy: only the
   broker knows, and refuses the publish if not;
4. ``Daemoneye-Payload-Type``, when given, is the topic's payload type, else
   :class:`~daemoneye_eventbus.errors.PayloadTypeMismatch`;
5. the payload parses as that type and is at most ``max_payload_bytes``, else
   :class:`~daemoneye_eventbus.errors.InvalidPayload`;
6. the correlation headers parse
   (:class:`~daemoneye_eventbus.bridge.headers.InvalidHeader`);
7. a request topic needs a reply subject (a NATS request), and its deadline
   (``Daemoneye-Timeout-Ms``) is at most the bridge's longest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from google.protobuf.message import DecodeError, Message

from daemoneye.eventbus.v1 import registry
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationMetadata
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode
from daemoneye.eventbus.v1.options_pb2 import AccessLevel
from daemoneye_eventbus.bridge.headers import PAYLOAD_TYPE, InvalidHeader, correlation_from_headers
from daemoneye_eventbus.bridge.subjects import control_subject_to_topic
from daemoneye_eventbus.errors import (
    AccessDenied,
    InvalidPayload,
    InvalidTopic,
    PayloadTypeMismatch,
)
from daemoneye_eventbus.registry_runtime import RequestTopic, Topic

__all__ = ["TIMEOUT_MS", "InboundCommand", "check_inbound"]

#: Header of a fleet request: its deadline in milliseconds.
TIMEOUT_MS: Final = "Daemoneye-Timeout-Ms"


@dataclass(frozen=True, slots=True)
class InboundCommand:
    """A checked control message, ready for the local bus."""

    topic: Topic[Any]
    message: Message
    payload: bytes
    correlation: CorrelationMetadata | None
    #: Sent to every host (``daemoneye.all.…``).
    broadcast: bool
    #: A request (its topic declares a reply): answered through NATS.
    request: bool
    #: The request's deadline in seconds (requests only).
    timeout: float


def check_inbound(
    host: str,
    component: str,
    subject: str,
    headers: Mapping[str, str] | None,
    payload: bytes,
    reply: str | None,
    *,
    max_payload_bytes: int,
    default_timeout: float,
    max_timeout: float,
) -> InboundCommand:
    """The local command of one inbound message, or a typed refusal (module doc)."""
    target = control_subject_to_topic(host, subject)
    topic = registry.lookup(target.topic)
    if topic is None or not topic.control:
        raise InvalidTopic(f"{target.topic!r} is no control topic of the schema")
    if topic.access != AccessLevel.ACCESS_LEVEL_PUBLIC and component not in topic.publishers:
        raise AccessDenied(
            f"the schema does not let component {component!r} publish {target.topic!r}",
            code=ErrorCode.ERROR_CODE_ACCESS_DENIED,
        )
    headers = headers or {}
    declared = topic.payload_name
    given = headers.get(PAYLOAD_TYPE)
    if given is not None and given != declared:
        raise PayloadTypeMismatch(
            f"{target.topic!r} carries {declared}, not {given}",
            code=ErrorCode.ERROR_CODE_PAYLOAD_MISMATCH,
        )
    if len(payload) > max_payload_bytes:
        raise InvalidPayload(
            f"payload of {len(payload)} bytes is over the limit of {max_payload_bytes}",
            topic=target.topic,
            payload_type=declared,
            code=ErrorCode.ERROR_CODE_INVALID_PAYLOAD,
        )
    try:
        message = topic.payload_type.FromString(payload)
    except (DecodeError, RecursionError) as exc:
        raise InvalidPayload(
            f"payload does not parse as {declared}: {exc}",
            topic=target.topic,
            payload_type=declared,
            code=ErrorCode.ERROR_CODE_INVALID_PAYLOAD,
        ) from None
    correlation = correlation_from_headers(headers)
    request = isinstance(topic, RequestTopic)
    timeout = default_timeout
    if request:
        if not reply:
            raise InvalidTopic(
                f"{target.topic!r} is a request topic: send a NATS request (with a reply subject)"
            )
        if (raw := headers.get(TIMEOUT_MS)) is not None:
            digits = raw.lstrip("0")
            if not raw.isascii() or not raw.isdigit() or not digits:
                raise InvalidHeader(f"header {TIMEOUT_MS}: {raw!r} is not a positive number")
            # More digits than any deadline needs: capped without int(), which
            # refuses more than 4300 digits (ValueError).
            timeout = max_timeout if len(digits) > 15 else min(int(digits) / 1000, max_timeout)
    return InboundCommand(topic, message, payload, correlation, target.broadcast, request, timeout)
