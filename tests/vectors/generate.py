"""Generate the shared wire vectors in ``tests/vectors/`` (deterministic).

Each vector is one frame exactly as it travels on the socket: ``<name>.bin``
holds the bytes, length prefix included [protocol §1]; ``<name>.json``
describes it: the frame kind, the bytes in hex, the frame in protobuf's JSON
mapping and, for ``publish`` and ``deliver``, the decoded payload in the JSON
mapping too. Every member of ``Frame.kind`` has at least one vector.

The bytes are the protobuf encoding with fields in field-number order and map
entries sorted by key (``deterministic=True``), which protobuf-es reproduces
when it re-encodes a decoded frame. Map keys are never integer-like strings,
whose order JavaScript objects would change.

Run from the repository root::

    .venv/bin/python tests/vectors/generate.py          # rewrite the vectors
    .venv/bin/python tests/vectors/generate.py --check  # fail if they are stale
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from daemoneye.eventbus.v1 import control_pb2, events_pb2, frames_pb2
from daemoneye.eventbus.v1.correlation_pb2 import (
    CorrelationFilter,
    CorrelationMetadata,
    SequenceRange,
)
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode, Frame

__all__ = ["HERE", "Vector", "main", "render", "vectors"]

#: The directory of the committed vectors.
HERE = Path(__file__).resolve().parent

UINT64_MAX = 2**64 - 1


@dataclass(frozen=True)
class Vector:
    """One frame and what it shows."""

    name: str
    description: str
    frame: Frame
    #: The payload message of a publish or deliver, shown decoded in the JSON.
    payload: Message | None = None


def _ts(seconds: int, nanos: int = 0) -> Timestamp:
    return Timestamp(seconds=seconds, nanos=nanos)


def _process_event() -> events_pb2.ProcessEvent:
    return events_pb2.ProcessEvent(
        pid=4242,
        name="sshd",
        command_line="/usr/sbin/sshd -D -o 'Banner none'",
        executable_path="/usr/sbin/sshd",
        ppid=1,
        start_time=_ts(1714564800),
        metadata={"cgroup": "system.slice/ssh.service", "container": ""},
        kind=events_pb2.PROCESS_EVENT_KIND_START,
        user_id=0,
        cpu_usage_percent=12.5,
        memory_rss_bytes=7_340_032,
        executable_hash=bytes(range(32)),
        hash_algorithm=events_pb2.HASH_ALGORITHM_SHA256,
        integrity_verified=True,
        exit_code=-1,
        observed_at=_ts(1714564801, 500_000_000),
    )


def _network_event() -> events_pb2.NetworkEvent:
    return events_pb2.NetworkEvent(
        kind=events_pb2.NETWORK_EVENT_KIND_CONNECT,
        protocol=events_pb2.NETWORK_PROTOCOL_TCP,
        local_address="10.0.0.5",
        local_port=51234,
        remote_address="2001:db8::1",
        remote_port=443,
        pid=4242,
        bytes_sent=UINT64_MAX,
        observed_at=_ts(1714564802, 123_456_789),
        metadata={"iface": "eth0", "résumé": "naïve ✓"},
    )


def _correlation() -> CorrelationMetadata:
    return CorrelationMetadata(
        correlation_id="c-0002",
        parent_correlation_id="c-0001",
        root_correlation_id="c-0001",
        workflow_stage="enrichment",
        tags={"host": "web-1", "rule": "r-7"},
        sequence_number=3,
        created_at=_ts(1714564800, 1_000),
    )


def _health_request() -> control_pb2.HealthCheckRequest:
    return control_pb2.HealthCheckRequest(component_id="procmond-1")


def _health_reply() -> control_pb2.HealthCheckReply:
    return control_pb2.HealthCheckReply(
        status=control_pb2.RPC_STATUS_SUCCESS,
        component=control_pb2.ComponentStatus(
            component_id="procmond-1", state=control_pb2.HEALTH_STATE_HEALTHY
        ),
    )


def _publish(
    topic: str, payload: Message, correlation: CorrelationMetadata | None
) -> frames_pb2.Publish:
    publish = frames_pb2.Publish(
        topic=topic,
        payload_type=payload.DESCRIPTOR.full_name,
        payload=payload.SerializeToString(deterministic=True),
    )
    if correlation is not None:
        publish.correlation.CopyFrom(correlation)
    return publish


def vectors() -> list[Vector]:
    """Every vector, in a fixed order."""
    process = _process_event()
    gone = control_pb2.ComponentStatus(
        component_id="procmond-1", state=control_pb2.HEALTH_STATE_UNHEALTHY, message="gone"
    )
    network = _network_event()
    status = control_pb2.ComponentStatus(
        component_id="procmond-1", state=control_pb2.HEALTH_STATE_HEALTHY
    )
    return [
        Vector(
            "hello",
            "Client handshake claiming component procmond (the worked example of protocol §3).",
            Frame(
                hello=frames_pb2.Hello(
                    protocol_version=1, client_name="procmond", component="procmond"
                )
            ),
        ),
        Vector(
            "hello_anonymous",
            "Client handshake of an anonymous client (no component claim).",
            Frame(hello=frames_pb2.Hello(protocol_version=1, client_name="ts-cli")),
        ),
        Vector(
            "hello_last_will",
            "Client handshake of procmond with a last will: the ComponentStatus the broker "
            "publishes on control.health.status for it if its connection ends without a "
            'goodbye (protocol §3, §5 "Presence and last will").',
            Frame(
                hello=frames_pb2.Hello(
                    protocol_version=1,
                    client_name="procmond",
                    component="procmond",
                    accept_batches=True,
                    credit=True,
                    last_will=_publish("control.health.status", gone, None),
                )
            ),
        ),
        Vector(
            "welcome",
            "Broker answer with the default limits (the worked example of protocol §3).",
            Frame(
                welcome=frames_pb2.Welcome(
                    protocol_version=1,
                    session_id="0123456789abcdef",
                    limits=frames_pb2.Limits(
                        max_frame_bytes=1_048_576,
                        max_topic_bytes=255,
                        max_topic_levels=16,
                        max_subscriptions=1024,
                        max_queue_messages=1000,
                        max_queue_bytes=8_388_608,
                        heartbeat_interval_ms=5000,
                        idle_timeout_ms=15000,
                        max_pending_requests=1024,
                        max_request_timeout_ms=300_000,
                        default_request_timeout_ms=5000,
                    ),
                    component="procmond",
                    batches=True,
                    requests=True,
                )
            ),
        ),
        Vector(
            "publish",
            "A ProcessEvent on events.process.lifecycle, without correlation metadata.",
            Frame(publish=_publish("events.process.lifecycle", process, None)),
            process,
        ),
        Vector(
            "publish_correlation",
            "A NetworkEvent on events.network.connections with correlation metadata "
            "(parent, stage, tags, sequence number); non-ASCII strings; a 2-byte prefix.",
            Frame(publish=_publish("events.network.connections", network, _correlation())),
            network,
        ),
        Vector(
            "deliver",
            "The broker delivers the correlated ProcessEvent to subscription 7, sequence 42.",
            Frame(
                deliver=frames_pb2.Deliver(
                    subscription_id=7,
                    sequence=42,
                    publish=_publish("events.process.lifecycle", process, _correlation()),
                )
            ),
            process,
        ),
        Vector(
            "publish_batch",
            "Three ProcessEvents on events.process.lifecycle in one batch, sharing "
            "correlation metadata.",
            Frame(
                publish_batch=frames_pb2.PublishBatch(
                    topic="events.process.lifecycle",
                    correlation=_correlation(),
                    payload_type="daemoneye.eventbus.v1.ProcessEvent",
                    payloads=[process.SerializeToString(deterministic=True), b"", b"\x08\x01"],
                )
            ),
        ),
        Vector(
            "deliver_batch",
            "The broker delivers two ProcessEvents to subscription 7 as sequences 42 and "
            "43; the frame tag is two bytes (field 16).",
            Frame(
                deliver_batch=frames_pb2.DeliverBatch(
                    subscription_id=7,
                    first_sequence=42,
                    batch=frames_pb2.PublishBatch(
                        topic="events.process.lifecycle",
                        payload_type="daemoneye.eventbus.v1.ProcessEvent",
                        payloads=[process.SerializeToString(deterministic=True), b"\x08\x02"],
                    ),
                )
            ),
        ),
        Vector(
            "deliver_stamped",
            "The delivery of a broker that stamps events: event id 1000 (the same for "
            "every subscriber of the event) and its receive time, 2026-01-02T03:04:05.000000006Z "
            "in nanoseconds since the Unix epoch (fixed64).",
            Frame(
                deliver=frames_pb2.Deliver(
                    subscription_id=7,
                    sequence=42,
                    publish=_publish("events.process.lifecycle", process, _correlation()),
                    event_id=1000,
                    received_at_ns=1767323045000000006,
                )
            ),
            process,
        ),
        Vector(
            "deliver_retained",
            "The retained event of control.health.status (procmond-1 is healthy), "
            "delivered first to a new subscription (sequence 1) and marked retained; it "
            "keeps the id and receive time the broker gave it when it was published.",
            Frame(
                deliver=frames_pb2.Deliver(
                    subscription_id=3,
                    sequence=1,
                    publish=frames_pb2.Publish(
                        topic="control.health.status",
                        payload_type="daemoneye.eventbus.v1.ComponentStatus",
                        payload=status.SerializeToString(deterministic=True),
                    ),
                    event_id=17,
                    received_at_ns=1767323045000000006,
                    retained=True,
                )
            ),
            status,
        ),
        Vector(
            "deliver_batch_stamped",
            "Two ProcessEvents for subscription 7 as sequences 42 and 43, with event ids "
            "1000 and 1001 (first_event_id; the next event has the next id) and their "
            "receive time.",
            Frame(
                deliver_batch=frames_pb2.DeliverBatch(
                    subscription_id=7,
                    first_sequence=42,
                    batch=frames_pb2.PublishBatch(
                        topic="events.process.lifecycle",
                        payload_type="daemoneye.eventbus.v1.ProcessEvent",
                        payloads=[process.SerializeToString(deterministic=True), b"\x08\x02"],
                    ),
                    first_event_id=1000,
                    received_at_ns=1767323045000000006,
                )
            ),
        ),
        Vector(
            "subscribe",
            "Subscription 1 to events.process.# with a correlation filter.",
            Frame(
                subscribe=frames_pb2.Subscribe(
                    subscription_id=1,
                    filter="events.process.#",
                    correlation_filter=CorrelationFilter(
                        correlation_id_patterns=["c-*"],
                        root_correlation_ids=["c-0001"],
                        workflow_stages=["detection", "enrichment"],
                        required_tags={"host": "web-1"},
                        sequence_range=SequenceRange(min=0, max=UINT64_MAX),
                    ),
                )
            ),
        ),
        Vector(
            "subscribe_control",
            "Subscription 2 to every topic, control topics included.",
            Frame(
                subscribe=frames_pb2.Subscribe(subscription_id=2, filter="#", include_control=True)
            ),
        ),
        Vector(
            "subscribe_ack",
            "The broker accepts subscription 1.",
            Frame(subscribe_ack=frames_pb2.SubscribeAck(subscription_id=1)),
        ),
        Vector(
            "unsubscribe",
            "End subscription 1.",
            Frame(unsubscribe=frames_pb2.Unsubscribe(subscription_id=1)),
        ),
        Vector(
            "unsubscribe_ack",
            "Subscription 1 has ended.",
            Frame(unsubscribe_ack=frames_pb2.UnsubscribeAck(subscription_id=1)),
        ),
        Vector("ping", "Heartbeat with nonce 1.", Frame(ping=frames_pb2.Ping(nonce=1))),
        Vector("pong", "Answer to ping 1.", Frame(pong=frames_pb2.Pong(nonce=1))),
        Vector(
            "ping_max_nonce",
            "A ping with the largest uint64 nonce (a string in the JSON mapping).",
            Frame(ping=frames_pb2.Ping(nonce=UINT64_MAX)),
        ),
        Vector(
            "error",
            "A non-fatal refusal of subscription 3 (access denied).",
            Frame(
                error=frames_pb2.Error(
                    code=ErrorCode.ERROR_CODE_ACCESS_DENIED,
                    message="filter 'events.#' matches no topic that an anonymous peer may read",
                    fatal=False,
                    subscription_id=3,
                    topic="events.#",
                )
            ),
        ),
        Vector(
            "error_fatal",
            "A fatal error: the broker closes the connection after it.",
            Frame(
                error=frames_pb2.Error(
                    code=ErrorCode.ERROR_CODE_IDLE_TIMEOUT,
                    message="no data for 15.0 s",
                    fatal=True,
                )
            ),
        ),
        Vector(
            "goodbye",
            "The sender is closing the connection.",
            Frame(goodbye=frames_pb2.Goodbye(reason="client closing ✓")),
        ),
        Vector(
            "subscribe_lossless",
            "Subscribe with lossless, credit-based delivery and a window of 500 events.",
            Frame(
                subscribe=frames_pb2.Subscribe(
                    subscription_id=2, filter="events.process.#", lossless=True, window=500
                )
            ),
        ),
        Vector(
            "subscribe_ack_credit",
            "The subscription is active and credit based, every event lossless.",
            Frame(
                subscribe_ack=frames_pb2.SubscribeAck(subscription_id=2, window=500, lossless=True)
            ),
        ),
        Vector(
            "credit",
            "The client took 125 events of subscription 2: the broker may send 125 more.",
            Frame(credit=frames_pb2.Credit(subscription_id=2, events=125)),
        ),
        Vector(
            "subscribe_respond",
            "Subscription 3 answers the health requests of every collector id "
            "(a responder subscription).",
            Frame(
                subscribe=frames_pb2.Subscribe(
                    subscription_id=3, filter="control.collector.rpc.health.+", respond=True
                )
            ),
        ),
        Vector(
            "request",
            "Request 1: ask collector procmond-1 for its health, waiting up to 2 s "
            '(the worked example of protocol §5, "Request/reply").',
            Frame(
                request=frames_pb2.Request(
                    request_id=1,
                    publish=_publish(
                        "control.collector.rpc.health.procmond-1", _health_request(), None
                    ),
                    timeout_ms=2000,
                )
            ),
        ),
        Vector(
            "request_deliver",
            "The broker gives request 1 to responder subscription 3 as token 7, with "
            "2000 ms left, its event id and receive time, and who asked.",
            Frame(
                request_deliver=frames_pb2.RequestDeliver(
                    subscription_id=3,
                    token=7,
                    publish=_publish(
                        "control.collector.rpc.health.procmond-1", _health_request(), None
                    ),
                    remaining_ms=2000,
                    event_id=42,
                    received_at_ns=1_714_564_800_123_456_789,
                    requester="daemoneye-agent",
                )
            ),
        ),
        Vector(
            "reply",
            "The responder answers token 7 with a HealthCheckReply.",
            Frame(
                reply=frames_pb2.Reply(
                    token=7,
                    payload_type="daemoneye.eventbus.v1.HealthCheckReply",
                    payload=_health_reply().SerializeToString(deterministic=True),
                )
            ),
        ),
        Vector(
            "reply_error",
            "The responder could not answer token 7: the reason, no payload.",
            Frame(reply=frames_pb2.Reply(token=7, error="collector is shutting down")),
        ),
        Vector(
            "reply_deliver",
            "The broker hands the reply to request 1 to its requester alone, naming the responder.",
            Frame(
                reply_deliver=frames_pb2.ReplyDeliver(
                    request_id=1,
                    payload_type="daemoneye.eventbus.v1.HealthCheckReply",
                    payload=_health_reply().SerializeToString(deterministic=True),
                    responder="procmond",
                )
            ),
        ),
        Vector(
            "error_request",
            "Request 1 got no reply by its deadline: a non-fatal error naming it.",
            Frame(
                error=frames_pb2.Error(
                    code=ErrorCode.ERROR_CODE_REQUEST_TIMEOUT,
                    message="no reply within 2000 ms",
                    fatal=False,
                    request_id=1,
                )
            ),
        ),
        Vector(
            "stats_request",
            "Ask for the broker's statistics.",
            Frame(stats_request=frames_pb2.StatsRequest(request_id=9)),
        ),
        Vector(
            "stats_response",
            "The broker's statistics with one connection and one subscription.",
            Frame(
                stats_response=frames_pb2.StatsResponse(
                    request_id=9,
                    connections=1,
                    connections_total=12,
                    published=1000,
                    delivered=998,
                    dropped=2,
                    refused=1,
                    connection_stats=[
                        frames_pb2.ConnectionStats(
                            session_id="0123456789abcdef",
                            client_name="agent",
                            component="daemoneye-agent",
                            peer_pid=4242,
                            peer_uid=0,
                            queue_messages=3,
                            queue_bytes=4096,
                            published=0,
                        )
                    ],
                    subscription_stats=[
                        frames_pb2.SubscriptionStats(
                            session_id="0123456789abcdef",
                            subscription_id=1,
                            filter="events.#",
                            delivered=998,
                            dropped=2,
                        )
                    ],
                    truncated=False,
                )
            ),
        ),
    ]


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode(frame: Frame) -> bytes:
    """The frame on the wire: varint length prefix and deterministic body."""
    body = frame.SerializeToString(deterministic=True)
    return _varint(len(body)) + body


def _sort_maps(descriptor: Any, value: dict[str, Any]) -> dict[str, Any]:
    """``value`` (a message in the JSON mapping) with the entries of every map sorted by key.

    The map order of ``MessageToDict`` follows the runtime's hash table, which
    changes from run to run.
    """
    for field in descriptor.fields:
        if field.json_name not in value or field.message_type is None:
            continue
        sub = field.message_type
        if sub.GetOptions().map_entry:
            inner = sub.fields_by_name["value"].message_type
            entries = sorted(value[field.json_name].items())
            if inner is not None and not inner.full_name.startswith("google.protobuf."):
                entries = [(k, _sort_maps(inner, v)) for k, v in entries]
            value[field.json_name] = dict(entries)
        elif not sub.full_name.startswith("google.protobuf."):
            if field.is_repeated:
                value[field.json_name] = [_sort_maps(sub, v) for v in value[field.json_name]]
            else:
                value[field.json_name] = _sort_maps(sub, value[field.json_name])
    return value


def to_json(message: Message) -> Any:
    """The protobuf JSON mapping of ``message`` (as a parsed JSON value), maps sorted by key."""
    return _sort_maps(message.DESCRIPTOR, json_format.MessageToDict(message))


def describe(vector: Vector) -> dict[str, Any]:
    """The JSON description of a vector."""
    data = encode(vector.frame)
    out: dict[str, Any] = {
        "name": vector.name,
        "description": vector.description,
        "kind": vector.frame.WhichOneof("kind"),
        "size": len(data),
        "hex": data.hex(),
        "frame": to_json(vector.frame),
    }
    if vector.payload is not None:
        out["payload"] = to_json(vector.payload)
    return out


def render() -> dict[str, bytes]:
    """Every file of the vectors directory that the generator owns, by name."""
    files: dict[str, bytes] = {}
    for vector in vectors():
        files[f"{vector.name}.bin"] = encode(vector.frame)
        text = json.dumps(describe(vector), indent=2, ensure_ascii=False) + "\n"
        files[f"{vector.name}.json"] = text.encode("utf-8")
    return files


def committed(directory: Path = HERE) -> dict[str, bytes]:
    """The committed vector files (``*.bin`` and ``*.json``) of ``directory``."""
    return {
        p.name: p.read_bytes()
        for pattern in ("*.bin", "*.json")
        for p in sorted(directory.glob(pattern))
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the files are stale")
    parser.add_argument("--out", type=Path, default=HERE, help="output directory")
    args = parser.parse_args(argv)
    fresh = render()
    if args.check:
        old = committed(args.out)
        stale = sorted(n for n in fresh.keys() | old.keys() if fresh.get(n) != old.get(n))
        if stale:
            print(f"stale wire vectors in {args.out}: {', '.join(stale)}", file=sys.stderr)
            return 1
        print(f"{len(fresh)} wire vector files in {args.out} are fresh")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for stale_file in committed(args.out).keys() - fresh.keys():
        (args.out / stale_file).unlink()
    for name, content in fresh.items():
        (args.out / name).write_bytes(content)
    print(f"wrote {len(fresh)} wire vector files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
