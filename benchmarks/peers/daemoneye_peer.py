"""daemoneye-eventbus: ``daemoneye-eventbus serve`` over a Unix domain socket.

The broker is ``python -m daemoneye_eventbus.cli serve --socket PATH
--max-queue-messages 10000`` (the same settings as ``benchmarks/e2e.py``), with
more subscriptions per connection for workload E and more connections for
workload F. Clients are the package's asyncio :class:`Client`; publishers of
``events.process.lifecycle`` claim the component ``procmond`` and subscribers
``daemoneye-agent``, as the schema's access rules ask. The latency pair needs
both roles, so the pinger and the echo each hold two connections (one per
component); every message still crosses the broker twice per round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Final

from benchmarks.peers.base import (
    ECHO_TOPIC,
    IDLE_AFTER_PUBLISHERS,
    IDLE_TOPIC,
    PAYLOAD_BYTES,
    TOPIC,
    YIELD_EVERY,
    Adapter,
    BrokerOptions,
    BrokerProcess,
    Ctl,
    IdleTracker,
    RoleFunction,
    dotted,
    spawn_broker,
    wait_until,
)

__all__ = [
    "MAX_QUEUE_MESSAGES",
    "PID_BASE",
    "PUBLISHER",
    "ROLES",
    "SUBSCRIBER",
    "SUB_MAX_PENDING",
    "DaemoneyeAdapter",
    "make_event",
]

REPO: Final = Path(__file__).resolve().parents[2]
#: Per-subscriber queue in the broker, in messages (benchmarks/e2e.py uses it too).
MAX_QUEUE_MESSAGES: Final = 10_000
#: Events a subscriber's client queue holds before it drops (client side).
SUB_MAX_PENDING: Final = 100_000
PUBLISHER: Final = "procmond"
SUBSCRIBER: Final = "daemoneye-agent"
#: pids count up from here: every pid below 2**28 is a 4-byte varint, so the
#: payload size stays the same for every event.
PID_BASE: Final = 1 << 21
#: Tries an idle client makes to connect (workload F).
CONNECT_ATTEMPTS: Final = 5
#: Concurrent subscribe requests of a holder.
SUBSCRIBE_WINDOW: Final = 512
_NS: Final = 1_000_000_000


class DaemoneyeAdapter(Adapter):
    name = "daemoneye"
    label = "daemoneye-eventbus"
    module = "benchmarks.peers.daemoneye_peer"
    python_broker = True
    lossless_mode = "lossless subscriptions (credit-based backpressure)"
    request_reply = True

    def ensure(self, install: bool) -> str | None:
        try:
            import daemoneye_eventbus  # noqa: F401
        except ImportError as exc:  # pragma: no cover - the package is this repository
            return f"daemoneye_eventbus does not import: {exc}"
        return None

    def versions(self) -> dict[str, str]:
        from google.protobuf.internal import api_implementation

        try:
            own = version("daemoneye-eventbus")
        except PackageNotFoundError:
            own = "source tree"
        from daemoneye_eventbus.runtime import loop_name

        loop = loop_name()  # what the broker and the workers will run on
        return {
            "daemoneye-eventbus": own,
            "protobuf": f"{version('protobuf')} ({api_implementation.Type()})",
            "event loop": f"uvloop {version('uvloop')}" if loop == "uvloop" else "asyncio",
        }

    def start_broker(self, workdir: str, options: BrokerOptions) -> BrokerProcess:
        path = os.path.join(workdir, "b.sock")
        argv = [
            sys.executable,
            "-m",
            "daemoneye_eventbus.cli",
            "serve",
            "--socket",
            path,
            "--max-queue-messages",
            str(MAX_QUEUE_MESSAGES),
            # As root the broker refuses to run on without --user or --allow-root.
            *(["--allow-root"] if os.geteuid() == 0 else []),
        ]
        settings = [f"--max-queue-messages {MAX_QUEUE_MESSAGES}"]
        if options.subscriptions_per_connection > 1024:
            n = str(options.subscriptions_per_connection)
            # About 600 bytes of broker memory per plain subscription (budget.py).
            memory = str(options.subscriptions_per_connection * 1024)
            argv += ["--max-subscriptions", n]
            argv += ["--max-subscription-bytes", memory, "--max-total-subscription-bytes", memory]
            settings.append(
                f"--max-subscriptions {n} --max-subscription-bytes {memory} "
                f"--max-total-subscription-bytes {memory}"
            )
        if options.connections > 200:
            n = str(options.connections)
            argv += ["--max-connections", n, "--max-connections-per-uid", n]
            settings.append(f"--max-connections {n} --max-connections-per-uid {n}")
        if options.undeclared_filters:
            argv.append("--allow-undeclared-topics")
            settings.append("--allow-undeclared-topics")
        # Extra broker options for one-off comparisons, e.g. --no-validate-payloads.
        extra_args = os.environ.get(BROKER_ARGS_ENV, "").split()
        if extra_args:
            argv += extra_args
            settings.append(" ".join(extra_args))
        env = dict(os.environ)
        extra = [str(REPO), str(REPO / "generated")]
        if env.get("PYTHONPATH"):
            extra.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(extra)
        broker = spawn_broker(argv, workdir, path, "Unix socket", env=env, settings=settings)
        try:
            wait_until(
                lambda: "listening on" in broker.output() and os.path.exists(path), broker, 30.0
            )
        except BaseException:
            broker.stop()
            raise
        return broker


# -- payload -----------------------------------------------------------------------------


#: Environment variable with extra ``serve`` options for this bus's broker.
BROKER_ARGS_ENV = "DAEMONEYE_BENCH_BROKER_ARGS"


def make_event(size: int = PAYLOAD_BYTES) -> Any:
    """A ``ProcessEvent`` whose serialized form is exactly ``size`` bytes.

    The command line is padded to reach the size; ``pid`` may then be set to
    any value in ``[PID_BASE, 2**28)`` without changing it.
    """
    from daemoneye.eventbus.v1 import events_pb2

    event = events_pb2.ProcessEvent(
        pid=PID_BASE,
        name="bench-process",
        executable_path="/usr/bin/bench-process",
        ppid=1,
        user_id=1000,
        kind=events_pb2.PROCESS_EVENT_KIND_START,
    )
    event.observed_at.seconds = 1_700_000_000
    event.observed_at.nanos = 123_456_789
    prefix = "/usr/bin/bench-process --padding="
    for pad in range(size):
        event.command_line = prefix + "x" * pad
        if event.ByteSize() >= size:
            break
    if event.ByteSize() != size:
        # A length prefix grew by a byte and skipped the size: trim the name.
        event.name = event.name[:-1]
    if event.ByteSize() != size:
        raise ValueError(f"cannot build a ProcessEvent of exactly {size} bytes")
    return event


# -- roles -------------------------------------------------------------------------------


def _run(coro: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    from daemoneye_eventbus.runtime import run

    async def main() -> dict[str, Any]:
        return await coro()

    return run(main())


def _topics() -> tuple[Any, Any]:
    from daemoneye.eventbus.v1 import registry

    assert dotted(TOPIC) == registry.EVENTS_PROCESS_LIFECYCLE.name
    assert dotted(ECHO_TOPIC) == registry.EVENTS_PROCESS_METADATA.name
    return registry.EVENTS_PROCESS_LIFECYCLE, registry.EVENTS_PROCESS_METADATA


def _pub(ctl: Ctl, path: str, params: dict[str, Any]) -> dict[str, Any]:
    from daemoneye_eventbus.client import Client

    count: int = params["count"]
    #: Events per second, 0 for flat out (benchmarks/e2e.py --rate).
    rate: float = params.get("rate", 0.0)
    ns_per_event = _NS / rate if rate > 0 else 0.0
    topic, _ = _topics()

    async def run() -> dict[str, Any]:
        event = make_event()
        async with Client(
            path, name=f"bench-pub-{ctl.index}", component=PUBLISHER, request_timeout=30.0
        ) as client:
            ctl.ready()
            ctl.wait_go()  # blocks the loop: nothing to do before the start
            start_ns = time.perf_counter_ns()
            sent = 0
            for i in range(count):
                event.pid = PID_BASE + i
                await client.publish(topic, event)
                sent += 1
                if sent % YIELD_EVERY == 0:
                    # Let the coalesced writes go out; with a rate, wait until
                    # the next events are due.
                    ahead = start_ns + sent * ns_per_event - time.perf_counter_ns()
                    await asyncio.sleep(ahead / _NS if ahead > 0 else 0)
                    if ctl.expired():
                        break
            published_ns = time.perf_counter_ns()
            await client.flush()
            flushed_ns = time.perf_counter_ns()
            stats = client.statistics()
        return {
            "sent": sent,
            "start_ns": start_ns,
            "published_ns": published_ns,
            "flushed_ns": flushed_ns,
            "refused": stats.refused,
        }

    return _run(run)


def _sub(ctl: Ctl, path: str, params: dict[str, Any]) -> dict[str, Any]:
    from daemoneye_eventbus.client import Client
    from daemoneye_eventbus.errors import ConnectionClosed, RequestTimeout

    expected: int = params["expected"]
    flt = dotted(params["filter"])

    async def run() -> dict[str, Any]:
        async with Client(
            path, name=f"bench-sub-{ctl.index}", component=SUBSCRIBER, request_timeout=30.0
        ) as client:
            sub = await client.subscribe(
                flt, max_pending=SUB_MAX_PENDING, lossless=params.get("lossless", False)
            )
            ctl.ready()
            ctl.synced()  # the broker acknowledged the subscription
            tracker = IdleTracker(ctl, IDLE_AFTER_PUBLISHERS)
            count = first_ns = last_ns = 0
            reason = "complete"
            while count < expected:
                try:
                    await sub.get(timeout=0.25)
                except RequestTimeout:
                    stop = tracker.reason()
                    if stop:
                        reason = stop
                        break
                    continue
                except ConnectionClosed as exc:
                    reason = f"connection closed: {exc}"
                    break
                # Take whatever else arrived in the same batch: one timestamp per
                # batch keeps the clock out of the per-event cost.
                batch = 1
                while sub.get_nowait() is not None:
                    batch += 1
                now = time.perf_counter_ns()
                first_ns = first_ns or now
                last_ns = now
                tracker.progress(now)
                count += batch
        return {
            "received": count,
            "first_ns": first_ns,
            "last_ns": last_ns,
            "missed": sub.missed,
            "dropped": sub.dropped,
            "reason": reason,
        }

    return _run(run)


def _stalled(ctl: Ctl, path: str, params: dict[str, Any]) -> dict[str, Any]:
    from daemoneye_eventbus.client import Client

    flt = dotted(params["filter"])

    async def run() -> dict[str, Any]:
        client = Client(path, name="bench-stalled", component=SUBSCRIBER, request_timeout=30.0)
        await client.connect()
        await client.subscribe(flt, max_pending=SUB_MAX_PENDING)
        ctl.ready()
        ctl.synced()
        ctl.wait_stop()  # blocks the event loop: the socket is never read again
        connected = client.is_connected
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5.0):
                await client.close()
        return {"stalled": True, "still_connected": connected}

    return _run(run)


def _holder(ctl: Ctl, path: str, params: dict[str, Any]) -> dict[str, Any]:
    from daemoneye_eventbus.client import Client

    filters = [dotted(f) for f in params["filters"]]

    async def run() -> dict[str, Any]:
        async with Client(
            path,
            name=f"bench-holder-{ctl.index}",
            component=SUBSCRIBER,
            request_timeout=120.0,
            max_pending=16,
        ) as client:
            for start in range(0, len(filters), SUBSCRIBE_WINDOW):
                chunk = filters[start : start + SUBSCRIBE_WINDOW]
                await asyncio.gather(*(client.subscribe(f) for f in chunk))
            ctl.ready(subscriptions=len(filters))
            ctl.synced()
            await asyncio.to_thread(ctl.wait_stop)  # the loop still answers heartbeats
            received = client.statistics().received
        return {"subscriptions": len(filters), "received": received}

    return _run(run)


def _idle(ctl: Ctl, path: str, params: dict[str, Any]) -> dict[str, Any]:
    from daemoneye_eventbus.client import Client
    from daemoneye_eventbus.errors import EventBusError

    n: int = params["clients"]
    flt = dotted(IDLE_TOPIC)

    async def run() -> dict[str, Any]:
        clients: list[Client] = []
        retries: list[str] = []

        async def open_one(i: int) -> None:
            # A refused or failed connect is retried (as a real client would),
            # and reported: the suite notes how many there were and why.
            for attempt in range(CONNECT_ATTEMPTS):
                client = Client(
                    path,
                    name=f"bench-idle-{ctl.index}-{i}",
                    component=SUBSCRIBER,
                    request_timeout=30.0,
                    connect_timeout=30.0,
                )
                try:
                    await client.connect()
                except (EventBusError, OSError) as exc:
                    if attempt == CONNECT_ATTEMPTS - 1:
                        raise
                    retries.append(f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(0.05 * 2**attempt)
                    continue
                clients.append(client)
                await client.subscribe(flt, max_pending=16)
                return

        try:
            for start in range(0, n, 25):
                await asyncio.gather(*(open_one(i) for i in range(start, min(n, start + 25))))
            ctl.ready(clients=len(clients))
            await asyncio.to_thread(ctl.wait_stop)
            connected = sum(c.is_connected for c in clients)
        finally:
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        return {
            "clients": len(clients),
            "still_connected": connected,
            "retries": len(retries),
            "retry_reasons": sorted(set(retries))[:3],
        }

    return _run(run)


def _echo(ctl: Ctl, path: str, params: dict[str, Any]) -> dict[str, Any]:
    from daemoneye_eventbus.client import Client
    from daemoneye_eventbus.errors import ConnectionClosed, RequestTimeout

    topic, echo_topic = _topics()
    echo_name = echo_topic.name

    async def run() -> dict[str, Any]:
        echoed = 0
        async with (
            Client(path, name="bench-echo-in", component=SUBSCRIBER, request_timeout=30.0) as rx,
            Client(path, name="bench-echo-out", component=PUBLISHER, request_timeout=30.0) as tx,
        ):
            sub = await rx.subscribe(topic, max_pending=SUB_MAX_PENDING)
            ctl.ready()
            ctl.synced()
            while not ctl.stop.is_set() and not ctl.expired():
                try:
                    event = await sub.get(timeout=0.25)
                except RequestTimeout:
                    continue
                except ConnectionClosed:
                    break
                # Forward the payload bytes, as every peer's echo does.
                await tx.publish_raw(echo_name, event.payload_type, event.payload)
                echoed += 1
        return {"echoed": echoed, "missed": sub.missed, "dropped": sub.dropped}

    return _run(run)


def _ping(ctl: Ctl, path: str, params: dict[str, Any]) -> dict[str, Any]:
    from daemoneye_eventbus.client import Client
    from daemoneye_eventbus.errors import RequestTimeout

    count: int = params["count"]
    warmup: int = params["warmup"]
    topic, echo_topic = _topics()

    async def run() -> dict[str, Any]:
        event = make_event()
        rtts: list[int] = []
        lost = stale = 0
        async with (
            Client(path, name="bench-ping-in", component=SUBSCRIBER, request_timeout=30.0) as rx,
            Client(path, name="bench-ping-out", component=PUBLISHER, request_timeout=30.0) as tx,
        ):
            sub = await rx.subscribe(echo_topic, max_pending=SUB_MAX_PENDING)
            ctl.ready()
            ctl.wait_go()  # blocks the loop: nothing to do before the start
            start_ns = end_ns = time.perf_counter_ns()
            for i in range(warmup + count):
                if ctl.expired():
                    break
                pid = PID_BASE + i
                event.pid = pid
                t0 = time.perf_counter_ns()
                await tx.publish(topic, event)
                while True:
                    try:
                        echo = await sub.get(timeout=2.0)
                    except RequestTimeout:
                        lost += 1
                        break
                    t1 = time.perf_counter_ns()
                    if echo.message().pid == pid:
                        if i >= warmup:
                            rtts.append(t1 - t0)
                        break
                    stale += 1  # a late echo of an earlier round trip
                end_ns = time.perf_counter_ns()
        return {
            "rtts_ns": rtts,
            "lost": lost,
            "stale": stale,
            "start_ns": start_ns,
            "end_ns": end_ns,
            "round_trips": warmup + count - lost,
            "missed": sub.missed,
            "dropped": sub.dropped,
        }

    return _run(run)


def _health_topic() -> Any:
    """The request topic of workload R: a collector's health, answered by it."""
    from daemoneye.eventbus.v1 import registry

    return registry.CONTROL_COLLECTOR_RPC_HEALTH.build(id="bench")


def _responder(ctl: Ctl, path: str, params: dict[str, Any]) -> dict[str, Any]:
    from daemoneye.eventbus.v1 import control_pb2
    from daemoneye_eventbus.client import Client

    async def run() -> dict[str, Any]:
        answered = 0
        reply = control_pb2.HealthCheckReply(status=control_pb2.RPC_STATUS_SUCCESS)
        async with (
            Client(path, name="bench-responder", component=PUBLISHER, request_timeout=30.0) as c,
            c.serve(_health_topic()) as requests,
        ):

            async def answer() -> None:
                nonlocal answered
                async for request in requests:
                    reply.component.component_id = request.message.component_id
                    await request.reply(reply)
                    answered += 1

            ctl.ready()
            ctl.synced()
            task = asyncio.ensure_future(answer())
            while not (ctl.stop.is_set() or ctl.expired() or task.done()):
                await asyncio.wait({task}, timeout=0.25)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return {"echoed": answered}

    return _run(run)


def _requester(ctl: Ctl, path: str, params: dict[str, Any]) -> dict[str, Any]:
    from daemoneye.eventbus.v1 import control_pb2
    from daemoneye_eventbus.client import Client
    from daemoneye_eventbus.errors import RequestTimeout

    count: int = params["count"]
    warmup: int = params["warmup"]

    async def run() -> dict[str, Any]:
        topic = _health_topic()
        request = control_pb2.HealthCheckRequest()
        rtts: list[int] = []
        lost = stale = 0
        async with Client(
            path, name="bench-requester", component=SUBSCRIBER, request_timeout=30.0
        ) as client:
            ctl.ready()
            ctl.wait_go()  # blocks the loop: nothing to do before the start
            start_ns = end_ns = time.perf_counter_ns()
            for i in range(warmup + count):
                if ctl.expired():
                    break
                request.component_id = str(PID_BASE + i)
                t0 = time.perf_counter_ns()
                try:
                    reply = await client.request(topic, request, timeout=2.0)
                except RequestTimeout:
                    lost += 1
                    continue
                t1 = time.perf_counter_ns()
                if reply.component.component_id != request.component_id:
                    stale += 1  # never: each reply goes to its own request
                elif i >= warmup:
                    rtts.append(t1 - t0)
            end_ns = time.perf_counter_ns()
        return {
            "rtts_ns": rtts,
            "lost": lost,
            "stale": stale,
            "start_ns": start_ns,
            "end_ns": end_ns,
            "round_trips": warmup + count - lost,
        }

    return _run(run)


ROLES: Final[dict[str, RoleFunction]] = {
    "pub": _pub,
    "sub": _sub,
    "stalled": _stalled,
    "holder": _holder,
    "idle": _idle,
    "echo": _echo,
    "ping": _ping,
    "responder": _responder,
    "requester": _requester,
}
