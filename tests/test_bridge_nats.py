"""The NATS fixture, and the JetStream deduplication the bridge relies on."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
from bridge_helpers import full_meta
from nats_server import (
    NatsServer,
    NatsServerProcess,
    find_nats_server,
    import_nats,
    port_is_closed,
    running_nats_server,
    wait_until_stored,
)

from daemoneye.eventbus.v1.correlation_pb2 import CorrelationMetadata
from daemoneye_eventbus.bridge.headers import correlation_from_headers, event_headers
from daemoneye_eventbus.bridge.subjects import msg_id, topic_to_subject
from daemoneye_eventbus.correlation import MAX_SEQUENCE_NUMBER


def test_the_fixture_runs_a_server_of_its_own(nats_server: NatsServer) -> None:
    os.kill(nats_server.pid, 0)  # alive
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"
    assert nats_server.store_dir.is_dir()


def test_the_server_is_stopped_by_its_pid(tmp_path: Path) -> None:
    with running_nats_server(tmp_path) as server:
        os.kill(server.pid, 0)
    with pytest.raises(ProcessLookupError):
        os.kill(server.pid, 0)


def test_a_missing_binary_skips_outside_ci_and_fails_under_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="nats-server is not installed"):
        find_nats_server()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run them"):
        find_nats_server()


async def test_jetstream_drops_a_resent_event_by_its_msg_id(nats_server: NatsServer) -> None:
    nats = import_nats()
    nc = await nats.connect(nats_server.url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        await js.add_stream(name="DAEMONEYE_TEST", subjects=["daemoneye.test.>"])
        subject = topic_to_subject("test", "events.process.lifecycle")
        headers = {"Nats-Msg-Id": msg_id("test", 1, 1_700_000_000_000_000_000)}
        first = await js.publish(subject, b"event", headers=headers)
        again = await js.publish(subject, b"event", headers=headers)
        assert not first.duplicate
        assert again.duplicate
        assert again.seq == first.seq
        # Another event (a later broker run: same event id, later receive time) is kept.
        other = {"Nats-Msg-Id": msg_id("test", 1, 1_700_000_000_000_000_001)}
        third = await js.publish(subject, b"event", headers=other)
        assert not third.duplicate
        info = await js.stream_info("DAEMONEYE_TEST")
        assert info.state.messages == 2
        stored = await js.get_msg("DAEMONEYE_TEST", first.seq)
        assert (stored.subject, stored.data) == (
            "daemoneye.test.events.process.lifecycle",
            b"event",
        )
        assert stored.headers is not None
        assert stored.headers["Nats-Msg-Id"] == headers["Nats-Msg-Id"]
    finally:
        await nc.close()


async def test_a_killed_server_restarts_with_its_streams(
    nats_server_control: NatsServerProcess,
) -> None:
    nats = import_nats()
    first = nats_server_control.server
    payloads = [b"restart-event-%d" % i for i in range(3)]
    ids = [msg_id("test", i + 1, 1_700_000_000_000_000_000) for i in range(3)]
    subject = topic_to_subject("test", "events.process.lifecycle")
    nc = await nats.connect(first.url, connect_timeout=5, allow_reconnect=False)
    try:
        js = nc.jetstream()
        await js.add_stream(name="DAEMONEYE_RESTART", subjects=["daemoneye.test.>"])
        acks = [
            await js.publish(subject, payload, headers={"Nats-Msg-Id": mid})
            for payload, mid in zip(payloads, ids, strict=True)
        ]
    finally:
        await nc.close()
    wait_until_stored(first.store_dir, "DAEMONEYE_RESTART", payloads)

    nats_server_control.kill()
    assert not nats_server_control.running
    assert port_is_closed(first.port)
    with pytest.raises(ProcessLookupError):
        os.kill(first.pid, 0)
    with pytest.raises(RuntimeError, match="not running"):
        _ = nats_server_control.server

    second = nats_server_control.start()
    assert (second.url, second.port, second.store_dir) == (first.url, first.port, first.store_dir)
    assert second.pid != first.pid
    assert nats_server_control.pids == [first.pid, second.pid]
    nc = await nats.connect(second.url, connect_timeout=5, allow_reconnect=False)
    try:
        js = nc.jetstream()
        info = await js.stream_info("DAEMONEYE_RESTART")
        assert info.config.subjects == ["daemoneye.test.>"]
        assert (info.state.messages, info.state.first_seq, info.state.last_seq) == (3, 1, 3)
        for ack, payload, mid in zip(acks, payloads, ids, strict=True):
            stored = await js.get_msg("DAEMONEYE_RESTART", ack.seq)
            assert (stored.subject, stored.data) == (subject, payload)
            assert stored.headers is not None
            assert stored.headers["Nats-Msg-Id"] == mid
        # The duplicate window outlives the crash: a re-sent event is still dropped.
        again = await js.publish(subject, payloads[0], headers={"Nats-Msg-Id": ids[0]})
        assert again.duplicate
        assert again.seq == acks[0].seq
        assert (await js.stream_info("DAEMONEYE_RESTART")).state.messages == 3
    finally:
        await nc.close()


def test_the_control_stops_whatever_it_started(tmp_path: Path) -> None:
    with NatsServerProcess(tmp_path) as process:
        first = process.start()
        process.kill()
        second = process.start()
        with pytest.raises(RuntimeError, match="already running"):
            process.start()
    assert not process.running
    for pid in (first.pid, second.pid):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert port_is_closed(second.port)
    process.stop()  # idempotent
    with pytest.raises(RuntimeError, match="not running"):
        process.kill()


def test_a_restart_on_a_port_taken_meanwhile_fails_with_the_log(tmp_path: Path) -> None:
    with NatsServerProcess(tmp_path) as process:
        server = process.start()
        process.kill()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            squatter.bind(("127.0.0.1", server.port))
            squatter.listen()
            with pytest.raises(RuntimeError, match="did not start; its log"):
                process.start(attempts=1)
        assert not process.running
        assert process.port == server.port


# -- the bridge's headers through a real server ------------------------------------------------


async def test_headers_survive_a_trip_through_nats(nats_server: NatsServer) -> None:
    nats = import_nats()
    metas = [full_meta(), CorrelationMetadata(correlation_id="c", root_correlation_id="c")]
    tricky = CorrelationMetadata(
        correlation_id=" \r\n%00%\t ",
        root_correlation_id="\U0001f600",
        workflow_stage="\x00",
        sequence_number=MAX_SEQUENCE_NUMBER,
    )
    tricky.tags.update({" k ": " v\r\n", "\U0001f600": "\x7f", "e": ""})
    metas.append(tricky)
    nc = await nats.connect(nats_server.url, connect_timeout=5, allow_reconnect=False)
    try:
        sub = await nc.subscribe("daemoneye.h.>")
        for i, meta in enumerate(metas):
            headers = event_headers("h", "events.process.lifecycle", "a.B", i + 1, 5, meta)
            await nc.publish("daemoneye.h.events.process.lifecycle", b"p", headers=headers)
        for meta in metas:
            msg = await sub.next_msg(timeout=5)
            assert msg.headers is not None
            assert correlation_from_headers(msg.headers) == meta
    finally:
        await nc.close()
