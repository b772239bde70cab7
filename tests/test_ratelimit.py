"""Rate limits per publisher: token buckets, the policy's ``rate`` tables, and a
flooding collector that cannot crowd out another one at a shared subscriber."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import pytest
from conftest import AGENT, worker_env
from serving import broker_process

from daemoneye.eventbus.v1 import registry
from daemoneye_eventbus.access import Policy
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.errors import PolicyError, RequestTimeout
from daemoneye_eventbus.ratelimit import RateLimit, Throttle

HOSTILE_WORKERS = Path(__file__).resolve().parent / "hostile_workers.py"
LIFECYCLE = registry.EVENTS_PROCESS_LIFECYCLE
NETWORK = registry.EVENTS_NETWORK_CONNECTIONS


# -- token buckets (pure) ------------------------------------------------------------------


def test_a_burst_flows_then_the_average_is_held() -> None:
    throttle = Throttle(RateLimit(events_per_second=100, burst_events=50), now=0.0)
    assert throttle.spend(50, 0, now=0.0) == 0.0  # the burst, at full speed
    # Ten more at once: 10 events of debt, paid back at 100/s.
    assert throttle.spend(10, 0, now=0.0) == pytest.approx(0.1)
    # After the pause the debt is paid; a second later the burst is back.
    assert throttle.spend(0, 0, now=0.1) == 0.0
    assert throttle.spend(50, 0, now=1.1) == 0.0
    assert throttle.throttled == pytest.approx(0.1)


def test_bytes_and_events_each_hold_and_the_longer_wait_wins() -> None:
    limit = RateLimit(events_per_second=1000, bytes_per_second=1000)
    throttle = Throttle(limit, now=0.0)
    # 10 events are well within 1000/s, 3000 bytes are 2 s over one second's worth.
    assert throttle.spend(10, 3000, now=0.0) == pytest.approx(2.0)


def test_no_limit_never_waits() -> None:
    assert not RateLimit().limited
    throttle = Throttle(RateLimit(), now=0.0)
    assert throttle.spend(10**9, 10**12, now=0.0) == 0.0


def test_policy_rate_tables() -> None:
    policy = Policy.from_mapping(
        {
            "components": {
                "procmond": {
                    "uids": [0],
                    "rate": {"events_per_second": 2000, "burst_events": 4000},
                },
                "netmond": {"uids": [0]},
            },
            "anonymous": {"allow": True, "rate": {"bytes_per_second": 65536}},
        }
    )
    assert policy.components["procmond"].rate == RateLimit(
        events_per_second=2000, burst_events=4000
    )
    assert policy.components["netmond"].rate is None
    assert policy.anonymous_rate == RateLimit(bytes_per_second=65536)


@pytest.mark.parametrize(
    "rate",
    [{"events_per_second": -1}, {"events": 5}, {"bytes_per_second": "fast"}, [1, 2]],
)
def test_bad_rate_tables_are_refused_with_where(rate: object) -> None:
    with pytest.raises(PolicyError, match=r"\[components.procmond\]"):
        Policy.from_mapping({"components": {"procmond": {"uids": [0], "rate": rate}}})


# -- a flooding collector beside a well-behaved one ----------------------------------------

LIMIT = 2000  # events per second for the flooder's component


def policy_file(path: Path, limit: bool) -> str:
    rate = f"rate = {{ events_per_second = {LIMIT}, burst_events = {LIMIT} }}\n" if limit else ""
    uid = os.geteuid()
    path.write_text(
        f"[components.procmond]\nuids = [{uid}]\n{rate}"
        f"[components.netmond]\nuids = [{uid}]\n"
        f"[components.daemoneye-agent]\nuids = [{uid}]\nprivileged = true\n"
    )
    return str(path)


async def publisher(path: str, *args: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, str(HOSTILE_WORKERS), "publish", "--socket", path, *args),
        env=worker_env(),
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert json.loads(await asyncio.wait_for(proc.stdout.readline(), 10)) == {"connected": True}
    return proc


async def summary(proc: asyncio.subprocess.Process) -> dict[str, object]:
    assert proc.stdout is not None
    out = await asyncio.wait_for(proc.stdout.read(), 60)
    await proc.wait()
    result: dict[str, object] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def share(sock_path: str, tmp: Path, limit: bool) -> tuple[int, int, float]:
    """Events of the well-behaved collector a slow agent got, of 1,000; the
    flooder's events it got; seconds the broker throttled the flooder."""
    policy = policy_file(tmp / "policy.toml", limit)
    args = ("--policy", policy, "--max-queue-messages", "100")
    async with broker_process(sock_path, *args), Client(sock_path, component=AGENT) as agent:
        sub = await agent.subscribe("events.#", max_pending=1_000_000)
        # The flooder: one small frame per event, flat out, far beyond its limit.
        flooder = await asyncio.create_subprocess_exec(
            *(sys.executable, str(HOSTILE_WORKERS), "flood", "--socket", sock_path),
            *("--component", "procmond", "--seconds", "3", "--size", "0"),
            env=worker_env(),
            stdout=asyncio.subprocess.PIPE,
        )
        assert flooder.stdout is not None
        ready = json.loads(await asyncio.wait_for(flooder.stdout.readline(), 10))
        assert ready == {"ready": True}
        calm = await publisher(
            sock_path,
            *("--component", "netmond", "--topic", NETWORK.name),
            *("--count", "1000", "--rate", "500"),
        )
        got = {LIFECYCLE.name: 0, NETWORK.name: 0}
        while True:
            try:
                event = await sub.get(timeout=1.5)
            except RequestTimeout:
                break
            got[event.topic] += 1
            if sum(got.values()) % 50 == 0:
                # A slow agent (its loop blocked: about 5,000 events/s at most).
                time.sleep(0.01)  # noqa: ASYNC251
        await summary(calm)
        if flooder.returncode is None:
            flooder.kill()
        await flooder.wait()
        stats = await agent.broker_statistics()
        return got[NETWORK.name], got[LIFECYCLE.name], stats.throttled_seconds


async def test_a_flooding_collector_cannot_crowd_out_another(
    sock_path: str, tmp_path: Path
) -> None:
    calm, flood, throttled = await share(sock_path, tmp_path, limit=True)
    assert calm == 1000  # every event of the well-behaved collector
    assert flood > 0
    assert throttled > 1.0  # the flooder was slowed, and it was counted


async def test_without_the_limit_the_flood_crowds_the_subscriber_out(
    sock_path: str, tmp_path: Path
) -> None:
    # The same run without a rate limit: the subscriber's queue overflows and
    # the well-behaved collector loses events too (what the limit prevents).
    calm, _, throttled = await share(sock_path, tmp_path, limit=False)
    assert throttled == 0.0
    assert calm < 1000
