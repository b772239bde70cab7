"""``stats --watch``: the live view's screen, and the command in a pseudo-terminal."""

from __future__ import annotations

import asyncio
import os
import pty
import signal
import sys

from conftest import AGENT, PROCMOND, worker_env
from serving import broker_process

from daemoneye.eventbus.v1 import events_pb2, frames_pb2, registry
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.watch import CLEAR, render

LIFECYCLE = registry.EVENTS_PROCESS_LIFECYCLE


def snapshot(published: int, delivered: int, dropped: int) -> frames_pb2.StatsResponse:
    return frames_pb2.StatsResponse(
        connections=2,
        connections_total=3,
        published=published,
        delivered=delivered,
        dropped=dropped,
        throttled_seconds=1.5,
        topic_stats=[
            frames_pb2.TopicStats(
                topic=LIFECYCLE.name, published=published, delivered=delivered, dropped=dropped
            )
        ],
        connection_stats=[
            frames_pb2.ConnectionStats(
                client_name="slow", component="daemoneye-agent", queue_messages=700
            ),
            frames_pb2.ConnectionStats(client_name="idle", component="procmond"),
        ],
    )


def test_rates_come_from_two_snapshots() -> None:
    lines = render(snapshot(300, 500, 40), snapshot(100, 100, 0), 2.0)
    text = "\n".join(lines)
    assert "published 300 (100/s)" in text
    assert "delivered 500 (200/s)" in text
    assert "dropped 40 (20/s)" in text
    assert "throttled 1.5 s" in text
    row = next(line for line in lines if line.startswith(LIFECYCLE.name))
    assert row.split()[1:] == ["100/s", "200/s", "20/s", "40"]
    # Only queues that hold something (or throttled peers) are listed.
    assert any(line.startswith("slow") and "700" in line for line in lines)
    assert not any(line.startswith("idle") for line in lines)


def test_lossless_subscribers_holding_events_are_listed() -> None:
    now = snapshot(10, 10, 0)
    now.connection_stats[0].session_id = "s1"
    now.subscription_stats.append(
        frames_pb2.SubscriptionStats(
            session_id="s1", subscription_id=1, filter=LIFECYCLE.name, lossless=True, held=1234
        )
    )
    now.subscription_stats.append(
        frames_pb2.SubscriptionStats(session_id="s1", subscription_id=2, filter="events.#")
    )
    lines = render(now, None, 0.0)
    assert any(line.startswith("held for lossless subscribers") for line in lines)
    row = next(line for line in lines if line.startswith("slow ") and LIFECYCLE.name in line)
    assert row.split()[-1] == "1,234"
    assert not any("events.#" in line for line in lines)  # holds nothing: not listed
    assert not any(line.startswith("held") for line in render(snapshot(10, 10, 0), None, 0.0))


def test_the_first_screen_has_no_rates_yet() -> None:
    text = "\n".join(render(snapshot(10, 10, 0), None, 0.0))
    assert "published 10 (-)" in text


def test_columns_are_aligned() -> None:
    stats = snapshot(1, 1, 0)
    stats.topic_stats.add(topic="control.collector.task.{type}.{id}", published=123456)
    lines = render(stats, snapshot(0, 0, 0), 1.0)
    header = next(i for i, line in enumerate(lines) if line.startswith("topic"))
    table = lines[header : header + 3]
    ends = {len(line) for line in table}
    assert len(ends) == 1, table  # right-aligned numbers end in one column


async def test_stats_watch_in_a_terminal(sock_path: str) -> None:
    async with broker_process(sock_path), Client(sock_path, component=PROCMOND) as pub:
        master, slave = pty.openpty()
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "daemoneye_eventbus.cli", "stats", "--watch"),
            *("--interval", "0.2", "--socket", sock_path, "--component", AGENT),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=worker_env(),
        )
        os.close(slave)
        seen = b""
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 15
            pid = 0
            while loop.time() < deadline:
                pid += 1
                await pub.publish(LIFECYCLE, events_pb2.ProcessEvent(pid=pid))
                await asyncio.sleep(0.05)
                readable = await loop.run_in_executor(None, _read, master)
                seen += readable
                screens = seen.decode(errors="replace").split(CLEAR)
                if len(screens) > 3 and _has_rate(screens[-2]):
                    break
            else:
                raise AssertionError(f"no screen with a rate: {seen[-2000:]!r}")
            proc.send_signal(signal.SIGINT)
            code = await asyncio.wait_for(proc.wait(), 10)
            seen += _read(master)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            os.close(master)
    text = seen.decode(errors="replace")
    assert code == 0, text[-2000:]  # interrupting the view is how it ends
    assert "Traceback" not in text
    assert "topic" in text


def _has_rate(screen: str) -> bool:
    for line in screen.splitlines():
        if line.startswith(LIFECYCLE.name):
            return line.split()[1] not in ("-", "0/s")
    return False


def _read(fd: int) -> bytes:
    import select

    out = b""
    while select.select([fd], [], [], 0.1)[0]:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    return out
