"""Fair turns: a flood from one peer does not delay another's pong or handshake.

The broker, the flooder and the well-behaved peer are three processes: the
broker runs ``serve`` with a 3 s idle timeout; the flooder sends small
publish frames as fast as the socket takes them and never reads; this test
process pings the broker every 20 ms meanwhile and measures each round trip.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
from pathlib import Path

from conftest import PROCMOND, worker_env

from daemoneye_eventbus.client import Client

HOSTILE_WORKERS = Path(__file__).resolve().parent / "hostile_workers.py"


async def start_broker(path: str, *args: str) -> asyncio.subprocess.Process:
    # As root (CI), the broker refuses to run on without --user or --allow-root.
    root = ["--allow-root"] if os.geteuid() == 0 else []
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "daemoneye_eventbus.cli", "serve", "--socket", path),
        *root,
        *args,
        env=worker_env(),
        stderr=asyncio.subprocess.PIPE,
    )
    for _ in range(200):
        if os.path.exists(path):
            return proc
        await asyncio.sleep(0.02)
    proc.kill()
    raise AssertionError("broker did not start")


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), 10)
    except TimeoutError:
        proc.kill()
        await proc.wait()


async def test_a_flooder_does_not_delay_another_peers_pongs(sock_path: str) -> None:
    broker = await start_broker(sock_path, "--idle-timeout", "3", "--heartbeat-interval", "1")
    flooder = None
    try:
        async with Client(sock_path, name="calm", component=PROCMOND) as calm:
            await calm.flush()
            flooder = await asyncio.create_subprocess_exec(
                *(sys.executable, str(HOSTILE_WORKERS), "flood", "--socket", sock_path),
                *("--seconds", "4"),
                env=worker_env(),
                stdout=asyncio.subprocess.PIPE,
            )
            assert flooder.stdout is not None
            ready = json.loads(await asyncio.wait_for(flooder.stdout.readline(), 10))
            assert ready == {"ready": True}
            await asyncio.sleep(0.3)  # the flood is under way
            rtts: list[float] = []
            loop = asyncio.get_running_loop()
            end = loop.time() + 3.2  # longer than the idle timeout
            while loop.time() < end:
                rtts.append(await calm.flush())
                await asyncio.sleep(0.02)
            summary = json.loads(await asyncio.wait_for(flooder.stdout.readline(), 15))
            assert calm.is_connected  # never disconnected for someone else's flood
        assert summary["sent"] > 10_000, summary  # it did flood
        p99 = statistics.quantiles(rtts, n=100)[98]
        assert p99 < 0.050, f"ping p99 {p99 * 1000:.1f} ms over {len(rtts)} pings"
    finally:
        if flooder is not None and flooder.returncode is None:
            flooder.kill()
            await flooder.wait()
        await stop(broker)
