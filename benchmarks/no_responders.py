"""How fast a request nobody serves fails: ``python -m benchmarks.no_responders``.

A broker process (``serve``) and one agent asking ``control.collector.queue.scan``,
which nobody serves, with a 30 s timeout, one request at a time; prints the
time to ``NoResponders`` after a warm-up (p50, p99, max). The broker answers
at once instead of letting the requester wait for its deadline
(docs/protocol.md §5, "Request/reply").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time

from daemoneye.eventbus.v1 import control_pb2, registry
from daemoneye_eventbus import Client, NoResponders


def start_broker(path: str) -> subprocess.Popen[bytes]:
    """``serve --socket path``, once it accepts connections."""
    args = [sys.executable, "-m", "daemoneye_eventbus.cli", "serve", "--socket", path]
    if os.geteuid() == 0:
        args.append("--allow-root")
    broker = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        if os.path.exists(path):
            break
        time.sleep(0.05)
    time.sleep(0.3)  # from bind() to listen()
    return broker


async def measure(path: str, count: int, warmup: int) -> list[int]:
    """Nanoseconds to NoResponders of ``count`` requests after ``warmup``, sorted."""
    topic = registry.control_collector_queue(type="scan")
    times: list[int] = []
    async with Client(path, component="daemoneye-agent") as agent:
        for i in range(warmup + count):
            task = control_pb2.TaskAssignment(task_id=str(i))
            started = time.perf_counter_ns()
            try:
                await agent.request(topic, task, timeout=30)
            except NoResponders:
                pass
            else:
                raise AssertionError("a request nobody serves was answered")
            if i >= warmup:
                times.append(time.perf_counter_ns() - started)
    return sorted(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    args = parser.parse_args()
    path = os.path.join(tempfile.mkdtemp(), "bus.sock")
    broker = start_broker(path)
    try:
        times = asyncio.run(measure(path, args.count, args.warmup))
    finally:
        broker.terminate()
        broker.wait()

    def at(q: float) -> float:
        return times[int(q / 100 * (len(times) - 1))] / 1000

    print(
        f"no responders, {len(times)} requests: p50 {at(50):.0f} µs, "
        f"p99 {at(99):.0f} µs, max {times[-1] / 1000:.0f} µs"
    )


if __name__ == "__main__":
    main()
