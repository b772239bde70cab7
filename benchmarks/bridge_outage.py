"""The bridge through a NATS outage, in memory and time: ``python -m benchmarks.bridge_outage``.

A broker process, the bridge as its command (``daemoneye-eventbus bridge``,
default settings) pointed at a NATS port nothing listens on yet, and a
collector publishing ``--events`` 200-byte events in ``--steps`` parts. After
each part the bridge's resident memory (``VmRSS``) and its spool file's size
are printed: the events wait on disk, not in memory. Then ``nats-server -js``
starts on that port; the figure is how long the bridge takes to drain its
spool into JetStream, and its memory after. The stream must then hold
exactly ``--events`` messages. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.no_responders import start_broker
from benchmarks.peers.base import find_binary, free_tcp_port
from daemoneye.eventbus.v1 import events_pb2, registry
from daemoneye_eventbus import Client

STREAM = "DAEMONEYE_EVENTS"


def rss_mib(pid: int) -> float:
    """The resident memory of process ``pid``, MiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def spool_mib(path: Path) -> float:
    """The spool's files on disk (the database and its write-ahead log), MiB."""
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 2**20


async def stored(url: str) -> int:
    """Messages in the bridge's stream, or -1 while it cannot be asked."""
    import nats

    try:
        nc = await nats.connect(url, connect_timeout=1, allow_reconnect=False)
    except Exception:
        return -1
    try:
        info = await nc.jetstream().stream_info(STREAM)
        return int(info.state.messages)
    except Exception:
        return -1
    finally:
        await nc.close()


async def publish(sock: str, count: int) -> None:
    """``count`` events from a collector, then a round trip (all handled)."""
    event = events_pb2.ProcessEvent(pid=1, name="x" * 180)
    async with Client(sock, component="procmond") as collector:
        for _ in range(count):
            await collector.publish(registry.EVENTS_PROCESS_LIFECYCLE, event)
        await collector.flush()


async def wait_stored(url: str, total: int) -> int:
    """Until the stream holds ``total`` messages (or more); how many it holds."""
    while (count := await stored(url)) < total:  # noqa: ASYNC110 - polling the server
        await asyncio.sleep(0.2)
    return count


def run(events: int, steps: int) -> None:
    binary = find_binary("nats-server")
    if binary is None:
        raise SystemExit("nats-server is not installed (apt-get install nats-server)")
    workdir = Path(tempfile.mkdtemp(prefix="deb-bridge-outage-", dir="/tmp"))
    sock = str(workdir / "bus.sock")
    spool = workdir / "bridge.spool"
    port = free_tcp_port()
    url = f"nats://127.0.0.1:{port}"
    broker = start_broker(sock)
    bridge = subprocess.Popen(
        [
            *(sys.executable, "-m", "daemoneye_eventbus.cli", "bridge", "--socket", sock),
            *("--nats", url, "--host-id", "outage", "--spool", str(spool)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    nats: subprocess.Popen[bytes] | None = None
    try:
        assert bridge.stdout is not None
        bridge.stdout.readline()  # started: subscribed on the bus
        print("| moment | bridge RSS MiB | spool on disk MiB |")
        print("|---|---:|---:|")
        print(f"| started, NATS away | {rss_mib(bridge.pid):.1f} | {spool_mib(spool):.1f} |")
        per_step = events // steps
        for step in range(1, steps + 1):
            asyncio.run(publish(sock, per_step))
            time.sleep(1.0)  # the bridge writes what it received
            print(
                f"| {step * per_step:,} events spooled, NATS away | "
                f"{rss_mib(bridge.pid):.1f} | {spool_mib(spool):.1f} |"
            )
        total = per_step * steps
        nats = subprocess.Popen(
            [binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(workdir / "js")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started = time.perf_counter()
        count = asyncio.run(wait_stored(url, total))
        seconds = time.perf_counter() - started
        print(f"| NATS back: drained in {seconds:.1f} s | {rss_mib(bridge.pid):.1f} | |")
        if count != total:
            raise SystemExit(f"the stream holds {count} of {total}")
        print(f"\nThe stream holds {count:,} events: each once.")
    finally:
        bridge.send_signal(signal.SIGTERM)
        bridge.wait(30)
        if nats is not None:
            nats.terminate()
            nats.wait(10)
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000, help="events published")
    parser.add_argument("--steps", type=int, default=3, help="parts to publish them in")
    args = parser.parse_args()
    run(args.events, args.steps)


if __name__ == "__main__":
    main()
