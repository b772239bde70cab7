"""Topic grammar, topic-filter matching and the subscription trie.

This module is grammar only: it knows nothing of particular topic names.

Grammar
=======

A *topic* names what a message is about; a *filter* selects topics for a
subscription.

* A topic is a sequence of *levels* separated by ``.``, e.g.
  ``events.process.lifecycle``. Every level is non-empty and made only of
  ASCII letters, digits, ``_`` and ``-`` (``[A-Za-z0-9_-]+``). Matching is
  case-sensitive. So ``""``, ``".a"``, ``"a."``, ``"a..b"``, ``"a b"`` and
  ``"café"`` are all invalid.
* A published topic contains no wildcard.
* A filter is a topic in which some levels may be wildcards:

  - ``+`` stands for exactly one whole level: ``a.+.c`` matches ``a.b.c``
    but neither ``a.c`` nor ``a.b.x.c``;
  - ``#`` stands for zero or more levels and may appear only as the whole
    last level: ``a.#`` matches ``a``, ``a.b`` and ``a.b.c``; ``#`` alone
    matches every topic.

  A wildcard mixed into a level (``a.b#``, ``+a``, ``##``) or a ``#`` that is
  not the last level (``a.#.b``) is invalid.
* A topic or filter is at most ``max_bytes`` bytes long (UTF-8; only ASCII is
  allowed anyway) and has at most ``max_levels`` levels; both limits are
  per-call arguments defaulting to :data:`DEFAULT_MAX_TOPIC_BYTES` and
  :data:`DEFAULT_MAX_TOPIC_LEVELS`. The limits are checked before any other
  work, so an oversized string is refused without being split or scanned.

Validation raises :class:`~daemoneye_eventbus.errors.InvalidTopic` (a
:class:`ValueError`) whose message says which level is wrong and why.

Matching
========

:func:`topic_matches` tests one filter against one topic. :class:`SubscriptionTrie`
indexes many ``(filter, value)`` pairs by level so that finding every value
whose filter matches a topic costs time proportional to the topic's depth,
not to the number of subscriptions.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterator
from typing import Generic, NoReturn, TypeVar

from daemoneye_eventbus.deprecation import deprecated_names
from daemoneye_eventbus.errors import InvalidTopic

__all__ = [
    "DEFAULT_MAX_TOPIC_BYTES",
    "DEFAULT_MAX_TOPIC_LEVELS",
    "SubscriptionTrie",
    "filters_overlap",
    "split_topic",
    "topic_matches",
    "validate_topic",
    "validate_topic_filter",
]

DEFAULT_MAX_TOPIC_BYTES = 255
"""Default limit on the UTF-8 length of a topic or filter, in bytes."""

DEFAULT_MAX_TOPIC_LEVELS = 16
"""Default limit on the number of levels of a topic or filter."""

_SEP = "."
_ONE = "+"
_ANY = "#"

_LEVEL = r"[A-Za-z0-9_-]+"
_TOPIC_RE = re.compile(rf"{_LEVEL}(?:\.{_LEVEL})*")
_FILTER_RE = re.compile(
    rf"(?:{_LEVEL}|\+)(?:\.(?:{_LEVEL}|\+))*(?:\.\#)?|\#",
)
_LEVEL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")

T = TypeVar("T", bound=Hashable)


def split_topic(topic: str) -> tuple[str, ...]:
    """Split a topic or filter into its levels (no validation).

    >>> split_topic("events.process.#")
    ('events', 'process', '#')
    """
    return tuple(topic.split(_SEP))


def _check_limits(kind: str, text: object, max_bytes: int, max_levels: int) -> str:
    """Check type, emptiness and the limits, cheapest first; return the text.

    Never splits or scans a string longer than ``max_bytes``.
    """
    if not isinstance(text, str):
        raise InvalidTopic(f"{kind} must be a str, not {type(text).__name__}")
    n = len(text)
    if n == 0:
        raise InvalidTopic(f"{kind} is empty")
    if n > max_bytes:
        # str.isascii() is O(1) in CPython; a non-ASCII string is at least as
        # many bytes long as it is characters long, so no need to encode it.
        if text.isascii():
            raise InvalidTopic(f"{kind} is {n} bytes long, the limit is {max_bytes}")
        raise InvalidTopic(f"{kind} is at least {n} bytes long, the limit is {max_bytes}")
    if not text.isascii():
        nbytes = len(text.encode("utf-8", "surrogatepass"))
        if nbytes > max_bytes:
            raise InvalidTopic(f"{kind} is {nbytes} bytes long, the limit is {max_bytes}")
    levels = text.count(_SEP) + 1
    if levels > max_levels:
        raise InvalidTopic(f"{kind} has {levels} levels, the limit is {max_levels}")
    return text


def _diagnose(kind: str, text: str, *, is_filter: bool) -> NoReturn:
    """Raise InvalidTopic explaining why ``text`` failed the fast regex check."""
    levels = text.split(_SEP)
    count = len(levels)
    for i, level in enumerate(levels, start=1):
        if not level:
            if i == 1:
                where = "leading '.'"
            elif i == count:
                where = "trailing '.'"
            else:
                where = "consecutive '..'"
            raise InvalidTopic(f"{kind} level {i} is empty ({where})")
        for wildcard in (_ONE, _ANY):
            if wildcard not in level:
                continue
            if not is_filter:
                raise InvalidTopic(
                    f"wildcard {wildcard!r} is not allowed in a published topic (level {i})"
                )
            if level != wildcard:
                raise InvalidTopic(
                    f"wildcard {wildcard!r} must be a whole level,"
                    f" but {kind} level {i} is {level!r}"
                )
            if wildcard == _ANY and i != count:
                raise InvalidTopic(
                    f"wildcard '#' may only be the last level of a filter,"
                    f" but it is level {i} of {count}"
                )
        if level in (_ONE, _ANY):
            continue
        for ch in level:
            if ch not in _LEVEL_CHARS:
                raise InvalidTopic(
                    f"character {ch!r} (U+{ord(ch):04X}) is not allowed in"
                    f" {kind} level {i}; allowed are A-Z a-z 0-9 '_' '-'"
                )
    # Unreachable when the regexes and the checks above agree.
    raise InvalidTopic(f"{kind} {text!r} is malformed")  # pragma: no cover


def validate_topic(
    topic: str,
    *,
    max_bytes: int = DEFAULT_MAX_TOPIC_BYTES,
    max_levels: int = DEFAULT_MAX_TOPIC_LEVELS,
) -> None:
    """Check that ``topic`` is a valid concrete (published) topic.

    Raises :class:`InvalidTopic` with the reason: not a str, empty, longer
    than ``max_bytes`` bytes, more than ``max_levels`` levels, an empty level,
    a wildcard, or a character outside ``[A-Za-z0-9_-]``.
    """
    text = _check_limits("topic", topic, max_bytes, max_levels)
    if _TOPIC_RE.fullmatch(text) is None:
        _diagnose("topic", text, is_filter=False)


def validate_topic_filter(
    filter: str,
    *,
    max_bytes: int = DEFAULT_MAX_TOPIC_BYTES,
    max_levels: int = DEFAULT_MAX_TOPIC_LEVELS,
) -> None:
    """Check that ``filter`` is a valid subscription filter.

    Same rules as :func:`validate_topic`, except that a level may be ``+``
    (exactly one level) and the last level may be ``#`` (zero or more
    levels). Raises :class:`InvalidTopic` with the reason.
    """
    text = _check_limits("filter", filter, max_bytes, max_levels)
    if _FILTER_RE.fullmatch(text) is None:
        _diagnose("filter", text, is_filter=True)


def topic_matches(filter: str, topic: str) -> bool:
    """Return whether ``filter`` matches ``topic``.

    Both are assumed valid (see :func:`validate_topic_filter` and
    :func:`validate_topic`); the result is unspecified otherwise.
    """
    if filter in (topic, _ANY):
        return True
    flevels = filter.split(_SEP)
    tlevels = topic.split(_SEP)
    tcount = len(tlevels)
    for i, flevel in enumerate(flevels):
        if flevel == _ANY:
            return True
        if i >= tcount:
            return False
        if flevel != _ONE and flevel != tlevels[i]:
            return False
    return len(flevels) == tcount


def filters_overlap(a: str, b: str) -> bool:
    """Return whether some topic matches both filters ``a`` and ``b``.

    Both are assumed valid. ``+`` in either filter matches any one level of
    the other; ``#`` matches whatever remains of the other, including nothing.
    """
    alevels = a.split(_SEP)
    blevels = b.split(_SEP)
    for i in range(max(len(alevels), len(blevels))):
        x = alevels[i] if i < len(alevels) else None
        y = blevels[i] if i < len(blevels) else None
        if x == _ANY or y == _ANY:
            return True
        if x is None or y is None:
            return False
        if x != y and x != _ONE and y != _ONE:
            return False
    return True


class _Node(Generic[T]):
    """One trie node: children by level (``+``/``#`` included) and values."""

    __slots__ = ("children", "values")

    def __init__(self) -> None:
        self.children: dict[str, _Node[T]] = {}
        self.values: set[T] = set()


class SubscriptionTrie(Generic[T]):
    """A set of ``(filter, value)`` pairs indexed by topic level.

    :meth:`match` returns every value whose filter matches a topic by walking
    the trie one level at a time, following the exact child and the ``+``
    child and collecting the values under ``#`` children, so its cost grows
    with the depth of the topic, not with the number of subscriptions.

    A value may be inserted under several filters; inserting the same
    ``(filter, value)`` pair twice keeps one. Values must be hashable.
    Filters are validated on :meth:`insert` with the limits given here;
    :meth:`match` does not validate its topic (the caller already has).
    """

    __slots__ = ("_len", "_max_bytes", "_max_levels", "_root")

    def __init__(
        self,
        *,
        max_bytes: int = DEFAULT_MAX_TOPIC_BYTES,
        max_levels: int = DEFAULT_MAX_TOPIC_LEVELS,
    ) -> None:
        """Create an empty trie; filters are checked against these limits."""
        self._root: _Node[T] = _Node()
        self._len = 0
        self._max_bytes = max_bytes
        self._max_levels = max_levels

    def insert(self, filter: str, value: T) -> None:
        """Add ``value`` under ``filter``; a no-op if the pair is present.

        Raises :class:`InvalidTopic` if ``filter`` is not a valid filter.
        """
        validate_topic_filter(filter, max_bytes=self._max_bytes, max_levels=self._max_levels)
        node = self._root
        for level in filter.split(_SEP):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        if value not in node.values:
            node.values.add(value)
            self._len += 1

    def remove(self, filter: str, value: T) -> bool:
        """Remove ``value`` from under ``filter``; return whether it was there.

        Nodes left without values or children are pruned. An invalid filter
        is never present, so it just returns ``False``.
        """
        if not isinstance(filter, str):
            return False
        path: list[tuple[_Node[T], str]] = []
        node = self._root
        for level in filter.split(_SEP):
            child = node.children.get(level)
            if child is None:
                return False
            path.append((node, level))
            node = child
        if value not in node.values:
            return False
        node.values.discard(value)
        self._len -= 1
        while path and not node.values and not node.children:
            parent, level = path.pop()
            del parent.children[level]
            node = parent
        return True

    def match(self, topic: str) -> set[T]:
        """Return the set of values whose filter matches ``topic``.

        ``topic`` is assumed valid (see :func:`validate_topic`). The result
        is a new set that the caller may keep or change.
        """
        result: set[T] = set()
        current: list[_Node[T]] = [self._root]
        for level in topic.split(_SEP):
            following: list[_Node[T]] = []
            for node in current:
                children = node.children
                if not children:
                    continue
                child = children.get(_ANY)
                if child is not None:
                    result |= child.values
                child = children.get(level)
                if child is not None:
                    following.append(child)
                child = children.get(_ONE)
                if child is not None:
                    following.append(child)
            if not following:
                return result
            current = following
        for node in current:
            result |= node.values
            # '#' also matches zero levels: "a.#" matches "a".
            child = node.children.get(_ANY)
            if child is not None:
                result |= child.values
        return result

    def values(self, filter: str) -> frozenset[T]:
        """Return the values inserted under exactly ``filter`` (no matching)."""
        node = self._find(filter)
        return frozenset(node.values) if node is not None else frozenset()

    def has(self, filter: str, value: T) -> bool:
        """Return whether the pair ``(filter, value)`` is in the trie."""
        node = self._find(filter)
        return node is not None and value in node.values

    def filters(self) -> Iterator[str]:
        """Yield every distinct filter that has at least one value."""
        for filter_, node in self._walk():
            if node.values:
                yield filter_

    def items(self) -> Iterator[tuple[str, T]]:
        """Yield every ``(filter, value)`` pair in the trie."""
        for filter_, node in self._walk():
            for value in node.values:
                yield filter_, value

    def clear(self) -> None:
        """Remove every pair."""
        self._root = _Node()
        self._len = 0

    def __len__(self) -> int:
        """Return the number of ``(filter, value)`` pairs."""
        return self._len

    def __bool__(self) -> bool:
        """Return whether the trie holds any pair."""
        return self._len > 0

    def __contains__(self, filter: object) -> bool:
        """Return whether at least one value is inserted under ``filter``."""
        if not isinstance(filter, str):
            return False
        node = self._find(filter)
        return node is not None and bool(node.values)

    def __repr__(self) -> str:
        """Return a short description."""
        return f"<SubscriptionTrie with {self._len} subscriptions>"

    def _find(self, filter: str) -> _Node[T] | None:
        """Return the node for exactly ``filter``, or None."""
        node = self._root
        for level in filter.split(_SEP):
            child = node.children.get(level)
            if child is None:
                return None
            node = child
        return node

    def _walk(self) -> Iterator[tuple[str, _Node[T]]]:
        """Yield ``(filter, node)`` for every node below the root."""
        stack: list[tuple[str, _Node[T]]] = [
            (level, child) for level, child in self._root.children.items()
        ]
        while stack:
            filter_, node = stack.pop()
            yield filter_, node
            stack.extend(
                (f"{filter_}{_SEP}{level}", child) for level, child in node.children.items()
            )

    def _node_count(self) -> int:
        """Return the number of nodes, the root included (for tests)."""
        return 1 + sum(1 for _ in self._walk())


#: Old names, kept for one release: each use warns with a DeprecationWarning.
__getattr__ = deprecated_names(
    __name__,
    {
        "validate_filter": ("validate_topic_filter", validate_topic_filter),
        "matches": ("topic_matches", topic_matches),
    },
)
