"""The collector control plane's bookkeeping (pure: no event loop, no clock).

An agent runs many collectors through the bus; these classes keep the
agent's view of them, driven by the messages of ``control.proto`` and by the
time the caller passes in (monotonic seconds):

- :mod:`~daemoneye_eventbus.control.registry`: :class:`CollectorRegistry`,
  every collector (:mod:`~daemoneye_eventbus.control.collectors`:
  :class:`CollectorInfo`) with its state, capabilities and load;
- :mod:`~daemoneye_eventbus.control.distribution`: :class:`TaskDistributor`,
  which collector runs which task (:mod:`~daemoneye_eventbus.control.strategies`),
  with priority, deadlines, queueing and re-assignment; what it decides and
  counts is in :mod:`~daemoneye_eventbus.control.tasks`;
- :mod:`~daemoneye_eventbus.control.aggregation`: :class:`ResultAggregator`,
  the results of a task or a workflow put together, and each collector's
  health figures;
- :mod:`~daemoneye_eventbus.control.tracker`: :class:`CorrelationTracker`,
  a bounded history of workflows by correlation root.

They never send anything: they return decisions that an asyncio layer
carries out on the bus (docs/control-plane.md).
"""

from __future__ import annotations

from daemoneye_eventbus.control.aggregation import (
    AddOutcome,
    Aggregate,
    AggregateKind,
    AggregateState,
    AggregationStatistics,
    CollectedResult,
    CollectorHealth,
    ResultAggregator,
)
from daemoneye_eventbus.control.collectors import (
    Capability,
    ChangeKind,
    CollectorChange,
    CollectorInfo,
    CollectorState,
    RegistryStatistics,
)
from daemoneye_eventbus.control.distribution import TaskDistributor
from daemoneye_eventbus.control.registry import CollectorRegistry
from daemoneye_eventbus.control.strategies import (
    FirstAvailable,
    LeastLoaded,
    Random,
    RoundRobin,
    Strategy,
)
from daemoneye_eventbus.control.tasks import (
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
    task_deadline,
)
from daemoneye_eventbus.control.tracker import (
    CorrelationTracker,
    StageRecord,
    TrackerStatistics,
    WorkflowRecord,
    WorkflowState,
)

__all__ = [
    "Action",
    "AddOutcome",
    "Aggregate",
    "AggregateKind",
    "AggregateState",
    "AggregationStatistics",
    "Assignment",
    "Capability",
    "ChangeKind",
    "CollectedResult",
    "CollectorChange",
    "CollectorFigures",
    "CollectorHealth",
    "CollectorInfo",
    "CollectorRegistry",
    "CollectorState",
    "CorrelationTracker",
    "Decision",
    "DistributionStatistics",
    "FailureReason",
    "Finish",
    "FirstAvailable",
    "LeastLoaded",
    "Queued",
    "Random",
    "RegistryStatistics",
    "ResultAggregator",
    "RoundRobin",
    "StageRecord",
    "Strategy",
    "StrategyFigures",
    "TaskDistributor",
    "TaskFailed",
    "TaskState",
    "TaskStatus",
    "TrackerStatistics",
    "WorkflowRecord",
    "WorkflowState",
    "task_deadline",
]
