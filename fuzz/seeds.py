"""Seed corpora for the fuzz targets: ``python -m fuzz.seeds [DIR]`` (default fuzz/corpus).

Writes ``frames/*.bin`` (inputs of :mod:`fuzz.fuzz_frames`: one header byte,
then a client's byte stream) and ``session/*.bin`` (inputs of
:mod:`fuzz.fuzz_session`: three header bytes, then operations). Each seed is a
valid, meaningful conversation, so that fuzzing starts from the interesting
states (handshake done, subscriptions active, queues backed up) instead of
having to discover them. The files are rewritten identically on every run.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

from daemoneye.eventbus.v1 import events_pb2, frames_pb2, registry
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationFilter, CorrelationMetadata
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode, Frame
from daemoneye_eventbus.frames import encode_frame, encode_varint
from daemoneye_eventbus.protocol import PROTOCOL_VERSION
from fuzz.fuzz_session import OPS, TOPICS

__all__ = ["frame_seeds", "main", "session_seeds", "write_seeds"]

CORPUS = Path(__file__).resolve().parent / "corpus"


def _hello(component: str = "procmond", version: int = PROTOCOL_VERSION) -> bytes:
    hello = frames_pb2.Hello(protocol_version=version, client_name="seed", component=component)
    return encode_frame(Frame(hello=hello))


def _publish(pid: int = 1, topic: str = "events.process.lifecycle", corr: bool = False) -> bytes:
    event = events_pb2.ProcessEvent(pid=pid, name="sshd", ppid=1, command_line="/usr/sbin/sshd -D")
    publish = frames_pb2.Publish(
        topic=topic,
        payload_type="daemoneye.eventbus.v1.ProcessEvent",
        payload=event.SerializeToString(),
    )
    if corr:
        publish.correlation.CopyFrom(
            CorrelationMetadata(
                correlation_id="wf-1", root_correlation_id="wf-1", workflow_stage="s"
            )
        )
    return encode_frame(Frame(publish=publish))


def _batch(count: int, corr: bool = False) -> bytes:
    batch = frames_pb2.PublishBatch(
        topic="events.process.lifecycle",
        payload_type="daemoneye.eventbus.v1.ProcessEvent",
        payloads=[events_pb2.ProcessEvent(pid=pid).SerializeToString() for pid in range(count)],
    )
    if corr:
        batch.correlation.CopyFrom(
            CorrelationMetadata(correlation_id="wf-2", root_correlation_id="wf-2")
        )
    return encode_frame(Frame(publish_batch=batch))


def _subscribe(sid: int, flt: str, corr: bool = False, control: bool = False) -> bytes:
    sub = frames_pb2.Subscribe(subscription_id=sid, filter=flt, include_control=control)
    if corr:
        sub.correlation_filter.CopyFrom(
            CorrelationFilter(correlation_id_patterns=["wf-*"], workflow_stages=["s"])
        )
    return encode_frame(Frame(subscribe=sub))


def _frame(**kind: object) -> bytes:
    return encode_frame(Frame(**kind))  # type: ignore[arg-type]


PING = _frame(ping=frames_pb2.Ping(nonce=7))
PONG = _frame(pong=frames_pb2.Pong(nonce=1))
STATS = _frame(stats_request=frames_pb2.StatsRequest(request_id=3))
GOODBYE = _frame(goodbye=frames_pb2.Goodbye(reason="done"))
UNSUBSCRIBE = _frame(unsubscribe=frames_pb2.Unsubscribe(subscription_id=1))
ERROR = _frame(
    error=frames_pb2.Error(
        code=ErrorCode.ERROR_CODE_INVALID_TOPIC, message="client error", fatal=False
    )
)


def frame_seeds() -> dict[str, bytes]:
    """Inputs of fuzz_frames: header byte 0 (no split points, default limits) + stream."""
    streams = {
        "hello": _hello(),
        "hello_goodbye": _hello() + GOODBYE,
        "hello_split": _hello(),  # below, with split points
        "publish": _publish(),
        "publish_correlation": _publish(2, corr=True),
        "subscribe_publish_unsubscribe": _subscribe(1, "events.process.#")
        + _publish()
        + UNSUBSCRIBE,
        "subscribe_correlation": _subscribe(2, "control.#", corr=True, control=True),
        "ping_pong_stats": PING + PONG + STATS,
        "error_goodbye": ERROR + GOODBYE,
        "non_minimal_prefix": b"\x85\x80\x80\x00" + _frame(ping=frames_pb2.Ping(nonce=1))[1:],
        "prefix_too_long": b"\xff\xff\xff\xff\xff\x01",
        "length_over_limit": encode_varint(1 << 21) + b"\x0a",
        "empty_frame": b"\x00",
        "unknown_field_only": b"\x03\xa8\x06\x01",
        "bad_utf8": b"\x06\x0a\x04\x12\x02\xff\xfe",
        "deliver_from_client": _frame(
            deliver=frames_pb2.Deliver(subscription_id=1, sequence=1, publish=frames_pb2.Publish())
        ),
        "publish_batch": _batch(3),
        "publish_batch_empty": _batch(0),
    }
    seeds = {name: b"\x00" + stream for name, stream in streams.items()}
    # The Hello split at every interesting place: inside the prefix and the body.
    seeds["hello_split"] = b"\x03\x01\x02\x05" + _hello()
    # Small limits (max_frame_bytes 64): frames over the limit after the handshake.
    seeds["publish_small_limit"] = b"\x30" + _publish() + PING
    return seeds


def _op(name: str, slot: int = 0) -> bytes:
    index = next(i for i, op in enumerate(OPS) if op.name == name)
    return bytes((index | (0x80 if slot else 0),))


def _blob(data: bytes) -> bytes:
    if len(data) < 0x80:
        return bytes((len(data),)) + data
    if len(data) >= 1 << 15:
        raise ValueError("blob too long for a seed")
    return bytes((0x80 | (len(data) >> 8), len(data) & 0xFF)) + data


def _data(stream: bytes, slot: int = 0) -> bytes:
    return _op("data", slot) + _blob(stream)


def _header(selector: int = 0, peers: int = 0, claims: int = 0) -> bytes:
    return bytes((selector, peers, claims))


def _frame_publish_op(slot: int = 0, topic_index: int = 0, payload: bytes = b"\x08\x01") -> bytes:
    """A "frame" operation that builds a Publish from the grammar of build_frame."""
    return _op("frame", slot) + bytes((0, 0, topic_index)) + _blob(payload)


def session_seeds() -> dict[str, bytes]:
    """Inputs of fuzz_session: header + operations (A is slot 0, B slot 1)."""
    lifecycle = TOPICS.index(registry.EVENTS_PROCESS_LIFECYCLE.name)
    many = b"".join(_publish(i) for i in range(20))
    seeds: dict[str, bytes] = {
        # A (procmond) publishes, B (agent, subscribed to events.process.#) receives.
        "publish_deliver": _header() + _data(_publish()) + _op("stats"),
        "frame_publish": _header() + _frame_publish_op(0, lifecycle),
        # A publishes batches: B takes them whole, then one empty batch is refused.
        "publish_batches": _header()
        + _data(_batch(5) + _publish(6) + _batch(4, corr=True))
        + _data(_batch(0))
        + _op("stats"),
        "subscribe_unsubscribe": _header()
        + _data(_subscribe(2, "events.+.lifecycle", corr=True), 1)
        + _data(_publish(corr=True))
        + _data(_frame(unsubscribe=frames_pb2.Unsubscribe(subscription_id=2)), 1),
        # B's socket backs up, A floods, B is a slow consumer.
        "backed_up_slow_consumer": _header(0x08)
        + _op("back_up", 1)
        + _data(many)
        + _op("tick")
        + bytes((120,))
        + _op("drain", 1),
        "backed_up_then_drained": _header()
        + _op("back_up", 1)
        + _data(many)
        + _op("drain", 1)
        + _data(PING, 1),
        # In-process subscriber and publisher.
        "local_subscribe_publish": _header()
        + _op("local_subscribe")
        + bytes((0, 0))
        + _data(_publish())
        + _op("local_read")
        + bytes((5,))
        + _op("local_publish")
        + bytes((0, lifecycle))
        + _blob(b"\x08\x02"),
        # Handshakes: refused claims, unknown credentials, a slow Hello, timeouts.
        "claim_refused": _header(0, 0x01, 0) + _op("stats"),
        "anonymous_only": _header(0x02, 0x05, 0x22),
        "slow_hello": _header(0, 0, 0x08)
        + b"".join(_data(_hello()[i : i + 4]) for i in range(0, 12, 4))
        + _op("tick")
        + bytes((30,)),
        "bad_version": _header(0, 0, 0x08) + _data(_hello(version=2)),
        "pipelined_before_welcome": _header(0, 0, 0x08) + _data(_hello() + _publish()),
        # Heartbeats and idle peers, end of file, resets, reconnects, shutdown.
        "heartbeat_idle": _header() + _op("tick") + bytes((60,)) + _op("tick") + bytes((120,)),
        "eof_reconnect": _header() + _op("eof", 1) + _op("reconnect", 1) + bytes((0x04,)),
        "reset_reconnect": _header() + _op("reset") + _op("reconnect") + bytes((0,)),
        "shutdown_goodbye": _header() + _data(_publish()) + _op("goodbye", 1) + _op("goodbye"),
        "client_goodbye": _header() + _data(_publish() + GOODBYE) + _data(PING),
        # Limits: a connection limit of 2 and one per uid, few subscriptions.
        "connection_limit": _header(0x30) + _op("reset") + _op("reconnect") + bytes((0,)),
        "subscription_limit": _header(0x08)
        + _data(b"".join(_subscribe(i, "events.process.#") for i in range(2, 7)), 1),
        "undeclared_topics": _header(0x04)
        + _data(_subscribe(2, "events.undeclared.#"), 1)
        + _data(_publish(topic="events.undeclared.thing")),
        "ping_stats_error": _header() + _data(PING + STATS + ERROR, 1),
    }
    return seeds


def _write(directory: Path, seeds: dict[str, bytes]) -> Iterable[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in sorted(seeds.items()):
        path = directory / f"{name}.bin"
        path.write_bytes(data)
        yield path


def write_seeds(root: Path = CORPUS) -> list[Path]:
    """Write both seed corpora under ``root``; return the files written."""
    return [
        *_write(root / "frames", frame_seeds()),
        *_write(root / "session", session_seeds()),
    ]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0]) if args else CORPUS
    paths = write_seeds(root)
    print(f"wrote {len(paths)} seed files under {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
