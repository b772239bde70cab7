"""What every broker session is, and what sessions need of the broker.

A session is one peer of the broker: a socket connection
(:class:`~daemoneye_eventbus.sessions.socket.SocketSession`) or in-process
code of the agent (:class:`~daemoneye_eventbus.sessions.local.LocalSession`).
To the router each is an :class:`~daemoneye_eventbus.router.Endpoint` whose
sink is the in-process session itself, or a socket session's
:class:`~daemoneye_eventbus.sessions.output.SocketOutput`. Sessions reach the broker only through
:class:`SessionHost`, the seam the broker implements.
"""

from __future__ import annotations

import abc
import asyncio
from typing import Protocol

from daemoneye_eventbus.access import AuditLog, PeerCredentials, Policy
from daemoneye_eventbus.budget import MemoryBudget
from daemoneye_eventbus.config import BrokerConfig
from daemoneye_eventbus.router import Endpoint, Router
from daemoneye_eventbus.statistics import BrokerStatistics
from daemoneye_eventbus.transports import Listener

__all__ = ["Flushable", "Outbox", "Session", "SessionHost"]


class Flushable(Protocol):
    """A session with output to write at the end of a loop turn."""

    def flush(self) -> None: ...


class Outbox:
    """The sessions that have deliveries queued, written together once per turn.

    Routing one publish queues frames for many sessions; each is written once
    at the end of the turn (or of the read that caused it), not per event.
    """

    def __init__(self) -> None:
        #: Sessions with queued output; add with ``pending.add``.
        self.pending: set[Flushable] = set()
        self._handle: asyncio.Handle | None = None

    def flush(self) -> None:
        """Write every pending session's queue now."""
        self._handle = None
        pending = self.pending
        while pending:
            pending.pop().flush()

    def schedule(self) -> None:
        """Write the pending sessions at the end of this loop turn."""
        if self.pending and self._handle is None:
            self._handle = asyncio.get_running_loop().call_soon(self.flush)


class SessionHost(Protocol):
    """What sessions need of the broker that holds them."""

    @property
    def config(self) -> BrokerConfig: ...

    @property
    def policy(self) -> Policy: ...

    @property
    def audit(self) -> AuditLog: ...

    @property
    def router(self) -> Router: ...

    @property
    def outbox(self) -> Outbox: ...

    @property
    def budget(self) -> MemoryBudget:
        """The broker's totals of pending output and partial input."""
        ...

    @property
    def listener(self) -> Listener | None: ...

    @property
    def closing(self) -> bool:
        """The broker is shutting down: no new sessions."""
        ...

    def admit(self, session: Session) -> str | None:
        """Count a new connection in, or say why it is refused."""
        ...

    def opened(self, session: Session) -> None:
        """A socket session completed its handshake (the broker announces it)."""
        ...

    def release(self, session: Session) -> None:
        """Forget a session that ended: its connection slot and subscriptions
        (and announce the end of a socket session, after its last will if due)."""
        ...

    def count_refusal(self, code: int, *, handshake: bool = False) -> None:
        """Count a refusal made outside the router (a connection, a handshake)
        with its wire ``ErrorCode``; ``handshake``: a handshake that failed."""
        ...

    def statistics(self) -> BrokerStatistics: ...


class Session(abc.ABC):
    """One peer of the broker, as the broker and the router see it."""

    #: The session's place in the router (its sink: see the module's description).
    endpoint: Endpoint
    #: The name the peer gave in its Hello (or the in-process name).
    client_name: str = ""

    @property
    def session_id(self) -> str:
        return self.endpoint.session_id

    @property
    def component(self) -> str:
        """The accepted component, or "" for an anonymous peer."""
        return self.endpoint.identity.component

    @property
    def peer(self) -> PeerCredentials | None:
        return self.endpoint.peer

    @property
    def published(self) -> int:
        return self.endpoint.published

    @property
    def throttled(self) -> float:
        """Seconds the broker stopped reading from this peer for its rate limit."""
        return 0.0

    @abc.abstractmethod
    def queue_depth(self) -> tuple[int, int]:
        """Messages and bytes waiting for this session."""
