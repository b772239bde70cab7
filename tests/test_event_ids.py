"""Event ids and receive times across real processes [protocol §5, "Event ids and
receive times"]: every delivered event carries the broker's id (unique for the
broker's life, increasing in the order the broker accepted events, the same for
every subscriber) and the broker's receive time, over sockets and in process,
one by one and in batches."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from conftest import AGENT, PROCMOND, TEST_CONFIG, WORKERS, worker_env
from serving import broker_process

from daemoneye.eventbus.v1 import events_pb2, registry
from daemoneye_eventbus.broker import Broker
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.delivery import ReceivedEvent

LIFECYCLE = registry.EVENTS_PROCESS_LIFECYCLE


async def _worker(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKERS),
        *args,
        stdout=asyncio.subprocess.PIPE,
        env=worker_env(),
    )


def _check_ids(
    records: list[dict[str, Any]], publishers: int, each: int
) -> dict[tuple[int, int], int]:
    """Unique, increasing per publisher, and the (publisher, pid) -> id map."""
    ids = [r["eid"] for r in records]
    assert len(ids) == publishers * each
    assert len(set(ids)) == len(ids)
    assert min(ids) >= 1
    by_publisher: dict[int, list[int]] = {}
    for r in records:
        by_publisher.setdefault(r["publisher"], []).append(r["eid"])
    for got in by_publisher.values():
        assert got == sorted(got)
        assert len(got) == each
    # The order of arrival is the order of the ids (one subscriber, one queue).
    assert ids == sorted(ids)
    return {(r["publisher"], r["pid"]): r["eid"] for r in records}


async def test_ids_are_unique_increasing_per_publisher_and_shared_by_subscribers(
    sock_dir: Path,
) -> None:
    path = str(sock_dir / "bus.sock")
    publishers, each = 3, 2000
    start = time.time_ns()
    async with broker_process(path):
        readers = [
            await _worker(
                "subscribe",
                "--socket",
                path,
                "--filter",
                LIFECYCLE.name,
                "--count",
                str(publishers * each),
                "--timeout",
                "30",
            )
            for _ in range(2)
        ]
        for proc in readers:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 15)
            assert json.loads(line) == {"ready": True}
        pubs = [
            await _worker("publish", "--socket", path, "--count", str(each), "--publisher", str(n))
            for n in range(publishers)
        ]
        for pub in pubs:
            await asyncio.wait_for(pub.communicate(), 60)
        results = []
        for proc in readers:
            out, _ = await asyncio.wait_for(proc.communicate(), 120)
            assert proc.returncode == 0
            results.append([json.loads(x) for x in out.decode().splitlines() if '"eid"' in x])
    end = time.time_ns()
    maps = [_check_ids(records, publishers, each) for records in results]
    # Every subscriber saw the same id for the same event.
    assert maps[0] == maps[1]
    for records in results:
        assert all(start <= r["at"] <= end for r in records)
        stamps = [r["at"] for r in records]
        assert stamps == sorted(stamps)


async def test_in_process_subscribers_get_the_same_ids_as_socket_subscribers(
    sock_path: str,
) -> None:
    async with Broker(sock_path, TEST_CONFIG) as broker:
        local = broker.local_session("agent", AGENT)
        local_sub = await local.subscribe(LIFECYCLE)
        async with (
            Client(sock_path, component=AGENT) as reader,
            Client(sock_path, component=PROCMOND) as writer,
        ):
            remote_sub = await reader.subscribe(LIFECYCLE)
            for pid in range(500):
                await writer.publish(LIFECYCLE, events_pb2.ProcessEvent(pid=pid))
            await writer.flush()
            remote = [await remote_sub.get(timeout=10) for _ in range(500)]
        in_process = [await local_sub.get(timeout=10) for _ in range(500)]
    assert [e.event_id for e in remote] == [e.event_id for e in in_process]
    assert [e.received_at_ns for e in remote] == [e.received_at_ns for e in in_process]
    ids = [e.event_id for e in remote]
    assert ids == list(range(ids[0], ids[0] + 500))  # nobody else published meanwhile
    assert not any(e.retained for e in remote)
    first: ReceivedEvent[events_pb2.ProcessEvent] = remote[0]
    assert first.received_at.tzinfo is not None
    assert abs(first.received_at.timestamp() - first.received_at_ns / 1e9) < 1e-5
