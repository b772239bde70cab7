"""Read topic declarations out of compiled descriptors (pure, no I/O).

The schema declares each topic as a value of an enum whose values carry the
``(daemoneye.eventbus.v1.topic)`` option, and the topic of each kind of event
through the ``(daemoneye.eventbus.v1.event_topic)`` option on the values of an
event-kind enum such as ``ProcessEventKind``. A topic option may name a
``reply`` type (a request topic, never retained nor named by an event kind)
and mark the topic ``retained``. This module turns a
``FileDescriptorSet`` into a checked :class:`Schema` (a list of
:class:`TopicDecl` and of :class:`EventKindTopics`), and refuses a broken
schema with a :class:`SchemaError` that says what is wrong and where.
"""

from __future__ import annotations

import keyword
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

if TYPE_CHECKING:
    from google.protobuf.internal.extension_dict import _ExtensionFieldDescriptor

from daemoneye_eventbus.errors import InvalidTopic, SchemaError
from daemoneye_eventbus.topics import validate_topic

__all__ = [
    "EVENT_TOPIC_OPTION",
    "OPTION_NAME",
    "RESERVED_NAMES",
    "TOPIC_ENUM",
    "EventKindTopics",
    "EventKindValue",
    "Schema",
    "TopicDecl",
    "collect_schema",
    "collect_topics",
    "upper_snake",
]

#: Fully qualified name of the custom option that declares a topic.
OPTION_NAME = "daemoneye.eventbus.v1.topic"
#: Fully qualified name of the custom option that names the topic of an event kind.
EVENT_TOPIC_OPTION = "daemoneye.eventbus.v1.event_topic"
#: Every non-zero value of an enum of this name must declare a topic.
TOPIC_ENUM = "Topic"

_PLACEHOLDER = re.compile(r"\{([a-z][a-z0-9_]*)\}")
_COMPONENT = re.compile(r"[a-z][a-z0-9_-]*\Z")

# AccessLevel enum numbers (options.proto); 0 is ACCESS_LEVEL_UNSPECIFIED.
_ACCESS_NAMES = {1: "PUBLIC", 2: "RESTRICTED", 3: "PRIVILEGED"}

#: Names the generated registry (codegen/render.py) defines or imports itself; a
#: topic constant, template function or event-kind table may not take one of them.
RESERVED_NAMES = frozenset(
    {
        # Defined by the registry.
        "ACCESS_TABLE",
        "REGISTRY",
        "TEMPLATES",
        "TOPICS",
        "lookup",
        "topics_for_payload",
        # Imported from daemoneye_eventbus.registry_runtime.
        "RequestTopic",
        "RequestTopicTemplate",
        "Topic",
        "TopicRegistry",
        "TopicTemplate",
        # Imported from the standard library, google.protobuf and options_pb2.
        "AccessLevel",
        "Any",
        "Final",
        "Mapping",
        "MappingProxyType",
        "annotations",
    }
)


@dataclass(frozen=True)
class TopicDecl:
    """One topic or topic template declared in the schema."""

    #: Name of the enum value, e.g. ``TOPIC_EVENTS_PROCESS_LIFECYCLE``.
    enum_value: str
    #: The topic name or template, e.g. ``control.collector.task.{type}.{id}``.
    name: str
    #: ``PUBLIC``, ``RESTRICTED`` or ``PRIVILEGED``.
    access: str
    publishers: tuple[str, ...]
    subscribers: tuple[str, ...]
    #: Fully qualified payload message name.
    payload: str
    #: Proto file that defines the payload message, e.g. ``daemoneye/eventbus/v1/events.proto``.
    payload_file: str
    #: Proto package of ``payload_file``, e.g. ``daemoneye.eventbus.v1``.
    payload_package: str
    control: bool
    #: Delivered losslessly to every subscriber whose client grants credit.
    lossless: bool
    #: Template parameters in order; empty for a concrete topic.
    parameters: tuple[str, ...]
    #: The comment above the enum value in the schema.
    comment: str
    #: The broker keeps the last event of each concrete topic for new subscriptions.
    retained: bool = False
    #: Fully qualified reply message name of a request topic; empty for a
    #: publish/subscribe topic.
    reply: str = ""
    #: Proto file that defines the reply message (empty without a reply).
    reply_file: str = ""
    #: Proto package of ``reply_file``.
    reply_package: str = ""

    @property
    def is_request(self) -> bool:
        """A request topic: each request on it is answered by one ``reply`` message."""
        return bool(self.reply)

    @property
    def constant(self) -> str:
        """The Python constant name: the enum value without its enum prefix."""
        return self.enum_value.removeprefix(TOPIC_ENUM.upper() + "_")

    @property
    def is_template(self) -> bool:
        return bool(self.parameters)


@dataclass(frozen=True)
class EventKindValue:
    """One value of an event-kind enum and the topic its ``(event_topic)`` option names."""

    #: Name of the enum value, e.g. ``PROCESS_EVENT_KIND_START``.
    name: str
    number: int
    #: The concrete topic declared in ``Topic`` that the option names.
    topic: TopicDecl


@dataclass(frozen=True)
class EventKindTopics:
    """An enum whose values name, through ``(event_topic)``, the topic of each kind of event."""

    #: Fully qualified enum name, e.g. ``daemoneye.eventbus.v1.ProcessEventKind``.
    enum: str
    #: Proto file that defines the enum.
    enum_file: str
    #: Proto package of ``enum_file``.
    enum_package: str
    #: Every value of the enum, in schema order, one per number (aliases dropped).
    values: tuple[EventKindValue, ...]

    @property
    def local_name(self) -> str:
        """The enum's name inside its package, e.g. ``ProcessEventKind`` or ``Outer.Kind``."""
        return self.enum.removeprefix(self.enum_package + ".") if self.enum_package else self.enum

    @property
    def constant(self) -> str:
        """The generated table's name, e.g. ``PROCESS_EVENT_KIND_TOPICS``."""
        return "_".join(upper_snake(part) for part in self.local_name.split(".")) + "_TOPICS"

    @property
    def payload_topic(self) -> TopicDecl:
        """A topic of the table, for its payload type: every topic of it has the same."""
        return self.values[0].topic


@dataclass(frozen=True)
class Schema:
    """Everything the code generators need from the schema, checked."""

    topics: tuple[TopicDecl, ...]
    event_kinds: tuple[EventKindTopics, ...]


def upper_snake(name: str) -> str:
    """``ProcessEventKind`` -> ``PROCESS_EVENT_KIND``; ``HTTPStatus`` -> ``HTTP_STATUS``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).upper()


def _message_files(fds: descriptor_pb2.FileDescriptorSet) -> dict[str, tuple[str, str]]:
    """Map every message's fully qualified name to its file and that file's package."""
    out: dict[str, tuple[str, str]] = {}

    def walk(prefix: str, messages: list[descriptor_pb2.DescriptorProto], fp: Any) -> None:
        for m in messages:
            full = f"{prefix}.{m.name}" if prefix else m.name
            out[full] = (fp.name, fp.package)
            walk(full, list(m.nested_type), fp)

    for f in fds.file:
        walk(f.package, list(f.message_type), f)
    return out


def _comments(fp: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    return {
        tuple(loc.path): loc.leading_comments.strip()
        for loc in fp.source_code_info.location
        if loc.leading_comments
    }


def collect_topics(fds: descriptor_pb2.FileDescriptorSet) -> list[TopicDecl]:
    """Return the checked topic declarations of a compiled schema.

    Checks the whole schema, ``(event_topic)`` options included, like
    :func:`collect_schema`. Raises :class:`SchemaError` on a broken schema.
    """
    return list(collect_schema(fds).topics)


def collect_schema(fds: descriptor_pb2.FileDescriptorSet) -> Schema:
    """Return the checked topic declarations and event-kind tables of a compiled schema.

    ``fds`` must be built with ``--include_imports`` (so that the options' own
    definitions are present) and preferably ``--include_source_info`` (for
    comments). Raises :class:`SchemaError` on a broken schema.
    """
    pool = descriptor_pool.DescriptorPool()
    for f in fds.file:
        pool.Add(f)
    try:
        ext = cast(
            "_ExtensionFieldDescriptor[Message, Message]", pool.FindExtensionByName(OPTION_NAME)
        )
    except KeyError:
        raise SchemaError(f"the schema does not define the option {OPTION_NAME}") from None
    classes = message_factory.GetMessageClassesForFiles([f.name for f in fds.file], pool)
    options_cls = classes["google.protobuf.EnumValueOptions"]
    messages = _message_files(fds)

    decls: list[TopicDecl] = []
    seen: dict[str, str] = {}
    for fp in fds.file:
        if fp.package.startswith("google."):
            continue
        comments = _comments(fp)
        for ei, enum in enumerate(fp.enum_type):
            for vi, value in enumerate(enum.value):
                where = f"{fp.name}: {enum.name}.{value.name}"
                opts = options_cls.FromString(value.options.SerializeToString())
                if not opts.HasExtension(ext):
                    if enum.name == TOPIC_ENUM and value.number != 0:
                        raise SchemaError(f"{where} declares no (topic) option")
                    continue
                if value.number == 0:
                    raise SchemaError(f"{where}: the zero value cannot declare a topic")
                topic: Message = opts.Extensions[ext]
                decl = _check(topic, where, value.name, messages, comments.get((5, ei, 2, vi), ""))
                # Templates that differ only in parameter names match the same topics.
                shape = _PLACEHOLDER.sub("{}", decl.name)
                if shape in seen:
                    raise SchemaError(
                        f"{where}: duplicate topic {decl.name!r}, already declared by {seen[shape]}"
                    )
                seen[shape] = where
                decls.append(decl)
    if not decls:
        raise SchemaError("the schema declares no topic")
    kinds = _collect_event_kinds(fds, pool, options_cls, decls)
    _check_names(decls, kinds)
    _check_overlaps(decls)
    return Schema(tuple(decls), tuple(kinds))


def _enums(
    fds: descriptor_pb2.FileDescriptorSet,
) -> list[tuple[descriptor_pb2.FileDescriptorProto, str, descriptor_pb2.EnumDescriptorProto]]:
    """Every enum of the schema (nested ones too) with its file and fully qualified name."""
    out: list[
        tuple[descriptor_pb2.FileDescriptorProto, str, descriptor_pb2.EnumDescriptorProto]
    ] = []

    def walk(fp: Any, prefix: str, messages: list[descriptor_pb2.DescriptorProto]) -> None:
        for m in messages:
            full = f"{prefix}.{m.name}" if prefix else m.name
            out.extend((fp, f"{full}.{e.name}", e) for e in m.enum_type)
            walk(fp, full, list(m.nested_type))

    for fp in fds.file:
        if fp.package.startswith("google."):
            continue
        out.extend(
            (fp, f"{fp.package}.{e.name}" if fp.package else e.name, e) for e in fp.enum_type
        )
        walk(fp, fp.package, list(fp.message_type))
    return out


def _collect_event_kinds(
    fds: descriptor_pb2.FileDescriptorSet,
    pool: descriptor_pool.DescriptorPool,
    options_cls: Any,  # the dynamic EnumValueOptions class, built from the schema at run time
    decls: list[TopicDecl],
) -> list[EventKindTopics]:
    """The enums whose values carry ``(event_topic)``, checked against the declared topics."""
    try:
        ext = cast(
            "_ExtensionFieldDescriptor[Message, str]", pool.FindExtensionByName(EVENT_TOPIC_OPTION)
        )
    except KeyError:
        return []  # a schema without the option has no event-kind tables
    concrete = {d.name: d for d in decls if not d.is_template}
    templates = [d for d in decls if d.is_template]
    kinds: list[EventKindTopics] = []
    for fp, full, enum in _enums(fds):
        named: list[tuple[descriptor_pb2.EnumValueDescriptorProto, str | None]] = []
        for value in enum.value:
            opts = options_cls.FromString(value.options.SerializeToString())
            named.append((value, opts.Extensions[ext] if opts.HasExtension(ext) else None))
        if all(topic is None for _, topic in named):
            continue
        values: list[EventKindValue] = []
        by_number: dict[int, EventKindValue] = {}
        for value, topic in named:
            where = f"{fp.name}: {full.rsplit('.', 1)[-1]}.{value.name}"
            if topic is None:
                raise SchemaError(
                    f"{where} declares no (event_topic) option, but other values of {full} do: "
                    "every value of the enum must name the topic of its events"
                )
            decl = concrete.get(topic)
            if decl is None:
                template = next((t for t in templates if _built_by(topic, t.name)), None)
                if template is not None:
                    how = "is" if topic == template.name else "is built from"
                    raise SchemaError(
                        f"{where}: (event_topic) {topic!r} {how} the topic template "
                        f"{template.name!r}; it must name a concrete topic declared in "
                        f"{TOPIC_ENUM}"
                    )
                raise SchemaError(
                    f"{where}: (event_topic) {topic!r} is not a topic declared in {TOPIC_ENUM}"
                )
            if decl.is_request:
                raise SchemaError(
                    f"{where}: (event_topic) {topic!r} is a request topic (reply "
                    f"{decl.reply}); events are published on publish/subscribe topics"
                )
            first = values[0].topic if values else decl
            if decl.payload != first.payload:
                raise SchemaError(
                    f"{where}: (event_topic) {topic!r} carries {decl.payload}, but "
                    f"{first.name!r} named by {full}.{values[0].name} carries {first.payload}: "
                    "every topic of an event-kind enum must have the same payload type"
                )
            kind = EventKindValue(value.name, value.number, decl)
            other = by_number.get(value.number)
            if other is None:
                by_number[value.number] = kind
                values.append(kind)
            elif other.topic is not decl:
                raise SchemaError(
                    f"{where}: alias of {other.name} names (event_topic) {topic!r}, "
                    f"but {other.name} names {other.topic.name!r}"
                )
        kinds.append(EventKindTopics(full, fp.name, fp.package, tuple(values)))
    return kinds


def _built_by(topic: str, pattern: str) -> bool:
    """Whether ``topic`` is one of the topics template ``pattern`` builds."""
    levels, want = topic.split("."), pattern.split(".")
    return len(levels) == len(want) and all(
        w.startswith("{") or w == lv for w, lv in zip(want, levels, strict=True)
    )


def _check_names(decls: list[TopicDecl], kinds: list[EventKindTopics]) -> None:
    """Every generated Python name must be a legal, unique identifier."""
    names: dict[str, str] = {}
    generated_by = [
        (d.enum_value, "enum value", [d.constant] + ([d.constant.lower()] if d.is_template else []))
        for d in decls
    ] + [(k.enum, "enum", [k.constant]) for k in kinds]
    for source, what, generated in generated_by:
        for name in generated:
            if (
                not name.isidentifier()
                or keyword.iskeyword(name)
                or keyword.issoftkeyword(name)
                or name in RESERVED_NAMES
                or name.startswith("_")
            ):
                raise SchemaError(
                    f"{source}: generates the Python name {name!r}, which is a keyword "
                    f"or reserved by the registry; rename the {what}"
                )
            if name in names:
                raise SchemaError(
                    f"{source}: generates the Python name {name!r}, "
                    f"already generated for {names[name]}"
                )
            names[name] = source


def _check_overlaps(decls: list[TopicDecl]) -> None:
    """A concrete topic must not also be a topic its template could build."""
    templates = [d for d in decls if d.is_template]
    for d in decls:
        if d.is_template:
            continue
        for t in templates:
            if _built_by(d.name, t.name):
                raise SchemaError(
                    f"{d.enum_value}: topic {d.name!r} is also built by template {t.name!r}"
                )


def _check(
    topic: Any,  # the dynamic TopicOptions class, built from the schema at run time
    where: str,
    enum_value: str,
    messages: dict[str, tuple[str, str]],
    comment: str,
) -> TopicDecl:
    name: str = topic.name
    access: int = topic.access
    payload: str = topic.payload
    publishers = tuple(topic.publishers)
    subscribers = tuple(topic.subscribers)
    if not name:
        raise SchemaError(f"{where}: the topic has no name")
    parameters = tuple(_PLACEHOLDER.findall(name))
    if len(set(parameters)) != len(parameters):
        raise SchemaError(f"{where}: topic template {name!r} repeats a parameter")
    for param in parameters:
        if keyword.iskeyword(param) or keyword.issoftkeyword(param) or param == "self":
            raise SchemaError(
                f"{where}: parameter {param!r} of topic template {name!r} is a Python keyword "
                "or reserved name"
            )
    for level in name.split("."):
        if ("{" in level or "}" in level) and not _PLACEHOLDER.fullmatch(level):
            raise SchemaError(f"{where}: a placeholder must be a whole level in {name!r}")
    concrete = _PLACEHOLDER.sub("x", name)
    try:
        validate_topic(concrete)
    except InvalidTopic as exc:
        raise SchemaError(f"{where}: invalid topic name {name!r}: {exc}") from None
    if access not in _ACCESS_NAMES:
        raise SchemaError(f"{where}: topic {name!r} has no access level")
    if not payload:
        raise SchemaError(f"{where}: topic {name!r} has no payload type")
    payload = payload.removeprefix(".")
    if payload not in messages:
        raise SchemaError(f"{where}: payload type {payload!r} of topic {name!r} does not exist")
    for component in publishers + subscribers:
        if not _COMPONENT.match(component):
            raise SchemaError(f"{where}: invalid component name {component!r}")
    reply: str = topic.reply.removeprefix(".")
    retained = bool(topic.retained)
    if reply and reply not in messages:
        raise SchemaError(f"{where}: reply type {reply!r} of topic {name!r} does not exist")
    if reply and retained:
        raise SchemaError(
            f"{where}: request topic {name!r} cannot be retained: a request is for the "
            "responders present when it is made, never replayed to a later one"
        )
    if _ACCESS_NAMES[access] != "PUBLIC" and not (publishers and subscribers):
        raise SchemaError(
            f"{where}: {_ACCESS_NAMES[access].lower()} topic {name!r} "
            "must list publishers and subscribers"
        )
    return TopicDecl(
        enum_value=enum_value,
        name=name,
        access=_ACCESS_NAMES[access],
        publishers=publishers,
        subscribers=subscribers,
        payload=payload,
        payload_file=messages[payload][0],
        payload_package=messages[payload][1],
        control=bool(topic.control),
        lossless=bool(topic.lossless),
        parameters=parameters,
        comment=comment,
        retained=retained,
        reply=reply,
        reply_file=messages[reply][0] if reply else "",
        reply_package=messages[reply][1] if reply else "",
    )
