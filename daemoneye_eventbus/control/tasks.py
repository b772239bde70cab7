"""What the task distributor decides and reports (pure): a task's states,
the hand-outs and failures it returns, its figures.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from daemoneye.eventbus.v1.control_pb2 import TaskAssignment

__all__ = [
    "IN_FLIGHT_STATES",
    "Action",
    "Assignment",
    "CollectorFigures",
    "Decision",
    "DistributionStatistics",
    "FailureReason",
    "Finish",
    "Queued",
    "StrategyFigures",
    "TaskFailed",
    "TaskState",
    "TaskStatus",
    "task_deadline",
]


class TaskState(enum.Enum):
    PENDING = "pending"
    ASSIGNED = "assigned"
    ACKNOWLEDGED = "acknowledged"
    COMPLETED = "completed"
    FAILED = "failed"


#: The states of a task handed out and not finished.
IN_FLIGHT_STATES: Final = frozenset({TaskState.ASSIGNED, TaskState.ACKNOWLEDGED})


class FailureReason(enum.Enum):
    """Why a task was refused or failed without a collector's result."""

    #: Its deadline passed (before it was handed out, or before it finished).
    EXPIRED = "expired"
    #: No collector was free and the queue was full.
    QUEUE_FULL = "queue full"
    #: A task with that id is already known.
    DUPLICATE = "duplicate"
    #: The task has no id.
    INVALID = "invalid"
    #: It was handed out ``max_attempts`` times and never finished.
    ATTEMPTS_EXHAUSTED = "attempts exhausted"
    #: The agent cancelled it.
    CANCELLED = "cancelled"


class Finish(enum.Enum):
    """What :meth:`TaskDistributor.complete` made of a result."""

    #: The task is finished now.
    FINISHED = "finished"
    #: It had finished already (or failed): the result is a duplicate or late.
    ALREADY_FINISHED = "already finished"
    #: No such task (or finished so long ago that it was forgotten).
    UNKNOWN = "unknown"
    #: The task was never handed to that collector.
    NOT_ASSIGNED = "not assigned"


@dataclass(frozen=True, slots=True)
class Assignment:
    """Hand ``task`` (a copy with ``collector_id`` and ``attempt`` set) to the collector."""

    task: TaskAssignment
    collector_id: str
    #: 1 for the first hand-out, one more for each re-assignment.
    attempt: int
    #: The strategy that chose the collector.
    strategy: str
    #: On a re-assignment, the collector the task was taken from.
    previous: str = ""

    @property
    def task_id(self) -> str:
        return self.task.task_id


@dataclass(frozen=True, slots=True)
class Queued:
    """No collector can take the task now: it waits."""

    task_id: str
    #: Tasks waiting, this one included.
    pending: int


@dataclass(frozen=True, slots=True)
class TaskFailed:
    """The task was refused, or failed without a collector's result."""

    task_id: str
    reason: FailureReason
    detail: str
    #: The collector it was last handed to, "" if none.
    collector_id: str = ""


#: What :meth:`TaskDistributor.distribute` made of a task.
Decision = Assignment | Queued | TaskFailed
#: What the asyncio layer carries out (:meth:`TaskDistributor.take_actions`).
Action = Assignment | TaskFailed


@dataclass(frozen=True, slots=True)
class TaskStatus:
    """A snapshot of one task the distributor holds (pending or handed out)."""

    task_id: str
    task_type: str
    priority: int
    state: TaskState
    #: The collector it is handed to, "" while pending.
    collector_id: str
    attempt: int
    strategy: str
    submitted_at: float
    assigned_at: float | None
    acknowledged_at: float | None
    deadline: float | None
    #: The collectors (id, incarnation) that failed it and will not get it again.
    excluded: frozenset[tuple[str, int]]


@dataclass(frozen=True, slots=True)
class StrategyFigures:
    """What one strategy did since the distributor was made."""

    assigned: int = 0
    completed: int = 0
    failed: int = 0


@dataclass(frozen=True, slots=True)
class CollectorFigures:
    """What became of the tasks handed to one collector."""

    assigned: int = 0
    acknowledged: int = 0
    completed: int = 0
    failed: int = 0
    #: Tasks it refused (or whose hand-out it never answered).
    refused: int = 0
    #: Tasks taken back from it because it died or refused them.
    reassigned: int = 0
    #: Tasks whose deadline passed while it held them.
    expired: int = 0


@dataclass(frozen=True, slots=True)
class DistributionStatistics:
    """A snapshot of the distributor's figures."""

    submitted: int
    assigned: int
    acknowledged: int
    completed: int
    failed: int
    reassigned: int
    expired: int
    #: Tasks refused by :meth:`TaskDistributor.distribute` (any reason).
    refused: int
    cancelled: int
    #: Tasks waiting now.
    pending: int
    #: Tasks handed out and not finished now.
    in_flight: int
    by_strategy: dict[str, StrategyFigures]
    by_collector: dict[str, CollectorFigures]


def task_deadline(task: TaskAssignment, *, now: float, wall_now: float) -> float | None:
    """The task's ``deadline`` (wall clock) on the caller's monotonic clock:
    ``now`` and ``wall_now`` are the same instant on both clocks. None if unset."""
    if not task.HasField("deadline"):
        return None
    return now + (task.deadline.seconds + task.deadline.nanos / 1e9 - wall_now)
