"""What the agent knows of a collector: its state, capabilities and load (pure).

The :class:`~daemoneye_eventbus.control.registry.CollectorRegistry` keeps one
:class:`CollectorInfo` per collector, replaced on every change, and records
each change of state as a :class:`CollectorChange`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

__all__ = [
    "LIVE_STATES",
    "Capability",
    "ChangeKind",
    "CollectorChange",
    "CollectorInfo",
    "CollectorState",
    "RegistryStatistics",
]


class CollectorState(enum.Enum):
    """Where a collector stands, as the agent sees it."""

    #: Registered; no heartbeat yet. Not handed tasks.
    STARTING = "starting"
    #: Alive, with room for another task.
    READY = "ready"
    #: Alive, running as many of the agent's tasks as it declared it runs at once.
    BUSY = "busy"
    #: Missed ``missed_heartbeats`` heartbeat intervals; a heartbeat brings it back.
    UNRESPONSIVE = "unresponsive"
    #: Its session ended (goodbye, connection lost, ...); only a new
    #: registration brings it back.
    GONE = "gone"


#: The states of a collector that is up: heartbeats keep it there.
LIVE_STATES: Final = frozenset({CollectorState.STARTING, CollectorState.READY, CollectorState.BUSY})


class ChangeKind(enum.Enum):
    """What a :class:`CollectorChange` records."""

    #: A collector id seen for the first time (or again after it was removed).
    REGISTERED = "registered"
    #: A known collector registered from a new session: it restarted.
    REREGISTERED = "reregistered"
    #: A known collector registered again from the same session (new details).
    UPDATED = "updated"
    #: Its state changed (``previous`` -> ``state``).
    STATE = "state"
    #: The registry forgot it (gone for ``forget_after`` seconds, or evicted).
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class Capability:
    """One capability a collector offers (``CollectorCapability``)."""

    name: str
    version: str = ""
    #: Its parameters, sorted by name.
    parameters: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class CollectorInfo:
    """A snapshot of one collector. The registry replaces it on every change."""

    collector_id: str
    collector_type: str
    version: str
    capabilities: tuple[Capability, ...]
    task_types: frozenset[str]
    event_types: tuple[str, ...]
    topics: tuple[str, ...]
    #: How many tasks it runs at once (at least 1; capped by the registry).
    max_concurrent_tasks: int
    #: Seconds between its heartbeats (as declared, within HEARTBEAT_INTERVAL_BOUNDS).
    heartbeat_interval: float
    #: The broker's id of its session, "" if it did not say.
    session_id: str
    pid: int
    state: CollectorState
    #: When the state last changed.
    state_since: float
    #: When this incarnation registered.
    registered_at: float
    #: Its last heartbeat, None before the first.
    last_heartbeat: float | None
    #: Its last sign of life: the last heartbeat, or the registration.
    last_seen: float
    #: Sequence number of its last heartbeat (0 before the first).
    heartbeat_sequence: int
    #: Tasks it says it runs (its last heartbeat).
    active_tasks: int
    #: Its own load figure from 0 to 1 (its last heartbeat).
    load: float
    #: Tasks the agent has out on it (the task distributor's count).
    assigned_tasks: int
    #: 1 for its first registration, one more for each restart.
    incarnation: int
    #: Why it is GONE ("" otherwise).
    gone_reason: str = ""

    @property
    def capability_names(self) -> frozenset[str]:
        return frozenset(c.name for c in self.capabilities)

    @property
    def live(self) -> bool:
        """Up: STARTING, READY or BUSY."""
        return self.state in LIVE_STATES

    @property
    def free_slots(self) -> int:
        """Tasks the agent may still hand it before it is BUSY."""
        return max(0, self.max_concurrent_tasks - self.assigned_tasks)

    def can_run(self, task_type: str, required_capability: str = "") -> bool:
        """Whether it runs tasks of ``task_type`` (if given) and offers
        ``required_capability`` (if given)."""
        if task_type and task_type not in self.task_types:
            return False
        return not required_capability or any(
            c.name == required_capability for c in self.capabilities
        )


@dataclass(frozen=True, slots=True)
class CollectorChange:
    """One change in the registry, for the agent's change notifications."""

    collector_id: str
    kind: ChangeKind
    #: The state before the change (None for a new collector).
    previous: CollectorState | None
    #: The state after it (None once removed).
    state: CollectorState | None
    at: float
    #: Why, in words: "missed 3 heartbeats", "connection lost", ...
    reason: str
    #: The collector after the change (before it, for REMOVED).
    info: CollectorInfo


@dataclass(frozen=True, slots=True)
class RegistryStatistics:
    """A snapshot of the registry's figures."""

    collectors: int
    by_state: dict[str, int]
    registrations: int
    reregistrations: int
    heartbeats: int
    #: Heartbeats of collectors the registry does not know (or that are GONE).
    unknown_heartbeats: int
    #: Heartbeats with a sequence number not above the last one seen.
    stale_heartbeats: int
    #: Registrations refused: invalid, or the registry full.
    refused: int
    #: Collectors removed to make room for others.
    evicted: int
    #: Changes dropped because nobody took them in time.
    changes_dropped: int
