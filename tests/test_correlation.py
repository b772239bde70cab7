"""Tests of daemoneye_eventbus.correlation: metadata helpers, bounds and filter matching."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemoneye.eventbus.v1 import correlation_pb2
from daemoneye_eventbus.correlation import (
    MAX_FILTER_ENTRIES,
    MAX_ID_BYTES,
    MAX_PATTERN_BYTES,
    MAX_SEQUENCE_NUMBER,
    MAX_STAGE_BYTES,
    MAX_TAG_KEY_BYTES,
    MAX_TAG_VALUE_BYTES,
    MAX_TAGS,
    CorrelationMatcher,
    correlation_filter,
    correlation_matches,
    create_child,
    new_correlation,
    next_in_sequence,
    validate_correlation_filter,
    validate_metadata,
    with_stage,
    with_tag,
    with_tags,
)
from daemoneye_eventbus.errors import EventBusError, InvalidCorrelation

Meta = correlation_pb2.CorrelationMetadata
Filter = correlation_pb2.CorrelationFilter


def _meta(
    cid: str = "c",
    *,
    parent: str | None = None,
    root: str | None = None,
    stage: str | None = None,
    tags: dict[str, str] | None = None,
    seq: int = 0,
) -> Meta:
    return Meta(
        correlation_id=cid,
        parent_correlation_id=parent,
        root_correlation_id=cid if root is None else root,
        workflow_stage=stage,
        tags=tags,
        sequence_number=seq,
    )


# --- helpers ------------------------------------------------------------------------------------


def test_new_correlation_with_id() -> None:
    before = time.time_ns()
    meta = new_correlation("wf-1")
    after = time.time_ns()
    assert meta.correlation_id == "wf-1"
    assert meta.root_correlation_id == "wf-1"
    assert not meta.HasField("parent_correlation_id")
    assert not meta.HasField("workflow_stage")
    assert len(meta.tags) == 0
    assert meta.sequence_number == 0
    assert before <= meta.created_at.ToNanoseconds() <= after


def test_new_correlation_generates_fresh_uuid4() -> None:
    first, second = new_correlation(), new_correlation(None)
    assert uuid.UUID(first.correlation_id).version == 4
    assert str(uuid.UUID(first.correlation_id)) == first.correlation_id
    assert first.root_correlation_id == first.correlation_id
    assert first.correlation_id != second.correlation_id


def test_with_stage_returns_copy() -> None:
    meta = new_correlation("wf")
    staged = with_stage(meta, "detection")
    assert staged.workflow_stage == "detection"
    assert not meta.HasField("workflow_stage")
    assert with_stage(staged, "enrichment").workflow_stage == "enrichment"
    assert staged.workflow_stage == "detection"
    assert staged.created_at == meta.created_at


def test_with_tag_returns_copy_and_replaces() -> None:
    meta = new_correlation("wf")
    tagged = with_tag(meta, "host", "web-1")
    assert dict(tagged.tags) == {"host": "web-1"}
    assert len(meta.tags) == 0
    again = with_tag(tagged, "host", "web-2")
    assert dict(again.tags) == {"host": "web-2"}
    assert dict(tagged.tags) == {"host": "web-1"}
    assert dict(with_tag(again, "empty", "").tags) == {"host": "web-2", "empty": ""}


def test_with_tags_sets_many() -> None:
    meta = with_tag(new_correlation("wf"), "a", "1")
    out = with_tags(meta, {"a": "2", "b": "3"})
    assert dict(out.tags) == {"a": "2", "b": "3"}
    assert dict(meta.tags) == {"a": "1"}


def test_create_child_inherits_and_resets() -> None:
    parent = next_in_sequence(with_tag(with_stage(new_correlation("root"), "detection"), "k", "v"))
    snapshot = Meta()
    snapshot.CopyFrom(parent)
    before = time.time_ns()
    child = create_child(parent)
    assert parent == snapshot
    assert uuid.UUID(child.correlation_id).version == 4
    assert child.parent_correlation_id == "root"
    assert child.root_correlation_id == "root"
    assert child.workflow_stage == "detection"
    assert dict(child.tags) == {"k": "v"}
    assert child.sequence_number == 0
    assert child.created_at.ToNanoseconds() >= before


def test_create_child_with_id_keeps_root_down_the_chain() -> None:
    root = new_correlation("root")
    child = create_child(root, "child")
    grandchild = create_child(child, "grandchild")
    assert (child.correlation_id, child.parent_correlation_id) == ("child", "root")
    assert grandchild.parent_correlation_id == "child"
    assert grandchild.root_correlation_id == "root"
    assert not grandchild.HasField("workflow_stage")


def test_create_child_refuses_own_id_and_bad_ids() -> None:
    root = new_correlation("root")
    with pytest.raises(InvalidCorrelation, match="parent's own id"):
        create_child(root, "root")
    with pytest.raises(InvalidCorrelation, match="empty"):
        create_child(root, "")
    with pytest.raises(InvalidCorrelation, match="257 bytes, the limit is 256"):
        create_child(root, "x" * 257)
    with pytest.raises(InvalidCorrelation, match="correlation_id is empty"):
        create_child(Meta())


def test_next_in_sequence() -> None:
    meta = new_correlation("wf")
    one = next_in_sequence(meta)
    two = next_in_sequence(one)
    assert (meta.sequence_number, one.sequence_number, two.sequence_number) == (0, 1, 2)
    assert two.correlation_id == "wf"
    assert two.created_at == meta.created_at


def test_next_in_sequence_refuses_overflow() -> None:
    meta = _meta(seq=MAX_SEQUENCE_NUMBER - 1)
    last = next_in_sequence(meta)
    assert last.sequence_number == MAX_SEQUENCE_NUMBER
    with pytest.raises(InvalidCorrelation, match="sequence_number"):
        next_in_sequence(last)


# --- metadata bounds ----------------------------------------------------------------------------

# (build metadata from a string of the given size, field named in the error, limit)
_STRING_BOUNDS: list[tuple[str, Callable[[str], Meta], str, int]] = [
    ("new", lambda s: new_correlation(s), "correlation_id", MAX_ID_BYTES),
    ("child", lambda s: create_child(new_correlation("p"), s), "correlation_id", MAX_ID_BYTES),
    ("stage", lambda s: with_stage(new_correlation("p"), s), "workflow_stage", MAX_STAGE_BYTES),
    ("tag key", lambda s: with_tag(new_correlation("p"), s, "v"), "tag key", MAX_TAG_KEY_BYTES),
    (
        "tag value",
        lambda s: with_tag(new_correlation("p"), "k", s),
        "tag value for key 'k'",
        MAX_TAG_VALUE_BYTES,
    ),
    ("validate id", lambda s: _validated(_meta(s, root="r")), "correlation_id", MAX_ID_BYTES),
    (
        "validate root",
        lambda s: _validated(_meta("c", root=s)),
        "root_correlation_id",
        MAX_ID_BYTES,
    ),
    (
        "validate parent",
        lambda s: _validated(_meta("c", parent=s)),
        "parent_correlation_id",
        MAX_ID_BYTES,
    ),
    (
        "validate stage",
        lambda s: _validated(_meta("c", stage=s)),
        "workflow_stage",
        MAX_STAGE_BYTES,
    ),
    (
        "validate tag key",
        lambda s: _validated(_meta("c", tags={s: "v"})),
        "tag key",
        MAX_TAG_KEY_BYTES,
    ),
    (
        "validate tag value",
        lambda s: _validated(_meta("c", tags={"k": s})),
        "tag value",
        MAX_TAG_VALUE_BYTES,
    ),
]


def _validated(meta: Meta) -> Meta:
    validate_metadata(meta)
    return meta


@pytest.mark.parametrize(
    ("build", "field", "limit"), [b[1:] for b in _STRING_BOUNDS], ids=[b[0] for b in _STRING_BOUNDS]
)
def test_string_bounds_in_bytes(build: Callable[[str], Meta], field: str, limit: int) -> None:
    build("x" * limit)
    build("é" * (limit // 2))  # 2 bytes each: exactly at the limit
    with pytest.raises(InvalidCorrelation, match=f"{limit + 1} bytes, the limit is {limit}") as e:
        build("x" * (limit + 1))
    assert field in str(e.value)
    assert isinstance(e.value, ValueError)
    assert isinstance(e.value, EventBusError)
    with pytest.raises(InvalidCorrelation, match=f"{limit + 1} bytes, the limit is {limit}"):
        build("é" * (limit // 2) + "a")  # fewer code points than the limit, too many bytes
    with pytest.raises(InvalidCorrelation, match=f"{limit + 2} bytes"):
        build("x" * (limit - 1) + "€")  # 3-byte character


def test_exact_error_message_for_long_id() -> None:
    with pytest.raises(InvalidCorrelation) as e:
        new_correlation("x" * 300)
    assert str(e.value) == "correlation_id is 300 bytes, the limit is 256"


def test_tag_count_bound() -> None:
    at_limit = with_tags(new_correlation("c"), {f"k{i}": "v" for i in range(MAX_TAGS)})
    assert len(at_limit.tags) == MAX_TAGS
    with_tag(at_limit, "k0", "replaced")  # replacing keeps the count
    with pytest.raises(InvalidCorrelation, match="65 tags, the limit is 64"):
        with_tag(at_limit, "one-more", "v")
    with pytest.raises(InvalidCorrelation) as e:
        validate_metadata(_meta(tags={f"k{i}": "v" for i in range(73)}))
    assert str(e.value) == "73 tags, the limit is 64"


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        (Meta(), "correlation_id is empty"),
        (_meta("c", root=""), "root_correlation_id is empty"),
        (_meta("c", parent=""), "parent_correlation_id is empty"),
        (_meta("c", stage=""), "workflow_stage is empty"),
        (_meta("c", tags={"": "v"}), "tag key '' is empty"),
    ],
)
def test_empty_fields_refused(meta: Meta, message: str) -> None:
    with pytest.raises(InvalidCorrelation) as e:
        validate_metadata(meta)
    assert str(e.value) == message


def test_empty_inputs_to_helpers_refused() -> None:
    meta = new_correlation("c")
    with pytest.raises(InvalidCorrelation, match="correlation_id is empty"):
        new_correlation("")
    with pytest.raises(InvalidCorrelation, match="workflow_stage is empty"):
        with_stage(meta, "")
    with pytest.raises(InvalidCorrelation, match="tag key '' is empty"):
        with_tag(meta, "", "v")


def test_lone_surrogate_refused_not_encoded() -> None:
    with pytest.raises(InvalidCorrelation, match="not valid UTF-8"):
        new_correlation("a\udc80")
    with pytest.raises(InvalidCorrelation, match="not valid UTF-8"):
        with_tag(new_correlation("c"), "k", "\ud800")
    with pytest.raises(InvalidCorrelation, match="not valid UTF-8"):
        correlation_filter(stages=["\udfff"])


def test_long_key_shortened_in_message() -> None:
    with pytest.raises(InvalidCorrelation) as e:
        with_tag(new_correlation("c"), "k" * 200, "v")
    assert len(str(e.value)) < 120
    assert "200 bytes, the limit is 128" in str(e.value)


def test_valid_metadata_passes() -> None:
    validate_metadata(_meta("c", parent="p", root="r", stage="s", tags={"k": ""}, seq=7))


# --- filter bounds ------------------------------------------------------------------------------

_LIST_FIELDS = [
    ("correlation_ids", "correlation_ids", MAX_ID_BYTES),
    ("patterns", "correlation_id_patterns", MAX_PATTERN_BYTES),
    ("parent_ids", "parent_correlation_ids", MAX_ID_BYTES),
    ("root_ids", "root_correlation_ids", MAX_ID_BYTES),
    ("stages", "workflow_stages", MAX_STAGE_BYTES),
]


@pytest.mark.parametrize(("arg", "field", "limit"), _LIST_FIELDS)
def test_filter_list_bounds(arg: str, field: str, limit: int) -> None:
    full = [f"e{i}" for i in range(MAX_FILTER_ENTRIES)]
    flt = correlation_filter(**{arg: full})  # type: ignore[arg-type]
    assert list(getattr(flt, field)) == full
    CorrelationMatcher(flt)
    with pytest.raises(InvalidCorrelation) as e:
        correlation_filter(**{arg: [*full, "more"]})  # type: ignore[arg-type]
    assert str(e.value) == f"{field} has 65 entries, the limit is 64"
    raw = Filter(**{field: [*full, "more"]})  # type: ignore[arg-type]
    with pytest.raises(InvalidCorrelation, match=f"{field} has 65 entries"):
        validate_correlation_filter(raw)
    with pytest.raises(InvalidCorrelation, match=f"{field} has 65 entries"):
        CorrelationMatcher(raw)

    correlation_filter(**{arg: ["x" * limit, "é" * (limit // 2)]})  # type: ignore[arg-type]
    with pytest.raises(InvalidCorrelation) as e:
        correlation_filter(**{arg: ["ok", "é" * (limit // 2) + "a"]})  # type: ignore[arg-type]
    assert str(e.value) == f"{field}[1] is {limit + 1} bytes, the limit is {limit}"
    with pytest.raises(InvalidCorrelation) as e:
        validate_correlation_filter(Filter(**{field: [""]}))  # type: ignore[arg-type]
    assert str(e.value) == f"{field}[0] is empty"


@pytest.mark.parametrize("arg", [a for a, _, _ in _LIST_FIELDS])
def test_filter_builder_refuses_bare_str(arg: str) -> None:
    with pytest.raises(TypeError, match="not a str"):
        correlation_filter(**{arg: "abc"})  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["required_tags", "any_tags"])
def test_filter_tag_map_bounds(field: str) -> None:
    full = {f"k{i}": "v" for i in range(MAX_TAGS)}
    CorrelationMatcher(correlation_filter(**{field: full}))  # type: ignore[arg-type]
    with pytest.raises(InvalidCorrelation) as e:
        correlation_filter(**{field: {**full, "more": "v"}})  # type: ignore[arg-type]
    assert str(e.value) == f"{field} has 65 entries, the limit is 64"
    with pytest.raises(InvalidCorrelation, match=f"{field} has 65 entries"):
        validate_correlation_filter(Filter(**{field: {**full, "more": "v"}}))  # type: ignore[arg-type]
    correlation_filter(**{field: {"k" * MAX_TAG_KEY_BYTES: "v" * MAX_TAG_VALUE_BYTES}})  # type: ignore[arg-type]
    with pytest.raises(InvalidCorrelation, match=f"{field} key .* 129 bytes, the limit is 128"):
        correlation_filter(**{field: {"k" * 129: "v"}})  # type: ignore[arg-type]
    with pytest.raises(InvalidCorrelation, match=f"{field} value .* 1025 bytes, the limit is 1024"):
        correlation_filter(**{field: {"k": "v" * 1025}})  # type: ignore[arg-type]
    with pytest.raises(InvalidCorrelation, match=f"{field} key '' is empty"):
        validate_correlation_filter(Filter(**{field: {"": "v"}}))  # type: ignore[arg-type]


def test_filter_sequence_range_bounds() -> None:
    correlation_filter(sequence_range=(3, 3))
    correlation_filter(sequence_range=(0, MAX_SEQUENCE_NUMBER))
    with pytest.raises(InvalidCorrelation) as e:
        correlation_filter(sequence_range=(5, 3))
    assert str(e.value) == "sequence_range min 5 is greater than its max 3"
    raw = Filter(sequence_range=correlation_pb2.SequenceRange(min=5, max=3))
    with pytest.raises(InvalidCorrelation, match="min 5 is greater than its max 3"):
        validate_correlation_filter(raw)
    with pytest.raises(InvalidCorrelation, match="min 5 is greater"):
        CorrelationMatcher(raw)
    with pytest.raises(InvalidCorrelation, match="sequence_range min -1"):
        correlation_filter(sequence_range=(-1, 3))
    with pytest.raises(InvalidCorrelation, match="sequence_range max"):
        correlation_filter(sequence_range=(0, MAX_SEQUENCE_NUMBER + 1))


def test_correlation_filter_builder_fields() -> None:
    flt = correlation_filter(
        correlation_ids=["a"],
        patterns=("p*",),
        parent_ids=iter(["par"]),
        root_ids={"r"},
        stages=["s"],
        required_tags={"k": "v"},
        any_tags={"x": "y"},
        sequence_range=(1, 2),
    )
    assert list(flt.correlation_ids) == ["a"]
    assert list(flt.correlation_id_patterns) == ["p*"]
    assert list(flt.parent_correlation_ids) == ["par"]
    assert list(flt.root_correlation_ids) == ["r"]
    assert list(flt.workflow_stages) == ["s"]
    assert dict(flt.required_tags) == {"k": "v"}
    assert dict(flt.any_tags) == {"x": "y"}
    assert (flt.sequence_range.min, flt.sequence_range.max) == (1, 2)
    empty = correlation_filter()
    assert empty == Filter()
    assert not empty.HasField("sequence_range")


# --- matching -----------------------------------------------------------------------------------


def test_empty_filter_matches_everything() -> None:
    matcher = CorrelationMatcher(Filter())
    assert matcher.is_empty
    assert matcher.matches(None)
    assert matcher.matches(Meta())
    assert matcher.matches(_meta("anything", stage="s", tags={"k": "v"}, seq=9))
    assert correlation_matches(correlation_filter(), None)


def test_non_empty_filter_never_matches_none() -> None:
    for flt in [
        correlation_filter(correlation_ids=["a"]),
        correlation_filter(patterns=["*"]),
        correlation_filter(any_tags={"k": "v"}),
        correlation_filter(sequence_range=(0, MAX_SEQUENCE_NUMBER)),
    ]:
        matcher = CorrelationMatcher(flt)
        assert not matcher.is_empty
        assert not matcher.matches(None)
    # A set range matching every number is still a criterion.
    assert CorrelationMatcher(correlation_filter(sequence_range=(0, MAX_SEQUENCE_NUMBER))).matches(
        _meta(seq=MAX_SEQUENCE_NUMBER)
    )


def test_correlation_ids_criterion() -> None:
    m = CorrelationMatcher(correlation_filter(correlation_ids=["a", "b"]))
    assert m.matches(_meta("a"))
    assert m.matches(_meta("b"))
    assert not m.matches(_meta("c"))
    assert not m.matches(_meta("ab"))


def test_parent_ids_criterion() -> None:
    m = CorrelationMatcher(correlation_filter(parent_ids=["p"]))
    assert m.matches(_meta("c", parent="p"))
    assert not m.matches(_meta("c", parent="q"))
    assert not m.matches(_meta("p"))  # no parent at all
    assert not m.matches(_meta("c", parent=""))  # unvalidated, set but empty


def test_root_ids_criterion() -> None:
    m = CorrelationMatcher(correlation_filter(root_ids=["r"]))
    assert m.matches(_meta("c", root="r"))
    assert m.matches(_meta("r"))
    assert not m.matches(_meta("c", root="s"))


def test_stages_criterion() -> None:
    m = CorrelationMatcher(correlation_filter(stages=["detection", "enrichment"]))
    assert m.matches(_meta(stage="detection"))
    assert m.matches(_meta(stage="enrichment"))
    assert not m.matches(_meta(stage="response"))
    assert not m.matches(_meta())  # stage unset


def test_required_tags_criterion() -> None:
    m = CorrelationMatcher(correlation_filter(required_tags={"a": "1", "b": ""}))
    assert m.matches(_meta(tags={"a": "1", "b": ""}))
    assert m.matches(_meta(tags={"a": "1", "b": "", "c": "3"}))
    assert not m.matches(_meta(tags={"a": "1"}))  # b missing: "" must be present
    assert not m.matches(_meta(tags={"a": "2", "b": ""}))
    assert not m.matches(_meta())


def test_any_tags_criterion() -> None:
    m = CorrelationMatcher(correlation_filter(any_tags={"a": "1", "b": "2"}))
    assert m.matches(_meta(tags={"a": "1"}))
    assert m.matches(_meta(tags={"b": "2", "z": "9"}))
    assert m.matches(_meta(tags={"a": "x", "b": "2"}))
    assert not m.matches(_meta(tags={"a": "2", "b": "1"}))
    assert not m.matches(_meta())


def test_required_and_any_tags_together() -> None:
    m = CorrelationMatcher(correlation_filter(required_tags={"env": "prod"}, any_tags={"a": "1"}))
    assert m.matches(_meta(tags={"env": "prod", "a": "1"}))
    assert not m.matches(_meta(tags={"env": "prod"}))
    assert not m.matches(_meta(tags={"a": "1"}))


def test_matching_does_not_insert_tags() -> None:
    meta = _meta(tags={"x": "1"})
    CorrelationMatcher(correlation_filter(required_tags={"a": "1"}, any_tags={"b": "2"})).matches(
        meta
    )
    assert dict(meta.tags) == {"x": "1"}


def test_sequence_range_inclusive() -> None:
    m = CorrelationMatcher(correlation_filter(sequence_range=(2, 4)))
    assert [m.matches(_meta(seq=n)) for n in range(7)] == [2 <= n <= 4 for n in range(7)]
    single = CorrelationMatcher(correlation_filter(sequence_range=(0, 0)))
    assert single.matches(_meta(seq=0))
    assert not single.matches(_meta(seq=1))


@pytest.mark.parametrize(
    ("pattern", "yes", "no"),
    [
        ("abc*", ["abc", "abcd", "abc-123"], ["ab", "xabc", "aabc"]),
        ("*x*", ["x", "ax", "xa", "axb", "xxx"], ["", "abc"]),
        ("a*b", ["ab", "axb", "abab", "a*b"], ["a", "b", "ba", "abc", "xab"]),
        ("abc", ["abc"], ["xabcx", "abcx", "xabc", "ab"]),
        ("*", ["a", "anything at all", "line\nbreak"], []),
        ("a.c", ["a.c"], ["abc", "a.cc"]),
        ("f(o)*", ["f(o)", "f(o)bar"], ["fo", "f(o"]),
        ("[a]+?|^$*", ["[a]+?|^$", "[a]+?|^$!"], ["a", "aa", ""]),
        ("a\\*", ["a\\", "a\\b"], ["a", "ab"]),
        ("a**b", ["ab", "a--b"], ["a"]),
        ("*a*a", ["aa", "aaa", "xaya"], ["a", "ab"]),
        ("ab*bc", ["abbc", "ab-bc"], ["abc"]),
        ("a*\n", ["a\n", "ab\n"], ["a"]),
        ("é*€", ["é€", "éx€"], ["e€"]),
    ],
)
def test_patterns(pattern: str, yes: list[str], no: list[str]) -> None:
    m = CorrelationMatcher(correlation_filter(patterns=[pattern]))
    for cid in yes:
        assert m.matches(_meta(cid)), (pattern, cid)
    for cid in no:
        assert not m.matches(_meta(cid)), (pattern, cid)


def test_several_patterns_any_matches() -> None:
    m = CorrelationMatcher(correlation_filter(patterns=["exact", "pre*", "*suf"]))
    assert m.matches(_meta("exact"))
    assert m.matches(_meta("prefix"))
    assert m.matches(_meta("the-suf"))
    assert not m.matches(_meta("exactly"))
    assert not m.matches(_meta("other"))


def test_pathological_pattern_is_fast() -> None:
    # Without atomic groups this backtracks O(n**12) on a 256-byte id.
    m = CorrelationMatcher(correlation_filter(patterns=["*a" * 12 + "*b"] * 64))
    start = time.perf_counter()
    assert not m.matches(_meta("a" * MAX_ID_BYTES))
    assert time.perf_counter() - start < 1.0


def test_criteria_are_anded() -> None:
    flt = correlation_filter(
        correlation_ids=["c1", "c2"],
        patterns=["c*"],
        parent_ids=["p"],
        root_ids=["r"],
        stages=["s"],
        required_tags={"k": "v"},
        any_tags={"a": "1", "b": "2"},
        sequence_range=(1, 3),
    )
    good: dict[str, object] = {
        "cid": "c1",
        "parent": "p",
        "root": "r",
        "stage": "s",
        "tags": {"k": "v", "b": "2"},
        "seq": 2,
    }
    m = CorrelationMatcher(flt)
    assert m.matches(_meta(**good))  # type: ignore[arg-type]
    for key, bad in [
        ("cid", "c3"),
        ("parent", "q"),
        ("parent", None),
        ("root", "x"),
        ("stage", "t"),
        ("stage", None),
        ("tags", {"b": "2"}),
        ("tags", {"k": "v"}),
        ("seq", 4),
        ("seq", 0),
    ]:
        assert not m.matches(_meta(**{**good, key: bad})), (key, bad)  # type: ignore[arg-type]
    # ids and patterns are separate criteria: both must hold.
    both = CorrelationMatcher(correlation_filter(correlation_ids=["x1", "y1"], patterns=["x*"]))
    assert both.matches(_meta("x1"))
    assert not both.matches(_meta("y1"))
    assert not both.matches(_meta("x2"))


def test_matcher_is_independent_of_later_filter_changes() -> None:
    flt = correlation_filter(correlation_ids=["a"])
    m = CorrelationMatcher(flt)
    flt.correlation_ids.append("b")
    flt.workflow_stages.append("s")
    assert m.matches(_meta("a"))
    assert not m.matches(_meta("b"))
    assert "non-empty" in repr(m)


def test_filter_matches_convenience() -> None:
    flt = correlation_filter(stages=["s"])
    assert correlation_matches(flt, _meta(stage="s"))
    assert not correlation_matches(flt, _meta(stage="t"))
    assert not correlation_matches(flt, None)
    with pytest.raises(InvalidCorrelation):
        correlation_matches(Filter(correlation_ids=[""]), _meta())


def test_helpers_feed_matchers() -> None:
    root = with_stage(new_correlation(), "detection")
    child = with_stage(create_child(root), "enrichment")
    by_root = CorrelationMatcher(correlation_filter(root_ids=[root.correlation_id]))
    by_parent = CorrelationMatcher(correlation_filter(parent_ids=[root.correlation_id]))
    assert by_root.matches(root)
    assert by_root.matches(child)
    assert not by_parent.matches(root)
    assert by_parent.matches(child)


# --- property test against a reference implementation ------------------------------------------


def _glob_reference(pattern: str, text: str) -> bool:
    """Straightforward dynamic programming: ``*`` is any run, all else literal."""
    # reachable[j]: pattern[:i] can match text[:j]
    reachable = [True] + [False] * len(text)
    for char in pattern:
        if char == "*":
            seen = False
            for j in range(len(text) + 1):
                seen = seen or reachable[j]
                reachable[j] = seen
        else:
            reachable = [False] + [reachable[j] and text[j] == char for j in range(len(text))]
    return reachable[len(text)]


def _reference_matches(flt: Filter, meta: Meta | None) -> bool:
    empty = (
        not flt.correlation_ids
        and not flt.correlation_id_patterns
        and not flt.parent_correlation_ids
        and not flt.root_correlation_ids
        and not flt.workflow_stages
        and not flt.required_tags
        and not flt.any_tags
        and not flt.HasField("sequence_range")
    )
    if meta is None:
        return empty
    tags = dict(meta.tags)
    checks = [
        not flt.correlation_ids or meta.correlation_id in list(flt.correlation_ids),
        not flt.correlation_id_patterns
        or any(_glob_reference(p, meta.correlation_id) for p in flt.correlation_id_patterns),
        not flt.parent_correlation_ids
        or (
            meta.HasField("parent_correlation_id")
            and meta.parent_correlation_id in list(flt.parent_correlation_ids)
        ),
        not flt.root_correlation_ids or meta.root_correlation_id in list(flt.root_correlation_ids),
        not flt.workflow_stages
        or (meta.HasField("workflow_stage") and meta.workflow_stage in list(flt.workflow_stages)),
        all(k in tags and tags[k] == v for k, v in flt.required_tags.items()),
        not flt.any_tags or any(k in tags and tags[k] == v for k, v in flt.any_tags.items()),
        not flt.HasField("sequence_range")
        or flt.sequence_range.min <= meta.sequence_number <= flt.sequence_range.max,
    ]
    return all(checks)


_ids = st.text(alphabet="ab.(", min_size=1, max_size=4)
_patterns = st.text(alphabet="ab.(*", min_size=1, max_size=6)
_stages = st.sampled_from(["detect", "enrich", "respond"])
_tag_maps = st.dictionaries(
    st.sampled_from(["k1", "k2", "k3"]), st.sampled_from(["", "x", "y"]), max_size=3
)


@st.composite
def _metadata(draw: st.DrawFn) -> Meta | None:
    if draw(st.integers(0, 9)) == 0:
        return None
    return Meta(
        correlation_id=draw(_ids),
        parent_correlation_id=draw(st.none() | _ids),
        root_correlation_id=draw(_ids),
        workflow_stage=draw(st.none() | _stages),
        tags=draw(_tag_maps),
        sequence_number=draw(st.integers(0, 6)),
    )


@st.composite
def _filters(draw: st.DrawFn) -> Filter:
    def some(strategy: st.SearchStrategy[str]) -> list[str]:
        # Mostly absent, so that the surviving criteria match often enough to be interesting.
        return draw(st.just([]) | st.lists(strategy, min_size=1, max_size=3))

    flt = Filter(
        correlation_ids=some(_ids),
        correlation_id_patterns=some(_patterns),
        parent_correlation_ids=some(_ids),
        root_correlation_ids=some(_ids),
        workflow_stages=some(_stages),
        required_tags=draw(st.just({}) | _tag_maps),
        any_tags=draw(st.just({}) | _tag_maps),
    )
    if draw(st.booleans()):
        low, high = sorted(draw(st.lists(st.integers(0, 6), min_size=2, max_size=2)))
        flt.sequence_range.min, flt.sequence_range.max = low, high
    return flt


@settings(max_examples=200, deadline=None)
@given(flt=_filters(), metas=st.lists(_metadata(), min_size=1, max_size=5))
def test_matcher_agrees_with_reference(flt: Filter, metas: list[Meta | None]) -> None:
    matcher = CorrelationMatcher(flt)
    for meta in metas:
        assert matcher.matches(meta) == _reference_matches(flt, meta)


@settings(max_examples=200, deadline=None)
@given(
    patterns=st.lists(st.text(alphabet="ab*", min_size=1, max_size=8), min_size=1, max_size=3),
    cid=st.text(alphabet="ab", min_size=1, max_size=10),
)
def test_patterns_agree_with_reference_glob(patterns: list[str], cid: str) -> None:
    expected = any(_glob_reference(p, cid) for p in patterns)
    assert correlation_matches(correlation_filter(patterns=patterns), _meta(cid)) == expected


@settings(max_examples=200, deadline=None)
@given(
    cid=_ids,
    stage=_stages,
    key=st.sampled_from(["k1", "k2"]),
    value=st.text(st.characters(codec="utf-8"), max_size=5),
)
def test_helpers_never_mutate_and_always_validate(
    cid: str, stage: str, key: str, value: str
) -> None:
    base = new_correlation(cid)
    snapshot = base.SerializeToString(deterministic=True)
    for out in (
        with_stage(base, stage),
        with_tag(base, key, value),
        next_in_sequence(base),
        create_child(base),
    ):
        validate_metadata(out)
        assert out is not base
        assert out.root_correlation_id == cid
    assert base.SerializeToString(deterministic=True) == snapshot
