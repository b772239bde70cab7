"""Local transports behind one small interface, and the dispatcher that picks one.

:func:`listener` gives the broker a :class:`Listener` for an address and
:func:`connect` gives a client a connection; :func:`default_address` says where
a broker listens unless told otherwise. Unix domain sockets on Linux and macOS
(:mod:`daemoneye_eventbus.transports.unix`), named pipes on Windows
(:mod:`daemoneye_eventbus.transports.windows`, with its pure parts in
:mod:`daemoneye_eventbus.transports.pipes`); the broker, the sessions and the
client are the same on each.
"""

from __future__ import annotations

import asyncio
import sys

from daemoneye_eventbus.transports import pipes
from daemoneye_eventbus.transports.base import Listener, ProtocolFactory

# Each platform's transport, and only it: mypy checks each branch for its platform.
if sys.platform == "win32":
    from daemoneye_eventbus.transports import windows
else:
    from daemoneye_eventbus.transports import unix

__all__ = [
    "DEFAULT_ADDRESS",
    "Listener",
    "ProtocolFactory",
    "connect",
    "default_address",
    "listener",
    "own_sid",
]


def default_address(instance: str | None = None, *, platform: str = sys.platform) -> str:
    """The default address, or the one of a named broker instance, on ``platform``.

    A pipe name on Windows (``\\\\.\\pipe\\DaemonEye[-{instance}]``), a socket
    path elsewhere (``/tmp/daemoneye[-{instance}].sock``).
    """
    return pipes.default_address(instance, platform)


#: Where the broker listens unless told otherwise.
DEFAULT_ADDRESS = default_address()


def listener(
    address: str,
    *,
    mode: int = 0o600,
    group: int | None = None,
    send_buffer: int | None = None,
    backlog: int | None = None,
    pipe_sddl: str | None = None,
) -> Listener:
    """A listener for ``address`` on this platform's transport (not started yet).

    Unix sockets: ``mode`` and ``group`` say who may connect (the socket
    file's permission bits and group). Named pipes: ``pipe_sddl`` does (the
    pipe's security descriptor; None for the default, see
    :func:`~daemoneye_eventbus.transports.pipes.default_sddl`). ``send_buffer``
    is the kernel send buffer asked for on each connection (None for the
    system default), ``backlog`` the Unix socket's listen backlog (None for
    ``unix.LISTEN_BACKLOG``). Each option applies to its own transport only.
    """
    made: Listener
    if sys.platform == "win32":
        made = windows.PipeListener(address, sddl=pipe_sddl, send_buffer=send_buffer)
    else:
        queued = unix.LISTEN_BACKLOG if backlog is None else backlog
        made = unix.UnixListener(
            address, mode=mode, group=group, send_buffer=send_buffer, backlog=queued
        )
    return made


def own_sid() -> str | None:
    """The user SID of this process on Windows (the broker's own user, which the
    default policy trusts there); None elsewhere."""
    if sys.platform == "win32":
        return windows.current_user_sid()
    return None


async def connect(address: str, factory: ProtocolFactory) -> asyncio.BaseTransport:
    """Connect to the broker at ``address``; the connection is served by ``factory()``.

    Raises ``FileNotFoundError`` (or ``ConnectionRefusedError`` on Unix) when
    no broker is there.
    """
    if sys.platform == "win32":
        transport = await windows.connect(address, factory)
    else:
        transport = await unix.connect(address, factory)
    return transport
