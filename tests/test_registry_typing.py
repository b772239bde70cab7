"""The typed topic registry turns a wrong payload into a mypy error.

Runs ``mypy --strict`` once per file of ``tests/typing_negative/``:

* ``wrong_payload.py`` marks each line mypy must reject with a trailing
  ``# E: <fragment of the message>`` comment; mypy must report an error on
  exactly those lines, each containing its fragment, and no other error;
* ``right_payload.py`` is the correct usage and must type-check cleanly.

mypy runs with its own empty configuration, a cache in ``tmp_path`` and
``--follow-imports=silent``: imported modules are analysed for their types,
but only the file under test may report errors.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tokenize
from pathlib import Path
from typing import NamedTuple

import pytest

from daemoneye.eventbus.v1 import events_pb2, registry
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationMetadata
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.registry_runtime import Publication, Topic
from daemoneye_eventbus.sessions import LocalSession

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / "tests" / "typing_negative"

# mypy on one small file takes a few seconds; the budget is generous.
MYPY_TIMEOUT = 60
pytestmark = pytest.mark.timeout(MYPY_TIMEOUT + 30)

_EXPECT = re.compile(r"#\s*E:\s*(?P<fragment>.+?)\s*\Z")
REPORT = re.compile(r"^(?P<path>.+?):(?P<line>\d+): (?P<severity>error|note): (?P<message>.*)$")


class Report(NamedTuple):
    path: Path
    line: int
    severity: str
    message: str


class MypyRun(NamedTuple):
    returncode: int
    reports: list[Report]
    output: str


def _run_mypy(path: Path, tmp_path: Path) -> MypyRun:
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\n")
    env = {
        **os.environ,
        "MYPYPATH": os.pathsep.join([str(ROOT / "generated"), str(ROOT)]),
    }
    env.pop("MYPY_CACHE_DIR", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--config-file",
            str(config),
            "--cache-dir",
            str(tmp_path / "mypy_cache"),
            "--follow-imports=silent",
            "--python-version=3.11",
            "--no-error-summary",
            "--hide-error-context",
            "--no-pretty",
            "--no-color-output",
            "--show-error-codes",
            str(path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=MYPY_TIMEOUT,
        check=False,
    )
    reports = []
    for line in proc.stdout.splitlines():
        m = REPORT.match(line)
        if m is not None:
            reports.append(
                Report(
                    (ROOT / m["path"]).resolve(),
                    int(m["line"]),
                    m["severity"],
                    m["message"],
                )
            )
    return MypyRun(proc.returncode, reports, proc.stdout + proc.stderr)


def expectations(path: Path) -> dict[int, str]:
    """``{line number: expected fragment}`` from the ``# E:`` comments of ``path``.

    Only real comments count (found with :mod:`tokenize`), not ``# E:`` in a
    docstring.
    """
    expected: dict[int, str] = {}
    with path.open("rb") as f:
        for token in tokenize.tokenize(f.readline):
            if token.type == tokenize.COMMENT:
                m = _EXPECT.match(token.string)
                if m is not None:
                    expected[token.start[0]] = m["fragment"]
    return expected


def test_expectations_are_parsed() -> None:
    expected = expectations(CASES / "wrong_payload.py")
    assert len(expected) >= 3
    fragments = list(expected.values())
    assert any("build_publish" in f for f in fragments)
    assert any('Missing named argument "id"' in f for f in fragments)
    assert any("Topic[NetworkEvent]" in f for f in fragments)
    # Request topics: a wrong request type and a wrong reply type.
    assert any('type parameter "P" of "request"' in f for f in fragments)
    assert any('variable has type "TaskAck"' in f for f in fragments)
    assert expectations(CASES / "right_payload.py") == {}


def test_wrong_payload_is_a_type_error(tmp_path: Path) -> None:
    path = CASES / "wrong_payload.py"
    expected = expectations(path)
    run = _run_mypy(path, tmp_path)
    assert run.returncode == 1, run.output

    errors = [r for r in run.reports if r.severity == "error"]
    assert errors, run.output
    for error in errors:
        assert error.path == path.resolve(), f"error outside the file under test: {error}"
        assert error.line in expected, f"unexpected error: {error}\n{run.output}"
        assert expected[error.line] in error.message, (
            f"line {error.line}: expected {expected[error.line]!r}, got {error.message!r}"
        )
    missing = sorted(set(expected) - {e.line for e in errors})
    assert not missing, f"no error reported on lines {missing}:\n{run.output}"


def test_right_payload_type_checks(tmp_path: Path) -> None:
    run = _run_mypy(CASES / "right_payload.py", tmp_path)
    assert run.returncode == 0, run.output
    assert [r for r in run.reports if r.severity == "error"] == []


# -- the run-time half of the typed publish signatures ------------------------------------------


def test_a_topic_applied_to_a_message_checks_its_type() -> None:
    message = events_pb2.ProcessEvent(pid=1)
    correlation = CorrelationMetadata(correlation_id="c-1")
    topic = registry.EVENTS_PROCESS_LIFECYCLE
    assert topic(message) == Publication(topic, message, None)
    assert topic(message, correlation=correlation).correlation is correlation
    with pytest.raises(TypeError, match=r"carries daemoneye\.eventbus\.v1\.ProcessEvent, not Net"):
        topic(events_pb2.NetworkEvent())  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["publish", "publish_nowait"])
@pytest.mark.parametrize("owner", ["Client", "LocalSession"])
def test_publish_takes_at_run_time_what_mypy_lets_through(owner: str, method: str) -> None:
    """mypy checks a publish call against the topic's call (``Topic.__call__``);
    the method that runs takes the same arguments after the topic, of the same kinds."""
    cls = {"Client": Client, "LocalSession": LocalSession}[owner]
    at_run_time = list(inspect.signature(getattr(cls, method)).parameters.values())
    topic_call = list(inspect.signature(Topic.__call__).parameters.values())
    assert [p.name for p in at_run_time[:2]] == ["self", "topic"]
    assert at_run_time[1].kind is inspect.Parameter.POSITIONAL_ONLY

    def shape(params: list[inspect.Parameter]) -> list[tuple[str, object, object]]:
        return [(p.name, p.kind, p.default) for p in params]

    assert shape(at_run_time[2:]) == shape(topic_call[1:])
    assert shape(topic_call[1:]) == [
        ("message", inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.empty),
        ("correlation", inspect.Parameter.KEYWORD_ONLY, None),
    ]
