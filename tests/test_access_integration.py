"""Access control end to end: a real broker, real sockets, real processes and real users.

The first part runs as any user: its policies name the test's own uid (or
exclude it) to exercise every refusal. The second part needs root: it creates
test users with tests/users.sh and runs clients as those users, so that the
kernel reports genuinely different credentials.
"""

from __future__ import annotations

import asyncio
import dataclasses
import grp
import json
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_CONFIG, peer_published, pid_of, proc, worker_env
from rawpeer import RawPeer, hello

from daemoneye.eventbus.v1 import control_pb2, registry
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode, Frame
from daemoneye_eventbus.access import Policy
from daemoneye_eventbus.broker import Broker, BrokerConfig
from daemoneye_eventbus.client import Client, Subscription, build_publish
from daemoneye_eventbus.delivery import ReceivedEvent
from daemoneye_eventbus.errors import AccessDenied, EventBusError, LimitExceeded

AUDIT = "daemoneye_eventbus.audit"
ME = os.geteuid()
OTHER_UID = 4242 if ME != 4242 else 4243
USERS_SH = Path(__file__).resolve().parent / "users.sh"
MARKER = 999_999
#: As root the broker refuses to run on without --user or --allow-root.
SERVE = [
    sys.executable,
    "-m",
    "daemoneye_eventbus.cli",
    "serve",
    *(["--allow-root"] if os.geteuid() == 0 else []),
]

LIFECYCLE = registry.EVENTS_PROCESS_LIFECYCLE
ANOMALY = registry.EVENTS_PROCESS_ANOMALY
HEARTBEAT = registry.CONTROL_HEALTH_HEARTBEAT
AGENT_POLICY = registry.CONTROL_AGENT_POLICY
COLLECTOR_LIFECYCLE = registry.CONTROL_COLLECTOR_LIFECYCLE


def make_policy(components: dict[str, dict[str, Any]], anonymous: bool = True) -> Policy:
    return Policy.from_mapping(
        {"components": components, "anonymous": {"allow": anonymous}}, source="test"
    )


def config(policy: Policy | None, **changes: Any) -> BrokerConfig:
    return dataclasses.replace(TEST_CONFIG, policy=policy, **changes)


#: procmond and the (privileged) agent may be claimed by this test's uid.
COMPONENTS = make_policy(
    {"procmond": {"uids": [ME]}, "daemoneye-agent": {"uids": [ME], "privileged": True}}
)


def audit_events(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, Any]]:
    out = []
    for record in caplog.records:
        fields = getattr(record, "audit", None)
        if record.name == AUDIT and isinstance(fields, dict) and fields["event"] == event:
            out.append(fields)
    return out


@pytest.fixture
def audit_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.WARNING, logger=AUDIT):
        yield caplog


async def until_marker(sub: Subscription[Any], timeout: float = 5.0) -> list[ReceivedEvent[Any]]:
    """Events up to and including the public marker event (pid MARKER on anomaly)."""
    out: list[ReceivedEvent[Any]] = []
    while True:
        event = await sub.get(timeout=timeout)
        out.append(event)
        if event.topic == ANOMALY.name and pid_of(event) == MARKER:
            return out


def queued(sub: Subscription[Any]) -> list[ReceivedEvent[Any]]:
    out = []
    while (event := sub.get_nowait()) is not None:
        out.append(event)
    return out


async def raw_handshake(path: str, component: str) -> list[Frame]:
    """Send a Hello by hand and return every frame the broker sends until it closes."""
    async with await RawPeer.connect(path, handshake=False) as peer:
        await peer.send(hello("raw", component))
        # Up to end of file: the broker closes after a fatal error.
        return await peer.until_eof(timeout=5)


async def wait_for_connections(broker: Broker, count: int) -> None:
    for _ in range(250):
        if broker.statistics().connections == count:
            return
        await asyncio.sleep(0.02)
    assert broker.statistics().connections == count


# == without root: refusals ===============================================================


async def test_handshake_refused_for_a_uid_the_policy_excludes(
    sock_path: str, audit_log: pytest.LogCaptureFixture
) -> None:
    policy = make_policy({"procmond": {"uids": [OTHER_UID]}})
    async with Broker(sock_path, config(policy)) as broker:
        client = Client(sock_path, name="claimer", component="procmond")
        try:
            with pytest.raises(AccessDenied) as info:
                await client.connect()
        finally:
            await client.close()
        message = str(info.value)
        assert f"component 'procmond' refused: uid {ME} / gid {os.getegid()}" in message
        assert "ERROR_CODE_ACCESS_DENIED" in message
        # On the wire: one fatal Error frame, then the broker closes.
        [frame] = await raw_handshake(sock_path, "procmond")
        assert frame.WhichOneof("kind") == "error"
        assert frame.error.code == ErrorCode.ERROR_CODE_ACCESS_DENIED
        assert frame.error.fatal
        assert "procmond" in frame.error.message
        # Claiming nothing is still fine.
        async with Client(sock_path) as anon:
            await anon.flush()
        assert broker.statistics().refused == 2
        await wait_for_connections(broker, 0)
    records = audit_events(audit_log, "handshake_refused")
    assert len(records) == 2
    first = records[0]
    assert (first["uid"], first["gid"], first["pid"]) == (ME, os.getegid(), os.getpid())
    assert first["claimed"] == "procmond"
    assert first["executable"] == "-"
    assert "is not allowed" in str(first["reason"])
    assert first["session"]


async def test_anonymous_peers_refused_when_the_policy_says_so(
    sock_path: str, audit_log: pytest.LogCaptureFixture
) -> None:
    policy = make_policy({"procmond": {"uids": [ME]}}, anonymous=False)
    async with Broker(sock_path, config(policy)):
        client = Client(sock_path, name="nobody")
        try:
            with pytest.raises(AccessDenied, match="anonymous peers are not allowed"):
                await client.connect()
        finally:
            await client.close()
        async with Client(sock_path, component="procmond") as procmond:
            await procmond.flush()
    [record] = audit_events(audit_log, "handshake_refused")
    assert record["claimed"] == "-"


async def test_anonymous_publish_on_restricted_topic_refused(
    sock_path: str, audit_log: pytest.LogCaptureFixture
) -> None:
    async with (
        Broker(sock_path, config(COMPONENTS)) as broker,
        Client(sock_path, name="anon") as anon,
        Client(sock_path, name="agent", component="daemoneye-agent") as agent,
        Client(sock_path, name="procmond", component="procmond") as procmond,
    ):
        reader = await agent.subscribe(LIFECYCLE)
        errors: list[EventBusError] = []
        anon.on_error = errors.append
        await anon.publish(LIFECYCLE, proc(1))
        await anon.flush()
        assert [type(e) for e in errors] == [AccessDenied]
        assert "anonymous peers may publish only on public topics" in str(errors[0])
        assert "ERROR_CODE_ACCESS_DENIED" in str(errors[0])
        assert anon.statistics().refused == 1
        stats = broker.statistics()
        assert (stats.refused, peer_published(stats), stats.delivered) == (1, 0, 0)
        # The refused event never reached the agent: its first event is procmond's.
        await procmond.publish(LIFECYCLE, proc(MARKER))
        assert pid_of(await reader.get(timeout=3)) == MARKER
        assert anon.is_connected  # a refused publish keeps the connection
    [record] = audit_events(audit_log, "publish_refused")
    assert record["uid"] == ME
    assert record["component"] == "-"
    assert record["topic"] == LIFECYCLE.name
    assert record["reason"] == "anonymous peers may publish only on public topics"


async def test_anonymous_wildcard_subscriber_reads_only_public_topics(sock_path: str) -> None:
    async with (
        Broker(sock_path, config(COMPONENTS)) as broker,
        Client(sock_path, name="anon") as anon,
        Client(sock_path, name="procmond", component="procmond") as procmond,
        Client(sock_path, name="agent", component="daemoneye-agent") as agent,
    ):
        errors: list[EventBusError] = []
        for c in (anon, procmond, agent):
            c.on_error = errors.append
        everything = await anon.subscribe("#", include_control=True)
        agent_events = await agent.subscribe("events.#")
        collector_control = await procmond.subscribe("control.#")

        await procmond.publish(LIFECYCLE, proc(1))
        await procmond.publish(registry.EVENTS_PROCESS_METADATA, proc(2))
        await procmond.publish(ANOMALY, proc(3))
        await procmond.publish(HEARTBEAT, control_pb2.Heartbeat(component_id="procmond"))
        await procmond.flush()
        await agent.publish(AGENT_POLICY, control_pb2.PolicyUpdate(policy_id="p1"))
        await agent.publish(
            COLLECTOR_LIFECYCLE, control_pb2.CollectorLifecycleCommand(collector_id="procmond")
        )
        await agent.publish(
            registry.control_collector_task_targeted(type="scan", id="procmond-1"),
            control_pb2.TaskAssignment(task_id="t1"),
        )
        await agent.flush()
        await procmond.publish(ANOMALY, proc(MARKER))
        await procmond.flush()

        got = await until_marker(everything)
        assert [e.topic for e in got] == [
            "events.process.anomaly",
            "control.health.heartbeat",
            "events.process.anomaly",
        ]
        assert [pid_of(got[0]), pid_of(got[2])] == [3, MARKER]
        # The restricted and privileged events were authorised and delivered to
        # their readers: the anonymous peer was filtered out, not the events.
        assert errors == []
        await agent.flush()
        assert [e.topic for e in queued(agent_events)] == [
            "events.process.lifecycle",
            "events.process.metadata",
            "events.process.anomaly",
            "events.process.anomaly",
        ]
        await procmond.flush()
        assert [e.topic for e in queued(collector_control)] == [
            "control.health.heartbeat",
            "control.agent.policy",
            "control.collector.lifecycle",
            "control.collector.task.scan.procmond-1",
        ]
        assert queued(everything) == []
        assert broker.statistics().refused == 0

        # A second anonymous subscriber, after every topic's route was cached: still filtered.
        async with Client(sock_path, name="late") as late:
            late_all = await late.subscribe("#", include_control=True)
            await procmond.publish(LIFECYCLE, proc(4))
            await agent.publish(AGENT_POLICY, control_pb2.PolicyUpdate(policy_id="p2"))
            await agent.flush()
            await procmond.publish(ANOMALY, proc(MARKER))
            assert [e.topic for e in await until_marker(late_all)] == ["events.process.anomaly"]
            assert [e.topic for e in await until_marker(everything)] == ["events.process.anomaly"]


async def test_subscribe_refused_when_filter_matches_nothing_readable(
    sock_path: str, audit_log: pytest.LogCaptureFixture
) -> None:
    async with (
        Broker(sock_path, config(COMPONENTS)) as broker,
        Client(sock_path, name="anon") as anon,
        Client(sock_path, name="procmond", component="procmond") as procmond,
        Client(sock_path, name="agent", component="daemoneye-agent") as agent,
    ):
        for flt in ("events.+.lifecycle", "events.network.#", "control.collector.#"):
            with pytest.raises(AccessDenied, match="matches no topic that an anonymous peer"):
                await anon.subscribe(flt)
        # procmond does not read process lifecycle events either; the agent does.
        with pytest.raises(AccessDenied, match="matches no topic that procmond may read"):
            await procmond.subscribe("events.+.lifecycle")
        agent_sub = await agent.subscribe("events.+.lifecycle")
        assert broker.statistics().refused == 4
        assert broker.statistics().subscription_stats[0].filter == "events.+.lifecycle"

        # events.process.# can match the public anomaly topic: accepted, anomaly only.
        process = await anon.subscribe("events.process.#")
        await procmond.publish(LIFECYCLE, proc(1))
        await procmond.publish(registry.EVENTS_PROCESS_TREE, proc(2))
        await procmond.publish(ANOMALY, proc(3))
        await procmond.publish(ANOMALY, proc(MARKER))
        assert [pid_of(e) for e in await until_marker(process)] == [3, MARKER]
        await agent.flush()
        assert [pid_of(e) for e in queued(agent_sub)] == [1]
        assert anon.is_connected
    records = audit_events(audit_log, "subscribe_refused")
    assert [r["filter"] for r in records] == [
        "events.+.lifecycle",
        "events.network.#",
        "control.collector.#",
        "events.+.lifecycle",
    ]
    assert [r["component"] for r in records] == ["-", "-", "-", "procmond"]


async def test_agent_policy_topic_only_from_the_privileged_agent(
    sock_path: str, audit_log: pytest.LogCaptureFixture
) -> None:
    async with (
        Broker(sock_path, config(COMPONENTS)),
        Client(sock_path, name="anon") as anon,
        Client(sock_path, name="procmond", component="procmond") as procmond,
        Client(sock_path, name="agent", component="daemoneye-agent") as agent,
    ):
        errors: dict[str, list[EventBusError]] = {"anon": [], "procmond": [], "agent": []}
        anon.on_error = errors["anon"].append
        procmond.on_error = errors["procmond"].append
        agent.on_error = errors["agent"].append
        policies = await procmond.subscribe(AGENT_POLICY)
        await procmond.publish(AGENT_POLICY, control_pb2.PolicyUpdate(policy_id="forged"))
        await anon.publish(AGENT_POLICY, control_pb2.PolicyUpdate(policy_id="forged-too"))
        await procmond.flush()
        await anon.flush()
        await agent.publish(AGENT_POLICY, control_pb2.PolicyUpdate(policy_id="real"))
        await agent.flush()
        await procmond.flush()
        received = [e.message() for e in queued(policies)]
        assert [m.policy_id for m in received] == ["real"]
        assert [type(e) for e in errors["procmond"]] == [AccessDenied]
        assert "component 'procmond' is not a publisher of this topic" in str(errors["procmond"][0])
        assert [type(e) for e in errors["anon"]] == [AccessDenied]
        assert errors["agent"] == []
    reasons = [r["reason"] for r in audit_events(audit_log, "publish_refused")]
    assert reasons == [
        "component 'procmond' is not a publisher of this topic",
        "anonymous peers may publish only on public topics",
    ]


async def test_unprivileged_agent_may_not_publish_privileged_topics(sock_path: str) -> None:
    policy = make_policy({"daemoneye-agent": {"uids": [ME]}})  # no privileged = true
    async with (
        Broker(sock_path, config(policy)),
        Client(sock_path, component="daemoneye-agent") as agent,
    ):
        errors: list[EventBusError] = []
        agent.on_error = errors.append
        await agent.publish(AGENT_POLICY, control_pb2.PolicyUpdate())
        await agent.publish(COLLECTOR_LIFECYCLE, control_pb2.CollectorLifecycleCommand())
        await agent.publish(HEARTBEAT, control_pb2.Heartbeat())  # public: fine
        await agent.flush()
        assert [type(e) for e in errors] == [AccessDenied, AccessDenied]
        assert all("is not privileged" in str(e) for e in errors)


async def test_in_process_sessions_are_trusted(sock_path: str) -> None:
    async with (
        Broker(sock_path, config(COMPONENTS)) as broker,
        Client(sock_path, name="procmond", component="procmond") as procmond,
        Client(sock_path, name="anon") as anon,
    ):
        local = broker.local_session("agent-core")  # no component claimed, no credentials check
        queue = local.new_queue()
        local.subscribe_queue("#", queue, include_control=True)
        everything = await anon.subscribe("#", include_control=True)
        commands = await procmond.subscribe(AGENT_POLICY)
        await procmond.publish(LIFECYCLE, proc(1))
        await procmond.flush()
        event = queue.get_nowait()
        assert event is not None
        assert event.topic == LIFECYCLE.name  # a restricted topic it is not listed for
        assert local.publish_frame(build_publish(AGENT_POLICY, control_pb2.PolicyUpdate())) == 2
        assert local.publish_frame(build_publish(LIFECYCLE, proc(2))) == 1  # the local "#" only
        await procmond.publish(ANOMALY, proc(MARKER))
        assert [pid_of(e) for e in await until_marker(everything)] == [MARKER]
        assert [e.topic for e in queued(commands)] == [AGENT_POLICY.name]
        assert broker.statistics().refused == 0
        local.end()


async def test_undeclared_topics_are_public_when_allowed(sock_path: str) -> None:
    cfg = config(COMPONENTS, allow_undeclared_topics=True)
    async with (
        Broker(sock_path, cfg) as broker,
        Client(sock_path, name="anon") as anon,
        Client(sock_path, name="procmond", component="procmond") as procmond,
    ):
        errors: list[EventBusError] = []
        anon.on_error = errors.append
        # Any filter is accepted now: an undeclared topic could match it ...
        lifecycle_only = await anon.subscribe("events.+.lifecycle")
        everything = await anon.subscribe("#")
        # ... but declared topics keep their rules on publish and on delivery.
        await anon.publish(LIFECYCLE, proc(1))
        await anon.publish_raw("custom.thing", "x.Y", b"anon")
        await anon.flush()
        await procmond.publish(LIFECYCLE, proc(2))
        await procmond.publish_raw("custom.lifecycle", "x.Y", b"procmond")
        await procmond.flush()
        await procmond.publish(ANOMALY, proc(MARKER))
        got = await until_marker(everything)
        assert [e.topic for e in got] == ["custom.thing", "custom.lifecycle", ANOMALY.name]
        assert [type(e) for e in errors] == [AccessDenied]
        assert queued(lifecycle_only) == []
        assert broker.statistics().refused == 1


@pytest.mark.linux_only("reads /proc/<pid>/exe")
async def test_policy_executables(sock_path: str, audit_log: pytest.LogCaptureFixture) -> None:
    exe = os.readlink(f"/proc/{os.getpid()}/exe")
    allowed = make_policy({"procmond": {"uids": [ME], "executables": [exe]}})
    async with (
        Broker(sock_path, config(allowed)) as broker,
        Client(sock_path, component="procmond") as procmond,
    ):
        await procmond.publish(LIFECYCLE, proc(1))
        await procmond.flush()
        assert procmond.statistics().refused == 0
        assert peer_published(broker.statistics()) == 1
    other = make_policy({"procmond": {"uids": [ME], "executables": ["/usr/sbin/procmond"]}})
    async with Broker(sock_path, config(other)):
        client = Client(sock_path, component="procmond")
        try:
            with pytest.raises(AccessDenied, match=f"executable {exe} is not allowed"):
                await client.connect()
        finally:
            await client.close()
        async with Client(sock_path) as anon:  # anonymous needs no executable check
            await anon.flush()
    [record] = audit_events(audit_log, "handshake_refused")
    assert record["executable"] == exe
    assert record["claimed"] == "procmond"


async def test_audit_rate_limit_under_a_flood(
    sock_path: str, audit_log: pytest.LogCaptureFixture
) -> None:
    n = 500
    async with (
        Broker(sock_path, config(COMPONENTS)) as broker,
        Client(sock_path, name="flood") as anon,
    ):
        for i in range(n):
            payload = proc(i).SerializeToString()
            await anon.publish_raw(LIFECYCLE.name, LIFECYCLE.payload_name, payload)
            # One frame per event: the first event of a loop turn travels
            # alone, the rest of a turn in a batch, refused as one.
            await asyncio.sleep(0)
        await anon.flush()
        assert anon.statistics().refused == n
        assert broker.statistics().refused == n
        burst = broker.audit.burst
        logged = audit_events(audit_log, "publish_refused")
        assert 1 <= len(logged) <= burst
        assert len(logged) + broker.audit.suppressed == n
        assert anon.is_connected


async def test_connection_limit_per_uid(
    sock_path: str, audit_log: pytest.LogCaptureFixture
) -> None:
    async with Broker(sock_path, config(None, max_connections_per_uid=3)) as broker:
        for _ in range(2):  # slots are freed when clients leave
            clients = [Client(sock_path, name=f"c{i}") for i in range(3)]
            for c in clients:
                await c.connect()
            extra = Client(sock_path, name="fourth")
            try:
                with pytest.raises(LimitExceeded, match="connection limit of 3 per user"):
                    await extra.connect()
            finally:
                await extra.close()
            for c in clients:
                await c.close()
            await wait_for_connections(broker, 0)
        async with Client(sock_path) as c:
            await c.flush()
        assert broker.statistics().refused == 2
    records = audit_events(audit_log, "connection_refused")
    assert len(records) == 2
    assert all(r["uid"] == ME for r in records)


async def test_socket_mode_and_own_group_applied(sock_dir: Path) -> None:
    path = str(sock_dir / "bus.sock")
    cfg = config(None, socket_mode=0o660, socket_group=os.getegid())
    async with Broker(path, cfg):
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == os.getegid()
        assert st.st_uid == os.geteuid()
    assert not os.path.exists(path)


def test_serve_rejects_a_malformed_policy(tmp_path: Path, sock_dir: Path) -> None:
    bad = tmp_path / "policy.toml"
    bad.write_text("[components.procmond]\nuid = [1]\n")
    missing = tmp_path / "missing.toml"
    for policy, expected in [
        (bad, f"{bad}: [components.procmond]: unknown key(s) ['uid']"),
        (missing, f"cannot read policy {missing}"),
    ]:
        result = subprocess.run(
            [*SERVE, "--socket", str(sock_dir / "bus.sock"), "--policy", str(policy)],
            capture_output=True,
            text=True,
            env=worker_env(),
            timeout=30,
        )
        # A configuration error: status 2, one line.
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"daemoneye-eventbus serve: error: {expected}"), line
        assert not (sock_dir / "bus.sock").exists()


# == as root: real, different users =========================================================

#: Runs as root to import everything, drops to the given user, then connects.
WORKER = r"""
import asyncio
import json
import os
import pwd
import sys

from daemoneye.eventbus.v1 import events_pb2, registry
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.errors import RequestTimeout


def emit(**fields):
    print(json.dumps(fields), flush=True)


def drop_privileges(user):
    pw = pwd.getpwnam(user)
    os.setgroups(os.getgrouplist(user, pw.pw_gid))
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)


async def connect(path, component, count):
    client = Client(path, name="worker-connect", component=component)
    try:
        await client.connect()
    except Exception as exc:
        emit(error=type(exc).__name__, message=str(exc), errno=getattr(exc, "errno", None))
        return
    finally:
        await client.close()
    emit(connected=True)


async def subscribe(path, component, count):
    async with Client(path, name="worker-subscribe", component=component) as client:
        sub = await client.subscribe(registry.EVENTS_PROCESS_LIFECYCLE)
        emit(ready=True)
        pids = []
        while len(pids) < count:
            try:
                event = await sub.get(timeout=20)
            except RequestTimeout:
                break
            pids.append(event.message().pid)
        # The agent is privileged: the broker shows it who is connected. The
        # publisher stays connected until the test lets it go.
        stats = await client.broker_statistics()
        peers = [
            {"component": c.component, "uid": c.peer_uid, "pid": c.peer_pid}
            for c in stats.connection_stats
        ]
        emit(received=pids, refused=client.statistics().refused, peers=peers)


async def publish(path, component, count):
    async with Client(path, name="worker-publish", component=component) as client:
        # Not privileged: the broker's totals, but not who is connected.
        stats = await client.broker_statistics()
        details = len(stats.connection_stats) + len(stats.subscription_stats)
        for i in range(count):
            event = events_pb2.ProcessEvent(pid=i, name="worker")
            await client.publish(registry.EVENTS_PROCESS_LIFECYCLE, event)
        await client.flush()
        emit(published=count, refused=client.statistics().refused, details=details)
        await asyncio.to_thread(sys.stdin.readline)  # stay connected until told


role, user, path, component, count = sys.argv[1:6]
asyncio.run(asyncio.sleep(0))  # load whatever the event loop imports lazily, while root
import concurrent.futures.thread  # noqa: E402,F401 - for asyncio.to_thread after the drop
drop_privileges(user)
emit(uid=os.getuid(), euid=os.geteuid(), gid=os.getegid(), groups=sorted(os.getgroups()))
asyncio.run({"connect": connect, "subscribe": subscribe, "publish": publish}[role](
    path, component, int(count)
))
"""


@dataclasses.dataclass(frozen=True)
class Users:
    bus_gid: int
    collector: pwd.struct_passwd
    agent: pwd.struct_passwd
    stranger: pwd.struct_passwd


@pytest.fixture(scope="session")
def users() -> Users:
    if not sys.platform.startswith("linux"):
        pytest.skip("real-user tests need Linux (SO_PEERCRED, useradd)")
    if os.geteuid() != 0:
        pytest.skip(
            "real-user tests need root: they create users (tests/users.sh) and drop to them"
        )
    result = subprocess.run(
        ["bash", str(USERS_SH)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return Users(
        bus_gid=grp.getgrnam("deb-bus").gr_gid,
        collector=pwd.getpwnam("deb-collector"),
        agent=pwd.getpwnam("deb-agent"),
        stranger=pwd.getpwnam("deb-stranger"),
    )


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users may traverse (0711) but not list or write."""
    path = Path(tempfile.mkdtemp(prefix="deb-acl-", dir="/tmp"))
    os.chmod(path, 0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def users_policy(u: Users) -> dict[str, Any]:
    return {
        "components": {
            "procmond": {"uids": [u.collector.pw_uid]},
            "daemoneye-agent": {"uids": [u.agent.pw_uid], "privileged": True},
            # Group rules match the peer's primary gid only, not supplementary groups.
            "netmond": {"gids": [u.bus_gid]},
            "fsmond": {"gids": [u.collector.pw_gid]},
        }
    }


def users_config(u: Users) -> BrokerConfig:
    policy = Policy.from_mapping(users_policy(u), source="users")
    return config(policy, socket_mode=0o660, socket_group=u.bus_gid)


def worker_args(role: str, user: str, path: str, component: str = "", count: int = 0) -> list[str]:
    return [sys.executable, "-c", WORKER, role, user, path, component, str(count)]


def worker_environment() -> dict[str, str]:
    env = worker_env()
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def spawn_worker(*args: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        worker_args(*args),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=worker_environment(),
        cwd="/",
    )


async def read_json(p: subprocess.Popen[str]) -> dict[str, Any]:
    assert p.stdout is not None
    line = await asyncio.to_thread(p.stdout.readline)
    if not line:
        _, err = await asyncio.to_thread(p.communicate, timeout=30)
        pytest.fail(f"worker exited early ({p.returncode}): {err}")
    value = json.loads(line)
    assert isinstance(value, dict)
    return value


async def finish(p: subprocess.Popen[str]) -> list[dict[str, Any]]:
    out, err = await asyncio.to_thread(p.communicate, timeout=60)
    assert p.returncode == 0, err
    return [json.loads(line) for line in out.splitlines() if line]


def run_worker(*args: Any) -> list[dict[str, Any]]:
    result = subprocess.run(
        worker_args(*args),
        capture_output=True,
        text=True,
        env=worker_environment(),
        cwd="/",
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line]


def check_identity(line: dict[str, Any], user: pwd.struct_passwd, u: Users) -> None:
    assert line["uid"] == line["euid"] == user.pw_uid
    assert line["gid"] == user.pw_gid
    member = user.pw_name in ("deb-collector", "deb-agent")
    assert (u.bus_gid in line["groups"]) is member


def check_socket(path: str, u: Users) -> None:
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == u.bus_gid
    assert st.st_uid == 0


async def test_real_users_collector_publishes_to_agent(users: Users, shared_dir: Path) -> None:
    path = str(shared_dir / "bus.sock")
    n = 5
    async with Broker(path, users_config(users)) as broker:
        check_socket(path, users)  # right after start, before any connection
        assert stat.S_IMODE(os.stat(shared_dir).st_mode) == 0o711  # an existing directory is kept
        agent = spawn_worker("subscribe", "deb-agent", path, "daemoneye-agent", n)
        check_identity(await read_json(agent), users.agent, users)
        assert await read_json(agent) == {"ready": True}
        collector = spawn_worker("publish", "deb-collector", path, "procmond", n)
        agent_out = await finish(agent)
        collector_out = await finish(collector)  # closes its stdin: it leaves
        stats = broker.statistics()
    check_identity(collector_out[0], users.collector, users)
    report = collector_out[1]
    assert (report["published"], report["refused"], report["details"]) == (n, 0, 0)
    assert sorted((p["component"], p["uid"], p["pid"]) for p in agent_out[-1]["peers"]) == sorted(
        [
            ("daemoneye-agent", users.agent.pw_uid, agent.pid),
            ("procmond", users.collector.pw_uid, collector.pid),
        ]
    )
    assert (agent_out[-1]["received"], agent_out[-1]["refused"]) == (list(range(n)), 0)
    assert (peer_published(stats), stats.delivered, stats.refused) == (n, n, 0)


async def test_real_users_handshake_claims(
    users: Users, shared_dir: Path, audit_log: pytest.LogCaptureFixture
) -> None:
    path = str(shared_dir / "bus.sock")
    async with Broker(path, users_config(users)) as broker:
        check_socket(path, users)
        # The collector's user may act as procmond, not as the agent.
        out = await asyncio.to_thread(run_worker, "connect", "deb-collector", path, "procmond")
        assert out[1] == {"connected": True}
        out = await asyncio.to_thread(
            run_worker, "connect", "deb-collector", path, "daemoneye-agent"
        )
        assert out[1]["error"] == "AccessDenied"
        uid, gid = users.collector.pw_uid, users.collector.pw_gid
        assert f"component 'daemoneye-agent' refused: uid {uid} / gid {gid}" in out[1]["message"]
        assert "ERROR_CODE_ACCESS_DENIED" in out[1]["message"]
        # Group rules match the primary gid: deb-bus is only a supplementary group.
        out = await asyncio.to_thread(run_worker, "connect", "deb-collector", path, "netmond")
        assert out[1]["error"] == "AccessDenied"
        out = await asyncio.to_thread(run_worker, "connect", "deb-collector", path, "fsmond")
        assert out[1] == {"connected": True}
        # Members may connect anonymously.
        out = await asyncio.to_thread(run_worker, "connect", "deb-agent", path, "")
        assert out[1] == {"connected": True}
        # Root is nobody special under a policy file.
        for component, reason in [
            ("procmond", "component 'procmond' refused: uid 0 / gid 0 is not allowed"),
            ("perfmond", "uid 0 may not act as component 'perfmond'"),
        ]:
            client = Client(path, component=component)
            try:
                with pytest.raises(AccessDenied, match=reason):
                    await client.connect()
            finally:
                await client.close()
        assert broker.statistics().refused == 4
    refused = audit_events(audit_log, "handshake_refused")
    assert [(r["uid"], r["claimed"]) for r in refused] == [
        (users.collector.pw_uid, "daemoneye-agent"),
        (users.collector.pw_uid, "netmond"),
        (0, "procmond"),
        (0, "perfmond"),
    ]


async def test_real_users_stranger_cannot_connect(users: Users, shared_dir: Path) -> None:
    path = str(shared_dir / "bus.sock")
    async with Broker(path, users_config(users)) as broker:
        check_socket(path, users)
        for component in ("", "procmond"):
            out = await asyncio.to_thread(run_worker, "connect", "deb-stranger", path, component)
            check_identity(out[0], users.stranger, users)
            assert out[1]["error"] == "PermissionError"
            assert out[1]["errno"] == 13  # EACCES from connect(): the kernel said no
        # The broker never saw it.
        assert broker.statistics().connections_total == 0
        assert broker.statistics().refused == 0


def test_serve_cli_applies_policy_mode_and_group(
    users: Users, shared_dir: Path, tmp_path: Path
) -> None:
    path = str(shared_dir / "bus.sock")
    policy_file = tmp_path / "bus-policy.toml"
    policy_file.write_text(
        f"[components.procmond]\nuids = [{users.collector.pw_uid}]\n\n"
        f"[components.daemoneye-agent]\nuids = [{users.agent.pw_uid}]\nprivileged = true\n"
    )
    server = subprocess.Popen(
        [
            *SERVE,
            *("--socket", path, "--policy", str(policy_file)),
            *("--socket-mode", "0660", "--socket-group", "deb-bus"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=worker_environment(),
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert "listening" in line, line
        assert "mode 0660" in line
        assert f"policy {policy_file}" in line
        check_socket(path, users)
        assert run_worker("connect", "deb-collector", path, "procmond")[1] == {"connected": True}
        refused = run_worker("connect", "deb-collector", path, "daemoneye-agent")[1]
        assert refused["error"] == "AccessDenied"
        assert run_worker("connect", "deb-stranger", path, "")[1]["error"] == "PermissionError"
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=20)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert server.returncode == 0, err
    assert "broker stopped" in out
    # The audit log goes to stderr through the CLI's logging setup.
    assert "event=handshake_refused" in err
    assert f"uid={users.collector.pw_uid}" in err
    assert not os.path.exists(path)
