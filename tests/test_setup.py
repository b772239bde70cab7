"""What ``make demo`` and ``make check`` install, and what the README says they change.

The Makefile is read by ``make -n`` itself (what it would run for a venv that
does not exist yet), not by patterns over its text.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

README = REPO / "README.md"

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="no `make` on PATH")


def make_plan(target: str, venv: Path) -> list[list[str]]:
    """The commands ``make target`` would run with ``VENV=venv``, as argument lists."""
    # Run under `make check` too: a nested make would announce its directory.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    done = subprocess.run(
        ["make", "--no-print-directory", "-n", target, f"VENV={venv}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [shlex.split(line) for line in done.stdout.splitlines() if line.strip()]


def pip_installs(plan: list[list[str]]) -> list[list[str]]:
    """The ``pip install`` commands of ``plan`` (but pip's own upgrade)."""
    return [c for c in plan if c[1:4] == ["-m", "pip", "install"] and "--upgrade" not in c]


def flat(text: str) -> str:
    return " ".join(text.split())


@needs_make
def test_make_demo_installs_the_package_and_its_fast_extra_only(tmp_path: Path) -> None:
    installs = pip_installs(make_plan("demo", tmp_path / "venv"))
    assert [c[-1] for c in installs] == [".[fast]"], installs
    assert installs[0][-2] == "-e"


@needs_make
def test_make_check_installs_the_full_set_which_serves_the_demo_too(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    plan = make_plan("venv", venv)
    installs = pip_installs(plan)
    assert [c[-1] for c in installs] == [".[dev,bench]"], installs
    # The full set marks the venv ready for the demo as well ...
    (touch,) = [c for c in plan if c[0] == "touch"]
    assert str(venv / ".runtime") in touch[1:]
    # ... so that `make demo` after `make check` installs nothing more.
    venv.mkdir()
    for stamp in touch[1:]:
        Path(stamp).touch()
    plan = make_plan("demo", venv)
    assert pip_installs(plan) == []
    assert plan == [[str(venv / "bin" / "daemoneye-eventbus"), "demo"]]


def shell_array(script: str, name: str) -> list[str]:
    m = re.search(rf"^{name}=\((?P<items>[^)]*)\)", script, re.M)
    assert m is not None, name
    return m["items"].split()


def shell_value(script: str, name: str) -> str:
    m = re.search(rf"^{name}=(?P<value>\S+)$", script, re.M)
    assert m is not None, name
    return m["value"]


def test_the_readme_names_the_users_make_check_creates_as_root() -> None:
    users_sh = (REPO / "tests" / "users.sh").read_text(encoding="utf-8")
    users = shell_array(users_sh, "MEMBERS") + shell_array(users_sh, "OUTSIDERS")
    groups = [shell_value(users_sh, "GROUP"), shell_value(users_sh, "PRIMARY")]
    assert users == ["deb-collector", "deb-agent", "deb-stranger"]
    readme = flat(README.read_text(encoding="utf-8"))
    setup = readme[readme.index("**Run as root**") : readme.index("**daemoneye-eventbus** is")]
    for name in [*users, *groups]:
        assert f"`{name}`" in setup, name
    assert "`tests/users.sh`" in setup


def apt_packages_of_the_benchmark() -> set[str]:
    """The Debian packages the benchmark peers install (their ``apt_install`` calls)."""
    packages: set[str] = set()
    for path in sorted((REPO / "benchmarks" / "peers").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "apt_install"
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
            ):
                packages.add(str(node.args[1].value))
    return packages


def test_the_readme_names_the_packages_make_check_installs_as_root() -> None:
    packages = apt_packages_of_the_benchmark()
    assert packages == {"nats-server", "mosquitto"}
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    for package in packages:
        assert re.search(rf"apt-get install .*\b{package}\b", ci), package
    readme = flat(README.read_text(encoding="utf-8"))
    setup = readme[readme.index("**Run as root**") : readme.index("**daemoneye-eventbus** is")]
    for package in packages:
        assert f"`{package}`" in setup, package
    assert "`apt-get`" in setup
