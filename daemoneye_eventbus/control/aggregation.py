"""Results put together per task and per workflow, and each collector's health (pure).

The agent says whose results it expects, before an optional deadline (the
caller's monotonic clock, in seconds): for one task (keyed by its task id)
from a set of collectors, with :meth:`ResultAggregator.expect_task`; for a
whole workflow (keyed by the root correlation id its events carry) with
:meth:`~ResultAggregator.expect_workflow`, then each task of the workflow as
it is handed out, with :meth:`~ResultAggregator.workflow_task` (the task and
the collector holding it). Each ``TaskResult`` the collectors publish on
``control.collector.result`` is then :meth:`~ResultAggregator.add`-ed, with
the root correlation id of the event that carried it: it joins the open
aggregate of its task and the one of its workflow, once per (task id,
collector id) whatever the number of copies; a workflow keeps one result
per task (a second one, from another collector that held the task, is a
duplicate). An aggregate is::

    OPEN ──every expected collector (task) / every task (workflow) answered──> COMPLETE
         ──deadline passed, or closed early with something missing──> PARTIAL (names the missing)

and once closed it waits in a bounded queue until the asyncio layer takes it
with :meth:`~ResultAggregator.completed` (it turns that into an async
iterator). When the distributor hands a task to another collector, tell
the aggregator (:meth:`~ResultAggregator.reassigned`) so that it waits for
the new one.

Every collector's :class:`CollectorHealth` is kept on the side: how many
results it sent, how many succeeded, how often it was missing at a deadline,
and its latency from the expectation to the result (mean and percentiles
over its last ``latency_window`` results).
"""

from __future__ import annotations

import enum
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, TypeVar

from daemoneye.eventbus.v1.control_pb2 import RPC_STATUS_SUCCESS, RpcStatus, TaskResult
from daemoneye_eventbus.errors import LimitExceeded
from daemoneye_eventbus.statistics import nearest_rank

__all__ = [
    "AddOutcome",
    "Aggregate",
    "AggregateKind",
    "AggregateState",
    "AggregationStatistics",
    "CollectedResult",
    "CollectorHealth",
    "ResultAggregator",
]

_STATISTICS: Final = ("results", "duplicates", "unexpected", "late", "dropped", "undrained")

K = TypeVar("K")


class AggregateKind(enum.Enum):
    """What an aggregate gathers: the results of one task, or of one workflow."""

    TASK = "task"
    WORKFLOW = "workflow"


class AggregateState(enum.Enum):
    OPEN = "open"
    #: Every expected collector (a task's aggregate) or every task (a workflow's) answered.
    COMPLETE = "complete"
    #: Closed (deadline passed, or closed early) with collectors or tasks missing.
    PARTIAL = "partial"


class AddOutcome(enum.Enum):
    """What :meth:`ResultAggregator.add` made of a result."""

    #: It joined at least one open aggregate.
    ADDED = "added"
    #: Every open aggregate it belongs to has it already.
    DUPLICATE = "duplicate"
    #: Its aggregates have closed already.
    LATE = "late"
    #: No aggregate expects it.
    UNEXPECTED = "unexpected"


@dataclass(frozen=True, slots=True)
class CollectedResult:
    """One collector's result in an aggregate."""

    task_id: str
    collector_id: str
    status: RpcStatus.ValueType
    received_at: float
    #: Seconds from the expectation of this collector to the result, if it was expected.
    latency: float | None
    result: TaskResult

    @property
    def success(self) -> bool:
        return self.status == RPC_STATUS_SUCCESS


@dataclass(frozen=True, slots=True)
class Aggregate:
    """A snapshot of the results of one task or workflow."""

    kind: AggregateKind
    #: The task id or the workflow's root correlation id.
    key: str
    state: AggregateState
    #: The collectors expected (a task's), or holding its tasks (a workflow's).
    expected: frozenset[str]
    results: tuple[CollectedResult, ...]
    #: Expected collectors without a result; in a workflow, those holding its missing tasks.
    missing: frozenset[str]
    opened_at: float
    closed_at: float | None
    deadline: float | None
    #: Copies of results it had already.
    duplicates: int
    #: Results beyond its bound, not kept.
    dropped: int
    #: The tasks it gathers: the task's id, or the workflow's tasks.
    tasks: frozenset[str] = frozenset()
    #: Its tasks without a result.
    missing_tasks: frozenset[str] = frozenset()

    @property
    def partial(self) -> bool:
        return self.state is AggregateState.PARTIAL

    @property
    def succeeded(self) -> bool:
        """Complete, and every result a success."""
        return self.state is AggregateState.COMPLETE and all(r.success for r in self.results)


@dataclass(frozen=True, slots=True)
class CollectorHealth:
    """How one collector has done with its results."""

    collector_id: str
    results: int
    successes: int
    #: Results with another status than SUCCESS.
    failures: int
    #: Times it was expected and missing at a deadline.
    timeouts: int
    #: Latency samples in the window below.
    samples: int
    latency_mean: float | None
    latency_p50: float | None
    latency_p95: float | None

    @property
    def success_rate(self) -> float | None:
        """Successes among its results and timeouts; None before any."""
        total = self.results + self.timeouts
        return self.successes / total if total else None


@dataclass(frozen=True, slots=True)
class AggregationStatistics:
    """A snapshot of the aggregator's figures."""

    open: int
    completed: int
    partial: int
    #: Results accepted (once per task and collector).
    results: int
    duplicates: int
    unexpected: int
    late: int
    #: Results beyond an aggregate's bound.
    dropped: int
    #: Closed aggregates dropped because nobody took them in time.
    undrained: int


def _remember(memory: OrderedDict[K, None], key: K, limit: int) -> None:
    """Add ``key`` to ``memory``, forgetting the oldest beyond ``limit``."""
    memory[key] = None
    memory.move_to_end(key)
    if len(memory) > limit:
        memory.popitem(last=False)


class _Health:
    __slots__ = ("latencies", "results", "successes", "timeouts")

    def __init__(self, window: int) -> None:
        self.results = 0
        self.successes = 0
        self.timeouts = 0
        self.latencies: deque[float] = deque(maxlen=window)

    def snapshot(self, collector_id: str) -> CollectorHealth:
        ordered = sorted(self.latencies)
        n = len(ordered)
        return CollectorHealth(
            collector_id,
            self.results,
            self.successes,
            self.results - self.successes,
            self.timeouts,
            n,
            sum(ordered) / n if n else None,
            nearest_rank(ordered, 0.5) if n else None,
            nearest_rank(ordered, 0.95) if n else None,
        )


class _Open:
    """An open aggregate."""

    __slots__ = (
        "answered",
        "deadline",
        "dropped",
        "duplicates",
        "expected",
        "key",
        "kind",
        "opened_at",
        "results",
        "seen",
        "since",
        "tasks",
    )

    def __init__(self, kind: AggregateKind, key: str, now: float, deadline: float | None) -> None:
        self.kind = kind
        self.key = key
        self.opened_at = now
        self.deadline = deadline
        self.expected: set[str] = set()
        #: When each expected collector (a task's) or task (a workflow's) was
        #: expected, for the latency of its result.
        self.since: dict[str, float] = {}
        self.seen: set[tuple[str, str]] = set()
        self.results: list[CollectedResult] = []
        self.duplicates = 0
        self.dropped = 0
        #: A workflow's tasks and the collector holding each ("" while queued).
        self.tasks: dict[str, str] = {}
        #: A workflow's tasks with a result (ones it does not wait for included).
        self.answered: set[str] = set()

    @property
    def workflow(self) -> bool:
        return self.kind is AggregateKind.WORKFLOW

    def missing(self) -> frozenset[str]:
        if self.workflow:
            return frozenset(c for t, c in self.tasks.items() if c and t not in self.answered)
        return frozenset(self.expected - {r.collector_id for r in self.results})

    def missing_tasks(self) -> frozenset[str]:
        if self.workflow:
            return frozenset(self.tasks.keys() - self.answered)
        return frozenset({self.key}) if self.missing() else frozenset()

    def complete(self) -> bool:
        if self.workflow:
            return bool(self.tasks) and self.tasks.keys() <= self.answered
        return bool(self.expected) and not self.missing()

    def repeats(self, pair: tuple[str, str]) -> bool:
        """A copy of a result it has, or (a workflow's) a second result for a task."""
        return pair in self.seen or (self.workflow and pair[0] in self.answered)

    def answer(self, pair: tuple[str, str]) -> None:
        self.seen.add(pair)
        if self.workflow:
            self.answered.add(pair[0])
            if pair[0] in self.tasks:  # its holder now: whoever finished it
                self.tasks[pair[0]] = pair[1]

    def snapshot(self, state: AggregateState, closed_at: float | None) -> Aggregate:
        return Aggregate(
            self.kind,
            self.key,
            state,
            frozenset(c for c in self.tasks.values() if c)
            if self.workflow
            else frozenset(self.expected),
            tuple(self.results),
            self.missing(),
            self.opened_at,
            closed_at,
            self.deadline,
            self.duplicates,
            self.dropped,
            frozenset(self.tasks) if self.workflow else frozenset({self.key}),
            self.missing_tasks(),
        )


class ResultAggregator:
    """Puts results together per task and workflow; see the module docstring."""

    def __init__(
        self,
        *,
        max_open: int = 1024,
        max_results: int = 256,
        max_done: int = 1024,
        latency_window: int = 256,
        max_collectors: int = 1024,
        max_remembered: int = 8192,
    ) -> None:
        if min(max_open, max_results, max_done, latency_window, max_collectors) < 1:
            raise ValueError("the aggregator's limits must be at least 1")
        self.max_open = max_open
        #: Most results (and expected collectors) in one aggregate.
        self.max_results = max_results
        self.max_done = max_done
        self.latency_window = latency_window
        self.max_collectors = max_collectors
        #: Closed aggregates and (task, collector) pairs remembered, to tell a
        #: late result or a duplicate from an unexpected one.
        self.max_remembered = max_remembered
        self._open: dict[tuple[AggregateKind, str], _Open] = {}
        self._done: deque[Aggregate] = deque()
        self._closed: OrderedDict[tuple[AggregateKind, str], None] = OrderedDict()
        self._pairs: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._health: OrderedDict[str, _Health] = OrderedDict()
        self._counts: Counter[str] = Counter()

    # -- queries ------------------------------------------------------------------------

    @property
    def open(self) -> int:
        return len(self._open)

    def get(self, kind: AggregateKind, key: str) -> Aggregate | None:
        """The open aggregate, if any."""
        record = self._open.get((kind, key))
        return record.snapshot(AggregateState.OPEN, None) if record is not None else None

    def completed(self) -> list[Aggregate]:
        """The aggregates closed since the last call, oldest first (and forget them)."""
        out = list(self._done)
        self._done.clear()
        return out

    def health(self, collector_id: str) -> CollectorHealth | None:
        record = self._health.get(collector_id)
        return record.snapshot(collector_id) if record is not None else None

    def health_all(self) -> dict[str, CollectorHealth]:
        return {cid: h.snapshot(cid) for cid, h in self._health.items()}

    def next_deadline(self) -> float | None:
        """The earliest deadline of an open aggregate, or None."""
        return min(
            (a.deadline for a in self._open.values() if a.deadline is not None), default=None
        )

    def statistics(self) -> AggregationStatistics:
        c = self._counts
        return AggregationStatistics(
            self.open, c["complete"], c["partial"], *(c[name] for name in _STATISTICS)
        )

    # -- what the agent does -----------------------------------------------------------

    def expect(
        self,
        kind: AggregateKind,
        key: str,
        collectors: Iterable[str],
        *,
        now: float,
        deadline: float | None = None,
    ) -> Aggregate:
        """Expect results for ``key`` from ``collectors``, by ``deadline``.

        Opens the aggregate, or adds the collectors to the open one (and moves
        its deadline, if given). Raises :class:`LimitExceeded` when
        ``max_open`` aggregates are open, or the collectors exceed
        ``max_results``. An aggregate with nobody expected closes only at its
        deadline or by :meth:`close`. A workflow expects tasks, not
        collectors (:meth:`expect_workflow`): ``collectors`` must be empty.
        """
        collectors = list(collectors)
        if kind is AggregateKind.WORKFLOW and collectors:
            raise ValueError("a workflow expects tasks (workflow_task), not collectors")
        record = self._open.get((kind, key))
        if record is None:
            if len(self._open) >= self.max_open:
                raise LimitExceeded(f"{self.max_open} aggregates are open")
            record = _Open(kind, key, now, deadline)
        elif deadline is not None:
            record.deadline = deadline
        added = [c for c in dict.fromkeys(collectors) if c not in record.expected]
        if len(record.expected) + len(added) > self.max_results:
            raise LimitExceeded(f"more than {self.max_results} collectors expected")
        self._open[(kind, key)] = record
        for collector_id in added:
            record.expected.add(collector_id)
            record.since[collector_id] = now
        self._closed.pop((kind, key), None)
        self._settle(record, now)
        return record.snapshot(AggregateState.OPEN, None)

    def expect_task(
        self, task_id: str, collectors: Iterable[str], *, now: float, deadline: float | None = None
    ) -> Aggregate:
        return self.expect(AggregateKind.TASK, task_id, collectors, now=now, deadline=deadline)

    def expect_workflow(
        self,
        root_id: str,
        *,
        now: float,
        deadline: float | None = None,
        tasks: Mapping[str, str] | None = None,
    ) -> Aggregate:
        """Gather the results of the workflow ``root_id``, by ``deadline``:
        opens its aggregate (or moves the open one's deadline, if given), with
        ``tasks`` (task id to the collector holding it, "" if none yet) as by
        :meth:`workflow_task`. It is COMPLETE once every task it knows has a
        result; with no task, it closes only at its deadline or by :meth:`close`."""
        self.expect(AggregateKind.WORKFLOW, root_id, (), now=now, deadline=deadline)
        for task_id, collector_id in (tasks or {}).items():
            self.workflow_task(root_id, task_id, collector_id, now=now)
        record = self._open.get((AggregateKind.WORKFLOW, root_id))
        return record.snapshot(AggregateState.OPEN, None) if record is not None else self._done[-1]

    def workflow_task(
        self, root_id: str, task_id: str, collector_id: str = "", *, now: float
    ) -> bool:
        """The task ``task_id`` of the workflow ``root_id`` is held by
        ``collector_id`` ("" while it waits): its aggregate waits for the
        task's result too. False if no aggregate of the workflow is open, or
        it has ``max_results`` tasks already (the task is counted as dropped)."""
        record = self._open.get((AggregateKind.WORKFLOW, root_id))
        if record is None:
            return False
        if record.tasks.get(task_id) == collector_id:
            return True
        if task_id not in record.tasks and len(record.tasks) >= self.max_results:
            record.dropped += 1
            self._counts["dropped"] += 1
            return False
        if task_id in record.answered:  # its result came first: held by its sender
            mine = (r.collector_id for r in record.results if r.task_id == task_id)
            record.tasks[task_id] = next(mine, collector_id)
        else:
            if task_id not in record.tasks or collector_id:
                record.since[task_id] = now
            record.tasks[task_id] = collector_id
        self._settle(record, now)
        return True

    def reassigned(
        self, task_id: str, previous: str, collector_id: str, *, now: float, root_id: str = ""
    ) -> None:
        """The task went from ``previous`` to ``collector_id``: its aggregate
        expects the new collector instead of the old one (unless the old one
        has answered); its workflow's, if ``root_id`` is given, waits for the
        task from the new collector."""
        record = self._open.get((AggregateKind.TASK, task_id))
        if record is not None and previous in record.expected:
            if all(r.collector_id != previous for r in record.results):
                record.expected.discard(previous)
                record.since.pop(previous, None)
            if collector_id not in record.expected:
                record.expected.add(collector_id)
                record.since[collector_id] = now
            self._settle(record, now)
        if root_id:
            self.workflow_task(root_id, task_id, collector_id, now=now)

    def add(self, result: TaskResult, *, now: float, root_id: str = "") -> AddOutcome:
        """A collector's result arrived, in a workflow if ``root_id`` is given."""
        pair = (result.task_id, result.collector_id)
        keys = [(AggregateKind.TASK, result.task_id)]
        if root_id:
            keys.append((AggregateKind.WORKFLOW, root_id))
        latency: float | None = None
        added = duplicate = False
        for key in keys:
            record = self._open.get(key)
            if record is None:
                continue
            if record.repeats(pair):
                record.duplicates += 1
                duplicate = True
                continue
            if len(record.results) >= self.max_results:
                record.dropped += 1
                self._counts["dropped"] += 1
                continue
            since = record.since.get(pair[0] if record.workflow else pair[1])
            mine = now - since if since is not None else None
            latency = latency if latency is not None else mine
            record.answer(pair)
            copy = TaskResult()
            copy.CopyFrom(result)
            record.results.append(CollectedResult(*pair, result.status, now, mine, copy))
            added = True
            self._settle(record, now)
        self._count_health(pair, result.status, latency)
        if added:
            return AddOutcome.ADDED
        if duplicate:
            self._counts["duplicates"] += 1
            return AddOutcome.DUPLICATE
        if any(key in self._closed for key in keys):
            self._counts["late"] += 1
            return AddOutcome.LATE
        self._counts["unexpected"] += 1
        return AddOutcome.UNEXPECTED

    def close(self, kind: AggregateKind, key: str, *, now: float) -> Aggregate | None:
        """Close the aggregate now: COMPLETE if nobody is missing, else PARTIAL."""
        record = self._open.get((kind, key))
        if record is None:
            return None
        return self._finish(record, now)

    def tick(self, now: float) -> int:
        """Time passed: aggregates past their deadline close. Returns how many."""
        due = [a for a in self._open.values() if a.deadline is not None and a.deadline <= now]
        for record in due:
            self._finish(record, now)
        return len(due)

    # -- inside -------------------------------------------------------------------------

    def _settle(self, record: _Open, now: float) -> None:
        """Close the aggregate if nothing it expects is missing."""
        if record.complete():
            self._finish(record, now)

    def _finish(self, record: _Open, now: float) -> Aggregate:
        missing = record.missing()
        state = AggregateState.PARTIAL if missing else AggregateState.COMPLETE
        self._counts[state.value] += 1
        for collector_id in missing:
            self._health_of(collector_id).timeouts += 1
        key = (record.kind, record.key)
        del self._open[key]
        _remember(self._closed, key, self.max_remembered)
        aggregate = record.snapshot(state, now)
        if len(self._done) >= self.max_done:
            self._done.popleft()
            self._counts["undrained"] += 1
        self._done.append(aggregate)
        return aggregate

    def _count_health(
        self, pair: tuple[str, str], status: RpcStatus.ValueType, latency: float | None
    ) -> None:
        """Count a result in its collector's health, once per (task, collector)."""
        if pair in self._pairs:
            return
        _remember(self._pairs, pair, self.max_remembered)
        self._counts["results"] += 1
        health = self._health_of(pair[1])
        health.results += 1
        health.successes += status == RPC_STATUS_SUCCESS
        if latency is not None:
            health.latencies.append(latency)

    def _health_of(self, collector_id: str) -> _Health:
        health = self._health.get(collector_id)
        if health is None:
            health = self._health[collector_id] = _Health(self.latency_window)
            if len(self._health) > self.max_collectors:
                self._health.popitem(last=False)
        self._health.move_to_end(collector_id)
        return health
