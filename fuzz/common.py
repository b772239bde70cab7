"""What the fuzz targets share: the input reader, invariant failures, the atheris driver.

Inputs are read with :class:`ByteReader`, a small pure-Python stand-in for
``atheris.FuzzedDataProvider``: the targets must interpret a saved input the
same way with and without atheris (``tests/test_fuzz_regressions.py`` replays
inputs without it), which the C provider of atheris cannot guarantee. Every
byte string is a valid input: reading past the end yields zeros and empty
strings.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, Protocol, cast

__all__ = [
    "KNOWN_BUGS",
    "ByteReader",
    "InvariantViolation",
    "TestOneInput",
    "check",
    "fail",
    "quiet_logging",
    "reported_bugs",
    "run_fuzzer",
]

#: The signature of a fuzz target: one input, no result; raising is a finding.
TestOneInput = Callable[[bytes], None]


#: Library bugs found by fuzzing and not fixed yet, by id. Unless run strictly, a
#: target does not report the narrow symptom of a known bug, so that a fuzzing
#: run goes on to find new ones; tests/test_fuzz_regressions.py replays each
#: reproducer strictly, as a strict xfail. Remove an entry once its bug is fixed.
KNOWN_BUGS: dict[str, str] = {}


def reported_bugs(strict: bool | None = None) -> frozenset[str]:
    """The known bugs a target reports: all if ``strict``, none if False.

    With None, the environment decides: ``FUZZ_STRICT=1`` (or ``all``) reports
    every known bug, ``FUZZ_STRICT=id1,id2`` those, unset or ``0`` none.
    """
    if strict is not None:
        return frozenset(KNOWN_BUGS) if strict else frozenset()
    value = os.environ.get("FUZZ_STRICT", "").strip()
    if value in ("", "0"):
        return frozenset()
    if value in ("1", "all"):
        return frozenset(KNOWN_BUGS)
    ids = frozenset(v.strip() for v in value.split(",") if v.strip())
    unknown = ids - set(KNOWN_BUGS)
    if unknown:
        raise SystemExit(f"FUZZ_STRICT names unknown bugs: {sorted(unknown)}")
    return ids


class InvariantViolation(AssertionError):
    """A fuzz target found an input that breaks one of its invariants."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`InvariantViolation` unless ``condition`` (unlike ``assert``, never elided)."""
    if not condition:
        raise InvariantViolation(message)


def fail(message: str) -> NoReturn:
    """Raise :class:`InvariantViolation`: ``if not cond: fail(...)`` formats only on failure."""
    raise InvariantViolation(message)


class ByteReader:
    """Sequential reads from a fuzz input; past the end it yields zeros and ``b""``."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def u8(self) -> int:
        """One byte as 0..255 (0 past the end)."""
        if self._pos >= len(self._data):
            return 0
        value = self._data[self._pos]
        self._pos += 1
        return value

    def u16(self) -> int:
        """Two bytes, big-endian, as 0..65535."""
        return (self.u8() << 8) | self.u8()

    def length(self) -> int:
        """A length of 0..127 in one byte, or 128..32767 in two (high bit set)."""
        first = self.u8()
        if first & 0x80:
            return ((first & 0x7F) << 8) | self.u8()
        return first

    def take(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer at the end of the input)."""
        out = self._data[self._pos : self._pos + n]
        self._pos += len(out)
        return out

    def blob(self) -> bytes:
        """A length (see :meth:`length`) followed by that many bytes."""
        return self.take(self.length())

    def text(self) -> str:
        """A :meth:`blob` decoded as UTF-8, invalid sequences replaced."""
        return self.blob().decode("utf-8", "replace")

    def choice(self, options: Sequence[Any]) -> Any:
        """One of ``options``, chosen by one byte."""
        return options[self.u8() % len(options)]

    def rest(self) -> bytes:
        """Everything not read yet."""
        out = self._data[self._pos :]
        self._pos = len(self._data)
        return out


def quiet_logging() -> None:
    """Keep the library's warnings (audit lines, refusals) off the fuzzer's output.

    Errors still go through, so an internal error logged by the broker shows.
    """
    logging.getLogger("daemoneye_eventbus").setLevel(logging.ERROR)


class _Atheris(Protocol):
    """The part of atheris' API used here (atheris ships no type information)."""

    def Setup(self, argv: list[str], test_one_input: TestOneInput, **kwargs: Any) -> list[str]: ...

    def Fuzz(self) -> None: ...

    def instrument_all(self) -> None: ...


def _load_atheris() -> _Atheris:
    try:
        module = importlib.import_module("atheris")
    except ImportError:
        sys.exit(
            "atheris is not installed: .venv/bin/pip install atheris==3.0.0 "
            "(Linux x86_64 wheels for CPython 3.11)"
        )
    return cast(_Atheris, module)


def run_fuzzer(test_one_input: TestOneInput, argv: Sequence[str] | None = None) -> None:
    """Instrument everything imported so far and hand ``argv`` to libFuzzer.

    ``argv`` takes libFuzzer's flags and corpus directories, e.g.
    ``["prog", "-max_total_time=60", "build/fuzz/frames", "fuzz/corpus/frames"]``.
    """
    atheris = _load_atheris()
    quiet_logging()
    atheris.instrument_all()
    atheris.Setup(list(sys.argv if argv is None else argv), test_one_input)
    atheris.Fuzz()
