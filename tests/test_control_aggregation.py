"""The result aggregator (pure): per task and workflow, deduplication,
completion, partial at the deadline, collector health, bounds."""

from __future__ import annotations

import pytest
from control_helpers import result
from hypothesis import given, settings
from hypothesis import strategies as st

from daemoneye.eventbus.v1 import control_pb2
from daemoneye_eventbus.control import (
    AddOutcome,
    AggregateKind,
    AggregateState,
    AggregationStatistics,
    ResultAggregator,
)
from daemoneye_eventbus.errors import LimitExceeded

TASK = AggregateKind.TASK
WORKFLOW = AggregateKind.WORKFLOW
ERROR = control_pb2.RPC_STATUS_ERROR


def test_a_task_completes_when_its_collector_answers() -> None:
    agg = ResultAggregator()
    opened = agg.expect_task("t1", ["p"], now=1.0, deadline=10.0)
    assert (opened.state, opened.missing, opened.results) == (
        AggregateState.OPEN,
        frozenset({"p"}),
        (),
    )
    assert agg.get(TASK, "t1") == opened
    assert agg.completed() == []
    assert agg.add(result("t1", "p"), now=1.5) is AddOutcome.ADDED
    [done] = agg.completed()
    assert (done.kind, done.key, done.state) == (TASK, "t1", AggregateState.COMPLETE)
    assert (done.missing, done.closed_at, done.partial, done.succeeded) == (
        frozenset(),
        1.5,
        False,
        True,
    )
    [r] = done.results
    assert (r.task_id, r.collector_id, r.latency, r.success) == ("t1", "p", 0.5, True)
    assert agg.get(TASK, "t1") is None
    assert agg.open == 0
    assert agg.completed() == []  # taken


def test_results_are_deduplicated_by_task_and_collector() -> None:
    agg = ResultAggregator()
    agg.expect_workflow("root", now=0.0, tasks={"t1": "p", "t2": "p", "t3": "n"})
    assert agg.add(result("t1", "p"), now=1.0, root_id="root") is AddOutcome.ADDED
    assert agg.add(result("t1", "p"), now=1.1, root_id="root") is AddOutcome.DUPLICATE
    # The same collector's result for another task of the workflow is another result.
    assert agg.add(result("t2", "p"), now=1.2, root_id="root") is AddOutcome.ADDED
    aggregate = agg.get(WORKFLOW, "root")
    assert aggregate is not None
    assert [(r.task_id, r.collector_id) for r in aggregate.results] == [("t1", "p"), ("t2", "p")]
    assert (aggregate.duplicates, aggregate.missing) == (1, frozenset({"n"}))
    assert (aggregate.tasks, aggregate.missing_tasks) == (
        frozenset({"t1", "t2", "t3"}),
        frozenset({"t3"}),
    )
    health = agg.health("p")
    assert health is not None
    assert health.results == 2  # not 3
    assert agg.statistics().duplicates == 1


def test_a_workflow_completes_when_every_task_has_its_result() -> None:
    agg = ResultAggregator()
    opened = agg.expect_workflow("root", now=0.0, deadline=5.0)
    assert (opened.tasks, opened.expected, opened.missing_tasks) == (frozenset(),) * 3
    agg.expect_task("t1", ["p"], now=0.0)
    assert agg.workflow_task("root", "t1", "p", now=0.0)
    assert agg.workflow_task("root", "t2", now=0.0)  # queued: nobody holds it yet
    assert not agg.workflow_task("elsewhere", "t9", "p", now=0.0)  # no such aggregate
    agg.add(result("t1", "p"), now=1.0, root_id="root")
    [task_done] = agg.completed()
    assert task_done.kind is TASK
    waiting = agg.get(WORKFLOW, "root")
    assert waiting is not None
    assert (waiting.missing_tasks, waiting.missing, waiting.expected) == (
        frozenset({"t2"}),
        frozenset(),
        frozenset({"p"}),
    )
    agg.workflow_task("root", "t2", "n", now=1.5)  # handed out
    agg.add(result("t2", "n", ERROR), now=2.0, root_id="root")
    [workflow] = agg.completed()
    assert (workflow.kind, workflow.state) == (WORKFLOW, AggregateState.COMPLETE)
    assert (workflow.tasks, workflow.missing_tasks) == (frozenset({"t1", "t2"}), frozenset())
    stats = agg.statistics()
    assert (stats.completed, stats.partial, stats.open, stats.results) == (2, 0, 0, 2)
    assert not workflow.succeeded  # complete, but n failed
    assert {r.collector_id for r in workflow.results} == {"p", "n"}
    assert [r.latency for r in workflow.results] == [1.0, 0.5]  # from each hand-out


def test_two_tasks_on_one_collector_wait_for_both() -> None:
    agg = ResultAggregator()
    agg.expect_workflow("root", now=0.0, tasks={"t1": "p", "t2": "p"})
    assert agg.add(result("t1", "p"), now=1.0, root_id="root") is AddOutcome.ADDED
    assert agg.completed() == []  # p answered t1, not t2
    waiting = agg.get(WORKFLOW, "root")
    assert waiting is not None
    assert (waiting.missing_tasks, waiting.missing) == (frozenset({"t2"}), frozenset({"p"}))
    agg.add(result("t2", "p"), now=2.0, root_id="root")
    [done] = agg.completed()
    assert done.state is AggregateState.COMPLETE
    assert [(r.task_id, r.collector_id) for r in done.results] == [("t1", "p"), ("t2", "p")]


def test_partial_at_the_deadline_naming_the_missing_tasks_and_their_collectors() -> None:
    agg = ResultAggregator()
    tasks = {"t1": "p", "t2": "n", "t3": "f", "t4": "f", "t5": ""}
    agg.expect_workflow("root", now=0.0, deadline=5.0, tasks=tasks)
    agg.add(result("t1", "p"), now=1.0, root_id="root")
    assert agg.next_deadline() == 5.0
    assert agg.tick(4.9) == 0
    assert agg.tick(5.0) == 1
    [done] = agg.completed()
    assert done.state is AggregateState.PARTIAL
    assert done.partial
    assert done.missing_tasks == {"t2", "t3", "t4", "t5"}
    assert done.missing == {"n", "f"}  # t5 was never handed out
    assert done.expected == {"p", "n", "f"}
    assert [r.collector_id for r in done.results] == ["p"]
    assert agg.next_deadline() is None
    # The missing collectors' health counts a timeout each.
    n, f = agg.health("n"), agg.health("f")
    assert n is not None
    assert f is not None
    assert (n.results, n.timeouts, n.success_rate) == (0, 1, 0.0)
    assert f.timeouts == 1
    stats = agg.statistics()
    assert (stats.completed, stats.partial, stats.open) == (0, 1, 0)


def test_a_workflow_expects_tasks_not_collectors() -> None:
    agg = ResultAggregator()
    with pytest.raises(ValueError, match="tasks"):
        agg.expect(WORKFLOW, "root", ["p"], now=0.0)
    agg.expect(WORKFLOW, "root", [], now=0.0)
    assert agg.get(WORKFLOW, "root") is not None


def test_late_and_unexpected_results() -> None:
    agg = ResultAggregator()
    agg.expect_task("t1", ["p"], now=0.0, deadline=1.0)
    agg.tick(1.0)
    assert agg.add(result("t1", "p"), now=2.0) is AddOutcome.LATE
    assert agg.add(result("t9", "p"), now=2.0) is AddOutcome.UNEXPECTED
    assert agg.add(result("t8", "p"), now=2.0, root_id="nowhere") is AddOutcome.UNEXPECTED
    assert agg.statistics() == AggregationStatistics(
        open=0,
        completed=0,
        partial=1,
        results=3,
        duplicates=0,
        unexpected=2,
        late=1,
        dropped=0,
        undrained=0,
    )
    health = agg.health("p")
    assert health is not None
    assert (health.results, health.timeouts, health.samples) == (3, 1, 0)


def test_a_result_from_a_collector_nobody_expected_is_kept_but_does_not_complete() -> None:
    agg = ResultAggregator()
    agg.expect_task("t1", ["p"], now=0.0)
    assert agg.add(result("t1", "q"), now=1.0) is AddOutcome.ADDED
    aggregate = agg.get(TASK, "t1")
    assert aggregate is not None
    assert aggregate.missing == {"p"}
    [r] = aggregate.results
    assert r.latency is None


def test_reassigned_waits_for_the_new_collector() -> None:
    agg = ResultAggregator()
    agg.expect_task("t1", ["a"], now=0.0)
    agg.expect_workflow("root", now=0.0, tasks={"t1": "a", "t2": "x"})
    agg.reassigned("t1", "a", "b", now=2.0, root_id="root")
    task_agg = agg.get(TASK, "t1")
    assert task_agg is not None
    assert task_agg.expected == {"b"}
    workflow = agg.get(WORKFLOW, "root")
    assert workflow is not None
    assert (workflow.expected, workflow.missing) == (frozenset({"b", "x"}), frozenset({"b", "x"}))
    agg.add(result("t1", "b"), now=3.0, root_id="root")
    [done] = agg.completed()
    assert done.kind is TASK
    assert done.results[0].latency == 1.0  # from the re-assignment
    workflow = agg.get(WORKFLOW, "root")
    assert workflow is not None
    assert workflow.missing_tasks == {"t2"}
    assert workflow.results[0].latency == 1.0
    # The dead holder's late result for t1: one duplicate, not a second result.
    assert agg.add(result("t1", "a"), now=3.5, root_id="root") is AddOutcome.DUPLICATE
    agg.reassigned("t1", "a", "c", now=4.0, root_id="root")  # answered: no change
    workflow = agg.get(WORKFLOW, "root")
    assert workflow is not None
    assert (workflow.duplicates, len(workflow.results)) == (1, 1)
    assert workflow.expected == {"b", "x"}
    agg.reassigned("t3", "nobody", "c", now=4.0)  # no aggregate: no change
    agg.add(result("t2", "x"), now=5.0, root_id="root")
    [complete] = agg.completed()
    assert complete.state is AggregateState.COMPLETE
    assert [(r.task_id, r.collector_id) for r in complete.results] == [("t1", "b"), ("t2", "x")]
    assert agg.statistics().duplicates == 1


def test_a_previous_holders_result_first_finishes_the_task() -> None:
    agg = ResultAggregator()
    agg.expect_workflow("root", now=0.0, tasks={"t1": "a"})
    agg.reassigned("t1", "a", "b", now=1.0, root_id="root")
    agg.add(result("t1", "a"), now=2.0, root_id="root")  # slow, not dead
    [done] = agg.completed()
    assert done.state is AggregateState.COMPLETE
    assert (done.expected, [r.collector_id for r in done.results]) == (frozenset({"a"}), ["a"])
    assert agg.add(result("t1", "b"), now=3.0, root_id="root") is AddOutcome.LATE


def test_expect_again_moves_the_deadline_and_adds_tasks() -> None:
    agg = ResultAggregator()
    agg.expect_workflow("root", now=0.0, deadline=5.0, tasks={"t1": "p"})
    again = agg.expect_workflow("root", now=1.0, deadline=9.0, tasks={"t2": "n"})
    assert (again.tasks, again.expected) == (frozenset({"t1", "t2"}), frozenset({"p", "n"}))
    assert (again.deadline, again.opened_at) == (9.0, 0.0)
    agg.tick(6.0)
    assert agg.completed() == []
    # A result for a task it does not know is kept, not waited for ...
    agg.add(result("t3", "q"), now=7.0, root_id="root")
    agg.add(result("t1", "p"), now=7.0, root_id="root")
    waiting = agg.expect_workflow("root", now=8.0, tasks={"t3": ""})
    # ... and the task, named later, has its result already.
    assert (waiting.state, waiting.missing_tasks) == (AggregateState.OPEN, frozenset({"t2"}))
    assert waiting.expected == {"p", "n", "q"}
    agg.add(result("t2", "n"), now=8.5, root_id="root")
    [done] = agg.completed()
    assert (done.state, done.tasks) == (AggregateState.COMPLETE, frozenset({"t1", "t2", "t3"}))
    # Naming only tasks that have their results closes it at once.
    agg.expect_workflow("w2", now=9.0)
    agg.add(result("u1", "p"), now=9.5, root_id="w2")
    closed = agg.expect_workflow("w2", now=10.0, tasks={"u1": ""})
    assert (closed.state, closed.closed_at, closed.expected) == (
        AggregateState.COMPLETE,
        10.0,
        frozenset({"p"}),
    )
    assert agg.completed() == [closed]


def test_close_early() -> None:
    agg = ResultAggregator()
    agg.expect_workflow("open-ended", now=0.0)
    agg.add(result("t1", "p"), now=1.0, root_id="open-ended")
    assert agg.completed() == []  # no task expected: never complete on its own
    done = agg.close(WORKFLOW, "open-ended", now=2.0)
    assert done is not None
    assert done.state is AggregateState.COMPLETE
    agg.expect_task("t2", ["p"], now=0.0)
    partial = agg.close(TASK, "t2", now=3.0)
    assert partial is not None
    assert (partial.missing, partial.tasks, partial.missing_tasks) == (
        frozenset({"p"}),
        frozenset({"t2"}),
        frozenset({"t2"}),
    )
    assert agg.close(TASK, "t2", now=3.0) is None
    assert len(agg.completed()) == 2


def test_collector_health_success_rate_and_latency() -> None:
    agg = ResultAggregator(latency_window=4)
    for i, (latency, status) in enumerate(
        [(1.0, control_pb2.RPC_STATUS_SUCCESS), (2.0, ERROR), (3.0, control_pb2.RPC_STATUS_SUCCESS)]
        + [(float(n), control_pb2.RPC_STATUS_SUCCESS) for n in (4, 5)]
    ):
        agg.expect_task(f"t{i}", ["p"], now=10.0)
        agg.add(result(f"t{i}", "p", status), now=10.0 + latency)
    health = agg.health("p")
    assert health is not None
    assert (health.results, health.successes, health.failures, health.timeouts) == (5, 4, 1, 0)
    assert health.success_rate == 0.8
    # The window keeps the last four latencies: 2, 3, 4, 5.
    assert health.samples == 4
    assert health.latency_mean == pytest.approx(3.5)
    assert (health.latency_p50, health.latency_p95) == (3.0, 5.0)
    assert set(agg.health_all()) == {"p"}
    assert agg.health("unknown") is None


def test_bounds() -> None:
    agg = ResultAggregator(max_open=2, max_results=2, max_done=1, max_collectors=2)
    agg.expect_task("t1", ["a"], now=0.0)
    agg.expect_task("t2", ["a"], now=0.0)
    with pytest.raises(LimitExceeded, match="open"):
        agg.expect_task("t3", ["a"], now=0.0)
    with pytest.raises(LimitExceeded, match="collectors expected"):
        agg.expect_task("t1", ["b", "c"], now=0.0)
    for cid in ("x", "y", "z"):
        agg.add(result("t1", cid), now=1.0)
    aggregate = agg.get(TASK, "t1")
    assert aggregate is not None
    assert (len(aggregate.results), aggregate.dropped) == (2, 1)
    agg.close(TASK, "t1", now=2.0)
    agg.close(TASK, "t2", now=2.0)
    [kept] = agg.completed()
    assert kept.key == "t2"
    stats = agg.statistics()
    assert (stats.dropped, stats.undrained) == (1, 1)
    assert len(agg.health_all()) == 2  # the least recently seen collector is forgotten
    # A workflow waits for at most max_results tasks; one more is dropped.
    agg.expect_workflow("root", now=3.0, tasks={"w1": "a", "w2": "a"})
    assert not agg.workflow_task("root", "w3", "a", now=3.0)
    aggregate = agg.get(WORKFLOW, "root")
    assert aggregate is not None
    assert (aggregate.tasks, aggregate.dropped) == (frozenset({"w1", "w2"}), 1)


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ResultAggregator(max_open=0)


# -- properties ------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.sets(st.sampled_from(["t1", "t2", "t3"]), min_size=1),
    st.lists(
        st.tuples(st.sampled_from(["t1", "t2", "t3", "t4"]), st.sampled_from("abcd")), max_size=40
    ),
)
def test_each_task_counts_once_and_completes_the_workflow_when_all_answered(
    tasks: set[str], results: list[tuple[str, str]]
) -> None:
    agg = ResultAggregator()
    agg.expect_workflow("root", now=0.0, tasks=dict.fromkeys(tasks, "a"))
    for tid, cid in results:
        agg.add(result(tid, cid), now=1.0, root_id="root")
    open_now = agg.get(WORKFLOW, "root")
    done = agg.completed()
    aggregate = open_now if open_now is not None else done[0]
    kept = [(r.task_id, r.collector_id) for r in aggregate.results]
    # One result per task: the first to arrive, whoever sent it.
    first: dict[str, str] = {}
    for tid, cid in results:
        first.setdefault(tid, cid)
    complete = tasks <= first.keys()
    assert (open_now is None) is complete
    if complete:
        # It closed at the result that made it complete: those before are in it.
        assert aggregate.state is AggregateState.COMPLETE
        assert aggregate.missing_tasks == frozenset()
        assert {t for t, _ in kept} >= tasks
    else:
        assert kept == list(first.items())
        assert aggregate.missing_tasks == tasks - first.keys()
        assert aggregate.duplicates == len(results) - len(first)
    assert len({t for t, _ in kept}) == len(kept)
    assert sum(h.results for h in agg.health_all().values()) == len(set(results))
