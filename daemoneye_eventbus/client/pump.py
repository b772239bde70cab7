"""The asyncio pump between a client's transport and its handlers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final, cast

__all__ = ["ClientPump"]

# Above this many bytes waiting in the transport, publishers wait (``drain``).
WRITE_HIGH: Final = 1024 * 1024


class ClientPump(asyncio.Protocol):
    """Hands what the transport reads to ``on_data`` / ``on_eof`` / ``on_lost``
    and tells publishers when the transport is backed up."""

    def __init__(
        self,
        on_data: Callable[[bytes], None],
        on_eof: Callable[[], None],
        on_lost: Callable[[Exception | None], None],
    ) -> None:
        self._on_data = on_data
        self._on_eof = on_eof
        self._on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        #: Resolved once the connection is gone.
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._drain: asyncio.Future[None] | None = None
        #: The transport's buffer is above its high-water mark.
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's do not subclass asyncio.Transport.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH)

    def data_received(self, data: bytes) -> None:
        self._on_data(data)

    def eof_received(self) -> bool | None:
        self._on_eof()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost(exc)
        if not self.lost.done():
            self.lost.set_result(None)
        self.resume_writing()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    async def drain(self) -> None:
        """Wait until the transport's buffer is below its low-water mark."""
        if self.paused:
            if self._drain is None:
                self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    def abort(self) -> None:
        """Drop the connection at once, unless it is already gone."""
        # A transport that has closed (asyncio's, once its buffer drained) has
        # no loop left to abort with.
        if self.transport is not None and not self.lost.done():
            self.transport.abort()
