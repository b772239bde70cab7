"""A collector that runs ``scan`` tasks for the agent.

Start a broker first (``daemoneye-eventbus serve``), then this, then an agent
(``examples/agent.py``, or ``daemoneye-eventbus task scan --param path=/tmp``).
Run: python examples/collector.py [SOCKET_PATH] [COLLECTOR_ID]; Ctrl-C stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys

from daemoneye.eventbus.v1.control_pb2 import TaskAssignment
from daemoneye_eventbus.control.collector import Collector, Progress
from daemoneye_eventbus.transports import DEFAULT_ADDRESS


async def scan(task: TaskAssignment, progress: Progress) -> dict[str, str]:
    """One ``scan`` task: count the entries of ``parameters["path"]``.

    Report progress as it goes; return the result's fields (strings). An
    exception makes the result an ERROR carrying its text.
    """
    path = task.parameters.get("path", ".")
    await progress(10.0, f"listing {path}")
    entries = await asyncio.to_thread(os.listdir, path)  # blocking work off the loop
    await progress(100.0, "done")
    return {"path": path, "entries": str(len(entries))}


async def main(socket: str, collector_id: str) -> None:
    async with Collector(
        socket,
        collector_id=collector_id,
        component="procmond",  # the component it connects as (the broker's policy allows it)
        collector_type="process",
        task_types=["scan"],  # the agent hands it only these
        capabilities=["listing"],  # what a task may require (required_capability)
        handler=scan,
        max_concurrent_tasks=4,
        heartbeat_interval=1.0,  # an agent started later learns of it within about this
    ):
        # Registered and heartbeating; tasks run in the background until we leave.
        print(f"{collector_id} ready", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    args = sys.argv[1:]
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            main(args[0] if args else DEFAULT_ADDRESS, args[1] if args[1:] else "scanner-1")
        )
