"""The event loop of the CLI and the benchmarks: uvloop when installed, asyncio on request."""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import sys

import pytest
from conftest import AGENT, PROCMOND, peer_published, worker_env

from daemoneye.eventbus.v1 import events_pb2, registry
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.runtime import LOOP_ENV, loop_factory, loop_name, run, running_loop_name

LIFECYCLE = registry.EVENTS_PROCESS_LIFECYCLE


def test_auto_takes_uvloop_when_it_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LOOP_ENV, raising=False)
    assert loop_name() == "uvloop"  # the dev extra installs it
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if it were not installed
    assert loop_factory() is None
    assert loop_name() == "asyncio"


@pytest.mark.parametrize("choice", ["asyncio", " ASYNCIO "])
def test_asyncio_on_request(monkeypatch: pytest.MonkeyPatch, choice: str) -> None:
    monkeypatch.setenv(LOOP_ENV, choice)
    assert loop_factory() is None


def test_bad_choices_are_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LOOP_ENV, "tokio")
    with pytest.raises(ValueError, match="expected one of auto, asyncio, uvloop"):
        loop_factory()
    monkeypatch.setenv(LOOP_ENV, "uvloop")
    monkeypatch.setitem(sys.modules, "uvloop", None)
    with pytest.raises(RuntimeError, match=r"uvloop is not installed"):
        loop_factory()


@pytest.mark.parametrize("choice", ["tokio", "uvloop"])
def test_a_refused_choice_closes_the_coroutine_unstarted(
    monkeypatch: pytest.MonkeyPatch, choice: str
) -> None:
    monkeypatch.setenv(LOOP_ENV, choice)
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if it were not installed
    started = []

    async def main() -> None:
        started.append(True)

    coro = main()
    with pytest.raises((ValueError, RuntimeError)):
        run(coro)
    # Closed, so never reported as "coroutine ... was never awaited".
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
    assert started == []


@pytest.mark.parametrize("choice", ["uvloop", "asyncio"])
def test_run_uses_the_chosen_loop(monkeypatch: pytest.MonkeyPatch, choice: str) -> None:
    monkeypatch.setenv(LOOP_ENV, choice)

    async def main() -> str:
        await asyncio.sleep(0)
        return running_loop_name()

    assert run(main()) == choice


@pytest.mark.parametrize("choice", ["uvloop", "asyncio"])
async def test_broker_on_each_loop(sock_path: str, choice: str) -> None:
    """The CLI broker on either loop: kernel credentials, batches, a clean stop."""
    env = worker_env()
    env[LOOP_ENV] = choice
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "daemoneye_eventbus.cli", "serve", "--socket", sock_path),
        # As root the broker refuses to run on without --user or --allow-root.
        *(["--allow-root"] if os.geteuid() == 0 else []),
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            line = (await proc.stdout.readline()).decode()
        assert line.rstrip().endswith(f"loop {choice})"), line
        async with (
            Client(sock_path, component=AGENT) as agent,
            Client(sock_path, component=PROCMOND) as collector,
        ):
            sub = await agent.subscribe(LIFECYCLE)
            for pid in range(1000):
                collector.publish_nowait(LIFECYCLE, events_pb2.ProcessEvent(pid=pid))
            await collector.flush()
            got = [await sub.get(timeout=5) for _ in range(1000)]
            assert [e.message().pid for e in got] == list(range(1000))
            assert [e.sequence for e in got] == list(range(1, 1001))
            stats = await agent.broker_statistics()  # the agent is privileged
            # The broker read each peer's credentials from the kernel.
            assert {c.peer_pid for c in stats.connection_stats} == {os.getpid()}
            assert {c.peer_uid for c in stats.connection_stats} == {os.getuid()}
            assert peer_published(stats) == 1000
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
