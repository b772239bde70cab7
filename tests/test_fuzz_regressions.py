"""Replay the fuzzers' inputs, so that what they found stays fixed.

Every file in ``tests/fuzz_regressions/`` (inputs that once broke an
invariant) and in ``fuzz/corpus/*/`` (the seed corpora) goes through both fuzz
targets, ``fuzz.fuzz_frames`` and ``fuzz.fuzz_session``, without atheris.

* Regression inputs run strictly: every invariant is checked, including the
  symptoms of the known, unfixed bugs of ``fuzz.common.KNOWN_BUGS``. An input
  that reproduces such a bug is listed in :data:`KNOWN` and is a strict xfail:
  once the bug is fixed it passes, the xfail fails, and the entry (here and in
  ``KNOWN_BUGS``) must go.
* The seed corpora are coverage seeds, not reproducers: they run the way the
  fuzzers do by default, tolerating the known bugs.

``test_bug_*`` tests state the known bugs directly; the other direct tests
are bugs the fuzzers found that were fixed since.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import peer_published

from daemoneye.eventbus.v1 import events_pb2, frames_pb2, registry
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode, Frame
from daemoneye_eventbus.access import PeerCredentials
from daemoneye_eventbus.broker import Broker, BrokerConfig
from daemoneye_eventbus.client import Client, build_publish
from daemoneye_eventbus.frames import encode_frame
from daemoneye_eventbus.protocol import Connection, Role, State
from daemoneye_eventbus.sessions import SocketSession
from fuzz import common, fuzz_frames, fuzz_session, seeds

REPO = Path(__file__).resolve().parents[1]
REGRESSIONS = Path(__file__).resolve().parent / "fuzz_regressions"
CORPUS = REPO / "fuzz" / "corpus"


#: Regression inputs that reproduce a known bug: file name -> (target, known bug id, reason).
KNOWN: dict[str, tuple[str, str, str]] = {}


def _frames(data: bytes, strict: bool) -> None:
    fuzz_frames.test_one_input(data)


def _session(data: bytes, strict: bool) -> None:
    fuzz_session.run_one(data, strict=strict)


TARGETS: dict[str, Callable[[bytes, bool], None]] = {"frames": _frames, "session": _session}


def _inputs() -> Iterator[tuple[Path, bool]]:
    """(file, strict) for every regression input and every corpus file."""
    for path in sorted(REGRESSIONS.iterdir()) if REGRESSIONS.is_dir() else []:
        if path.is_file() and not path.name.startswith((".", "README")):
            yield path, True
    for path in sorted(CORPUS.glob("*/*")):
        if path.is_file() and not path.name.startswith("."):
            yield path, False


def _cases() -> Iterator[object]:
    for path, strict in _inputs():
        for target in TARGETS:
            marks = []
            known = KNOWN.get(path.name) if strict else None
            if known is not None and known[0] == target:
                marks.append(
                    pytest.mark.xfail(
                        strict=True, reason=known[2], raises=common.InvariantViolation
                    )
                )
            case_id = f"{path.parent.name}/{path.name}-{target}"
            yield pytest.param(path, target, strict, id=case_id, marks=marks)


@pytest.fixture(scope="module", autouse=True)
def _session_loop() -> Iterator[None]:
    yield
    fuzz_session.shutdown()


@pytest.mark.parametrize(("path", "target", "strict"), list(_cases()))
def test_replay(path: Path, target: str, strict: bool) -> None:
    TARGETS[target](path.read_bytes(), strict)


def test_known_bugs_have_reproducers() -> None:
    assert {bug for _, bug, _ in KNOWN.values()} == set(common.KNOWN_BUGS)
    for name in KNOWN:
        assert (REGRESSIONS / name).is_file(), name


def test_seed_corpus_is_current() -> None:
    """fuzz/corpus holds what ``python -m fuzz.seeds`` writes (run it after changing seeds)."""
    for kind, wanted in (("frames", seeds.frame_seeds()), ("session", seeds.session_seeds())):
        for name, data in wanted.items():
            path = CORPUS / kind / f"{name}.bin"
            assert path.is_file(), f"{path} missing: run python -m fuzz.seeds"
            assert path.read_bytes() == data, f"{path} is stale: run python -m fuzz.seeds"


# -- what the fuzzers found, stated directly ---------------------------------------------------


def _open_session(broker: Broker, peer: PeerCredentials) -> tuple[SocketSession, bytearray]:
    session = SocketSession(broker)
    session.endpoint.peer = peer
    transport = fuzz_session.FakeTransport()
    session.connection_made(transport)
    return session, transport.written


async def test_local_publish_reaches_socket_subscriber() -> None:
    """Found by fuzz_session (session-local-publish-not-flushed.bin), fixed since."""
    broker = Broker("/nonexistent/daemoneye-test.sock", BrokerConfig())
    me = PeerCredentials(1, fuzz_session.UID, 0)
    subscriber, written = _open_session(broker, me)
    try:
        hello = frames_pb2.Hello(protocol_version=1, component="daemoneye-agent")
        sub = frames_pb2.Subscribe(subscription_id=1, filter="events.process.#")
        subscriber.data_received(encode_frame(Frame(hello=hello)))
        subscriber.data_received(encode_frame(Frame(subscribe=sub)))
        before = len(written)
        local = broker.local_session("agent", "procmond")
        event = events_pb2.ProcessEvent(pid=1)
        assert local.publish_frame(build_publish(registry.EVENTS_PROCESS_LIFECYCLE, event)) == 1
        await asyncio.sleep(0)  # the socket is not backed up: nothing should wait
        assert len(written) > before, "the delivery is still queued in the broker"
    finally:
        subscriber.connection_lost(None)


async def test_bug_handshake_refusal_fits_handshake_limit() -> None:
    broker = Broker("/nonexistent/daemoneye-test.sock", BrokerConfig())
    stranger = fuzz_session.PEERS[1]  # a uid the default policy does not trust
    assert stranger is not None
    session, written = _open_session(broker, stranger)
    try:
        hello = frames_pb2.Hello(protocol_version=1, component="\x00" * 1100)
        session.data_received(encode_frame(Frame(hello=hello)))
        client = Connection(Role.CLIENT)  # a client before welcome: 4096-byte limit
        client.receive_data(bytes(written))
        assert client.error is None, client.error
        (refusal,) = client.events_received()
        assert refusal.error.fatal
        assert client.state is State.CLOSING
    finally:
        session.connection_lost(None)


@pytest.mark.parametrize("kind", ["publish", "publish_batch"])
async def test_bug_refusal_fits_a_small_frame_limit(kind: str) -> None:
    """Found by fuzz_session (session-refusal-over-small-frame-limit.bin): a
    refusal quoting a long topic and payload type exceeded a 512-byte limit."""
    broker = Broker("/nonexistent/daemoneye-test.sock", BrokerConfig(max_frame_bytes=512))
    me = PeerCredentials(1, fuzz_session.UID, 0)
    session, written = _open_session(broker, me)
    try:
        session.data_received(_hello_as("procmond"))
        topic, payload_type = "events.process.lifecycle", "é" * 200  # 400 bytes
        frame = (
            Frame(publish=frames_pb2.Publish(topic=topic, payload_type=payload_type))
            if kind == "publish"
            else Frame(
                publish_batch=frames_pb2.PublishBatch(
                    topic=topic, payload_type=payload_type, payloads=[b""]
                )
            )
        )
        session.data_received(encode_frame(frame))
        ping = frames_pb2.Ping(nonce=7)
        session.data_received(encode_frame(Frame(ping=ping)))
        client = Connection(Role.CLIENT, max_frame_bytes=512)
        client.receive_data(bytes(written))
        assert client.error is None, client.error
        welcome, refusal, pong = client.events_received()
        assert welcome.WhichOneof("kind") == "welcome"
        assert refusal.error.code == ErrorCode.ERROR_CODE_PAYLOAD_MISMATCH
        assert not refusal.error.fatal
        assert refusal.error.message.startswith("topic 'events.process.lifecycle' carries")
        assert pong.pong.nonce == 7
    finally:
        session.connection_lost(None)


def _hello_as(component: str) -> bytes:
    return encode_frame(Frame(hello=frames_pb2.Hello(protocol_version=1, component=component)))


def _publish_frame(pid: int) -> bytes:
    event = events_pb2.ProcessEvent(pid=pid)
    return encode_frame(Frame(publish=build_publish(registry.EVENTS_PROCESS_LIFECYCLE, event)))


async def test_bug_publish_before_goodbye_in_one_read_is_routed() -> None:
    broker = Broker("/nonexistent/daemoneye-test.sock", BrokerConfig())
    me = PeerCredentials(1, fuzz_session.UID, 0)
    publisher, _ = _open_session(broker, me)
    try:
        publisher.data_received(_hello_as("procmond"))
        goodbye = encode_frame(Frame(goodbye=frames_pb2.Goodbye(reason="done")))
        publisher.data_received(_publish_frame(1) + goodbye)
        assert peer_published(broker.statistics()) == 1
    finally:
        publisher.connection_lost(None)


async def test_bug_client_close_writes_goodbye_last(sock_path: str) -> None:
    """A stand-in broker records the frames the client writes after the handshake."""
    kinds: list[str] = []
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(Role.BROKER)
        try:
            while data := await reader.read(65536):
                conn.receive_data(data)
                for frame in conn.events_received():
                    kind = frame.WhichOneof("kind")
                    if kind == "hello":
                        welcome = frames_pb2.Welcome(protocol_version=1, session_id="0" * 16)
                        conn.send(Frame(welcome=welcome))
                        writer.write(conn.data_to_send())
                    else:
                        kinds.append(str(kind))
        finally:
            writer.close()
            done.set()

    server = await asyncio.start_unix_server(serve, sock_path)
    async with server:
        client = Client(sock_path, component="procmond")
        await client.connect()
        for pid in range(3):
            await client.publish(
                registry.EVENTS_PROCESS_LIFECYCLE, events_pb2.ProcessEvent(pid=pid)
            )
        await client.close()  # no flush() first
        await asyncio.wait_for(done.wait(), 5)
    assert kinds == ["publish", "publish", "publish", "goodbye"]
