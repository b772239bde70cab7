"""Tests of the sans-I/O wire protocol: framing, the state machine, the tables.

Everything here is pure: two :class:`Connection` objects talk through byte
strings handed over by :class:`Pair`, with no event loop and no socket.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from daemoneye.eventbus.v1 import frames_pb2
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationMetadata
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode, Frame
from daemoneye_eventbus.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from daemoneye_eventbus.frames import (
    DEFAULT_MAX_FRAME_BYTES,
    DELIVER_OVERHEAD,
    HANDSHAKE_MAX_FRAME_BYTES,
    MAX_PREFIX_BYTES,
    decode_varint,
    encode_deliver,
    encode_deliver_batch,
    encode_frame,
    encode_publish,
    encode_varint,
    error_frame,
    publish_header,
)
from daemoneye_eventbus.protocol import (
    PROTOCOL_VERSION,
    RECEIVABLE,
    SENDABLE,
    TRANSITIONS,
    Connection,
    Role,
    State,
)
from daemoneye_eventbus.stamps import Stamp

# --------------------------------------------------------------------------
# Helpers

ALL_KINDS: tuple[str, ...] = tuple(f.name for f in Frame.DESCRIPTOR.oneofs_by_name["kind"].fields)
ALL_STATES: tuple[State, ...] = tuple(State)
ALL_ROLES: tuple[Role, ...] = tuple(Role)
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1

TOPIC = "events.process.lifecycle"
PAYLOAD_TYPE = "daemoneye.eventbus.v1.ProcessEvent"


def hello(name: str = "test-client", component: str = "") -> Frame:
    return Frame(
        hello=frames_pb2.Hello(
            protocol_version=PROTOCOL_VERSION, client_name=name, component=component
        )
    )


def welcome() -> Frame:
    return Frame(
        welcome=frames_pb2.Welcome(
            protocol_version=PROTOCOL_VERSION,
            session_id="0123456789abcdef",
            limits=frames_pb2.Limits(max_frame_bytes=DEFAULT_MAX_FRAME_BYTES),
        )
    )


def publish(payload: bytes = b"\x08\x01", topic: str = TOPIC) -> Frame:
    return Frame(
        publish=frames_pb2.Publish(topic=topic, payload_type=PAYLOAD_TYPE, payload=payload)
    )


def goodbye(reason: str = "bye") -> Frame:
    return Frame(goodbye=frames_pb2.Goodbye(reason=reason))


#: One valid frame of every kind. The error is non-fatal, so that receiving
#: it changes no state.
SAMPLES: dict[str, Frame] = {
    "hello": hello(),
    "welcome": welcome(),
    "publish": publish(),
    "deliver": Frame(
        deliver=frames_pb2.Deliver(subscription_id=1, sequence=1, publish=publish().publish)
    ),
    "subscribe": Frame(subscribe=frames_pb2.Subscribe(subscription_id=1, filter="events.#")),
    "subscribe_ack": Frame(subscribe_ack=frames_pb2.SubscribeAck(subscription_id=1)),
    "unsubscribe": Frame(unsubscribe=frames_pb2.Unsubscribe(subscription_id=1)),
    "unsubscribe_ack": Frame(unsubscribe_ack=frames_pb2.UnsubscribeAck(subscription_id=1)),
    "ping": Frame(ping=frames_pb2.Ping(nonce=7)),
    "pong": Frame(pong=frames_pb2.Pong(nonce=7)),
    "error": error_frame(ErrorCode.ERROR_CODE_INVALID_TOPIC, "no such topic", fatal=False),
    "goodbye": goodbye(),
    "stats_request": Frame(stats_request=frames_pb2.StatsRequest(request_id=3)),
    "credit": Frame(credit=frames_pb2.Credit(subscription_id=1, events=250)),
    "stats_response": Frame(stats_response=frames_pb2.StatsResponse(request_id=3)),
    "publish_batch": Frame(
        publish_batch=frames_pb2.PublishBatch(
            topic="events.process.lifecycle",
            payload_type="daemoneye.eventbus.v1.ProcessEvent",
            payloads=[b"a", b"bb"],
        )
    ),
    "deliver_batch": Frame(
        deliver_batch=frames_pb2.DeliverBatch(
            subscription_id=1,
            first_sequence=4,
            batch=frames_pb2.PublishBatch(
                topic="events.process.lifecycle",
                payload_type="daemoneye.eventbus.v1.ProcessEvent",
                payloads=[b"a", b"bb"],
            ),
        )
    ),
    "request": Frame(
        request=frames_pb2.Request(request_id=9, publish=publish().publish, timeout_ms=250)
    ),
    "request_deliver": Frame(
        request_deliver=frames_pb2.RequestDeliver(
            subscription_id=1, token=5, publish=publish().publish, remaining_ms=240
        )
    ),
    "reply": Frame(reply=frames_pb2.Reply(token=5, payload_type="daemoneye.eventbus.v1.TaskAck")),
    "reply_deliver": Frame(
        reply_deliver=frames_pb2.ReplyDeliver(
            request_id=9, payload_type="daemoneye.eventbus.v1.TaskAck"
        )
    ),
}


def state_of(conn: Connection) -> State:
    """The state, read through a call so that mypy does not narrow it between steps."""
    return conn.state


def kinds(frames: list[Frame]) -> list[str | None]:
    return [f.WhichOneof("kind") for f in frames]


def decode_stream(data: bytes) -> list[Frame]:
    """Split a byte stream into frames, with no limit; every byte must be used."""
    frames: list[Frame] = []
    pos = 0
    while pos < len(data):
        prefix = decode_varint(data, pos)
        assert prefix is not None, "stream ends inside a length prefix"
        length, pos = prefix
        assert pos + length <= len(data), "stream ends inside a frame"
        frames.append(Frame.FromString(data[pos : pos + length]))
        pos += length
    return frames


def connection(
    role: Role,
    state: State = State.CONNECTING,
    *,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    handshake_max_frame_bytes: int = HANDSHAKE_MAX_FRAME_BYTES,
) -> Connection:
    """A connection driven into ``state`` through its public API."""
    conn = Connection(
        role,
        max_frame_bytes=max_frame_bytes,
        handshake_max_frame_bytes=handshake_max_frame_bytes,
    )
    if state in (State.OPEN, State.CLOSING):
        if role is Role.BROKER:
            conn.receive_data(encode_frame(hello()))
            assert kinds(conn.events_received()) == ["hello"]
            conn.send(welcome())
        else:
            conn.send(hello())
            conn.receive_data(encode_frame(welcome()))
            assert kinds(conn.events_received()) == ["welcome"]
        conn.data_to_send()
    if state is State.CLOSING:
        conn.send(goodbye())
        conn.data_to_send()
    if state is State.CLOSED:
        conn.close()
    assert conn.state is state
    return conn


def assert_violation(conn: Connection, code: ErrorCode.ValueType) -> frames_pb2.Error:
    """``conn`` failed with ``code``: it is closing and queued one fatal Error last."""
    assert conn.state is State.CLOSING
    assert conn.close_expected
    assert isinstance(conn.error, RemoteProtocolError)
    assert conn.error.code == code, ErrorCode.Name(ErrorCode.ValueType(conn.error.code))
    assert conn.buffered_input == 0
    sent = decode_stream(conn.data_to_send())
    assert sent, "no Error frame queued"
    last = sent[-1]
    assert last.WhichOneof("kind") == "error"
    assert last.error.fatal
    assert last.error.code == code
    assert last.error.message == str(conn.error)
    return last.error


@dataclass
class Exchange:
    """The frames each end received during one :meth:`Pair.pump`."""

    client: list[Frame] = field(default_factory=list)
    broker: list[Frame] = field(default_factory=list)


class Pair:
    """A client and a broker connection wired back to back (cf. h11's test helpers)."""

    def __init__(
        self,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        handshake_max_frame_bytes: int = HANDSHAKE_MAX_FRAME_BYTES,
    ) -> None:
        limits = {
            "max_frame_bytes": max_frame_bytes,
            "handshake_max_frame_bytes": handshake_max_frame_bytes,
        }
        self.client = Connection(Role.CLIENT, **limits)
        self.broker = Connection(Role.BROKER, **limits)

    def pump(self, *, chunk: int | None = None) -> Exchange:
        """Move bytes both ways until neither end has anything to send.

        With ``chunk``, bytes are handed over ``chunk`` at a time, as a slow
        socket would.
        """
        got = Exchange()
        while True:
            to_broker = self.client.data_to_send()
            to_client = self.broker.data_to_send()
            if not to_broker and not to_client:
                return got
            self._feed(self.broker, to_broker, chunk, got.broker)
            self._feed(self.client, to_client, chunk, got.client)

    @staticmethod
    def _feed(conn: Connection, data: bytes, chunk: int | None, into: list[Frame]) -> None:
        step = chunk or max(len(data), 1)
        for i in range(0, len(data), step):
            conn.receive_data(data[i : i + step])
            into.extend(conn.events_received())

    def handshake(self) -> Exchange:
        self.client.send(hello())
        first = self.pump()
        assert kinds(first.broker) == ["hello"]
        self.broker.send(welcome())
        second = self.pump()
        assert kinds(second.client) == ["welcome"]
        return second


def sized(make: list[Frame], size: int) -> Frame:
    """The first of ``make`` whose body is exactly ``size`` bytes."""
    for frame in make:
        if frame.ByteSize() == size:
            return frame
    raise AssertionError(f"no candidate of {size} bytes")  # pragma: no cover


def hello_of_size(size: int) -> Frame:
    """A Hello frame whose body (without the prefix) is exactly ``size`` bytes."""
    return sized(
        [hello("n" * n, c) for n in range(max(size - 16, 0), size) for c in ("", "c")], size
    )


def publish_of_size(size: int) -> Frame:
    """A Publish frame whose body (without the prefix) is exactly ``size`` bytes."""
    overhead = publish(b"").ByteSize()
    return sized(
        [
            publish(b"p" * n, topic)
            for n in range(max(size - overhead - 8, 0), size)
            for topic in (TOPIC, TOPIC + "x")
        ],
        size,
    )


# --------------------------------------------------------------------------
# The tables


def test_samples_cover_every_frame_kind() -> None:
    assert set(SAMPLES) == set(ALL_KINDS)
    for kind, frame in SAMPLES.items():
        assert frame.WhichOneof("kind") == kind


def test_tables_name_only_real_frame_kinds() -> None:
    for table in (SENDABLE, RECEIVABLE):
        for allowed in table.values():
            assert allowed <= set(ALL_KINDS)


def test_each_end_may_receive_what_the_other_may_send() -> None:
    for state in (State.CONNECTING, State.OPEN):
        assert RECEIVABLE[(Role.BROKER, state)] == SENDABLE[(Role.CLIENT, state)]
        assert RECEIVABLE[(Role.CLIENT, state)] == SENDABLE[(Role.BROKER, state)]


def test_nothing_is_sendable_or_receivable_once_closing() -> None:
    for role, state in itertools.product(ALL_ROLES, (State.CLOSING, State.CLOSED)):
        assert (role, state) not in SENDABLE
        assert (role, state) not in RECEIVABLE


# --------------------------------------------------------------------------
# Handshake


def test_handshake_opens_both_ends() -> None:
    pair = Pair()
    assert pair.client.state is State.CONNECTING
    assert pair.broker.state is State.CONNECTING
    pair.client.send(hello("procmond-1", "procmond"))
    assert pair.client.state is State.CONNECTING
    got = pair.pump()
    assert kinds(got.broker) == ["hello"]
    assert got.broker[0].hello.protocol_version == PROTOCOL_VERSION == 1
    assert got.broker[0].hello.component == "procmond"
    assert pair.broker.state is State.CONNECTING  # open only once Welcome is sent
    pair.broker.send(welcome())
    assert state_of(pair.broker) is State.OPEN
    got = pair.pump()
    assert kinds(got.client) == ["welcome"]
    assert got.client[0].welcome.limits.max_frame_bytes == DEFAULT_MAX_FRAME_BYTES
    assert state_of(pair.client) is State.OPEN
    assert pair.client.error is None
    assert pair.broker.error is None


def test_frames_flow_both_ways_once_open() -> None:
    pair = Pair()
    pair.handshake()
    pair.client.send(SAMPLES["subscribe"])
    pair.client.send(SAMPLES["ping"])
    got = pair.pump()
    assert kinds(got.broker) == ["subscribe", "ping"]
    pair.broker.send(SAMPLES["subscribe_ack"])
    pair.broker.send(Frame(pong=frames_pb2.Pong(nonce=got.broker[1].ping.nonce)))
    size = pair.broker.send_deliver(1, 1, publish().publish.SerializeToString())
    assert size == pair.broker.buffered_bytes - len(encode_frame(SAMPLES["subscribe_ack"])) - len(
        encode_frame(SAMPLES["pong"])
    )
    got = pair.pump()
    assert kinds(got.client) == ["subscribe_ack", "pong", "deliver"]
    assert got.client[1].pong.nonce == 7
    assert got.client[2].deliver.publish == publish().publish
    assert pair.client.state is pair.broker.state is State.OPEN


@pytest.mark.parametrize("kind", sorted(set(ALL_KINDS) - {"hello", "goodbye"}))
def test_client_cannot_send_anything_but_hello_before_welcome(kind: str) -> None:
    client = connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError, match="while connecting"):
        client.send(SAMPLES[kind])
    assert client.state is State.CONNECTING
    assert client.data_to_send() == b""


def test_client_cannot_publish_after_hello_before_welcome() -> None:
    client = connection(Role.CLIENT)
    client.send(hello())
    with pytest.raises(LocalProtocolError):
        client.send(publish())
    assert decode_stream(client.data_to_send()) == [hello()]


@pytest.mark.parametrize("kind", sorted(set(ALL_KINDS) - {"hello", "goodbye"}))
def test_broker_fails_on_any_frame_before_hello(kind: str) -> None:
    broker = connection(Role.BROKER)
    broker.receive_data(encode_frame(SAMPLES[kind]))
    assert broker.events_received() == []
    assert_violation(broker, ErrorCode.ERROR_CODE_UNEXPECTED_FRAME)
    assert kind in str(broker.error)


@pytest.mark.parametrize("kind", ["publish", "subscribe"])
def test_broker_fails_on_frame_after_hello_before_welcome(kind: str) -> None:
    """A client must wait for Welcome: pipelining after Hello is a violation."""
    broker = connection(Role.BROKER)
    broker.receive_data(encode_frame(hello()) + encode_frame(SAMPLES[kind]))
    assert kinds(broker.events_received()) == ["hello"]
    assert_violation(broker, ErrorCode.ERROR_CODE_UNEXPECTED_FRAME)


def test_second_hello_before_welcome_is_unexpected() -> None:
    broker = connection(Role.BROKER)
    broker.receive_data(encode_frame(hello()))
    assert kinds(broker.events_received()) == ["hello"]
    broker.receive_data(encode_frame(hello()))
    assert broker.events_received() == []
    assert_violation(broker, ErrorCode.ERROR_CODE_UNEXPECTED_FRAME)
    assert "second hello" in str(broker.error)


def test_hello_after_welcome_is_unexpected() -> None:
    pair = Pair()
    pair.handshake()
    pair.client.send(SAMPLES["ping"])
    pair.pump()
    pair.broker.receive_data(encode_frame(hello()))
    assert_violation(pair.broker, ErrorCode.ERROR_CODE_UNEXPECTED_FRAME)


def test_goodbye_is_allowed_during_the_handshake() -> None:
    pair = Pair()
    pair.client.send(goodbye("changed my mind"))
    assert pair.client.state is State.CLOSING
    got = pair.pump()
    assert kinds(got.broker) == ["goodbye"]
    assert pair.broker.state is State.CLOSING
    assert pair.broker.error is None
    assert pair.broker.data_to_send() == b""


@pytest.mark.parametrize("kind", sorted(set(ALL_KINDS) - {"welcome", "error"}))
def test_client_fails_on_anything_but_welcome_or_error_before_welcome(kind: str) -> None:
    client = connection(Role.CLIENT)
    client.send(hello())
    client.data_to_send()
    client.receive_data(encode_frame(SAMPLES[kind]))
    assert client.events_received() == []
    assert_violation(client, ErrorCode.ERROR_CODE_UNEXPECTED_FRAME)


def test_client_takes_a_fatal_error_instead_of_welcome() -> None:
    """E.g. the broker refusing the connection with CONNECTION_LIMIT."""
    pair = Pair()
    pair.client.send(hello())
    refusal = RemoteProtocolError("too many", ErrorCode.ERROR_CODE_CONNECTION_LIMIT)
    pair.broker.fail(refusal)
    got = pair.pump()
    assert kinds(got.client) == ["error"]
    assert got.client[0].error.code == ErrorCode.ERROR_CODE_CONNECTION_LIMIT
    assert got.client[0].error.fatal
    assert pair.client.state is State.CLOSING
    assert pair.client.error is None  # the broker's error, not a violation by it
    assert pair.client.data_to_send() == b""  # no Error sent back
    # The Hello crossed the broker's Error; the closing broker ignores it.
    assert got.broker == []


def test_welcome_is_the_only_way_to_open() -> None:
    client = connection(Role.CLIENT)
    client.send(hello())
    client.receive_data(encode_frame(SAMPLES["error"]))  # non-fatal
    assert kinds(client.events_received()) == ["error"]
    assert client.state is State.CONNECTING
    client.receive_data(encode_frame(welcome()))
    assert state_of(client) is State.OPEN


# --------------------------------------------------------------------------
# Receiving: which kinds are legal in which state


@pytest.mark.parametrize(
    ("role", "state", "kind"),
    list(itertools.product(ALL_ROLES, (State.CONNECTING, State.OPEN), ALL_KINDS)),
)
def test_receivable_table_is_enforced(role: Role, state: State, kind: str) -> None:
    conn = connection(role, state)
    frame = SAMPLES[kind]
    conn.receive_data(encode_frame(frame))
    if kind in RECEIVABLE[(role, state)]:
        assert conn.events_received() == [frame]
        assert conn.error is None
        assert conn.data_to_send() == b""
    else:
        assert conn.events_received() == []
        assert_violation(conn, ErrorCode.ERROR_CODE_UNEXPECTED_FRAME)


@pytest.mark.parametrize(
    ("role", "state"), list(itertools.product(ALL_ROLES, [State.CLOSING, State.CLOSED]))
)
def test_nothing_is_received_once_closing(role: Role, state: State) -> None:
    conn = connection(role, state)
    conn.receive_data(encode_frame(SAMPLES["ping"]) + b"\x00garbage")
    assert conn.events_received() == []
    assert conn.error is None
    assert conn.buffered_input == 0
    assert conn.data_to_send() == b""


# --------------------------------------------------------------------------
# Framing


def test_many_frames_in_one_read() -> None:
    broker = connection(Role.BROKER, State.OPEN)
    frames = [Frame(ping=frames_pb2.Ping(nonce=i)) for i in range(500)]
    frames += [publish(b"x" * 300), SAMPLES["subscribe"], SAMPLES["stats_request"]]
    broker.receive_data(b"".join(encode_frame(f) for f in frames))
    assert broker.events_received() == frames
    assert broker.events_received() == []
    assert broker.buffered_input == 0


def test_one_frame_fed_a_byte_at_a_time() -> None:
    broker = connection(Role.BROKER, State.OPEN)
    frame = publish(b"z" * 20_000)  # a 3-byte prefix
    data = encode_frame(frame)
    assert len(encode_varint(frame.ByteSize())) == 3
    for fed in range(1, len(data)):
        broker.receive_data(data[fed - 1 : fed])
        assert broker.events_received() == []
        # A partial prefix is held; once complete it is consumed, and then
        # only the body bytes received so far are held.
        assert broker.buffered_input == (fed if fed < 3 else fed - 3)
    broker.receive_data(data[-1:])
    assert broker.events_received() == [frame]
    assert broker.buffered_input == 0


def test_stream_fed_a_byte_at_a_time_through_a_pair() -> None:
    pair = Pair()
    pair.client.send(hello())
    got = pair.pump(chunk=1)
    assert kinds(got.broker) == ["hello"]
    pair.broker.send(welcome())
    pair.pump(chunk=1)
    frames = [publish(b"a" * n) for n in (0, 1, 127, 128, 16_383, 16_384)]
    for f in frames:
        pair.client.send(f)
    got = pair.pump(chunk=1)
    assert got.broker == frames


_STREAM = [publish(b"a" * n) for n in (0, 1, 127, 128, 300, 16_384)] + [goodbye()]


@settings(max_examples=150, deadline=None)
@given(
    cuts=st.lists(st.integers(min_value=0, max_value=2**20), max_size=12),
    kind=st.sampled_from([bytes, bytearray, memoryview]),
)
def test_any_split_of_a_stream_gives_the_same_frames(
    cuts: list[int], kind: type[bytes | bytearray | memoryview]
) -> None:
    """Whole frames are parsed straight from a read, partial ones from the
    buffer: the frames are the same wherever the reads end."""
    broker = connection(Role.BROKER, State.OPEN)
    stream = b"".join(map(encode_frame, _STREAM))
    points = sorted({c % (len(stream) + 1) for c in cuts} | {len(stream)})
    got: list[Frame] = []
    start = 0
    for end in points:
        chunk = bytearray(stream[start:end])
        broker.receive_data(chunk if kind is bytearray else kind(chunk))
        chunk[:] = b"\xff" * len(chunk)  # the caller may reuse its buffer
        got += broker.events_received()
        start = end
        if end < len(stream):
            assert broker.buffered_input <= broker.frame_limit + MAX_PREFIX_BYTES
    assert got == _STREAM
    assert broker.error is None
    assert broker.buffered_input == 0


def test_prefix_split_across_reads() -> None:
    broker = connection(Role.BROKER, State.OPEN)
    frame = publish(b"q" * 200)
    data = encode_frame(frame)
    assert len(encode_varint(frame.ByteSize())) == 2
    broker.receive_data(data[:1])
    assert broker.events_received() == []
    assert broker.buffered_input == 1
    broker.receive_data(data[1:2])
    assert broker.buffered_input == 0  # prefix complete and consumed, no body yet
    broker.receive_data(data[2:])
    assert broker.events_received() == [frame]


def test_frame_boundary_inside_a_read() -> None:
    broker = connection(Role.BROKER, State.OPEN)
    a, b = publish(b"a" * 300), publish(b"b" * 5)
    data = encode_frame(a) + encode_frame(b)
    cut = len(encode_frame(a)) + 1  # the second frame's prefix byte rides with the first
    broker.receive_data(data[:cut])
    assert broker.events_received() == [a]
    broker.receive_data(data[cut:])
    assert broker.events_received() == [b]


@pytest.mark.parametrize("declared", [DEFAULT_MAX_FRAME_BYTES + 1, 2**31, 2**35 - 1])
def test_oversized_declared_length_refused_on_the_prefix_alone(declared: int) -> None:
    broker = connection(Role.BROKER, State.OPEN)
    broker.receive_data(encode_varint(declared))  # no body byte at all
    assert broker.buffered_input == 0
    assert_violation(broker, ErrorCode.ERROR_CODE_FRAME_TOO_LARGE)
    assert str(declared) in str(broker.error)


def test_oversized_declared_length_with_body_bytes_is_not_buffered() -> None:
    broker = connection(Role.BROKER, State.OPEN)
    broker.receive_data(encode_varint(DEFAULT_MAX_FRAME_BYTES + 1) + b"\x0a" * 1000)
    assert broker.buffered_input == 0
    assert_violation(broker, ErrorCode.ERROR_CODE_FRAME_TOO_LARGE)


def test_large_legal_frame_is_buffered_as_it_arrives_not_preallocated() -> None:
    broker = connection(Role.BROKER, State.OPEN)
    broker.receive_data(encode_varint(DEFAULT_MAX_FRAME_BYTES))
    assert broker.buffered_input == 0
    broker.receive_data(b"\x1a" + b"\x00" * 9)
    assert broker.buffered_input == 10
    assert broker.error is None


def test_frame_exactly_at_the_limit_is_accepted() -> None:
    limit = 5000
    broker = connection(Role.BROKER, State.OPEN, max_frame_bytes=limit)
    frame = publish_of_size(limit)
    broker.receive_data(encode_frame(frame))
    assert broker.events_received() == [frame]
    broker.receive_data(encode_frame(publish_of_size(limit + 1)))
    assert_violation(broker, ErrorCode.ERROR_CODE_FRAME_TOO_LARGE)


def test_handshake_limit_applies_before_open_on_the_broker() -> None:
    broker = connection(Role.BROKER)
    assert broker.frame_limit == HANDSHAKE_MAX_FRAME_BYTES == 4096
    broker.receive_data(encode_frame(hello_of_size(HANDSHAKE_MAX_FRAME_BYTES + 1)))
    assert broker.events_received() == []
    assert_violation(broker, ErrorCode.ERROR_CODE_FRAME_TOO_LARGE)


def test_hello_exactly_at_the_handshake_limit_is_accepted() -> None:
    broker = connection(Role.BROKER)
    frame = hello_of_size(HANDSHAKE_MAX_FRAME_BYTES)
    broker.receive_data(encode_frame(frame))
    assert broker.events_received() == [frame]
    assert broker.error is None


def test_handshake_limit_still_applies_after_hello_until_welcome_is_sent() -> None:
    broker = connection(Role.BROKER)
    broker.receive_data(encode_frame(hello()))
    broker.events_received()
    assert broker.frame_limit == HANDSHAKE_MAX_FRAME_BYTES
    broker.receive_data(encode_frame(goodbye("x" * 5000)))
    assert_violation(broker, ErrorCode.ERROR_CODE_FRAME_TOO_LARGE)


def test_full_limit_applies_once_open() -> None:
    pair = Pair(max_frame_bytes=20_000)
    pair.handshake()
    assert pair.broker.frame_limit == pair.client.frame_limit == 20_000
    big = publish_of_size(HANDSHAKE_MAX_FRAME_BYTES * 4)
    pair.client.send(big)
    got = pair.pump()
    assert got.broker == [big]
    pair.broker.receive_data(encode_varint(20_001))
    assert_violation(pair.broker, ErrorCode.ERROR_CODE_FRAME_TOO_LARGE)


def test_client_switches_to_the_full_limit_right_after_welcome_in_one_read() -> None:
    client = connection(Role.CLIENT)
    client.send(hello())
    deliver = Frame(
        deliver=frames_pb2.Deliver(
            subscription_id=1, sequence=1, publish=publish(b"d" * 10_000).publish
        )
    )
    client.receive_data(encode_frame(welcome()) + encode_frame(deliver))
    assert kinds(client.events_received()) == ["welcome", "deliver"]
    assert client.error is None


def test_client_applies_the_handshake_limit_to_welcome() -> None:
    client = connection(Role.CLIENT)
    client.send(hello())
    client.data_to_send()
    big = welcome()
    big.welcome.session_id = "s" * HANDSHAKE_MAX_FRAME_BYTES
    client.receive_data(encode_frame(big))
    assert_violation(client, ErrorCode.ERROR_CODE_FRAME_TOO_LARGE)


def test_six_byte_prefix_is_refused() -> None:
    broker = connection(Role.BROKER, State.OPEN)
    broker.receive_data(b"\x80\x80\x80\x80\x80\x01")
    assert_violation(broker, ErrorCode.ERROR_CODE_FRAME_TOO_LARGE)
    assert "prefix" in str(broker.error)


def test_overlong_prefix_is_refused_at_its_fifth_byte() -> None:
    broker = connection(Role.BROKER, State.OPEN)
    for _ in range(MAX_PREFIX_BYTES - 1):
        broker.receive_data(b"\x80")
        assert broker.error is None
    assert broker.buffered_input == MAX_PREFIX_BYTES - 1
    broker.receive_data(b"\x80")
    assert_violation(broker, ErrorCode.ERROR_CODE_FRAME_TOO_LARGE)


def test_non_minimal_prefix_is_accepted() -> None:
    """Receivers decode any varint of up to 5 bytes; senders use the minimal form."""
    broker = connection(Role.BROKER, State.OPEN)
    body = SAMPLES["ping"].SerializeToString()
    assert len(body) < 0x80
    broker.receive_data(bytes([len(body) | 0x80, 0x80, 0x80, 0x00]) + body)
    assert broker.events_received() == [SAMPLES["ping"]]


def test_zero_length_frame_is_malformed() -> None:
    broker = connection(Role.BROKER, State.OPEN)
    broker.receive_data(b"\x00")
    assert_violation(broker, ErrorCode.ERROR_CODE_MALFORMED_FRAME)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"\xff\xff\xff", id="bad-tag"),
        pytest.param(b"\x0f", id="wire-type-7"),
        pytest.param(b"\x1a\x05ab", id="truncated-submessage"),
        pytest.param(b"\x0a\x03\x12\x01\xff", id="bad-utf8-string"),
        pytest.param(b"\x4a\x02\x08", id="truncated-varint"),
    ],
)
def test_undecodable_body_is_malformed(body: bytes) -> None:
    broker = connection(Role.BROKER, State.OPEN)
    broker.receive_data(encode_varint(len(body)) + body)
    assert_violation(broker, ErrorCode.ERROR_CODE_MALFORMED_FRAME)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"\xb0\x03\x01", id="unknown-field-54"),
        pytest.param(b"\xa0\x06\x01", id="unknown-field-100"),
        pytest.param(b"\xb2\x03\x03abc", id="unknown-length-delimited"),
    ],
)
def test_frame_with_no_kind_is_malformed(body: bytes) -> None:
    assert Frame.FromString(body).WhichOneof("kind") is None
    broker = connection(Role.BROKER, State.OPEN)
    broker.receive_data(encode_varint(len(body)) + body)
    assert_violation(broker, ErrorCode.ERROR_CODE_MALFORMED_FRAME)
    assert "no known kind" in str(broker.error)


def test_unknown_fields_beside_a_kind_are_tolerated() -> None:
    broker = connection(Role.BROKER, State.OPEN)
    body = SAMPLES["ping"].SerializeToString() + b"\x78\x01"
    broker.receive_data(encode_varint(len(body)) + body)
    assert kinds(broker.events_received()) == ["ping"]
    assert broker.error is None


def test_last_oneof_member_wins_when_several_are_set() -> None:
    """Protobuf semantics: the last kind on the wire is the one set."""
    broker = connection(Role.BROKER, State.OPEN)
    body = SAMPLES["subscribe"].SerializeToString() + SAMPLES["ping"].SerializeToString()
    broker.receive_data(encode_varint(len(body)) + body)
    assert kinds(broker.events_received()) == ["ping"]


def test_receive_data_is_ignored_after_a_failure() -> None:
    broker = connection(Role.BROKER, State.OPEN)
    broker.receive_data(b"\x00")
    assert_violation(broker, ErrorCode.ERROR_CODE_MALFORMED_FRAME)
    error = broker.error
    broker.receive_data(encode_frame(SAMPLES["ping"]) * 3)
    broker.receive_data(b"\xff" * 100)
    assert broker.events_received() == []
    assert broker.data_to_send() == b""
    assert broker.buffered_input == 0
    assert broker.error is error
    assert broker.state is State.CLOSING


def test_frames_before_a_violation_in_the_same_read_are_returned() -> None:
    broker = connection(Role.BROKER, State.OPEN)
    good = [SAMPLES["subscribe"], publish(), SAMPLES["ping"]]
    after = encode_frame(SAMPLES["pong"])
    broker.receive_data(b"".join(encode_frame(f) for f in good) + b"\x00" + after)
    assert broker.events_received() == good
    assert_violation(broker, ErrorCode.ERROR_CODE_MALFORMED_FRAME)
    assert broker.events_received() == []


def test_frames_after_goodbye_in_the_same_read_are_ignored() -> None:
    broker = connection(Role.BROKER, State.OPEN)
    broker.receive_data(encode_frame(goodbye()) + encode_frame(publish()) + b"\x00")
    assert kinds(broker.events_received()) == ["goodbye"]
    assert broker.state is State.CLOSING
    assert broker.error is None
    assert broker.data_to_send() == b""


# After the peer's Goodbye (or fatal Error) the rest of the read is dropped, so
# buffered_input stays bounded by the frame limit plus the prefix.
def test_bytes_after_goodbye_are_not_kept() -> None:
    broker = connection(Role.BROKER)
    broker.receive_data(encode_frame(goodbye()) + b"\x00" * 10_000)
    assert broker.state is State.CLOSING
    assert broker.buffered_input <= broker.handshake_max_frame_bytes + MAX_PREFIX_BYTES


def test_empty_read_is_a_no_op() -> None:
    broker = connection(Role.BROKER, State.OPEN)
    broker.receive_data(b"")
    broker.receive_data(bytearray())
    broker.receive_data(memoryview(b""))
    assert broker.events_received() == []
    assert broker.error is None


def test_receive_data_takes_bytearray_and_memoryview() -> None:
    broker = connection(Role.BROKER, State.OPEN)
    data = encode_frame(SAMPLES["ping"])
    broker.receive_data(bytearray(data))
    broker.receive_data(memoryview(data))
    assert broker.events_received() == [SAMPLES["ping"]] * 2


# --------------------------------------------------------------------------
# encode_frame and encode_deliver

_topics = st.text(alphabet=st.characters(codec="utf-8"), max_size=300)
_payload_sizes = st.one_of(
    st.integers(0, 200),
    st.integers(16_300, 16_500),
    st.sampled_from([127, 128, 16_383, 16_384, 2_097_151, 2_097_152]),
)
_correlations = st.one_of(
    st.none(),
    st.builds(
        lambda cid, seq: CorrelationMetadata(
            correlation_id=cid, root_correlation_id=cid, sequence_number=seq
        ),
        st.text(max_size=40),
        st.integers(0, UINT64_MAX),
    ),
)


@settings(max_examples=200, deadline=None)
@given(
    subscription_id=st.integers(1, UINT32_MAX),
    sequence=st.integers(1, UINT64_MAX),
    topic=_topics,
    payload_type=st.text(max_size=80),
    payload_size=_payload_sizes,
    correlation=_correlations,
)
def test_encode_deliver_matches_encode_frame(
    subscription_id: int,
    sequence: int,
    topic: str,
    payload_type: str,
    payload_size: int,
    correlation: CorrelationMetadata | None,
) -> None:
    pub = frames_pb2.Publish(
        topic=topic, payload_type=payload_type, payload=bytes([payload_size % 256]) * payload_size
    )
    if correlation is not None:
        pub.correlation.CopyFrom(correlation)
    pub_bytes = pub.SerializeToString()
    expected = encode_frame(
        Frame(
            deliver=frames_pb2.Deliver(
                subscription_id=subscription_id,
                sequence=sequence,
                publish=frames_pb2.Publish.FromString(pub_bytes),
            )
        )
    )
    assert encode_deliver(subscription_id, sequence, pub_bytes) == expected


@settings(max_examples=200, deadline=None)
@given(
    subscription_id=st.integers(1, UINT32_MAX),
    sequence=st.integers(1, UINT64_MAX),
    event_id=st.integers(1, UINT64_MAX),
    time_ns=st.integers(1, UINT64_MAX),  # never 0: protobuf would omit it
    retained=st.booleans(),
    count=st.integers(1, 3),
)
def test_stamped_deliveries_match_encode_frame(
    subscription_id: int, sequence: int, event_id: int, time_ns: int, retained: bool, count: int
) -> None:
    """protocol §5, "Event ids and receive times": the hand-built Deliver and
    DeliverBatch with a stamp are what protobuf writes for the same message."""
    stamp = Stamp(event_id, time_ns, retained)
    pub = frames_pb2.Publish(topic="a.b", payload_type="t", payload=b"xyz")
    expected = encode_frame(
        Frame(
            deliver=frames_pb2.Deliver(
                subscription_id=subscription_id,
                sequence=sequence,
                publish=pub,
                event_id=event_id,
                received_at_ns=time_ns,
                retained=retained,
            )
        )
    )
    assert encode_deliver(subscription_id, sequence, pub.SerializeToString(), stamp.suffix) == (
        expected
    )
    batch = frames_pb2.PublishBatch(topic="a.b", payload_type="t", payloads=[b"x"] * count)
    plain = Stamp(event_id, time_ns)
    expected = encode_frame(
        Frame(
            deliver_batch=frames_pb2.DeliverBatch(
                subscription_id=subscription_id,
                first_sequence=sequence,
                batch=batch,
                first_event_id=event_id,
                received_at_ns=time_ns,
            )
        )
    )
    got = encode_deliver_batch(subscription_id, sequence, batch.SerializeToString(), plain.suffix)
    assert got == expected
    assert len(stamp.suffix) <= DELIVER_OVERHEAD - 29
    assert plain.at(count - 1).event_id == event_id + count - 1


@settings(max_examples=100, deadline=None)
@given(
    subscription_id=st.integers(0, UINT32_MAX),
    sequence=st.integers(0, UINT64_MAX),
    payload=st.binary(max_size=300),
)
def test_encode_deliver_decodes_to_the_same_message(
    subscription_id: int, sequence: int, payload: bytes
) -> None:
    """Also for id or sequence 0 (never used), where the bytes differ from encode_frame's."""
    pub = frames_pb2.Publish(topic="a.b", payload_type="t", payload=payload)
    (frame,) = decode_stream(encode_deliver(subscription_id, sequence, pub.SerializeToString()))
    assert frame.deliver == frames_pb2.Deliver(
        subscription_id=subscription_id, sequence=sequence, publish=pub
    )


def test_encode_deliver_writes_zero_fields_that_encode_frame_omits() -> None:
    zero = encode_deliver(0, 0, b"")
    assert zero == b"\x08\x22\x06\x08\x00\x10\x00\x1a\x00"
    assert encode_frame(Frame(deliver=frames_pb2.Deliver(publish=frames_pb2.Publish()))) == (
        b"\x04\x22\x02\x1a\x00"
    )


def test_encode_frame_is_prefix_plus_body() -> None:
    for frame in SAMPLES.values():
        body = frame.SerializeToString()
        assert encode_frame(frame) == encode_varint(len(body)) + body


def test_hello_wire_bytes() -> None:
    """The worked example of docs/protocol.md §3."""
    frame = hello("procmond", "procmond")
    assert encode_frame(frame).hex(" ") == (
        "18 0a 16 08 01 12 08 70 72 6f 63 6d 6f 6e 64 1a 08 70 72 6f 63 6d 6f 6e 64"
    )


def test_welcome_wire_bytes() -> None:
    """The second worked example of docs/protocol.md §3 (default limits)."""
    limits = frames_pb2.Limits(
        max_frame_bytes=1_048_576,
        max_topic_bytes=255,
        max_topic_levels=16,
        max_subscriptions=1024,
        max_queue_messages=1000,
        max_queue_bytes=8 * 1024 * 1024,
        heartbeat_interval_ms=5000,
        idle_timeout_ms=15000,
    )
    frame = Frame(
        welcome=frames_pb2.Welcome(
            protocol_version=1,
            session_id="0123456789abcdef",
            limits=limits,
            component="procmond",
            batches=True,
        )
    )
    assert encode_frame(frame).hex(" ") == (
        "3e 12 3c 08 01 12 10 30 31 32 33 34 35 36 37 38 39 61 62 63 64 65 66"
        " 1a 1a 08 80 80 40 10 ff 01 18 10 20 80 08 28 e8 07 30 80 80 80 04"
        " 38 88 27 40 98 75 22 08 70 72 6f 63 6d 6f 6e 64 28 01"
    )


@settings(max_examples=200, deadline=None)
@given(
    subscription_id=st.integers(1, UINT32_MAX),
    sequence=st.integers(1, UINT64_MAX),
    payload_size=st.one_of(st.integers(0, 300), st.integers(16_000, 17_000)),
)
def test_deliver_envelope_adds_6_to_21_bytes(
    subscription_id: int, sequence: int, payload_size: int
) -> None:
    """docs/protocol.md §5: a Deliver body is 6 to 21 bytes larger than its Publish frame's."""
    pub = publish(b"\x01" * payload_size)
    deliver = encode_deliver(subscription_id, sequence, pub.publish.SerializeToString())
    (frame,) = decode_stream(deliver)
    extra = frame.ByteSize() - pub.ByteSize()
    assert 6 <= extra <= 21


# --------------------------------------------------------------------------
# Varints


@settings(max_examples=200, deadline=None)
@given(value=st.integers(0, 2 ** (7 * MAX_PREFIX_BYTES) - 1), pad=st.binary(max_size=3))
def test_varint_round_trip(value: int, pad: bytes) -> None:
    data = encode_varint(value)
    assert 1 <= len(data) <= MAX_PREFIX_BYTES
    assert decode_varint(data) == (value, len(data))
    assert decode_varint(pad + data + b"\x01", len(pad)) == (value, len(pad) + len(data))
    assert decode_varint(bytearray(data)) == (value, len(data))
    assert decode_varint(memoryview(data)) == (value, len(data))


@settings(max_examples=200, deadline=None)
@given(value=st.integers(0, UINT64_MAX))
def test_encode_varint_agrees_with_protobuf(value: int) -> None:
    # Ping.nonce is field 1, a uint64: tag 0x08, then the varint.
    wire = frames_pb2.Ping(nonce=value).SerializeToString()
    assert encode_varint(value) == (wire[1:] if value else b"\x00")


@settings(max_examples=200, deadline=None)
@given(value=st.integers(0, 2 ** (7 * MAX_PREFIX_BYTES) - 1))
def test_decode_varint_returns_none_on_incomplete_input(value: int) -> None:
    data = encode_varint(value)
    for end in range(len(data)):
        assert decode_varint(data[:end]) is None
        assert decode_varint(b"xx" + data[:end], 2) is None


@settings(max_examples=100, deadline=None)
@given(value=st.integers(2 ** (7 * MAX_PREFIX_BYTES), UINT64_MAX))
def test_decode_varint_refuses_prefixes_over_five_bytes(value: int) -> None:
    with pytest.raises(RemoteProtocolError, match="prefix longer") as info:
        decode_varint(encode_varint(value))
    assert info.value.code == ErrorCode.ERROR_CODE_FRAME_TOO_LARGE


def test_varint_boundaries() -> None:
    assert encode_varint(0) == b"\x00"
    assert encode_varint(127) == b"\x7f"
    assert encode_varint(128) == b"\x80\x01"
    assert encode_varint(300) == b"\xac\x02"
    assert encode_varint(16_383) == b"\xff\x7f"
    assert encode_varint(16_384) == b"\x80\x80\x01"
    assert len(encode_varint(UINT64_MAX)) == 10
    assert decode_varint(b"") is None
    assert decode_varint(b"\x00", 1) is None


def test_encode_varint_refuses_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        encode_varint(-1)


# --------------------------------------------------------------------------
# State machine


@pytest.mark.parametrize(
    ("old", "new"), [(a, b) for a, b in itertools.product(ALL_STATES, ALL_STATES) if a is not b]
)
def test_only_listed_transitions_are_allowed(old: State, new: State) -> None:
    conn = Connection(Role.CLIENT)
    conn.state = old
    if new in TRANSITIONS[old]:
        conn._set_state(new)
        assert conn.state is new
    else:
        with pytest.raises(LocalProtocolError, match="illegal transition"):
            conn._set_state(new)
        assert conn.state is old


@pytest.mark.parametrize("state", ALL_STATES)
def test_staying_in_a_state_is_a_no_op(state: State) -> None:
    conn = Connection(Role.BROKER)
    conn.state = state
    conn._set_state(state)
    assert conn.state is state


def test_transition_table_shape() -> None:
    assert set(TRANSITIONS) == set(ALL_STATES)
    assert TRANSITIONS[State.CLOSED] == frozenset()
    for old, targets in TRANSITIONS.items():
        assert old not in targets
        assert State.CONNECTING not in targets  # never back to the handshake


@pytest.mark.parametrize("role", ALL_ROLES)
@pytest.mark.parametrize("state", [State.CONNECTING, State.OPEN])
def test_sending_goodbye_moves_to_closing(role: Role, state: State) -> None:
    conn = connection(role, state)
    if "goodbye" not in SENDABLE[(role, state)]:
        with pytest.raises(LocalProtocolError):
            conn.send(goodbye())
        return
    conn.send(goodbye())
    assert conn.state is State.CLOSING
    assert conn.close_expected
    assert kinds(decode_stream(conn.data_to_send())) == ["goodbye"]


def test_receiving_goodbye_moves_to_closing() -> None:
    pair = Pair()
    pair.handshake()
    pair.broker.send(goodbye("broker shutting down"))
    got = pair.pump()
    assert kinds(got.client) == ["goodbye"]
    assert got.client[0].goodbye.reason == "broker shutting down"
    assert pair.client.state is pair.broker.state is State.CLOSING
    assert pair.client.error is None
    with pytest.raises(LocalProtocolError, match="while closing"):
        pair.client.send(publish())


@pytest.mark.parametrize("role", ALL_ROLES)
@pytest.mark.parametrize("state", ALL_STATES)
def test_receive_eof_closes(role: Role, state: State) -> None:
    conn = connection(role, state)
    conn.receive_data(encode_varint(100)[:1] + b"\x01")  # a partial frame, if accepted
    conn.receive_eof()
    assert conn.state is State.CLOSED
    assert conn.close_expected
    assert conn.buffered_input == 0
    conn.receive_data(encode_frame(SAMPLES["ping"]))
    assert conn.events_received() == []


@pytest.mark.parametrize("role", ALL_ROLES)
@pytest.mark.parametrize("state", ALL_STATES)
def test_close_closes_and_is_idempotent(role: Role, state: State) -> None:
    conn = connection(role, state)
    conn.close()
    assert conn.state is State.CLOSED
    assert conn.buffered_input == 0
    conn.close()
    conn.receive_eof()
    assert conn.state is State.CLOSED


@pytest.mark.parametrize("role", ALL_ROLES)
def test_fatal_error_received_moves_to_closing(role: Role) -> None:
    conn = connection(role, State.OPEN)
    fatal = error_frame(ErrorCode.ERROR_CODE_IDLE_TIMEOUT, "silent", fatal=True)
    conn.receive_data(encode_frame(fatal) + encode_frame(SAMPLES["ping"]))
    assert conn.events_received() == [fatal]
    assert conn.state is State.CLOSING
    assert conn.error is None
    assert conn.data_to_send() == b""


@pytest.mark.parametrize("role", ALL_ROLES)
def test_non_fatal_error_received_keeps_open(role: Role) -> None:
    conn = connection(role, State.OPEN)
    refusal = error_frame(
        ErrorCode.ERROR_CODE_PAYLOAD_MISMATCH, "wrong type", fatal=False, topic=TOPIC
    )
    conn.receive_data(encode_frame(refusal) + encode_frame(SAMPLES["ping"]))
    assert conn.events_received() == [refusal, SAMPLES["ping"]]
    assert conn.state is State.OPEN
    assert conn.error is None


def test_non_fatal_error_sent_keeps_open_and_fatal_closes() -> None:
    pair = Pair()
    pair.handshake()
    pair.broker.send(
        error_frame(
            ErrorCode.ERROR_CODE_UNKNOWN_SUBSCRIPTION, "no 9", fatal=False, subscription_id=9
        )
    )
    assert pair.broker.state is State.OPEN
    got = pair.pump()
    assert got.client[0].error.subscription_id == 9
    assert pair.client.state is State.OPEN
    pair.broker.send(error_frame(ErrorCode.ERROR_CODE_SHUTTING_DOWN, "bye", fatal=True))
    assert state_of(pair.broker) is State.CLOSING
    pair.pump()
    assert state_of(pair.client) is State.CLOSING


def test_fail_queues_a_fatal_error_and_is_idempotent() -> None:
    conn = connection(Role.BROKER, State.OPEN)
    conn.send(SAMPLES["pong"])
    exc = RemoteProtocolError("idle", ErrorCode.ERROR_CODE_IDLE_TIMEOUT)
    conn.fail(exc)
    assert conn.error is exc
    conn.fail(RemoteProtocolError("again", ErrorCode.ERROR_CODE_INTERNAL))
    assert conn.error is exc
    sent = decode_stream(conn.data_to_send())
    assert kinds(sent) == ["pong", "error"]  # what was queued before still goes out
    assert sent[1].error.code == ErrorCode.ERROR_CODE_IDLE_TIMEOUT
    assert conn.state is State.CLOSING


def test_fail_works_during_the_handshake_for_either_role() -> None:
    for role in ALL_ROLES:
        conn = connection(role)
        conn.fail(RemoteProtocolError("late", ErrorCode.ERROR_CODE_HANDSHAKE_TIMEOUT))
        assert_violation(conn, ErrorCode.ERROR_CODE_HANDSHAKE_TIMEOUT)


def test_full_lifecycle_through_the_public_api() -> None:
    pair = Pair()
    seen = [pair.client.state]
    pair.client.send(hello())
    pair.pump()
    pair.broker.send(welcome())
    pair.pump()
    seen.append(pair.client.state)
    pair.client.send(goodbye())
    seen.append(pair.client.state)
    pair.pump()
    pair.client.receive_eof()
    seen.append(pair.client.state)
    assert seen == [State.CONNECTING, State.OPEN, State.CLOSING, State.CLOSED]
    assert pair.broker.state is State.CLOSING


# --------------------------------------------------------------------------
# Sending


@pytest.mark.parametrize(
    ("role", "state", "kind"),
    list(itertools.product(ALL_ROLES, ALL_STATES, ALL_KINDS)),
)
def test_sendable_table_is_enforced(role: Role, state: State, kind: str) -> None:
    conn = connection(role, state)
    frame = SAMPLES[kind]
    if kind in SENDABLE.get((role, state), frozenset()):
        conn.send(frame)
        assert decode_stream(conn.data_to_send()) == [frame]
    else:
        with pytest.raises(LocalProtocolError):
            conn.send(frame)
        assert conn.data_to_send() == b""
        assert conn.state is state


def test_send_refuses_a_frame_without_kind() -> None:
    conn = connection(Role.CLIENT, State.OPEN)
    with pytest.raises(LocalProtocolError, match="no kind"):
        conn.send(Frame())


def test_send_refuses_a_frame_over_the_limit() -> None:
    conn = connection(Role.CLIENT, State.OPEN, max_frame_bytes=1000)
    with pytest.raises(LocalProtocolError, match="exceeds the limit"):
        conn.send(publish(b"x" * 1000))
    assert conn.data_to_send() == b""
    assert conn.state is State.OPEN


# send() compares the body (not prefix + body) with the limit, as the peer does.
def test_send_accepts_a_frame_exactly_at_the_limit() -> None:
    limit = 5000
    conn = connection(Role.CLIENT, State.OPEN, max_frame_bytes=limit)
    conn.send(publish_of_size(limit))


@pytest.mark.parametrize("state", ALL_STATES)
def test_send_deliver_on_a_client_raises(state: State) -> None:
    conn = connection(Role.CLIENT, state)
    with pytest.raises(LocalProtocolError):
        conn.send_deliver(1, 1, publish().publish.SerializeToString())
    assert conn.data_to_send() == b""


@pytest.mark.parametrize("state", [State.CONNECTING, State.CLOSING, State.CLOSED])
def test_send_deliver_only_while_open(state: State) -> None:
    conn = connection(Role.BROKER, state)
    with pytest.raises(LocalProtocolError, match="cannot deliver"):
        conn.send_deliver(1, 1, b"")


def test_send_after_fail_raises() -> None:
    """A caller answering frames parsed before a violation must check the state first."""
    broker = connection(Role.BROKER)
    broker.receive_data(encode_frame(hello()) + b"\x00")
    assert kinds(broker.events_received()) == ["hello"]
    assert broker.state is State.CLOSING
    with pytest.raises(LocalProtocolError, match="while closing"):
        broker.send(welcome())


def test_output_counters() -> None:
    conn = connection(Role.BROKER, State.OPEN)
    assert (conn.buffered_frames, conn.buffered_bytes) == (0, 0)
    conn.send(SAMPLES["pong"])
    size = conn.send_deliver(3, 1, publish().publish.SerializeToString())
    assert conn.buffered_frames == 2
    queued = conn.buffered_bytes
    assert queued == len(encode_frame(SAMPLES["pong"])) + size
    assert len(conn.data_to_send()) == queued
    assert (conn.buffered_frames, conn.buffered_bytes) == (0, 0)
    assert conn.data_to_send() == b""


def test_ping_pong_nonce_round_trip() -> None:
    pair = Pair()
    pair.handshake()
    pair.broker.send(Frame(ping=frames_pb2.Ping(nonce=UINT64_MAX)))
    got = pair.pump()
    pair.client.send(Frame(pong=frames_pb2.Pong(nonce=got.client[0].ping.nonce)))
    got = pair.pump()
    assert got.broker[0].pong.nonce == UINT64_MAX


def test_largest_deliverable_publish_fits_the_limit() -> None:
    """docs/protocol.md §5: a Publish up to max_frame_bytes - DELIVER_OVERHEAD is delivered
    in a Deliver frame within the limit; a larger one is refused before delivery."""
    limit = 5000
    pair = Pair(max_frame_bytes=limit)
    pair.handshake()
    for sub_id, seq in ((1, 1), (UINT32_MAX, UINT64_MAX)):
        pub = frames_pb2.Publish(topic="a", payload=b"")
        pub.payload = b"x" * (limit - DELIVER_OVERHEAD - pub.ByteSize() - 3)
        raw = pub.SerializeToString()
        assert len(raw) == limit - DELIVER_OVERHEAD
        pair.broker.send_deliver(sub_id, seq, raw)
        got = pair.pump()
        assert pair.client.error is None
        assert kinds(got.client) == ["deliver"]
    with pytest.raises(LocalProtocolError, match="exceed the limit"):
        pair.broker.send_deliver(1, 1, b"x" * (limit - DELIVER_OVERHEAD + 1))


# --------------------------------------------------------------------------
# Fuzzing the receiving side

_FUZZ_HANDSHAKE = 64
_FUZZ_MAX = 512

_client_frames = st.one_of(
    st.builds(
        lambda topic, size: publish(b"\x00" * size, topic),
        st.text(max_size=30),
        st.integers(0, 400),
    ),
    st.builds(
        lambda i, f, c: Frame(
            subscribe=frames_pb2.Subscribe(subscription_id=i, filter=f, include_control=c)
        ),
        st.integers(0, UINT32_MAX),
        st.text(max_size=30),
        st.booleans(),
    ),
    st.builds(
        lambda i: Frame(unsubscribe=frames_pb2.Unsubscribe(subscription_id=i)),
        st.integers(0, UINT32_MAX),
    ),
    st.builds(lambda n: Frame(ping=frames_pb2.Ping(nonce=n)), st.integers(0, UINT64_MAX)),
    st.builds(lambda n: Frame(pong=frames_pb2.Pong(nonce=n)), st.integers(0, UINT64_MAX)),
    st.builds(
        lambda n: Frame(stats_request=frames_pb2.StatsRequest(request_id=n)),
        st.integers(0, UINT64_MAX),
    ),
    st.sampled_from([SAMPLES[k] for k in ALL_KINDS]),
)


@st.composite
def _mutated_streams(draw: st.DrawFn) -> bytes:
    frames = draw(st.lists(_client_frames, max_size=8))
    if draw(st.booleans()):
        frames.insert(0, hello())
    data = bytearray(b"".join(encode_frame(f) for f in frames))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, len(data)))
        byte = draw(st.integers(0, 255))
        if op == "insert":
            data[pos:pos] = bytes([byte])
        elif op == "truncate":
            del data[pos:]
        elif pos < len(data):
            if op == "flip":
                data[pos] ^= 1 << (byte % 8)
            elif op == "set":
                data[pos] = byte
            else:
                del data[pos]
    return bytes(data)


@st.composite
def _chunked(draw: st.DrawFn, streams: st.SearchStrategy[bytes]) -> list[bytes]:
    data = draw(streams)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


_inputs = st.one_of(
    _chunked(st.binary(max_size=2000)),
    _chunked(_mutated_streams()),
    _chunked(st.tuples(_mutated_streams(), st.binary(max_size=64)).map(lambda t: t[0] + t[1])),
)


@settings(max_examples=200, deadline=None)
@given(chunks=_inputs, opened=st.booleans())
def test_broker_survives_any_input(chunks: list[bytes], opened: bool) -> None:
    conn = Connection(
        Role.BROKER, max_frame_bytes=_FUZZ_MAX, handshake_max_frame_bytes=_FUZZ_HANDSHAKE
    )
    if opened:
        conn.receive_data(encode_frame(hello()))
        conn.events_received()
        conn.send(welcome())
        conn.data_to_send()
    received: list[Frame] = []
    for chunk in chunks:
        state = conn.state
        try:
            conn.receive_data(chunk)
        except ProtocolError as exc:  # pragma: no cover - the property under test
            pytest.fail(f"receive_data raised {exc!r}")
        new = conn.events_received()
        allowed = RECEIVABLE.get((Role.BROKER, state), frozenset())
        assert all(f.WhichOneof("kind") in allowed for f in new)
        received += new
        if conn.close_expected:
            assert conn.buffered_input == 0
        else:
            assert conn.buffered_input <= conn.frame_limit + MAX_PREFIX_BYTES
    out = decode_stream(conn.data_to_send())
    event(ErrorCode.Name(ErrorCode.ValueType(conn.error.code)) if conn.error else conn.state.value)
    event("frames received" if received else "no frame received")
    if conn.error is not None:
        # Ended by a violation: closing, with exactly one fatal Error queued.
        assert conn.state is State.CLOSING
        assert len(out) == 1
        assert out[0].error.fatal
        assert out[0].error.code == conn.error.code
        assert conn.error.code in (
            ErrorCode.ERROR_CODE_FRAME_TOO_LARGE,
            ErrorCode.ERROR_CODE_MALFORMED_FRAME,
            ErrorCode.ERROR_CODE_UNEXPECTED_FRAME,
        )
    else:
        # Only frames (maybe none yet); closing only on the peer's own say-so.
        assert out == []
        if conn.state is State.CLOSING:
            last = received[-1]
            assert last.WhichOneof("kind") == "goodbye" or (
                last.WhichOneof("kind") == "error" and last.error.fatal
            )
        else:
            assert conn.state is (State.OPEN if opened else State.CONNECTING)


# --------------------------------------------------------------------------
# Hand-built Publish frames (the client's hot path)


@settings(max_examples=300, deadline=None)
@given(
    topic=st.text(max_size=40),
    payload_type=st.text(max_size=40),
    payload=st.binary(max_size=20_000),
    correlation=st.one_of(
        st.none(),
        st.builds(
            lambda cid, seq: CorrelationMetadata(correlation_id=cid, sequence_number=seq),
            st.text(max_size=300),
            st.integers(0, UINT64_MAX),
        ),
    ),
)
def test_encode_publish_equals_protobuf_encoding(
    topic: str, payload_type: str, payload: bytes, correlation: CorrelationMetadata | None
) -> None:
    pub = frames_pb2.Publish(topic=topic, payload_type=payload_type, payload=payload)
    if correlation is not None:
        pub.correlation.CopyFrom(correlation)
    expected = encode_frame(Frame(publish=pub))
    corr = correlation.SerializeToString() if correlation is not None else None
    assert encode_publish(publish_header(topic, payload_type), payload, corr) == expected


@pytest.mark.parametrize("limit", [40, 64, 256, 600])
def test_error_frames_fit_a_small_limit(limit: int) -> None:
    frame = error_frame(
        ErrorCode.ERROR_CODE_INVALID_TOPIC, "é" * 500, fatal=False, topic="t" * 256, limit=limit
    )
    assert frame.ByteSize() <= limit
    assert frame.error.message.endswith("…")
    assert frame.error.code == ErrorCode.ERROR_CODE_INVALID_TOPIC
    short = error_frame(ErrorCode.ERROR_CODE_INVALID_TOPIC, "bad", fatal=False, topic="a.b")
    assert (
        error_frame(
            ErrorCode.ERROR_CODE_INVALID_TOPIC, "bad", fatal=False, topic="a.b", limit=limit
        )
        == short
    )  # nothing is cut that fits


def test_a_violation_error_fits_the_handshake_limit_in_force() -> None:
    broker = Connection(Role.BROKER, handshake_max_frame_bytes=128)
    broker.fail(RemoteProtocolError("é" * 400, ErrorCode.ERROR_CODE_MALFORMED_FRAME))
    client = Connection(Role.CLIENT, handshake_max_frame_bytes=128)
    client.receive_data(broker.data_to_send())
    assert client.error is None, client.error
    (error,) = client.events_received()
    assert error.error.fatal
    assert error.error.message.startswith("é")
