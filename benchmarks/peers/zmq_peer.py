"""ZeroMQ: pyzmq with an XSUB/XPUB proxy (``zmq.proxy``) in its own process, over ``ipc://``.

Publishers are PUB sockets connected to the proxy's XSUB endpoint, subscribers
SUB sockets connected to its XPUB endpoint; each message is two frames, the
topic and the payload. Every socket (the proxy's too) queues at most
:data:`HWM` messages per peer in the direction data flows, the same bound as
this bus's per-subscriber queue in these runs; beyond it PUB and XPUB drop.
(Subscriptions flow the other way without a bound.) ZeroMQ has only prefix
subscriptions: ``a.b.#`` becomes the prefix ``a.b.``; a ``+`` level has no
equivalent and becomes a literal word of the same depth (workload E).

Subscriptions travel to the publishers without an acknowledgement, so before
the start signal the publishers send small probe messages and a subscriber
reports "synced" once it has seen a probe from every publisher; probes are not
counted (only full-size payloads are).
"""

from __future__ import annotations

import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from benchmarks.peers.base import (
    ECHO_TOPIC,
    IDLE_AFTER_PUBLISHERS,
    IDLE_TOPIC,
    PAYLOAD_BYTES,
    PROBE_TOPIC,
    TOPIC,
    Adapter,
    BrokerOptions,
    BrokerProcess,
    Ctl,
    IdleTracker,
    RoleFunction,
    dotted,
    payload,
    pip_install,
    spawn_broker,
    wait_until,
)

if TYPE_CHECKING:
    import zmq

__all__ = ["HWM", "ROLES", "ZmqAdapter", "prefix"]

#: High-water mark of every socket, in messages.
HWM: Final = 10_000
PROXY_SCRIPT: Final = Path(__file__).with_name("zmq_proxy.py")
_PROBE: Final = b"probe:"


def prefix(levels: Sequence[str]) -> bytes:
    """The ZeroMQ prefix subscription closest to a filter."""
    out: list[str] = []
    for level in levels:
        if level == "#":
            return (".".join(out) + "." if out else "").encode()
        out.append("w" if level == "+" else level)
    return ".".join(out).encode()


class ZmqAdapter(Adapter):
    name = "zmq"
    label = "ZeroMQ proxy"
    module = "benchmarks.peers.zmq_peer"
    needs_probe_sync = True
    lossless_mode = "HWM 0 (no bound) on the proxy's and the clients' sockets"

    def ensure(self, install: bool) -> str | None:
        return pip_install("zmq", install)

    def versions(self) -> dict[str, str]:
        import zmq

        return {"pyzmq": zmq.pyzmq_version(), "libzmq": zmq.zmq_version()}

    def start_broker(self, workdir: str, options: BrokerOptions) -> BrokerProcess:
        front = f"ipc://{workdir}/xsub"
        back = f"ipc://{workdir}/xpub"
        hwm = 0 if options.lossless else HWM
        broker = spawn_broker(
            [sys.executable, str(PROXY_SCRIPT), front, back, str(hwm)],
            workdir,
            f"{front} {back}",
            "ipc:// (Unix socket)",
            settings=[f"HWM {hwm} messages per peer on every socket, data direction"],
            clean_exit_codes=frozenset({0, -15}),
        )
        try:
            wait_until(lambda: "listening" in broker.output(), broker, 30.0)
        except BaseException:
            broker.stop()
            raise
        return broker


# -- roles -------------------------------------------------------------------------------


def _endpoints(endpoint: str) -> tuple[str, str]:
    front, back = endpoint.split()
    return front, back


def _socket(
    ctx: zmq.Context[zmq.Socket[bytes]], kind: int, lossless: bool = False
) -> zmq.Socket[bytes]:
    """A socket bounded at :data:`HWM` messages in the direction data flows
    (without a bound if ``lossless``: HWM 0).

    Subscriptions flow the other way (SUB -> XPUB, XSUB -> PUB): that direction
    is unbounded, or a PUB that connects after 100,000 subscriptions would
    silently get only the first HWM of them.
    """
    import zmq

    sock = ctx.socket(kind)
    data_out = kind in (zmq.PUB, zmq.XPUB)
    hwm = 0 if lossless else HWM
    sock.set(zmq.SNDHWM, hwm if data_out else 0)
    sock.set(zmq.RCVHWM, 0 if data_out else hwm)
    sock.set(zmq.LINGER, 0)
    return sock


def _wait_probes(ctl: Ctl, sock: zmq.Socket[bytes], publishers: int) -> None:
    """Read until a probe of every publisher arrived, then report "synced"."""
    import zmq

    seen: set[bytes] = set()
    while len(seen) < publishers:
        if ctl.expired():
            raise TimeoutError(f"probes from {len(seen)} of {publishers} publishers")
        if sock.poll(50):
            frames = sock.recv_multipart(zmq.NOBLOCK)
            if frames[-1].startswith(_PROBE):
                seen.add(frames[-1])
    ctl.synced()


def _pub(ctl: Ctl, endpoint: str, params: dict[str, Any]) -> dict[str, Any]:
    import zmq

    count: int = params["count"]
    front, _ = _endpoints(endpoint)
    ctx = zmq.Context(io_threads=1)
    sock = _socket(ctx, zmq.PUB, params.get("lossless", False))
    sock.set(zmq.LINGER, 30_000)  # close() waits until everything went out
    sock.connect(front)
    topic, probe_topic = dotted(TOPIC).encode(), dotted(PROBE_TOPIC).encode()
    probe = _PROBE + str(ctl.index).encode()
    data = payload()
    ctl.ready()
    while not ctl.go.wait(0.002):
        if ctl.expired():
            raise TimeoutError("no start signal before the deadline")
        sock.send_multipart([topic, probe])
        sock.send_multipart([probe_topic, probe])
    start_ns = time.perf_counter_ns()
    send = sock.send_multipart
    for _ in range(count):
        send([topic, data])
    published_ns = time.perf_counter_ns()
    sock.close()
    ctx.term()  # returns once the queued messages reached the proxy
    flushed_ns = time.perf_counter_ns()
    return {
        "sent": count,
        "start_ns": start_ns,
        "published_ns": published_ns,
        "flushed_ns": flushed_ns,
    }


def _sub(ctl: Ctl, endpoint: str, params: dict[str, Any]) -> dict[str, Any]:
    import zmq

    expected: int = params["expected"]
    _, back = _endpoints(endpoint)
    ctx = zmq.Context(io_threads=1)
    sock = _socket(ctx, zmq.SUB, params.get("lossless", False))
    sock.connect(back)
    sock.set(zmq.SUBSCRIBE, prefix(params["filter"]))
    ctl.ready()
    _wait_probes(ctl, sock, params["publishers"])
    tracker = IdleTracker(ctl, IDLE_AFTER_PUBLISHERS)
    count = first_ns = last_ns = 0
    reason = "complete"
    recv = sock.recv_multipart
    noblock = zmq.NOBLOCK
    while count < expected:
        if not sock.poll(250):
            stop = tracker.reason()
            if stop:
                reason = stop
                break
            continue
        batch = 0
        while True:
            try:
                frames = recv(noblock)
            except zmq.Again:
                break
            if len(frames[-1]) == PAYLOAD_BYTES:
                batch += 1
        if batch:
            now = time.perf_counter_ns()
            first_ns = first_ns or now
            last_ns = now
            tracker.progress(now)
            count += batch
    sock.close()
    ctx.term()
    return {"received": count, "first_ns": first_ns, "last_ns": last_ns, "reason": reason}


def _stalled(ctl: Ctl, endpoint: str, params: dict[str, Any]) -> dict[str, Any]:
    import zmq

    _, back = _endpoints(endpoint)
    ctx = zmq.Context(io_threads=1)
    sock = _socket(ctx, zmq.SUB, params.get("lossless", False))
    sock.connect(back)
    sock.set(zmq.SUBSCRIBE, prefix(params["filter"]))
    ctl.ready()
    _wait_probes(ctl, sock, params["publishers"])
    ctl.wait_stop()  # never reads again
    sock.close()
    ctx.term()
    return {"stalled": True}


def _holder(ctl: Ctl, endpoint: str, params: dict[str, Any]) -> dict[str, Any]:
    import zmq

    _, back = _endpoints(endpoint)
    ctx = zmq.Context(io_threads=1)
    sock = _socket(ctx, zmq.SUB)
    sock.connect(back)
    filters = params["filters"]
    for flt in filters:
        sock.set(zmq.SUBSCRIBE, prefix(flt))
    # Last: the probe topic. Subscriptions travel in order, so once a probe
    # arrives every filter above has reached the publisher.
    sock.set(zmq.SUBSCRIBE, prefix(PROBE_TOPIC))
    ctl.ready(subscriptions=len(filters))
    _wait_probes(ctl, sock, params["publishers"])
    ctl.wait_stop()
    sock.close()
    ctx.term()
    return {"subscriptions": len(filters)}


def _idle(ctl: Ctl, endpoint: str, params: dict[str, Any]) -> dict[str, Any]:
    import zmq

    _, back = _endpoints(endpoint)
    n: int = params["clients"]
    ctx = zmq.Context(io_threads=1)
    ctx.set(zmq.MAX_SOCKETS, n + 64)
    socks = []
    for _ in range(n):
        sock = _socket(ctx, zmq.SUB)
        sock.connect(back)
        sock.set(zmq.SUBSCRIBE, prefix(IDLE_TOPIC))
        socks.append(sock)
    # connect() returns at once; the I/O thread connects in the background.
    time.sleep(1.0)
    ctl.ready(clients=n)
    ctl.wait_stop()
    for sock in socks:
        sock.close()
    ctx.term()
    return {"clients": n}


def _echo(ctl: Ctl, endpoint: str, params: dict[str, Any]) -> dict[str, Any]:
    import zmq

    front, back = _endpoints(endpoint)
    ctx = zmq.Context(io_threads=1)
    rx = _socket(ctx, zmq.SUB)
    rx.connect(back)
    rx.set(zmq.SUBSCRIBE, dotted(TOPIC).encode())
    tx = _socket(ctx, zmq.PUB)
    tx.connect(front)
    echo_topic = dotted(ECHO_TOPIC).encode()
    ctl.ready()
    ctl.synced()  # the pinger probes both directions before it measures
    echoed = 0
    while not ctl.stop.is_set() and not ctl.expired():
        if rx.poll(250):
            frames = rx.recv_multipart()
            tx.send_multipart([echo_topic, frames[-1]])
            echoed += 1
    rx.close()
    tx.close()
    ctx.term()
    return {"echoed": echoed}


def _ping(ctl: Ctl, endpoint: str, params: dict[str, Any]) -> dict[str, Any]:
    import zmq

    count: int = params["count"]
    warmup: int = params["warmup"]
    front, back = _endpoints(endpoint)
    ctx = zmq.Context(io_threads=1)
    rx = _socket(ctx, zmq.SUB)
    rx.connect(back)
    rx.set(zmq.SUBSCRIBE, dotted(ECHO_TOPIC).encode())
    tx = _socket(ctx, zmq.PUB)
    tx.connect(front)
    topic = dotted(TOPIC).encode()
    ctl.ready()
    ctl.wait_go()
    # Probe until an echo comes back: both subscriptions have then arrived.
    while not rx.poll(10):
        if ctl.expired():
            raise TimeoutError("no echo of the probes before the deadline")
        tx.send_multipart([topic, _PROBE])
    while rx.poll(50):  # drop the echoes of the other probes
        rx.recv_multipart()
    data = bytearray(payload())
    rtts: list[int] = []
    lost = stale = 0
    start_ns = end_ns = time.perf_counter_ns()
    for i in range(warmup + count):
        if ctl.expired():
            break
        struct.pack_into(">Q", data, 0, i)
        t0 = time.perf_counter_ns()
        tx.send_multipart([topic, data])
        while True:
            if not rx.poll(2000):
                lost += 1
                break
            frames = rx.recv_multipart()
            t1 = time.perf_counter_ns()
            if struct.unpack_from(">Q", frames[-1])[0] == i:
                if i >= warmup:
                    rtts.append(t1 - t0)
                break
            stale += 1
        end_ns = time.perf_counter_ns()
    rx.close()
    tx.close()
    ctx.term()
    return {
        "rtts_ns": rtts,
        "lost": lost,
        "stale": stale,
        "start_ns": start_ns,
        "end_ns": end_ns,
        "round_trips": warmup + count - lost,
    }


ROLES: Final[dict[str, RoleFunction]] = {
    "pub": _pub,
    "sub": _sub,
    "stalled": _stalled,
    "holder": _holder,
    "idle": _idle,
    "echo": _echo,
    "ping": _ping,
}
