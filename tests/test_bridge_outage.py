"""The bridge while NATS is away: spooled, drained in order, nothing lost, bounded.

The broker runs in a process of its own (``serve``), the bridge and the
publishers in the test's event loop, nats-server is killed (SIGKILL) and
started again on the same port with the same store.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from bridge_helpers import bridge_config, process_event, read_stream, until
from conftest import AGENT, PROCMOND
from nats_server import NatsServerProcess
from serving import broker_process

from daemoneye.eventbus.v1 import events_pb2, registry
from daemoneye_eventbus.bridge import headers as h
from daemoneye_eventbus.bridge.runner import Bridge
from daemoneye_eventbus.client import Client

LIFECYCLE = registry.EVENTS_PROCESS_LIFECYCLE
EVENTS = 100_000


async def test_events_cross_a_nats_crash_each_stored_once(
    sock_path: str, tmp_path: Path, nats_server_control: NatsServerProcess
) -> None:
    url = nats_server_control.server.url
    async with (
        broker_process(sock_path),
        Bridge(bridge_config(tmp_path, sock_path, url)) as bridge,
        Client(sock_path, component=PROCMOND) as procmond,
    ):
        await until(lambda: bridge.link_up, "the link")

        async def publish(first: int, last: int) -> None:
            for pid in range(first, last + 1):
                await procmond.publish(LIFECYCLE, process_event(pid))
            await procmond.flush()

        # A first part, and NATS killed while it is being forwarded: some
        # events in flight lose their acknowledgement.
        await publish(1, 40_000)
        await until(lambda: bridge.statistics().acknowledged >= 10_000, "10,000 acknowledged")
        await asyncio.to_thread(nats_server_control.kill)
        await until(lambda: not bridge.link_up, "the bridge to see the link down")
        # A second part while NATS is away: spooled.
        await publish(40_001, 70_000)
        await until(lambda: bridge.statistics().received == 70_000, "70,000 received")
        down = bridge.statistics()
        assert down.spool_depth >= 30_000
        assert not down.link_up
        # NATS is back; the rest comes while the spool drains.
        await asyncio.to_thread(nats_server_control.start)
        await publish(70_001, EVENTS)
        await until(
            lambda: bridge.statistics().received == EVENTS and bridge.statistics().spool_depth == 0,
            "the spool to drain",
        )
        stats = bridge.statistics()
    assert stats.missed == 0  # lossless from the broker to the bridge
    assert stats.disconnects >= 1
    assert stats.forwarded == EVENTS
    assert stats.spool_dropped == 0
    stored = await read_stream(url)
    ids = Counter(m.headers[h.MSG_ID] for m in stored if m.headers)
    assert len(stored) == EVENTS, f"{len(stored)} stored, {stats}"
    assert len(ids) == EVENTS
    assert max(ids.values()) == 1
    pids = [events_pb2.ProcessEvent.FromString(m.data).pid for m in stored]
    assert sorted(pids) == list(range(1, EVENTS + 1))


async def test_a_full_spool_drops_the_oldest_and_counts_them(
    sock_path: str, tmp_path: Path, nats_server_control: NatsServerProcess
) -> None:
    url = nats_server_control.server.url
    config = bridge_config(tmp_path, sock_path, url, spool_max_events=100)
    async with (
        broker_process(sock_path),
        Bridge(config) as bridge,
        Client(sock_path, component=PROCMOND) as procmond,
    ):
        await until(lambda: bridge.link_up, "the link")
        await asyncio.to_thread(nats_server_control.kill)
        await until(lambda: not bridge.link_up, "the bridge to see the link down")
        for pid in range(1, 151):
            await procmond.publish(LIFECYCLE, process_event(pid))
        await until(lambda: bridge.statistics().received == 150, "150 received")
        stats = bridge.statistics()
        assert (stats.spooled, stats.spool_depth, stats.spool_dropped) == (150, 100, 50)
        await asyncio.to_thread(nats_server_control.start)
        await until(lambda: bridge.statistics().spool_depth == 0, "the spool to drain")
        assert bridge.statistics().spool_dropped == 50
    stored = await read_stream(url)
    # The newest 100, in order: the oldest 50 were dropped.
    assert [events_pb2.ProcessEvent.FromString(m.data).pid for m in stored] == list(range(51, 151))


async def test_the_bridge_follows_a_broker_restart(
    sock_path: str, tmp_path: Path, nats_server_control: NatsServerProcess
) -> None:
    # The agent (and its broker) restarts: the bridge reconnects, subscribes
    # again, and what the new broker accepts is forwarded too. Its event ids
    # start again at 1, but the receive time in Nats-Msg-Id keeps them apart.
    url = nats_server_control.server.url
    async with broker_process(sock_path):
        bridge = Bridge(bridge_config(tmp_path, sock_path, url))
        await bridge.start()
        try:
            async with Client(sock_path, component=PROCMOND) as procmond:
                for pid in range(1, 101):
                    await procmond.publish(LIFECYCLE, process_event(pid))
            await until(lambda: bridge.statistics().acknowledged == 100, "100 acknowledged")
        except BaseException:
            await bridge.close()
            raise
    try:
        async with broker_process(sock_path):
            # Published once the bridge has subscribed again (a new broker
            # keeps nothing for a subscription it does not know yet).
            async with Client(sock_path, component=AGENT) as agent:
                await until_bridge_subscribed(agent)
            async with Client(sock_path, component=PROCMOND) as procmond:
                for pid in range(101, 201):
                    await procmond.publish(LIFECYCLE, process_event(pid))
            await until(lambda: bridge.statistics().acknowledged == 200, "200 acknowledged")
    finally:
        await bridge.close()
    stored = await read_stream(url)
    assert [events_pb2.ProcessEvent.FromString(m.data).pid for m in stored] == list(range(1, 201))
    ids = [m.headers[h.EVENT_ID] for m in stored if m.headers]
    assert len(set(ids)) < len(ids)  # the new broker's ids repeat the old one's ...
    assert len({m.headers[h.MSG_ID] for m in stored if m.headers}) == 200  # ... the msg ids do not


async def until_bridge_subscribed(agent: Client) -> None:
    """Until the broker lists a subscription of the component ``bridge``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:
        stats = await agent.broker_statistics()
        bridges = {c.session_id for c in stats.connection_stats if c.component == "bridge"}
        if any(s.session_id in bridges for s in stats.subscription_stats):
            return
        assert loop.time() < deadline, "the bridge did not subscribe again"
        await asyncio.sleep(0.05)


async def test_an_event_larger_than_the_server_takes_is_counted_not_retried(
    sock_path: str, tmp_path: Path
) -> None:
    # A server that takes at most 4 KiB per message: a larger event would be
    # refused (and the connection closed) every time it was sent again.
    conf = tmp_path / "nats.conf"
    conf.write_text("max_payload: 4096\n")
    with NatsServerProcess(tmp_path / "nats", args=("-c", str(conf))) as server:
        url = server.start().url
        async with (
            broker_process(sock_path),
            Bridge(bridge_config(tmp_path, sock_path, url)) as bridge,
            Client(sock_path, component=PROCMOND) as procmond,
        ):
            await procmond.publish(LIFECYCLE, process_event(1))
            big = process_event(2)
            big.name = "x" * 8192
            await procmond.publish(LIFECYCLE, big)
            await procmond.publish(LIFECYCLE, process_event(3))
            await until(lambda: bridge.statistics().received == 3, "three received")
            await until(
                lambda: (
                    bridge.statistics().acknowledged == 2 and bridge.statistics().spool_depth == 0
                ),
                "the two others stored, and the spool empty",
            )
            stats = bridge.statistics()
        assert (stats.acknowledged, stats.unforwardable, stats.disconnects) == (2, 1, 0)
        stored = await read_stream(url)
    assert [events_pb2.ProcessEvent.FromString(m.data).pid for m in stored] == [1, 3]
