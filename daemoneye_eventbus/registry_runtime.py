"""The hand-written runtime of the generated topic registries.

A generated registry (``generated/daemoneye/eventbus/v1/registry.py``, written
by ``codegen/render.py``) holds only data: one :class:`Topic` or
:class:`TopicTemplate` constant per topic the schema declares (a
:class:`RequestTopic` or :class:`RequestTopicTemplate`, which also carry the
reply type, for a topic declared with a ``reply``), builder
functions for the templates, the ``TOPICS`` / ``TEMPLATES`` / ``ACCESS_TABLE``
tables and a :class:`TopicRegistry` over them. It imports the classes from
here, so that they are ordinary source: linted, type-checked and tested like
the rest of the package, not text templates inside the generator.

This module imports only :mod:`google.protobuf` and, for type checking only,
the generated ``daemoneye.eventbus.v1.options_pb2`` (for ``AccessLevel``). In
particular it does not import :mod:`daemoneye_eventbus.topics` or anything
else of the bus, so importing a registry stays cheap.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

from google.protobuf.message import Message

if TYPE_CHECKING:
    from daemoneye.eventbus.v1.correlation_pb2 import CorrelationMetadata
    from daemoneye.eventbus.v1.options_pb2 import AccessLevel

__all__ = [
    "Publication",
    "RequestTopic",
    "RequestTopicTemplate",
    "Topic",
    "TopicRegistry",
    "TopicTemplate",
]

#: The payload message type of a topic (the request type of a request topic).
P = TypeVar("P", bound=Message)
#: The reply message type of a request topic.
R = TypeVar("R", bound=Message)


class Publication(NamedTuple, Generic[P]):
    """A message on its topic, with its correlation: what ``topic(message)`` gives."""

    topic: Topic[P]
    message: P
    correlation: CorrelationMetadata | None


# One topic level as a template parameter may take it: no dot, no wildcard.
_LEVEL = re.compile(r"[A-Za-z0-9_-]+\Z")


@dataclass(frozen=True, slots=True)
class Topic(Generic[P]):
    """A concrete topic and what the schema declares for it.

    The payload type is part of the type, so publishing the wrong message on a
    topic is a type error.
    """

    name: str
    payload_type: type[P]
    access: AccessLevel.ValueType
    publishers: frozenset[str]
    subscribers: frozenset[str]
    control: bool
    #: The template this topic was built from, if any.
    template: str | None = None
    #: Declared lossless: its events wait for a subscriber that falls behind
    #: instead of being dropped (for clients that grant credit).
    lossless: bool = False
    #: Declared retained: the broker keeps its last event and gives it first to
    #: each new subscription that may read it.
    retained: bool = False

    @property
    def payload_name(self) -> str:
        """Fully qualified name of the payload message type."""
        return self.payload_type.DESCRIPTOR.full_name

    def __call__(
        self, message: P, /, *, correlation: CorrelationMetadata | None = None
    ) -> Publication[P]:
        """``message`` on this topic: raises :class:`TypeError` unless it is of the
        topic's payload type.

        The typed ``publish`` methods take their arguments after the topic as this
        call does (``client.publish(topic, message, correlation=…)``), so that mypy
        checks them against this signature: a wrong message is reported as an
        argument of the wrong type, naming the payload type the topic expects.
        """
        if type(message) is not self.payload_type:
            raise TypeError(
                f"topic {self.name!r} carries {self.payload_name}, not {type(message).__qualname__}"
            )
        return Publication(self, message, correlation)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class TopicTemplate(Generic[P]):
    """A parametrised topic such as ``control.collector.task.{type}.{id}``.

    Each parameter stands for exactly one topic level.
    """

    pattern: str
    parameters: tuple[str, ...]
    payload_type: type[P]
    access: AccessLevel.ValueType
    publishers: frozenset[str]
    subscribers: frozenset[str]
    control: bool
    #: Declared lossless (see :attr:`Topic.lossless`).
    lossless: bool = False
    #: Declared retained (see :attr:`Topic.retained`).
    retained: bool = False

    @property
    def payload_name(self) -> str:
        """Fully qualified name of the payload message type."""
        return self.payload_type.DESCRIPTOR.full_name

    @property
    def filter(self) -> str:
        """A subscription filter matching every topic built from this template."""
        return ".".join("+" if lv.startswith("{") else lv for lv in self.pattern.split("."))

    def build(self, **values: str) -> Topic[P]:
        """Build the concrete topic; each value must be one valid topic level."""
        return Topic(*self._fields(values))

    def _fields(
        self, values: Mapping[str, str]
    ) -> tuple[
        str, type[P], AccessLevel.ValueType, frozenset[str], frozenset[str], bool, str, bool, bool
    ]:
        """The fields of the concrete topic built with ``values``, in :class:`Topic`'s order."""
        return (
            self._name(values),
            self.payload_type,
            self.access,
            self.publishers,
            self.subscribers,
            self.control,
            self.pattern,
            self.lossless,
            self.retained,
        )

    def _name(self, values: Mapping[str, str]) -> str:
        """The concrete topic name for ``values``; each must be one valid topic level."""
        if set(values) != set(self.parameters):
            raise ValueError(
                f"topic template {self.pattern!r} takes parameters {list(self.parameters)}, "
                f"got {sorted(values)}"
            )
        for key, value in values.items():
            if not isinstance(value, str) or not _LEVEL.match(value):
                raise ValueError(
                    f"parameter {key!r} of topic template {self.pattern!r} must be one topic "
                    f"level made of [A-Za-z0-9_-], got {value!r}"
                )
        return self.pattern.format(**values)

    def match(self, topic: str) -> dict[str, str] | None:
        """The parameter values if ``topic`` was built from this template, else None."""
        levels = topic.split(".")
        pattern = self.pattern.split(".")
        if len(levels) != len(pattern):
            return None
        values: dict[str, str] = {}
        for want, got in zip(pattern, levels, strict=True):
            if want.startswith("{"):
                if not _LEVEL.match(got):
                    return None
                values[want[1:-1]] = got
            elif want != got:
                return None
        return values


@dataclass(frozen=True, slots=True)
class RequestTopic(Topic[P], Generic[P, R]):
    """A concrete request topic: requests of type ``P``, each answered by one ``R``.

    Declared in the schema by a ``reply`` type on the topic. It is a
    :class:`Topic` of its request type (same name, access rules and payload
    check), and its reply type is part of its type too, so that mypy knows what
    a request on it returns. A request topic is never retained.
    """

    #: The reply message type (keyword-only: it follows the topic's defaults).
    reply_type: type[R] = field(kw_only=True)

    @property
    def reply_name(self) -> str:
        """Fully qualified name of the reply message type."""
        return self.reply_type.DESCRIPTOR.full_name


@dataclass(frozen=True, slots=True)
class RequestTopicTemplate(TopicTemplate[P], Generic[P, R]):
    """A parametrised request topic such as ``control.collector.rpc.health.{id}``.

    What it builds is a :class:`RequestTopic` with the same request and reply types.
    """

    #: The reply message type (keyword-only: it follows the template's defaults).
    reply_type: type[R] = field(kw_only=True)

    @property
    def reply_name(self) -> str:
        """Fully qualified name of the reply message type."""
        return self.reply_type.DESCRIPTOR.full_name

    def build(self, **values: str) -> RequestTopic[P, R]:
        """Build the concrete request topic; each value must be one valid topic level."""
        return RequestTopic(*self._fields(values), reply_type=self.reply_type)


@dataclass(frozen=True, slots=True, eq=False)
class TopicRegistry:
    """The declared topics and templates of a schema, and the look-ups over them.

    A generated registry builds one from its ``TOPICS`` and ``TEMPLATES`` and
    exports its bound :meth:`lookup` and :meth:`topics_for_payload`.
    """

    #: Every concrete topic by name, in schema order.
    topics: Mapping[str, Topic[Any]]
    #: Every topic template, in schema order.
    templates: tuple[TopicTemplate[Any], ...]

    def lookup(self, name: str) -> Topic[Any] | None:
        """The declared topic of that name, built from a template if need be."""
        topic = self.topics.get(name)
        if topic is not None:
            return topic
        for template in self.templates:
            values = template.match(name)
            if values is not None:
                return template.build(**values)
        return None

    def topics_for_payload(self, payload_type: type[P]) -> tuple[Topic[P], ...]:
        """The concrete topics whose payload type is ``payload_type``, in schema order."""
        return tuple(t for t in self.topics.values() if t.payload_type is payload_type)
