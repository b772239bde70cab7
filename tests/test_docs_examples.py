"""Every code block of the README and of docs/ that is marked runnable runs as written.

The convention (README, "Examples in the documents"): a fenced block whose
info string is ``python run`` or ``sh run`` is a complete program. Each one
runs in its own process, against a broker this test starts with
``daemoneye-eventbus serve`` (``python run no-broker``: none, the program
starts its own), with the broker's socket path in ``DAEMONEYE_EVENTBUS_SOCKET``.
It must exit 0 and write nothing to stderr; a ``text output`` block right
after it (nothing but blank lines between) is its standard output, line for
line, where ``…`` stands for any text within a line. A block that is not a
complete program says ``no-run``; a Python block marked neither fails
:func:`test_every_python_block_is_marked`, and the README's Python blocks must
all run.

The program is written to a file named like its document, its first line
padded to the block's line there, so that a traceback or a shell error names
the document's own line.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import itertools
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, worker_env
from serving import broker_process

README = REPO / "README.md"
DOCUMENTS = [README, *sorted((REPO / "docs").glob("*.md"))]
#: Where a runnable block finds the broker's socket (its default is the CLI's).
SOCKET_ENV = "DAEMONEYE_EVENTBUS_SOCKET"
#: The languages a ``run`` block may be in, and how each is run.
RUNNERS: dict[str, list[str]] = {
    "python": [sys.executable],
    "sh": ["bash", "-e", "-u", "-o", "pipefail"],
}
#: Info-string words after the language, and what each means.
FLAGS = {
    "run": "a complete program: run it",
    "no-run": "not a complete program: do not run it",
    "no-broker": "the program starts its own broker",
    "output": "the standard output of the run block just above",
}
PYTHON = {"python", "py", "python3"}
#: A whole program, broker start-up not included; the first imports are slow on a
#: loaded 2-core machine.
RUN_TIMEOUT = 60.0

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")


@dataclass
class Block:
    """One fenced code block of a document."""

    document: Path
    #: The line of the opening fence, from 1.
    line: int
    #: The line of the closing fence (the last line, for an unclosed block).
    end: int
    language: str
    flags: list[str]
    code: str
    #: The ``output`` block that follows a ``run`` block, if any.
    output: Block | None = field(default=None, repr=False)

    @property
    def where(self) -> str:
        try:
            name = self.document.relative_to(REPO)
        except ValueError:
            name = self.document
        return f"{name}:{self.line}"


def fenced_blocks(document: Path) -> list[Block]:
    """The fenced code blocks of ``document``, an ``output`` block attached to the
    ``run`` block right above it when only blank lines separate them."""
    lines = document.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        indent, fence = len(m["indent"]), m["fence"]
        words = m["info"].split()
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            stripped = lines[j].strip()
            if stripped.startswith(fence) and stripped == fence[0] * len(stripped):
                break
            line = lines[j]
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))) :])
            j += 1
        blocks.append(
            Block(
                document,
                i + 1,
                min(j, len(lines) - 1) + 1,
                words[0] if words else "",
                words[1:],
                "".join(f"{line}\n" for line in body),
            )
        )
        i = j + 1
    for above, below in itertools.pairwise(blocks):
        between = lines[above.end : below.line - 1]
        if "run" in above.flags and "output" in below.flags and not any(map(str.strip, between)):
            above.output = below
    return blocks


def marking_problems(blocks: list[Block], *, all_must_run: bool) -> list[str]:
    """What is wrong with the markers of ``blocks``, one line per problem."""
    problems: list[str] = []
    outputs = {id(b.output) for b in blocks if b.output is not None}
    for block in blocks:
        unknown = [f for f in block.flags if f not in FLAGS]
        if unknown:
            problems.append(f"{block.where}: unknown marker {unknown} (known: {sorted(FLAGS)})")
        if "run" in block.flags and "no-run" in block.flags:
            problems.append(f"{block.where}: marked both run and no-run")
        if "run" in block.flags and block.language not in RUNNERS:
            problems.append(f"{block.where}: cannot run {block.language!r} (only {list(RUNNERS)})")
        if "no-broker" in block.flags and "run" not in block.flags:
            problems.append(f"{block.where}: no-broker on a block that does not run")
        if "output" in block.flags and id(block) not in outputs:
            problems.append(f"{block.where}: an output block not right after a run block")
        if block.language in PYTHON:
            if all_must_run and "run" not in block.flags:
                problems.append(f"{block.where}: every Python block here must be `python run`")
            elif not {"run", "no-run"} & set(block.flags):
                problems.append(f"{block.where}: a Python block marked neither run nor no-run")
    return problems


def runnable(documents: list[Path]) -> Iterator[Block]:
    for document in documents:
        for block in fenced_blocks(document):
            if "run" in block.flags:
                yield block


def output_problems(expected: str, actual: str) -> list[str]:
    """How ``actual`` differs from ``expected`` (``…``: any text within a line)."""
    want = expected.rstrip("\n").split("\n") if expected.strip() else []
    got = [line.rstrip() for line in actual.rstrip("\n").split("\n")] if actual.strip() else []
    patterns = [
        re.compile(".*".join(re.escape(part) for part in line.rstrip().split("…"))) for line in want
    ]
    if len(want) == len(got) and all(
        p.fullmatch(line) for p, line in zip(patterns, got, strict=True)
    ):
        return []
    return list(difflib.unified_diff(want, got, "expected", "printed", lineterm=""))


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False


async def run_block(block: Block, workdir: Path, socket_path: str) -> Run:
    """Run ``block`` as a program in ``workdir`` with the broker's socket in the environment."""
    script = workdir / block.document.name
    script.write_text("\n" * block.line + block.code, encoding="utf-8")
    env = worker_env()
    env[SOCKET_ENV] = socket_path
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # A reader runs the examples as plain programs, not in asyncio's debug mode
    # (whose slow-callback warnings would land on stderr).
    env.pop("PYTHONASYNCIODEBUG", None)
    proc = await asyncio.create_subprocess_exec(
        *RUNNERS[block.language],
        str(script),
        cwd=workdir,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    communicate = asyncio.ensure_future(proc.communicate())
    timed_out = False
    try:
        stdout, stderr = await asyncio.wait_for(asyncio.shield(communicate), RUN_TIMEOUT)
    except TimeoutError:
        timed_out = True
        proc.kill()
        stdout, stderr = await communicate
    assert proc.returncode is not None
    return Run(proc.returncode, stdout.decode(), stderr.decode(), timed_out)


def run_problems(block: Block, run: Run) -> list[str]:
    """What is wrong with how ``block`` ran, each naming the document's line."""
    problems: list[str] = []
    if run.timed_out:
        problems.append(f"{block.where}: still running after {RUN_TIMEOUT:.0f} s, killed")
    elif run.returncode != 0:
        problems.append(f"{block.where}: exit status {run.returncode}")
    if run.stderr:
        problems.append(f"{block.where}: wrote to stderr:\n{run.stderr.rstrip()}")
    if block.output is not None:
        diff = output_problems(block.output.code, run.stdout)
        if diff:
            problems.append(
                f"{block.where}: output differs from {block.output.where}:\n" + "\n".join(diff)
            )
    return problems


async def run_and_check(block: Block, workdir: Path) -> list[str]:
    socket_path = str(workdir / "bus.sock")
    async with contextlib.AsyncExitStack() as stack:
        if "no-broker" not in block.flags:
            await stack.enter_async_context(broker_process(socket_path))
        run = await run_block(block, workdir, socket_path)
    return run_problems(block, run)


RUNNABLE = list(runnable(DOCUMENTS))


# -- the documents -----------------------------------------------------------------------------


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.where for b in RUNNABLE])
async def test_runnable_block_runs_as_written(block: Block, sock_dir: Path) -> None:
    problems = await run_and_check(block, sock_dir)
    assert not problems, "\n".join(problems)


def test_every_python_block_is_marked() -> None:
    problems = [
        problem
        for document in DOCUMENTS
        for problem in marking_problems(fenced_blocks(document), all_must_run=document == README)
    ]
    assert not problems, "\n".join(problems)


def test_the_readmes_examples_are_found() -> None:
    found = [b for b in RUNNABLE if b.document == README]
    assert len(found) >= 3, [b.where for b in found]
    assert all(b.language == "python" for b in found)
    # Each shows what it prints, and the typed client's runs against a broker of the test's.
    assert all(b.output is not None for b in found), [b.where for b in found if not b.output]
    assert any("Client(" in b.code and "no-broker" not in b.flags for b in found)


# -- the harness on documents made up here -----------------------------------------------------

SAMPLE = """\
# A document

```python run
print("one")
```

```text output
one
```

- A list item:

  ~~~sh run no-broker
  echo "two $((1 + 1))"
  echo third line
  ~~~
  ```text output
  two 2
  … line
  ```

```python
print("unmarked")
```

```python no-run
fragment(
```

```text output
orphan
```

```python run wobbly
print("typo in a marker")
```
"""


def sample_blocks(tmp_path: Path) -> list[Block]:
    document = tmp_path / "SAMPLE.md"
    document.write_text(SAMPLE, encoding="utf-8")
    return fenced_blocks(document)


def test_blocks_their_lines_markers_and_outputs_are_found(tmp_path: Path) -> None:
    blocks = sample_blocks(tmp_path)
    assert [(b.line, b.language, b.flags) for b in blocks] == [
        (3, "python", ["run"]),
        (7, "text", ["output"]),
        (13, "sh", ["run", "no-broker"]),
        (17, "text", ["output"]),
        (22, "python", []),
        (26, "python", ["no-run"]),
        (30, "text", ["output"]),
        (34, "python", ["run", "wobbly"]),
    ]
    assert blocks[0].code == 'print("one")\n'
    assert blocks[2].code == 'echo "two $((1 + 1))"\necho third line\n'  # list indent removed
    assert blocks[0].output is blocks[1]
    assert blocks[2].output is blocks[3]
    assert blocks[3].code == "two 2\n… line\n"
    assert blocks[5].output is None  # a no-run block's output is an orphan


def test_markers_are_checked(tmp_path: Path) -> None:
    problems = marking_problems(sample_blocks(tmp_path), all_must_run=False)
    assert problems == [
        f"{tmp_path / 'SAMPLE.md'}:22: a Python block marked neither run nor no-run",
        f"{tmp_path / 'SAMPLE.md'}:30: an output block not right after a run block",
        f"{tmp_path / 'SAMPLE.md'}:34: unknown marker ['wobbly'] (known: "
        "['no-broker', 'no-run', 'output', 'run'])",
    ]
    strict = marking_problems(sample_blocks(tmp_path), all_must_run=True)
    assert f"{tmp_path / 'SAMPLE.md'}:26: every Python block here must be `python run`" in strict


def test_output_is_compared_line_by_line() -> None:
    assert output_problems("a\nb … d\n", "a\nb c c d\n") == []
    assert output_problems("a…\n", "a\n") == []  # … may be empty
    assert output_problems("", "") == []
    assert output_problems("a\n", "a\nb\n")  # a line too many
    assert output_problems("a\nb\n", "a\n")  # one too few
    assert output_problems("a.c\n", "abc\n")  # only … is a wildcard
    assert output_problems("x …\n", "x y\nz\n")  # … stays within its line


async def test_a_sample_runs_and_its_output_is_checked(tmp_path: Path, sock_dir: Path) -> None:
    blocks = sample_blocks(tmp_path)
    assert await run_and_check(blocks[2], sock_dir) == []  # sh, no broker
    assert await run_and_check(blocks[0], sock_dir) == []  # python, against a broker


async def test_a_failing_block_fails_with_its_document_line(tmp_path: Path, sock_dir: Path) -> None:
    document = tmp_path / "GUIDE.md"
    text = (
        "Intro.\n\n```python run no-broker\nimport sys\nprint('out')\n"
        "raise SystemExit(sys.argv[0])\n```\n\n```text output\nother\n```\n"
    )
    document.write_text(text, encoding="utf-8")
    (block, _) = fenced_blocks(document)
    problems = await run_and_check(block, sock_dir)
    where = f"{document}:3"
    assert problems[0] == f"{where}: exit status 1"
    assert problems[1].startswith(f"{where}: wrote to stderr:")
    assert str(sock_dir / "GUIDE.md") in problems[1]  # SystemExit printed the script's name
    assert problems[2].startswith(f"{where}: output differs from {document}:9:")
    assert "-other" in problems[2]
    assert "+out" in problems[2]
    # A traceback names the document's own line.
    document.write_text("```python run no-broker\n\n\n1 / 0\n```\n", encoding="utf-8")
    (block,) = fenced_blocks(document)
    problems = await run_and_check(block, sock_dir)
    assert 'GUIDE.md", line 4' in problems[1], problems


async def test_a_block_that_needs_the_broker_finds_it(tmp_path: Path, sock_dir: Path) -> None:
    document = tmp_path / "GUIDE.md"
    code = (
        "import asyncio, os\n"
        "from daemoneye_eventbus import Client\n"
        "async def main() -> None:\n"
        "    async with Client(os.environ['DAEMONEYE_EVENTBUS_SOCKET']) as client:\n"
        "        await client.flush()\n"
        "        print('connected')\n"
        "asyncio.run(main())\n"
    )
    document.write_text(
        f"```python run\n{code}```\n```text output\nconnected\n```\n", encoding="utf-8"
    )
    block = fenced_blocks(document)[0]
    assert await run_and_check(block, sock_dir) == []
    # Without the broker, the same program cannot connect.
    block.flags.append("no-broker")
    problems = await run_and_check(block, sock_dir)
    assert problems[0] == f"{document}:1: exit status 1", problems
