"""The collector's side of the control plane, on the bus (asyncio).

:class:`Collector` connects as its component (``procmond``, ``netmond``, ...)
with a last will (``ComponentStatus`` UNHEALTHY on ``control.health.status``,
so that a collector that dies is noticed), applies the retained
``control.collector.config``, serves its request topics
(``control.collector.rpc.{task,health,config,lifecycle}.{id}`` and the work
queue ``control.collector.queue.{type}`` of each task type), takes the tasks
published to it alone on ``control.collector.task.{type}.{id}`` (lossless; a
refusal there is published as the task's ERROR result), registers on
``control.collector.registration`` and heartbeats at its interval with its
load. It registers again whenever it is asked for its health: an agent that
started after it hears its heartbeats, asks, and so learns of it. Each
task it accepts runs the ``handler`` (at most ``max_concurrent_tasks`` at
once; beyond that it refuses with an ERROR ack), which reports progress
and returns the result; the collector publishes the ``TaskResult`` on
``control.collector.result`` with the task's correlation. Task ids are
remembered: a task handed out again after it finished is answered from
memory (its result published again), one
still running is acknowledged IN_PROGRESS and not run twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from contextvars import ContextVar
from typing import Any, Self

from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message

from daemoneye.eventbus.v1 import registry as topics
from daemoneye.eventbus.v1.control_pb2 import (
    HEALTH_STATE_DEGRADED,
    HEALTH_STATE_HEALTHY,
    HEALTH_STATE_STARTING,
    HEALTH_STATE_STOPPING,
    HEALTH_STATE_UNHEALTHY,
    LIFECYCLE_ACTION_RESTART,
    LIFECYCLE_ACTION_START,
    LIFECYCLE_ACTION_STOP,
    RPC_STATUS_ERROR,
    RPC_STATUS_IN_PROGRESS,
    RPC_STATUS_SUCCESS,
    CollectorCapability,
    CollectorRegistration,
    ComponentStatus,
    ConfigurationAck,
    ConfigurationUpdate,
    HealthCheckReply,
    Heartbeat,
    LifecycleReply,
    TaskAck,
    TaskAssignment,
    TaskProgress,
    TaskResult,
)
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationMetadata
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.errors import EventBusError
from daemoneye_eventbus.responders import IncomingRequest, Responder
from daemoneye_eventbus.subscription import Subscription

__all__ = ["Collector", "Progress", "TaskHandler", "TaskRunner", "task_correlation"]

log = logging.getLogger("daemoneye_eventbus.control")

#: Reports how far a task has got: ``await progress(percent, detail)``.
Progress = Callable[[float, str], Awaitable[None]]
#: Runs one task: returns its ``TaskResult`` (the collector fills in the ids,
#: status and times left unset), its result fields, or None. An exception
#: fails the task (status ERROR, its text as the error).
TaskHandler = Callable[[TaskAssignment, Progress], Awaitable[TaskResult | Mapping[str, str] | None]]


_TASK_CORRELATION: ContextVar[CorrelationMetadata | None] = ContextVar(
    "daemoneye_task_correlation", default=None
)


def task_correlation() -> CorrelationMetadata | None:
    """The correlation the running task came with, for a handler to publish
    its events under (None outside a task, or for a task sent without one)."""
    return _TASK_CORRELATION.get()


async def _nothing(task: TaskAssignment, progress: Progress) -> None:
    return None


class TaskRunner:
    """The tasks of one collector: accepts or refuses each hand-out, runs the
    handler (at most ``max_concurrent_tasks`` at once), remembers the last
    ``remember`` results by task id, publishes progress and results."""

    def __init__(
        self,
        client: Client,
        collector_id: str,
        handler: TaskHandler,
        max_concurrent_tasks: int,
        remember: int,
    ) -> None:
        self.client = client
        self.collector_id = collector_id
        self.handler = handler
        self.max_concurrent_tasks = max(1, max_concurrent_tasks)
        self.remember = remember
        #: Set by the collector while it serves.
        self.group: asyncio.TaskGroup | None = None
        #: True after a lifecycle STOP: tasks are refused until START.
        self.paused = False
        #: Tasks accepted, finished, refused, and hand-outs answered from memory.
        self.accepted = 0
        self.finished = 0
        self.refused = 0
        self.repeated = 0
        #: The tasks running, by id; the results of those finished, with their correlation.
        self.active: dict[str, asyncio.Task[None]] = {}
        self.done: OrderedDict[str, tuple[TaskResult, CorrelationMetadata | None]] = OrderedDict()

    @property
    def load(self) -> float:
        return min(1.0, len(self.active) / self.max_concurrent_tasks)

    def cancel_all(self) -> None:
        for task in list(self.active.values()):
            task.cancel()

    async def offer(self, request: IncomingRequest[TaskAssignment, TaskAck]) -> None:
        """A task handed out as a request: accepted or refused in the reply."""
        task = request.message
        repeated = task.task_id in self.done
        await request.reply(self.decide(task, request.correlation))
        if repeated:
            await self.republish(task.task_id)

    async def take(self, task: TaskAssignment, correlation: CorrelationMetadata | None) -> None:
        """A task published on the collector's targeted topic, with no reply to
        give: a refusal is published as the task's ERROR result."""
        if task.task_id in self.done:
            self.decide(task, correlation)
            await self.republish(task.task_id)
            return
        ack = self.decide(task, correlation)
        if ack.status == RPC_STATUS_ERROR:
            refused = TaskResult(
                task_id=task.task_id,
                collector_id=self.collector_id,
                status=RPC_STATUS_ERROR,
                error=f"refused: {ack.error}",
                task_type=task.task_type,
                attempt=task.attempt,
            )
            await self.client.publish(
                topics.CONTROL_COLLECTOR_RESULT, refused, correlation=correlation
            )

    async def republish(self, task_id: str) -> None:
        """Publish again the result of a task handed out again after it finished."""
        result, correlation = self.done[task_id]
        await self.client.publish(topics.CONTROL_COLLECTOR_RESULT, result, correlation=correlation)

    def decide(self, task: TaskAssignment, correlation: CorrelationMetadata | None) -> TaskAck:
        """Accept (and start) or refuse ``task``; the acknowledgement that says which."""
        ack = TaskAck(task_id=task.task_id, collector_id=self.collector_id)
        if task.task_id in self.done:  # handed out again: answered from memory
            self.repeated += 1
            ack.status = RPC_STATUS_SUCCESS
            return ack
        if task.task_id in self.active:
            ack.status = RPC_STATUS_IN_PROGRESS
        elif not task.task_id:
            ack.status, ack.error = RPC_STATUS_ERROR, "a task needs an id"
        elif self.paused:
            ack.status, ack.error = RPC_STATUS_ERROR, "stopped"
        elif len(self.active) >= self.max_concurrent_tasks:
            ack.status, ack.error = RPC_STATUS_ERROR, "at its limit of tasks"
        elif self.group is None:
            ack.status, ack.error = RPC_STATUS_ERROR, "closing"
        else:
            ack.status = RPC_STATUS_SUCCESS
            self.accepted += 1
            self.active[task.task_id] = self.group.create_task(
                self.run(task, correlation), name=f"{self.collector_id}.task"
            )
        if ack.status == RPC_STATUS_ERROR:
            self.refused += 1
        return ack

    async def run(self, task: TaskAssignment, correlation: CorrelationMetadata | None) -> None:
        started = time.time_ns()
        _TASK_CORRELATION.set(correlation)  # this task's own context

        async def progress(percent: float, detail: str = "") -> None:
            report = TaskProgress(
                task_id=task.task_id,
                collector_id=self.collector_id,
                percent=percent,
                detail=detail,
            )
            report.reported_at.GetCurrentTime()
            await self.client.publish(
                topics.CONTROL_COLLECTOR_PROGRESS, report, correlation=correlation
            )

        result = TaskResult()
        try:
            returned = await self.handler(task, progress)
            if isinstance(returned, TaskResult):
                result.CopyFrom(returned)
            elif returned is not None:
                result.fields.update(returned)
            result.status = result.status or RPC_STATUS_SUCCESS
        except asyncio.CancelledError:
            self.active.pop(task.task_id, None)
            raise
        except Exception as exc:  # the task failed, not the collector
            result.status = RPC_STATUS_ERROR
            result.error = str(exc) or type(exc).__name__
        result.task_id = task.task_id
        result.collector_id = self.collector_id
        result.task_type = task.task_type
        result.attempt = task.attempt
        if not result.HasField("started_at"):
            result.started_at.FromNanoseconds(started)
        if not result.HasField("finished_at"):
            result.finished_at.GetCurrentTime()
        self.done[task.task_id] = (result, correlation)
        while len(self.done) > self.remember:
            self.done.popitem(last=False)
        self.active.pop(task.task_id, None)
        self.finished += 1
        with contextlib.suppress(EventBusError):
            await self.client.publish(
                topics.CONTROL_COLLECTOR_RESULT, result, correlation=correlation
            )


class Collector:
    """A collector on the bus; see the module docstring.

    ``async with Collector(socket, collector_id=..., ...) as collector:``
    connects, registers and serves until the block ends. A lifecycle STOP
    pauses it (it refuses tasks, stays connected and heartbeats), START or
    RESTART resumes it. ``settings`` holds the configuration in effect.
    """

    def __init__(
        self,
        socket: str,
        *,
        collector_id: str,
        component: str = "procmond",
        collector_type: str = "process",
        task_types: Iterable[str] = (),
        capabilities: Iterable[str | CollectorCapability] = (),
        event_types: Iterable[str] = (),
        handler: TaskHandler = _nothing,
        max_concurrent_tasks: int = 1,
        heartbeat_interval: float = 1.0,
        version: str = "",
        remember: int = 1024,
        client: Client | None = None,
    ) -> None:
        self.collector_id = collector_id
        self.collector_type = collector_type
        self.task_types = tuple(task_types)
        self.capabilities = tuple(
            c if isinstance(c, CollectorCapability) else CollectorCapability(name=c)
            for c in capabilities
        )
        self.event_types = tuple(event_types)
        self.max_concurrent_tasks = max(1, max_concurrent_tasks)
        self.heartbeat_interval = heartbeat_interval
        self.version = version
        gone = ComponentStatus(
            component_id=collector_id, state=HEALTH_STATE_UNHEALTHY, message="connection lost"
        )
        self.client = client or Client(
            socket,
            name=collector_id,
            component=component,
            last_will=topics.CONTROL_HEALTH_STATUS(gone),
        )
        #: The configuration in effect, and its version.
        self.settings: dict[str, str] = {}
        self.config_version = 0
        #: Its tasks: what runs, what finished, the figures.
        self.tasks = TaskRunner(
            self.client, collector_id, handler, self.max_concurrent_tasks, remember
        )
        self._stack = contextlib.AsyncExitStack()
        self._group: asyncio.TaskGroup | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._sequence = 0
        self._started = 0.0

    @property
    def running(self) -> bool:
        """False after a lifecycle STOP, until START or RESTART."""
        return not self.tasks.paused

    @property
    def active_tasks(self) -> int:
        return len(self.tasks.active)

    @property
    def load(self) -> float:
        return self.tasks.load

    # -- life --------------------------------------------------------------------------

    async def start(self) -> Self:
        """Connect, apply the retained configuration, serve, register, heartbeat."""
        self._started = time.monotonic()
        stack = self._stack
        try:
            if not self.client.is_connected:
                await stack.enter_async_context(self.client)
            await self._apply_retained()
            group = await stack.enter_async_context(asyncio.TaskGroup())
            self._group = self.tasks.group = group
            cid = self.collector_id
            serving: list[tuple[Responder[Any, Any], Callable[[Any], Awaitable[None]]]] = [
                (self.client.serve(topics.control_collector_rpc_task(id=cid)), self.tasks.offer),
                (self.client.serve(topics.control_collector_rpc_health(id=cid)), self._on_health),
                (self.client.serve(topics.control_collector_rpc_config(id=cid)), self._on_config),
                (
                    self.client.serve(topics.control_collector_rpc_lifecycle(id=cid)),
                    self._on_lifecycle,
                ),
            ]
            serving += [
                (self.client.serve(topics.control_collector_queue(type=t)), self.tasks.offer)
                for t in self.task_types
            ]
            for responder, handle in serving:
                await stack.enter_async_context(responder)
                self._spawn(self._serve(responder, handle), f"{cid}.{responder.filter}")
            # Tasks published to this collector alone (declared lossless: none is
            # dropped while it falls behind), for every task type it runs.
            targeted = await stack.enter_async_context(
                await self.client.subscribe(f"control.collector.task.+.{cid}")
            )
            self._spawn(self._take(targeted), f"{cid}.task")
            await self.register()
            self._spawn(self._heartbeats(), f"{cid}.heartbeat")
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        """Stop serving and leave with a goodbye (no last will). Tasks still
        running are cancelled."""
        self.tasks.cancel_all()
        for task in list(self._background):
            task.cancel()
        self._group = self.tasks.group = None
        await self._stack.aclose()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        assert self._group is not None
        task = self._group.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def registration(self) -> CollectorRegistration:
        return CollectorRegistration(
            collector_id=self.collector_id,
            collector_type=self.collector_type,
            version=self.version,
            capabilities=self.capabilities,
            pid=os.getpid(),
            task_types=self.task_types,
            event_types=self.event_types,
            max_concurrent_tasks=self.max_concurrent_tasks,
            heartbeat_interval=_duration(self.heartbeat_interval),
            session_id=self.client.session_id,
        )

    async def register(self) -> None:
        """Announce the collector, then its first heartbeat (READY for tasks)."""
        await self.client.publish(topics.CONTROL_COLLECTOR_REGISTRATION, self.registration())
        await self.heartbeat()

    async def heartbeat(self) -> None:
        self._sequence += 1
        beat = Heartbeat(
            component_id=self.collector_id,
            sequence=self._sequence,
            active_tasks=self.active_tasks,
            max_concurrent_tasks=self.max_concurrent_tasks,
            load=self.load,
            interval=_duration(self.heartbeat_interval),
        )
        beat.sent_at.GetCurrentTime()
        await self.client.publish(topics.CONTROL_HEALTH_HEARTBEAT, beat)

    async def _heartbeats(self) -> None:
        with contextlib.suppress(EventBusError):
            while True:
                await asyncio.sleep(self.heartbeat_interval)
                await self.heartbeat()

    async def _take(self, targeted: Subscription[Message]) -> None:
        with contextlib.suppress(EventBusError):
            async for event in targeted:
                task = event.message()
                if not isinstance(task, TaskAssignment) or task.task_type not in self.task_types:
                    continue  # a task type this collector does not run
                try:
                    await self.tasks.take(task, event.correlation)
                except EventBusError as exc:
                    log.warning("%s: %s: %s", self.collector_id, event.topic, exc)

    async def _serve(
        self, responder: Responder[Any, Any], handle: Callable[[Any], Awaitable[None]]
    ) -> None:
        with contextlib.suppress(EventBusError):
            async for request in responder:
                try:
                    await handle(request)
                except EventBusError as exc:
                    log.warning("%s: %s: %s", self.collector_id, request.topic, exc)

    # -- configuration -----------------------------------------------------------------

    async def _apply_retained(self) -> None:
        """The retained configuration, if the broker holds one for us."""
        async with await self.client.subscribe(topics.CONTROL_COLLECTOR_CONFIG) as sub:
            with contextlib.suppress(TimeoutError, EventBusError):
                await self.client.flush()  # the retained event is queued before the ack
                event = sub.get_nowait()
                if event is not None:
                    self.apply(event.message())

    def apply(self, update: ConfigurationUpdate) -> bool:
        """Apply ``update`` if it is addressed to us (or to all) and newer."""
        if update.collector_id not in ("", self.collector_id):
            return False
        if update.config_version <= self.config_version:
            return False
        self.config_version = update.config_version
        self.settings.update(update.settings)
        return True

    async def _on_config(self, request: IncomingRequest[ConfigurationUpdate, Any]) -> None:
        self.apply(request.message)
        await request.reply(
            ConfigurationAck(
                collector_id=self.collector_id,
                status=RPC_STATUS_SUCCESS,
                applied_version=self.config_version,
                restart_pending=request.message.requires_restart,
            )
        )

    # -- health and lifecycle ----------------------------------------------------------

    def status(self) -> ComponentStatus:
        state = HEALTH_STATE_HEALTHY if self.running else HEALTH_STATE_DEGRADED
        status = ComponentStatus(
            component_id=self.collector_id,
            state=state,
            message="running" if self.running else "stopped",
            metrics={
                "active_tasks": float(self.active_tasks),
                "tasks_accepted": float(self.tasks.accepted),
                "tasks_finished": float(self.tasks.finished),
                "tasks_refused": float(self.tasks.refused),
                "load": self.load,
            },
        )
        status.uptime.CopyFrom(_duration(time.monotonic() - self._started))
        return status

    async def _on_health(self, request: IncomingRequest[Any, Any]) -> None:
        await request.reply(HealthCheckReply(status=RPC_STATUS_SUCCESS, component=self.status()))
        # An agent that started after us asks this when it hears a heartbeat from a
        # collector it does not know: announce ourselves again (and a heartbeat, READY).
        # An agent that knows us takes it as the same registration again.
        await self.register()

    async def _on_lifecycle(self, request: IncomingRequest[Any, Any]) -> None:
        action = request.message.action
        reply = LifecycleReply(collector_id=self.collector_id, status=RPC_STATUS_SUCCESS)
        if action == LIFECYCLE_ACTION_STOP:
            self.tasks.paused = True
            reply.state = HEALTH_STATE_STOPPING
        elif action == LIFECYCLE_ACTION_START:
            self.tasks.paused = False
            reply.state = HEALTH_STATE_HEALTHY
        elif action == LIFECYCLE_ACTION_RESTART:
            self.tasks.paused = False
            reply.state = HEALTH_STATE_STARTING
        else:
            reply.status = RPC_STATUS_ERROR
            reply.error = f"unknown lifecycle action {action}"
        await request.reply(reply)


def _duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d
