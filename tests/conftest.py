"""Shared fixtures: real brokers on short temporary socket paths."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats_server import NatsServer, NatsServerProcess, running_nats_server

from daemoneye.eventbus.v1 import events_pb2, frames_pb2
from daemoneye_eventbus.broker import Broker, BrokerConfig, BrokerStatistics
from daemoneye_eventbus.delivery import ReceivedEvent

REPO = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers.py"

#: Components that clients claim (``Client(path, component=...)``). The tests run as
#: root (or as the broker's own user), whom the default policy lets act as any component.
#: The agent subscribes to the collectors' events and publishes the privileged control topics.
AGENT = "daemoneye-agent"
#: The process collector: publishes ``events.process.*`` and receives collector control topics.
PROCMOND = "procmond"

#: Deadlines short enough for tests, long enough for a loaded CI machine.
TEST_CONFIG = BrokerConfig(
    handshake_timeout=1.0,
    heartbeat_interval=0.5,
    idle_timeout=3.0,
    slow_consumer_timeout=1.0,
    drain_timeout=2.0,
)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short private directory: Unix socket paths are limited to ~104 bytes."""
    path = Path(tempfile.mkdtemp(prefix="deb-", dir=None if sys.platform == "win32" else "/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sock_path(sock_dir: Path) -> str:
    """The broker's address: a socket in ``sock_dir``; on Windows a pipe name of its own."""
    if sys.platform == "win32":
        return rf"\\.\pipe\deb-{sock_dir.name}"
    return str(sock_dir / "bus.sock")


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A ``nats-server -js`` of its own (tests/nats_server.py); skipped where the
    binary is missing, except under CI."""
    with running_nats_server(tmp_path / "nats") as server:
        yield server


@pytest.fixture
def nats_server_control(tmp_path: Path) -> Iterator[NatsServerProcess]:
    """A running ``nats-server -js`` that the test may ``kill()`` and ``start()``
    again (same port, same JetStream store); ``.server`` is the running one.
    Whatever runs at the end of the test is stopped, failed or not."""
    with NatsServerProcess(tmp_path / "nats") as process:
        process.start()
        yield process


@pytest.fixture
async def broker(sock_path: str) -> AsyncIterator[Broker]:
    async with Broker(sock_path, TEST_CONFIG) as b:
        yield b


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip the tests marked ``linux_only`` anywhere but on Linux."""
    if sys.platform.startswith("linux"):
        return
    for item in items:
        mark = item.get_closest_marker("linux_only")
        if mark is not None:
            reason = mark.args[0] if mark.args else "Linux only"
            item.add_marker(pytest.mark.skip(reason=f"needs Linux: {reason}"))


def worker_cmd(*args: str) -> list[str]:
    """Command line running tests/workers.py in a separate Python process."""
    return [sys.executable, str(WORKERS), *args]


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), str(REPO / "generated"), env.get("PYTHONPATH", "")]
    )
    return env


#: The broker's own topic: it publishes a presence event there for every
#: connection that completes its handshake, and another when it ends.
PRESENCE_TOPIC = "control.presence"


def peer_published(stats: BrokerStatistics | frames_pb2.StatsResponse | dict[str, Any]) -> int:
    """Events the broker accepted from its peers: its ``published`` figure less the
    presence events it published itself (docs/protocol.md §5, "Presence and last
    will"). ``stats`` is a snapshot, a ``StatsResponse``, or ``stats --json``'s object."""
    if isinstance(stats, dict):
        own = sum(
            int(t["published"]) for t in stats.get("topicStats", ()) if t["topic"] == PRESENCE_TOPIC
        )
        return int(stats["published"]) - own
    if isinstance(stats, BrokerStatistics):
        own = sum(t.published for label, t in stats.topic_stats if label == PRESENCE_TOPIC)
    else:
        own = sum(t.published for t in stats.topic_stats if t.topic == PRESENCE_TOPIC)
    return stats.published - own


def proc(pid: int) -> events_pb2.ProcessEvent:
    """A small process event, told apart by its pid."""
    return events_pb2.ProcessEvent(pid=pid, name=f"p{pid}")


def pid_of(event: ReceivedEvent[Any]) -> int:
    """The pid of a received process event."""
    msg = event.message()
    assert isinstance(msg, events_pb2.ProcessEvent)
    return msg.pid
