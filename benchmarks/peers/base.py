"""What every system under test provides, and what its worker processes share.

A system is an :class:`Adapter`: it checks (and if allowed installs) what it
needs, starts its broker as a child process (:class:`BrokerProcess`) and names
the module that holds its worker roles. The suite runs the same workloads
against every adapter; each publisher and subscriber is its own ``spawn``
process running :func:`worker_main`, which calls one role function of the
adapter's module.

A role function is ``role(ctl, endpoint, params) -> dict``: ``ctl`` carries the
events and the result queue shared with the suite, ``endpoint`` says where the
broker listens, ``params`` what to do. Roles:

* ``pub``: wait for ``go``, publish ``params["count"]`` events on the measured
  topic flat out; before ``go``, systems whose subscriptions propagate without an
  acknowledgement (ZeroMQ) publish small probe messages instead;
* ``sub``: subscribe to ``params["filter"]``, count events of the full payload
  size until ``params["expected"]`` or until idle after the publishers are done;
* ``stalled``: subscribe, then never read again until ``stop``;
* ``holder``: subscribe to every filter in ``params["filters"]``, then idle
  (keeping the connection alive) until ``stop``;
* ``idle``: open ``params["clients"]`` connections with one subscription each,
  then idle until ``stop``;
* ``ping`` / ``echo``: the round-trip latency pair.

Topics and filters are given as tuples of levels; each adapter spells them in
its own syntax (:func:`dotted`, NATS, MQTT, ZeroMQ prefixes).
"""

from __future__ import annotations

import abc
import contextlib
import math
import os
import platform
import signal
import subprocess
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.queues import Queue as MpQueue
from multiprocessing.synchronize import Event as MpEvent
from typing import Any, Final

__all__ = [
    "ECHO_TOPIC",
    "IDLE_TOPIC",
    "PAYLOAD_BYTES",
    "REQUEST_BYTES",
    "PROBE_TOPIC",
    "TOPIC",
    "WILDCARD",
    "Adapter",
    "BrokerOptions",
    "BrokerProcess",
    "Ctl",
    "Levels",
    "RoleFunction",
    "WorkerMessage",
    "cpu_seconds",
    "dotted",
    "memory_kib",
    "payload",
    "routing_filters",
    "worker_main",
]

#: Size of every event's payload in bytes.
PAYLOAD_BYTES: Final = 256
#: Bytes of a workload R request or reply for peers without the schema: about
#: this bus's HealthCheckRequest and HealthCheckReply there (an id of 10 digits).
REQUEST_BYTES: Final = 16

Levels = tuple[str, ...]

#: The topic the throughput publishers and the latency pinger publish on.
TOPIC: Final[Levels] = ("events", "process", "lifecycle")
#: The topic the latency echo answers on.
ECHO_TOPIC: Final[Levels] = ("events", "process", "metadata")
#: The filter of the throughput subscribers.
WILDCARD: Final[Levels] = ("events", "process", "#")
#: The topic idle clients (workload F) subscribe to; nothing is published on it.
IDLE_TOPIC: Final[Levels] = ("events", "process", "tree")
#: ZeroMQ only: holders' last subscription, probed to know the others arrived.
PROBE_TOPIC: Final[Levels] = ("sync", "probe")

#: (kind, role, index, payload) from a worker: "ready", "synced", "done" or "error".
WorkerMessage = tuple[str, str, int, dict[str, Any]]

_NS: Final = 1_000_000_000


def dotted(levels: Sequence[str]) -> str:
    """Levels joined by dots: this bus's topics and filters (``+``, ``#``)."""
    return ".".join(levels)


def payload(size: int = PAYLOAD_BYTES) -> bytes:
    """An opaque payload for the peers: ``size`` bytes of printable text."""
    text = (b"bench-process pid=2097152 exe=/usr/bin/bench-process " * (size // 40 + 1))[:size]
    assert len(text) == size
    return text


def routing_filters(count: int) -> list[Levels]:
    """``count`` distinct filters that never match :data:`TOPIC` (workload E).

    A third are exact (``events.process.n17``), a third have a ``+``
    (``events.+.n18``), a third end in ``#`` (``events.n19.#``). Each holds a
    unique level, so none is a duplicate of another, and each shares the first
    level (and the exact ones the first two) with the measured topic, so a
    router has to look past the first level to rule them out.
    """
    out: list[Levels] = []
    for i in range(count):
        kind = i % 3
        if kind == 0:
            out.append(("events", "process", f"n{i}"))
        elif kind == 1:
            out.append(("events", "+", f"n{i}"))
        else:
            out.append(("events", f"n{i}", "#"))
    return out


# -- process figures -------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """CPU time of a process (all its threads), in seconds.

    This is the time ``/proc/<pid>/stat`` reports as utime + stime. Stat
    counts in clock ticks of 10 ms, too coarse for a broker that spends 50 ms
    on a run, so the same time is also read in nanoseconds from each live
    thread's ``/proc/<pid>/task/<tid>/schedstat``. Both are lower bounds (stat
    is truncated to a tick; schedstat misses threads that have exited, such
    as a ZeroMQ context's I/O thread after ``term()``): the larger is taken.
    """
    stat = stat_cpu_seconds(pid)
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            path = f"/proc/{pid}/task/{tid}/schedstat"
            with contextlib.suppress(FileNotFoundError), open(path, encoding="ascii") as f:
                total += int(f.read().split()[0])
    except (FileNotFoundError, PermissionError):
        return stat
    return max(stat, total / _NS)


def stat_cpu_seconds(pid: int) -> float:
    """utime + stime of a process from ``/proc/<pid>/stat`` (10 ms resolution)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        stat = f.read()
    # The command name may hold spaces and parentheses; fields follow the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(sorted_values: Sequence[int], q: float) -> float:
    """Nearest-rank percentile of already sorted values (``q`` in ``[0, 100]``)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo``."""
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return model


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (resident at most so far) of a process, in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


# -- workers -----------------------------------------------------------------------------


@dataclass
class Ctl:
    """What a worker shares with the suite (pickled into the spawned process)."""

    role: str
    index: int
    results: MpQueue[WorkerMessage]
    #: Publishers start when this is set.
    go: MpEvent
    #: Set once every publisher has finished (subscribers then stop when idle).
    publishers_done: MpEvent
    #: Holders, idle and stalled clients (and the echo) stop when this is set.
    stop: MpEvent
    #: ``time.perf_counter_ns()`` after which a worker gives up.
    deadline_ns: int

    def ready(self, **info: Any) -> None:
        """Subscribed (acknowledged where the protocol acknowledges) or connected."""
        self.results.put(("ready", self.role, self.index, info))

    def synced(self) -> None:
        """Subscriptions are known to reach the publishers (acknowledged or probed)."""
        self.results.put(("synced", self.role, self.index, {}))

    def expired(self) -> bool:
        return time.perf_counter_ns() > self.deadline_ns

    def seconds_left(self) -> float:
        return max(0.0, (self.deadline_ns - time.perf_counter_ns()) / _NS)

    def wait_go(self) -> None:
        if not self.go.wait(self.seconds_left()):
            raise TimeoutError("no start signal before the deadline")

    def wait_stop(self) -> None:
        """Block until ``stop`` or the deadline (for roles without an event loop)."""
        self.stop.wait(self.seconds_left())


RoleFunction = Callable[[Ctl, str, dict[str, Any]], dict[str, Any]]


def worker_main(module: str, ctl: Ctl, endpoint: str, params: dict[str, Any]) -> None:
    """Entry point of every worker process: run one role of an adapter module."""
    import importlib

    try:
        roles: dict[str, RoleFunction] = importlib.import_module(module).ROLES
        out = roles[ctl.role](ctl, endpoint, params)
    except BaseException:
        ctl.results.put(("error", ctl.role, ctl.index, {"traceback": traceback.format_exc()}))
        raise SystemExit(1) from None
    ctl.results.put(("done", ctl.role, ctl.index, out))


class IdleTracker:
    """When a throughput subscriber should stop counting.

    It stops at the expected count, at the deadline, or when nothing arrived
    for ``idle_s`` since the later of its last event and the moment it saw the
    publishers finish.
    """

    def __init__(self, ctl: Ctl, idle_s: float) -> None:
        self.ctl = ctl
        self.idle_ns = int(idle_s * _NS)
        self.last_progress = time.perf_counter_ns()
        self.done_seen = 0

    def progress(self, now: int) -> None:
        self.last_progress = now

    def reason(self) -> str | None:
        """None to go on, else why to stop."""
        now = time.perf_counter_ns()
        if now > self.ctl.deadline_ns:
            return "deadline"
        if not self.done_seen and self.ctl.publishers_done.is_set():
            self.done_seen = now
        if self.done_seen and now - max(self.last_progress, self.done_seen) > self.idle_ns:
            return "idle"
        return None


#: A subscriber stops this long after its last event once the publishers are done.
IDLE_AFTER_PUBLISHERS: Final = 2.0
#: Publishers yield to their client's I/O every this many events.
YIELD_EVERY: Final = 256


# -- brokers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerOptions:
    """What a workload needs of a broker beyond its defaults."""

    #: Subscriptions one connection may hold (workload E).
    subscriptions_per_connection: int = 0
    #: Connections the broker must accept (workload F).
    connections: int = 0
    #: Filters outside the declared topics are used (workload E, this bus only).
    undeclared_filters: bool = False
    #: Every event must be delivered (workloads BL, CL): no drop bound.
    lossless: bool = False


@dataclass
class BrokerProcess:
    """A broker running as a child process of the suite; stopped by PID."""

    proc: subprocess.Popen[bytes]
    endpoint: str
    log_path: str
    #: What the broker listens on, for the tables ("Unix socket", "TCP 127.0.0.1").
    transport: str
    #: Shown in the notes: settings that differ from the broker's defaults.
    settings: list[str] = field(default_factory=list)
    #: Exit codes that mean a clean stop (SIGTERM may end some brokers with -15).
    clean_exit_codes: frozenset[int] = frozenset({0})
    _log: Any = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        with contextlib.suppress(OSError), open(self.log_path, encoding="utf-8") as f:
            return f.read()
        return ""

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM to this PID, wait; the exit code, or None if it had to be killed."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None


def spawn_broker(
    argv: list[str],
    workdir: str,
    endpoint: str,
    transport: str,
    *,
    env: dict[str, str] | None = None,
    settings: Sequence[str] = (),
    clean_exit_codes: frozenset[int] = frozenset({0}),
) -> BrokerProcess:
    """Start ``argv`` with its output in ``workdir/broker.log``."""
    log_path = os.path.join(workdir, "broker.log")
    log = open(log_path, "wb")  # noqa: SIM115 - closed in BrokerProcess.stop()
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
        )
    except BaseException:
        log.close()
        raise
    return BrokerProcess(
        proc,
        endpoint,
        log_path,
        transport,
        list(settings),
        clean_exit_codes,
        log,
    )


def wait_until(check: Callable[[], bool], broker: BrokerProcess, timeout: float) -> None:
    """Poll ``check`` until it is true; raise if the broker exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not broker.alive():
            raise RuntimeError(
                f"broker exited with {broker.proc.returncode}: {broker.output()[-2000:]}"
            )
        if check():
            return
        time.sleep(0.02)
    raise RuntimeError(f"broker did not start listening within {timeout:g} s")


class Adapter(abc.ABC):
    """One system under test."""

    #: Short name for --systems.
    name: str
    #: Name in the tables.
    label: str
    #: Module holding ``ROLES`` (role name -> :data:`RoleFunction`).
    module: str
    #: Subscriptions are not acknowledged: subscribers report "synced" only once
    #: a probe from the publishers arrived.
    needs_probe_sync: bool = False
    #: The broker is a Python process (py-spy can profile it).
    python_broker: bool = False
    #: How the system delivers every event, for workloads BL and CL ("" if it
    #: cannot: it then has no row there).
    lossless_mode: str = ""
    #: The system has request/reply of its own (workload R: one responder
    #: answers each request, the reply goes to the requester alone); without
    #: it, no row there.
    request_reply: bool = False

    @abc.abstractmethod
    def ensure(self, install: bool) -> str | None:
        """None if everything is there (installing it if ``install``), else why not."""

    @abc.abstractmethod
    def versions(self) -> dict[str, str]:
        """Versions of the broker and client library, for the machine description."""

    @abc.abstractmethod
    def start_broker(self, workdir: str, options: BrokerOptions) -> BrokerProcess:
        """Start a fresh broker in ``workdir`` and wait until it accepts clients."""


# -- installing ----------------------------------------------------------------------------

#: The client libraries and chart library, pinned (the ``bench`` extra).
PINS: Final = {
    "zmq": "pyzmq==27.3.0",
    "nats": "nats-py==2.16.0",
    "paho.mqtt": "paho-mqtt==2.2.0",
    "matplotlib": "matplotlib==3.11.2",
}


def importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def pip_install(module: str, install: bool) -> str | None:
    """Make ``module`` importable (pip, pinned); None on success, else why not."""
    if importable(module):
        return None
    requirement = PINS[module]
    if not install:
        return f"{requirement} is not installed (run without --no-install, or pip install it)"
    import sys

    print(f"installing {requirement} with pip ...", file=sys.stderr, flush=True)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", requirement],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"pip install {requirement} timed out"
    import importlib

    importlib.invalidate_caches()
    if done.returncode != 0 or not importable(module):
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
        return f"pip install {requirement} failed: {tail[0]}"
    return None


def apt_install(binary: str, package: str, install: bool) -> str | None:
    """Make ``binary`` available from Debian package ``package``; None on success."""
    import shutil

    if find_binary(binary):
        return None
    if not install:
        return f"{binary} not found (apt-get install {package})"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"{binary} not found, and apt-get install {package} needs root on Debian"
    import sys

    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for attempt in range(2):
        if attempt:  # the package lists may be missing or stale
            print("apt-get update ...", file=sys.stderr, flush=True)
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run(
                    ["apt-get", "update", "-q"], capture_output=True, timeout=600, env=env
                )
        print(f"apt-get install -y {package} ...", file=sys.stderr, flush=True)
        try:
            done = subprocess.run(
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", package],
                capture_output=True,
                text=True,
                timeout=900,
                env=env,
                check=False,
            )
        except subprocess.TimeoutExpired:
            continue
        if done.returncode == 0 and find_binary(binary):
            return None
    return f"apt-get install {package} failed"


def find_binary(name: str) -> str | None:
    """``name`` on PATH, or in /usr/sbin (Debian puts mosquitto there)."""
    import shutil

    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
