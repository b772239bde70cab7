"""Correlation metadata and correlation filters.

Helpers around the generated ``CorrelationMetadata`` and ``CorrelationFilter``
messages of ``daemoneye/eventbus/v1/correlation.proto``, named after the Rust
reference API (``CorrelationMetadata::new``, ``with_stage``, ``with_tag``,
``create_child``, filter matching)::

    root = new_correlation()                      # fresh uuid4, root of a workflow
    step = with_tag(with_stage(root, "detection"), "host", "web-1")
    child = create_child(step)                    # same root, parent = step
    flt = correlation_filter(root_ids=[root.correlation_id], stages=["detection"])
    CorrelationMatcher(flt).matches(step)         # True

Every helper returns a new message and never mutates its argument. Every
helper validates what it produces and raises :class:`InvalidCorrelation`
(also a :class:`ValueError`) instead of truncating.

Bounds (byte lengths are UTF-8 lengths):

* ids (``correlation_id``, ``parent_correlation_id``, ``root_correlation_id``):
  1 to :data:`MAX_ID_BYTES` bytes; the parent id is optional but, when set,
  must not be empty;
* ``workflow_stage``: optional, 1 to :data:`MAX_STAGE_BYTES` bytes when set;
* ``tags``: at most :data:`MAX_TAGS` entries, keys 1 to
  :data:`MAX_TAG_KEY_BYTES` bytes, values 0 to :data:`MAX_TAG_VALUE_BYTES`;
* filters: at most :data:`MAX_FILTER_ENTRIES` entries in each repeated field,
  at most :data:`MAX_TAGS` entries in each tag map (same key/value bounds as
  metadata tags), no empty entries, ids and stages bounded as above, patterns
  1 to :data:`MAX_PATTERN_BYTES` bytes, and ``sequence_range.min <= max``.

Patterns: ``*`` matches any run of characters (including none, including
newlines); every other character is literal; a pattern is anchored at both
ends, so ``abc`` matches only ``abc``. There is no escape for a literal ``*``.
Patterns compile to regular expressions whose inner segments sit in atomic
groups, so a hostile pattern such as ``*a*a*a*a*b`` cannot make matching
backtrack exponentially.

This module is pure: no I/O, no event loop.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterable, Mapping

from daemoneye.eventbus.v1 import correlation_pb2
from daemoneye_eventbus.deprecation import deprecated_names
from daemoneye_eventbus.errors import InvalidCorrelation

__all__ = [
    "MAX_FILTER_ENTRIES",
    "MAX_ID_BYTES",
    "MAX_PATTERN_BYTES",
    "MAX_SEQUENCE_NUMBER",
    "MAX_STAGE_BYTES",
    "MAX_TAGS",
    "MAX_TAG_KEY_BYTES",
    "MAX_TAG_VALUE_BYTES",
    "CorrelationMatcher",
    "correlation_filter",
    "correlation_matches",
    "create_child",
    "new_correlation",
    "next_in_sequence",
    "validate_correlation_filter",
    "validate_metadata",
    "with_stage",
    "with_tag",
    "with_tags",
]

#: Largest correlation, parent or root id, in UTF-8 bytes.
MAX_ID_BYTES = 256
#: Largest workflow stage, in UTF-8 bytes.
MAX_STAGE_BYTES = 128
#: Most tags on one metadata, and most entries in each tag map of a filter.
MAX_TAGS = 64
#: Largest tag key, in UTF-8 bytes.
MAX_TAG_KEY_BYTES = 128
#: Largest tag value, in UTF-8 bytes.
MAX_TAG_VALUE_BYTES = 1024
#: Most entries in each repeated field of a filter.
MAX_FILTER_ENTRIES = 64
#: Largest correlation id pattern, in UTF-8 bytes.
MAX_PATTERN_BYTES = 256
#: Largest sequence number (``uint64``).
MAX_SEQUENCE_NUMBER = 2**64 - 1

_CorrelationMetadata = correlation_pb2.CorrelationMetadata
_CorrelationFilter = correlation_pb2.CorrelationFilter

_SHOW_CHARS = 40


def _show(value: str) -> str:
    """``repr`` of ``value``, shortened so error messages stay readable."""
    if len(value) > _SHOW_CHARS:
        return repr(value[:_SHOW_CHARS]) + "..."
    return repr(value)


def _check_str(value: str, what: str, limit: int, *, allow_empty: bool = False) -> None:
    """Refuse ``value`` if it is empty (unless allowed), not UTF-8, or over ``limit`` bytes."""
    if not value:
        if allow_empty:
            return
        raise InvalidCorrelation(f"{what} is empty")
    if value.isascii():  # O(1) in CPython, and then bytes == code points
        size = len(value)
    else:
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidCorrelation(f"{what} is not valid UTF-8") from None
    if size > limit:
        raise InvalidCorrelation(f"{what} is {size} bytes, the limit is {limit}")


def _check_tags(tags: Mapping[str, str], what: str) -> None:
    """Refuse a tag map with an empty key or a key or value over its bound."""
    for key, value in tags.items():
        _check_str(key, f"{what} key {_show(key)}", MAX_TAG_KEY_BYTES)
        _check_str(
            value, f"{what} value for key {_show(key)}", MAX_TAG_VALUE_BYTES, allow_empty=True
        )


def _check_sequence_number(value: int, what: str) -> None:
    if not 0 <= value <= MAX_SEQUENCE_NUMBER:
        raise InvalidCorrelation(f"{what} {value} is outside 0..{MAX_SEQUENCE_NUMBER}")


def validate_metadata(meta: correlation_pb2.CorrelationMetadata) -> None:
    """Raise :class:`InvalidCorrelation` unless ``meta`` is within the bounds.

    ``correlation_id`` and ``root_correlation_id`` must be non-empty;
    ``parent_correlation_id`` and ``workflow_stage``, when set, too. The
    message names the field and the limit, e.g. ``correlation_id is 300
    bytes, the limit is 256``. ``created_at`` is not checked: it may be unset.
    """
    _check_str(meta.correlation_id, "correlation_id", MAX_ID_BYTES)
    _check_str(meta.root_correlation_id, "root_correlation_id", MAX_ID_BYTES)
    if meta.HasField("parent_correlation_id"):
        _check_str(meta.parent_correlation_id, "parent_correlation_id", MAX_ID_BYTES)
    if meta.HasField("workflow_stage"):
        _check_str(meta.workflow_stage, "workflow_stage", MAX_STAGE_BYTES)
    if len(meta.tags) > MAX_TAGS:
        raise InvalidCorrelation(f"{len(meta.tags)} tags, the limit is {MAX_TAGS}")
    _check_tags(meta.tags, "tag")


def _now(meta: correlation_pb2.CorrelationMetadata) -> None:
    meta.created_at.FromNanoseconds(time.time_ns())


def _new_id(correlation_id: str | None, what: str) -> str:
    if correlation_id is None:
        return str(uuid.uuid4())
    _check_str(correlation_id, what, MAX_ID_BYTES)
    return correlation_id


def new_correlation(correlation_id: str | None = None) -> correlation_pb2.CorrelationMetadata:
    """Metadata for the first step of a workflow (Rust: ``CorrelationMetadata::new``).

    The id is ``correlation_id``, or a fresh uuid4 string when ``None``; the
    root id is the id itself, there is no parent, the sequence number is 0
    and ``created_at`` is now.
    """
    cid = _new_id(correlation_id, "correlation_id")
    meta = _CorrelationMetadata(correlation_id=cid, root_correlation_id=cid, sequence_number=0)
    _now(meta)
    validate_metadata(meta)
    return meta


def _copy(meta: correlation_pb2.CorrelationMetadata) -> correlation_pb2.CorrelationMetadata:
    out = _CorrelationMetadata()
    out.CopyFrom(meta)
    return out


def with_stage(
    meta: correlation_pb2.CorrelationMetadata, stage: str
) -> correlation_pb2.CorrelationMetadata:
    """A copy of ``meta`` whose ``workflow_stage`` is ``stage`` (1 to 128 bytes)."""
    _check_str(stage, "workflow_stage", MAX_STAGE_BYTES)
    out = _copy(meta)
    out.workflow_stage = stage
    validate_metadata(out)
    return out


def with_tag(
    meta: correlation_pb2.CorrelationMetadata, key: str, value: str
) -> correlation_pb2.CorrelationMetadata:
    """A copy of ``meta`` with tag ``key`` set to ``value``, replacing any previous value."""
    return with_tags(meta, {key: value})


def with_tags(
    meta: correlation_pb2.CorrelationMetadata, tags: Mapping[str, str]
) -> correlation_pb2.CorrelationMetadata:
    """A copy of ``meta`` with every tag of ``tags`` set, replacing previous values.

    Refused if the result would have more than :data:`MAX_TAGS` tags.
    """
    _check_tags(tags, "tag")
    out = _copy(meta)
    out.tags.update(tags)
    validate_metadata(out)
    return out


def create_child(
    meta: correlation_pb2.CorrelationMetadata, child_id: str | None = None
) -> correlation_pb2.CorrelationMetadata:
    """Metadata for a step caused by ``meta`` (Rust: ``create_child``).

    The child's id is ``child_id``, or a fresh uuid4 string when ``None``;
    its parent id is ``meta.correlation_id``; it keeps the root id, the stage
    and the tags; its sequence number is 0 and ``created_at`` is now. A
    ``child_id`` equal to the parent's id is refused.
    """
    validate_metadata(meta)
    cid = _new_id(child_id, "child correlation_id")
    if cid == meta.correlation_id:
        raise InvalidCorrelation(f"child correlation_id {_show(cid)} is the parent's own id")
    out = _copy(meta)
    out.correlation_id = cid
    out.parent_correlation_id = meta.correlation_id
    out.sequence_number = 0
    _now(out)
    validate_metadata(out)
    return out


def next_in_sequence(
    meta: correlation_pb2.CorrelationMetadata,
) -> correlation_pb2.CorrelationMetadata:
    """A copy of ``meta`` with ``sequence_number`` one higher; ``created_at`` is kept.

    For a publisher that emits several events under one correlation id.
    Refused when the sequence number would overflow ``uint64``.
    """
    if meta.sequence_number >= MAX_SEQUENCE_NUMBER:
        raise InvalidCorrelation(
            f"sequence_number {meta.sequence_number} cannot grow, the limit is "
            f"{MAX_SEQUENCE_NUMBER}"
        )
    out = _copy(meta)
    out.sequence_number = meta.sequence_number + 1
    validate_metadata(out)
    return out


# --- filters ------------------------------------------------------------------------------------


def _check_list(values: Iterable[str], what: str, limit: int) -> None:
    values = list(values)
    if len(values) > MAX_FILTER_ENTRIES:
        raise InvalidCorrelation(
            f"{what} has {len(values)} entries, the limit is {MAX_FILTER_ENTRIES}"
        )
    for index, value in enumerate(values):
        _check_str(value, f"{what}[{index}]", limit)


def _check_tag_map(tags: Mapping[str, str], what: str) -> None:
    if len(tags) > MAX_TAGS:
        raise InvalidCorrelation(f"{what} has {len(tags)} entries, the limit is {MAX_TAGS}")
    _check_tags(tags, what)


def _check_filter_fields(
    ids: Iterable[str],
    patterns: Iterable[str],
    parents: Iterable[str],
    roots: Iterable[str],
    stages: Iterable[str],
    required_tags: Mapping[str, str],
    any_tags: Mapping[str, str],
) -> None:
    _check_list(ids, "correlation_ids", MAX_ID_BYTES)
    _check_list(patterns, "correlation_id_patterns", MAX_PATTERN_BYTES)
    _check_list(parents, "parent_correlation_ids", MAX_ID_BYTES)
    _check_list(roots, "root_correlation_ids", MAX_ID_BYTES)
    _check_list(stages, "workflow_stages", MAX_STAGE_BYTES)
    _check_tag_map(required_tags, "required_tags")
    _check_tag_map(any_tags, "any_tags")


def _check_range(low: int, high: int) -> None:
    if low > high:
        raise InvalidCorrelation(f"sequence_range min {low} is greater than its max {high}")


def validate_correlation_filter(flt: correlation_pb2.CorrelationFilter) -> None:
    """Raise :class:`InvalidCorrelation` unless ``flt`` is within the bounds.

    Each repeated field holds at most :data:`MAX_FILTER_ENTRIES` non-empty
    entries (ids up to :data:`MAX_ID_BYTES` bytes, stages up to
    :data:`MAX_STAGE_BYTES`, patterns up to :data:`MAX_PATTERN_BYTES`); each
    tag map holds at most :data:`MAX_TAGS` entries within the metadata tag
    bounds; ``sequence_range``, when set, needs ``min <= max``.
    """
    _check_filter_fields(
        flt.correlation_ids,
        flt.correlation_id_patterns,
        flt.parent_correlation_ids,
        flt.root_correlation_ids,
        flt.workflow_stages,
        flt.required_tags,
        flt.any_tags,
    )
    if flt.HasField("sequence_range"):
        _check_range(flt.sequence_range.min, flt.sequence_range.max)


def _as_list(values: Iterable[str], what: str) -> list[str]:
    # A str is an Iterable[str] too: ``stages="detection"`` would become nine stages.
    if isinstance(values, str):
        raise TypeError(f"{what} must be a collection of strings, not a str")
    return list(values)


def correlation_filter(
    *,
    correlation_ids: Iterable[str] = (),
    patterns: Iterable[str] = (),
    parent_ids: Iterable[str] = (),
    root_ids: Iterable[str] = (),
    stages: Iterable[str] = (),
    required_tags: Mapping[str, str] | None = None,
    any_tags: Mapping[str, str] | None = None,
    sequence_range: tuple[int, int] | None = None,
) -> correlation_pb2.CorrelationFilter:
    """Build and validate a ``CorrelationFilter``; with no argument it matches everything.

    ``patterns`` fills ``correlation_id_patterns``, ``parent_ids``
    ``parent_correlation_ids``, ``root_ids`` ``root_correlation_ids`` and
    ``stages`` ``workflow_stages``; ``sequence_range`` is an inclusive
    ``(min, max)`` pair. Passing a bare ``str`` where a collection of strings
    is expected raises :class:`TypeError`.
    """
    ids = _as_list(correlation_ids, "correlation_ids")
    pats = _as_list(patterns, "patterns")
    parents = _as_list(parent_ids, "parent_ids")
    roots = _as_list(root_ids, "root_ids")
    stage_list = _as_list(stages, "stages")
    required = dict(required_tags or {})
    anys = dict(any_tags or {})
    _check_filter_fields(ids, pats, parents, roots, stage_list, required, anys)
    seq: correlation_pb2.SequenceRange | None = None
    if sequence_range is not None:
        low, high = sequence_range
        _check_sequence_number(low, "sequence_range min")
        _check_sequence_number(high, "sequence_range max")
        _check_range(low, high)
        seq = correlation_pb2.SequenceRange(min=low, max=high)
    return _CorrelationFilter(
        correlation_ids=ids,
        correlation_id_patterns=pats,
        parent_correlation_ids=parents,
        root_correlation_ids=roots,
        workflow_stages=stage_list,
        required_tags=required,
        any_tags=anys,
        sequence_range=seq,
    )


def _glob_regex(pattern: str) -> str:
    """Regex source matching exactly what the ``*``-glob ``pattern`` matches (use fullmatch).

    ``prefix*mid1*mid2*suffix`` becomes ``prefix(?>.*?mid1)(?>.*?mid2).*suffix``:
    taking the leftmost occurrence of each middle segment is always right for
    ``*``-only globs, and the atomic groups stop the engine from trying others.
    """
    prefix, *middle, suffix = pattern.split("*")
    inner = "".join(f"(?>.*?{re.escape(part)})" for part in middle if part)
    return f"{re.escape(prefix)}{inner}.*{re.escape(suffix)}"


class CorrelationMatcher:
    """A ``CorrelationFilter`` compiled once for fast, repeated matching.

    The filter is validated (raising :class:`InvalidCorrelation`), id lists
    become frozensets and patterns one precompiled regex, so :meth:`matches`
    costs a few set lookups. Later changes to the filter message do not
    affect the matcher.
    """

    __slots__ = (
        "_any_tags",
        "_empty",
        "_has_seq",
        "_ids",
        "_parents",
        "_pattern_literals",
        "_pattern_regex",
        "_patterns",
        "_required_tags",
        "_roots",
        "_seq_max",
        "_seq_min",
        "_stages",
    )

    def __init__(self, flt: correlation_pb2.CorrelationFilter) -> None:
        validate_correlation_filter(flt)
        self._ids = frozenset(flt.correlation_ids) or None
        self._parents = frozenset(flt.parent_correlation_ids) or None
        self._roots = frozenset(flt.root_correlation_ids) or None
        self._stages = frozenset(flt.workflow_stages) or None
        self._required_tags = tuple(sorted(flt.required_tags.items())) or None
        self._any_tags = tuple(sorted(flt.any_tags.items())) or None
        self._has_seq = flt.HasField("sequence_range")
        self._seq_min = flt.sequence_range.min
        self._seq_max = flt.sequence_range.max

        patterns = list(dict.fromkeys(flt.correlation_id_patterns))
        self._patterns = bool(patterns)
        # Star-free patterns are plain ids; the others share one alternation.
        self._pattern_literals = frozenset(p for p in patterns if "*" not in p)
        globs = [_glob_regex(p) for p in patterns if "*" in p]
        self._pattern_regex = (
            re.compile("|".join(f"(?:{g})" for g in globs), re.DOTALL) if globs else None
        )

        self._empty = not (
            self._ids
            or self._patterns
            or self._parents
            or self._roots
            or self._stages
            or self._required_tags
            or self._any_tags
            or self._has_seq
        )

    @property
    def is_empty(self) -> bool:
        """True when the filter sets no criterion, so it matches every event."""
        return self._empty

    def matches(self, meta: correlation_pb2.CorrelationMetadata | None) -> bool:
        """Whether an event carrying ``meta`` (``None``: no metadata) passes the filter.

        An empty filter matches everything, ``None`` included; any other
        filter never matches ``None`` and otherwise requires every criterion
        it sets.
        """
        if self._empty:
            return True
        if meta is None:
            return False
        # Ids in filters are never empty, so an unset parent or stage ("") is never found.
        if self._ids is not None and meta.correlation_id not in self._ids:
            return False
        if self._roots is not None and meta.root_correlation_id not in self._roots:
            return False
        if self._parents is not None and meta.parent_correlation_id not in self._parents:
            return False
        if self._stages is not None and meta.workflow_stage not in self._stages:
            return False
        if self._has_seq and not self._seq_min <= meta.sequence_number <= self._seq_max:
            return False
        if self._patterns:
            cid = meta.correlation_id
            if cid not in self._pattern_literals and (
                self._pattern_regex is None or self._pattern_regex.fullmatch(cid) is None
            ):
                return False
        if self._required_tags is not None or self._any_tags is not None:
            get = meta.tags.get  # .get, never [], which would insert the key
            if self._required_tags is not None:
                for key, value in self._required_tags:
                    if get(key) != value:
                        return False
            if self._any_tags is not None and not any(
                get(key) == value for key, value in self._any_tags
            ):
                return False
        return True

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {'empty' if self._empty else 'non-empty'}>"


def correlation_matches(
    flt: correlation_pb2.CorrelationFilter,
    meta: correlation_pb2.CorrelationMetadata | None,
) -> bool:
    """``CorrelationMatcher(flt).matches(meta)``; compile a matcher to match many events."""
    return CorrelationMatcher(flt).matches(meta)


#: Old names, kept for one release: each use warns with a DeprecationWarning.
__getattr__ = deprecated_names(
    __name__,
    {
        "validate_filter": ("validate_correlation_filter", validate_correlation_filter),
        "filter_matches": ("correlation_matches", correlation_matches),
    },
)
