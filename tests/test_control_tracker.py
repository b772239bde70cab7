"""The correlation tracker (pure): workflow history, timeouts, queries, bounds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemoneye.eventbus.v1.correlation_pb2 import CorrelationMetadata
from daemoneye_eventbus.control import CorrelationTracker, StageRecord, WorkflowState


def test_a_workflow_gathers_stages_collectors_and_counts() -> None:
    tracker = CorrelationTracker()
    tracker.observe("root", now=1.0, stage="detection", collector_id="procmond")
    tracker.observe("root", now=2.0, stage="enrichment", collector_id="netmond", task=True)
    record = tracker.observe("root", now=3.0, stage="detection", collector_id="procmond")
    assert record.state is WorkflowState.ACTIVE
    assert (record.first_seen, record.last_seen, record.ended_at) == (1.0, 3.0, None)
    assert record.stages == (
        StageRecord("detection", 2, 1.0, 3.0),
        StageRecord("enrichment", 1, 2.0, 2.0),
    )
    assert record.collectors == ("procmond", "netmond")
    assert (record.events, record.tasks) == (2, 1)
    assert tracker.workflow("root") == record
    assert tracker.workflow("other") is None


def test_observe_metadata_uses_the_root_or_the_event_s_own_id() -> None:
    tracker = CorrelationTracker()
    child = CorrelationMetadata(correlation_id="c2", root_correlation_id="r1")
    child.workflow_stage = "analysis"
    record = tracker.observe_metadata(child, now=1.0, collector_id="procmond")
    assert record is not None
    assert (record.root_id, record.stages[0].name) == ("r1", "analysis")
    first = tracker.observe_metadata(CorrelationMetadata(correlation_id="r2"), now=2.0)
    assert first is not None
    assert (first.root_id, first.stages) == ("r2", ())
    assert tracker.observe_metadata(CorrelationMetadata(), now=3.0) is None


def test_an_idle_workflow_times_out_and_comes_back_on_new_activity() -> None:
    tracker = CorrelationTracker(idle_timeout=10.0)
    tracker.observe("a", now=0.0)
    tracker.observe("b", now=5.0)
    assert tracker.next_deadline() == 10.0
    assert tracker.expire(9.9) == []
    [timed_out] = tracker.expire(10.0)
    assert (timed_out.root_id, timed_out.state, timed_out.ended_at) == (
        "a",
        WorkflowState.TIMED_OUT,
        10.0,
    )
    assert [w.root_id for w in tracker.active()] == ["b"]
    assert tracker.next_deadline() == 15.0
    again = tracker.observe("a", now=11.0)
    assert (again.state, again.first_seen, again.events, again.ended_at) == (
        WorkflowState.ACTIVE,
        0.0,
        2,
        None,
    )
    assert tracker.statistics().timed_out == 1


def test_finish() -> None:
    tracker = CorrelationTracker()
    tracker.observe("a", now=0.0)
    done = tracker.finish("a", now=1.0)
    assert done is not None
    assert (done.state, done.ended_at) == (WorkflowState.FINISHED, 1.0)
    assert tracker.finish("a", now=2.0) is None
    assert tracker.active() == []
    record = tracker.workflow("a")
    assert record is not None
    assert record.state is WorkflowState.FINISHED
    assert tracker.next_deadline() is None


def test_active_and_recent_are_newest_first() -> None:
    tracker = CorrelationTracker()
    for i, root in enumerate(["a", "b", "c"]):
        tracker.observe(root, now=float(i))
    tracker.observe("a", now=5.0)
    tracker.finish("b", now=6.0)
    assert [w.root_id for w in tracker.active()] == ["a", "c"]
    assert [w.root_id for w in tracker.recent(2)] == ["a", "c"]
    assert [w.root_id for w in tracker.recent(10)] == ["a", "c", "b"]
    assert tracker.recent(0) == []


def test_the_least_recently_seen_workflow_is_evicted() -> None:
    tracker = CorrelationTracker(max_workflows=2, max_history=2)
    tracker.observe("a", now=0.0)
    tracker.observe("b", now=1.0)
    tracker.observe("a", now=2.0)
    tracker.observe("c", now=3.0)  # b goes
    assert [w.root_id for w in tracker.active()] == ["c", "a"]
    evicted = tracker.workflow("b")
    assert evicted is not None
    assert evicted.state is WorkflowState.EVICTED
    tracker.observe("d", now=4.0)  # a goes
    tracker.observe("e", now=5.0)  # c goes; the history holds two: b is forgotten
    assert tracker.workflow("b") is None
    stats = tracker.statistics()
    assert (stats.active, stats.history, stats.evicted, stats.observed) == (2, 2, 3, 6)


def test_stages_and_collectors_are_bounded() -> None:
    tracker = CorrelationTracker(max_stages=2, max_collectors=1)
    for stage, collector in [("s1", "p"), ("s2", "n"), ("s3", "f"), ("s1", "p")]:
        record = tracker.observe("root", now=0.0, stage=stage, collector_id=collector)
    assert [s.name for s in record.stages] == ["s1", "s2"]
    assert record.collectors == ("p",)
    assert (record.stages_dropped, record.collectors_dropped) == (1, 2)


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        CorrelationTracker(idle_timeout=0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from("abcdefgh"), max_size=60), st.integers(1, 4))
def test_the_active_workflows_are_the_most_recently_seen(roots: list[str], limit: int) -> None:
    tracker = CorrelationTracker(max_workflows=limit, max_history=3)
    for i, root in enumerate(roots):
        tracker.observe(root, now=float(i))
        assert len(tracker.active()) <= limit
        assert tracker.statistics().history <= 3
    newest: list[str] = []
    for root in reversed(roots):
        if root not in newest:
            newest.append(root)
    assert [w.root_id for w in tracker.active()] == newest[:limit]
    assert tracker.statistics().evicted == max(0, _distinct_evictions(roots, limit))


def _distinct_evictions(roots: list[str], limit: int) -> int:
    """How many times an LRU set of ``limit`` entries drops one, for these accesses."""
    lru: list[str] = []
    evictions = 0
    for root in roots:
        if root in lru:
            lru.remove(root)
        lru.append(root)
        if len(lru) > limit:
            lru.pop(0)
            evictions += 1
    return evictions
