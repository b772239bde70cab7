"""The shared wire vectors of tests/vectors/, checked with the Python runtime.

Each ``<name>.bin`` is one frame as it travels on the socket, length prefix
included; ``<name>.json`` describes it in protobuf's JSON mapping. The same
files are checked by the TypeScript client (clients/typescript/test/
vectors.test.ts), so both implementations agree on the bytes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from vectors import generate

from daemoneye.eventbus.v1 import frames_pb2
from daemoneye.eventbus.v1.frames_pb2 import Frame
from daemoneye_eventbus.delivery import message_class
from daemoneye_eventbus.frames import decode_varint, encode_deliver, encode_publish, publish_header
from daemoneye_eventbus.protocol import Connection, Role

VECTORS = Path(__file__).resolve().parent / "vectors"
PROTOCOL_DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
NAMES = sorted(p.stem for p in VECTORS.glob("*.json"))
ALL_KINDS = [f.name for f in Frame.DESCRIPTOR.oneofs_by_name["kind"].fields]


def _load(name: str) -> tuple[bytes, dict[str, Any]]:
    data = (VECTORS / f"{name}.bin").read_bytes()
    description = json.loads((VECTORS / f"{name}.json").read_text(encoding="utf-8"))
    assert isinstance(description, dict)
    return data, description


def _split(data: bytes) -> bytes:
    """The body of a single length-prefixed frame; the prefix must be minimal and exact."""
    decoded = decode_varint(data)
    assert decoded is not None, "incomplete length prefix"
    length, start = decoded
    assert length == len(data) - start, "the prefix must cover exactly the rest of the file"
    assert start == len(bytes(_minimal_varint(length))), "the prefix must be minimal"
    return data[start:]


def _minimal_varint(value: int) -> bytearray:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return out


def test_vectors_exist() -> None:
    assert len(NAMES) >= len(ALL_KINDS)
    assert sorted(p.stem for p in VECTORS.glob("*.bin")) == NAMES


def test_vectors_are_fresh() -> None:
    """The committed files are exactly what tests/vectors/generate.py writes."""
    fresh = generate.render()
    assert generate.committed(VECTORS) == fresh, "run `.venv/bin/python tests/vectors/generate.py`"


def test_generator_is_deterministic() -> None:
    assert generate.render() == generate.render()


def test_every_frame_kind_has_a_vector() -> None:
    kinds = {_load(name)[1]["kind"] for name in NAMES}
    assert kinds == set(ALL_KINDS)


def test_special_vectors() -> None:
    """A publish with correlation metadata and a deliver (with correlation) are covered."""
    publishes = [_load(n)[1]["frame"]["publish"] for n in NAMES if _load(n)[1]["kind"] == "publish"]
    assert any("correlation" in p for p in publishes)
    delivers = [_load(n)[1]["frame"]["deliver"] for n in NAMES if _load(n)[1]["kind"] == "deliver"]
    assert delivers
    assert any("correlation" in d["publish"] for d in delivers)


@pytest.mark.parametrize("name", NAMES)
def test_vector_roundtrip(name: str) -> None:
    """Decode the bytes, re-encode them to the same bytes; the JSON matches both ways."""
    data, description = _load(name)
    assert description["name"] == name
    assert description["size"] == len(data)
    assert bytes.fromhex(description["hex"]) == data
    body = _split(data)
    frame = Frame.FromString(body)
    assert frame.WhichOneof("kind") == description["kind"]
    assert frame.SerializeToString(deterministic=True) == body
    assert generate.to_json(frame) == description["frame"]
    parsed = json_format.ParseDict(description["frame"], Frame())
    assert parsed == frame
    assert parsed.SerializeToString(deterministic=True) == body


@pytest.mark.parametrize("name", NAMES)
def test_vector_payload(name: str) -> None:
    """The payload of a publish or deliver decodes to the JSON in the description."""
    data, description = _load(name)
    frame = Frame.FromString(_split(data))
    kind = frame.WhichOneof("kind")
    if kind not in ("publish", "deliver"):
        assert "payload" not in description
        return
    publish = frame.publish if kind == "publish" else frame.deliver.publish
    cls = message_class(publish.payload_type)
    assert cls is not None
    payload = cls.FromString(publish.payload)
    assert payload.SerializeToString(deterministic=True) == publish.payload
    assert generate.to_json(payload) == description["payload"]


@pytest.mark.parametrize("name", NAMES)
def test_reference_receiver_accepts_vector(name: str) -> None:
    """The reference sans-I/O Connection parses every vector, byte by byte too."""
    data, description = _load(name)
    kind = description["kind"]
    broker_to_client = kind in {
        "welcome",
        "deliver",
        "deliver_batch",
        "subscribe_ack",
        "unsubscribe_ack",
        "stats_response",
        "request_deliver",
        "reply_deliver",
    }
    role = Role.CLIENT if broker_to_client else Role.BROKER
    for chunk in (len(data), 1):
        conn = Connection(role)
        if kind not in ("hello", "welcome", "goodbye") and not (
            kind == "error" and role is Role.CLIENT
        ):
            _open(conn)
        for i in range(0, len(data), chunk):
            conn.receive_data(data[i : i + chunk])
        assert conn.error is None
        frames = conn.events_received()
        if role is Role.CLIENT and kind not in ("welcome", "error"):
            frames = frames[1:]  # the welcome that opened the connection
        if role is Role.BROKER and kind not in ("hello", "goodbye"):
            frames = frames[1:]  # the hello that started the handshake
        assert [f.WhichOneof("kind") for f in frames] == [kind]


def _open(conn: Connection) -> None:
    """Bring ``conn`` to OPEN through a real handshake."""
    if conn.role is Role.CLIENT:
        conn.receive_data((VECTORS / "welcome.bin").read_bytes())
    else:
        conn.receive_data((VECTORS / "hello.bin").read_bytes())
        conn.send(Frame(welcome=frames_pb2.Welcome(protocol_version=1, session_id="x")))
        conn.data_to_send()


def test_fast_encoders_match_vectors() -> None:
    """encode_publish and encode_deliver (the hot paths) produce the vector bytes."""
    for name in ("publish", "publish_correlation"):
        data, _ = _load(name)
        pub = Frame.FromString(_split(data)).publish
        corr = (
            pub.correlation.SerializeToString(deterministic=True)
            if pub.HasField("correlation")
            else None
        )
        header = publish_header(pub.topic, pub.payload_type)
        assert encode_publish(header, pub.payload, corr) == data
    data, _ = _load("deliver")
    deliver = Frame.FromString(_split(data)).deliver
    inner = deliver.publish.SerializeToString(deterministic=True)
    assert encode_deliver(deliver.subscription_id, deliver.sequence, inner) == data


@pytest.mark.parametrize("name", ["hello", "welcome", "request"])
def test_worked_examples_of_the_protocol_page(name: str) -> None:
    """hello.bin and welcome.bin are the worked examples of docs/protocol.md §3,
    request.bin the one of §5, "Request/reply"."""
    data, _ = _load(name)
    text = PROTOCOL_DOC.read_text(encoding="utf-8")
    title = {
        "hello": "a Hello frame",
        "welcome": "the answering Welcome",
        "request": "a request and its reply",
    }[name]
    section = text.split(f"### Worked example: {title}", 1)[1].split("```", 2)[1]
    # Each line of the dump: hex bytes, then three or more spaces and a comment.
    hex_columns = " ".join(line.strip().split("   ")[0] for line in section.splitlines())
    expected = bytes.fromhex("".join(re.findall(r"\b[0-9a-f]{2}\b", hex_columns)))
    assert data == expected


def test_the_stamp_example_of_the_protocol_is_the_vectors_bytes() -> None:
    """docs/protocol.md §5, "Event ids and receive times": the worked example's
    bytes end the deliver_stamped vector, and retained adds ``30 01``."""
    here = Path(__file__).resolve().parent
    doc = (here.parent / "docs" / "protocol.md").read_text()
    lines = [
        line.split("  ")[0] for line in doc.splitlines() if line.startswith(("20 e8 07 ", "29 06 "))
    ]
    assert len(lines) == 2
    suffix = bytes.fromhex(" ".join(lines))
    stamped = (here / "vectors" / "deliver_stamped.bin").read_bytes()
    assert stamped.endswith(suffix)
    retained = (here / "vectors" / "deliver_retained.bin").read_bytes()
    assert retained.endswith(b"\x30\x01")
