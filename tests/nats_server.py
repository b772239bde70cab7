"""A throw-away ``nats-server -js`` for the NATS bridge's tests.

:func:`running_nats_server` starts the server on a free port of 127.0.0.1
with JetStream storing in a temporary directory, waits until it answers,
and stops it by its pid on exit. The ``nats_server`` fixture of
``tests/conftest.py`` wraps it.

:class:`NatsServerProcess` is the same server for a test that kills it
(SIGKILL) in the middle of a run and starts it again on the same port with
the same JetStream store; the ``nats_server_control`` fixture wraps it.

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
from collections.abc import Iterator, Sequence
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


def port_is_closed(port: int) -> bool:
    """Whether nothing listens on ``port`` of 127.0.0.1 (a connection is refused)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True


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


class NatsServerProcess:
    """One ``nats-server -js`` under ``workdir`` that a test may kill and start again.

    The first :meth:`start` picks a free loopback port; every later one uses
    the same port and the same JetStream store directory, so that a restarted
    server has the streams and messages of the killed one (those it had
    written to its files: see :func:`wait_until_stored`). :meth:`kill` is
    SIGKILL by pid -- a crash, no clean shutdown. :meth:`stop` (or leaving the
    ``with`` block) stops a running server; call it in a ``finally`` (the
    ``nats_server_control`` fixture does) so that no server outlives its test.
    ``args`` are more command-line options (TLS, ...).
    """

    def __init__(self, workdir: Path, *, args: Sequence[str] = ()) -> None:
        self.binary = find_nats_server()
        self.workdir = workdir
        self.store_dir = workdir / "jetstream"
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "nats-server.log"
        self.args = tuple(args)
        #: The port, once the first start chose it.
        self.port: int | None = None
        #: Every pid this object started, in order.
        self.pids: list[int] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._server: NatsServer | None = None

    @property
    def running(self) -> bool:
        """Whether the server this object started last is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def server(self) -> NatsServer:
        """The running server; RuntimeError if it is not running."""
        if self._server is None or not self.running:
            raise RuntimeError("nats-server is not running")
        return self._server

    def start(self, attempts: int = 3) -> NatsServer:
        """Start the server: on a free port the first time, on the same port after.

        The port is free when chosen but another process may take it before
        the server binds it; the server then exits and, the first time, is
        started again on another port. Raises RuntimeError (with the
        server's log) if it does not answer.
        """
        if self.running:
            raise RuntimeError("nats-server is already running")
        for _ in range(attempts):
            port = free_port() if self.port is None else self.port
            server = self._launch(port)
            if server is not None:
                self.port = port
                return server
        raise RuntimeError(
            f"nats-server did not start; its log:\n{self.log.read_text(errors='replace')}"
        )

    def _launch(self, port: int) -> NatsServer | None:
        command = [self.binary, "-js", "-a", "127.0.0.1", "-p", str(port)]
        command += ["-sd", str(self.store_dir), *self.args]
        with self.log.open("ab") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        self.pids.append(proc.pid)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while proc.poll() is None and time.monotonic() < deadline:
                if _answers(port) and proc.poll() is None:
                    self._proc = proc
                    self._server = NatsServer(
                        f"nats://127.0.0.1:{port}", port, proc.pid, self.store_dir
                    )
                    return self._server
                time.sleep(0.05)
        except BaseException:
            _stop(proc)
            raise
        _stop(proc)
        return None

    def kill(self) -> None:
        """SIGKILL the running server by its pid and wait until it is gone and its
        port closed."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise RuntimeError("nats-server is not running")
        os.kill(proc.pid, signal.SIGKILL)  # not reaped yet: the pid is still ours
        proc.wait(STOP_TIMEOUT)
        self._proc = self._server = None
        assert self.port is not None
        deadline = time.monotonic() + STOP_TIMEOUT
        while not port_is_closed(self.port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"port {self.port} still open after nats-server was killed")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the running server, if any (SIGTERM, then SIGKILL); idempotent."""
        proc, self._proc, self._server = self._proc, None, None
        if proc is not None:
            _stop(proc)

    def __enter__(self) -> NatsServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running_nats_server(workdir: Path, attempts: int = 3) -> Iterator[NatsServer]:
    """Run ``nats-server -js`` on a free loopback port, storing under ``workdir``,
    and stop it by its pid on exit."""
    with NatsServerProcess(workdir) as process:
        yield process.start(attempts)


def wait_until_stored(store_dir: Path, stream: str, payloads: Sequence[bytes]) -> None:
    """Wait until every payload is in the files of ``stream`` under ``store_dir``.

    JetStream acknowledges a message once stored in the server's memory and
    writes it to its block file a moment later; a test that kills the server
    to find the message after a restart waits for the write first (the test
    is about a restart, not about that window).
    """
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        blobs = b"".join(
            p.read_bytes() for p in store_dir.rglob("*") if p.is_file() and stream in p.parts
        )
        if all(payload in blobs for payload in payloads):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"stream {stream} did not write its messages to {store_dir}")
        time.sleep(0.05)
