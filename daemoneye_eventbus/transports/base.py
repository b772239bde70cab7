"""What the broker and the client need of a transport: the one small interface.

A transport knows nothing of frames, sessions or routing. The broker asks a
:class:`Listener` to accept connections for a protocol factory and, for each
connection, who the peer is (from the kernel, never from what it claims); a
client asks its transport's ``connect`` for a connection. Both ends then
speak through asyncio's stream transport interface, which Unix sockets and
Windows named pipes share, so sessions and clients are the same on each.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable

from daemoneye_eventbus.access import PeerCredentials

__all__ = ["Listener", "ProtocolFactory"]

#: Builds the asyncio protocol (a broker session) of one accepted connection.
ProtocolFactory = Callable[[], asyncio.Protocol]


class Listener(abc.ABC):
    """Where a broker accepts connections: one address of one transport."""

    #: The address peers connect to (a socket path, a pipe name).
    address: str

    @abc.abstractmethod
    async def start(self, factory: ProtocolFactory, *, serve: bool = True) -> None:
        """Claim the address and start accepting; each connection gets ``factory()``.

        With ``serve=False`` the address is claimed (peers may already connect
        and wait in the backlog) but nothing is accepted until :meth:`serve`:
        the broker drops its privileges in between.

        Raises :class:`~daemoneye_eventbus.errors.BrokerAlreadyRunning` if a live
        broker holds the address, :class:`~daemoneye_eventbus.errors.BrokerError`
        if it cannot be claimed safely.
        """

    @abc.abstractmethod
    async def serve(self) -> None:
        """Start accepting connections after ``start(factory, serve=False)``.

        Does nothing if the listener already accepts.
        """

    @abc.abstractmethod
    def chown(self, uid: int, gid: int) -> None:
        """Give what :meth:`start` created to ``uid``, before dropping to it.

        The address (the socket file) gets owner ``uid`` and keeps the group it
        was given, or gets ``gid`` if none was; what was created for it (a
        directory) gets ``uid`` and ``gid``. So a broker that no longer runs as
        root can still remove its socket on close.
        """

    @abc.abstractmethod
    def accept(self, transport: asyncio.BaseTransport) -> PeerCredentials | None:
        """Finish accepting ``transport`` (tune it) and say who the peer is.

        Called from the session's ``connection_made``; None when the kernel
        cannot say.
        """

    @abc.abstractmethod
    def executable(self, peer: PeerCredentials) -> str | None:
        """The peer's executable path, for policies that name executables;
        None when it cannot be read."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop accepting and release the address (remove the socket file)."""

    @abc.abstractmethod
    async def wait_closed(self) -> None:
        """Wait until the listener has stopped."""
