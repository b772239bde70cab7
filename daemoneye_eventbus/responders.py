"""Request/reply as its users see it: ``request()``, ``serve()`` and the requests served.

The socket client and the broker's in-process session offer the same API
(:class:`RequestReply`): ``reply = await client.request(topic, message,
timeout=…)`` asks one responder of a request topic and returns its typed
reply, and ``async with client.serve(topic) as requests: async for request
in requests: await request.reply(answer)`` answers them [protocol §5,
"Request/reply"]. Each serves through its own backend (the client's
:class:`~daemoneye_eventbus.client.rpc.ClientRpc`, the session's
:class:`~daemoneye_eventbus.sessions.local_rpc.LocalRpc`); what is shared
lives here: the :class:`Responder`, an async iterator over
:class:`IncomingRequest` objects that drops the requests whose deadline
passed while they waited, and the decoding of a reply.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeVar

from google.protobuf.message import DecodeError, Message

from daemoneye.eventbus.v1 import frames_pb2
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationMetadata
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode
from daemoneye_eventbus.errors import (
    ClosedResourceError,
    ConnectionClosed,
    InvalidPayload,
    LocalProtocolError,
    PayloadTypeMismatch,
    RequestFailed,
    RequestTimeout,
)
from daemoneye_eventbus.registry_runtime import RequestTopic, RequestTopicTemplate

__all__ = [
    "Answer",
    "IncomingRequest",
    "RequestBackend",
    "RequestReply",
    "Responder",
    "ResponderOwner",
    "decode_reply",
    "responder_target",
]

P = TypeVar("P", bound=Message)
R = TypeVar("R", bound=Message)

log = logging.getLogger("daemoneye_eventbus.client")

#: Sends a responder's ``Reply`` (the client's writer, or the broker's router in process).
Answer = Callable[[frames_pb2.Reply], Awaitable[None]]


def responder_target(
    target: RequestTopic[P, R] | RequestTopicTemplate[P, R],
) -> tuple[str, type[P], type[R]]:
    """The filter a responder of ``target`` subscribes with (a template's
    parameters as ``+``), and its request and reply types."""
    if isinstance(target, RequestTopic):
        return target.name, target.payload_type, target.reply_type
    if isinstance(target, RequestTopicTemplate):
        return target.filter, target.payload_type, target.reply_type
    raise TypeError(f"serve() takes a request topic or template, not {type(target).__qualname__}")


def decode_reply(topic: RequestTopic[Any, R], answer: frames_pb2.ReplyDeliver) -> R:
    """The typed reply of a ``ReplyDeliver``; :class:`RequestFailed` if the
    responder failed the request."""
    if answer.error:
        raise RequestFailed(answer.error, responder=answer.responder, topic=topic.name)
    if answer.payload_type != topic.reply_name:
        raise PayloadTypeMismatch(
            f"requests on {topic.name!r} are answered with {topic.reply_name}, "
            f"not {answer.payload_type!r}",
            code=ErrorCode.ERROR_CODE_PAYLOAD_MISMATCH,
        )
    try:
        return topic.reply_type.FromString(answer.payload)
    except (DecodeError, RecursionError) as exc:
        raise InvalidPayload(
            f"reply on {topic.name!r} does not parse as {topic.reply_name}: {exc}",
            topic=topic.name,
            payload_type=answer.payload_type,
            code=ErrorCode.ERROR_CODE_INVALID_PAYLOAD,
        ) from None


def request_wait(timeout: float | None, default: float, most: float) -> float:
    """How long a request waits: ``timeout`` (the broker's ``default`` if None),
    at most the broker's ``most``; raises ``ValueError`` unless positive."""
    wait = min(default if timeout is None else timeout, most)
    if not wait > 0:
        raise ValueError(f"a request's timeout must be positive, got {timeout}")
    return wait


def timed_out(topic: RequestTopic[Any, Any], wait: float) -> RequestTimeout:
    """The error of a request that got no reply within ``wait`` seconds."""
    return RequestTimeout(
        f"no reply on {topic.name!r} within {wait:g} s", code=ErrorCode.ERROR_CODE_REQUEST_TIMEOUT
    )


class IncomingRequest(Generic[P, R]):
    """One request for a responder: its typed message, where it comes from,
    its deadline, and :meth:`reply` / :meth:`fail` to answer it once."""

    __slots__ = (
        "_answer",
        "_reply_type",
        "answered",
        "correlation",
        "deadline",
        "event_id",
        "message",
        "received_at_ns",
        "requester",
        "token",
        "topic",
    )

    def __init__(
        self,
        message: P,
        deliver: frames_pb2.RequestDeliver,
        reply_type: type[R],
        deadline: float,
        answer: Answer,
    ) -> None:
        publish = deliver.publish
        #: The request, of the topic's request type.
        self.message = message
        #: The concrete request topic.
        self.topic = publish.topic
        #: The request's correlation metadata, if any.
        self.correlation: CorrelationMetadata | None = (
            publish.correlation if publish.HasField("correlation") else None
        )
        #: The component that asked ("" if anonymous).
        self.requester = deliver.requester
        #: The broker's id of the request, and when it accepted it (ns since the epoch).
        self.event_id = deliver.event_id
        self.received_at_ns = deliver.received_at_ns
        #: When the requester stops waiting, in event-loop time.
        self.deadline = deadline
        #: The broker's token of the request (what the reply names).
        self.token = deliver.token
        #: Answered (or failed) already.
        self.answered = False
        self._reply_type = reply_type
        self._answer = answer

    @property
    def remaining(self) -> float:
        """Seconds left before the deadline (0.0 once it has passed)."""
        return max(0.0, self.deadline - asyncio.get_running_loop().time())

    async def reply(self, message: R) -> None:
        """Answer with ``message``, of the topic's reply type (checked here too:
        :class:`PayloadTypeMismatch`, a ``TypeError``, for another type)."""
        if type(message) is not self._reply_type:
            raise PayloadTypeMismatch(
                f"requests on {self.topic!r} are answered with "
                f"{self._reply_type.DESCRIPTOR.full_name}, not {type(message).__qualname__}",
                code=ErrorCode.ERROR_CODE_PAYLOAD_MISMATCH,
            )
        name = self._reply_type.DESCRIPTOR.full_name
        await self._send(frames_pb2.Reply(payload_type=name, payload=message.SerializeToString()))

    async def fail(self, reason: str) -> None:
        """Answer that the request could not be served: the requester's
        ``request()`` raises :class:`RequestFailed` with ``reason``."""
        if not reason:
            raise ValueError("a failed request needs a reason")
        await self._send(frames_pb2.Reply(error=reason))

    async def _send(self, reply: frames_pb2.Reply) -> None:
        if self.answered:
            raise LocalProtocolError(f"request {self.token} on {self.topic!r} is answered already")
        self.answered = True
        if self.remaining <= 0:
            # The requester has stopped waiting, and the broker with it.
            log.debug(
                "reply to request %d on %s after its deadline: not sent", self.token, self.topic
            )
            return
        reply.token = self.token
        await self._answer(reply)


class ResponderOwner(Protocol):
    """Who makes a responder's subscription: a client or an in-process session."""

    async def start_responder(self, responder: Responder[Any, Any]) -> None: ...

    async def stop_responder(self, responder: Responder[Any, Any]) -> None: ...


class Responder(Generic[P, R]):
    """The requests of one responder subscription: an async iterator of
    :class:`IncomingRequest`, and an async context manager that starts
    serving and stops.

    Requests wait here, at most ``max_pending``; one that finds no room is
    refused (the broker tries another responder in process; over a socket it
    is failed at once). A request whose deadline passes while it waits is
    dropped, not handed out, and counted in :attr:`expired`; one whose
    payload does not decode (possible only behind a broker without payload
    validation) is failed and counted in :attr:`invalid`.
    """

    def __init__(
        self,
        owner: ResponderOwner,
        filter: str,
        request_type: type[P],
        reply_type: type[R],
        max_pending: int,
    ) -> None:
        self.owner = owner
        #: The subscription's filter: a request topic, or a template with ``+``.
        self.filter = filter
        self.request_type = request_type
        self.reply_type = reply_type
        self.max_pending = max_pending
        #: Set by the owner when it subscribes.
        self.subscription_id = 0
        #: Requests received, and of them: dropped for their deadline, failed
        #: because they did not decode, refused for want of room.
        self.received = 0
        self.expired = 0
        self.invalid = 0
        self.refused = 0
        self._items: collections.deque[tuple[frames_pb2.RequestDeliver, float, Answer]] = (
            collections.deque()
        )
        self._waiter: asyncio.Future[None] | None = None
        self._active = False
        self._closed = False
        self._error: BaseException | None = None

    @property
    def active(self) -> bool:
        return self._active

    def __len__(self) -> int:
        """Requests waiting to be handed out."""
        return len(self._items)

    async def start(self) -> Self:
        """Subscribe as a responder (raises the broker's refusal)."""
        if self._closed:
            raise ClosedResourceError("this responder has stopped")
        if not self._active:
            await self.owner.start_responder(self)
            self._active = True
        return self

    async def stop(self) -> None:
        """Stop serving (idempotent); requests still waiting are not handed out."""
        if self._active:
            self._active = False
            await self.owner.stop_responder(self)
        self.end()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self.stop()

    # -- for the owner --------------------------------------------------------------

    def offer(self, deliver: frames_pb2.RequestDeliver, answer: Answer) -> bool:
        """A request from the broker, answered through ``answer``; False if it
        finds no room (or the responder has ended)."""
        if self._closed or len(self._items) >= self.max_pending:
            self.refused += 1
            return False
        loop = asyncio.get_running_loop()
        self._items.append((deliver, loop.time() + deliver.remaining_ms / 1000, answer))
        self.received += 1
        self._wake()
        return True

    def clear(self) -> int:
        """Forget the requests waiting (their connection is gone); how many."""
        count = len(self._items)
        self._items.clear()
        return count

    def end(self, error: BaseException | None = None) -> None:
        """No more requests will come; readers see the end (or ``error``)."""
        self._active = False
        self._closed = True
        if error is not None and self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- for the reader ----------------------------------------------------------------

    async def get(self, timeout: float | None = None) -> IncomingRequest[P, R]:
        """The next request; raises :class:`ClosedResourceError` (or the error
        the responder ended with) once none can come, :class:`RequestTimeout`
        after ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    request = await self._next()
                    if request is not None:
                        return request
        except TimeoutError:
            raise RequestTimeout(f"no request within {timeout} s") from None

    async def _next(self) -> IncomingRequest[P, R] | None:
        loop = asyncio.get_running_loop()
        while not self._items:
            if self._closed:
                raise self._error or ClosedResourceError("responder stopped")
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        deliver, deadline, answer = self._items.popleft()
        if deadline <= loop.time():
            self.expired += 1  # the requester has given up on it
            return None
        try:
            message = self.request_type.FromString(deliver.publish.payload)
        except (DecodeError, RecursionError) as exc:
            self.invalid += 1
            name = self.request_type.DESCRIPTOR.full_name
            why = f"the request does not parse as {name}: {exc}"
            await answer(frames_pb2.Reply(token=deliver.token, error=why))
            return None
        return IncomingRequest(message, deliver, self.reply_type, deadline, answer)

    def __aiter__(self) -> AsyncIterator[IncomingRequest[P, R]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[IncomingRequest[P, R]]:
        while True:
            try:
                request = await self._next()
            except ClosedResourceError:
                return
            if request is not None:
                yield request


class RequestBackend(Protocol):
    """What serves :class:`RequestReply`: a client's or an in-process session's."""

    async def request(
        self,
        topic: RequestTopic[P, R],
        message: P,
        timeout: float | None,
        correlation: CorrelationMetadata | None,
    ) -> R: ...

    def serve(
        self, target: RequestTopic[P, R] | RequestTopicTemplate[P, R], max_pending: int | None
    ) -> Responder[P, R]: ...


#: The backend of a :class:`RequestReply`.
B = TypeVar("B", bound=RequestBackend)


class RequestReply(Generic[B]):
    """``request()`` and ``serve()``: the request/reply API of a
    :class:`~daemoneye_eventbus.client.Client` and of a
    :class:`~daemoneye_eventbus.sessions.LocalSession`, served by their
    ``_rpc`` backend (of type ``B``)."""

    _rpc: B

    async def request(
        self,
        topic: RequestTopic[P, R],
        message: P,
        /,
        *,
        timeout: float | None = None,
        correlation: CorrelationMetadata | None = None,
    ) -> R:
        """Ask one responder of the request topic ``topic`` and return its reply.

        ``message`` is of the topic's request type, the reply of its reply type
        (mypy checks both). ``timeout`` (seconds; the broker's
        ``default_request_timeout`` if None, at most its
        ``max_request_timeout``) is the deadline: past it, with no reply,
        :class:`RequestTimeout` is raised, even if the broker is gone.
        :class:`NoResponders` at once when nobody may answer,
        :class:`RequestFailed` when the responder could not, the broker's
        refusal (``AccessDenied``, ...) when it refuses the request, and
        :class:`ConnectionClosed` when the connection ends meanwhile.
        """
        return await self._rpc.request(topic, message, timeout, correlation)

    def serve(
        self,
        topic: RequestTopic[P, R] | RequestTopicTemplate[P, R],
        *,
        max_pending: int | None = None,
    ) -> Responder[P, R]:
        """Answer the requests on ``topic`` (a template: on every topic built
        from it): ``async with client.serve(topic) as requests: async for
        request in requests: await request.reply(answer)``.

        Responders of a topic take its requests in turn (a queue group). At
        most ``max_pending`` requests wait to be read (the owner's default if None).
        """
        return self._rpc.serve(topic, max_pending)
