"""Helpers of the NATS bridge's tests: configurations, waiting, reading the stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg
from nats.js import api as js_api
from nats.js.errors import NotFoundError
from nats_server import import_nats

from daemoneye.eventbus.v1 import events_pb2
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationMetadata
from daemoneye_eventbus.bridge.config import BridgeConfig, NatsOptions

#: How long a test waits for a condition before it fails: long enough for a
#: loaded CI machine. Nothing is asserted on how long it took.
DEADLINE = 60.0

HOST = "web-01"
STREAM = "DAEMONEYE_EVENTS"


def bridge_config(spool_dir: Path, sock_path: str, url: str, **changes: Any) -> BridgeConfig:
    """A bridge of host ``web-01`` on the broker at ``sock_path`` and the NATS server at ``url``."""
    values: dict[str, Any] = {
        "host_id": HOST,
        "spool_path": str(spool_dir / "bridge.spool"),
        "broker_address": sock_path,
        "nats": NatsOptions(servers=(url,), connect_timeout=1.0),
        "ack_timeout": 2.0,
    }
    values.update(changes)
    return BridgeConfig(**values)


async def until(predicate: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    """Wait until ``predicate()`` holds; fail naming ``what`` after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def process_event(pid: int) -> events_pb2.ProcessEvent:
    return events_pb2.ProcessEvent(pid=pid, name=f"proc-{pid}")


async def read_stream(url: str, subject: str = f"daemoneye.{HOST}.events.>") -> list[Msg]:
    """Every message the stream holds on ``subject``, in stream order (an
    ephemeral pull consumer that acknowledges nothing)."""
    nats = import_nats()
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        info = await js.stream_info(STREAM)
        total = info.state.messages
        sub = await js.pull_subscribe(
            subject,
            stream=STREAM,
            config=js_api.ConsumerConfig(
                ack_policy=js_api.AckPolicy.NONE,
                deliver_policy=js_api.DeliverPolicy.ALL,
                inactive_threshold=60.0,
            ),
        )
        out: list[Msg] = []
        empty = 0
        while len(out) < total and empty < 3:
            try:
                batch = await sub.fetch(1000, timeout=2.0)
            except TimeoutError:
                empty += 1
                continue
            out.extend(batch)
        await sub.unsubscribe()
        return out
    finally:
        await nc.close()


async def stream_info(url: str) -> js_api.StreamInfo:
    """The bridge's stream, once it exists (the bridge creates it once connected)."""
    nats = import_nats()
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        end = time.monotonic() + DEADLINE
        while True:
            try:
                info: js_api.StreamInfo = await js.stream_info(STREAM)
                return info
            except NotFoundError:
                if time.monotonic() > end:
                    raise
                await asyncio.sleep(0.05)
    finally:
        await nc.close()


def full_meta() -> CorrelationMetadata:
    """Correlation metadata with every field set, and text that needs encoding."""
    meta = CorrelationMetadata(
        correlation_id="scan 42%\n",
        root_correlation_id="root/1",
        parent_correlation_id="parent:é",
        workflow_stage="triage 🚨",
        sequence_number=7,
    )
    meta.created_at.FromJsonString("2024-05-06T07:08:09.123Z")
    meta.tags.update({"zone": "eu west", "b": "1", "a": "2"})
    return meta
