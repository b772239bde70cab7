"""``daemoneye-eventbus bridge``: this host's bus to a NATS JetStream cluster.

Runs a :class:`~daemoneye_eventbus.bridge.runner.Bridge` until SIGINT or
SIGTERM (then it closes cleanly: what it received is in the spool, what it
sent is acknowledged or will be sent again; exit 0), or until the bridge
stops on an error (exit 1 with the message). Its first line on stdout says
what it bridges; with ``--metrics-listen`` the second says where its
Prometheus metrics are (:mod:`daemoneye_eventbus.bridge.metrics`).

NATS being away is not an error: the bridge starts, spools, and connects
when NATS is there. A configuration the bridge refuses
(:class:`~daemoneye_eventbus.bridge.config.BridgeConfigError`: a bad host id,
a control topic to forward, options that do not go together, a secret or TLS
file that cannot be read, nats-py not installed) exits 2; a spool that cannot
be used, or a local broker that cannot be reached, exits 1 (the CLI's
conventions, :mod:`daemoneye_eventbus.cli`). The command line is declared
here (:func:`add_bridge_options`), for :func:`daemoneye_eventbus.cli_args.parser`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from daemoneye_eventbus.bridge.config import (
    DEFAULT_STREAM,
    BridgeConfig,
    BridgeConfigError,
    NatsOptions,
)
from daemoneye_eventbus.errors import EventBusError
from daemoneye_eventbus.runtime import running_loop_name, stop_on_signals
from daemoneye_eventbus.transports import default_address

if TYPE_CHECKING:  # nats-py and prometheus_client: loaded by the command alone
    from daemoneye_eventbus.bridge.runner import Bridge
    from daemoneye_eventbus.metrics import MetricsServer

__all__ = [
    "DEFAULT_FORWARD",
    "DEFAULT_NATS",
    "add_bridge_options",
    "bridge",
    "bridge_config",
    "metrics_listen",
    "default_spool_path",
]

#: The NATS server unless ``--nats`` names others.
DEFAULT_NATS: Final = "nats://127.0.0.1:4222"
#: What is forwarded unless ``--forward`` says otherwise.
DEFAULT_FORWARD: Final = "events.#"
#: Where the default spool is, as the help shows it.
_SPOOL_HELP: Final = (
    "/var/lib/daemoneye/bridge-HOST.spool as root; otherwise "
    "$XDG_STATE_HOME/daemoneye/bridge-HOST.spool ($XDG_STATE_HOME defaults to "
    "~/.local/state); on Windows %%LOCALAPPDATA%%\\DaemonEye\\bridge-HOST.spool"
)


def default_spool_path(host_id: str) -> str:
    """The spool of ``host_id`` when ``--spool`` is not given: a file of its own per host."""
    name = f"bridge-{host_id}.spool"
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return str(Path(base) / "DaemonEye" / name)
    if os.geteuid() == 0:
        return f"/var/lib/daemoneye/{name}"
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(state) / "daemoneye" / name)


# -- the command line ---------------------------------------------------------------------


def metrics_listen(text: str) -> str:
    """``--metrics-listen`` of ``serve`` and ``bridge``: ``HOST:PORT`` or a Unix
    socket path, checked (serve_metrics parses it again)."""
    from daemoneye_eventbus.metrics import listen_address  # imports prometheus_client

    try:
        listen_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_bridge_options(bridge: argparse.ArgumentParser) -> None:
    """The options of ``bridge`` (``--socket``, ``--instance`` and ``-v`` come from
    the options every command takes)."""
    d = BridgeConfig(host_id="-", spool_path="-")
    bridge.add_argument(
        "--host-id",
        required=True,
        metavar="ID",
        help="this host's id in the NATS subjects (daemoneye.ID.…): 1 to 64 of A-Z a-z 0-9 "
        "_ -, not 'all'",
    )
    nats = bridge.add_argument_group("NATS")
    nats.add_argument(
        "--nats",
        action="append",
        metavar="URL",
        help=f"a NATS server, nats:// or tls:// (repeat for a cluster; default: {DEFAULT_NATS})",
    )
    nats.add_argument(
        "--max-in-flight",
        type=int,
        default=d.max_in_flight,
        metavar="N",
        help="events sent to JetStream and not yet acknowledged, at most",
    )
    nats.add_argument(
        "--ack-timeout",
        type=float,
        default=d.ack_timeout,
        metavar="SECONDS",
        help="seconds to wait for JetStream's acknowledgement before sending again",
    )
    nats.add_argument(
        "--at-most-once",
        action="store_true",
        help="subscribe to the local bus at most once: the broker drops events when the "
        "bridge falls behind (default: lossless, the broker holds the publishers instead)",
    )
    nats.add_argument(
        "--window",
        type=int,
        default=d.window,
        metavar="EVENTS",
        help="lossless: events the broker may send ahead of what the bridge has spooled, "
        "at most (what a killed bridge can lose)",
    )
    what = bridge.add_argument_group("what is forwarded")
    what.add_argument(
        "--forward",
        action="append",
        metavar="FILTER",
        help=f"a bus topic filter whose events go to NATS, as daemoneye.HOST.TOPIC (repeat "
        f"for more; not control topics; default: {DEFAULT_FORWARD})",
    )
    what.add_argument(
        "--control",
        action="store_true",
        help="also carry the fleet's control messages (daemoneye.HOST.control.> and "
        "daemoneye.all.control.>) to the local bus; the broker's policy must let the "
        "'bridge' component publish them",
    )
    what.add_argument(
        "--request-timeout",
        type=float,
        default=d.request_timeout,
        metavar="SECONDS",
        help="with --control: seconds a fleet request waits for the local responder when "
        "it asks for no deadline",
    )
    what.add_argument(
        "--max-request-timeout",
        type=float,
        default=d.max_request_timeout,
        metavar="SECONDS",
        help="with --control: longest deadline a fleet request may ask for, in seconds",
    )
    spool = bridge.add_argument_group("the spool (events not yet acknowledged by JetStream)")
    spool.add_argument(
        "--spool",
        metavar="PATH",
        help=f"the spool file, one per bridge (default: {_SPOOL_HELP}; its directory is "
        "created, mode 0700, if missing)",
    )
    spool.add_argument(
        "--spool-max-events",
        type=int,
        default=d.spool_max_events,
        metavar="EVENTS",
        help="events the spool holds at most; beyond, the oldest events are dropped",
    )
    spool.add_argument(
        "--spool-max-bytes",
        type=int,
        default=d.spool_max_bytes,
        metavar="BYTES",
        help="bytes the spool's events take at most; beyond, the oldest events are dropped",
    )
    stream = bridge.add_argument_group("the JetStream stream")
    stream.add_argument(
        "--stream", default=DEFAULT_STREAM, metavar="NAME", help="the stream's name"
    )
    stream.add_argument(
        "--stream-subject",
        action="append",
        metavar="SUBJECT",
        help="a subject of the stream, when the bridge creates it (repeat for more; "
        "default: the forwarded subjects with any host in place of this one, e.g. "
        "daemoneye.*.events and daemoneye.*.events.>)",
    )
    stream.add_argument(
        "--no-create-stream",
        action="store_true",
        help="refuse to run if the stream does not exist (default: create it)",
    )
    stream.add_argument(
        "--max-age",
        type=float,
        default=d.max_age,
        metavar="SECONDS",
        help="seconds a created stream keeps an event; 0: no limit (default: 604800.0, a week)",
    )
    stream.add_argument(
        "--stream-max-bytes",
        type=int,
        default=d.stream_max_bytes,
        metavar="BYTES",
        help="bytes a created stream holds, the oldest events going first; -1: no limit",
    )
    stream.add_argument(
        "--duplicate-window",
        type=float,
        default=d.duplicate_window,
        metavar="SECONDS",
        help="seconds in which JetStream drops a re-sent copy of an event (by its Nats-Msg-Id)",
    )
    stream.add_argument(
        "--replicas",
        type=int,
        default=d.replicas,
        metavar="N",
        help="copies of a created stream in the cluster (servers)",
    )
    security = bridge.add_argument_group(
        "NATS security (secrets in files, never on the command line)"
    )
    for flag, metavar, text in (
        ("--nats-creds", "FILE", "a NATS credentials file (user JWT and nkey seed)"),
        ("--nats-nkey", "FILE", "a file holding an nkey seed"),
        ("--nats-token-file", "FILE", "a file holding a token"),
        ("--nats-user", "USER", "a user name (with --nats-password-file)"),
        ("--nats-password-file", "FILE", "a file holding the password of --nats-user"),
        ("--nats-tls-ca", "FILE", "CA certificates (PEM) to verify the server with"),
        ("--nats-tls-cert", "FILE", "a client certificate (PEM), with --nats-tls-key"),
        ("--nats-tls-key", "FILE", "the client certificate's private key (PEM)"),
        (
            "--nats-tls-hostname",
            "NAME",
            "the name to verify the server's certificate against (default: the URL's host)",
        ),
    ):
        security.add_argument(flag, metavar=metavar, help=text)
    bridge.add_argument(
        "--metrics-listen",
        type=metrics_listen,
        metavar="HOST:PORT|PATH",
        help="serve the bridge's Prometheus metrics over HTTP on HOST:PORT (e.g. "
        "127.0.0.1:9465), or on a Unix socket at PATH (any value with a '/', mode 0600) "
        "(default: off)",
    )


def bridge_config(args: argparse.Namespace) -> BridgeConfig:
    """The bridge's configuration from the command line (not checked yet)."""
    nats = NatsOptions(
        servers=tuple(args.nats or (DEFAULT_NATS,)),
        name=f"daemoneye-eventbus-bridge-{args.host_id}",
        credentials=args.nats_creds,
        nkey_seed=args.nats_nkey,
        token_file=args.nats_token_file,
        user=args.nats_user,
        password_file=args.nats_password_file,
        tls_ca=args.nats_tls_ca,
        tls_cert=args.nats_tls_cert,
        tls_key=args.nats_tls_key,
        tls_hostname=args.nats_tls_hostname,
    )
    return BridgeConfig(
        host_id=args.host_id,
        spool_path=args.spool or default_spool_path(args.host_id),
        nats=nats,
        broker_address=args.socket or default_address(args.instance),
        forward=tuple(args.forward or (DEFAULT_FORWARD,)),
        control=args.control,
        lossless=not args.at_most_once,
        window=args.window,
        stream=args.stream,
        stream_subjects=tuple(args.stream_subject) if args.stream_subject else None,
        create_stream=not args.no_create_stream,
        max_age=args.max_age,
        stream_max_bytes=args.stream_max_bytes,
        duplicate_window=args.duplicate_window,
        replicas=args.replicas,
        spool_max_events=args.spool_max_events,
        spool_max_bytes=args.spool_max_bytes,
        max_in_flight=args.max_in_flight,
        ack_timeout=args.ack_timeout,
        request_timeout=args.request_timeout,
        max_request_timeout=args.max_request_timeout,
    )


# -- running ------------------------------------------------------------------------------


def _make_spool_directory(path: str) -> None:
    """Create the directory of the default spool (only readable by this user)."""
    from daemoneye_eventbus.bridge.spool import SpoolError  # sqlite3: only for the bridge

    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise SpoolError(
            f"cannot create {directory} for the spool: {exc.strerror} (give --spool PATH)"
        ) from None


def _started_line(config: BridgeConfig, depth: int) -> str:
    control = ", carrying the fleet's control messages" if config.control else ""
    return (
        f"daemoneye-eventbus bridge for host {config.host_id}: bus {config.broker_address} -> "
        f"NATS {', '.join(config.nats.servers)}, forwarding {', '.join(config.forward)} to "
        f"stream {config.stream}{control}; spool {config.spool_path} ({depth} events waiting) "
        f"(loop {running_loop_name()})"
    )


def bridge(args: argparse.Namespace) -> Coroutine[Any, Any, int]:
    """The ``bridge`` command: check the configuration and load the bridge's
    modules (nats-py, prometheus_client) now, before the event loop runs (a
    configuration error raises here); the coroutine runs the bridge."""
    config = bridge_config(args)
    config.check()
    try:
        from daemoneye_eventbus.bridge.metrics import bridge_registry
        from daemoneye_eventbus.bridge.runner import Bridge
    except ModuleNotFoundError as exc:  # nats-py: the 'bridge' extra
        if (exc.name or "").split(".")[0] != "nats":
            raise
        raise BridgeConfigError(
            "the bridge needs nats-py: pip install 'daemoneye-eventbus[bridge]'"
        ) from None
    from daemoneye_eventbus.metrics import serve_metrics

    if args.spool is None:
        _make_spool_directory(config.spool_path)
    runner = Bridge(config)
    listen: str | None = args.metrics_listen

    def serve() -> MetricsServer | None:
        return None if listen is None else serve_metrics(listen, bridge_registry(runner))

    return _run(config, runner, serve)


async def _run(
    config: BridgeConfig, runner: Bridge, serve: Callable[[], MetricsServer | None]
) -> int:
    """Run the bridge until SIGINT or SIGTERM (0), or until it stops on an error (raises)."""
    stop = asyncio.Event()
    restore = stop_on_signals(stop.set)
    try:
        await runner.start()  # closes the bridge again if it raises
        metrics = None
        try:
            metrics = serve()
            print(_started_line(config, runner.statistics().spool_depth), flush=True)
            if metrics is not None:
                print(f"daemoneye-eventbus bridge metrics on {metrics.url}", flush=True)
            await _until_stopped(runner.wait(), stop)
        finally:
            if metrics is not None:
                # In a thread: the loop keeps answering a scrape in flight, which
                # the server's close waits for.
                await asyncio.to_thread(metrics.close)
            await runner.close()
    finally:
        restore()
    stats = runner.statistics()
    print(
        f"bridge stopped: {stats.received} received, {stats.acknowledged} acknowledged by "
        f"JetStream, {stats.spool_depth} left in the spool",
        flush=True,
    )
    return 0


async def _until_stopped(wait: Coroutine[Any, Any, None], stop: asyncio.Event) -> None:
    """Wait for ``stop``, or for ``wait`` (the bridge's) to end (its error raised)."""
    loop = asyncio.get_running_loop()
    stopping = loop.create_task(stop.wait())
    waiting = loop.create_task(wait)
    try:
        await asyncio.wait({stopping, waiting}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (stopping, waiting):
            task.cancel()
    if not waiting.done() or waiting.cancelled():
        return
    exc = waiting.exception()
    if exc is None or isinstance(exc, EventBusError | OSError):
        waiting.result()  # None, or the error as it is: the CLI prints it
        return
    raise EventBusError(f"the bridge stopped: {exc or type(exc).__name__}") from exc
