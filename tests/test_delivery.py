"""EventQueue.get() with a timeout, on both event loops.

Successive waits share one timer (re-armed only for an earlier deadline), so
each test checks that a wait still times out when it should, and not before.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from daemoneye.eventbus.v1 import registry
from daemoneye_eventbus.delivery import EventQueue, ReceivedEvent
from daemoneye_eventbus.errors import ClosedResourceError, RequestTimeout

LIFECYCLE = registry.EVENTS_PROCESS_LIFECYCLE
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
#: Timers may fire up to a millisecond early (libuv); allow for that and no more.
EARLY = 0.0015

#: Runs a coroutine to completion on the loop under test.
Run = Callable[[Coroutine[Any, Any, None]], None]


def event(sequence: int) -> ReceivedEvent[Any]:
    return ReceivedEvent(LIFECYCLE.name, LIFECYCLE.payload_name, b"", None, sequence, 1)


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Run:
    def runner(main: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as r:
            r.run(main)

    return runner


async def timed_out_after(queue: EventQueue[Any], timeout: float) -> float:
    start = time.monotonic()
    with pytest.raises(RequestTimeout, match=f"no event within {timeout} s"):
        await queue.get(timeout=timeout)
    return time.monotonic() - start


async def put_later(queue: EventQueue[Any], delay: float, sequence: int) -> None:
    await asyncio.sleep(delay)
    queue.put_nowait(event(sequence))


def test_a_wait_times_out_on_time(run: Run) -> None:
    async def main() -> None:
        queue: EventQueue[Any] = EventQueue(10)
        assert 0.05 - EARLY <= await timed_out_after(queue, 0.05) < 1.0

    run(main())


def test_a_shorter_wait_after_a_longer_one_is_not_late(run: Run) -> None:
    async def main() -> None:
        queue: EventQueue[Any] = EventQueue(10)
        asyncio.get_running_loop().call_later(0.01, queue.put_nowait, event(1))
        assert (await queue.get(timeout=30)).sequence == 1  # arms a timer due in 30 s
        assert 0.05 - EARLY <= await timed_out_after(queue, 0.05) < 1.0

    run(main())


def test_a_longer_wait_after_a_shorter_one_is_not_early(run: Run) -> None:
    async def main() -> None:
        queue: EventQueue[Any] = EventQueue(10)
        for sequence in range(1, 51):  # quick waits: the timer armed first stays
            task = asyncio.create_task(put_later(queue, 0, sequence))
            assert (await queue.get(timeout=0.05)).sequence == sequence
            await task
        # The armed timer is due well before this deadline: it must re-arm.
        assert 0.3 - EARLY <= await timed_out_after(queue, 0.3) < 1.5

    run(main())


def test_a_wait_without_timeout_outlives_an_earlier_timer(run: Run) -> None:
    async def main() -> None:
        queue: EventQueue[Any] = EventQueue(10)
        asyncio.get_running_loop().call_later(0.01, queue.put_nowait, event(1))
        await queue.get(timeout=0.05)  # leaves a timer due in about 40 ms
        asyncio.get_running_loop().call_later(0.2, queue.put_nowait, event(2))
        start = time.monotonic()
        assert (await queue.get()).sequence == 2
        assert time.monotonic() - start >= 0.2 - EARLY

    run(main())


def test_close_wakes_a_waiter_and_drops_the_timer(run: Run) -> None:
    async def main() -> None:
        queue: EventQueue[Any] = EventQueue(10)
        asyncio.get_running_loop().call_later(0.01, queue.close)
        with pytest.raises(ClosedResourceError):
            await queue.get(timeout=30)
        assert queue._timer is None

    run(main())
