"""A connection parses at most ``max_frames`` frames per call (fair turns), pure.

The broker's socket session hands each read to its Connection with a frame
limit and parses the rest on later loop turns (``parse_more``), with reading
paused meanwhile; here the limit is checked without any event loop.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from daemoneye.eventbus.v1 import frames_pb2
from daemoneye.eventbus.v1.frames_pb2 import Frame
from daemoneye_eventbus.frames import encode_frame
from daemoneye_eventbus.protocol import Connection, Role, State


def open_broker_side() -> Connection:
    conn = Connection(Role.BROKER)
    conn.receive_data(encode_frame(Frame(hello=frames_pb2.Hello(protocol_version=1))))
    assert [f.WhichOneof("kind") for f in conn.events_received()] == ["hello"]
    conn.send(Frame(welcome=frames_pb2.Welcome(protocol_version=1, session_id="s")))
    conn.data_to_send()
    assert conn.state is State.OPEN
    return conn


def pings(n: int, start: int = 1) -> bytes:
    return b"".join(
        encode_frame(Frame(ping=frames_pb2.Ping(nonce=i))) for i in range(start, start + n)
    )


def nonces(conn: Connection) -> list[int]:
    return [f.ping.nonce for f in conn.events_received()]


def test_at_most_max_frames_per_call_and_the_rest_later() -> None:
    conn = open_broker_side()
    conn.receive_data(pings(10), max_frames=4)
    assert nonces(conn) == [1, 2, 3, 4]
    assert conn.input_pending
    assert conn.buffered_input > 0
    conn.parse_more(4)
    assert nonces(conn) == [5, 6, 7, 8]
    conn.parse_more(4)
    assert nonces(conn) == [9, 10]
    assert not conn.input_pending
    assert conn.buffered_input == 0


def test_no_limit_parses_everything() -> None:
    conn = open_broker_side()
    conn.receive_data(pings(100))
    assert nonces(conn) == list(range(1, 101))
    assert not conn.input_pending


def test_a_partial_frame_after_the_limit_waits_for_its_rest() -> None:
    conn = open_broker_side()
    data = pings(3)
    conn.receive_data(data[:-2], max_frames=1)
    assert nonces(conn) == [1]
    assert conn.input_pending
    conn.parse_more(1)
    assert nonces(conn) == [2]
    conn.parse_more(1)
    assert nonces(conn) == []  # the third is incomplete
    assert not conn.input_pending
    conn.receive_data(data[-2:], max_frames=1)
    assert nonces(conn) == [3]


def test_closing_drops_what_waits() -> None:
    conn = open_broker_side()
    conn.receive_data(pings(10), max_frames=2)
    assert conn.input_pending
    conn.receive_eof()
    assert not conn.input_pending
    conn.parse_more(2)
    assert nonces(conn) == [1, 2]


@given(
    st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=8),
    st.integers(min_value=1, max_value=7),
)
def test_any_split_and_limit_give_the_same_frames(cuts: list[int], limit: int) -> None:
    data = pings(60)
    conn = open_broker_side()
    got: list[int] = []
    pos = 0
    for cut in [*cuts, len(data)]:
        chunk = data[pos : pos + cut * 7]
        pos += len(chunk)
        conn.receive_data(chunk, max_frames=limit)
        got += nonces(conn)
        while conn.input_pending:
            conn.parse_more(limit)
            batch = nonces(conn)
            assert len(batch) <= limit
            got += batch
        if pos >= len(data):
            break
    assert got == list(range(1, 61))
