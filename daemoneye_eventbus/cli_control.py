"""``daemoneye-eventbus collectors`` and ``task``: the control plane from the command line.

Both connect as ``daemoneye-agent`` (by default; the default policy lets a
peer running as the broker's user claim it) and run an
:class:`~daemoneye_eventbus.control.agent.Agent` for as long as they need.
An agent that starts learns of the collectors already running from their
heartbeats (it asks each for its health, and the collector registers
again), so a collector is known about one heartbeat interval after the
command starts. ``collectors`` listens ``--wait`` seconds, then prints the
registry (``--watch``: redraws it until interrupted); ``task`` hands one
task to a collector and prints its outcome.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from collections.abc import Sequence
from typing import Any, Final

from daemoneye.eventbus.v1.control_pb2 import TaskAssignment
from daemoneye_eventbus.cli_output import message_json, table
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.control.agent import Agent
from daemoneye_eventbus.control.collectors import CollectorInfo
from daemoneye_eventbus.control.strategies import (
    FirstAvailable,
    LeastLoaded,
    Random,
    RoundRobin,
    Strategy,
)
from daemoneye_eventbus.control.watch import TaskOutcome
from daemoneye_eventbus.errors import EventBusError, RequestTimeout
from daemoneye_eventbus.transports import default_address
from daemoneye_eventbus.watch import CLEAR

__all__ = ["STRATEGIES", "collector_dict", "collector_lines", "collectors", "outcome_dict", "task"]

#: The ``--strategy`` names and what they make.
STRATEGIES: Final[dict[str, type[Strategy]]] = {
    "least-loaded": LeastLoaded,
    "round-robin": RoundRobin,
    "first-available": FirstAvailable,
    "random": Random,
}
#: Seconds ``task`` waits for an outcome beyond the task's deadline (the agent
#: fails the task at its deadline; this only guards against a stuck broker).
_GRACE: Final = 5.0


def _socket(args: argparse.Namespace) -> str:
    path: str | None = args.socket
    return path or default_address(args.instance)


def _client(args: argparse.Namespace) -> Client:
    return Client(_socket(args), name=args.name, component=args.component)


# -- collectors ------------------------------------------------------------------------


def _age(info: CollectorInfo, now: float) -> float | None:
    return None if info.last_heartbeat is None else max(0.0, now - info.last_heartbeat)


def collector_dict(info: CollectorInfo, now: float) -> dict[str, Any]:
    """One collector as JSON (protobuf-like camelCase names, numbers as numbers)."""
    age = _age(info, now)
    return {
        "collectorId": info.collector_id,
        "collectorType": info.collector_type,
        "version": info.version,
        "state": info.state.value,
        "taskTypes": sorted(info.task_types),
        "capabilities": [c.name for c in info.capabilities],
        "activeTasks": info.active_tasks,
        "maxConcurrentTasks": info.max_concurrent_tasks,
        "assignedTasks": info.assigned_tasks,
        "load": info.load,
        "heartbeatInterval": info.heartbeat_interval,
        "lastHeartbeatAge": None if age is None else round(age, 3),
        "pid": info.pid,
        "sessionId": info.session_id,
        "incarnation": info.incarnation,
        "goneReason": info.gone_reason,
    }


def collector_lines(infos: Sequence[CollectorInfo], now: float) -> list[str]:
    """The ``collectors`` table: one row per collector, in registration order."""
    if not infos:
        return ["no collectors"]
    rows: list[Sequence[str]] = [
        ("id", "type", "state", "task types", "capabilities", "load", "heartbeat")
    ]
    for info in infos:
        age = _age(info, now)
        rows.append(
            (
                info.collector_id,
                info.collector_type or "-",
                info.state.value + (f" ({info.gone_reason})" if info.gone_reason else ""),
                ",".join(sorted(info.task_types)) or "*",
                ",".join(c.name for c in info.capabilities) or "-",
                f"{info.active_tasks}/{info.max_concurrent_tasks}",
                "-" if age is None else f"{age:.1f} s ago",
            )
        )
    return table(rows, right=(5,))


async def collectors(args: argparse.Namespace) -> int:
    async with _client(args) as client, Agent(client) as agent:
        loop = asyncio.get_running_loop()
        if args.watch:
            while True:
                lines = collector_lines(agent.collectors(), loop.time())
                sys.stdout.write(CLEAR + "\n".join(lines) + "\n")
                sys.stdout.flush()
                await asyncio.sleep(args.interval)
        await asyncio.sleep(args.wait)
        infos, now = agent.collectors(), loop.time()
    if args.json:
        print(json.dumps({"collectors": [collector_dict(c, now) for c in infos]}))
    else:
        print("\n".join(collector_lines(infos, now)))
    return 0


# -- task ------------------------------------------------------------------------------


def outcome_dict(outcome: TaskOutcome) -> dict[str, Any]:
    """A task's outcome as JSON: status, collector, attempts, error, the result."""
    result = outcome.result
    return {
        "taskId": outcome.task_id,
        "status": outcome.status_name,
        "collectorId": outcome.collector_id,
        "attempts": result.attempt if result is not None else 0,
        "elapsedSeconds": round(outcome.elapsed, 6),
        "error": outcome.error,
        "fields": dict(result.fields) if result is not None else {},
        "result": message_json(result) if result is not None else None,
    }


def _outcome_lines(outcome: TaskOutcome) -> list[str]:
    by = f" by {outcome.collector_id}" if outcome.collector_id else ""
    attempts = f", attempt {outcome.result.attempt}" if outcome.result is not None else ""
    lines = [
        f"task {outcome.task_id}: {outcome.status_name}{by} ({outcome.elapsed:.2f} s{attempts})"
    ]
    if outcome.error:
        lines.append(f"  error: {outcome.error}")
    if outcome.result is not None:
        lines += [f"  {k} = {v}" for k, v in sorted(outcome.result.fields.items())]
    return lines


async def task(args: argparse.Namespace) -> int:
    assignment = TaskAssignment(
        task_id=args.task_id or f"cli-{uuid.uuid4().hex[:12]}",
        task_type=args.task_type,
        collector_id=args.collector or "",
        parameters=dict(args.param or []),
        priority=args.priority,
        required_capability=args.capability or "",
    )
    strategy = STRATEGIES[args.strategy]()
    async with _client(args) as client, Agent(client) as agent:
        # Nobody may be known yet: the task waits until a collector that can run it
        # is (heartbeat, health request, registration), or until its deadline.
        agent.distribute(assignment, deadline=args.deadline, strategy=strategy)
        try:
            outcome = await agent.result(assignment.task_id, timeout=args.deadline + _GRACE)
        except TimeoutError:
            raise RequestTimeout(f"no outcome for task {assignment.task_id}") from None
    if args.json:
        print(json.dumps(outcome_dict(outcome)))
    else:
        print("\n".join(_outcome_lines(outcome)))
    if not outcome.ok:
        why = outcome.error or outcome.status_name
        raise EventBusError(f"task {assignment.task_id} {outcome.status_name}: {why}")
    return 0
