"""The examples run as written, as separate processes."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, worker_env
from serving import broker_process

EXAMPLES = REPO / "examples"


def test_basic_usage(sock_dir: Path) -> None:
    sock = sock_dir / "example.sock"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "basic_usage.py"), str(sock)],
        capture_output=True,
        text=True,
        env=worker_env(),
        cwd=sock_dir,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    assert lines == [
        "received on events.process.lifecycle: pid=1234 name=example_process "
        "correlation=correlation-123",
        "published=1 received=1 dropped=0",
    ]
    assert "1234" in proc.stdout
    assert "correlation-123" in proc.stdout
    # The broker shut down cleanly: its socket is gone.
    assert not os.path.exists(sock)


def test_basic_usage_default_socket(sock_dir: Path) -> None:
    """Without an argument the example uses a socket in a temporary directory."""
    env = worker_env()
    env["TMPDIR"] = str(sock_dir)  # short: socket paths are limited to ~104 bytes
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "basic_usage.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "pid=1234" in proc.stdout
    assert "correlation=correlation-123" in proc.stdout
    assert list(sock_dir.iterdir()) == []  # the temporary directory is gone


@pytest.mark.skipif(sys.platform == "win32", reason="the example scans Unix paths")
async def test_collector_and_agent(sock_dir: Path) -> None:
    """A broker process, examples/collector.py started first, then examples/agent.py."""
    sock = str(sock_dir / "bus.sock")
    async with broker_process(sock):
        worker = await asyncio.create_subprocess_exec(
            *(sys.executable, str(EXAMPLES / "collector.py"), sock, "scanner-1"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=worker_env(),
        )
        try:
            assert worker.stdout is not None
            line = await asyncio.wait_for(worker.stdout.readline(), 30)
            assert line == b"scanner-1 ready\n"
            agent = await asyncio.create_subprocess_exec(
                *(sys.executable, str(EXAMPLES / "agent.py"), sock),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=worker_env(),
            )
            try:
                out, err = await asyncio.wait_for(agent.communicate(), 60)
            except TimeoutError:
                agent.kill()
                await agent.wait()
                raise
        finally:
            worker.send_signal(signal.SIGINT)  # Ctrl-C: it leaves with a goodbye
            try:
                _, worker_err = await asyncio.wait_for(worker.communicate(), 15)
            except TimeoutError:
                worker.kill()
                await worker.wait()
                raise
    assert agent.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0] == "collectors: scanner-1"
    assert re.fullmatch(r"scan-0 /: \d+ entries", lines[1]), lines
    assert re.fullmatch(r"scan-1 /tmp: \d+ entries", lines[2]), lines
    assert lines[3].startswith("scan-2 /no/such/dir: error: "), lines
    assert lines[4] == "workflow complete, missing: none"
    assert len(lines) == 5
    assert worker.returncode == 0, worker_err.decode()
    assert b"Traceback" not in worker_err
