"""Messages of the control plane, built short for the pure control tests."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.duration_pb2 import Duration

from daemoneye.eventbus.v1 import control_pb2
from daemoneye.eventbus.v1.control_pb2 import (
    CollectorCapability,
    CollectorRegistration,
    Heartbeat,
    PresenceEvent,
    TaskAssignment,
    TaskResult,
)
from daemoneye_eventbus.control import CollectorInfo, CollectorRegistry


def registration(
    collector_id: str,
    *,
    task_types: Iterable[str] = ("scan",),
    capabilities: Iterable[str] = (),
    max_tasks: int = 1,
    interval: float = 0.0,
    session: str | None = None,
    collector_type: str = "process",
) -> CollectorRegistration:
    reg = CollectorRegistration(
        collector_id=collector_id,
        collector_type=collector_type,
        version="1.0",
        task_types=list(task_types),
        capabilities=[CollectorCapability(name=c, version="1") for c in capabilities],
        max_concurrent_tasks=max_tasks,
        session_id=f"s-{collector_id}" if session is None else session,
        pid=1000,
    )
    if interval:
        reg.heartbeat_interval.CopyFrom(Duration(seconds=int(interval), nanos=0))
    return reg


def heartbeat(
    collector_id: str, sequence: int = 0, *, load: float = 0.0, active: int = 0
) -> Heartbeat:
    return Heartbeat(component_id=collector_id, sequence=sequence, load=load, active_tasks=active)


def disconnected(
    session: str,
    reason: control_pb2.DisconnectReason.ValueType = control_pb2.DISCONNECT_REASON_CONNECTION_LOST,
) -> PresenceEvent:
    return PresenceEvent(
        state=control_pb2.PRESENCE_STATE_DISCONNECTED, session_id=session, reason=reason
    )


def up(
    reg: CollectorRegistry,
    collector_id: str,
    *,
    now: float = 0.0,
    task_types: Iterable[str] = ("scan",),
    capabilities: Iterable[str] = (),
    max_tasks: int = 1,
) -> CollectorInfo:
    """Register a collector and give it its first heartbeat: READY."""
    reg.register(
        registration(
            collector_id, task_types=task_types, capabilities=capabilities, max_tasks=max_tasks
        ),
        now=now,
    )
    info = reg.heartbeat(heartbeat(collector_id), now=now)
    assert info is not None
    return info


def task(
    task_id: str, task_type: str = "scan", *, priority: int = 0, capability: str = ""
) -> TaskAssignment:
    return TaskAssignment(
        task_id=task_id, task_type=task_type, priority=priority, required_capability=capability
    )


def result(
    task_id: str,
    collector_id: str,
    status: control_pb2.RpcStatus.ValueType = control_pb2.RPC_STATUS_SUCCESS,
) -> TaskResult:
    return TaskResult(task_id=task_id, collector_id=collector_id, status=status)
