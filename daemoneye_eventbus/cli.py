"""``daemoneye-eventbus``: run a broker, publish, subscribe, inspect.

Commands: ``serve``, ``pub``, ``sub``, ``stats``, ``collectors``, ``task``
(:mod:`daemoneye_eventbus.cli_control`), ``bridge``
(:mod:`daemoneye_eventbus.cli_bridge`), ``topics``, ``demo``. Every
command takes ``--socket PATH`` and ``--instance NAME``. An error is one line
on stderr, ``daemoneye-eventbus COMMAND: error: …``, and a non-zero exit
status: 1 when the command failed, 2 for a usage or configuration error (a
bad command line, a bad ``DAEMONEYE_EVENTBUS_LOOP``, a policy file that does
not load, an unknown user or group, ``serve`` refusing to run as root or
failing to drop its privileges, a bridge configuration the bridge refuses),
130 when interrupted.
``serve --metrics-listen`` serves the broker's Prometheus metrics
(:mod:`daemoneye_eventbus.metrics`). The command line itself is
:mod:`daemoneye_eventbus.cli_args`; tables and JSON are
:mod:`daemoneye_eventbus.cli_output`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format, text_format
from google.protobuf.message import Message

from daemoneye.eventbus.v1 import registry
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationFilter
from daemoneye.eventbus.v1.options_pb2 import AccessLevel
from daemoneye_eventbus import cli_bridge, cli_control
from daemoneye_eventbus.access import Policy
from daemoneye_eventbus.bridge.config import BridgeConfigError
from daemoneye_eventbus.broker import Broker, BrokerConfig
from daemoneye_eventbus.cli_args import EXIT_ERROR, EXIT_USAGE, parser
from daemoneye_eventbus.cli_output import listening_line, message_json, table
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.correlation import new_correlation
from daemoneye_eventbus.delivery import ReceivedEvent
from daemoneye_eventbus.errors import (
    BrokerError,
    ClosedResourceError,
    EventBusError,
    PolicyError,
    PrivilegeError,
    RequestTimeout,
)
from daemoneye_eventbus.runtime import loop_factory, run, stop_on_signals
from daemoneye_eventbus.transports import default_address
from daemoneye_eventbus.transports.pipes import broad_grants
from daemoneye_eventbus.watch import watch

__all__ = ["main"]

log = logging.getLogger("daemoneye_eventbus.cli")


def _socket(args: argparse.Namespace) -> str:
    path: str | None = args.socket
    return path or default_address(args.instance)


def _group(name: str | None) -> int | None:
    """A group given by name or number, as a gid."""
    if name is None:
        return None
    if sys.platform == "win32":
        raise PrivilegeError("--socket-group is for Unix sockets; on Windows give --pipe-sddl")
    if name.isdigit():
        return int(name)
    import grp

    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise PrivilegeError(f"no group named {name!r}") from None


def _access_name(level: int) -> str:
    return AccessLevel.Name(AccessLevel.ValueType(level)).removeprefix("ACCESS_LEVEL_").lower()


# -- serve ---------------------------------------------------------------------


def _identity(args: argparse.Namespace) -> tuple[int, int] | None:
    """Who ``serve`` becomes once its socket is bound: ``(uid, gid)``, or None to stay.

    Refuses (:class:`PrivilegeError`) an unknown ``--user``/``--group``, and
    running on as root without ``--user`` or ``--allow-root``; on Windows,
    ``--user`` and ``--group`` (a broker runs as the account it is started
    as, and its pipe's security descriptor says who may connect).
    """
    if sys.platform == "win32":
        if args.user is not None or args.group is not None:
            raise PrivilegeError(
                "--user and --group are for Unix: on Windows, start the broker as the account "
                "it should run as, and say who may connect with --pipe-sddl"
            )
        return None
    from daemoneye_eventbus import privileges  # Unix only: pwd, grp

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
    if sys.platform == "win32":  # _identity gives none there
        raise PrivilegeError("dropping privileges is for Unix")
    from daemoneye_eventbus import privileges  # Unix only: pwd, grp

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
    broad = broad_grants(args.pipe_sddl) if args.pipe_sddl is not None else []
    if broad:
        log.warning("--pipe-sddl lets %s connect to the broker's pipe", " and ".join(broad))
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
        max_retained_events=args.max_retained_events,
        max_retained_bytes=args.max_retained_bytes,
        max_pending_requests=args.max_pending_requests,
        max_total_pending_requests=args.max_total_pending_requests,
        default_request_timeout=args.default_request_timeout,
        max_request_timeout=args.max_request_timeout,
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
        pipe_sddl=args.pipe_sddl,
        policy=policy,
    )

    def drop() -> None:
        if identity is not None:
            _drop_to(broker, *identity)

    broker = Broker(_socket(args), config, before_serving=drop if identity else None)
    await broker.start()  # bound, and privileges dropped: only then the metrics endpoint
    stop = asyncio.Event()
    restore = stop_on_signals(stop.set)
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
        print(listening_line(broker), flush=True)
        if metrics is not None:
            print(f"daemoneye-eventbus metrics on {metrics.url}", flush=True)
        await stop.wait()
    finally:
        restore()
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
    refusals: list[EventBusError] = []
    async with Client(_socket(args), name=args.name, component=args.component) as client:
        # Handled here, so the client does not log the refusal too: it is reported once.
        client.on_error = refusals.append
        for _ in range(args.count):
            await client.publish(topic, message, correlation=correlation)
        await client.flush()
    if refusals:
        raise refusals[0]
    return 0


# -- sub -------------------------------------------------------------------------


def _event_dict(event: ReceivedEvent[Message]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "topic": event.topic,
        "sequence": event.sequence,
        "payload_type": event.payload_type,
        "payload": message_json(event.message()),
    }
    if event.retained:  # the topic's retained event, given to the new subscription
        out["retained"] = True
    if event.correlation is not None:
        out["correlation"] = message_json(event.correlation)
    return out


def _event_line(event: ReceivedEvent[Message]) -> str:
    body = text_format.MessageToString(event.message(), as_one_line=True)
    corr = ""
    if event.correlation is not None:
        corr = f" correlation={event.correlation.correlation_id}"
    retained = " (retained)" if event.retained else ""
    return f"{event.topic} #{event.sequence}{retained}{corr} {body}"


async def _sub(args: argparse.Namespace) -> int:
    flt = None
    if args.correlation_root or args.correlation_id:
        flt = CorrelationFilter(
            root_correlation_ids=args.correlation_root or [],
            correlation_ids=args.correlation_id or [],
        )
    async with Client(_socket(args), name=args.name, component=args.component) as client:
        sub = await client.subscribe(
            args.filter,
            correlation_filter=flt,
            include_control=args.include_control,
            lossless=args.lossless,
        )
        print(f"subscribed to {args.filter}", file=sys.stderr, flush=True)
        seen = 0
        while args.count is None or seen < args.count:
            try:
                event = await sub.get(timeout=args.timeout)
            except RequestTimeout:
                if args.require_count:
                    raise RequestTimeout(
                        f"{seen} of {args.count} events before {args.timeout:g} s passed "
                        "without one (--require-count)"
                    ) from None
                break  # --timeout: a normal end, with or without events
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
        # Counters as numbers; the request id only paired the reply with the request.
        print(json.dumps(message_json(stats, omit=("request_id",), all_fields=True)))
        return 0
    print(f"connections: {stats.connections} open, {stats.connections_total} since start")
    print(
        f"events:      {stats.published} published, {stats.delivered} delivered, "
        f"{stats.dropped} dropped, {stats.refused} refused"
    )
    print(f"retained:    {stats.retained_events} events, {stats.retained_bytes} bytes")
    print(
        f"requests:    {stats.requests} routed, {stats.no_responders} without responders, "
        f"{stats.request_timeouts} timed out"
    )
    for c in stats.connection_stats:
        print(
            f"  session {c.session_id} {c.client_name!r} component={c.component or '-'} "
            f"pid={c.peer_pid} {f'sid={c.peer_sid}' if c.peer_sid else f'uid={c.peer_uid}'} "
            f"published={c.published} "
            f"queued={c.queue_messages}/{c.queue_bytes}B"
            + (f" pending_requests={c.pending_requests}" if c.pending_requests else "")
        )
    for s in stats.subscription_stats:
        print(
            f"  subscription {s.session_id}/{s.subscription_id} {s.filter} "
            f"delivered={s.delivered} dropped={s.dropped}"
            + (f" lossless held={s.held}" if s.lossless else "")
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
                "lossless": t.lossless,
                "retained": t.retained,
            }
        )
    rows.sort(key=lambda r: str(r["topic"]))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    lines = [("topic", "access", "payload", "publishers", "subscribers", "delivery", "retained")]
    lines += [
        (
            str(r["topic"]),
            str(r["access"]),
            str(r["payload"]),
            ",".join(r["publishers"]) or "*",
            ",".join(r["subscribers"]) or "*",
            "lossless" if r["lossless"] else "at-most-once",
            "retained" if r["retained"] else "-",
        )
        for r in rows
    ]
    print("\n".join(table(lines)))
    return 0


async def _demo(args: argparse.Namespace) -> int:
    from daemoneye_eventbus.demo import run_demo

    # Without --socket or --instance the demo uses a private temporary socket, so
    # that it never clashes with a broker on the default path.
    path = _socket(args) if args.socket or args.instance else None
    return await run_demo(path, count=args.count)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``daemoneye-eventbus`` command."""
    cli = parser()
    args = cli.parse_args(argv)
    if args.command == "sub" and args.require_count and None in (args.count, args.timeout):
        cli.error("sub --require-count needs --count and --timeout")
    if args.command == "serve" and args.pipe_sddl is not None and sys.platform != "win32":
        cli.error("serve --pipe-sddl is for Windows named pipes; here use --socket-mode")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )

    def error(exc: BaseException, status: int) -> int:
        print(f"daemoneye-eventbus {args.command}: error: {exc}", file=sys.stderr)
        return status

    if args.command == "topics":
        return _topics(args)
    try:
        loop_factory()  # the loop is chosen before any command's coroutine exists
    except (ValueError, RuntimeError) as exc:  # DAEMONEYE_EVENTBUS_LOOP
        return error(exc, EXIT_USAGE)
    try:
        if args.command == "serve":
            return run(_serve(args, _identity(args)))
        runner = {
            "pub": _pub,
            "sub": _sub,
            "stats": _stats,
            "collectors": cli_control.collectors,
            "task": cli_control.task,
            "bridge": cli_bridge.bridge,
            "demo": _demo,
        }
        return run(runner[args.command](args))
    except KeyboardInterrupt:
        # Interrupting a live view is how it ends; anything else was cut short.
        return 0 if getattr(args, "watch", False) else 130
    except (PrivilegeError, PolicyError, BridgeConfigError) as exc:  # serve's, bridge's
        return error(exc, EXIT_USAGE)
    except (EventBusError, json_format.ParseError, ValueError, OSError) as exc:
        return error(exc, EXIT_ERROR)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
