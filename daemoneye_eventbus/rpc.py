"""Request/reply in the broker: who answers a request, and what waits for a reply (pure).

A request is one event on a request topic (a topic the schema declares with a
reply type) for one responder, whose reply goes back to the requester alone
[protocol §5, "Request/reply"]. :class:`RequestRouter` checks a ``Request`` as
a publish of its topic (through the router), picks one responder among the
responder subscriptions that match the topic and may read it, in turn per
topic (a queue group), and keeps a :class:`PendingRequest` in its
:class:`RequestTable` until the reply comes or the deadline passes. A
``Reply`` is accepted only from the connection the request was delivered to,
checked against the topic's reply type, and handed to the requester's
:class:`~daemoneye_eventbus.subscriptions.RequestSink` alone.

The table is bounded per requesting connection and in total, and orders the
deadlines in a heap; the asyncio layer (:mod:`daemoneye_eventbus.sessions.deadlines`)
arms one timer for the earliest and calls :meth:`RequestRouter.expire`.
Deadlines are ``time.monotonic()`` seconds.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from typing import Final, NoReturn, Protocol

from google.protobuf.message import DecodeError, Message

from daemoneye.eventbus.v1 import frames_pb2
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode, Frame
from daemoneye_eventbus.access import MAX_COMPONENT_CHARS, AuditLog, TopicAccess
from daemoneye_eventbus.config import BrokerConfig
from daemoneye_eventbus.errors import (
    EventBusError,
    InvalidPayload,
    LimitExceeded,
    NoResponders,
    PayloadTypeMismatch,
    RequestTimeout,
    ServerError,
    UnknownRequest,
)
from daemoneye_eventbus.stamps import EventClock
from daemoneye_eventbus.subscriptions import Endpoint, SubscriptionEntry, SubscriptionTable

__all__ = [
    "REQUEST_COST",
    "PendingRequest",
    "RequestFacts",
    "RequestHost",
    "RequestRouter",
    "RequestTable",
]

#: Bytes of broker memory one pending request is charged: its entry, its
#: place in the table's two maps and its deadline in the heap (432 measured
#: with CPython 3.11). The request itself is in the responder's output,
#: counted there; the entry keeps no copy of it, not even its topic.
REQUEST_COST: Final = 448
# Request topics whose responder turn is remembered; cleared past this.
_TURNS_SIZE: Final = 4096
# The most a Frame adds around its ReplyDeliver: the tag and a length of up to 5 bytes.
_FRAME_ENVELOPE: Final = 6


class RequestFacts(Protocol):
    """What the request router needs to know of a request's topic (a ``TopicInfo``)."""

    @property
    def access(self) -> TopicAccess: ...

    @property
    def reply(self) -> type[Message] | None:
        """The reply type of a request topic, None for any other topic."""
        ...


class RefusalCounts(Protocol):
    def refuse(self, code: int) -> None: ...


class RequestHost(Protocol):
    """What the request router needs of the :class:`~daemoneye_eventbus.router.Router`."""

    @property
    def config(self) -> BrokerConfig: ...

    @property
    def audit(self) -> AuditLog: ...

    @property
    def clock(self) -> EventClock: ...

    @property
    def table(self) -> SubscriptionTable: ...

    @property
    def counts(self) -> RefusalCounts: ...

    def check_request(self, endpoint: Endpoint, publish: frames_pb2.Publish) -> RequestFacts:
        """Check a request's ``Publish`` as a publish on a request topic; raise the refusal."""
        ...


class PendingRequest:
    """One request waiting for its reply."""

    __slots__ = (
        "deadline",
        "parser",
        "reply_name",
        "request_id",
        "requester",
        "responder",
        "timeout_ms",
        "token",
    )

    def __init__(
        self,
        token: int,
        requester: Endpoint,
        request_id: int,
        responder: Endpoint,
        deadline: float,
        timeout_ms: int,
        reply: type[Message],
    ) -> None:
        self.token = token
        self.requester = requester
        self.request_id = request_id
        self.responder = responder
        #: ``time.monotonic()`` seconds.
        self.deadline = deadline
        self.timeout_ms = timeout_ms
        #: The reply type: its name, and its class to check that replies parse.
        self.reply_name: str = reply.DESCRIPTOR.full_name
        self.parser = reply

    def __repr__(self) -> str:
        return f"PendingRequest(token={self.token}, request_id={self.request_id})"


class RequestTable:
    """The requests waiting for a reply: by token, by requester and by deadline.

    At most ``per_connection`` for one requesting connection and ``total`` in
    all; tokens count from 1 for the broker's life, so none is ever reused.
    """

    def __init__(self, per_connection: int, total: int) -> None:
        self.per_connection = per_connection
        self.total = total
        self._entries: dict[int, PendingRequest] = {}
        self._by_requester: dict[Endpoint, dict[int, PendingRequest]] = {}
        #: (deadline, token); entries answered or dropped stay until they surface.
        self._heap: list[tuple[float, int]] = []
        self._next_token = 1

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """Broker memory the pending requests are charged."""
        return len(self._entries) * REQUEST_COST

    def pending(self, requester: Endpoint) -> int:
        """Requests of ``requester`` waiting for a reply."""
        mine = self._by_requester.get(requester)
        return len(mine) if mine else 0

    def waiting(self, requester: Endpoint, request_id: int) -> bool:
        """Whether ``requester``'s request ``request_id`` waits for a reply."""
        mine = self._by_requester.get(requester)
        return mine is not None and request_id in mine

    def room(self, requester: Endpoint) -> str | None:
        """None if ``requester`` may add a request, else why not."""
        if self.pending(requester) >= self.per_connection:
            return f"this connection already has {self.per_connection} requests waiting for replies"
        if len(self._entries) >= self.total:
            return f"the broker already holds {self.total} requests waiting for replies"
        return None

    def new_token(self) -> int:
        token = self._next_token
        self._next_token = token + 1
        return token

    def add(self, entry: PendingRequest) -> None:
        """Keep ``entry`` (its token from :meth:`new_token`; :meth:`room` said yes)."""
        self._entries[entry.token] = entry
        self._by_requester.setdefault(entry.requester, {})[entry.request_id] = entry
        heapq.heappush(self._heap, (entry.deadline, entry.token))

    def get(self, token: int) -> PendingRequest | None:
        return self._entries.get(token)

    def pop(self, token: int) -> PendingRequest | None:
        """Forget the request ``token`` (answered); None if it is not waiting."""
        entry = self._entries.pop(token, None)
        if entry is not None:
            self._forget(entry)
        return entry

    def _forget(self, entry: PendingRequest) -> None:
        mine = self._by_requester.get(entry.requester)
        if mine is not None:
            mine.pop(entry.request_id, None)
            if not mine:
                del self._by_requester[entry.requester]

    def next_deadline(self) -> float | None:
        """The earliest deadline of a waiting request, None if none waits."""
        heap = self._heap
        while heap and heap[0][1] not in self._entries:
            heapq.heappop(heap)  # answered or dropped
        return heap[0][0] if heap else None

    def expire(self, now: float) -> list[PendingRequest]:
        """Remove and return the requests whose deadline is ``now`` or earlier,
        earliest first."""
        out: list[PendingRequest] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, token = heapq.heappop(heap)
            entry = self._entries.pop(token, None)
            if entry is not None:
                self._forget(entry)
                out.append(entry)
        return out

    def drop(self, requester: Endpoint) -> int:
        """Forget every request of ``requester`` (its connection ended)."""
        mine = self._by_requester.pop(requester, None)
        if not mine:
            return 0
        for entry in mine.values():
            self._entries.pop(entry.token, None)
        if len(self._heap) > 2 * len(self._entries) + 64:  # mostly stale: rebuild
            self._heap = [(e.deadline, e.token) for e in self._entries.values()]
            heapq.heapify(self._heap)
        return len(mine)


class RequestRouter:
    """Routes requests to responders and replies to requesters, for one router.

    ``requests`` counts the requests routed to a responder, ``no_responders``
    those answered with ``ERROR_CODE_NO_RESPONDERS``, ``timeouts`` those whose
    deadline passed without a reply.
    """

    def __init__(self, host: RequestHost) -> None:
        self.host = host
        cfg = host.config
        self.table = RequestTable(cfg.max_pending_requests, cfg.max_total_pending_requests)
        self._max_ms = int(cfg.max_request_timeout * 1000)
        self._default_ms = min(int(cfg.default_request_timeout * 1000), self._max_ms)
        self._validate = cfg.validate_payloads
        self._trust_local = cfg.trust_local_payloads
        self._max_frame = cfg.max_frame_bytes
        #: The next responder's turn, by request topic.
        self._turns: dict[str, int] = {}
        #: The clock of the deadlines (replaceable in tests).
        self.now: Callable[[], float] = time.monotonic
        #: Told the earliest deadline (None: nothing waits) whenever a request
        #: is added or dropped: the asyncio layer's timer.
        self.on_deadline: Callable[[float | None], None] | None = None
        self.requests = 0
        self.no_responders = 0
        self.timeouts = 0

    def _refuse(self, exc: EventBusError) -> NoReturn:
        self.host.counts.refuse(exc.code)
        raise exc

    def pending(self, requester: Endpoint) -> int:
        """Requests of ``requester`` waiting for a reply."""
        return self.table.pending(requester)

    def request(self, endpoint: Endpoint, request: frames_pb2.Request) -> PendingRequest:
        """Check ``endpoint``'s request and deliver it to one responder; return
        the pending entry. Raises the typed refusal (``NoResponders`` at once
        when nobody may answer)."""
        request_id = request.request_id
        if request_id <= 0 or self.table.waiting(endpoint, request_id):
            self._refuse(
                ServerError(
                    f"request id {request_id} is 0 or already waiting for a reply",
                    ErrorCode.ERROR_CODE_MALFORMED_FRAME,
                )
            )
        publish = request.publish
        topic = publish.topic
        info = self.host.check_request(endpoint, publish)
        reply = info.reply
        assert reply is not None  # check_request refuses any other topic
        full = self.table.room(endpoint)
        if full is not None:
            self._refuse(LimitExceeded(full, code=ErrorCode.ERROR_CODE_LIMIT_EXCEEDED))
        correlation = publish.correlation if publish.HasField("correlation") else None
        candidates = [
            sub
            for sub in self.host.table.responders(topic, info.access)
            if sub.matcher is None or sub.matcher.matches(correlation)
        ]
        if not candidates:
            self.no_responders += 1
            raise NoResponders(
                f"no responder serves {topic!r}", code=ErrorCode.ERROR_CODE_NO_RESPONDERS
            )
        timeout_ms = min(request.timeout_ms or self._default_ms, self._max_ms)
        now = self.now()
        stamp = self.host.clock.stamp()
        token = self.table.new_token()
        deliver = frames_pb2.RequestDeliver(
            token=token,
            publish=publish,
            remaining_ms=timeout_ms,
            event_id=stamp.event_id,
            received_at_ns=stamp.time_ns,
            # An in-process session's name may be longer than a claim may be.
            requester=endpoint.component[:MAX_COMPONENT_CHARS],
        )
        responder = self._deliver(topic, candidates, deliver)
        if responder is None:
            self.no_responders += 1
            raise NoResponders(
                f"no responder of {topic!r} can take a request now (their queues are full)",
                code=ErrorCode.ERROR_CODE_NO_RESPONDERS,
            )
        entry = PendingRequest(
            token,
            endpoint,
            request_id,
            responder,
            now + timeout_ms / 1000,
            timeout_ms,
            reply,
        )
        self.table.add(entry)
        self.requests += 1
        if self.on_deadline is not None:
            self.on_deadline(self.table.next_deadline())
        return entry

    def _deliver(
        self, topic: str, candidates: list[SubscriptionEntry], deliver: frames_pb2.RequestDeliver
    ) -> Endpoint | None:
        """Give ``deliver`` to the candidate whose turn it is, or the next that
        can take it; the endpoint that took it, or None."""
        turns = self._turns
        turn = turns.get(topic, 0)
        count = len(candidates)
        for step in range(count):
            sub = candidates[(turn + step) % count]
            sink = sub.endpoint.rpc
            deliver.subscription_id = sub.subscription_id
            if sink is not None and sink.deliver_request(sub, deliver):
                if len(turns) >= _TURNS_SIZE and topic not in turns:
                    turns.clear()
                turns[topic] = (turn + step + 1) % count
                sub.delivered += 1
                return sub.endpoint
            sub.dropped += 1
        return None

    def reply(self, endpoint: Endpoint, reply: frames_pb2.Reply) -> None:
        """Check ``endpoint``'s reply and hand it to the requester alone.

        Raises the typed refusal: ``UnknownRequest`` when ``endpoint`` holds no
        such token (the request stays with whoever holds it),
        ``PayloadTypeMismatch``, ``InvalidPayload`` or a frame too large (the
        request keeps waiting for a better reply).
        """
        entry = self.table.get(reply.token)
        if entry is None or entry.responder is not endpoint:
            self.host.audit.record(
                "reply_refused",
                endpoint.peer,
                session=endpoint.session_id,
                component=endpoint.component or "-",
                token=reply.token,
                reason="the request was never delivered to this connection"
                if entry is not None
                else "no such request waits (answered, past its deadline, or never made)",
            )
            self._refuse(
                UnknownRequest(
                    f"no request with token {reply.token} waits for a reply from this connection",
                    code=ErrorCode.ERROR_CODE_UNKNOWN_REQUEST,
                )
            )
        out = frames_pb2.ReplyDeliver(
            request_id=entry.request_id, responder=endpoint.component[:MAX_COMPONENT_CHARS]
        )
        if reply.error:
            out.error = reply.error
        else:
            self._check_reply(endpoint, entry, reply)
            out.payload_type = reply.payload_type
            out.payload = reply.payload
        size = Frame(reply_deliver=out).ByteSize()
        if size > self._max_frame:
            self._refuse(
                LimitExceeded(
                    f"reply of {size} bytes cannot be delivered within the frame limit "
                    f"of {self._max_frame} bytes",
                    code=ErrorCode.ERROR_CODE_FRAME_TOO_LARGE,
                )
            )
        self.table.pop(entry.token)
        sink = entry.requester.rpc
        if sink is not None:
            sink.deliver_reply(out)

    def _check_reply(
        self, endpoint: Endpoint, entry: PendingRequest, reply: frames_pb2.Reply
    ) -> None:
        """The reply's type is the topic's reply type, and it parses (with validation on)."""
        if reply.payload_type != entry.reply_name:
            self._refuse(
                PayloadTypeMismatch(
                    f"request {reply.token} is answered with {entry.reply_name}, "
                    f"not {reply.payload_type!r}",
                    code=ErrorCode.ERROR_CODE_PAYLOAD_MISMATCH,
                )
            )
        if not self._validate or (self._trust_local and endpoint.identity.trusted):
            return
        try:
            entry.parser.FromString(reply.payload)
        except (DecodeError, RecursionError) as exc:
            reason = f"reply does not parse as {entry.reply_name}: {exc}"
            self.host.audit.record(
                "payload_refused",
                endpoint.peer,
                session=endpoint.session_id,
                component=endpoint.component or "-",
                token=reply.token,
                reason=reason,
            )
            self._refuse(
                InvalidPayload(
                    f"reply to request {reply.token}: {reason}",
                    payload_type=entry.reply_name,
                    code=ErrorCode.ERROR_CODE_INVALID_PAYLOAD,
                )
            )

    def expire(self, now: float | None = None) -> int:
        """Fail every request whose deadline has passed (``REQUEST_TIMEOUT`` to its
        requester); return how many. ``now`` defaults to :attr:`now`."""
        expired = self.table.expire(self.now() if now is None else now)
        for entry in expired:
            self.timeouts += 1
            sink = entry.requester.rpc
            if sink is not None:
                error = RequestTimeout(
                    f"no reply within {entry.timeout_ms} ms",
                    code=ErrorCode.ERROR_CODE_REQUEST_TIMEOUT,
                )
                sink.request_failed(entry.request_id, error)
        return len(expired)

    def detach(self, endpoint: Endpoint) -> None:
        """``endpoint``'s session ended: its own requests are forgotten; those
        delivered to it keep waiting until their deadline."""
        if self.table.drop(endpoint) and self.on_deadline is not None:
            self.on_deadline(self.table.next_deadline())
