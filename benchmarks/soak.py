"""Soak test: a standalone broker under steady traffic and hostile clients.

Run::

    python -m benchmarks.soak --duration S [--publishers N] [--subscribers N] [--hostile N]
                              [--rate EVENTS_PER_S] [--max-rss-mib MIB] [--json PATH]

The broker is ``python -m daemoneye_eventbus.cli serve`` with a bounded queue.
Every client is a ``spawn`` process:

* **publishers** claim ``procmond`` and publish ``ProcessEvent`` on
  ``events.process.lifecycle`` at a paced rate; ``ppid`` is the publisher's
  index and ``pid`` its sequence number (0, 1, 2, ...);
* **subscribers** claim ``daemoneye-agent``, subscribe to ``events.process.#``
  before any event is published, read promptly and track, per publisher,
  sequence gaps, reordering and duplicates;
* **hostile** clients loop over attacks for the whole run, reconnecting after
  each closed connection: garbage bytes, oversized and overlong length prefixes,
  slow handshakes, subscribers that never read, connect/disconnect floods,
  invalid subscribes and refused publishes, frames pipelined before
  ``welcome``, bad protocol versions, half frames.

The broker's RSS (``VmRSS``) is sampled every 0.5 s. At the end the
publishers stop and flush, the subscribers flush (a ping round trip, after
which every event the broker queued for them has arrived), read the broker's
figures for their own subscription, and report.

**Lost messages.** A subscriber *lost a message it should not have* if the
broker dropped nothing for its subscription (its ``SubscriptionStats.dropped``
is 0) and its own client queue dropped nothing, yet it did not receive, for
each publisher, every event that publisher published (sequence numbers 0 to
n-1: publishing starts only after every subscription is acknowledged), exactly
once and in order. Whatever the drops, events must never arrive out of order
or twice, and the events missing must be exactly those dropped. Drops by the
broker (a subscriber that did not keep up) are reported, and fail the run only
with ``--fail-on-drops``.

Exit status 1 if a subscriber lost messages it should not have, if a
well-behaved client failed, if the broker died or did not stop cleanly, or if
its peak RSS exceeded ``--max-rss-mib``. Every run is bounded: each phase has a
deadline, and every process started is stopped (also on Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import multiprocessing
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.context import SpawnContext, SpawnProcess
from multiprocessing.queues import Queue as MpQueue
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any, Final

from google.protobuf.message import Message

from benchmarks.peers.base import stat_cpu_seconds
from daemoneye.eventbus.v1 import events_pb2, frames_pb2, registry
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode, Frame
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.errors import EventBusError, RequestTimeout
from daemoneye_eventbus.frames import encode_frame, encode_varint
from daemoneye_eventbus.protocol import PROTOCOL_VERSION, Connection, Role

__all__ = ["SoakResult", "main", "run_soak"]

REPO: Final = Path(__file__).resolve().parents[1]
TOPIC: Final = registry.EVENTS_PROCESS_LIFECYCLE
FILTER: Final = "events.process.#"
PUBLISHER_COMPONENT: Final = "procmond"
SUBSCRIBER_COMPONENT: Final = "daemoneye-agent"
RSS_INTERVAL: Final = 0.5
#: Seconds allowed for start-up (broker listening, clients connected) and for
#: each shutdown phase.
PHASE_TIMEOUT: Final = 30.0

WorkerMessage = tuple[str, str, int, dict[str, Any]]


# -- process hygiene -----------------------------------------------------------------------


def _die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG


def _broker_preexec() -> None:
    _die_with_parent(signal.SIGTERM)


def _run_worker(
    role: str,
    index: int,
    results: MpQueue[WorkerMessage],
    make: Callable[[], Coroutine[Any, Any, dict[str, Any]]],
) -> None:
    # Ctrl-C reaches the whole process group: the parent decides what stops when.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    try:
        payload = asyncio.run(make())
    except BaseException:
        results.put(("error", role, index, {"traceback": traceback.format_exc()}))
        raise SystemExit(1) from None
    results.put(("done", role, index, payload))


async def _wait_event(event: MpEvent, timeout: float | None = None) -> bool:
    """Wait for a multiprocessing event without blocking the loop."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not event.is_set():
        if deadline is not None and time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


# -- well-behaved publisher ---------------------------------------------------------------------


def publisher_main(
    path: str,
    index: int,
    rate: float,
    results: MpQueue[WorkerMessage],
    go: MpEvent,
    stop: MpEvent,
) -> None:
    """Entry point of a publisher process."""
    _run_worker(
        "publisher", index, results, lambda: _publisher(path, index, rate, results, go, stop)
    )


async def _publisher(
    path: str,
    index: int,
    rate: float,
    results: MpQueue[WorkerMessage],
    go: MpEvent,
    stop: MpEvent,
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    async with Client(
        path, name=f"soak-publisher-{index}", component=PUBLISHER_COMPONENT
    ) as client:
        results.put(("ready", "publisher", index, {"session": client.session_id}))
        if not await _wait_event(go, PHASE_TIMEOUT * 2):
            raise TimeoutError("no start signal")
        start = loop.time()
        sequence = 0
        command = f"/usr/sbin/soak-publisher --index {index} --rate {rate:g}"
        while not stop.is_set():
            due = int((loop.time() - start) * rate)
            burst = 0
            while sequence < due and burst < 500:
                event = events_pb2.ProcessEvent(
                    pid=sequence, ppid=index, name=f"soak-{index}", command_line=command
                )
                await client.publish(TOPIC, event)
                sequence += 1
                burst += 1
            await asyncio.sleep(0.002 if sequence < due else 0.005)
        rtt = await client.flush()
        stats = client.statistics()
        return {
            "published": sequence,
            "seconds": loop.time() - start,
            "refused": stats.refused,
            "flush_rtt_ms": rtt * 1000,
        }


# -- well-behaved subscriber --------------------------------------------------------------------


@dataclass
class _Tracker:
    """Per-publisher order and gaps as one subscriber sees them."""

    next_expected: dict[int, int] = field(default_factory=dict)
    received: Counter[int] = field(default_factory=Counter)
    gaps: int = 0  # events skipped inside the stream
    late: int = 0  # an event at or below one already seen: reordered or duplicated
    foreign: int = 0  # events not from a soak publisher

    def see(self, event: Message, publishers: int) -> None:
        if (
            not isinstance(event, events_pb2.ProcessEvent)
            or not event.HasField("ppid")
            or not 0 <= event.ppid < publishers
        ):
            self.foreign += 1
            return
        p = event.ppid
        expected = self.next_expected.get(p, 0)
        self.received[p] += 1
        if event.pid == expected:
            self.next_expected[p] = expected + 1
        elif event.pid > expected:
            self.gaps += event.pid - expected
            self.next_expected[p] = event.pid + 1
        else:
            self.late += 1


def subscriber_main(
    path: str,
    index: int,
    publishers: int,
    results: MpQueue[WorkerMessage],
    drain: MpEvent,
) -> None:
    """Entry point of a subscriber process."""
    _run_worker(
        "subscriber",
        index,
        results,
        lambda: _subscriber(path, index, publishers, results, drain),
    )


async def _subscriber(
    path: str,
    index: int,
    publishers: int,
    results: MpQueue[WorkerMessage],
    drain: MpEvent,
) -> dict[str, Any]:
    tracker = _Tracker()
    async with Client(
        path, name=f"soak-subscriber-{index}", component=SUBSCRIBER_COMPONENT, max_pending=100_000
    ) as client:
        sub = await client.subscribe(FILTER)
        results.put(("ready", "subscriber", index, {"session": client.session_id}))
        max_backlog = 0

        def take_all() -> None:
            nonlocal max_backlog
            max_backlog = max(max_backlog, len(sub.queue))
            while (event := sub.get_nowait()) is not None:
                tracker.see(event.message(), publishers)

        while not drain.is_set():
            try:
                first = await sub.get(timeout=0.05)
            except RequestTimeout:
                continue
            tracker.see(first.message(), publishers)
            take_all()
        # Publishers flushed: the broker routed all their events. After our own
        # round trip every event it queued for us has arrived.
        await client.flush()
        take_all()
        stats = await client.broker_statistics()
        mine = [
            s
            for s in stats.subscription_stats
            if s.session_id == client.session_id and s.subscription_id == sub.subscription_id
        ]
        return {
            "session": client.session_id,
            "received": sum(tracker.received.values()),
            "received_by_publisher": {str(k): v for k, v in sorted(tracker.received.items())},
            "next_expected": {str(k): v for k, v in sorted(tracker.next_expected.items())},
            "gaps": tracker.gaps,
            "late": tracker.late,
            "foreign": tracker.foreign,
            "client_dropped": sub.dropped,
            "sequence_missed": sub.missed,
            "max_client_backlog": max_backlog,
            "broker_found": bool(mine),
            "broker_delivered": mine[0].delivered if mine else -1,
            "broker_dropped": mine[0].dropped if mine else -1,
            "stats_truncated": stats.truncated,
        }


# -- hostile clients ------------------------------------------------------------------------------


@dataclass
class _HostileStats:
    attempted: int = 0  # connections opened (or tried)
    closed_by_broker: int = 0  # end of file or reset seen from the broker
    closed_by_us: int = 0  # we gave up or were done first
    connect_errors: int = 0
    attacks: Counter[str] = field(default_factory=Counter)
    error_codes: Counter[str] = field(default_factory=Counter)


class _Raw:
    """One raw connection of a hostile client: bytes out, frames (and end of file) in."""

    def __init__(self, stats: _HostileStats) -> None:
        self.stats = stats
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.parser = Connection(Role.CLIENT, handshake_max_frame_bytes=1 << 20)
        self.eof = False

    async def open(self, path: str) -> bool:
        self.stats.attempted += 1
        try:
            async with asyncio.timeout(5):
                self.reader, self.writer = await asyncio.open_unix_connection(path)
        except (OSError, TimeoutError):
            self.stats.connect_errors += 1
            return False
        return True

    async def send(self, data: bytes) -> bool:
        if self.writer is None or self.eof:
            return False
        try:
            self.writer.write(data)
            await self.writer.drain()
        except OSError:
            self._closed_by_broker()
            return False
        return True

    def _closed_by_broker(self) -> None:
        if not self.eof:
            self.eof = True
            self.stats.closed_by_broker += 1

    def _record(self) -> list[Frame]:
        frames = self.parser.events_received()
        for frame in frames:
            if frame.WhichOneof("kind") == "error":
                name = (
                    ErrorCode.Name(frame.error.code)
                    if frame.error.code in ErrorCode.values()
                    else str(frame.error.code)
                )
                self.stats.error_codes[name.removeprefix("ERROR_CODE_")] += 1
        return frames

    async def read(self, timeout: float, until: Callable[[Frame], bool] | None = None) -> bool:
        """Read frames until ``until`` matches one, or end of file; False on timeout."""
        if self.reader is None or self.eof:
            return self.eof
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                async with asyncio.timeout(left):
                    data = await self.reader.read(65536)
            except TimeoutError:
                return False
            except OSError:
                data = b""
            if not data:
                self._closed_by_broker()
                return True
            self.parser.receive_data(data)
            frames = self._record()
            if until is not None and any(until(f) for f in frames):
                return True

    async def close(self) -> None:
        if self.writer is None:
            return
        if not self.eof:
            self.stats.closed_by_us += 1
            self.eof = True
        self.writer.transport.abort()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def _hello(component: str = "", version: int = PROTOCOL_VERSION) -> bytes:
    hello = frames_pb2.Hello(
        protocol_version=version, client_name="soak-hostile", component=component
    )
    return encode_frame(Frame(hello=hello))


def _is(kind: str) -> Callable[[Frame], bool]:
    return lambda frame: frame.WhichOneof("kind") == kind


class _Hostile:
    """The attack loop of one hostile process."""

    def __init__(self, path: str, index: int, stop: MpEvent, slow_consumer: float) -> None:
        self.path = path
        self.index = index
        self.stop = stop
        self.slow_consumer = slow_consumer
        self.rng = random.Random(index)
        self.stats = _HostileStats()

    async def raw(self) -> _Raw | None:
        conn = _Raw(self.stats)
        return conn if await conn.open(self.path) else None

    async def handshake(self, component: str = "") -> _Raw | None:
        conn = await self.raw()
        if conn is None:
            return None
        await conn.send(_hello(component))
        if not await conn.read(5.0, _is("welcome")) or conn.eof:
            await conn.close()
            return None
        return conn

    async def expect_close(self, conn: _Raw, timeout: float = 5.0) -> None:
        await conn.read(timeout)
        await conn.close()

    # Each attack opens its connections, does its harm and closes them again.

    async def garbage(self) -> None:
        if conn := await self.raw():
            await conn.send(self.rng.randbytes(self.rng.randint(1, 512)))
            await self.expect_close(conn)

    async def oversized_prefix(self) -> None:
        if conn := await self.raw():
            await conn.send(encode_varint(self.rng.randint(1 << 13, 1 << 30)) + b"\x0a\x00")
            await self.expect_close(conn)

    async def overlong_prefix(self) -> None:
        if conn := await self.raw():
            await conn.send(b"\xff" * 5 + b"\x01")
            await self.expect_close(conn)

    async def slow_handshake(self) -> None:
        if conn := await self.raw():
            for byte in _hello("procmond"):
                if self.stop.is_set() or not await conn.send(bytes((byte,))):
                    break
                if await conn.read(0.25):  # the broker gave up on us (handshake deadline)
                    break
            await self.expect_close(conn, 3.0)

    async def never_reading_subscriber(self) -> None:
        conn = await self.handshake(SUBSCRIBER_COMPONENT)
        if conn is None:
            return
        sub = frames_pb2.Subscribe(subscription_id=1, filter=FILTER)
        await conn.send(encode_frame(Frame(subscribe=sub)))
        # Never read: the broker's queue for us fills, then it gives up on us.
        await _wait_event(self.stop, self.slow_consumer + 4.0)
        await conn.read(2.0)  # whatever is left, then (normally) end of file
        await conn.close()

    async def connect_flood(self) -> None:
        conns = [c for c in await asyncio.gather(*(self.raw() for _ in range(20))) if c]
        for i, conn in enumerate(conns):
            if i % 3 == 1:
                await conn.send(_hello()[:7])  # half a hello, then gone
            elif i % 3 == 2:
                await conn.send(_hello())
        await asyncio.gather(*(c.close() for c in conns))

    async def invalid_requests(self) -> None:
        conn = await self.handshake(self.rng.choice(["", SUBSCRIBER_COMPONENT]))
        if conn is None:
            return
        frames: list[Frame] = []
        for sid, flt in [
            (0, FILTER),  # id 0
            (1, "a..b"),
            (2, "events.#.process"),
            (3, "x" * 300),
            (4, "control.agent.policy"),  # access denied unless privileged
            (5, "events.network.connections"),
            (5, "events.network.connections"),  # duplicate id
        ]:
            frames.append(Frame(subscribe=frames_pb2.Subscribe(subscription_id=sid, filter=flt)))
        frames.append(Frame(unsubscribe=frames_pb2.Unsubscribe(subscription_id=999)))
        for topic, payload_type in [
            ("events.undeclared.topic", "daemoneye.eventbus.v1.ProcessEvent"),
            (TOPIC.name, "daemoneye.eventbus.v1.NetworkEvent"),  # payload mismatch
            (TOPIC.name, TOPIC.payload_name),  # restricted: not procmond
            ("events..bad", ""),
        ]:
            publish = frames_pb2.Publish(
                topic=topic, payload_type=payload_type, payload=b"\x08\x01"
            )
            frames.append(Frame(publish=publish))
        frames.append(Frame(ping=frames_pb2.Ping(nonce=1)))
        await conn.send(b"".join(encode_frame(f) for f in frames))
        await conn.read(5.0, _is("pong"))
        await conn.send(encode_frame(Frame(goodbye=frames_pb2.Goodbye(reason="done"))))
        await self.expect_close(conn, 3.0)

    async def bad_batches(self) -> None:
        """Batches the broker must refuse whole: empty, half a million empty
        payloads (more events than a queue holds), a foreign topic."""
        conn = await self.handshake(self.rng.choice(["", PUBLISHER_COMPONENT]))
        if conn is None:
            return
        batches = [
            frames_pb2.PublishBatch(topic=TOPIC.name, payload_type=TOPIC.payload_name),
            frames_pb2.PublishBatch(
                topic=TOPIC.name, payload_type=TOPIC.payload_name, payloads=[b""] * 500_000
            ),
            frames_pb2.PublishBatch(
                topic="events.undeclared.topic",
                payload_type=TOPIC.payload_name,
                payloads=[b"\x08\x01"] * 10,
            ),
        ]
        frames = [Frame(publish_batch=b) for b in batches]
        frames.append(Frame(ping=frames_pb2.Ping(nonce=3)))
        await conn.send(b"".join(encode_frame(f) for f in frames))
        await conn.read(10.0, _is("pong"))
        await conn.close()

    async def subscription_limit(self) -> None:
        conn = await self.handshake(SUBSCRIBER_COMPONENT)
        if conn is None:
            return
        # Valid subscriptions nobody publishes on, past the limit of 1024.
        subs = (
            Frame(subscribe=frames_pb2.Subscribe(subscription_id=i, filter="events.network.+"))
            for i in range(1, 1100)
        )
        await conn.send(b"".join(encode_frame(f) for f in subs))
        await conn.send(encode_frame(Frame(ping=frames_pb2.Ping(nonce=2))))
        await conn.read(10.0, _is("pong"))
        await conn.close()

    async def pipelined_before_welcome(self) -> None:
        if conn := await self.raw():
            sub = frames_pb2.Subscribe(subscription_id=1, filter=FILTER)
            await conn.send(_hello(SUBSCRIBER_COMPONENT) + encode_frame(Frame(subscribe=sub)))
            await self.expect_close(conn)

    async def bad_version(self) -> None:
        if conn := await self.raw():
            await conn.send(_hello(version=99))
            await self.expect_close(conn)

    async def half_frame(self) -> None:
        conn = await self.handshake()
        if conn is None:
            return
        ping = encode_frame(Frame(stats_request=frames_pb2.StatsRequest(request_id=1)))
        await conn.send(ping + ping[: len(ping) // 2])
        await conn.read(0.2)
        await conn.close()

    async def run(self) -> dict[str, Any]:
        attacks: list[Callable[[], Awaitable[None]]] = [
            self.garbage,
            self.oversized_prefix,
            self.overlong_prefix,
            self.slow_handshake,
            self.never_reading_subscriber,
            self.connect_flood,
            self.invalid_requests,
            self.bad_batches,
            self.subscription_limit,
            self.pipelined_before_welcome,
            self.bad_version,
            self.half_frame,
        ]
        turn = self.index
        while not self.stop.is_set():
            attack = attacks[turn % len(attacks)]
            turn += 1
            self.stats.attacks[attack.__name__] += 1
            try:
                async with asyncio.timeout(self.slow_consumer + 20.0):
                    await attack()
            except (OSError, EventBusError, TimeoutError):
                self.stats.connect_errors += 1
            await asyncio.sleep(0.01)
        s = self.stats
        return {
            "attempted": s.attempted,
            "closed_by_broker": s.closed_by_broker,
            "closed_by_us": s.closed_by_us,
            "connect_errors": s.connect_errors,
            "attacks": dict(s.attacks),
            "error_codes": dict(s.error_codes),
        }


def hostile_main(
    path: str,
    index: int,
    slow_consumer: float,
    results: MpQueue[WorkerMessage],
    stop: MpEvent,
) -> None:
    """Entry point of a hostile client process."""

    async def go() -> dict[str, Any]:
        return await _Hostile(path, index, stop, slow_consumer).run()

    _run_worker("hostile", index, results, go)


# -- the broker process ------------------------------------------------------------------------

_STOPPED_RE: Final = re.compile(r"broker stopped: (\d+) published, (\d+) delivered, (\d+) dropped")


class _Broker:
    """``daemoneye-eventbus serve`` in a child process, its output in a log file."""

    def __init__(self, path: str, workdir: str, args: argparse.Namespace) -> None:
        self.path = path
        self.log_path = os.path.join(workdir, "broker.log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.command = [
            sys.executable,
            "-m",
            "daemoneye_eventbus.cli",
            "serve",
            "--socket",
            path,
            "--max-queue-messages",
            str(args.queue_messages),
            "--slow-consumer-timeout",
            str(args.slow_consumer_timeout),
            # As root the broker refuses to run on without --user or --allow-root.
            *(["--allow-root"] if os.geteuid() == 0 else []),
        ]
        self.proc = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            preexec_fn=_broker_preexec,  # the parent has no other thread yet
        )
        self.exit_code: int | None = None
        self.killed = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise _Abort(f"broker exited with {self.proc.returncode}:\n{self.output()}")
            if "listening on" in self.output() and os.path.exists(self.path):
                return
            time.sleep(0.02)
        raise _Abort("broker did not start listening in time")

    def stop(self, timeout: float = PHASE_TIMEOUT) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.exit_code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.killed = True
                self.proc.kill()
                self.exit_code = self.proc.wait()
        finally:
            self._log.close()


class _Abort(Exception):
    """The run cannot go on; the message says why."""


def _rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _cpu_seconds(pid: int) -> float | None:
    try:
        return stat_cpu_seconds(pid)
    except (OSError, ValueError, IndexError):
        return None


class _Sampler(threading.Thread):
    """The broker's RSS every ``RSS_INTERVAL`` seconds, in a thread of the parent."""

    def __init__(self, pid: int) -> None:
        super().__init__(name="soak-rss", daemon=True)
        self.pid = pid
        self.samples: list[tuple[float, int]] = []  # (seconds since start, KiB)
        self.halt = threading.Event()
        self.start_time = time.monotonic()

    def run(self) -> None:
        while not self.halt.is_set():
            rss = _rss_kib(self.pid)
            if rss is not None:
                self.samples.append((time.monotonic() - self.start_time, rss))
            self.halt.wait(RSS_INTERVAL)


# -- the run -----------------------------------------------------------------------------------


@dataclass
class SoakResult:
    """Everything a soak run measured; ``ok`` is the verdict."""

    duration_s: float
    publishers: int
    subscribers: int
    hostile: int
    rate_per_publisher: float
    broker_command: list[str] = field(default_factory=list)
    published: int = 0
    broker_published: int | None = None
    broker_delivered: int | None = None
    broker_dropped: int | None = None
    broker_refused: int | None = None
    broker_connections_total: int | None = None
    broker_exit_code: int | None = None
    broker_cpu_percent: float | None = None
    rss_start_mib: float | None = None
    rss_end_mib: float | None = None
    rss_peak_mib: float | None = None
    rss_samples: int = 0
    hostile_attempted: int = 0
    hostile_closed_by_broker: int = 0
    hostile_closed_by_us: int = 0
    hostile_connect_errors: int = 0
    hostile_attacks: dict[str, int] = field(default_factory=dict)
    hostile_error_codes: dict[str, int] = field(default_factory=dict)
    publisher_results: list[dict[str, Any]] = field(default_factory=list)
    subscriber_results: list[dict[str, Any]] = field(default_factory=list)
    lost_unexpectedly: bool = False
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ok: bool = False


class _Workers:
    def __init__(self, ctx: SpawnContext, broker: _Broker) -> None:
        self.ctx = ctx
        self.broker = broker
        self.results: MpQueue[WorkerMessage] = ctx.Queue()
        self.procs: dict[tuple[str, int], SpawnProcess] = {}
        self.ready: set[tuple[str, int]] = set()
        self.done: dict[tuple[str, int], dict[str, Any]] = {}

    def spawn(self, role: str, index: int, target: Any, *args: Any) -> None:
        proc = self.ctx.Process(target=target, args=args, name=f"soak-{role}-{index}", daemon=True)
        proc.start()
        self.procs[(role, index)] = proc

    def poll(self, timeout: float = 0.05) -> None:
        try:
            kind, role, index, payload = self.results.get(timeout=timeout)
        except queue.Empty:
            pass
        else:
            if kind == "ready":
                self.ready.add((role, index))
            elif kind == "done":
                self.done[(role, index)] = payload
            else:
                raise _Abort(f"{role} {index} failed:\n{payload.get('traceback', '')}")
        if self.broker.proc.poll() is not None:
            raise _Abort(f"the broker died (exit code {self.broker.proc.returncode})")
        for (role, index), proc in self.procs.items():
            if proc.exitcode is not None and (role, index) not in self.done:
                # A last message may still be in the queue: drain it once.
                with contextlib.suppress(queue.Empty):
                    while True:
                        kind, r, i, payload = self.results.get(timeout=0.5)
                        if kind == "done":
                            self.done[(r, i)] = payload
                        elif kind == "error":
                            raise _Abort(f"{r} {i} failed:\n{payload.get('traceback', '')}")
                if (role, index) not in self.done:
                    raise _Abort(f"{role} {index} exited with code {proc.exitcode}")

    def wait(self, keys: set[tuple[str, int]], attr: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not keys <= set(getattr(self, attr)):
            if time.monotonic() > deadline:
                missing = sorted(keys - set(getattr(self, attr)))
                raise _Abort(f"timed out waiting for {attr}: {missing}")
            self.poll()

    def terminate(self) -> None:
        for proc in self.procs.values():
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs.values():
            proc.join(3.0)
            if proc.is_alive():
                proc.kill()
                proc.join(3.0)
        self.results.cancel_join_thread()
        self.results.close()


def _progress(text: str) -> None:
    print(f"[soak] {text}", file=sys.stderr, flush=True)


async def _broker_statistics(path: str) -> frames_pb2.StatsResponse:
    async with Client(path, name="soak-stats") as client:
        return await client.broker_statistics()


def run_soak(args: argparse.Namespace) -> SoakResult:
    """One soak run as ``args`` describe it; never leaves a process behind."""
    result = SoakResult(
        duration_s=0.0,
        publishers=args.publishers,
        subscribers=args.subscribers,
        hostile=args.hostile,
        rate_per_publisher=args.rate,
    )
    workdir = tempfile.mkdtemp(prefix="deb-soak-", dir="/tmp")
    path = os.path.join(workdir, "b.sock")
    broker: _Broker | None = None
    workers: _Workers | None = None
    sampler: _Sampler | None = None
    ctx = multiprocessing.get_context("spawn")
    go, stop, drain = ctx.Event(), ctx.Event(), ctx.Event()
    try:
        broker = _Broker(path, workdir, args)
        result.broker_command = broker.command
        broker.wait_listening(PHASE_TIMEOUT)
        sampler = _Sampler(broker.pid)
        sampler.start()
        cpu_start = _cpu_seconds(broker.pid)
        workers = _Workers(ctx, broker)
        subs = {("subscriber", i) for i in range(args.subscribers)}
        pubs = {("publisher", i) for i in range(args.publishers)}
        for _, i in sorted(subs):
            workers.spawn(
                "subscriber", i, subscriber_main, path, i, args.publishers, workers.results, drain
            )
        workers.wait(subs, "ready", PHASE_TIMEOUT)
        for _, i in sorted(pubs):
            workers.spawn(
                "publisher", i, publisher_main, path, i, args.rate, workers.results, go, stop
            )
        workers.wait(pubs, "ready", PHASE_TIMEOUT)
        hostiles = {("hostile", i) for i in range(args.hostile)}
        for _, i in sorted(hostiles):
            workers.spawn(
                "hostile",
                i,
                hostile_main,
                path,
                i,
                args.slow_consumer_timeout,
                workers.results,
                stop,
            )
        _progress(
            f"broker pid {broker.pid}; {args.publishers} publishers x {args.rate:g}/s, "
            f"{args.subscribers} subscribers, {args.hostile} hostile; running {args.duration:g} s"
        )
        go.set()
        started = time.monotonic()
        next_report = started + 30.0
        while time.monotonic() - started < args.duration:
            workers.poll(0.1)
            if time.monotonic() >= next_report:
                next_report += 30.0
                peak = max((kib for _, kib in sampler.samples), default=0) / 1024
                _progress(f"{time.monotonic() - started:.0f} s, broker peak RSS {peak:.1f} MiB")
        stop.set()
        result.duration_s = time.monotonic() - started
        workers.wait(pubs, "done", PHASE_TIMEOUT)
        drain.set()
        workers.wait(subs, "done", PHASE_TIMEOUT)
        workers.wait(hostiles, "done", args.slow_consumer_timeout + PHASE_TIMEOUT)
        cpu_end = _cpu_seconds(broker.pid)
        if cpu_start is not None and cpu_end is not None:
            result.broker_cpu_percent = 100 * (cpu_end - cpu_start) / max(result.duration_s, 1e-9)
        stats = asyncio.run(asyncio.wait_for(_broker_statistics(path), PHASE_TIMEOUT))
        # The presence events the broker publishes itself (control.presence:
        # every connection and disconnection) are not the publishers' events.
        presence = sum(t.published for t in stats.topic_stats if t.topic == "control.presence")
        result.broker_published = stats.published - presence
        result.broker_delivered = stats.delivered
        result.broker_dropped = stats.dropped
        result.broker_refused = stats.refused
        result.broker_connections_total = stats.connections_total
    except _Abort as exc:
        result.failures.append(str(exc))
    finally:
        if sampler is not None:
            sampler.halt.set()
            sampler.join(2.0)
        stop.set()
        drain.set()
        if workers is not None:
            workers.terminate()
        if broker is not None:
            broker.stop()
            _broker_exit(broker, result)
        shutil.rmtree(workdir, ignore_errors=True)
    if workers is not None:
        _collect(workers, args, result)
    if sampler is not None:
        _rss(sampler, result)
    _verdict(args, result)
    return result


def _broker_exit(broker: _Broker, result: SoakResult) -> None:
    result.broker_exit_code = broker.exit_code
    output = broker.output()
    if broker.killed:
        result.failures.append("the broker did not stop within the deadline and was killed")
    elif broker.exit_code != 0:
        result.failures.append(f"the broker exited with {broker.exit_code}")
    match = _STOPPED_RE.search(output)
    if match:
        _, delivered, dropped = (int(g) for g in match.groups())
        # The exit line is the final word on deliveries: it counts what happened
        # after our query. Its published figure also counts the presence events
        # of the connections that ended since (and at shutdown), so the
        # publishers' figure stays the query's, less presence events.
        result.broker_delivered, result.broker_dropped = delivered, dropped
    elif not result.failures:
        result.failures.append("the broker printed no statistics line on exit")
    if "Traceback" in output:
        result.failures.append("the broker logged a traceback:\n" + output[-4000:])


def _collect(workers: _Workers, args: argparse.Namespace, result: SoakResult) -> None:
    for (role, index), payload in sorted(workers.done.items()):
        payload = {"index": index, **payload}
        if role == "publisher":
            result.publisher_results.append(payload)
            result.published += payload["published"]
        elif role == "subscriber":
            result.subscriber_results.append(payload)
        else:
            result.hostile_attempted += payload["attempted"]
            result.hostile_closed_by_broker += payload["closed_by_broker"]
            result.hostile_closed_by_us += payload["closed_by_us"]
            result.hostile_connect_errors += payload["connect_errors"]
            for name, n in payload["attacks"].items():
                result.hostile_attacks[name] = result.hostile_attacks.get(name, 0) + n
            for name, n in payload["error_codes"].items():
                result.hostile_error_codes[name] = result.hostile_error_codes.get(name, 0) + n


def _rss(sampler: _Sampler, result: SoakResult) -> None:
    samples = [kib for _, kib in sampler.samples]
    result.rss_samples = len(samples)
    if samples:
        result.rss_start_mib = samples[0] / 1024
        result.rss_end_mib = samples[-1] / 1024
        result.rss_peak_mib = max(samples) / 1024


def _verdict(args: argparse.Namespace, result: SoakResult) -> None:
    published = {r["index"]: r["published"] for r in result.publisher_results}
    complete = len(result.publisher_results) == args.publishers
    for sub in result.subscriber_results if complete else []:
        name = f"subscriber {sub['index']}"
        missing = (
            sum(n - sub["next_expected"].get(str(p), 0) for p, n in published.items()) + sub["gaps"]
        )
        dropped = max(sub["broker_dropped"], 0) + sub["client_dropped"]
        sub["missing"] = missing
        problems = []
        if not sub["broker_found"]:
            problems.append("its subscription is missing from the broker's statistics")
        if sub["late"]:
            problems.append(f"{sub['late']} events out of order or duplicated")
        if sub["foreign"]:
            problems.append(f"{sub['foreign']} events no soak publisher published")
        if dropped == 0 and missing:
            problems.append(
                f"lost {missing} events although neither the broker nor its queue dropped any"
            )
        elif missing != dropped:
            problems.append(f"{missing} events missing but {dropped} dropped")
        if (
            sub["broker_found"]
            and sub["broker_delivered"] != sub["received"] + sub["client_dropped"]
        ):
            problems.append(
                f"the broker delivered {sub['broker_delivered']} events, the subscriber "
                f"received {sub['received']} and dropped {sub['client_dropped']}"
            )
        if problems:
            result.lost_unexpectedly = True
            result.failures.append(f"{name}: " + "; ".join(problems))
        if dropped:
            text = (
                f"{name} did not keep up: the broker dropped {sub['broker_dropped']}, "
                f"its queue {sub['client_dropped']} (allowed: at most once)"
            )
            (result.failures if args.fail_on_drops else result.notes).append(text)
    if (
        complete
        and result.broker_published is not None
        and result.broker_published != result.published
    ):
        result.failures.append(
            f"the broker counted {result.broker_published} events published, "
            f"the publishers {result.published} (hostile publishes must all be refused)"
        )
    if result.rss_peak_mib is not None and result.rss_peak_mib > args.max_rss_mib:
        result.failures.append(
            f"broker peak RSS {result.rss_peak_mib:.1f} MiB exceeds {args.max_rss_mib} MiB"
        )
    if result.rss_samples == 0:
        result.failures.append("no RSS sample of the broker")
    result.ok = not result.failures


def summary_text(result: SoakResult) -> str:
    def mib(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f} MiB"

    lines = [
        f"soak: {result.duration_s:.1f} s, {result.publishers} publishers x "
        f"{result.rate_per_publisher:g}/s, {result.subscribers} subscribers, "
        f"{result.hostile} hostile clients",
        f"events:  {result.published} published by the publishers; broker: "
        f"{result.broker_published} published, {result.broker_delivered} delivered, "
        f"{result.broker_dropped} dropped, {result.broker_refused} refused, "
        f"{result.broker_connections_total} connections in total",
        f"broker:  RSS start {mib(result.rss_start_mib)}, end {mib(result.rss_end_mib)}, "
        f"peak {mib(result.rss_peak_mib)} ({result.rss_samples} samples); CPU "
        + ("-" if result.broker_cpu_percent is None else f"{result.broker_cpu_percent:.0f}%")
        + f" of one core; exit code {result.broker_exit_code}",
        f"hostile: {result.hostile_attempted} connections attempted, "
        f"{result.hostile_closed_by_broker} closed by the broker, "
        f"{result.hostile_closed_by_us} closed by the client, "
        f"{result.hostile_connect_errors} errors",
        "         attacks: "
        + ", ".join(f"{k} {v}" for k, v in sorted(result.hostile_attacks.items())),
        "         errors received: "
        + ", ".join(f"{k} {v}" for k, v in sorted(result.hostile_error_codes.items())),
    ]
    for sub in result.subscriber_results:
        lines.append(
            f"subscriber {sub['index']}: received {sub['received']}, missing "
            f"{sub.get('missing', '?')}, out of order {sub['late']}, broker dropped "
            f"{sub['broker_dropped']}, client dropped {sub['client_dropped']}, "
            f"max backlog {sub['max_client_backlog']}"
        )
    lines.append(
        "lost messages a prompt subscriber should have received: "
        + ("YES" if result.lost_unexpectedly else "no")
    )
    lines.extend(f"note: {n}" for n in result.notes)
    lines.extend(f"FAILED: {f}" for f in result.failures)
    lines.append("result: " + ("OK" if result.ok else "FAILED"))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--duration", type=float, required=True, help="seconds of traffic")
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--subscribers", type=int, default=2)
    parser.add_argument("--hostile", type=int, default=4)
    parser.add_argument("--rate", type=float, default=2000.0, help="events/s per publisher")
    parser.add_argument("--max-rss-mib", type=float, default=512.0)
    parser.add_argument(
        "--queue-messages", type=int, default=1000, help="broker --max-queue-messages"
    )
    parser.add_argument(
        "--slow-consumer-timeout",
        type=float,
        default=3.0,
        help="broker --slow-consumer-timeout (default 3 s, so short runs see disconnects)",
    )
    parser.add_argument(
        "--fail-on-drops", action="store_true", help="a drop for a well-behaved subscriber fails"
    )
    parser.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.duration <= 0 or min(args.publishers, args.subscribers) < 1 or args.hostile < 0:
        print("soak: need --duration > 0, >= 1 publisher and subscriber", file=sys.stderr)
        return 2
    # On SIGTERM, unwind through the cleanup as on Ctrl-C.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        result = run_soak(args)
    except KeyboardInterrupt:
        print("soak: interrupted; every process was stopped", file=sys.stderr)
        return 130
    print(summary_text(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(result), indent=2) + "\n", encoding="utf-8")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
