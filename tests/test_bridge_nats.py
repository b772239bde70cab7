"""The NATS fixture, and the JetStream deduplication the bridge relies on."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from nats_server import NatsServer, find_nats_server, import_nats, running_nats_server

from daemoneye_eventbus.bridge.subjects import msg_id, topic_to_subject


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
