"""The documents say what the code does, where they once disagreed.

Each test pins one statement of docs/protocol.md, docs/security.md or the
README that was ambiguous or wrong: against the real broker where it is
behaviour (raw wire peers from tests/rawpeer.py, so nothing is hidden by the
client), against the code's own figures where it is a number, and against
the text where it is a name that must appear (or not).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
from pathlib import Path

import pytest
from conftest import AGENT, PROCMOND, REPO, TEST_CONFIG
from rawpeer import RawPeer, describe, hello, kind, ping

from daemoneye.eventbus.v1 import frames_pb2, registry
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode, Frame
from daemoneye_eventbus import budget, retained
from daemoneye_eventbus.access import MAX_COMPONENT_CHARS, Policy
from daemoneye_eventbus.broker import Broker, BrokerConfig
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.errors import AccessDenied, InvalidTopic
from daemoneye_eventbus.frames import encode_frame, encode_varint
from daemoneye_eventbus.protocol import MAX_CLIENT_NAME_CHARS

EC = ErrorCode
PROTOCOL_DOC = REPO / "docs" / "protocol.md"
SECURITY_DOC = REPO / "docs" / "security.md"
README = REPO / "README.md"
ANOMALY = registry.EVENTS_PROCESS_ANOMALY  # public: an anonymous peer may use it
LIFECYCLE = registry.EVENTS_PROCESS_LIFECYCLE  # restricted: procmond -> daemoneye-agent

#: The worked Welcome of docs/protocol.md §3, as this test expects it.
WELCOME_HEX = (
    "4a 12 48 08 01 12 10 30 31 32 33 34 35 36 37 38 39 61 62 63 64 65 66 1a 24"
    " 08 80 80 40 10 ff 01 18 10 20 80 08 28 e8 07 30 80 80 80 04 38 88 27 40 98 75"
    " 48 80 08 50 e0 a7 12 58 88 27 22 08 70 72 6f 63 6d 6f 6e 64 28 01 30 01"
)


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def flat(text: str) -> str:
    """``text`` with every run of white space (line breaks included) as one space."""
    return " ".join(text.split())


def section(text: str, number: int) -> str:
    """Section §``number`` of docs/protocol.md, up to the next section."""
    start = text.index(f"\n## §{number} ")
    end = text.find("\n## §", start + 1)
    return text[start : end if end >= 0 else len(text)]


def subscribe(subscription_id: int, filter: str) -> Frame:
    return Frame(subscribe=frames_pb2.Subscribe(subscription_id=subscription_id, filter=filter))


def tag(number: int, wire_type: int) -> bytes:
    return encode_varint(number << 3 | wire_type)


def nested_groups(depth: int, number: int = 100) -> bytes:
    """``depth`` unknown groups, each inside the previous one.

    Groups are what nests in a frame: the schema's own messages nest only a
    few levels, and an unknown length-delimited field (tests/test_hostile.py
    ``nested_messages``) is kept as bytes, never parsed, however deep.
    """
    return tag(number, 3) * depth + tag(number, 4) * depth


async def expect_refusal(peer: RawPeer, code: ErrorCode.ValueType) -> frames_pb2.Error:
    """The next frame is a non-fatal Error with ``code``."""
    frame = await peer.recv()
    assert kind(frame) == "error", describe([frame])
    assert (frame.error.code, frame.error.fatal) == (code, False), describe([frame])
    return frame.error


# -- §3: the worked Welcome -------------------------------------------------------------------


def doc_welcome_bytes() -> tuple[bytes, bytes]:
    """The Welcome of §3 as its annotated dump, and as its one-line ``i.e.`` form."""
    text = read(PROTOCOL_DOC)
    example = text.split("### Worked example: the answering Welcome", 1)[1]
    block = example.split("```", 2)[1]
    # Each line of the dump: hex bytes, then three or more spaces and a comment.
    columns = " ".join(line.strip().split("   ")[0] for line in block.splitlines())
    dump = bytes.fromhex("".join(re.findall(r"\b[0-9a-f]{2}\b", columns)))
    inline = re.search(r"i\.e\. `([0-9a-f\s]+)`", example)
    assert inline is not None, "no one-line form of the Welcome"
    return dump, bytes.fromhex(inline.group(1))


async def test_the_worked_welcome_is_what_the_broker_sends(sock_path: str) -> None:
    dump, inline = doc_welcome_bytes()
    assert dump == inline == bytes.fromhex(WELCOME_HEX)
    assert f"{len(dump)} bytes:" in read(PROTOCOL_DOC)
    # The broker's own Welcome with the default limits, but for its random session id.
    async with (
        Broker(sock_path, BrokerConfig()),
        await RawPeer.connect(sock_path, handshake=False) as peer,
    ):
        await peer.send(hello("procmond", PROCMOND))
        frame = await peer.expect("welcome")
    assert frame.welcome.batches
    assert frame.welcome.requests
    assert re.fullmatch(r"[0-9a-f]{16}", frame.welcome.session_id)
    frame.welcome.session_id = "0123456789abcdef"
    assert encode_frame(frame).hex(" ") == WELCOME_HEX


# -- §3: claims and names longer than 128 characters ------------------------------------------


async def test_a_claim_of_129_characters_is_refused_fatally(broker: Broker, sock_path: str) -> None:
    assert MAX_COMPONENT_CHARS == MAX_CLIENT_NAME_CHARS == 128
    async with await RawPeer.connect(sock_path, handshake=False) as peer:
        await peer.send(hello(component="p" * 129))
        error = await peer.expect_fatal(EC.ERROR_CODE_ACCESS_DENIED)
    assert "at most 128 characters" in error.error.message


async def test_a_claim_of_128_is_echoed_and_a_long_name_is_cut(sock_path: str) -> None:
    # A component of 128 characters that the policy names for this test's uid:
    # only the length decides here.
    policy = Policy.from_mapping({"components": {"p" * 128: {"uids": [os.geteuid()]}}})
    async with (
        Broker(sock_path, dataclasses.replace(TEST_CONFIG, policy=policy)) as broker,
        await RawPeer.connect(sock_path, handshake=False) as peer,
    ):
        await peer.send(hello(name="n" * 300, component="p" * 128))
        welcome = (await peer.expect("welcome")).welcome
        assert welcome.component == "p" * 128
        (mine,) = [
            c for c in broker.statistics().connection_stats if c.session_id == welcome.session_id
        ]
        assert mine.client_name == "n" * 128


# -- §4 / §7 / security.md: filters that match nothing, or nothing readable -------------------


async def test_a_filter_matching_no_declared_topic_is_invalid_filter(
    broker: Broker, sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="daemoneye_eventbus.audit"):
        async with await RawPeer.connect(sock_path) as peer:
            for filter in ("foo.#", "events.+"):
                await peer.send(subscribe(1, filter))
                error = await expect_refusal(peer, EC.ERROR_CODE_INVALID_FILTER)
                assert (error.subscription_id, error.topic) == (1, filter)
                assert "declared" in error.message
            await peer.roundtrip()  # non-fatal: the connection stays usable
    assert not [r for r in caplog.records if "subscribe_refused" in r.getMessage()]


async def test_a_filter_matching_only_unreadable_topics_is_access_denied(
    broker: Broker, sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="daemoneye_eventbus.audit"):
        async with await RawPeer.connect(sock_path) as peer:  # anonymous
            for filter in (LIFECYCLE.name, "events.+.lifecycle"):
                await peer.send(subscribe(2, filter))
                error = await expect_refusal(peer, EC.ERROR_CODE_ACCESS_DENIED)
                assert (error.subscription_id, error.topic) == (2, filter)
            # It can match the public events.process.anomaly: accepted.
            await peer.send(subscribe(2, "events.process.#"))
            assert (await peer.expect("subscribe_ack")).subscribe_ack.subscription_id == 2
    audited = [r for r in caplog.records if "subscribe_refused" in r.getMessage()]
    assert len(audited) == 2


async def test_the_client_raises_what_security_md_says(broker: Broker, sock_path: str) -> None:
    async with Client(sock_path) as client:
        with pytest.raises(InvalidTopic) as invalid:
            await client.subscribe("foo.#")
        assert invalid.value.code == EC.ERROR_CODE_INVALID_FILTER
        with pytest.raises(AccessDenied) as denied:
            await client.subscribe(LIFECYCLE.name)
        assert denied.value.code == EC.ERROR_CODE_ACCESS_DENIED


def test_every_doc_gives_the_two_subscribe_refusals() -> None:
    protocol = read(PROTOCOL_DOC)
    rows = {
        m.group(1): m.group(0)
        for m in re.finditer(r"^\|\s*\d+\s*\|\s*`(ERROR_CODE_\w+)`.*$", section(protocol, 7), re.M)
    }
    assert "can match no topic declared" in rows["ERROR_CODE_INVALID_FILTER"]
    assert "none that the peer may read" in rows["ERROR_CODE_ACCESS_DENIED"]
    subscribe_checks = section(protocol, 4)
    assert re.search(r"`foo\.#`.*\| `ERROR_CODE_INVALID_FILTER`", subscribe_checks)
    assert "A filter need not match any declared topic" not in protocol
    security = flat(read(SECURITY_DOC))
    assert (
        "can match no declared topic (`foo.#`, `events.+`) is refused with a non-fatal "
        "`ERROR_CODE_INVALID_FILTER`" in security
    )
    assert (
        "a filter that matches declared topics but none the peer may read is refused with "
        "a non-fatal `ERROR_CODE_ACCESS_DENIED`" in security
    )
    readme = flat(read(README))
    assert "is refused with `INVALID_FILTER`; one that matches declared topics but none" in readme


# -- §1 / §5: nesting deeper than upb's 100 levels ---------------------------------------------


async def test_a_frame_nested_101_deep_is_malformed(broker: Broker, sock_path: str) -> None:
    async with await RawPeer.connect(sock_path) as peer:
        body = ping(9).SerializeToString() + nested_groups(100)
        await peer.write(encode_varint(len(body)) + body)
        assert (await peer.expect("pong")).pong.nonce == 9
        body = ping(10).SerializeToString() + nested_groups(101)
        await peer.write(encode_varint(len(body)) + body)
        error = await peer.expect_fatal(EC.ERROR_CODE_MALFORMED_FRAME)
    assert "undecodable" in error.error.message


async def test_a_payload_nested_101_deep_is_an_invalid_payload(
    broker: Broker, sock_path: str
) -> None:
    async with await RawPeer.connect(sock_path) as sub, await RawPeer.connect(sock_path) as pub:
        await sub.send(subscribe(1, ANOMALY.name))
        await sub.expect("subscribe_ack")
        for depth in (100, 101):
            publish = frames_pb2.Publish(
                topic=ANOMALY.name, payload_type=ANOMALY.payload_name, payload=nested_groups(depth)
            )
            await pub.send(Frame(publish=publish))
        error = await expect_refusal(pub, EC.ERROR_CODE_INVALID_PAYLOAD)
        assert error.topic == ANOMALY.name
        deliver = (await sub.expect("deliver")).deliver
        assert deliver.publish.payload == nested_groups(100)  # forwarded verbatim
        await pub.roundtrip()
        await sub.roundtrip()  # and nothing else was delivered before the pong
    assert broker.statistics().invalid_payloads == 1


# -- §5 / §7 / §8: a peer that never reads never sees its SLOW_CONSUMER -----------------------


async def test_a_peer_that_never_reads_never_sees_its_slow_consumer_error(
    sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = dataclasses.replace(TEST_CONFIG, socket_send_buffer=64 * 1024)
    payload = b"\x12\xff\xff\x03" + b"x" * 65535  # ProcessEvent.name of 64 KiB
    with caplog.at_level(logging.WARNING, logger="daemoneye_eventbus.broker"):
        async with (
            Broker(sock_path, config) as broker,
            await RawPeer.connect(sock_path, component=AGENT) as peer,
        ):
            await peer.send(subscribe(1, LIFECYCLE.name))
            await peer.expect("subscribe_ack")
            publisher = broker.local_session("collector", PROCMOND)
            for _ in range(40):  # 2.5 MiB: past the kernel's buffer and 256 KiB more
                await publisher.publish_raw(LIFECYCLE.name, LIFECYCLE.payload_name, payload)
            # The peer does not read until the broker has given up on it and
            # aborted the connection (1 s after its fatal Error).
            async with asyncio.timeout(config.slow_consumer_timeout + 5):
                while True:
                    if not broker.statistics().connections:
                        break
                    await asyncio.sleep(0.02)
            frames = await peer.until_eof(allow_truncated=True)
    assert any("slow consumer" in r.getMessage() for r in caplog.records)
    assert frames, "the kernel held some deliveries"
    assert {kind(f) for f in frames} <= {"deliver"}, describe(frames[-3:])


# -- §10: every BrokerConfig field, with its default ------------------------------------------


def documented_default(name: str, value: object) -> str:
    """How §10 writes a field's default."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value} s"
    assert isinstance(value, int)
    if name == "socket_mode":
        return f"`{value:04o}`"
    return f"{value:,}".replace(",", " ") if value >= 10_000 else str(value)


def test_every_broker_config_field_is_in_the_limits_table() -> None:
    rows = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^\| `(\w+)`\s*\|([^|]*)\|", section(read(PROTOCOL_DOC), 10), re.M)
    }
    defaults = BrokerConfig()
    for field in dataclasses.fields(BrokerConfig):
        if field.name == "policy":
            continue
        assert field.name in rows, f"{field.name} is missing from protocol.md §10"
        wanted = documented_default(field.name, getattr(defaults, field.name))
        assert wanted in rows[field.name], (field.name, wanted, rows[field.name])


def test_the_security_limits_table_has_the_new_limits() -> None:
    security = read(SECURITY_DOC)
    table = security.split("## Limits, their defaults", 1)[1].split("\n## ", 1)[0]
    for name in (
        "max_frames_per_turn",
        "max_subscription_bytes",
        "max_total_subscription_bytes",
        "max_total_queue_bytes",
        "max_total_input_bytes",
        "validate_payloads",
    ):
        assert f"| `{name}` |" in table, name
    assert "## Memory" in security
    assert "## Payload validation" in security
    assert "--no-validate-payloads" in security


def test_the_memory_figures_are_the_codes() -> None:
    assert budget.FRAME_COST == 96
    assert budget.subscription_cost("a.b", 10) == 512 + 2 * 3 + 2 * 10
    protocol = read(PROTOCOL_DOC)
    assert (
        "512 bytes + 2 \u00d7 filter length + 2 \u00d7 encoded correlation filter bytes" in protocol
    )
    assert "| 96 bytes" in protocol


def test_the_retained_memory_figure_is_the_codes() -> None:
    assert retained.RETAINED_COST == 512
    assert retained.retained_cost(100) == 612
    protocol, security = read(PROTOCOL_DOC), read(SECURITY_DOC)
    assert (
        "| memory charged per retained event (`RETAINED_COST`) | encoded `Publish` + 512 bytes |"
        in (protocol)
    )
    table = security.split("## Limits, their defaults", 1)[1].split("\n## ", 1)[0]
    for name in ("max_retained_events", "max_retained_bytes"):
        assert f"| `{name}` |" in table, name
    assert "| retained events | each retained event's encoded `Publish` + 512 bytes" in security
    # The README no longer says the broker ignores the retained declarations.
    assert "no retained delivery" not in read(README)


def test_every_error_code_is_in_the_table_of_section_7() -> None:
    rows = {
        m.group(2): int(m.group(1))
        for m in re.finditer(
            r"^\|\s*(\d+)\s*\|\s*`(ERROR_CODE_\w+)`", section(read(PROTOCOL_DOC), 7), re.M
        )
    }
    assert rows == dict(ErrorCode.items())
    assert rows["ERROR_CODE_INVALID_PAYLOAD"] == 19


# -- the peer credentials each platform gives -------------------------------------------------


def test_the_docs_name_only_the_credential_calls_the_code_makes() -> None:
    code = read(REPO / "daemoneye_eventbus" / "transports" / "unix.py")
    calls = r"`(SO_PEERCRED|LOCAL_PEER\w+|getpeereid|proc_pidpath)[`(]"
    for doc in (PROTOCOL_DOC, SECURITY_DOC, README):
        for call in re.findall(calls, read(doc)):
            assert call in code, (doc.name, call)
    for doc in (PROTOCOL_DOC, SECURITY_DOC):
        text = read(doc)
        for call in ("SO_PEERCRED", "LOCAL_PEERCRED", "LOCAL_PEERPID", "getpeereid"):
            assert f"`{call}" in text, (doc.name, call)
    assert "`proc_pidpath" in read(SECURITY_DOC)
