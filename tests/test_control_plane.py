"""The control plane across processes: an agent on the broker's in-process
session, collectors as separate processes (tests/control_workers.py)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import AGENT, PROCMOND, worker_env

from daemoneye.eventbus.v1 import registry
from daemoneye.eventbus.v1.control_pb2 import (
    LIFECYCLE_ACTION_START,
    LIFECYCLE_ACTION_STOP,
    RPC_STATUS_CANCELLED,
    RPC_STATUS_SUCCESS,
    RPC_STATUS_TIMEOUT,
    RPC_STATUS_UNAVAILABLE,
    CollectorLifecycleCommand,
    ConfigurationUpdate,
    HealthCheckRequest,
    TaskAssignment,
)
from daemoneye_eventbus import AccessDenied, Client
from daemoneye_eventbus.broker import Broker
from daemoneye_eventbus.control import (
    AggregateKind,
    AggregateState,
    Assignment,
    CollectorState,
    FailureReason,
    FirstAvailable,
    LeastLoaded,
    Queued,
    Random,
    RoundRobin,
    TaskFailed,
)
from daemoneye_eventbus.control.agent import Agent
from daemoneye_eventbus.correlation import new_correlation, with_stage

WORKER = Path(__file__).resolve().parent / "control_workers.py"
START = 30.0  # a collector process starting on a loaded machine


class Worker:
    """A collector process and the lines it printed."""

    def __init__(self, proc: asyncio.subprocess.Process, collector_id: str) -> None:
        self.proc = proc
        self.collector_id = collector_id
        self.lines: list[str] = []

    async def expect(self, prefix: str, timeout: float = 10.0) -> str:
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                line = (await self.proc.stdout.readline()).decode()
                if not line:
                    raise AssertionError(f"{self.collector_id} ended: {self.lines}")
                self.lines.append(line.strip())
                if line.startswith(prefix):
                    return line.strip()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)


@contextlib.asynccontextmanager
async def collector(sock: str, collector_id: str, *args: str) -> AsyncIterator[Worker]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER),
        sock,
        collector_id,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=worker_env(),
    )
    worker = Worker(proc, collector_id)
    try:
        await worker.expect("ready", START)
        yield worker
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


@pytest.fixture
async def agent(broker: Broker) -> AsyncIterator[Agent]:
    async with Agent(broker.local_session("agent", AGENT), ack_timeout=1.0) as a:
        yield a


def sock_of(broker: Broker) -> str:
    return str(broker.path)


def task(task_id: str, **parameters: str) -> TaskAssignment:
    return TaskAssignment(task_id=task_id, task_type="scan", parameters=parameters)


async def test_registration_and_capability_matching(broker: Broker, agent: Agent) -> None:
    sock = sock_of(broker)
    async with (
        collector(sock, "procmond-1", "--caps", "yara", "--tasks", "scan,hash"),
        collector(sock, "procmond-2", "--tasks", "scan"),
    ):
        await agent.wait_ready(2, timeout=10)
        one = agent.registry.get("procmond-1")
        assert one is not None
        assert one.state is CollectorState.READY
        assert one.collector_type == "process"
        assert one.capability_names == {"yara"}
        assert one.task_types == {"scan", "hash"}
        assert one.session_id
        yara = TaskAssignment(task_id="y", task_type="scan", required_capability="yara")
        for n in range(3):  # whatever the strategy, only procmond-1 offers yara
            yara.task_id = f"y{n}"
            agent.distribute(yara, strategy=RoundRobin())
            outcome = await agent.result(yara.task_id, timeout=10)
            assert outcome.ok
            assert outcome.collector_id == "procmond-1"
        hashed = agent.distribute(TaskAssignment(task_id="h", task_type="hash"))
        assert isinstance(hashed, Assignment)
        assert hashed.collector_id == "procmond-1"
        nobody = agent.distribute(TaskAssignment(task_id="n", task_type="netscan"))
        assert isinstance(nobody, Queued)
        assert (await agent.result("h", timeout=10)).ok


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        (RoundRobin(), ["procmond-1", "procmond-2", "procmond-3", "procmond-1"]),
        (FirstAvailable(), ["procmond-1"] * 4),
        (LeastLoaded(), ["procmond-1", "procmond-2", "procmond-3", "procmond-1"]),
        (Random(seed=7), None),
    ],
    ids=["round_robin", "first_available", "least_loaded", "random"],
)
async def test_each_strategy_choice(
    broker: Broker, agent: Agent, strategy: object, expected: list[str] | None
) -> None:
    sock = sock_of(broker)
    async with contextlib.AsyncExitStack() as stack:
        for n in (1, 2, 3):  # registered in this order
            await stack.enter_async_context(collector(sock, f"procmond-{n}", "--max", "4"))
            await agent.wait_ready(n, timeout=10)
        chosen = []
        for n in range(4):
            decision = agent.distribute(task(f"t{n}", sleep="0.5"), strategy=strategy)  # type: ignore[arg-type]
            assert isinstance(decision, Assignment)
            chosen.append(decision.collector_id)
        if expected is not None:
            assert chosen == expected
        else:
            assert set(chosen) <= {"procmond-1", "procmond-2", "procmond-3"}
        outcomes = [await agent.result(f"t{n}", timeout=10) for n in range(4)]
        assert [o.collector_id for o in outcomes] == chosen
        figures = agent.statistics().distribution.by_strategy[strategy.name]  # type: ignore[attr-defined]
        assert figures.assigned == 4
        assert figures.completed == 4


async def test_priority_order(broker: Broker, agent: Agent) -> None:
    async with collector(sock_of(broker), "procmond-1") as worker:
        await agent.wait_ready(1, timeout=10)
        agent.distribute(task("busy", sleep="0.5"))  # holds the one slot
        for name, priority in (("low", 1), ("high", 9), ("mid", 5)):
            t = task(name)
            t.priority = priority
            assert isinstance(agent.distribute(t), Queued)
        for name in ("busy", "high", "mid", "low"):
            assert (await agent.result(name, timeout=10)).ok
        await worker.expect("start low")
        starts = [line.split()[1] for line in worker.lines if line.startswith("start")]
        assert starts == ["busy", "high", "mid", "low"]


async def test_deadline_expiry(broker: Broker, agent: Agent) -> None:
    late = agent.distribute(task("late"), deadline=-1.0)
    assert isinstance(late, TaskFailed)
    assert late.reason is FailureReason.EXPIRED
    assert (await agent.result("late")).status == RPC_STATUS_TIMEOUT
    # Nobody can run it before its deadline: it fails while it waits.
    assert isinstance(agent.distribute(task("waits"), deadline=0.3), Queued)
    outcome = await agent.result("waits", timeout=5)
    assert outcome.status == RPC_STATUS_TIMEOUT
    assert outcome.failure is not None
    assert outcome.failure.reason is FailureReason.EXPIRED
    assert agent.statistics().distribution.expired == 2


async def test_queued_until_a_collector_registers(broker: Broker, agent: Agent) -> None:
    first = agent.distribute(task("early"))
    assert isinstance(first, Queued)
    assert first.pending == 1
    async with collector(sock_of(broker), "procmond-1"):
        outcome = await agent.result("early", timeout=15)
    assert outcome.ok
    assert outcome.collector_id == "procmond-1"
    assert outcome.result is not None
    assert outcome.result.fields["by"] == "procmond-1"


async def test_collector_killed_mid_task_is_reassigned_and_finished_once(
    broker: Broker, agent: Agent
) -> None:
    sock = sock_of(broker)
    async with collector(sock, "procmond-1") as one, collector(sock, "procmond-2") as two:
        await agent.wait_ready(2, timeout=10)
        decision = agent.distribute(task("t", sleep="1.0"), strategy=FirstAvailable())
        assert isinstance(decision, Assignment)
        assert decision.collector_id == "procmond-1"
        await one.expect("start t")
        one.signal(signal.SIGKILL)  # no goodbye: presence says the connection was lost
        outcome = await agent.result("t", timeout=15)
        assert outcome.ok
        assert outcome.collector_id == "procmond-2"
        assert outcome.result is not None
        assert outcome.result.attempt == 2
        await two.expect("start t")
        aggregate = await agent.aggregate(AggregateKind.TASK, "t", timeout=5)
        assert aggregate.state is AggregateState.COMPLETE
        assert [r.collector_id for r in aggregate.results] == ["procmond-2"]
        stats = agent.statistics().distribution
        assert stats.reassigned == 1
        assert stats.completed == 1
        gone = agent.registry.get("procmond-1")
        assert gone is not None
        assert gone.state is CollectorState.GONE
        assert gone.gone_reason.startswith("connection lost")


async def test_duplicate_results_count_once(broker: Broker, agent: Agent) -> None:
    sock = sock_of(broker)
    root = with_stage(new_correlation(), "scan")
    async with collector(sock, "procmond-1"), collector(sock, "procmond-2"):
        await agent.wait_ready(2, timeout=10)
        agent.expect_workflow(root.correlation_id, deadline=10)
        turns = RoundRobin()
        agent.distribute(task("a"), strategy=turns, correlation=root)
        agent.distribute(task("b", sleep="2"), strategy=turns, correlation=root)  # procmond-2
        assert (await agent.result("a", timeout=10)).collector_id == "procmond-1"
        # Handed to procmond-1 again: it answers from memory and sends its result again.
        ack = await agent.rpc.execute("procmond-1", task("a"), correlation=root)
        assert ack.ok
        await agent.wait_for(lambda: agent.statistics().duplicate_results == 1, timeout=5)
        workflow = await agent.aggregate(AggregateKind.WORKFLOW, root.correlation_id, timeout=10)
    assert workflow.state is AggregateState.COMPLETE
    assert sorted(r.task_id for r in workflow.results) == ["a", "b"]
    assert workflow.duplicates == 1
    record = agent.workflow(root.correlation_id)
    assert record is not None
    assert set(record.collectors) == {"procmond-1", "procmond-2"}


async def test_partial_aggregate_names_the_missing(broker: Broker, agent: Agent) -> None:
    root = new_correlation()
    async with collector(sock_of(broker), "procmond-1", "--max", "2"):
        await agent.wait_ready(1, timeout=10)
        agent.expect_workflow(root.correlation_id, deadline=1.5)
        agent.distribute(task("a"), correlation=root)
        agent.distribute(task("slow", sleep="5"), correlation=root)
        netscan = TaskAssignment(task_id="n", task_type="netscan")
        assert isinstance(agent.distribute(netscan, correlation=root), Queued)  # no netmond
        async with agent.aggregates() as closed:
            aggregate = await closed.get(timeout=10)
            while aggregate.kind is not AggregateKind.WORKFLOW:
                aggregate = await closed.get(timeout=10)
        health = agent.aggregator.health("procmond-1")  # before "slow"'s own aggregate closes
        agent.cancel("slow")
        agent.cancel("n")
    assert aggregate.state is AggregateState.PARTIAL
    assert aggregate.tasks == {"a", "slow", "n"}
    assert aggregate.missing_tasks == {"slow", "n"}
    assert aggregate.missing == {"procmond-1"}  # holds "slow"; nobody holds "n"
    assert [r.task_id for r in aggregate.results] == ["a"]
    assert health is not None
    assert health.timeouts == 1


async def test_a_workflow_waits_for_each_of_its_tasks_on_one_collector(
    broker: Broker, agent: Agent
) -> None:
    root = new_correlation()
    async with collector(sock_of(broker), "procmond-1", "--max", "2"):
        await agent.wait_ready(1, timeout=10)
        agent.distribute(task("slow", sleep="1.5"), correlation=root)  # before the aggregate
        agent.expect_workflow(root.correlation_id, deadline=20)
        agent.distribute(task("fast"), correlation=root)
        assert (await agent.result("fast", timeout=10)).ok
        assert agent.aggregator.get(AggregateKind.WORKFLOW, root.correlation_id) is not None
        workflow = await agent.aggregate(AggregateKind.WORKFLOW, root.correlation_id, timeout=10)
    assert workflow.state is AggregateState.COMPLETE
    assert sorted(r.task_id for r in workflow.results) == ["fast", "slow"]
    assert {r.collector_id for r in workflow.results} == {"procmond-1"}


async def test_unresponsive_after_missed_heartbeats(broker: Broker, agent: Agent) -> None:
    async with collector(sock_of(broker), "procmond-1", "--interval", "0.2") as worker:
        await agent.wait_ready(1, timeout=10)
        async with agent.changes() as changes:
            worker.signal(signal.SIGSTOP)  # alive, connected, silent
            change = await changes.get(timeout=5)
            assert change.state is CollectorState.UNRESPONSIVE
            assert change.reason == "missed 3 heartbeats"
            worker.signal(signal.SIGCONT)
            change = await changes.get(timeout=5)
            assert change.state is CollectorState.READY


async def test_rpc_statuses(broker: Broker, agent: Agent) -> None:
    async with collector(sock_of(broker), "procmond-1") as worker:
        await agent.wait_ready(1, timeout=10)
        health = await agent.rpc.health("procmond-1")
        assert health.ok
        assert health.reply is not None
        assert health.reply.component.component_id == "procmond-1"
        configured = await agent.rpc.configure("procmond-1", {"depth": "2"}, version=3)
        assert configured.ok
        assert configured.reply is not None
        assert configured.reply.applied_version == 3
        older = await agent.rpc.configure("procmond-1", {"depth": "1"}, version=2)
        assert older.reply is not None
        assert older.reply.applied_version == 3
        stopped = await agent.rpc.lifecycle("procmond-1", LIFECYCLE_ACTION_STOP)
        assert stopped.ok
        refused = await agent.rpc.execute("procmond-1", task("x"))
        assert refused.status_name == "error"
        assert refused.error == "stopped"
        assert (await agent.rpc.lifecycle("procmond-1", LIFECYCLE_ACTION_START)).ok
        nobody = await agent.rpc.health("netmond-9")
        assert nobody.status == RPC_STATUS_UNAVAILABLE
        worker.signal(signal.SIGSTOP)
        try:
            timed_out = await agent.rpc.health("procmond-1", timeout=0.3)
            assert timed_out.status == RPC_STATUS_TIMEOUT
            call = asyncio.create_task(agent.rpc.health("procmond-1", timeout=5))
            await agent.wait_for(lambda: agent.rpc.pending == 1, timeout=2)
            await asyncio.sleep(0.05)
            assert agent.rpc.cancel("procmond-1") == 1
            cancelled = await call
            assert cancelled.status == RPC_STATUS_CANCELLED
        finally:
            worker.signal(signal.SIGCONT)


async def test_retained_configuration_applied_on_start(broker: Broker, agent: Agent) -> None:
    session = broker.local_session("config", AGENT)
    update = ConfigurationUpdate(collector_id="procmond-1", config_version=5, settings={"a": "1"})
    await session.publish(registry.CONTROL_COLLECTOR_CONFIG, update)
    async with collector(sock_of(broker), "procmond-1"):
        await agent.wait_ready(1, timeout=10)
        ack = await agent.rpc.configure("procmond-1", {"a": "0"}, version=4)
    assert ack.reply is not None
    assert ack.reply.applied_version == 5


@pytest.mark.parametrize("component", [PROCMOND, ""], ids=["procmond", "anonymous"])
async def test_unprivileged_peer_cannot_issue_tasks_or_lifecycle(
    broker: Broker, agent: Agent, component: str
) -> None:
    async with (
        collector(sock_of(broker), "procmond-1"),
        Client(sock_of(broker), name="intruder", component=component) as peer,
    ):
        await agent.wait_ready(1, timeout=10)
        with pytest.raises(AccessDenied):
            await peer.request(
                registry.control_collector_rpc_task(id="procmond-1"), task("evil"), timeout=2
            )
        with pytest.raises(AccessDenied):
            await peer.request(
                registry.control_collector_queue(type="scan"), task("evil"), timeout=2
            )
        with pytest.raises(AccessDenied):
            await peer.request(
                registry.control_collector_rpc_lifecycle(id="procmond-1"),
                CollectorLifecycleCommand(collector_id="procmond-1", action=LIFECYCLE_ACTION_STOP),
                timeout=2,
            )
        with pytest.raises(AccessDenied):
            await peer.request(
                registry.control_collector_rpc_health(id="procmond-1"),
                HealthCheckRequest(component_id="procmond-1"),
                timeout=2,
            )
        # The collector still runs the agent's tasks.
        agent.distribute(task("fine"))
        assert (await agent.result("fine", timeout=10)).status == RPC_STATUS_SUCCESS


async def test_a_late_agent_learns_of_collectors_started_before_it(broker: Broker) -> None:
    sock = sock_of(broker)
    async with (
        collector(sock, "procmond-1", "--interval", "1.0", "--tasks", "scan,hash"),
        collector(sock, "procmond-2", "--interval", "1.0"),
    ):
        # Both registered before any agent listened: their registrations are gone.
        for _ in range(2):  # an agent that starts late, and one that restarts
            async with Agent(broker.local_session("late-agent", AGENT), ack_timeout=1.0) as late:
                # Each heartbeat of an unknown collector makes the agent ask for its
                # health; the collector registers again and heartbeats: READY, within
                # about one heartbeat interval (1 s), well within two and a half.
                ready = await late.wait_ready(2, timeout=2.5)
                assert sorted(c.collector_id for c in ready) == ["procmond-1", "procmond-2"]
                one = late.registry.get("procmond-1")
                assert one is not None
                assert one.task_types == {"scan", "hash"}
                assert one.session_id
                stats = late.statistics()
                assert 2 <= stats.discovery_requests <= 4
                assert stats.registry.registrations == 2
                late.distribute(task("late"))
                assert (await late.result("late", timeout=10)).ok


async def test_health_requests_to_a_known_collector_keep_its_incarnation(
    broker: Broker, agent: Agent
) -> None:
    async with collector(sock_of(broker), "procmond-1"):
        await agent.wait_ready(1, timeout=10)
        for _ in range(2):
            assert (await agent.rpc.health("procmond-1")).ok
        await agent.wait_ready(1, timeout=5)
        info = agent.registry.get("procmond-1")
        assert info is not None
        assert info.incarnation == 1
        assert agent.statistics().discovery_requests == 0


async def test_a_task_published_on_the_targeted_topic_is_run_once(
    broker: Broker, agent: Agent
) -> None:
    """``control.collector.task.{type}.{id}`` (declared lossless): a task published
    there, with no reply to give, is run by that collector alone; published again
    after it finished, its result is published again, not the task run twice."""
    sock = sock_of(broker)
    async with collector(sock, "procmond-1", "--tasks", "scan"):
        await agent.wait_ready(1, timeout=10)
        sender = broker.local_session("sender", AGENT)
        results = await sender.subscribe(registry.CONTROL_COLLECTOR_RESULT)
        targeted = registry.control_collector_task_targeted(type="scan", id="procmond-1")
        got = []
        for _ in range(2):  # the second time after it finished
            await sender.publish(targeted, task("pub-1"))
            got.append((await results.get(timeout=10)).message())
        assert [(r.task_id, r.collector_id, r.status) for r in got] == [
            ("pub-1", "procmond-1", RPC_STATUS_SUCCESS)
        ] * 2
        assert got[0] == got[1]  # the same result, published again
        # A task type it does not run is left alone: the next result is the next task's.
        hashed = registry.control_collector_task_targeted(type="hash", id="procmond-1")
        await sender.publish(hashed, TaskAssignment(task_id="h-1", task_type="hash"))
        await sender.publish(targeted, task("pub-2"))
        assert (await results.get(timeout=10)).message().task_id == "pub-2"
        await sender.close()
