"""End-to-end benchmark: a standalone broker process and one OS process per client.

Run::

    python -m benchmarks.e2e [--messages N] [--duration-cap S] [--scenario NAME ...] [--json PATH]

Scenarios (see ``benchmarks/README.md``):

* ``1to1``, ``4to1``, ``1to4``: throughput of ~256-byte ``ProcessEvent`` payloads
  published on ``events.process.lifecycle`` as fast as the publishers can, received
  by subscribers of ``events.process.#``;
* ``latency``: round-trip time through the broker with one message in flight.

Clients claim the components the schema's access rules ask for: publishers of
``events.process.*`` claim ``procmond``, their subscribers ``daemoneye-agent``.
The latency pinger and echo each publish one of these topics and receive the
other, so each holds two connections, one per component.

The broker is ``python -m daemoneye_eventbus.cli serve``, started afresh for each
scenario and stopped with SIGTERM. Publishers and subscribers are ``spawn``
processes running this bus's worker roles from the side-by-side suite
(``benchmarks/peers/daemoneye_peer.py``): both harnesses run the same loops.
Every scenario is bounded by ``--duration-cap``: past it the workers are killed
and the row is marked incomplete. Timestamps are ``time.perf_counter_ns()``
(CLOCK_MONOTONIC on Linux), which every process on the machine shares, so they
compare across processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import queue
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.context import SpawnContext, SpawnProcess
from multiprocessing.queues import Queue as MpQueue
from pathlib import Path
from typing import Any, Final

from google.protobuf.internal import api_implementation

from benchmarks.peers.base import (
    PAYLOAD_BYTES,
    BrokerOptions,
    BrokerProcess,
    Ctl,
    WorkerMessage,
    cpu_model,
    percentile,
    stat_cpu_seconds,
    worker_main,
)
from benchmarks.peers.daemoneye_peer import MAX_QUEUE_MESSAGES, DaemoneyeAdapter

__all__ = ["ScenarioResult", "main", "run_scenario"]


#: Filter of the throughput subscribers.
FILTER: Final = "events.process.#"

THROUGHPUT_SCENARIOS: Final[dict[str, tuple[int, int]]] = {
    # name: (publishers, subscribers)
    "1to1": (1, 1),
    "4to1": (4, 1),
    "1to4": (1, 4),
}
SCENARIOS: Final = (*THROUGHPUT_SCENARIOS, "latency")

DEFAULT_MESSAGES: Final = 200_000
DEFAULT_LATENCY_MESSAGES: Final = 5_000
DEFAULT_WARMUP: Final = 500
DEFAULT_DURATION_CAP: Final = 60.0
#: The workers are the side-by-side suite's roles for this bus (one copy of
#: the publish, subscribe, echo and ping loops).
WORKER_MODULE: Final = "benchmarks.peers.daemoneye_peer"

_NS: Final = 1_000_000_000


class _ScenarioAbort(Exception):
    """The scenario cannot complete: cap reached, a worker failed, the broker died."""


# -- results ------------------------------------------------------------------------


@dataclass
class ScenarioResult:
    """The figures of one scenario."""

    scenario: str
    publishers: int
    subscribers: int
    #: Events published in total (throughput) or round trips measured (latency).
    messages: int
    #: Target publish rate in events/s, all publishers together; 0 for flat out.
    rate: float = 0.0
    #: Events the subscribers should have received in total.
    expected: int = 0
    received: int = 0
    #: Received events per second, all subscribers together, from the first
    #: publish to the last receive (latency: round trips per second).
    received_per_s: float | None = None
    #: Published events per second, from the first publish to the last flush.
    published_per_s: float | None = None
    delivered_pct: float | None = None
    #: Broker CPU time over the wall time of the run, in percent of one core.
    broker_cpu_pct: float | None = None
    broker_cpu_s: float | None = None
    run_s: float | None = None
    #: Broker drops seen as sequence gaps, and drops in the subscribers' own queues.
    missed: int = 0
    dropped: int = 0
    latency_us: dict[str, float] | None = None
    #: Latency round trips that got no echo within 2 s.
    lost: int = 0
    #: The broker's own totals, from its exit line.
    broker_published: int | None = None
    broker_delivered: int | None = None
    broker_dropped: int | None = None
    broker_exit_code: int | None = None
    #: Finished within the cap, without a worker or broker failure (drops
    #: are figures, not failures: see ``delivered_pct``).
    complete: bool = False
    wall_s: float = 0.0
    #: CPU use of every process over the run, in percent of one core.
    cpu_pct: dict[str, float] = field(default_factory=dict)
    subscriber_end: list[str] = field(default_factory=list)
    #: With ``--cpu-timeline``: (seconds since the start, CPU seconds by process).
    cpu_timeline: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


# -- the broker process ----------------------------------------------------------------


_STOPPED_RE: Final = re.compile(r"broker stopped: (\d+) published, (\d+) delivered, (\d+) dropped")


# -- running a scenario ----------------------------------------------------------------


class _Run:
    """The workers of one scenario and the messages they send back."""

    def __init__(self, ctx: SpawnContext, broker: BrokerProcess, deadline: float) -> None:
        self.ctx = ctx
        self.broker = broker
        self.deadline = deadline
        self.results: MpQueue[WorkerMessage] = ctx.Queue()
        #: Publishers (and the pinger) start on go; subscribers stop once idle
        #: after publishers_done; the echo stops on stop.
        self.go = ctx.Event()
        self.publishers_done = ctx.Event()
        self.stop = ctx.Event()
        self.deadline_ns = time.perf_counter_ns() + int((deadline - time.monotonic()) * _NS)
        self.procs: dict[tuple[str, int], SpawnProcess] = {}
        self.ready: set[tuple[str, int]] = set()
        self.done: dict[tuple[str, int], dict[str, Any]] = {}
        self._exited_at: dict[tuple[str, int], float] = {}
        #: (time ns, CPU seconds by process), sampled while waiting.
        self.cpu_samples: list[tuple[int, dict[str, float]]] = []

    def spawn(self, role: str, index: int, path: str, params: dict[str, Any]) -> None:
        ctl = Ctl(
            role,
            index,
            self.results,
            self.go,
            self.publishers_done,
            self.stop,
            self.deadline_ns,
        )
        proc = self.ctx.Process(
            target=worker_main,
            args=(WORKER_MODULE, ctl, path, params),
            name=f"bench-{role}-{index}",
            daemon=True,
        )
        proc.start()
        self.procs[(role, index)] = proc

    def sample_cpu(self) -> None:
        now = time.perf_counter_ns()
        pids = {"broker": self.broker.pid}
        pids.update({f"{r}{i}": p.pid for (r, i), p in self.procs.items() if p.pid is not None})
        cpu: dict[str, float] = {}
        for name, pid in pids.items():
            with contextlib.suppress(OSError, ValueError):
                cpu[name] = stat_cpu_seconds(pid)
        self.cpu_samples.append((now, cpu))

    def _poll(self) -> None:
        """Take one worker message (or time out after a short while); check health."""
        try:
            kind, role, index, payload = self.results.get(timeout=0.05)
        except queue.Empty:
            pass
        else:
            key = (role, index)
            if kind == "ready":
                self.ready.add(key)
            elif kind == "synced":
                pass  # the roles' subscriptions are acknowledged before "ready"
            elif kind == "done":
                self.done[key] = payload
            else:
                raise _ScenarioAbort(f"{role} {index} failed:\n{payload.get('traceback', '')}")
        self.sample_cpu()
        now = time.monotonic()
        if now > self.deadline:
            raise _ScenarioAbort("duration cap reached")
        if self.broker.proc.poll() is not None:
            raise _ScenarioAbort(f"broker exited with {self.broker.proc.returncode}")
        for key, proc in self.procs.items():
            if key in self.done or proc.exitcode is None:
                continue
            # Give the message a worker sent just before exiting time to arrive.
            first = self._exited_at.setdefault(key, now)
            if proc.exitcode != 0 or now - first > 2.0:
                raise _ScenarioAbort(f"{key[0]} {key[1]} exited with {proc.exitcode}")

    def wait_ready(self, keys: set[tuple[str, int]]) -> None:
        while not keys <= self.ready:
            self._poll()

    def wait_done(self, keys: set[tuple[str, int]]) -> None:
        while not keys <= set(self.done):
            self._poll()

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


def run_scenario(
    name: str,
    messages: int,
    *,
    duration_cap: float = DEFAULT_DURATION_CAP,
    latency_messages: int = DEFAULT_LATENCY_MESSAGES,
    warmup: int = DEFAULT_WARMUP,
    cpu_timeline: bool = False,
    rate: float = 0.0,
) -> ScenarioResult:
    """Run one scenario against a fresh broker; never takes much longer than the cap."""
    ctx = multiprocessing.get_context("spawn")
    wall0 = time.monotonic()
    deadline = wall0 + duration_cap
    if name == "latency":
        result = ScenarioResult(name, 1, 1, latency_messages)
    else:
        pubs, subs = THROUGHPUT_SCENARIOS[name]
        result = ScenarioResult(name, pubs, subs, messages, rate=rate)
    workdir = tempfile.mkdtemp(prefix="deb-bench-", dir="/tmp")
    # The suite's broker for this bus: ``serve --max-queue-messages 10000``,
    # returned once it listens.
    try:
        broker = DaemoneyeAdapter().start_broker(workdir, BrokerOptions())
    except RuntimeError as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        result.errors.append(str(exc))
        return result
    path = broker.endpoint
    run = _Run(ctx, broker, deadline)
    try:
        if name == "latency":
            _latency(run, path, latency_messages, warmup, result)
        else:
            _throughput(run, path, messages, rate, result)
        result.complete = not result.errors
    except _ScenarioAbort as exc:
        result.errors.append(str(exc))
    finally:
        run.terminate()
        result.broker_exit_code = broker.stop()
        if result.broker_exit_code != 0:
            result.errors.append(f"broker exit code {result.broker_exit_code}")
            result.complete = False
        stopped = _STOPPED_RE.search(broker.output())
        if stopped:
            result.broker_published, result.broker_delivered, result.broker_dropped = (
                int(g) for g in stopped.groups()
            )
        shutil.rmtree(workdir, ignore_errors=True)
        result.wall_s = time.monotonic() - wall0
        if cpu_timeline and run.cpu_samples:
            t0 = run.cpu_samples[0][0]
            result.cpu_timeline = [((t - t0) / _NS, cpu) for t, cpu in run.cpu_samples]
    return result


def _throughput(run: _Run, path: str, messages: int, rate: float, result: ScenarioResult) -> None:
    n_pubs, n_subs = result.publishers, result.subscribers
    shares = [messages // n_pubs + (1 if i < messages % n_pubs else 0) for i in range(n_pubs)]
    result.expected = messages * n_subs
    subs = {("sub", i) for i in range(n_subs)}
    pubs = {("pub", i) for i in range(n_pubs)}
    for _, i in sorted(subs):
        run.spawn("sub", i, path, {"expected": messages, "filter": FILTER.split(".")})
    run.wait_ready(subs)  # every subscription is acknowledged by the broker
    for _, i in sorted(pubs):
        run.spawn("pub", i, path, {"count": shares[i], "rate": rate / n_pubs})
    run.wait_ready(pubs)
    run.sample_cpu()
    run.go.set()
    run.wait_done(pubs)
    run.publishers_done.set()
    run.wait_done(subs)
    run.sample_cpu()

    pub_results = [run.done[k] for k in sorted(pubs)]
    sub_results = [run.done[k] for k in sorted(subs)]
    start_ns = min(p["start_ns"] for p in pub_results)
    flushed_ns = max(p["flushed_ns"] for p in pub_results)
    sent = sum(p["sent"] for p in pub_results)
    result.received = sum(s["received"] for s in sub_results)
    result.missed = sum(s["missed"] for s in sub_results)
    result.dropped = sum(s["dropped"] for s in sub_results)
    result.subscriber_end = [s["reason"] for s in sub_results]
    if sent < messages:
        result.errors.append(f"publishers sent {sent} of {messages} before the deadline")
    last_ns = max((s["last_ns"] for s in sub_results if s["received"]), default=0)
    if last_ns > start_ns:
        result.run_s = (last_ns - start_ns) / _NS
        result.received_per_s = result.received / result.run_s
    if flushed_ns > start_ns:
        result.published_per_s = sent / ((flushed_ns - start_ns) / _NS)
    result.delivered_pct = 100.0 * result.received / result.expected if result.expected else None
    _broker_cpu(run, start_ns, max(last_ns, flushed_ns), result)


def _latency(run: _Run, path: str, count: int, warmup: int, result: ScenarioResult) -> None:
    run.spawn("echo", 0, path, {})
    run.wait_ready({("echo", 0)})
    run.spawn("ping", 0, path, {"count": count, "warmup": warmup})
    run.wait_ready({("ping", 0)})
    run.sample_cpu()
    run.go.set()
    run.wait_done({("ping", 0)})
    run.sample_cpu()
    run.stop.set()
    run.wait_done({("echo", 0)})

    ping = run.done[("ping", 0)]
    rtts = sorted(ping["rtts_ns"])
    result.expected = count
    result.received = len(rtts)
    result.lost = ping["lost"]
    result.missed = ping["missed"] + run.done[("echo", 0)]["missed"]
    result.dropped = ping["dropped"] + run.done[("echo", 0)]["dropped"]
    result.delivered_pct = 100.0 * len(rtts) / count if count else None
    start_ns, end_ns = ping["start_ns"], ping["end_ns"]
    if end_ns > start_ns:
        result.run_s = (end_ns - start_ns) / _NS
        # Round trips per second (the warm-up included: it is in the interval).
        result.received_per_s = (warmup + count - ping["lost"]) / result.run_s
    if rtts:
        result.latency_us = {
            "p50": percentile(rtts, 50) / 1000,
            "p99": percentile(rtts, 99) / 1000,
            "p99.9": percentile(rtts, 99.9) / 1000,
            "min": rtts[0] / 1000,
            "max": rtts[-1] / 1000,
            "mean": sum(rtts) / len(rtts) / 1000,
        }
    _broker_cpu(run, start_ns, end_ns, result)


def _broker_cpu(run: _Run, start_ns: int, end_ns: int, result: ScenarioResult) -> None:
    """CPU use of the broker and of each worker from ``start_ns`` to ``end_ns``.

    Each process's figure spans its last sample before the start and its first
    sample after the end (or its last sample, if it exited before that).
    """
    names = {name for _, cpu in run.cpu_samples for name in cpu}
    for name in sorted(names):
        samples = [(t, cpu[name]) for t, cpu in run.cpu_samples if name in cpu]
        before = [s for s in samples if s[0] <= start_ns]
        after = [s for s in samples if s[0] >= end_ns]
        first = before[-1] if before else samples[0]
        last = after[0] if after else samples[-1]
        if last[0] <= first[0]:
            continue
        seconds = last[1] - first[1]
        pct = 100.0 * seconds / ((last[0] - first[0]) / _NS)
        result.cpu_pct[name] = round(pct, 1)
        if name == "broker":
            result.broker_cpu_s = seconds
            result.broker_cpu_pct = pct


# -- reporting -------------------------------------------------------------------------


def machine_description() -> dict[str, Any]:
    """CPU model, core count, Python and protobuf implementation."""
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "protobuf": api_implementation.Type(),
        "platform": platform.platform(),
    }


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown_table(results: Sequence[ScenarioResult]) -> str:
    """One row per scenario."""
    lines = [
        "| scenario | messages | received/s | delivered % | broker CPU % "
        "| p50 µs | p99 µs | p99.9 µs | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lat = r.latency_us or {}
        notes: list[str] = []
        if not r.complete:
            notes.append("INCOMPLETE")
        if r.broker_dropped:
            notes.append(f"broker dropped {r.broker_dropped:,} ({r.missed:,} seen as gaps)")
        elif r.missed:
            notes.append(f"broker drops seen as gaps {r.missed:,}")
        if r.dropped:
            notes.append(f"client drops {r.dropped}")
        if r.lost:
            notes.append(f"lost {r.lost}")
        if r.rate:
            notes.append(f"paced at {r.rate:,.0f}/s")
        if r.published_per_s is not None:
            notes.append(f"published/s {r.published_per_s:,.0f}")
        workers = [f"{k} {v:.0f}" for k, v in r.cpu_pct.items() if k != "broker"]
        if workers:
            notes.append("CPU % " + ", ".join(workers))
        notes.extend(e.splitlines()[0] for e in r.errors if e)
        lines.append(
            f"| {r.scenario} | {r.messages:,} | {_fmt(r.received_per_s, ',.0f')} "
            f"| {_fmt(r.delivered_pct, '.2f')} | {_fmt(r.broker_cpu_pct, '.0f')} "
            f"| {_fmt(lat.get('p50'), '.0f')} | {_fmt(lat.get('p99'), '.0f')} "
            f"| {_fmt(lat.get('p99.9'), '.0f')} | {'; '.join(notes)} |"
        )
    return "\n".join(lines)


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.e2e",
        description="End-to-end throughput and latency of daemoneye-eventbus, "
        "one OS process per broker, publisher and subscriber.",
    )
    parser.add_argument(
        "--messages",
        type=int,
        default=DEFAULT_MESSAGES,
        help=f"events published per throughput scenario (default {DEFAULT_MESSAGES:,})",
    )
    parser.add_argument(
        "--latency-messages",
        type=int,
        default=DEFAULT_LATENCY_MESSAGES,
        help=f"measured round trips (default {DEFAULT_LATENCY_MESSAGES:,})",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=DEFAULT_WARMUP,
        help=f"round trips before measuring (default {DEFAULT_WARMUP})",
    )
    parser.add_argument(
        "--duration-cap",
        type=float,
        default=DEFAULT_DURATION_CAP,
        help=f"seconds a scenario may take before it is killed (default {DEFAULT_DURATION_CAP:g})",
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        metavar="NAME",
        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        metavar="EVENTS_PER_S",
        help="pace the throughput publishers at this total rate (default: flat out)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--cpu-timeline",
        action="store_true",
        help="keep every CPU sample (about 20 a second) of every process in the JSON",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scenarios, print the table; 1 if any scenario did not complete.

    Events dropped under load are reported (delivered %), not failures.
    """
    args = _parser().parse_args(argv)
    # On SIGTERM, unwind through the cleanup: workers killed, broker stopped, files removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.messages < 1 or args.latency_messages < 1 or args.warmup < 0:
        _parser().error("--messages and --latency-messages must be positive")
    names = list(dict.fromkeys(args.scenario or SCENARIOS))
    machine = machine_description()
    results: list[ScenarioResult] = []
    for n, name in enumerate(names, 1):
        count = args.latency_messages if name == "latency" else args.messages
        _progress(f"[{n}/{len(names)}] {name}: {count:,} messages ...")
        result = run_scenario(
            name,
            args.messages,
            duration_cap=args.duration_cap,
            latency_messages=args.latency_messages,
            warmup=args.warmup,
            cpu_timeline=args.cpu_timeline,
            rate=args.rate,
        )
        results.append(result)
        status = "done" if result.complete else "INCOMPLETE"
        if result.complete and result.received < result.expected:
            status = "done with drops"
        _progress(
            f"[{n}/{len(names)}] {name}: {status} in {result.wall_s:.1f} s, "
            f"{_fmt(result.received_per_s, ',.0f')} received/s, "
            f"{_fmt(result.delivered_pct, '.2f')}% delivered"
            + "".join(f"\n    {line}" for e in result.errors for line in e.splitlines())
        )
    print(
        f"Machine: {machine['cpu_model']}, {machine['cores']} cores, "
        f"{machine['implementation']} {machine['python']}, protobuf {machine['protobuf']}; "
        f"payload {PAYLOAD_BYTES} B\n"
    )
    print(markdown_table(results))
    if args.json:
        doc = {
            "machine": machine,
            "settings": {
                "messages": args.messages,
                "latency_messages": args.latency_messages,
                "warmup": args.warmup,
                "duration_cap": args.duration_cap,
                "rate": args.rate,
                "payload_bytes": PAYLOAD_BYTES,
                "broker_max_queue_messages": MAX_QUEUE_MESSAGES,
            },
            "results": [asdict(r) for r in results],
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return 0 if all(r.complete for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
