"""Interoperability of the TypeScript client (clients/typescript/) with the Python broker.

A real broker runs in the test's event loop (the ``broker`` fixture); the
TypeScript programs of ``clients/typescript/test/interop/`` run as Node.js
subprocesses (through tsx) and talk to it over its Unix socket. They print
JSON lines: what they received, in protobuf's JSON mapping, which is compared
field by field with what was published.

* a TypeScript publisher to a Python subscriber;
* a Python publisher to a TypeScript subscriber (and with a correlation filter);
* a burst of events a Python publisher sends as ``PublishBatch`` frames, to a
  TypeScript subscriber receiving ``DeliverBatch`` frames and to a bare one
  whose ``Hello`` does not accept batches (one ``Deliver`` per event);
* a TypeScript ``#`` subscriber claiming ``daemoneye-agent`` receiving from a
  TypeScript and a Python publisher at once;
* client behaviour: typed refusals with their error codes, heartbeats,
  statistics, unsubscribe and close, the broker's goodbye;
* event ids and receive times seen alike by TypeScript and Python subscribers;
* with a broker whose ``Welcome`` sets ``requests`` (skipped otherwise): a
  TypeScript requester and a Python responder, a Python requester and a
  TypeScript responder;
* with a broker that has them (skipped otherwise): a retained event for a
  late TypeScript subscriber, presence events, and a TypeScript client's last
  will (killed: published; closed: none);
* the generated TypeScript registry agrees with the Python one, and the
  committed TypeScript code (clients/typescript/src/gen/) is fresh.

The tests that run Node.js are skipped only when ``node`` is absent;
``clients/typescript/node_modules`` must be installed (``npm ci --prefix
clients/typescript``). The pure tests of codegen/render_ts.py always run.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
import signal
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rawpeer import RawPeer, hello

from codegen.render_ts import HEADER, check_ts, render_ts, ts_function_name
from codegen.schema import TopicDecl
from daemoneye.eventbus.v1 import control_pb2, events_pb2, frames_pb2, registry
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationMetadata
from daemoneye_eventbus.broker import Broker
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.delivery import ReceivedEvent
from daemoneye_eventbus.errors import EventBusError, SchemaError
from daemoneye_eventbus.registry_runtime import RequestTopic, RequestTopicTemplate

REPO = Path(__file__).resolve().parents[1]
TS_DIR = REPO / "clients" / "typescript"
INTEROP = TS_DIR / "test" / "interop"
NODE = shutil.which("node")

needs_node = pytest.mark.skipif(
    NODE is None,
    reason="Node.js is not installed (no `node` on PATH): the TypeScript interop tests need it",
)

#: Deadline for one line of output of a TypeScript program (tsx start-up included).
LINE_TIMEOUT = 30.0
UINT64_MAX = 2**64 - 1
#: Events published in one burst by the batch test; runs of BATCH_RUN events share a correlation.
BATCH_EVENTS = 2000
BATCH_RUN = 500


@pytest.fixture
def node_modules() -> None:
    if not (TS_DIR / "node_modules" / "tsx").is_dir():
        pytest.fail(
            "clients/typescript/node_modules is missing: run `npm ci --prefix clients/typescript`"
        )


class TsProgram:
    """A running TypeScript interop program and its JSON output lines."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        self.lines: list[dict[str, Any]] = []

    async def line(self, timeout: float = LINE_TIMEOUT) -> dict[str, Any]:
        """The next JSON line; fails with the program's stderr if none comes."""
        assert self.proc.stdout is not None
        try:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            pytest.fail(f"{self.name}: no output within {timeout} s")
        if not raw:
            await self.proc.wait()
            stderr = await self._stderr()
            pytest.fail(f"{self.name} ended (exit {self.proc.returncode}) early:\n{stderr}")
        value = json.loads(raw)
        assert isinstance(value, dict)
        if "error" in value:
            pytest.fail(f"{self.name} failed: {value['error']}\n{await self._stderr()}")
        self.lines.append(value)
        return value

    async def expect(self, key: str, timeout: float = LINE_TIMEOUT) -> Any:
        value = await self.line(timeout)
        assert key in value, f"{self.name}: expected a {key!r} line, got {value}"
        return value[key]

    async def finish(self, timeout: float = LINE_TIMEOUT) -> None:
        """Wait for a clean exit with nothing more printed."""
        assert self.proc.stdout is not None
        rest = await asyncio.wait_for(self.proc.stdout.read(), timeout)
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        stderr = await self._stderr()
        assert code == 0, f"{self.name} exited with {code}:\n{rest.decode()}\n{stderr}"
        assert not rest.strip(), f"{self.name}: unexpected output {rest!r}"

    async def _stderr(self) -> str:
        assert self.proc.stderr is not None
        try:
            data = await asyncio.wait_for(self.proc.stderr.read(), 5)
        except TimeoutError:
            return "(stderr unavailable)"
        return data.decode(errors="replace")

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture
async def ts(node_modules: None) -> AsyncIterator[list[TsProgram]]:
    """Started programs; killed at the end of the test if still running."""
    programs: list[TsProgram] = []
    yield programs
    for program in programs:
        await program.kill()
        # Drain the pipes so that their transports close before the loop does.
        for stream in (program.proc.stdout, program.proc.stderr):
            if stream is not None:
                await stream.read()


async def start(programs: list[TsProgram], script: str, options: dict[str, Any]) -> TsProgram:
    assert NODE is not None
    proc = await asyncio.create_subprocess_exec(
        NODE,
        "--import",
        "tsx",
        str(INTEROP / script),
        json.dumps(options),
        cwd=TS_DIR,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    program = TsProgram(f"{script} {options.get('scenario', '')}".strip(), proc)
    programs.append(program)
    return program


def to_json(message: Message) -> Any:
    return json_format.MessageToDict(message)


def _ts(seconds: int, nanos: int = 0) -> Timestamp:
    return Timestamp(seconds=seconds, nanos=nanos)


def process_events(count: int, name: str = "ts") -> list[events_pb2.ProcessEvent]:
    """Process events exercising every kind of field: maps, optionals, bytes, uint64, ..."""
    out = []
    for i in range(count):
        event = events_pb2.ProcessEvent(
            pid=1000 + i,
            name=f"{name}-proc-{i}",
            command_line=f"/usr/bin/{name} --id {i} 'quoted arg' ✓",
            ppid=1,
            start_time=_ts(1714564800 + i, 123_000_000),
            metadata={"unit": f"svc-{i}.service", "empty": "", "ünïcode": "välue"},
            kind=events_pb2.PROCESS_EVENT_KIND_START
            if i % 2
            else events_pb2.PROCESS_EVENT_KIND_EXIT,
            user_id=0,
            cpu_usage_percent=0.5 + i,
            memory_rss_bytes=UINT64_MAX - i,
            executable_hash=bytes([i % 256] * 32),
            hash_algorithm=events_pb2.HASH_ALGORITHM_BLAKE3,
            integrity_verified=bool(i % 2),
            anomaly_score=0.0,
            exit_code=-i,
            observed_at=_ts(1714564900 + i, 999_999_999),
        )
        out.append(event)
    return out


def network_events(count: int) -> list[events_pb2.NetworkEvent]:
    return [
        events_pb2.NetworkEvent(
            kind=events_pb2.NETWORK_EVENT_KIND_ACCEPT,
            protocol=events_pb2.NETWORK_PROTOCOL_UDP if i % 2 else events_pb2.NETWORK_PROTOCOL_TCP,
            local_address="::1",
            local_port=8000 + i,
            remote_address=f"192.0.2.{i % 250}",
            remote_port=40000 + i,
            pid=2000 + i,
            bytes_sent=i,
            bytes_received=UINT64_MAX,
            observed_at=_ts(1714565000 + i),
            metadata={"iface": "lo", "seq": f"n{i}"},
        )
        for i in range(count)
    ]


def correlation(i: int, root: str = "wf-1") -> CorrelationMetadata:
    return CorrelationMetadata(
        correlation_id=f"{root}-step-{i}",
        parent_correlation_id=root,
        root_correlation_id=root,
        workflow_stage="detection",
        tags={"host": "web-1", "i": f"v{i}"},
        sequence_number=i,
        created_at=_ts(1714564800, i),
    )


def assert_event(
    got: dict[str, Any],
    topic: str,
    payload: Message,
    corr: CorrelationMetadata | None,
) -> None:
    """A TypeScript program's received event equals what Python published, field by field."""
    assert got["topic"] == topic
    assert got["payloadType"] == payload.DESCRIPTOR.full_name
    assert got["payload"] == to_json(payload)
    assert json_format.ParseDict(got["payload"], type(payload)()) == payload
    if corr is None:
        assert got["correlation"] is None
    else:
        assert got["correlation"] == to_json(corr)
        assert json_format.ParseDict(got["correlation"], CorrelationMetadata()) == corr


def assert_received(
    event: ReceivedEvent[Message],
    topic: str,
    payload: Message,
    corr: CorrelationMetadata | None,
) -> None:
    """A Python subscriber's event equals what TypeScript published, field by field."""
    assert event.topic == topic
    assert event.payload_type == payload.DESCRIPTOR.full_name
    message = event.message()
    assert to_json(message) == to_json(payload)
    assert message == payload
    if corr is None:
        assert event.correlation is None
    else:
        assert event.correlation is not None
        assert to_json(event.correlation) == to_json(corr)
        assert event.correlation == corr


def ts_events(
    topic: str, payloads: Sequence[Message], corrs: Sequence[CorrelationMetadata | None]
) -> list[dict[str, Any]]:
    """The ``events`` option of publish.ts."""
    out: list[dict[str, Any]] = []
    for payload, corr in zip(payloads, corrs, strict=True):
        item: dict[str, Any] = {"topic": topic, "payload": to_json(payload)}
        if corr is not None:
            item["correlation"] = to_json(corr)
        out.append(item)
    return out


@needs_node
async def test_typescript_publisher_to_python_subscriber(
    broker: Broker, ts: list[TsProgram]
) -> None:
    processes = process_events(6)
    batch = events_pb2.ProcessBatch(
        processes=processes[:2], enumeration_id="enum-1", batch_index=0, final=True
    )
    corrs: list[CorrelationMetadata | None] = [
        correlation(i) if i % 2 == 0 else None for i in range(len(processes))
    ]
    events = [
        *ts_events("events.process.lifecycle", processes, corrs),
        *ts_events("events.process.batch", [batch], [correlation(99)]),
    ]
    async with Client(broker.path, name="py-subscriber", component="daemoneye-agent") as client:
        sub = await client.subscribe("events.process.#")
        publisher = await start(
            ts, "publish.ts", {"socket": broker.path, "component": "procmond", "events": events}
        )
        assert await publisher.expect("ready") is True
        assert publisher.lines[-1]["component"] == "procmond"
        done = await publisher.expect("published")
        assert done == len(events)
        assert publisher.lines[-1]["refused"] == []
        await publisher.finish()
        received = [await sub.get(timeout=10) for _ in events]
        assert [e.sequence for e in received] == list(range(1, len(events) + 1))
        for event, payload, corr in zip(received, processes, corrs, strict=False):
            assert_received(event, "events.process.lifecycle", payload, corr)
        assert_received(received[-1], "events.process.batch", batch, correlation(99))
        assert sub.get_nowait() is None


@needs_node
async def test_python_publisher_to_typescript_subscriber(
    broker: Broker, ts: list[TsProgram]
) -> None:
    processes = process_events(8, "py")
    corrs = [correlation(i) if i % 3 else None for i in range(len(processes))]
    subscriber = await start(
        ts,
        "subscribe.ts",
        {
            "socket": broker.path,
            "component": "daemoneye-agent",
            "filter": "events.process.+",
            "count": len(processes),
        },
    )
    await subscriber.expect("ready")
    async with Client(broker.path, name="py-publisher", component="procmond") as client:
        for payload, corr in zip(processes, corrs, strict=True):
            await client.publish(registry.EVENTS_PROCESS_INTEGRITY, payload, correlation=corr)
        await client.flush()
    got = [await subscriber.expect("event") for _ in processes]
    for event, payload, corr in zip(got, processes, corrs, strict=True):
        assert_event(event, "events.process.integrity", payload, corr)
    assert [int(e["sequence"]) for e in got] == list(range(1, len(processes) + 1))
    assert (await subscriber.expect("done")) == len(processes)
    assert subscriber.lines[-1]["missed"] == 0
    await subscriber.finish()


@needs_node
async def test_python_publisher_batches_to_typescript_subscribers(
    broker: Broker, ts: list[TsProgram]
) -> None:
    """A burst from the Python client travels in batches; both TypeScript subscribers get it all.

    The TypeScript client accepts batches: it receives ``DeliverBatch`` frames
    (counted by subscribe.ts). unbatched.ts does not (its ``Hello`` is the
    pre-batch one): the broker unrolls the same batches into one ``Deliver``
    per event, and any other frame fails it.
    """
    payloads = process_events(BATCH_EVENTS, "batch")
    # The publisher batches runs of events that share a topic and a correlation.
    corrs = [
        correlation(i // BATCH_RUN, "wf-batch") if i // BATCH_RUN % 2 else None
        for i in range(BATCH_EVENTS)
    ]
    options = {
        "socket": broker.path,
        "component": "daemoneye-agent",
        "filter": "events.process.lifecycle",
        "count": BATCH_EVENTS,
    }
    batched = await start(ts, "subscribe.ts", {**options, "collect": True})
    unbatched = await start(ts, "unbatched.ts", options)
    await batched.expect("ready")
    await unbatched.expect("ready")
    assert unbatched.lines[-1]["batches"] is True  # Welcome.batches: PublishBatch accepted
    async with Client(broker.path, name="py-batch-publisher", component="procmond") as client:
        for payload, corr in zip(payloads, corrs, strict=True):
            await client.publish(registry.EVENTS_PROCESS_LIFECYCLE, payload, correlation=corr)
        await client.flush()
    for program in (batched, unbatched):
        got = [await program.expect("event") for _ in payloads]
        assert [int(e["sequence"]) for e in got] == list(range(1, BATCH_EVENTS + 1))
        for event, payload, corr in zip(got, payloads, corrs, strict=True):
            assert_event(event, "events.process.lifecycle", payload, corr)
        assert (await program.expect("done")) == BATCH_EVENTS
        await program.finish()
    done = batched.lines[-1]
    assert (done["missed"], done["dropped"]) == (0, 0)
    # At least one batch per correlation run, and far fewer frames than events.
    assert BATCH_EVENTS // BATCH_RUN <= done["batches"] <= BATCH_EVENTS // 10
    stats = broker.statistics()
    assert (stats.delivered, stats.dropped) == (2 * BATCH_EVENTS, 0)


@needs_node
async def test_event_ids_and_receive_times(broker: Broker, ts: list[TsProgram]) -> None:
    """Every subscriber gets the broker's id and receive time of each event.

    A Python publisher's events one by one, then a TypeScript publisher's
    burst (the first event alone, the rest in a batch): the TypeScript and
    the Python subscriber see the same ids, increasing in publishing order,
    consecutive for the burst, and receive times taken while the test ran.
    """
    py_events = process_events(4, "py-ids")
    ts_payloads = process_events(8, "ts-ids")
    count = len(py_events) + len(ts_payloads)
    t0 = time.time_ns()
    subscriber = await start(
        ts,
        "subscribe.ts",
        {
            "socket": broker.path,
            "component": "daemoneye-agent",
            "filter": "events.process.lifecycle",
            "count": count,
        },
    )
    await subscriber.expect("ready")
    async with (
        Client(broker.path, name="py-ids-subscriber", component="daemoneye-agent") as watcher,
        Client(broker.path, name="py-ids-publisher", component="procmond") as client,
    ):
        sub = await watcher.subscribe(registry.EVENTS_PROCESS_LIFECYCLE)
        for payload in py_events:
            await client.publish(registry.EVENTS_PROCESS_LIFECYCLE, payload)
            await client.flush()
        publisher = await start(
            ts,
            "publish.ts",
            {
                "socket": broker.path,
                "component": "procmond",
                "events": ts_events("events.process.lifecycle", ts_payloads, [None] * 8),
            },
        )
        await publisher.expect("ready")
        assert await publisher.expect("published") == len(ts_payloads)
        await publisher.finish()
        seen = [await sub.get(timeout=10) for _ in range(count)]
    t1 = time.time_ns()
    got = [await subscriber.expect("event") for _ in range(count)]
    await subscriber.expect("done")
    await subscriber.finish()
    for event, payload in zip(got, [*py_events, *ts_payloads], strict=True):
        assert_event(event, "events.process.lifecycle", payload, None)
        assert event["retained"] is False
    ids = [int(e["eventId"]) for e in got]
    assert ids[0] > 0
    assert ids == sorted(set(ids)), "unique and increasing in publishing order"
    assert ids == [e.event_id for e in seen], "the same id for every subscriber"
    burst = ids[len(py_events) :]
    assert burst == list(range(burst[0], burst[0] + len(ts_payloads)))
    times = [int(e["receivedAtNs"]) for e in got]
    assert all(t0 <= t <= t1 for t in times)
    assert times == [e.received_at_ns for e in seen]
    assert times == sorted(times)


@needs_node
async def test_typescript_correlation_filter(broker: Broker, ts: list[TsProgram]) -> None:
    """The broker applies a correlation filter sent by the TypeScript client."""
    processes = process_events(6, "corr")
    roots = ["wf-1", "wf-2", "wf-1", "wf-2", "wf-1", "wf-2"]
    corrs = [correlation(i, root) for i, root in enumerate(roots)]
    subscriber = await start(
        ts,
        "subscribe.ts",
        {
            "socket": broker.path,
            "component": "daemoneye-agent",
            "filter": "events.#",
            "count": 3,
            "correlationFilter": {"rootCorrelationIds": ["wf-1"], "workflowStages": ["detection"]},
        },
    )
    await subscriber.expect("ready")
    async with Client(broker.path, name="py-publisher", component="procmond") as client:
        for payload, corr in zip(processes, corrs, strict=True):
            await client.publish(registry.EVENTS_PROCESS_LIFECYCLE, payload, correlation=corr)
        await client.flush()
    got = [await subscriber.expect("event") for _ in range(3)]
    wanted = [
        (p, c) for p, c in zip(processes, corrs, strict=True) if c.root_correlation_id == "wf-1"
    ]
    for event, (payload, corr) in zip(got, wanted, strict=True):
        assert_event(event, "events.process.lifecycle", payload, corr)
    # Sequence numbers count only the events that passed the filter [protocol §5].
    assert [int(e["sequence"]) for e in got] == [1, 2, 3]
    await subscriber.expect("done")
    await subscriber.finish()


@needs_node
async def test_typescript_wildcard_subscriber_receives_from_both(
    broker: Broker, ts: list[TsProgram]
) -> None:
    """A ``#`` subscriber (daemoneye-agent) gets a TS and a Python publisher's events."""
    ts_payloads = process_events(10, "tspub")
    ts_corrs: list[CorrelationMetadata | None] = [correlation(i, "ts-wf") for i in range(10)]
    py_payloads = network_events(10)
    py_corrs: list[CorrelationMetadata | None] = [
        correlation(i, "py-wf") if i % 2 else None for i in range(10)
    ]
    total = len(ts_payloads) + len(py_payloads)
    subscriber = await start(
        ts,
        "subscribe.ts",
        {"socket": broker.path, "component": "daemoneye-agent", "filter": "#", "count": total},
    )
    await subscriber.expect("ready")
    publisher = await start(
        ts,
        "publish.ts",
        {
            "socket": broker.path,
            "component": "procmond",
            "name": "ts-publisher",
            "events": ts_events("events.process.lifecycle", ts_payloads, ts_corrs),
        },
    )

    async def python_publisher() -> None:
        async with Client(broker.path, name="py-publisher", component="netmond") as client:
            # A control topic: `#` without include_control must not receive it [protocol §4].
            beat = control_pb2.Heartbeat(component_id="netmond", sequence=1)
            await client.publish(registry.CONTROL_HEALTH_HEARTBEAT, beat)
            for payload, corr in zip(py_payloads, py_corrs, strict=True):
                await client.publish(registry.EVENTS_NETWORK_CONNECTIONS, payload, correlation=corr)
                await asyncio.sleep(0)
            await client.flush()

    await asyncio.gather(python_publisher(), publisher.expect("ready"))
    assert (await publisher.expect("published")) == len(ts_payloads)
    await publisher.finish()
    got = [await subscriber.expect("event") for _ in range(total)]
    assert [int(e["sequence"]) for e in got] == list(range(1, total + 1))
    from_ts = [e for e in got if e["topic"] == "events.process.lifecycle"]
    from_py = [e for e in got if e["topic"] == "events.network.connections"]
    assert len(from_ts) == len(ts_payloads)
    assert len(from_py) == len(py_payloads)
    # Each publisher's events arrive in the order published [protocol §5].
    for event, payload, corr in zip(from_ts, ts_payloads, ts_corrs, strict=True):
        assert_event(event, "events.process.lifecycle", payload, corr)
    for event, net, net_corr in zip(from_py, py_payloads, py_corrs, strict=True):
        assert_event(event, "events.network.connections", net, net_corr)
    assert (await subscriber.expect("done")) == total
    await subscriber.finish()


async def run_scenario(
    ts: list[TsProgram], broker: Broker, scenario: str, **options: Any
) -> dict[str, Any]:
    program = await start(
        ts, "scenarios.ts", {"socket": broker.path, "scenario": scenario, **options}
    )
    while True:
        line = await program.line()
        if "result" in line:
            break
    await program.finish()
    result = line["result"]
    assert isinstance(result, dict)
    return result


@needs_node
async def test_refusals_are_typed_errors_with_codes(broker: Broker, ts: list[TsProgram]) -> None:
    result = await run_scenario(ts, broker, "errors")
    denied = result["subscribeRestricted"]
    assert denied["class"] == "AccessDenied"
    assert denied["code"] == "ACCESS_DENIED"
    assert denied["fatal"] is False
    assert denied["subscriptionId"] == 1
    assert denied["topic"] == "events.network.#"
    assert result["subscribeRestrictedIsAccessDenied"] is True
    assert result["subscribeInvalidFilter"]["class"] == "InvalidTopic"
    assert result["subscribeInvalidFilter"]["code"] is None  # refused locally
    assert result["publishInvalidCorrelation"]["class"] == "InvalidCorrelation"
    refusals = [(r["class"], r["code"], r["topic"]) for r in result["publishRefusals"]]
    assert refusals == [
        ("AccessDenied", "ACCESS_DENIED", "events.process.lifecycle"),
        ("PayloadTypeMismatch", "PAYLOAD_MISMATCH", "events.process.anomaly"),
        ("InvalidTopic", "INVALID_TOPIC", "events.not.declared"),
    ]
    assert all(r["fatal"] is False for r in result["publishRefusals"])
    assert result["statistics"]["refused"] == 3
    assert result["stillConnected"] is True
    assert result["publicSubscription"] == 3
    assert result["afterClose"]["class"] == "ClosedResourceError"
    assert broker.refused >= 5


@needs_node
async def test_client_answers_heartbeats(broker: Broker, ts: list[TsProgram]) -> None:
    """Silent for longer than the idle timeout, the client stays connected via Pongs."""
    result = await run_scenario(ts, broker, "heartbeat")
    assert result["idleTimeoutMs"] == 3000
    assert result["heartbeatIntervalMs"] == 500
    assert result["alive"] is True
    assert result["rttMs"] >= 0


@needs_node
async def test_broker_statistics(broker: Broker, ts: list[TsProgram]) -> None:
    result = await run_scenario(ts, broker, "stats")
    assert result == {"connections": 1, "sessionListed": True, "subscriptionListed": True}


@needs_node
async def test_unsubscribe_and_close(broker: Broker, ts: list[TsProgram]) -> None:
    result = await run_scenario(ts, broker, "lifecycle")
    assert result["firstActive"] is False
    assert result["iterated"] == 0
    assert result["ids"] == [1, 2, 3]
    assert result["thirdEnded"] is True
    assert result["afterClose"]["class"] == "ClosedResourceError"
    assert result["closedIsClosedResourceError"] is True
    for _ in range(50):  # the broker has dropped the connection after its goodbye
        if not broker.statistics().connections:
            break
        await asyncio.sleep(0.05)
    assert broker.statistics().connections == 0


@needs_node
async def test_broker_goodbye_ends_iteration(broker: Broker, ts: list[TsProgram]) -> None:
    program = await start(ts, "scenarios.ts", {"socket": broker.path, "scenario": "goodbye"})
    await program.expect("ready")
    await broker.close()
    result = await program.expect("result")
    await program.finish()
    assert result["ended"]["class"] == "ConnectionLost"
    assert result["broken"] is True  # a BrokenResourceError, as before
    assert result["goodbye"] is True
    assert "goodbye" in result["ended"]["message"]
    assert result["closed"] == "ConnectionLost"  # client.closed resolved with it
    assert result["connected"] is False


# -- request/reply, retained events, presence, last will ---------------------------
#
# Request/reply needs a broker whose Welcome sets `requests`; retained events,
# presence and last wills a broker that has them (its `retained` and
# `presence` modules). Each test is skipped against a broker without its feature.


async def broker_features(path: str) -> frames_pb2.Welcome:
    """The broker's Welcome, from a raw handshake."""
    async with await RawPeer.connect(path, handshake=False) as peer:
        await peer.send(hello("features-probe"))
        frame = await peer.recv()
    assert frame.WhichOneof("kind") == "welcome"
    return frame.welcome


@pytest.fixture
async def requests_broker(broker: Broker) -> Broker:
    """The broker, if it routes requests."""
    if not (await broker_features(broker.path)).requests:
        pytest.skip("the broker's Welcome does not set `requests` yet")
    return broker


@pytest.fixture
def presence_broker(broker: Broker) -> Broker:
    """The broker, if it has retained events, presence and last wills."""
    for module in ("daemoneye_eventbus.retained", "daemoneye_eventbus.presence"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the broker has no {module} yet")
    return broker


def health_reply(request: control_pb2.HealthCheckRequest) -> control_pb2.HealthCheckReply:
    return control_pb2.HealthCheckReply(
        status=control_pb2.RPC_STATUS_SUCCESS,
        component=control_pb2.ComponentStatus(
            component_id=request.component_id, message="python answered"
        ),
    )


@needs_node
async def test_typescript_requester_python_responder(
    requests_broker: Broker, ts: list[TsProgram]
) -> None:
    """Typed replies from a Python responder; NoResponders and RequestFailed are typed."""
    path = requests_broker.path
    topic = registry.CONTROL_COLLECTOR_RPC_HEALTH.build(id="py-1")
    async with (
        Client(path, name="py-responder", component="procmond") as responder_client,
        responder_client.serve(topic) as requests,
    ):

        async def answer() -> list[str]:
            requesters = []
            async for request in requests:
                requesters.append(request.requester)
                if request.message.component_id == "py-1":
                    await request.reply(health_reply(request.message))
                else:
                    await request.fail("python refuses")
                if len(requesters) == 2:
                    return requesters
            return requesters

        answering = asyncio.ensure_future(answer())
        requester = await start(
            ts,
            "rpc.ts",
            {
                "socket": path,
                "component": "daemoneye-agent",
                "role": "request",
                "ids": ["py-1", "nobody", "py-1"],
                "timeoutMs": 5000,
            },
        )
        assert (await requester.expect("ready")) is True
        assert requester.lines[-1]["requests"] is True
        first = await requester.expect("reply")
        assert json_format.ParseDict(first, control_pb2.HealthCheckReply()) == health_reply(
            control_pb2.HealthCheckRequest(component_id="py-1")
        )
        nobody = await requester.expect("failed")
        assert (nobody["class"], nobody["code"]) == ("NoResponders", "NO_RESPONDERS")
        assert nobody["topic"] == "control.collector.rpc.health.nobody"
        second = await requester.expect("reply")
        assert second["component"]["componentId"] == "py-1"
        assert await requester.expect("done") == 3
        await requester.finish()
        assert await asyncio.wait_for(answering, 10) == ["daemoneye-agent", "daemoneye-agent"]


@needs_node
async def test_python_requester_typescript_responder(
    requests_broker: Broker, ts: list[TsProgram]
) -> None:
    """A TypeScript responder's typed reply and failure reach a Python requester."""
    path = requests_broker.path
    responder = await start(
        ts,
        "rpc.ts",
        {"socket": path, "component": "procmond", "role": "serve", "id": "ts-1", "count": 2},
    )
    await responder.expect("ready")
    assert responder.lines[-1]["filter"] == "control.collector.rpc.health.ts-1"
    topic = registry.CONTROL_COLLECTOR_RPC_HEALTH.build(id="ts-1")
    async with Client(path, name="py-requester", component="daemoneye-agent") as client:
        reply = await client.request(
            topic, control_pb2.HealthCheckRequest(component_id="abc"), timeout=5.0
        )
        assert reply.status == control_pb2.RPC_STATUS_SUCCESS
        assert reply.component.component_id == "abc"
        assert reply.component.message == "ts answered daemoneye-agent"
        with pytest.raises(EventBusError, match="refused by ts"):
            await client.request(
                topic, control_pb2.HealthCheckRequest(component_id="fail-me"), timeout=5.0
            )
    served = [await responder.expect("served") for _ in range(2)]
    assert [s["componentId"] for s in served] == ["abc", "fail-me"]
    assert all(s["topic"] == "control.collector.rpc.health.ts-1" for s in served)
    assert all(s["requester"] == "daemoneye-agent" and s["sent"] for s in served)
    assert all(int(s["eventId"]) > 0 and s["remainingPositive"] for s in served)
    assert await responder.expect("done") == 2
    await responder.finish()


@needs_node
async def test_retained_event_reaches_a_late_typescript_subscriber(
    presence_broker: Broker, ts: list[TsProgram]
) -> None:
    """The topic's last event comes first to a new subscription, marked retained."""
    path = presence_broker.path
    statuses = [
        control_pb2.ComponentStatus(component_id=f"c-{i}", message=f"status {i}") for i in range(3)
    ]
    async with Client(path, name="py-status", component="procmond") as client:
        for status in statuses[:2]:
            await client.publish(registry.CONTROL_HEALTH_STATUS, status)
        await client.flush()
        subscriber = await start(
            ts,
            "subscribe.ts",
            {
                "socket": path,
                "component": "daemoneye-agent",
                "filter": "control.health.status",
                "count": 2,
            },
        )
        await subscriber.expect("ready")
        retained = await subscriber.expect("event")
        assert_event(retained, "control.health.status", statuses[1], None)
        assert retained["retained"] is True
        await client.publish(registry.CONTROL_HEALTH_STATUS, statuses[2])
        await client.flush()
    fresh = await subscriber.expect("event")
    assert_event(fresh, "control.health.status", statuses[2], None)
    assert fresh["retained"] is False
    assert int(fresh["eventId"]) > int(retained["eventId"]) > 0
    assert (await subscriber.expect("done")) == 2
    await subscriber.finish()


@needs_node
async def test_presence_reaches_a_typescript_subscriber(
    presence_broker: Broker, ts: list[TsProgram]
) -> None:
    """A component connecting and leaving: CONNECTED, then DISCONNECTED (GOODBYE).

    ``control.presence`` is a control topic: ``#`` receives it only with
    ``includeControl`` (a filter naming it always does).
    """
    path = presence_broker.path

    def options(filter: str, count: int, include_control: bool = False) -> dict[str, Any]:
        return {
            "socket": path,
            "component": "daemoneye-agent",
            "filter": filter,
            "count": count,
            "includeControl": include_control,
        }

    plain = await start(ts, "subscribe.ts", options("#", 1))
    await plain.expect("ready")
    wide = await start(ts, "subscribe.ts", options("#", 5, include_control=True))
    await wide.expect("ready")
    named = await start(ts, "subscribe.ts", options("control.presence", 3))
    await named.expect("ready")
    marker = events_pb2.ProcessEvent(pid=4242, name="marker")
    async with Client(path, name="py-present", component="procmond") as client:
        session = client.session_id
        await client.publish(registry.EVENTS_PROCESS_ANOMALY, marker)
        await client.flush()
    # procmond's two events, and the first `#` subscriber leaving once it got
    # the marker (before or after procmond's goodbye).
    events = [await named.expect("event") for _ in range(3)]
    await named.expect("done")
    await named.finish()
    assert all(e["topic"] == "control.presence" for e in events)
    states = [e["payload"] for e in events if e["payload"].get("sessionId") == session]
    assert [s["state"] for s in states] == [
        "PRESENCE_STATE_CONNECTED",
        "PRESENCE_STATE_DISCONNECTED",
    ]
    assert all(s["component"] == "procmond" for s in states)
    assert states[1]["reason"] == "DISCONNECT_REASON_GOODBYE"
    assert not states[1].get("lastWillPublished", False)
    others = [e["payload"] for e in events if e["payload"].get("sessionId") != session]
    assert [(s["component"], s["state"]) for s in others] == [
        ("daemoneye-agent", "PRESENCE_STATE_DISCONNECTED")
    ]
    # Without include_control, `#` got the marker and no presence event before it.
    first = await plain.expect("event")
    assert_event(first, "events.process.anomaly", marker, None)
    await plain.expect("done")
    await plain.finish()
    # With it, `#` got them all: the named subscriber connecting, procmond's
    # two presence events around its marker, and the first `#` subscriber leaving.
    seen = [await wide.expect("event") for _ in range(5)]
    await wide.expect("done")
    await wide.finish()
    topics = [e["topic"] for e in seen]
    assert topics.count("events.process.anomaly") == 1
    assert topics.count("control.presence") == 4
    procmond = [e["payload"]["state"] for e in seen if e["payload"].get("sessionId") == session]
    assert procmond == ["PRESENCE_STATE_CONNECTED", "PRESENCE_STATE_DISCONNECTED"]
    assert topics.index("events.process.anomaly") > 1  # after procmond's CONNECTED


@needs_node
async def test_typescript_last_will(presence_broker: Broker, ts: list[TsProgram]) -> None:
    """A killed TypeScript client's will reaches a Python subscriber; a closed one leaves none."""
    path = presence_broker.path
    async with Client(path, name="py-will-watcher", component="daemoneye-agent") as watcher:
        sub = await watcher.subscribe(registry.CONTROL_HEALTH_STATUS)
        closing = await start(
            ts,
            "will.ts",
            {"socket": path, "component": "procmond", "componentId": "ts-clean", "mode": "close"},
        )
        await closing.expect("ready")
        assert await closing.expect("closed") is True
        await closing.finish()
        killed = await start(
            ts,
            "will.ts",
            {"socket": path, "component": "procmond", "componentId": "ts-killed", "mode": "kill"},
        )
        await killed.expect("ready")
        killed.proc.send_signal(signal.SIGKILL)
        await killed.proc.wait()
        will = await sub.get(timeout=10)
        status = will.message()
        assert (status.component_id, status.message) == ("ts-killed", "ts-killed went away")
        assert status.state == control_pb2.HEALTH_STATE_UNHEALTHY
        assert will.event_id > 0
        # The clean one left nothing: the will above was the first status.
        assert sub.get_nowait() is None


@needs_node
async def test_typescript_registry_matches_python(ts: list[TsProgram]) -> None:
    program = await start(ts, "registry.ts", {})
    dump = await program.line()
    await program.finish()
    topics = [
        {
            "name": t.name,
            "payload": t.payload_name,
            "access": int(t.access),
            "publishers": sorted(t.publishers),
            "subscribers": sorted(t.subscribers),
            "control": t.control,
            "lossless": t.lossless,
            "retained": t.retained,
            "reply": t.reply_name if isinstance(t, RequestTopic) else None,
        }
        for t in registry.TOPICS.values()
    ]
    assert dump["topics"] == topics
    templates = [
        {
            "pattern": t.pattern,
            "parameters": list(t.parameters),
            "filter": t.filter,
            "payload": t.payload_name,
            "access": int(t.access),
            "publishers": sorted(t.publishers),
            "subscribers": sorted(t.subscribers),
            "control": t.control,
            "lossless": t.lossless,
            "retained": t.retained,
            "reply": t.reply_name if isinstance(t, RequestTopicTemplate) else None,
        }
        for t in registry.TEMPLATES
    ]
    assert dump["templates"] == templates
    assert dump["access"] == {k: int(v) for k, v in registry.ACCESS_TABLE.items()}
    assert dump["lookupTemplate"] == "control.collector.task.{type}.{id}"
    health = registry.lookup("control.collector.rpc.health.procmond-1")
    assert isinstance(health, RequestTopic)
    assert dump["lookupRequest"] == [health.name, health.template, health.reply_name]
    # The schema's request and retained topics are there, on both sides.
    assert {t["pattern"] for t in dump["templates"] if t["reply"]} >= {
        "control.collector.rpc.health.{id}",
        "control.collector.queue.{type}",
    }
    assert {t["name"] for t in dump["topics"] if t["retained"]} == {
        "control.collector.config",
        "control.agent.policy",
        "control.health.status",
    }


@needs_node
def test_typescript_generated_code_is_fresh(node_modules: None) -> None:
    """clients/typescript/src/gen/ is what `python -m codegen.render_ts gen` writes."""
    stale = check_ts(REPO / "proto", TS_DIR / "src" / "gen")
    assert stale == [], f"stale TypeScript code, run `make gen`: {stale}"


def _decl(enum_value: str, name: str, parameters: tuple[str, ...] = ()) -> TopicDecl:
    return TopicDecl(
        enum_value=enum_value,
        name=name,
        access="PUBLIC",
        publishers=(),
        subscribers=(),
        payload="daemoneye.eventbus.v1.Heartbeat",
        payload_file="daemoneye/eventbus/v1/control.proto",
        payload_package="daemoneye.eventbus.v1",
        control=False,
        lossless=False,
        parameters=parameters,
        comment="A test topic.",
    )


def test_render_ts_is_pure() -> None:
    decls = [
        _decl("TOPIC_A_B", "a.b"),
        _decl("TOPIC_A_TARGETED", "a.{kind}.{id}", ("kind", "id")),
    ]
    text = render_ts(decls)
    assert text == render_ts(decls)
    assert text.startswith(HEADER)
    assert 'export const A_B: Topic<typeof HeartbeatSchema> = new Topic(\n  "a.b",' in text
    assert (
        "export function aTargeted(values: { readonly kind: string; readonly id: string })" in text
    )
    assert (
        'import { HeartbeatSchema, file_daemoneye_eventbus_v1_control } from "./control_pb.js";'
        in text
    )
    assert ts_function_name("CONTROL_COLLECTOR_TASK_TARGETED") == "controlCollectorTaskTargeted"


@pytest.mark.parametrize(
    ("enum_value", "name", "parameters"),
    [
        ("TOPIC_TOPICS", "a.b", ()),  # a name the registry defines
        ("TOPIC_LOOKUP", "a.{x}", ("x",)),  # builder `lookup`
        ("TOPIC_DELETE", "a.{x}", ("x",)),  # builder `delete`: a keyword
    ],
)
def test_render_ts_refuses_reserved_names(
    enum_value: str, name: str, parameters: tuple[str, ...]
) -> None:
    with pytest.raises(SchemaError, match="TypeScript name"):
        render_ts([_decl(enum_value, name, parameters)])


def test_render_ts_refuses_colliding_names() -> None:
    with pytest.raises(SchemaError, match="already generated"):
        render_ts([_decl("TOPIC_A_B", "a.{x}", ("x",)), _decl("TOPIC_A__B", "b.{x}", ("x",))])
