"""The broker: lifecycle, admission, housekeeping and statistics.

The broker runs inside the caller's event loop (``async with Broker(...)`` or
``await broker.start()`` / ``await broker.close()``), or standalone through
``daemoneye-eventbus serve``. It owns a
:class:`~daemoneye_eventbus.transports.Listener` that accepts connections, a
:class:`~daemoneye_eventbus.router.Router` that decides who gets each event,
and the sessions: one :class:`~daemoneye_eventbus.sessions.SocketSession` per
connection and a :class:`~daemoneye_eventbus.sessions.LocalSession` for each
in-process user (the agent, through
:class:`~daemoneye_eventbus.bus.DaemoneyeEventBus`). Sessions reach the broker
through the :class:`~daemoneye_eventbus.sessions.SessionHost` seam it
implements; everything else (routing, framing, delivery) lives in those
modules. docs/architecture.md draws the whole path of an event.
:meth:`Broker.metrics_registry` gives its figures to Prometheus
(:mod:`daemoneye_eventbus.metrics`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Self

from daemoneye_eventbus.access import AuditLog, Policy, account_key
from daemoneye_eventbus.budget import MemoryBudget
from daemoneye_eventbus.config import BrokerConfig
from daemoneye_eventbus.errors import BrokerError, ClosedResourceError
from daemoneye_eventbus.presence import Presence
from daemoneye_eventbus.router import Router
from daemoneye_eventbus.sessions import (
    LocalSession,
    Outbox,
    RequestDeadlines,
    Session,
    SocketSession,
)
from daemoneye_eventbus.statistics import (
    BrokerStatistics,
    BrokerTally,
    ConnectionStatistics,
    SubscriptionStatistics,
)
from daemoneye_eventbus.transports import Listener, listener, own_sid

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = [
    "Broker",
    "BrokerConfig",
    "BrokerStatistics",
    "ConnectionStatistics",
    "LocalSession",
    "SubscriptionStatistics",
    "protobuf_backend",
]

log = logging.getLogger("daemoneye_eventbus.broker")


def _default_policy() -> Policy:
    """The policy without a file: the broker's uid and root are trusted (Unix);
    on Windows, where peers have no uid, LocalSystem, the Administrators group
    and the broker's own user SID are."""
    if sys.platform == "win32":
        return Policy.default(-1, broker_sid=own_sid())
    return Policy.default(os.geteuid())


class Broker:
    """The message broker, listening on a local address (a Unix socket path, or a
    named pipe's name on Windows).

    Use as ``async with Broker(path) as broker:`` or call :meth:`start` and
    :meth:`close`. The socket file is removed on close (a directory created
    for it is left in place). ``before_serving`` is called once the address is
    claimed and before the first connection is accepted (``serve --user`` drops
    its privileges there); if it raises, :meth:`start` releases the address
    and raises that error.
    """

    def __init__(
        self,
        path: str,
        config: BrokerConfig | None = None,
        *,
        before_serving: Callable[[], None] | None = None,
    ) -> None:
        self.path = path
        self._config = config or BrokerConfig()
        self._before_serving = before_serving
        #: Who may act as which component (the default policy without a file).
        self._policy = self._config.policy or _default_policy()
        #: Structured, rate-limited log of refusals.
        self._audit = AuditLog()
        self._router = Router(self._config, self._audit)
        self._outbox = Outbox()
        #: Presence events on control.presence, and the last wills of sessions.
        self._presence = Presence(self._router, self._outbox.schedule)
        # The timer of the requests waiting for replies (REQUEST_TIMEOUT).
        self._deadlines = RequestDeadlines(self._router.requests, self._outbox)
        self._budget = MemoryBudget(self._config)
        self._listener: Listener | None = None
        self._sessions: set[SocketSession] = set()
        self._local_sessions: set[LocalSession] = set()
        # Open connections by peer account: uid, or user SID on Windows.
        self._per_uid: collections.Counter[int | str] = collections.Counter()
        self._housekeeper: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = asyncio.Event()
        #: The protobuf runtime, checked at start-up ("upb" expected).
        self.protobuf_backend = ""
        self.connections_total = 0
        #: Refusals the broker makes itself, by code, and its event loop's lag.
        self.tally = BrokerTally()
        self._metrics: CollectorRegistry | None = None
        #: Seconds of rate limiting of ended connections, by (rate-limited) component.
        self._throttled_gone: dict[str, float] = {}

    # -- the seam sessions use (SessionHost) ------------------------------------------

    @property
    def config(self) -> BrokerConfig:
        return self._config

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def audit(self) -> AuditLog:
        return self._audit

    @property
    def router(self) -> Router:
        return self._router

    @property
    def outbox(self) -> Outbox:
        return self._outbox

    @property
    def budget(self) -> MemoryBudget:
        return self._budget

    @property
    def listener(self) -> Listener | None:
        return self._listener

    @property
    def closing(self) -> bool:
        return self._closing

    def admit(self, session: Session) -> str | None:
        """Count a new connection in, or say why it is refused."""
        if self._closing:
            return "broker is shutting down"
        if not isinstance(session, SocketSession):
            raise TypeError("only socket sessions are admitted; use local_session()")
        if len(self._sessions) >= self._config.max_connections:
            return f"connection limit of {self._config.max_connections} reached"
        uid = account_key(session.peer)
        if self._per_uid[uid] >= self._config.max_connections_per_uid:
            return f"connection limit of {self._config.max_connections_per_uid} per user reached"
        self._sessions.add(session)
        self._per_uid[uid] += 1
        self.connections_total += 1
        return None

    def opened(self, session: Session) -> None:
        """A socket session completed its handshake: publish its CONNECTED presence."""
        if isinstance(session, SocketSession):
            self._presence.connected(session)

    def release(self, session: Session) -> None:
        """Forget a session that ended (its connection slot, its subscriptions); announce
        a socket session's end, after its last will if due (not at shutdown)."""
        if session.throttled:
            gone = self._throttled_gone
            gone[session.component] = gone.get(session.component, 0.0) + session.throttled
        if isinstance(session, SocketSession):
            if session in self._sessions:
                self._sessions.discard(session)
                uid = account_key(session.peer)
                self._per_uid[uid] -= 1
                if self._per_uid[uid] <= 0:
                    del self._per_uid[uid]
            self._outbox.pending.discard(session)
        elif isinstance(session, LocalSession):
            self._local_sessions.discard(session)
        self._router.detach(session.endpoint)
        if isinstance(session, SocketSession):
            self._presence.disconnected(session, wills=not self._closing)

    def count_refusal(self, code: int, *, handshake: bool = False) -> None:
        self.tally.refuse(code, handshake=handshake)

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Claim the address, call ``before_serving``, then start accepting connections."""
        if self._listener is not None:
            raise BrokerError("broker already started")
        self.protobuf_backend = protobuf_backend()
        if self.protobuf_backend != "upb":
            # The pure-Python decoder is much slower and recurses on nesting.
            log.warning(
                "protobuf backend is %r, not the fast 'upb' one: install a protobuf "
                "wheel for this platform (PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION unset)",
                self.protobuf_backend,
            )
        cfg = self._config
        listening = listener(
            self.path,
            mode=cfg.socket_mode,
            group=cfg.socket_group,
            send_buffer=cfg.socket_send_buffer,
            pipe_sddl=cfg.pipe_sddl,
        )
        await listening.start(lambda: SocketSession(self), serve=False)
        self._listener = listening
        try:
            if self._before_serving is not None:
                self._before_serving()  # bound, not accepting yet: self.listener is set
            await listening.serve()
        except BaseException:
            self._listener = None
            listening.close()
            await listening.wait_closed()
            raise
        self._housekeeper = asyncio.create_task(
            _housekeeping(self), name=f"eventbus[broker {self.path}].housekeeping"
        )
        log.info("broker listening on %s", self.path)

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

    @property
    def is_serving(self) -> bool:
        return self._listener is not None and not self._closing

    async def close(self, timeout: float | None = None) -> None:
        """Shut down: stop accepting, say goodbye, drain within ``timeout``, close.

        ``timeout`` defaults to the configured ``drain_timeout``. The socket
        file is removed whatever happens.
        """
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        deadline = self._config.drain_timeout if timeout is None else timeout
        try:
            if self._listener is not None:
                self._listener.close()
            for session in list(self._sessions):
                session.goodbye("broker shutting down")
            for local in list(self._local_sessions):
                local.end()
            if self._sessions:
                waiters = [s.closed for s in self._sessions]
                _, pending = await asyncio.wait(waiters, timeout=deadline)
                if pending:
                    log.warning("%d connections did not drain in time", len(pending))
                for session in list(self._sessions):
                    session.abort()
            if self._housekeeper is not None:
                self._housekeeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._housekeeper
            if self._listener is not None:
                await self._listener.wait_closed()
        finally:
            if self._listener is not None:
                self._listener.close()
            self._closed.set()
            log.info("broker on %s closed", self.path)

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` has finished."""
        await self._closed.wait()

    def local_session(self, name: str = "in-process", component: str = "") -> LocalSession:
        """A session for in-process publishers and subscribers (no socket)."""
        if self._closing:
            raise ClosedResourceError("broker is closed")
        session = LocalSession(self, name, component)
        self._local_sessions.add(session)
        return session

    # -- what is going on ---------------------------------------------------------

    def sessions(self) -> Iterator[Session]:
        """Every open session: socket connections first, then in-process ones."""
        yield from self._sessions
        yield from self._local_sessions

    @property
    def connections(self) -> int:
        """Open socket connections."""
        return len(self._sessions)

    def connections_per_uid(self) -> dict[int | str, int]:
        """Open socket connections by peer uid (Windows: user SID; -1: unknown)."""
        return dict(self._per_uid)

    @property
    def published(self) -> int:
        return self._router.published

    @property
    def delivered(self) -> int:
        return self._router.delivered

    @property
    def dropped(self) -> int:
        return self._router.dropped

    @property
    def refused(self) -> int:
        """Refusals: by the router (publish, subscribe) and the broker (connections, handshakes)."""
        return self._router.refused + self.tally.refused

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the broker runs on, once started."""
        return self._housekeeper.get_loop() if self._housekeeper is not None else None

    def metrics_registry(self) -> CollectorRegistry:
        """A Prometheus registry of the broker's figures (and its process's), read at
        scrape time; the same one on every call. Serve it with ``serve
        --metrics-listen`` or mount it on an endpoint (``make_asgi_app(registry)``)."""
        if self._metrics is None:
            from daemoneye_eventbus.metrics import broker_registry  # imports prometheus_client

            self._metrics = broker_registry(self)
        return self._metrics

    @property
    def last_wills(self) -> int:
        """Last wills published for sessions that ended without a goodbye, so far."""
        return self._presence.wills

    @property
    def throttled_seconds(self) -> float:
        """Seconds reading was paused for rate limits, over every connection so far."""
        return sum(self.throttled_by_component().values())

    def throttled_by_component(self) -> dict[str, float]:
        """Seconds reading was paused for rate limits, by component, so far."""
        out: dict[str, float] = dict(self._throttled_gone)
        for s in self._sessions:
            if s.throttled:
                out[s.component] = out.get(s.component, 0.0) + s.throttled
        return out

    def statistics(self) -> BrokerStatistics:
        """A frozen snapshot of the broker's figures."""
        return _snapshot(self)


async def _housekeeping(broker: Broker) -> None:
    """Heartbeats, idle peers and stuck subscribers, a few times a second."""
    cfg = broker.config
    tick = max(0.02, min(0.25, cfg.heartbeat_interval / 4, cfg.slow_consumer_timeout / 4))
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + tick
        await asyncio.sleep(tick)
        now = loop.time()
        broker.tally.record_lag(now - due)  # how late the loop got to this wake-up
        for session in list(broker._sessions):
            session.check(now)
        for local in list(broker._local_sessions):
            local.check(now)


def _snapshot(broker: Broker) -> BrokerStatistics:
    """:meth:`Broker.statistics`, from the broker's public figures."""
    conns: list[ConnectionStatistics] = []
    subs: list[SubscriptionStatistics] = []
    for s in broker.sessions():
        depth_msgs, depth_bytes = s.queue_depth()
        conns.append(
            ConnectionStatistics(
                s.session_id,
                s.client_name,
                s.component,
                s.peer,
                depth_msgs,
                depth_bytes,
                s.published,
                s.endpoint.invalid_payloads,
                s.throttled,
                broker.router.requests.pending(s.endpoint),
            )
        )
        subs.extend(
            SubscriptionStatistics(
                s.session_id,
                sub.subscription_id,
                sub.filter,
                sub.delivered,
                sub.dropped,
                sub.flow is not None and sub.flow.lossless,
                sub.flow.held_events if sub.flow is not None else 0,
            )
            for sub in s.endpoint.subscriptions.values()
        )
    return BrokerStatistics(
        connections=broker.connections,
        connections_total=broker.connections_total,
        published=broker.published,
        delivered=broker.delivered,
        dropped=broker.dropped,
        refused=broker.refused,
        connection_stats=tuple(conns),
        subscription_stats=tuple(subs),
        invalid_payloads=broker.router.invalid_payloads,
        throttled_seconds=broker.throttled_seconds,
        topic_stats=tuple(sorted(broker.router.topic_counts().items())),
        retained_events=len(broker.router.retained),
        retained_bytes=broker.router.retained.encoded_bytes,
        requests=broker.router.requests.requests,
        no_responders=broker.router.requests.no_responders,
        request_timeouts=broker.router.requests.timeouts,
    )


def protobuf_backend() -> str:
    """The protobuf runtime in use: 'upb' (fast, C), 'cpp' or 'python'."""
    from google.protobuf.internal import api_implementation

    return str(api_implementation.Type())
