"""The demo's collector processes: a process collector and a network collector.

``python -m daemoneye_eventbus.demo collector --type process --id procmond-1
--socket PATH`` runs a :class:`~daemoneye_eventbus.control.collector.Collector`
of component ``procmond`` whose ``scan`` tasks enumerate the real processes
of this host from ``/proc``; ``--type network`` (component ``netmond``) runs
``netscan`` tasks that read the TCP sockets of ``/proc/net/tcp`` and
``/proc/net/tcp6``. Each task publishes what it finds (``ProcessEvent`` on
``events.process.lifecycle``, ``NetworkEvent`` on
``events.network.connections``) under a child of the task's correlation,
and returns how many items it found. A collector runs until its standard
input closes (the agent's pipe) or it is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from daemoneye.eventbus.v1 import events_pb2, registry
from daemoneye.eventbus.v1.control_pb2 import TaskAssignment
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationMetadata
from daemoneye_eventbus.control.collector import Collector, Progress, task_correlation
from daemoneye_eventbus.correlation import create_child, with_stage

__all__ = [
    "COLLECTOR_KINDS",
    "enumerate_connections",
    "enumerate_processes",
    "run_collector",
]

#: Each kind of demo collector: its component, collector type and task type.
COLLECTOR_KINDS: dict[str, tuple[str, str, str]] = {
    "process": ("procmond", "process", "scan"),
    "network": ("netmond", "network", "netscan"),
}

#: The TCP states of /proc/net/tcp the network scan reports, and as what.
_TCP_STATES = {
    "01": events_pb2.NETWORK_EVENT_KIND_CONNECT,  # ESTABLISHED
    "0A": events_pb2.NETWORK_EVENT_KIND_LISTEN,
}


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def enumerate_processes(limit: int) -> list[events_pb2.ProcessEvent]:
    """Up to ``limit`` processes of this host, read from ``/proc`` (this
    process alone where there is no ``/proc``)."""
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
    if not out and limit > 0:  # no /proc here: report ourselves
        out.append(
            events_pb2.ProcessEvent(
                pid=os.getpid(),
                name=Path(sys.executable).name,
                kind=events_pb2.PROCESS_EVENT_KIND_SNAPSHOT,
            )
        )
    return out


def _address(text: str) -> tuple[str, int]:
    """``0100007F:0016`` (as /proc/net/tcp writes it) as ("127.0.0.1", 22)."""
    host, port = text.split(":")
    raw = bytes.fromhex(host)
    # The kernel writes each 32-bit word in host order (little-endian here).
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words)), int(port, 16)


def enumerate_connections(limit: int) -> list[events_pb2.NetworkEvent]:
    """Up to ``limit`` listening and established TCP sockets of this host,
    from ``/proc/net/tcp`` and ``tcp6`` (none where they are absent)."""
    out: list[events_pb2.NetworkEvent] = []
    for name in ("tcp", "tcp6"):
        text = _read(Path("/proc/net") / name) or ""
        for line in text.splitlines()[1:]:
            fields = line.split()
            if len(out) >= limit:
                return out
            if len(fields) < 4 or fields[3] not in _TCP_STATES:
                continue
            try:
                local, lport = _address(fields[1])
                remote, rport = _address(fields[2])
            except ValueError:
                continue
            event = events_pb2.NetworkEvent(
                kind=_TCP_STATES[fields[3]],
                protocol=events_pb2.NETWORK_PROTOCOL_TCP,
                local_address=local,
                local_port=lport,
                remote_address=remote,
                remote_port=rport,
            )
            event.observed_at.GetCurrentTime()
            out.append(event)
    return out


def _event_correlation(seq: int) -> CorrelationMetadata | None:
    """A child of the running task's correlation for its ``seq``-th event."""
    parent = task_correlation()
    if parent is None or not parent.correlation_id:
        return None
    meta = with_stage(create_child(parent), "collection")
    meta.sequence_number = seq
    return meta


async def run_collector(
    path: str, collector_id: str, kind: str, *, count: int = 20, pace: float = 1.0
) -> int:
    """One demo collector of ``kind`` (``process`` or ``network``): serve
    until standard input closes. Each task waits ``pace`` seconds before it
    looks (so that the demo's kill lands while a task runs) and reports at
    most ``count`` items."""
    component, collector_type, task_type = COLLECTOR_KINDS[kind]

    async def handler(task: TaskAssignment, progress: Progress) -> Mapping[str, str]:
        await progress(0.0, "started")
        await asyncio.sleep(pace)
        if kind == "process":
            processes = enumerate_processes(count)
            for seq, process in enumerate(processes):
                await client.publish(
                    registry.EVENTS_PROCESS_LIFECYCLE, process, correlation=_event_correlation(seq)
                )
            items = len(processes)
        else:
            connections = enumerate_connections(count)
            for seq, connection in enumerate(connections):
                await client.publish(
                    registry.EVENTS_NETWORK_CONNECTIONS,
                    connection,
                    correlation=_event_correlation(seq),
                )
            items = len(connections)
        await progress(100.0, "done")
        return {"items": str(items), "kind": "processes" if kind == "process" else "sockets"}

    collector = Collector(
        path,
        collector_id=collector_id,
        component=component,
        collector_type=collector_type,
        task_types=[task_type],
        capabilities=[f"{collector_type}.enumerate"],
        event_types=[
            registry.EVENTS_PROCESS_LIFECYCLE.name
            if kind == "process"
            else registry.EVENTS_NETWORK_CONNECTIONS.name
        ],
        handler=handler,
        heartbeat_interval=0.5,
    )
    client = collector.client
    async with collector:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    return 0
