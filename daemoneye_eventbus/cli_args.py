"""The command line of ``daemoneye-eventbus``: its commands, options and help.

Every option has help text that names its unit (seconds, bytes, events,
connections) and, where it has one, its default; :class:`HelpFormatter`
appends ``(default: …)`` from the option's default value unless the help
already says it. :func:`parser` builds the whole command line.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Final

from daemoneye_eventbus.cli_bridge import add_bridge_options, metrics_listen
from daemoneye_eventbus.config import BrokerConfig
from daemoneye_eventbus.transports import DEFAULT_ADDRESS, default_address
from daemoneye_eventbus.transports.pipes import check_sddl

__all__ = ["EXIT_ERROR", "EXIT_USAGE", "HelpFormatter", "parser"]

#: Exit status of a command that failed (the broker refused it, is gone, …).
EXIT_ERROR: Final = 1
#: Exit status of a usage or configuration error: argparse's own for a bad
#: command line, and the CLI's for a bad ``DAEMONEYE_EVENTBUS_LOOP``, a policy
#: file that does not load, an unknown user or group, ``serve`` refusing
#: to run as root or failing to drop privileges, and a bridge configuration
#: the bridge refuses.
EXIT_USAGE: Final = 2


class HelpFormatter(argparse.HelpFormatter):
    """Help that shows every option's default, unless it has none worth showing.

    Flags (default False), options without a default (None) and help that
    already names its default are left as they are.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or "default" in text
        ):
            return text
        return f"{text} (default: %(default)s)"


def _mode(text: str) -> int:
    """An octal socket mode such as 0600 or 0660; never wider than 0666."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode such as 0660") from None
    if mode & ~0o666:
        raise argparse.ArgumentTypeError(f"socket mode {text} may only hold read/write bits")
    return mode


def _sddl(text: str) -> str:
    """A pipe security descriptor in SDDL, of the shape a pipe's takes (see ``check_sddl``)."""
    try:
        return check_sddl(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _command(
    cmds: Any, name: str, parents: list[argparse.ArgumentParser], text: str
) -> argparse.ArgumentParser:
    sub: argparse.ArgumentParser = cmds.add_parser(
        name, parents=parents, help=text, description=text, formatter_class=HelpFormatter
    )
    return sub


def _serve_options(serve: argparse.ArgumentParser) -> None:
    d = BrokerConfig()
    limits = serve.add_argument_group("limits")
    for flag, default, metavar, text in (
        ("--max-connections", d.max_connections, "N", "connections open at most, in total"),
        (
            "--max-connections-per-uid",
            d.max_connections_per_uid,
            "N",
            "connections open at most per peer uid",
        ),
        (
            "--max-subscriptions",
            d.max_subscriptions,
            "N",
            "subscriptions open at most per connection",
        ),
        (
            "--max-frame-bytes",
            d.max_frame_bytes,
            "BYTES",
            "largest frame after the handshake, in bytes",
        ),
        (
            "--max-queue-messages",
            d.max_queue_messages,
            "EVENTS",
            "events queued for one subscriber before the broker drops new ones",
        ),
        (
            "--max-queue-bytes",
            d.max_queue_bytes,
            "BYTES",
            "bytes queued for one subscriber before the broker drops new events",
        ),
        (
            "--max-subscription-bytes",
            d.max_subscription_bytes,
            "BYTES",
            "bytes of broker memory one connection's subscriptions may hold",
        ),
        (
            "--max-total-subscription-bytes",
            d.max_total_subscription_bytes,
            "BYTES",
            "bytes of broker memory all subscriptions together may hold",
        ),
        (
            "--max-retained-events",
            d.max_retained_events,
            "N",
            "retained events kept at most (the last event of each retained topic)",
        ),
        (
            "--max-retained-bytes",
            d.max_retained_bytes,
            "BYTES",
            "bytes of broker memory the retained events may hold",
        ),
        (
            "--max-pending-requests",
            d.max_pending_requests,
            "N",
            "requests one connection may have waiting for a reply",
        ),
        (
            "--max-total-pending-requests",
            d.max_total_pending_requests,
            "N",
            "requests all connections together may have waiting for a reply",
        ),
        (
            "--max-frames-per-turn",
            d.max_frames_per_turn,
            "FRAMES",
            "frames handled from one connection per event-loop turn; 0: no limit",
        ),
    ):
        limits.add_argument(flag, type=int, default=default, metavar=metavar, help=text)
    deadlines = serve.add_argument_group("deadlines (in seconds)")
    for flag, value, text in (
        (
            "--handshake-timeout",
            d.handshake_timeout,
            "seconds a client has to complete its handshake",
        ),
        ("--heartbeat-interval", d.heartbeat_interval, "seconds of silence before a ping"),
        ("--idle-timeout", d.idle_timeout, "seconds of silence before a client is disconnected"),
        (
            "--slow-consumer-timeout",
            d.slow_consumer_timeout,
            "seconds a subscriber's socket may stay backed up before it is disconnected",
        ),
        (
            "--drain-timeout",
            d.drain_timeout,
            "seconds a shutdown may spend draining queues",
        ),
        (
            "--default-request-timeout",
            d.default_request_timeout,
            "seconds a request waits for its reply when it asks for no deadline",
        ),
        (
            "--max-request-timeout",
            d.max_request_timeout,
            "longest deadline a request may ask for, in seconds (a longer one is shortened)",
        ),
    ):
        deadlines.add_argument(flag, type=float, default=value, metavar="SECONDS", help=text)
    serve.add_argument(
        "--socket-mode",
        type=_mode,
        default=d.socket_mode,
        metavar="MODE",
        help=f"permissions of the socket file, in octal, e.g. 0660 (default: {d.socket_mode:04o})",
    )
    serve.add_argument(
        "--socket-group",
        metavar="GROUP",
        help="group (name or gid) of the socket file (default: the broker's group)",
    )
    serve.add_argument(
        "--pipe-sddl",
        type=_sddl,
        metavar="SDDL",
        help="Windows: security descriptor of the named pipe, e.g. "
        "'D:P(A;;GA;;;SY)(A;;GA;;;BA)(A;;GA;;;S-1-5-21-...)' to add an account "
        "(default: full access for LocalSystem, Administrators and the broker's own user, "
        "nobody else)",
    )
    serve.add_argument(
        "--policy",
        metavar="FILE",
        help="TOML policy: which peers may act as which component (default: the broker's "
        "uid and root may claim any component the schema names)",
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
        type=metrics_listen,
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


def _param(text: str) -> tuple[str, str]:
    """A task parameter, ``KEY=VALUE``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def _seconds(text: str) -> float:
    """A positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} seconds: give a positive, finite number")
    return value


def _control_commands(cmds: Any, common: argparse.ArgumentParser) -> None:
    """``collectors`` and ``task``: an agent on the bus, for a moment."""
    agent = argparse.ArgumentParser(add_help=False)
    agent.add_argument(
        "--name", default="daemoneye-eventbus-cli", help="client name for the broker's logs"
    )
    agent.add_argument(
        "--component",
        default="daemoneye-agent",
        help="component to claim: one allowed to ask collectors for their health and hand "
        "them tasks",
    )

    collectors = _command(
        cmds,
        "collectors",
        [common, agent],
        "list the collectors: id, type, state, task types, capabilities, load, last heartbeat",
    )
    collectors.add_argument(
        "--wait",
        type=_seconds,
        default=2.0,
        metavar="SECONDS",
        help="seconds to listen for registrations and heartbeats before printing (a "
        "collector is known about one of its heartbeat intervals after the command starts)",
    )
    collectors.add_argument(
        "--json",
        action="store_true",
        help='one JSON object, {"collectors": [...]}, numbers as numbers',
    )
    collectors.add_argument(
        "--watch", action="store_true", help="redraw the table until interrupted"
    )
    collectors.add_argument(
        "--interval",
        type=_seconds,
        default=1.0,
        metavar="SECONDS",
        help="with --watch, seconds between redraws",
    )

    task = _command(
        cmds,
        "task",
        [common, agent],
        "hand one task to a collector, wait for its outcome and print it "
        "(exit status 0 if it succeeded, 1 if not)",
    )
    task.add_argument("task_type", metavar="TYPE", help="the kind of task, e.g. scan")
    task.add_argument(
        "--param",
        type=_param,
        action="append",
        metavar="KEY=VALUE",
        help="a task parameter (repeat for more)",
    )
    task.add_argument(
        "--priority", type=int, default=0, metavar="N", help="higher runs first, as a number"
    )
    task.add_argument(
        "--deadline",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="seconds the task may take, waiting for a collector included; then it fails "
        "as timed out",
    )
    task.add_argument(
        "--collector", metavar="ID", help="only this collector may run it (default: any able to)"
    )
    task.add_argument(
        "--capability",
        metavar="NAME",
        help="only a collector offering this capability may run it (default: any)",
    )
    task.add_argument(
        "--strategy",
        choices=["least-loaded", "round-robin", "first-available", "random"],
        default="least-loaded",
        help="how the collector is chosen among those able to run it",
    )
    task.add_argument("--task-id", metavar="ID", help="the task's id (default: a new random one)")
    task.add_argument(
        "--json",
        action="store_true",
        help="one JSON object: status, collector, attempts, error, result fields",
    )


def _common(socket_default: str) -> argparse.ArgumentParser:
    """The options every command takes."""
    common = argparse.ArgumentParser(add_help=False)
    where = "named pipe" if sys.platform == "win32" else "socket"
    common.add_argument(
        "--socket", metavar="PATH", help=f"broker {where} (default: {socket_default})"
    )
    common.add_argument(
        "--instance", metavar="NAME", help=f"named instance: {default_address('NAME')}"
    )
    common.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    return common


def parser() -> argparse.ArgumentParser:
    """The ``daemoneye-eventbus`` command line."""
    common = _common(DEFAULT_ADDRESS)

    top = argparse.ArgumentParser(
        prog="daemoneye-eventbus",
        description="Local typed pub/sub message bus.",
        epilog="exit status: 0 done, 1 error, 2 usage or configuration error, 130 interrupted",
        parents=[common],
        formatter_class=HelpFormatter,
    )
    cmds = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = _command(cmds, "serve", [common], "run a standalone broker until SIGINT/SIGTERM")
    _serve_options(serve)

    client = argparse.ArgumentParser(add_help=False)
    client.add_argument(
        "--name", default="daemoneye-eventbus-cli", help="client name for the broker's logs"
    )
    client.add_argument(
        "--component",
        default="",
        help="component to claim, one the schema or the policy names, e.g. procmond "
        "(default: none, an anonymous client: public topics only)",
    )

    pub = _command(cmds, "pub", [common, client], "publish one event")
    pub.add_argument("topic", help="a topic declared in the schema (see `topics`)")
    pub.add_argument("--json", required=True, help="the payload in protobuf's JSON mapping")
    pub.add_argument(
        "--correlation-id", metavar="ID", help="attach new correlation metadata with this id"
    )
    pub.add_argument("--count", type=int, default=1, metavar="N", help="publish the event N times")

    sub = _command(cmds, "sub", [common, client], "print events matching a filter")
    sub.add_argument("filter", help="topic filter, with + (one level) and # (the rest)")
    sub.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per line, payload in protobuf's JSON mapping with integers as "
        "numbers",
    )
    sub.add_argument("--correlation-root", action="append", metavar="ID", help="only this workflow")
    sub.add_argument(
        "--correlation-id", action="append", metavar="ID", help="only this correlation id"
    )
    sub.add_argument(
        "--include-control", action="store_true", help="wildcards also match control topics"
    )
    sub.add_argument(
        "--lossless",
        action="store_true",
        help="lossless delivery: when this reader falls behind, the broker holds the "
        "publishers instead of dropping events (needs --component)",
    )
    sub.add_argument(
        "--count", type=int, metavar="N", help="exit after N events (default: no limit)"
    )
    sub.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="exit (status 0) after this many seconds without an event (default: wait forever)",
    )
    sub.add_argument(
        "--require-count",
        action="store_true",
        help="with --count and --timeout: exit with status 1 if the timeout ends the wait "
        "before N events arrived",
    )

    stats = _command(
        cmds,
        "stats",
        [common, client],
        "print the broker's statistics (per connection only for a privileged component)",
    )
    stats.add_argument(
        "--json",
        action="store_true",
        help="one JSON object, counters as numbers, in protobuf's JSON field names",
    )
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
        help="with --watch, seconds between redraws",
    )

    _control_commands(cmds, common)

    bridge = _command(
        cmds,
        "bridge",
        [common],
        "forward this host's events to NATS JetStream (and, with --control, the fleet's "
        "control messages to the bus) until SIGINT/SIGTERM",
    )
    add_bridge_options(bridge)

    topics = _command(cmds, "topics", [common], "list the topic registry")
    topics.add_argument("--json", action="store_true", help="a JSON array, one object per topic")

    demo = _command(
        cmds,
        "demo",
        [_common("a private socket in a new temporary directory")],
        "agent + embedded broker + three collector processes, end to end",
    )
    demo.add_argument(
        "--count", type=int, default=20, metavar="N", help="items each scan task reports at most"
    )
    return top
