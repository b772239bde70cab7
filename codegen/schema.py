"""Read topic declarations out of compiled descriptors (pure, no I/O).

The schema declares each topic as a value of an enum whose values carry the
``(daemoneye.eventbus.v1.topic)`` option. This module turns a
``FileDescriptorSet`` into a list of checked :class:`TopicDecl`, and refuses a
broken schema with a :class:`SchemaError` that says what is wrong and where.
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

__all__ = ["OPTION_NAME", "TOPIC_ENUM", "TopicDecl", "collect_topics"]

#: Fully qualified name of the custom option that declares a topic.
OPTION_NAME = "daemoneye.eventbus.v1.topic"
#: Every non-zero value of an enum of this name must declare a topic.
TOPIC_ENUM = "Topic"

_PLACEHOLDER = re.compile(r"\{([a-z][a-z0-9_]*)\}")
_COMPONENT = re.compile(r"[a-z][a-z0-9_-]*\Z")

# AccessLevel enum numbers (options.proto); 0 is ACCESS_LEVEL_UNSPECIFIED.
_ACCESS_NAMES = {1: "PUBLIC", 2: "RESTRICTED", 3: "PRIVILEGED"}

#: Names the generated registry defines or imports itself; a topic constant or
#: template function may not take one of them.
RESERVED_NAMES = frozenset(
    {
        "ACCESS_TABLE",
        "TEMPLATES",
        "TOPICS",
        "Topic",
        "TopicTemplate",
        "lookup",
        "topics_for_payload",
        "P",
        "AccessLevel",
        "Any",
        "Final",
        "Generic",
        "Mapping",
        "MappingProxyType",
        "Message",
        "TypeVar",
        "annotations",
        "dataclass",
        "re",
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
    #: Template parameters in order; empty for a concrete topic.
    parameters: tuple[str, ...]
    #: The comment above the enum value in the schema.
    comment: str

    @property
    def constant(self) -> str:
        """The Python constant name: the enum value without its enum prefix."""
        return self.enum_value.removeprefix(TOPIC_ENUM.upper() + "_")

    @property
    def is_template(self) -> bool:
        return bool(self.parameters)


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

    ``fds`` must be built with ``--include_imports`` (so that the option's own
    definition is present) and preferably ``--include_source_info`` (for
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
    _check_names(decls)
    _check_overlaps(decls)
    return decls


def _check_names(decls: list[TopicDecl]) -> None:
    """Every generated Python name must be a legal, unique identifier."""
    names: dict[str, str] = {}
    for d in decls:
        generated = [d.constant] + ([d.constant.lower()] if d.is_template else [])
        for name in generated:
            if (
                not name.isidentifier()
                or keyword.iskeyword(name)
                or keyword.issoftkeyword(name)
                or name in RESERVED_NAMES
                or name.startswith("_")
            ):
                raise SchemaError(
                    f"{d.enum_value}: generates the Python name {name!r}, which is a keyword "
                    "or reserved by the registry; rename the enum value"
                )
            if name in names:
                raise SchemaError(
                    f"{d.enum_value}: generates the Python name {name!r}, "
                    f"already generated for {names[name]}"
                )
            names[name] = d.enum_value


def _check_overlaps(decls: list[TopicDecl]) -> None:
    """A concrete topic must not also be a topic its template could build."""
    templates = [d for d in decls if d.is_template]
    for d in decls:
        if d.is_template:
            continue
        levels = d.name.split(".")
        for t in templates:
            pattern = t.name.split(".")
            if len(pattern) == len(levels) and all(
                p.startswith("{") or p == lv for p, lv in zip(pattern, levels, strict=True)
            ):
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
        parameters=parameters,
        comment=comment,
    )
