"""A client's requests and responders [protocol §5, "Request/reply"].

:class:`ClientRpc` is the backend of the client's ``request()`` and
``serve()`` (:class:`~daemoneye_eventbus.responders.RequestReply`): it sends
``Request`` frames and waits for the ``ReplyDeliver`` (or the ``Error``)
that names each one, through the client's
:class:`~daemoneye_eventbus.client.requests.PendingRequests`, with a
deadline of its own, so that a request times out even if the broker is
gone; it makes the responder subscriptions (again after a reconnect), hands
each ``RequestDeliver`` to its :class:`~daemoneye_eventbus.responders.Responder`
and sends the replies. It also sends the client's other requests to the
broker (:meth:`ClientRpc.ask`: subscribe, unsubscribe, ping, statistics).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

from google.protobuf.message import Message

from daemoneye.eventbus.v1 import frames_pb2
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationMetadata
from daemoneye.eventbus.v1.frames_pb2 import Frame
from daemoneye_eventbus.client.requests import PendingRequests, RequestKey, RequestKind
from daemoneye_eventbus.client.writer import PublishWriter
from daemoneye_eventbus.errors import (
    ClosedResourceError,
    EventBusError,
    LocalProtocolError,
    RequestTimeout,
)
from daemoneye_eventbus.protocol import State, build_publish
from daemoneye_eventbus.registry_runtime import RequestTopic, RequestTopicTemplate
from daemoneye_eventbus.responders import (
    Responder,
    decode_reply,
    request_wait,
    responder_target,
    timed_out,
)

__all__ = ["ClientRpc", "RpcHost"]

log = logging.getLogger("daemoneye_eventbus.client")

P = TypeVar("P", bound=Message)
R = TypeVar("R", bound=Message)

#: Without a broker's word on it (Welcome.limits), the protocol's defaults.
_DEFAULT_TIMEOUT_MS = 5000
_MAX_TIMEOUT_MS = 300_000


class RpcHost(Protocol):
    """What :class:`ClientRpc` reads of its client."""

    #: The limits the broker announced.
    limits: frames_pb2.Limits
    #: Seconds to wait for the broker's answer to a subscribe (and the like).
    request_timeout: float
    #: The default bound of a responder's waiting requests.
    max_pending: int

    @property
    def is_connected(self) -> bool: ...


class ClientRpc:
    """The requests and responders of one client, over its connections."""

    def __init__(
        self,
        host: RpcHost,
        writer: PublishWriter,
        pending: PendingRequests,
        ids: Iterator[int],
        check_open: Callable[[], None],
    ) -> None:
        self.host = host
        self.writer = writer
        self.pending = pending
        #: The client's subscription ids: a responder subscription takes one too.
        self.ids = ids
        self.check_open = check_open
        self._request_ids = itertools.count(1)
        self._responders: dict[int, Responder[Any, Any]] = {}
        #: Counts connections: a reply to a request of an earlier one is not sent.
        self._generation = 0
        #: The broker's Welcome set ``requests``: it routes requests [protocol §3].
        self.routed = False

    async def ask(self, key: RequestKey, frame: Frame) -> Any:
        """Send ``frame`` and wait for the broker's answer named ``key``, at most
        the client's ``request_timeout``."""
        fut = self.pending.open(key)
        try:
            self.check_open()
            self.writer.send(frame)
            self.writer.write_now()
            async with asyncio.timeout(self.host.request_timeout):
                return await fut
        except TimeoutError:
            raise RequestTimeout(
                f"no answer from the broker within {self.host.request_timeout} s"
            ) from None
        finally:
            self.pending.discard(key)

    def _check_routed(self) -> None:
        self.check_open()
        if not self.routed:
            raise LocalProtocolError("this broker does not route requests (see Welcome.requests)")

    # -- requesting -------------------------------------------------------------------

    async def request(
        self,
        topic: RequestTopic[P, R],
        message: P,
        timeout: float | None,
        correlation: CorrelationMetadata | None,
    ) -> R:
        """See :meth:`~daemoneye_eventbus.responders.RequestReply.request`."""
        if not isinstance(topic, RequestTopic):
            raise TypeError(f"{topic!r} is not a request topic")
        publish = build_publish(topic, message, correlation)
        limits = self.host.limits
        most = (limits.max_request_timeout_ms or _MAX_TIMEOUT_MS) / 1000
        wait = request_wait(
            timeout, (limits.default_request_timeout_ms or _DEFAULT_TIMEOUT_MS) / 1000, most
        )
        request_id = next(self._request_ids)
        request = frames_pb2.Request(
            request_id=request_id, publish=publish, timeout_ms=math.ceil(wait * 1000)
        )
        key = RequestKey(RequestKind.REQUEST, request_id)
        fut = self.pending.open(key)
        try:
            self._check_routed()
            self.writer.send(Frame(request=request))
            self.writer.write_now()
            async with asyncio.timeout(wait):
                answer: frames_pb2.ReplyDeliver = await fut
        except RequestTimeout:
            raise  # the broker's word, or ours: the same
        except TimeoutError:
            raise timed_out(topic, wait) from None
        finally:
            self.pending.discard(key)
        return decode_reply(topic, answer)

    # -- serving ------------------------------------------------------------------------

    def serve(
        self, target: RequestTopic[P, R] | RequestTopicTemplate[P, R], max_pending: int | None
    ) -> Responder[P, R]:
        """See :meth:`~daemoneye_eventbus.responders.RequestReply.serve`."""
        filter, request_type, reply_type = responder_target(target)
        return Responder(
            self, filter, request_type, reply_type, max_pending or self.host.max_pending
        )

    async def start_responder(self, responder: Responder[Any, Any]) -> None:
        self._check_routed()
        responder.subscription_id = sid = next(self.ids)
        self._responders[sid] = responder
        try:
            await self._subscribe(responder)
        except BaseException:
            self._responders.pop(sid, None)
            raise

    async def _subscribe(self, responder: Responder[Any, Any]) -> None:
        sid = responder.subscription_id
        frame = Frame(
            subscribe=frames_pb2.Subscribe(
                subscription_id=sid, filter=responder.filter, respond=True
            )
        )
        await self.ask(RequestKey(RequestKind.SUBSCRIBE, sid), frame)

    async def stop_responder(self, responder: Responder[Any, Any]) -> None:
        sid = responder.subscription_id
        if self._responders.pop(sid, None) is None:
            return
        responder.end()
        if self.host.is_connected:
            frame = Frame(unsubscribe=frames_pb2.Unsubscribe(subscription_id=sid))
            await self.ask(RequestKey(RequestKind.UNSUBSCRIBE, sid), frame)

    def received(self, deliver: frames_pb2.RequestDeliver) -> None:
        """A request from the broker for one of the responders."""
        responder = self._responders.get(deliver.subscription_id)
        generation = self._generation

        async def answer(reply: frames_pb2.Reply) -> None:
            if generation != self._generation:  # its token died with its connection
                log.debug("reply to request %d dropped: its connection is gone", reply.token)
                return
            self.check_open()
            self.writer.send(Frame(reply=reply))
            self.writer.write_now()

        if responder is None or not responder.offer(deliver, answer):
            # Stopped, or full: the requester learns it at once rather than at its deadline.
            conn = self.writer.conn
            if conn.state is State.OPEN and not conn.close_expected:
                why = "the responder has stopped" if responder is None else "the responder is busy"
                self.writer.send(Frame(reply=frames_pb2.Reply(token=deliver.token, error=why)))

    def connection_lost(self, error: BaseException, ending: bool) -> None:
        """The connection is gone: the requests waiting for the responders go
        with it; with ``ending`` (no reconnect), the responders end too."""
        self._generation += 1
        for responder in self._responders.values():
            dropped = responder.clear()
            if dropped:
                log.debug(
                    "responder %s: %d requests lost with the connection", responder.filter, dropped
                )
            if ending:
                responder.end(None if isinstance(error, ClosedResourceError) else error)
        if ending:
            self._responders.clear()

    async def resubscribe(self) -> None:
        """Make every responder subscription again (a new connection)."""
        for responder in list(self._responders.values()):
            try:
                await self._subscribe(responder)
            except EventBusError as exc:
                self._responders.pop(responder.subscription_id, None)
                responder.end(exc)
