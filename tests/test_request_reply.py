"""Request/reply end to end: real brokers, real Unix sockets, responder processes.

Responders run as separate processes (``tests/workers.py serve``) where it
matters: killed while they hold a request, or competing for a work queue.
Raw peers (``tests/rawpeer.py``) play the responder where the test needs
what a normal client never sends (a stolen token, a wrong reply type). The
collectors' request topics are privileged: the agent asks, the collectors
answer; the tests run as root (or the broker's user), whom the default
policy lets claim any component, and the last test uses real users.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import AGENT, PROCMOND, TEST_CONFIG, worker_cmd, worker_env
from rawpeer import RawPeer, describe, kind
from serving import broker_process
from test_access_integration import (  # the real users' fixtures, and their helpers
    Users,
    shared_dir,  # noqa: F401
    users,  # noqa: F401
    users_config,
    worker_environment,
)

from daemoneye.eventbus.v1 import control_pb2, frames_pb2, registry
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode, Frame
from daemoneye_eventbus import (
    DaemoneyeEventBus,
    IncomingRequest,
    NoResponders,
    RequestFailed,
    RequestTimeout,
)
from daemoneye_eventbus.access import Policy
from daemoneye_eventbus.broker import Broker
from daemoneye_eventbus.client import Client, build_publish
from daemoneye_eventbus.correlation import new_correlation
from daemoneye_eventbus.errors import (
    AccessDenied,
    BrokenResourceError,
    EventBusError,
    InvalidTopic,
    LimitExceeded,
    PayloadTypeMismatch,
)
from daemoneye_eventbus.responders import Responder

EC = ErrorCode
QUEUE = registry.CONTROL_COLLECTOR_QUEUE  # TaskAssignment -> TaskAck, any task type
SCAN = registry.control_collector_queue(type="scan")
HEALTH = registry.CONTROL_COLLECTOR_RPC_HEALTH
AUDIT = "daemoneye_eventbus.audit"
ME = os.geteuid()


def task(task_id: str) -> control_pb2.TaskAssignment:
    return control_pb2.TaskAssignment(task_id=task_id, task_type="scan")


def ack(
    request: IncomingRequest[control_pb2.TaskAssignment, control_pb2.TaskAck],
) -> control_pb2.TaskAck:
    return control_pb2.TaskAck(
        task_id=request.message.task_id, collector_id="local", status=control_pb2.RPC_STATUS_SUCCESS
    )


# -- responder processes ------------------------------------------------------------------


class Worker:
    """A ``tests/workers.py serve`` process and the JSON lines it prints."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def line(self, timeout: float = 15.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        assert raw, f"worker {self.proc.pid} exited ({await self.proc.wait()})"
        value = json.loads(raw)
        assert isinstance(value, dict)
        return value


@contextlib.asynccontextmanager
async def responders(path: str, count: int, *args: str) -> AsyncIterator[list[Worker]]:
    """``count`` responder processes serving the work queue, each ready; killed after."""
    procs = [
        await asyncio.create_subprocess_exec(
            *worker_cmd("serve", "--socket", path, "--publisher", str(i), *args),
            stdout=asyncio.subprocess.PIPE,
            env=worker_env(),
        )
        for i in range(1, count + 1)
    ]
    workers = [Worker(p) for p in procs]
    try:
        for worker in workers:
            assert await worker.line() == {"ready": True}
        yield workers
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def serving(
    requests: Responder[control_pb2.TaskAssignment, control_pb2.TaskAck],
    answer: Callable[
        [IncomingRequest[control_pb2.TaskAssignment, control_pb2.TaskAck]], Awaitable[None]
    ]
    | None = None,
) -> None:
    """Answer every request with :func:`ack` (or ``answer``) until the responder ends."""
    async for request in requests:
        if answer is None:
            await request.reply(ack(request))
        else:
            await answer(request)


@contextlib.asynccontextmanager
async def background(coro: Awaitable[None]) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.ensure_future(coro)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait (polling) until ``predicate()`` holds, at most ``timeout`` seconds."""
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    assert predicate()


# == across processes =================================================================


async def test_a_request_and_its_reply_cross_processes(sock_dir: Path) -> None:
    """The broker, the responder and the requester are three processes."""
    path = str(sock_dir / "bus.sock")
    async with (
        broker_process(path),
        responders(path, 1) as (worker,),
        Client(path, name="agent", component=AGENT) as agent,
    ):
        reply = await agent.request(
            SCAN, task("t-1"), timeout=10, correlation=new_correlation("scan-7")
        )
        assert isinstance(reply, control_pb2.TaskAck)
        assert (reply.task_id, reply.collector_id) == ("t-1", "r1")
        assert reply.status == control_pb2.RPC_STATUS_SUCCESS
        seen = await worker.line()
        assert seen["topic"] == "control.collector.queue.scan"
        assert (seen["requester"], seen["correlation"]) == (AGENT, "scan-7")
        assert seen["event_id"] >= 1
        assert 9.0 < seen["remaining"] <= 10.0
        stats = await agent.broker_statistics()
        assert (stats.requests, stats.no_responders, stats.request_timeouts) == (1, 0, 0)


async def test_a_request_with_no_responder_fails_at_once(broker: Broker, sock_path: str) -> None:
    async with Client(sock_path, component=AGENT) as agent:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(NoResponders) as caught:
            await agent.request(SCAN, task("t-1"), timeout=30)
        assert loop.time() - start < 1.0  # not the 30 s deadline
        assert caught.value.code == EC.ERROR_CODE_NO_RESPONDERS
        assert agent.statistics().refused == 0  # raised to the caller, not to on_error
    stats = broker.statistics()
    assert (stats.requests, stats.no_responders, stats.refused) == (0, 1, 0)


async def test_a_killed_responder_leaves_its_request_to_time_out_at_the_deadline(
    broker: Broker, sock_path: str
) -> None:
    timeout = 2.0
    async with (
        responders(sock_path, 1, "--hold") as (worker,),
        Client(sock_path, component=AGENT) as agent,
    ):
        loop = asyncio.get_running_loop()
        start = loop.time()
        asking = asyncio.ensure_future(agent.request(SCAN, task("t-1"), timeout=timeout))
        assert (await worker.line())["task"] == "t-1"  # the responder holds it
        os.kill(worker.proc.pid, signal.SIGKILL)
        await worker.proc.wait()
        with pytest.raises(RequestTimeout):
            await asking
        elapsed = loop.time() - start
        assert timeout <= elapsed < timeout + 1.0
        # The broker's own deadline (from its receipt) passes a moment later.
        await until(lambda: broker.statistics().request_timeouts == 1, timeout=1.0)
        assert broker.router.requests.pending(next(iter(broker.sessions())).endpoint) == 0


async def test_the_broker_times_a_request_out_precisely(broker: Broker, sock_path: str) -> None:
    """Without a client-side deadline (a raw peer), the broker's Error comes at the deadline."""
    async with (
        responders(sock_path, 1, "--hold") as (worker,),
        await RawPeer.connect(sock_path, component=AGENT) as requester,
    ):
        publish = build_publish(SCAN, task("t-1"))
        start = time.monotonic()
        await requester.send(
            Frame(request=frames_pb2.Request(request_id=77, publish=publish, timeout_ms=1000))
        )
        assert (await worker.line())["task"] == "t-1"
        frame = await requester.recv(timeout=5)
        elapsed = time.monotonic() - start
        assert kind(frame) == "error", describe([frame])
        error = frame.error
        assert (error.code, error.fatal, error.request_id) == (
            EC.ERROR_CODE_REQUEST_TIMEOUT,
            False,
            77,
        )
        # At the deadline (the broker arms a timer for it; its precision is for benchmarks).
        assert 1.0 <= elapsed < 1.5
        await requester.roundtrip()  # the connection goes on


async def test_responders_of_a_work_queue_take_turns(broker: Broker, sock_path: str) -> None:
    async with (
        responders(sock_path, 3),
        Client(sock_path, component=AGENT) as agent,
    ):
        served: Counter[str] = Counter()
        for i in range(30):
            reply = await agent.request(SCAN, task(f"t-{i}"), timeout=10)
            served[reply.collector_id] += 1
        assert served == {"r1": 10, "r2": 10, "r3": 10}
        # Concurrent requests are shared too.
        replies = await asyncio.gather(
            *(agent.request(SCAN, task(f"u-{i}"), timeout=10) for i in range(30))
        )
        assert Counter(r.collector_id for r in replies) == {"r1": 10, "r2": 10, "r3": 10}


# == access ==========================================================================


async def test_who_may_serve(broker: Broker, sock_path: str) -> None:
    async with (
        Client(sock_path, component=AGENT) as agent,
        Client(sock_path, name="anon") as anonymous,
        Client(sock_path, component="netmond") as netmond,
    ):
        # The agent asks; it is not among the collectors that answer.
        with pytest.raises(AccessDenied, match="matches no request topic that daemoneye-agent"):
            await agent.serve(QUEUE).start()
        with pytest.raises(AccessDenied, match="an anonymous peer"):
            await anonymous.serve(QUEUE).start()
        # A topic without a reply type: nothing to serve (mypy says so too).
        with pytest.raises(TypeError, match="takes a request topic or template"):
            netmond.serve(registry.CONTROL_COLLECTOR_TASK_TARGETED)  # type: ignore[arg-type]
        async with netmond.serve(QUEUE) as requests, background(serving(requests)):
            assert (await agent.request(SCAN, task("t-1"))).task_id == "t-1"


async def test_who_may_ask(sock_path: str) -> None:
    policy = Policy.from_mapping(
        {"components": {"daemoneye-agent": {"uids": [ME]}, "procmond": {"uids": [ME]}}}
    )  # the agent is not privileged here
    async with (
        Broker(sock_path, dataclasses.replace(TEST_CONFIG, policy=policy)) as broker,
        Client(sock_path, component=PROCMOND) as procmond,
        Client(sock_path, name="anon") as anonymous,
        Client(sock_path, component=AGENT) as agent,
        procmond.serve(QUEUE) as requests,
        background(serving(requests)),
    ):
        with pytest.raises(AccessDenied, match="anonymous peers may publish only on public topics"):
            await anonymous.request(SCAN, task("t-1"))
        with pytest.raises(AccessDenied, match="'procmond' is not a publisher"):
            await procmond.request(SCAN, task("t-2"))
        with pytest.raises(AccessDenied, match="is not privileged"):
            await agent.request(SCAN, task("t-3"))
        assert requests.received == 0
        assert broker.statistics().refused == 3


async def test_a_stolen_token_is_an_unknown_request_and_the_real_reply_still_goes(
    broker: Broker, sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        await RawPeer.connect(sock_path, component=PROCMOND) as responder,
        await RawPeer.connect(sock_path, component=PROCMOND) as thief,
        Client(sock_path, component=AGENT) as agent,
    ):
        await responder.send(
            Frame(
                subscribe=frames_pb2.Subscribe(subscription_id=1, filter=QUEUE.filter, respond=True)
            )
        )
        await responder.expect("subscribe_ack")
        asking = asyncio.ensure_future(agent.request(SCAN, task("t-1"), timeout=10))
        deliver = (await responder.expect("request_deliver")).request_deliver
        assert deliver.subscription_id == 1
        assert deliver.requester == AGENT
        assert frames_pb2.Publish.FromString(deliver.publish.SerializeToString()).topic == SCAN.name
        forged = control_pb2.TaskAck(task_id="t-1", collector_id="thief")
        with caplog.at_level(logging.WARNING, logger=AUDIT):
            for token in (deliver.token, deliver.token + 1):  # stolen, and guessed
                await thief.send(
                    Frame(
                        reply=frames_pb2.Reply(
                            token=token,
                            payload_type=QUEUE.reply_name,
                            payload=forged.SerializeToString(),
                        )
                    )
                )
                error = (await thief.expect("error")).error
                assert (error.code, error.fatal) == (EC.ERROR_CODE_UNKNOWN_REQUEST, False)
        assert not asking.done()
        real = control_pb2.TaskAck(task_id="t-1", collector_id="real")
        await responder.send(
            Frame(
                reply=frames_pb2.Reply(
                    token=deliver.token,
                    payload_type=QUEUE.reply_name,
                    payload=real.SerializeToString(),
                )
            )
        )
        assert (await asking).collector_id == "real"
    refused = [r for r in caplog.records if r.name == AUDIT and "reply_refused" in r.getMessage()]
    assert len(refused) == 2
    assert broker.router.refusals() == {EC.ERROR_CODE_UNKNOWN_REQUEST: 2}


async def test_a_reply_of_the_wrong_type_is_refused(broker: Broker, sock_path: str) -> None:
    async with (
        await RawPeer.connect(sock_path, component=PROCMOND) as responder,
        Client(sock_path, component=AGENT) as agent,
        Client(sock_path, component=PROCMOND) as procmond,
    ):
        await responder.send(
            Frame(
                subscribe=frames_pb2.Subscribe(subscription_id=1, filter=QUEUE.filter, respond=True)
            )
        )
        await responder.expect("subscribe_ack")
        asking = asyncio.ensure_future(agent.request(SCAN, task("t-1"), timeout=10))
        token = (await responder.expect("request_deliver")).request_deliver.token
        wrong = control_pb2.HealthCheckReply(status=control_pb2.RPC_STATUS_SUCCESS)
        for reply in (
            frames_pb2.Reply(
                token=token, payload_type=HEALTH.reply_name, payload=wrong.SerializeToString()
            ),
            frames_pb2.Reply(token=token, payload_type=QUEUE.reply_name, payload=b"\x0a\x07t"),
        ):
            await responder.send(Frame(reply=reply))
            error = (await responder.expect("error")).error
            assert error.code in (EC.ERROR_CODE_PAYLOAD_MISMATCH, EC.ERROR_CODE_INVALID_PAYLOAD)
        await responder.send(Frame(reply=frames_pb2.Reply(token=token, error="cannot scan now")))
        with pytest.raises(RequestFailed) as caught:
            await asking
        assert (caught.value.reason, caught.value.responder) == ("cannot scan now", PROCMOND)
        # The typed client refuses a wrong reply before it leaves.
        async with procmond.serve(QUEUE) as requests:
            asking = asyncio.ensure_future(agent.request(SCAN, task("t-2"), timeout=10))
            asking_too = asyncio.ensure_future(agent.request(SCAN, task("t-3"), timeout=10))
            token = (await responder.expect("request_deliver")).request_deliver.token
            request = await requests.get(timeout=5)
            with pytest.raises(PayloadTypeMismatch):
                await request.reply(wrong)  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                await request.reply(wrong)  # type: ignore[arg-type]
            await request.reply(ack(request))
            await responder.send(Frame(reply=frames_pb2.Reply(token=token, error="no")))
            results = await asyncio.gather(asking, asking_too, return_exceptions=True)
            assert sorted(type(r).__name__ for r in results) == ["RequestFailed", "TaskAck"]


async def test_a_plain_publish_on_a_request_topic_is_refused(
    broker: Broker, sock_path: str
) -> None:
    async with Client(sock_path, component=AGENT) as agent:
        errors: list[EventBusError] = []
        agent.on_error = errors.append
        await agent.publish(SCAN, task("t-1"))
        await agent.flush()
        assert [type(e) for e in errors] == [InvalidTopic]
        assert "is a request topic: send a Request" in str(errors[0])


# == limits and deadlines =============================================================


async def test_pending_requests_are_bounded(sock_path: str) -> None:
    cfg = dataclasses.replace(TEST_CONFIG, max_pending_requests=2, max_total_pending_requests=3)
    async with (
        Broker(sock_path, cfg) as broker,
        Client(sock_path, component=AGENT) as agent,
        Client(sock_path, component=AGENT) as other,
        Client(sock_path, component=PROCMOND) as procmond,
        procmond.serve(QUEUE) as held,  # takes requests, never answers
    ):
        assert agent.limits.max_pending_requests == 2
        waiting = [
            asyncio.ensure_future(agent.request(SCAN, task(f"t-{i}"), timeout=3)) for i in range(2)
        ]
        await until(lambda: held.received == 2)
        with pytest.raises(LimitExceeded, match="already has 2 requests waiting") as caught:
            await agent.request(SCAN, task("t-3"), timeout=3)
        assert caught.value.code == EC.ERROR_CODE_LIMIT_EXCEEDED
        waiting.append(asyncio.ensure_future(other.request(SCAN, task("u-1"), timeout=3)))
        await until(lambda: held.received == 3)
        stats = await agent.broker_statistics()
        assert sorted(c.pending_requests for c in stats.connection_stats) == [0, 1, 2]
        with pytest.raises(LimitExceeded, match="the broker already holds 3"):
            await other.request(SCAN, task("u-2"), timeout=3)
        # One answered: room again.
        request = await held.get(timeout=5)
        await request.reply(ack(request))
        done = [await asyncio.wait_for(w, 5) for w in waiting if await _answered(w)]
        assert len(done) == 1
        async with background(serving(held)):
            assert (await other.request(SCAN, task("u-3"), timeout=3)).task_id == "u-3"
        assert broker.statistics().refused == 2
        for w in waiting:
            w.cancel()


async def _answered(fut: asyncio.Future[Any]) -> bool:
    await asyncio.sleep(0.2)
    return fut.done() and not fut.cancelled() and fut.exception() is None


async def test_a_request_past_its_deadline_is_dropped_by_the_responder(
    broker: Broker, sock_path: str
) -> None:
    async with (
        Client(sock_path, component=AGENT) as agent,
        Client(sock_path, component=PROCMOND) as procmond,
        procmond.serve(QUEUE) as requests,
    ):
        with pytest.raises(RequestTimeout):
            await agent.request(SCAN, task("late"), timeout=0.2)
        assert (requests.received, len(requests)) == (1, 1)  # it came, nobody read it in time
        asking = asyncio.ensure_future(agent.request(SCAN, task("fresh"), timeout=5))
        request = await requests.get(timeout=5)
        assert request.message.task_id == "fresh"
        assert requests.expired == 1
        assert 0 < request.remaining <= 5
        await request.reply(ack(request))
        assert (await asking).task_id == "fresh"


async def test_the_requester_sees_its_connection_end(sock_path: str) -> None:
    broker = Broker(sock_path, TEST_CONFIG)
    await broker.start()
    async with (
        Client(sock_path, component=AGENT) as agent,
        Client(sock_path, component=PROCMOND) as procmond,
        procmond.serve(QUEUE) as held,
    ):
        asking = asyncio.ensure_future(agent.request(SCAN, task("t-1"), timeout=30))
        await until(lambda: held.received == 1)
        await broker.close()
        with pytest.raises(BrokenResourceError):
            await asking
        # A responder without reconnect ends with its connection, as a subscription does.
        with pytest.raises(BrokenResourceError):
            await held.get(timeout=5)


async def test_a_responder_serves_again_after_a_reconnect(sock_path: str) -> None:
    async with Broker(sock_path, TEST_CONFIG) as first:
        procmond = Client(sock_path, component=PROCMOND, reconnect=True, reconnect_delay=0.05)
        await procmond.connect()
        requests = await procmond.serve(QUEUE).start()
        await first.close()
        async with Broker(sock_path, TEST_CONFIG) as second, background(serving(requests)):
            await until(lambda: len(second.router) == 1, timeout=10)
            async with Client(sock_path, component=AGENT) as agent:
                assert (await agent.request(SCAN, task("t-1"))).task_id == "t-1"
            await requests.stop()
            await procmond.close()


# == in process, and the reference API ===============================================


async def test_in_process_requests_and_responders(broker: Broker, sock_path: str) -> None:
    agent = broker.local_session("agent", AGENT)
    collector = broker.local_session("procmond-1", PROCMOND)
    async with (
        collector.serve(QUEUE) as local_requests,
        Client(sock_path, component=PROCMOND) as procmond,
        Client(sock_path, component=AGENT) as remote_agent,
    ):
        async with background(serving(local_requests)):
            # In process to in process, and a socket client to an in-process responder.
            assert (await agent.request(SCAN, task("t-1"))).task_id == "t-1"
            assert (await remote_agent.request(SCAN, task("t-2"))).task_id == "t-2"
        await local_requests.stop()
        async with procmond.serve(QUEUE) as remote_requests:

            async def fail(request: IncomingRequest[Any, Any]) -> None:
                await request.fail(f"busy with {request.message.task_id}")

            async with background(serving(remote_requests, fail)):
                # In process to a socket responder.
                with pytest.raises(RequestFailed, match="busy with t-3"):
                    await agent.request(SCAN, task("t-3"))
        with pytest.raises(NoResponders):
            await agent.request(SCAN, task("t-4"), timeout=30)
        # A socket agent may not serve the collectors' topics; in process the
        # agent's code is trusted (it holds the broker): it may.
        with pytest.raises(AccessDenied):
            await remote_agent.serve(QUEUE).start()
    async with agent.serve(QUEUE) as held:
        with pytest.raises(RequestTimeout):
            await collector.request(SCAN, task("t-5"), timeout=0.1)
        assert held.received == 1
    agent.end()
    collector.end()
    with pytest.raises(EventBusError):
        await agent.request(SCAN, task("t-6"))


async def test_the_reference_api_asks_and_answers(broker: Broker, sock_path: str) -> None:
    local = await DaemoneyeEventBus.from_broker(broker)
    remote = await DaemoneyeEventBus.connect(sock_path, component=AGENT)
    try:
        async with local.serve(QUEUE) as requests:

            async def answer(request: IncomingRequest[Any, Any]) -> None:
                assert request.correlation is not None
                await request.reply(
                    control_pb2.TaskAck(
                        task_id=request.message.task_id,
                        collector_id=request.correlation.correlation_id,
                    )
                )

            async with background(serving(requests, answer)):
                reply = await remote.request(SCAN, task("t-1"), correlation="corr-1", timeout=5)
                assert (reply.task_id, reply.collector_id) == ("t-1", "corr-1")
                reply = await local.request(SCAN, task("t-2"), correlation="corr-2")
                assert (reply.task_id, reply.collector_id) == ("t-2", "corr-2")
    finally:
        await remote.shutdown()
        await local.shutdown()


# == statistics and metrics ==========================================================


async def test_request_figures_in_statistics_and_metrics(broker: Broker, sock_path: str) -> None:
    async with (
        Client(sock_path, component=AGENT) as agent,
        Client(sock_path, component=PROCMOND) as procmond,
    ):
        with pytest.raises(NoResponders):
            await agent.request(SCAN, task("t-0"))
        async with procmond.serve(QUEUE) as requests:
            async with background(serving(requests)):
                await agent.request(SCAN, task("t-1"))
            with pytest.raises(RequestTimeout):
                await agent.request(SCAN, task("t-2"), timeout=0.2)
            await until(lambda: broker.statistics().request_timeouts == 1, timeout=2)
        stats = await agent.broker_statistics()
        assert (stats.requests, stats.no_responders, stats.request_timeouts) == (2, 1, 1)
        metrics = broker.metrics_registry()
        ns = "daemoneye_eventbus"
        assert metrics.get_sample_value(f"{ns}_requests_total") == 2
        assert metrics.get_sample_value(f"{ns}_requests_no_responders_total") == 1
        assert metrics.get_sample_value(f"{ns}_request_timeouts_total") == 1
        assert metrics.get_sample_value(f"{ns}_pending_requests") == 0


# == real users =======================================================================

#: Runs as root to import everything, drops to the given user, then serves or asks.
RPC_WORKER = r"""
import asyncio
import json
import os
import pwd
import sys

from daemoneye.eventbus.v1 import control_pb2, registry
from daemoneye_eventbus.client import Client


def emit(**fields):
    print(json.dumps(fields), flush=True)


def drop_privileges(user):
    pw = pwd.getpwnam(user)
    os.setgroups(os.getgrouplist(user, pw.pw_gid))
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)


async def serve(path, component):
    async with Client(path, name="rpc-serve", component=component) as client:
        try:
            requests = await client.serve(registry.CONTROL_COLLECTOR_QUEUE).start()
        except Exception as exc:
            emit(error=type(exc).__name__, message=str(exc))
            return
        emit(ready=True)
        async for request in requests:
            answer = control_pb2.TaskAck(
                task_id=request.message.task_id, collector_id=f"uid-{os.getuid()}"
            )
            await request.reply(answer)


async def ask(path, component):
    async with Client(path, name="rpc-ask", component=component) as client:
        topic = registry.control_collector_queue(type="scan")
        message = control_pb2.TaskAssignment(task_id="t-1")
        try:
            reply = await client.request(topic, message, timeout=10)
        except Exception as exc:
            emit(error=type(exc).__name__, message=str(exc))
            return
        emit(reply=reply.collector_id)


role, user, path, component = sys.argv[1:5]
asyncio.run(asyncio.sleep(0))  # load what the event loop imports lazily, while root
drop_privileges(user)
asyncio.run({"serve": serve, "ask": ask}[role](path, component))
"""


async def rpc_worker(role: str, user: str, path: str, component: str) -> Worker:
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-c", RPC_WORKER, role, user, path, component),
        stdout=asyncio.subprocess.PIPE,
        env=worker_environment(),
        cwd="/",
    )
    return Worker(proc)


async def test_real_users_collectors_answer_and_the_agent_asks(
    users: Users,  # noqa: F811
    shared_dir: Path,  # noqa: F811
) -> None:
    path = str(shared_dir / "bus.sock")
    async with Broker(path, users_config(users)):
        # The agent's user claims the agent: it may ask, not serve.
        refused = await rpc_worker("serve", "deb-agent", path, AGENT)
        assert (await refused.line())["error"] == "AccessDenied"
        collector = await rpc_worker("serve", "deb-collector", path, PROCMOND)
        try:
            assert await collector.line() == {"ready": True}
            # The collector's user may serve, not ask.
            asker = await rpc_worker("ask", "deb-collector", path, PROCMOND)
            line = await asker.line()
            assert line["error"] == "AccessDenied", line
            asker = await rpc_worker("ask", "deb-agent", path, AGENT)
            assert await asker.line() == {"reply": f"uid-{users.collector.pw_uid}"}
            for worker in (refused, asker):
                assert await worker.proc.wait() == 0
        finally:
            collector.proc.kill()
            await collector.proc.wait()


async def test_serve_options_set_the_request_limits_announced_in_welcome(sock_dir: Path) -> None:
    """``serve --max-pending-requests … --default-request-timeout …``: the limits
    the broker announces (Welcome.limits) and enforces are the ones given."""
    path = str(sock_dir / "opts.sock")
    options = (
        "--max-pending-requests",
        "2",
        "--max-total-pending-requests",
        "100",
        "--default-request-timeout",
        "0.4",
        "--max-request-timeout",
        "3",
    )
    async with broker_process(path, *options), Client(path, component=AGENT) as agent:
        limits = agent.limits
        assert (limits.max_pending_requests, limits.default_request_timeout_ms) == (2, 400)
        assert limits.max_request_timeout_ms == 3000
        queue = registry.control_collector_queue(type="scan")
        async with Client(path, component=PROCMOND) as collector, collector.serve(queue):
            # The responder takes requests and never answers: the broker's
            # default deadline (0.4 s, asked for by timeout=None) ends them.
            started = time.monotonic()
            waiting = [
                asyncio.ensure_future(agent.request(queue, control_pb2.TaskAssignment()))
                for _ in range(3)
            ]
            done = await asyncio.gather(*waiting, return_exceptions=True)
            elapsed = time.monotonic() - started
        kinds = sorted(type(result).__name__ for result in done)
        # Two wait for their deadline; the third is over max_pending_requests.
        assert kinds == ["LimitExceeded", "RequestTimeout", "RequestTimeout"], done
        assert 0.3 < elapsed < 3
