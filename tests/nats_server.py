"""A throw-away ``nats-server -js`` for the NATS bridge's tests.

:func:`running_nats_server` starts the server on a free port of 127.0.0.1
with JetStream storing in a temporary directory, waits until it answers,
and stops it by its pid on exit. The ``nats_server`` fixture of
``tests/conftest.py`` wraps it.

Where the binary is missing, :func:`require` skips the test with the reason
-- except under CI (``CI`` set in the environment), where ``.ci/run``
installs nats-server and a missing one fails the test instead. The same rule
applies to the nats-py client (the ``bench`` extra).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

#: How long the server may take to accept connections, and to stop.
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class NatsServer:
    """A running server: its ``url``, ``pid`` and JetStream ``store_dir``."""

    url: str
    port: int
    pid: int
    store_dir: Path


def require(what: str, hint: str) -> None:
    """Skip the test because ``what`` is missing, or fail it under CI."""
    reason = f"{what} is not installed ({hint}); the NATS bridge tests need it"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, and CI must run them")
    pytest.skip(reason)


def find_nats_server() -> str:
    """The nats-server binary (PATH, then /usr/sbin), or skip / fail."""
    binary = shutil.which("nats-server") or shutil.which(
        "nats-server", path="/usr/sbin:/usr/local/sbin"
    )
    if binary is None:
        require("nats-server", "apt-get install nats-server")
        raise AssertionError("unreachable")  # pragma: no cover
    return binary


def import_nats() -> ModuleType:
    """The nats-py package, or skip / fail."""
    try:
        import nats
    except ImportError:
        require("nats-py", "pip install -e '.[bench]'")
        raise AssertionError("unreachable") from None  # pragma: no cover
    return nats


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers(port: int) -> bool:
    """Whether a NATS server on ``port`` sends its INFO line."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            return sock.recv(4).startswith(b"INFO")
    except OSError:
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server by its pid: SIGTERM, then SIGKILL if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)


@contextlib.contextmanager
def running_nats_server(workdir: Path, attempts: int = 3) -> Iterator[NatsServer]:
    """Run ``nats-server -js`` on a free loopback port, storing under ``workdir``.

    The port is free when chosen but another process may take it before the
    server binds it; the server then exits and is started again on another.
    """
    binary = find_nats_server()
    store = workdir / "jetstream"
    store.mkdir(parents=True, exist_ok=True)
    log = workdir / "nats-server.log"
    for _ in range(attempts):
        port = free_port()
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while proc.poll() is None and time.monotonic() < deadline:
                if _answers(port):
                    yield NatsServer(f"nats://127.0.0.1:{port}", port, proc.pid, store)
                    return
                time.sleep(0.05)
        finally:
            _stop(proc)
    raise RuntimeError(f"nats-server did not start; its log:\n{log.read_text(errors='replace')}")
