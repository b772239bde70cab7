"""The memory budget, measured as the broker's RSS during and after each attack.

The broker is ``serve`` in its own process; attackers are raw sockets from
this process. Each test reads the broker's ``VmRSS`` before the attack, at
its height, and after the attackers have gone, and bounds the growth by what
the budget allows (docs/security.md, "Memory"), not by wire bytes.
"""

from __future__ import annotations

import asyncio

import pytest
from rawpeer import RawPeer
from serving import broker_process

from daemoneye.eventbus.v1 import control_pb2, frames_pb2, registry
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationFilter
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode, Frame
from daemoneye_eventbus import correlation as corr
from daemoneye_eventbus.client import Client, build_publish
from daemoneye_eventbus.frames import encode_frame, encode_varint

MIB = 1024 * 1024

pytestmark = pytest.mark.linux_only("reads /proc/<pid>/status")


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def largest_filter(seed: int) -> CorrelationFilter:
    """A correlation filter at every bound: about 220 KB on the wire."""
    n = corr.MAX_FILTER_ENTRIES
    f = CorrelationFilter()
    f.correlation_ids.extend(f"{seed}-{j}-".ljust(corr.MAX_ID_BYTES, "i") for j in range(n))
    f.correlation_id_patterns.extend(
        f"{seed}-{j}*".ljust(corr.MAX_PATTERN_BYTES, "p") for j in range(n)
    )
    f.parent_correlation_ids.extend(f"p{seed}-{j}".ljust(corr.MAX_ID_BYTES, "x") for j in range(n))
    f.root_correlation_ids.extend(f"r{seed}-{j}".ljust(corr.MAX_ID_BYTES, "x") for j in range(n))
    f.workflow_stages.extend(f"s{seed}-{j}".ljust(corr.MAX_STAGE_BYTES, "s") for j in range(n))
    for j in range(corr.MAX_TAGS):
        key = f"k{seed}-{j}".ljust(corr.MAX_TAG_KEY_BYTES, "k")
        f.required_tags[key] = "v" * corr.MAX_TAG_VALUE_BYTES
        f.any_tags[key + "a"[: corr.MAX_TAG_KEY_BYTES - len(key)]] = "w" * corr.MAX_TAG_VALUE_BYTES
    return f


async def test_subscriptions_with_the_largest_filters_stay_within_budget(sock_path: str) -> None:
    async with broker_process(sock_path) as broker:
        base = rss(broker.pid)
        peers = [await RawPeer.connect(sock_path) for _ in range(24)]
        accepted = refused = 0
        for peer in peers:
            frames = [
                Frame(
                    subscribe=frames_pb2.Subscribe(
                        subscription_id=i + 1, filter="#", correlation_filter=largest_filter(i)
                    )
                )
                for i in range(40)
            ]
            for frame in frames:
                await peer.send(frame)
                answer = await peer.recv(timeout=10)
                if answer.WhichOneof("kind") == "subscribe_ack":
                    accepted += 1
                else:
                    assert answer.error.code == ErrorCode.ERROR_CODE_LIMIT_EXCEEDED, answer
                    refused += 1
            del frames
        during = rss(broker.pid) - base
        print(f"subscriptions: {accepted} accepted, {refused} refused, +{during / MIB:.1f} MiB")
        # 24 x 40 x 220 KB = 211 MB on the wire; the budget holds 4 MiB per
        # connection and 64 MiB in all, charged at about twice the wire size.
        assert refused > 0
        assert accepted * 220_000 * 2 <= 64 * MIB + 4 * MIB
        assert during < 160 * MIB, f"broker grew {during / MIB:.0f} MiB"
        for peer in peers:
            peer.close()
        await asyncio.sleep(0.5)
        # Its memory is back for others: a new connection may subscribe again.
        again = await RawPeer.connect(sock_path)
        await again.send(
            Frame(
                subscribe=frames_pb2.Subscribe(
                    subscription_id=1, filter="#", correlation_filter=largest_filter(99)
                )
            )
        )
        assert (await again.recv(timeout=10)).WhichOneof("kind") == "subscribe_ack"
        again.close()
        after = rss(broker.pid) - base
        print(f"subscriptions: after the attackers left +{after / MIB:.1f} MiB")
        assert after < 160 * MIB


async def test_unread_replies_count_with_their_overhead(sock_path: str) -> None:
    async with broker_process(sock_path) as broker:
        base = rss(broker.pid)
        pings = b"".join(
            encode_frame(Frame(ping=frames_pb2.Ping(nonce=n))) for n in range(1, 20_001)
        )
        peers = [await RawPeer.connect(sock_path) for _ in range(16)]
        closed = 0
        # Each peer asks for pongs and never reads them: 16 x 30 x 20,000 pongs
        # of 14 bytes would be 134 MB on the wire, several times that in memory.
        async with asyncio.timeout(60):
            for _ in range(30):
                for peer in peers:
                    if not await peer.write(pings):
                        closed += 1
                await asyncio.sleep(0)
        await asyncio.sleep(0.5)
        during = rss(broker.pid) - base
        print(f"unread pongs: +{during / MIB:.1f} MiB, {closed} writes refused")
        assert during < 160 * MIB, f"broker grew {during / MIB:.0f} MiB"
        assert closed > 0  # slow consumers were disconnected along the way
        for peer in peers:
            peer.close()
        await asyncio.sleep(0.5)
        after = rss(broker.pid) - base
        print(f"unread pongs: after +{after / MIB:.1f} MiB")
        assert after < 160 * MIB


async def test_partial_frames_of_many_connections_stay_within_budget(sock_path: str) -> None:
    async with broker_process(sock_path) as broker:
        base = rss(broker.pid)
        body = 1_000_000
        peers = [await RawPeer.connect(sock_path) for _ in range(64)]
        for peer in peers:
            # A frame of almost 1 MiB, all but its last byte.
            await peer.write(encode_varint(body) + b"\x0a" + b"x" * (body - 2))
        await asyncio.sleep(1.0)
        during = rss(broker.pid) - base

        async def refused_by_budget(peer: RawPeer) -> bool:
            try:
                frames = await peer.until_eof(timeout=2.0)
            except TimeoutError:
                return False  # still open: its partial frame is within the budget
            codes = [f.error.code for f in frames if f.WhichOneof("kind") == "error"]
            return codes == [ErrorCode.ERROR_CODE_LIMIT_EXCEEDED]

        refused = sum(await asyncio.gather(*(refused_by_budget(p) for p in peers)))
        print(f"partial frames: +{during / MIB:.1f} MiB, {refused} of 64 closed")
        # 64 MB held on the wire; the budget holds 32 MiB of partial frames.
        assert during < 64 * MIB, f"broker grew {during / MIB:.0f} MiB"
        assert refused >= 64 - 34
        for peer in peers:
            peer.close()
        await asyncio.sleep(0.5)
        after = rss(broker.pid) - base
        print(f"partial frames: after +{after / MIB:.1f} MiB")
        assert after < 64 * MIB


async def test_replacing_a_retained_event_keeps_one(sock_path: str) -> None:
    """An anonymous peer replaces the retained ``control.health.status`` (public)
    with an event of almost 1 MiB, a hundred times: the broker holds the last
    one, not the hundred (docs/security.md, "Memory")."""
    status = frames_pb2.Publish(
        topic="control.health.status", payload_type="daemoneye.eventbus.v1.ComponentStatus"
    )
    async with broker_process(sock_path) as broker:
        base = rss(broker.pid)
        async with await RawPeer.connect(sock_path) as peer:
            for i in range(100):
                message = f"{i:03d}".ljust(900 * 1024, "x").encode()
                status.payload = b"\x1a" + encode_varint(len(message)) + message  # field 3
                await peer.send(Frame(publish=status))
            await peer.roundtrip(timeout=30)
            grown = rss(broker.pid) - base
            # A late subscriber gets the last one: it was kept, and only it.
            await peer.send(
                Frame(
                    subscribe=frames_pb2.Subscribe(
                        subscription_id=1, filter="control.health.status"
                    )
                )
            )
            await peer.expect("subscribe_ack")
            deliver = (await peer.expect("deliver")).deliver
        assert deliver.retained
        assert deliver.publish.payload[4:7] == b"099"
        assert grown < 24 * MIB, f"{grown / MIB:.1f} MiB for one retained event of 0.9 MiB"


async def test_pending_requests_stay_within_budget(sock_path: str) -> None:
    """65 agents each ask 1024 requests of a responder that reads them and never
    answers: the broker holds at most ``max_total_pending_requests`` (65,536)
    of them, 448 bytes each, and refuses the rest."""
    queue = registry.control_collector_queue(type="scan")
    # The attackers send their requests and fall silent: keep them connected.
    async with broker_process(sock_path, "--idle-timeout", "120") as broker:
        base = rss(broker.pid)
        responder = await RawPeer.connect(sock_path, component="procmond")
        await responder.send(
            Frame(
                subscribe=frames_pb2.Subscribe(
                    subscription_id=1, filter="control.collector.queue.+", respond=True
                )
            )
        )
        assert (await responder.recv()).WhichOneof("kind") == "subscribe_ack"

        async def take_and_forget() -> None:  # reads every request, answers none
            while await responder.read_some():
                pass

        reader = asyncio.ensure_future(take_and_forget())
        agents = [await RawPeer.connect(sock_path, component="daemoneye-agent") for _ in range(65)]
        publish = build_publish(queue, control_pb2.TaskAssignment(task_id="t", task_type="scan"))
        requests = b"".join(
            encode_frame(
                Frame(request=frames_pb2.Request(request_id=i, publish=publish, timeout_ms=120_000))
            )
            for i in range(1, 1025)
        )
        async with Client(sock_path) as watcher:  # anonymous: the totals only

            async def routed(count: int) -> None:
                for _ in range(1000):
                    stats = await watcher.broker_statistics()
                    assert stats.no_responders == 0  # the responder kept up
                    if stats.requests == count:
                        return
                    await asyncio.sleep(0.02)
                raise AssertionError(f"{stats.requests} of {count} requests routed")

            # One agent at a time, so that the responder's reads keep up.
            for n, agent in enumerate(agents[:64], 1):
                await agent.write(requests)
                await routed(n * 1024)
            during = rss(broker.pid) - base
            # One more, from a connection with none waiting: over the broker's total.
            last = agents[64]
            await last.send(Frame(request=frames_pb2.Request(request_id=1, publish=publish)))
            error = (await last.recv(timeout=10)).error
            assert (error.code, error.request_id) == (ErrorCode.ERROR_CODE_LIMIT_EXCEEDED, 1)
            print(f"pending requests: 65,536 held, +{during / MIB:.1f} MiB")
            # 65,536 x 448 bytes charged: 28 MiB.
            assert during < 64 * MIB, f"broker grew {during / MIB:.0f} MiB"
            for agent in agents[:64]:
                agent.close()
            await asyncio.sleep(1.0)
            # Their requests went with them: room again.
            await last.send(Frame(request=frames_pb2.Request(request_id=2, publish=publish)))
            await last.roundtrip()
            stats = await watcher.broker_statistics()
            assert stats.requests == 64 * 1024 + 1
        after = rss(broker.pid) - base
        print(f"pending requests: after +{after / MIB:.1f} MiB")
        assert after < 64 * MIB
        last.close()
        reader.cancel()
        responder.close()
