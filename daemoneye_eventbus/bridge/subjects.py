"""Bus topics and filters <-> NATS subjects, for the JetStream bridge (pure).

Subjects
========

The bridge of host ``{host}`` publishes the bus event on topic ``{topic}``
to the NATS subject ``daemoneye.{host}.{topic}`` (:func:`topic_to_subject`)
and listens for control messages on ``daemoneye.{host}.control.>`` (this
host) and ``daemoneye.all.control.>`` (every host), see
:func:`control_subjects` and :func:`control_subject_to_topic`.

Host ids
========

A host id is one NATS token: 1 to :data:`MAX_HOST_ID_BYTES` characters from
``A-Z a-z 0-9 _ -`` (the characters of a bus topic level; case matters), and
not ``all``, which names every host. So no ``.``, whitespace, ``*``, ``>``
or other punctuation: a host id needs no escaping (:func:`validate_host_id`).

Escaping
========

A NATS subject is ``.``-separated tokens; a token may not be empty, may not
contain whitespace or ``.``, and a token ``*`` or ``>`` is a wildcard. The
bus grammar (:mod:`daemoneye_eventbus.topics`) allows only ``[A-Za-z0-9_-]``
in a level, all of which NATS carries as they are. The mapping still escapes
every level through :func:`escape_level`, so that a wider bus grammar could
never produce a subject NATS refuses or reads as a wildcard:

* ``A-Z a-z 0-9 _ -`` stand for themselves;
* every other character -- ``~`` itself included -- becomes ``~`` and two
  upper-case hex digits per byte of its UTF-8 encoding (``.`` -> ``~2E``,
  space -> ``~20``, ``*`` -> ``~2A``, ``~`` -> ``~7E``, ``é`` -> ``~C3~A9``).

``~`` is not in the bus grammar, so the escape is the identity on every valid
topic today (the subjects of existing topics never change) and reversible on
any text (:func:`unescape_level`). A subject token holding anything else is
refused when mapped back to a topic.

Filters
=======

:func:`filter_to_subjects` maps ``+`` to ``*`` and a trailing ``#`` to ``>``.
The two trailing wildcards differ: the bus's ``a.#`` matches ``a`` itself
(zero levels), NATS's ``a.>`` needs at least one more token. So a filter
ending in ``.#`` maps to two subjects, ``...a`` and ``...a.>``, and the
bridge subscribes to both. ``#`` alone maps to ``daemoneye.{host}.>`` only:
a bus topic has at least one level.

Message ids
===========

:func:`msg_id` makes the ``Nats-Msg-Id`` header of a forwarded event, with
which JetStream drops a re-sent copy within the stream's duplicate window.
See its docstring for what makes it unique and where that stops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from daemoneye_eventbus.errors import EventBusError, InvalidTopic
from daemoneye_eventbus.topics import split_topic, validate_topic, validate_topic_filter

__all__ = [
    "ALL_HOSTS",
    "MAX_HOST_ID_BYTES",
    "PREFIX",
    "ControlMessage",
    "InvalidSubject",
    "control_subject_pattern",
    "control_subject_to_topic",
    "control_subjects",
    "escape_level",
    "filter_to_subjects",
    "host_pattern",
    "is_control_topic",
    "msg_id",
    "subject_covers",
    "subject_to_topic",
    "subjects_overlap",
    "topic_to_subject",
    "unescape_level",
    "validate_host_id",
]

PREFIX: Final = "daemoneye"
"""First token of every subject of the bridge."""

ALL_HOSTS: Final = "all"
"""The host token of control messages for every host; no host may be called so."""

MAX_HOST_ID_BYTES: Final = 64
"""Longest host id, in bytes (= characters: host ids are ASCII)."""

CONTROL: Final = "control"
"""First level of the bus topics that inbound control messages map to."""

_SAFE: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_ESC: Final = "~"
_HEX: Final = frozenset("0123456789ABCDEF")


class InvalidSubject(EventBusError, ValueError):
    """A host id or a NATS subject the bridge cannot use; the message says why."""


def validate_host_id(host: str) -> None:
    """Check that ``host`` is a usable host id (see the module's docstring).

    Raises :class:`InvalidSubject` with the reason.
    """
    if not isinstance(host, str):
        raise InvalidSubject(f"host id must be a str, not {type(host).__name__}")
    if not host:
        raise InvalidSubject("host id is empty")
    if len(host) > MAX_HOST_ID_BYTES:
        raise InvalidSubject(
            f"host id is {len(host)} characters long, the limit is {MAX_HOST_ID_BYTES}"
        )
    for ch in host:
        if ch not in _SAFE:
            raise InvalidSubject(
                f"character {ch!r} (U+{ord(ch):04X}) is not allowed in a host id;"
                " allowed are A-Z a-z 0-9 '_' '-'"
            )
    if host == ALL_HOSTS:
        raise InvalidSubject(f"host id {ALL_HOSTS!r} is reserved: it names every host")


def escape_level(level: str) -> str:
    """One bus level as one NATS token: ``~XX`` per UTF-8 byte of any unsafe character."""
    if all(ch in _SAFE for ch in level):
        return level
    out: list[str] = []
    for ch in level:
        if ch in _SAFE:
            out.append(ch)
        else:
            out.extend(f"{_ESC}{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
    return "".join(out)


def unescape_level(token: str) -> str:
    """The inverse of :func:`escape_level`; :class:`InvalidSubject` if malformed.

    Only the escape's own output is accepted: upper-case hex, no ``~`` for a
    safe character, no unsafe character left bare, valid UTF-8.
    """
    if _ESC not in token:
        bad = next((ch for ch in token if ch not in _SAFE), None)
        if bad is not None:
            raise InvalidSubject(f"character {bad!r} in subject token {token!r} is not escaped")
        return token
    out = bytearray()
    i, n = 0, len(token)
    while i < n:
        ch = token[i]
        if ch == _ESC:
            pair = token[i + 1 : i + 3]
            if len(pair) != 2 or not set(pair) <= _HEX:
                raise InvalidSubject(f"bad escape at {i} in subject token {token!r}")
            byte = int(pair, 16)
            if chr(byte) in _SAFE:
                raise InvalidSubject(f"needless escape of {chr(byte)!r} in token {token!r}")
            out.append(byte)
            i += 3
        elif ch in _SAFE:
            out += ch.encode("ascii")
            i += 1
        else:
            raise InvalidSubject(f"character {ch!r} in subject token {token!r} is not escaped")
    try:
        return out.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise InvalidSubject(f"subject token {token!r} escapes invalid UTF-8") from None


def _host_prefix(host: str) -> str:
    validate_host_id(host)
    return f"{PREFIX}.{host}."


def topic_to_subject(host: str, topic: str) -> str:
    """The NATS subject of bus ``topic`` forwarded by host ``host``.

    Raises :class:`InvalidSubject` for a bad host id and
    :class:`~daemoneye_eventbus.errors.InvalidTopic` for a bad topic.
    """
    prefix = _host_prefix(host)
    validate_topic(topic)
    return prefix + ".".join(escape_level(level) for level in split_topic(topic))


def _tokens_to_topic(subject: str, tokens: list[str]) -> str:
    levels = [unescape_level(token) for token in tokens]
    try:
        for level in levels:
            # One token is one level: an escaped '.' must not split it in two.
            validate_topic(level, max_levels=1)
        topic = ".".join(levels)
        validate_topic(topic)
    except InvalidTopic as exc:
        raise InvalidSubject(f"subject {subject!r} is no bus topic: {exc}") from None
    return topic


def _split_subject(subject: str) -> list[str]:
    if not isinstance(subject, str):
        raise InvalidSubject(f"subject must be a str, not {type(subject).__name__}")
    tokens = subject.split(".")
    if len(tokens) < 3 or tokens[0] != PREFIX:
        raise InvalidSubject(f"subject {subject!r} is not under {PREFIX}.<host>.")
    return tokens


def subject_to_topic(host: str, subject: str) -> str:
    """The bus topic that host ``host`` forwarded to ``subject``; the inverse of
    :func:`topic_to_subject`. :class:`InvalidSubject` if it is none."""
    validate_host_id(host)
    tokens = _split_subject(subject)
    if tokens[1] != host:
        raise InvalidSubject(f"subject {subject!r} is not of host {host!r}")
    return _tokens_to_topic(subject, tokens[2:])


def filter_to_subjects(host: str, filter: str) -> tuple[str, ...]:
    """The NATS subjects that together match what bus ``filter`` matches.

    ``+`` becomes ``*``; a trailing ``#`` becomes ``>``, and since ``a.#``
    also matches ``a`` itself, the subject of ``a`` comes first:
    ``filter_to_subjects("h", "a.#") == ("daemoneye.h.a", "daemoneye.h.a.>")``.
    Raises :class:`InvalidSubject` or :class:`~daemoneye_eventbus.errors.InvalidTopic`.
    """
    prefix = _host_prefix(host)
    validate_topic_filter(filter)
    levels = split_topic(filter)
    if levels == ("#",):
        return (prefix + ">",)
    tokens = ["*" if level == "+" else escape_level(level) for level in levels if level != "#"]
    exact = prefix + ".".join(tokens)
    if levels[-1] == "#":
        return (exact, exact + ".>")
    return (exact,)


def is_control_topic(topic: str) -> bool:
    """Whether ``topic`` is under ``control.`` (where inbound control lands).

    Forwarded as they are, such topics land on this host's inbound control
    subjects: the bridge must not forward them outbound, or it would hear
    its own events back as control messages.
    """
    return topic.startswith(CONTROL + ".")


def control_subjects(host: str) -> tuple[str, str]:
    """The subjects the bridge of ``host`` subscribes to for control messages."""
    return (f"{_host_prefix(host)}{CONTROL}.>", f"{PREFIX}.{ALL_HOSTS}.{CONTROL}.>")


@dataclass(frozen=True, slots=True)
class ControlMessage:
    """Where an inbound control subject lands: the local ``topic`` (under
    ``control.``), and whether it was sent to every host (``broadcast``)."""

    topic: str
    broadcast: bool


def control_subject_to_topic(host: str, subject: str) -> ControlMessage:
    """The local bus topic of an inbound control ``subject``.

    Accepts ``daemoneye.{host}.control.<levels>`` and
    ``daemoneye.all.control.<levels>`` with at least one level after
    ``control`` and no wildcard; the topic is ``control.<levels>``.
    Anything else -- another host, a subject outside ``control.``, a
    malformed token -- raises :class:`InvalidSubject`.
    """
    validate_host_id(host)
    tokens = _split_subject(subject)
    if tokens[1] not in (host, ALL_HOSTS):
        raise InvalidSubject(f"subject {subject!r} is for neither {host!r} nor {ALL_HOSTS!r}")
    if tokens[2] != CONTROL or len(tokens) < 4:
        raise InvalidSubject(f"subject {subject!r} is not under {PREFIX}.<host>.{CONTROL}.")
    return ControlMessage(_tokens_to_topic(subject, tokens[2:]), tokens[1] == ALL_HOSTS)


def msg_id(host: str, event_id: int, received_at_ns: int) -> str:
    """The ``Nats-Msg-Id`` of the event ``event_id`` that the broker received
    at ``received_at_ns`` (both from the event's ``ReceivedEvent``).

    The id is ``{host}:{received_at_ns}:{event_id}``. Event ids are unique
    only within one run of the broker (they restart at 1); the receive time
    tells the runs apart, since a new run's events are received later. Both
    are the broker's, so the same event keeps the same id when the bridge
    re-sends it (after a restart, from the spool, or as a retained delivery)
    and JetStream drops the copy. Limits: JetStream deduplicates only within
    the stream's duplicate window (two minutes by default); and two runs
    could collide only if the wall clock went back far enough for the same
    event id to be received at the same nanosecond again. Raises
    :class:`InvalidSubject` for a bad host and :class:`ValueError` for an
    event without an id (0: a broker that does not stamp events).
    """
    validate_host_id(host)
    if event_id <= 0:
        raise ValueError(f"event id must be positive, not {event_id}")
    if received_at_ns < 0:
        raise ValueError(f"receive time must not be negative, not {received_at_ns}")
    return f"{host}:{received_at_ns}:{event_id}"


def subject_covers(pattern: str, subject: str) -> bool:
    """Whether every subject that ``subject`` matches is matched by ``pattern``.

    Both are NATS subjects, either may hold wildcards (``*`` one token, ``>``
    one or more trailing tokens). ``subject_covers("daemoneye.*.events.>",
    "daemoneye.web-01.events.process.>")`` holds; the bridge checks with it
    that the stream it publishes to stores every subject it forwards.
    """
    wanted = subject.split(".")
    for i, token in enumerate(pattern.split(".")):
        if token == ">":
            return len(wanted) > i
        if i >= len(wanted) or wanted[i] == ">":
            return False
        if token != "*" and (wanted[i] == "*" or wanted[i] != token):
            return False
    return len(wanted) == len(pattern.split("."))


def host_pattern(subject: str) -> str:
    """``subject`` with its host token replaced by ``*``: the same layout for every host
    (``daemoneye.web-01.events.>`` → ``daemoneye.*.events.>``)."""
    tokens = _split_subject(subject)
    tokens[1] = "*"
    return ".".join(tokens)


def subjects_overlap(a: str, b: str) -> bool:
    """Whether some concrete subject matches both NATS subjects ``a`` and ``b``
    (either may hold ``*`` and a trailing ``>``)."""
    left, right = a.split("."), b.split(".")
    for i in range(max(len(left), len(right))):
        x = left[i] if i < len(left) else None
        y = right[i] if i < len(right) else None
        if x is None or y is None:
            return False
        if x == ">" or y == ">":
            return True
        if x != "*" and y != "*" and x != y:
            return False
    return True


def control_subject_pattern() -> str:
    """Every host's inbound control subjects: ``daemoneye.*.control.>``."""
    return f"{PREFIX}.*.{CONTROL}.>"
