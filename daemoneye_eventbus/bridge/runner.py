"""The bridge: one host's bus and a NATS JetStream cluster, run in one event loop.

::

    config = BridgeConfig(host_id="web-01", spool_path="/var/lib/daemoneye/bridge.spool",
                          nats=NatsOptions(servers=("nats://nats.example:4222",)))
    async with Bridge(config) as bridge:   # connects, subscribes, starts forwarding
        await bridge.wait()                # until closed, or a fatal error

The bridge is a client of the local broker (component ``bridge``, over the
broker's socket or pipe, reconnecting if the broker restarts) and of NATS
(reconnecting for as long as it runs). The command line
(``daemoneye-eventbus bridge``) runs exactly this; an agent runs it in its own
loop the same way. Outbound and inbound are in
:mod:`~daemoneye_eventbus.bridge.outbound` and
:mod:`~daemoneye_eventbus.bridge.inbound`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType
from typing import Final, Self

from daemoneye_eventbus.access import AuditLog
from daemoneye_eventbus.bridge.config import BridgeConfig
from daemoneye_eventbus.bridge.inbound import InboundControl
from daemoneye_eventbus.bridge.link import NatsLink
from daemoneye_eventbus.bridge.outbound import Forwarder, Sender
from daemoneye_eventbus.bridge.spool import Spool
from daemoneye_eventbus.bridge.stats import BridgeCounters, BridgeStatistics
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.errors import EventBusError
from daemoneye_eventbus.transports import DEFAULT_ADDRESS

__all__ = ["Bridge"]

log = logging.getLogger("daemoneye_eventbus.bridge")

#: Seconds a closing bridge waits for the acknowledgements of what it sent.
FINISH_TIMEOUT: Final = 2.0


class Bridge:
    """Forwards local events to JetStream, and (``config.control``) the fleet's
    control messages to the local bus. Use as an async context manager, or
    :meth:`start` and :meth:`close`."""

    def __init__(self, config: BridgeConfig, *, audit: AuditLog | None = None) -> None:
        config.check()
        self.config = config
        #: Where refused inbound control messages are recorded.
        self.audit = audit or AuditLog()
        self._counters = BridgeCounters()
        self._wake = asyncio.Event()
        self._spool: Spool | None = None
        self._client: Client | None = None
        self._link: NatsLink | None = None
        self._forwarder: Forwarder | None = None
        self._sender: Sender | None = None
        self._inbound: InboundControl | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._done = asyncio.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- life ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the spool, connect to the local broker and subscribe, begin
        connecting to NATS. Raises if the spool or the broker cannot be used;
        NATS being away is not an error (events are spooled)."""
        config = self.config
        self._loop = asyncio.get_running_loop()
        # In a thread: opening waits for the file's lock (``SpoolLocked`` after
        # its timeout), which the event loop should not.
        # The secret and TLS files first: one missing is a configuration error
        # before anything is opened or connected.
        options = config.nats.connect_options()
        self._spool = await asyncio.to_thread(
            Spool,
            config.spool_path,
            max_events=config.spool_max_events,
            max_bytes=config.spool_max_bytes,
        )
        try:
            self._client = Client(
                config.broker_address or DEFAULT_ADDRESS,
                name=f"bridge-{config.host_id}",
                component=config.component,
                reconnect=True,
            )
            # Refusals of inbound control messages are counted and audited by the
            # bridge itself; the client need not log them again.
            self._client.on_error = lambda exc: None
            await self._client.connect()
            self._link = NatsLink(
                config.nats,
                self._counters,
                max_in_flight=config.max_in_flight,
                on_change=self._wake.set,
            )
            self._forwarder = Forwarder(
                self._client, self._spool, config, self._counters, self._wake
            )
            await self._forwarder.subscribe()
            self._sender = Sender(self._spool, self._link, config, self._counters, self._wake)
            self._link.start(options, self._fail)
            self._spawn(self._forwarder.run(), "forwarder")
            self._spawn(self._send(), "sender")
            if config.control:
                self._inbound = InboundControl(
                    self._client, self._link, config, self._counters, self.audit
                )
                self._spawn(self._start_inbound(), "inbound control")
        except BaseException:
            await self.close()
            raise
        log.info(
            "bridge for host %s: forwarding %s to stream %s%s",
            config.host_id,
            ", ".join(config.forward),
            config.stream,
            "; carrying the fleet's control messages" if config.control else "",
        )

    def _spawn(self, coro: object, what: str) -> None:
        assert asyncio.iscoroutine(coro)
        task = asyncio.get_running_loop().create_task(coro, name=f"bridge {what}")
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._fail(exc)
        self._done.set()

    def _fail(self, exc: BaseException) -> None:
        """Stop with ``exc`` (what :meth:`wait` raises)."""
        if self._error is None:
            self._error = exc
            log.error("the bridge stops: %s", exc)
        self._done.set()

    async def _send(self) -> None:
        assert self._sender is not None
        await self._sender.run()
        if self._sender.fatal is not None:
            raise self._sender.fatal

    async def _start_inbound(self) -> None:
        assert self._link is not None
        assert self._inbound is not None
        await self._link.wait_up()
        # nats-py subscribes again by itself after a reconnect.
        await self._inbound.subscribe()

    async def wait(self) -> None:
        """Return when the bridge is closed; raise the error that stopped it, if any."""
        await self._done.wait()
        if self._error is not None:
            raise self._error

    async def close(self) -> None:
        """Stop: spool what was received, wait briefly for acknowledgements, disconnect."""
        if self._inbound is not None:
            await self._inbound.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._forwarder is not None:
            with contextlib.suppress(EventBusError, OSError):
                await self._forwarder.stop()
        if self._sender is not None and self._link is not None and self._link.up:
            await self._sender.finish(FINISH_TIMEOUT)
        if self._link is not None:
            await self._link.close()
        if self._client is not None:
            with contextlib.suppress(EventBusError, OSError):
                await self._client.close()
        if self._spool is not None:
            self._spool.close()
        self._done.set()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- figures -------------------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the bridge runs on, once started (None before)."""
        return self._loop

    @property
    def link_up(self) -> bool:
        """Whether the bridge is connected to NATS."""
        return self._link is not None and self._link.up

    def statistics(self) -> BridgeStatistics:
        """A snapshot of the bridge's figures."""
        spool = self._spool
        return self._counters.snapshot(
            missed=self._forwarder.missed if self._forwarder is not None else 0,
            spool_dropped=spool.dropped if spool is not None else 0,
            spool_depth=spool.depth if spool is not None else 0,
            spool_bytes=spool.bytes if spool is not None else 0,
            in_flight=self._sender.in_flight if self._sender is not None else 0,
            link_up=self.link_up,
        )

    def latencies(self) -> list[float]:
        """The latest forward latencies, in seconds: from the broker accepting an
        event to JetStream acknowledging it (at most the last 100,000)."""
        return list(self._counters.latencies)
