"""The collector registry (pure): states, heartbeats, presence, restarts, bounds."""

from __future__ import annotations

import math

import pytest
from control_helpers import disconnected, heartbeat, registration, up
from google.protobuf.duration_pb2 import Duration
from hypothesis import given, settings
from hypothesis import strategies as st

from daemoneye.eventbus.v1 import control_pb2
from daemoneye.eventbus.v1.control_pb2 import CollectorCapability, Heartbeat, PresenceEvent
from daemoneye_eventbus.control import (
    ChangeKind,
    CollectorRegistry,
    CollectorState,
)
from daemoneye_eventbus.control.registry import HEARTBEAT_INTERVAL_BOUNDS, MAX_LIST_ENTRIES
from daemoneye_eventbus.errors import InvalidPayload, LimitExceeded

S = CollectorState


def states(reg: CollectorRegistry) -> dict[str, CollectorState]:
    return {c.collector_id: c.state for c in reg}


# -- registration ---------------------------------------------------------------------------


def test_a_registration_is_starting_until_its_first_heartbeat() -> None:
    reg = CollectorRegistry()
    msg = registration("procmond-1", task_types=["scan", "hash"], capabilities=["process.enum"])
    msg.capabilities[0].parameters["depth"] = "2"
    msg.topics.append("events.process.lifecycle")
    msg.event_types.append("process.lifecycle")
    info = reg.register(msg, now=10.0)
    assert info.state is S.STARTING
    assert (info.registered_at, info.last_seen, info.last_heartbeat) == (10.0, 10.0, None)
    assert info.task_types == {"scan", "hash"}
    assert info.capability_names == {"process.enum"}
    assert info.capabilities[0].parameters == (("depth", "2"),)
    assert info.topics == ("events.process.lifecycle",)
    assert info.event_types == ("process.lifecycle",)
    assert (info.session_id, info.pid, info.incarnation) == ("s-procmond-1", 1000, 1)
    assert info.heartbeat_interval == reg.heartbeat_interval
    [change] = reg.changes()
    assert (change.kind, change.previous, change.state) == (ChangeKind.REGISTERED, None, S.STARTING)
    assert reg.changes() == []  # taken

    ready = reg.heartbeat(heartbeat("procmond-1", 1), now=11.0)
    assert ready is not None
    assert ready.state is S.READY
    assert (ready.last_heartbeat, ready.state_since) == (11.0, 11.0)
    [change] = reg.changes()
    assert (change.kind, change.previous, change.state) == (ChangeKind.STATE, S.STARTING, S.READY)
    assert change.reason == "heartbeat"


def test_declared_limits_and_interval() -> None:
    reg = CollectorRegistry(max_concurrent_tasks=8)
    a = reg.register(registration("a", max_tasks=0, interval=2), now=0.0)
    b = reg.register(registration("b", max_tasks=100), now=0.0)
    assert (a.max_concurrent_tasks, a.heartbeat_interval) == (1, 2.0)  # 0 means one
    assert b.max_concurrent_tasks == 8  # capped by the registry
    fast = registration("c")
    fast.heartbeat_interval.CopyFrom(Duration(nanos=1))
    slow = registration("d")
    slow.heartbeat_interval.CopyFrom(Duration(seconds=10**9))
    assert reg.register(fast, now=0).heartbeat_interval == HEARTBEAT_INTERVAL_BOUNDS[0]
    assert reg.register(slow, now=0).heartbeat_interval == HEARTBEAT_INTERVAL_BOUNDS[1]


def test_can_run_by_task_type_and_capability() -> None:
    reg = CollectorRegistry()
    info = up(reg, "p", task_types=["scan"], capabilities=["process.enum"])
    assert info.can_run("scan")
    assert info.can_run("scan", "process.enum")
    assert info.can_run("", "process.enum")
    assert info.can_run("")
    assert not info.can_run("hash")
    assert not info.can_run("scan", "network.capture")
    up(reg, "n", task_types=["hash"])
    assert [c.collector_id for c in reg.capable("scan")] == ["p"]
    assert [c.collector_id for c in reg.capable("hash")] == ["n"]
    assert [c.collector_id for c in reg.capable("")] == ["p", "n"]


def test_same_session_updates_a_new_session_is_a_restart() -> None:
    reg = CollectorRegistry()
    up(reg, "p")
    reg.changes()
    again = reg.register(registration("p", task_types=["scan", "hash"]), now=5.0)
    assert again.state is S.READY
    assert again.incarnation == 1
    assert again.task_types == {"scan", "hash"}
    [change] = reg.changes()
    assert change.kind is ChangeKind.UPDATED

    restarted = reg.register(registration("p", session="s-new"), now=6.0)
    assert restarted.state is S.STARTING
    assert (restarted.incarnation, restarted.registered_at, restarted.last_heartbeat) == (
        2,
        6.0,
        None,
    )
    [change] = reg.changes()
    assert (change.kind, change.previous, change.state) == (
        ChangeKind.REREGISTERED,
        S.READY,
        S.STARTING,
    )
    # Without a session id the registry cannot tell: a restart.
    assert reg.register(registration("p", session=""), now=7.0).incarnation == 3
    assert reg.register(registration("p", session=""), now=8.0).incarnation == 4
    stats = reg.statistics()
    assert (stats.registrations, stats.reregistrations) == (1, 3)


def test_a_gone_collector_comes_back_by_registering() -> None:
    reg = CollectorRegistry()
    up(reg, "p")
    reg.presence(disconnected("s-p"), now=1.0)
    assert reg.heartbeat(heartbeat("p", 9), now=2.0) is None  # a GONE collector is ignored
    back = reg.register(registration("p", session="s-p2"), now=3.0)
    assert (back.state, back.incarnation, back.gone_reason) == (S.STARTING, 2, "")
    assert reg.heartbeat(heartbeat("p", 1), now=3.5) is not None  # sequence starts again


# -- liveness ------------------------------------------------------------------------------


def test_missed_heartbeats_make_it_unresponsive_and_a_heartbeat_brings_it_back() -> None:
    reg = CollectorRegistry(missed_heartbeats=3, heartbeat_interval=1.0)
    up(reg, "p", now=0.0)
    reg.changes()
    assert reg.next_deadline() == 3.0
    assert reg.check(3.0) == []  # exactly at the deadline: not yet
    [changed] = reg.check(3.01)
    assert changed.state is S.UNRESPONSIVE
    [change] = reg.changes()
    assert change.reason == "missed 3 heartbeats"
    assert reg.check(100.0) == []  # once
    back = reg.heartbeat(heartbeat("p"), now=100.0)
    assert back is not None
    assert back.state is S.READY
    assert [c.state for c in reg.changes()] == [S.READY]


def test_a_registration_without_heartbeats_goes_unresponsive_too() -> None:
    reg = CollectorRegistry(missed_heartbeats=2)
    reg.register(registration("p", interval=4), now=0.0)
    assert reg.next_deadline() == 8.0
    assert [c.state for c in reg.check(8.5)] == [S.UNRESPONSIVE]


def test_a_heartbeat_may_change_the_interval_and_reports_load() -> None:
    reg = CollectorRegistry(missed_heartbeats=2, max_concurrent_tasks=4)
    up(reg, "p")
    hb = Heartbeat(component_id="p", sequence=1, active_tasks=3, max_concurrent_tasks=9, load=7.5)
    hb.interval.CopyFrom(Duration(seconds=10))
    info = reg.heartbeat(hb, now=1.0)
    assert info is not None
    assert (info.active_tasks, info.load, info.max_concurrent_tasks) == (3, 1.0, 4)
    assert info.heartbeat_interval == 10.0
    assert reg.next_deadline() == 21.0
    nan = reg.heartbeat(Heartbeat(component_id="p", sequence=2, load=math.nan), now=2.0)
    assert nan is not None
    assert nan.load == 0.0


def test_stale_and_unknown_heartbeats_are_ignored() -> None:
    reg = CollectorRegistry()
    up(reg, "p")
    assert reg.heartbeat(heartbeat("p", 5), now=1.0) is not None
    assert reg.heartbeat(heartbeat("p", 5), now=2.0) is None
    assert reg.heartbeat(heartbeat("p", 4), now=2.0) is None
    assert reg.heartbeat(heartbeat("p", 0), now=2.0) is not None  # no sequence: taken
    assert reg.heartbeat(heartbeat("nobody", 1), now=2.0) is None
    stats = reg.statistics()
    assert (stats.heartbeats, stats.stale_heartbeats, stats.unknown_heartbeats) == (3, 2, 1)
    info = reg.get("p")
    assert info is not None
    assert info.heartbeat_sequence == 5


def test_presence_disconnected_makes_the_session_s_collectors_gone() -> None:
    reg = CollectorRegistry()
    up(reg, "p")
    up(reg, "n")
    reg.changes()
    connected = PresenceEvent(state=control_pb2.PRESENCE_STATE_CONNECTED, session_id="s-p")
    assert reg.presence(connected, now=1.0) == []
    assert reg.presence(disconnected("s-other"), now=1.0) == []
    [gone] = reg.presence(disconnected("s-p"), now=2.0)
    assert (gone.collector_id, gone.state, gone.gone_reason) == ("p", S.GONE, "connection lost")
    [change] = reg.changes()
    assert (change.previous, change.state, change.reason) == (S.READY, S.GONE, "connection lost")
    assert reg.presence(disconnected("s-p"), now=3.0) == []  # once
    goodbye = disconnected("s-n", control_pb2.DISCONNECT_REASON_GOODBYE)
    goodbye.detail = "shutting down"
    [gone] = reg.presence(goodbye, now=3.0)
    assert gone.gone_reason == "goodbye: shutting down"
    assert states(reg) == {"p": S.GONE, "n": S.GONE}
    # GONE is not UNRESPONSIVE: no heartbeat is awaited of them; they are forgotten.
    assert {c.collector_id for c in reg.check(1000.0)} == {"p", "n"}
    assert len(reg) == 0


def test_an_unknown_disconnect_reason_still_ends_the_collector() -> None:
    reg = CollectorRegistry()
    up(reg, "p")
    event = disconnected("s-p")
    event.reason = 99  # type: ignore[assignment]  # a reason newer than this schema
    [gone] = reg.presence(event, now=1.0)
    assert gone.gone_reason == "99"


def test_mark_gone() -> None:
    reg = CollectorRegistry()
    up(reg, "p")
    gone = reg.mark_gone("p", now=1.0, reason="goodbye")
    assert gone is not None
    assert (gone.state, gone.gone_reason) == (S.GONE, "goodbye")
    assert reg.mark_gone("p", now=2.0) is gone  # already gone: unchanged
    assert reg.mark_gone("nobody", now=2.0) is None


def test_gone_collectors_are_forgotten_after_a_while() -> None:
    reg = CollectorRegistry(forget_after=60.0)
    up(reg, "p")
    reg.mark_gone("p", now=10.0)
    reg.changes()
    assert reg.next_deadline() == 70.0
    assert reg.check(69.0) == []
    [removed] = reg.check(70.0)
    assert removed.collector_id == "p"
    assert "p" not in reg
    assert len(reg) == 0
    [change] = reg.changes()
    assert (change.kind, change.previous, change.state) == (ChangeKind.REMOVED, S.GONE, None)
    assert reg.next_deadline() is None


# -- the agent's tasks: READY and BUSY ----------------------------------------------------------


def test_busy_while_the_agent_has_as_many_tasks_out_as_it_runs() -> None:
    reg = CollectorRegistry()
    up(reg, "p", max_tasks=2)
    reg.changes()
    info = reg.set_assigned("p", 1, now=1.0)
    assert info is not None
    assert (info.state, info.free_slots) == (S.READY, 1)
    info = reg.set_assigned("p", 2, now=2.0)
    assert info is not None
    assert (info.state, info.free_slots) == (S.BUSY, 0)
    info = reg.set_assigned("p", 1, now=3.0)
    assert info is not None
    assert info.state is S.READY
    assert [(c.previous, c.state) for c in reg.changes()] == [
        (S.READY, S.BUSY),
        (S.BUSY, S.READY),
    ]
    assert reg.set_assigned("nobody", 1, now=3.0) is None


def test_tasks_assigned_before_a_heartbeat_count_when_it_comes() -> None:
    reg = CollectorRegistry(missed_heartbeats=1, heartbeat_interval=1.0)
    up(reg, "p")
    reg.check(5.0)  # UNRESPONSIVE
    info = reg.set_assigned("p", 1, now=5.0)
    assert info is not None
    assert (info.state, info.assigned_tasks) == (S.UNRESPONSIVE, 1)
    back = reg.heartbeat(heartbeat("p"), now=6.0)
    assert back is not None
    assert back.state is S.BUSY


# -- bounds ----------------------------------------------------------------------------------


def test_invalid_registrations_are_refused() -> None:
    reg = CollectorRegistry()
    with pytest.raises(InvalidPayload, match="collector id"):
        reg.register(registration(""), now=0.0)
    with pytest.raises(LimitExceeded, match="collector id"):
        reg.register(registration("p" * 257), now=0.0)
    with pytest.raises(LimitExceeded, match="task types"):
        reg.register(registration("p", task_types=[f"t{i}" for i in range(257)]), now=0.0)
    many = registration("p")
    many.capabilities.extend(CollectorCapability(name=f"c{i}") for i in range(257))
    with pytest.raises(LimitExceeded, match="capabilities"):
        reg.register(many, now=0.0)
    long_param = registration("p", capabilities=["c"])
    long_param.capabilities[0].parameters["k"] = "v" * 300
    with pytest.raises(LimitExceeded, match="capability parameter"):
        reg.register(long_param, now=0.0)
    assert len(reg) == 0
    assert reg.statistics().refused == 5
    assert reg.register(
        registration("p", task_types=[f"t{i}" for i in range(MAX_LIST_ENTRIES)]), now=0.0
    )


def test_a_full_registry_evicts_the_gone_then_the_unresponsive_then_refuses() -> None:
    reg = CollectorRegistry(max_collectors=3, missed_heartbeats=1, heartbeat_interval=1.0)
    for name in ("a", "b", "c"):
        up(reg, name, now=0.0)
    reg.mark_gone("b", now=1.0)
    reg.register(registration("d"), now=1.5)  # b goes
    assert set(states(reg)) == {"a", "c", "d"}
    reg.heartbeat(heartbeat("a"), now=1.5)
    reg.check(1.2)  # c (silent since 0) is UNRESPONSIVE; d and a are not
    assert states(reg)["c"] is S.UNRESPONSIVE
    reg.register(registration("e"), now=2.0)  # c goes
    assert set(states(reg)) == {"a", "d", "e"}
    with pytest.raises(LimitExceeded, match="full"):
        reg.register(registration("f"), now=2.0)
    # A known collector may always register again.
    assert reg.register(registration("a", session="s-x"), now=2.0).incarnation == 2
    stats = reg.statistics()
    assert (stats.evicted, stats.refused, stats.collectors) == (2, 1, 3)
    removed = [c for c in reg.changes() if c.kind is ChangeKind.REMOVED]
    assert [(c.collector_id, c.reason) for c in removed] == [
        ("b", "evicted: registry full"),
        ("c", "evicted: registry full"),
    ]


def test_changes_are_bounded() -> None:
    reg = CollectorRegistry(max_changes=3)
    for i in range(5):
        reg.register(registration(f"c{i}"), now=float(i))
    changes = reg.changes()
    assert [c.collector_id for c in changes] == ["c2", "c3", "c4"]
    assert reg.statistics().changes_dropped == 2


def test_statistics_by_state() -> None:
    reg = CollectorRegistry()
    up(reg, "a")
    reg.register(registration("b"), now=0.0)
    up(reg, "c")
    reg.mark_gone("c", now=1.0)
    by_state = reg.statistics().by_state
    assert by_state == {"starting": 1, "ready": 1, "busy": 0, "unresponsive": 0, "gone": 1}
    assert [c.collector_id for c in reg.collectors(S.READY)] == ["a"]
    assert [c.collector_id for c in reg.collectors()] == ["a", "b", "c"]


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="max_collectors"):
        CollectorRegistry(max_collectors=0)
    with pytest.raises(ValueError, match="heartbeat_interval"):
        CollectorRegistry(heartbeat_interval=0)


# -- properties --------------------------------------------------------------------------------

IDS = ["a", "b", "c", "d"]
operation = st.one_of(
    st.tuples(st.just("register"), st.sampled_from(IDS), st.sampled_from(["1", "2"])),
    st.tuples(st.just("heartbeat"), st.sampled_from(IDS), st.integers(0, 5)),
    st.tuples(st.just("assign"), st.sampled_from(IDS), st.integers(0, 3)),
    st.tuples(st.just("lost"), st.sampled_from(IDS), st.sampled_from(["1", "2"])),
    st.tuples(st.just("gone"), st.sampled_from(IDS), st.just(0)),
    st.tuples(st.just("wait"), st.just(""), st.integers(0, 10)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(operation, max_size=60))
def test_changes_chain_and_states_agree_with_the_figures(
    ops: list[tuple[str, str, object]],
) -> None:
    """Whatever happens: at most max_collectors; each collector's changes form
    a chain ending in its state; READY and BUSY agree with its tasks."""
    reg = CollectorRegistry(max_collectors=3, missed_heartbeats=2, heartbeat_interval=1.0)
    now = 0.0
    last_state: dict[str, CollectorState | None] = {}
    for op, cid, arg in ops:
        now += 0.25
        if op == "register":
            try:
                reg.register(registration(cid, max_tasks=2, session=f"{cid}{arg}"), now=now)
            except LimitExceeded:
                assert len(reg) == 3
                assert cid not in reg
        elif op == "heartbeat":
            reg.heartbeat(heartbeat(cid, int(str(arg))), now=now)
        elif op == "assign":
            reg.set_assigned(cid, int(str(arg)), now=now)
        elif op == "lost":
            reg.presence(disconnected(f"{cid}{arg}"), now=now)
        elif op == "gone":
            reg.mark_gone(cid, now=now)
        else:
            now += float(str(arg))
            reg.check(now)
        assert len(reg) <= 3
        for change in reg.changes():
            assert last_state.get(change.collector_id) == change.previous or (
                change.kind is ChangeKind.REGISTERED and change.previous is None
            )
            if change.kind is not ChangeKind.UPDATED:
                assert change.previous is not change.state or change.kind in (
                    ChangeKind.REREGISTERED,
                )
            last_state[change.collector_id] = change.state
        for info in reg:
            assert last_state[info.collector_id] is info.state
            if info.state in (S.READY, S.BUSY):
                busy = info.assigned_tasks >= info.max_concurrent_tasks
                assert (info.state is S.BUSY) is busy
            if info.state is S.STARTING:
                assert info.last_heartbeat is None
