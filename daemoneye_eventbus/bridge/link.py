"""The bridge's connection to NATS (nats-py), and its JetStream stream.

:class:`NatsLink` connects in the background and keeps reconnecting for as
long as the bridge runs (nats-py's own reconnection, with no limit on the
attempts), so that the bridge starts, and spools, while NATS is away. It
tells the sender when the link goes down and comes back (:attr:`generation`
counts the connections, :meth:`wait_up`).

:func:`ensure_stream` creates the stream the bridge publishes to, or checks
that an existing one stores every subject the bridge forwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Final

import nats
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from daemoneye_eventbus.bridge.config import BridgeConfig, BridgeConfigError, NatsOptions
from daemoneye_eventbus.bridge.stats import BridgeCounters
from daemoneye_eventbus.bridge.subjects import subject_covers

__all__ = ["NatsLink", "ensure_stream"]

log = logging.getLogger("daemoneye_eventbus.bridge")

#: Seconds between two connection attempts while NATS is away.
RECONNECT_WAIT: Final = 0.5
#: At most one log line per this many seconds about a failing connection.
_LOG_EVERY: Final = 10.0


class NatsLink:
    """One NATS connection for the bridge's lifetime, reconnecting by itself."""

    def __init__(
        self,
        options: NatsOptions,
        counters: BridgeCounters,
        *,
        max_in_flight: int,
        on_change: Callable[[], None],
    ) -> None:
        self._options = options
        self._counters = counters
        self._max_in_flight = max_in_flight
        self._on_change = on_change
        self._up = asyncio.Event()
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_log = 0.0
        self._closing = False
        #: Incremented every time the link goes down: work begun on one
        #: connection is redone on the next.
        self.generation = 0

    @property
    def up(self) -> bool:
        return self._up.is_set()

    @property
    def nc(self) -> NatsClient:
        if self._nc is None:
            raise RuntimeError("not connected to NATS yet")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError("not connected to NATS yet")
        return self._js

    def start(self, options: dict[str, Any], on_failure: Callable[[BaseException], None]) -> None:
        """Begin connecting (in the background) with ``options``
        (:meth:`NatsOptions.connect_options`, read by the caller before it opens
        anything). An error of the connection that retrying cannot mend
        (nats-py refusing the options) goes to ``on_failure``.
        """
        task = asyncio.get_running_loop().create_task(self._connect(options))

        def done(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and not self._closing and task.exception() is not None:
                on_failure(task.exception() or RuntimeError("NATS connection failed"))

        task.add_done_callback(done)
        self._task = task

    async def wait_up(self) -> None:
        await self._up.wait()

    async def _connect(self, options: dict[str, Any]) -> None:
        self._nc = await nats.connect(
            **options,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=RECONNECT_WAIT,
            disconnected_cb=self._disconnected,
            reconnected_cb=self._reconnected,
            error_cb=self._error,
        )
        self._js = self._nc.jetstream(publish_async_max_pending=self._max_in_flight + 64)
        url = self._nc.connected_url
        log.info("connected to NATS at %s", url.netloc if url else "?")
        self._set(True)

    def _set(self, up: bool) -> None:
        if up == self._up.is_set():
            return
        if up:
            self._up.set()
        else:
            self._up.clear()
            self.generation += 1
            self._counters.disconnects += 1
        self._on_change()

    async def _disconnected(self) -> None:
        if self._nc is not None and self.up and not self._closing:
            log.warning("the link to NATS is down; spooling events until it is back")
        self._set(False)

    async def _reconnected(self) -> None:
        log.info("the link to NATS is back")
        self._set(True)

    async def _error(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY:
            self._last_log = now
            log.warning("NATS: %s", exc or type(exc).__name__)

    async def close(self) -> None:
        """Stop connecting, or close the connection."""
        self._closing = True
        if self._task is not None:
            # nats.connect may swallow a cancellation: when a connection attempt
            # fails at the same moment, asyncio.wait_for (Python 3.11) raises the
            # attempt's error instead, and nats-py's endless retry loop catches it.
            # So cancel until the task has ended (the next cancel lands in its
            # wait between two attempts).
            while not self._task.done():
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=RECONNECT_WAIT)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
        self._up.clear()


async def ensure_stream(js: JetStreamContext, config: BridgeConfig) -> js_api.StreamInfo:
    """Create the bridge's stream, or check the one there.

    Created with the configured subjects (:meth:`BridgeConfig.effective_stream_subjects`),
    file storage, limits retention (``max_age``, ``stream_max_bytes``; the oldest
    go first) and the duplicate window. An existing stream must store every
    forwarded subject (:class:`BridgeConfigError` if not: nothing would keep the
    events); a shorter duplicate window than configured is logged.
    """
    try:
        info = await js.stream_info(config.stream)
    except NotFoundError:
        if not config.create_stream:
            raise BridgeConfigError(
                f"JetStream has no stream {config.stream!r} and the bridge may not create it"
            ) from None
        stream = js_api.StreamConfig(
            name=config.stream,
            subjects=list(config.effective_stream_subjects()),
            retention=js_api.RetentionPolicy.LIMITS,
            discard=js_api.DiscardPolicy.OLD,
            storage=js_api.StorageType.FILE,
            max_age=config.max_age,
            max_bytes=config.stream_max_bytes,
            duplicate_window=config.duplicate_window,
            num_replicas=config.replicas,
            description="daemoneye-eventbus events forwarded by host bridges",
        )
        info = await js.add_stream(stream)
        log.info("created JetStream stream %s for %s", config.stream, stream.subjects)
        return info
    subjects = info.config.subjects or []
    for subject in config.forward_subjects():
        if not any(subject_covers(pattern, subject) for pattern in subjects):
            raise BridgeConfigError(
                f"JetStream stream {config.stream!r} stores {subjects}, not the forwarded "
                f"subject {subject!r}"
            )
    window = info.config.duplicate_window or 0.0
    if window < config.duplicate_window:
        log.warning(
            "stream %s drops re-sent copies within %.0f s only (the bridge asks for %.0f s)",
            config.stream,
            window,
            config.duplicate_window,
        )
    return info
