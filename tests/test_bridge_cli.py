"""``daemoneye-eventbus bridge``: the command, run as a real process.

Against a broker in its own process (tests/serving.py), a real
``nats-server -js`` (the ``nats_server`` fixture) or none, a publisher on the
bus and a JetStream consumer; the bridge's metrics endpoint is scraped over
HTTP. Helpers that wait for a condition poll with a generous deadline; no
test asserts on time.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from conftest import PROCMOND, worker_env
from nats.js.errors import NotFoundError
from nats_server import NatsServer, free_port
from prometheus_client.parser import text_string_to_metric_families
from serving import broker_process
from test_cli import CLI, PROC_TIMEOUT, Result, finish, run_sync

from daemoneye.eventbus.v1 import events_pb2, registry
from daemoneye_eventbus.bridge.config import DEFAULT_STREAM, BridgeConfig
from daemoneye_eventbus.bridge.spool import Spool
from daemoneye_eventbus.cli_bridge import default_spool_path
from daemoneye_eventbus.client import Client

NS = "daemoneye_bridge"
HOST = "web-01"
#: Generous: a loaded CI machine; helpers poll, they never assert on time.
DEADLINE = 60.0
D = BridgeConfig(host_id=HOST, spool_path="-")


def error_line(result: Result) -> str:
    """The one line on stderr: ``daemoneye-eventbus bridge: error: …``; its text."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result
    prefix = "daemoneye-eventbus bridge: error: "
    assert lines[0].startswith(prefix), result
    return lines[0].removeprefix(prefix)


# -- help ------------------------------------------------------------------------------------

OPTIONS = [
    "--socket",
    "--instance",
    "--host-id",
    "--nats",
    "--forward",
    "--control",
    "--spool",
    "--spool-max-events",
    "--spool-max-bytes",
    "--stream",
    "--stream-subject",
    "--no-create-stream",
    "--max-age",
    "--stream-max-bytes",
    "--duplicate-window",
    "--replicas",
    "--max-in-flight",
    "--ack-timeout",
    "--request-timeout",
    "--max-request-timeout",
    "--at-most-once",
    "--metrics-listen",
    "--nats-creds",
    "--nats-nkey",
    "--nats-token-file",
    "--nats-user",
    "--nats-password-file",
    "--nats-tls-ca",
    "--nats-tls-cert",
    "--nats-tls-key",
    "--nats-tls-hostname",
]


def test_help_lists_the_options_with_their_defaults() -> None:
    result = run_sync("bridge", "--help")
    assert result.returncode == 0, result
    text = " ".join(result.stdout.split())
    listed = set(re.findall(r"^\s+(--[a-z-]+)", result.stdout, re.MULTILINE))
    assert set(OPTIONS) <= listed, set(OPTIONS) - listed
    for shown in (
        "default: nats://127.0.0.1:4222",
        "default: events.#",
        f"(default: {DEFAULT_STREAM})",
        f"(default: {D.max_in_flight})",
        f"(default: {D.ack_timeout})",
        f"(default: {D.spool_max_events})",
        f"(default: {D.spool_max_bytes})",
        f"(default: {D.duplicate_window})",
        "/var/lib/daemoneye/bridge-HOST.spool as root",
        "$XDG_STATE_HOME/daemoneye/bridge-HOST.spool",
    ):
        assert shown in text, shown
    top = run_sync("--help")
    assert "bridge" in top.stdout


def test_the_default_spool_is_one_file_per_host(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    if os.geteuid() == 0:
        expected = "/var/lib/daemoneye/bridge-web-01.spool"
    else:
        expected = str(tmp_path / "daemoneye" / "bridge-web-01.spool")
    assert default_spool_path("web-01") == expected
    assert default_spool_path("web-02") != expected


def test_the_host_id_is_required() -> None:
    result = run_sync("bridge")
    assert result.returncode == 2, result
    assert "the following arguments are required: --host-id" in result.stderr


# -- configuration errors: exit 2, one line, nothing started ----------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host-id", "all"], "host id 'all' is reserved: it names every host"),
        (["--host-id", "web.01"], "character '.' (U+002E) is not allowed in a host id"),
        (["--forward", "control.#"], "forward filter 'control.#': control topics are not"),
        (["--forward", "events.#", "--forward", "events.process.#"], "overlap"),
        (["--nats", "http://127.0.0.1:4222"], "must start with nats://, tls://"),
        (["--nats-tls-cert", "c.pem"], "--nats-tls-cert and --nats-tls-key go together"),
        (["--nats-password-file", "p"], "a NATS password needs a user"),
        (["--ack-timeout", "0"], "ack_timeout must be positive"),
        (["--replicas", "0"], "replicas must be at least 1"),
        (["--stream", "a.b"], "stream name 'a.b'"),
        (["--stream-subject", "other.>"], "do not take the forwarded subject"),
        (["--nats-token-file", "/nonexistent/token"], "cannot read /nonexistent/token"),
        (["--nats-tls-ca", "/nonexistent/ca.pem"], "TLS files /nonexistent/ca.pem"),
    ],
    ids=lambda value: value if isinstance(value, str) else " ".join(value),
)
def test_a_configuration_error_exits_2_with_one_line(
    sock_dir: Path, args: list[str], message: str
) -> None:
    spool = sock_dir / "bridge.spool"
    result = run_sync(
        "bridge",
        *(["--host-id", HOST] if "--host-id" not in args else []),
        "--socket",
        str(sock_dir / "bus.sock"),
        "--spool",
        str(spool),
        *args,
    )
    assert result.returncode == 2, result
    assert message in error_line(result)
    assert result.stdout == ""
    assert not spool.exists()  # refused before anything was opened


def test_no_broker_exits_1(sock_dir: Path) -> None:
    path = sock_dir / "bus.sock"
    result = run_sync(
        "bridge", "--host-id", HOST, "--socket", str(path), "--spool", str(sock_dir / "s.spool")
    )
    assert result.returncode == 1, result
    assert error_line(result) == f"no broker at {path}: No such file or directory"


def test_a_spool_in_use_by_another_bridge_exits_1(sock_dir: Path) -> None:
    spool = sock_dir / "bridge.spool"
    with Spool(spool, max_events=10, max_bytes=10_000):
        result = run_sync(
            "bridge",
            "--host-id",
            HOST,
            "--socket",
            str(sock_dir / "bus.sock"),
            "--spool",
            str(spool),
        )
    assert result.returncode == 1, result
    assert error_line(result).startswith(f"spool {spool} is in use by another spool")


# -- running --------------------------------------------------------------------------------


@dataclass
class Running:
    proc: asyncio.subprocess.Process
    #: The first line: what it bridges.
    started: str
    metrics_url: str

    async def scrape(self) -> dict[str, float]:
        """Every sample of the metrics endpoint, by name and labels."""
        text = await asyncio.to_thread(_get, self.metrics_url)
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    async def text(self) -> str:
        return await asyncio.to_thread(_get, self.metrics_url)

    async def until(self, name: str, value: float) -> dict[str, float]:
        """Scrape until ``name`` is ``value``; the last scrape."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE
        while True:
            found = await self.scrape()
            if found.get(name) == value:
                return found
            if loop.time() > deadline:
                raise AssertionError(f"{name} is {found.get(name)}, not {value}: {found}")
            await asyncio.sleep(0.1)

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> Result:
        self.proc.send_signal(sig)
        return await finish(self.proc)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        body: bytes = response.read()
        return body.decode()


@asynccontextmanager
async def bridge_process(*args: str) -> AsyncIterator[Running]:
    """``bridge *args --metrics-listen 127.0.0.1:PORT``, once it has said it started
    (subscribed on the bus: what is published from then on is forwarded)."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        "bridge",
        *args,
        "--metrics-listen",
        f"127.0.0.1:{port}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=worker_env(),
    )
    assert proc.stdout is not None
    try:
        started = metrics = ""
        try:
            started = (await asyncio.wait_for(proc.stdout.readline(), PROC_TIMEOUT)).decode()
            metrics = (await asyncio.wait_for(proc.stdout.readline(), PROC_TIMEOUT)).decode()
        except TimeoutError:
            proc.kill()
        if not started.startswith(f"daemoneye-eventbus bridge for host {HOST}: "):
            result = await finish(proc)
            pytest.fail(f"the bridge did not start: {started!r} {result}")
        assert (
            metrics.strip()
            == f"daemoneye-eventbus bridge metrics on http://127.0.0.1:{port}/metrics"
        )
        yield Running(proc, started.strip(), metrics.split()[-1])
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()


async def publish(sock_path: str, pids: range) -> None:
    async with Client(sock_path, component=PROCMOND) as procmond:
        for pid in pids:
            await procmond.publish(
                registry.EVENTS_PROCESS_LIFECYCLE, events_pb2.ProcessEvent(pid=pid, name=f"p{pid}")
            )
        await procmond.flush()


async def stored_pids(url: str, expected: int) -> list[int]:
    """The pids of the events in the stream, read by a JetStream consumer of this host's
    subjects until ``expected`` have come (or the deadline passes); and the stream's count."""
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        # (Not daemoneye.HOST.>: the stream stores daemoneye.*.events and
        # daemoneye.*.events.>, and JetStream refuses a wider filter.)
        sub = await js.pull_subscribe(f"daemoneye.{HOST}.events.>", stream=DEFAULT_STREAM)
        pids: list[int] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE
        while len(pids) < expected and loop.time() < deadline:
            try:
                msgs = await sub.fetch(batch=500, timeout=1)
            except TimeoutError:
                continue
            for msg in msgs:
                assert msg.subject == f"daemoneye.{HOST}.events.process.lifecycle"
                assert msg.headers is not None
                assert msg.headers["Daemoneye-Host"] == HOST
                assert msg.headers["Daemoneye-Payload-Type"] == "daemoneye.eventbus.v1.ProcessEvent"
                event = events_pb2.ProcessEvent.FromString(msg.data)
                assert event.name == f"p{event.pid}"
                pids.append(event.pid)
                await msg.ack()
        info = await js.stream_info(DEFAULT_STREAM)
        assert info.state.messages == len(pids), (info.state, len(pids))
        return pids
    finally:
        await nc.close()


@pytest.mark.timeout(180)
async def test_a_thousand_events_reach_jetstream_once(
    sock_path: str, tmp_path: Path, nats_server: NatsServer
) -> None:
    spool = tmp_path / "bridge.spool"
    async with (
        broker_process(sock_path),
        bridge_process(
            "--socket",
            sock_path,
            "--nats",
            nats_server.url,
            "--host-id",
            HOST,
            "--spool",
            str(spool),
        ) as bridge,
    ):
        assert bridge.started.startswith(
            f"daemoneye-eventbus bridge for host {HOST}: bus {sock_path} -> NATS "
            f"{nats_server.url}, forwarding events.# to stream {DEFAULT_STREAM}; spool {spool} "
            "(0 events waiting)"
        )
        await publish(sock_path, range(1000))
        found = await bridge.until(f"{NS}_acknowledged_total", 1000)
        pids = await stored_pids(nats_server.url, 1000)
        text = await bridge.text()
        result = await bridge.stop(signal.SIGTERM)
    assert sorted(pids) == list(range(1000))  # each once
    assert "daemoneye_bridge_acknowledged_total 1000.0" in text.splitlines()
    assert "daemoneye_bridge_link_up 1.0" in text.splitlines()
    assert found[f"{NS}_received_total"] == 1000
    assert found[f"{NS}_forwarded_total"] == 1000
    assert found[f"{NS}_duplicates_total"] == 0
    assert found[f"{NS}_missed_total"] == 0
    assert found[f"{NS}_spool_depth"] == 0
    assert found[f"{NS}_link_up"] == 1
    assert found[f"{NS}_forward_latency_seconds{{quantile=0.99}}"] >= 0
    assert found[f"{NS}_process_resident_memory_bytes"] > 0
    assert result.returncode == 0, result
    assert result.stdout.splitlines()[-1] == (
        "bridge stopped: 1000 received, 1000 acknowledged by JetStream, 0 left in the spool"
    )
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(180)
async def test_no_nats_is_not_an_error_the_bridge_spools_and_sends_later(
    sock_path: str, tmp_path: Path, nats_server: NatsServer
) -> None:
    spool = tmp_path / "bridge.spool"
    nowhere = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    common = ("--socket", sock_path, "--host-id", HOST, "--spool", str(spool))
    async with broker_process(sock_path):
        async with bridge_process(*common, "--nats", nowhere) as bridge:
            await publish(sock_path, range(30))
            found = await bridge.until(f"{NS}_spool_depth", 30)
            assert found[f"{NS}_link_up"] == 0
            assert found[f"{NS}_received_total"] == 30
            assert found[f"{NS}_acknowledged_total"] == 0
            result = await bridge.stop(signal.SIGINT)
        assert result.returncode == 0, result
        assert result.stdout.splitlines()[-1] == (
            "bridge stopped: 30 received, 0 acknowledged by JetStream, 30 left in the spool"
        )
        # The same spool, NATS there: what waited in the spool is sent first.
        async with bridge_process(*common, "--nats", nats_server.url) as bridge:
            assert "(30 events waiting)" in bridge.started
            await publish(sock_path, range(30, 40))
            found = await bridge.until(f"{NS}_acknowledged_total", 40)
            assert found[f"{NS}_spool_depth"] == 0
            pids = await stored_pids(nats_server.url, 40)
            result = await bridge.stop()
    assert result.returncode == 0, result
    assert sorted(pids) == list(range(40))


@pytest.mark.timeout(120)
async def test_no_stream_and_no_create_stream_stops_the_bridge(
    sock_path: str, tmp_path: Path, nats_server: NatsServer
) -> None:
    async with (
        broker_process(sock_path),
        bridge_process(
            "--socket",
            sock_path,
            "--nats",
            nats_server.url,
            "--host-id",
            HOST,
            "--spool",
            str(tmp_path / "bridge.spool"),
            "--no-create-stream",
        ) as bridge,
    ):
        result = await finish(bridge.proc)
    # A configuration JetStream revealed: the configuration error's status. The
    # bridge logs why it stops, then the command says it as its error line.
    message = f"JetStream has no stream {DEFAULT_STREAM!r} and the bridge may not create it"
    assert result.returncode == 2, result
    *logged, last = result.stderr.splitlines()
    assert last == f"daemoneye-eventbus bridge: error: {message}", result
    assert all("ERROR daemoneye_eventbus.bridge: the bridge stops:" in line for line in logged)
    nc = await nats.connect(nats_server.url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        with pytest.raises(NotFoundError):
            await nc.jetstream().stream_info(DEFAULT_STREAM)
    finally:
        await nc.close()
    assert os.path.exists(tmp_path / "bridge.spool")


@pytest.mark.timeout(240)
async def test_a_killed_bridge_loses_nothing_it_spooled(
    sock_path: str, tmp_path: Path, nats_server: NatsServer
) -> None:
    spool = tmp_path / "bridge.spool"
    nowhere = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    common = ("--socket", sock_path, "--host-id", HOST, "--spool", str(spool))
    async with broker_process(sock_path):
        # NATS away: 5,000 events wait in the spool, and the bridge is killed.
        async with bridge_process(*common, "--nats", nowhere) as bridge:
            await publish(sock_path, range(5000))
            await bridge.until(f"{NS}_spool_depth", 5000)
            result = await bridge.stop(signal.SIGKILL)
        assert result.returncode == -signal.SIGKILL
        # NATS there: killed again while it forwards 20,000 more (some sent and
        # not yet acknowledged, most still in the spool).
        async with bridge_process(*common, "--nats", nats_server.url) as bridge:
            assert "(5000 events waiting)" in bridge.started
            await publish(sock_path, range(5000, 25_000))
            found = await bridge.until(f"{NS}_spooled_total", 20_000)
            result = await bridge.stop(signal.SIGKILL)
        assert result.returncode == -signal.SIGKILL
        acknowledged_before_the_kill = found[f"{NS}_acknowledged_total"]
        # Started again: the rest goes, JetStream drops the copies of what it had.
        async with bridge_process(*common, "--nats", nats_server.url) as bridge:
            await bridge.until(f"{NS}_spool_depth", 0)
            pids = await stored_pids(nats_server.url, 25_000)
            result = await bridge.stop()
    assert result.returncode == 0, result
    assert sorted(pids) == list(range(25_000)), acknowledged_before_the_kill
