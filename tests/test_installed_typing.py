"""Installed from its wheel, the package type-checks a user's code as strictly as ``make types``.

The test builds the wheel (``pip wheel --no-deps``), installs it with its
dependencies from the package index into a new virtualenv, beside the mypy
this project pins, and runs that mypy ``--strict`` outside the repository
(nothing of it on any path) over:

* ``tests/typing_negative/user_mistakes.py``: each line marked ``# E:`` must
  be reported with that fragment of the message, and nothing else;
* ``tests/typing_negative/user_code.py`` and the README's Python examples:
  nothing may be reported.

Without the protobuf stubs among the package's dependencies, mypy there sees
every message class as ``Any`` and lets the first two mistakes of
``user_mistakes.py`` pass. The test needs the package index: it is marked
``network`` (offline, deselect them with ``-m 'not network'``); CI runs them.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from test_docs_examples import README, fenced_blocks
from test_registry_typing import REPORT, expectations

CASES = REPO / "tests" / "typing_negative"
MISTAKES = CASES / "user_mistakes.py"
RIGHT = CASES / "user_code.py"
#: Building and installing from the index; mypy itself takes a few seconds.
INSTALL_TIMEOUT = 240

#: For the tests that install: the fixture's steps and mypy, each with its own limit.
slow_install = pytest.mark.timeout(3 * INSTALL_TIMEOUT + 60)


def outside_env() -> dict[str, str]:
    """The environment without anything that points into the repository."""
    env = dict(os.environ)
    for name in ("PYTHONPATH", "MYPYPATH", "MYPY_CACHE_DIR", "VIRTUAL_ENV"):
        env.pop(name, None)
    return env


def run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        cwd=cwd,
        env=outside_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def user_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtualenv's Python, with the wheel, its dependencies and mypy installed."""
    tmp = tmp_path_factory.mktemp("installed")
    wheels = tmp / "wheels"
    built = run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "-w",
            str(wheels),
            str(REPO),
        ],
        tmp,
        INSTALL_TIMEOUT,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = wheels.glob("daemoneye_eventbus-*.whl")
    venv = tmp / "venv"
    made = run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp, 60)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    mypy = f"mypy=={importlib.metadata.version('mypy')}"
    installed = run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            str(wheel),
            mypy,
        ],
        tmp,
        INSTALL_TIMEOUT,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return python


@pytest.mark.network
@slow_install
def test_the_package_and_its_stubs_come_from_the_wheel(user_python: Path, tmp_path: Path) -> None:
    probe = run(
        [
            str(user_python),
            "-c",
            "import importlib.metadata as m, daemoneye_eventbus, daemoneye.eventbus.v1 as g;"
            "print(daemoneye_eventbus.__file__); print(g.__file__);"
            "print(m.version('types-protobuf')); print(m.version('protobuf'))",
        ],
        tmp_path,
        60,
    )
    assert probe.returncode == 0, probe.stderr
    package, generated, stubs, runtime = probe.stdout.split()
    venv = user_python.parent.parent
    assert Path(package).is_relative_to(venv), package
    assert Path(generated).is_relative_to(venv), generated
    # The stubs of the protobuf runtime's major version.
    assert stubs.split(".")[0] == runtime.split(".")[0]


@pytest.mark.network
@slow_install
def test_mypy_strict_reports_each_mistake_and_nothing_in_right_code(
    user_python: Path, tmp_path: Path
) -> None:
    # The user's files, outside the repository.
    (tmp_path / MISTAKES.name).write_text(MISTAKES.read_text(encoding="utf-8"), encoding="utf-8")
    right = [RIGHT.name]
    (tmp_path / RIGHT.name).write_text(RIGHT.read_text(encoding="utf-8"), encoding="utf-8")
    examples = [b for b in fenced_blocks(README) if b.language == "python"]
    assert examples
    for block in examples:
        name = f"readme_line_{block.line}.py"
        (tmp_path / name).write_text(block.code, encoding="utf-8")
        right.append(name)
    checked = run(
        [
            str(user_python),
            "-m",
            "mypy",
            "--strict",
            "--no-error-summary",
            "--hide-error-context",
            "--no-pretty",
            "--no-color-output",
            "--cache-dir",
            str(tmp_path / "mypy-cache"),
            MISTAKES.name,
            *right,
        ],
        tmp_path,
        INSTALL_TIMEOUT,
    )
    output = checked.stdout + checked.stderr
    reports = [m for m in map(REPORT.match, checked.stdout.splitlines()) if m is not None]
    errors = [
        (m["path"], int(m["line"]), m["message"]) for m in reports if m["severity"] == "error"
    ]
    assert checked.returncode == 1, output
    expected = expectations(MISTAKES)
    assert len(expected) == 5
    unexpected = [e for e in errors if e[0] != MISTAKES.name or e[1] not in expected]
    assert not unexpected, output
    for line, fragment in expected.items():
        messages = [message for path, at, message in errors if at == line]
        assert messages, (
            f"{MISTAKES.name}:{line}: nothing reported, expected {fragment!r}\n{output}"
        )
        assert any(fragment in message for message in messages), (line, fragment, messages)


def test_the_readme_shows_what_mypy_reports() -> None:
    readme = README.read_text(encoding="utf-8")
    for fragment in expectations(MISTAKES).values():
        assert f"\n  {fragment}\n" in readme, fragment
