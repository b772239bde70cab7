"""Typed calls to one collector, with deadlines and the reference ``RpcStatus``.

:class:`CollectorRpcClient` asks one collector on its request topics
(``control.collector.rpc.{health,config,lifecycle,task}.{id}``) through the
bus's request/reply primitive, and returns an :class:`RpcOutcome`: the
collector's own status (SUCCESS, ERROR, IN_PROGRESS) with its typed reply,
or the requesting side's (TIMEOUT: no reply by the deadline; CANCELLED: the
call was cancelled through :meth:`CollectorRpcClient.cancel` or the client
closed; UNAVAILABLE: nobody serves the collector's topic, or the connection
is gone). A request the broker refuses (``AccessDenied``: only a privileged
agent may ask) raises: that is a misconfiguration, not an outcome.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from daemoneye.eventbus.v1 import registry
from daemoneye.eventbus.v1.control_pb2 import (
    RPC_STATUS_CANCELLED,
    RPC_STATUS_ERROR,
    RPC_STATUS_SUCCESS,
    RPC_STATUS_TIMEOUT,
    RPC_STATUS_UNAVAILABLE,
    CollectorLifecycleCommand,
    ConfigurationAck,
    ConfigurationUpdate,
    HealthCheckReply,
    HealthCheckRequest,
    LifecycleAction,
    LifecycleReply,
    RpcStatus,
    TaskAck,
    TaskAssignment,
)
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationMetadata
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.errors import (
    ConnectionClosed,
    NoResponders,
    RequestFailed,
    RequestTimeout,
)
from daemoneye_eventbus.registry_runtime import RequestTopic
from daemoneye_eventbus.sessions import LocalSession

__all__ = ["Bus", "CollectorRpcClient", "RpcOutcome", "rpc_status_name"]

R = TypeVar("R", bound=Message)
P = TypeVar("P", bound=Message)

#: What the agent and the RPC client run on: a socket client or an in-process session.
Bus = Client | LocalSession


def rpc_status_name(status: RpcStatus.ValueType) -> str:
    """``RPC_STATUS_TIMEOUT`` -> ``"timeout"``."""
    try:
        name = RpcStatus.Name(status)
    except ValueError:
        return str(int(status))
    return name.removeprefix("RPC_STATUS_").lower().replace("_", " ")


@dataclass(frozen=True, slots=True)
class RpcOutcome(Generic[R]):
    """What became of one call to a collector."""

    collector_id: str
    status: RpcStatus.ValueType
    #: The collector's reply (None for TIMEOUT, CANCELLED, UNAVAILABLE, a failed request).
    reply: R | None = None
    #: Why it did not succeed, in words ("" on success).
    error: str = ""
    #: Seconds from the request to its outcome.
    elapsed: float = field(default=0.0, compare=False)

    @property
    def ok(self) -> bool:
        return self.status == RPC_STATUS_SUCCESS

    @property
    def status_name(self) -> str:
        return rpc_status_name(self.status)


def _reply_status(reply: Message) -> tuple[RpcStatus.ValueType, str]:
    status: RpcStatus.ValueType = getattr(reply, "status", RPC_STATUS_SUCCESS)
    return status or RPC_STATUS_SUCCESS, str(getattr(reply, "error", ""))


class CollectorRpcClient:
    """Typed calls to one collector at a time: :meth:`health`,
    :meth:`configure`, :meth:`lifecycle`, :meth:`execute`.

    ``timeout`` (seconds) is each call's deadline unless the call gives one.
    """

    def __init__(self, bus: Bus, *, timeout: float = 5.0) -> None:
        self.bus = bus
        self.timeout = timeout
        self._calls: dict[asyncio.Task[Any], str] = {}

    @property
    def pending(self) -> int:
        """Calls waiting for their reply."""
        return len(self._calls)

    async def call(
        self,
        topic: RequestTopic[P, R],
        collector_id: str,
        message: P,
        *,
        timeout: float | None = None,
        correlation: CorrelationMetadata | None = None,
    ) -> RpcOutcome[R]:
        """Ask ``collector_id`` on ``topic`` and map what happens to an :class:`RpcOutcome`."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        wait = self.timeout if timeout is None else timeout
        inner = loop.create_task(
            self.bus.request(topic, message, timeout=wait, correlation=correlation),
            name=f"rpc[{topic.name}]",
        )
        self._calls[inner] = collector_id
        try:
            reply = await asyncio.shield(inner)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                inner.cancel()  # our caller gave up: so do we
                raise
            return RpcOutcome(
                collector_id, RPC_STATUS_CANCELLED, None, "cancelled", self._since(start)
            )
        except RequestTimeout as exc:
            return RpcOutcome(collector_id, RPC_STATUS_TIMEOUT, None, str(exc), self._since(start))
        except NoResponders as exc:
            return RpcOutcome(
                collector_id, RPC_STATUS_UNAVAILABLE, None, str(exc), self._since(start)
            )
        except ConnectionClosed as exc:
            why = str(exc) or "connection closed"
            return RpcOutcome(collector_id, RPC_STATUS_UNAVAILABLE, None, why, self._since(start))
        except RequestFailed as exc:
            return RpcOutcome(collector_id, RPC_STATUS_ERROR, None, exc.reason, self._since(start))
        finally:
            self._calls.pop(inner, None)
        status, error = _reply_status(reply)
        return RpcOutcome(collector_id, status, reply, error, self._since(start))

    @staticmethod
    def _since(start: float) -> float:
        return asyncio.get_running_loop().time() - start

    def cancel(self, collector_id: str | None = None) -> int:
        """Cancel the calls waiting (those to ``collector_id``, if given): each
        returns CANCELLED. Returns how many."""
        doomed = [t for t, c in self._calls.items() if collector_id is None or c == collector_id]
        for task in doomed:
            task.cancel()
        return len(doomed)

    # -- the typed calls -------------------------------------------------------------

    async def health(
        self, collector_id: str, *, diagnostics: bool = False, timeout: float | None = None
    ) -> RpcOutcome[HealthCheckReply]:
        """The collector's health (``HealthCheckReply``)."""
        request = HealthCheckRequest(component_id=collector_id, include_diagnostics=diagnostics)
        topic = registry.control_collector_rpc_health(id=collector_id)
        return await self.call(topic, collector_id, request, timeout=timeout)

    async def configure(
        self,
        collector_id: str,
        update: ConfigurationUpdate | Mapping[str, str],
        *,
        version: int = 0,
        timeout: float | None = None,
    ) -> RpcOutcome[ConfigurationAck]:
        """Give the collector new configuration and wait for its acknowledgement.
        ``update`` is a ``ConfigurationUpdate`` or settings (then ``version``
        is the configuration's, the wall clock in ms if 0)."""
        if not isinstance(update, ConfigurationUpdate):
            update = ConfigurationUpdate(
                collector_id=collector_id,
                config_version=version or time.time_ns() // 1_000_000,
                settings=dict(update),
            )
        topic = registry.control_collector_rpc_config(id=collector_id)
        return await self.call(topic, collector_id, update, timeout=timeout)

    async def lifecycle(
        self,
        collector_id: str,
        action: LifecycleAction.ValueType,
        *,
        reason: str = "",
        timeout: float | None = None,
    ) -> RpcOutcome[LifecycleReply]:
        """Start, stop or restart the collector (``LIFECYCLE_ACTION_*``)."""
        command = CollectorLifecycleCommand(collector_id=collector_id, action=action, reason=reason)
        topic = registry.control_collector_rpc_lifecycle(id=collector_id)
        return await self.call(topic, collector_id, command, timeout=timeout)

    async def execute(
        self,
        collector_id: str,
        task: TaskAssignment,
        *,
        timeout: float | None = None,
        correlation: CorrelationMetadata | None = None,
    ) -> RpcOutcome[TaskAck]:
        """Hand the collector a task directly and wait for its ``TaskAck``
        (the result follows on ``control.collector.result``)."""
        copy = TaskAssignment()
        copy.CopyFrom(task)
        copy.collector_id = collector_id
        copy.attempt = copy.attempt or 1
        topic = registry.control_collector_rpc_task(id=collector_id)
        return await self.call(topic, collector_id, copy, timeout=timeout, correlation=correlation)
