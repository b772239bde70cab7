"""The agent's side of the control plane, on the bus (asyncio).

:class:`Agent` runs on a :class:`~daemoneye_eventbus.client.Client` (component
``daemoneye-agent``) or on an in-process session of the agent's embedded
broker (``broker.local_session(name, "daemoneye-agent")``). It reads
``control.collector.registration``, ``control.health.heartbeat``,
``control.presence``, ``control.collector.result`` and
``control.collector.progress``, feeds them with the loop's clock to the pure
bookkeeping (:class:`CollectorRegistry`, :class:`TaskDistributor`,
:class:`ResultAggregator`, :class:`CorrelationTracker`) and carries out what
they decide:

- an :class:`Assignment` becomes a request on the collector's
  ``control.collector.rpc.task.{id}``; its ``TaskAck`` acknowledges the task,
  an ERROR ack, no responder or no reply in ``ack_timeout`` refuses it, and
  the distributor hands it to another collector;
- a ``TaskResult`` finishes its task (once) and joins the task's and the
  workflow's aggregates;
- a heartbeat from a collector it does not know (one that registered
  before the agent started) is answered with a health request, which the
  collector answers by registering again;
- one loop timer, at the earliest ``next_deadline()`` of the four, lets
  time pass for them (missed heartbeats, task deadlines, aggregate
  deadlines, idle workflows).

What waits is asynchronous: :meth:`Agent.result` for a task's
:class:`TaskOutcome`, :meth:`Agent.aggregate` for a closed aggregate,
:meth:`Agent.changes` and :meth:`Agent.aggregates` as async iterators.
docs/control-plane.md describes the whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

from daemoneye.eventbus.v1 import registry as topics
from daemoneye.eventbus.v1.control_pb2 import (
    RPC_STATUS_IN_PROGRESS,
    RPC_STATUS_SUCCESS,
    TaskAssignment,
    TaskProgress,
    TaskResult,
)
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationMetadata
from daemoneye_eventbus.control.aggregation import (
    AddOutcome,
    Aggregate,
    AggregateKind,
    AggregationStatistics,
    ResultAggregator,
)
from daemoneye_eventbus.control.collectors import (
    CollectorChange,
    CollectorInfo,
    CollectorState,
    RegistryStatistics,
)
from daemoneye_eventbus.control.distribution import TaskDistributor
from daemoneye_eventbus.control.registry import CollectorRegistry
from daemoneye_eventbus.control.rpc import Bus, CollectorRpcClient
from daemoneye_eventbus.control.strategies import Strategy
from daemoneye_eventbus.control.tasks import (
    Assignment,
    Decision,
    DistributionStatistics,
    TaskFailed,
    task_deadline,
)
from daemoneye_eventbus.control.tracker import CorrelationTracker, TrackerStatistics, WorkflowRecord
from daemoneye_eventbus.control.watch import Feed, FeedReader, TaskOutcome, failure_status
from daemoneye_eventbus.delivery import ReceivedEvent
from daemoneye_eventbus.errors import ClosedResourceError, EventBusError, LimitExceeded
from daemoneye_eventbus.registry_runtime import Topic
from daemoneye_eventbus.subscription import Subscription

__all__ = ["Agent", "AgentDriver", "AgentStatistics", "root_of"]

log = logging.getLogger("daemoneye_eventbus.control")

#: Timer slack: the bookkeeping compares deadlines strictly.
_SLACK = 0.001


def root_of(correlation: CorrelationMetadata | None) -> str:
    """The workflow an event belongs to: its root correlation id, else its own id."""
    if correlation is None:
        return ""
    return correlation.root_correlation_id or correlation.correlation_id


@dataclass(frozen=True, slots=True)
class AgentStatistics:
    """A snapshot of the agent's figures and its bookkeeping's."""

    registry: RegistryStatistics
    distribution: DistributionStatistics
    aggregation: AggregationStatistics
    tracker: TrackerStatistics
    #: Results received (duplicates included), and of them copies of one already had.
    results: int
    duplicate_results: int
    progress_reports: int
    #: Hand-outs sent, and of them refused (ERROR ack, no responder, no ack in time).
    handed_out: int
    refused: int
    #: Health requests sent to collectors heard from but not registered here.
    discovery_requests: int


class AgentDriver:
    """The inside of :class:`Agent`: its state, what it does with each
    message it reads, and how it carries out the bookkeeping's decisions."""

    def __init__(
        self,
        bus: Bus,
        *,
        strategy: Strategy | None = None,
        registry: CollectorRegistry | None = None,
        distributor: TaskDistributor | None = None,
        aggregator: ResultAggregator | None = None,
        tracker: CorrelationTracker | None = None,
        ack_timeout: float = 2.0,
        rpc_timeout: float = 5.0,
        max_remembered: int = 4096,
        discover_every: float = 2.0,
    ) -> None:
        self.bus = bus
        self.registry = registry if registry is not None else CollectorRegistry()
        self.distributor = (
            distributor
            if distributor is not None
            else TaskDistributor(self.registry, strategy=strategy)
        )
        self.aggregator = aggregator if aggregator is not None else ResultAggregator()
        self.tracker = tracker if tracker is not None else CorrelationTracker()
        self.rpc = CollectorRpcClient(bus, timeout=rpc_timeout)
        #: Seconds a collector has to acknowledge a task before it goes to another.
        self.ack_timeout = ack_timeout
        self.max_remembered = max_remembered
        #: Seconds between two health requests to the same unknown collector.
        self.discover_every = discover_every
        #: When each unknown collector heard from was last asked to register again.
        self._asked: OrderedDict[str, float] = OrderedDict()
        #: The last progress report of each running task.
        self.progress: OrderedDict[str, TaskProgress] = OrderedDict()
        self._change_feed: Feed[CollectorChange] = Feed()
        self._aggregate_feed: Feed[Aggregate] = Feed()
        self._outcomes: OrderedDict[str, asyncio.Future[TaskOutcome]] = OrderedDict()
        self._tasks: dict[str, tuple[float, CorrelationMetadata | None]] = {}
        self._aggregates: OrderedDict[tuple[AggregateKind, str], asyncio.Future[Aggregate]] = (
            OrderedDict()
        )
        self._subs: list[Subscription[Any]] = []
        self._group: asyncio.TaskGroup | None = None
        self._stack = contextlib.AsyncExitStack()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._changed: asyncio.Future[None] | None = None
        self._counts = dict.fromkeys(
            (
                "results",
                "duplicate_results",
                "progress_reports",
                "handed_out",
                "refused",
                "discovery_requests",
            ),
            0,
        )

    def _aggregate_future(self, kind: AggregateKind, key: str) -> asyncio.Future[Aggregate]:
        fut = self._aggregates.get((kind, key))
        if fut is None or fut.done():
            fut = self._aggregates[(kind, key)] = asyncio.get_running_loop().create_future()
            _trim(self._aggregates, self.max_remembered)
        return fut

    # -- what comes in -----------------------------------------------------------------

    async def _read(
        self, sub: Subscription[Any], handler: Callable[[ReceivedEvent[Any], Any], None]
    ) -> None:
        with contextlib.suppress(EventBusError):
            async for event, message in sub.messages():
                try:
                    handler(event, message)
                except EventBusError as exc:
                    log.warning("agent: %s: %s", event.topic, exc)
                self._settle()

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _on_registration(self, event: ReceivedEvent[Any], message: Any) -> None:
        now = self._now()
        self.registry.register(message, now=now)
        self.distributor.tick(now)

    def _on_heartbeat(self, event: ReceivedEvent[Any], message: Any) -> None:
        now = self._now()
        if self.registry.heartbeat(message, now=now) is not None:
            self.distributor.tick(now)
            return
        known = self.registry.get(message.component_id)
        if known is None or known.state is CollectorState.GONE:
            self._discover(message.component_id, now)

    def _discover(self, collector_id: str, now: float) -> None:
        """A heartbeat from a collector the registry does not know (it
        registered before this agent started, or the agent forgot it): ask it
        for its health, which a :class:`Collector` answers by publishing its
        registration again. At most once per ``discover_every`` seconds each."""
        if not collector_id or self._group is None:
            return
        last = self._asked.get(collector_id)
        if last is not None and now - last < self.discover_every:
            return
        self._asked[collector_id] = now
        self._asked.move_to_end(collector_id)
        while len(self._asked) > self.registry.max_collectors:
            self._asked.popitem(last=False)
        self._counts["discovery_requests"] += 1
        self._group.create_task(
            self._ask_health(collector_id), name=f"agent.discover[{collector_id}]"
        )

    async def _ask_health(self, collector_id: str) -> None:
        try:
            outcome = await self.rpc.health(collector_id, timeout=self.ack_timeout)
        except EventBusError as exc:  # the broker refused the request
            log.warning("agent: health of %s: %s", collector_id, exc)
            return
        if not outcome.ok:
            log.debug("agent: health of %s: %s", collector_id, outcome.status_name)

    def _on_presence(self, event: ReceivedEvent[Any], message: Any) -> None:
        now = self._now()
        if self.registry.presence(message, now=now):
            self.distributor.tick(now)

    def _on_progress(self, event: ReceivedEvent[Any], message: Any) -> None:
        self._counts["progress_reports"] += 1
        if message.task_id in self._tasks:
            self.progress[message.task_id] = message
            self.progress.move_to_end(message.task_id)
            _trim(self.progress, self.max_remembered)

    def _on_result(self, event: ReceivedEvent[Any], message: Any) -> None:
        result: TaskResult = message
        now = self._now()
        self._counts["results"] += 1
        root = root_of(event.correlation)
        success = result.status == RPC_STATUS_SUCCESS
        finish = self.distributor.complete(
            result.task_id, result.collector_id, now=now, success=success
        )
        if self.aggregator.add(result, now=now, root_id=root) is AddOutcome.DUPLICATE:
            self._counts["duplicate_results"] += 1
        if root:
            self.tracker.observe_metadata(
                event.correlation or CorrelationMetadata(),
                now=now,
                collector_id=result.collector_id,
            )
        if finish.value == "finished":
            started = self._tasks.get(result.task_id, (now, None))[0]
            outcome = TaskOutcome(
                result.task_id, result.status, result.collector_id, result, None, now - started
            )
            self._finish_task(result.task_id, outcome)

    # -- what goes out -----------------------------------------------------------------

    def _settle(self) -> None:
        """Carry out what the bookkeeping decided, hand out the news, re-arm the timer."""
        for action in self.distributor.take_actions():
            if isinstance(action, Assignment):
                self._hand_out(action)
            else:
                self.aggregator.close(AggregateKind.TASK, action.task_id, now=self._now())
                self._finish_task(
                    action.task_id,
                    TaskOutcome(
                        action.task_id,
                        failure_status(action),
                        failure=action,
                        elapsed=self._now()
                        - self._tasks.get(action.task_id, (self._now(), None))[0],
                    ),
                )
        for change in self.registry.changes():
            self._change_feed.put(change)
        for aggregate in self.aggregator.completed():
            self._aggregate_feed.put(aggregate)
            fut = self._aggregate_future(aggregate.kind, aggregate.key)
            fut.set_result(aggregate)
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
        self._arm()

    def _hand_out(self, assignment: Assignment) -> None:
        now = self._now()
        task_id, cid = assignment.task_id, assignment.collector_id
        correlation = self._tasks.get(task_id, (now, None))[1]
        root = root_of(correlation)
        status = self.distributor.task(task_id)
        try:
            if assignment.previous:
                self.aggregator.reassigned(task_id, assignment.previous, cid, now=now, root_id=root)
            else:
                deadline = status.deadline if status is not None else None
                self.aggregator.expect_task(task_id, [cid], now=now, deadline=deadline)
                self._aggregate_future(AggregateKind.TASK, task_id)
                if root:
                    self.aggregator.workflow_task(root, task_id, cid, now=now)
        except LimitExceeded as exc:
            log.warning("agent: task %s not aggregated: %s", task_id, exc)
        if root:
            self.tracker.observe(root, now=now, collector_id=cid, task=True)
        wait = self.ack_timeout
        if status is not None and status.deadline is not None:
            wait = max(0.05, min(wait, status.deadline - now))
        self._counts["handed_out"] += 1
        if self._group is not None:
            self._group.create_task(
                self._send(assignment, wait, correlation), name=f"agent.assign[{task_id}]"
            )

    async def _send(
        self, assignment: Assignment, wait: float, correlation: CorrelationMetadata | None
    ) -> None:
        cid = assignment.collector_id
        topic = topics.control_collector_rpc_task(id=cid)
        try:
            outcome = await self.rpc.call(
                topic, cid, assignment.task, timeout=wait, correlation=correlation
            )
        except EventBusError as exc:  # the broker refused the request: access, size
            log.warning("agent: task %s to %s: %s", assignment.task_id, cid, exc)
            accepted, reason = False, str(exc)
        else:
            accepted = outcome.status in (RPC_STATUS_SUCCESS, RPC_STATUS_IN_PROGRESS)
            reason = outcome.error or outcome.status_name
        now = self._now()
        if accepted:
            self.distributor.acknowledge(assignment.task_id, cid, now=now)
        elif self.distributor.refuse(assignment.task_id, cid, now=now, reason=reason):
            self._counts["refused"] += 1
        self._settle()

    def _finish_task(self, task_id: str, outcome: TaskOutcome) -> None:
        self._tasks.pop(task_id, None)
        self.progress.pop(task_id, None)
        fut = self._outcomes.get(task_id)
        if fut is not None and not fut.done():
            fut.set_result(outcome)
            self._outcomes.move_to_end(task_id)
            _trim(self._outcomes, self.max_remembered)

    def _arm(self) -> None:
        """One timer, at the earliest deadline of the bookkeeping."""
        if self._group is None:
            return
        deadlines = (
            self.registry.next_deadline(),
            self.distributor.next_deadline(),
            self.aggregator.next_deadline(),
            self.tracker.next_deadline(),
        )
        times = [t for t in deadlines if t is not None]
        at = min(times) + _SLACK if times else None
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at is not None:
            self._timer = asyncio.get_running_loop().call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        now = self._now()
        self.registry.check(now)
        self.distributor.tick(now)
        self.aggregator.tick(now)
        self.tracker.expire(now)
        self._settle()


class Agent(AgentDriver):
    """The collector control plane, run by the agent on ``bus``.

    ``async with Agent(bus) as agent:`` subscribes and starts; the pure
    parts are its attributes (:attr:`registry`, :attr:`distributor`,
    :attr:`aggregator`, :attr:`tracker`) and :attr:`rpc` makes typed calls.
    """

    # -- life --------------------------------------------------------------------------

    async def start(self) -> Self:
        """Subscribe to the control topics and start reading them."""
        if self._group is not None:
            return self
        group = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._group = group
        feeds: list[tuple[Topic[Any], Callable[[ReceivedEvent[Any], Any], None]]] = [
            (topics.CONTROL_COLLECTOR_REGISTRATION, self._on_registration),
            (topics.CONTROL_HEALTH_HEARTBEAT, self._on_heartbeat),
            (topics.CONTROL_PRESENCE, self._on_presence),
            (topics.CONTROL_COLLECTOR_RESULT, self._on_result),
            (topics.CONTROL_COLLECTOR_PROGRESS, self._on_progress),
        ]
        try:
            for topic, handler in feeds:
                sub = await self.bus.subscribe(topic, include_control=True)
                self._subs.append(sub)
                group.create_task(self._read(sub, handler), name=f"agent.{topic.name}")
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        """Stop: unsubscribe, cancel the calls in flight; waiters get
        :class:`ClosedResourceError` (idempotent)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.rpc.cancel()
        for sub in self._subs:
            with contextlib.suppress(EventBusError):
                await sub.unsubscribe()
        self._subs.clear()
        self._change_feed.close()
        self._aggregate_feed.close()
        closed = ClosedResourceError("the agent has closed")
        futures: list[asyncio.Future[Any]] = [*self._outcomes.values(), *self._aggregates.values()]
        for fut in futures:
            if not fut.done():
                fut.set_exception(closed)
                fut.exception()  # retrieved: nobody may be waiting
        self._group = None
        await self._stack.aclose()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- queries -----------------------------------------------------------------------

    def collectors(self, state: CollectorState | None = None) -> list[CollectorInfo]:
        """The collectors (in ``state``, if given), in registration order."""
        return self.registry.collectors(state)

    def changes(self) -> FeedReader[CollectorChange]:
        """Every registry change from now on: ``async for change in agent.changes()``."""
        return self._change_feed.reader()

    def aggregates(self) -> FeedReader[Aggregate]:
        """Every aggregate closed from now on (COMPLETE or PARTIAL)."""
        return self._aggregate_feed.reader()

    def workflow(self, root_id: str) -> WorkflowRecord | None:
        """What the tracker knows of a workflow: stages, collectors, times."""
        return self.tracker.workflow(root_id)

    def statistics(self) -> AgentStatistics:
        return AgentStatistics(
            self.registry.statistics(),
            self.distributor.statistics(),
            self.aggregator.statistics(),
            self.tracker.statistics(),
            **self._counts,
        )

    async def wait_for(self, predicate: Callable[[], bool], timeout: float | None = None) -> None:
        """Until ``predicate()`` holds, checked after every message and timer
        the agent handles; ``TimeoutError`` after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while not predicate():
                if self._changed is None or self._changed.done():
                    self._changed = asyncio.get_running_loop().create_future()
                await asyncio.shield(self._changed)

    async def wait_ready(
        self, count: int = 1, *, task_type: str = "", timeout: float | None = None
    ) -> list[CollectorInfo]:
        """Until ``count`` collectors (of ``task_type``, if given) are READY."""

        await self.wait_for(lambda: len(self.registry.capable(task_type)) >= count, timeout)
        return self.registry.capable(task_type)

    # -- tasks -------------------------------------------------------------------------

    def distribute(
        self,
        task: TaskAssignment,
        *,
        deadline: float | None = None,
        strategy: Strategy | None = None,
        correlation: CorrelationMetadata | None = None,
    ) -> Decision:
        """Hand ``task`` to a capable collector (or queue it): its
        :class:`Assignment`, :class:`Queued`, or :class:`TaskFailed` if refused.

        ``deadline``: seconds from now (else the task's own ``deadline``);
        ``correlation`` travels with the task and its result (its root names
        the workflow). :meth:`result` waits for the outcome.
        """
        loop = asyncio.get_running_loop()
        now = loop.time()
        copy = TaskAssignment()
        copy.CopyFrom(task)
        if deadline is not None:
            copy.deadline.FromNanoseconds(time.time_ns() + int(deadline * 1e9))
        at = task_deadline(copy, now=now, wall_now=time.time())
        task_id = copy.task_id
        mine = task_id not in self._outcomes and task_id not in self._tasks
        if mine and task_id:
            self._outcomes[task_id] = loop.create_future()
            self._tasks[task_id] = (now, correlation)
            root = root_of(correlation)
            if root and correlation is not None:
                stage = correlation.workflow_stage if correlation.HasField("workflow_stage") else ""
                self.tracker.observe(root, now=now, stage=stage, task=True)
        decision = self.distributor.distribute(copy, now=now, deadline=at, strategy=strategy)
        if isinstance(decision, TaskFailed) and mine:
            self._finish_task(
                decision.task_id,
                TaskOutcome(decision.task_id, failure_status(decision), failure=decision),
            )
        elif mine:  # its workflow's aggregate, if open, waits for it (queued or handed out)
            self.aggregator.workflow_task(root_of(correlation), task_id, now=now)
        self._settle()
        return decision

    async def result(self, task_id: str, timeout: float | None = None) -> TaskOutcome:
        """The outcome of a task distributed here (``LookupError`` if unknown
        or forgotten): its result, or why it failed without one."""
        fut = self._outcomes.get(task_id)
        if fut is None:
            raise LookupError(f"no task {task_id!r} distributed here")
        async with asyncio.timeout(timeout):
            return await asyncio.shield(fut)

    def cancel(self, task_id: str) -> bool:
        """Drop a task that has not finished; its outcome is CANCELLED."""
        done = self.distributor.cancel(task_id, now=asyncio.get_running_loop().time())
        self._settle()
        return done

    # -- aggregates --------------------------------------------------------------------

    def expect_workflow(self, root_id: str, *, deadline: float | None = None) -> Aggregate:
        """Gather the results of the tasks distributed here with the correlation root ``root_id``
        (unfinished or to come) for at most ``deadline`` seconds: COMPLETE once each has its
        result, else PARTIAL, naming the tasks missing and the collectors holding them."""
        now = asyncio.get_running_loop().time()
        at = now + deadline if deadline is not None else None
        mine = [t for t, (_, c) in self._tasks.items() if root_of(c) == root_id]
        running = {t: s.collector_id if (s := self.distributor.task(t)) else "" for t in mine}
        opened = self.aggregator.expect_workflow(root_id, now=now, deadline=at, tasks=running)
        self._aggregate_future(AggregateKind.WORKFLOW, root_id)
        self._settle()
        return opened

    async def aggregate(
        self, kind: AggregateKind, key: str, timeout: float | None = None
    ) -> Aggregate:
        """The aggregate of a task or workflow once it closes (``LookupError``
        if none was opened here)."""
        fut = self._aggregates.get((kind, key))
        if fut is None:
            raise LookupError(f"no {kind.value} aggregate {key!r}")
        async with asyncio.timeout(timeout):
            return await asyncio.shield(fut)


def _trim(memory: OrderedDict[Any, Any], limit: int) -> None:
    """Forget the oldest settled entries beyond ``limit`` (a future still
    pending is kept: someone may wait for it)."""
    excess = len(memory) - limit
    if excess <= 0:
        return
    for key in [
        k for k, v in memory.items() if not (isinstance(v, asyncio.Future) and not v.done())
    ][:excess]:
        del memory[key]
