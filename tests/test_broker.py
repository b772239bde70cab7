"""Broker and client over real Unix sockets, with separate processes where it matters."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import AGENT, PROCMOND, TEST_CONFIG, peer_published, pid_of, worker_cmd, worker_env
from rawpeer import RawPeer

from daemoneye.eventbus.v1 import control_pb2, events_pb2, frames_pb2, registry
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationFilter
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode, Frame
from daemoneye_eventbus.broker import Broker, BrokerConfig
from daemoneye_eventbus.client import Client, build_publish
from daemoneye_eventbus.client.requests import RequestKey, RequestKind
from daemoneye_eventbus.correlation import new_correlation
from daemoneye_eventbus.errors import (
    BrokenResourceError,
    BrokerAlreadyRunning,
    BrokerError,
    InvalidTopic,
    LimitExceeded,
    PayloadTypeMismatch,
    RequestTimeout,
    UnknownSubscription,
)
from daemoneye_eventbus.frames import encode_frame

LIFECYCLE = registry.EVENTS_PROCESS_LIFECYCLE
#: Public: any peer, anonymous or not, may publish and receive it. Used where one
#: connection both publishes and receives, since no component may do both on the
#: restricted process topics (procmond publishes them, the agent receives them).
ANOMALY = registry.EVENTS_PROCESS_ANOMALY


def proc(pid: int, name: str = "x") -> events_pb2.ProcessEvent:
    return events_pb2.ProcessEvent(pid=pid, name=name)


async def drain(sub: Any, timeout: float = 0.3) -> list[Any]:
    out = []
    while True:
        try:
            out.append(await sub.get(timeout=timeout))
        except RequestTimeout:
            return out


# -- basics ------------------------------------------------------------------------


async def test_publish_subscribe_roundtrip(broker: Broker, sock_path: str) -> None:
    async with (
        Client(sock_path, component=AGENT) as sub_client,
        Client(sock_path, component=PROCMOND) as pub_client,
    ):
        sub = await sub_client.subscribe(LIFECYCLE)
        meta = new_correlation("corr-1")
        await pub_client.publish(LIFECYCLE, proc(42, "init"), correlation=meta)
        event = await sub.get(timeout=3)
        assert event.topic == "events.process.lifecycle"
        assert event.sequence == 1
        msg = event.message()
        assert isinstance(msg, events_pb2.ProcessEvent)
        assert (msg.pid, msg.name) == (42, "init")
        assert event.correlation is not None
        assert event.correlation.correlation_id == "corr-1"
        assert event.correlation.root_correlation_id == "corr-1"


async def test_wildcard_routing(broker: Broker, sock_path: str) -> None:
    filters = {
        "all": "#",
        "process": "events.process.#",
        "plus": "events.+.lifecycle",
        "exact": "events.process.tree",
        "network": "events.network.#",
    }
    async with (
        Client(sock_path, component=AGENT) as subs_client,
        Client(sock_path, component=PROCMOND) as pub,
        Client(sock_path, component="netmond") as net_pub,
    ):
        subs = {k: await subs_client.subscribe(f) for k, f in filters.items()}
        await pub.publish(registry.EVENTS_PROCESS_LIFECYCLE, proc(1))
        await pub.publish(registry.EVENTS_PROCESS_TREE, proc(2))
        # Network events are netmond's to publish.
        await net_pub.publish(
            registry.EVENTS_NETWORK_CONNECTIONS, events_pb2.NetworkEvent(local_port=3)
        )
        await pub.flush()
        await net_pub.flush()
        got = {k: sorted(e.topic for e in await drain(s)) for k, s in subs.items()}
    assert got == {
        "all": [
            "events.network.connections",
            "events.process.lifecycle",
            "events.process.tree",
        ],
        "process": ["events.process.lifecycle", "events.process.tree"],
        "plus": ["events.process.lifecycle"],
        "exact": ["events.process.tree"],
        "network": ["events.network.connections"],
    }


async def test_correlation_filter_applied_by_broker(broker: Broker, sock_path: str) -> None:
    async with (
        Client(sock_path, component=AGENT) as sub_client,
        Client(sock_path, component=PROCMOND) as pub,
    ):
        wanted = await sub_client.subscribe(
            "events.#", correlation_filter=CorrelationFilter(root_correlation_ids=["wf-a"])
        )
        for i in range(10):
            root = "wf-a" if i % 2 == 0 else "wf-b"
            await pub.publish(LIFECYCLE, proc(i), correlation=new_correlation(root))
        await pub.publish(LIFECYCLE, proc(99))  # no correlation: a non-empty filter rejects it
        await pub.flush()
        events = await drain(wanted)
    assert [pid_of(e) for e in events] == [0, 2, 4, 6, 8]
    # Filtered-out events never crossed the socket: the broker delivered only five.
    stats = broker.statistics()
    assert peer_published(stats) == 11
    assert stats.delivered == 5
    assert [e.sequence for e in events] == [1, 2, 3, 4, 5]


async def test_control_topics_need_opt_in(broker: Broker, sock_path: str) -> None:
    async with (
        Client(sock_path, component=AGENT) as c,
        Client(sock_path, component=PROCMOND) as pub,
    ):
        everything = await c.subscribe("#")
        with_control = await c.subscribe("#", include_control=True)
        explicit = await c.subscribe("control.health.#")
        await pub.publish(registry.CONTROL_HEALTH_HEARTBEAT, control_pb2.Heartbeat(sequence=1))
        await pub.publish(LIFECYCLE, proc(1))
        await pub.flush()
        assert [e.topic for e in await drain(everything)] == ["events.process.lifecycle"]
        assert sorted(e.topic for e in await drain(with_control)) == [
            "control.health.heartbeat",
            "events.process.lifecycle",
        ]
        assert [e.topic for e in await drain(explicit)] == ["control.health.heartbeat"]


async def test_template_topic(broker: Broker, sock_path: str) -> None:
    # Privileged: the agent assigns tasks, the collectors receive them.
    async with (
        Client(sock_path, component=PROCMOND) as c,
        Client(sock_path, component=AGENT) as pub,
    ):
        sub = await c.subscribe(registry.CONTROL_COLLECTOR_TASK_TARGETED.filter)
        topic = registry.control_collector_task_targeted(type="scan", id="procmond-1")
        await pub.publish(topic, control_pb2.TaskAssignment(task_id="t1"))
        event = await sub.get(timeout=3)
    assert event.topic == "control.collector.task.scan.procmond-1"
    msg = event.message()
    assert isinstance(msg, control_pb2.TaskAssignment)
    assert msg.task_id == "t1"


async def test_refusals_are_typed_and_keep_the_connection(broker: Broker, sock_path: str) -> None:
    errors: list[Exception] = []
    # procmond may publish on events.process.lifecycle: the refusals are for the
    # topic and the payload type, not for access.
    async with Client(sock_path, component=PROCMOND) as c:
        c.on_error = errors.append
        # Undeclared topic, and a payload type that is not the topic's.
        await c.publish_raw("events.unknown.thing", "daemoneye.eventbus.v1.ProcessEvent", b"")
        await c.publish_raw("events.process.lifecycle", "daemoneye.eventbus.v1.NetworkEvent", b"")
        await c.flush()
        assert [type(e) for e in errors] == [InvalidTopic, PayloadTypeMismatch]
        assert "not declared" in str(errors[0])
        assert c.statistics().refused == 2
        # Invalid filters are refused before anything is sent, with a reason.
        with pytest.raises(InvalidTopic, match="level"):
            await c.subscribe("events.#.x")
        # The connection is still usable (on a public topic, which procmond may also read).
        sub = await c.subscribe("events.#")
        await c.publish(ANOMALY, proc(5))
        assert pid_of(await sub.get(timeout=3)) == 5
    assert broker.statistics().refused == 2


async def test_unsubscribe_stops_delivery(broker: Broker, sock_path: str) -> None:
    async with (
        Client(sock_path, component=AGENT) as c,
        Client(sock_path, component=PROCMOND) as pub,
    ):
        sub = await c.subscribe("events.#")
        await pub.publish(LIFECYCLE, proc(1))
        assert pid_of(await sub.get(timeout=3)) == 1
        await sub.unsubscribe()
        await pub.publish(LIFECYCLE, proc(2))
        await pub.flush()
        assert broker.statistics().subscription_stats == ()
        with pytest.raises(UnknownSubscription):
            await c._request(
                RequestKey(RequestKind.UNSUBSCRIBE, 77),
                Frame(unsubscribe=frames_pb2.Unsubscribe(subscription_id=77)),
            )


async def test_subscription_limit(sock_path: str) -> None:
    config = BrokerConfig(max_subscriptions=3)
    async with Broker(sock_path, config), Client(sock_path) as c:
        # Public filters: any peer may subscribe to them.
        for flt in ("events.process.anomaly", "control.health.heartbeat", "control.health.#"):
            await c.subscribe(flt)
        with pytest.raises(LimitExceeded, match="subscription limit of 3"):
            await c.subscribe("events.#")
        await c.flush()  # still connected


async def test_connection_limit_and_slots_freed(sock_path: str) -> None:
    config = BrokerConfig(max_connections=2)
    async with Broker(sock_path, config) as broker:
        for _ in range(2):  # the cycle repeats: slots are freed when clients leave
            a = Client(sock_path)
            b = Client(sock_path)
            await a.connect()
            await b.connect()
            with pytest.raises(LimitExceeded, match="connection limit of 2"):
                await Client(sock_path).connect()
            await a.close()
            await b.close()
            for _ in range(50):
                if broker.statistics().connections == 0:
                    break
                await asyncio.sleep(0.02)
            assert broker.statistics().connections == 0


async def test_stats_request(broker: Broker, sock_path: str) -> None:
    async with (
        Client(sock_path, name="stats-client") as c,
        Client(sock_path, name="agent", component="daemoneye-agent") as agent,
    ):
        await c.subscribe("events.#")
        await c.publish(ANOMALY, proc(1))  # public: this one client publishes and receives
        await c.flush()
        anonymous_view = await c.broker_statistics()
        stats = await agent.broker_statistics()
    # Totals for everyone; who is connected and what they read only for the agent.
    assert (anonymous_view.connections, peer_published(anonymous_view)) == (2, 1)
    assert not anonymous_view.connection_stats
    assert not anonymous_view.subscription_stats
    assert stats.connections == 2
    assert peer_published(stats) == 1
    assert stats.delivered == 1
    by_name = {c.client_name: c for c in stats.connection_stats}
    assert by_name["stats-client"].peer_pid == os.getpid()
    assert by_name["agent"].component == "daemoneye-agent"
    assert stats.subscription_stats[0].filter == "events.#"


async def test_in_process_publish_reaches_socket_subscribers_promptly(sock_path: str) -> None:
    # Heartbeats far apart: delivery must not wait for the subscriber to say anything.
    config = BrokerConfig(heartbeat_interval=30, idle_timeout=60)
    async with Broker(sock_path, config) as broker, Client(sock_path, component=AGENT) as c:
        sub = await c.subscribe(LIFECYCLE)
        local = broker.local_session("agent", AGENT)
        for pid in range(3):
            local.publish_frame(build_publish(LIFECYCLE, proc(pid)))
        got = [pid_of(await sub.get(timeout=2)) for _ in range(3)]
        assert got == [0, 1, 2]


async def test_filter_matching_no_declared_topic_is_invalid(broker: Broker, sock_path: str) -> None:
    async with Client(sock_path, component=AGENT) as c:
        with pytest.raises(InvalidTopic, match="matches no topic declared"):
            await c.subscribe("events.nothing.here")
        await c.subscribe("events.process.#")  # the connection stays usable


# -- separate processes ------------------------------------------------------------


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(worker_cmd(*args), stdout=subprocess.PIPE, text=True, env=worker_env())


async def wait_ready(p: subprocess.Popen[str]) -> None:
    assert p.stdout is not None
    line = await asyncio.to_thread(p.stdout.readline)
    assert json.loads(line) == {"ready": True}


async def collect(p: subprocess.Popen[str]) -> list[dict[str, Any]]:
    out, _ = await asyncio.to_thread(p.communicate, timeout=60)
    assert p.returncode == 0
    return [json.loads(line) for line in out.splitlines() if line]


async def test_ordering_across_processes(sock_path: str) -> None:
    n = 3000
    # A queue large enough for the whole burst: this test is about order, not drops.
    async with Broker(sock_path, BrokerConfig(max_queue_messages=2 * n)):
        await _ordering(sock_path, n)


async def _ordering(sock_path: str, n: int) -> None:
    sub = spawn(
        "subscribe", "--socket", sock_path, "--filter", "events.process.#", "--count", str(2 * n)
    )
    await wait_ready(sub)
    pubs = [
        spawn("publish", "--socket", sock_path, "--count", str(n), "--publisher", str(k))
        for k in (1, 2)
    ]
    for p in pubs:
        await collect(p)
    records = await collect(sub)
    events, summary = records[:-1], records[-1]
    assert summary == {"done": 2 * n, "missed": 0, "dropped": 0, "ordered": True}
    # Per publisher and topic, order is preserved; sequence numbers have no gap.
    for k in (1, 2):
        assert [r["pid"] for r in events if r["publisher"] == k] == list(range(n))
    assert [r["seq"] for r in events] == list(range(1, 2 * n + 1))


async def test_correlation_filter_across_processes(broker: Broker, sock_path: str) -> None:
    sub = spawn("subscribe", "--socket", sock_path, "--correlation", "job-0", "--timeout", "1.5")
    await wait_ready(sub)
    await collect(spawn("publish", "--socket", sock_path, "--count", "100", "--correlation", "job"))
    records = await collect(sub)
    events = records[:-1]
    assert len(events) == 50
    assert {r["corr"] for r in events} == {"job-0"}
    assert [r["pid"] for r in events] == list(range(0, 100, 2))


async def test_killed_client_is_cleaned_up(broker: Broker, sock_path: str) -> None:
    victim = spawn("subscribe", "--socket", sock_path, "--filter", "#", "--timeout", "30")
    await wait_ready(victim)
    assert broker.statistics().connections == 1
    victim.kill()
    await asyncio.to_thread(victim.communicate)
    for _ in range(100):
        if broker.statistics().connections == 0:
            break
        await asyncio.sleep(0.02)
    stats = broker.statistics()
    assert stats.connections == 0
    assert stats.subscription_stats == ()
    # Others are unaffected.
    async with Client(sock_path) as c:
        s = await c.subscribe("#")
        await c.publish(ANOMALY, proc(7))
        assert pid_of(await s.get(timeout=3)) == 7


async def test_stalled_subscriber_does_not_slow_others(sock_path: str) -> None:
    # A small kernel buffer, so that the stalled peer's backlog reaches the broker's queue.
    config = BrokerConfig(
        slow_consumer_timeout=1.0, heartbeat_interval=5, idle_timeout=30, socket_send_buffer=65536
    )
    n = 10_000
    async with Broker(sock_path, config) as broker:
        stalled = await RawPeer.connect(sock_path, component=AGENT)
        await stalled.send(
            Frame(subscribe=frames_pb2.Subscribe(subscription_id=1, filter="events.#"))
        )
        assert (await stalled.recv()).WhichOneof("kind") == "subscribe_ack"
        # The stalled peer never reads again. A fast subscriber in another process:
        fast = spawn(
            "subscribe", "--socket", sock_path, "--filter", "events.#", "--count", str(n), "--quiet"
        )
        await wait_ready(fast)
        started = time.monotonic()
        # Paced so that the fast subscriber can keep up on a loaded 2-core machine.
        await collect(spawn("publish", "--socket", sock_path, "--count", str(n), "--rate", "5000"))
        records = await collect(fast)
        assert records[-1] == {"done": n, "missed": 0, "dropped": 0, "ordered": True}
        stats = broker.statistics()
        stalled_stats = [s for s in stats.subscription_stats if s.filter == "events.#"]
        assert stats.dropped > 0
        assert stats.dropped == sum(s.dropped for s in stalled_stats)
        # Its queue stayed within its bound in the meantime.
        for c in stats.connection_stats:
            assert c.queue_messages <= config.max_queue_messages
        # The stuck subscriber (still not reading) is eventually disconnected.
        for _ in range(500):
            if broker.statistics().connections == 0:
                break
            await asyncio.sleep(0.02)
        assert broker.statistics().connections == 0
        assert await stalled.closed(timeout=10)
        assert time.monotonic() - started < 30
        stalled.close()


# -- handshake, heartbeats, protocol errors --------------------------------------------


async def test_handshake_deadline(broker: Broker, sock_path: str) -> None:
    peer = await RawPeer.connect(sock_path, handshake=False)
    hello = encode_frame(Frame(hello=frames_pb2.Hello(protocol_version=1, client_name="slow")))

    # Trickle the handshake: one byte every 0.2 s cannot finish within 1 s.
    async def trickle() -> Frame:
        for b in hello:
            if not await peer.write(bytes([b])):
                raise BrokenPipeError("the broker hung up")
            await asyncio.sleep(0.2)
        return await peer.recv()

    with pytest.raises((ConnectionError, EOFError)):
        await trickle()
    peer.close()


async def test_handshake_deadline_error_frame(broker: Broker, sock_path: str) -> None:
    peer = await RawPeer.connect(sock_path, handshake=False)
    frame = await peer.recv(timeout=3)
    assert frame.error.code == ErrorCode.ERROR_CODE_HANDSHAKE_TIMEOUT
    assert frame.error.fatal
    assert await peer.closed()
    peer.close()


async def test_publish_before_hello_is_a_protocol_error(broker: Broker, sock_path: str) -> None:
    async with Client(sock_path, component=AGENT) as watcher:  # would see a routed lifecycle event
        sub = await watcher.subscribe("#")
        peer = await RawPeer.connect(sock_path, handshake=False)
        await peer.send(Frame(publish=frames_pb2.Publish(topic="events.process.lifecycle")))
        frame = await peer.recv()
        assert frame.error.code == ErrorCode.ERROR_CODE_UNEXPECTED_FRAME
        assert await peer.closed()
        peer.close()
        assert await drain(sub) == []  # nothing routed


async def test_oversized_frame_closes_only_that_connection(broker: Broker, sock_path: str) -> None:
    async with Client(sock_path) as good:
        sub = await good.subscribe("#")
        peer = await RawPeer.connect(sock_path)
        await peer.write(b"\xff\xff\xff\x7f")  # declares ~268 MB, sends no body
        frame = await peer.recv()
        assert frame.error.code == ErrorCode.ERROR_CODE_FRAME_TOO_LARGE
        assert await peer.closed()
        peer.close()
        await good.publish(ANOMALY, proc(3))
        assert pid_of(await sub.get(timeout=3)) == 3


async def test_client_answers_heartbeats(broker: Broker, sock_path: str) -> None:
    # idle_timeout is 3 s and heartbeats every 0.5 s: a silent but healthy client stays.
    async with Client(sock_path) as c:
        await asyncio.sleep(TEST_CONFIG.idle_timeout + 1)
        assert c.is_connected
        await c.flush()


async def test_silent_peer_is_disconnected(broker: Broker, sock_path: str) -> None:
    peer = await RawPeer.connect(sock_path)
    frame = await peer.recv(timeout=3, answer_pings=False)
    assert frame.WhichOneof("kind") == "ping"
    # It never answers: closed with an idle-timeout error after idle_timeout.
    frame = await peer.recv(timeout=TEST_CONFIG.idle_timeout + 2, answer_pings=False)
    assert frame.error.code == ErrorCode.ERROR_CODE_IDLE_TIMEOUT
    assert await peer.closed()
    peer.close()


# -- socket file ------------------------------------------------------------------


async def test_socket_file_mode_and_directory(tmp_path: Path) -> None:
    d = Path("/tmp") / f"deb-mode-{os.getpid()}"
    path = str(d / "sub" / "bus.sock")
    try:
        async with Broker(path, TEST_CONFIG):
            st = os.lstat(path)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o600
            assert stat.S_IMODE(os.stat(d / "sub").st_mode) == 0o700
        assert not os.path.exists(path)  # removed on close
    finally:
        import shutil

        shutil.rmtree(d, ignore_errors=True)


async def test_second_broker_refused_on_live_socket(broker: Broker, sock_path: str) -> None:
    with pytest.raises(BrokerAlreadyRunning):
        await Broker(sock_path).start()
    async with Client(sock_path) as c:  # the first one still serves
        await c.flush()


async def test_stale_socket_reclaimed(sock_path: str) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    stale.close()  # the file stays, nobody listens
    async with Broker(sock_path, TEST_CONFIG), Client(sock_path) as c:
        await c.flush()


@pytest.mark.parametrize("kind", ["file", "symlink", "directory"])
async def test_foreign_file_refused_and_kept(sock_dir: Path, kind: str) -> None:
    path = sock_dir / "bus.sock"
    target = sock_dir / "target"
    target.write_text("keep me")
    if kind == "file":
        path.write_text("keep me")
    elif kind == "symlink":
        path.symlink_to(target)
    else:
        path.mkdir()
    with pytest.raises(BrokerError, match="refusing"):
        await Broker(str(path)).start()
    assert path.exists() or path.is_symlink()
    assert target.read_text() == "keep me"


# -- standalone broker process ---------------------------------------------------------


#: As root the broker refuses to run on without --user or --allow-root.
ROOT = ["--allow-root"] if os.geteuid() == 0 else []


def serve(sock_path: str) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, "-m", "daemoneye_eventbus.cli", "serve", "--socket", sock_path, *ROOT],
        stdout=subprocess.PIPE,
        text=True,
        env=worker_env(),
    )
    assert p.stdout is not None
    assert "listening" in p.stdout.readline()
    return p


async def test_sigterm_graceful_shutdown_and_restart(sock_path: str) -> None:
    p = serve(sock_path)
    async with Client(sock_path) as c:
        sub = await c.subscribe("#")
        p.send_signal(signal.SIGTERM)
        with pytest.raises(BrokenResourceError, match="goodbye"):
            await sub.get(timeout=5)
    out, _ = await asyncio.to_thread(p.communicate, timeout=10)
    assert p.returncode == 0
    assert "broker stopped" in out
    assert not os.path.exists(sock_path)
    p2 = serve(sock_path)  # an immediate restart works
    p2.send_signal(signal.SIGTERM)
    await asyncio.to_thread(p2.communicate, timeout=10)
    assert p2.returncode == 0


async def test_restart_after_kill_with_stale_socket_and_reconnect(sock_path: str) -> None:
    p = serve(sock_path)
    async with Client(sock_path, reconnect=True, reconnect_delay=0.05) as c:
        sub = await c.subscribe("events.#")
        p.kill()
        await asyncio.to_thread(p.communicate)
        assert os.path.exists(sock_path)  # a stale socket stays behind
        p2 = serve(sock_path)  # reclaimed
        try:
            for _ in range(200):
                if c.is_connected and c.statistics().reconnects == 1:
                    break
                await asyncio.sleep(0.02)
            assert c.statistics().reconnects == 1
            await c.flush()  # re-subscribed before the round trip completes
            await c.publish(ANOMALY, proc(11))
            event = await sub.get(timeout=3)
            assert pid_of(event) == 11
            assert event.sequence == 1  # a new session numbers from 1 again
        finally:
            p2.send_signal(signal.SIGTERM)
            await asyncio.to_thread(p2.communicate, timeout=10)


async def test_close_after_a_burst_the_socket_has_not_taken(broker: Broker, sock_path: str) -> None:
    """close() waits for the write buffer to drain; once the transport has closed
    itself it must not be aborted as well (asyncio's transport has no loop then)."""
    n = 40_000
    async with Client(sock_path, component=PROCMOND, max_buffer_bytes=64 << 20) as pub:
        for i in range(n):
            pub.publish_nowait(LIFECYCLE, proc(i, "n" * 200))
        transport = pub._pump.transport if pub._pump else None
        assert transport is not None
        assert transport.get_write_buffer_size() > 0  # the kernel has not taken it all
    for _ in range(100):
        if broker.statistics().published == n:
            break
        await asyncio.sleep(0.05)
    assert peer_published(broker.statistics()) == n
