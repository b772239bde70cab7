"""The agent's registry of collectors: who is up, what each can do, how loaded (pure).

A collector announces itself with a ``CollectorRegistration`` on
``control.collector.registration`` and then sends a ``Heartbeat`` on
``control.health.heartbeat`` at the interval it declared; the broker tells
the agent on ``control.presence`` when a session ends. The asyncio layer
feeds those messages to a :class:`CollectorRegistry`, with the time
(monotonic seconds) it received them; the registry keeps a
:class:`CollectorInfo` per collector and moves it between the states of
:class:`CollectorState`::

    register ──> STARTING ──first heartbeat──> READY <──tasks──> BUSY
                    │                            │                 │
                    └──── missed heartbeats ─────┴─> UNRESPONSIVE <┘
                                          a heartbeat ──┘ (back to READY or BUSY)
    session ended (presence) or mark_gone ──> GONE ──forget_after──> removed

READY and BUSY are the agent's own view: a collector is BUSY while the
agent has as many tasks out on it as it runs at once
(:meth:`~CollectorRegistry.set_assigned`, called by the task distributor),
so that a finished task frees it at once rather than at its next heartbeat.
A registration with the session id of the collector's current registration
updates it; any other (a new session, or none given) is a new incarnation:
the collector restarted, whatever it was doing is lost, and it starts again
in STARTING.

Nothing here reads a clock or sends anything: every method takes ``now``,
and every change of state is recorded as a :class:`CollectorChange` that
:meth:`~CollectorRegistry.changes` hands over (the asyncio layer turns them
into an async iterator). The registry holds at most ``max_collectors``
collectors and ``max_changes`` changes.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Final, NamedTuple

from google.protobuf.duration_pb2 import Duration

from daemoneye.eventbus.v1 import control_pb2
from daemoneye.eventbus.v1.control_pb2 import CollectorRegistration, Heartbeat, PresenceEvent
from daemoneye_eventbus.control.collectors import (
    Capability,
    ChangeKind,
    CollectorChange,
    CollectorInfo,
    CollectorState,
    RegistryStatistics,
)
from daemoneye_eventbus.errors import InvalidPayload, LimitExceeded

__all__ = ["HEARTBEAT_INTERVAL_BOUNDS", "MAX_LIST_ENTRIES", "MAX_NAME_CHARS", "CollectorRegistry"]

#: Longest collector id, session id, type, capability or task type accepted.
MAX_NAME_CHARS: Final = 256
#: Most capabilities, task types, event types or topics in one registration.
MAX_LIST_ENTRIES: Final = 256

#: The shortest and longest heartbeat interval believed of a collector, in seconds.
HEARTBEAT_INTERVAL_BOUNDS: Final = (0.01, 3600.0)

_REGISTRATION_TOPIC: Final = "control.collector.registration"


class _Declared(NamedTuple):
    """What a registration declares, checked (CollectorInfo's fields of that name)."""

    collector_type: str
    version: str
    capabilities: tuple[Capability, ...]
    task_types: frozenset[str]
    event_types: tuple[str, ...]
    topics: tuple[str, ...]
    max_concurrent_tasks: int
    heartbeat_interval: float
    session_id: str
    pid: int


def _interval(duration: Duration, default: float) -> float:
    """A declared heartbeat interval within bounds, ``default`` if unset."""
    seconds = duration.seconds + duration.nanos / 1e9
    if seconds <= 0:
        return default
    low, high = HEARTBEAT_INTERVAL_BOUNDS
    return min(high, max(low, seconds))


def _check_name(value: str, what: str) -> None:
    if len(value) > MAX_NAME_CHARS:
        raise LimitExceeded(f"registration: {what} longer than {MAX_NAME_CHARS} characters")


def _check_list(values: Iterable[str], what: str) -> tuple[str, ...]:
    out = tuple(values)
    if len(out) > MAX_LIST_ENTRIES:
        raise LimitExceeded(f"registration: more than {MAX_LIST_ENTRIES} {what}")
    for value in out:
        _check_name(value, what)
    return out


def _declared(
    reg: CollectorRegistration, *, heartbeat_interval: float, max_concurrent_tasks: int
) -> _Declared:
    """What ``reg`` declares, within bounds (:class:`LimitExceeded` if not)."""
    for value, what in (
        (reg.collector_id, "collector id"),
        (reg.collector_type, "collector type"),
        (reg.version, "version"),
        (reg.session_id, "session id"),
    ):
        _check_name(value, what)
    if len(reg.capabilities) > MAX_LIST_ENTRIES:
        raise LimitExceeded(f"registration: more than {MAX_LIST_ENTRIES} capabilities")
    capabilities = []
    for cap in reg.capabilities:
        _check_name(cap.name, "capability")
        params = _check_list(cap.parameters, "capability parameters")
        for key in params:
            _check_name(cap.parameters[key], "capability parameter")
        capabilities.append(
            Capability(
                cap.name, cap.version[:MAX_NAME_CHARS], tuple(sorted(cap.parameters.items()))
            )
        )
    interval = _interval(reg.heartbeat_interval, heartbeat_interval)
    return _Declared(
        collector_type=reg.collector_type,
        version=reg.version,
        capabilities=tuple(capabilities),
        task_types=frozenset(_check_list(reg.task_types, "task types")),
        event_types=_check_list(reg.event_types, "event types"),
        topics=_check_list(reg.topics, "topics"),
        max_concurrent_tasks=min(max(1, reg.max_concurrent_tasks), max_concurrent_tasks),
        heartbeat_interval=interval,
        session_id=reg.session_id,
        pid=reg.pid,
    )


def _with_declared(info: CollectorInfo, d: _Declared) -> CollectorInfo:
    return replace(
        info,
        collector_type=d.collector_type,
        version=d.version,
        capabilities=d.capabilities,
        task_types=d.task_types,
        event_types=d.event_types,
        topics=d.topics,
        max_concurrent_tasks=d.max_concurrent_tasks,
        heartbeat_interval=d.heartbeat_interval,
        session_id=d.session_id,
        pid=d.pid,
    )


def _incarnation(
    collector_id: str, declared: _Declared, now: float, incarnation: int, assigned: int
) -> CollectorInfo:
    """A collector as it (re)registers: STARTING, no heartbeat yet."""
    # _Declared's fields are CollectorInfo's from the second to ``pid``, in order.
    return CollectorInfo(
        collector_id,
        *declared,
        state=CollectorState.STARTING,
        state_since=now,
        registered_at=now,
        last_heartbeat=None,
        last_seen=now,
        heartbeat_sequence=0,
        active_tasks=0,
        load=0.0,
        assigned_tasks=assigned,
        incarnation=incarnation,
    )


def _disconnect_reason(event: PresenceEvent) -> str:
    """How a session ended, in words: "connection lost", "goodbye", ..."""
    try:
        name = control_pb2.DisconnectReason.Name(event.reason)
    except ValueError:  # a reason newer than this schema
        name = f"DISCONNECT_REASON_{event.reason}"
    reason = name.removeprefix("DISCONNECT_REASON_").lower().replace("_", " ")
    if event.detail:
        reason = f"{reason}: {event.detail[:MAX_NAME_CHARS]}"
    return reason


class CollectorRegistry:
    """Every collector the agent knows, with its state, capabilities and load."""

    def __init__(
        self,
        *,
        max_collectors: int = 256,
        missed_heartbeats: int = 3,
        heartbeat_interval: float = 5.0,
        max_concurrent_tasks: int = 64,
        forget_after: float = 300.0,
        max_changes: int = 1024,
    ) -> None:
        if max_collectors < 1 or missed_heartbeats < 1 or max_concurrent_tasks < 1:
            raise ValueError("max_collectors, missed_heartbeats and max_concurrent_tasks >= 1")
        if heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be positive")
        self.max_collectors = max_collectors
        #: Heartbeat intervals without a heartbeat before a collector is UNRESPONSIVE.
        self.missed_heartbeats = missed_heartbeats
        #: The interval assumed when a collector declares none.
        self.heartbeat_interval = heartbeat_interval
        #: The most tasks at once the agent believes of any collector.
        self.max_concurrent_tasks = max_concurrent_tasks
        #: Seconds a GONE collector stays listed before the registry forgets it.
        self.forget_after = forget_after
        self.max_changes = max_changes
        self._collectors: dict[str, CollectorInfo] = {}
        self._changes: deque[CollectorChange] = deque()
        self._counts = dict.fromkeys(
            (
                "registrations",
                "reregistrations",
                "heartbeats",
                "unknown_heartbeats",
                "stale_heartbeats",
                "refused",
                "evicted",
                "changes_dropped",
            ),
            0,
        )

    # -- queries ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._collectors)

    def __contains__(self, collector_id: object) -> bool:
        return collector_id in self._collectors

    def __iter__(self) -> Iterator[CollectorInfo]:
        """Every collector, in the order they first registered."""
        return iter(tuple(self._collectors.values()))

    def get(self, collector_id: str) -> CollectorInfo | None:
        return self._collectors.get(collector_id)

    def collectors(self, state: CollectorState | None = None) -> list[CollectorInfo]:
        """The collectors (in ``state``, if given), in the order they first registered."""
        return [c for c in self._collectors.values() if state is None or c.state is state]

    def capable(self, task_type: str, required_capability: str = "") -> list[CollectorInfo]:
        """The READY collectors that can run such a task, in registration order."""
        return [
            c
            for c in self._collectors.values()
            if c.state is CollectorState.READY and c.can_run(task_type, required_capability)
        ]

    def next_deadline(self) -> float | None:
        """The earliest time at which :meth:`check` may change something, or None."""
        times = [self._silence_deadline(c) for c in self._collectors.values() if c.live]
        times += [
            c.state_since + self.forget_after
            for c in self._collectors.values()
            if c.state is CollectorState.GONE
        ]
        return min(times, default=None)

    def changes(self) -> list[CollectorChange]:
        """The changes since the last call, oldest first (and forget them)."""
        out = list(self._changes)
        self._changes.clear()
        return out

    def statistics(self) -> RegistryStatistics:
        by_state = {s.value: 0 for s in CollectorState}
        for c in self._collectors.values():
            by_state[c.state.value] += 1
        return RegistryStatistics(
            collectors=len(self._collectors), by_state=by_state, **self._counts
        )

    # -- what the collectors and the broker say ----------------------------------------

    def register(self, registration: CollectorRegistration, *, now: float) -> CollectorInfo:
        """A collector (re)registered. Raises :class:`InvalidPayload` for a
        registration without a collector id, :class:`LimitExceeded` for one
        out of bounds or when the registry is full of live collectors."""
        cid = registration.collector_id
        try:
            if not cid:
                raise InvalidPayload(
                    "registration without a collector id", topic=_REGISTRATION_TOPIC
                )
            fields = _declared(
                registration,
                heartbeat_interval=self.heartbeat_interval,
                max_concurrent_tasks=self.max_concurrent_tasks,
            )
        except (InvalidPayload, LimitExceeded):
            self._counts["refused"] += 1
            raise
        old = self._collectors.get(cid)
        if old is not None and fields.session_id and old.session_id == fields.session_id:
            info = _with_declared(old, fields)
            self._collectors[cid] = info
            self._note(info, ChangeKind.UPDATED, old.state, now, "registered again")
            return info
        if old is None:
            self._make_room(now)
            self._counts["registrations"] += 1
            info = _incarnation(cid, fields, now, 1, 0)
            kind, reason = ChangeKind.REGISTERED, "registered"
        else:
            self._counts["reregistrations"] += 1
            info = _incarnation(cid, fields, now, old.incarnation + 1, old.assigned_tasks)
            kind, reason = ChangeKind.REREGISTERED, "restarted"
        self._collectors[cid] = info
        self._note(info, kind, old.state if old else None, now, reason)
        return info

    def heartbeat(self, heartbeat: Heartbeat, *, now: float) -> CollectorInfo | None:
        """A heartbeat arrived; the collector, or None if it was ignored (an
        unknown or GONE collector, or a sequence number already seen)."""
        old = self._collectors.get(heartbeat.component_id)
        if old is None or old.state is CollectorState.GONE:
            self._counts["unknown_heartbeats"] += 1
            return None
        if heartbeat.sequence and heartbeat.sequence <= old.heartbeat_sequence:
            self._counts["stale_heartbeats"] += 1
            return None
        self._counts["heartbeats"] += 1
        interval = _interval(heartbeat.interval, old.heartbeat_interval)
        limit = old.max_concurrent_tasks
        if heartbeat.max_concurrent_tasks:
            limit = min(heartbeat.max_concurrent_tasks, self.max_concurrent_tasks)
        load = heartbeat.load if math.isfinite(heartbeat.load) else 0.0
        info = replace(
            old,
            last_heartbeat=now,
            last_seen=now,
            heartbeat_sequence=heartbeat.sequence or old.heartbeat_sequence,
            active_tasks=heartbeat.active_tasks,
            load=min(1.0, max(0.0, load)),
            heartbeat_interval=interval,
            max_concurrent_tasks=limit,
        )
        return self._set_state(info, self._running_state(info), now, "heartbeat")

    def presence(self, event: PresenceEvent, *, now: float) -> list[CollectorInfo]:
        """The broker reported a session's end: the collectors registered from
        that session are GONE. Returns them (a CONNECTED event changes nothing)."""
        if event.state != control_pb2.PRESENCE_STATE_DISCONNECTED or not event.session_id:
            return []
        reason = _disconnect_reason(event)
        gone = [
            c.collector_id
            for c in self._collectors.values()
            if c.session_id == event.session_id and c.state is not CollectorState.GONE
        ]
        return [self._gone(cid, now, reason) for cid in gone]

    def mark_gone(
        self, collector_id: str, *, now: float, reason: str = "gone"
    ) -> CollectorInfo | None:
        """The collector went away (said goodbye): GONE. None if unknown."""
        info = self._collectors.get(collector_id)
        if info is None or info.state is CollectorState.GONE:
            return info
        return self._gone(collector_id, now, reason)

    def set_assigned(self, collector_id: str, count: int, *, now: float) -> CollectorInfo | None:
        """The agent has ``count`` tasks out on the collector (the task
        distributor says so after each hand-out and each finish): READY or BUSY."""
        old = self._collectors.get(collector_id)
        if old is None:
            return None
        info = replace(old, assigned_tasks=max(0, count))
        if old.state in (CollectorState.READY, CollectorState.BUSY):
            return self._set_state(info, self._running_state(info), now, "tasks assigned")
        self._collectors[collector_id] = info
        return info

    def check(self, now: float) -> list[CollectorInfo]:
        """Time passed: collectors silent for ``missed_heartbeats`` intervals
        become UNRESPONSIVE, collectors GONE for ``forget_after`` seconds are
        removed. Returns the collectors that changed."""
        changed: list[CollectorInfo] = []
        for info in list(self._collectors.values()):
            if info.live and now > self._silence_deadline(info):
                reason = f"missed {self.missed_heartbeats} heartbeats"
                changed.append(self._set_state(info, CollectorState.UNRESPONSIVE, now, reason))
            elif info.state is CollectorState.GONE and now >= info.state_since + self.forget_after:
                self._remove(info, now, "gone for good")
                changed.append(info)
        return changed

    # -- inside -------------------------------------------------------------------------

    def _silence_deadline(self, info: CollectorInfo) -> float:
        return info.last_seen + info.heartbeat_interval * self.missed_heartbeats

    @staticmethod
    def _running_state(info: CollectorInfo) -> CollectorState:
        if info.assigned_tasks >= info.max_concurrent_tasks:
            return CollectorState.BUSY
        return CollectorState.READY

    def _set_state(
        self, info: CollectorInfo, state: CollectorState, now: float, reason: str
    ) -> CollectorInfo:
        previous = info.state
        if state is not previous:
            info = replace(info, state=state, state_since=now)
        self._collectors[info.collector_id] = info
        if state is not previous:
            self._note(info, ChangeKind.STATE, previous, now, reason)
        return info

    def _gone(self, collector_id: str, now: float, reason: str) -> CollectorInfo:
        info = replace(self._collectors[collector_id], gone_reason=reason)
        return self._set_state(info, CollectorState.GONE, now, reason)

    def _remove(self, info: CollectorInfo, now: float, reason: str) -> None:
        del self._collectors[info.collector_id]
        self._note(info, ChangeKind.REMOVED, info.state, now, reason, removed=True)

    def _make_room(self, now: float) -> None:
        if len(self._collectors) < self.max_collectors:
            return
        # The longest GONE first, then the longest silent UNRESPONSIVE one.
        for state, key in (
            (CollectorState.GONE, lambda c: c.state_since),
            (CollectorState.UNRESPONSIVE, lambda c: c.last_seen),
        ):
            victims = [c for c in self._collectors.values() if c.state is state]
            if victims:
                self._counts["evicted"] += 1
                self._remove(min(victims, key=key), now, "evicted: registry full")
                return
        self._counts["refused"] += 1
        raise LimitExceeded(f"collector registry full ({self.max_collectors} live collectors)")

    def _note(
        self,
        info: CollectorInfo,
        kind: ChangeKind,
        previous: CollectorState | None,
        now: float,
        reason: str,
        *,
        removed: bool = False,
    ) -> None:
        if len(self._changes) >= self.max_changes:
            self._changes.popleft()
            self._counts["changes_dropped"] += 1
        state = None if removed else info.state
        self._changes.append(
            CollectorChange(info.collector_id, kind, previous, state, now, reason, info)
        )
