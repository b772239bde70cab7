"""How the task distributor picks one collector among those able to run a task (pure).

A strategy is handed the task and its candidates: the READY collectors that
can run it, have room for it and have not already failed it, in the order
they first registered (never empty). It returns one of them. The four of the
reference crate:

- :class:`LeastLoaded` (the default): the one with the smallest share of its
  task slots in use by the agent, then the lowest reported load;
- :class:`RoundRobin`: each in turn, per kind of task (task type and required
  capability), in collector id order, so that the turn survives collectors
  coming and going;
- :class:`FirstAvailable`: the first registered;
- :class:`Random`: any, from a ``random.Random`` that can be seeded for tests.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

from daemoneye.eventbus.v1.control_pb2 import TaskAssignment
from daemoneye_eventbus.control.collectors import CollectorInfo

__all__ = ["FirstAvailable", "LeastLoaded", "Random", "RoundRobin", "Strategy"]


class Strategy(Protocol):
    """Picks the collector that runs a task."""

    #: Its name in the statistics, e.g. ``"least_loaded"``.
    name: str

    def choose(self, task: TaskAssignment, candidates: Sequence[CollectorInfo]) -> CollectorInfo:
        """One of ``candidates`` (never empty, in registration order)."""
        ...


class LeastLoaded:
    """The collector with the smallest share of its task slots in use by the
    agent; then the lowest load it reported; then the first registered."""

    name = "least_loaded"

    def choose(self, task: TaskAssignment, candidates: Sequence[CollectorInfo]) -> CollectorInfo:
        return min(
            candidates,
            key=lambda c: (c.assigned_tasks / c.max_concurrent_tasks, c.load, c.active_tasks),
        )


class RoundRobin:
    """Each collector in turn, per kind of task, in collector id order.

    It remembers the last collector chosen for at most ``max_kinds`` kinds of
    task (the least recently used kind is forgotten first).
    """

    name = "round_robin"

    def __init__(self, *, max_kinds: int = 1024) -> None:
        self.max_kinds = max_kinds
        self._last: OrderedDict[tuple[str, str], str] = OrderedDict()

    def choose(self, task: TaskAssignment, candidates: Sequence[CollectorInfo]) -> CollectorInfo:
        kind = (task.task_type, task.required_capability)
        last = self._last.get(kind)
        ordered = sorted(candidates, key=lambda c: c.collector_id)
        choice = ordered[0]
        if last is not None:
            choice = next((c for c in ordered if c.collector_id > last), ordered[0])
        self._last[kind] = choice.collector_id
        self._last.move_to_end(kind)
        if len(self._last) > self.max_kinds:
            self._last.popitem(last=False)
        return choice


class FirstAvailable:
    """The first registered of the collectors able to take the task."""

    name = "first_available"

    def choose(self, task: TaskAssignment, candidates: Sequence[CollectorInfo]) -> CollectorInfo:
        return candidates[0]


class Random:
    """Any of the collectors able to take the task, at random.

    Pass ``seed`` (or an ``rng`` of your own) to make the choices repeatable.
    """

    name = "random"

    def __init__(self, seed: int | None = None, *, rng: random.Random | None = None) -> None:
        self.rng = rng if rng is not None else random.Random(seed)

    def choose(self, task: TaskAssignment, candidates: Sequence[CollectorInfo]) -> CollectorInfo:
        return self.rng.choice(candidates)
