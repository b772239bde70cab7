"""NATS: nats-server (the Debian package) with nats-py over TCP on 127.0.0.1.

The server runs with its defaults and a config file that only sets the address
(a free port on the loopback interface): NATS has no Unix socket listener.
Subjects use ``.`` between levels, ``*`` for one level and ``>`` for the rest.
A subscription is in place on the server once ``flush()`` (PING/PONG) returns
after it, so subscribers report "synced" then. Subscribers count in a message
callback, the usual nats-py style.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from importlib.metadata import version
from typing import TYPE_CHECKING, Any, Final

from benchmarks.peers.base import (
    ECHO_TOPIC,
    IDLE_AFTER_PUBLISHERS,
    IDLE_TOPIC,
    PAYLOAD_BYTES,
    REQUEST_BYTES,
    TOPIC,
    YIELD_EVERY,
    Adapter,
    BrokerOptions,
    BrokerProcess,
    Ctl,
    IdleTracker,
    RoleFunction,
    apt_install,
    find_binary,
    free_tcp_port,
    payload,
    pip_install,
    spawn_broker,
    wait_until,
)

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg

__all__ = ["ROLES", "NatsAdapter", "subject"]


def subject(levels: Sequence[str]) -> str:
    """A filter or topic in NATS syntax."""
    return ".".join("*" if lv == "+" else ">" if lv == "#" else lv for lv in levels)


class NatsAdapter(Adapter):
    name = "nats"
    label = "NATS"
    module = "benchmarks.peers.nats_peer"
    lossless_mode = "core NATS, defaults: the server buffers up to 64 MiB per client"
    request_reply = True

    def ensure(self, install: bool) -> str | None:
        return apt_install("nats-server", "nats-server", install) or pip_install("nats", install)

    def versions(self) -> dict[str, str]:
        binary = find_binary("nats-server") or "nats-server"
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
        server = (out.stdout or out.stderr).strip().removeprefix("nats-server: ")
        return {"nats-server": server, "nats-py": version("nats-py")}

    def start_broker(self, workdir: str, options: BrokerOptions) -> BrokerProcess:
        port = free_tcp_port()
        conf = os.path.join(workdir, "nats.conf")
        with open(conf, "w", encoding="utf-8") as f:
            f.write(f"host: 127.0.0.1\nport: {port}\n")
        binary = find_binary("nats-server") or "nats-server"
        broker = spawn_broker(
            [binary, "-c", conf],
            workdir,
            f"nats://127.0.0.1:{port}",
            "TCP 127.0.0.1 (no Unix socket listener)",
            settings=["defaults (max_pending 64 MiB per client)"],
            clean_exit_codes=frozenset({0, 1, -15}),
        )
        try:
            wait_until(lambda: "Server is ready" in broker.output(), broker, 30.0)
        except BaseException:
            broker.stop()
            raise
        return broker


# -- roles -------------------------------------------------------------------------------


def _run(coro: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        return await coro()

    return asyncio.run(main())


class _Errors:
    """Asynchronous errors nats-py reports (slow consumer, disconnects)."""

    def __init__(self) -> None:
        self.slow_consumer = 0
        self.other: list[str] = []
        self.disconnected = False

    async def error(self, exc: Exception) -> None:
        if type(exc).__name__ == "SlowConsumerError":
            self.slow_consumer += 1
        elif len(self.other) < 5:
            self.other.append(f"{type(exc).__name__}: {exc}")

    async def disconnected_cb(self) -> None:
        self.disconnected = True


async def _connect(url: str, name: str, errors: _Errors | None = None) -> NatsClient:
    import nats

    errors = errors or _Errors()
    return await nats.connect(
        url,
        name=name,
        allow_reconnect=False,
        connect_timeout=30,
        error_cb=errors.error,
        disconnected_cb=errors.disconnected_cb,
    )


async def _close(nc: NatsClient) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(10):
            await nc.close()


def _pub(ctl: Ctl, url: str, params: dict[str, Any]) -> dict[str, Any]:
    count: int = params["count"]

    async def run() -> dict[str, Any]:
        nc = await _connect(url, f"bench-pub-{ctl.index}")
        subj = subject(TOPIC)
        data = payload()
        publish = nc.publish
        ctl.ready()
        ctl.wait_go()  # blocks the loop: nothing to do before the start
        start_ns = time.perf_counter_ns()
        sent = 0
        for _ in range(count):
            await publish(subj, data)
            sent += 1
            if sent % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # let the flusher write
                if ctl.expired():
                    break
        published_ns = time.perf_counter_ns()
        await nc.flush(timeout=60)
        flushed_ns = time.perf_counter_ns()
        await _close(nc)
        return {
            "sent": sent,
            "start_ns": start_ns,
            "published_ns": published_ns,
            "flushed_ns": flushed_ns,
        }

    return _run(run)


def _sub(ctl: Ctl, url: str, params: dict[str, Any]) -> dict[str, Any]:
    expected: int = params["expected"]

    async def run() -> dict[str, Any]:
        errors = _Errors()
        nc = await _connect(url, f"bench-sub-{ctl.index}", errors)
        count = first_ns = last_ns = 0

        async def on_message(msg: Msg) -> None:
            nonlocal count, first_ns, last_ns
            if len(msg.data) == PAYLOAD_BYTES:
                count += 1
                last_ns = time.perf_counter_ns()
                if not first_ns:
                    first_ns = last_ns

        await nc.subscribe(subject(params["filter"]), cb=on_message)
        await nc.flush(timeout=30)  # the server has the subscription
        ctl.ready()
        ctl.synced()
        tracker = IdleTracker(ctl, IDLE_AFTER_PUBLISHERS)
        reason = "complete"
        while count < expected:
            seen = count
            await asyncio.sleep(0.05)
            if count != seen:
                tracker.progress(time.perf_counter_ns())
                continue
            if nc.is_closed or errors.disconnected:
                reason = "disconnected by the server"
                break
            stop = tracker.reason()
            if stop:
                reason = stop
                break
        await _close(nc)
        return {
            "received": count,
            "first_ns": first_ns,
            "last_ns": last_ns,
            "dropped": errors.slow_consumer,
            "reason": reason,
            "errors": errors.other,
        }

    return _run(run)


def _stalled(ctl: Ctl, url: str, params: dict[str, Any]) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        errors = _Errors()
        nc = await _connect(url, "bench-stalled", errors)
        await nc.subscribe(subject(params["filter"]))
        await nc.flush(timeout=30)
        ctl.ready()
        ctl.synced()
        ctl.wait_stop()  # blocks the event loop: the socket is never read again
        await asyncio.sleep(0.2)  # then let the client notice what happened
        disconnected = errors.disconnected or nc.is_closed
        await _close(nc)
        return {"stalled": True, "disconnected": disconnected}

    return _run(run)


def _holder(ctl: Ctl, url: str, params: dict[str, Any]) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        nc = await _connect(url, f"bench-holder-{ctl.index}")
        filters = [subject(f) for f in params["filters"]]
        for flt in filters:
            await nc.subscribe(flt)
        await nc.flush(timeout=120)
        ctl.ready(subscriptions=len(filters))
        ctl.synced()
        await asyncio.to_thread(ctl.wait_stop)
        await _close(nc)
        return {"subscriptions": len(filters)}

    return _run(run)


def _idle(ctl: Ctl, url: str, params: dict[str, Any]) -> dict[str, Any]:
    n: int = params["clients"]

    async def run() -> dict[str, Any]:
        clients: list[NatsClient] = []

        async def open_one(i: int) -> None:
            nc = await _connect(url, f"bench-idle-{ctl.index}-{i}")
            clients.append(nc)
            await nc.subscribe(subject(IDLE_TOPIC))
            await nc.flush(timeout=30)

        try:
            for start in range(0, n, 50):
                await asyncio.gather(*(open_one(i) for i in range(start, min(n, start + 50))))
            ctl.ready(clients=len(clients))
            await asyncio.to_thread(ctl.wait_stop)
            connected = sum(nc.is_connected for nc in clients)
        finally:
            await asyncio.gather(*(_close(nc) for nc in clients))
        return {"clients": len(clients), "still_connected": connected}

    return _run(run)


def _echo(ctl: Ctl, url: str, params: dict[str, Any]) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        nc = await _connect(url, "bench-echo")
        echo_subject = subject(ECHO_TOPIC)
        echoed = 0

        async def on_message(msg: Msg) -> None:
            nonlocal echoed
            await nc.publish(echo_subject, msg.data)
            echoed += 1

        await nc.subscribe(subject(TOPIC), cb=on_message)
        await nc.flush(timeout=30)
        ctl.ready()
        ctl.synced()
        await asyncio.to_thread(ctl.wait_stop)
        await _close(nc)
        return {"echoed": echoed}

    return _run(run)


def _ping(ctl: Ctl, url: str, params: dict[str, Any]) -> dict[str, Any]:
    count: int = params["count"]
    warmup: int = params["warmup"]

    async def run() -> dict[str, Any]:
        nc = await _connect(url, "bench-ping")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bytes] | None = None

        async def on_message(msg: Msg) -> None:
            if waiter is not None and not waiter.done():
                waiter.set_result(msg.data)

        await nc.subscribe(subject(ECHO_TOPIC), cb=on_message)
        await nc.flush(timeout=30)
        topic = subject(TOPIC)
        data = bytearray(payload())
        rtts: list[int] = []
        lost = stale = 0
        ctl.ready()
        ctl.wait_go()  # blocks the loop: nothing to do before the start
        start_ns = end_ns = time.perf_counter_ns()
        for i in range(warmup + count):
            if ctl.expired():
                break
            struct.pack_into(">Q", data, 0, i)
            waiter = loop.create_future()
            t0 = time.perf_counter_ns()
            await nc.publish(topic, bytes(data))
            while True:
                try:
                    async with asyncio.timeout(2.0):
                        echo = await waiter
                except TimeoutError:
                    lost += 1
                    break
                t1 = time.perf_counter_ns()
                if struct.unpack_from(">Q", echo)[0] == i:
                    if i >= warmup:
                        rtts.append(t1 - t0)
                    break
                stale += 1
                waiter = loop.create_future()
            end_ns = time.perf_counter_ns()
        await _close(nc)
        return {
            "rtts_ns": rtts,
            "lost": lost,
            "stale": stale,
            "start_ns": start_ns,
            "end_ns": end_ns,
            "round_trips": warmup + count - lost,
        }

    return _run(run)


def _responder(ctl: Ctl, url: str, params: dict[str, Any]) -> dict[str, Any]:
    """NATS request/reply: a queue-group subscriber answers each request on the
    request's reply subject."""

    async def run() -> dict[str, Any]:
        nc = await _connect(url, "bench-responder")
        answered = 0

        async def on_request(msg: Msg) -> None:
            nonlocal answered
            await msg.respond(msg.data)
            answered += 1

        await nc.subscribe(subject(TOPIC), queue="responders", cb=on_request)
        await nc.flush(timeout=30)
        ctl.ready()
        ctl.synced()
        await asyncio.to_thread(ctl.wait_stop)
        await _close(nc)
        return {"echoed": answered}

    return _run(run)


def _requester(ctl: Ctl, url: str, params: dict[str, Any]) -> dict[str, Any]:
    """``nc.request``: one request in flight, its reply on the client's inbox."""
    count: int = params["count"]
    warmup: int = params["warmup"]

    async def run() -> dict[str, Any]:
        nc = await _connect(url, "bench-requester")
        topic = subject(TOPIC)
        data = bytearray(REQUEST_BYTES)
        rtts: list[int] = []
        lost = stale = 0
        ctl.ready()
        ctl.wait_go()  # blocks the loop: nothing to do before the start
        start_ns = end_ns = time.perf_counter_ns()
        for i in range(warmup + count):
            if ctl.expired():
                break
            struct.pack_into(">Q", data, 0, i)
            t0 = time.perf_counter_ns()
            try:
                reply = await nc.request(topic, bytes(data), timeout=2.0)
            except TimeoutError:
                lost += 1
                continue
            t1 = time.perf_counter_ns()
            if struct.unpack_from(">Q", reply.data)[0] != i:
                stale += 1
            elif i >= warmup:
                rtts.append(t1 - t0)
        end_ns = time.perf_counter_ns()
        await _close(nc)
        return {
            "rtts_ns": rtts,
            "lost": lost,
            "stale": stale,
            "start_ns": start_ns,
            "end_ns": end_ns,
            "round_trips": warmup + count - lost,
        }

    return _run(run)


ROLES: Final[dict[str, RoleFunction]] = {
    "pub": _pub,
    "sub": _sub,
    "stalled": _stalled,
    "holder": _holder,
    "idle": _idle,
    "echo": _echo,
    "ping": _ping,
    "responder": _responder,
    "requester": _requester,
}
