"""End-to-end demo: the agent, its embedded broker and three collector processes.

``daemoneye-eventbus demo`` (or ``python -m daemoneye_eventbus.demo``) starts
a broker in this process and runs the control plane's :class:`Agent` on an
in-process session of it. It starts three collector processes
(:mod:`daemoneye_eventbus.demo_collectors`): ``procmond-1`` and
``procmond-2`` (``scan`` tasks: the processes of this host) and
``netmond-1`` (``netscan``: its TCP sockets). Once the three are READY it
prints the registry and distributes one workflow of three tasks; it kills
the process collector that holds the first scan while the scan runs, sees
it GONE (the broker's presence event), and the task goes to the other
process collector as its second attempt. It prints each task's outcome, the
workflow's aggregate, the correlation tracker's record of the workflow and
the events of the workflow the agent received (a correlation filter the
broker applies).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import uuid
from collections import Counter
from pathlib import Path

from daemoneye.eventbus.v1.control_pb2 import TaskAssignment
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationFilter
from daemoneye_eventbus.bus import DaemoneyeBroker
from daemoneye_eventbus.cli_output import listening_line, table
from daemoneye_eventbus.control import AggregateKind, Assignment, CollectorState, RoundRobin
from daemoneye_eventbus.control.agent import Agent
from daemoneye_eventbus.control.watch import TaskOutcome
from daemoneye_eventbus.correlation import create_child, new_correlation, with_stage
from daemoneye_eventbus.demo_collectors import COLLECTOR_KINDS, run_collector
from daemoneye_eventbus.runtime import run
from daemoneye_eventbus.transports.pipes import pipe_name

__all__ = ["COLLECTORS", "TASKS", "run_demo"]

#: The demo's collectors: id and kind, in the order they are started.
COLLECTORS = [("procmond-1", "process"), ("procmond-2", "process"), ("netmond-1", "network")]
#: The workflow's tasks: id and task type. The first is the one whose collector is killed.
TASKS = [("scan-1", "scan"), ("scan-2", "scan"), ("netscan-1", "netscan")]
#: Seconds: for the collectors to start (a loaded machine), for a task, for the workflow.
START_TIMEOUT = 60.0
TASK_DEADLINE = 30.0


async def _start(
    sock: str, collector_id: str, kind: str, count: int, pace: float
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "daemoneye_eventbus.demo",
        "collector",
        "--type",
        kind,
        "--id",
        collector_id,
        "--socket",
        sock,
        "--count",
        str(count),
        "--pace",
        str(pace),
        stdin=asyncio.subprocess.PIPE,
    )


async def _stop(procs: dict[str, asyncio.subprocess.Process]) -> None:
    """Close each collector's standard input (it says goodbye and exits); kill
    one that does not exit in time."""
    for proc in procs.values():
        if proc.returncode is None and proc.stdin is not None:
            proc.stdin.close()
    for proc in procs.values():
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def _items(outcome: TaskOutcome) -> str:
    fields = outcome.result.fields if outcome.result is not None else {}
    return f"{fields.get('items', '?')} {fields.get('kind', 'items')}"


async def _story(agent: Agent, procs: dict[str, asyncio.subprocess.Process], root: str) -> bool:
    """Registry, workflow, kill, outcomes, aggregate; True if it all went as told."""
    await agent.wait_ready(len(COLLECTORS), timeout=START_TIMEOUT)
    rows = [("COLLECTOR", "TYPE", "STATE", "TASK TYPES", "PID")]
    for info in sorted(agent.collectors(), key=lambda i: i.collector_id):
        types = ",".join(sorted(info.task_types))
        rows.append(
            (info.collector_id, info.collector_type, info.state.value, types, str(info.pid))
        )
    print(f"registry: {len(rows) - 1} collectors")
    print("\n".join("  " + line for line in table(rows)))

    workflow = with_stage(new_correlation(root), "scan")
    agent.expect_workflow(root, deadline=TASK_DEADLINE)  # complete once each task has its result
    handed: list[str] = []
    for task_id, task_type in TASKS:
        task = TaskAssignment(task_id=task_id, task_type=task_type)
        decision = agent.distribute(
            task, deadline=TASK_DEADLINE, correlation=create_child(workflow)
        )
        to = decision.collector_id if isinstance(decision, Assignment) else type(decision).__name__
        handed.append(f"{task_id} -> {to}")
    print(f"workflow {root}: {', '.join(handed)}")

    # The collector holding the first scan dies while the scan runs.
    first = TASKS[0][0]
    status = agent.distributor.task(first)
    victim = status.collector_id if status is not None else ""
    await agent.wait_for(lambda: first in agent.progress, timeout=TASK_DEADLINE)
    procs[victim].kill()  # SIGKILL: no goodbye, the broker sees the connection lost
    await procs[victim].wait()
    print(f"{victim} killed (SIGKILL) while running {first}")

    def gone() -> bool:
        info = agent.registry.get(victim)
        return info is not None and info.state is CollectorState.GONE

    await agent.wait_for(gone, timeout=TASK_DEADLINE)
    dead = agent.registry.get(victim)
    print(f"{victim} {CollectorState.GONE.value} ({dead.gone_reason if dead else '?'})")

    outcomes = [await agent.result(task_id, timeout=TASK_DEADLINE) for task_id, _ in TASKS]
    again = outcomes[0]
    attempt = again.result.attempt if again.result is not None else 0
    print(f"{first} re-assigned to {again.collector_id} (attempt {attempt}), finished once")
    print("outcomes:")
    rows = [
        (
            o.task_id,
            o.status_name.lower(),
            o.collector_id,
            f"attempt {o.result.attempt if o.result is not None else 0}",
            _items(o),
        )
        for o in outcomes
    ]
    print("\n".join("  " + line for line in table(rows)))

    aggregate = await agent.aggregate(AggregateKind.WORKFLOW, root, timeout=TASK_DEADLINE)
    missing = ", ".join(sorted(aggregate.missing)) or "none"
    print(
        f"aggregate of {root}: {aggregate.state.value}, {len(aggregate.results)} results, "
        f"missing {missing}"
    )
    per_collector: list[tuple[str, ...]] = []
    for cid in sorted({r.collector_id for r in aggregate.results}):
        mine = [r for r in aggregate.results if r.collector_id == cid]
        statuses = {"success" if r.success else "failed" for r in mine}
        items = sum(int(r.result.fields.get("items", "0")) for r in mine)
        tasks = ", ".join(f"{r.task_id} attempt {r.result.attempt}" for r in mine)
        per_collector.append((cid, "/".join(sorted(statuses)), f"{items} items", tasks))
    print("\n".join("  " + line for line in table(per_collector)))
    return (
        aggregate.state.value == "complete"
        and all(o.ok for o in outcomes)
        and attempt == 2
        and again.collector_id != victim
        and agent.statistics().distribution.completed == len(TASKS)
    )


async def run_demo(path: str | None = None, *, count: int = 20, pace: float = 1.0) -> int:
    """The agent's side: embedded broker, control plane, three collector processes.

    ``count``: items each task reports at most; ``pace``: seconds each task
    waits before it looks (the kill lands in that time).
    """
    with tempfile.TemporaryDirectory(prefix="deb-demo-") as tmp:
        # A private address: a socket in a new directory, or a pipe of its own on Windows.
        private = (
            pipe_name(f"demo-{uuid.uuid4().hex[:12]}")
            if sys.platform == "win32"
            else str(Path(tmp) / "bus.sock")
        )
        sock = path or private
        root = f"wf-{uuid.uuid4().hex[:8]}"
        procs: dict[str, asyncio.subprocess.Process] = {}
        async with await DaemoneyeBroker.new(sock) as broker:
            print(listening_line(broker.broker), flush=True)  # as `serve` starts
            session = broker.broker.local_session("agent", "daemoneye-agent")
            events = await session.subscribe(
                "events.#",
                correlation_filter=CorrelationFilter(root_correlation_ids=[root]),
                max_pending=65536,
            )
            async with Agent(session, strategy=RoundRobin()) as agent:
                try:
                    for cid, kind in COLLECTORS:
                        procs[cid] = await _start(sock, cid, kind, count, pace)
                    print(
                        "agent started collector processes "
                        + ", ".join(
                            f"{cid} ({COLLECTOR_KINDS[kind][0]})" for cid, kind in COLLECTORS
                        )
                    )
                    ok = await _story(agent, procs, root)
                except TimeoutError:
                    print("demo: timed out waiting for the collectors", file=sys.stderr)
                    ok = False
                finally:
                    await _stop(procs)
                now = asyncio.get_running_loop().time()
                by_topic: Counter[str] = Counter()
                while (event := events.get_nowait()) is not None:
                    by_topic[event.topic] += 1
                    if event.correlation is not None:
                        agent.tracker.observe_metadata(event.correlation, now=now)
                record = agent.tracker.finish(root, now=now)
                if record is not None:
                    stages = ", ".join(f"{s.name} {s.count}" for s in record.stages)
                    print(
                        f"tracker: {root} {record.state.value}: collectors "
                        f"{', '.join(sorted(record.collectors))}; stages {stages}; "
                        f"{record.tasks} task and {record.events} event records"
                    )
            stats = broker.statistics()
            kinds = ", ".join(f"{n} on {topic}" for topic, n in sorted(by_topic.items()))
            print(
                f"agent received {sum(by_topic.values())} events of {root} ({kinds or 'none'}); "
                f"broker: {stats.published} published, {stats.delivered} delivered, "
                f"{stats.dropped} dropped"
            )
        return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemoneye_eventbus.demo")
    parser.add_argument("role", choices=["agent", "collector"], nargs="?", default="agent")
    parser.add_argument("--socket", help="the broker's socket (default: a private one)")
    parser.add_argument("--type", choices=sorted(COLLECTOR_KINDS), default="process")
    parser.add_argument("--id", default="procmond-1", help="the collector's id")
    parser.add_argument("--count", type=int, default=20, help="items a task reports at most")
    parser.add_argument(
        "--pace", type=float, default=1.0, help="seconds a task waits before it looks"
    )
    args = parser.parse_args(argv)
    if args.role == "collector":
        if not args.socket:
            parser.error("a collector needs --socket")
        return run(run_collector(args.socket, args.id, args.type, count=args.count, pace=args.pace))
    return run(run_demo(args.socket, count=args.count, pace=args.pace))


if __name__ == "__main__":
    sys.exit(main())
