"""The bridge's topic <-> subject mapping (daemoneye_eventbus.bridge.subjects)."""

from __future__ import annotations

import itertools
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
    host_pattern,
    is_control_topic,
    msg_id,
    subject_covers,
    subject_to_topic,
    subjects_overlap,
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


# -- subject_covers and host_pattern ------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "subject", "covers"),
    [
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
        ("a.b", "a.b.c", False),
        ("a.b.c", "a.b", False),
        # '>' covers longer subjects, and the same length ending in '>', never shorter.
        (">", "a", True),
        (">", "a.b.c", True),
        (">", ">", True),
        (">", "*", True),
        ("a.>", "a.b", True),
        ("a.>", "a.b.c.d", True),
        ("a.>", "a.>", True),
        ("a.>", "a.*", True),
        ("a.>", "a.b.>", True),
        ("a.>", "a", False),
        ("a.b.>", "a.>", False),
        ("a.>", "b.c", False),
        ("*.>", "a", False),
        # '*' covers a literal and '*', not '>' (which may stand for several tokens).
        ("a.*", "a.b", True),
        ("a.*", "a.*", True),
        ("a.*", "a.>", False),
        ("*", ">", False),
        ("a.*", "a.b.c", False),
        ("a.*.c", "a.b.c", True),
        ("*.*", "a.*", True),
        # A literal covers neither wildcard.
        ("a.b", "a.*", False),
        ("a.b", "a.>", False),
        ("a.b.c", "a.*.c", False),
        ("daemoneye.*.events.>", "daemoneye.web-01.events.process.>", True),
        ("daemoneye.*.events.>", "daemoneye.web-01.events", False),
        ("daemoneye.*.events", "daemoneye.web-01.events", True),
        ("daemoneye.*.events.network.>", "daemoneye.web-01.events.>", False),
    ],
)
def test_subject_covers_examples(pattern: str, subject: str, covers: bool) -> None:
    assert subject_covers(pattern, subject) is covers


TOKENS = ["a", "b", "*", ">"]
#: Concrete subjects to test the claims on: up to 5 tokens over an alphabet that
#: has a token ("c") no pattern names. A pattern of at most 4 tokens that does
#: not cover another has a counterexample among them: where a length decides,
#: it is at most one more than the longer of the two (a trailing '>' matches
#: that length and the one before).
CONCRETE = [".".join(tokens) for n in range(1, 6) for tokens in itertools.product("abc", repeat=n)]


def well_formed(tokens: list[str]) -> bool:
    return ">" not in tokens[:-1]


nats_patterns = (
    st.lists(st.sampled_from(TOKENS), min_size=1, max_size=4).filter(well_formed).map(".".join)
)


def test_the_reference_matcher() -> None:
    assert nats_subject_matches("a.>", "a.b.c")
    assert not nats_subject_matches("a.>", "a")
    assert nats_subject_matches("*.b", "c.b")
    assert not nats_subject_matches("*.b", "c.b.a")
    assert len(CONCRETE) == 3 + 9 + 27 + 81 + 243


@given(nats_patterns, nats_patterns)
def test_subject_covers_means_what_it_says(pattern: str, subject: str) -> None:
    matched = [c for c in CONCRETE if nats_subject_matches(subject, c)]
    uncovered = [c for c in matched if not nats_subject_matches(pattern, c)]
    if subject_covers(pattern, subject):
        assert uncovered == []
    else:
        assert uncovered, f"{pattern!r} does not cover {subject!r}, but no subject shows it"


def test_subject_covers_every_pair_of_short_patterns() -> None:
    # The same claim exhaustively for patterns of up to 3 tokens.
    patterns = [
        ".".join(tokens)
        for n in range(1, 4)
        for tokens in itertools.product(TOKENS, repeat=n)
        if well_formed(list(tokens))
    ]
    matches = {p: {c for c in CONCRETE if nats_subject_matches(p, c)} for p in patterns}
    for pattern, subject in itertools.product(patterns, repeat=2):
        expected = matches[subject] <= matches[pattern]
        assert subject_covers(pattern, subject) is expected, (pattern, subject)


@pytest.mark.parametrize(
    ("subject", "pattern"),
    [
        ("daemoneye.web-01.events.>", "daemoneye.*.events.>"),
        ("daemoneye.h.events", "daemoneye.*.events"),
        ("daemoneye.h.events.*.lifecycle", "daemoneye.*.events.*.lifecycle"),
        ("daemoneye.*.x", "daemoneye.*.x"),
        ("daemoneye.all.control.>", "daemoneye.*.control.>"),
    ],
)
def test_host_pattern(subject: str, pattern: str) -> None:
    assert host_pattern(subject) == pattern


@pytest.mark.parametrize(
    "subject", ["daemoneye.h", "daemoneye", "other.h.events", "", "h.events.>"]
)
def test_host_pattern_refuses_what_is_not_a_bridge_subject(subject: str) -> None:
    with pytest.raises(InvalidSubject):
        host_pattern(subject)


@given(hosts, hosts, filters)
def test_the_host_pattern_of_a_filter_covers_it_on_every_host(
    host: str, other: str, filter: str
) -> None:
    for subject in filter_to_subjects(host, filter):
        pattern = host_pattern(subject)
        assert subject_covers(pattern, subject)
        assert pattern.split(".")[1] == "*"
    for subject in filter_to_subjects(other, filter):
        assert any(
            subject_covers(host_pattern(s), subject) for s in filter_to_subjects(host, filter)
        )


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ("daemoneye.*.events.>", "daemoneye.*.control.>", False),
        ("daemoneye.>", "daemoneye.*.control.>", True),
        ("daemoneye.*.*", "daemoneye.*.control.>", False),
        ("daemoneye.*.*.x", "daemoneye.*.control.>", True),
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
        ("a.*", "a", False),
        ("a.>", "a", False),
        ("*.b", "a.*", True),
        (">", "a.b.c", True),
    ],
)
def test_subjects_overlap(a: str, b: str, overlap: bool) -> None:
    assert subjects_overlap(a, b) is overlap
    assert subjects_overlap(b, a) is overlap
