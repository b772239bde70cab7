"""The demo's story end to end: ``python -m daemoneye_eventbus.demo`` runs the
agent with its embedded broker and three collector processes, kills one
mid-task and shows the task re-assigned and the workflow aggregated."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import worker_env

#: The whole demo, three Python processes starting on a loaded 2-core machine included.
DEMO_TIMEOUT = 60.0


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemoneye_eventbus.demo", *args],
        capture_output=True,
        text=True,
        env=worker_env(),
        timeout=DEMO_TIMEOUT,
        check=False,
    )


def test_demo_story() -> None:
    result = run_demo("--count", "5")
    assert result.returncode == 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("daemoneye-eventbus broker listening on ")
    assert 18 <= len(lines) <= 30, result.stdout  # short

    # The registry: the three collectors, READY, with their task types.
    registry = {
        fields[0]: fields[1:4]
        for line in lines
        if (fields := line.split())
        and re.fullmatch(r"(procmond-[12]|netmond-1)", fields[0])
        and len(fields) == 5
    }
    assert registry == {
        "netmond-1": ["network", "ready", "netscan"],
        "procmond-1": ["process", "ready", "scan"],
        "procmond-2": ["process", "ready", "scan"],
    }
    assert "registry: 3 collectors" in lines

    # One workflow of three tasks, round robin; the holder of scan-1 dies mid-task.
    workflow = next(line for line in lines if line.startswith("workflow wf-"))
    root = workflow.split()[1].rstrip(":")
    assert workflow.endswith("scan-1 -> procmond-1, scan-2 -> procmond-2, netscan-1 -> netmond-1")
    assert "procmond-1 killed (SIGKILL) while running scan-1" in lines
    assert any(line.startswith("procmond-1 gone (connection lost") for line in lines)
    assert "scan-1 re-assigned to procmond-2 (attempt 2), finished once" in lines

    # Each task finished once, scan-1 on its second attempt.
    outcomes = {
        fields[0]: fields[1:5]
        for line in lines
        if (fields := line.split()) and fields[0] in ("scan-1", "scan-2", "netscan-1")
    }
    assert outcomes == {
        "scan-1": ["success", "procmond-2", "attempt", "2"],
        "scan-2": ["success", "procmond-2", "attempt", "1"],
        "netscan-1": ["success", "netmond-1", "attempt", "1"],
    }
    assert sum(line.startswith("  scan-1 ") for line in lines) == 1  # one outcome

    # The workflow's aggregate: complete, every result in it, per collector.
    assert f"aggregate of {root}: complete, 3 results, missing none" in lines
    procmond = next(line for line in lines if line.startswith("  procmond-2  success"))
    assert "scan-2 attempt 1" in procmond
    assert "scan-1 attempt 2" in procmond
    assert re.search(r"\b10 items\b", procmond)  # 5 processes per scan
    assert any(line.startswith("  netmond-1   success") for line in lines)

    # The tracker's record and the events of the workflow.
    tracker = next(line for line in lines if line.startswith(f"tracker: {root} finished"))
    assert "collectors netmond-1, procmond-1, procmond-2" in tracker
    summary = lines[-1]
    match = re.match(rf"agent received (\d+) events of {root} \(", summary)
    assert match, summary
    assert "10 on events.process.lifecycle" in summary
    assert summary.endswith(" 0 dropped")
