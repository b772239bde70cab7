"""The broker's sessions: one per peer, socket or in-process, of the same shape.

* :class:`SocketSession` — the asyncio pump of one accepted connection;
* :class:`LocalSession` — the agent's own code on its embedded broker;
* :class:`RequestDeadlines` — the timer of the broker's pending requests.

Both are :class:`Session` objects to the broker and router endpoints to the
router; both reach the broker only through :class:`SessionHost`.
"""

from __future__ import annotations

from daemoneye_eventbus.sessions.base import Outbox, Session, SessionHost
from daemoneye_eventbus.sessions.deadlines import RequestDeadlines
from daemoneye_eventbus.sessions.local import LocalSession
from daemoneye_eventbus.sessions.socket import SocketSession

__all__ = [
    "LocalSession",
    "Outbox",
    "RequestDeadlines",
    "Session",
    "SessionHost",
    "SocketSession",
]
