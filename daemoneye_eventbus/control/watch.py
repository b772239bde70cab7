"""What the agent hands out to whoever waits: change feeds and task outcomes.

:class:`Feed` broadcasts items (registry changes, closed aggregates) to every
``async for`` open on it, each through a bounded queue of its own (the
oldest item is dropped, and counted, when a reader falls behind).
:class:`TaskOutcome` is what became of one distributed task.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Generic, Self, TypeVar

from daemoneye.eventbus.v1.control_pb2 import (
    RPC_STATUS_CANCELLED,
    RPC_STATUS_ERROR,
    RPC_STATUS_SUCCESS,
    RPC_STATUS_TIMEOUT,
    RPC_STATUS_UNAVAILABLE,
    RpcStatus,
    TaskResult,
)
from daemoneye_eventbus.control.rpc import rpc_status_name
from daemoneye_eventbus.control.tasks import FailureReason, TaskFailed

__all__ = ["Feed", "FeedReader", "TaskOutcome", "failure_status"]

T = TypeVar("T")


class FeedReader(AsyncIterator[T]):
    """One reader of a :class:`Feed`: an async iterator, registered from the
    moment it is made (so it misses nothing after), and an async context
    manager that stops reading."""

    def __init__(self, feed: Feed[T]) -> None:
        self.feed = feed
        self.items: collections.deque[T] = collections.deque()
        self.ended = False
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def __anext__(self) -> T:
        while not self.items:
            if self.ended:
                raise StopAsyncIteration
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.items.popleft()

    async def get(self, timeout: float | None = None) -> T:
        """The next item; ``TimeoutError`` after ``timeout`` seconds,
        ``StopAsyncIteration`` once the feed closed."""
        async with asyncio.timeout(timeout):
            return await self.__anext__()

    def close(self) -> None:
        """Stop reading (idempotent)."""
        self.ended = True
        self.feed.forget(self)
        self.wake()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class Feed(Generic[T]):
    """Items broadcast to every reader; ``max_pending`` wait per reader."""

    def __init__(self, max_pending: int = 1024) -> None:
        self.max_pending = max_pending
        #: Items dropped because a reader fell behind.
        self.dropped = 0
        self.closed = False
        self._readers: list[FeedReader[T]] = []

    @property
    def readers(self) -> int:
        return len(self._readers)

    def reader(self) -> FeedReader[T]:
        """A new reader: it gets every item put from now on."""
        reader = FeedReader(self)
        if self.closed:
            reader.ended = True
        else:
            self._readers.append(reader)
        return reader

    def forget(self, reader: FeedReader[T]) -> None:
        if reader in self._readers:
            self._readers.remove(reader)

    def put(self, item: T) -> None:
        for reader in self._readers:
            if len(reader.items) >= self.max_pending:
                reader.items.popleft()
                self.dropped += 1
            reader.items.append(item)
            reader.wake()

    def close(self) -> None:
        """Every reader ends after the items it has."""
        self.closed = True
        for reader in self._readers:
            reader.ended = True
            reader.wake()
        self._readers.clear()


def failure_status(failure: TaskFailed) -> RpcStatus.ValueType:
    """The ``RpcStatus`` of a task that failed without a collector's result."""
    if failure.reason is FailureReason.EXPIRED:
        return RPC_STATUS_TIMEOUT
    if failure.reason is FailureReason.CANCELLED:
        return RPC_STATUS_CANCELLED
    if failure.reason in (FailureReason.ATTEMPTS_EXHAUSTED, FailureReason.QUEUE_FULL):
        return RPC_STATUS_UNAVAILABLE
    return RPC_STATUS_ERROR


@dataclass(frozen=True, slots=True)
class TaskOutcome:
    """What became of one task: a collector's result, or a failure without one."""

    task_id: str
    status: RpcStatus.ValueType
    #: The collector whose result finished it ("" if none did).
    collector_id: str = ""
    #: That result (None when the task failed without one).
    result: TaskResult | None = None
    #: Why it failed without a result (None otherwise).
    failure: TaskFailed | None = None
    #: Seconds from distribute() to the outcome, on the agent's clock.
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == RPC_STATUS_SUCCESS

    @property
    def status_name(self) -> str:
        return rpc_status_name(self.status)

    @property
    def error(self) -> str:
        if self.failure is not None:
            return f"{self.failure.reason.value}: {self.failure.detail}"
        return self.result.error if self.result is not None else ""
