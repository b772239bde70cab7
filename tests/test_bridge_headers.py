"""The NATS headers of forwarded events and of inbound correlation
(daemoneye_eventbus.bridge.headers)."""

from __future__ import annotations

import json

import pytest
from bridge_helpers import full_meta
from hypothesis import given, settings
from hypothesis import strategies as st

from daemoneye.eventbus.v1.correlation_pb2 import CorrelationMetadata
from daemoneye_eventbus.bridge.headers import (
    CORRELATION_HEADERS,
    CORRELATION_ID,
    CREATED_AT,
    EVENT_ID,
    HOST,
    MSG_ID,
    PARENT_CORRELATION_ID,
    PAYLOAD_TYPE,
    RECEIVED_AT,
    ROOT_CORRELATION_ID,
    SEQUENCE_NUMBER,
    TAGS,
    TOPIC,
    WORKFLOW_STAGE,
    InvalidHeader,
    correlation_from_headers,
    correlation_headers,
    event_headers,
)
from daemoneye_eventbus.bridge.subjects import InvalidSubject, msg_id
from daemoneye_eventbus.correlation import (
    MAX_ID_BYTES,
    MAX_SEQUENCE_NUMBER,
    MAX_STAGE_BYTES,
    MAX_TAG_KEY_BYTES,
    MAX_TAG_VALUE_BYTES,
    MAX_TAGS,
)
from daemoneye_eventbus.errors import EventBusError

# Timestamp's range (RFC 3339 years 0001 to 9999).
MIN_SECONDS = -62_135_596_800
MAX_SECONDS = 253_402_300_799

# Characters that a header value could not carry as they are: the percent
# sign of the encoding itself, line breaks, spaces, other controls, and text
# beyond the BMP (four UTF-8 bytes).
AWKWARD = ["%", "%25", "\n", "\r\n", "\r", " ", "\t", "\x00", "\x7f", "\U0001f600", "é", "~"]
pieces = st.one_of(st.characters(exclude_categories=["Cs"]), st.sampled_from(AWKWARD))


def utf8_text(min_size: int, max_bytes: int) -> st.SearchStrategy[str]:
    """Text of ``min_size`` pieces or more, at most ``max_bytes`` in UTF-8."""
    return (
        st.lists(pieces, min_size=min_size, max_size=max_bytes // 4)
        .map("".join)
        .filter(lambda s: len(s.encode("utf-8")) <= max_bytes)
    )


ids = utf8_text(1, MAX_ID_BYTES)
stages = utf8_text(1, MAX_STAGE_BYTES)
tags = st.dictionaries(utf8_text(1, MAX_TAG_KEY_BYTES), utf8_text(0, 64), max_size=min(MAX_TAGS, 8))


@st.composite
def metadata(draw: st.DrawFn) -> CorrelationMetadata:
    meta = CorrelationMetadata(
        correlation_id=draw(ids),
        root_correlation_id=draw(ids),
        sequence_number=draw(st.integers(0, MAX_SEQUENCE_NUMBER)),
    )
    if draw(st.booleans()):
        meta.parent_correlation_id = draw(ids)
    if draw(st.booleans()):
        meta.workflow_stage = draw(stages)
    if draw(st.booleans()):
        meta.created_at.seconds = draw(st.integers(MIN_SECONDS, MAX_SECONDS))
        meta.created_at.nanos = draw(st.integers(0, 999_999_999))
    meta.tags.update(draw(tags))
    return meta


def is_plain_header_value(value: str) -> bool:
    """Printable ASCII, no CR/LF or other control, nothing NATS would trim."""
    return (
        value.isascii()
        and all(0x20 <= ord(ch) < 0x7F for ch in value)
        and value == value.strip()
        and value != ""
    )


# -- event_headers ------------------------------------------------------------------------------


def test_event_headers_without_correlation() -> None:
    headers = event_headers(
        "web-01",
        "events.process.lifecycle",
        "daemoneye.eventbus.v1.ProcessEvent",
        42,
        1_700_000_000_123_456_789,
        None,
    )
    assert headers == {
        "Nats-Msg-Id": "web-01:1700000000123456789:42",
        "Daemoneye-Host": "web-01",
        "Daemoneye-Topic": "events.process.lifecycle",
        "Daemoneye-Payload-Type": "daemoneye.eventbus.v1.ProcessEvent",
        "Daemoneye-Event-Id": "42",
        "Daemoneye-Received-At": "1700000000123456789",
    }
    assert headers[MSG_ID] == msg_id("web-01", 42, 1_700_000_000_123_456_789)
    assert not set(headers) & set(CORRELATION_HEADERS)
    assert correlation_from_headers(headers) is None


def test_event_headers_with_correlation() -> None:
    meta = full_meta()
    headers = event_headers("h", "events.network.connections", "x.Y", 1, 0, meta)
    assert headers == {
        MSG_ID: "h:0:1",
        HOST: "h",
        TOPIC: "events.network.connections",
        PAYLOAD_TYPE: "x.Y",
        EVENT_ID: "1",
        RECEIVED_AT: "0",
        CORRELATION_ID: "scan%2042%25%0A",
        ROOT_CORRELATION_ID: "root/1",
        PARENT_CORRELATION_ID: "parent:%C3%A9",
        WORKFLOW_STAGE: "triage%20%F0%9F%9A%A8",
        SEQUENCE_NUMBER: "7",
        CREATED_AT: "2024-05-06T07:08:09.123Z",
        TAGS: '{"a":"2","b":"1","zone":"eu west"}',
    }
    assert correlation_from_headers(headers) == meta


def test_optional_correlation_fields_are_left_out_when_unset() -> None:
    meta = CorrelationMetadata(correlation_id="c", root_correlation_id="r")
    assert correlation_headers(meta) == {
        CORRELATION_ID: "c",
        ROOT_CORRELATION_ID: "r",
        SEQUENCE_NUMBER: "0",
    }


@pytest.mark.parametrize(
    ("host", "event_id", "received_at", "error"),
    [
        ("all", 1, 0, InvalidSubject),
        ("web.01", 1, 0, InvalidSubject),
        ("h", 0, 0, ValueError),
        ("h", 1, -1, ValueError),
    ],
)
def test_event_headers_refuse_what_msg_id_refuses(
    host: str, event_id: int, received_at: int, error: type[Exception]
) -> None:
    with pytest.raises(error):
        event_headers(host, "events.process.lifecycle", "x.Y", event_id, received_at, None)


# -- round trip ---------------------------------------------------------------------------------


@settings(max_examples=300)
@given(metadata())
def test_correlation_headers_round_trip(meta: CorrelationMetadata) -> None:
    headers = correlation_headers(meta)
    assert set(headers) <= set(CORRELATION_HEADERS)
    for name, value in headers.items():
        assert is_plain_header_value(value), (name, value)
    assert correlation_from_headers(headers) == meta


@given(metadata(), st.integers(1, 2**63 - 1), st.integers(0, 2**63 - 1))
def test_every_event_header_is_plain_ascii(
    meta: CorrelationMetadata, event_id: int, received_at: int
) -> None:
    headers = event_headers(
        "web-01", "events.process.lifecycle", "a.B", event_id, received_at, meta
    )
    for name, value in headers.items():
        assert is_plain_header_value(value), (name, value)
    assert correlation_from_headers(headers) == meta


def test_extreme_values_round_trip() -> None:
    meta = CorrelationMetadata(
        correlation_id="é" * (MAX_ID_BYTES // 2),
        root_correlation_id="r" * MAX_ID_BYTES,
        parent_correlation_id="\U0001f600" * (MAX_ID_BYTES // 4),
        workflow_stage="s" * MAX_STAGE_BYTES,
        sequence_number=MAX_SEQUENCE_NUMBER,
    )
    meta.created_at.seconds = MAX_SECONDS
    meta.created_at.nanos = 999_999_999
    meta.tags.update({f"k{i}": "v" * MAX_TAG_VALUE_BYTES for i in range(MAX_TAGS)})
    headers = correlation_headers(meta)
    assert headers[SEQUENCE_NUMBER] == "18446744073709551615"
    assert headers[CREATED_AT] == "9999-12-31T23:59:59.999999999Z"
    assert correlation_from_headers(headers) == meta


def test_root_defaults_to_the_correlation_id() -> None:
    meta = correlation_from_headers({CORRELATION_ID: "a%20b"})
    assert meta == CorrelationMetadata(correlation_id="a b", root_correlation_id="a b")
    assert not meta.HasField("parent_correlation_id")
    assert not meta.HasField("workflow_stage")
    assert not meta.HasField("created_at")


@pytest.mark.parametrize(
    "headers",
    [None, {}, {"Nats-Msg-Id": "h:1:1", "Daemoneye-Host": "h", "X-Correlation-Id": "c"}],
)
def test_no_correlation_headers_is_none(headers: dict[str, str] | None) -> None:
    assert correlation_from_headers(headers) is None


# -- refusals -----------------------------------------------------------------------------------


def test_invalid_header_is_a_value_error_of_the_bus() -> None:
    assert issubclass(InvalidHeader, ValueError)
    assert issubclass(InvalidHeader, EventBusError)


@pytest.mark.parametrize("name", [h for h in CORRELATION_HEADERS if h != CORRELATION_ID])
def test_correlation_headers_need_the_correlation_id(name: str) -> None:
    value = {SEQUENCE_NUMBER: "1", CREATED_AT: "2024-01-01T00:00:00Z", TAGS: "{}"}.get(name, "x")
    with pytest.raises(InvalidHeader, match=f"without {CORRELATION_ID}"):
        correlation_from_headers({name: value})


@pytest.mark.parametrize(
    "value",
    [
        "",
        "-1",
        "+1",
        " 1",
        "1 ",
        "1.0",
        "1e3",
        "0x10",
        "1_000",
        "\u0661",  # ARABIC-INDIC DIGIT ONE: a digit, not a decimal ASCII one
        "\u00b2",  # SUPERSCRIPT TWO
    ],
)
def test_sequence_number_must_be_decimal(value: str) -> None:
    with pytest.raises(InvalidHeader, match="not a decimal number"):
        correlation_from_headers({CORRELATION_ID: "c", SEQUENCE_NUMBER: value})


@pytest.mark.parametrize("value", [str(MAX_SEQUENCE_NUMBER + 1), "9" * 30, "9" * 5000, "1" * 10**5])
def test_sequence_number_too_large(value: str) -> None:
    with pytest.raises(InvalidHeader, match=SEQUENCE_NUMBER):
        correlation_from_headers({CORRELATION_ID: "c", SEQUENCE_NUMBER: value})


def test_sequence_number_bounds_and_leading_zeros() -> None:
    for value, number in [("0", 0), ("007", 7), (str(MAX_SEQUENCE_NUMBER), MAX_SEQUENCE_NUMBER)]:
        meta = correlation_from_headers({CORRELATION_ID: "c", SEQUENCE_NUMBER: value})
        assert meta is not None
        assert meta.sequence_number == number


@pytest.mark.parametrize(
    "value",
    [
        "",
        "yesterday",
        "2024-01-01",
        "2024-01-01T00:00:00",  # no offset
        "2024-13-01T00:00:00Z",
        "2024-02-30T00:00:00Z",
        "2024-01-01T25:00:00Z",
        "0000-01-01T00:00:00Z",
        "10000-01-01T00:00:00Z",
        "2024-01-01T00:00:00.1234567891Z",
        "1700000000",
    ],
)
def test_created_at_must_be_rfc3339(value: str) -> None:
    with pytest.raises(InvalidHeader, match=f"{CREATED_AT}: not an RFC 3339 time"):
        correlation_from_headers({CORRELATION_ID: "c", CREATED_AT: value})


def test_created_at_with_an_offset_is_read_as_utc() -> None:
    meta = correlation_from_headers({CORRELATION_ID: "c", CREATED_AT: "2024-01-01T02:00:00+02:00"})
    assert meta is not None
    assert meta.created_at.ToJsonString() == "2024-01-01T00:00:00Z"


@pytest.mark.parametrize("value", ["", "{", "{'a': 'b'}", "{a:b}", '{"a":"b"} x', "[" * 100_000])
def test_tags_must_be_json(value: str) -> None:
    with pytest.raises(InvalidHeader, match=f"{TAGS}: not JSON"):
        correlation_from_headers({CORRELATION_ID: "c", TAGS: value})


@pytest.mark.parametrize(
    "value",
    ["[]", '["a","b"]', '"a"', "1", "null", '{"a":1}', '{"a":null}', '{"a":["b"]}', '{"a":{}}'],
)
def test_tags_must_be_an_object_of_strings(value: str) -> None:
    with pytest.raises(InvalidHeader, match=f"{TAGS}: not a JSON object of strings"):
        correlation_from_headers({CORRELATION_ID: "c", TAGS: value})


@pytest.mark.parametrize("value", ['{"a":"\\ud800"}', '{"\\udfff":"x"}'])
def test_tags_that_are_not_unicode_text_are_refused(value: str) -> None:
    # A lone surrogate escape is valid JSON but no UTF-8 text.
    with pytest.raises(InvalidHeader, match=TAGS):
        correlation_from_headers({CORRELATION_ID: "c", TAGS: value})


@pytest.mark.parametrize(
    ("tags", "reason"),
    [
        ({"": "x"}, "key '' is empty"),
        ({"k" * (MAX_TAG_KEY_BYTES + 1): "x"}, "bytes, the limit is"),
        ({"k": "v" * (MAX_TAG_VALUE_BYTES + 1)}, "bytes, the limit is"),
        ({f"k{i}": "" for i in range(MAX_TAGS + 1)}, f"the limit is {MAX_TAGS}"),
    ],
)
def test_tags_over_the_limits(tags: dict[str, str], reason: str) -> None:
    with pytest.raises(InvalidHeader, match=reason):
        correlation_from_headers({CORRELATION_ID: "c", TAGS: json.dumps(tags)})


ENCODED_IDS = [CORRELATION_ID, ROOT_CORRELATION_ID, PARENT_CORRELATION_ID, WORKFLOW_STAGE]


@pytest.mark.parametrize("name", ENCODED_IDS)
@pytest.mark.parametrize(
    "value",
    [
        "%FF",
        "a%C3",  # truncated sequence
        "%C3%28",  # bad continuation byte
        "%C0%80",  # overlong NUL
        "%ED%A0%80",  # a surrogate
        "%F4%90%80%80",  # above U+10FFFF
    ],
)
def test_percent_encoding_of_invalid_utf8_is_refused(name: str, value: str) -> None:
    headers = {CORRELATION_ID: "c", name: value}
    with pytest.raises(InvalidHeader, match=f"{name}: not percent-encoded UTF-8"):
        correlation_from_headers(headers)


@pytest.mark.parametrize(
    ("name", "field", "limit"),
    [
        (CORRELATION_ID, "correlation_id", MAX_ID_BYTES),
        (ROOT_CORRELATION_ID, "root_correlation_id", MAX_ID_BYTES),
        (PARENT_CORRELATION_ID, "parent_correlation_id", MAX_ID_BYTES),
        (WORKFLOW_STAGE, "workflow_stage", MAX_STAGE_BYTES),
    ],
)
def test_ids_over_the_size_limits(name: str, field: str, limit: int) -> None:
    at_limit = {CORRELATION_ID: "c", name: "x" * limit}
    meta = correlation_from_headers(at_limit)
    assert meta is not None
    assert getattr(meta, field) == "x" * limit
    with pytest.raises(InvalidHeader, match=f"{field} is {limit + 1} bytes, the limit is {limit}"):
        correlation_from_headers({CORRELATION_ID: "c", name: "x" * (limit + 1)})
    # The limit is in UTF-8 bytes of the decoded text, not in characters.
    wide = "%C3%A9" * (limit // 2 + 1)
    with pytest.raises(InvalidHeader, match=f"{field} is {limit + 2} bytes"):
        correlation_from_headers({CORRELATION_ID: "c", name: wide})


@pytest.mark.parametrize("name", ENCODED_IDS)
def test_empty_ids_are_refused(name: str) -> None:
    with pytest.raises(InvalidHeader, match="is empty"):
        correlation_from_headers({CORRELATION_ID: "c", name: ""})
