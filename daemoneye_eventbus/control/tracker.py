"""A bounded history of workflows, by correlation root (pure).

Every event and task of a multi-collector workflow carries correlation
metadata whose ``root_correlation_id`` names the workflow. The agent shows
each one it sees to a :class:`CorrelationTracker` (:meth:`~CorrelationTracker.observe`,
with the time on its monotonic clock), which keeps per workflow: the stages
seen (``workflow_stage``, with counts and first and last times), the
collectors involved, how many events and tasks, and when it was first and
last seen. A workflow is::

    ACTIVE ──idle for idle_timeout──> TIMED_OUT
           ──finish()──> FINISHED
           ──evicted to make room──> EVICTED

and an ended workflow stays in a bounded history, where a new event for it
makes it ACTIVE again. At most ``max_workflows`` are active: the least
recently seen is evicted first (and counted). Queries:
:meth:`~CorrelationTracker.workflow`, :meth:`~CorrelationTracker.active`,
:meth:`~CorrelationTracker.recent`.
"""

from __future__ import annotations

import enum
from collections import Counter, OrderedDict
from dataclasses import dataclass

from daemoneye.eventbus.v1.correlation_pb2 import CorrelationMetadata

__all__ = [
    "CorrelationTracker",
    "StageRecord",
    "TrackerStatistics",
    "WorkflowRecord",
    "WorkflowState",
]


class WorkflowState(enum.Enum):
    ACTIVE = "active"
    #: Nothing seen of it for ``idle_timeout`` seconds.
    TIMED_OUT = "timed out"
    #: The agent said it is over.
    FINISHED = "finished"
    #: Dropped from the active workflows to make room for a newer one.
    EVICTED = "evicted"


@dataclass(frozen=True, slots=True)
class StageRecord:
    """One stage of a workflow (a ``workflow_stage``)."""

    name: str
    count: int
    first_seen: float
    last_seen: float


@dataclass(frozen=True, slots=True)
class WorkflowRecord:
    """A snapshot of one workflow."""

    root_id: str
    state: WorkflowState
    first_seen: float
    last_seen: float
    #: When it stopped being ACTIVE (None while it is).
    ended_at: float | None
    #: Its stages in the order first seen.
    stages: tuple[StageRecord, ...]
    #: The collectors involved, in the order first seen.
    collectors: tuple[str, ...]
    events: int
    tasks: int
    #: Stages and collectors beyond the tracker's bounds, not kept.
    stages_dropped: int
    collectors_dropped: int


@dataclass(frozen=True, slots=True)
class TrackerStatistics:
    active: int
    history: int
    observed: int
    finished: int
    timed_out: int
    evicted: int


class _Workflow:
    __slots__ = (
        "collectors",
        "collectors_dropped",
        "ended_at",
        "events",
        "first_seen",
        "last_seen",
        "root_id",
        "stages",
        "stages_dropped",
        "state",
        "tasks",
    )

    def __init__(self, root_id: str, now: float) -> None:
        self.root_id = root_id
        self.state = WorkflowState.ACTIVE
        self.first_seen = now
        self.last_seen = now
        self.ended_at: float | None = None
        #: name -> [count, first seen, last seen]
        self.stages: dict[str, list[float]] = {}
        self.collectors: dict[str, None] = {}
        self.events = 0
        self.tasks = 0
        self.stages_dropped = 0
        self.collectors_dropped = 0

    def snapshot(self) -> WorkflowRecord:
        return WorkflowRecord(
            self.root_id,
            self.state,
            self.first_seen,
            self.last_seen,
            self.ended_at,
            tuple(StageRecord(n, int(c), f, last) for n, (c, f, last) in self.stages.items()),
            tuple(self.collectors),
            self.events,
            self.tasks,
            self.stages_dropped,
            self.collectors_dropped,
        )


class CorrelationTracker:
    """Workflows by correlation root; see the module docstring."""

    def __init__(
        self,
        *,
        max_workflows: int = 1024,
        max_history: int = 1024,
        max_stages: int = 32,
        max_collectors: int = 64,
        idle_timeout: float = 300.0,
    ) -> None:
        if min(max_workflows, max_history, max_stages, max_collectors) < 1 or idle_timeout <= 0:
            raise ValueError("the tracker's limits must be positive")
        self.max_workflows = max_workflows
        self.max_history = max_history
        self.max_stages = max_stages
        self.max_collectors = max_collectors
        self.idle_timeout = idle_timeout
        # Both least recently seen (or ended) first.
        self._active: OrderedDict[str, _Workflow] = OrderedDict()
        self._history: OrderedDict[str, _Workflow] = OrderedDict()
        self._counts: Counter[str] = Counter()

    # -- queries ------------------------------------------------------------------------

    def workflow(self, root_id: str) -> WorkflowRecord | None:
        """The workflow, active or in the history."""
        record = self._active.get(root_id) or self._history.get(root_id)
        return record.snapshot() if record is not None else None

    def active(self) -> list[WorkflowRecord]:
        """The active workflows, most recently seen first."""
        return [w.snapshot() for w in reversed(self._active.values())]

    def recent(self, n: int) -> list[WorkflowRecord]:
        """The ``n`` most recently seen workflows, active or ended, newest first."""
        if n <= 0:
            return []
        newest = sorted(
            [*self._active.values(), *self._history.values()],
            key=lambda w: w.last_seen,
            reverse=True,
        )
        return [w.snapshot() for w in newest[:n]]

    def next_deadline(self) -> float | None:
        """When the least recently seen active workflow times out, or None."""
        oldest = next(iter(self._active.values()), None)
        return oldest.last_seen + self.idle_timeout if oldest is not None else None

    def statistics(self) -> TrackerStatistics:
        c = self._counts
        return TrackerStatistics(
            len(self._active),
            len(self._history),
            c["observed"],
            c["finished"],
            c["timed_out"],
            c["evicted"],
        )

    # -- what the agent sees -----------------------------------------------------------

    def observe(
        self,
        root_id: str,
        *,
        now: float,
        stage: str = "",
        collector_id: str = "",
        task: bool = False,
    ) -> WorkflowRecord:
        """An event (or, with ``task``, a task) of the workflow ``root_id``,
        at ``stage``, involving ``collector_id`` (each optional)."""
        self._counts["observed"] += 1
        record = self._active.get(root_id)
        if record is None:
            record = self._history.pop(root_id, None) or _Workflow(root_id, now)
            record.state = WorkflowState.ACTIVE
            record.ended_at = None
            self._active[root_id] = record
            if len(self._active) > self.max_workflows:
                _, oldest = self._active.popitem(last=False)
                self._counts["evicted"] += 1
                self._end(oldest, WorkflowState.EVICTED, now)
        self._active.move_to_end(root_id)
        record.last_seen = max(record.last_seen, now)
        if task:
            record.tasks += 1
        else:
            record.events += 1
        if stage:
            figures = record.stages.get(stage)
            if figures is not None:
                figures[0] += 1
                figures[2] = now
            elif len(record.stages) < self.max_stages:
                record.stages[stage] = [1, now, now]
            else:
                record.stages_dropped += 1
        if collector_id and collector_id not in record.collectors:
            if len(record.collectors) < self.max_collectors:
                record.collectors[collector_id] = None
            else:
                record.collectors_dropped += 1
        return record.snapshot()

    def observe_metadata(
        self,
        metadata: CorrelationMetadata,
        *,
        now: float,
        collector_id: str = "",
        task: bool = False,
    ) -> WorkflowRecord | None:
        """:meth:`observe` an event's correlation metadata (its root, or its
        own id when it names no root; None when it names neither)."""
        root_id = metadata.root_correlation_id or metadata.correlation_id
        if not root_id:
            return None
        stage = metadata.workflow_stage if metadata.HasField("workflow_stage") else ""
        return self.observe(root_id, now=now, stage=stage, collector_id=collector_id, task=task)

    def finish(self, root_id: str, *, now: float) -> WorkflowRecord | None:
        """The workflow is over: FINISHED, into the history. None if not active."""
        record = self._active.pop(root_id, None)
        if record is None:
            return None
        self._counts["finished"] += 1
        self._end(record, WorkflowState.FINISHED, now)
        return record.snapshot()

    def expire(self, now: float) -> list[WorkflowRecord]:
        """Workflows idle for ``idle_timeout`` seconds time out; returns them."""
        out: list[WorkflowRecord] = []
        while self._active:
            root_id, oldest = next(iter(self._active.items()))
            if now - oldest.last_seen < self.idle_timeout:
                break
            del self._active[root_id]
            self._counts["timed_out"] += 1
            self._end(oldest, WorkflowState.TIMED_OUT, now)
            out.append(oldest.snapshot())
        return out

    # -- inside -------------------------------------------------------------------------

    def _end(self, record: _Workflow, state: WorkflowState, now: float) -> None:
        record.state = state
        record.ended_at = now
        self._history[record.root_id] = record
        self._history.move_to_end(record.root_id)
        if len(self._history) > self.max_history:
            self._history.popitem(last=False)
