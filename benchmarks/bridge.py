"""How fast the NATS bridge forwards to JetStream: ``python -m benchmarks.bridge``.

A broker process (``serve``), a ``nats-server -js`` storing in a temporary
directory, the bridge (``daemoneye_eventbus.bridge.runner.Bridge``, in this
process, default settings: lossless subscription, every event through the
SQLite spool, up to 1024 publishes awaiting their JetStream acknowledgement)
and a publisher process (a collector, ``events.process.lifecycle``, 200-byte
payloads). Two runs, each on a fresh stream:

* **throughput**: the publisher sends ``--events`` as fast as it can; the
  figure is events acknowledged by JetStream per second, from the bridge's
  first received event to the last acknowledgement. The stream must then
  hold exactly ``--events`` messages.
* **latency**: the publisher sends ``--rate`` events per second for
  ``--seconds``; the figure is the time from the broker accepting an event
  (its receive stamp) to JetStream acknowledging it to the bridge, p50 / p99 /
  max: what the bridge adds to a local publish.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks.no_responders import start_broker
from benchmarks.peers.base import find_binary, free_tcp_port
from daemoneye.eventbus.v1 import events_pb2, registry
from daemoneye_eventbus import Client
from daemoneye_eventbus.bridge.config import BridgeConfig, NatsOptions
from daemoneye_eventbus.bridge.runner import Bridge
from daemoneye_eventbus.statistics import nearest_rank

STREAM = "DAEMONEYE_EVENTS"


@contextlib.contextmanager
def nats_server(workdir: Path) -> Iterator[str]:
    """``nats-server -js`` on a free port, storing under ``workdir``; its URL."""
    binary = find_binary("nats-server")
    if binary is None:
        raise SystemExit("nats-server is not installed (apt-get install nats-server)")
    port = free_tcp_port()
    store = workdir / "jetstream"
    store.mkdir(parents=True, exist_ok=True)
    with (workdir / "nats-server.log").open("ab") as log:
        proc = subprocess.Popen(
            [binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        time.sleep(0.5)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


async def publish(path: str, events: int, rate: float) -> None:
    """The publisher process: ``events`` events, at ``rate`` per second (0: at once)."""
    payload = events_pb2.ProcessEvent(pid=1, name="x" * 180)
    async with Client(path, component="procmond") as client:
        start = time.perf_counter()
        for i in range(events):
            if rate:
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            payload.pid = i + 1
            await client.publish(registry.EVENTS_PROCESS_LIFECYCLE, payload)
        await client.flush()


@dataclass(frozen=True)
class Result:
    events: int
    seconds: float
    latencies: list[float]
    stored: int
    resent: int

    @property
    def per_second(self) -> float:
        return self.events / self.seconds if self.seconds else float("nan")


async def stored_messages(url: str) -> int:
    import nats

    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(STREAM)
        return int(info.state.messages)
    finally:
        await nc.close()


async def run(path: str, url: str, workdir: Path, events: int, rate: float) -> Result:
    """One run on a fresh spool and stream."""
    import nats

    nc = await nats.connect(url)
    with contextlib.suppress(Exception):
        await nc.jetstream().delete_stream(STREAM)
    await nc.close()
    spool = workdir / f"bridge-{time.monotonic_ns()}.spool"
    config = BridgeConfig(
        host_id="bench",
        spool_path=str(spool),
        broker_address=path,
        nats=NatsOptions(servers=(url,)),
    )
    async with Bridge(config) as bridge:
        while not bridge.link_up:  # noqa: ASYNC110 - polling the bridge's figures
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # the stream is created
        publisher = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.bridge",
            "--publisher",
            path,
            str(events),
            str(rate),
        )
        while bridge.statistics().received == 0:  # noqa: ASYNC110 - polling, as above
            await asyncio.sleep(0.001)
        start = time.perf_counter()
        while bridge.statistics().acknowledged < events:
            if publisher.returncode not in (None, 0):
                raise SystemExit(f"the publisher failed ({publisher.returncode})")
            await asyncio.sleep(0.001)
        seconds = time.perf_counter() - start
        await publisher.wait()
        latencies = bridge.latencies()
        resent = bridge.statistics().resent
    return Result(events, seconds, latencies, await stored_messages(url), resent)


async def baseline(url: str, events: int, window: int = 1024) -> float:
    """nats-py alone: ``events`` publishes of the same size to JetStream, up to
    ``window`` awaiting acknowledgement (the bridge's own limit); events/s."""
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream(publish_async_max_pending=window)
        with contextlib.suppress(Exception):
            await js.delete_stream(STREAM)
        await js.add_stream(name=STREAM, subjects=["daemoneye.*.events.>"])
        data = events_pb2.ProcessEvent(pid=1, name="x" * 180).SerializeToString()
        headers = {"Nats-Msg-Id": "", "Daemoneye-Topic": "events.process.lifecycle"}
        start = time.perf_counter()
        futures = []
        for i in range(events):
            headers["Nats-Msg-Id"] = f"bench:{i}"
            futures.append(
                await js.publish_async(
                    "daemoneye.bench.events.process.lifecycle", data, headers=dict(headers)
                )
            )
        await asyncio.gather(*futures)
        seconds = time.perf_counter() - start
        await js.delete_stream(STREAM)
        return events / seconds
    finally:
        await nc.close()


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


async def main_async(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="deb-bridge-bench-", dir="/tmp"))
    path = str(workdir / "bus.sock")
    broker = start_broker(path)
    try:
        with nats_server(workdir) as url:
            raw = await baseline(url, args.events)
            burst = await run(path, url, workdir, args.events, 0.0)
            steady = await run(path, url, workdir, int(args.rate * args.seconds), args.rate)
    finally:
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    for name, result in (("throughput", burst), ("latency", steady)):
        if result.stored != result.events:
            raise SystemExit(f"{name}: the stream holds {result.stored} of {result.events}")
    lat = sorted(steady.latencies)
    print("| run | events | forwarded and acknowledged / s | p50 ms | p99 ms | max ms | re-sent |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    b = sorted(burst.latencies)
    print(
        f"| throughput (as fast as possible) | {burst.events:,} | {burst.per_second:,.0f} | "
        f"{_ms(nearest_rank(b, 0.5))} | {_ms(nearest_rank(b, 0.99))} | {_ms(max(b))} | "
        f"{burst.resent} |"
    )
    print(
        f"| latency ({args.rate:,.0f} events/s) | {steady.events:,} | {steady.per_second:,.0f} | "
        f"{_ms(nearest_rank(lat, 0.5))} | {_ms(nearest_rank(lat, 0.99))} | {_ms(max(lat))} | "
        f"{steady.resent} |"
    )
    print(
        f"| nats-py alone, for comparison (publish_async, 1024 in flight) | {args.events:,} "
        f"| {raw:,.0f} | | | | |"
    )
    print(
        "\nLatency: from the broker accepting an event to JetStream acknowledging it "
        "to the bridge. In the throughput run it includes the time events wait in "
        "the spool behind the burst."
    )


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--publisher":
        asyncio.run(publish(sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000, help="events of the throughput run")
    parser.add_argument("--rate", type=float, default=2000.0, help="events/s of the latency run")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the latency run")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
