"""End-to-end demo: an agent with an embedded broker and a collector process.

``daemoneye-eventbus demo`` (or ``python -m daemoneye_eventbus.demo``) starts
a broker in this process, subscribes the agent to process events of one scan
(a correlation filter applied by the broker), and spawns a separate collector
process that enumerates the real processes of this host from ``/proc`` and
publishes them, each with correlation metadata that ties it to the scan.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import uuid
from pathlib import Path

from daemoneye.eventbus.v1 import control_pb2, events_pb2, registry
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationFilter
from daemoneye_eventbus.bus import DaemoneyeBroker, DaemoneyeEventBus, EventSubscription
from daemoneye_eventbus.cli_output import listening_line
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.correlation import create_child, new_correlation, with_stage
from daemoneye_eventbus.errors import RequestTimeout
from daemoneye_eventbus.runtime import run
from daemoneye_eventbus.transports.pipes import pipe_name

__all__ = ["enumerate_processes", "run_collector", "run_demo"]


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def enumerate_processes(limit: int) -> list[events_pb2.ProcessEvent]:
    """Up to ``limit`` processes of this host, read from ``/proc``."""
    out: list[events_pb2.ProcessEvent] = []
    proc = Path("/proc")
    pids = sorted(int(p.name) for p in proc.iterdir() if p.name.isdigit()) if proc.exists() else []
    for pid in pids:
        if len(out) >= limit:
            break
        base = proc / str(pid)
        comm = _read(base / "comm")
        if comm is None:
            continue  # gone already
        event = events_pb2.ProcessEvent(
            pid=pid, name=comm.strip(), kind=events_pb2.PROCESS_EVENT_KIND_SNAPSHOT
        )
        cmdline = _read(base / "cmdline")
        if cmdline:
            event.command_line = cmdline.replace("\0", " ").strip()
        with contextlib.suppress(OSError):
            event.executable_path = os.readlink(base / "exe")
        stat = _read(base / "stat")
        if stat and ")" in stat:
            fields = stat.rsplit(")", 1)[1].split()
            event.ppid = int(fields[1])
        status = _read(base / "status") or ""
        for line in status.splitlines():
            if line.startswith("Uid:"):
                event.user_id = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                event.memory_rss_bytes = int(line.split()[1]) * 1024
        event.observed_at.GetCurrentTime()
        out.append(event)
    if not out:  # no /proc here: report ourselves
        out.append(events_pb2.ProcessEvent(pid=os.getpid(), name="python"))
    return out


async def run_collector(path: str, scan_id: str, count: int) -> int:
    """The collector side: publish one scan of the host's processes."""
    root = with_stage(new_correlation(scan_id), "collection")
    async with Client(path, name="demo-collector", component="procmond") as client:
        for seq, process in enumerate(enumerate_processes(count)):
            meta = create_child(root)
            meta.sequence_number = seq
            await client.publish(registry.EVENTS_PROCESS_LIFECYCLE, process, correlation=meta)
        heartbeat = control_pb2.Heartbeat(component_id="demo-collector", sequence=1)
        heartbeat.sent_at.GetCurrentTime()
        await client.publish(registry.CONTROL_HEALTH_HEARTBEAT, heartbeat)
        await client.flush()
    return 0


async def run_demo(path: str | None = None, *, count: int = 20) -> int:
    """The agent side: embedded broker, in-process subscriber, collector subprocess."""
    with tempfile.TemporaryDirectory(prefix="deb-demo-") as tmp:
        # A private address: a socket in a new directory, or a pipe of its own on Windows.
        private = (
            pipe_name(f"demo-{uuid.uuid4().hex[:12]}")
            if sys.platform == "win32"
            else str(Path(tmp) / "bus.sock")
        )
        sock = path or private
        scan_id = f"scan-{uuid.uuid4().hex[:8]}"
        async with await DaemoneyeBroker.new(sock) as broker:
            print(listening_line(broker.broker), flush=True)  # as `serve` starts
            bus = await DaemoneyeEventBus.from_broker(broker)
            receiver = await bus.subscribe(
                EventSubscription(
                    "agent",
                    ["events.process.#"],
                    CorrelationFilter(root_correlation_ids=[scan_id]),
                )
            )
            print(f"agent subscribed to events.process.# for workflow {scan_id}")
            collector = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "daemoneye_eventbus.demo",
                "collector",
                "--socket",
                sock,
                "--scan-id",
                scan_id,
                "--count",
                str(count),
            )
            print(f"collector process {collector.pid} started")
            received = 0
            try:
                while True:
                    event = await receiver.recv(timeout=10)
                    process = event.message
                    assert isinstance(process, events_pb2.ProcessEvent)
                    corr = event.correlation
                    print(
                        f"  {event.topic} #{event.sequence}: pid={process.pid} "
                        f"ppid={process.ppid} name={process.name!r} uid={process.user_id} "
                        f"(correlation {corr.correlation_id[:8] if corr else '-'}…, "
                        f"root {corr.root_correlation_id if corr else '-'})"
                    )
                    received += 1
                    if received >= count:
                        break
            except RequestTimeout:
                pass
            code = await collector.wait()
            stats = broker.statistics()
            print(
                f"agent received {received} process events; collector exited {code}; broker: "
                f"{stats.published} published, {stats.delivered} delivered, "
                f"{stats.dropped} dropped"
            )
            await bus.shutdown()
        return 0 if code == 0 and received > 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemoneye_eventbus.demo")
    parser.add_argument("role", choices=["agent", "collector"], nargs="?", default="agent")
    parser.add_argument("--socket")
    parser.add_argument("--scan-id", default="scan")
    parser.add_argument("--count", type=int, default=20)
    args = parser.parse_args(argv)
    if args.role == "collector":
        return run(run_collector(args.socket, args.scan_id, args.count))
    return run(run_demo(args.socket, count=args.count))


if __name__ == "__main__":
    sys.exit(main())
