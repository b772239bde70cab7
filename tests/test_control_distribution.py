"""The task distributor (pure): strategies, priority, deadlines, queueing,
re-assignment, finishing once, bounds and statistics."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from control_helpers import disconnected, heartbeat, registration, task, up
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st

from daemoneye.eventbus.v1.control_pb2 import TaskAssignment
from daemoneye_eventbus.control import (
    Assignment,
    CollectorFigures,
    CollectorRegistry,
    CollectorState,
    DistributionStatistics,
    FailureReason,
    Finish,
    FirstAvailable,
    LeastLoaded,
    Queued,
    Random,
    RoundRobin,
    Strategy,
    StrategyFigures,
    TaskDistributor,
    TaskFailed,
    TaskState,
    task_deadline,
)


def setup(
    *collectors: str,
    max_tasks: int = 1,
    strategy: Strategy | None = None,
    max_pending: int = 1024,
    max_in_flight: int = 4096,
    max_attempts: int = 3,
    max_finished: int = 4096,
) -> TaskDistributor:
    """A distributor over a registry where ``collectors`` are READY."""
    reg = CollectorRegistry(missed_heartbeats=2, heartbeat_interval=1.0)
    for cid in collectors:
        up(reg, cid, max_tasks=max_tasks)
    return TaskDistributor(
        reg,
        strategy=strategy,
        max_pending=max_pending,
        max_in_flight=max_in_flight,
        max_attempts=max_attempts,
        max_finished=max_finished,
    )


def assigned(decision: object) -> Assignment:
    assert isinstance(decision, Assignment), decision
    return decision


def handed(d: TaskDistributor) -> list[tuple[str, str]]:
    """The hand-outs among the actions, as (task id, collector id)."""
    return [(a.task_id, a.collector_id) for a in d.take_actions() if isinstance(a, Assignment)]


# -- strategies ------------------------------------------------------------------------------


def test_least_loaded_is_the_default_and_spreads_the_tasks() -> None:
    d = setup("a", "b", "c", max_tasks=4)
    assert isinstance(d.strategy, LeastLoaded)
    assert d.strategy.name == "least_loaded"
    picks = [assigned(d.distribute(task(f"t{i}"), now=0.0)).collector_id for i in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]
    a = assigned(d.distribute(task("t6"), now=0.0))
    assert (a.strategy, a.attempt, a.previous) == ("least_loaded", 1, "")
    assert (a.task.collector_id, a.task.attempt) == (a.collector_id, 1)


def test_least_loaded_weighs_slots_then_reported_load() -> None:
    reg = CollectorRegistry()
    up(reg, "small", max_tasks=1)
    up(reg, "large", max_tasks=4)
    reg.heartbeat(heartbeat("small", 1, load=0.9), now=0.0)
    d = TaskDistributor(reg)
    # Both idle: the lower reported load.
    assert assigned(d.distribute(task("t1"), now=0.0)).collector_id == "large"
    # large is 1/4 busy, small is idle: small.
    assert assigned(d.distribute(task("t2"), now=0.0)).collector_id == "small"
    assert assigned(d.distribute(task("t3"), now=0.0)).collector_id == "large"


def test_round_robin_takes_turns_in_id_order_per_kind_of_task() -> None:
    reg = CollectorRegistry()
    for cid in ("c", "a", "b"):
        up(reg, cid, max_tasks=10, task_types=["scan", "hash"])
    d = TaskDistributor(reg, strategy=RoundRobin())
    scans = [assigned(d.distribute(task(f"s{i}"), now=0.0)).collector_id for i in range(4)]
    hashes = [assigned(d.distribute(task(f"h{i}", "hash"), now=0.0)).collector_id for i in range(2)]
    assert scans == ["a", "b", "c", "a"]
    assert hashes == ["a", "b"]
    # A collector joining takes its turn in order.
    up(reg, "bb", max_tasks=10)
    assert assigned(d.distribute(task("s4"), now=0.0)).collector_id == "b"
    assert assigned(d.distribute(task("s5"), now=0.0)).collector_id == "bb"


def test_first_available_takes_the_first_registered_with_room() -> None:
    d = setup("z", "a", strategy=FirstAvailable())
    assert assigned(d.distribute(task("t1"), now=0.0)).collector_id == "z"
    assert assigned(d.distribute(task("t2"), now=0.0)).collector_id == "a"  # z is busy
    assert isinstance(d.distribute(task("t3"), now=0.0), Queued)


def test_a_task_naming_its_collector_goes_to_that_one_only() -> None:
    d = setup("a", "b", strategy=FirstAvailable())
    pinned = task("p1")
    pinned.collector_id = "b"
    assert assigned(d.distribute(pinned, now=0.0)).collector_id == "b"
    # b is busy: the next task for b waits, though a is free; others still go to a.
    pinned.task_id = "p2"
    assert isinstance(d.distribute(pinned, now=0.0), Queued)
    assert assigned(d.distribute(task("t1"), now=0.0)).collector_id == "a"
    d.take_actions()
    d.complete("p1", "b", now=1.0)
    d.tick(1.0)
    assert handed(d) == [("p2", "b")]
    # Nobody of that name: it waits.
    pinned.task_id, pinned.collector_id = "p3", "nobody"
    assert isinstance(d.distribute(pinned, now=1.0), Queued)


def test_random_is_repeatable_with_a_seed_and_picks_only_candidates() -> None:
    def picks(seed: int) -> list[str]:
        reg = CollectorRegistry()
        for cid in ("a", "b", "c", "d"):
            up(reg, cid, max_tasks=100)
        up(reg, "other", task_types=["hash"], max_tasks=100)
        d = TaskDistributor(reg, strategy=Random(seed))
        return [assigned(d.distribute(task(f"t{i}"), now=0.0)).collector_id for i in range(40)]

    assert picks(7) == picks(7)
    assert picks(7) != picks(8)
    assert set(picks(7)) == {"a", "b", "c", "d"}
    assert Random(rng=random.Random(1)).rng.random() == random.Random(1).random()


def test_a_strategy_per_task_and_figures_per_strategy() -> None:
    d = setup("a", "b", max_tasks=5)
    rr = RoundRobin()
    d.distribute(task("t1"), now=0.0, strategy=rr)
    d.distribute(task("t2"), now=0.0, strategy=rr)
    d.distribute(task("t3"), now=0.0)
    d.complete("t1", "a", now=1.0)
    d.complete("t2", "b", now=1.0, success=False)
    by = d.statistics().by_strategy
    assert (by["round_robin"].assigned, by["round_robin"].completed) == (2, 1)
    assert by["round_robin"].failed == 1
    assert (by["least_loaded"].assigned, by["least_loaded"].completed) == (1, 0)


# -- capability matching -----------------------------------------------------------------------


def test_only_a_collector_with_the_task_type_and_capability_gets_the_task() -> None:
    reg = CollectorRegistry()
    up(reg, "p", task_types=["scan"], capabilities=["process.enum"], max_tasks=5)
    up(reg, "n", task_types=["scan"], capabilities=["network.capture"], max_tasks=5)
    d = TaskDistributor(reg, strategy=FirstAvailable())
    assert (
        assigned(d.distribute(task("t1", capability="network.capture"), now=0.0)).collector_id
        == "n"
    )
    assert (
        assigned(d.distribute(task("t2", capability="process.enum"), now=0.0)).collector_id == "p"
    )
    assert isinstance(d.distribute(task("t3", "hash"), now=0.0), Queued)
    assert isinstance(d.distribute(task("t4", capability="file.watch"), now=0.0), Queued)


# -- queueing, priority, hand-out on registration ---------------------------------------------


def test_tasks_wait_without_a_collector_and_go_out_when_one_is_ready() -> None:
    reg = CollectorRegistry()
    d = TaskDistributor(reg)
    assert d.distribute(task("t1"), now=0.0) == Queued("t1", 1)
    assert d.distribute(task("t2"), now=0.0) == Queued("t2", 2)
    status = d.task("t1")
    assert status is not None
    assert (status.state, status.collector_id, status.attempt) == (TaskState.PENDING, "", 0)
    reg.register(registration("p", max_tasks=2), now=1.0)
    d.tick(1.0)
    assert handed(d) == []  # STARTING: not yet
    reg.heartbeat(heartbeat("p"), now=2.0)
    d.tick(2.0)
    assert handed(d) == [("t1", "p"), ("t2", "p")]
    assert (d.pending, d.in_flight) == (0, 2)
    info = reg.get("p")
    assert info is not None
    assert (info.state, info.assigned_tasks) == (CollectorState.BUSY, 2)


def test_a_higher_priority_task_is_handed_out_first_fifo_within_a_priority() -> None:
    reg = CollectorRegistry()
    d = TaskDistributor(reg)
    for tid, prio in [("low1", 0), ("high1", 5), ("mid", 2), ("high2", 5), ("low2", 0)]:
        d.distribute(task(tid, priority=prio), now=0.0)
    up(reg, "p")
    order = []
    d.tick(1.0)
    for _ in range(5):
        [(tid, _cid)] = handed(d)
        order.append(tid)
        assert d.complete(tid, "p", now=1.0) is Finish.FINISHED
    assert order == ["high1", "high2", "mid", "low1", "low2"]


def test_a_new_task_does_not_overtake_a_waiting_higher_priority_one() -> None:
    reg = CollectorRegistry()
    d = TaskDistributor(reg)
    d.distribute(task("urgent", priority=9), now=0.0)
    up(reg, "p")  # ready, but nobody has ticked yet
    decision = d.distribute(task("routine", priority=1), now=0.0)
    assert decision == Queued("routine", 1)
    assert handed(d) == [("urgent", "p")]


def test_a_waiting_task_of_another_kind_does_not_block_the_queue() -> None:
    reg = CollectorRegistry()
    up(reg, "p", max_tasks=3)
    d = TaskDistributor(reg)
    assert isinstance(d.distribute(task("h", "hash", priority=9), now=0.0), Queued)
    assert assigned(d.distribute(task("s", "scan"), now=0.0)).collector_id == "p"


def test_the_queue_is_bounded() -> None:
    d = setup(max_pending=2)
    assert isinstance(d.distribute(task("t1"), now=0.0), Queued)
    assert isinstance(d.distribute(task("t2"), now=0.0), Queued)
    refused = d.distribute(task("t3", priority=100), now=0.0)
    assert isinstance(refused, TaskFailed)
    assert refused.reason is FailureReason.QUEUE_FULL
    assert d.task("t3") is None
    assert d.pending == 2
    # A task a collector can take at once is never refused for the queue.
    up(d.registry, "other", task_types=["hash"])
    assert assigned(d.distribute(task("t4", "hash"), now=0.0)).collector_id == "other"
    stats = d.statistics()
    assert (stats.submitted, stats.refused, stats.pending, stats.in_flight) == (4, 1, 2, 1)


def test_in_flight_tasks_are_bounded() -> None:
    d = setup("a", "b", max_in_flight=1)
    assert isinstance(d.distribute(task("t1"), now=0.0), Assignment)
    assert isinstance(d.distribute(task("t2"), now=0.0), Queued)
    d.complete("t1", "a", now=1.0)
    assert handed(d) == [("t1", "a"), ("t2", "a")]


# -- deadlines ---------------------------------------------------------------------------------


def test_a_task_past_its_deadline_is_refused() -> None:
    d = setup("p")
    refused = d.distribute(task("t1"), now=10.0, deadline=10.0)
    assert isinstance(refused, TaskFailed)
    assert refused.reason is FailureReason.EXPIRED
    assert d.statistics().expired == 1


def test_a_waiting_task_fails_when_its_deadline_passes() -> None:
    d = setup()
    d.distribute(task("t1"), now=0.0, deadline=5.0)
    d.distribute(task("t2"), now=0.0, deadline=50.0)
    assert d.next_deadline() == 5.0
    d.tick(4.9)
    assert d.take_actions() == []
    d.tick(5.0)
    [failed] = d.take_actions()
    assert isinstance(failed, TaskFailed)
    assert (failed.task_id, failed.reason, failed.collector_id) == ("t1", FailureReason.EXPIRED, "")
    assert d.task("t1") is None
    assert d.next_deadline() == 50.0


def test_a_running_task_fails_at_its_deadline_and_frees_the_collector() -> None:
    d = setup("p")
    d.distribute(task("t1"), now=0.0, deadline=5.0)
    d.distribute(task("t2"), now=0.0)
    d.take_actions()
    d.tick(6.0)
    failed, handout = d.take_actions()
    assert isinstance(failed, TaskFailed)
    assert (failed.reason, failed.collector_id) == (FailureReason.EXPIRED, "p")
    assert isinstance(handout, Assignment)
    assert handout.task_id == "t2"
    # Its late result changes nothing.
    assert d.complete("t1", "p", now=7.0) is Finish.ALREADY_FINISHED
    figures = d.statistics().by_collector["p"]
    assert (figures.assigned, figures.expired, figures.failed) == (2, 1, 1)


def test_task_deadline_moves_the_wall_clock_deadline_to_the_monotonic_clock() -> None:
    t = TaskAssignment(task_id="t")
    assert task_deadline(t, now=100.0, wall_now=1_700_000_000.0) is None
    t.deadline.CopyFrom(Timestamp(seconds=1_700_000_030, nanos=500_000_000))
    assert task_deadline(t, now=100.0, wall_now=1_700_000_000.0) == pytest.approx(130.5)


# -- acknowledgement, refusal, re-assignment -----------------------------------------------------


def test_acknowledge_only_by_the_holder() -> None:
    d = setup("p", "q")
    a = assigned(d.distribute(task("t1"), now=0.0))
    other = "q" if a.collector_id == "p" else "p"
    assert not d.acknowledge("t1", other, now=1.0)
    assert not d.acknowledge("nope", a.collector_id, now=1.0)
    assert d.acknowledge("t1", a.collector_id, now=1.0)
    assert d.acknowledge("t1", a.collector_id, now=2.0)  # again: no harm
    status = d.task("t1")
    assert status is not None
    assert (status.state, status.acknowledged_at) == (TaskState.ACKNOWLEDGED, 1.0)
    assert d.statistics().acknowledged == 1


def test_a_refused_task_goes_to_another_collector() -> None:
    d = setup("a", "b", strategy=FirstAvailable())
    assigned(d.distribute(task("t1"), now=0.0))
    d.take_actions()
    assert not d.refuse("t1", "b", now=1.0)  # b does not hold it
    assert d.refuse("t1", "a", now=1.0, reason="too busy")
    [again] = d.take_actions()
    assert isinstance(again, Assignment)
    assert (again.collector_id, again.attempt, again.previous) == ("b", 2, "a")
    assert again.task.attempt == 2
    status = d.task("t1")
    assert status is not None
    assert ("a", 1) in status.excluded
    stats = d.statistics()
    figures = stats.by_collector
    assert (figures["a"].refused, figures["a"].reassigned, figures["b"].assigned) == (1, 1, 1)
    assert (stats.refused, stats.reassigned, stats.assigned) == (0, 1, 2)


def test_a_task_of_a_dead_collector_is_reassigned_elsewhere() -> None:
    d = setup("a", "b", strategy=FirstAvailable())
    d.distribute(task("t1"), now=0.0)
    d.acknowledge("t1", "a", now=0.5)
    d.take_actions()
    d.registry.presence(disconnected("s-a"), now=1.0)
    d.tick(1.0)
    [again] = d.take_actions()
    assert isinstance(again, Assignment)
    assert (again.collector_id, again.previous, again.attempt) == ("b", "a", 2)
    assert d.statistics().reassigned == 1


def test_an_unresponsive_collector_s_task_waits_for_another_and_its_late_result_counts() -> None:
    d = setup("a")
    d.distribute(task("t1"), now=0.0)
    d.take_actions()
    d.registry.check(2.5)  # two missed intervals
    d.tick(2.5)
    status = d.task("t1")
    assert status is not None
    assert (status.state, status.attempt) == (TaskState.PENDING, 1)
    assert d.take_actions() == []  # nobody else to take it
    # a comes back: excluded for this task, still no hand-out.
    d.registry.heartbeat(heartbeat("a"), now=3.0)
    d.tick(3.0)
    assert d.take_actions() == []
    # ... but its result, late, finishes the task once.
    assert d.complete("t1", "a", now=3.5) is Finish.FINISHED
    assert d.complete("t1", "a", now=3.6) is Finish.ALREADY_FINISHED
    assert d.task("t1") is None


def test_a_restarted_collector_may_take_the_task_again() -> None:
    d = setup("a")
    d.distribute(task("t1"), now=0.0)
    d.take_actions()
    d.registry.register(registration("a", session="s-a-2"), now=1.0)  # restarted
    d.tick(1.0)
    assert d.take_actions() == []  # STARTING
    d.registry.heartbeat(heartbeat("a"), now=1.5)
    d.tick(1.5)
    [again] = d.take_actions()
    assert isinstance(again, Assignment)
    assert (again.collector_id, again.attempt, again.previous) == ("a", 2, "a")


def test_a_task_handed_out_max_attempts_times_fails() -> None:
    d = setup("a", "b", "c", max_attempts=2, strategy=FirstAvailable())
    d.distribute(task("t1"), now=0.0)
    d.refuse("t1", "a", now=1.0)
    d.take_actions()
    d.refuse("t1", "b", now=2.0)
    [failed] = d.take_actions()
    assert isinstance(failed, TaskFailed)
    assert (failed.reason, failed.collector_id) == (FailureReason.ATTEMPTS_EXHAUSTED, "b")
    assert "handed out 2 times" in failed.detail
    stats = d.statistics()
    assert (stats.reassigned, stats.failed) == (1, 1)
    assert stats.by_collector["b"].reassigned == 1  # taken back from b, not given again


def test_a_task_failing_its_last_attempt_frees_its_slot_once() -> None:
    # Regression: the slot was given back twice, so the collector looked idle
    # while it still ran another task.
    d = setup("a", max_tasks=2, max_attempts=1)
    d.distribute(task("t1"), now=0.0)
    d.distribute(task("t2"), now=0.0)
    d.refuse("t1", "a", now=1.0)
    info = d.registry.get("a")
    assert info is not None
    assert info.assigned_tasks == 1
    assert d.in_flight == 1


# -- finishing ----------------------------------------------------------------------------------


def test_a_task_finishes_once_and_frees_its_slot() -> None:
    d = setup("p")
    d.distribute(task("t1"), now=0.0)
    d.distribute(task("t2"), now=0.0)
    assert d.complete("t1", "q", now=1.0) is Finish.NOT_ASSIGNED
    assert d.complete("t1", "p", now=1.0) is Finish.FINISHED
    assert handed(d) == [("t1", "p"), ("t2", "p")]
    assert d.complete("t1", "p", now=2.0) is Finish.ALREADY_FINISHED
    assert d.complete("never", "p", now=2.0) is Finish.UNKNOWN
    assert d.complete("t2", "p", now=2.0, success=False) is Finish.FINISHED
    stats = d.statistics()
    assert (stats.completed, stats.failed, stats.in_flight) == (1, 1, 0)
    info = d.registry.get("p")
    assert info is not None
    assert (info.state, info.assigned_tasks) == (CollectorState.READY, 0)


def test_a_result_from_the_previous_holder_finishes_a_reassigned_task() -> None:
    d = setup("a", "b", strategy=FirstAvailable())
    d.distribute(task("t1"), now=0.0)
    d.refuse("t1", "a", now=1.0)
    assert d.complete("t1", "a", now=2.0) is Finish.FINISHED
    info = d.registry.get("b")
    assert info is not None
    assert info.assigned_tasks == 0  # b's slot is free again


def test_duplicate_and_invalid_ids_are_refused() -> None:
    d = setup("p")
    d.distribute(task("t1"), now=0.0)
    for tid, reason in (("t1", FailureReason.DUPLICATE), ("", FailureReason.INVALID)):
        refused = d.distribute(task(tid), now=0.0)
        assert isinstance(refused, TaskFailed)
        assert refused.reason is reason
    d.complete("t1", "p", now=1.0)
    dup = d.distribute(task("t1"), now=2.0)
    assert isinstance(dup, TaskFailed)
    assert dup.reason is FailureReason.DUPLICATE  # finished ids are remembered


def test_finished_ids_are_remembered_within_a_bound() -> None:
    d = setup("p", max_finished=2)
    for i in range(3):
        d.distribute(task(f"t{i}"), now=0.0)
        d.complete(f"t{i}", "p", now=0.0)
    assert d.complete("t0", "p", now=1.0) is Finish.UNKNOWN
    assert d.complete("t2", "p", now=1.0) is Finish.ALREADY_FINISHED


def test_cancel() -> None:
    d = setup("p")
    d.distribute(task("t1"), now=0.0)
    d.distribute(task("t2"), now=0.0)
    d.take_actions()
    assert d.cancel("t1", now=1.0)
    assert not d.cancel("t1", now=1.0)
    failed, handout = d.take_actions()
    assert isinstance(failed, TaskFailed)
    assert (failed.task_id, failed.reason) == ("t1", FailureReason.CANCELLED)
    assert isinstance(handout, Assignment)
    assert handout.task_id == "t2"
    assert d.statistics().cancelled == 1


def test_every_figure() -> None:
    d = setup("a", "b", strategy=FirstAvailable())
    d.distribute(task("t1"), now=0.0)  # a
    d.distribute(task("t2"), now=0.0)  # b
    d.acknowledge("t1", "a", now=0.0)
    d.distribute(task("t3"), now=0.0)  # waits
    d.distribute(task("t4"), now=1.0, deadline=1.0)  # refused: expired
    d.distribute(task("t1"), now=1.0)  # refused: duplicate
    d.complete("t1", "a", now=2.0)  # t3 to a
    d.refuse("t2", "b", now=3.0)  # t2 waits: a is busy, b refused it
    d.cancel("t3", now=4.0)  # t2 to a
    d.complete("t2", "a", now=5.0, success=False)
    assert handed(d) == [("t1", "a"), ("t2", "b"), ("t3", "a"), ("t2", "a")]
    stats = d.statistics()
    assert stats == DistributionStatistics(
        submitted=5,
        assigned=4,
        acknowledged=1,
        completed=1,
        failed=2,
        reassigned=1,
        expired=1,
        refused=2,
        cancelled=1,
        pending=0,
        in_flight=0,
        by_strategy={"first_available": StrategyFigures(assigned=4, completed=1, failed=2)},
        by_collector={
            "a": CollectorFigures(assigned=3, acknowledged=1, completed=1, failed=2),
            "b": CollectorFigures(assigned=1, refused=1, reassigned=1),
        },
    )


def test_the_distributor_copies_the_task() -> None:
    d = setup("p")
    t = task("t1")
    a = assigned(d.distribute(t, now=0.0))
    t.task_type = "changed"
    assert (a.task.task_type, t.collector_id) == ("scan", "")


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        setup(max_attempts=0)


# -- properties ---------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 6), st.integers(0, 60))
def test_round_robin_is_fair(collectors: int, tasks: int) -> None:
    d = setup(*(f"c{i}" for i in range(collectors)), max_tasks=1000, strategy=RoundRobin())
    counts = Counter(
        assigned(d.distribute(task(f"t{i}"), now=0.0)).collector_id for i in range(tasks)
    )
    if tasks:
        assert max(counts.values()) - min(counts.get(f"c{i}", 0) for i in range(collectors)) <= 1


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-3, 3), max_size=30))
def test_hand_outs_follow_priority_then_arrival(priorities: list[int]) -> None:
    reg = CollectorRegistry()
    d = TaskDistributor(reg)
    for i, prio in enumerate(priorities):
        d.distribute(task(f"t{i}", priority=prio), now=0.0)
    up(reg, "p")
    d.tick(0.0)
    order: list[str] = []
    while handed_now := handed(d):
        [(tid, _)] = handed_now
        order.append(tid)
        d.complete(tid, "p", now=0.0)
    expected = sorted(range(len(priorities)), key=lambda i: (-priorities[i], i))
    assert order == [f"t{i}" for i in expected]


distribution_op = st.one_of(
    st.tuples(st.just("distribute"), st.integers(0, 7), st.integers(0, 2)),
    st.tuples(st.just("ack"), st.integers(0, 7), st.integers(0, 2)),
    st.tuples(st.just("refuse"), st.integers(0, 7), st.integers(0, 2)),
    st.tuples(st.just("complete"), st.integers(0, 7), st.integers(0, 2)),
    st.tuples(st.just("lost"), st.integers(0, 2), st.just(0)),
    st.tuples(st.just("register"), st.integers(0, 2), st.just(0)),
    st.tuples(st.just("heartbeat"), st.integers(0, 2), st.just(0)),
    st.tuples(st.just("wait"), st.integers(0, 3), st.just(0)),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(distribution_op, max_size=80))
def test_bookkeeping_holds_whatever_happens(ops: list[tuple[str, int, int]]) -> None:
    """Each task ends at most once (finished or failed); no collector holds more
    than it runs; the registry's counts are the distributor's; tasks go only
    to live collectors able to run them."""
    reg = CollectorRegistry(missed_heartbeats=2, heartbeat_interval=1.0)
    d = TaskDistributor(reg, max_pending=5, max_attempts=2)
    collectors = ["c0", "c1", "c2"]
    sessions: Counter[str] = Counter()
    ended: Counter[str] = Counter()
    now = 0.0
    for i, cid in enumerate(collectors):
        sessions[cid] += 1
        types = ["scan", "hash"] if i != 1 else ["scan"]
        msg = registration(cid, task_types=types, max_tasks=2, session=f"{cid}-1")
        reg.register(msg, now=now)
        reg.heartbeat(heartbeat(cid), now=now)

    def carry_out() -> None:
        for action in d.take_actions():
            if isinstance(action, Assignment):
                info = reg.get(action.collector_id)
                assert info is not None
                assert info.state in (CollectorState.READY, CollectorState.BUSY)
                assert info.can_run(action.task.task_type)
                assert action.attempt <= 2
            else:
                ended[action.task_id] += 1

    for op, x, y in ops:
        now += 0.3
        if op == "distribute":
            t = task(f"t{x}", ["scan", "hash"][y % 2], priority=y)
            d.distribute(t, now=now, deadline=now + 5)
        elif op in ("ack", "refuse", "complete"):
            # Mostly from the task's holder, sometimes from another collector.
            tid, status = f"t{x}", d.task(f"t{x}")
            cid = status.collector_id if status and status.collector_id and y else collectors[y]
            if op == "ack":
                d.acknowledge(tid, cid, now=now)
            elif op == "refuse":
                d.refuse(tid, cid, now=now)
            elif d.complete(tid, cid, now=now) is Finish.FINISHED:
                ended[tid] += 1
        elif op == "lost":
            cid = collectors[x]
            reg.presence(disconnected(f"{cid}-{sessions[cid]}"), now=now)
        elif op == "register":
            cid = collectors[x]
            sessions[cid] += 1
            types = ["scan", "hash"] if x != 1 else ["scan"]
            msg = registration(cid, task_types=types, max_tasks=2, session=f"{cid}-{sessions[cid]}")
            reg.register(msg, now=now)
        elif op == "heartbeat":
            reg.heartbeat(heartbeat(collectors[x]), now=now)
        else:
            now += x
        carry_out()
        reg.check(now)
        d.tick(now)
        carry_out()
        in_flight = (TaskState.ASSIGNED, TaskState.ACKNOWLEDGED)
        held = Counter(s.collector_id for s in d.tasks() if s.state in in_flight)
        for info in reg:
            assert info.assigned_tasks == held.get(info.collector_id, 0)
            assert info.assigned_tasks <= info.max_concurrent_tasks
        assert d.pending <= 5
        assert d.pending + d.in_flight == len(list(d.tasks()))
        assert all(n <= 1 for n in ended.values())
    stats = d.statistics()
    assert (stats.pending, stats.in_flight) == (d.pending, d.in_flight)
    assert stats.assigned == sum(f.assigned for f in stats.by_collector.values())
