"""MQTT: Mosquitto (the Debian package) with paho-mqtt over its Unix socket listener.

Mosquitto 2.0 listens on a Unix socket with ``listener 0 /path/to/socket``; if
that fails the adapter falls back to TCP on 127.0.0.1 and says so in the
transport column. Every message is QoS 0 (at most once, like the other
systems); ``max_queued_messages`` is raised from 1,000 to 10,000, the bound of
this bus's per-subscriber queue in these runs (Mosquitto drops QoS 0 messages
for a client with that many packets waiting). Topics use ``/`` between
levels; ``+`` and ``#`` are MQTT's own.

paho-mqtt is driven by ``client.loop()`` in the worker's own thread (no
background network thread), which is paho's single-threaded style: a publish
then writes to the socket at once. Subscriptions are acknowledged (SUBACK), so
subscribers report "synced" once it arrived; a publisher's last message is
followed by one QoS 1 publish whose PUBACK marks the broker's having handled
everything before it (the equivalent of a flush).
"""

from __future__ import annotations

import os
import pwd
import struct
import time
from collections.abc import Callable, Sequence
from importlib.metadata import version
from typing import TYPE_CHECKING, Any, Final

from benchmarks.peers.base import (
    ECHO_TOPIC,
    IDLE_AFTER_PUBLISHERS,
    IDLE_TOPIC,
    PAYLOAD_BYTES,
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
    from paho.mqtt.client import Client, MQTTMessage

__all__ = ["ROLES", "MqttAdapter", "topic_name"]

#: Messages queued per client before QoS 0 messages are dropped (default 1000):
#: the same bound as this bus's per-subscriber queue in these runs.
MAX_QUEUED: Final = 10_000
#: Filters per SUBSCRIBE packet of a holder.
SUBSCRIBE_BATCH: Final = 200


def topic_name(levels: Sequence[str]) -> str:
    """A topic or filter in MQTT syntax."""
    return "/".join(levels)


class MqttAdapter(Adapter):
    name = "mqtt"
    label = "Mosquitto"
    module = "benchmarks.peers.mqtt_peer"

    def ensure(self, install: bool) -> str | None:
        return apt_install("mosquitto", "mosquitto", install) or pip_install("paho.mqtt", install)

    def versions(self) -> dict[str, str]:
        import subprocess

        binary = find_binary("mosquitto") or "mosquitto"
        out = subprocess.run(
            [binary, "-h"], capture_output=True, text=True, timeout=10, check=False
        )
        first = (out.stdout or out.stderr).strip().splitlines()[:1] or ["unknown"]
        return {
            "mosquitto": first[0].removeprefix("mosquitto version "),
            "paho-mqtt": version("paho-mqtt"),
        }

    def start_broker(self, workdir: str, options: BrokerOptions) -> BrokerProcess:
        try:
            return self._start(workdir, unix=True)
        except RuntimeError as exc:
            import sys

            print(
                f"mosquitto: Unix socket listener failed ({str(exc)[:200]}); "
                "falling back to TCP 127.0.0.1",
                file=sys.stderr,
                flush=True,
            )
            return self._start(workdir, unix=False)

    def _start(self, workdir: str, unix: bool) -> BrokerProcess:
        binary = find_binary("mosquitto") or "mosquitto"
        # stderr: mosquitto's stdout is block-buffered when it is a file.
        lines = [
            "allow_anonymous true",
            "persistence false",
            "log_dest stderr",
            f"max_queued_messages {MAX_QUEUED}",
        ]
        if unix:
            sock = os.path.join(workdir, "mosquitto.sock")
            lines.insert(0, f"listener 0 {sock}")
            endpoint, transport = f"unix:{sock}", "Unix socket"
        else:
            port = free_tcp_port()
            lines.insert(0, f"listener {port} 127.0.0.1")
            lines.append("set_tcp_nodelay true")
            endpoint, transport = f"tcp:127.0.0.1:{port}", "TCP 127.0.0.1 (Unix socket failed)"
        if os.geteuid() == 0:
            # Started as root, mosquitto drops to its own user before it binds:
            # that user needs the directory, and to pass through its parents.
            try:
                user = pwd.getpwnam("mosquitto")
            except KeyError:
                user = None
            if user is not None and _traversable(os.path.dirname(workdir)):
                os.chown(workdir, user.pw_uid, user.pw_gid)
            else:
                lines.append("user root")
        conf = os.path.join(workdir, "mosquitto.conf")
        with open(conf, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        broker = spawn_broker(
            [binary, "-c", conf],
            workdir,
            endpoint,
            transport,
            settings=[f"max_queued_messages {MAX_QUEUED}, QoS 0"],
            clean_exit_codes=frozenset({0, -15}),
        )
        try:
            wait_until(lambda: _accepts(endpoint), broker, 15.0)
        except BaseException:
            broker.stop()
            raise
        return broker


def _traversable(path: str) -> bool:
    """Whether every directory from ``path`` up to / lets other users through."""
    import stat

    path = os.path.abspath(path)
    while True:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


def _accepts(endpoint: str) -> bool:
    """Whether the broker accepts connections at ``endpoint`` yet."""
    import socket

    kind, _, where = endpoint.partition(":")
    try:
        if kind == "unix":
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(where)
        else:
            host, _, port = where.rpartition(":")
            with socket.create_connection((host, int(port)), timeout=1.0):
                pass
    except OSError:
        return False
    return True


# -- roles -------------------------------------------------------------------------------


def _client(endpoint: str, client_id: str) -> Client:
    """A connected paho client (CONNACK received), driven by ``loop()`` calls."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    kind, _, where = endpoint.partition(":")
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        transport="unix" if kind == "unix" else "tcp",
        reconnect_on_failure=False,
    )
    if kind == "unix":
        client.connect(where, keepalive=60)
    else:
        host, _, port = where.rpartition(":")
        client.connect(host, int(port), keepalive=60)
    return client


def _loop_until(client: Client, done: Callable[[], bool], ctl: Ctl, what: str) -> None:
    import paho.mqtt.client as mqtt

    while not done():
        if ctl.expired():
            raise TimeoutError(f"{what}: deadline passed")
        rc = client.loop(0.05)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"{what}: {mqtt.error_string(rc)}")


def _connected(endpoint: str, client_id: str, ctl: Ctl) -> Client:
    client = _client(endpoint, client_id)
    _loop_until(client, client.is_connected, ctl, "CONNACK")
    return client


def _subscribe(client: Client, filters: Sequence[str], ctl: Ctl) -> None:
    """Subscribe (QoS 0) and wait for every SUBACK."""
    count = [0, 0]  # SUBSCRIBE packets sent, SUBACKs received

    def on_subscribe(*args: Any) -> None:
        count[1] += 1

    client.on_subscribe = on_subscribe
    for start in range(0, len(filters), SUBSCRIBE_BATCH):
        chunk = filters[start : start + SUBSCRIBE_BATCH]
        client.subscribe([(f, 0) for f in chunk])
        count[0] += 1
        if count[0] - count[1] > 8:  # a few SUBSCRIBE packets in flight at a time
            _loop_until(client, lambda: count[0] - count[1] <= 4, ctl, "SUBACK")
    _loop_until(client, lambda: count[1] >= count[0], ctl, "SUBACK")


def _idle_loop(clients: Sequence[Client], ctl: Ctl) -> None:
    """Keep the connections alive (PINGREQ) until stop."""
    while not ctl.stop.wait(0.5) and not ctl.expired():
        for client in clients:
            client.loop(0)


def _flush(client: Client, ctl: Ctl) -> None:
    """Write what is queued, then a QoS 1 publish: its PUBACK ends the flush."""
    while client.want_write():
        client.loop(0.01)
    info = client.publish("bench/flush", b"", qos=1)
    _loop_until(client, info.is_published, ctl, "PUBACK")


def _pub(ctl: Ctl, endpoint: str, params: dict[str, Any]) -> dict[str, Any]:
    count: int = params["count"]
    client = _connected(endpoint, f"bench-pub-{ctl.index}", ctl)
    topic = topic_name(TOPIC)
    data = payload()
    publish = client.publish
    ctl.ready()
    ctl.wait_go()
    start_ns = time.perf_counter_ns()
    sent = 0
    for _ in range(count):
        publish(topic, data)
        sent += 1
        if sent % YIELD_EVERY == 0:
            while client.want_write():  # the socket is full: wait for it
                client.loop(0.01)
            if ctl.expired():
                break
    published_ns = time.perf_counter_ns()
    _flush(client, ctl)
    flushed_ns = time.perf_counter_ns()
    client.disconnect()
    return {
        "sent": sent,
        "start_ns": start_ns,
        "published_ns": published_ns,
        "flushed_ns": flushed_ns,
    }


def _sub(ctl: Ctl, endpoint: str, params: dict[str, Any]) -> dict[str, Any]:
    import paho.mqtt.client as mqtt

    expected: int = params["expected"]
    client = _connected(endpoint, f"bench-sub-{ctl.index}", ctl)
    count = first_ns = last_ns = 0

    def on_message(client: Client, userdata: Any, msg: MQTTMessage) -> None:
        nonlocal count, first_ns, last_ns
        if len(msg.payload) == PAYLOAD_BYTES:
            count += 1
            last_ns = time.perf_counter_ns()
            if not first_ns:
                first_ns = last_ns

    client.on_message = on_message
    _subscribe(client, [topic_name(params["filter"])], ctl)
    ctl.ready()
    ctl.synced()
    tracker = IdleTracker(ctl, IDLE_AFTER_PUBLISHERS)
    reason = "complete"
    loop = client.loop
    while count < expected:
        seen = count
        rc = loop(0.25)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            reason = f"connection: {mqtt.error_string(rc)}"
            break
        if count != seen:
            tracker.last_progress = last_ns
            continue
        stop = tracker.reason()
        if stop:
            reason = stop
            break
    client.disconnect()
    return {"received": count, "first_ns": first_ns, "last_ns": last_ns, "reason": reason}


def _stalled(ctl: Ctl, endpoint: str, params: dict[str, Any]) -> dict[str, Any]:
    client = _connected(endpoint, "bench-stalled", ctl)
    _subscribe(client, [topic_name(params["filter"])], ctl)
    ctl.ready()
    ctl.synced()
    ctl.wait_stop()  # loop() is never called again: the socket is not read
    connected = client.is_connected()
    client.disconnect()
    return {"stalled": True, "still_connected": connected}


def _holder(ctl: Ctl, endpoint: str, params: dict[str, Any]) -> dict[str, Any]:
    client = _connected(endpoint, f"bench-holder-{ctl.index}", ctl)
    filters = [topic_name(f) for f in params["filters"]]
    _subscribe(client, filters, ctl)
    ctl.ready(subscriptions=len(filters))
    ctl.synced()
    _idle_loop([client], ctl)
    client.disconnect()
    return {"subscriptions": len(filters)}


def _idle(ctl: Ctl, endpoint: str, params: dict[str, Any]) -> dict[str, Any]:
    n: int = params["clients"]
    clients = [_client(endpoint, f"bench-idle-{ctl.index}-{i}") for i in range(n)]
    for client in clients:
        _loop_until(client, client.is_connected, ctl, "CONNACK")
    for client in clients:
        _subscribe(client, [topic_name(IDLE_TOPIC)], ctl)
    ctl.ready(clients=n)
    _idle_loop(clients, ctl)
    connected = sum(c.is_connected() for c in clients)
    for client in clients:
        client.disconnect()
    return {"clients": n, "still_connected": connected}


def _echo(ctl: Ctl, endpoint: str, params: dict[str, Any]) -> dict[str, Any]:
    client = _connected(endpoint, "bench-echo", ctl)
    echo_topic = topic_name(ECHO_TOPIC)
    echoed = 0

    def on_message(client: Client, userdata: Any, msg: MQTTMessage) -> None:
        nonlocal echoed
        client.publish(echo_topic, msg.payload)  # written by the next loop()
        echoed += 1

    client.on_message = on_message
    _subscribe(client, [topic_name(TOPIC)], ctl)
    ctl.ready()
    ctl.synced()
    while not ctl.stop.is_set() and not ctl.expired():
        client.loop(0.1)
    client.disconnect()
    return {"echoed": echoed}


def _ping(ctl: Ctl, endpoint: str, params: dict[str, Any]) -> dict[str, Any]:
    count: int = params["count"]
    warmup: int = params["warmup"]
    client = _connected(endpoint, "bench-ping", ctl)
    echoes: list[bytes] = []

    def on_message(client: Client, userdata: Any, msg: MQTTMessage) -> None:
        echoes.append(bytes(msg.payload))

    client.on_message = on_message
    _subscribe(client, [topic_name(ECHO_TOPIC)], ctl)
    topic = topic_name(TOPIC)
    data = bytearray(payload())
    rtts: list[int] = []
    lost = stale = 0
    ctl.ready()
    ctl.wait_go()
    loop = client.loop
    start_ns = end_ns = time.perf_counter_ns()
    for i in range(warmup + count):
        if ctl.expired():
            break
        struct.pack_into(">Q", data, 0, i)
        t0 = time.perf_counter_ns()
        client.publish(topic, bytes(data))
        limit = t0 + 2_000_000_000
        while True:
            while not echoes and time.perf_counter_ns() < limit:
                loop(0.05)
            if not echoes:
                lost += 1
                break
            t1 = time.perf_counter_ns()
            echo = echoes.pop(0)
            if struct.unpack_from(">Q", echo)[0] == i:
                if i >= warmup:
                    rtts.append(t1 - t0)
                break
            stale += 1
        end_ns = time.perf_counter_ns()
    client.disconnect()
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
