"""Side-by-side benchmark: the same workloads against this bus, ZeroMQ, NATS and Mosquitto.

Run::

    python -m benchmarks.suite [--quick] [--systems daemoneye,zmq,nats,mqtt]
                               [--workloads A,B,C,D,E,F] [--out benchmarks/RESULTS.md]

Workloads (256-byte events; every publisher and subscriber its own process):

* **A** one publisher to one subscriber through a wildcard subscription;
* **B** four publishers to one subscriber;
* **C** one publisher to four subscribers;
* **D** round-trip latency through the broker, one message in flight;
* **E** routing cost as idle connections hold 10 ... 100,000 filters;
* **F** broker memory: idle with many clients, and peak under A with a stalled
  subscriber;
* **BL**, **CL** B and C with every event delivered: this bus's lossless
  subscriptions beside the peers that deliver everything (NATS, and ZeroMQ
  with HWM 0, that is without a bound).

Each system is an adapter in ``benchmarks/peers``. The suite installs what a
peer lacks (``apt-get install`` as root, ``pip`` for the client libraries)
unless ``--no-install``, starts every broker afresh for every run with its own
config in a temporary directory, and stops it by PID. A system that cannot be
installed or started gets a row saying so. Every run is bounded by a cap, past
which its workers are killed; the whole suite stops by itself. Results go to a
Markdown file (``--out``), a PNG chart (``--chart``) and optionally JSON
(``--json``); progress goes to stderr. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import multiprocessing
import os
import platform
import queue
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.context import SpawnContext, SpawnProcess
from multiprocessing.queues import Queue as MpQueue
from pathlib import Path
from typing import Any, Final

from benchmarks.peers import SYSTEMS, adapter
from benchmarks.peers.base import (
    PAYLOAD_BYTES,
    WILDCARD,
    Adapter,
    BrokerOptions,
    BrokerProcess,
    Ctl,
    WorkerMessage,
    cpu_model,
    cpu_seconds,
    memory_kib,
    percentile,
    pip_install,
    routing_filters,
    worker_main,
)

__all__ = [
    "WORKLOADS",
    "Result",
    "Settings",
    "main",
    "markdown_report",
    "run_suite",
    "importable_chart",
    "write_chart",
]

HERE: Final = Path(__file__).resolve().parent
WORKLOADS: Final[dict[str, str]] = {
    "A": "1 publisher → 1 subscriber (wildcard)",
    "B": "4 publishers → 1 subscriber",
    "C": "1 publisher → 4 subscribers",
    "D": "round-trip latency, one message in flight",
    "E": "routing cost vs. number of subscriptions",
    "F": "broker memory (idle clients; stalled subscriber)",
    "BL": "4 publishers → 1 subscriber, every event delivered (lossless)",
    "CL": "1 publisher → 4 subscribers, every event delivered (lossless)",
    "R": "request/reply round trip, one request in flight",
}
#: Publishers and subscribers of the throughput workloads.
SHAPES: Final[dict[str, tuple[int, int]]] = {
    "A": (1, 1),
    "B": (4, 1),
    "C": (1, 4),
    "BL": (4, 1),
    "CL": (1, 4),
}
#: The workloads where every event must be delivered.
LOSSLESS: Final = frozenset({"BL", "CL"})
#: The round-trip workloads, and the roles that answer and ask in each.
ROUND_TRIPS: Final[dict[str, tuple[str, str]]] = {
    "D": ("echo", "ping"),
    "R": ("responder", "requester"),
}
#: Processes the idle clients of workload F are spread over.
IDLE_PROCESSES: Final = 4
_NS: Final = 1_000_000_000
#: Name of the whole host's busy CPU time in the CPU samples.
_HOST: Final = "(host)"
#: Other processes' CPU (percent of one core) during a run worth a note.
OTHER_LOAD_NOTE: Final = 10.0


@dataclass(frozen=True)
class Settings:
    """Message counts and caps of one suite run."""

    messages: int = 200_000
    latency_messages: int = 5_000
    warmup: int = 500
    filter_counts: tuple[int, ...] = (10, 1_000, 10_000, 100_000)
    routing_messages: int = 100_000
    idle_clients: int = 1_000
    #: Seconds a run may take (E: each filter count) before its workers are killed.
    cap: float = 180.0
    #: Runs of each workload per system; the tables show the median run.
    repeat: int = 3
    quick: bool = False

    @classmethod
    def quick_settings(cls) -> Settings:
        return cls(
            messages=30_000,
            latency_messages=500,
            warmup=100,
            filter_counts=(10, 1_000, 10_000),
            routing_messages=5_000,
            idle_clients=100,
            cap=60.0,
            repeat=1,
            quick=True,
        )


@dataclass
class Result:
    """The figures of one run of one system."""

    system: str
    label: str
    workload: str
    #: "ok", "incomplete" (cap, failure), or "unavailable" (not installed / not started).
    status: str = "ok"
    transport: str = ""
    #: Events published (throughput) or round trips measured (latency).
    messages: int = 0
    #: Events the subscribers should have received, all together.
    expected: int = 0
    received: int = 0
    #: Events received by all subscribers together per second, first publish to last receive.
    received_per_s: float | None = None
    #: Events published per second, first publish to the publishers' flush.
    published_per_s: float | None = None
    delivered_pct: float | None = None
    #: Broker CPU time over the wall time of the run, in percent of one core.
    broker_cpu_pct: float | None = None
    broker_cpu_s: float | None = None
    #: Broker CPU time per received event (per delivery), in microseconds.
    broker_us_per_msg: float | None = None
    run_s: float | None = None
    #: Latency: p50, p99, p99.9, min, max, mean in microseconds.
    latency_us: dict[str, float] | None = None
    lost: int = 0
    #: Workload E: filters held by the idle connection, and how long loading them took.
    filters: int | None = None
    load_s: float | None = None
    #: Workload F: memory figures in KiB (and the client count).
    memory: dict[str, float] = field(default_factory=dict)
    #: CPU use of each worker process, in percent of one core.
    worker_cpu_pct: dict[str, float] = field(default_factory=dict)
    subscriber_end: list[str] = field(default_factory=list)
    broker_settings: list[str] = field(default_factory=list)
    broker_exit: int | None = None
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    #: CPU the host spent on other processes during the run, in percent of one core.
    other_cpu_pct: float | None = None
    #: With --profile: the top self-time frames of each profiled process.
    profile: dict[str, list[tuple[str, float]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class _Abort(Exception):
    """The run cannot complete: cap reached, a worker failed, the broker died."""


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- running workers ---------------------------------------------------------------------


class _Run:
    """One broker, its workers, and the messages and CPU samples they produce."""

    def __init__(
        self,
        system: Adapter,
        broker: BrokerProcess,
        cap: float,
        profile_dir: Path | None = None,
        tag: str = "",
    ) -> None:
        self.system = system
        self.broker = broker
        self.ctx: SpawnContext = multiprocessing.get_context("spawn")
        self.deadline = time.monotonic() + cap
        self.deadline_ns = time.perf_counter_ns() + int(cap * _NS)
        self.results: MpQueue[WorkerMessage] = self.ctx.Queue()
        self.go = self.ctx.Event()
        self.publishers_done = self.ctx.Event()
        self.stop = self.ctx.Event()
        self.procs: dict[tuple[str, int], SpawnProcess] = {}
        self.spawned_at: dict[tuple[str, int], float] = {}
        self.ready: dict[tuple[str, int], float] = {}
        self.synced: dict[tuple[str, int], float] = {}
        self.done: dict[tuple[str, int], dict[str, Any]] = {}
        self._exited_at: dict[tuple[str, int], float] = {}
        #: (time ns, CPU seconds by process) sampled while waiting.
        self.cpu_samples: list[tuple[int, dict[str, float]]] = []
        self.peak_rss_kib = 0
        self.profile_dir = profile_dir
        self.tag = tag
        self._profilers: list[tuple[str, Path, subprocess.Popen[bytes]]] = []

    def spawn(self, role: str, index: int, params: dict[str, Any]) -> None:
        ctl = Ctl(
            role, index, self.results, self.go, self.publishers_done, self.stop, self.deadline_ns
        )
        proc = self.ctx.Process(
            target=worker_main,
            args=(self.system.module, ctl, self.broker.endpoint, params),
            name=f"bench-{self.system.name}-{role}-{index}",
            daemon=True,
        )
        proc.start()
        self.procs[(role, index)] = proc
        self.spawned_at[(role, index)] = time.monotonic()

    def sample(self) -> None:
        now = time.perf_counter_ns()
        pids = {"broker": self.broker.pid}
        pids.update({f"{r}{i}": p.pid for (r, i), p in self.procs.items() if p.pid is not None})
        cpu: dict[str, float] = {}
        for name, pid in pids.items():
            with contextlib.suppress(OSError, ValueError):
                cpu[name] = cpu_seconds(pid)
        with contextlib.suppress(OSError, ValueError):
            cpu[_HOST] = host_busy_seconds()
        self.cpu_samples.append((now, cpu))
        with contextlib.suppress(OSError, ValueError):
            self.peak_rss_kib = max(self.peak_rss_kib, memory_kib(self.broker.pid)["VmRSS"])

    def _poll(self) -> None:
        try:
            kind, role, index, payload = self.results.get(timeout=0.05)
        except queue.Empty:
            pass
        else:
            key = (role, index)
            if kind == "ready":
                self.ready[key] = time.monotonic()
            elif kind == "synced":
                self.synced[key] = time.monotonic()
            elif kind == "done":
                self.done[key] = payload
            else:
                trace = payload.get("traceback", "").strip()
                last = trace.splitlines()[-1] if trace else "?"
                raise _Abort(f"{role} {index} failed: {last}\n{trace}")
        self.sample()
        now = time.monotonic()
        if now > self.deadline:
            raise _Abort("cap reached: workers killed")
        if not self.broker.alive():
            raise _Abort(f"broker exited with {self.broker.proc.returncode}")
        for key, proc in self.procs.items():
            if key in self.done or proc.exitcode is None:
                continue
            first = self._exited_at.setdefault(key, now)
            if proc.exitcode != 0 or now - first > 2.0:
                raise _Abort(f"{key[0]} {key[1]} exited with {proc.exitcode}")

    def wait(self, table: dict[tuple[str, int], Any], keys: set[tuple[str, int]]) -> None:
        while not keys <= set(table):
            self._poll()

    def keys(self, role: str) -> set[tuple[str, int]]:
        return {k for k in self.procs if k[0] == role}

    def start_profilers(self, roles: Sequence[str]) -> None:
        """py-spy on the Python broker and the given workers, until they exit."""
        if self.profile_dir is None:
            return
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        targets: list[tuple[str, int]] = []
        if self.system.python_broker:
            targets.append(("broker", self.broker.pid))
        targets += [(f"{r}{i}", p.pid) for (r, i), p in self.procs.items() if r in roles and p.pid]
        seconds = max(1, int(self.deadline - time.monotonic()))
        for name, pid in targets:
            out = self.profile_dir / f"{self.system.name}-{self.tag}-{name}.txt"
            argv = [spy, "record", "-p", str(pid), "-d", str(seconds), "-r", "250"]
            proc = subprocess.Popen(
                [*argv, "-f", "raw", "-o", str(out)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self._profilers.append((name, out, proc))

    def finish_profilers(self) -> dict[str, list[tuple[str, float]]]:
        out: dict[str, list[tuple[str, float]]] = {}
        for name, path, proc in self._profilers:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)  # py-spy writes what it has on SIGINT
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if path.exists():
                top = self_time(path.read_text(encoding="utf-8", errors="replace"))
                out[name] = top
                path.with_suffix(".top.txt").write_text(
                    "".join(f"{pct:5.1f}%  {frame}\n" for frame, pct in top), encoding="utf-8"
                )
        self._profilers.clear()
        return out

    def terminate(self) -> None:
        for proc in self.procs.values():
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs.values():
            proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)
        self.results.cancel_join_thread()
        self.results.close()


#: Leaf frames where a thread waits rather than works; py-spy still samples them
#: (the multiprocessing queue's feeder thread, the event loop's epoll_wait, ...).
WAITING_FRAMES: Final = frozenset(
    {
        "Condition.wait (threading.py)",
        "EpollSelector.select (selectors.py)",
        "_worker (concurrent/futures/thread.py)",
        "Poller.poll (zmq/sugar/poll.py)",
        "Socket.poll (zmq/sugar/socket.py)",
    }
)
WAITING: Final = "(waiting: epoll, poll, locks; % of all samples)"


def self_time(raw: str, top: int = 20) -> list[tuple[str, float]]:
    """Aggregate py-spy ``raw`` (collapsed stacks) into the frames with most self time.

    Returns (function (file), percent of the busy samples), most first, after
    one entry for the samples spent waiting (:data:`WAITING_FRAMES`, in percent
    of all samples). Line numbers are dropped so that a function's lines add up.
    """
    totals: dict[str, int] = {}
    samples = waiting = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frame = re.sub(r":\d+\)$", ")", stack.rsplit(";", 1)[-1])
        if frame in WAITING_FRAMES:
            waiting += count
        else:
            totals[frame] = totals.get(frame, 0) + count
    busy = samples - waiting
    if not samples:
        return []
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return [(WAITING, 100.0 * waiting / samples)] + [
        (frame, 100.0 * n / busy) for frame, n in ranked
    ]


def _cpu_between(run: _Run, start_ns: int, end_ns: int) -> dict[str, tuple[float, float]]:
    """CPU seconds and percent of one core of each process from ``start_ns`` to ``end_ns``.

    Each figure spans the last sample before the start and the first after
    the end (or the last sample, if the process exited before that).
    """
    out: dict[str, tuple[float, float]] = {}
    names = {n for _, cpu in run.cpu_samples for n in cpu}
    for name in sorted(names):
        samples = [(t, cpu[name]) for t, cpu in run.cpu_samples if name in cpu]
        before = [s for s in samples if s[0] <= start_ns]
        after = [s for s in samples if s[0] >= end_ns]
        first = before[-1] if before else samples[0]
        last = after[0] if after else samples[-1]
        if last[0] <= first[0]:
            continue
        seconds = last[1] - first[1]
        out[name] = (seconds, 100.0 * seconds / ((last[0] - first[0]) / _NS))
    return out


# -- one run of one workload --------------------------------------------------------------


class _Workdirs:
    """Temporary directories of one suite run, under one parent removed at the end."""

    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="deb-suite-", dir="/tmp")
        # Brokers that drop privileges (mosquitto started as root) must get through.
        os.chmod(self.root, 0o711)

    def new(self, tag: str) -> str:
        return tempfile.mkdtemp(prefix=f"{tag}-", dir=self.root)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _with_broker(
    system: Adapter,
    result: Result,
    workdirs: _Workdirs,
    options: BrokerOptions,
    cap: float,
    body: Callable[[_Run], None],
    profile_dir: Path | None = None,
) -> None:
    """Start a broker, run ``body``, always stop everything; errors go into ``result``."""
    wall0 = time.monotonic()
    workdir = workdirs.new(f"{system.name}-{result.workload}")
    try:
        broker = system.start_broker(workdir, options)
    except Exception as exc:
        result.status = "unavailable"
        result.errors.append(f"broker did not start: {exc}")
        result.wall_s = time.monotonic() - wall0
        return
    result.transport = broker.transport
    result.broker_settings = broker.settings
    tag = result.workload + (f"-{result.filters}" if result.filters is not None else "")
    run = _Run(system, broker, cap, profile_dir, tag)
    try:
        body(run)
    except _Abort as exc:
        result.status = "incomplete"
        result.errors.append(str(exc))
    except Exception as exc:
        result.status = "incomplete"
        result.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        run.terminate()
        code = broker.stop()
        result.broker_exit = code
        if code not in broker.clean_exit_codes:
            result.errors.append(f"broker exit code {code}")
            result.status = "incomplete" if result.ok else result.status
        if result.status != "ok":
            tail = broker.output().strip().splitlines()[-3:]
            result.errors.extend(f"broker: {line[:200]}" for line in tail)
        result.profile = run.finish_profilers()
        shutil.rmtree(workdir, ignore_errors=True)
        result.wall_s = time.monotonic() - wall0


def run_throughput(
    system: Adapter,
    workload: str,
    messages: int,
    settings: Settings,
    workdirs: _Workdirs,
    *,
    shape: tuple[int, int],
    filters: int | None = None,
    stalled: bool = False,
    profile_dir: Path | None = None,
) -> Result:
    """Publishers flat out to subscribers of the wildcard; optionally with a
    holder of ``filters`` idle filters (E) or a stalled subscriber (F)."""
    n_pubs, n_subs = shape
    result = Result(system.name, system.label, workload, messages=messages, filters=filters)
    lossless = workload in LOSSLESS
    options = BrokerOptions(
        subscriptions_per_connection=(filters or 0) + 64,
        undeclared_filters=filters is not None,
        lossless=lossless,
    )
    if lossless:
        result.notes.append(system.lossless_mode)

    def body(run: _Run) -> None:
        shares = [messages // n_pubs + (1 if i < messages % n_pubs else 0) for i in range(n_pubs)]
        result.expected = messages * n_subs
        waiting: set[tuple[str, int]] = set()
        if filters is not None:
            run.spawn("holder", 0, {"filters": routing_filters(filters), "publishers": n_pubs})
            run.wait(run.ready, {("holder", 0)})
            waiting.add(("holder", 0))
        for i in range(n_subs):
            params = {"filter": WILDCARD, "expected": messages, "publishers": n_pubs}
            run.spawn("sub", i, {**params, "lossless": lossless})
        if stalled:
            run.spawn("stalled", 0, {"filter": WILDCARD, "publishers": n_pubs})
        subs = run.keys("sub") | run.keys("stalled")
        run.wait(run.ready, subs)
        for i in range(n_pubs):
            run.spawn("pub", i, {"count": shares[i], "lossless": lossless})
        pubs = run.keys("pub")
        run.wait(run.ready, pubs)
        run.wait(run.synced, subs | waiting)
        if filters is not None:
            result.load_s = run.synced[("holder", 0)] - run.spawned_at[("holder", 0)]
        with contextlib.suppress(OSError):
            result.memory["rss_before_kib"] = memory_kib(run.broker.pid)["VmRSS"]
        run.sample()
        run.start_profilers(("pub", "sub"))
        run.go.set()
        run.wait(run.done, pubs)
        run.publishers_done.set()
        run.wait(run.done, run.keys("sub"))
        run.sample()
        with contextlib.suppress(OSError):
            result.memory["peak_kib"] = max(memory_kib(run.broker.pid)["VmHWM"], run.peak_rss_kib)
        run.stop.set()
        others = run.keys("holder") | run.keys("stalled")
        if others:
            run.wait(run.done, others)
        _throughput_figures(run, result, messages)

    _with_broker(system, result, workdirs, options, settings.cap, body, profile_dir)
    return result


def _throughput_figures(run: _Run, result: Result, messages: int) -> None:
    pubs = [run.done[k] for k in sorted(run.keys("pub"))]
    subs = [run.done[k] for k in sorted(run.keys("sub"))]
    start_ns = min(p["start_ns"] for p in pubs)
    flushed_ns = max(p["flushed_ns"] for p in pubs)
    sent = sum(p["sent"] for p in pubs)
    result.received = sum(s["received"] for s in subs)
    result.subscriber_end = [s["reason"] for s in subs]
    dropped = sum(s.get("dropped", 0) for s in subs)
    missed = sum(s.get("missed", 0) for s in subs)
    if sent < messages:
        result.errors.append(f"publishers sent {sent:,} of {messages:,} before the cap")
        result.status = "incomplete"
    if missed:
        result.notes.append(f"broker drops seen as gaps {missed:,}")
    if dropped:
        result.notes.append(f"client-side drops {dropped:,}")
    refused = sum(p.get("refused", 0) for p in pubs)
    if refused:
        result.errors.append(f"the broker refused {refused:,} publishes")
        result.status = "incomplete"
    for key in sorted(run.keys("stalled")):
        info = run.done.get(key, {})
        if info.get("disconnected") or info.get("still_connected") is False:
            result.notes.append("stalled subscriber disconnected by the broker")
    last_ns = max((s["last_ns"] for s in subs if s["received"]), default=0)
    if last_ns > start_ns:
        result.run_s = (last_ns - start_ns) / _NS
        result.received_per_s = result.received / result.run_s
    if flushed_ns > start_ns:
        result.published_per_s = sent / ((flushed_ns - start_ns) / _NS)
    if result.expected:
        result.delivered_pct = 100.0 * result.received / result.expected
    _cpu_figures(run, result, start_ns, max(last_ns, flushed_ns))
    if result.broker_cpu_s is not None and result.received:
        result.broker_us_per_msg = 1e6 * result.broker_cpu_s / result.received


def _cpu_figures(run: _Run, result: Result, start_ns: int, end_ns: int) -> None:
    ours = 0.0
    host: float | None = None
    for name, (seconds, pct) in _cpu_between(run, start_ns, end_ns).items():
        if name == _HOST:
            host = pct
            continue
        ours += pct
        if name == "broker":
            result.broker_cpu_s, result.broker_cpu_pct = seconds, pct
        else:
            result.worker_cpu_pct[name] = round(pct, 1)
    if host is not None:
        result.other_cpu_pct = max(0.0, host - ours)
        if result.other_cpu_pct >= OTHER_LOAD_NOTE:
            result.notes.append(
                f"other processes on the host used {result.other_cpu_pct:.0f}% CPU meanwhile"
            )


def host_busy_seconds() -> float:
    """CPU time all cores spent busy since boot (``/proc/stat``), in seconds."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest is counted in user)
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def host_load(seconds: float = 1.0) -> float:
    """Percent of one core the whole host is busy over ``seconds``."""
    before = host_busy_seconds()
    time.sleep(seconds)
    return 100.0 * (host_busy_seconds() - before) / seconds


def run_latency(
    system: Adapter,
    settings: Settings,
    workdirs: _Workdirs,
    profile_dir: Path | None = None,
    workload: str = "D",
) -> Result:
    """One message in flight: a pinger publishes and an echo republishes (D), or
    a requester asks and a responder replies through the system's own
    request/reply (R)."""
    count, warmup = settings.latency_messages, settings.warmup
    result = Result(system.name, system.label, workload, messages=count, expected=count)
    answer, ask = ROUND_TRIPS[workload]

    def body(run: _Run) -> None:
        run.spawn(answer, 0, {})
        run.wait(run.synced, {(answer, 0)})
        run.spawn(ask, 0, {"count": count, "warmup": warmup})
        run.wait(run.ready, {(ask, 0)})
        run.sample()
        run.start_profilers((ask, answer))
        run.go.set()
        run.wait(run.done, {(ask, 0)})
        run.sample()
        run.stop.set()
        run.wait(run.done, {(answer, 0)})
        ping = run.done[(ask, 0)]
        rtts = sorted(ping["rtts_ns"])
        result.received = len(rtts)
        result.lost = ping["lost"]
        result.delivered_pct = 100.0 * len(rtts) / count if count else None
        if ping["stale"]:
            result.notes.append(f"late echoes {ping['stale']}")
        start_ns, end_ns = ping["start_ns"], ping["end_ns"]
        if end_ns > start_ns:
            result.run_s = (end_ns - start_ns) / _NS
            result.received_per_s = ping["round_trips"] / result.run_s
        if rtts:
            result.latency_us = {
                "p50": percentile(rtts, 50) / 1000,
                "p99": percentile(rtts, 99) / 1000,
                "p99.9": percentile(rtts, 99.9) / 1000,
                "min": rtts[0] / 1000,
                "max": rtts[-1] / 1000,
                "mean": sum(rtts) / len(rtts) / 1000,
            }
        if len(rtts) < count:
            result.status = "incomplete"
            result.errors.append(f"{len(rtts)} of {count} round trips measured")
        _cpu_figures(run, result, start_ns, end_ns)

    _with_broker(system, result, workdirs, BrokerOptions(), settings.cap, body, profile_dir)
    return result


def run_memory(
    system: Adapter, settings: Settings, workdirs: _Workdirs, profile_dir: Path | None = None
) -> Result:
    """Idle RSS with many clients, then peak RSS under A with a stalled subscriber."""
    clients = settings.idle_clients
    result = Result(system.name, system.label, "F", messages=settings.messages)
    result.memory["clients"] = clients

    def body(run: _Run) -> None:
        time.sleep(0.5)
        result.memory["rss_empty_kib"] = memory_kib(run.broker.pid)["VmRSS"]
        share = [
            clients // IDLE_PROCESSES + (i < clients % IDLE_PROCESSES)
            for i in range(IDLE_PROCESSES)
        ]
        for i, n in enumerate(share):
            if n:
                run.spawn("idle", i, {"clients": n})
        run.wait(run.ready, run.keys("idle"))
        settle = time.monotonic() + 1.0
        while time.monotonic() < settle:
            run._poll()
        result.memory["rss_clients_kib"] = memory_kib(run.broker.pid)["VmRSS"]
        run.stop.set()
        run.wait(run.done, run.keys("idle"))
        still = sum(run.done[k].get("still_connected", run.done[k]["clients"]) for k in run.done)
        if still < clients:
            result.notes.append(f"{clients - still} idle clients were disconnected")
        retries = sum(run.done[k].get("retries", 0) for k in run.done)
        if retries:
            reasons = {why for k in run.done for why in run.done[k].get("retry_reasons", [])}
            result.notes.append(
                f"{retries} idle client connects retried ({'; '.join(sorted(reasons))[:200]})"
            )

    options = BrokerOptions(connections=clients + 64)
    _with_broker(system, result, workdirs, options, settings.cap, body)
    if not result.ok:
        return result
    stalled = run_throughput(
        system,
        "F",
        settings.messages,
        settings,
        workdirs,
        shape=(1, 1),
        stalled=True,
        profile_dir=profile_dir,
    )
    for key in ("rss_before_kib", "peak_kib"):
        if key in stalled.memory:
            result.memory[key] = stalled.memory[key]
    result.transport = stalled.transport
    result.status = stalled.status
    result.received = stalled.received
    result.expected = stalled.expected
    result.received_per_s = stalled.received_per_s
    result.delivered_pct = stalled.delivered_pct
    result.broker_cpu_pct = stalled.broker_cpu_pct
    result.worker_cpu_pct = stalled.worker_cpu_pct
    result.other_cpu_pct = stalled.other_cpu_pct
    result.notes += stalled.notes
    result.errors += stalled.errors
    result.profile = stalled.profile
    result.wall_s += stalled.wall_s
    return result


# -- the suite -------------------------------------------------------------------------------


def run_suite(
    systems: Sequence[str],
    workloads: Sequence[str],
    settings: Settings,
    *,
    install: bool = True,
    profile_dir: Path | None = None,
) -> tuple[list[Result], dict[str, Any]]:
    """Run ``workloads`` against ``systems``; results and the machine description."""
    _raise_fd_limit(settings.idle_clients * 2 + 256)
    load = host_load()
    if load >= OTHER_LOAD_NOTE:
        _progress(
            f"warning: the host is already {load:.0f}% busy (percent of one core) before "
            "the suite starts; figures will be noisy (see the notes of each row)"
        )
    results: list[Result] = []
    versions: dict[str, str] = {}
    ready: list[Adapter] = []
    for name in systems:
        system = adapter(name)
        reason = system.ensure(install)
        if reason is not None:
            _progress(f"[{system.label}] NOT AVAILABLE: {reason}")
            results += [
                Result(name, system.label, w, status="unavailable", errors=[reason])
                for w in workloads
            ]
            continue
        try:
            versions.update(system.versions())
        except Exception as exc:
            versions[system.label] = f"version unknown ({exc})"
        ready.append(system)
    workdirs = _Workdirs()
    try:
        # Workloads outside, systems inside, repeats interleaved: a burst of
        # other load on the host then spreads over the systems instead of
        # landing on one of them.
        for w in workloads:
            runs: dict[str, list[list[Result]]] = {s.name: [] for s in ready}
            for rep in range(settings.repeat):
                for system in ready:
                    if w in LOSSLESS and not system.lossless_mode:
                        continue  # it cannot deliver every event: no row
                    if w == "R" and not system.request_reply:
                        continue  # no request/reply of its own: no row
                    tag = f"[{system.label}] {w}"
                    if settings.repeat > 1:
                        tag += f" (run {rep + 1}/{settings.repeat})"
                    out = _run_workload(system, w, settings, workdirs, profile_dir, tag)
                    runs[system.name].append(out)
            for system in ready:
                if runs[system.name]:
                    results += _median_runs(runs[system.name])
    finally:
        workdirs.remove()
    # Table order: systems as given, then workloads.
    order = {name: i for i, name in enumerate(systems)}
    results.sort(key=lambda r: order[r.system])
    machine = machine_description(versions)
    machine["load_before_pct"] = round(load)
    return results, machine


#: The figure each workload's median run is chosen by, and whether lower is better.
_MEDIAN_BY: Final[dict[str, tuple[str, Callable[[Result], float | None]]]] = {
    "A": ("received/s", lambda r: r.received_per_s),
    "B": ("received/s", lambda r: r.received_per_s),
    "C": ("received/s", lambda r: r.received_per_s),
    "BL": ("received/s", lambda r: r.received_per_s),
    "CL": ("received/s", lambda r: r.received_per_s),
    "D": ("p50", lambda r: r.latency_us["p50"] if r.latency_us else None),
    "R": ("p50", lambda r: r.latency_us["p50"] if r.latency_us else None),
    "E": ("broker CPU µs/msg", lambda r: r.broker_us_per_msg),
    "F": ("peak RSS", lambda r: r.memory.get("peak_kib")),
}


def _median_runs(runs: list[list[Result]]) -> list[Result]:
    """Of repeated runs, the median one (per position: E has one per filter count)."""
    out: list[Result] = []
    for position in zip(*runs, strict=True):
        what, key = _MEDIAN_BY[position[0].workload]
        measured = [(v, r) for r in position if r.ok and (v := key(r)) is not None]
        if not measured:
            out.append(position[0])
            continue
        measured.sort(key=lambda vr: vr[0])
        chosen = measured[(len(measured) - 1) // 2][1]
        if len(position) > 1:
            spread = ", ".join(_spread(v, what) for v, _ in measured)
            failed = [r for r in position if not r.ok]
            why = "; ".join(r.errors[0].splitlines()[0][:120] for r in failed if r.errors)
            chosen.notes.insert(
                0,
                f"median of {len(position)} runs by {what} ({spread}"
                + (f"; {len(failed)} incomplete: {why}" if failed else "")
                + ")",
            )
        out.append(chosen)
    return out


def _spread(value: float, what: str) -> str:
    if what == "peak RSS":
        return f"{value / 1024:.1f} MiB"
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


def _run_workload(
    system: Adapter,
    workload: str,
    settings: Settings,
    workdirs: _Workdirs,
    profile_dir: Path | None,
    tag: str,
) -> list[Result]:
    _progress(f"{tag}: {WORKLOADS[workload]} ...")
    out: list[Result]
    if workload in SHAPES:
        out = [
            run_throughput(
                system,
                workload,
                settings.messages,
                settings,
                workdirs,
                shape=SHAPES[workload],
                profile_dir=profile_dir,
            )
        ]
    elif workload in ROUND_TRIPS:
        out = [run_latency(system, settings, workdirs, profile_dir, workload)]
    elif workload == "E":
        out = []
        for n in settings.filter_counts:
            r = run_throughput(
                system,
                "E",
                settings.routing_messages,
                settings,
                workdirs,
                shape=(1, 1),
                filters=n,
                profile_dir=profile_dir if n == max(settings.filter_counts) else None,
            )
            _progress(f"{tag}: {n:,} filters: {_summary(r)}")
            out.append(r)
    else:
        out = [run_memory(system, settings, workdirs, profile_dir)]
    for r in out:
        for frame_owner, top in r.profile.items():
            _progress(f"{tag}: py-spy self time, {frame_owner}:")
            for frame, pct in top[:8]:
                _progress(f"    {pct:5.1f}%  {frame}")
    _progress(f"{tag}: {_summary(out[-1]) if len(out) == 1 else 'done'}")
    return out


def _summary(r: Result) -> str:
    if r.status == "unavailable":
        return "UNAVAILABLE: " + "; ".join(r.errors)[:300]
    text = f"{r.status} in {r.wall_s:.1f} s"
    if r.received_per_s is not None:
        text += f", {r.received_per_s:,.0f} received/s"
    if r.delivered_pct is not None:
        text += f", {r.delivered_pct:.2f}% delivered"
    if r.latency_us:
        text += f", p50 {r.latency_us['p50']:.0f} µs, p99 {r.latency_us['p99']:.0f} µs"
    if r.errors:
        text += "".join(f"\n    {e.splitlines()[0][:300]}" for e in r.errors if e)
    return text


def _raise_fd_limit(wanted: int) -> None:
    """Workload F opens a thousand connections: lift the soft descriptor limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def machine_description(versions: dict[str, str]) -> dict[str, Any]:
    """CPU model, cores, kernel, Python and package versions."""
    mem = ""
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="utf-8") as f:
        first = f.readline().split()
        if len(first) >= 2:
            mem = f"{int(first[1]) / 1024 / 1024:.0f} GiB"
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        versions.setdefault("matplotlib", version("matplotlib"))
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "memory": mem,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "versions": versions,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


# -- report -----------------------------------------------------------------------------------

_OURS: Final = "daemoneye"


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None or math.isnan(value) else format(value, spec) + suffix


def _ratio(ours: float | None, theirs: float | None) -> str:
    if ours is None or theirs is None or theirs == 0 or math.isnan(ours) or math.isnan(theirs):
        return "n/a"
    return f"{ours / theirs:.2f}x"


def _notes(r: Result) -> str:
    notes: list[str] = []
    if r.status == "unavailable":
        return "NOT AVAILABLE: " + "; ".join(e.splitlines()[0] for e in r.errors if e)
    if r.status != "ok":
        notes.append("INCOMPLETE")
    notes += r.notes
    if r.lost:
        notes.append(f"lost {r.lost}")
    if r.published_per_s is not None and r.workload != "E":
        notes.append(f"published/s {r.published_per_s:,.0f}")
    if r.worker_cpu_pct:
        notes.append("CPU % " + ", ".join(f"{k} {v:.0f}" for k, v in r.worker_cpu_pct.items()))
    notes += [e.splitlines()[0][:160] for e in r.errors if e]
    return "; ".join(notes).replace("|", "/")


def _by(results: Sequence[Result], workload: str) -> list[Result]:
    return [r for r in results if r.workload == workload]


def _ours(rows: Sequence[Result]) -> Result | None:
    return next((r for r in rows if r.system == _OURS and r.ok), None)


def _throughput_table(rows: Sequence[Result]) -> list[str]:
    lines = [
        "| system | transport | received/s | delivered % | broker CPU % "
        "| broker CPU µs/msg | notes |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.label} | {r.transport or '-'} | {_fmt(r.received_per_s, ',.0f')} "
            f"| {_fmt(r.delivered_pct, '.2f')} | {_fmt(r.broker_cpu_pct, '.0f')} "
            f"| {_fmt(r.broker_us_per_msg, '.2f')} | {_notes(r)} |"
        )
    ours = _ours(rows)
    if ours is not None:
        for r in rows:
            if r.system == _OURS:
                continue
            lines.append(
                f"| *this bus ÷ {r.label}* | | {_ratio(ours.received_per_s, r.received_per_s)} "
                f"| {_ratio(ours.delivered_pct, r.delivered_pct)} "
                f"| {_ratio(ours.broker_cpu_pct, r.broker_cpu_pct)} "
                f"| {_ratio(ours.broker_us_per_msg, r.broker_us_per_msg)} | |"
            )
    return lines


def _latency_table(rows: Sequence[Result]) -> list[str]:
    lines = [
        "| system | transport | round trips/s | delivered % | broker CPU % "
        "| p50 µs | p99 µs | p99.9 µs | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lat = r.latency_us or {}
        lines.append(
            f"| {r.label} | {r.transport or '-'} | {_fmt(r.received_per_s, ',.0f')} "
            f"| {_fmt(r.delivered_pct, '.2f')} | {_fmt(r.broker_cpu_pct, '.0f')} "
            f"| {_fmt(lat.get('p50'), '.0f')} | {_fmt(lat.get('p99'), '.0f')} "
            f"| {_fmt(lat.get('p99.9'), '.0f')} | {_notes(r)} |"
        )
    ours = _ours(rows)
    if ours is not None and ours.latency_us:
        for r in rows:
            if r.system == _OURS:
                continue
            theirs = r.latency_us or {}
            lines.append(
                f"| *this bus ÷ {r.label}* | | {_ratio(ours.received_per_s, r.received_per_s)} "
                f"| | | {_ratio(ours.latency_us['p50'], theirs.get('p50'))} "
                f"| {_ratio(ours.latency_us['p99'], theirs.get('p99'))} "
                f"| {_ratio(ours.latency_us['p99.9'], theirs.get('p99.9'))} | |"
            )
    return lines


def _routing_tables(rows: Sequence[Result]) -> list[str]:
    lines = [
        "| system | filters | received/s | delivered % | broker CPU % | broker CPU µs/msg "
        "| µs/msg ÷ at fewest filters | filters loaded in s | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    base: dict[str, float | None] = {}
    for r in rows:
        if r.system not in base:
            base[r.system] = r.broker_us_per_msg if r.ok else None
        lines.append(
            f"| {r.label} | {_fmt(r.filters, ',')} | {_fmt(r.received_per_s, ',.0f')} "
            f"| {_fmt(r.delivered_pct, '.2f')} | {_fmt(r.broker_cpu_pct, '.0f')} "
            f"| {_fmt(r.broker_us_per_msg, '.2f')} "
            f"| {_ratio(r.broker_us_per_msg, base[r.system]) if r.ok else 'n/a'} "
            f"| {_fmt(r.load_s, '.1f')} | {_notes(r)} |"
        )
    peers = list(dict.fromkeys((r.system, r.label) for r in rows if r.system != _OURS))
    ours = {r.filters: r for r in rows if r.system == _OURS and r.ok}
    if ours and peers:
        lines += [
            "",
            "This bus ÷ each peer, broker CPU µs per message (below 1 is cheaper) "
            "and received/s (above 1 is faster):",
            "",
            "| filters | "
            + " | ".join(f"÷ {label} (µs/msg, received/s)" for _, label in peers)
            + " |",
            "|---:|" + "---:|" * len(peers),
        ]
        for n, mine in ours.items():
            cells = []
            for system, _ in peers:
                theirs = next((r for r in rows if r.system == system and r.filters == n), None)
                if theirs is None or not theirs.ok:
                    cells.append("n/a")
                else:
                    cells.append(
                        f"{_ratio(mine.broker_us_per_msg, theirs.broker_us_per_msg)}, "
                        f"{_ratio(mine.received_per_s, theirs.received_per_s)}"
                    )
            lines.append(f"| {_fmt(n, ',')} | " + " | ".join(cells) + " |")
    return lines


def _mib(kib: float | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.1f}"


def _memory_table(rows: Sequence[Result]) -> list[str]:
    lines = [
        "| system | transport | RSS, no clients MiB | RSS with idle clients MiB | KiB per client "
        "| RSS before A + stalled MiB | peak RSS MiB | growth MiB | healthy subscriber "
        "delivered % | received/s | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        m = r.memory
        empty, full = m.get("rss_empty_kib"), m.get("rss_clients_kib")
        per = (full - empty) / m["clients"] if empty and full and m.get("clients") else None
        before, peak = m.get("rss_before_kib"), m.get("peak_kib")
        growth = peak - before if before is not None and peak is not None else None
        lines.append(
            f"| {r.label} | {r.transport or '-'} | {_mib(empty)} | {_mib(full)} "
            f"| {_fmt(per, '.1f')} | {_mib(before)} | {_mib(peak)} | {_mib(growth)} "
            f"| {_fmt(r.delivered_pct, '.2f')} | {_fmt(r.received_per_s, ',.0f')} "
            f"| {_notes(r)} |"
        )
    return lines


def _targets(results: Sequence[Result]) -> list[str]:
    """Where this bus stands against each target, from the figures above."""

    def get(system: str, workload: str) -> Result | None:
        return next(
            (r for r in results if r.system == system and r.workload == workload and r.ok), None
        )

    def peers_of(workload: str) -> list[Result]:
        return [r for r in results if r.workload == workload and r.system != _OURS and r.ok]

    lines = ["| target | figures | met? |", "|---|---|---|"]
    a, za = get(_OURS, "A"), get("zmq", "A")
    if a and za and a.received_per_s and za.received_per_s:
        full = (a.delivered_pct or 0) >= 99.999
        met = a.received_per_s >= 2 * za.received_per_s and full
        lines.append(
            f"| A: ≥ 2x the ZeroMQ proxy's received/s, every message delivered "
            f"| {a.received_per_s:,.0f}/s vs {za.received_per_s:,.0f}/s "
            f"({a.received_per_s / za.received_per_s:.2f}x), {a.delivered_pct:.2f}% delivered "
            f"| {'yes' if met else 'NO'} |"
        )
    for w in ("B", "C"):
        ours = get(_OURS, w)
        peers = [p for p in peers_of(w) if p.received_per_s]
        if ours and ours.received_per_s and peers:
            best = max(peers, key=lambda p: p.received_per_s or 0.0)
            assert best.received_per_s
            met = all(ours.received_per_s > (p.received_per_s or 0) for p in peers)
            lines.append(
                f"| {w}: ahead of every peer | {ours.received_per_s:,.0f}/s; best peer "
                f"{best.label} {best.received_per_s:,.0f}/s "
                f"({ours.received_per_s / best.received_per_s:.2f}x) | {'yes' if met else 'NO'} |"
            )
    for w in sorted(LOSSLESS):
        ours = get(_OURS, w)
        peers = [p for p in peers_of(w) if p.received_per_s]
        if ours and ours.received_per_s and peers:
            full = all((r.delivered_pct or 0) >= 99.999 for r in (ours, *peers))
            met = full and all(ours.received_per_s > (p.received_per_s or 0) for p in peers)
            vs = ", ".join(f"{p.label} {p.received_per_s:,.0f}/s" for p in peers)
            lines.append(
                f"| {w}: every event delivered, ahead of {', '.join(p.label for p in peers)} "
                f"| {ours.received_per_s:,.0f}/s ({ours.delivered_pct:.2f}% delivered) vs "
                f"{vs} | {'yes' if met else 'NO'} |"
            )
    d, zd = get(_OURS, "D"), get("zmq", "D")
    if d and d.latency_us:
        p50, p99 = d.latency_us["p50"], d.latency_us["p99"]
        if zd and zd.latency_us:
            z50 = zd.latency_us["p50"]
            lines.append(
                f"| D: p50 ≤ the ZeroMQ proxy's | {p50:.0f} µs vs {z50:.0f} µs "
                f"| {'yes' if p50 <= z50 else 'NO'} |"
            )
        lines.append(f"| D: p99 < 1 ms | {p99:.0f} µs | {'yes' if p99 < 1000 else 'NO'} |")
    e = [r for r in results if r.system == _OURS and r.workload == "E" and r.ok]
    if len(e) >= 2 and e[0].broker_us_per_msg and e[-1].broker_us_per_msg:
        ratio = e[-1].broker_us_per_msg / e[0].broker_us_per_msg
        lines.append(
            f"| E: cost at {e[-1].filters:,} filters within 2x of the cost at "
            f"{e[0].filters:,} | {e[0].broker_us_per_msg:.2f} → "
            f"{e[-1].broker_us_per_msg:.2f} µs/msg ({ratio:.2f}x) "
            f"| {'yes' if ratio <= 2 else 'NO'} |"
        )
    f = get(_OURS, "F")
    if f and "peak_kib" in f.memory and "rss_before_kib" in f.memory:
        growth = (f.memory["peak_kib"] - f.memory["rss_before_kib"]) / 1024
        total = f.messages * PAYLOAD_BYTES / 1024 / 1024
        lines.append(
            f"| F: memory bounded | growth {growth:.1f} MiB while {total:.0f} MiB of events "
            f"went to a subscriber that never reads; healthy subscriber "
            f"{_fmt(f.delivered_pct, '.2f')}% delivered | {'yes' if growth < total / 2 else 'NO'} |"
        )
    return lines


def markdown_report(
    results: Sequence[Result], machine: dict[str, Any], settings: Settings, command: str
) -> str:
    """The whole RESULTS.md: machine, settings, targets, one table per workload."""
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    out = [
        "# Side-by-side benchmark: daemoneye-eventbus, ZeroMQ, NATS, Mosquitto",
        "",
        f"Generated by `{command}` on {machine['date']}. "
        "`benchmarks/README.md` describes the workloads and how each figure is measured.",
        "",
        f"- **Machine:** {machine['cpu_model']}, {machine['cores']} cores, "
        f"{machine['memory']} RAM, {machine['kernel']}, {machine['python']}; "
        f"{machine.get('load_before_pct', '?')}% of a core busy with other work when "
        "the suite started (rows note other processes' CPU use during a run when it "
        f"exceeds {OTHER_LOAD_NOTE:.0f}%)",
        f"- **Versions:** {versions}",
        f"- **Settings:** {'--quick, ' if settings.quick else ''}payload {PAYLOAD_BYTES} B; "
        f"{settings.messages:,} events per A/B/C/F run; {settings.latency_messages:,} round "
        f"trips after {settings.warmup:,} warm-up (D); E at "
        f"{', '.join(f'{n:,}' for n in settings.filter_counts)} filters with "
        f"{settings.routing_messages:,} events each; F with {settings.idle_clients:,} idle "
        f"clients; cap {settings.cap:g} s per run; "
        + (
            f"each workload run {settings.repeat} times per system, interleaved, and the "
            "median run shown (chosen by received/s, p50, µs/msg or peak RSS)"
            if settings.repeat > 1
            else "one run of each"
        ),
        "- Every publisher and subscriber is its own OS process and the broker another; on "
        f"{machine['cores']} cores they compete for CPU, so the figures describe the whole "
        "host. Publishers send flat out; drops under load are figures, not failures. "
        "Broker CPU % is the broker process's utime + stime (`/proc/<pid>/stat`) over the "
        "run, in percent of one core; µs/msg divides it by the events received.",
        "",
    ]
    settings_lines = {
        r.label: "; ".join(r.broker_settings)
        for r in results
        if r.broker_settings and r.workload in SHAPES
    }
    if settings_lines:
        out.append(
            "- **Broker settings:** "
            + "; ".join(f"{k}: {v}" for k, v in settings_lines.items())
            + " (E and F raise this bus's per-connection subscription and connection "
            "limits and allow filters outside the declared topics)"
        )
        out.append("")
    targets = _targets(results)
    if len(targets) > 2:
        out += ["## Targets", "", *targets, ""]
    for w, title in WORKLOADS.items():
        rows = _by(results, w)
        if not rows:
            continue
        out += [f"## {w}: {title}", ""]
        if w in SHAPES:
            out += _throughput_table(rows)
        elif w in ROUND_TRIPS:
            out += _latency_table(rows)
        elif w == "E":
            out += _routing_tables(rows)
        else:
            out += _memory_table(rows)
        out.append("")
    return "\n".join(out)


def importable_chart() -> bool:
    """Whether matplotlib is installed (the chart is skipped without it)."""
    from benchmarks.peers.base import importable

    return importable("matplotlib")


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:  # an empty legend only warns
        ax.legend(fontsize=8)


def write_chart(results: Sequence[Result], path: Path) -> str | None:
    """Grouped bars of A/B/C received/s and D latency, E cost and F memory; None or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib is not available: {exc}"
    systems = list(dict.fromkeys((r.system, r.label) for r in results))
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    width = 0.8 / max(1, len(systems))

    def bars(
        ax: Any,
        groups: list[str],
        value: Callable[[str, str], float | None],
        label_of: Callable[[str, str], str] | None = None,
    ) -> None:
        for i, (system, label) in enumerate(systems):
            xs = [g + (i - (len(systems) - 1) / 2) * width for g in range(len(groups))]
            ys = [value(system, group) or 0.0 for group in groups]
            ax.bar(xs, ys, width, label=label)
            if label_of is not None:
                for x, y, group in zip(xs, ys, groups, strict=True):
                    text = label_of(system, group)
                    if text:
                        ax.annotate(text, (x, y), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(groups)), groups)

    def delivered(system: str, workload: str) -> str:
        r = get(system, workload)
        pct = r.delivered_pct if r else None
        return f"{pct:.0f}%" if pct is not None and pct < 99.5 else ""

    def get(system: str, workload: str) -> Result | None:
        return next(
            (r for r in results if r.system == system and r.workload == workload and r.ok), None
        )

    def received(system: str, workload: str) -> float | None:
        r = get(system, workload)
        return r.received_per_s if r else None

    def latency(system: str, quantile: str) -> float | None:
        r = get(system, "D")
        return r.latency_us[quantile] if r and r.latency_us else None

    ax = axes[0][0]
    bars(ax, [w for w in SHAPES if _by(results, w)], received, delivered)
    ax.set_title("A/B/C: events received per second (% = delivered, if not all)")
    ax.set_ylabel("received/s")
    _legend(ax)

    ax = axes[0][1]
    bars(ax, ["p50", "p99"], latency)
    ax.set_title("D: round-trip latency (lower is better)")
    ax.set_ylabel("µs")
    _legend(ax)

    ax = axes[1][0]
    for system, label in systems:
        rows = [r for r in results if r.system == system and r.workload == "E" and r.ok]
        if rows:
            ax.plot(
                [r.filters for r in rows],
                [r.broker_us_per_msg for r in rows],
                marker="o",
                label=label,
            )
    ax.set_xscale("log")
    ax.set_title("E: broker CPU per message vs. filters held (lower is better)")
    ax.set_xlabel("filters held by an idle connection")
    ax.set_ylabel("broker CPU µs/msg")
    _legend(ax)

    ax = axes[1][1]

    def memory(system: str, what: str) -> float | None:
        r = get(system, "F")
        if r is None:
            return None
        m = r.memory
        if what == "idle clients":
            return (m.get("rss_clients_kib") or 0) / 1024
        if what == "peak, stalled sub":
            return (m.get("peak_kib") or 0) / 1024
        return (m.get("rss_empty_kib") or 0) / 1024

    bars(ax, ["no clients", "idle clients", "peak, stalled sub"], memory)
    ax.set_title("F: broker RSS (lower is better)")
    ax.set_ylabel("MiB")
    _legend(ax)

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


# -- command line -----------------------------------------------------------------------------


def _csv(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"choose from {', '.join(choices)} (got {', '.join(bad) or 'nothing'})"
            )
        return list(dict.fromkeys(items))

    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.suite",
        description="The same workloads against daemoneye-eventbus, ZeroMQ, NATS and Mosquitto.",
    )
    p.add_argument("--quick", action="store_true", help="small counts (CI: a few minutes)")
    p.add_argument(
        "--systems",
        type=_csv(SYSTEMS),
        default=list(SYSTEMS),
        help=f"comma-separated, from {','.join(SYSTEMS)} (default: all)",
    )
    p.add_argument(
        "--workloads",
        type=_csv(tuple(WORKLOADS)),
        default=list(WORKLOADS),
        help="comma-separated, from A,B,C,D,E,F (default: all)",
    )
    p.add_argument("--out", default=str(HERE / "RESULTS.md"), help="Markdown report")
    p.add_argument("--chart", help="PNG chart (default: results.png beside --out)")
    p.add_argument("--json", help="also write every figure as JSON")
    p.add_argument("--messages", type=int, help="events per A/B/C/F run")
    p.add_argument("--latency-messages", type=int, help="measured round trips (D)")
    p.add_argument("--filters", help="comma-separated filter counts for E, e.g. 10,1000")
    p.add_argument("--idle-clients", type=int, help="idle clients for F")
    p.add_argument("--cap", type=float, help="seconds a run may take before it is killed")
    p.add_argument(
        "--repeat",
        type=int,
        help="runs of each workload per system, the median shown (default 3; --quick 1)",
    )
    p.add_argument(
        "--no-install",
        action="store_true",
        help="do not apt-get/pip install missing peers (they get a row saying so)",
    )
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="record py-spy profiles (raw stacks and top self time) of the Python "
        "processes of every run into DIR",
    )
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    s = Settings.quick_settings() if args.quick else Settings()
    changes: dict[str, Any] = {}
    if args.messages:
        changes["messages"] = args.messages
        changes["routing_messages"] = min(s.routing_messages, args.messages)
    if args.latency_messages:
        changes["latency_messages"] = args.latency_messages
        changes["warmup"] = min(s.warmup, args.latency_messages)
    if args.filters:
        changes["filter_counts"] = tuple(int(n) for n in args.filters.split(","))
    if args.idle_clients:
        changes["idle_clients"] = args.idle_clients
    if args.cap:
        changes["cap"] = args.cap
    if args.repeat:
        changes["repeat"] = args.repeat
    return Settings(**{**asdict(s), **changes})


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite and write the report; 1 if a run of this bus did not complete."""
    args = _parser().parse_args(argv)
    # On SIGTERM, unwind through the cleanup: workers killed, brokers stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    settings = settings_from(args)
    profile_dir = Path(args.profile) if args.profile else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.suite" + (
        " " + " ".join(sys.argv[1:] if argv is None else argv)
        if (sys.argv[1:] if argv is None else argv)
        else ""
    )
    t0 = time.monotonic()
    results, machine = run_suite(
        args.systems,
        args.workloads,
        settings,
        install=not args.no_install,
        profile_dir=profile_dir,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown_report(results, machine, settings, command), encoding="utf-8")
    _progress(f"wrote {out} ({time.monotonic() - t0:.0f} s in all)")
    chart = Path(args.chart) if args.chart else out.with_name("results.png")
    chart.parent.mkdir(parents=True, exist_ok=True)
    why = pip_install("matplotlib", not args.no_install) or write_chart(results, chart)
    _progress(f"chart not written: {why}" if why else f"wrote {chart}")
    if args.json:
        doc = {
            "machine": machine,
            "settings": asdict(settings),
            "results": [asdict(r) for r in results],
        }
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    ours = [r for r in results if r.system == _OURS]
    return 0 if all(r.ok for r in ours) else 1


if __name__ == "__main__":
    sys.exit(main())
