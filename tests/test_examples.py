"""The examples run as written, as separate processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, worker_env

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
