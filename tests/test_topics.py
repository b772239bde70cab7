"""Tests of the topic grammar, filter matching and the subscription trie."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemoneye_eventbus.errors import EventBusError, InvalidTopic
from daemoneye_eventbus.topics import (
    DEFAULT_MAX_TOPIC_BYTES,
    DEFAULT_MAX_TOPIC_LEVELS,
    SubscriptionTrie,
    split_topic,
    topic_matches,
    validate_topic,
    validate_topic_filter,
)

# --------------------------------------------------------------------------
# Helpers


def _reject_topic(topic: Any, **kwargs: int) -> str:
    with pytest.raises(InvalidTopic) as info:
        validate_topic(topic, **kwargs)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, EventBusError)
    return str(info.value)


def _reject_filter(filter_: Any, **kwargs: int) -> str:
    with pytest.raises(InvalidTopic) as info:
        validate_topic_filter(filter_, **kwargs)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, EventBusError)
    return str(info.value)


class _NoScanStr(str):
    """A str that fails the test if anything splits or scans it."""

    __slots__ = ()

    def split(self, *args: Any, **kwargs: Any) -> list[str]:
        raise AssertionError("split() called on an oversized string")

    def count(self, *args: Any, **kwargs: Any) -> int:
        raise AssertionError("count() called on an oversized string")

    def encode(self, *args: Any, **kwargs: Any) -> bytes:
        raise AssertionError("encode() called on an oversized string")

    def __iter__(self) -> Any:
        raise AssertionError("iterated over an oversized string")


class _NoSplitStr(str):
    """A str that fails the test if anything splits or iterates it."""

    __slots__ = ()

    def split(self, *args: Any, **kwargs: Any) -> list[str]:
        raise AssertionError("split() called before the level limit was checked")

    def __iter__(self) -> Any:
        raise AssertionError("iterated before the level limit was checked")


# --------------------------------------------------------------------------
# Constants and helpers


def test_defaults() -> None:
    assert DEFAULT_MAX_TOPIC_BYTES == 255
    assert DEFAULT_MAX_TOPIC_LEVELS == 16


def test_split_topic() -> None:
    assert split_topic("a") == ("a",)
    assert split_topic("events.process.#") == ("events", "process", "#")


# --------------------------------------------------------------------------
# validate_topic: accepted


@pytest.mark.parametrize(
    "topic",
    [
        "a",
        "events",
        "events.process.lifecycle",
        "A-b_C.0-9.__.--",
        "x" * 255,
        ".".join(["a"] * 16),
        "UPPER.lower.MiXeD",
    ],
)
def test_valid_topics(topic: str) -> None:
    validate_topic(topic)
    validate_topic_filter(topic)  # every valid topic is a valid filter


# --------------------------------------------------------------------------
# validate_topic / validate_topic_filter: rejected


@pytest.mark.parametrize(
    ("topic", "fragment"),
    [
        ("", "empty"),
        (".", "level 1 is empty"),
        (".a", "level 1 is empty (leading '.')"),
        ("a.", "level 2 is empty (trailing '.')"),
        ("a..b", "level 2 is empty (consecutive '..')"),
        ("a.b..", "level 3 is empty"),
        ("a b", "character ' ' (U+0020) is not allowed in topic level 1"),
        ("a.b\x00", "character '\\x00' (U+0000) is not allowed in topic level 2"),
        ("a.café", "character 'é' (U+00E9) is not allowed in topic level 2"),
        ("a.b/c", "character '/' (U+002F) is not allowed in topic level 2"),
        ("a\n", "character '\\n'"),
        ("a.b\t", "character '\\t'"),
        ("a.b*", "character '*'"),
        ("a.\ud800", "level 2"),  # lone surrogate
        ("+", "wildcard '+' is not allowed in a published topic (level 1)"),
        ("#", "wildcard '#' is not allowed in a published topic (level 1)"),
        ("a.+.c", "wildcard '+' is not allowed in a published topic (level 2)"),
        ("a.#", "wildcard '#' is not allowed in a published topic (level 2)"),
        ("a.b#", "wildcard '#' is not allowed in a published topic"),
        ("+a", "wildcard '+' is not allowed in a published topic"),
    ],
)
def test_invalid_topics(topic: str, fragment: str) -> None:
    assert fragment in _reject_topic(topic)


@pytest.mark.parametrize(
    ("filter_", "fragment"),
    [
        ("", "filter is empty"),
        (".", "filter level 1 is empty"),
        (".#", "filter level 1 is empty (leading '.')"),
        ("a.", "filter level 2 is empty (trailing '.')"),
        ("a..#", "filter level 2 is empty (consecutive '..')"),
        ("a.+.", "filter level 3 is empty"),
        ("a b", "character ' ' (U+0020) is not allowed in filter level 1"),
        ("+.\x00", "character '\\x00' (U+0000) is not allowed in filter level 2"),
        ("+.ü", "character 'ü' (U+00FC) is not allowed in filter level 2"),
        ("a.#.b", "wildcard '#' may only be the last level of a filter, but it is level 2 of 3"),
        ("#.a", "wildcard '#' may only be the last level of a filter, but it is level 1 of 2"),
        ("#.#", "wildcard '#' may only be the last level"),
        ("a.b#", "wildcard '#' must be a whole level, but filter level 2 is 'b#'"),
        ("a.#b", "wildcard '#' must be a whole level, but filter level 2 is '#b'"),
        ("+a", "wildcard '+' must be a whole level, but filter level 1 is '+a'"),
        ("a.b+", "wildcard '+' must be a whole level, but filter level 2 is 'b+'"),
        ("##", "wildcard '#' must be a whole level, but filter level 1 is '##'"),
        ("++", "wildcard '+' must be a whole level, but filter level 1 is '++'"),
        ("+#", "must be a whole level"),
        ("a.++.b", "must be a whole level"),
    ],
)
def test_invalid_filters(filter_: str, fragment: str) -> None:
    assert fragment in _reject_filter(filter_)


@pytest.mark.parametrize(
    "filter_",
    ["#", "+", "a.#", "a.+", "+.+.+", "+.#", "a.+.c.#", "events.process.#", "A.b-c_d.+"],
)
def test_valid_filters(filter_: str) -> None:
    validate_topic_filter(filter_)


@pytest.mark.parametrize("value", [None, 1, 1.5, b"a.b", ["a"], ("a",), object()])
def test_non_str_is_rejected(value: object) -> None:
    assert "must be a str" in _reject_topic(value)
    assert "must be a str" in _reject_filter(value)


def test_str_subclass_is_accepted() -> None:
    class Sub(str):
        __slots__ = ()

    validate_topic(Sub("a.b"))
    validate_topic_filter(Sub("a.#"))


# --------------------------------------------------------------------------
# Limits


def test_byte_limit_default() -> None:
    validate_topic("a" * 255)
    message = _reject_topic("a" * 256)
    assert message == "topic is 256 bytes long, the limit is 255"
    message = _reject_filter("a" * 300)
    assert message == "filter is 300 bytes long, the limit is 255"


def test_byte_limit_counts_utf8_bytes() -> None:
    # 200 characters but 400 bytes: refused by its byte length, first.
    message = _reject_topic("é" * 200)
    assert message == "topic is 400 bytes long, the limit is 255"
    # Longer in characters than the limit: refused without encoding.
    message = _reject_topic("é" * 300)
    assert message == "topic is at least 300 bytes long, the limit is 255"


def test_level_limit_default() -> None:
    validate_topic(".".join(["a"] * 16))
    validate_topic_filter(".".join(["+"] * 15 + ["#"]))
    message = _reject_topic(".".join(["a"] * 17))
    assert message == "topic has 17 levels, the limit is 16"
    message = _reject_filter(".".join(["+"] * 20))
    assert message == "filter has 20 levels, the limit is 16"


def test_limits_checked_before_grammar() -> None:
    # Over both the byte limit and the grammar: the limit wins.
    assert "limit" in _reject_topic("." * 1000)
    # Over the level limit and the grammar: the limit wins.
    assert "levels, the limit is 16" in _reject_topic("." * 30)


def test_custom_limits() -> None:
    validate_topic("a" * 1000, max_bytes=1000)
    validate_topic(".".join(["a"] * 40), max_levels=40)
    validate_topic_filter(".".join(["+"] * 40), max_levels=40)
    assert _reject_topic("abcd", max_bytes=3) == "topic is 4 bytes long, the limit is 3"
    assert _reject_filter("a.b.#", max_levels=2) == "filter has 3 levels, the limit is 2"
    assert _reject_topic("a.b", max_levels=1) == "topic has 2 levels, the limit is 1"
    # Exactly at the limit is fine.
    validate_topic("abc", max_bytes=3)
    validate_topic_filter("a.#", max_levels=2)


def test_huge_string_refused_by_length_without_scanning() -> None:
    huge = _NoScanStr("a" * (1 << 20))
    message = _reject_topic(huge)
    assert message == f"topic is {1 << 20} bytes long, the limit is 255"
    message = _reject_filter(huge)
    assert message == f"filter is {1 << 20} bytes long, the limit is 255"


def test_huge_level_count_refused() -> None:
    many = ".".join(["+"] * 10_000)
    # Default limits: refused by its length alone, unscanned.
    assert "bytes long, the limit is 255" in _reject_filter(_NoScanStr(many))
    # With room for the bytes, refused by its level count before any split.
    message = _reject_filter(_NoSplitStr(many), max_bytes=1 << 20)
    assert message == "filter has 10000 levels, the limit is 16"
    message = _reject_topic(_NoSplitStr(".".join(["a"] * 10_000)), max_bytes=1 << 20)
    assert message == "topic has 10000 levels, the limit is 16"


# --------------------------------------------------------------------------
# matches


@pytest.mark.parametrize(
    ("filter_", "topic", "expected"),
    [
        # '#' alone matches everything, a single level included.
        ("#", "a", True),
        ("#", "a.b.c", True),
        # 'x.#' matches 'x' itself and everything below it.
        ("a.#", "a", True),
        ("a.#", "a.b", True),
        ("a.#", "a.b.c.d", True),
        ("a.#", "b", False),
        ("a.#", "ab", False),
        ("a.#", "b.a", False),
        ("events.process.#", "events.process", True),
        ("events.process.#", "events.process.lifecycle", True),
        ("events.process.#", "events.network", False),
        ("events.process.#", "events", False),
        # '+' is exactly one level.
        ("+", "a", True),
        ("+", "a.b", False),
        ("a.+", "a", False),
        ("a.+", "a.b", True),
        ("a.+", "a.b.c", False),
        ("a.+.c", "a.b.c", True),
        ("a.+.c", "a.c", False),
        ("a.+.c", "a.b.x.c", False),
        ("a.+.c", "a.b.d", False),
        ("+.+", "a.b", True),
        ("+.+", "a", False),
        ("+.#", "a", True),
        ("+.#", "a.b.c", True),
        ("a.+.#", "a", False),
        ("a.+.#", "a.b", True),
        ("a.+.#", "a.b.c", True),
        # Exact filters.
        ("a.b.c", "a.b.c", True),
        ("a.b", "a.b.c", False),
        ("a.b.c", "a.b", False),
        ("a", "ab", False),
        # Case-sensitive.
        ("Events.#", "events.x", False),
        ("a.B", "a.b", False),
        ("a.b", "a.b", True),
    ],
)
def test_matches(filter_: str, topic: str, expected: bool) -> None:
    validate_topic_filter(filter_)
    validate_topic(topic)
    assert topic_matches(filter_, topic) is expected


# --------------------------------------------------------------------------
# SubscriptionTrie: unit tests


def test_trie_empty() -> None:
    trie: SubscriptionTrie[str] = SubscriptionTrie()
    assert len(trie) == 0
    assert not trie
    assert trie.match("a.b") == set()
    assert trie._node_count() == 1
    assert list(trie.filters()) == []
    assert list(trie.items()) == []
    assert "a" not in trie


def test_trie_insert_and_match() -> None:
    trie: SubscriptionTrie[str] = SubscriptionTrie()
    trie.insert("#", "all")
    trie.insert("a.#", "a-all")
    trie.insert("a.+", "a-one")
    trie.insert("a.b", "a-b")
    trie.insert("+.b", "any-b")
    trie.insert("a.b.c", "a-b-c")
    assert len(trie) == 6
    assert trie.match("a") == {"all", "a-all"}
    assert trie.match("a.b") == {"all", "a-all", "a-one", "a-b", "any-b"}
    assert trie.match("a.c") == {"all", "a-all", "a-one"}
    assert trie.match("a.b.c") == {"all", "a-all", "a-b-c"}
    assert trie.match("x.b") == {"all", "any-b"}
    assert trie.match("x") == {"all"}
    assert trie.match("A.b") == {"all", "any-b"}


def test_trie_same_value_several_filters_no_duplicates() -> None:
    trie: SubscriptionTrie[int] = SubscriptionTrie()
    trie.insert("a.#", 1)
    trie.insert("a.+", 1)
    trie.insert("#", 1)
    trie.insert("a.b", 2)
    assert len(trie) == 4
    assert trie.match("a.b") == {1, 2}
    assert set(trie.filters()) == {"a.#", "a.+", "#", "a.b"}


def test_trie_duplicate_pair_kept_once() -> None:
    trie: SubscriptionTrie[str] = SubscriptionTrie()
    trie.insert("a.b", "x")
    trie.insert("a.b", "x")
    assert len(trie) == 1
    assert list(trie.items()) == [("a.b", "x")]
    assert trie.remove("a.b", "x") is True
    assert trie.remove("a.b", "x") is False
    assert len(trie) == 0
    assert trie._node_count() == 1


def test_trie_remove_prunes_only_empty_nodes() -> None:
    trie: SubscriptionTrie[str] = SubscriptionTrie()
    trie.insert("a.b.c.d", "deep")
    trie.insert("a.b", "mid")
    assert trie._node_count() == 5
    assert trie.remove("a.b.c.d", "deep")
    # "a" and "a.b" remain (a.b still holds a value).
    assert trie._node_count() == 3
    assert trie.match("a.b") == {"mid"}
    assert trie.remove("a.b", "mid")
    assert trie._node_count() == 1
    assert len(trie) == 0


def test_trie_remove_absent() -> None:
    trie: SubscriptionTrie[str] = SubscriptionTrie()
    trie.insert("a.b", "x")
    assert trie.remove("a.b", "y") is False
    assert trie.remove("a", "x") is False
    assert trie.remove("a.b.c", "x") is False
    assert trie.remove("a..b", "x") is False  # invalid: never present
    assert trie.remove(123, "x") is False  # type: ignore[arg-type]
    assert len(trie) == 1
    assert trie._node_count() == 3


def test_trie_insert_validates() -> None:
    trie: SubscriptionTrie[str] = SubscriptionTrie()
    with pytest.raises(InvalidTopic, match="may only be the last level"):
        trie.insert("a.#.b", "x")
    with pytest.raises(InvalidTopic, match="limit"):
        trie.insert("a" * 256, "x")
    assert len(trie) == 0
    assert trie._node_count() == 1


def test_trie_custom_limits() -> None:
    trie: SubscriptionTrie[str] = SubscriptionTrie(max_bytes=1000, max_levels=40)
    long_filter = ".".join(["+"] * 39 + ["#"])
    trie.insert(long_filter, "x")
    assert trie.match(".".join(["a"] * 45)) == {"x"}
    strict: SubscriptionTrie[str] = SubscriptionTrie(max_levels=2)
    with pytest.raises(InvalidTopic, match="3 levels, the limit is 2"):
        strict.insert("a.b.c", "x")


def test_trie_unhashable_value() -> None:
    trie: SubscriptionTrie[Any] = SubscriptionTrie()
    with pytest.raises(TypeError):
        trie.insert("a", [])


def test_trie_lookup_helpers() -> None:
    trie: SubscriptionTrie[str] = SubscriptionTrie()
    trie.insert("a.+", "x")
    trie.insert("a.+", "y")
    trie.insert("a.+.c", "z")
    assert "a.+" in trie
    assert "a" not in trie  # a node but no value
    assert "a.b" not in trie  # no exact filter, though it matches
    assert 42 not in trie
    assert trie.has("a.+", "x")
    assert not trie.has("a.+", "z")
    assert not trie.has("q", "x")
    assert trie.values("a.+") == frozenset({"x", "y"})
    assert trie.values("nope") == frozenset()
    assert sorted(trie.filters()) == ["a.+", "a.+.c"]
    assert sorted(trie.items()) == [("a.+", "x"), ("a.+", "y"), ("a.+.c", "z")]
    assert "3 subscriptions" in repr(trie)
    trie.clear()
    assert len(trie) == 0
    assert trie._node_count() == 1
    assert trie.match("a.b") == set()


def test_trie_match_returns_fresh_set() -> None:
    trie: SubscriptionTrie[str] = SubscriptionTrie()
    trie.insert("a", "x")
    first = trie.match("a")
    first.add("intruder")
    first.discard("x")
    assert trie.match("a") == {"x"}


def test_trie_match_wide_trie_is_level_walk() -> None:
    # Many subscriptions on unrelated branches do not affect the result.
    trie: SubscriptionTrie[int] = SubscriptionTrie()
    for i in range(2000):
        trie.insert(f"branch{i}.leaf", i)
    trie.insert("branch7.+", -1)
    assert trie.match("branch7.leaf") == {7, -1}
    assert trie.match("branch7.other") == {-1}
    assert trie.match("nobranch.leaf") == set()


# --------------------------------------------------------------------------
# Property tests

_LEVELS = ["a", "b", "c"]

level_st = st.sampled_from(_LEVELS)
topic_st = st.lists(level_st, min_size=1, max_size=5).map(".".join)


@st.composite
def filter_st(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.sampled_from([*_LEVELS, "+"]), min_size=0, max_size=5))
    if not levels or draw(st.booleans()):
        levels.append("#")
    return ".".join(levels)


def _reference_matches(filter_: str, topic: str) -> bool:
    """Independent oracle: translate the filter into a regex."""
    levels = filter_.split(".")
    tail = ""
    if levels[-1] == "#":
        levels.pop()
        tail = r"(?:\..+)?" if levels else r".+"
    body = r"\.".join(r"[^.]+" if level == "+" else re.escape(level) for level in levels)
    return re.fullmatch(body + tail, topic) is not None


_REFERENCE_TOPIC = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
_REFERENCE_FILTER = re.compile(r"(?:[A-Za-z0-9_-]+|\+)(?:\.(?:[A-Za-z0-9_-]+|\+))*(?:\.#)?|#")


@settings(max_examples=200, deadline=None)
@given(topic_st)
def test_generated_topics_are_valid(topic: str) -> None:
    validate_topic(topic)
    validate_topic_filter(topic)


@settings(max_examples=200, deadline=None)
@given(filter_st())
def test_generated_filters_are_valid(filter_: str) -> None:
    validate_topic_filter(filter_)
    if "+" in filter_ or "#" in filter_:
        with pytest.raises(InvalidTopic, match="not allowed in a published topic"):
            validate_topic(filter_)
    else:
        validate_topic(filter_)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab.+#\x00 é-_Z", max_size=20))
def test_validation_agrees_with_reference_grammar(text: str) -> None:
    def accepted(validate: Any) -> bool:
        try:
            validate(text)
        except InvalidTopic as exc:
            message = str(exc)
        else:
            return True
        assert message  # every refusal says why
        return False

    expect_topic = _REFERENCE_TOPIC.fullmatch(text) is not None and text.count(".") < 16
    expect_filter = _REFERENCE_FILTER.fullmatch(text) is not None and text.count(".") < 16
    assert accepted(validate_topic) is expect_topic
    assert accepted(validate_topic_filter) is expect_filter


@settings(max_examples=200, deadline=None)
@given(filter_st(), topic_st)
def test_matches_agrees_with_reference(filter_: str, topic: str) -> None:
    assert topic_matches(filter_, topic) is _reference_matches(filter_, topic)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(filter_st(), st.integers(0, 5)), max_size=30),
    st.lists(topic_st, min_size=1, max_size=10),
)
def test_trie_match_agrees_with_matches(pairs: list[tuple[str, int]], topics: list[str]) -> None:
    trie: SubscriptionTrie[int] = SubscriptionTrie()
    for filter_, value in pairs:
        trie.insert(filter_, value)
    assert len(trie) == len(set(pairs))
    assert set(trie.items()) == set(pairs)
    for topic in topics:
        expected = {v for (f, v) in pairs if topic_matches(f, topic)}
        assert trie.match(topic) == expected


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(filter_st(), st.integers(0, 5)), max_size=30),
    st.randoms(use_true_random=False),
)
def test_trie_insert_remove_round_trip(pairs: list[tuple[str, int]], rnd: Any) -> None:
    trie: SubscriptionTrie[int] = SubscriptionTrie()
    for filter_, value in pairs:
        trie.insert(filter_, value)
    order = list(pairs)
    rnd.shuffle(order)
    removed: set[tuple[str, int]] = set()
    for filter_, value in order:
        assert trie.remove(filter_, value) is ((filter_, value) not in removed)
        removed.add((filter_, value))
        assert len(trie) == len(set(pairs) - removed)
    assert len(trie) == 0
    assert not trie
    assert trie._node_count() == 1
    assert list(trie.items()) == []


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(filter_st(), st.integers(0, 5)), max_size=30),
    st.data(),
    st.lists(topic_st, min_size=1, max_size=5),
)
def test_trie_partial_removal_agrees_with_model(
    pairs: list[tuple[str, int]], data: st.DataObject, topics: list[str]
) -> None:
    trie: SubscriptionTrie[int] = SubscriptionTrie()
    for filter_, value in pairs:
        trie.insert(filter_, value)
    unique = sorted(set(pairs))
    to_remove = data.draw(st.lists(st.sampled_from(unique), unique=True) if unique else st.just([]))
    for filter_, value in to_remove:
        assert trie.remove(filter_, value)
    model = set(unique) - set(to_remove)
    assert len(trie) == len(model)
    assert set(trie.items()) == model
    for topic in topics:
        assert trie.match(topic) == {v for (f, v) in model if topic_matches(f, topic)}
    # Removing everything left returns the trie to just its root.
    for filter_, value in model:
        assert trie.remove(filter_, value)
    assert trie._node_count() == 1
