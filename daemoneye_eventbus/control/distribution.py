"""Which collector runs which task, and what becomes of it (pure).

The agent hands a ``TaskAssignment`` to :meth:`TaskDistributor.distribute`.
The distributor picks, by its :mod:`strategy <daemoneye_eventbus.control.strategies>`,
a READY collector of the :class:`~daemoneye_eventbus.control.registry.CollectorRegistry`
that can run it (``task_type`` in the collector's task types, and
``required_capability`` among its capabilities when the task names one) and
has a free task slot. With none, the task waits in a bounded queue, higher
``priority`` first and first come first served within a priority, until one
is free. A task's life::

    distribute ──> PENDING ──hand-out──> ASSIGNED ──acknowledge──> ACKNOWLEDGED
                      ^                     │                           │
                      └── refused, or its collector died (re-assignment)┘
    PENDING, ASSIGNED, ACKNOWLEDGED ──complete──> COMPLETED (or FAILED)
                                    ──deadline passed, attempts used up, cancel──> FAILED

A task that names its ``collector_id`` goes to that collector only (it
waits while that one is not free). A task whose collector is GONE, UNRESPONSIVE or restarted (a new
incarnation) before it finished goes back to the queue and to another
collector (never the same incarnation of one that already failed it), at
most ``max_attempts`` hand-outs in all. The task keeps its id, so a
collector that sees it twice can ignore it; a result from any collector
that held it finishes it, once.

Nothing is sent from here. Every hand-out is an :class:`Assignment` and
every failure the caller did not ask for directly (a deadline passed while
the task waited or ran, attempts used up, a cancel) a :class:`TaskFailed`,
both queued until :meth:`TaskDistributor.take_actions`: the asyncio layer
carries them out after each call. Time is the caller's monotonic clock, in
seconds; :func:`task_deadline` turns a task's wall-clock ``deadline`` into it.
"""

from __future__ import annotations

import heapq
from collections import Counter, OrderedDict, deque
from collections.abc import Iterator
from dataclasses import fields
from typing import Final

from daemoneye.eventbus.v1.control_pb2 import TaskAssignment
from daemoneye_eventbus.control.collectors import CollectorInfo, CollectorState
from daemoneye_eventbus.control.registry import CollectorRegistry
from daemoneye_eventbus.control.strategies import LeastLoaded, Strategy
from daemoneye_eventbus.control.tasks import (
    IN_FLIGHT_STATES,
    Action,
    Assignment,
    CollectorFigures,
    Decision,
    DistributionStatistics,
    FailureReason,
    Finish,
    Queued,
    StrategyFigures,
    TaskFailed,
    TaskState,
    TaskStatus,
)

__all__ = ["TaskDistributor"]

_DEAD: Final = frozenset({CollectorState.GONE, CollectorState.UNRESPONSIVE})


class _Task:
    """The distributor's record of one task."""

    __slots__ = (
        "acknowledged_at",
        "assigned_at",
        "assignment",
        "attempt",
        "collector_id",
        "deadline",
        "excluded",
        "holders",
        "holding",
        "incarnation",
        "previous",
        "seq",
        "state",
        "strategy",
        "submitted_at",
        "task",
    )

    def __init__(
        self, task: TaskAssignment, seq: int, now: float, deadline: float | None, strategy: Strategy
    ) -> None:
        self.task = task
        self.seq = seq
        self.submitted_at = now
        self.deadline = deadline
        self.strategy = strategy
        self.state = TaskState.PENDING
        self.collector_id = ""
        self.incarnation = 0
        self.attempt = 0
        self.assigned_at: float | None = None
        self.acknowledged_at: float | None = None
        self.previous = ""
        #: Its last hand-out.
        self.assignment: Assignment | None = None
        self.excluded: set[tuple[str, int]] = set()
        #: Every collector it was handed to: a result from any of them finishes it.
        self.holders: set[str] = set()
        #: It occupies a task slot of ``collector_id``.
        self.holding = False

    def kind(self) -> tuple[str, str, str]:
        """What a collector must be to run it: task type, capability, the collector named."""
        return (self.task.task_type, self.task.required_capability, self.task.collector_id)

    def may_go_to(self, info: CollectorInfo) -> bool:
        """Whether ``info`` can run it, is the collector it names (if any), and has
        not failed it."""
        pinned = self.task.collector_id
        return (
            info.can_run(self.task.task_type, self.task.required_capability)
            and (not pinned or info.collector_id == pinned)
            and (info.collector_id, info.incarnation) not in self.excluded
        )

    def entry(self) -> tuple[int, int, str]:
        """Its place in the queue: higher priority first, then first come."""
        return (-self.task.priority, self.seq, self.task.task_id)

    def status(self) -> TaskStatus:
        return TaskStatus(
            self.task.task_id,
            self.task.task_type,
            self.task.priority,
            self.state,
            self.collector_id,
            self.attempt,
            self.strategy.name,
            self.submitted_at,
            self.assigned_at,
            self.acknowledged_at,
            self.deadline,
            frozenset(self.excluded),
        )


def _death(record: _Task, info: CollectorInfo | None) -> str:
    """Why the collector holding ``record`` is taken to be dead."""
    if info is None:
        return f"{record.collector_id} is no longer registered"
    if info.incarnation != record.incarnation:
        return f"{record.collector_id} restarted"
    return f"{record.collector_id} is {info.state.value}"


class _Figures:
    """Counters by name, per strategy and per collector (the least recently
    touched collector is forgotten beyond ``max_collectors``)."""

    def __init__(self, max_collectors: int) -> None:
        self.total: Counter[str] = Counter()
        self.strategies: dict[str, Counter[str]] = {}
        self.collectors: OrderedDict[str, Counter[str]] = OrderedDict()
        self.max_collectors = max_collectors

    def count(
        self, name: str, *, strategy: str = "", collector: str = "", total: bool = True
    ) -> None:
        if total:
            self.total[name] += 1
        if strategy:
            self.strategies.setdefault(strategy, Counter())[name] += 1
        if collector:
            tally = self.collectors.get(collector)
            if tally is None:
                tally = self.collectors[collector] = Counter()
                if len(self.collectors) > self.max_collectors:
                    self.collectors.popitem(last=False)
            self.collectors.move_to_end(collector)
            tally[name] += 1

    def snapshot(self, pending: int, in_flight: int) -> DistributionStatistics:
        strategy = [f.name for f in fields(StrategyFigures)]
        collector = [f.name for f in fields(CollectorFigures)]
        t = self.total
        return DistributionStatistics(
            submitted=t["submitted"],
            assigned=t["assigned"],
            acknowledged=t["acknowledged"],
            completed=t["completed"],
            failed=t["failed"],
            reassigned=t["reassigned"],
            expired=t["expired"],
            refused=t["refused"],
            cancelled=t["cancelled"],
            pending=pending,
            in_flight=in_flight,
            by_strategy={
                s: StrategyFigures(*(c[n] for n in strategy)) for s, c in self.strategies.items()
            },
            by_collector={
                k: CollectorFigures(*(c[n] for n in collector)) for k, c in self.collectors.items()
            },
        )


class TaskDistributor:
    """Hands tasks to the collectors of ``registry``; see the module docstring."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        strategy: Strategy | None = None,
        max_pending: int = 1024,
        max_in_flight: int = 4096,
        max_attempts: int = 3,
        max_finished: int = 4096,
    ) -> None:
        if min(max_pending, max_in_flight, max_attempts, max_finished) < 1:
            raise ValueError("the distributor's limits must be at least 1")
        self.registry = registry
        #: The strategy of tasks distributed without one of their own.
        self.strategy: Strategy = strategy if strategy is not None else LeastLoaded()
        self.max_pending = max_pending
        self.max_in_flight = max_in_flight
        self.max_attempts = max_attempts
        self.max_finished = max_finished
        self._tasks: dict[str, _Task] = {}
        self._queue: list[tuple[int, int, str]] = []  # heap of _Task.entry()
        self._pending: set[str] = set()
        self._holding: Counter[str] = Counter()  # tasks in flight per collector
        self._finished: OrderedDict[str, TaskState] = OrderedDict()
        self._actions: deque[Action] = deque()
        self._seq = 0
        self._figures = _Figures(max_collectors=4 * registry.max_collectors)

    # -- queries ------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Tasks waiting for a collector."""
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        """Tasks handed out and not finished."""
        return len(self._tasks) - len(self._pending)

    def task(self, task_id: str) -> TaskStatus | None:
        """The task, if pending or handed out."""
        record = self._tasks.get(task_id)
        return record.status() if record is not None else None

    def tasks(self) -> Iterator[TaskStatus]:
        return (r.status() for r in list(self._tasks.values()))

    def next_deadline(self) -> float | None:
        """The earliest deadline of a task held, or None."""
        return min(
            (r.deadline for r in self._tasks.values() if r.deadline is not None), default=None
        )

    def take_actions(self) -> list[Action]:
        """The hand-outs and failures to carry out, oldest first (and forget them)."""
        out = list(self._actions)
        self._actions.clear()
        return out

    def statistics(self) -> DistributionStatistics:
        return self._figures.snapshot(self.pending, self.in_flight)

    # -- what the agent does -----------------------------------------------------------

    def distribute(
        self,
        task: TaskAssignment,
        *,
        now: float,
        deadline: float | None = None,
        strategy: Strategy | None = None,
    ) -> Decision:
        """Take a task (``deadline`` on the caller's clock, None for none).

        Returns its :class:`Assignment`, :class:`Queued` if it waits, or
        :class:`TaskFailed` if it is refused: no id, an id already known, its
        deadline passed, or the queue full. A hand-out is also among
        :meth:`take_actions` (with any waiting task handed out at once).
        """
        self._figures.count("submitted")
        task_id = task.task_id
        if not task_id:
            return self._refuse(task_id, FailureReason.INVALID, "the task has no id")
        if task_id in self._tasks or task_id in self._finished:
            return self._refuse(task_id, FailureReason.DUPLICATE, f"task {task_id!r} is known")
        if deadline is not None and deadline <= now:
            self._figures.count("expired")
            return self._refuse(task_id, FailureReason.EXPIRED, "its deadline has passed")
        copy = TaskAssignment()
        copy.CopyFrom(task)
        self._seq += 1
        record = _Task(copy, self._seq, now, deadline, strategy or self.strategy)
        self._tasks[task_id] = record
        self._enqueue(record)
        self._hand_out(now)
        if record.assignment is not None:
            return record.assignment
        if len(self._pending) > self.max_pending:
            del self._tasks[task_id]
            self._pending.discard(task_id)
            return self._refuse(task_id, FailureReason.QUEUE_FULL, f"{self.max_pending} tasks wait")
        return Queued(task_id, len(self._pending))

    def acknowledge(self, task_id: str, collector_id: str, *, now: float) -> bool:
        """The collector accepted the task (``TaskAck`` SUCCESS or IN_PROGRESS).
        False if it does not hold the task."""
        record = self._tasks.get(task_id)
        if (
            record is None
            or record.state not in IN_FLIGHT_STATES
            or record.collector_id != collector_id
        ):
            return False
        if record.state is TaskState.ASSIGNED:
            record.state = TaskState.ACKNOWLEDGED
            record.acknowledged_at = now
            self._figures.count("acknowledged", collector=collector_id)
        return True

    def refuse(self, task_id: str, collector_id: str, *, now: float, reason: str = "") -> bool:
        """The collector refused the task (``TaskAck`` ERROR), or its hand-out
        went unanswered (timeout, no responder): another collector gets it.
        False if that collector does not hold the task."""
        record = self._tasks.get(task_id)
        if (
            record is None
            or record.state not in IN_FLIGHT_STATES
            or record.collector_id != collector_id
        ):
            return False
        # Counted for the collector; the total counts the distributor's own refusals.
        self._figures.count("refused", collector=collector_id, total=False)
        self._take_back(record, now, f"refused by {collector_id}: {reason}".rstrip(": "))
        self._hand_out(now)
        return True

    def complete(
        self, task_id: str, collector_id: str, *, now: float, success: bool = True
    ) -> Finish:
        """A collector that held the task reported its result: the task is
        finished (COMPLETED, or FAILED when ``success`` is false), once."""
        record = self._tasks.get(task_id)
        if record is None:
            return Finish.ALREADY_FINISHED if task_id in self._finished else Finish.UNKNOWN
        if collector_id not in record.holders:
            return Finish.NOT_ASSIGNED
        outcome = "completed" if success else "failed"
        self._figures.count(outcome, strategy=record.strategy.name, collector=collector_id)
        self._close(record, TaskState.COMPLETED if success else TaskState.FAILED, now)
        self._hand_out(now)
        return Finish.FINISHED

    def cancel(self, task_id: str, *, now: float, reason: str = "cancelled") -> bool:
        """Drop a task that has not finished (a :class:`TaskFailed` follows)."""
        record = self._tasks.get(task_id)
        if record is None:
            return False
        self._figures.count("cancelled")
        self._fail(record, FailureReason.CANCELLED, reason, now)
        self._hand_out(now)
        return True

    def tick(self, now: float) -> None:
        """Time passed, or the registry changed: take tasks back from dead or
        restarted collectors, fail tasks past their deadline, hand out what
        can be handed out. Call it after feeding the registry and on a timer
        (:meth:`next_deadline`, the registry's ``next_deadline``)."""
        for record in list(self._tasks.values()):
            if record.state in IN_FLIGHT_STATES:
                info = self.registry.get(record.collector_id)
                if info is None or info.state in _DEAD or info.incarnation != record.incarnation:
                    self._take_back(record, now, _death(record, info))
                    continue
            if record.deadline is not None and record.deadline <= now:
                self._fail(record, FailureReason.EXPIRED, "its deadline passed", now)
        self._hand_out(now)

    # -- inside -------------------------------------------------------------------------

    def _refuse(self, task_id: str, reason: FailureReason, detail: str) -> TaskFailed:
        self._figures.count("refused")
        return TaskFailed(task_id, reason, detail)

    def _enqueue(self, record: _Task) -> None:
        record.state = TaskState.PENDING
        self._pending.add(record.task.task_id)
        heapq.heappush(self._queue, record.entry())

    def _hand_out(self, now: float) -> None:
        """Hand waiting tasks, best first, to the free collectors able to run them."""
        if not self._pending:
            return
        free = {c.collector_id: c for c in self.registry.collectors(CollectorState.READY)}
        kept: list[tuple[int, int, str]] = []
        blocked: set[tuple[str, str, str]] = set()  # kinds of task no free collector runs
        while self._queue and free and self.in_flight < self.max_in_flight:
            entry = heapq.heappop(self._queue)
            record = self._tasks.get(entry[2])
            if record is None or record.state is not TaskState.PENDING or record.seq != entry[1]:
                continue  # stale: the task left the queue some other way
            if record.deadline is not None and record.deadline <= now:
                self._fail(record, FailureReason.EXPIRED, "its deadline passed", now)
                continue
            kind = record.kind()
            if kind in blocked:
                kept.append(entry)
                continue
            candidates = [c for c in free.values() if record.may_go_to(c)]
            if not candidates:
                if not record.excluded:
                    blocked.add(kind)
                kept.append(entry)
                continue
            chosen = self._assign(record, record.strategy.choose(record.task, candidates), now)
            if chosen is None or chosen.state is not CollectorState.READY:
                free.pop(record.collector_id, None)
            else:
                free[chosen.collector_id] = chosen
        for entry in kept:
            heapq.heappush(self._queue, entry)
        if len(self._queue) > 2 * len(self._pending) + 64:
            self._queue = [r.entry() for r in self._tasks.values() if r.state is TaskState.PENDING]
            heapq.heapify(self._queue)

    def _assign(self, record: _Task, info: CollectorInfo, now: float) -> CollectorInfo | None:
        cid = info.collector_id
        self._pending.discard(record.task.task_id)
        record.state = TaskState.ASSIGNED
        record.collector_id = cid
        record.incarnation = info.incarnation
        record.attempt += 1
        record.assigned_at = now
        record.acknowledged_at = None
        record.holders.add(cid)
        record.holding = True
        self._holding[cid] += 1
        task = TaskAssignment()
        task.CopyFrom(record.task)
        task.collector_id = cid
        task.attempt = record.attempt
        name = record.strategy.name
        record.assignment = Assignment(task, cid, record.attempt, name, record.previous)
        self._actions.append(record.assignment)
        record.previous = ""
        self._figures.count("assigned", strategy=name, collector=cid)
        return self.registry.set_assigned(cid, self._holding[cid], now=now)

    def _release(self, record: _Task, now: float) -> None:
        """The task no longer occupies a slot of its collector."""
        if not record.holding:
            return
        record.holding = False
        cid = record.collector_id
        self._holding[cid] -= 1
        left = self._holding[cid]
        if left <= 0:
            del self._holding[cid]
        self.registry.set_assigned(cid, left, now=now)

    def _take_back(self, record: _Task, now: float, why: str) -> None:
        """Its collector died or refused it: back to the queue, or failed if
        it was handed out ``max_attempts`` times."""
        cid = record.collector_id
        self._release(record, now)
        record.excluded.add((cid, record.incarnation))
        exhausted = record.attempt >= self.max_attempts
        self._figures.count("reassigned", collector=cid, total=not exhausted)
        if exhausted:
            detail = f"{why}; handed out {record.attempt} times"
            self._fail(record, FailureReason.ATTEMPTS_EXHAUSTED, detail, now)
            return
        record.previous = cid
        self._enqueue(record)

    def _fail(self, record: _Task, reason: FailureReason, detail: str, now: float) -> None:
        cid = record.collector_id if record.holding else ""
        if reason is FailureReason.EXPIRED:
            self._figures.count("expired", collector=cid)
        self._figures.count("failed", strategy=record.strategy.name, collector=cid)
        self._actions.append(TaskFailed(record.task.task_id, reason, detail, record.collector_id))
        self._close(record, TaskState.FAILED, now)

    def _close(self, record: _Task, state: TaskState, now: float) -> None:
        task_id = record.task.task_id
        self._release(record, now)
        record.state = state
        self._pending.discard(task_id)
        del self._tasks[task_id]
        self._finished[task_id] = state
        if len(self._finished) > self.max_finished:
            self._finished.popitem(last=False)
