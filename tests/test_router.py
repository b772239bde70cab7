"""The router on its own: no event loop, no socket, no session.

Endpoints are given a recording sink; the tests publish ``Publish`` and
``PublishBatch`` messages through :meth:`Router.route` and look at what each
sink was handed (which subscription, numbered from which sequence, how many
events) and at the router's figures.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import pytest
from conftest import worker_env

from daemoneye.eventbus.v1 import control_pb2, events_pb2, frames_pb2, registry
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationFilter, CorrelationMetadata
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode
from daemoneye.eventbus.v1.options_pb2 import AccessLevel
from daemoneye_eventbus.access import Identity, PeerCredentials
from daemoneye_eventbus.config import BrokerConfig
from daemoneye_eventbus.correlation import correlation_filter, new_correlation
from daemoneye_eventbus.errors import (
    AccessDenied,
    EventBusError,
    InvalidCorrelation,
    InvalidTopic,
    LimitExceeded,
    PayloadTypeMismatch,
    ServerError,
    SubscriptionExists,
    UnknownSubscription,
)
from daemoneye_eventbus.protocol import build_publish
from daemoneye_eventbus.router import (
    UNDECLARED_LABEL,
    Endpoint,
    Published,
    Router,
    SubscriptionEntry,
)
from daemoneye_eventbus.stamps import Stamp
from daemoneye_eventbus.statistics import TopicFigures
from daemoneye_eventbus.subscriptions import DECLARED_TOPICS

EC = ErrorCode
LIFECYCLE = registry.EVENTS_PROCESS_LIFECYCLE
ANOMALY = registry.EVENTS_PROCESS_ANOMALY
NETWORK = registry.EVENTS_NETWORK_CONNECTIONS
AGENT_POLICY = registry.CONTROL_AGENT_POLICY
HEARTBEAT = registry.CONTROL_HEALTH_HEARTBEAT
PROCESS_EVENT = LIFECYCLE.payload_name

#: What the kernel would say of a root peer (the default policy trusts root).
ROOT = PeerCredentials(os.getpid(), 0, 0)
AGENT = Identity(ROOT, "daemoneye-agent", privileged=True)
PROCMOND = Identity(ROOT, "procmond")
NETMOND = Identity(ROOT, "netmond")
#: A peer of an ordinary user that claimed no component.
ANONYMOUS = Identity(PeerCredentials(1, 1000, 1000))


@dataclass(frozen=True)
class Delivery:
    """One call of a sink's ``enqueue``."""

    subscription_id: int
    topic: str
    first: int
    count: int
    payloads: tuple[bytes, ...]


class RecordingSink:
    """A sink that records what it is handed; ``full`` makes it refuse (a full queue)."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        #: (subscription id, event id of the first event, receive time) per delivery.
        self.stamps: list[tuple[int, int, int]] = []
        self.full = False

    def enqueue(
        self,
        sub: SubscriptionEntry,
        message: Published,
        data: bytes,
        first: int,
        count: int,
        lossless: bool,
        stamp: Stamp,
    ) -> int:
        self.stamps.append((sub.subscription_id, stamp.event_id, stamp.time_ns))
        if isinstance(message, frames_pb2.PublishBatch):
            payloads = tuple(message.payloads)
            assert frames_pb2.PublishBatch.FromString(data) == message
        else:
            payloads = (message.payload,)
            assert frames_pb2.Publish.FromString(data) == message
        assert count == len(payloads)
        self.deliveries.append(Delivery(sub.subscription_id, message.topic, first, count, payloads))
        return not self.full

    def resume(self) -> None:
        """Nothing to resume: no flow holds a recording publisher."""

    def take(self) -> list[tuple[int, str, int, int]]:
        """(subscription id, topic, first sequence, count) of each delivery since the
        last take, by subscription id and sequence (the router visits subscriptions
        in no particular order)."""
        out = sorted(
            ((d.subscription_id, d.topic, d.first, d.count) for d in self.deliveries),
            key=lambda d: (d[0], d[2]),
        )
        self.deliveries.clear()
        return out


def endpoint(identity: Identity) -> tuple[Endpoint, RecordingSink]:
    sink = RecordingSink()
    return Endpoint(sink, identity=identity, peer=identity.peer), sink


def event(
    pid: int = 1,
    topic: str = LIFECYCLE.name,
    correlation: CorrelationMetadata | None = None,
    payload_type: str = PROCESS_EVENT,
    size: int = 0,
) -> frames_pb2.Publish:
    publish = frames_pb2.Publish(
        topic=topic,
        payload_type=payload_type,
        payload=events_pb2.ProcessEvent(pid=pid, name="n" * size).SerializeToString(),
    )
    if correlation is not None:
        publish.correlation.CopyFrom(correlation)
    return publish


def batch(
    pids: Sequence[int], topic: str = LIFECYCLE.name, size: int = 0
) -> frames_pb2.PublishBatch:
    return frames_pb2.PublishBatch(
        topic=topic,
        payload_type=PROCESS_EVENT,
        payloads=[
            events_pb2.ProcessEvent(pid=p, name="n" * size).SerializeToString() for p in pids
        ],
    )


def pids(sink: RecordingSink) -> list[int]:
    return [events_pb2.ProcessEvent.FromString(p).pid for d in sink.deliveries for p in d.payloads]


# -- fan-out and numbering ---------------------------------------------------------------------


def test_publish_reaches_matching_subscriptions_numbered_per_subscription() -> None:
    router = Router(BrokerConfig())
    agent, agent_sink = endpoint(AGENT)
    procmond, _ = endpoint(PROCMOND)
    router.subscribe(agent, 1, LIFECYCLE.name)
    router.subscribe(agent, 2, "events.process.metadata")  # matches nothing published here
    router.subscribe(agent, 3, "events.process.#")

    assert router.route(procmond, event(10)) == 2
    assert agent_sink.take() == [(1, LIFECYCLE.name, 1, 1), (3, LIFECYCLE.name, 1, 1)]
    # A batch of 3 is numbered first..first+2 for each subscription, as one delivery.
    assert router.route(procmond, batch([11, 12, 13])) == 6
    assert agent_sink.take() == [(1, LIFECYCLE.name, 2, 3), (3, LIFECYCLE.name, 2, 3)]
    # The next publish carries on after the batch.
    router.route(procmond, event(14))
    assert agent_sink.take() == [(1, LIFECYCLE.name, 5, 1), (3, LIFECYCLE.name, 5, 1)]
    # Another topic advances only the subscriptions it reaches.
    router.route(procmond, event(15, topic="events.process.metadata"))
    assert agent_sink.take() == [
        (2, "events.process.metadata", 1, 1),
        (3, "events.process.metadata", 6, 1),
    ]
    # Numbers are per subscription: a newcomer starts at 1.
    late, late_sink = endpoint(AGENT)
    router.subscribe(late, 1, LIFECYCLE.name)
    router.route(procmond, event(16))
    assert late_sink.take() == [(1, LIFECYCLE.name, 1, 1)]
    assert [s.sequence for s in agent.subscriptions.values()] == [6, 1, 7]

    assert (router.published, procmond.published) == (7, 7)
    assert router.delivered == 2 + 6 + 2 + 2 + 3
    assert (router.dropped, router.refused) == (0, 0)
    entry = agent.subscriptions[1]
    assert (entry.delivered, entry.dropped) == (6, 0)


def test_every_accepted_event_gets_the_next_id_and_each_subscriber_the_same_one() -> None:
    """protocol §5, "Event ids and receive times": ids from 1, consecutive within a
    batch, increasing across publishes and publishers, the same for every
    subscriber; a refused publish takes none."""
    router = Router(BrokerConfig())
    agent, agent_sink = endpoint(AGENT)
    other, other_sink = endpoint(AGENT)
    procmond, _ = endpoint(PROCMOND)
    anonymous, _ = endpoint(ANONYMOUS)
    router.subscribe(agent, 1, LIFECYCLE.name)
    router.subscribe(other, 7, "events.process.#")
    before = time.time_ns()
    router.route(procmond, event(1))
    router.route(procmond, batch([2, 3, 4]))
    with pytest.raises(AccessDenied):
        router.route(anonymous, event(5))  # refused: no id spent
    router.route(procmond, event(6, topic="events.process.metadata"))  # nobody on 1 reads it
    router.route(procmond, event(7))
    after = time.time_ns()
    assert [(sid, eid) for sid, eid, _ in agent_sink.stamps] == [(1, 1), (1, 2), (1, 6)]
    assert [(sid, eid) for sid, eid, _ in other_sink.stamps] == [(7, 1), (7, 2), (7, 5), (7, 6)]
    assert all(before <= t <= after for _, _, t in agent_sink.stamps + other_sink.stamps)
    times = [t for _, _, t in other_sink.stamps]
    assert times == sorted(times)
    assert router.clock.next_id == 7


def test_payloads_reach_the_sink_unchanged_and_in_order() -> None:
    router = Router(BrokerConfig())
    agent, sink = endpoint(AGENT)
    procmond, _ = endpoint(PROCMOND)
    router.subscribe(agent, 1, LIFECYCLE.name)
    router.route(procmond, event(1))
    router.route(procmond, batch([2, 3, 4]))
    assert pids(sink) == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("filter", "lifecycle", "network"),
    [
        ("events.process.+", True, False),
        ("events.+.lifecycle", True, False),
        ("+.+.lifecycle", True, False),
        ("events.#", True, True),
        ("#", True, True),
        ("events.network.+", False, True),
        ("events.+.connections", False, True),
    ],
)
def test_wildcard_filters(filter: str, lifecycle: bool, network: bool) -> None:
    router = Router(BrokerConfig())
    agent, sink = endpoint(AGENT)
    procmond, _ = endpoint(PROCMOND)
    netmond, _ = endpoint(NETMOND)
    router.subscribe(agent, 7, filter)
    router.route(procmond, event(1))
    network_event = frames_pb2.Publish(
        topic=NETWORK.name,
        payload_type=NETWORK.payload_name,
        payload=events_pb2.NetworkEvent().SerializeToString(),
    )
    router.route(netmond, network_event)
    expected = [LIFECYCLE.name] * lifecycle + [NETWORK.name] * network
    assert [topic for _, topic, _, _ in sink.take()] == expected


def test_control_topics_reach_wildcards_only_when_asked_for() -> None:
    router = Router(BrokerConfig())
    agent, sink = endpoint(AGENT)
    router.subscribe(agent, 1, "#")
    router.subscribe(agent, 2, "#", include_control=True)
    router.subscribe(agent, 3, "control.#")  # names the control tree: wants control topics
    router.subscribe(agent, 4, AGENT_POLICY.name)
    router.subscribe(agent, 5, "+.agent.policy")  # reaches it, but does not ask for it
    router.subscribe(agent, 6, "+.agent.policy", include_control=True)
    assert [agent.subscriptions[i].wants_control for i in range(1, 7)] == [
        False,
        True,
        True,
        True,
        False,
        True,
    ]
    router.route(agent, build_publish(AGENT_POLICY, control_pb2.PolicyUpdate()))
    assert [sid for sid, *_ in sink.take()] == [2, 3, 4, 6]
    # An ordinary topic still reaches the plain wildcard.
    router.route(agent, event(1, topic=ANOMALY.name))
    assert [sid for sid, *_ in sink.take()] == [1, 2]


def test_topic_info_from_the_schema() -> None:
    router = Router(BrokerConfig())
    info = router.topic_info(AGENT_POLICY.name)
    assert (info.payload_type, info.control) == (AGENT_POLICY.payload_name, True)
    assert info.access.access == AccessLevel.ACCESS_LEVEL_PRIVILEGED
    # the agent, and the fleet through the bridge when the policy makes it privileged
    assert info.access.publishers == frozenset({"daemoneye-agent", "bridge"})
    # An instance of a template is declared too.
    targeted = router.topic_info("control.collector.task.scan.c1")
    assert targeted.control
    assert targeted.payload_type == control_pb2.TaskAssignment.DESCRIPTOR.full_name
    lifecycle = router.topic_info(LIFECYCLE.name)
    assert not lifecycle.control
    assert lifecycle.access.subscribers == frozenset({"daemoneye-agent", "bridge"})
    # Every topic and template of the registry is in DECLARED_TOPICS.
    patterns = {pattern for pattern, _ in DECLARED_TOPICS}
    assert set(registry.TOPICS) <= patterns
    assert "control.collector.task.+.+" in patterns


# -- correlation filters -----------------------------------------------------------------------


def test_correlation_filter_applies_per_subscription() -> None:
    router = Router(BrokerConfig())
    agent, sink = endpoint(AGENT)
    procmond, _ = endpoint(PROCMOND)
    router.subscribe(agent, 1, LIFECYCLE.name, correlation_filter(correlation_ids=["x"]))
    router.subscribe(agent, 2, LIFECYCLE.name, correlation_filter(correlation_ids=["y"]))
    router.subscribe(agent, 3, LIFECYCLE.name)
    router.subscribe(agent, 4, LIFECYCLE.name, CorrelationFilter())  # empty: matches everything

    assert router.route(procmond, event(1, correlation=new_correlation("x"))) == 3
    assert [sid for sid, *_ in sink.take()] == [1, 3, 4]
    router.route(procmond, event(2, correlation=new_correlation("y")))
    # An event a subscription's filter rejects does not use up a sequence number there.
    assert sink.take() == [
        (2, LIFECYCLE.name, 1, 1),
        (3, LIFECYCLE.name, 2, 1),
        (4, LIFECYCLE.name, 2, 1),
    ]
    router.route(procmond, event(3))  # no metadata: only the unfiltered subscriptions
    assert [sid for sid, *_ in sink.take()] == [3, 4]
    # A batch carries one correlation for all its events.
    corr_batch = batch([4, 5])
    corr_batch.correlation.CopyFrom(new_correlation("x"))
    router.route(procmond, corr_batch)
    assert sink.take() == [
        (1, LIFECYCLE.name, 2, 2),
        (3, LIFECYCLE.name, 4, 2),
        (4, LIFECYCLE.name, 4, 2),
    ]
    assert agent.subscriptions[4].matcher is None  # an empty filter costs nothing


# -- access control ----------------------------------------------------------------------------


def test_anonymous_peer_cannot_subscribe_to_a_restricted_topic() -> None:
    router = Router(BrokerConfig())
    anon, _ = endpoint(ANONYMOUS)
    for filter in (LIFECYCLE.name, "events.+.lifecycle", AGENT_POLICY.name):
        with pytest.raises(AccessDenied) as info:
            router.subscribe(anon, 1, filter)
        assert info.value.code == EC.ERROR_CODE_ACCESS_DENIED
    assert router.refused == 3
    assert len(router) == 0
    assert anon.subscriptions == {}
    # A filter that can reach a public topic is accepted.
    router.subscribe(anon, 1, "events.process.#")
    assert len(router) == 1


def test_anonymous_peer_cannot_publish_on_a_restricted_topic() -> None:
    router = Router(BrokerConfig())
    agent, sink = endpoint(AGENT)
    anon, _ = endpoint(ANONYMOUS)
    router.subscribe(agent, 1, "#", include_control=True)
    with pytest.raises(AccessDenied) as info:
        router.route(anon, event(1))
    assert info.value.code == EC.ERROR_CODE_ACCESS_DENIED
    with pytest.raises(AccessDenied):
        router.route(anon, batch([1, 2]))
    with pytest.raises(AccessDenied):
        router.route(anon, build_publish(AGENT_POLICY, control_pb2.PolicyUpdate()))
    assert sink.deliveries == []
    assert (router.refused, router.published, anon.published) == (3, 0, 0)
    # Public topics are open to it.
    assert router.route(anon, event(2, topic=ANOMALY.name)) == 1


def test_anonymous_wildcard_subscription_receives_public_topics_only() -> None:
    router = Router(BrokerConfig())
    agent, agent_sink = endpoint(AGENT)
    procmond, _ = endpoint(PROCMOND)
    anon, anon_sink = endpoint(ANONYMOUS)
    router.subscribe(anon, 1, "#", include_control=True)
    router.subscribe(agent, 1, "#", include_control=True)

    router.route(procmond, event(1))  # restricted: the agent only
    router.route(procmond, event(2, topic=ANOMALY.name))  # public
    router.route(agent, build_publish(AGENT_POLICY, control_pb2.PolicyUpdate()))  # privileged
    router.route(anon, build_publish(HEARTBEAT, control_pb2.Heartbeat()))  # public control
    assert [(t, first) for _, t, first, _ in anon_sink.take()] == [
        (ANOMALY.name, 1),
        (HEARTBEAT.name, 2),
    ]
    assert [t for _, t, _, _ in agent_sink.take()] == [
        LIFECYCLE.name,
        ANOMALY.name,
        AGENT_POLICY.name,
        HEARTBEAT.name,
    ]


def test_components_publish_and_read_what_the_schema_lists() -> None:
    router = Router(BrokerConfig())
    agent, agent_sink = endpoint(AGENT)
    procmond, procmond_sink = endpoint(PROCMOND)
    router.subscribe(agent, 1, LIFECYCLE.name)
    # procmond publishes the process events ...
    assert router.route(procmond, event(1)) == 1
    assert agent_sink.take() == [(1, LIFECYCLE.name, 1, 1)]
    # ... but does not read them,
    with pytest.raises(AccessDenied):
        router.subscribe(procmond, 1, LIFECYCLE.name)
    # ... reads the agent's policy updates but may not publish them,
    router.subscribe(procmond, 2, AGENT_POLICY.name)
    with pytest.raises(AccessDenied) as info:
        router.route(procmond, build_publish(AGENT_POLICY, control_pb2.PolicyUpdate()))
    assert "not a publisher" in str(info.value)
    # ... which only a privileged agent may publish.
    unprivileged = Endpoint(RecordingSink(), identity=replace(AGENT, privileged=False))
    with pytest.raises(AccessDenied) as info:
        router.route(unprivileged, build_publish(AGENT_POLICY, control_pb2.PolicyUpdate()))
    assert "not privileged" in str(info.value)
    router.route(agent, build_publish(AGENT_POLICY, control_pb2.PolicyUpdate()))
    assert procmond_sink.take() == [(2, AGENT_POLICY.name, 1, 1)]
    assert router.refused == 3


def test_authenticate_clears_the_remembered_publish_verdicts() -> None:
    router = Router(BrokerConfig())
    agent, sink = endpoint(AGENT)
    router.subscribe(agent, 1, LIFECYCLE.name)
    peer, _ = endpoint(ANONYMOUS)
    with pytest.raises(AccessDenied):
        router.route(peer, event(1))
    assert peer.publish_checks  # the verdict is remembered per topic
    peer.authenticate(PROCMOND)
    assert router.route(peer, event(2)) == 1
    assert sink.take() == [(1, LIFECYCLE.name, 1, 1)]


def test_trusted_identity_bypasses_topic_rules() -> None:
    # In-process code of the agent: no component, yet it may publish and read anything.
    router = Router(BrokerConfig())
    trusted, sink = endpoint(Identity(None, "", trusted=True))
    router.subscribe(trusted, 1, LIFECYCLE.name)
    router.subscribe(trusted, 2, AGENT_POLICY.name)
    router.route(trusted, event(1))
    router.route(trusted, build_publish(AGENT_POLICY, control_pb2.PolicyUpdate()))
    assert sink.take() == [(1, LIFECYCLE.name, 1, 1), (2, AGENT_POLICY.name, 1, 1)]
    assert router.refused == 0


# -- refusals ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    error: type[EventBusError]
    code: int
    #: Does the refused operation, given the router, the publisher (procmond) and
    #: the subscriber (the agent, subscribed to ``#`` with id 1).
    act: Callable[[Router, Endpoint, Endpoint], object]
    config: BrokerConfig = field(default_factory=BrokerConfig)


def _subscribe_twice(router: Router, _pub: Endpoint, agent: Endpoint) -> None:
    router.subscribe(agent, 5, "events.network.#")
    router.subscribe(agent, 5, "events.filesystem.#")


def _subscribe_three(router: Router, _pub: Endpoint, agent: Endpoint) -> None:
    router.subscribe(agent, 2, "events.network.#")  # the second one (``#`` is the first)
    router.subscribe(agent, 3, "events.filesystem.#")


REFUSALS = {
    "malformed-topic": Refusal(
        InvalidTopic, EC.ERROR_CODE_INVALID_TOPIC, lambda r, p, _: r.route(p, event(topic="a..b"))
    ),
    "wildcard-topic": Refusal(
        InvalidTopic,
        EC.ERROR_CODE_INVALID_TOPIC,
        lambda r, p, _: r.route(p, event(topic="events.process.#")),
    ),
    "undeclared-topic": Refusal(
        InvalidTopic,
        EC.ERROR_CODE_INVALID_TOPIC,
        lambda r, p, _: r.route(p, event(topic="events.process.unknown")),
    ),
    "undeclared-topic-batch": Refusal(
        InvalidTopic,
        EC.ERROR_CODE_INVALID_TOPIC,
        lambda r, p, _: r.route(p, batch([1], topic="events.process.unknown")),
    ),
    "invalid-filter": Refusal(
        InvalidTopic, EC.ERROR_CODE_INVALID_FILTER, lambda r, _, a: r.subscribe(a, 2, "events.#.x")
    ),
    "empty-filter": Refusal(
        InvalidTopic, EC.ERROR_CODE_INVALID_FILTER, lambda r, _, a: r.subscribe(a, 2, "")
    ),
    "filter-matching-nothing-declared": Refusal(
        InvalidTopic,
        EC.ERROR_CODE_INVALID_FILTER,
        lambda r, _, a: r.subscribe(a, 2, "nothing.declared.#"),
    ),
    "payload-mismatch": Refusal(
        PayloadTypeMismatch,
        EC.ERROR_CODE_PAYLOAD_MISMATCH,
        lambda r, p, _: r.route(p, event(payload_type=NETWORK.payload_name)),
    ),
    "duplicate-subscription-id": Refusal(
        SubscriptionExists, EC.ERROR_CODE_INVALID_SUBSCRIPTION_ID, _subscribe_twice
    ),
    "zero-subscription-id": Refusal(
        SubscriptionExists,
        EC.ERROR_CODE_INVALID_SUBSCRIPTION_ID,
        lambda r, _, a: r.subscribe(a, 0, "events.network.#"),
    ),
    "unknown-unsubscribe": Refusal(
        UnknownSubscription, EC.ERROR_CODE_UNKNOWN_SUBSCRIPTION, lambda r, _, a: r.unsubscribe(a, 9)
    ),
    "subscription-limit": Refusal(
        LimitExceeded,
        EC.ERROR_CODE_LIMIT_EXCEEDED,
        _subscribe_three,
        BrokerConfig(max_subscriptions=2),
    ),
    "oversized-event": Refusal(
        LimitExceeded,
        EC.ERROR_CODE_FRAME_TOO_LARGE,
        lambda r, p, _: r.route(p, event(size=400)),
        BrokerConfig(max_frame_bytes=256),
    ),
    "oversized-batch": Refusal(
        LimitExceeded,
        EC.ERROR_CODE_FRAME_TOO_LARGE,
        lambda r, p, _: r.route(p, batch([1, 2, 3], size=100)),
        BrokerConfig(max_frame_bytes=256),
    ),
    "empty-batch": Refusal(
        ServerError, EC.ERROR_CODE_MALFORMED_FRAME, lambda r, p, _: r.route(p, batch([]))
    ),
    "batch-over-max-queue-messages": Refusal(
        LimitExceeded,
        EC.ERROR_CODE_LIMIT_EXCEEDED,
        lambda r, p, _: r.route(p, batch([1, 2, 3, 4])),
        BrokerConfig(max_queue_messages=3),
    ),
    "invalid-correlation-metadata": Refusal(
        InvalidCorrelation,
        EC.ERROR_CODE_INVALID_CORRELATION,
        lambda r, p, _: r.route(p, event(correlation=CorrelationMetadata(correlation_id=""))),
    ),
    "invalid-correlation-filter": Refusal(
        InvalidCorrelation,
        EC.ERROR_CODE_INVALID_CORRELATION,
        lambda r, _, a: r.subscribe(
            a, 2, "events.network.#", CorrelationFilter(correlation_ids=[""])
        ),
    ),
    "access-denied-publish": Refusal(
        AccessDenied,
        EC.ERROR_CODE_ACCESS_DENIED,
        lambda r, p, _: r.route(p, build_publish(AGENT_POLICY, control_pb2.PolicyUpdate())),
    ),
}


@pytest.mark.parametrize("case", REFUSALS.values(), ids=REFUSALS.keys())
def test_refusal_is_typed_counted_and_delivers_nothing(case: Refusal) -> None:
    router = Router(case.config)
    procmond, _ = endpoint(PROCMOND)
    agent, sink = endpoint(AGENT)
    router.subscribe(agent, 1, "#", include_control=True)
    subscriptions_before = len(router)

    with pytest.raises(case.error) as info:
        case.act(router, procmond, agent)
    assert info.value.code == case.code, info.value
    assert router.refused == 1
    assert sink.deliveries == []
    assert (router.published, router.delivered, procmond.published) == (0, 0, 0)
    # Refused subscriptions were not added (the cases that add a valid one first add one).
    assert len(router) - subscriptions_before in (0, 1)
    assert len(router) == len(agent.subscriptions)
    # The router carries on: the next publish is delivered, numbered 1 (nothing was used up).
    assert router.route(procmond, event(99)) == 1
    assert sink.take() == [(1, LIFECYCLE.name, 1, 1)]
    assert router.refused == 1


def test_refused_subscription_ids_stay_free() -> None:
    router = Router(BrokerConfig())
    agent, _ = endpoint(AGENT)
    with pytest.raises(InvalidTopic):
        router.subscribe(agent, 1, "nothing.declared")
    router.subscribe(agent, 1, LIFECYCLE.name)  # the id was not taken by the refusal
    router.unsubscribe(agent, 1)
    router.subscribe(agent, 1, LIFECYCLE.name)  # nor is it after an unsubscribe
    with pytest.raises(UnknownSubscription):
        router.unsubscribe(agent, 2)
    assert router.refused == 2


# -- drops, detach, caches ---------------------------------------------------------------------


def test_full_sink_counts_drops_and_leaves_a_gap() -> None:
    router = Router(BrokerConfig())
    procmond, _ = endpoint(PROCMOND)
    ok, ok_sink = endpoint(AGENT)
    full, full_sink = endpoint(AGENT)
    router.subscribe(ok, 1, LIFECYCLE.name)
    router.subscribe(full, 1, LIFECYCLE.name)
    full_sink.full = True

    assert router.route(procmond, event(1)) == 1  # one queue took it
    assert router.route(procmond, batch([2, 3])) == 2
    entry = full.subscriptions[1]
    assert (entry.dropped, entry.delivered, entry.sequence) == (3, 0, 3)
    assert (router.dropped, router.delivered, router.published) == (3, 3, 3)

    full_sink.full = False
    full_sink.take()
    router.route(procmond, event(4))
    # The sequence advanced through the drops: the subscriber sees a gap of 3.
    assert full_sink.take() == [(1, LIFECYCLE.name, 4, 1)]
    assert ok_sink.take()[-1] == (1, LIFECYCLE.name, 4, 1)
    assert (entry.dropped, entry.delivered) == (3, 1)
    assert (router.dropped, router.delivered) == (3, 5)


def events(figures: TopicFigures) -> tuple[int, int, int]:
    return figures.published, figures.delivered, figures.dropped


def test_counts_by_topic_label_and_refusals_by_code() -> None:
    """The figures the metrics read: per topic label (a template's pattern for
    its topics, one label for every undeclared topic) and per error code."""
    router = Router(BrokerConfig(allow_undeclared_topics=True))
    procmond, _ = endpoint(PROCMOND)
    agent, _ = endpoint(AGENT)
    full, full_sink = endpoint(AGENT)
    anon, _ = endpoint(ANONYMOUS)
    router.subscribe(agent, 1, "#")
    router.subscribe(full, 1, LIFECYCLE.name)
    full_sink.full = True
    router.subscribe(procmond, 1, "control.collector.task.#")  # collectors read their tasks

    one = event(1)
    router.route(procmond, one)
    router.route(procmond, batch([2, 3]))
    for collector in ("c1", "c2"):  # two topics of one template: one label
        task = registry.control_collector_task_targeted(type="scan", id=collector)
        router.route(agent, build_publish(task, control_pb2.TaskAssignment()))
    router.route(anon, event(4, topic="custom.a", payload_type="any.Thing"))
    router.route(anon, event(5, topic="custom.b", payload_type="any.Thing"))
    with pytest.raises(AccessDenied):
        router.route(anon, event(6))
    with pytest.raises(InvalidTopic):
        router.route(anon, event(7, topic="bad..topic"))
    with pytest.raises(UnknownSubscription):
        router.unsubscribe(agent, 99)

    counts = router.topic_counts()
    assert set(counts) == {
        LIFECYCLE.name,
        "control.collector.task.{type}.{id}",
        UNDECLARED_LABEL,
    }
    lifecycle = counts[LIFECYCLE.name]
    # Three events, each taken by the agent's queue and dropped by the full one.
    assert events(lifecycle) == (3, 3, 3)
    assert lifecycle.published_bytes == one.ByteSize() + batch([2, 3]).ByteSize()
    assert events(counts["control.collector.task.{type}.{id}"]) == (2, 2, 0)
    assert events(counts[UNDECLARED_LABEL]) == (2, 2, 0)
    # The totals are the sums over the labels.
    assert (router.published, router.delivered, router.dropped) == (7, 7, 3)
    assert router.refusals() == {
        EC.ERROR_CODE_ACCESS_DENIED: 1,
        EC.ERROR_CODE_INVALID_TOPIC: 1,
        EC.ERROR_CODE_UNKNOWN_SUBSCRIPTION: 1,
    }
    assert router.refused == 3
    # A snapshot: routing on does not change it.
    router.route(procmond, event(8))
    assert counts[LIFECYCLE.name] == lifecycle
    assert router.topic_counts()[LIFECYCLE.name].published == 4


def test_detach_removes_every_subscription_of_an_endpoint() -> None:
    router = Router(BrokerConfig())
    procmond, _ = endpoint(PROCMOND)
    gone, gone_sink = endpoint(AGENT)
    stays, stays_sink = endpoint(AGENT)
    router.subscribe(gone, 1, LIFECYCLE.name)
    router.subscribe(gone, 2, "events.#")
    router.subscribe(gone, 3, "#", include_control=True)
    router.subscribe(stays, 1, LIFECYCLE.name)
    assert len(router) == 4
    router.route(procmond, event(1))  # fills the route cache with gone's subscriptions

    router.detach(gone)
    assert len(router) == 1
    assert gone.subscriptions == {}
    assert [(s.endpoint, s.subscription_id) for s in router.subscriptions()] == [(stays, 1)]
    gone_sink.take()
    stays_sink.take()
    router.route(procmond, event(2))
    assert gone_sink.take() == []
    assert stays_sink.take() == [(1, LIFECYCLE.name, 2, 1)]
    router.detach(gone)  # again: nothing to do
    router.detach(stays)
    assert len(router) == 0
    assert router.refused == 0


def test_route_cache_follows_subscribe_and_unsubscribe() -> None:
    router = Router(BrokerConfig())
    procmond, _ = endpoint(PROCMOND)
    first, first_sink = endpoint(AGENT)
    second, second_sink = endpoint(AGENT)
    router.subscribe(first, 1, LIFECYCLE.name)
    router.route(procmond, event(1))  # the routing of this topic is now cached
    router.route(procmond, event(2))
    router.subscribe(second, 1, "events.process.+")
    router.route(procmond, event(3))
    assert second_sink.take() == [(1, LIFECYCLE.name, 1, 1)]
    router.unsubscribe(first, 1)
    router.route(procmond, event(4))
    assert first_sink.take() == [(1, LIFECYCLE.name, n, 1) for n in (1, 2, 3)]
    assert second_sink.take() == [(1, LIFECYCLE.name, 2, 1)]


def test_allow_undeclared_topics_accepts_them_as_public() -> None:
    strict = Router(BrokerConfig())
    anon, _ = endpoint(ANONYMOUS)
    with pytest.raises(InvalidTopic):
        strict.subscribe(anon, 1, "custom.#")
    with pytest.raises(InvalidTopic):
        strict.route(anon, event(topic="custom.thing"))

    router = Router(BrokerConfig(allow_undeclared_topics=True))
    reader, sink = endpoint(ANONYMOUS)
    router.subscribe(reader, 1, "custom.#")
    info = router.topic_info("custom.thing")
    assert (info.payload_type, info.control) == (None, False)
    assert info.access.access == AccessLevel.ACCESS_LEVEL_PUBLIC
    # Any peer may publish it, with any payload type.
    writer, _ = endpoint(ANONYMOUS)
    assert router.route(writer, event(topic="custom.thing", payload_type="any.Thing")) == 1
    assert sink.take() == [(1, "custom.thing", 1, 1)]
    # Declared topics keep their rules.
    with pytest.raises(AccessDenied):
        router.route(writer, event(1))
    with pytest.raises(PayloadTypeMismatch):
        router.route(writer, event(topic=ANOMALY.name, payload_type="any.Thing"))
    # A malformed topic is still refused.
    with pytest.raises(InvalidTopic):
        router.route(writer, event(topic="custom..thing"))


def test_undeclared_topics_skip_the_subscribe_check_not_the_delivery_check() -> None:
    # With undeclared topics allowed the subscribe-time check is skipped
    # (docs/security.md); the delivery-time check still holds.
    router = Router(BrokerConfig(allow_undeclared_topics=True))
    anon, sink = endpoint(ANONYMOUS)
    procmond, _ = endpoint(PROCMOND)
    router.subscribe(anon, 1, LIFECYCLE.name)
    assert router.route(procmond, event(1)) == 0
    assert sink.deliveries == []


def test_router_module_needs_no_event_loop() -> None:
    code = (
        "import sys\n"
        "import daemoneye_eventbus.router\n"
        "assert 'asyncio' not in sys.modules, sorted(m for m in sys.modules if 'asyncio' in m)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=worker_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
