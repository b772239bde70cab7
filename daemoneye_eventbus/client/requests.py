"""Requests waiting for an answer: one future per key, popped in ``finally``.

The answers come from the broker (acks, pongs, statistics) or, through it,
from a responder (``ReplyDeliver``, for the requests of request/reply).
"""

from __future__ import annotations

import asyncio
import enum
from typing import Any, NamedTuple

from daemoneye_eventbus.errors import EventBusError

__all__ = ["PendingRequests", "RequestKey", "RequestKind"]


class RequestKind(enum.Enum):
    """What a request asks for; each answer frame names its request by kind and id."""

    SUBSCRIBE = "subscribe"  # answered by SubscribeAck(subscription_id)
    UNSUBSCRIBE = "unsubscribe"  # UnsubscribeAck(subscription_id)
    PING = "ping"  # Pong(nonce)
    STATS = "stats"  # StatsResponse(request_id)
    REQUEST = "request"  # ReplyDeliver(request_id), or an Error naming the request_id


class RequestKey(NamedTuple):
    """One outstanding request: its kind and its id (subscription id, nonce, request id)."""

    kind: RequestKind
    id: int


class PendingRequests:
    """The futures of outstanding requests, by :class:`RequestKey`."""

    def __init__(self) -> None:
        self._futures: dict[RequestKey, asyncio.Future[Any]] = {}

    def __len__(self) -> int:
        return len(self._futures)

    def open(self, key: RequestKey) -> asyncio.Future[Any]:
        """A new future for ``key``; the caller pops it with :meth:`discard` in ``finally``."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._futures[key] = fut
        return fut

    def discard(self, key: RequestKey) -> None:
        self._futures.pop(key, None)

    def resolve(self, key: RequestKey, value: object) -> None:
        """Answer the request ``key``, if it still waits."""
        fut = self._futures.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result(value)

    def reject(self, key: RequestKey, error: EventBusError) -> bool:
        """Fail the request ``key`` with ``error``; False if no such request waits."""
        fut = self._futures.pop(key, None)
        if fut is None or fut.done():
            return False
        fut.set_exception(error)
        return True

    def fail_all(self, error: BaseException) -> None:
        """Fail every waiting request (the connection is gone)."""
        for fut in self._futures.values():
            if not fut.done():
                fut.set_exception(error)
        self._futures.clear()
