"""``daemoneye-eventbus collectors`` and ``task``, across real processes: a broker
process (``serve``), collector processes (tests/control_workers.py) started
before the command, and the command itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from serving import broker_process
from test_cli import Result, finish, run, start
from test_cli_conventions import one_error_line
from test_control_plane import Worker, collector

from daemoneye_eventbus.watch import CLEAR

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="collector workers use signals")


@contextlib.asynccontextmanager
async def two_collectors(sock: str) -> AsyncIterator[tuple[Worker, Worker]]:
    """A broker process with procmond-1 (scan, hash; yara) and procmond-2 (scan)."""
    async with (
        broker_process(sock),
        collector(
            sock, "procmond-1", "--interval", "0.5", "--tasks", "scan,hash", "--caps", "yara"
        ) as one,
        collector(sock, "procmond-2", "--interval", "0.5") as two,
    ):
        yield one, two


@pytest.fixture
async def bus(sock_dir: Path) -> AsyncIterator[str]:
    sock = str(sock_dir / "bus.sock")
    async with two_collectors(sock):
        yield sock


# -- collectors ------------------------------------------------------------------------


async def test_collectors_lists_those_started_before_it(bus: str) -> None:
    result = await run("collectors", "--socket", bus, "--wait", "1.5")
    assert result.returncode == 0, result
    assert result.stderr == ""
    header, *rows = result.stdout.splitlines()
    assert header.split() == [
        "id",
        "type",
        "state",
        "task",
        "types",
        "capabilities",
        "load",
        "heartbeat",
    ]
    assert [row.split()[:5] for row in rows] == [
        ["procmond-1", "process", "ready", "hash,scan", "yara"],
        ["procmond-2", "process", "ready", "scan", "-"],
    ] or [row.split()[:5] for row in rows] == [
        ["procmond-2", "process", "ready", "scan", "-"],
        ["procmond-1", "process", "ready", "hash,scan", "yara"],
    ]
    for row in rows:
        assert " 0/1 " in row
        assert row.endswith(" s ago")


async def test_collectors_json(bus: str) -> None:
    result = await run("collectors", "--json", "--socket", bus, "--wait", "1.5")
    assert result.returncode == 0, result
    data = json.loads(result.stdout)
    by_id = {c["collectorId"]: c for c in data["collectors"]}
    assert set(by_id) == {"procmond-1", "procmond-2"}
    one = by_id["procmond-1"]
    assert one["state"] == "ready"
    assert one["taskTypes"] == ["hash", "scan"]
    assert one["capabilities"] == ["yara"]
    assert (one["activeTasks"], one["maxConcurrentTasks"]) == (0, 1)
    assert one["heartbeatInterval"] == 0.5
    assert isinstance(one["lastHeartbeatAge"], float)
    assert 0 <= one["lastHeartbeatAge"] < 1.5
    assert isinstance(one["pid"], int)
    assert one["pid"] > 0
    assert one["sessionId"]


async def test_collectors_with_none_running(sock_dir: Path) -> None:
    sock = str(sock_dir / "bus.sock")
    async with broker_process(sock):
        text = await run("collectors", "--socket", sock, "--wait", "0.3")
        js = await run("collectors", "--json", "--socket", sock, "--wait", "0.3")
    assert (text.returncode, text.stdout) == (0, "no collectors\n")
    assert (js.returncode, json.loads(js.stdout)) == (0, {"collectors": []})


@pytest.mark.parametrize("command", [["collectors"], ["task", "scan"]], ids=["collectors", "task"])
async def test_no_broker_is_an_error(sock_dir: Path, command: list[str]) -> None:
    result = await run(*command, "--socket", str(sock_dir / "none.sock"))
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert one_error_line(result, command[0])
    assert "Traceback" not in result.stderr


async def test_collectors_watch_until_interrupted(bus: str) -> None:
    proc = await start("collectors", "--watch", "--interval", "0.2", "--socket", bus)
    assert proc.stdout is not None
    seen = ""
    try:
        async with asyncio.timeout(30):
            while seen.count("procmond-") < 4 or "ready" not in seen.split(CLEAR)[-1]:
                seen += (await proc.stdout.read(4096)).decode()
    finally:
        proc.send_signal(signal.SIGINT)
    result = await finish(proc)
    assert result.returncode == 0, result  # interrupting the view is how it ends, as stats
    assert "Traceback" not in result.stderr
    screens = (seen + result.stdout).split(CLEAR)
    assert len(screens) > 2
    assert any("procmond-1" in s and "procmond-2" in s for s in screens)


# -- task ----------------------------------------------------------------------------------


async def task(sock: str, *args: str) -> Result:
    return await run("task", *args, "--socket", sock)


async def test_task_runs_and_prints_its_outcome(bus: str) -> None:
    result = await task(bus, "scan", "--param", "sleep=0.1", "--task-id", "t-1")
    assert result.returncode == 0, result
    first, *fields = result.stdout.splitlines()
    assert first.startswith("task t-1: success by procmond-"), first
    assert first.endswith(", attempt 1)")
    assert fields == [f"  by = {first.split()[4]}"]


async def test_task_json(bus: str) -> None:
    result = await task(bus, "hash", "--json", "--priority", "5", "--strategy", "round-robin")
    assert result.returncode == 0, result
    outcome = json.loads(result.stdout)
    assert outcome["status"] == "success"
    assert outcome["collectorId"] == "procmond-1"  # the only one running hash tasks
    assert outcome["attempts"] == 1
    assert outcome["fields"] == {"by": "procmond-1"}
    assert outcome["error"] == ""
    assert outcome["result"]["taskType"] == "hash"
    assert outcome["taskId"].startswith("cli-")


@pytest.mark.parametrize("target", ["procmond-1", "procmond-2"])
async def test_task_for_one_collector(bus: str, target: str) -> None:
    result = await task(
        bus, "scan", "--collector", target, "--strategy", "first-available", "--json"
    )
    assert result.returncode == 0, result
    assert json.loads(result.stdout)["collectorId"] == target


async def test_task_by_capability(bus: str) -> None:
    result = await task(bus, "scan", "--capability", "yara", "--strategy", "random", "--json")
    assert result.returncode == 0, result
    assert json.loads(result.stdout)["collectorId"] == "procmond-1"


async def test_a_failed_task_exits_1(bus: str) -> None:
    result = await task(bus, "scan", "--param", "fail=disk on fire", "--json", "--task-id", "f")
    assert result.returncode == 1, result
    outcome = json.loads(result.stdout)
    assert (outcome["status"], outcome["error"]) == ("error", "disk on fire")
    assert one_error_line(result, "task") == "task f error: disk on fire"


async def test_a_task_nobody_runs_times_out(bus: str) -> None:
    result = await task(bus, "netscan", "--deadline", "1", "--task-id", "n")
    assert result.returncode == 1, result
    assert result.stdout.startswith("task n: timeout (")
    assert one_error_line(result, "task").startswith("task n timeout: expired")


@pytest.mark.parametrize(
    "args",
    [
        ["--param", "no-equals-sign"],
        ["--param", "=value"],
        ["--strategy", "cheapest"],
        ["--deadline", "0"],
        ["--deadline", "soon"],
        ["--priority", "high"],
    ],
    ids=["param", "param-key", "strategy", "deadline-zero", "deadline-word", "priority"],
)
async def test_task_usage_errors_exit_2(sock_dir: Path, args: list[str]) -> None:
    result = await run("task", "scan", *args, "--socket", str(sock_dir / "none.sock"))
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert "Traceback" not in result.stderr


async def test_task_needs_a_type(sock_dir: Path) -> None:
    result = await run("task", "--socket", str(sock_dir / "none.sock"))
    assert result.returncode == 2, result
