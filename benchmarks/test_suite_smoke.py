"""Smoke test of the side-by-side suite (``benchmarks/suite.py``), so that it cannot rot.

It runs every workload against this bus only, on tiny counts, renders the
Markdown report and the chart, and checks that the peers' adapters import
and spell topics and filters as their systems expect. The peers themselves
are not run here: ``make bench`` (or ``python -m benchmarks.suite --quick``)
does that.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from benchmarks.peers import ADAPTERS, SYSTEMS, adapter
from benchmarks.peers.base import PAYLOAD_BYTES, TOPIC, WILDCARD, payload, routing_filters
from benchmarks.peers.daemoneye_peer import make_event
from benchmarks.suite import (
    WORKLOADS,
    Settings,
    _parser,
    importable_chart,
    markdown_report,
    run_suite,
    self_time,
    settings_from,
    write_chart,
)

TINY = Settings(
    messages=400,
    latency_messages=40,
    warmup=10,
    filter_counts=(10, 300),
    routing_messages=400,
    idle_clients=8,
    cap=30.0,
    repeat=1,
    quick=True,
)


@pytest.mark.timeout(90)
def test_daemoneye_runs_every_workload_and_the_report_renders(tmp_path: Path) -> None:
    results, machine = run_suite(["daemoneye"], list(WORKLOADS), TINY, install=False)
    failed = [(r.workload, r.status, r.errors) for r in results if not r.ok]
    assert not failed
    # One row per workload, E once per filter count.
    assert [r.workload for r in results] == ["A", "B", "C", "D", "E", "E", "F", "BL", "CL", "R"]
    for r in results:
        if r.workload in ("A", "B", "C", "E", "F", "BL", "CL"):
            assert r.received == r.expected > 0, r  # nothing is dropped at this pace
            assert r.received_per_s
            assert r.broker_cpu_pct is not None
    for round_trip in ("D", "R"):
        latency = next(r for r in results if r.workload == round_trip)
        assert latency.latency_us is not None
        assert latency.received == latency.expected > 0, latency
        assert latency.latency_us["p50"] <= latency.latency_us["p99"] <= latency.latency_us["p99.9"]
    memory = next(r for r in results if r.workload == "F").memory
    assert {"rss_empty_kib", "rss_clients_kib", "rss_before_kib", "peak_kib"} <= set(memory)

    report = markdown_report(results, machine, TINY, "python -m benchmarks.suite (test)")
    for w, title in WORKLOADS.items():
        assert f"## {w}: {title}" in report
    # A, B, C, D, F, BL, CL, R
    assert report.count("| daemoneye-eventbus | Unix socket |") == 8
    assert "| daemoneye-eventbus | 300 |" in report  # E, per filter count
    assert "## Targets" in report
    assert machine["versions"]["protobuf"]

    if importable_chart():
        chart = tmp_path / "results.png"
        assert write_chart(results, chart) is None
        assert chart.stat().st_size > 10_000


def test_an_unavailable_peer_gets_a_row_not_silence() -> None:
    from benchmarks.suite import Result

    results = [
        Result("daemoneye", "daemoneye-eventbus", "A", transport="Unix socket"),
        Result("nats", "NATS", "A", status="unavailable", errors=["nats-server not found"]),
    ]
    report = markdown_report(results, _machine(), TINY, "test")
    assert "| NATS | - | n/a | n/a | n/a | n/a | NOT AVAILABLE: nats-server not found |" in report


@pytest.mark.parametrize("name", SYSTEMS)
def test_peer_adapters_import(name: str) -> None:
    system = adapter(name)
    assert system.name == name
    assert isinstance(system, ADAPTERS[name])
    roles = importlib.import_module(system.module).ROLES
    common = {"pub", "sub", "stalled", "holder", "idle", "echo", "ping"}
    # Workload R's roles, for the systems with request/reply of their own.
    rpc = {"responder", "requester"} if system.request_reply else set()
    assert set(roles) == common | rpc


def test_peers_spell_filters_in_their_own_syntax() -> None:
    from benchmarks.peers.mqtt_peer import topic_name
    from benchmarks.peers.nats_peer import subject
    from benchmarks.peers.zmq_peer import prefix

    assert subject(WILDCARD) == "events.process.>"
    assert subject(("events", "+", "n1")) == "events.*.n1"
    assert topic_name(WILDCARD) == "events/process/#"
    assert prefix(WILDCARD) == b"events.process."
    assert prefix(TOPIC).startswith(prefix(WILDCARD))
    filters = routing_filters(3_000)
    assert len(set(filters)) == len(filters) == 3_000
    # None of the routing filters may match the measured topic, in any syntax.
    topic = ".".join(TOPIC).encode()
    assert not any(topic.startswith(prefix(f)) for f in filters)


def test_payloads_are_256_bytes() -> None:
    assert len(payload()) == PAYLOAD_BYTES
    assert make_event().ByteSize() == PAYLOAD_BYTES


def test_quick_settings_and_arguments() -> None:
    args = _parser().parse_args(["--quick", "--systems", "daemoneye,nats", "--workloads", "A,E"])
    assert args.systems == ["daemoneye", "nats"]
    assert args.workloads == ["A", "E"]
    settings = settings_from(args)
    assert settings.quick
    assert settings.messages == 30_000
    assert max(settings.filter_counts) == 10_000
    with pytest.raises(SystemExit):
        _parser().parse_args(["--systems", "kafka"])


def test_repeated_runs_show_the_median() -> None:
    from benchmarks.suite import Result, _median_runs

    def run(rate: float, status: str = "ok") -> list[Result]:
        return [Result("zmq", "ZeroMQ proxy", "A", status=status, received_per_s=rate)]

    failed = run(0.0, "incomplete")
    failed[0].errors.append("cap reached: workers killed")
    chosen = _median_runs([run(300.0), run(100.0), run(200.0), failed])
    assert [r.received_per_s for r in chosen] == [200.0]
    assert chosen[0].notes[0] == (
        "median of 4 runs by received/s (100, 200, 300; 1 incomplete: cap reached: workers killed)"
    )


def test_self_time_aggregates_py_spy_raw_stacks() -> None:
    from benchmarks.suite import WAITING

    raw = (
        "<module> (a.py:1);run (a.py:5);route (broker.py:600) 30\n"
        "<module> (a.py:1);run (a.py:5);route (broker.py:610) 10\n"
        "<module> (a.py:1);run (a.py:6) 60\n"
        "<module> (a.py:1);select (selectors.py:9);EpollSelector.select (selectors.py:468) 100\n"
    )
    assert self_time(raw) == [
        (WAITING, 50.0),
        ("run (a.py)", 60.0),
        ("route (broker.py)", 40.0),
    ]


def _machine() -> dict[str, object]:
    return {
        "cpu_model": "test",
        "cores": 2,
        "memory": "1 GiB",
        "kernel": "Linux",
        "python": "CPython 3.11",
        "versions": {},
        "date": "today",
    }


@pytest.mark.timeout(60)
def test_no_responders_benchmark_runs(tmp_path: Path) -> None:
    """benchmarks/no_responders.py, bounded: every request fails with NoResponders."""
    import asyncio

    from benchmarks.no_responders import measure, start_broker

    path = str(tmp_path / "bus.sock")
    broker = start_broker(path)
    try:
        times = asyncio.run(measure(path, 20, 2))
    finally:
        broker.terminate()
        broker.wait()
    assert len(times) == 20
    assert times == sorted(times)


def _run_bridge_benchmark(module: str, *args: str) -> str:
    """``python -m benchmarks.MODULE *args``, which must exit 0; its output.

    Like the bridge's tests, it needs nats-server: skipped without it, failed
    under CI (which installs it).
    """
    import os
    import subprocess
    import sys

    from benchmarks.peers.base import find_binary

    if find_binary("nats-server") is None:
        if os.environ.get("CI"):
            pytest.fail("nats-server is not installed, and CI must run the bridge benchmarks")
        pytest.skip("nats-server is not installed (apt-get install nats-server)")
    out = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_bridge_benchmark_runs() -> None:
    """benchmarks/bridge.py, bounded: each run's stream holds exactly the events
    sent (the benchmark exits non-zero otherwise) and the table is printed."""
    stdout = _run_bridge_benchmark("bridge", "--events", "2000", "--rate", "1000", "--seconds", "1")
    rows = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows[1:]] == [
        "| throughput (as fast as possible)",
        "| latency (1,000 events/s)",
        "| nats-py alone, for comparison (publish_async, 1024 in flight)",
    ]


def test_bridge_outage_benchmark_runs() -> None:
    """benchmarks/bridge_outage.py, bounded: 3,000 events spooled while NATS is
    away, then drained, each once (the benchmark exits non-zero otherwise)."""
    stdout = _run_bridge_benchmark("bridge_outage", "--events", "3000")
    assert "The stream holds 3,000 events: each once." in stdout
    assert stdout.count("events spooled, NATS away") == 3
