"""The event loop the package's programs run on: uvloop when it is installed.

uvloop (the ``fast`` extra) is a drop-in asyncio event loop on libuv; the
broker and clients use only the asyncio API, so they run the same on either.
The CLI, the demo and the benchmarks start their loop through :func:`run`;
an application embedding the broker or a client chooses its own loop.
:func:`stop_on_signals` is how the long-running commands (``serve``,
``bridge``) end on SIGINT and SIGTERM.
``DAEMONEYE_EVENTBUS_LOOP=asyncio`` forces the standard loop, ``=uvloop``
requires uvloop (an error if it is missing); the default, ``auto``, takes
uvloop when it imports.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Final, TypeVar

__all__ = [
    "LOOP_ENV",
    "loop_factory",
    "loop_name",
    "run",
    "running_loop_name",
    "stop_on_signals",
]

T = TypeVar("T")

#: Environment variable choosing the loop: ``auto`` (default), ``asyncio`` or ``uvloop``.
LOOP_ENV: Final = "DAEMONEYE_EVENTBUS_LOOP"
_CHOICES: Final = ("auto", "asyncio", "uvloop")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """A factory of uvloop loops, or None for asyncio's default loop."""
    choice = os.environ.get(LOOP_ENV, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"{LOOP_ENV}={choice!r}: expected one of {', '.join(_CHOICES)}")
    if choice == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if choice == "uvloop":
            raise RuntimeError(
                f"{LOOP_ENV}=uvloop but uvloop is not installed "
                "(pip install 'daemoneye-eventbus[fast]')"
            ) from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def loop_name() -> str:
    """``uvloop`` or ``asyncio``: what :func:`run` would use now."""
    return "asyncio" if loop_factory() is None else "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a new loop (uvloop when available).

    If the loop choice is refused (:func:`loop_factory` raises), ``main`` is
    closed unstarted before the error propagates, so that it is not reported
    as a coroutine that was never awaited.
    """
    try:
        factory = loop_factory()
    except BaseException:
        main.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def running_loop_name() -> str:
    """``uvloop`` or ``asyncio``: the loop running now (call from a coroutine)."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"


def stop_on_signals(stop: Callable[[], None]) -> Callable[[], None]:
    """Call ``stop`` on SIGINT or SIGTERM (Windows: Ctrl+C or Ctrl+Break); returns the undo.

    Call from a coroutine: the handlers wake the running loop.
    """
    loop = asyncio.get_running_loop()
    if sys.platform == "win32":
        # The proactor loop has no add_signal_handler: a plain handler wakes it
        # through call_soon_threadsafe instead.
        signals = (signal.SIGINT, signal.SIGBREAK)
        previous = {sig: signal.getsignal(sig) for sig in signals}
        for sig in signals:
            signal.signal(sig, lambda _sig, _frame: loop.call_soon_threadsafe(stop))

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)

    def remove() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)

    return remove
