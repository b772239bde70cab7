"""Payload validation: the broker refuses what does not parse, subscribers never die on it.

The publisher is a separate process (tests/workers.py ``publish-raw``) that
publishes raw payloads as an authorised ``procmond``; the agent reads through
the reference API over the socket, as it does in production.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys

import pytest
from conftest import AGENT, PROCMOND, TEST_CONFIG, peer_published, worker_cmd, worker_env
from rawpeer import RawPeer
from serving import broker_process

from daemoneye.eventbus.v1 import events_pb2, frames_pb2, registry
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode, Frame
from daemoneye_eventbus.broker import Broker
from daemoneye_eventbus.bus import DaemoneyeEventBus, EventSubscription
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.errors import EventBusError, InvalidPayload, RequestTimeout

LIFECYCLE = registry.EVENTS_PROCESS_LIFECYCLE
PROCESS_EVENT = LIFECYCLE.payload_name
GARBAGE = "ffffffff"  # four 0xff bytes: a varint that never ends


def good(pid: int) -> str:
    return events_pb2.ProcessEvent(pid=pid, name="good").SerializeToString().hex()


async def publish_raw(sock_path: str, *payloads: str) -> dict[str, object]:
    """Publish ``payloads`` (hex) one by one from a separate procmond process."""
    proc = await asyncio.create_subprocess_exec(
        *worker_cmd("publish-raw", "--socket", sock_path, "--topic", LIFECYCLE.name),
        *(arg for payload in payloads for arg in ("--payload", payload)),
        env=worker_env(),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out
    result: dict[str, object] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def test_a_payload_that_does_not_parse_is_refused_and_never_delivered(
    sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with Broker(sock_path, TEST_CONFIG) as broker:
        bus = await DaemoneyeEventBus.connect(sock_path, component=AGENT)
        receiver = await bus.subscribe(EventSubscription("agent", ["events.process.#"]))
        with caplog.at_level(logging.WARNING, logger="daemoneye_eventbus.audit"):
            result = await publish_raw(sock_path, GARBAGE, good(7))
        # The publisher hears why, as the typed error with its code.
        assert result["errors"] == [["InvalidPayload", ErrorCode.ERROR_CODE_INVALID_PAYLOAD]]
        # The agent gets the good event, never the bad one, and goes on.
        event = await receiver.recv(timeout=5)
        assert event.event is not None
        assert event.event.process.pid == 7
        assert event.sequence == 1
        with pytest.raises(RequestTimeout):
            await receiver.recv(timeout=0.2)
        stats = broker.statistics()
        assert stats.invalid_payloads == 1
        assert peer_published(stats) == 1
        per_conn = {c.component: c.invalid_payloads for c in stats.connection_stats}
        assert PROCMOND not in per_conn  # the publisher has gone, its figures with it
        assert any("payload_refused" in r.getMessage() for r in caplog.records)
        await bus.shutdown()


async def test_invalid_payloads_count_per_connection(broker: Broker, sock_path: str) -> None:
    errors: list[EventBusError] = []
    async with Client(sock_path, component=PROCMOND) as pub:
        pub.on_error = errors.append
        await pub.publish_raw(LIFECYCLE.name, PROCESS_EVENT, bytes.fromhex(GARBAGE))
        await pub.publish_raw(LIFECYCLE.name, PROCESS_EVENT, b"\x0a\x05ab")  # truncated
        await pub.flush()
        stats = broker.statistics()
        mine = [c for c in stats.connection_stats if c.session_id == pub.session_id]
        assert mine[0].invalid_payloads == 2
        assert stats.invalid_payloads == 2
        assert [type(e) for e in errors] == [InvalidPayload, InvalidPayload]
        assert all(e.code == ErrorCode.ERROR_CODE_INVALID_PAYLOAD for e in errors)
        assert pub.statistics().refused == 2
        proto = (await pub.broker_statistics()).invalid_payloads
        assert proto == 2


async def test_a_batch_with_one_bad_payload_is_refused_whole(
    broker: Broker, sock_path: str
) -> None:
    async with Client(sock_path, component=AGENT) as agent:
        sub = await agent.subscribe(LIFECYCLE)
        async with await RawPeer.connect(sock_path, component=PROCMOND) as peer:
            payloads = [bytes.fromhex(good(1)), bytes.fromhex(GARBAGE), bytes.fromhex(good(3))]
            batch = frames_pb2.PublishBatch(
                topic=LIFECYCLE.name, payload_type=PROCESS_EVENT, payloads=payloads
            )
            await peer.send(Frame(publish_batch=batch))
            error = await peer.expect("error")
            assert error.error.code == ErrorCode.ERROR_CODE_INVALID_PAYLOAD
            assert not error.error.fatal
            assert "payload 1 of the batch" in error.error.message
            # The connection stays usable: a good event goes through.
            publish = frames_pb2.Publish(
                topic=LIFECYCLE.name,
                payload_type=PROCESS_EVENT,
                payload=bytes.fromhex(good(4)),
            )
            await peer.send(Frame(publish=publish))
            got = await sub.get(timeout=5)
        assert got.message().pid == 4
        assert got.sequence == 1  # nothing of the batch was numbered for anyone
        assert broker.statistics().invalid_payloads == 3


async def test_with_validation_off_the_agent_skips_bad_data_and_goes_on(sock_path: str) -> None:
    config = dataclasses.replace(TEST_CONFIG, validate_payloads=False)
    async with Broker(sock_path, config) as broker:
        bus = await DaemoneyeEventBus.connect(sock_path, component=AGENT)
        skipped: list[InvalidPayload] = []
        receiver = await bus.subscribe(
            EventSubscription("agent", ["events.process.#"], on_invalid=skipped.append)
        )
        async with Client(sock_path, component=AGENT) as raw_reader:
            sub = await raw_reader.subscribe(LIFECYCLE)
            result = await publish_raw(sock_path, GARBAGE, good(8))
            assert result["errors"] == []
            # The reference API: the bad event is skipped, counted and reported.
            got = [await receiver.recv(timeout=5)]
            assert got[0].event is not None
            assert got[0].event.process.pid == 8
            assert receiver.invalid == 1
            assert len(skipped) == 1
            assert skipped[0].topic == LIFECYCLE.name
            assert skipped[0].sequence == 1
            assert skipped[0].payload_type == PROCESS_EVENT
            assert skipped[0].code == ErrorCode.ERROR_CODE_INVALID_PAYLOAD
            # The typed client: messages() skips it the same way.
            pairs = []
            async for event, message in sub.messages():
                pairs.append((event.sequence, message.pid))
                break
            assert pairs == [(2, 8)]
            assert sub.invalid == 1
        assert broker.statistics().invalid_payloads == 0
        await bus.shutdown()


async def test_async_for_over_the_agent_receiver_survives_bad_data(sock_path: str) -> None:
    config = dataclasses.replace(TEST_CONFIG, validate_payloads=False)
    async with Broker(sock_path, config):
        bus = await DaemoneyeEventBus.connect(sock_path, component=AGENT)
        receiver = await bus.subscribe(EventSubscription("agent", ["events.process.#"]))
        await publish_raw(sock_path, good(1), GARBAGE, GARBAGE, good(2))
        pids = []
        async for event in receiver:
            assert event.event is not None
            pids.append(event.event.process.pid)
            if len(pids) == 2:
                break
        assert pids == [1, 2]
        assert receiver.invalid == 2
        await bus.shutdown()


async def test_in_process_publishers_are_validated_unless_trusted(sock_path: str) -> None:
    async with Broker(sock_path, TEST_CONFIG) as broker:
        local = broker.local_session("agent", AGENT)
        with pytest.raises(InvalidPayload) as caught:
            await local.publish_raw(LIFECYCLE.name, PROCESS_EVENT, bytes.fromhex(GARBAGE))
        assert caught.value.code == ErrorCode.ERROR_CODE_INVALID_PAYLOAD
        assert broker.statistics().invalid_payloads == 1
    trusting = dataclasses.replace(TEST_CONFIG, trust_local_payloads=True)
    async with Broker(sock_path, trusting) as broker:
        local = broker.local_session("agent", AGENT)
        await local.publish_raw(LIFECYCLE.name, PROCESS_EVENT, bytes.fromhex(GARBAGE))
        assert broker.statistics().invalid_payloads == 0
        assert broker.statistics().published == 1


async def test_serve_no_validate_payloads_forwards_what_does_not_parse(sock_path: str) -> None:
    """``serve --no-validate-payloads``, end to end: a payload that does not parse
    reaches the subscriber as published, and the publisher hears no refusal."""
    garbage = b"\xff\xff\xff"
    async with (
        broker_process(sock_path, "--no-validate-payloads"),
        Client(sock_path, component=AGENT) as agent,
        Client(sock_path, component=PROCMOND) as procmond,
    ):
        sub = await agent.subscribe(registry.EVENTS_PROCESS_LIFECYCLE)
        topic = registry.EVENTS_PROCESS_LIFECYCLE
        await procmond.publish_raw(topic.name, topic.payload_name, garbage)
        await procmond.flush()
        event = await sub.get(timeout=5)
        assert event.payload == garbage
        assert procmond.statistics().refused == 0
    from daemoneye_eventbus.cli_args import parser

    assert parser().parse_args(["serve"]).no_validate_payloads is False


VALIDATION_MEMORY = """
import os
from daemoneye.eventbus.v1 import events_pb2, frames_pb2, registry
from daemoneye_eventbus.access import Identity, PeerCredentials
from daemoneye_eventbus.config import BrokerConfig
from daemoneye_eventbus.router import Endpoint, Router

class Sink:
    def enqueue(self, *args):
        return True

def rss():
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) * 1024

router = Router(BrokerConfig())
me = Endpoint(Sink(), identity=Identity(PeerCredentials(os.getpid(), 0, 0), "procmond"))
topic = registry.EVENTS_PROCESS_LIFECYCLE
payload = events_pb2.ProcessEvent(pid=1, name="x" * 230).SerializeToString()
batch = frames_pb2.PublishBatch(
    topic=topic.name, payload_type=topic.payload_name, payloads=[payload] * 100
)
for _ in range(20):
    router.route(me, batch)
before = rss()
for _ in range(2000):  # 200,000 payloads parsed
    router.route(me, batch)
print(rss() - before)
"""


@pytest.mark.linux_only("reads /proc/self/status")
async def test_validation_holds_no_memory_per_event() -> None:
    """Each payload is parsed into a new message: a reused one would keep every
    parse in its arena (upb), about 50 MiB per 200,000 events."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        VALIDATION_MEMORY,
        env=worker_env(),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    growth = int(out.decode().strip().splitlines()[-1])
    assert growth < 4 * 1024 * 1024, f"{growth / 2**20:.1f} MiB for 200,000 payloads"
