"""The bridge's Prometheus metrics (daemoneye_eventbus.bridge.metrics).

A real broker on a Unix socket, a real bridge in the same loop, a real
``nats-server -js`` (or none, on a port nothing listens on); the registry
scraped with ``generate_latest`` on the loop's thread and from another
thread, as an HTTP server would, and parsed with ``prometheus_client``'s own
parser.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from conftest import PROCMOND, TEST_CONFIG
from nats_server import NatsServer, free_port
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from daemoneye.eventbus.v1 import events_pb2, registry
from daemoneye_eventbus.bridge.config import BridgeConfig, NatsOptions
from daemoneye_eventbus.bridge.metrics import COUNTERS, GAUGES, QUANTILES, bridge_registry
from daemoneye_eventbus.bridge.runner import Bridge
from daemoneye_eventbus.bridge.stats import BridgeStatistics
from daemoneye_eventbus.broker import Broker
from daemoneye_eventbus.client import Client

NS = "daemoneye_bridge"
#: Generous: a loaded CI machine; the helpers poll, they never assert on time.
DEADLINE = 30.0


def families(text: str) -> dict[str, tuple[str, list[Sample]]]:
    """Each family of a scrape by name: its type and samples."""
    return {f.name: (f.type, f.samples) for f in text_string_to_metric_families(text)}


def one(found: dict[str, tuple[str, list[Sample]]], family: str, **labels: str) -> float:
    """The value of the one sample of ``family`` with ``labels`` (``_total`` for a counter)."""
    kind, samples = found[family]
    name = f"{family}_total" if kind == "counter" else family
    (value,) = [s.value for s in samples if s.name == name and s.labels == labels]
    return value


def scrape_here(bridge: Bridge) -> dict[str, tuple[str, list[Sample]]]:
    return families(generate_latest(bridge_registry(bridge)).decode())


async def scrape_from_a_thread(bridge: Bridge) -> dict[str, tuple[str, list[Sample]]]:
    """Scrape as an HTTP server's thread would, while this loop keeps running."""
    text = await asyncio.to_thread(generate_latest, bridge_registry(bridge))
    return families(text.decode())


async def until(check: Callable[[], bool], what: str) -> None:
    """Poll ``check`` until it holds; fail (saying ``what``) after a generous deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"still not {what} after {DEADLINE} s")
        await asyncio.sleep(0.05)


def config(sock_path: str, tmp_path: Path, url: str) -> BridgeConfig:
    return BridgeConfig(
        host_id="web-01",
        spool_path=str(tmp_path / "bridge.spool"),
        broker_address=sock_path,
        nats=NatsOptions(servers=(url,)),
    )


async def publish(sock_path: str, count: int) -> None:
    async with Client(sock_path, component=PROCMOND) as procmond:
        for pid in range(count):
            await procmond.publish(
                registry.EVENTS_PROCESS_LIFECYCLE, events_pb2.ProcessEvent(pid=pid)
            )
        await procmond.flush()


@pytest.fixture
async def broker(sock_path: str) -> AsyncIterator[Broker]:
    async with Broker(sock_path, TEST_CONFIG) as b:
        yield b


def assert_the_families(found: dict[str, tuple[str, list[Sample]]]) -> None:
    """Every family is there, with its type and HELP, and no labels but the quantile."""
    for field, _ in COUNTERS:
        assert found[f"{NS}_{field}"][0] == "counter", field
    for field, _ in GAUGES:
        assert found[f"{NS}_{field}"][0] == "gauge", field
    kind, samples = found[f"{NS}_forward_latency_seconds"]
    assert kind == "gauge"
    assert sorted(s.labels["quantile"] for s in samples) == sorted(str(q) for q in QUANTILES)
    ours = {name for name in found if name.startswith(NS) and "_process_" not in name}
    assert ours == {
        *(f"{NS}_{field}" for field, _ in (*COUNTERS, *GAUGES)),
        f"{NS}_forward_latency_seconds",
    }
    for name in ours - {f"{NS}_forward_latency_seconds"}:
        assert all(not s.labels for s in found[name][1]), name
    # The process of the bridge, namespaced so that it never clashes with an agent's.
    assert one(found, f"{NS}_process_resident_memory_bytes") > 0


async def test_the_families_after_events_forwarded(
    broker: Broker, sock_path: str, tmp_path: Path, nats_server: NatsServer
) -> None:
    async with Bridge(config(sock_path, tmp_path, nats_server.url)) as bridge:
        await publish(sock_path, 50)

        def all_acknowledged() -> bool:
            stats = bridge.statistics()
            return stats.acknowledged == 50 and stats.spool_depth == 0

        await until(all_acknowledged, "50 events acknowledged by JetStream")
        here = scrape_here(bridge)
        there = await scrape_from_a_thread(bridge)
    for found in (here, there):
        assert_the_families(found)
        for field in ("received", "spooled", "forwarded", "acknowledged"):
            assert one(found, f"{NS}_{field}") == 50, field
        for field in (
            "missed",
            "unforwardable",
            "duplicates",
            "resent",
            "spool_dropped",
            "disconnects",
            "inbound_received",
            "inbound_published",
            "inbound_refused",
            "requests_answered",
            "requests_failed",
        ):
            assert one(found, f"{NS}_{field}") == 0, field
        assert one(found, f"{NS}_spool_depth") == 0
        assert one(found, f"{NS}_spool_bytes") == 0
        assert one(found, f"{NS}_in_flight") == 0
        assert one(found, f"{NS}_link_up") == 1
        p50 = one(found, f"{NS}_forward_latency_seconds", quantile="0.5")
        p99 = one(found, f"{NS}_forward_latency_seconds", quantile="0.99")
        assert 0 <= p50 <= p99 < math.inf


async def test_without_nats_the_link_is_down_and_the_spool_grows(
    broker: Broker, sock_path: str, tmp_path: Path
) -> None:
    nowhere = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    bridge = Bridge(config(sock_path, tmp_path, nowhere))
    registry_ = bridge_registry(bridge)
    # Before the bridge starts: every family, at zero, no latency yet.
    before = families(generate_latest(registry_).decode())
    assert_the_families(before)
    assert one(before, f"{NS}_link_up") == 0
    assert one(before, f"{NS}_spool_depth") == 0
    assert math.isnan(one(before, f"{NS}_forward_latency_seconds", quantile="0.99"))
    async with bridge:
        await publish(sock_path, 20)
        await until(lambda: bridge.statistics().spool_depth == 20, "20 events in the spool")
        found = families((await asyncio.to_thread(generate_latest, registry_)).decode())
        await publish(sock_path, 5)
        await until(lambda: bridge.statistics().spool_depth == 25, "25 events in the spool")
        later = families(generate_latest(registry_).decode())
    assert_the_families(found)
    assert one(found, f"{NS}_link_up") == 0
    assert one(found, f"{NS}_received") == 20
    assert one(found, f"{NS}_spooled") == 20
    assert one(found, f"{NS}_spool_depth") == 20
    assert one(found, f"{NS}_spool_bytes") > 0
    assert one(found, f"{NS}_forwarded") == 0
    assert one(found, f"{NS}_acknowledged") == 0
    assert one(found, f"{NS}_in_flight") == 0
    for quantile in QUANTILES:
        assert math.isnan(one(found, f"{NS}_forward_latency_seconds", quantile=str(quantile)))
    assert one(later, f"{NS}_spool_depth") == 25
    assert one(later, f"{NS}_spool_bytes") > one(found, f"{NS}_spool_bytes")
    assert one(later, f"{NS}_link_up") == 0


class WhereRead(Bridge):
    """A real bridge that notes the thread each statistics() call runs on."""

    threads: list[int]

    def statistics(self) -> BridgeStatistics:
        self.threads.append(threading.get_ident())
        return super().statistics()


async def test_a_scrape_from_another_thread_reads_on_the_bridges_loop(
    broker: Broker, sock_path: str, tmp_path: Path
) -> None:
    bridge = WhereRead(config(sock_path, tmp_path, f"nats://127.0.0.1:{free_port()}"))
    bridge.threads = []
    registry_ = bridge_registry(bridge)
    async with bridge:
        assert bridge.loop is asyncio.get_running_loop()
        await asyncio.to_thread(generate_latest, registry_)
        generate_latest(registry_)
    assert bridge.threads == [threading.get_ident()] * 2
    # A closed bridge is still scraped (an agent's endpoint may outlive it).
    after = families((await asyncio.to_thread(generate_latest, registry_)).decode())
    assert one(after, f"{NS}_link_up") == 0
    assert bridge.threads == [threading.get_ident()] * 3
