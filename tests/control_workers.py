"""A collector process for the control-plane tests (tests/test_control_plane.py).

``control_workers.py SOCKET ID [--component procmond] [--type process]
[--tasks scan,hash] [--caps a,b] [--max 1] [--interval 0.2]``: a
:class:`~daemoneye_eventbus.control.collector.Collector` whose tasks sleep
``parameters["sleep"]`` seconds (default 0), report 50 % half-way, fail when
``parameters["fail"]`` is set, and return ``{"by": ID}``. It prints
``ready`` once registered and ``start TASK_ID`` as each task starts, then
runs until it is killed or its stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from daemoneye.eventbus.v1.control_pb2 import TaskAssignment
from daemoneye_eventbus.control.collector import Collector, Progress


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("socket")
    parser.add_argument("collector_id")
    parser.add_argument("--component", default="procmond")
    parser.add_argument("--type", default="process")
    parser.add_argument("--tasks", default="scan")
    parser.add_argument("--caps", default="")
    parser.add_argument("--max", type=int, default=1)
    parser.add_argument("--interval", type=float, default=0.2)
    args = parser.parse_args()
    me = args.collector_id

    async def handler(task: TaskAssignment, progress: Progress) -> dict[str, str]:
        print("start", task.task_id, flush=True)
        delay = float(task.parameters.get("sleep", "0"))
        await asyncio.sleep(delay / 2)
        await progress(50.0, "half-way")
        await asyncio.sleep(delay / 2)
        if task.parameters.get("fail"):
            raise RuntimeError(task.parameters["fail"])
        return {"by": me}

    async with Collector(
        args.socket,
        collector_id=me,
        component=args.component,
        collector_type=args.type,
        task_types=[t for t in args.tasks.split(",") if t],
        capabilities=[c for c in args.caps.split(",") if c],
        handler=handler,
        max_concurrent_tasks=args.max,
        heartbeat_interval=args.interval,
    ):
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)  # until stdin closes


if __name__ == "__main__":
    asyncio.run(main())
