"""Presence events and last wills, against a real broker.

The agent subscribes to ``control.presence``; collectors come and go: a clean
close (goodbye), a process killed with SIGKILL (connection lost: its will is
published), a peer that stops answering (heartbeat timeout), one the broker
refuses for a protocol violation. Raw peers (tests/rawpeer.py) send what a
normal client never does: a Hello with a will it may not publish, a second
Hello.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from dataclasses import replace
from typing import Any

import pytest
from conftest import AGENT, PROCMOND, TEST_CONFIG, WORKERS, worker_env
from rawpeer import RawPeer, describe, hello, kind

from daemoneye.eventbus.v1 import control_pb2, frames_pb2, registry
from daemoneye.eventbus.v1.control_pb2 import DisconnectReason, PresenceEvent, PresenceState
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationMetadata
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode, Frame
from daemoneye_eventbus.access import BROKER_COMPONENT, PeerCredentials, Policy
from daemoneye_eventbus.broker import Broker
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.delivery import ReceivedEvent
from daemoneye_eventbus.errors import (
    AccessDenied,
    LimitExceeded,
    PolicyError,
    RequestTimeout,
)
from daemoneye_eventbus.protocol import build_publish
from daemoneye_eventbus.subscription import Subscription

EC = ErrorCode
PRESENCE = registry.CONTROL_PRESENCE
STATUS = registry.CONTROL_HEALTH_STATUS
CONNECTED = PresenceState.PRESENCE_STATE_CONNECTED
DISCONNECTED = PresenceState.PRESENCE_STATE_DISCONNECTED


def unhealthy(component: str) -> control_pb2.ComponentStatus:
    return control_pb2.ComponentStatus(
        component_id=component, state=control_pb2.HEALTH_STATE_UNHEALTHY, message="gone"
    )


async def next_presence(
    sub: Subscription[PresenceEvent], session: str, timeout: float = 10
) -> tuple[ReceivedEvent[PresenceEvent], PresenceEvent]:
    """The next presence event of ``session`` (others are skipped)."""
    async with asyncio.timeout(timeout):
        while True:
            event = await sub.get()
            presence = event.message()
            if presence.session_id == session:
                return event, presence


def raw_hello(component: str, will: frames_pb2.Publish | None = None) -> Frame:
    frame = hello("raw", component)
    if will is not None:
        frame.hello.last_will.CopyFrom(will)
    return frame


# -- presence of clients that come and go -------------------------------------------------------


async def test_a_clean_close_is_a_goodbye_and_publishes_no_will(
    broker: Broker, sock_path: str
) -> None:
    will = STATUS(unhealthy("procmond-1"))
    async with (
        Client(sock_path, name="agent", component=AGENT) as agent,
        await agent.subscribe(PRESENCE) as presence,
        await agent.subscribe(STATUS) as statuses,
    ):
        collector = Client(sock_path, name="procmond-1", component=PROCMOND, last_will=will)
        await collector.connect()
        session = collector.session_id
        event, up = await next_presence(presence, session)
        assert (up.state, up.component, up.client_name) == (CONNECTED, PROCMOND, "procmond-1")
        assert (up.peer_pid, up.peer_uid, up.peer_sid) == (os.getpid(), os.getuid(), "")
        assert up.reason == DisconnectReason.DISCONNECT_REASON_UNSPECIFIED
        assert up.connected_at.ToNanoseconds() <= event.received_at_ns
        assert not event.retained
        await collector.close()
        _, down = await next_presence(presence, session)
        assert down.state == DISCONNECTED
        assert down.reason == DisconnectReason.DISCONNECT_REASON_GOODBYE
        assert (down.last_will_published, down.error) == (False, EC.ERROR_CODE_UNSPECIFIED)
        assert down.connected_at == up.connected_at
        await agent.flush()
        with pytest.raises(RequestTimeout):
            await statuses.get(timeout=0.3)
    assert broker.last_wills == 0


async def _worker(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, str(WORKERS), *args, stdout=asyncio.subprocess.PIPE, env=worker_env()
    )


async def _ready(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 20)
    assert line, "the worker ended early"
    ready: dict[str, Any] = json.loads(line)
    assert ready["ready"]
    return ready


async def test_a_killed_collector_leaves_its_will_then_its_presence(
    broker: Broker, sock_path: str
) -> None:
    async with (
        Client(sock_path, name="agent", component=AGENT) as agent,
        await agent.subscribe(PRESENCE) as presence,
        await agent.subscribe(STATUS) as statuses,
    ):
        proc = await _worker("linger", "--socket", sock_path, "--component", PROCMOND)
        try:
            ready = await _ready(proc)
            _, up = await next_presence(presence, ready["session"])
            assert (up.state, up.peer_pid, up.client_name) == (
                CONNECTED,
                ready["pid"],
                f"lingering-{PROCMOND}",
            )
            proc.send_signal(signal.SIGKILL)  # no goodbye, no close: the kernel ends it
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        will = await statuses.get(timeout=10)
        gone, down = await next_presence(presence, ready["session"])
    assert will.message() == unhealthy(PROCMOND)
    assert not will.retained
    assert will.event_id < gone.event_id  # the will first, then the presence
    assert down.state == DISCONNECTED
    assert down.reason == DisconnectReason.DISCONNECT_REASON_CONNECTION_LOST
    assert down.last_will_published
    assert down.peer_pid == ready["pid"]
    assert broker.last_wills == 1
    metrics = broker.metrics_registry()
    assert metrics.get_sample_value("daemoneye_eventbus_last_wills_published_total") == 1
    # The will is on a retained topic: whoever looks later sees the collector's last word.
    async with Client(sock_path) as anonymous, await anonymous.subscribe(STATUS) as late:
        event = await late.get(timeout=5)
        assert (event.retained, event.event_id) == (True, will.event_id)
        assert event.message() == unhealthy(PROCMOND)


async def test_a_silent_peer_times_out_and_its_will_is_published(sock_path: str) -> None:
    config = replace(TEST_CONFIG, heartbeat_interval=0.1, idle_timeout=0.5)
    will = build_publish(STATUS, unhealthy("quiet"))
    async with (
        Broker(sock_path, config) as broker,
        Client(sock_path, component=AGENT) as agent,
        await agent.subscribe(PRESENCE) as presence,
        await agent.subscribe(STATUS) as statuses,
        await RawPeer.connect(sock_path, handshake=False) as peer,
    ):
        await peer.send(raw_hello(PROCMOND, will))
        welcome = await peer.expect("welcome")
        session = welcome.welcome.session_id
        await next_presence(presence, session)
        # The peer answers no ping and sends nothing: the broker gives up on it.
        frames = await peer.until_eof(5)
        assert kind(frames[-1]) == "error", describe(frames)
        assert frames[-1].error.code == EC.ERROR_CODE_IDLE_TIMEOUT
        _, down = await next_presence(presence, session)
        assert down.reason == DisconnectReason.DISCONNECT_REASON_HEARTBEAT_TIMEOUT
        assert down.error == EC.ERROR_CODE_IDLE_TIMEOUT
        assert "silent" in down.detail
        assert down.last_will_published
        assert (await statuses.get(timeout=5)).message() == unhealthy("quiet")
        assert broker.last_wills == 1


async def test_a_refused_peer_says_why_and_its_will_is_published(
    broker: Broker, sock_path: str
) -> None:
    will = build_publish(STATUS, unhealthy("rude"))
    async with (
        Client(sock_path, component=AGENT) as agent,
        await agent.subscribe(PRESENCE) as presence,
        await RawPeer.connect(sock_path, handshake=False) as peer,
    ):
        await peer.send(raw_hello("", will))  # anonymous: control.health.status is public
        session = (await peer.expect("welcome")).welcome.session_id
        await next_presence(presence, session)
        await peer.send(hello())  # a second Hello: a protocol violation
        await peer.expect_fatal(EC.ERROR_CODE_UNEXPECTED_FRAME)
        _, down = await next_presence(presence, session)
    assert down.reason == DisconnectReason.DISCONNECT_REASON_REFUSED
    assert down.error == EC.ERROR_CODE_UNEXPECTED_FRAME
    assert (down.component, down.last_will_published) == ("", True)


async def test_no_presence_for_a_refused_handshake(broker: Broker, sock_path: str) -> None:
    async with (
        Client(sock_path, component=AGENT) as agent,
        await agent.subscribe(PRESENCE) as presence,
    ):
        with pytest.raises(AccessDenied):
            await Client(sock_path, component="no-such-component").connect()
        await agent.flush()
        with pytest.raises(RequestTimeout):
            await presence.get(timeout=0.3)


async def test_no_will_at_broker_shutdown(sock_path: str) -> None:
    broker = Broker(sock_path, TEST_CONFIG)
    await broker.start()
    collector = Client(sock_path, component=PROCMOND, last_will=STATUS(unhealthy("x")))
    await collector.connect()
    await broker.close()
    assert broker.last_wills == 0
    stats = broker.statistics()
    labels = dict(stats.topic_stats)
    assert STATUS.name not in labels
    assert labels[PRESENCE.name].published == 2  # connected, then disconnected (shutdown)
    await collector.close()


async def test_an_in_process_session_has_no_presence(broker: Broker, sock_path: str) -> None:
    async with (
        Client(sock_path, component=AGENT) as agent,
        await agent.subscribe(PRESENCE) as presence,
    ):
        local = broker.local_session("embedded", PROCMOND)
        await local.close()
        await agent.flush()
        with pytest.raises(RequestTimeout):
            await presence.get(timeout=0.3)


# -- who reads presence, who may claim the broker's name -------------------------------------------


async def test_only_the_agent_reads_presence(broker: Broker, sock_path: str) -> None:
    async with (
        Client(sock_path) as anonymous,
        Client(sock_path, component=PROCMOND) as collector,
    ):
        for client in (anonymous, collector):
            with pytest.raises(AccessDenied):
                await client.subscribe(PRESENCE)
        everything = await anonymous.subscribe("#", include_control=True)
        async with Client(sock_path, component=AGENT) as agent:
            await agent.publish(STATUS, unhealthy("marker"))  # public: it does arrive
            await agent.flush()
        event = await everything.get(timeout=5)
        assert event.topic == STATUS.name  # not the agent's CONNECTED presence before it
        await anonymous.flush()
        with pytest.raises(RequestTimeout):  # nor its DISCONNECTED after it
            await everything.get(timeout=0.3)


async def test_no_peer_may_claim_the_brokers_component(
    broker: Broker, sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "daemoneye_eventbus.audit")
    async with await RawPeer.connect(sock_path, handshake=False) as peer:
        await peer.send(hello("impostor", BROKER_COMPONENT))
        error = await peer.expect_fatal(EC.ERROR_CODE_ACCESS_DENIED)
        assert "reserved" in error.error.message
    with pytest.raises(AccessDenied, match="reserved"):
        await Client(sock_path, component=BROKER_COMPONENT).connect()
    audit = [r.getMessage() for r in caplog.records if "handshake_refused" in r.getMessage()]
    assert len(audit) == 2
    assert f"claimed={BROKER_COMPONENT}" in audit[0]
    # Under every policy, and no policy may name it.
    root = PeerCredentials(1, 0, 0)
    with pytest.raises(AccessDenied):
        Policy.default(0).authenticate(root, BROKER_COMPONENT)
    with pytest.raises(PolicyError, match="broker's own component"):
        Policy.from_mapping({"components": {BROKER_COMPONENT: {"uids": [0]}}})


# -- wills checked at the handshake --------------------------------------------------------------


async def test_a_will_the_component_may_not_publish_refuses_the_handshake(
    broker: Broker, sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "daemoneye_eventbus.audit")
    config = registry.CONTROL_COLLECTOR_CONFIG(control_pb2.ConfigurationUpdate(config_version=1))
    with pytest.raises(AccessDenied, match="last will refused"):
        await Client(sock_path, component=PROCMOND, last_will=config).connect()
    (line,) = [r.getMessage() for r in caplog.records if "handshake_refused" in r.getMessage()]
    assert "last will refused" in line
    assert broker.tally.handshake_failures == 1
    # The agent may publish it: its handshake goes through.
    async with Client(sock_path, component=AGENT, last_will=config) as agent:
        await agent.flush()


@pytest.mark.parametrize(
    ("will", "code"),
    [
        (  # another payload type than the topic's
            frames_pb2.Publish(
                topic=STATUS.name,
                payload_type="daemoneye.eventbus.v1.ProcessEvent",
                payload=b"",
            ),
            EC.ERROR_CODE_PAYLOAD_MISMATCH,
        ),
        (  # a payload that does not parse
            frames_pb2.Publish(
                topic=STATUS.name, payload_type=STATUS.payload_name, payload=b"\xff"
            ),
            EC.ERROR_CODE_INVALID_PAYLOAD,
        ),
        (  # not declared
            frames_pb2.Publish(topic="no.such.topic", payload_type=STATUS.payload_name),
            EC.ERROR_CODE_INVALID_TOPIC,
        ),
        (  # not a topic at all
            frames_pb2.Publish(topic="a..b", payload_type=STATUS.payload_name),
            EC.ERROR_CODE_INVALID_TOPIC,
        ),
        (  # a request topic: a will is an event
            build_publish(
                registry.CONTROL_COLLECTOR_RPC_HEALTH.build(id="c1"),
                control_pb2.HealthCheckRequest(),
            ),
            EC.ERROR_CODE_INVALID_TOPIC,
        ),
        (  # the broker's own topic
            build_publish(PRESENCE, PresenceEvent()),
            EC.ERROR_CODE_ACCESS_DENIED,
        ),
        (  # correlation metadata out of bounds
            frames_pb2.Publish(
                topic=STATUS.name,
                payload_type=STATUS.payload_name,
                correlation=CorrelationMetadata(correlation_id="", root_correlation_id="r"),
            ),
            EC.ERROR_CODE_INVALID_CORRELATION,
        ),
    ],
    ids=["payload-type", "payload", "undeclared", "malformed", "request-topic", "presence", "corr"],
)
async def test_a_will_that_is_not_a_valid_publish_refuses_the_handshake(
    broker: Broker, sock_path: str, will: frames_pb2.Publish, code: ErrorCode.ValueType
) -> None:
    async with await RawPeer.connect(sock_path, handshake=False) as peer:
        await peer.send(raw_hello(AGENT, will))
        error = await peer.expect_fatal(code)
        assert "last will refused" in error.error.message
    assert broker.tally.refusals == {code: 1}


def test_a_will_too_large_for_the_handshake_fails_in_the_client() -> None:
    big = STATUS(control_pb2.ComponentStatus(message="x" * 5000))
    with pytest.raises(LimitExceeded, match="4096"):
        Client("/nonexistent", component=PROCMOND, last_will=big)
