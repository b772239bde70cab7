"""Request/reply in the broker, pure: the request table and the request router.

No event loop, no socket: endpoints get recording sinks, requests and replies
go through :attr:`Router.requests`, and the deadlines run on a fake clock.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemoneye.eventbus.v1 import control_pb2, events_pb2, frames_pb2, registry
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode
from daemoneye_eventbus.access import Identity, PeerCredentials
from daemoneye_eventbus.config import BrokerConfig
from daemoneye_eventbus.correlation import correlation_filter, new_correlation
from daemoneye_eventbus.errors import (
    AccessDenied,
    EventBusError,
    InvalidPayload,
    InvalidTopic,
    LimitExceeded,
    NoResponders,
    PayloadTypeMismatch,
    RequestTimeout,
    ServerError,
    UnknownRequest,
)
from daemoneye_eventbus.frames import REQUEST_DELIVER_OVERHEAD, request_budget
from daemoneye_eventbus.protocol import build_publish
from daemoneye_eventbus.router import Endpoint, Published, Router, SubscriptionEntry
from daemoneye_eventbus.rpc import REQUEST_COST, PendingRequest, RequestTable
from daemoneye_eventbus.stamps import Stamp

EC = ErrorCode
HEALTH = registry.CONTROL_COLLECTOR_RPC_HEALTH
QUEUE = registry.CONTROL_COLLECTOR_QUEUE
ROOT = PeerCredentials(os.getpid(), 0, 0)
AGENT = Identity(ROOT, "daemoneye-agent", privileged=True)
PROCMOND = Identity(ROOT, "procmond")
NETMOND = Identity(ROOT, "netmond")
ANONYMOUS = Identity(PeerCredentials(1, 1000, 1000))


class Peer:
    """A recording sink of events, and of requests and replies (``RequestSink``)."""

    def __init__(self, identity: Identity) -> None:
        self.endpoint = Endpoint(self, identity=identity, peer=identity.peer, rpc=self)
        self.events: list[str] = []
        self.requests: list[frames_pb2.RequestDeliver] = []
        self.replies: list[frames_pb2.ReplyDeliver] = []
        self.failures: list[tuple[int, EventBusError]] = []
        #: Take no more requests (a full queue).
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
        self.events.append(message.topic)
        return 1

    def resume(self) -> None:
        pass

    def deliver_request(self, sub: SubscriptionEntry, deliver: frames_pb2.RequestDeliver) -> bool:
        if self.full:
            return False
        copy = frames_pb2.RequestDeliver()
        copy.CopyFrom(deliver)
        self.requests.append(copy)
        return True

    def deliver_reply(self, reply: frames_pb2.ReplyDeliver) -> None:
        self.replies.append(reply)

    def request_failed(self, request_id: int, error: EventBusError) -> None:
        self.failures.append((request_id, error))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_router(clock: Clock, **changes: object) -> Router:
    router = Router(replace(BrokerConfig(), **changes))  # type: ignore[arg-type]
    router.requests.now = clock
    return router


@pytest.fixture
def router(clock: Clock) -> Router:
    return make_router(clock)


def health(
    id: str = "procmond-1", message: control_pb2.HealthCheckRequest | None = None
) -> frames_pb2.Publish:
    topic = registry.control_collector_rpc_health(id=id)
    return build_publish(topic, message or control_pb2.HealthCheckRequest(component_id=id))


def request(
    request_id: int, publish: frames_pb2.Publish | None = None, timeout_ms: int = 0
) -> frames_pb2.Request:
    return frames_pb2.Request(
        request_id=request_id, publish=publish or health(), timeout_ms=timeout_ms
    )


def good_reply(token: int) -> frames_pb2.Reply:
    return frames_pb2.Reply(
        token=token,
        payload_type=HEALTH.reply_name,
        payload=control_pb2.HealthCheckReply(
            status=control_pb2.RPC_STATUS_SUCCESS
        ).SerializeToString(),
    )


def serve(router: Router, peer: Peer, filter: str = HEALTH.filter, sid: int = 1) -> None:
    router.subscribe(peer.endpoint, sid, filter, respond=True)


# == the table ====================================================================


def entry(
    table: RequestTable, requester: Endpoint, request_id: int, deadline: float
) -> PendingRequest:
    e = PendingRequest(
        table.new_token(),
        requester,
        request_id,
        requester,
        deadline,
        1000,
        control_pb2.HealthCheckReply,
    )
    table.add(e)
    return e


def test_tokens_are_unique_and_count_from_one() -> None:
    table = RequestTable(10, 10)
    assert [table.new_token() for _ in range(3)] == [1, 2, 3]


def test_the_table_is_bounded_per_requester_and_in_total() -> None:
    table = RequestTable(2, 3)
    a, b = Peer(AGENT).endpoint, Peer(AGENT).endpoint
    entry(table, a, 1, 10.0)
    assert table.room(a) is None
    entry(table, a, 2, 10.0)
    assert "already has 2 requests" in (table.room(a) or "")
    assert table.room(b) is None
    entry(table, b, 1, 10.0)
    assert "the broker already holds 3" in (table.room(b) or "")
    assert (table.pending(a), table.pending(b), len(table)) == (2, 1, 3)
    assert table.bytes == 3 * REQUEST_COST
    assert table.waiting(a, 2)
    assert not table.waiting(b, 2)


def test_expiry_is_in_deadline_order_and_only_what_is_due() -> None:
    table = RequestTable(10, 10)
    a = Peer(AGENT).endpoint
    late, early, middle = (
        entry(table, a, 1, 30.0),
        entry(table, a, 2, 10.0),
        entry(table, a, 3, 20.0),
    )
    assert table.next_deadline() == 10.0
    assert table.expire(9.9) == []
    assert table.expire(20.0) == [early, middle]
    assert table.next_deadline() == 30.0
    assert table.expire(100.0) == [late]
    assert table.next_deadline() is None
    assert len(table) == 0
    assert table.pending(a) == 0


def test_an_answered_request_never_expires() -> None:
    table = RequestTable(10, 10)
    a = Peer(AGENT).endpoint
    first, second = entry(table, a, 1, 10.0), entry(table, a, 2, 20.0)
    assert table.pop(first.token) is first
    assert table.pop(first.token) is None
    assert table.next_deadline() == 20.0
    assert table.expire(50.0) == [second]


def test_dropping_a_requester_forgets_its_requests_only() -> None:
    table = RequestTable(1000, 1000)
    a, b = Peer(AGENT).endpoint, Peer(AGENT).endpoint
    for i in range(1, 201):
        entry(table, a, i, float(i))
    kept = entry(table, b, 1, 500.0)
    assert table.drop(a) == 200
    assert table.drop(a) == 0
    assert (len(table), table.pending(a)) == (1, 0)
    assert table.next_deadline() == 500.0
    assert table.expire(1000.0) == [kept]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 50), st.booleans()),  # deadline, answered before expiry
        max_size=60,
    ),
    st.integers(0, 50),
)
def test_expire_returns_exactly_the_due_unanswered_requests_in_order(
    plan: list[tuple[int, bool]], now: int
) -> None:
    table = RequestTable(1000, 1000)
    a = Peer(AGENT).endpoint
    entries = [(entry(table, a, i + 1, float(d)), answered) for i, (d, answered) in enumerate(plan)]
    for e, answered in entries:
        if answered:
            table.pop(e.token)
    due = [e for e, answered in entries if not answered and e.deadline <= now]
    expired = table.expire(float(now))
    assert sorted(expired, key=lambda e: (e.deadline, e.token)) == expired
    assert {e.token for e in expired} == {e.token for e in due}
    assert len(table) == sum(1 for e, answered in entries if not answered) - len(due)


# == routing requests ==============================================================


def test_a_request_goes_to_a_responder_with_its_deadline_and_stamp(
    router: Router, clock: Clock
) -> None:
    agent, procmond = Peer(AGENT), Peer(PROCMOND)
    serve(router, procmond)
    pending = router.requests.request(agent.endpoint, request(7))
    (deliver,) = procmond.requests
    assert deliver.subscription_id == 1
    assert deliver.token == pending.token
    assert deliver.publish == health()
    assert deliver.remaining_ms == 5000  # the default timeout
    assert deliver.event_id == 1
    assert deliver.received_at_ns > 0
    assert deliver.requester == "daemoneye-agent"
    assert pending.deadline == clock.now + 5.0
    assert router.requests.pending(agent.endpoint) == 1
    assert (router.requests.requests, router.requests.no_responders) == (1, 0)
    assert procmond.events == []  # a request is not an event


def test_the_deadline_is_the_requested_one_within_the_maximum(clock: Clock) -> None:
    router = make_router(clock, max_request_timeout=2.0, default_request_timeout=9.0)
    agent, procmond = Peer(AGENT), Peer(PROCMOND)
    serve(router, procmond)
    assert router.requests.request(agent.endpoint, request(1, timeout_ms=1500)).deadline == 1001.5
    assert router.requests.request(agent.endpoint, request(2, timeout_ms=60_000)).deadline == 1002.0
    assert router.requests.request(agent.endpoint, request(3)).deadline == 1002.0
    assert [d.remaining_ms for d in procmond.requests] == [1500, 2000, 2000]


def test_no_responder_is_an_immediate_refusal_counted_apart(router: Router) -> None:
    agent = Peer(AGENT)
    with pytest.raises(NoResponders) as caught:
        router.requests.request(agent.endpoint, request(1))
    assert caught.value.code == EC.ERROR_CODE_NO_RESPONDERS
    assert router.requests.no_responders == 1
    assert router.refusals() == {}  # not a refusal of a bad request
    assert router.requests.pending(agent.endpoint) == 0


def test_responders_take_turns_and_a_full_one_is_passed_over(router: Router) -> None:
    agent = Peer(AGENT)
    responders = [Peer(PROCMOND), Peer(NETMOND), Peer(PROCMOND)]
    for peer in responders:
        serve(router, peer)
    for i in range(1, 7):
        router.requests.request(agent.endpoint, request(i))
    assert [len(p.requests) for p in responders] == [2, 2, 2]
    responders[0].full = responders[1].full = True
    router.requests.request(agent.endpoint, request(7))
    assert [len(p.requests) for p in responders] == [2, 2, 3]
    responders[2].full = True
    with pytest.raises(NoResponders, match="can take a request now"):
        router.requests.request(agent.endpoint, request(8))


def test_responders_of_one_topic_are_a_queue_group_across_filters(router: Router) -> None:
    agent, one, every = Peer(AGENT), Peer(PROCMOND), Peer(PROCMOND)
    serve(router, one, "control.collector.rpc.health.procmond-1")
    serve(router, every, "control.collector.rpc.#")
    for i in range(1, 5):
        router.requests.request(agent.endpoint, request(i))
    router.requests.request(agent.endpoint, request(5, health("netmond-2")))
    assert len(one.requests) == 2
    assert len(every.requests) == 3


def test_a_responder_correlation_filter_picks_its_requests(router: Router) -> None:
    agent, scans, rest = Peer(AGENT), Peer(PROCMOND), Peer(PROCMOND)
    flt = correlation_filter(correlation_ids=["scan-1"])
    router.subscribe(scans.endpoint, 1, HEALTH.filter, flt, respond=True)
    serve(router, rest, sid=2)
    tagged = health()
    tagged.correlation.CopyFrom(new_correlation("scan-1"))
    for i in range(1, 5):
        router.requests.request(agent.endpoint, request(i, tagged if i % 2 else None))
    # Untagged requests pass the filtered responder by; tagged ones go to either.
    assert all(d.publish.HasField("correlation") for d in scans.requests)
    assert sum(not d.publish.HasField("correlation") for d in rest.requests) == 2
    assert len(scans.requests) + len(rest.requests) == 4


@pytest.mark.parametrize(
    ("publish", "error", "code", "text"),
    [
        (
            build_publish(registry.EVENTS_PROCESS_ANOMALY, events_pb2.ProcessEvent()),
            InvalidTopic,
            EC.ERROR_CODE_INVALID_TOPIC,
            "is not a request topic",
        ),
        (
            frames_pb2.Publish(topic="no.such.topic", payload_type="x"),
            InvalidTopic,
            EC.ERROR_CODE_INVALID_TOPIC,
            "not declared",
        ),
        (
            frames_pb2.Publish(
                topic="control.collector.rpc.health.p-1", payload_type=QUEUE.payload_name
            ),
            PayloadTypeMismatch,
            EC.ERROR_CODE_PAYLOAD_MISMATCH,
            "carries daemoneye.eventbus.v1.HealthCheckRequest",
        ),
        (
            frames_pb2.Publish(
                topic="control.collector.rpc.health.p-1",
                payload_type=HEALTH.payload_name,
                payload=b"\x0a\x05ab",
            ),
            InvalidPayload,
            EC.ERROR_CODE_INVALID_PAYLOAD,
            "does not parse",
        ),
    ],
)
def test_a_request_is_checked_like_a_publish(
    router: Router, publish: frames_pb2.Publish, error: type[Exception], code: int, text: str
) -> None:
    agent, procmond = Peer(AGENT), Peer(PROCMOND)
    serve(router, procmond)
    with pytest.raises(error, match=text) as caught:
        router.requests.request(agent.endpoint, request(1, publish))
    assert getattr(caught.value, "code", None) == code
    assert procmond.requests == []
    assert router.refusals() == {code: 1}


def test_who_may_request(router: Router) -> None:
    procmond, anonymous = Peer(PROCMOND), Peer(ANONYMOUS)
    serve(router, Peer(NETMOND))
    for peer, reason in (
        (procmond, "'procmond' is not a publisher"),
        (anonymous, "anonymous peers may publish only on public topics"),
        (Peer(Identity(ROOT, "daemoneye-agent")), "is not privileged"),
    ):
        with pytest.raises(AccessDenied, match=reason):
            router.requests.request(peer.endpoint, request(1))


def test_a_request_larger_than_its_delivery_can_be_is_refused(clock: Clock) -> None:
    router = make_router(clock, max_frame_bytes=4096)
    agent, procmond = Peer(AGENT), Peer(PROCMOND)
    serve(router, procmond)
    limit = request_budget(4096)
    assert limit == 4096 - REQUEST_DELIVER_OVERHEAD
    big = health(message=control_pb2.HealthCheckRequest(component_id="x" * limit))
    with pytest.raises(LimitExceeded) as caught:
        router.requests.request(agent.endpoint, request(1, big))
    assert caught.value.code == EC.ERROR_CODE_FRAME_TOO_LARGE


def test_request_ids_and_pending_limits(clock: Clock) -> None:
    router = make_router(clock, max_pending_requests=2, max_total_pending_requests=3)
    agent, other, procmond = Peer(AGENT), Peer(AGENT), Peer(PROCMOND)
    serve(router, procmond)
    for bad in (0, 1):
        if bad:
            router.requests.request(agent.endpoint, request(1))
        with pytest.raises(ServerError) as caught:
            router.requests.request(agent.endpoint, request(bad))
        assert caught.value.code == EC.ERROR_CODE_MALFORMED_FRAME
    router.requests.request(agent.endpoint, request(2))
    with pytest.raises(LimitExceeded, match="already has 2 requests") as caught_limit:
        router.requests.request(agent.endpoint, request(3))
    assert caught_limit.value.code == EC.ERROR_CODE_LIMIT_EXCEEDED
    router.requests.request(other.endpoint, request(1))
    with pytest.raises(LimitExceeded, match="the broker already holds 3"):
        router.requests.request(Peer(AGENT).endpoint, request(1))
    assert len(procmond.requests) == 3


def test_plain_publishes_and_plain_subscriptions_never_meet_requests(router: Router) -> None:
    agent, listener, procmond = Peer(AGENT), Peer(PROCMOND), Peer(PROCMOND)
    router.subscribe(listener.endpoint, 1, "control.#")  # a plain subscription
    serve(router, procmond)
    with pytest.raises(InvalidTopic, match="is a request topic: send a Request"):
        router.route(agent.endpoint, health())
    router.requests.request(agent.endpoint, request(1))
    router.route(
        agent.endpoint, build_publish(registry.CONTROL_COLLECTOR_TASK, control_pb2.TaskAssignment())
    )
    assert listener.requests == []
    assert listener.events == ["control.collector.task"]
    assert procmond.events == []


# == responder subscriptions ======================================================


@pytest.mark.parametrize(
    ("identity", "filter", "lossless", "error", "code"),
    [
        (ANONYMOUS, HEALTH.filter, False, AccessDenied, EC.ERROR_CODE_ACCESS_DENIED),
        (AGENT, HEALTH.filter, False, AccessDenied, EC.ERROR_CODE_ACCESS_DENIED),
        (PROCMOND, "events.#", False, InvalidTopic, EC.ERROR_CODE_INVALID_FILTER),
        (PROCMOND, "control.collector.task", False, InvalidTopic, EC.ERROR_CODE_INVALID_FILTER),
        (PROCMOND, HEALTH.filter, True, InvalidTopic, EC.ERROR_CODE_INVALID_FILTER),
    ],
    ids=["anonymous", "not-a-subscriber", "no-request-topic", "plain-topic", "lossless"],
)
def test_a_responder_subscription_must_reach_a_request_topic_it_may_read(
    router: Router,
    identity: Identity,
    filter: str,
    lossless: bool,
    error: type[EventBusError],
    code: int,
) -> None:
    peer = Peer(identity)
    with pytest.raises(error) as caught:
        router.subscribe(peer.endpoint, 1, filter, lossless=lossless, respond=True)
    assert caught.value.code == code
    assert len(router) == 0


def test_undeclared_topics_never_make_a_responder(clock: Clock) -> None:
    router = make_router(clock, allow_undeclared_topics=True)
    with pytest.raises(InvalidTopic, match="no request topic"):
        router.subscribe(Peer(PROCMOND).endpoint, 1, "anything.goes", respond=True)
    router.subscribe(Peer(PROCMOND).endpoint, 1, "anything.goes")  # a plain one may


def test_responders_count_as_subscriptions_and_go_with_their_session(router: Router) -> None:
    agent, procmond = Peer(AGENT), Peer(PROCMOND)
    serve(router, procmond)
    assert len(router) == 1
    assert [s.respond for s in router.subscriptions()] == [True]
    assert procmond.endpoint.subscription_bytes > 0
    router.unsubscribe(procmond.endpoint, 1)
    with pytest.raises(NoResponders):
        router.requests.request(agent.endpoint, request(1))
    serve(router, procmond, sid=2)
    router.detach(procmond.endpoint)
    assert len(router) == 0
    assert router.subscription_bytes == 0
    with pytest.raises(NoResponders):
        router.requests.request(agent.endpoint, request(2))


# == replies ======================================================================


def test_a_reply_goes_to_its_requester_alone(router: Router) -> None:
    agent, bystander, procmond = Peer(AGENT), Peer(AGENT), Peer(PROCMOND)
    serve(router, procmond)
    router.requests.request(agent.endpoint, request(9))
    router.requests.request(bystander.endpoint, request(9))
    token = procmond.requests[0].token
    router.requests.reply(procmond.endpoint, good_reply(token))
    (answer,) = agent.replies
    assert answer.request_id == 9
    assert answer.responder == "procmond"
    assert answer.payload_type == HEALTH.reply_name
    assert control_pb2.HealthCheckReply.FromString(answer.payload).status == 1
    assert bystander.replies == []
    assert router.requests.pending(agent.endpoint) == 0
    with pytest.raises(UnknownRequest):  # answered already
        router.requests.reply(procmond.endpoint, good_reply(token))


def test_a_reply_from_another_connection_is_unknown_and_audited(
    router: Router, caplog: pytest.LogCaptureFixture
) -> None:
    agent, procmond, thief = Peer(AGENT), Peer(PROCMOND), Peer(PROCMOND)
    serve(router, procmond)
    router.requests.request(agent.endpoint, request(1))
    token = procmond.requests[0].token
    with (
        caplog.at_level("WARNING", logger="daemoneye_eventbus.audit"),
        pytest.raises(UnknownRequest) as caught,
    ):
        router.requests.reply(thief.endpoint, good_reply(token))
    assert caught.value.code == EC.ERROR_CODE_UNKNOWN_REQUEST
    assert router.refusals() == {EC.ERROR_CODE_UNKNOWN_REQUEST: 1}
    assert any("reply_refused" in r.getMessage() for r in caplog.records)
    assert agent.replies == []
    router.requests.reply(procmond.endpoint, good_reply(token))  # the real one still works
    assert len(agent.replies) == 1


def test_a_wrong_reply_is_refused_and_the_request_keeps_waiting(router: Router) -> None:
    agent, procmond = Peer(AGENT), Peer(PROCMOND)
    serve(router, procmond)
    router.requests.request(agent.endpoint, request(1))
    token = procmond.requests[0].token
    wrong_type = frames_pb2.Reply(token=token, payload_type=QUEUE.reply_name)
    with pytest.raises(
        PayloadTypeMismatch, match=r"is answered with daemoneye\.eventbus\.v1\.HealthCheckReply"
    ):
        router.requests.reply(procmond.endpoint, wrong_type)
    garbage = frames_pb2.Reply(token=token, payload_type=HEALTH.reply_name, payload=b"\x0a\x09ab")
    with pytest.raises(InvalidPayload):
        router.requests.reply(procmond.endpoint, garbage)
    assert agent.replies == []
    assert router.requests.pending(agent.endpoint) == 1
    router.requests.reply(procmond.endpoint, frames_pb2.Reply(token=token, error="busy"))
    (answer,) = agent.replies
    assert (answer.error, answer.payload, answer.payload_type) == ("busy", b"", "")


def test_a_reply_too_large_to_deliver_is_refused(clock: Clock) -> None:
    router = make_router(clock, max_frame_bytes=4096)
    agent, procmond = Peer(AGENT), Peer(PROCMOND)
    serve(router, procmond)
    router.requests.request(agent.endpoint, request(1))
    token = procmond.requests[0].token
    with pytest.raises(LimitExceeded) as caught:
        router.requests.reply(procmond.endpoint, frames_pb2.Reply(token=token, error="x" * 4090))
    assert caught.value.code == EC.ERROR_CODE_FRAME_TOO_LARGE
    assert router.requests.pending(agent.endpoint) == 1


# == deadlines ======================================================================


def test_a_request_without_a_reply_times_out_at_its_deadline(router: Router, clock: Clock) -> None:
    agent, procmond = Peer(AGENT), Peer(PROCMOND)
    deadlines: list[float | None] = []
    router.requests.on_deadline = deadlines.append
    serve(router, procmond)
    router.requests.request(agent.endpoint, request(1, timeout_ms=2000))
    router.requests.request(agent.endpoint, request(2, timeout_ms=1000))
    assert deadlines == [1002.0, 1001.0]
    clock.now = 1000.999
    assert router.requests.expire() == 0
    clock.now = 1001.0
    assert router.requests.expire() == 1
    ((request_id, error),) = agent.failures
    assert request_id == 2
    assert isinstance(error, RequestTimeout)
    assert error.code == EC.ERROR_CODE_REQUEST_TIMEOUT
    assert router.requests.timeouts == 1
    # A reply after the deadline is late: unknown.
    with pytest.raises(UnknownRequest):
        router.requests.reply(procmond.endpoint, good_reply(procmond.requests[1].token))


def test_a_requester_that_goes_forgets_its_requests(router: Router, clock: Clock) -> None:
    agent, procmond = Peer(AGENT), Peer(PROCMOND)
    deadlines: list[float | None] = []
    serve(router, procmond)
    router.requests.request(agent.endpoint, request(1))
    router.requests.on_deadline = deadlines.append
    router.detach(agent.endpoint)
    assert deadlines == [None]
    assert len(router.requests.table) == 0
    with pytest.raises(UnknownRequest):
        router.requests.reply(procmond.endpoint, good_reply(procmond.requests[0].token))


def test_a_responder_that_goes_leaves_its_requests_to_their_deadline(
    router: Router, clock: Clock
) -> None:
    agent, procmond = Peer(AGENT), Peer(PROCMOND)
    serve(router, procmond)
    router.requests.request(agent.endpoint, request(1, timeout_ms=3000))
    router.detach(procmond.endpoint)
    assert router.requests.pending(agent.endpoint) == 1
    clock.now += 3.0
    assert router.requests.expire() == 1
    assert [rid for rid, _ in agent.failures] == [1]
