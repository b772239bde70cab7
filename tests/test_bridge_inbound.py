"""The bridge's inbound control against a real nats-server: what the fleet may send to a host."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from bridge_helpers import HOST, bridge_config, until
from conftest import PROCMOND, TEST_CONFIG
from nats.aio.client import Client as NatsClient
from nats_server import NatsServer, import_nats

from daemoneye.eventbus.v1 import control_pb2, registry
from daemoneye_eventbus.access import Policy
from daemoneye_eventbus.bridge import headers as h
from daemoneye_eventbus.bridge.inbound_check import TIMEOUT_MS
from daemoneye_eventbus.bridge.runner import Bridge
from daemoneye_eventbus.broker import Broker
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.correlation import new_correlation

ME = os.getuid()
CONFIG_TOPIC = registry.CONTROL_COLLECTOR_CONFIG
HEALTH = registry.CONTROL_HEALTH_STATUS

#: The bridge is privileged: the fleet may send it privileged control topics.
PRIVILEGED_BRIDGE = Policy.from_mapping(
    {
        "components": {
            "bridge": {"uids": [ME], "privileged": True},
            "daemoneye-agent": {"uids": [ME], "privileged": True},
            "procmond": {"uids": [ME]},
        }
    },
    source="test",
)


@pytest.fixture
async def fleet(nats_server: NatsServer) -> AsyncIterator[NatsClient]:
    """The centre of the fleet: a NATS connection that sends control messages."""
    nats = import_nats()
    nc = await nats.connect(nats_server.url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        yield nc
    finally:
        await nc.close()


def update(version: int) -> control_pb2.ConfigurationUpdate:
    return control_pb2.ConfigurationUpdate(collector_id="procmond-1", config_version=version)


async def inbound_bridge(tmp_path: Path, sock_path: str, url: str) -> Bridge:
    bridge = Bridge(bridge_config(tmp_path, sock_path, url, control=True))
    await bridge.start()
    await until(lambda: bridge.link_up, "the link to NATS")
    return bridge


async def subscribed(bridge: Bridge, fleet: NatsClient) -> None:
    """Wait until the bridge's control subscriptions reached the server."""
    # A request on a subject nobody serves fails at once with no responders;
    # once the bridge listens, it answers (here: refused, a non-control topic).
    nats = import_nats()
    while True:
        try:
            await fleet.request(f"daemoneye.{HOST}.control.nothing", b"", timeout=5)
            return
        except nats.errors.NoRespondersError:
            await asyncio.sleep(0.02)


async def test_control_for_this_host_and_for_all_is_published_locally(
    sock_path: str, tmp_path: Path, nats_server: NatsServer, fleet: NatsClient
) -> None:
    config = dataclasses.replace(TEST_CONFIG, policy=PRIVILEGED_BRIDGE)
    async with Broker(sock_path, config), Client(sock_path, component=PROCMOND) as procmond:
        received = await procmond.subscribe(CONFIG_TOPIC)
        bridge = await inbound_bridge(tmp_path, sock_path, nats_server.url)
        try:
            await subscribed(bridge, fleet)
            correlation = new_correlation("fleet-change-7")
            headers = {
                h.PAYLOAD_TYPE: CONFIG_TOPIC.payload_name,
                **h.correlation_headers(correlation),
            }
            answer = await fleet.request(
                f"daemoneye.{HOST}.control.collector.config",
                update(1).SerializeToString(),
                timeout=10,
                headers=headers,
            )
            assert answer.headers is not None
            assert answer.headers[h.STATUS] == "published"
            event = await received.get(timeout=10)
            assert (event.topic, event.message().config_version) == (CONFIG_TOPIC.name, 1)
            assert event.correlation == correlation
            # For every host: published here too; a plain publish needs no answer.
            await fleet.publish(
                "daemoneye.all.control.collector.config", update(2).SerializeToString()
            )
            # For another host: not this bridge's (it does not even subscribe).
            await fleet.publish(
                "daemoneye.db-02.control.collector.config", update(3).SerializeToString()
            )
            await fleet.publish(
                f"daemoneye.{HOST}.control.collector.config", update(4).SerializeToString()
            )
            versions = [(await received.get(timeout=10)).message().config_version for _ in range(2)]
            assert versions == [2, 4]
            await until(lambda: bridge.statistics().inbound_published == 3, "three published")
            stats = bridge.statistics()
            # The probe of `subscribed` (an undeclared topic) was refused, nothing else.
            assert stats.inbound_received == stats.inbound_published + stats.inbound_refused
        finally:
            await bridge.close()
        with pytest.raises(TimeoutError):
            await received.get(timeout=0.3)


async def test_privileged_control_is_refused_without_the_policy_and_audited(
    broker: Broker,
    sock_path: str,
    tmp_path: Path,
    nats_server: NatsServer,
    fleet: NatsClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The default policy: the bridge may connect as itself but is not privileged.
    async with Client(sock_path, component=PROCMOND) as procmond:
        received = await procmond.subscribe(CONFIG_TOPIC)
        health = await procmond.subscribe(HEALTH)
        bridge = await inbound_bridge(tmp_path, sock_path, nats_server.url)
        try:
            await subscribed(bridge, fleet)
            refused_before = bridge.statistics().inbound_refused
            with caplog.at_level(logging.WARNING, logger="daemoneye_eventbus.audit"):
                answer = await fleet.request(
                    f"daemoneye.{HOST}.control.collector.config",
                    update(1).SerializeToString(),
                    timeout=10,
                )
            assert answer.headers is not None
            assert answer.headers[h.STATUS] == "refused"
            assert answer.headers[h.ERROR] == "ACCESS_DENIED"
            assert "privileged" in h.decode_value(h.ERROR_MESSAGE, answer.headers[h.ERROR_MESSAGE])
            audit = [r for r in caplog.records if "bridge_inbound_refused" in r.getMessage()]
            assert audit, "the refusal is audit-logged"
            assert "refused_by=broker" in audit[-1].getMessage()
            assert bridge.statistics().inbound_refused == refused_before + 1
            # A public control topic needs no privilege.
            answer = await fleet.request(
                f"daemoneye.{HOST}.control.health.status",
                control_pb2.ComponentStatus(component_id="fleet").SerializeToString(),
                timeout=10,
            )
            assert answer.headers is not None
            assert answer.headers[h.STATUS] == "published"
            assert (await health.get(timeout=10)).message().component_id == "fleet"
            # Topics the schema does not let the bridge publish are refused by the
            # bridge itself; so are payloads that do not parse.
            for subject, payload, code in (
                (f"daemoneye.{HOST}.control.collector.registration", b"", "ACCESS_DENIED"),
                (f"daemoneye.{HOST}.control.presence", b"", "ACCESS_DENIED"),
                (f"daemoneye.{HOST}.control.health.status", b"\xff\xff\xff", "INVALID_PAYLOAD"),
            ):
                with caplog.at_level(logging.WARNING, logger="daemoneye_eventbus.audit"):
                    answer = await fleet.request(subject, payload, timeout=10)
                assert answer.headers is not None
                assert (answer.headers[h.STATUS], answer.headers[h.ERROR]) == ("refused", code)
                assert "refused_by=bridge" in caplog.records[-1].getMessage()
        finally:
            await bridge.close()
        with pytest.raises(TimeoutError):
            await received.get(timeout=0.3)


async def test_a_fleet_request_is_answered_by_a_local_collector(
    sock_path: str, tmp_path: Path, nats_server: NatsServer, fleet: NatsClient
) -> None:
    config = dataclasses.replace(TEST_CONFIG, policy=PRIVILEGED_BRIDGE)
    health = registry.control_collector_rpc_health(id="procmond-1")
    async with (
        Broker(sock_path, config),
        Client(sock_path, component=PROCMOND) as procmond,
        procmond.serve(health) as requests,
    ):

        async def answer() -> None:
            async for request in requests:
                await request.reply(
                    control_pb2.HealthCheckReply(error=f"asked for {request.message.component_id}")
                )

        serving = asyncio.ensure_future(answer())
        bridge = await inbound_bridge(tmp_path, sock_path, nats_server.url)
        try:
            await subscribed(bridge, fleet)
            reply = await fleet.request(
                f"daemoneye.{HOST}.control.collector.rpc.health.procmond-1",
                control_pb2.HealthCheckRequest(component_id="procmond-1").SerializeToString(),
                timeout=10,
                headers={TIMEOUT_MS: "5000"},
            )
            assert reply.headers is not None
            assert reply.headers[h.STATUS] == "ok"
            assert reply.headers[h.PAYLOAD_TYPE] == "daemoneye.eventbus.v1.HealthCheckReply"
            answered = control_pb2.HealthCheckReply.FromString(reply.data)
            assert answered.error == "asked for procmond-1"
            # Nobody serves procmond-2: the bus says so at once, and so does the bridge.
            reply = await fleet.request(
                f"daemoneye.{HOST}.control.collector.rpc.health.procmond-2",
                control_pb2.HealthCheckRequest(component_id="procmond-1").SerializeToString(),
                timeout=10,
            )
            assert reply.headers is not None
            assert (reply.headers[h.STATUS], reply.headers[h.ERROR]) == ("error", "NO_RESPONDERS")
            # A request topic sent without a reply subject cannot be answered: refused.
            await fleet.publish(
                f"daemoneye.{HOST}.control.collector.rpc.health.procmond-1",
                control_pb2.HealthCheckRequest(component_id="procmond-1").SerializeToString(),
            )
            await until(lambda: bridge.statistics().inbound_refused >= 2, "the refusal")
            stats = bridge.statistics()
            assert (stats.requests_answered, stats.requests_failed) == (1, 1)
        finally:
            await bridge.close()
            serving.cancel()
