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
    agg.expect_workflow("root", ["p", "n"], now=0.0)
    assert agg.add(result("t1", "p"), now=1.0, root_id="root") is AddOutcome.ADDED
    assert agg.add(result("t1", "p"), now=1.1, root_id="root") is AddOutcome.DUPLICATE
    # The same collector's result for another task of the workflow is another result.
    assert agg.add(result("t2", "p"), now=1.2, root_id="root") is AddOutcome.ADDED
    aggregate = agg.get(WORKFLOW, "root")
    assert aggregate is not None
    assert [(r.task_id, r.collector_id) for r in aggregate.results] == [("t1", "p"), ("t2", "p")]
    assert (aggregate.duplicates, aggregate.missing) == (1, frozenset({"n"}))
    health = agg.health("p")
    assert health is not None
    assert health.results == 2  # not 3
    assert agg.statistics().duplicates == 1


def test_a_workflow_completes_when_every_expected_collector_answered() -> None:
    agg = ResultAggregator()
    agg.expect_workflow("root", ["p", "n"], now=0.0, deadline=5.0)
    agg.expect_task("t1", ["p"], now=0.0)
    agg.add(result("t1", "p"), now=1.0, root_id="root")
    [task_done] = agg.completed()
    assert task_done.kind is TASK
    agg.add(result("t2", "n", ERROR), now=2.0, root_id="root")
    [workflow] = agg.completed()
    assert (workflow.kind, workflow.state) == (WORKFLOW, AggregateState.COMPLETE)
    stats = agg.statistics()
    assert (stats.completed, stats.partial, stats.open, stats.results) == (2, 0, 0, 2)
    assert not workflow.succeeded  # complete, but n failed
    assert {r.collector_id for r in workflow.results} == {"p", "n"}


def test_partial_at_the_deadline_naming_who_is_missing() -> None:
    agg = ResultAggregator()
    agg.expect_workflow("root", ["p", "n", "f"], now=0.0, deadline=5.0)
    agg.add(result("t1", "p"), now=1.0, root_id="root")
    assert agg.next_deadline() == 5.0
    assert agg.tick(4.9) == 0
    assert agg.tick(5.0) == 1
    [done] = agg.completed()
    assert done.state is AggregateState.PARTIAL
    assert done.partial
    assert done.missing == {"n", "f"}
    assert [r.collector_id for r in done.results] == ["p"]
    assert agg.next_deadline() is None
    # The missing collectors' health counts a timeout each.
    n = agg.health("n")
    assert n is not None
    assert (n.results, n.timeouts, n.success_rate) == (0, 1, 0.0)
    stats = agg.statistics()
    assert (stats.completed, stats.partial, stats.open) == (0, 1, 0)


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
    agg.expect_workflow("root", ["a", "x"], now=0.0)
    agg.reassigned("t1", "a", "b", now=2.0, root_id="root")
    task_agg = agg.get(TASK, "t1")
    assert task_agg is not None
    assert task_agg.expected == {"b"}
    workflow = agg.get(WORKFLOW, "root")
    assert workflow is not None
    assert workflow.expected == {"b", "x"}
    agg.add(result("t1", "b"), now=3.0, root_id="root")
    [done] = agg.completed()
    assert done.kind is TASK
    assert done.results[0].latency == 1.0  # from the re-assignment
    # A collector that has answered stays expected.
    agg.reassigned("t2", "b", "c", now=4.0, root_id="root")
    workflow = agg.get(WORKFLOW, "root")
    assert workflow is not None
    assert workflow.expected == {"b", "c", "x"}
    agg.reassigned("t3", "nobody", "c", now=4.0, root_id="root")  # not expected: no change


def test_expect_again_adds_collectors_and_moves_the_deadline() -> None:
    agg = ResultAggregator()
    agg.expect_workflow("root", ["p"], now=0.0, deadline=5.0)
    again = agg.expect_workflow("root", ["p", "n"], now=1.0, deadline=9.0)
    assert (again.expected, again.deadline, again.opened_at) == (frozenset({"p", "n"}), 9.0, 0.0)
    agg.tick(6.0)
    assert agg.completed() == []


def test_close_early() -> None:
    agg = ResultAggregator()
    agg.expect_workflow("open-ended", [], now=0.0)
    agg.add(result("t1", "p"), now=1.0, root_id="open-ended")
    assert agg.completed() == []  # nobody expected: never complete on its own
    done = agg.close(WORKFLOW, "open-ended", now=2.0)
    assert done is not None
    assert done.state is AggregateState.COMPLETE
    agg.expect_task("t2", ["p"], now=0.0)
    partial = agg.close(TASK, "t2", now=3.0)
    assert partial is not None
    assert partial.missing == {"p"}
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


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ResultAggregator(max_open=0)


# -- properties ------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["t1", "t2", "t3"]), st.sampled_from("abcd")), max_size=40),
    st.sets(st.sampled_from("abcd")),
)
def test_each_task_and_collector_counts_once(
    results: list[tuple[str, str]], expected: set[str]
) -> None:
    agg = ResultAggregator()
    agg.expect_workflow("root", expected, now=0.0)
    for tid, cid in results:
        agg.add(result(tid, cid), now=1.0, root_id="root")
    unique = set(results)
    open_now = agg.get(WORKFLOW, "root")
    done = agg.completed()
    aggregate = open_now if open_now is not None else done[0]
    pairs = [(r.task_id, r.collector_id) for r in aggregate.results]
    assert len(pairs) == len(set(pairs))
    answered = {cid for _, cid in unique}
    complete = bool(expected) and expected <= answered
    assert (open_now is None) is complete
    if complete:
        # It closed at the first result that made it complete: those before are in it.
        assert aggregate.state is AggregateState.COMPLETE
    else:
        assert set(pairs) == unique
    assert sum(h.results for h in agg.health_all().values()) == len(unique)
