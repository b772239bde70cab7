"""``daemoneye-eventbus serve`` in its own process, for tests that need the broker apart."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator

from conftest import worker_env
from rawpeer import RawPeer


@contextlib.asynccontextmanager
async def broker_process(path: str, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """``serve --socket path *args``, ready for connections; stopped (TERM, then KILL) after."""
    # As root (CI), the broker refuses to run on without --user or --allow-root.
    root = ["--allow-root"] if os.geteuid() == 0 else []
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "daemoneye_eventbus.cli", "serve", "--socket", path),
        *root,
        *args,
        env=worker_env(),
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        # The socket file appears at bind(), a moment before listen(): until then a
        # connection is refused (a loaded machine can stretch that moment).
        for _ in range(250):
            if os.path.exists(path):
                try:
                    peer = await RawPeer.connect(path)  # let it settle: imports, first connection
                except ConnectionRefusedError:
                    pass
                else:
                    peer.close()
                    break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("broker did not start")
        await asyncio.sleep(0.2)
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
