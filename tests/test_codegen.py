"""Tests of the code generator (codegen/) and of the generated topic registry.

Four parts:

* the schema checks: small schemas written to a temporary directory, compiled
  with protoc and fed to :func:`codegen.schema.collect_topics`, which must
  refuse every broken one with a clear :class:`SchemaError`, ``(topic)`` and
  ``(event_topic)`` options alike;
* the generator: ``python -m codegen check`` on the repository, staleness
  detection, determinism, the "DO NOT EDIT" header, and a registry that holds
  only data (its classes are in :mod:`daemoneye_eventbus.registry_runtime`);
* the hand-written runtime (``Topic``, ``TopicTemplate``, ``RequestTopic``,
  ``RequestTopicTemplate``, ``TopicRegistry``) on its own;
* the committed registry at run time: lookups, templates, payload index,
  access table, the event-kind tables and the topic hierarchy the project
  requires.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from codegen.build import PACKAGE, compile_schema, generate
from codegen.render import HEADER, RUNTIME_MODULE, render
from codegen.render_ts import render_ts
from codegen.schema import (
    RESERVED_NAMES,
    EventKindTopics,
    Schema,
    TopicDecl,
    collect_schema,
    collect_topics,
    upper_snake,
)
from daemoneye.eventbus.v1 import control_pb2, events_pb2, registry
from daemoneye.eventbus.v1.options_pb2 import AccessLevel
from daemoneye_eventbus import registry_runtime
from daemoneye_eventbus.errors import SchemaError
from daemoneye_eventbus.registry_runtime import (
    RequestTopic,
    RequestTopicTemplate,
    Topic,
    TopicRegistry,
    TopicTemplate,
)
from daemoneye_eventbus.topics import topic_matches, validate_topic, validate_topic_filter

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "proto"
GENERATED = ROOT / "generated"
PKG_DIR = Path(*PACKAGE.split("."))
REGISTRY_FILE = (PKG_DIR / "registry.py").as_posix()
TS_REGISTRY = ROOT / "clients/typescript/src/gen" / PKG_DIR / "registry.ts"

PUBLIC = AccessLevel.ACCESS_LEVEL_PUBLIC
RESTRICTED = AccessLevel.ACCESS_LEVEL_RESTRICTED
PRIVILEGED = AccessLevel.ACCESS_LEVEL_PRIVILEGED

# --------------------------------------------------------------------------
# Helpers: small schemas in a temporary directory

_MESSAGES = """\
// Messages of the small test schema.
syntax = "proto3";

package daemoneye.eventbus.v1;

import "google/protobuf/timestamp.proto";

// A colour; not a topic enum, so its values need no (topic) option.
enum Colour {
  // Not set.
  COLOUR_UNSPECIFIED = 0;
  // Red.
  COLOUR_RED = 1;
}

// A small event.
message SmallEvent {
  // Some text.
  string text = 1;
  // When it happened.
  google.protobuf.Timestamp at = 2;
  // A nested message.
  message Part {
    // A number.
    int32 n = 1;
  }
}

// A small command.
message SmallCommand {
  // What to do.
  string action = 1;
  // Its colour.
  Colour colour = 2;
}
"""

_TOPICS_HEAD = """\
// Topics of the small test schema.
syntax = "proto3";

package daemoneye.eventbus.v1;

import "daemoneye/eventbus/v1/options.proto";

// Every topic.
enum Topic {
  // Not a topic.
  TOPIC_UNSPECIFIED = 0;
"""

SMALL_EVENT = "daemoneye.eventbus.v1.SmallEvent"
SMALL_COMMAND = "daemoneye.eventbus.v1.SmallCommand"


def _topic(
    name: str | None,
    *,
    value: str = "TOPIC_A",
    number: int = 1,
    access: str | None = "ACCESS_LEVEL_PUBLIC",
    payload: str | None = SMALL_EVENT,
    publishers: Sequence[str] = (),
    subscribers: Sequence[str] = (),
    control: bool = False,
    comment: str | None = None,
    reply: str | None = None,
    retained: bool = False,
) -> str:
    """One value of the ``Topic`` enum; ``None`` leaves a field out."""
    fields: list[str] = []
    if name is not None:
        fields.append(f"name: {json.dumps(name, ensure_ascii=False)}")
    if access is not None:
        fields.append(f"access: {access}")
    if publishers:
        fields.append(f"publishers: {json.dumps(list(publishers))}")
    if subscribers:
        fields.append(f"subscribers: {json.dumps(list(subscribers))}")
    if payload is not None:
        fields.append(f"payload: {json.dumps(payload)}")
    if control:
        fields.append("control: true")
    if reply is not None:
        fields.append(f"reply: {json.dumps(reply)}")
    if retained:
        fields.append("retained: true")
    body = "\n".join(f"  {f}" for f in fields)
    lead = f"// {comment}\n" if comment is not None else ""
    return f"{lead}{value} = {number} [(topic) = {{\n{body}\n}}];\n"


def _write_schema(root: Path, *values: str, messages: str = _MESSAGES) -> Path:
    """Write options.proto, a messages file and a topics file under ``root``."""
    pkg = root / PKG_DIR
    pkg.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(PROTO / PKG_DIR / "options.proto", pkg / "options.proto")
    (pkg / "events.proto").write_text(messages)
    body = textwrap.indent("".join(values), "  ")
    (pkg / "topics.proto").write_text(f"{_TOPICS_HEAD}{body}}}\n")
    return root


def _collect(tmp_path: Path, *values: str) -> list[TopicDecl]:
    return collect_topics(compile_schema(_write_schema(tmp_path / "proto", *values)))


def _reject(tmp_path: Path, *values: str) -> str:
    """Compile the schema (which must compile) and return collect_topics' error."""
    fds = compile_schema(_write_schema(tmp_path / "proto", *values))
    with pytest.raises(SchemaError) as info:
        collect_topics(fds)
    return str(info.value)


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def _run_codegen(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(GENERATED)])}
    return subprocess.run(
        [sys.executable, "-m", "codegen", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _stale_files(stderr: str) -> list[str]:
    """The file names that ``check`` lists as differing (indented by two spaces)."""
    return re.findall(r"^  (\S.*)$", stderr, re.MULTILINE)


@pytest.fixture(scope="module")
def real_schema() -> Schema:
    return collect_schema(compile_schema(PROTO))


@pytest.fixture(scope="module")
def real_decls(real_schema: Schema) -> list[TopicDecl]:
    return list(real_schema.topics)


# --------------------------------------------------------------------------
# Schema: a valid schema


def test_valid_schema_yields_declarations(tmp_path: Path) -> None:
    decls = _collect(
        tmp_path,
        _topic(
            "svc.events.small",
            value="TOPIC_SVC_EVENTS_SMALL",
            access="ACCESS_LEVEL_RESTRICTED",
            publishers=["smalld", "other-d"],
            subscribers=["daemoneye-agent"],
            comment="Small events from smalld.",
        ),
        _topic(
            "svc.task.{kind}.{id}",
            value="TOPIC_SVC_TASK_TARGETED",
            number=2,
            access="ACCESS_LEVEL_PRIVILEGED",
            publishers=["daemoneye-agent"],
            subscribers=["smalld"],
            payload="." + SMALL_COMMAND,
            control=True,
            comment="Commands to one service.",
        ),
        _topic(
            "svc.health.part",
            value="TOPIC_SVC_HEALTH_PART",
            number=3,
            payload=SMALL_EVENT + ".Part",
        ),
    )
    names = [d.name for d in decls]
    assert names == ["svc.events.small", "svc.task.{kind}.{id}", "svc.health.part"]
    events, task, part = decls

    assert events.enum_value == "TOPIC_SVC_EVENTS_SMALL"
    assert events.constant == "SVC_EVENTS_SMALL"
    assert events.access == "RESTRICTED"
    assert events.publishers == ("smalld", "other-d")
    assert events.subscribers == ("daemoneye-agent",)
    assert events.payload == SMALL_EVENT
    assert events.payload_file == "daemoneye/eventbus/v1/events.proto"
    assert events.control is False
    assert events.parameters == ()
    assert not events.is_template
    assert events.comment == "Small events from smalld."

    assert task.constant == "SVC_TASK_TARGETED"
    assert task.access == "PRIVILEGED"
    assert task.publishers == ("daemoneye-agent",)
    assert task.subscribers == ("smalld",)
    assert task.payload == SMALL_COMMAND  # the leading dot is dropped
    assert task.control is True
    assert task.parameters == ("kind", "id")
    assert task.is_template
    assert task.comment == "Commands to one service."

    assert part.access == "PUBLIC"
    assert part.publishers == part.subscribers == ()
    assert part.payload == SMALL_EVENT + ".Part"
    assert part.comment == ""


def test_real_schema_declarations_match_registry(real_decls: list[TopicDecl]) -> None:
    concrete = [d for d in real_decls if not d.is_template]
    templates = [d for d in real_decls if d.is_template]
    assert [d.name for d in concrete] == list(registry.TOPICS)
    assert [d.name for d in templates] == [t.pattern for t in registry.TEMPLATES]
    for d in real_decls:
        assert d.access in {"PUBLIC", "RESTRICTED", "PRIVILEGED"}, d.name
        assert d.comment, f"{d.name} has no comment"
        obj = getattr(registry, d.constant)
        assert obj.payload_name == d.payload


# --------------------------------------------------------------------------
# Schema: broken schemas


def test_duplicate_topic_name(tmp_path: Path) -> None:
    message = _reject(
        tmp_path,
        _topic("events.dup", value="TOPIC_FIRST"),
        _topic("events.dup", value="TOPIC_SECOND", number=2, payload=SMALL_COMMAND),
    )
    assert "duplicate topic 'events.dup'" in message
    assert "TOPIC_FIRST" in message
    assert "TOPIC_SECOND" in message


def test_topic_value_without_option(tmp_path: Path) -> None:
    message = _reject(tmp_path, _topic("events.a"), "TOPIC_BARE = 2;\n")
    assert "topics.proto" in message
    assert "Topic.TOPIC_BARE declares no (topic) option" in message


def test_zero_value_cannot_declare_a_topic(tmp_path: Path) -> None:
    pkg = _write_schema(tmp_path / "proto", _topic("events.a")) / PKG_DIR
    topics = pkg / "topics.proto"
    text = topics.read_text().replace(
        "TOPIC_UNSPECIFIED = 0;",
        'TOPIC_UNSPECIFIED = 0 [(topic) = {name: "events.zero" access: ACCESS_LEVEL_PUBLIC '
        f'payload: "{SMALL_EVENT}"}}];',
    )
    topics.write_text(text)
    fds = compile_schema(tmp_path / "proto")
    with pytest.raises(SchemaError, match=r"TOPIC_UNSPECIFIED: the zero value cannot declare"):
        collect_topics(fds)


def test_schema_without_topics(tmp_path: Path) -> None:
    assert _reject(tmp_path) == "the schema declares no topic"


def test_topic_without_payload(tmp_path: Path) -> None:
    message = _reject(tmp_path, _topic("events.a", payload=None))
    assert message.endswith("Topic.TOPIC_A: topic 'events.a' has no payload type")


@pytest.mark.parametrize(
    "payload",
    [
        "daemoneye.eventbus.v1.Missing",
        "SmallEvent",  # not fully qualified
        "daemoneye.eventbus.v1.Colour",  # an enum, not a message
        "daemoneye.eventbus.v1.SmallEvent.Missing",
    ],
)
def test_payload_type_that_does_not_exist(tmp_path: Path, payload: str) -> None:
    message = _reject(tmp_path, _topic("events.a", payload=payload))
    assert f"payload type {payload!r} of topic 'events.a' does not exist" in message
    assert "Topic.TOPIC_A" in message


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("events..x", "consecutive '..'"),
        (".events", "leading '.'"),
        ("events.", "trailing '.'"),
        ("Events.bad name", "character ' '"),
        ("events.#", "wildcard '#'"),
        ("events.+", "wildcard '+'"),
        ("events.a#", "wildcard '#'"),
        ("events.café", "character 'é'"),
    ],
)
def test_invalid_topic_name(tmp_path: Path, name: str, reason: str) -> None:
    message = _reject(tmp_path, _topic(name))
    assert f"Topic.TOPIC_A: invalid topic name {name!r}" in message
    assert reason in message


def test_empty_topic_name(tmp_path: Path) -> None:
    assert "Topic.TOPIC_A: the topic has no name" in _reject(tmp_path, _topic(None))


@pytest.mark.parametrize("name", ["a.x{id}", "a.{id}x", "a.{id", "a.id}", "a.{ID}", "a.{}"])
def test_placeholder_must_be_a_whole_level(tmp_path: Path, name: str) -> None:
    message = _reject(tmp_path, _topic(name))
    assert f"a placeholder must be a whole level in {name!r}" in message


def test_repeated_placeholder(tmp_path: Path) -> None:
    message = _reject(tmp_path, _topic("a.{id}.b.{id}"))
    assert "topic template 'a.{id}.b.{id}' repeats a parameter" in message


@pytest.mark.parametrize("access", ["RESTRICTED", "PRIVILEGED"])
@pytest.mark.parametrize(
    ("publishers", "subscribers"),
    [((), ()), (("smalld",), ()), ((), ("daemoneye-agent",))],
    ids=["neither", "no-subscribers", "no-publishers"],
)
def test_non_public_topic_must_list_publishers_and_subscribers(
    tmp_path: Path, access: str, publishers: tuple[str, ...], subscribers: tuple[str, ...]
) -> None:
    message = _reject(
        tmp_path,
        _topic(
            "events.a",
            access=f"ACCESS_LEVEL_{access}",
            publishers=publishers,
            subscribers=subscribers,
        ),
    )
    assert f"{access.lower()} topic 'events.a' must list publishers and subscribers" in message


@pytest.mark.parametrize("access", ["ACCESS_LEVEL_UNSPECIFIED", None])
def test_access_level_unspecified(tmp_path: Path, access: str | None) -> None:
    message = _reject(tmp_path, _topic("events.a", access=access))
    assert "Topic.TOPIC_A: topic 'events.a' has no access level" in message


@pytest.mark.parametrize("component", ["Procmond", "bad name", "", "-x"])
def test_invalid_component_name(tmp_path: Path, component: str) -> None:
    message = _reject(tmp_path, _topic("events.a", publishers=[component]))
    assert f"invalid component name {component!r}" in message


# --------------------------------------------------------------------------
# Schema: request topics (a `reply` type) and retained topics


def test_request_and_retained_topics_are_collected(tmp_path: Path) -> None:
    decls = _collect(
        tmp_path,
        _topic("svc.ask", value="TOPIC_SVC_ASK", reply=SMALL_COMMAND),
        _topic("svc.ask.{id}", value="TOPIC_SVC_ASK_ONE", number=2, reply="." + SMALL_EVENT),
        _topic("svc.kept", value="TOPIC_SVC_KEPT", number=3, retained=True),
        _topic("svc.plain", value="TOPIC_SVC_PLAIN", number=4),
    )
    ask, ask_one, kept, plain = decls
    assert (ask.is_request, ask.reply, ask.reply_file, ask.reply_package) == (
        True,
        SMALL_COMMAND,
        "daemoneye/eventbus/v1/events.proto",
        "daemoneye.eventbus.v1",
    )
    assert ask.payload == SMALL_EVENT
    assert ask_one.is_request
    assert ask_one.is_template
    assert ask_one.reply == SMALL_EVENT  # the leading dot is dropped
    assert (ask.retained, ask_one.retained) == (False, False)
    assert (kept.retained, kept.is_request, kept.reply, kept.reply_file) == (True, False, "", "")
    assert (plain.retained, plain.is_request) == (False, False)

    py = render(decls, PACKAGE)
    assert (
        "SVC_ASK: Final[RequestTopic[events_pb2.SmallEvent, events_pb2.SmallCommand]] = "
        "RequestTopic(\n    'svc.ask',\n    events_pb2.SmallEvent," in py
    )
    assert "    reply_type=events_pb2.SmallCommand,\n)" in py
    assert (
        "SVC_ASK_ONE: Final[RequestTopicTemplate[events_pb2.SmallEvent, events_pb2.SmallEvent]]"
        in py
    )
    assert (
        "def svc_ask_one(*, id: str) -> RequestTopic[events_pb2.SmallEvent, events_pb2.SmallEvent]:"
        in py
    )
    assert "    False,\n    retained=True,\n)" in py
    assert (py.count("retained=True"), py.count("reply_type=")) == (1, 2)

    ts = render_ts(decls, PACKAGE)
    assert (
        "export const SVC_ASK: RequestTopic<typeof SmallEventSchema, typeof SmallCommandSchema> = "
        'new RequestTopic(\n  "svc.ask",\n  SmallEventSchema,\n  SmallCommandSchema,\n' in ts
    )
    assert (
        "export const SVC_ASK_ONE: RequestTopicTemplate<typeof SmallEventSchema, "
        'typeof SmallEventSchema, "id"> = new RequestTopicTemplate(' in ts
    )
    assert (
        "export function svcAskOne(values: { readonly id: string }): "
        "RequestTopic<typeof SmallEventSchema, typeof SmallEventSchema> {" in ts
    )
    assert '  "svc.ask": RequestTopic<typeof SmallEventSchema, typeof SmallCommandSchema>;' in ts
    assert "  undefined, // template\n  false, // lossless\n  true, // retained\n);" in ts
    assert ts.count("// retained") == 1


@pytest.mark.parametrize(
    "reply",
    [
        "daemoneye.eventbus.v1.Missing",
        "SmallCommand",  # not fully qualified
        "daemoneye.eventbus.v1.Colour",  # an enum, not a message
        "daemoneye.eventbus.v1.SmallEvent.Missing",
    ],
)
def test_reply_type_that_does_not_exist(tmp_path: Path, reply: str) -> None:
    message = _reject(tmp_path, _topic("svc.ask", value="TOPIC_SVC_ASK", reply=reply))
    assert f"Topic.TOPIC_SVC_ASK: reply type {reply!r} of topic 'svc.ask' does not exist" in (
        message
    )


@pytest.mark.parametrize("name", ["svc.ask", "svc.ask.{id}"])
def test_a_request_topic_cannot_be_retained(tmp_path: Path, name: str) -> None:
    message = _reject(
        tmp_path, _topic(name, value="TOPIC_SVC_ASK", reply=SMALL_COMMAND, retained=True)
    )
    assert f"Topic.TOPIC_SVC_ASK: request topic {name!r} cannot be retained" in message


def test_real_schema_request_and_retained_topics(real_decls: list[TopicDecl]) -> None:
    """The request topics the control plane (issues 19 and 20) needs, typed by their reply."""
    requests = {d.name: (d.payload, d.reply) for d in real_decls if d.is_request}
    v1 = "daemoneye.eventbus.v1."
    assert requests == {
        "control.collector.rpc.health.{id}": (v1 + "HealthCheckRequest", v1 + "HealthCheckReply"),
        "control.collector.rpc.config.{id}": (v1 + "ConfigurationUpdate", v1 + "ConfigurationAck"),
        "control.collector.rpc.lifecycle.{id}": (
            v1 + "CollectorLifecycleCommand",
            v1 + "LifecycleReply",
        ),
        "control.collector.rpc.task.{id}": (v1 + "TaskAssignment", v1 + "TaskAck"),
        "control.collector.queue.{type}": (v1 + "TaskAssignment", v1 + "TaskAck"),
    }
    assert [d.name for d in real_decls if d.retained] == [
        "control.collector.config",
        "control.agent.policy",
        "control.health.status",
    ]
    # The generated registry says the same.
    for d in real_decls:
        obj = getattr(registry, d.constant)
        assert obj.retained is d.retained, d.name
        if d.is_request:
            assert isinstance(obj, RequestTopicTemplate), d.name
            assert obj.reply_name == d.reply, d.name
            assert (obj.access, obj.control) == (PRIVILEGED, True), d.name
            # the agent on this host, and the fleet through the bridge (privileged only by policy)
            assert obj.publishers == {"daemoneye-agent", "bridge"}, d.name
        else:
            assert not isinstance(obj, RequestTopic | RequestTopicTemplate), d.name
    health = registry.control_collector_rpc_health(id="procmond-1")
    assert isinstance(health, RequestTopic)
    assert health.reply_type is control_pb2.HealthCheckReply
    assert registry.lookup("control.collector.rpc.health.procmond-1") == health
    assert registry.lookup("control.collector.queue.scan") == registry.control_collector_queue(
        type="scan"
    )


# --------------------------------------------------------------------------
# Schema: event-kind enums and their (event_topic) options

# Topics for the event-kind schemas: two concrete SmallEvent topics, a
# SmallCommand topic and a SmallEvent template.
_KIND_TOPICS = (
    _topic("svc.small.a", value="TOPIC_SVC_SMALL_A"),
    _topic("svc.small.b", value="TOPIC_SVC_SMALL_B", number=2),
    _topic("svc.command", value="TOPIC_SVC_COMMAND", number=3, payload=SMALL_COMMAND),
    _topic("svc.task.{id}", value="TOPIC_SVC_TASK", number=4),
)


def _kind_messages(*topics: str | None, nested: Sequence[str | None] = ()) -> str:
    """The messages file with an enum ``SmallKind`` whose values name ``topics``.

    Value ``i`` is ``SMALL_KIND_<i>`` with number ``i``; ``None`` leaves its
    ``(event_topic)`` option out. ``nested`` does the same for an enum ``Mode``
    nested in ``SmallCommand``.
    """

    def values(prefix: str, names: Sequence[str | None], indent: str) -> str:
        out = []
        for i, topic in enumerate(names):
            option = "" if topic is None else f" [(event_topic) = {json.dumps(topic)}]"
            out.append(f"{indent}// Value {i}.\n{indent}{prefix}_{i} = {i}{option};\n")
        return "".join(out)

    text = _MESSAGES.replace(
        'import "google/protobuf/timestamp.proto";',
        'import "daemoneye/eventbus/v1/options.proto";\nimport "google/protobuf/timestamp.proto";',
    )
    text += (
        f"\n// Kinds of small events.\nenum SmallKind {{\n{values('SMALL_KIND', topics, '  ')}}}\n"
    )
    if nested:
        text = text.replace(
            "  // Its colour.\n  Colour colour = 2;\n",
            "  // Its colour.\n  Colour colour = 2;\n  // A mode.\n  enum Mode {\n"
            f"{values('MODE', nested, '    ')}  }}\n",
        )
    return text


def _kind_schema(tmp_path: Path, messages: str, *values: str) -> Path:
    return _write_schema(tmp_path / "proto", *(values or _KIND_TOPICS), messages=messages)


def _reject_kinds(tmp_path: Path, messages: str, *values: str) -> str:
    fds = compile_schema(_kind_schema(tmp_path, messages, *values))
    with pytest.raises(SchemaError) as info:
        collect_schema(fds)
    # collect_topics checks the whole schema too.
    with pytest.raises(SchemaError, match=re.escape(str(info.value))):
        collect_topics(fds)
    return str(info.value)


def test_event_kind_topics_are_collected(tmp_path: Path) -> None:
    messages = _kind_messages(
        "svc.small.a", "svc.small.b", "svc.small.a", nested=["svc.command", "svc.command"]
    )
    schema = collect_schema(compile_schema(_kind_schema(tmp_path, messages)))
    assert [k.enum for k in schema.event_kinds] == [
        "daemoneye.eventbus.v1.SmallKind",
        "daemoneye.eventbus.v1.SmallCommand.Mode",
    ]
    small, mode = schema.event_kinds
    assert small.enum_file == "daemoneye/eventbus/v1/events.proto"
    assert small.enum_package == "daemoneye.eventbus.v1"
    assert small.local_name == "SmallKind"
    assert small.constant == "SMALL_KIND_TOPICS"
    assert [(v.name, v.number, v.topic.name) for v in small.values] == [
        ("SMALL_KIND_0", 0, "svc.small.a"),
        ("SMALL_KIND_1", 1, "svc.small.b"),
        ("SMALL_KIND_2", 2, "svc.small.a"),
    ]
    assert small.payload_topic.payload == SMALL_EVENT
    assert mode.local_name == "SmallCommand.Mode"
    assert mode.constant == "SMALL_COMMAND_MODE_TOPICS"
    assert {v.topic.name for v in mode.values} == {"svc.command"}
    # Enums without the option (Colour) have no table.
    assert len(schema.event_kinds) == 2

    text = render(schema.topics, PACKAGE, schema.event_kinds)
    assert (
        "SMALL_KIND_TOPICS: Final[Mapping[int, Topic[events_pb2.SmallEvent]]] = "
        "MappingProxyType({\n    events_pb2.SmallKind.SMALL_KIND_0: SVC_SMALL_A,\n" in text
    )
    assert "    events_pb2.SmallCommand.Mode.MODE_1: SVC_COMMAND,\n" in text
    ts = render_ts(schema.topics, PACKAGE, schema.event_kinds)
    assert (
        "export const SMALL_KIND_TOPICS: ReadonlyMap<number, Topic<typeof SmallEventSchema>> = "
        in ts
    )
    assert "  [2, SVC_SMALL_A], // SMALL_KIND_2\n" in ts


def test_event_kind_tables_work_in_the_generated_registry(tmp_path: Path) -> None:
    messages = _kind_messages("svc.small.b", "svc.small.a", nested=["svc.command"])
    proto = _kind_schema(tmp_path, messages)
    out = tmp_path / "out"
    generate(proto, out)
    check = textwrap.dedent(
        """
        from daemoneye.eventbus.v1 import events_pb2
        import daemoneye.eventbus.v1.registry as r

        assert dict(r.SMALL_KIND_TOPICS) == {0: r.SVC_SMALL_B, 1: r.SVC_SMALL_A}
        assert r.SMALL_KIND_TOPICS[events_pb2.SmallKind.SMALL_KIND_1] is r.SVC_SMALL_A
        assert dict(r.SMALL_COMMAND_MODE_TOPICS) == {0: r.SVC_COMMAND}
        assert "SMALL_KIND_TOPICS" in r.__all__ and "SMALL_COMMAND_MODE_TOPICS" in r.__all__
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", check],
        cwd=out,
        env={**os.environ, "PYTHONPATH": str(out)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_event_kind_value_without_option(tmp_path: Path) -> None:
    message = _reject_kinds(tmp_path, _kind_messages("svc.small.a", None, "svc.small.b"))
    assert "events.proto: SmallKind.SMALL_KIND_1 declares no (event_topic) option" in message
    assert "other values of daemoneye.eventbus.v1.SmallKind do" in message


def test_event_kind_zero_value_without_option(tmp_path: Path) -> None:
    message = _reject_kinds(tmp_path, _kind_messages(None, "svc.small.a"))
    assert "SmallKind.SMALL_KIND_0 declares no (event_topic) option" in message


def test_nested_event_kind_value_without_option(tmp_path: Path) -> None:
    message = _reject_kinds(tmp_path, _kind_messages("svc.small.a", nested=[None, "svc.command"]))
    assert "events.proto: Mode.MODE_0 declares no (event_topic) option" in message
    assert "other values of daemoneye.eventbus.v1.SmallCommand.Mode do" in message


@pytest.mark.parametrize("topic", ["svc.small.c", "svc.small", "", "events.process.lifecycle"])
def test_event_kind_names_an_undeclared_topic(tmp_path: Path, topic: str) -> None:
    message = _reject_kinds(tmp_path, _kind_messages("svc.small.a", topic))
    assert f"SmallKind.SMALL_KIND_1: (event_topic) {topic!r} is not a topic declared in Topic" in (
        message
    )


def test_event_kind_names_a_template(tmp_path: Path) -> None:
    message = _reject_kinds(tmp_path, _kind_messages("svc.small.a", "svc.task.{id}"))
    assert "(event_topic) 'svc.task.{id}' is the topic template 'svc.task.{id}'" in message
    assert "must name a concrete topic" in message
    message = _reject_kinds(tmp_path / "built", _kind_messages("svc.small.a", "svc.task.x"))
    assert "(event_topic) 'svc.task.x' is built from the topic template 'svc.task.{id}'" in message
    assert "must name a concrete topic" in message


def test_event_kind_names_a_request_topic(tmp_path: Path) -> None:
    message = _reject_kinds(
        tmp_path,
        _kind_messages("svc.small.a", "svc.ask"),
        *_KIND_TOPICS,
        _topic("svc.ask", value="TOPIC_SVC_ASK", number=5, reply=SMALL_COMMAND),
    )
    assert "SmallKind.SMALL_KIND_1: (event_topic) 'svc.ask' is a request topic" in message


def test_event_kind_mixes_payload_types(tmp_path: Path) -> None:
    message = _reject_kinds(tmp_path, _kind_messages("svc.small.a", "svc.small.b", "svc.command"))
    assert "SmallKind.SMALL_KIND_2: (event_topic) 'svc.command' carries " + SMALL_COMMAND in (
        message
    )
    assert (
        f"'svc.small.a' named by daemoneye.eventbus.v1.SmallKind.SMALL_KIND_0 carries {SMALL_EVENT}"
        in (message)
    )
    assert "must have the same payload type" in message


def test_event_kind_table_name_collides_with_a_topic(tmp_path: Path) -> None:
    message = _reject_kinds(
        tmp_path,
        _kind_messages("svc.small.a"),
        *_KIND_TOPICS,
        _topic("svc.kinds", value="TOPIC_SMALL_KIND_TOPICS", number=5),
    )
    assert "generates the Python name 'SMALL_KIND_TOPICS'" in message
    assert "already generated for TOPIC_SMALL_KIND_TOPICS" in message


@pytest.mark.parametrize(
    ("name", "snake"),
    [
        ("ProcessEventKind", "PROCESS_EVENT_KIND"),
        ("Kind", "KIND"),
        ("HTTPStatus", "HTTP_STATUS"),
        ("Kind2", "KIND2"),
    ],
)
def test_upper_snake(name: str, snake: str) -> None:
    assert upper_snake(name) == snake


def test_real_schema_event_kinds(real_schema: Schema) -> None:
    assert [k.enum for k in real_schema.event_kinds] == ["daemoneye.eventbus.v1.ProcessEventKind"]
    (process,) = real_schema.event_kinds
    assert isinstance(process, EventKindTopics)
    assert process.constant == "PROCESS_EVENT_KIND_TOPICS"
    assert [v.number for v in process.values] == sorted(events_pb2.ProcessEventKind.values())


# --------------------------------------------------------------------------
# Schema: an accepted schema must give a registry that works
#
# Each schema below is run through generate() and the resulting registry is
# imported in a fresh interpreter, which checks every declared constant,
# builder function, lookup and payload. Refusing the schema with a
# SchemaError is an equally good outcome.

_SOUNDNESS = """
import json, sys
import daemoneye.eventbus.v1.registry as r

assert len(r.__all__) == len(set(r.__all__)), "duplicate names in __all__"
for d in json.loads(sys.argv[1]):
    obj = getattr(r, d["constant"])
    assert obj.payload_name == d["payload"], (obj, d)
    if d["parameters"]:
        assert isinstance(obj, r.TopicTemplate) and obj.pattern == d["name"], (obj, d)
        values = {p: f"v{i}" for i, p in enumerate(d["parameters"])}
        built = getattr(r, d["constant"].lower())(**values)
        assert built == obj.build(**values), (built, d)
        assert r.lookup(built.name) == built, (r.lookup(built.name), built)
        assert built.retained == obj.retained == d["retained"], (built, d)
        if d["reply"]:
            assert isinstance(obj, r.RequestTopicTemplate), (obj, d)
            assert isinstance(built, r.RequestTopic) and built.reply_name == d["reply"], (built, d)
        else:
            assert type(obj) is r.TopicTemplate and type(built) is r.Topic, (obj, built, d)
    else:
        assert isinstance(obj, r.Topic) and obj.name == d["name"], (obj, d)
        assert r.TOPICS[d["name"]] is obj and r.lookup(d["name"]) is obj, d
        assert r.topics_for_payload(obj.payload_type).count(obj) == 1, d
        assert obj.retained == d["retained"], (obj, d)
        if d["reply"]:
            assert isinstance(obj, r.RequestTopic) and obj.reply_name == d["reply"], (obj, d)
        else:
            assert type(obj) is r.Topic, (obj, d)
"""


def _assert_rejected_or_sound(tmp_path: Path, *values: str) -> None:
    proto = _write_schema(tmp_path / "proto", *values)
    try:
        decls = collect_topics(compile_schema(proto))
    except SchemaError:
        return
    out = tmp_path / "out"
    generate(proto, out)
    spec = [
        {
            "constant": d.constant,
            "name": d.name,
            "parameters": d.parameters,
            "payload": d.payload,
            "reply": d.reply,
            "retained": d.retained,
        }
        for d in decls
    ]
    proc = subprocess.run(
        [sys.executable, "-c", _SOUNDNESS, json.dumps(spec)],
        cwd=out,
        env={**os.environ, "PYTHONPATH": str(out)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"schema accepted, but its registry is broken:\n{proc.stderr}"


@pytest.mark.parametrize(
    "values",
    [
        pytest.param(
            (
                _topic("svc.events.small", value="TOPIC_SVC_EVENTS_SMALL"),
                _topic("svc.task.{kind}.{id}", value="TOPIC_SVC_TASK", number=2),
                _topic(
                    "svc.part",
                    value="TOPIC_SVC_PART",
                    number=3,
                    payload=SMALL_EVENT + ".Part",
                    access="ACCESS_LEVEL_RESTRICTED",
                    publishers=["smalld"],
                    subscribers=["daemoneye-agent"],
                ),
            ),
            id="valid",
        ),
        pytest.param(
            (
                _topic("svc.ask", value="TOPIC_SVC_ASK", reply=SMALL_COMMAND),
                _topic("svc.ask.{id}", value="TOPIC_SVC_ASK_ONE", number=2, reply=SMALL_EVENT),
                _topic("svc.kept", value="TOPIC_SVC_KEPT", number=3, retained=True),
                _topic("svc.kept.{id}", value="TOPIC_SVC_KEPT_ONE", number=4, retained=True),
                _topic(
                    "svc.part.ask",
                    value="TOPIC_SVC_PART_ASK",
                    number=5,
                    payload=SMALL_EVENT + ".Part",
                    reply=SMALL_EVENT + ".Part",
                ),
            ),
            id="request-and-retained",
        ),
        # Once accepted and broken: placeholders may be Python keywords; the builder function
        # `def svc_task(*, from: str)` is a SyntaxError.
        pytest.param(
            (_topic("svc.{from}", value="TOPIC_SVC_TASK"),),
            id="keyword-parameter",
        ),
        # Once accepted and broken: a template's enum value may lower-case to a Python keyword
        # (TOPIC_IMPORT -> `def import(...)`), a SyntaxError.
        pytest.param(
            (_topic("svc.{x}", value="TOPIC_IMPORT"),),
            id="keyword-function",
        ),
        # Once accepted and broken: a placeholder named `self` collides with TopicTemplate.build's
        # own `self`: build(self=...) raises TypeError, so lookup() does too.
        pytest.param(
            (_topic("svc.{self}", value="TOPIC_SVC_TASK"),),
            id="self-parameter",
        ),
        # Once accepted and broken: a payload from another proto package (here google.protobuf) is
        # accepted, but the registry imports it as daemoneye.eventbus.v1.timestamp_pb2.
        pytest.param(
            (_topic("svc.time", payload="google.protobuf.Timestamp"),),
            id="payload-from-other-package",
        ),
        # Once accepted and broken: the constant of TOPIC_TOPICS is TOPICS, which the TOPICS mapping
        # then overwrites.
        pytest.param(
            (_topic("svc.a", value="TOPIC_TOPICS"),),
            id="constant-shadowed-by-registry-name",
        ),
        # Once accepted and broken: the builder function of template TOPIC_LOOKUP is `lookup`, which
        # the registry's lookup() then overwrites.
        pytest.param(
            (_topic("svc.{x}", value="TOPIC_LOOKUP"),),
            id="function-shadowed-by-registry-name",
        ),
        # Once accepted and broken: two templates that differ only in their parameter names match
        # the same topics; the duplicate is not detected and lookup() always
        # picks the first.
        pytest.param(
            (
                _topic("svc.{kind}", value="TOPIC_SVC_BY_KIND"),
                _topic("svc.{name}", value="TOPIC_SVC_BY_NAME", number=2, payload=SMALL_COMMAND),
            ),
            id="templates-with-same-pattern",
        ),
    ],
)
def test_accepted_schema_gives_working_registry(tmp_path: Path, values: tuple[str, ...]) -> None:
    _assert_rejected_or_sound(tmp_path, *values)


# --------------------------------------------------------------------------
# Generator: check, staleness, determinism, header


def test_check_passes_on_repository() -> None:
    proc = _run_codegen("check")
    assert proc.returncode == 0, proc.stderr
    assert "is fresh" in proc.stdout


@pytest.mark.parametrize(
    "name",
    [REGISTRY_FILE, (PKG_DIR / "events_pb2.pyi").as_posix(), (PKG_DIR / "py.typed").as_posix()],
)
def test_check_reports_changed_file(tmp_path: Path, name: str) -> None:
    out = tmp_path / "generated"
    shutil.copytree(GENERATED, out, ignore=shutil.ignore_patterns("__pycache__"))
    path = out / name
    data = bytearray(path.read_bytes())
    if data:
        data[len(data) // 2] ^= 0x01  # change exactly one byte
    else:
        data += b"\n"
    path.write_bytes(bytes(data))

    proc = _run_codegen("check", "--out", out)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "is stale" in proc.stderr
    assert _stale_files(proc.stderr) == [name]


def test_check_reports_missing_and_extra_files(tmp_path: Path) -> None:
    out = tmp_path / "generated"
    shutil.copytree(GENERATED, out, ignore=shutil.ignore_patterns("__pycache__"))
    (out / PKG_DIR / "py.typed").unlink()
    (out / PKG_DIR / "leftover_pb2.py").write_text("")
    proc = _run_codegen("check", "--out", out)
    assert proc.returncode == 1
    assert sorted(_stale_files(proc.stderr)) == sorted(
        [(PKG_DIR / "leftover_pb2.py").as_posix(), (PKG_DIR / "py.typed").as_posix()]
    )


def test_check_on_broken_schema_exits_2(tmp_path: Path) -> None:
    proto = _write_schema(tmp_path / "proto", _topic("events..x"))
    proc = _run_codegen("check", "--proto", proto)
    assert proc.returncode == 2
    assert "broken schema" in proc.stderr
    assert "invalid topic name 'events..x'" in proc.stderr


def test_generate_leaves_output_untouched_on_broken_schema(tmp_path: Path) -> None:
    out = tmp_path / "out"
    generate(PROTO, out)
    before = _files(out)
    proto = _write_schema(tmp_path / "proto", _topic("events.a", payload=None))
    with pytest.raises(SchemaError, match="has no payload type"):
        generate(proto, out)
    assert _files(out) == before


def test_generate_is_deterministic(tmp_path: Path) -> None:
    first = generate(PROTO, tmp_path / "a")
    second = generate(PROTO, tmp_path / "b")
    assert [p.relative_to(tmp_path / "a") for p in first] == [
        p.relative_to(tmp_path / "b") for p in second
    ]
    files = _files(tmp_path / "a")
    assert files == _files(tmp_path / "b")
    assert REGISTRY_FILE in files
    # Generating again into the same directory replaces it by the same bytes.
    generate(PROTO, tmp_path / "a")
    assert _files(tmp_path / "a") == files


def test_generated_files_carry_do_not_edit_header(tmp_path: Path) -> None:
    generate(PROTO, tmp_path)
    registry_text = (tmp_path / REGISTRY_FILE).read_text()
    assert registry_text.startswith(HEADER)
    assert "DO NOT EDIT" in registry_text.splitlines()[0]
    for init in sorted(tmp_path.rglob("__init__.py")):
        assert init.read_text().startswith(HEADER), init
    # The committed registry carries it too.
    assert (GENERATED / REGISTRY_FILE).read_text().startswith(HEADER)


def test_render_is_pure_and_matches_committed_registry(real_schema: Schema) -> None:
    text = render(real_schema.topics, PACKAGE, real_schema.event_kinds)
    assert text == render(list(real_schema.topics), PACKAGE, list(real_schema.event_kinds))
    assert text == (GENERATED / REGISTRY_FILE).read_text()
    assert collect_topics(compile_schema(PROTO)) == list(real_schema.topics)


def _module_names(tree: ast.Module) -> set[str]:
    """Every name a module binds at its top level (imports, assignments, functions)."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names.update(n.id for n in node.targets if isinstance(n, ast.Name))
    return names


def test_generated_registry_is_data_only() -> None:
    """No class in the generated registry: only imports, constants and small functions."""
    tree = ast.parse((GENERATED / REGISTRY_FILE).read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    for node in tree.body:
        assert isinstance(
            node, ast.Import | ast.ImportFrom | ast.Assign | ast.AnnAssign | ast.FunctionDef
        ) or (isinstance(node, ast.Expr) and node is tree.body[0]), ast.dump(node)[:200]
        if isinstance(node, ast.FunctionDef):
            # A template builder: a docstring and one `return CONSTANT.build(...)`.
            docstring, body = node.body
            assert isinstance(docstring, ast.Expr)
            assert isinstance(body, ast.Return)
    runtime = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == RUNTIME_MODULE]
    assert [[a.name for a in n.names] for n in runtime] == [
        ["RequestTopic", "RequestTopicTemplate", "Topic", "TopicRegistry", "TopicTemplate"]
    ]
    # The names callers import from the registry are its runtime's classes.
    assert registry.Topic is Topic
    assert registry.TopicTemplate is TopicTemplate
    assert registry.RequestTopic is RequestTopic
    assert registry.RequestTopicTemplate is RequestTopicTemplate
    assert isinstance(registry.REGISTRY, TopicRegistry)
    assert registry.REGISTRY.topics is registry.TOPICS
    assert registry.REGISTRY.templates is registry.TEMPLATES
    assert registry.lookup == registry.REGISTRY.lookup
    assert registry.topics_for_payload == registry.REGISTRY.topics_for_payload
    assert sorted(registry.__all__) == registry.__all__
    for name in registry.__all__:
        assert hasattr(registry, name), name


def test_typescript_registry_is_data_only() -> None:
    text = TS_REGISTRY.read_text()
    assert not re.search(r"^\s*(export\s+)?(abstract\s+)?class\s", text, re.MULTILINE)
    assert (
        "import { RequestTopic, RequestTopicTemplate, Topic, TopicRegistry, TopicTemplate } "
        'from "../../../../registry_runtime.js";' in text
    )
    assert (ROOT / "clients/typescript/src/registry_runtime.ts").is_file()


def test_reserved_names_are_those_the_registry_binds(real_schema: Schema) -> None:
    """RESERVED_NAMES is exactly what the registry binds besides the generated names."""
    tree = ast.parse(render(real_schema.topics, PACKAGE, real_schema.event_kinds))
    generated = (
        {d.constant for d in real_schema.topics}
        | {d.constant.lower() for d in real_schema.topics if d.is_template}
        | {k.constant for k in real_schema.event_kinds}
        | {"__all__"}
    )
    bound = {n for n in _module_names(tree) - generated if not n.endswith("_pb2")}
    assert bound == RESERVED_NAMES


# --------------------------------------------------------------------------
# The hand-written runtime on its own (daemoneye_eventbus.registry_runtime)

_EVENT: Topic[events_pb2.ProcessEvent] = Topic(
    "svc.events.a",
    events_pb2.ProcessEvent,
    RESTRICTED,
    frozenset({"smalld"}),
    frozenset({"daemoneye-agent"}),
    False,
)
_OTHER: Topic[events_pb2.ProcessEvent] = Topic(
    "svc.events.b", events_pb2.ProcessEvent, PUBLIC, frozenset(), frozenset(), False
)
_COMMAND: Topic[control_pb2.TaskAssignment] = Topic(
    "svc.command", control_pb2.TaskAssignment, PRIVILEGED, frozenset({"a"}), frozenset({"b"}), True
)
_TARGETED: TopicTemplate[control_pb2.TaskAssignment] = TopicTemplate(
    "svc.command.{kind}.{id}",
    ("kind", "id"),
    control_pb2.TaskAssignment,
    PRIVILEGED,
    frozenset({"a"}),
    frozenset({"b"}),
    True,
)
_RUNTIME_REGISTRY = TopicRegistry(
    MappingProxyType({t.name: t for t in (_EVENT, _OTHER, _COMMAND)}), (_TARGETED,)
)


def test_runtime_topic() -> None:
    assert str(_EVENT) == "svc.events.a"
    assert _EVENT.payload_name == "daemoneye.eventbus.v1.ProcessEvent"
    assert _EVENT.template is None
    same: Topic[events_pb2.ProcessEvent] = Topic(
        "svc.events.a",
        events_pb2.ProcessEvent,
        RESTRICTED,
        frozenset({"smalld"}),
        frozenset({"daemoneye-agent"}),
        False,
    )
    assert same == _EVENT
    assert hash(_EVENT) == hash(dataclasses.replace(_EVENT))
    with pytest.raises(dataclasses.FrozenInstanceError):
        _EVENT.name = "svc.other"  # type: ignore[misc]
    assert not hasattr(_EVENT, "__dict__")  # slots


def test_runtime_template_build_match_filter() -> None:
    assert _TARGETED.payload_name == "daemoneye.eventbus.v1.TaskAssignment"
    assert _TARGETED.filter == "svc.command.+.+"
    built = _TARGETED.build(kind="scan", id="p-1")
    assert built == Topic(
        "svc.command.scan.p-1",
        control_pb2.TaskAssignment,
        PRIVILEGED,
        frozenset({"a"}),
        frozenset({"b"}),
        True,
        "svc.command.{kind}.{id}",
    )
    assert topic_matches(_TARGETED.filter, built.name)
    assert _TARGETED.match(built.name) == {"kind": "scan", "id": "p-1"}
    assert _TARGETED.match("svc.command.scan") is None
    assert _TARGETED.match("svc.command.scan.p-1.x") is None
    assert _TARGETED.match("svc.other.scan.p-1") is None
    assert _TARGETED.match("svc.command.+.p-1") is None
    with pytest.raises(ValueError, match=r"takes parameters \['kind', 'id'\], got \['kind'\]"):
        _TARGETED.build(kind="scan")
    with pytest.raises(ValueError, match=r"parameter 'id' .* must be one topic level"):
        _TARGETED.build(kind="scan", id="a.b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        _TARGETED.pattern = "x"  # type: ignore[misc]


def test_runtime_registry_lookup() -> None:
    assert _RUNTIME_REGISTRY.lookup("svc.events.a") is _EVENT
    assert _RUNTIME_REGISTRY.lookup("svc.command") is _COMMAND
    built = _RUNTIME_REGISTRY.lookup("svc.command.hash.fsmond")
    assert built == _TARGETED.build(kind="hash", id="fsmond")
    for name in ["svc.events", "svc.events.c", "svc.command.a.b.c", "svc.command.+.x", ""]:
        assert _RUNTIME_REGISTRY.lookup(name) is None, name
    empty = TopicRegistry(MappingProxyType({}), ())
    assert empty.lookup("svc.events.a") is None


def test_runtime_registry_topics_for_payload() -> None:
    assert _RUNTIME_REGISTRY.topics_for_payload(events_pb2.ProcessEvent) == (_EVENT, _OTHER)
    # Concrete topics only: the template's payload does not count.
    assert _RUNTIME_REGISTRY.topics_for_payload(control_pb2.TaskAssignment) == (_COMMAND,)
    assert _RUNTIME_REGISTRY.topics_for_payload(events_pb2.NetworkEvent) == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        _RUNTIME_REGISTRY.templates = ()  # type: ignore[misc]


def test_runtime_retained_is_false_unless_passed_and_a_template_passes_it_on() -> None:
    assert _EVENT.retained is False
    assert _TARGETED.retained is False
    assert _TARGETED.build(kind="scan", id="p-1").retained is False
    kept = dataclasses.replace(_TARGETED, retained=True)
    built = kept.build(kind="scan", id="p-1")
    assert (built.retained, built.lossless, built.template) == (True, False, kept.pattern)


_ASK: RequestTopicTemplate[control_pb2.HealthCheckRequest, control_pb2.HealthCheckReply] = (
    RequestTopicTemplate(
        "svc.ask.{id}",
        ("id",),
        control_pb2.HealthCheckRequest,
        PRIVILEGED,
        frozenset({"a"}),
        frozenset({"b"}),
        True,
        lossless=True,
        reply_type=control_pb2.HealthCheckReply,
    )
)


def test_runtime_request_topic_template_builds_request_topics() -> None:
    assert isinstance(_ASK, TopicTemplate)
    assert _ASK.reply_name == "daemoneye.eventbus.v1.HealthCheckReply"
    assert _ASK.payload_name == "daemoneye.eventbus.v1.HealthCheckRequest"
    built = _ASK.build(id="p-1")
    assert built == RequestTopic(
        "svc.ask.p-1",
        control_pb2.HealthCheckRequest,
        PRIVILEGED,
        frozenset({"a"}),
        frozenset({"b"}),
        True,
        "svc.ask.{id}",
        True,
        reply_type=control_pb2.HealthCheckReply,
    )
    assert isinstance(built, Topic)
    assert built.reply_name == _ASK.reply_name
    assert (built.lossless, built.retained) == (True, False)
    # A request topic is not equal to the plain topic of the same fields.
    plain: Topic[control_pb2.HealthCheckRequest] = Topic(
        built.name,
        built.payload_type,
        built.access,
        built.publishers,
        built.subscribers,
        built.control,
        built.template,
        built.lossless,
    )
    assert plain != built
    assert type(_TARGETED.build(kind="scan", id="p-1")) is Topic
    assert _ASK.match("svc.ask.p-1") == {"id": "p-1"}
    with pytest.raises(ValueError, match=r"takes parameters \['id'\], got \[\]"):
        _ASK.build()
    with pytest.raises(ValueError, match=r"parameter 'id' .* must be one topic level"):
        _ASK.build(id="a.b")
    # Frozen and slotted like Topic; the request type is checked by the topic's call.
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.reply_type = control_pb2.HealthCheckReply  # type: ignore[misc]
    assert not hasattr(built, "__dict__")
    assert built(control_pb2.HealthCheckRequest()).topic is built
    with pytest.raises(TypeError, match=r"carries daemoneye\.eventbus\.v1\.HealthCheckRequest"):
        built(control_pb2.HealthCheckReply())  # type: ignore[arg-type]
    # A registry builds a request topic from its template.
    reg = TopicRegistry(MappingProxyType({}), (_ASK,))
    assert reg.lookup("svc.ask.p-2") == _ASK.build(id="p-2")
    assert isinstance(reg.lookup("svc.ask.p-2"), RequestTopic)


def test_runtime_imports_nothing_heavy() -> None:
    """Importing the runtime loads no other module of the bus and no generated code."""
    code = (
        "import sys, daemoneye_eventbus.registry_runtime\n"
        "print(sorted(m for m in sys.modules if m.startswith('daemoneye')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert proc.stdout.strip() == str(["daemoneye_eventbus", "daemoneye_eventbus.registry_runtime"])
    assert registry_runtime.__all__ == [
        "Publication",
        "RequestTopic",
        "RequestTopicTemplate",
        "Topic",
        "TopicRegistry",
        "TopicTemplate",
    ]


# --------------------------------------------------------------------------
# Registry at run time

TARGETED = "control.collector.task.{type}.{id}"
PROCESS_EVENT_TOPICS = {
    "events.process.lifecycle",
    "events.process.metadata",
    "events.process.tree",
    "events.process.integrity",
    "events.process.anomaly",
}


@pytest.mark.parametrize("name", list(registry.TOPICS))
def test_lookup_every_topic(name: str) -> None:
    topic = registry.TOPICS[name]
    assert topic.name == name
    assert str(topic) == name
    assert topic.template is None
    assert registry.lookup(name) is topic
    validate_topic(name)


def test_lookup_targeted_task_topic() -> None:
    topic = registry.lookup("control.collector.task.scan.procmond-1")
    assert topic is not None
    assert topic.name == "control.collector.task.scan.procmond-1"
    assert topic.payload_type is control_pb2.TaskAssignment
    assert topic.payload_name == "daemoneye.eventbus.v1.TaskAssignment"
    assert topic.template == TARGETED
    assert topic.access == PRIVILEGED
    assert topic.control is True
    assert topic == registry.control_collector_task_targeted(type="scan", id="procmond-1")
    assert registry.CONTROL_COLLECTOR_TASK_TARGETED.match(topic.name) == {
        "type": "scan",
        "id": "procmond-1",
    }


@pytest.mark.parametrize(
    "name",
    [
        "events.process.unknown",
        "events.process",
        "events",
        "",
        "control.collector.task.scan",
        "control.collector.task.scan.procmond-1.extra",
        "control.collector.task.+.+",
        "control.collector.task.scan.#",
        "control.collector.task.a b.c",
        "control.collector.task..c",
        "events.process.#",
        "EVENTS.PROCESS.LIFECYCLE",
    ],
)
def test_lookup_unknown_returns_none(name: str) -> None:
    assert registry.lookup(name) is None


# What bus.py's hand-written table said before the schema carried it.
_PROCESS_KIND_TOPICS = {
    "PROCESS_EVENT_KIND_UNSPECIFIED": "events.process.lifecycle",
    "PROCESS_EVENT_KIND_START": "events.process.lifecycle",
    "PROCESS_EVENT_KIND_STOP": "events.process.lifecycle",
    "PROCESS_EVENT_KIND_EXIT": "events.process.lifecycle",
    "PROCESS_EVENT_KIND_SNAPSHOT": "events.process.lifecycle",
    "PROCESS_EVENT_KIND_METADATA_UPDATE": "events.process.metadata",
    "PROCESS_EVENT_KIND_TREE_CHANGE": "events.process.tree",
    "PROCESS_EVENT_KIND_INTEGRITY_CHECK": "events.process.integrity",
    "PROCESS_EVENT_KIND_ANOMALY": "events.process.anomaly",
}


def test_process_event_kind_topics_map_every_kind() -> None:
    table = registry.PROCESS_EVENT_KIND_TOPICS
    assert "PROCESS_EVENT_KIND_TOPICS" in registry.__all__
    assert set(table) == set(events_pb2.ProcessEventKind.values())
    assert set(_PROCESS_KIND_TOPICS) == set(events_pb2.ProcessEventKind.keys())
    for name, topic_name in _PROCESS_KIND_TOPICS.items():
        topic = table[events_pb2.ProcessEventKind.Value(name)]
        assert topic.name == topic_name, name
        assert registry.TOPICS[topic_name] is topic
        assert topic.payload_type is events_pb2.ProcessEvent
    assert {t.name for t in table.values()} == PROCESS_EVENT_TOPICS
    with pytest.raises(TypeError):
        table[0] = registry.EVENTS_PROCESS_TREE  # type: ignore[index]


def test_template_build() -> None:
    template = registry.CONTROL_COLLECTOR_TASK_TARGETED
    assert template.pattern == TARGETED
    assert template.parameters == ("type", "id")
    topic = template.build(type="hash", id="fsmond_2")
    assert topic.name == "control.collector.task.hash.fsmond_2"
    assert topic.template == TARGETED
    assert topic.payload_type is control_pb2.TaskAssignment
    assert topic.access == template.access == PRIVILEGED
    assert topic.publishers == template.publishers
    assert topic.subscribers == template.subscribers
    assert topic.control == template.control
    assert template in registry.TEMPLATES


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"type": "scan"},
        {"id": "procmond-1"},
        {"type": "scan", "id": "procmond-1", "extra": "x"},
        {"type": "scan", "ident": "procmond-1"},
    ],
    ids=["none", "missing-id", "missing-type", "extra", "misnamed"],
)
def test_template_build_rejects_wrong_parameters(values: dict[str, str]) -> None:
    with pytest.raises(ValueError, match=r"takes parameters \['type', 'id'\]"):
        registry.CONTROL_COLLECTOR_TASK_TARGETED.build(**values)


@pytest.mark.parametrize("bad", ["a.b", "", "+", "#", "a b", "x/y", "café", "a\n"])
@pytest.mark.parametrize("param", ["type", "id"])
def test_template_build_rejects_values_that_are_not_one_level(param: str, bad: str) -> None:
    values = {"type": "scan", "id": "procmond-1", param: bad}
    with pytest.raises(ValueError, match=f"parameter '{param}' .* must be one topic level"):
        registry.CONTROL_COLLECTOR_TASK_TARGETED.build(**values)
    with pytest.raises(ValueError, match="must be one topic level"):
        registry.control_collector_task_targeted(**values)


def test_template_filter() -> None:
    template = registry.CONTROL_COLLECTOR_TASK_TARGETED
    assert template.filter == "control.collector.task.+.+"
    validate_topic_filter(template.filter)
    built = registry.control_collector_task_targeted(type="scan", id="procmond-1")
    assert topic_matches(template.filter, built.name)
    assert not topic_matches(template.filter, registry.CONTROL_COLLECTOR_TASK.name)


def test_topics_for_payload() -> None:
    process = registry.topics_for_payload(events_pb2.ProcessEvent)
    assert len(process) == 5
    assert {t.name for t in process} == PROCESS_EVENT_TOPICS
    assert all(t.payload_type is events_pb2.ProcessEvent for t in process)
    # In schema order.
    assert [t.name for t in process] == [n for n in registry.TOPICS if n in PROCESS_EVENT_TOPICS]
    assert registry.topics_for_payload(events_pb2.ProcessBatch) == (registry.EVENTS_PROCESS_BATCH,)
    assert registry.topics_for_payload(control_pb2.TaskAssignment) == (
        registry.CONTROL_COLLECTOR_TASK,
    )
    assert registry.topics_for_payload(events_pb2.CollectionEvent) == ()


def test_every_topic_has_an_access_level() -> None:
    declared: list[registry.Topic[Any] | registry.TopicTemplate[Any]] = [
        *registry.TOPICS.values(),
        *registry.TEMPLATES,
    ]
    assert declared
    for t in declared:
        assert t.access in {PUBLIC, RESTRICTED, PRIVILEGED}, t
        assert t.access != AccessLevel.ACCESS_LEVEL_UNSPECIFIED, t
    assert AccessLevel.ACCESS_LEVEL_UNSPECIFIED not in registry.ACCESS_TABLE.values()


def test_access_table_covers_topics_and_templates() -> None:
    patterns = {t.pattern: t for t in registry.TEMPLATES}
    assert set(registry.ACCESS_TABLE) == set(registry.TOPICS) | set(patterns)
    assert len(registry.ACCESS_TABLE) == len(registry.TOPICS) + len(patterns)
    for name, access in registry.ACCESS_TABLE.items():
        declared = registry.TOPICS.get(name) or patterns[name]
        assert declared.access == access, name


_PROCESS_PUBLISHERS = frozenset({"procmond"})


@pytest.mark.parametrize(
    ("name", "access", "publishers"),
    [
        ("events.process.lifecycle", RESTRICTED, _PROCESS_PUBLISHERS),
        ("events.process.metadata", RESTRICTED, _PROCESS_PUBLISHERS),
        ("events.process.tree", RESTRICTED, _PROCESS_PUBLISHERS),
        ("events.process.integrity", RESTRICTED, _PROCESS_PUBLISHERS),
        ("events.process.batch", RESTRICTED, _PROCESS_PUBLISHERS),
        ("events.process.anomaly", PUBLIC, None),
        ("control.collector.lifecycle", PRIVILEGED, None),
        ("control.collector.config", PRIVILEGED, None),
        ("control.collector.task", PRIVILEGED, None),
        ("control.collector.registration", RESTRICTED, None),
        ("control.agent.orchestration", PRIVILEGED, None),
        ("control.agent.policy", PRIVILEGED, None),
        ("control.health.heartbeat", PUBLIC, None),
        ("control.health.status", PUBLIC, None),
        ("control.health.diagnostics", PUBLIC, None),
    ],
)
def test_required_topic(
    name: str, access: AccessLevel.ValueType, publishers: frozenset[str] | None
) -> None:
    topic = registry.TOPICS.get(name)
    assert topic is not None, f"the schema does not declare {name}"
    assert topic.access == access
    assert registry.ACCESS_TABLE[name] == access
    if publishers is not None:
        assert topic.publishers == publishers
    if access != PUBLIC:
        assert topic.publishers
        assert topic.subscribers
    assert topic.control is name.startswith("control.")


def test_required_targeted_task_template() -> None:
    templates = {t.pattern: t for t in registry.TEMPLATES}
    assert TARGETED in templates
    template = templates[TARGETED]
    assert template is registry.CONTROL_COLLECTOR_TASK_TARGETED
    assert template.access == PRIVILEGED
    assert registry.ACCESS_TABLE[TARGETED] == PRIVILEGED
    assert template.payload_type is control_pb2.TaskAssignment
    assert template.control is True


@pytest.mark.parametrize("family", ["events.network.", "events.filesystem.", "events.performance."])
def test_required_restricted_event_family(family: str) -> None:
    topics = [t for name, t in registry.TOPICS.items() if name.startswith(family)]
    assert topics, f"no {family}* topic"
    assert any(t.access == RESTRICTED for t in topics)
    for t in topics:
        assert t.access == RESTRICTED, t.name
        assert t.publishers
        assert t.subscribers
