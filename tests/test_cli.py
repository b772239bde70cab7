"""The ``daemoneye-eventbus`` command, run as real subprocesses against real brokers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import AGENT, PROCMOND, peer_published, worker_env

from daemoneye.eventbus.v1 import registry
from daemoneye.eventbus.v1.events_pb2 import ProcessEvent
from daemoneye.eventbus.v1.options_pb2 import AccessLevel
from daemoneye_eventbus.broker import Broker
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.runtime import loop_name

CLI = [sys.executable, "-m", "daemoneye_eventbus.cli"]
COMMANDS = ["serve", "pub", "sub", "stats", "collectors", "task", "bridge", "topics", "demo"]
#: As root ``serve`` refuses to run on without --user or --allow-root (tests/test_privileges.py).
ROOT = ["--allow-root"] if os.geteuid() == 0 else []
#: Generous: a loaded 2-core CI machine starts Python + protobuf slowly.
PROC_TIMEOUT = 60.0
LIFECYCLE = "events.process.lifecycle"
INTEGRITY = "events.process.integrity"
PAYLOAD = '{"pid": 5, "name": "x"}'


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]


def run_sync(*args: str) -> Result:
    """Run the CLI to completion (only where no in-process broker must keep serving)."""
    proc = subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        env=worker_env(),
        timeout=PROC_TIMEOUT,
        check=False,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


async def start(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=worker_env(),
    )


async def finish(proc: asyncio.subprocess.Process, timeout: float = PROC_TIMEOUT) -> Result:
    """Wait for the process, reading all its output; kill it if it hangs."""
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        pytest.fail(f"CLI did not exit within {timeout} s; stdout={out!r} stderr={err!r}")
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


async def run(*args: str) -> Result:
    """Run the CLI while this test's event loop (and its broker) keeps running."""
    return await finish(await start(*args))


async def start_sub(*args: str, component: str = AGENT) -> asyncio.subprocess.Process:
    """Start ``sub`` as ``component`` and wait until its subscription is in place."""
    proc = await start("sub", *args, "--component", component)
    assert proc.stderr is not None
    try:
        line = await asyncio.wait_for(proc.stderr.readline(), PROC_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.communicate()
        raise
    if not line.startswith(b"subscribed to "):
        result = await finish(proc)
        pytest.fail(f"sub did not subscribe: {line!r} {result}")
    return proc


async def pub(
    sock_path: str,
    *args: str,
    topic: str = LIFECYCLE,
    payload: str = PAYLOAD,
    component: str = PROCMOND,
) -> None:
    result = await run(
        "pub", topic, "--json", payload, "--socket", sock_path, "--component", component, *args
    )
    assert result.returncode == 0, result
    assert result.stdout == ""


async def connections_settle(broker: Broker, expected: int) -> None:
    """Wait (a few seconds at most) until the broker has noticed departed clients."""
    for _ in range(250):
        if broker.statistics().connections == expected:
            return
        await asyncio.sleep(0.02)
    assert broker.statistics().connections == expected


# -- help and topics (no broker needed) ----------------------------------------------


def test_top_level_help() -> None:
    result = run_sync("--help")
    assert result.returncode == 0, result
    assert "daemoneye-eventbus" in result.stdout
    for command in COMMANDS:
        assert command in result.stdout
    for option in ("--socket", "--instance"):
        assert option in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help(command: str) -> None:
    result = run_sync(command, "--help")
    assert result.returncode == 0, result
    assert f"daemoneye-eventbus {command}" in result.stdout
    # Every command takes --socket and --instance.
    assert "--socket" in result.stdout
    assert "--instance" in result.stdout


def test_no_command_is_an_error() -> None:
    result = run_sync()
    assert result.returncode != 0
    assert result.stdout == ""
    assert "usage" in result.stderr


def test_topics_table_lists_every_topic_with_access() -> None:
    result = run_sync("topics")
    assert result.returncode == 0, result
    header, *lines = result.stdout.splitlines()
    assert header.split() == [
        "topic",
        "access",
        "payload",
        "publishers",
        "subscribers",
        "delivery",
        "retained",
    ]
    rows = {line.split()[0]: line.split() for line in lines}
    expected = {name: t.access for name, t in registry.TOPICS.items()}
    expected.update({t.pattern: t.access for t in registry.TEMPLATES})
    assert set(rows) == set(expected)
    for name, access in expected.items():
        level = AccessLevel.Name(access).removeprefix("ACCESS_LEVEL_").lower()
        assert rows[name][1] == level, name
    assert rows[INTEGRITY][5] == "lossless"
    assert rows[LIFECYCLE][5] == "at-most-once"
    assert rows["control.collector.config"][6] == "retained"
    assert rows[LIFECYCLE][6] == "-"


def test_topics_json() -> None:
    result = run_sync("topics", "--json")
    assert result.returncode == 0, result
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    # 21 topics and 6 templates (5 of them request topics).
    assert len(rows) == 27
    by_name = {r["topic"]: r for r in rows}
    assert len(by_name) == 27
    template = by_name["control.collector.task.{type}.{id}"]
    assert template["access"] == "privileged"
    assert template["payload"] == "daemoneye.eventbus.v1.TaskAssignment"
    assert template["control"] is True
    assert by_name["events.process.anomaly"]["access"] == "public"
    assert by_name["events.process.anomaly"]["control"] is False
    assert by_name[LIFECYCLE]["access"] == "restricted"
    assert by_name[LIFECYCLE]["publishers"] == ["procmond"]
    assert set(by_name) == {*registry.TOPICS, *(t.pattern for t in registry.TEMPLATES)}
    for r in rows:
        assert set(r) == {
            "topic",
            "access",
            "payload",
            "publishers",
            "subscribers",
            "control",
            "lossless",
            "retained",
        }
        assert r["access"] in {"public", "restricted", "privileged"}
    assert by_name[INTEGRITY]["lossless"] is True
    assert by_name[LIFECYCLE]["lossless"] is False
    retained = {r["topic"] for r in rows if r["retained"]}
    assert retained == {"control.collector.config", "control.agent.policy", "control.health.status"}
    assert by_name["control.presence"]["publishers"] == ["daemoneye-eventbus"]


# -- pub / sub -------------------------------------------------------------------------


async def test_sub_json_lines(broker: Broker, sock_path: str) -> None:
    sub = await start_sub(LIFECYCLE, "--json", "--count", "2", "--socket", sock_path)
    await pub(sock_path, "--correlation-id", "c1")
    await pub(sock_path, payload='{"pid": 6, "name": "y"}')
    result = await finish(sub)
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["topic"] == LIFECYCLE
    assert first["sequence"] == 1
    assert first["payload_type"] == "daemoneye.eventbus.v1.ProcessEvent"
    assert first["payload"] == {"pid": 5, "name": "x"}
    assert first["correlation"]["correlationId"] == "c1"
    assert first["correlation"]["rootCorrelationId"] == "c1"
    assert second["sequence"] == 2
    assert second["payload"] == {"pid": 6, "name": "y"}
    assert "correlation" not in second


async def test_sub_text_lines_and_wildcard(broker: Broker, sock_path: str) -> None:
    sub = await start_sub("events.process.#", "--count", "2", "--socket", sock_path)
    await pub(sock_path, "--correlation-id", "c1")
    await pub(sock_path, topic="events.process.tree", payload='{"pid": 7}')
    result = await finish(sub)
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{LIFECYCLE} #1 correlation=c1 ")
    assert "pid: 5" in lines[0]
    assert 'name: "x"' in lines[0]
    assert lines[1].startswith("events.process.tree #2 ")  # per-subscription numbering
    assert "pid: 7" in lines[1]


async def test_sub_lossless_asks_for_lossless_delivery(broker: Broker, sock_path: str) -> None:
    sub = await start_sub(LIFECYCLE, "--lossless", "--json", "--count", "3", "--socket", sock_path)
    (stats,) = broker.statistics().subscription_stats
    assert stats.lossless
    await pub(sock_path, "--count", "3")
    result = await finish(sub)
    assert result.returncode == 0, result
    assert [r["sequence"] for r in result.json_lines()] == [1, 2, 3]
    assert broker.statistics().dropped == 0


async def test_sub_marks_a_retained_event(broker: Broker, sock_path: str) -> None:
    status = "control.health.status"  # retained, public
    await pub(sock_path, topic=status, payload='{"componentId": "procmond-1", "message": "ok"}')
    sub = await start_sub(status, "--json", "--count", "2", "--socket", sock_path)
    await pub(sock_path, topic=status, payload='{"componentId": "procmond-1", "message": "busy"}')
    result = await finish(sub)
    assert result.returncode == 0, result
    first, second = result.json_lines()
    assert (first["sequence"], first["retained"], first["payload"]["message"]) == (1, True, "ok")
    assert (second["sequence"], second["payload"]["message"]) == (2, "busy")
    assert "retained" not in second
    text = await start_sub(status, "--count", "1", "--socket", sock_path)
    line = (await finish(text)).stdout.splitlines()[0]
    assert line.startswith(f"{status} #1 (retained) ")


async def test_pub_count(broker: Broker, sock_path: str) -> None:
    sub = await start_sub("#", "--json", "--count", "3", "--socket", sock_path)
    await pub(sock_path, "--count", "3")
    result = await finish(sub)
    assert result.returncode == 0, result
    assert [r["sequence"] for r in result.json_lines()] == [1, 2, 3]
    assert peer_published(broker.statistics()) == 3


async def test_sub_correlation_root_filters(broker: Broker, sock_path: str) -> None:
    sub = await start_sub(
        "events.#", "--json", "--correlation-root", "c1", "--count", "2", "--socket", sock_path
    )
    await pub(sock_path, "--correlation-id", "c1", payload='{"pid": 1}')
    await pub(sock_path, "--correlation-id", "c2", payload='{"pid": 2}')
    await pub(sock_path, payload='{"pid": 3}')  # no correlation at all
    await pub(sock_path, "--correlation-id", "c1", payload='{"pid": 4}')
    result = await finish(sub)
    assert result.returncode == 0, result
    records = result.json_lines()
    assert [r["payload"]["pid"] for r in records] == [1, 4]
    assert {r["correlation"]["rootCorrelationId"] for r in records} == {"c1"}
    # The broker filtered: the other two never reached the subscriber.
    assert [r["sequence"] for r in records] == [1, 2]
    assert peer_published(broker.statistics()) == 4


async def test_sub_correlation_id_filters(broker: Broker, sock_path: str) -> None:
    sub = await start_sub(
        "events.#", "--json", "--correlation-id", "c2", "--count", "1", "--socket", sock_path
    )
    await pub(sock_path, "--correlation-id", "c1", payload='{"pid": 1}')
    await pub(sock_path, "--correlation-id", "c2", payload='{"pid": 2}')
    result = await finish(sub)
    assert result.returncode == 0, result
    assert [r["payload"]["pid"] for r in result.json_lines()] == [2]


async def test_sub_timeout_without_events_is_a_normal_end(broker: Broker, sock_path: str) -> None:
    result = await run("sub", "#", "--timeout", "0.5", "--socket", sock_path)
    assert result.returncode == 0, result
    assert result.stdout == ""
    assert result.stderr == "subscribed to #\n"


async def test_sub_timeout_after_events_exits_0(broker: Broker, sock_path: str) -> None:
    sub = await start_sub("#", "--json", "--timeout", "1.5", "--socket", sock_path)
    # Published from here, at once: a publisher process might start later than the timeout.
    async with Client(sock_path, component=PROCMOND) as c:
        for pid in (1, 2):
            await c.publish(registry.EVENTS_PROCESS_LIFECYCLE, ProcessEvent(pid=pid))
        await c.flush()
    result = await finish(sub)
    assert result.returncode == 0, result
    assert [r["payload"]["pid"] for r in result.json_lines()] == [1, 2]


async def test_sub_broker_gone_is_an_error(broker: Broker, sock_path: str) -> None:
    sub = await start_sub("#", "--json", "--count", "5", "--socket", sock_path)
    await pub(sock_path)
    await broker.close()
    result = await finish(sub)
    assert len(result.json_lines()) == 1
    assert result.returncode == 1
    assert "error" in result.stderr


async def test_pub_undeclared_topic(broker: Broker, sock_path: str) -> None:
    result = await run("pub", "events.nope.thing", "--json", "{}", "--socket", sock_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "events.nope.thing" in result.stderr
    assert "not declared" in result.stderr
    assert "Traceback" not in result.stderr
    assert broker.statistics().published == 0


@pytest.mark.parametrize(
    "payload",
    ["{bad", "", "[1]", "5", "null", '{"pid": "abc"}', '{"nope": 1}', '{"pid": -1}'],
)
async def test_pub_invalid_json(broker: Broker, sock_path: str, payload: str) -> None:
    result = await run(
        "pub", LIFECYCLE, "--json", payload, "--socket", sock_path, "--component", PROCMOND
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("daemoneye-eventbus pub: error: ")
    assert "Traceback" not in result.stderr
    assert broker.statistics().published == 0


def test_invalid_instance_name() -> None:
    result = run_sync("stats", "--instance", "../etc")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "instance name" in result.stderr


# -- nobody listening ----------------------------------------------------------------------


@pytest.fixture(params=["missing", "stale"])
def dead_socket(request: pytest.FixtureRequest, sock_dir: Path) -> str:
    """A socket path where no broker listens: no file at all, or a stale socket file."""
    path = sock_dir / "dead.sock"
    if request.param == "stale":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        s.close()
    return str(path)


@pytest.mark.parametrize(
    "args",
    [
        ["pub", LIFECYCLE, "--json", PAYLOAD],
        ["sub", "#", "--count", "1"],
        ["stats"],
        ["stats", "--json"],
    ],
    ids=["pub", "sub", "stats", "stats-json"],
)
def test_nothing_listening(dead_socket: str, args: list[str]) -> None:
    result = run_sync(*args, "--socket", dead_socket)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"daemoneye-eventbus {args[0]}: error: ")
    assert f"no broker at {dead_socket}" in result.stderr
    assert "Traceback" not in result.stderr


# -- stats ----------------------------------------------------------------------------------


async def test_stats_text(broker: Broker, sock_path: str) -> None:
    async with Client(sock_path, name="watcher", component=AGENT) as watcher:
        sub = await watcher.subscribe("events.#")
        await pub(sock_path, "--count", "3", "--name", "cli-pub")
        await connections_settle(broker, 1)
        result = await run("stats", "--socket", sock_path, "--component", "daemoneye-agent")
        for _ in range(3):
            await sub.get(timeout=5)
    assert result.returncode == 0, result
    text = result.stdout
    # The watcher and the stats command itself are connected; the publisher has left.
    assert "connections: 2 open, 3 since start" in text
    # 3 events of the publisher, and the broker's presence events: 3 connections, 1 gone.
    assert "events:      7 published, 3 delivered, 0 dropped, 0 refused" in text
    assert "retained:    0 events, 0 bytes" in text
    assert "'watcher'" in text
    assert "events.#" in text
    assert "delivered=3 dropped=0" in text


async def test_stats_json(broker: Broker, sock_path: str) -> None:
    async with Client(sock_path, name="watcher", component=AGENT) as watcher:
        await watcher.subscribe("events.#")
        await pub(sock_path, "--count", "2")
        await connections_settle(broker, 1)
        result = await run(
            "stats",
            "--json",
            "--socket",
            sock_path,
            "--name",
            "stats-cli",
            "--component",
            "daemoneye-agent",
        )
    assert result.returncode == 0, result
    stats = json.loads(result.stdout)
    # Counters are numbers (protobuf's JSON mapping would write uint64 as strings).
    assert stats["connections"] == 2
    assert stats["connectionsTotal"] == 3
    assert peer_published(stats) == 2
    assert stats["delivered"] == 2
    assert stats["dropped"] == 0
    names = {c["clientName"] for c in stats["connectionStats"]}
    assert names == {"watcher", "stats-cli"}
    assert {s["filter"] for s in stats["subscriptionStats"]} == {"events.#"}


# -- serve --------------------------------------------------------------------------------


@pytest.fixture
def instance() -> Iterator[str]:
    name = f"test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield name
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/tmp/daemoneye-{name}.sock")


def test_serve_instance_and_sigint(instance: str) -> None:
    path = f"/tmp/daemoneye-{instance}.sock"
    server = subprocess.Popen(
        [*CLI, "serve", "--instance", instance, *ROOT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=worker_env(),
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        # The line also names the socket mode, the access policy, the broker's uid and gid
        # and the event loop.
        assert line.strip() == (
            f"daemoneye-eventbus broker listening on {path} "
            f"(mode 0600, policy default, uid {os.geteuid()}, gid {os.getegid()}, "
            f"loop {loop_name()})"
        )
        assert os.path.exists(path)
        # Other commands find it by instance name too.
        published = run_sync(
            "pub",
            LIFECYCLE,
            "--json",
            PAYLOAD,
            "--count",
            "2",
            "--instance",
            instance,
            "--component",
            PROCMOND,
        )
        assert published.returncode == 0, published
        stats = run_sync("stats", "--json", "--instance", instance)
        assert stats.returncode == 0, stats
        assert peer_published(json.loads(stats.stdout)) == 2
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=PROC_TIMEOUT)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert server.returncode == 0, err
    # pub's 2 events and the broker's presence events: pub and stats came and went.
    assert "broker stopped: 6 published" in out
    assert "Traceback" not in err
    assert not os.path.exists(path)


async def test_serve_refuses_a_live_socket(broker: Broker, sock_path: str) -> None:
    result = await run("serve", "--socket", sock_path, *ROOT)
    assert result.returncode == 1
    assert "another broker is listening" in result.stderr
    async with Client(sock_path) as c:  # the first broker still serves
        await c.flush()


# -- demo ---------------------------------------------------------------------------------


async def test_demo(sock_dir: Path) -> None:
    result = await run("demo", "--count", "3", "--socket", str(sock_dir / "demo.sock"))
    assert result.returncode == 0, result
    # Two process scans of at most 3 processes each (tests/test_demo.py: the whole story).
    assert "aggregate of wf-" in result.stdout
    summary = result.stdout.splitlines()[-1]
    assert summary.startswith("agent received "), summary
    assert f"6 on {LIFECYCLE}" in summary
