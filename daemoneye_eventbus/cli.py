"""``daemoneye-eventbus``: run a broker, publish, subscribe, inspect.

Commands: ``serve``, ``pub``, ``sub``, ``stats``, ``topics``, ``demo``. Every
command takes ``--socket PATH`` and ``--instance NAME``; errors go to stderr
with a non-zero exit code (2 when ``serve`` will not run as root, or cannot
drop its privileges as asked). ``serve --metrics-listen`` serves the broker's
Prometheus metrics (:mod:`daemoneye_eventbus.metrics`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import grp
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format, text_format
from google.protobuf.message import Message

from daemoneye.eventbus.v1 import registry
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationFilter
from daemoneye.eventbus.v1.options_pb2 import AccessLevel
from daemoneye_eventbus import privileges
from daemoneye_eventbus.access import Policy
from daemoneye_eventbus.broker import Broker, BrokerConfig
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.correlation import new_correlation
from daemoneye_eventbus.delivery import ReceivedEvent
from daemoneye_eventbus.errors import (
    BrokerError,
    ClosedResourceError,
    EventBusError,
    PrivilegeError,
    RequestTimeout,
)
from daemoneye_eventbus.runtime import run, running_loop_name
from daemoneye_eventbus.transports import default_address
from daemoneye_eventbus.watch import watch

__all__ = ["main"]

log = logging.getLogger("daemoneye_eventbus.cli")


def _socket(args: argparse.Namespace) -> str:
    path: str | None = args.socket
    return path or default_address(args.instance)


def _mode(text: str) -> int:
    """An octal socket mode such as 0600 or 0660; never wider than 0666."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode such as 0660") from None
    if mode & ~0o666:
        raise argparse.ArgumentTypeError(f"socket mode {text} may only hold read/write bits")
    return mode


def _group(name: str | None) -> int | None:
    """A group given by name or number, as a gid."""
    if name is None:
        return None
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise EventBusError(f"no group named {name!r}") from None


def _metrics_listen(text: str) -> str:
    """``HOST:PORT`` or a Unix socket path, checked (the metrics module parses it again)."""
    from daemoneye_eventbus.metrics import listen_address  # imports prometheus_client

    try:
        listen_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _access_name(level: int) -> str:
    return AccessLevel.Name(AccessLevel.ValueType(level)).removeprefix("ACCESS_LEVEL_").lower()


# -- serve ---------------------------------------------------------------------

#: Exit status of ``serve`` when it will not run as root or cannot drop privileges.
_EXIT_PRIVILEGES = 2


def _identity(args: argparse.Namespace) -> tuple[int, int] | None:
    """Who ``serve`` becomes once its socket is bound: ``(uid, gid)``, or None to stay.

    Refuses (:class:`PrivilegeError`) an unknown ``--user``/``--group``, and
    running on as root without ``--user`` or ``--allow-root``.
    """
    if args.user is None:
        if args.group is not None:
            raise PrivilegeError("--group needs --user")
        if os.geteuid() == 0 and not args.allow_root:
            raise PrivilegeError(
                "refusing to run as root: give --user NAME to drop privileges, or --allow-root"
            )
        return None
    uid, gid = privileges.resolve(args.user, args.group)
    # As an ordinary user, only "dropping" to that same user is possible.
    return (uid, gid) if privileges.check_switch(uid, gid) else None


def _drop_to(broker: Broker, uid: int, gid: int) -> None:
    """Give the socket to ``uid``/``gid`` and become them (``before_serving``)."""
    if broker.listener is None:
        raise PrivilegeError("the broker's socket is not bound yet")
    try:
        broker.listener.chown(uid, gid)
    except BrokerError as exc:
        raise PrivilegeError(str(exc)) from exc
    privileges.drop_privileges(uid, gid)
    directory = os.path.dirname(os.path.abspath(broker.path))
    if not os.access(directory, os.W_OK | os.X_OK):
        log.warning(
            "uid %d may not write to %s: the socket file will stay behind on exit "
            "(the next broker replaces it)",
            uid,
            directory,
        )


async def _serve(args: argparse.Namespace, identity: tuple[int, int] | None = None) -> int:
    policy = Policy.load(args.policy) if args.policy else None
    if identity is not None:
        # The default policy trusts the broker's own uid (and root): the uid it drops to.
        policy = policy or Policy.default(identity[0])
        if any(rule.executables is not None for rule in policy.components.values()):
            log.warning(
                "policy %s names executables: after dropping to uid %d the broker can read "
                "/proc/<pid>/exe only of that user's processes, so peers of other users "
                "claiming those components will be refused",
                policy.source,
                identity[0],
            )
    config = BrokerConfig(
        max_connections=args.max_connections,
        max_subscriptions=args.max_subscriptions,
        max_frame_bytes=args.max_frame_bytes,
        max_queue_messages=args.max_queue_messages,
        max_queue_bytes=args.max_queue_bytes,
        max_frames_per_turn=args.max_frames_per_turn,
        max_subscription_bytes=args.max_subscription_bytes,
        max_total_subscription_bytes=args.max_total_subscription_bytes,
        handshake_timeout=args.handshake_timeout,
        heartbeat_interval=args.heartbeat_interval,
        idle_timeout=args.idle_timeout,
        slow_consumer_timeout=args.slow_consumer_timeout,
        drain_timeout=args.drain_timeout,
        allow_undeclared_topics=args.allow_undeclared_topics,
        validate_payloads=not args.no_validate_payloads,
        max_connections_per_uid=args.max_connections_per_uid,
        socket_mode=args.socket_mode,
        socket_group=_group(args.socket_group),
        policy=policy,
    )

    def drop() -> None:
        if identity is not None:
            _drop_to(broker, *identity)

    broker = Broker(_socket(args), config, before_serving=drop if identity else None)
    await broker.start()  # bound, and privileges dropped: only then the metrics endpoint
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    metrics = None
    try:
        if args.metrics_listen is not None:
            from daemoneye_eventbus.metrics import serve_metrics

            metrics = serve_metrics(
                args.metrics_listen,
                broker.metrics_registry(),
                mode=config.socket_mode,
                group=config.socket_group,
            )
        print(
            f"daemoneye-eventbus broker listening on {broker.path} "
            f"(mode {config.socket_mode:04o}, policy {broker.policy.source}, "
            f"uid {os.geteuid()}, gid {os.getegid()}, loop {running_loop_name()})",
            flush=True,
        )
        if metrics is not None:
            print(f"daemoneye-eventbus metrics on {metrics.url}", flush=True)
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if metrics is not None:
            metrics.close()
        await broker.close()
    stats = broker.statistics()
    print(
        f"broker stopped: {stats.published} published, {stats.delivered} delivered, "
        f"{stats.dropped} dropped",
        flush=True,
    )
    return 0


# -- pub -------------------------------------------------------------------------


async def _pub(args: argparse.Namespace) -> int:
    topic = registry.lookup(args.topic)
    if topic is None:
        raise EventBusError(f"topic {args.topic!r} is not declared in the schema (see `topics`)")
    message = topic.payload_type()
    json_format.Parse(args.json, message)
    correlation = new_correlation(args.correlation_id) if args.correlation_id else None
    async with Client(_socket(args), name=args.name, component=args.component) as client:
        for _ in range(args.count):
            await client.publish(topic, message, correlation=correlation)
        await client.flush()
        if client.last_error is not None:
            raise client.last_error
    return 0


# -- sub -------------------------------------------------------------------------


def _event_dict(event: ReceivedEvent[Message]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "topic": event.topic,
        "sequence": event.sequence,
        "payload_type": event.payload_type,
        "payload": json_format.MessageToDict(event.message()),
    }
    if event.correlation is not None:
        out["correlation"] = json_format.MessageToDict(event.correlation)
    return out


def _event_line(event: ReceivedEvent[Message]) -> str:
    body = text_format.MessageToString(event.message(), as_one_line=True)
    corr = ""
    if event.correlation is not None:
        corr = f" correlation={event.correlation.correlation_id}"
    return f"{event.topic} #{event.sequence}{corr} {body}"


async def _sub(args: argparse.Namespace) -> int:
    flt = None
    if args.correlation_root or args.correlation_id:
        flt = CorrelationFilter(
            root_correlation_ids=args.correlation_root or [],
            correlation_ids=args.correlation_id or [],
        )
    async with Client(_socket(args), name=args.name, component=args.component) as client:
        sub = await client.subscribe(
            args.filter, correlation_filter=flt, include_control=args.include_control
        )
        print(f"subscribed to {args.filter}", file=sys.stderr, flush=True)
        seen = 0
        while args.count is None or seen < args.count:
            try:
                event = await sub.get(timeout=args.timeout)
            except RequestTimeout:
                if seen == 0:
                    raise
                break  # --timeout after some events: done
            except ClosedResourceError:
                break  # unsubscribed
            seen += 1
            line = json.dumps(_event_dict(event)) if args.json else _event_line(event)
            print(line, flush=True)
        if sub.missed or sub.dropped:
            print(f"missed {sub.missed}, dropped {sub.dropped}", file=sys.stderr)
    return 0


# -- stats / topics ------------------------------------------------------------


async def _stats(args: argparse.Namespace) -> int:
    async with Client(_socket(args), name=args.name, component=args.component) as client:
        if args.watch:
            await watch(client.broker_statistics, sys.stdout, interval=args.interval)
            return 0
        stats = await client.broker_statistics()
    if args.json:
        print(
            json.dumps(json_format.MessageToDict(stats, always_print_fields_with_no_presence=True))
        )
        return 0
    print(f"connections: {stats.connections} open, {stats.connections_total} since start")
    print(
        f"events:      {stats.published} published, {stats.delivered} delivered, "
        f"{stats.dropped} dropped, {stats.refused} refused"
    )
    for c in stats.connection_stats:
        print(
            f"  session {c.session_id} {c.client_name!r} component={c.component or '-'} "
            f"pid={c.peer_pid} uid={c.peer_uid} published={c.published} "
            f"queued={c.queue_messages}/{c.queue_bytes}B"
        )
    for s in stats.subscription_stats:
        print(
            f"  subscription {s.session_id}/{s.subscription_id} {s.filter} "
            f"delivered={s.delivered} dropped={s.dropped}"
        )
    return 0


def _topics(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    decls: list[registry.Topic[Any] | registry.TopicTemplate[Any]] = [
        *registry.TOPICS.values(),
        *registry.TEMPLATES,
    ]
    for t in decls:
        rows.append(
            {
                "topic": t.name if isinstance(t, registry.Topic) else t.pattern,
                "access": _access_name(t.access),
                "payload": t.payload_name,
                "publishers": sorted(t.publishers),
                "subscribers": sorted(t.subscribers),
                "control": t.control,
            }
        )
    rows.sort(key=lambda r: str(r["topic"]))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(str(r["topic"])) for r in rows)
    for r in rows:
        pubs = ",".join(r["publishers"]) or "*"
        subs = ",".join(r["subscribers"]) or "*"
        print(
            f"{r['topic']:<{width}}  {r['access']:<10}  {r['payload']:<45}  pub={pubs}  sub={subs}"
        )
    return 0


async def _demo(args: argparse.Namespace) -> int:
    from daemoneye_eventbus.demo import run_demo

    # Without --socket or --instance the demo uses a private temporary socket, so
    # that it never clashes with a broker on the default path.
    path = _socket(args) if args.socket or args.instance else None
    return await run_demo(path, count=args.count)


# -- parser ----------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--socket", metavar="PATH", help="broker socket (default /tmp/daemoneye.sock)"
    )
    common.add_argument(
        "--instance", metavar="NAME", help="named instance: /tmp/daemoneye-NAME.sock"
    )
    common.add_argument("-v", "--verbose", action="store_true", help="log debug messages")

    parser = argparse.ArgumentParser(
        prog="daemoneye-eventbus", description="Local typed pub/sub message bus.", parents=[common]
    )
    cmds = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = cmds.add_parser(
        "serve", parents=[common], help="run a standalone broker until SIGINT/SIGTERM"
    )
    d = BrokerConfig()
    serve.add_argument("--max-connections", type=int, default=d.max_connections)
    serve.add_argument("--max-subscriptions", type=int, default=d.max_subscriptions)
    serve.add_argument("--max-frame-bytes", type=int, default=d.max_frame_bytes)
    serve.add_argument("--max-queue-messages", type=int, default=d.max_queue_messages)
    serve.add_argument("--max-queue-bytes", type=int, default=d.max_queue_bytes)
    serve.add_argument(
        "--max-subscription-bytes",
        type=int,
        default=d.max_subscription_bytes,
        help="bytes of broker memory one connection's subscriptions may hold",
    )
    serve.add_argument(
        "--max-total-subscription-bytes",
        type=int,
        default=d.max_total_subscription_bytes,
        help="bytes of broker memory all subscriptions together may hold",
    )
    serve.add_argument(
        "--max-frames-per-turn",
        type=int,
        default=d.max_frames_per_turn,
        help="frames handled from one connection per event-loop turn (0: no limit)",
    )
    serve.add_argument("--handshake-timeout", type=float, default=d.handshake_timeout)
    serve.add_argument("--heartbeat-interval", type=float, default=d.heartbeat_interval)
    serve.add_argument("--idle-timeout", type=float, default=d.idle_timeout)
    serve.add_argument("--slow-consumer-timeout", type=float, default=d.slow_consumer_timeout)
    serve.add_argument("--drain-timeout", type=float, default=d.drain_timeout)
    serve.add_argument("--max-connections-per-uid", type=int, default=d.max_connections_per_uid)
    serve.add_argument(
        "--socket-mode",
        type=_mode,
        default=d.socket_mode,
        metavar="MODE",
        help="permissions of the socket file, e.g. 0660 (default 0600)",
    )
    serve.add_argument(
        "--socket-group", metavar="GROUP", help="group (name or gid) of the socket file"
    )
    serve.add_argument(
        "--policy", metavar="FILE", help="TOML policy: which peers may act as which component"
    )
    serve.add_argument(
        "--user",
        metavar="NAME",
        help="started as root: bind the socket, give it to this user (name or uid), then "
        "drop to it for good before accepting any connection",
    )
    serve.add_argument(
        "--group",
        metavar="NAME",
        help="with --user: the one group (name or gid) to keep (default: the user's primary group)",
    )
    serve.add_argument(
        "--allow-root",
        action="store_true",
        help="keep running as root without --user (by default serve refuses to)",
    )
    serve.add_argument(
        "--allow-undeclared-topics",
        action="store_true",
        help="accept topics the schema does not declare, as public topics",
    )
    serve.add_argument(
        "--metrics-listen",
        type=_metrics_listen,
        metavar="HOST:PORT|PATH",
        help="serve Prometheus metrics over HTTP on HOST:PORT (e.g. 127.0.0.1:9464), or on a "
        "Unix socket at PATH (any value with a '/'; mode and group as --socket-mode and "
        "--socket-group), once the broker's socket is bound and privileges dropped "
        "(default: off)",
    )
    serve.add_argument(
        "--no-validate-payloads",
        action="store_true",
        help="forward payloads without parsing them as their topic's declared type "
        "(default: parse each one and refuse what does not parse); for trusted deployments",
    )

    client = argparse.ArgumentParser(add_help=False)
    client.add_argument(
        "--name", default="daemoneye-eventbus-cli", help="client name for the broker's logs"
    )
    client.add_argument("--component", default="", help="component to claim (e.g. procmond)")

    pub = cmds.add_parser("pub", parents=[common, client], help="publish one event")
    pub.add_argument("topic", help="a topic declared in the schema (see `topics`)")
    pub.add_argument("--json", required=True, help="the payload in protobuf's JSON mapping")
    pub.add_argument("--correlation-id", help="attach new correlation metadata with this id")
    pub.add_argument("--count", type=int, default=1, help="publish the event this many times")

    sub = cmds.add_parser("sub", parents=[common, client], help="print events matching a filter")
    sub.add_argument("filter", help="topic filter, with + (one level) and # (the rest)")
    sub.add_argument("--json", action="store_true", help="one JSON object per line")
    sub.add_argument("--correlation-root", action="append", metavar="ID", help="only this workflow")
    sub.add_argument(
        "--correlation-id", action="append", metavar="ID", help="only this correlation id"
    )
    sub.add_argument(
        "--include-control", action="store_true", help="wildcards also match control topics"
    )
    sub.add_argument("--count", type=int, help="exit after this many events")
    sub.add_argument("--timeout", type=float, help="exit after this many seconds without an event")

    stats = cmds.add_parser(
        "stats",
        parents=[common, client],
        help="print the broker's statistics (per connection only for a privileged component)",
    )
    stats.add_argument("--json", action="store_true")
    stats.add_argument(
        "--watch",
        action="store_true",
        help="redraw a live view (rates per topic, drops, throttling, fullest queues) "
        "until interrupted",
    )
    stats.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="with --watch, seconds between redraws (default: 1)",
    )

    topics = cmds.add_parser("topics", parents=[common], help="list the topic registry")
    topics.add_argument("--json", action="store_true")

    demo = cmds.add_parser(
        "demo", parents=[common], help="broker + collector process + agent subscriber, end to end"
    )
    demo.add_argument("--count", type=int, default=20, help="process events the collector sends")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``daemoneye-eventbus`` command."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "topics":
            return _topics(args)
        if args.command == "serve":
            return run(_serve(args, _identity(args)))
        runner = {"pub": _pub, "sub": _sub, "stats": _stats, "demo": _demo}
        return run(runner[args.command](args))
    except KeyboardInterrupt:
        # Interrupting a live view is how it ends; anything else was cut short.
        return 0 if getattr(args, "watch", False) else 130
    except PrivilegeError as exc:
        print(f"daemoneye-eventbus {args.command}: error: {exc}", file=sys.stderr)
        return _EXIT_PRIVILEGES
    except (EventBusError, json_format.ParseError, ValueError, OSError) as exc:
        print(f"daemoneye-eventbus {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
