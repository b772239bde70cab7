"""The CLI behaves like the command-line tools people know (mosquitto_pub/sub, nats).

One clear line per error and the right exit status, no tracebacks or warnings
for configuration mistakes, help with units and defaults for every option,
aligned tables, JSON with numbers as numbers and without internal fields,
unknown components refused at connect with the list of known ones. The
commands run as real processes, against a real broker where they need one;
only the JSON conversion is also checked on its own, on messages the broker
never sends.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import AGENT, PROCMOND, peer_published, worker_env
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from test_cli import (
    CLI,
    LIFECYCLE,
    PAYLOAD,
    PROC_TIMEOUT,
    ROOT,
    Result,
    connections_settle,
    finish,
    run,
    start_sub,
)

from daemoneye.eventbus.v1 import frames_pb2, registry
from daemoneye.eventbus.v1.events_pb2 import ProcessBatch, ProcessEvent
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode
from daemoneye_eventbus.access import SCHEMA_COMPONENTS
from daemoneye_eventbus.broker import Broker, BrokerConfig
from daemoneye_eventbus.cli_output import message_json
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.errors import AccessDenied
from daemoneye_eventbus.runtime import LOOP_ENV, loop_name

KNOWN = ", ".join(sorted(SCHEMA_COMPONENTS))
INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def run_env(env: dict[str, str], *args: str) -> Result:
    proc = subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env=env, timeout=PROC_TIMEOUT, check=False
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def one_error_line(result: Result, command: str) -> str:
    """The only line on stderr, an ``error:`` line of ``command``; its text."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result
    prefix = f"daemoneye-eventbus {command}: error: "
    assert lines[0].startswith(prefix), result
    return lines[0].removeprefix(prefix)


# -- DAEMONEYE_EVENTBUS_LOOP: a configuration error, said once --------------------------------


@pytest.fixture
def without_uvloop(tmp_path: Path) -> dict[str, str]:
    """An environment in which ``import uvloop`` fails, as where it is not installed."""
    shadow = tmp_path / "no-uvloop" / "uvloop"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('uvloop is not installed here')\n")
    env = worker_env()
    env["PYTHONPATH"] = os.pathsep.join([str(shadow.parent), env["PYTHONPATH"]])
    env[LOOP_ENV] = "uvloop"
    return env


COMMANDS_ON_A_LOOP = [
    ["serve", *ROOT],
    ["pub", LIFECYCLE, "--json", PAYLOAD],
    ["sub", "#"],
    ["stats"],
    ["stats", "--json"],
    ["collectors"],
    ["task", "scan"],
    ["bridge", "--host-id", "web-01"],
    ["demo"],
]


@pytest.mark.parametrize("args", COMMANDS_ON_A_LOOP, ids=lambda a: "-".join(a[:2]))
def test_uvloop_asked_for_but_missing(
    without_uvloop: dict[str, str], sock_dir: Path, args: list[str]
) -> None:
    result = run_env(without_uvloop, *args, "--socket", str(sock_dir / "bus.sock"))
    assert result.returncode == 2, result
    assert result.stdout == ""
    text = one_error_line(result, args[0])
    assert text.startswith(f"{LOOP_ENV}=uvloop but uvloop is not installed"), text
    assert "Traceback" not in result.stderr
    assert "never awaited" not in result.stderr
    assert not (sock_dir / "bus.sock").exists()  # nothing was started


@pytest.mark.parametrize("args", COMMANDS_ON_A_LOOP, ids=lambda a: "-".join(a[:2]))
def test_an_invalid_loop_choice(sock_dir: Path, args: list[str]) -> None:
    env = worker_env()
    env[LOOP_ENV] = "tokio"
    result = run_env(env, *args, "--socket", str(sock_dir / "bus.sock"))
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert one_error_line(result, args[0]) == (
        f"{LOOP_ENV}='tokio': expected one of auto, asyncio, uvloop"
    )
    assert "never awaited" not in result.stderr


def test_topics_needs_no_loop() -> None:
    env = worker_env()
    env[LOOP_ENV] = "tokio"
    result = run_env(env, "topics")
    assert result.returncode == 0, result
    assert result.stderr == ""


# -- serve's configuration: exit status 2, one line --------------------------------------------


def test_an_unknown_socket_group_is_a_configuration_error(sock_dir: Path) -> None:
    path = sock_dir / "bus.sock"
    result = run_env(
        worker_env(), "serve", *ROOT, "--socket", str(path), "--socket-group", "no-such-group-17"
    )
    assert result.returncode == 2, result
    assert one_error_line(result, "serve") == "no group named 'no-such-group-17'"
    assert not path.exists()


# -- a refused publish: one line ---------------------------------------------------------------


@pytest.mark.parametrize("count", ["1", "3"])
async def test_a_refused_publish_is_reported_once(
    broker: Broker, sock_path: str, count: str
) -> None:
    # Three events make more than one frame (the first goes alone, the rest are
    # batched): more than one refusal arrives, one line is printed.
    # Anonymous: a restricted topic is refused, each of the events.
    result = await run("pub", LIFECYCLE, "--json", PAYLOAD, "--count", count, "--socket", sock_path)
    assert result.returncode == 1, result
    assert result.stdout == ""
    text = one_error_line(result, "pub")
    assert text == (
        f"publish on '{LIFECYCLE}': anonymous peers may publish only on public topics "
        "(ERROR_CODE_ACCESS_DENIED)"
    )
    refused = broker.statistics().refused
    assert refused == 1 if count == "1" else refused > 1
    assert peer_published(broker.statistics()) == 0


# -- help: units and defaults for every option ----------------------------------------------


def help_entries(command: str) -> dict[str, str]:
    """Each option of ``command --help``, by its first flag: the text of its entry."""
    env = worker_env()
    env["COLUMNS"] = "200"
    result = run_env(env, command, "--help")
    assert result.returncode == 0, result
    entries: dict[str, str] = {}
    current = ""
    for line in result.stdout.splitlines():
        if re.match(r"^  -", line):
            current = line.split()[0].rstrip(",")
            entries[current] = line.strip()
        elif current and line.startswith("      "):
            entries[current] += "  " + line.strip()
        else:
            current = ""
    return entries


def help_text(entry: str) -> str:
    """What an entry says after its flags and metavars (two spaces or more apart)."""
    parts = re.split(r"\s{2,}", entry, maxsplit=1)
    return parts[1] if len(parts) == 2 else ""


D = BrokerConfig()
#: serve's numeric options: a word of the unit its help must name, and the default shown.
SERVE_NUMBERS = {
    "--max-connections": ("connections", str(D.max_connections)),
    "--max-connections-per-uid": ("connections", str(D.max_connections_per_uid)),
    "--max-subscriptions": ("subscriptions", str(D.max_subscriptions)),
    "--max-frame-bytes": ("bytes", str(D.max_frame_bytes)),
    "--max-queue-messages": ("events", str(D.max_queue_messages)),
    "--max-queue-bytes": ("bytes", str(D.max_queue_bytes)),
    "--max-subscription-bytes": ("bytes", str(D.max_subscription_bytes)),
    "--max-total-subscription-bytes": ("bytes", str(D.max_total_subscription_bytes)),
    "--max-retained-events": ("events", str(D.max_retained_events)),
    "--max-retained-bytes": ("bytes", str(D.max_retained_bytes)),
    "--max-pending-requests": ("requests", str(D.max_pending_requests)),
    "--max-total-pending-requests": ("requests", str(D.max_total_pending_requests)),
    "--max-frames-per-turn": ("frames", str(D.max_frames_per_turn)),
    "--handshake-timeout": ("seconds", str(D.handshake_timeout)),
    "--heartbeat-interval": ("seconds", str(D.heartbeat_interval)),
    "--idle-timeout": ("seconds", str(D.idle_timeout)),
    "--slow-consumer-timeout": ("seconds", str(D.slow_consumer_timeout)),
    "--drain-timeout": ("seconds", str(D.drain_timeout)),
    "--default-request-timeout": ("seconds", str(D.default_request_timeout)),
    "--max-request-timeout": ("seconds", str(D.max_request_timeout)),
    "--socket-mode": ("octal", "0600"),
}


def test_serve_help_names_units_and_defaults() -> None:
    entries = help_entries("serve")
    assert set(SERVE_NUMBERS) <= set(entries)
    for flag, (unit, default) in SERVE_NUMBERS.items():
        entry = entries[flag]
        assert unit in help_text(entry), entry  # in the words, not only the metavar
        assert f"(default: {default})" in entry, entry


#: Options with a default worth showing in each other command, and that default.
DEFAULTS = {
    "pub": {"--count": "1", "--name": "daemoneye-eventbus-cli"},
    "sub": {"--name": "daemoneye-eventbus-cli"},
    "stats": {"--interval": "1.0", "--name": "daemoneye-eventbus-cli"},
    "collectors": {
        "--wait": "2.0",
        "--interval": "1.0",
        "--name": "daemoneye-eventbus-cli",
        "--component": "daemoneye-agent",
    },
    "task": {
        "--priority": "0",
        "--deadline": "30.0",
        "--strategy": "least-loaded",
        "--component": "daemoneye-agent",
    },
    "bridge": {
        "--stream": "DAEMONEYE_EVENTS",
        "--max-in-flight": "1024",
        "--ack-timeout": "5.0",
        "--spool-max-events": "1000000",
        "--replicas": "1",
    },
    "topics": {},
    "demo": {"--count": "20"},
}


@pytest.mark.parametrize("command", ["serve", *DEFAULTS])
def test_every_option_has_help(command: str) -> None:
    entries = help_entries(command)
    assert {"-h", "--socket", "--instance", "-v"} <= set(entries)
    for flag, entry in entries.items():
        assert help_text(entry), f"{command} {flag} has no help: {entry!r}"
    for flag, default in DEFAULTS.get(command, {}).items():
        assert f"(default: {default})" in entries[flag], entries[flag]
    socket_default = "a private socket" if command == "demo" else "/tmp/daemoneye.sock"
    assert f"(default: {socket_default}" in entries["--socket"]
    # Flags and options without a default do not claim one.
    assert "default: None" not in " ".join(entries.values())
    assert "default: False" not in " ".join(entries.values())


def test_seconds_options_say_seconds() -> None:
    assert "SECONDS" in help_entries("sub")["--timeout"]
    assert "SECONDS" in help_entries("stats")["--interval"]
    for flag in ("--wait", "--interval"):
        assert "seconds" in help_text(help_entries("collectors")[flag])
    assert "seconds" in help_text(help_entries("task")["--deadline"])


def test_bridge_numbers_name_their_units() -> None:
    entries = help_entries("bridge")
    for flag, unit in {
        "--ack-timeout": "seconds",
        "--request-timeout": "seconds",
        "--max-request-timeout": "seconds",
        "--max-age": "seconds",
        "--duplicate-window": "seconds",
        "--spool-max-events": "events",
        "--spool-max-bytes": "bytes",
        "--stream-max-bytes": "bytes",
        "--max-in-flight": "events",
    }.items():
        assert unit in help_text(entries[flag]), entries[flag]


# -- JSON: numbers as numbers, no internal fields ------------------------------------------------


def assert_int64_are_numbers(descriptor: Descriptor, data: dict[str, Any]) -> int:
    """Every 64-bit integer field in ``data`` is a JSON number; how many were checked."""
    checked = 0
    for field in descriptor.fields:
        if field.json_name not in data:
            continue
        values = data[field.json_name] if field.is_repeated else [data[field.json_name]]
        for value in values:
            if field.message_type is not None:
                checked += assert_int64_are_numbers(field.message_type, value)
            elif field.type in INT64:
                assert type(value) is int, (field.full_name, value)
                checked += 1
    return checked


async def test_stats_json_counters_are_numbers_without_request_id(
    broker: Broker, sock_path: str
) -> None:
    async with Client(sock_path, name="watcher", component=AGENT) as watcher:
        sub = await watcher.subscribe("events.#")
        async with Client(sock_path, component=PROCMOND) as collector:
            for pid in range(3):
                await collector.publish(registry.EVENTS_PROCESS_LIFECYCLE, ProcessEvent(pid=pid))
            await collector.flush()
        for _ in range(3):
            await sub.get(timeout=5)
        result = await run("stats", "--json", "--socket", sock_path, "--component", AGENT)
    assert result.returncode == 0, result
    stats = json.loads(result.stdout)
    assert "requestId" not in stats
    assert "request_id" not in result.stdout
    assert "requestId" not in result.stdout
    # Every uint64 counter, at the top and in each connection, subscription and topic row.
    response = frames_pb2.StatsResponse.DESCRIPTOR
    checked = assert_int64_are_numbers(response, stats)
    top = [f for f in response.fields if f.type in INT64 and f.name != "request_id"]
    assert checked > len(top)  # the rows' counters too
    assert stats["connectionStats"]
    assert stats["subscriptionStats"]
    assert (peer_published(stats), stats["delivered"], stats["dropped"]) == (3, 3, 0)
    (lifecycle,) = [t for t in stats["topicStats"] if t["topic"] == LIFECYCLE]
    assert lifecycle["published"] == 3


async def test_sub_json_64_bit_payload_fields_are_numbers(broker: Broker, sock_path: str) -> None:
    sub = await start_sub(LIFECYCLE, "--json", "--count", "1", "--socket", sock_path)
    async with Client(sock_path, component=PROCMOND) as collector:
        event = ProcessEvent(pid=9, memory_rss_bytes=2**40 + 1)
        event.observed_at.FromSeconds(1_700_000_000)
        await collector.publish(registry.EVENTS_PROCESS_LIFECYCLE, event)
        await collector.flush()
    result = await finish(sub)
    assert result.returncode == 0, result
    (line,) = result.json_lines()
    assert line["payload"]["memoryRssBytes"] == 2**40 + 1
    assert line["payload"]["pid"] == 9
    # A well-known type keeps its own JSON form.
    assert line["payload"]["observedAt"] == "2023-11-14T22:13:20Z"


def test_message_json_converts_nested_64_bit_fields_only() -> None:
    batch = ProcessBatch(enumeration_id="e1", batch_index=2)
    first = batch.processes.add(pid=1, memory_rss_bytes=2**63 - 1, metadata={"k": "12"})
    first.start_time.FromSeconds(0)
    batch.processes.add(pid=2, name="7")
    data = message_json(batch)
    assert data == {
        "enumerationId": "e1",
        "batchIndex": 2,
        "processes": [
            {
                "pid": 1,
                "memoryRssBytes": 2**63 - 1,  # a uint64, exact
                "metadata": {"k": "12"},  # map values that are strings stay strings
                "startTime": "1970-01-01T00:00:00Z",  # a well-known type keeps its form
            },
            {"pid": 2, "name": "7"},  # a string that looks like a number stays a string
        ],
    }
    assert json_format.ParseDict(data, ProcessBatch()) == batch  # pub --json reads it back
    stats = frames_pb2.StatsResponse(request_id=7, published=2**40)
    shown = message_json(stats, omit=("request_id",), all_fields=True)
    assert "requestId" not in shown
    assert shown["published"] == 2**40
    assert shown["dropped"] == 0  # counters at zero are shown, as numbers


# -- the topics table ---------------------------------------------------------------------------


def test_topics_table_columns_are_aligned() -> None:
    result = run_env(worker_env(), "topics")
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    starts = [[m.start() for m in re.finditer(r"\S+", line)] for line in lines]
    # topic, access, payload, publishers, subscribers, delivery, retained
    assert len(starts[0]) == 7
    for line, columns in zip(lines, starts, strict=True):
        assert columns == starts[0], f"misaligned: {line!r}"
    assert len(lines) == 1 + len(registry.TOPICS) + len(registry.TEMPLATES)


# -- sub --timeout, --count and --require-count ----------------------------------------------


async def test_sub_count_not_reached_before_the_timeout(broker: Broker, sock_path: str) -> None:
    sub = await start_sub(
        LIFECYCLE, "--json", "--count", "3", "--timeout", "1", "--socket", sock_path
    )
    async with Client(sock_path, component=PROCMOND) as collector:
        await collector.publish(registry.EVENTS_PROCESS_LIFECYCLE, ProcessEvent(pid=1))
        await collector.flush()
    result = await finish(sub)
    # Without --require-count, fewer events than --count is a normal end too.
    assert result.returncode == 0, result
    assert [r["payload"]["pid"] for r in result.json_lines()] == [1]


async def test_sub_require_count_makes_a_short_count_an_error(
    broker: Broker, sock_path: str
) -> None:
    sub = await start_sub(
        LIFECYCLE,
        "--json",
        "--count",
        "3",
        "--timeout",
        "1",
        "--require-count",
        "--socket",
        sock_path,
    )
    async with Client(sock_path, component=PROCMOND) as collector:
        await collector.publish(registry.EVENTS_PROCESS_LIFECYCLE, ProcessEvent(pid=1))
        await collector.flush()
    result = await finish(sub)
    assert result.returncode == 1, result
    assert [r["payload"]["pid"] for r in result.json_lines()] == [1]
    # (start_sub has read the "subscribed to" line)
    assert result.stderr.splitlines() == [
        "daemoneye-eventbus sub: error: 1 of 3 events before 1 s passed without one "
        "(--require-count)"
    ]


async def test_sub_require_count_met_exits_0(broker: Broker, sock_path: str) -> None:
    sub = await start_sub(
        LIFECYCLE, "--count", "1", "--timeout", "30", "--require-count", "--socket", sock_path
    )
    async with Client(sock_path, component=PROCMOND) as collector:
        await collector.publish(registry.EVENTS_PROCESS_LIFECYCLE, ProcessEvent(pid=1))
        await collector.flush()
    result = await finish(sub)
    assert result.returncode == 0, result


@pytest.mark.parametrize("args", [["--count", "2"], ["--timeout", "1"], []])
def test_require_count_needs_count_and_timeout(args: list[str]) -> None:
    result = run_env(worker_env(), "sub", "#", "--require-count", *args)
    assert result.returncode == 2, result
    assert "sub --require-count needs --count and --timeout" in result.stderr
    assert "Traceback" not in result.stderr


# -- unknown components: refused at connect, with the known ones -------------------------------


@pytest.mark.parametrize(
    "args",
    [["pub", LIFECYCLE, "--json", PAYLOAD], ["sub", "#"], ["stats"], ["collectors"], ["task", "x"]],
    ids=["pub", "sub", "stats", "collectors", "task"],
)
async def test_an_unknown_component_is_refused_at_connect(
    broker: Broker, sock_path: str, caplog: pytest.LogCaptureFixture, args: list[str]
) -> None:
    with caplog.at_level(logging.WARNING, logger="daemoneye_eventbus.audit"):
        result = await run(*args, "--socket", sock_path, "--component", "nosuchcomponent")
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert one_error_line(result, args[0]) == (
        "unknown component 'nosuchcomponent'; known components (the schema's and the "
        f"policy's): {KNOWN} (ERROR_CODE_ACCESS_DENIED)"
    )
    # Audited and counted as the handshake refusal it is.
    (line,) = [r.getMessage() for r in caplog.records if "handshake_refused" in r.getMessage()]
    assert "claimed=nosuchcomponent" in line
    assert f"uid={os.getuid()}" in line
    assert broker.statistics().refused == 1
    await connections_settle(broker, 0)


async def test_an_unknown_component_is_a_typed_refusal(broker: Broker, sock_path: str) -> None:
    with pytest.raises(AccessDenied) as info:
        await Client(sock_path, component="procmon").connect()  # a typo
    assert info.value.code == ErrorCode.ERROR_CODE_ACCESS_DENIED
    assert "unknown component 'procmon'" in str(info.value)
    assert "procmond" in str(info.value)
    # A component the schema names is accepted, as before.
    async with Client(sock_path, component="fsmond") as client:
        await client.flush()


# -- demo names its loop first, as serve does --------------------------------------------------


async def test_demo_first_line_is_the_brokers(sock_dir: Path) -> None:
    path = str(sock_dir / "demo.sock")
    result = await run("demo", "--count", "1", "--socket", path)
    assert result.returncode == 0, result
    first = result.stdout.splitlines()[0]
    assert first == (
        f"daemoneye-eventbus broker listening on {path} "
        f"(mode 0600, policy default, uid {os.geteuid()}, gid {os.getegid()}, "
        f"loop {loop_name()})"
    )
