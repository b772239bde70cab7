"""Fair turns: a flood from one peer does not delay another's pong or handshake.

The broker, the flooders and the well-behaved peer are separate processes:
the broker runs ``serve`` with a 3 s idle timeout; each flooder sends the
smallest publish frames it can, as fast as the socket takes them, and never
reads; this test
process pings the broker every 20 ms meanwhile and measures each round trip.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
from pathlib import Path

from conftest import PROCMOND, worker_env
from serving import broker_process

from daemoneye_eventbus.client import Client

HOSTILE_WORKERS = Path(__file__).resolve().parent / "hostile_workers.py"
#: Flooding processes, each sending the smallest publish frames it can.
FLOODERS = 3


async def test_a_flooder_does_not_delay_another_peers_pongs(sock_path: str) -> None:
    flooders: list[asyncio.subprocess.Process] = []
    async with broker_process(sock_path, "--idle-timeout", "3", "--heartbeat-interval", "1"):
        try:
            async with Client(sock_path, name="calm", component=PROCMOND) as calm:
                await calm.flush()
                flooders = [
                    await asyncio.create_subprocess_exec(
                        *(sys.executable, str(HOSTILE_WORKERS), "flood", "--socket", sock_path),
                        *("--seconds", "4", "--size", "0"),
                        env=worker_env(),
                        stdout=asyncio.subprocess.PIPE,
                    )
                    for _ in range(FLOODERS)
                ]
                for flooder in flooders:
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
                sent = 0
                for flooder in flooders:
                    assert flooder.stdout is not None
                    line = await asyncio.wait_for(flooder.stdout.readline(), 15)
                    sent += json.loads(line)["sent"]
                assert calm.is_connected  # never disconnected for someone else's flood
            assert sent > 100_000, sent  # they did flood
            p99 = statistics.quantiles(rtts, n=100)[98]
            p50 = statistics.median(rtts)
            print(f"fairness: {len(rtts)} pings, p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
            assert p99 < 0.050, f"ping p99 {p99 * 1000:.1f} ms over {len(rtts)} pings"
        finally:
            for flooder in flooders:
                if flooder.returncode is None:
                    flooder.kill()
                    await flooder.wait()
