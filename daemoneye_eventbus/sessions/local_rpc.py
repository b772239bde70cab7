"""Request/reply for the in-process session [protocol §5, "Request/reply"].

:class:`LocalRpc` is the backend of a
:class:`~daemoneye_eventbus.sessions.LocalSession`'s ``request()`` and
``serve()``, and its endpoint's
:class:`~daemoneye_eventbus.subscriptions.RequestSink`: its requests go to
the broker's :class:`~daemoneye_eventbus.rpc.RequestRouter` directly, which
raises a refusal at once (``NoResponders``, ``AccessDenied``, ...) and later
hands it the reply or the timeout; requests for its responders go straight
into their :class:`~daemoneye_eventbus.responders.Responder` (a full one is
passed over for the next responder of the topic), and its replies straight
to the router. Socket peers on the other side get their frames when the
broker's outbox is written, at the end of the loop turn.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Iterator
from typing import Any, Protocol, TypeVar

from google.protobuf.message import Message

from daemoneye.eventbus.v1 import frames_pb2
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationMetadata
from daemoneye_eventbus.errors import ClosedResourceError, EventBusError, RequestTimeout
from daemoneye_eventbus.protocol import build_publish
from daemoneye_eventbus.registry_runtime import RequestTopic, RequestTopicTemplate
from daemoneye_eventbus.responders import (
    Responder,
    decode_reply,
    request_wait,
    responder_target,
    timed_out,
)
from daemoneye_eventbus.router import Endpoint, SubscriptionEntry
from daemoneye_eventbus.sessions.base import SessionHost

__all__ = ["LocalRpc", "LocalRpcOwner"]

P = TypeVar("P", bound=Message)
R = TypeVar("R", bound=Message)


class LocalRpcOwner(Protocol):
    """What :class:`LocalRpc` needs of its in-process session."""

    host: SessionHost
    endpoint: Endpoint

    @property
    def is_closed(self) -> bool: ...


class LocalRpc:
    """The requests and responders of one in-process session."""

    def __init__(self, session: LocalRpcOwner, ids: Iterator[int]) -> None:
        self.session = session
        #: The session's subscription ids: a responder subscription takes one too.
        self.ids = ids
        self._request_ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[frames_pb2.ReplyDeliver]] = {}
        self._responders: dict[int, Responder[Any, Any]] = {}

    def _check_open(self) -> None:
        if self.session.is_closed:
            raise ClosedResourceError("local session is closed")

    # -- requesting -------------------------------------------------------------------

    async def request(
        self,
        topic: RequestTopic[P, R],
        message: P,
        timeout: float | None,
        correlation: CorrelationMetadata | None,
    ) -> R:
        """See :meth:`~daemoneye_eventbus.responders.RequestReply.request`."""
        self._check_open()
        if not isinstance(topic, RequestTopic):
            raise TypeError(f"{topic!r} is not a request topic")
        host = self.session.host
        cfg = host.config
        wait = request_wait(timeout, cfg.default_request_timeout, cfg.max_request_timeout)
        request_id = next(self._request_ids)
        request = frames_pb2.Request(
            request_id=request_id,
            publish=build_publish(topic, message, correlation),
            timeout_ms=math.ceil(wait * 1000),
        )
        fut = self._waiting[request_id] = asyncio.get_running_loop().create_future()
        try:
            host.router.requests.request(self.session.endpoint, request)  # raises refusals
            host.outbox.schedule()  # a socket responder gets it at the end of the turn
            async with asyncio.timeout(wait):
                answer = await fut
        except RequestTimeout:
            raise
        except TimeoutError:
            raise timed_out(topic, wait) from None
        finally:
            self._waiting.pop(request_id, None)
        return decode_reply(topic, answer)

    # -- the endpoint's RequestSink -------------------------------------------------------

    def deliver_request(self, sub: SubscriptionEntry, deliver: frames_pb2.RequestDeliver) -> bool:
        responder = self._responders.get(sub.subscription_id)
        return responder is not None and responder.offer(deliver, self._answer)

    def deliver_reply(self, reply: frames_pb2.ReplyDeliver) -> None:
        fut = self._waiting.pop(reply.request_id, None)
        if fut is not None and not fut.done():
            fut.set_result(reply)

    def request_failed(self, request_id: int, error: EventBusError) -> None:
        fut = self._waiting.pop(request_id, None)
        if fut is not None and not fut.done():
            fut.set_exception(error)

    async def _answer(self, reply: frames_pb2.Reply) -> None:
        self._check_open()
        host = self.session.host
        host.router.requests.reply(self.session.endpoint, reply)  # raises refusals
        host.outbox.schedule()

    # -- serving ------------------------------------------------------------------------

    def serve(
        self, target: RequestTopic[P, R] | RequestTopicTemplate[P, R], max_pending: int | None
    ) -> Responder[P, R]:
        """See :meth:`~daemoneye_eventbus.responders.RequestReply.serve`."""
        filter, request_type, reply_type = responder_target(target)
        most = max_pending or self.session.host.config.max_queue_messages
        return Responder(self, filter, request_type, reply_type, most)

    async def start_responder(self, responder: Responder[Any, Any]) -> None:
        self._check_open()
        sid = next(self.ids)
        self.session.host.router.subscribe(
            self.session.endpoint, sid, responder.filter, respond=True
        )
        responder.subscription_id = sid
        self._responders[sid] = responder

    async def stop_responder(self, responder: Responder[Any, Any]) -> None:
        sid = responder.subscription_id
        if self._responders.pop(sid, None) is not None and not self.session.is_closed:
            self.session.host.router.unsubscribe(self.session.endpoint, sid)
        responder.end()

    def end(self) -> None:
        """The session has ended: its requests and responders end with it."""
        error = ClosedResourceError("local session is closed")
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(error)
        self._waiting.clear()
        for responder in self._responders.values():
            responder.end()
        self._responders.clear()
