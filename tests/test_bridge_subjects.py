"""The bridge's topic <-> subject mapping (daemoneye_eventbus.bridge.subjects)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemoneye.eventbus.v1 import registry
from daemoneye_eventbus.bridge.subjects import (
    ControlMessage,
    InvalidSubject,
    control_subject_to_topic,
    control_subjects,
    escape_level,
    filter_to_subjects,
    is_control_topic,
    msg_id,
    subject_to_topic,
    topic_to_subject,
    unescape_level,
    validate_host_id,
)
from daemoneye_eventbus.errors import EventBusError, InvalidTopic
from daemoneye_eventbus.topics import topic_matches

LEVEL_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
levels = st.text(alphabet=LEVEL_CHARS, min_size=1, max_size=12)
topics = st.lists(levels, min_size=1, max_size=8).map(".".join)
hosts = st.text(alphabet=LEVEL_CHARS, min_size=1, max_size=64).filter(lambda h: h != "all")
filter_levels = st.one_of(levels, st.just("+"))
filters = st.builds(
    lambda ls, tail: ".".join([*ls, "#"] if tail else ls) or "#",
    st.lists(filter_levels, min_size=0, max_size=6),
    st.booleans(),
).filter(lambda f: f != "")


def nats_subject_matches(pattern: str, subject: str) -> bool:
    """NATS's own matching: ``*`` one token, ``>`` one or more trailing tokens."""
    ptoks, stoks = pattern.split("."), subject.split(".")
    for i, p in enumerate(ptoks):
        if p == ">":
            return len(stoks) > i
        if i >= len(stoks) or (p != "*" and p != stoks[i]):
            return False
    return len(ptoks) == len(stoks)


def is_valid_nats_token(token: str) -> bool:
    return bool(token) and not re.search(r"[\s.]", token) and token not in ("*", ">")


# -- host ids -----------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["h", "web-01", "HOST_2", "a" * 64])
def test_good_host_ids(host: str) -> None:
    validate_host_id(host)


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("", "empty"),
        ("a" * 65, "limit is 64"),
        ("a.b", "'.'"),
        ("a b", "' '"),
        ("*", "'\\*'"),
        (">", "'>'"),
        ("café", "'é'"),
        ("all", "reserved"),
        (3, "must be a str"),
    ],
)
def test_bad_host_ids(host: object, reason: str) -> None:
    with pytest.raises(InvalidSubject, match=reason):
        validate_host_id(host)  # type: ignore[arg-type]


def test_invalid_subject_is_a_value_error_of_the_bus() -> None:
    assert issubclass(InvalidSubject, ValueError)
    assert issubclass(InvalidSubject, EventBusError)


# -- escaping -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "token"),
    [
        ("abc_-09", "abc_-09"),
        ("a.b", "a~2Eb"),
        ("a b", "a~20b"),
        ("*", "~2A"),
        (">", "~3E"),
        ("~", "~7E"),
        ("é", "~C3~A9"),
        ("\t", "~09"),
    ],
)
def test_escape_examples(level: str, token: str) -> None:
    assert escape_level(level) == token
    assert unescape_level(token) == level


@given(st.text(min_size=1))
def test_escape_round_trips_any_text_into_one_nats_token(level: str) -> None:
    token = escape_level(level)
    assert is_valid_nats_token(token)
    assert token.isascii()
    assert unescape_level(token) == level


@given(levels)
def test_escape_is_the_identity_on_bus_levels(level: str) -> None:
    assert escape_level(level) == level


@pytest.mark.parametrize("token", ["~", "~2", "~2e", "~ZZ", "~41", "a b", "a*", "~FF", "é"])
def test_unescape_refuses_what_escape_never_writes(token: str) -> None:
    with pytest.raises(InvalidSubject):
        unescape_level(token)


# -- topics -------------------------------------------------------------------------------------


def test_topic_to_subject_example() -> None:
    assert topic_to_subject("web-01", "events.process.lifecycle") == (
        "daemoneye.web-01.events.process.lifecycle"
    )
    assert subject_to_topic("web-01", "daemoneye.web-01.events.process.lifecycle") == (
        "events.process.lifecycle"
    )


@given(hosts, topics)
def test_topic_subject_round_trip(host: str, topic: str) -> None:
    subject = topic_to_subject(host, topic)
    assert all(is_valid_nats_token(t) for t in subject.split("."))
    assert subject_to_topic(host, subject) == topic


def test_every_declared_topic_maps_to_a_valid_subject() -> None:
    names = list(registry.TOPICS)
    names += [t.filter.replace("+", "x1").replace("#", "x2") for t in registry.TEMPLATES]
    assert names
    for name in names:
        subject = topic_to_subject("host-1", name)
        assert all(is_valid_nats_token(t) for t in subject.split(".")), subject
        assert subject_to_topic("host-1", subject) == name


@pytest.mark.parametrize("topic", ["", "a.+", "a.#", "a..b", "a b"])
def test_topic_to_subject_refuses_bad_topics(topic: str) -> None:
    with pytest.raises(InvalidTopic):
        topic_to_subject("h", topic)


@pytest.mark.parametrize(
    "subject",
    [
        "daemoneye.other.a",
        "daemoneye.h",
        "nats.h.a",
        "daemoneye.h.a.*",
        "daemoneye.h.a.>",
        "daemoneye.h.a~2Eb",
        "daemoneye.h..a",
        "daemoneye.h.a~",
    ],
)
def test_subject_to_topic_refuses(subject: str) -> None:
    with pytest.raises(InvalidSubject):
        subject_to_topic("h", subject)


# -- filters ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filter", "subjects"),
    [
        ("a.b", ("daemoneye.h.a.b",)),
        ("a.+.c", ("daemoneye.h.a.*.c",)),
        ("a.#", ("daemoneye.h.a", "daemoneye.h.a.>")),
        ("+.#", ("daemoneye.h.*", "daemoneye.h.*.>")),
        ("#", ("daemoneye.h.>",)),
    ],
)
def test_filter_examples(filter: str, subjects: tuple[str, ...]) -> None:
    assert filter_to_subjects("h", filter) == subjects


@given(filters, topics)
def test_filter_subjects_match_exactly_what_the_filter_matches(filter: str, topic: str) -> None:
    subject = topic_to_subject("h", topic)
    in_nats = any(nats_subject_matches(s, subject) for s in filter_to_subjects("h", filter))
    assert in_nats == topic_matches(filter, topic)


@given(filters)
def test_filter_matches_its_own_instances(filter: str) -> None:
    topic = ".".join("x" if level in ("+", "#") else level for level in filter.split("."))
    subject = topic_to_subject("h", topic)
    assert any(nats_subject_matches(s, subject) for s in filter_to_subjects("h", filter))


def test_filter_refuses_bad_filters_and_hosts() -> None:
    with pytest.raises(InvalidTopic):
        filter_to_subjects("h", "a.#.b")
    with pytest.raises(InvalidSubject):
        filter_to_subjects("all", "a")


# -- inbound control ----------------------------------------------------------------------------


def test_control_subjects() -> None:
    assert control_subjects("h") == ("daemoneye.h.control.>", "daemoneye.all.control.>")


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("daemoneye.h.control.tasks.assign", ControlMessage("control.tasks.assign", False)),
        ("daemoneye.all.control.tasks.assign", ControlMessage("control.tasks.assign", True)),
        ("daemoneye.h.control.x", ControlMessage("control.x", False)),
    ],
)
def test_control_subject_to_topic(subject: str, expected: ControlMessage) -> None:
    assert control_subject_to_topic("h", subject) == expected


@pytest.mark.parametrize(
    "subject",
    [
        "daemoneye.other.control.x",
        "daemoneye.h.events.x",
        "daemoneye.h.control",
        "daemoneye.all.control",
        "daemoneye.h.controlx.y",
        "daemoneye.h.control.*",
        "daemoneye.h.control.>",
        "daemoneye.h.control.a b",
        "daemoneye.h.control.a~2Eb",
        "other.h.control.x",
        "daemoneye",
    ],
)
def test_control_subject_refusals(subject: str) -> None:
    with pytest.raises(InvalidSubject):
        control_subject_to_topic("h", subject)


@given(hosts, topics)
def test_control_round_trip(host: str, rest: str) -> None:
    topic = "control." + rest
    assert is_control_topic(topic)
    subject = topic_to_subject(host, topic)
    assert nats_subject_matches(control_subjects(host)[0], subject)
    assert control_subject_to_topic(host, subject) == ControlMessage(topic, False)


def test_is_control_topic() -> None:
    assert is_control_topic("control.presence")
    assert not is_control_topic("control")
    assert not is_control_topic("controls.x")
    assert not is_control_topic("events.control")


# -- message ids --------------------------------------------------------------------------------


def test_msg_id() -> None:
    assert msg_id("h", 7, 1_700_000_000_000_000_000) == "h:1700000000000000000:7"
    # The same event id in a later broker run has a later receive time.
    assert msg_id("h", 1, 10) != msg_id("h", 1, 20)
    assert msg_id("h", 1, 10) != msg_id("g", 1, 10)


@pytest.mark.parametrize(
    ("host", "event_id", "received_at_ns", "error"),
    [
        ("h", 0, 1, ValueError),
        ("h", -1, 1, ValueError),
        ("h", 1, -1, ValueError),
        ("all", 1, 1, InvalidSubject),
    ],
)
def test_msg_id_refusals(
    host: str, event_id: int, received_at_ns: int, error: type[Exception]
) -> None:
    with pytest.raises(error):
        msg_id(host, event_id, received_at_ns)
