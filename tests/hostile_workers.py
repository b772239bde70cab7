"""Well-behaved publisher and subscriber processes for tests/test_hostile.py.

Run as ``python tests/hostile_workers.py publish|subscribe --socket PATH ...``.
Both claim a component (``procmond`` publishes ``events.process.lifecycle``,
``daemoneye-agent`` subscribes to it) and print JSON lines: the subscriber
``{"ready": true}`` once subscribed, and each a final summary line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time
from typing import Any

from daemoneye.eventbus.v1 import events_pb2, frames_pb2, registry
from daemoneye.eventbus.v1.frames_pb2 import Frame
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.errors import ConnectionClosed, RequestTimeout
from daemoneye_eventbus.frames import encode_frame
from daemoneye_eventbus.registry_runtime import Topic

LIFECYCLE = registry.EVENTS_PROCESS_LIFECYCLE
PROCESS = LIFECYCLE.payload_name


async def publish(args: argparse.Namespace) -> None:
    """Publish ``--count`` events (0: until the broker goes away), paced by ``--rate``."""
    loop = asyncio.get_running_loop()
    name = "x" * args.size
    declared = registry.lookup(args.topic)
    assert declared is not None, args.topic
    topic: Topic[Any] = LIFECYCLE if declared.name == LIFECYCLE.name else declared
    sent = 0
    closed: str | None = None
    async with Client(args.socket, name="hostile-publisher", component=args.component) as client:
        print(json.dumps({"connected": True}), flush=True)
        start = loop.time()
        try:
            while args.count == 0 or sent < args.count:
                if args.rate and sent % 50 == 0:
                    ahead = start + sent / args.rate - loop.time()
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                if topic is LIFECYCLE:
                    await client.publish(LIFECYCLE, events_pb2.ProcessEvent(pid=sent, name=name))
                else:
                    await client.publish(topic, topic.payload_type())
                sent += 1
                if sent % 256 == 0:
                    await asyncio.sleep(0)
            await client.flush()
        except ConnectionClosed as exc:
            closed = str(exc)
        elapsed = loop.time() - start
    print(json.dumps({"published": sent, "elapsed": elapsed, "closed": closed}), flush=True)


async def subscribe(args: argparse.Namespace) -> None:
    """Count events, sequence gaps and order until ``--count``, a quiet ``--timeout`` or close."""
    received = 0
    missed = 0
    last_seq = 0
    last_pid = -1
    ordered = True
    closed: str | None = None
    async with Client(
        args.socket, name="hostile-subscriber", component=args.component, max_pending=100_000
    ) as client:
        sub = await client.subscribe(LIFECYCLE)
        print(json.dumps({"ready": True}), flush=True)
        while args.count == 0 or received < args.count:
            try:
                event = await sub.get(timeout=args.timeout)
            except RequestTimeout:
                closed = "quiet"
                break
            except ConnectionClosed as exc:
                closed = str(exc)
                break
            received += 1
            if event.sequence <= last_seq:
                ordered = False
            missed += max(0, event.sequence - last_seq - 1)
            last_seq = event.sequence
            pid = event.message().pid
            if pid <= last_pid:
                ordered = False
            last_pid = pid
        dropped = sub.dropped
    summary = {
        "received": received,
        "missed": missed,
        "dropped": dropped,
        "last_seq": last_seq,
        "ordered": ordered,
        "closed": closed,
    }
    print(json.dumps(summary), flush=True)


def flood(args: argparse.Namespace) -> None:
    """Send small publish frames as fast as the socket takes them for
    ``--seconds`` seconds, one frame per event, and never read."""
    hello = frames_pb2.Hello(protocol_version=1, client_name="flooder", component=args.component)
    event = events_pb2.ProcessEvent(pid=1, name="x" * args.size).SerializeToString()
    frame = encode_frame(
        Frame(publish=frames_pb2.Publish(topic=LIFECYCLE.name, payload_type=PROCESS, payload=event))
    )
    chunk = frame * max(1, 65536 // len(frame))
    sent = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(args.socket)
        sock.sendall(encode_frame(Frame(hello=hello)))
        sock.recv(4096)  # the Welcome: nothing may be published before it [protocol §2]
        print(json.dumps({"ready": True}), flush=True)
        deadline = time.monotonic() + args.seconds
        try:
            while time.monotonic() < deadline:
                sock.sendall(chunk)
                sent += len(chunk) // len(frame)
        except OSError as exc:
            print(json.dumps({"sent": sent, "error": str(exc)}), flush=True)
            return
    print(json.dumps({"sent": sent}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["publish", "subscribe", "flood"])
    parser.add_argument("--seconds", type=float, default=3.0, help="flood: for how long")
    parser.add_argument("--topic", default=LIFECYCLE.name, help="publish: the topic")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--component")
    parser.add_argument("--count", type=int, default=0, help="0: until the connection closes")
    parser.add_argument("--rate", type=float, default=0.0, help="events/s at most (0: no limit)")
    parser.add_argument("--size", type=int, default=16, help="bytes of padding per event")
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()
    if args.role == "flood":
        args.component = args.component or "procmond"
        flood(args)
    elif args.role == "publish":
        args.component = args.component or "procmond"
        asyncio.run(publish(args))
    else:
        args.component = args.component or "daemoneye-agent"
        asyncio.run(subscribe(args))


if __name__ == "__main__":
    main()
