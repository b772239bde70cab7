"""The deadlines of pending requests, on the broker's event loop.

The :class:`~daemoneye_eventbus.rpc.RequestRouter` keeps the requests that
wait for a reply, with their deadlines (``time.monotonic()`` seconds); it is
pure and has no clock of its own to wake it. :class:`RequestDeadlines` arms
one timer of the event loop for the earliest deadline, so that a request
times out within a few milliseconds of it, not on the broker's 250 ms
housekeeping tick: when it fires, the router fails what has expired
(``REQUEST_TIMEOUT`` to each requester), the broker's outbox writes those
errors, and the timer is armed again for the next deadline
[protocol §5, "Request/reply"].
"""

from __future__ import annotations

import asyncio
import time

from daemoneye_eventbus.rpc import RequestRouter
from daemoneye_eventbus.sessions.base import Outbox

__all__ = ["RequestDeadlines"]


class RequestDeadlines:
    """One event-loop timer for the earliest deadline of ``requests``.

    It installs itself as the router's ``on_deadline``; with nothing pending
    it holds no timer.
    """

    def __init__(self, requests: RequestRouter, outbox: Outbox) -> None:
        self.requests = requests
        self.outbox = outbox
        self._handle: asyncio.TimerHandle | None = None
        #: The deadline the timer is armed for (``time.monotonic()`` seconds).
        self._armed_for = 0.0
        requests.on_deadline = self.arm

    def arm(self, deadline: float | None) -> None:
        """Wake up at ``deadline`` unless an earlier wake-up is set (None: nothing waits)."""
        if deadline is None:
            self.cancel()
            return
        if self._handle is not None and self._armed_for <= deadline:
            return  # the earlier wake-up arms the next one
        self.cancel()
        self._armed_for = deadline
        delay = max(0.0, deadline - time.monotonic())
        self._handle = asyncio.get_running_loop().call_later(delay, self._expire)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _expire(self) -> None:
        self._handle = None
        if self.requests.expire():
            self.outbox.flush()
        self.arm(self.requests.table.next_deadline())
