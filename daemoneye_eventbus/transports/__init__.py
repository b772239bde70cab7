"""Local transports behind one small interface, and the dispatcher that picks one.

:func:`listener` gives the broker a :class:`Listener` for an address and
:func:`connect` gives a client a connection; :func:`default_address` says where
a broker listens unless told otherwise. Today the one transport is the Unix
domain socket (:mod:`daemoneye_eventbus.transports.unix`, Linux and macOS); a
platform's transport is one more module here, and the broker, the sessions
and the client do not change.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TypeVar

from daemoneye_eventbus.errors import BrokerError
from daemoneye_eventbus.transports import unix
from daemoneye_eventbus.transports.base import Listener, ProtocolFactory

__all__ = [
    "DEFAULT_ADDRESS",
    "Listener",
    "ProtocolFactory",
    "connect",
    "default_address",
    "listener",
]

Proto = TypeVar("Proto", bound=asyncio.Protocol)

#: Where the broker listens unless told otherwise.
DEFAULT_ADDRESS = unix.DEFAULT_SOCKET_PATH


def _check_platform() -> None:
    if sys.platform == "win32":  # pragma: no cover - Windows only
        raise BrokerError("this platform has no local transport yet (named pipes are planned)")


def default_address(instance: str | None = None) -> str:
    """The default address, or the one of a named broker instance."""
    return unix.default_socket_path(instance)


def listener(
    address: str,
    *,
    mode: int = 0o600,
    group: int | None = None,
    send_buffer: int | None = None,
    backlog: int = unix.LISTEN_BACKLOG,
) -> Listener:
    """A listener for ``address`` on this platform's transport (not started yet).

    ``mode`` and ``group`` say who may connect (the socket file's permission
    bits and group); ``send_buffer`` is the kernel send buffer asked for on
    each connection (None for the system default).
    """
    _check_platform()
    return unix.UnixListener(
        address, mode=mode, group=group, send_buffer=send_buffer, backlog=backlog
    )


async def connect(address: str, factory: ProtocolFactory) -> asyncio.BaseTransport:
    """Connect to the broker at ``address``; the connection is served by ``factory()``.

    Raises ``FileNotFoundError`` or ``ConnectionRefusedError`` when no broker
    is there.
    """
    _check_platform()
    return await unix.connect(address, factory)
