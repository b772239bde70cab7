"""The control plane's figures: tasks distributed and acknowledged per second
with 4 collector processes, and the task round trip beside the bus's plain
request/reply round trip.

Run::

    python -m benchmarks.control [--tasks N] [--round-trips N] [--collectors 4]

The agent runs on an in-process session of an embedded broker (the way the
agent embeds it); each collector is its own OS process (a ``Collector``
over the Unix socket, ``max_concurrent_tasks`` 64, a handler that returns at
once). Three figures:

* throughput: ``--tasks`` tasks distributed at once (least loaded), until
  every result is in: tasks per second, distribute → ack → result;
* task round trip: one task at a time, ``distribute()`` to its
  ``TaskOutcome`` (the hand-out request, its ``TaskAck``, the result
  published by the collector): p50 and p99;
* plain round trip: one ``health`` request at a time to a collector, the
  bus's request/reply alone: p50 and p99.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from daemoneye.eventbus.v1.control_pb2 import TaskAssignment
from daemoneye_eventbus.broker import Broker
from daemoneye_eventbus.config import BrokerConfig
from daemoneye_eventbus.control import CollectorRegistry, TaskDistributor
from daemoneye_eventbus.control.agent import Agent

ROOT = Path(__file__).resolve().parents[1]

COLLECTOR = """
import asyncio, sys
from daemoneye_eventbus.control.collector import Collector

async def handler(task, progress):
    return {"ok": "1"}

async def main():
    async with Collector(sys.argv[1], collector_id=sys.argv[2], task_types=["scan"],
                         handler=handler, max_concurrent_tasks=64, heartbeat_interval=1.0):
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


@contextlib.asynccontextmanager
async def _collectors(sock: str, count: int) -> AsyncIterator[None]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "generated")])
    procs = []
    try:
        for n in range(count):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                COLLECTOR,
                sock,
                f"procmond-{n + 1}",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=env,
            )
            procs.append(proc)
        for proc in procs:
            assert proc.stdout is not None
            await asyncio.wait_for(proc.stdout.readline(), 60)
        yield
    finally:
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def run(tasks: int, round_trips: int, count: int) -> None:
    tmp = tempfile.mkdtemp(prefix="deb-bench-", dir="/tmp")
    sock = str(Path(tmp) / "b.sock")
    registry = CollectorRegistry()
    try:
        async with (
            Broker(sock, BrokerConfig()) as broker,
            Agent(
                broker.local_session("agent", "daemoneye-agent"),
                registry=registry,
                distributor=TaskDistributor(registry, max_pending=tasks + 100),
                ack_timeout=5.0,
                max_remembered=tasks + round_trips + 100,
            ) as agent,
            _collectors(sock, count),
        ):
            await agent.wait_ready(count, timeout=30)
            # Warm up.
            for n in range(50):
                agent.distribute(TaskAssignment(task_id=f"w{n}", task_type="scan"))
            for n in range(50):
                await agent.result(f"w{n}", timeout=30)

            start = time.perf_counter()
            for n in range(tasks):
                agent.distribute(TaskAssignment(task_id=f"t{n}", task_type="scan"))
            for n in range(tasks):
                outcome = await agent.result(f"t{n}", timeout=60)
                assert outcome.ok, outcome
            elapsed = time.perf_counter() - start

            trips = []
            for n in range(round_trips):
                t0 = time.perf_counter()
                agent.distribute(TaskAssignment(task_id=f"r{n}", task_type="scan"))
                await agent.result(f"r{n}", timeout=30)
                trips.append(time.perf_counter() - t0)

            plain = []
            for _ in range(round_trips):
                t0 = time.perf_counter()
                health = await agent.rpc.health("procmond-1")
                assert health.ok
                plain.append(time.perf_counter() - t0)
            stats = agent.statistics().distribution
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ms = 1000.0
    print(f"collectors: {count} processes; tasks: {tasks}; round trips: {round_trips}")
    print(f"throughput: {tasks / elapsed:,.0f} tasks/s (distribute -> ack -> result)")
    print(
        f"task round trip: p50 {_percentile(trips, 0.5) * ms:.2f} ms, "
        f"p99 {_percentile(trips, 0.99) * ms:.2f} ms, mean {statistics.fmean(trips) * ms:.2f} ms"
    )
    print(
        f"plain request/reply: p50 {_percentile(plain, 0.5) * ms:.2f} ms, "
        f"p99 {_percentile(plain, 0.99) * ms:.2f} ms"
    )
    print(f"re-assigned: {stats.reassigned}, refused: {stats.refused}, failed: {stats.failed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--round-trips", type=int, default=500)
    parser.add_argument("--collectors", type=int, default=4)
    args = parser.parse_args()
    asyncio.run(run(args.tasks, args.round_trips, args.collectors))


if __name__ == "__main__":
    main()
