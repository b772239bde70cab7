"""Inbound control: the fleet's control messages, published on the local bus.

With ``--control`` the bridge subscribes (core NATS, not JetStream: a command
is for now, not for replay) to ``daemoneye.{host}.control.>`` and
``daemoneye.all.control.>``. Each message is checked
(:func:`~daemoneye_eventbus.bridge.inbound_check.check_inbound`) and then:

* on a request topic (``control.collector.rpc.…``, ``control.collector.queue.…``)
  it becomes a request on the local bus, and the local responder's reply goes
  back to the NATS requester (payload: the reply message; headers:
  ``Daemoneye-Status: ok`` and ``Daemoneye-Payload-Type``);
* on any other control topic it is published on the local bus; a sender
  that used a NATS request gets ``Daemoneye-Status: published``.

A refusal -- by the bridge's checks, or by the broker (a privileged topic
needs the bridge to be privileged in the broker's policy) -- is counted,
audit-logged (``bridge_inbound_refused``) and, if the sender waits for an
answer, answered with ``Daemoneye-Status: refused`` (or ``error`` for a
request that failed on the local bus), ``Daemoneye-Error`` (the bus's error
code name) and ``Daemoneye-Error-Message``.

Messages are handled one at a time for plain publishes (so that a refusal by
the broker is known before the next one) and up to ``max_inbound_pending``
requests at once; more wait in NATS's buffer for the subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Final

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription

from daemoneye.eventbus.v1.frames_pb2 import ErrorCode
from daemoneye_eventbus.access import AuditLog
from daemoneye_eventbus.bridge.config import BridgeConfig
from daemoneye_eventbus.bridge.headers import (
    ERROR,
    ERROR_MESSAGE,
    PAYLOAD_TYPE,
    STATUS,
    encode_value,
)
from daemoneye_eventbus.bridge.inbound_check import InboundCommand, check_inbound
from daemoneye_eventbus.bridge.link import NatsLink
from daemoneye_eventbus.bridge.stats import BridgeCounters
from daemoneye_eventbus.bridge.subjects import control_subjects
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.errors import EventBusError
from daemoneye_eventbus.registry_runtime import RequestTopic

__all__ = ["InboundControl"]

log = logging.getLogger("daemoneye_eventbus.bridge")

#: Largest inbound payload, unless the broker's limit is lower.
DEFAULT_MAX_PAYLOAD: Final = 1 << 20


def _code_name(exc: BaseException) -> str:
    code = exc.code if isinstance(exc, EventBusError) else 0
    if code and code in ErrorCode.values():
        return ErrorCode.Name(ErrorCode.ValueType(code)).removeprefix("ERROR_CODE_")
    return type(exc).__name__


class InboundControl:
    """The fleet's control subjects, carried to the local bus."""

    def __init__(
        self,
        client: Client,
        link: NatsLink,
        config: BridgeConfig,
        counters: BridgeCounters,
        audit: AuditLog,
    ) -> None:
        self._client = client
        self._link = link
        self._config = config
        self._counters = counters
        self._audit = audit
        self._subs: list[NatsSubscription] = []
        self._publish_lock = asyncio.Lock()
        self._requests = asyncio.Semaphore(config.max_inbound_pending)
        self._tasks: set[asyncio.Task[None]] = set()

    async def subscribe(self) -> None:
        """Subscribe to this host's and every host's control subjects."""
        nc = self._link.nc
        for subject in control_subjects(self._config.host_id):
            sub = await nc.subscribe(
                subject,
                cb=self._received,
                pending_msgs_limit=self._config.max_inbound_pending * 4,
            )
            self._subs.append(sub)

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _max_payload(self) -> int:
        # A frame holds the payload and its envelope: the broker's frame limit bounds it.
        limit = self._client.limits.max_frame_bytes
        return min(limit, DEFAULT_MAX_PAYLOAD) if limit else DEFAULT_MAX_PAYLOAD

    async def _received(self, msg: Msg) -> None:
        self._counters.inbound_received += 1
        try:
            command = check_inbound(
                self._config.host_id,
                self._config.component,
                msg.subject,
                msg.headers,
                msg.data,
                msg.reply or None,
                max_payload_bytes=self._max_payload(),
                default_timeout=self._config.request_timeout,
                max_timeout=self._config.max_request_timeout,
            )
        except EventBusError as exc:
            await self._refuse(msg, exc, by="bridge")
            return
        if command.request:
            # Requests wait for their reply: each in a task of its own (bounded),
            # so that one slow responder does not hold the others.
            await self._requests.acquire()
            task = asyncio.get_running_loop().create_task(self._request(msg, command))
            self._tasks.add(task)
            task.add_done_callback(self._request_done)
            return
        await self._publish(msg, command)

    def _request_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._requests.release()

    async def _publish(self, msg: Msg, command: InboundCommand) -> None:
        async with self._publish_lock:
            refused = self._client.statistics().refused
            try:
                await self._client.publish_raw(
                    command.topic.name,
                    command.topic.payload_name,
                    command.payload,
                    correlation=command.correlation,
                )
                # After the round trip the broker has handled the publish: a
                # refusal of it has arrived (as a non-fatal error) if there is one.
                await self._client.flush()
            except EventBusError as exc:
                await self._refuse(msg, exc, by="bus")
                return
            if self._client.statistics().refused != refused:
                error = self._client.last_error or EventBusError("refused by the broker")
                await self._refuse(msg, error, by="broker")
                return
        self._counters.inbound_published += 1
        log.info(
            "control message from the fleet published on %s%s",
            command.topic.name,
            " (sent to every host)" if command.broadcast else "",
        )
        await self._answer(msg, b"", {STATUS: "published"})

    async def _request(self, msg: Msg, command: InboundCommand) -> None:
        topic = command.topic
        assert isinstance(topic, RequestTopic)
        try:
            reply = await self._client.request(
                topic, command.message, timeout=command.timeout, correlation=command.correlation
            )
        except EventBusError as exc:
            self._counters.requests_failed += 1
            if exc.code == ErrorCode.ERROR_CODE_ACCESS_DENIED:
                await self._refuse(msg, exc, by="broker")
                return
            log.info("fleet request on %s failed: %s", topic.name, exc)
            await self._answer(
                msg,
                b"",
                {STATUS: "error", ERROR: _code_name(exc), ERROR_MESSAGE: encode_value(str(exc))},
            )
            return
        self._counters.requests_answered += 1
        await self._answer(
            msg,
            reply.SerializeToString(),
            {STATUS: "ok", PAYLOAD_TYPE: topic.reply_name},
        )

    async def _refuse(self, msg: Msg, exc: BaseException, *, by: str) -> None:
        self._counters.inbound_refused += 1
        self._audit.record(
            "bridge_inbound_refused",
            None,
            subject=msg.subject,
            refused_by=by,
            code=_code_name(exc),
            reason=str(exc),
        )
        await self._answer(
            msg,
            b"",
            {STATUS: "refused", ERROR: _code_name(exc), ERROR_MESSAGE: encode_value(str(exc))},
        )

    async def _answer(self, msg: Msg, payload: bytes, headers: dict[str, Any]) -> None:
        """Answer the sender, if it waits for an answer (a NATS request)."""
        if not msg.reply:
            return
        try:
            await self._link.nc.publish(msg.reply, payload, headers=headers)
        except Exception as exc:  # the link went down: the requester times out
            log.info("could not answer the fleet on %s: %s", msg.reply, exc)
