"""Publisher, subscriber and responder processes for the integration tests.

Run as ``python tests/workers.py publish|subscribe|serve|watch|linger ...``.
Each prints one JSON line per event received (subscribe, watch) or request
taken (serve) and a final JSON summary line; ``linger`` connects with a last
will, says it is ready and waits to be killed.

``--component`` is the component the client claims: by default ``procmond`` for
``publish`` (the publisher of ``events.process.*``) and ``serve`` (a responder
of the collector request topics), ``daemoneye-agent`` for ``subscribe`` (their
subscriber). ``serve`` answers the work queue ``control.collector.queue.{type}``
with a ``TaskAck`` naming it ``r<--publisher>``, or with ``--hold`` takes the
requests and never answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os

from google.protobuf.json_format import MessageToDict

from daemoneye.eventbus.v1 import control_pb2, events_pb2, registry
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationFilter
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.correlation import new_correlation
from daemoneye_eventbus.errors import RequestTimeout


async def publish(args: argparse.Namespace) -> None:
    topic = registry.lookup(args.topic)
    assert topic is not None, args.topic
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with Client(
        args.socket, name=f"publisher-{args.publisher}", component=args.component
    ) as client:
        for i in range(args.count):
            if args.rate and i % 100 == 0:
                # Paced: never more than --rate events per second.
                ahead = start + i / args.rate - loop.time()
                if ahead > 0:
                    await asyncio.sleep(ahead)
            event = events_pb2.ProcessEvent(pid=i, name=f"p{args.publisher}", ppid=args.publisher)
            meta = None
            if args.correlation:
                meta = new_correlation(f"{args.correlation}-{i % 2}")
            await client.publish(topic, event, correlation=meta)
            if i % 256 == 0:
                await asyncio.sleep(0)
        await client.flush()
        print(json.dumps({"published": args.count}), flush=True)


async def subscribe(args: argparse.Namespace) -> None:
    flt = CorrelationFilter(correlation_ids=args.correlation) if args.correlation else None
    async with Client(args.socket, name="subscriber", component=args.component) as client:
        sub = await client.subscribe(
            args.filter, correlation_filter=flt, lossless=args.lossless, window=args.window
        )
        # The credit window only where lossless delivery was asked for.
        ready = {"ready": True, "window": sub.window} if args.lossless else {"ready": True}
        print(json.dumps(ready), flush=True)
        got = 0
        last_pid: dict[int, int] = {}
        ordered = True
        while args.count is None or got < args.count:
            try:
                event = await sub.get(timeout=args.timeout)
            except RequestTimeout:
                break
            got += 1
            if args.slow and got % 100 == 0:
                await asyncio.sleep(args.slow)  # a reader slower than its publishers
            msg = event.message()
            assert isinstance(msg, events_pb2.ProcessEvent)
            if last_pid.get(msg.ppid, -1) >= msg.pid:
                ordered = False
            last_pid[msg.ppid] = msg.pid
            if args.quiet:
                continue
            corr = event.correlation.correlation_id if event.correlation else None
            record = {
                "topic": event.topic,
                "seq": event.sequence,
                "eid": event.event_id,
                "at": event.received_at_ns,
                "pid": msg.pid,
                "publisher": msg.ppid,
                "corr": corr,
            }
            print(json.dumps(record), flush=True)
        summary = {
            "done": got,
            "missed": sub.missed,
            "dropped": sub.dropped,
            "ordered": ordered,
        }
        if args.lossless:
            summary["window"] = sub.window
        print(json.dumps(summary), flush=True)


async def publish_raw(args: argparse.Namespace) -> None:
    """Publish each hex payload as the topic's payload type; report the refusals."""
    topic = registry.lookup(args.topic)
    assert topic is not None, args.topic
    errors: list[list[object]] = []
    async with Client(args.socket, name="raw-publisher", component=args.component) as client:
        client.on_error = lambda exc: errors.append([type(exc).__name__, exc.code])
        for payload in args.payloads:
            await client.publish_raw(topic.name, topic.payload_name, bytes.fromhex(payload))
            await client.flush()  # one at a time: each refusal is seen before the next
        print(json.dumps({"published": len(args.payloads), "errors": errors}), flush=True)


async def watch(args: argparse.Namespace) -> None:
    """Subscribe to any filter; print each event, its payload in protobuf's JSON mapping."""
    async with Client(args.socket, name="watcher", component=args.component) as client:
        sub = await client.subscribe(args.filter, include_control=args.include_control)
        print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
        got = 0
        while args.count is None or got < args.count:
            try:
                event = await sub.get(timeout=args.timeout)
            except RequestTimeout:
                break
            got += 1
            record = {
                "topic": event.topic,
                "seq": event.sequence,
                "eid": event.event_id,
                "at": event.received_at_ns,
                "retained": event.retained,
                "payload": MessageToDict(event.message()),
            }
            print(json.dumps(record), flush=True)
        print(json.dumps({"done": got, "missed": sub.missed}), flush=True)


async def linger(args: argparse.Namespace) -> None:
    """Connect with a last will (``ComponentStatus`` UNHEALTHY on ``control.health.status``),
    say ready, and wait: the test kills this process."""
    will = registry.CONTROL_HEALTH_STATUS(
        control_pb2.ComponentStatus(
            component_id=args.component, state=control_pb2.HEALTH_STATE_UNHEALTHY, message="gone"
        )
    )
    async with Client(
        args.socket, name=f"lingering-{args.component}", component=args.component, last_will=will
    ) as client:
        print(
            json.dumps({"ready": True, "pid": os.getpid(), "session": client.session_id}),
            flush=True,
        )
        await asyncio.sleep(args.timeout)


async def serve(args: argparse.Namespace) -> None:
    name = f"r{args.publisher}"
    served = 0
    async with (
        Client(args.socket, name=f"responder-{name}", component=args.component) as client,
        client.serve(registry.CONTROL_COLLECTOR_QUEUE) as requests,
    ):
        print(json.dumps({"ready": True}), flush=True)
        async for request in requests:
            served += 1
            corr = request.correlation.correlation_id if request.correlation else None
            record = {
                "task": request.message.task_id,
                "topic": request.topic,
                "requester": request.requester,
                "correlation": corr,
                "event_id": request.event_id,
                "remaining": request.remaining,
            }
            print(json.dumps(record), flush=True)
            if args.hold:
                continue  # taken, never answered
            ack = control_pb2.TaskAck(
                task_id=request.message.task_id,
                collector_id=name,
                status=control_pb2.RPC_STATUS_SUCCESS,
            )
            await request.reply(ack)
            if args.count and served >= args.count:
                break
    print(json.dumps({"served": served}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "role", choices=["publish", "publish-raw", "subscribe", "serve", "watch", "linger"]
    )
    parser.add_argument(
        "--payload", dest="payloads", action="append", default=[], help="publish-raw: hex"
    )
    parser.add_argument("--socket", required=True)
    parser.add_argument("--topic", default="events.process.lifecycle")
    parser.add_argument("--filter", default="events.#")
    parser.add_argument("--count", type=int)
    parser.add_argument("--publisher", type=int, default=0)
    parser.add_argument("--correlation", action="append")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--rate", type=float, help="publish at most this many events/s")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    parser.add_argument("--lossless", action="store_true", help="subscribe: lossless delivery")
    parser.add_argument("--include-control", action="store_true", help="watch: control topics")
    parser.add_argument("--window", type=int, help="subscribe: the credit window")
    parser.add_argument(
        "--slow", type=float, default=0.0, help="subscribe: sleep this long every 100 events"
    )
    parser.add_argument("--hold", action="store_true", help="serve: never answer")
    parser.add_argument(
        "--component",
        help="component to claim (default: procmond to publish, daemoneye-agent to subscribe)",
    )
    args = parser.parse_args()
    if args.component is None:
        args.component = "daemoneye-agent" if args.role == "subscribe" else "procmond"
    if args.role == "publish-raw":
        asyncio.run(publish_raw(args))
    elif args.role == "watch":
        asyncio.run(watch(args))
    elif args.role == "linger":
        asyncio.run(linger(args))
    elif args.role == "serve":
        asyncio.run(serve(args))
    elif args.role == "publish":
        if args.correlation:
            args.correlation = args.correlation[0]
        asyncio.run(publish(args))
    else:
        asyncio.run(subscribe(args))


if __name__ == "__main__":
    main()
