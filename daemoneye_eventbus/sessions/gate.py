"""When a socket session reads next: at once, on the next loop turn, or after a pause.

Three rules pace how a broker reads one connection:

* **fair turns**: at most ``max_frames_per_turn`` frames of one connection per
  loop turn; the rest is parsed on the next turn, reading paused meanwhile;
* **rate limits**: a publisher over its :class:`~daemoneye_eventbus.ratelimit.RateLimit`
  is not refused anything; the broker stops reading from it until its token
  buckets are out of debt, and counts the seconds;
* **held publishers**: a publisher whose events wait for a lossless
  subscriber's credit is not read until it is released
  (:mod:`daemoneye_eventbus.flow`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from daemoneye_eventbus.ratelimit import RateLimit, Throttle

__all__ = ["ReadGate"]


class ReadGate:
    """Pauses and resumes reading one transport; ``resume`` handles what waits."""

    __slots__ = ("_handle", "_published", "_resume", "held", "paused", "throttle")

    def __init__(self, resume: Callable[[], None]) -> None:
        self._resume = resume
        self._handle: asyncio.Handle | None = None
        self._published = 0  # the session's published count at the last turn
        #: Reading is paused (for a turn, a rate limit or a lossless subscriber).
        self.paused = False
        #: Paused until :meth:`release`: a lossless subscriber holds the publisher.
        self.held = False
        #: The connection's token buckets, once its identity carries a limit.
        self.throttle: Throttle | None = None

    def limit(self, rate: RateLimit | None) -> None:
        """Apply the rate limit of the peer's identity (set at the handshake)."""
        if rate is not None and rate.limited:
            self.throttle = Throttle(rate, asyncio.get_running_loop().time())

    @property
    def throttled(self) -> float:
        """Seconds reading was paused for the rate limit, in all."""
        return self.throttle.throttled if self.throttle is not None else 0.0

    def after_turn(
        self,
        transport: asyncio.Transport | None,
        pending: bool,
        published: int,
        nbytes: int,
        held: bool = False,
    ) -> None:
        """A turn ended with ``published`` events published by the session in all,
        ``nbytes`` bytes read; ``pending`` input waits for another turn;
        ``held``: a lossless subscriber holds the session (until :meth:`release`)."""
        events, self._published = published - self._published, published
        wait = 0.0
        if self.throttle is not None and (events or nbytes):
            wait = self.throttle.spend(events, nbytes, asyncio.get_running_loop().time())
        if not (pending or wait or held or self.paused):
            return
        if transport is None or transport.is_closing():
            return
        self.held = held
        if pending or wait or held:
            if not self.paused:
                self.paused = True
                transport.pause_reading()
            if held and not wait:
                return  # release() goes on
            if self._handle is None:
                loop = asyncio.get_running_loop()
                self._handle = (
                    loop.call_later(wait, self._run) if wait else loop.call_soon(self._run)
                )
        else:
            self.paused = False
            transport.resume_reading()

    def release(self) -> None:
        """The session is no longer held: go on with what waits, on the next turn."""
        if self.held:
            self.held = False
            if self._handle is None:
                self._handle = asyncio.get_running_loop().call_soon(self._run)

    def _run(self) -> None:
        self._handle = None
        self._resume()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
