"""Fuzz target: the frame decoder, a broker-role ``Connection`` fed arbitrary bytes.

Run::

    python -m fuzz.fuzz_frames [-max_total_time=SECONDS] [libFuzzer flags] [corpus dirs]

Input format (every byte string is valid, see ``fuzz/README.md``)::

    byte 0      low 4 bits: number k of split points; high 4 bits: limits
                (0: the defaults; n: max_frame_bytes = 8 << n, handshake limit
                max(64, max_frame_bytes // 4))
    k bytes     chunk sizes (0..255); the stream is fed in chunks of these
                sizes, then the rest in one last chunk
    the rest    the byte stream from the client

Each input runs in two passes, both with the chunks as above:

1. a fresh broker ``Connection`` in ``CONNECTING`` gets the stream;
2. a fresh one first gets a valid ``Hello`` and sends ``Welcome`` (as the
   broker does), so it is ``OPEN`` when the stream arrives.

Invariants, checked after every ``receive_data`` call:

* ``receive_data`` never raises;
* either the state is ``CONNECTING``/``OPEN``, no error is recorded, nothing
  is queued for the peer, and ``buffered_input <= frame_limit + 5``;
* or the connection is ``CLOSING`` with an empty input buffer and either
  exactly one fatal ``Error`` queued whose code is that of the recorded
  violation (and is a framing code), or nothing queued because the peer's
  last frame was a ``goodbye`` or a fatal ``error``;
* every event is a ``Frame`` with a kind the broker may receive in that state,
  and at most one ``hello``;
* the outcome (events, state, error code, buffered bytes) is the same when
  the stream is fed in one piece, and, for short streams, byte by byte.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from daemoneye.eventbus.v1 import frames_pb2
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode, Frame
from daemoneye_eventbus.frames import (
    DEFAULT_MAX_FRAME_BYTES,
    HANDSHAKE_MAX_FRAME_BYTES,
    MAX_PREFIX_BYTES,
    decode_varint,
    encode_frame,
)
from daemoneye_eventbus.protocol import PROTOCOL_VERSION, RECEIVABLE, Connection, Role, State
from fuzz.common import ByteReader, check, run_fuzzer

__all__ = ["HELLO", "Limits", "main", "parse_input", "test_one_input"]

#: The valid Hello fed first in the second pass.
HELLO = encode_frame(
    Frame(
        hello=frames_pb2.Hello(
            protocol_version=PROTOCOL_VERSION, client_name="fuzz", component="procmond"
        )
    )
)
_WELCOME = Frame(welcome=frames_pb2.Welcome(protocol_version=PROTOCOL_VERSION, session_id="f"))

#: The codes a framing or state violation found by ``receive_data`` may carry.
_FRAMING_CODES = frozenset(
    {
        ErrorCode.ERROR_CODE_FRAME_TOO_LARGE,
        ErrorCode.ERROR_CODE_MALFORMED_FRAME,
        ErrorCode.ERROR_CODE_UNEXPECTED_FRAME,
    }
)
#: Streams up to this long are also fed one byte at a time.
_BYTEWISE_MAX = 64


@dataclass(frozen=True, slots=True)
class Limits:
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    handshake_max_frame_bytes: int = HANDSHAKE_MAX_FRAME_BYTES


def parse_input(data: bytes) -> tuple[Limits, list[bytes]]:
    """The limits and the chunks an input stands for."""
    reader = ByteReader(data)
    head = reader.u8()
    sizes = [reader.u8() for _ in range(head & 0x0F)]
    selector = head >> 4
    if selector:
        max_frame = 8 << selector
        limits = Limits(max_frame, max(64, max_frame // 4))
    else:
        limits = Limits()
    stream = reader.rest()
    chunks: list[bytes] = []
    pos = 0
    for size in sizes:
        chunks.append(stream[pos : pos + size])
        pos += size
    chunks.append(stream[pos:])
    return limits, chunks


@dataclass(slots=True)
class _Outcome:
    events: list[bytes] = field(default_factory=list)
    state: State = State.CONNECTING
    code: int | None = None
    buffered_input: int = 0
    output: bytes = b""


def _new_connection(limits: Limits, open_first: bool) -> Connection:
    conn = Connection(
        Role.BROKER,
        max_frame_bytes=limits.max_frame_bytes,
        handshake_max_frame_bytes=limits.handshake_max_frame_bytes,
    )
    if open_first:
        conn.receive_data(HELLO)
        events = conn.events_received()
        if conn.close_expected:
            # Only possible with a handshake limit below the Hello's size.
            check(
                len(HELLO) - 1 > limits.handshake_max_frame_bytes,
                f"valid Hello refused: {conn.error}",
            )
            conn.data_to_send()  # the fatal Error, checked by the other pass
            return conn
        check(
            [e.WhichOneof("kind") for e in events] == ["hello"],
            f"valid Hello decoded as {events}",
        )
        conn.send(_WELCOME)
        conn.data_to_send()
        check(conn.state is State.OPEN, f"Welcome sent but state is {conn.state}")
    return conn


def _check_after_call(conn: Connection, state_before: State) -> None:
    state = conn.state
    if state in (State.CONNECTING, State.OPEN):
        check(state is state_before, f"state moved {state_before} -> {state} on receive")
        check(conn.error is None, f"error {conn.error!r} recorded but state is {state}")
        check(conn.buffered_frames == 0, f"{conn.buffered_frames} frames queued while {state}")
        limit = conn.frame_limit + MAX_PREFIX_BYTES
        check(
            conn.buffered_input <= limit,
            f"{conn.buffered_input} bytes buffered, more than frame limit + 5 ({limit})",
        )
        return
    check(state is State.CLOSING, f"receive_data left the connection {state}")
    check(conn.buffered_input == 0, f"closing with {conn.buffered_input} bytes still buffered")
    if conn.error is not None:
        check(
            conn.buffered_frames == 1,
            f"violation {conn.error!r} but {conn.buffered_frames} frames queued",
        )
        check(
            conn.error.code in _FRAMING_CODES,
            f"receive_data reported code {conn.error.code}, not a framing code",
        )
    else:
        check(conn.buffered_frames == 0, f"peer closed but {conn.buffered_frames} frames queued")


def _check_events(events: list[Frame], state: State, hellos: int) -> int:
    allowed = RECEIVABLE.get((Role.BROKER, state), frozenset())
    for event in events:
        check(isinstance(event, Frame), f"event {event!r} is not a Frame")
        kind = event.WhichOneof("kind")
        check(kind is not None, f"event without a kind: {event!r}")
        check(kind in allowed, f"{kind} frame accepted while {state.value}")
        if kind == "hello":
            hellos += 1
            check(hellos <= 1, "a second hello was accepted")
        # Whatever was accepted re-encodes and decodes again.
        Frame.FromString(event.SerializeToString())
    return hellos


def _check_closing_output(conn: Connection, last_event: Frame | None) -> bytes:
    output = conn.data_to_send()
    if conn.error is None:
        if conn.close_expected:
            kind = None if last_event is None else last_event.WhichOneof("kind")
            check(
                kind == "goodbye"
                or (kind == "error" and last_event is not None and last_event.error.fatal),
                f"closing without a violation, but the last frame was {kind}",
            )
        check(output == b"", "output queued without a violation")
        return output
    prefix = decode_varint(output)
    check(prefix is not None, "queued output is not a frame")
    assert prefix is not None
    length, pos = prefix
    check(pos + length == len(output), "more than one frame queued after a violation")
    frame = Frame.FromString(output[pos:])
    check(frame.WhichOneof("kind") == "error", f"queued {frame.WhichOneof('kind')}, not error")
    check(frame.error.fatal, "the Error queued for a violation is not fatal")
    check(frame.error.code == conn.error.code, "the queued Error's code is not the violation's")
    return output


def _feed(limits: Limits, chunks: list[bytes], open_first: bool) -> _Outcome:
    conn = _new_connection(limits, open_first)
    start_state = conn.state
    if conn.close_expected:
        return _Outcome(state=conn.state, code=None if conn.error is None else conn.error.code)
    outcome = _Outcome()
    hellos = 1 if open_first else 0
    last: Frame | None = None
    for chunk in chunks:
        state_before = conn.state
        conn.receive_data(chunk)
        _check_after_call(conn, state_before)
        events = conn.events_received()
        hellos = _check_events(events, state_before, hellos)
        if events:
            last = events[-1]
        outcome.events.extend(e.SerializeToString() for e in events)
    check(conn.events_received() == [], "events_received returned events twice")
    outcome.state = conn.state
    outcome.code = None if conn.error is None else conn.error.code
    outcome.buffered_input = conn.buffered_input
    outcome.output = _check_closing_output(conn, last)
    # End of file: every buffer is dropped and the connection is closed.
    conn.receive_eof()
    check(conn.state is State.CLOSED, f"state {conn.state} after end of file")
    check(conn.buffered_input == 0, "input still buffered after end of file")
    conn.receive_data(b"\x02\x4a\x00")  # a ping after the end: ignored
    check(conn.events_received() == [], "frames parsed after end of file")
    check(start_state in (State.CONNECTING, State.OPEN), f"started in {start_state}")
    return outcome


def _same(a: _Outcome, b: _Outcome, how: str) -> None:
    check(a.events == b.events, f"events differ when the stream is fed {how}")
    check(a.state is b.state, f"state {a.state} vs {b.state} when fed {how}")
    check(a.code == b.code, f"error code {a.code} vs {b.code} when fed {how}")
    check(a.buffered_input == b.buffered_input, f"buffered input differs when fed {how}")
    check(a.output == b.output, f"output differs when fed {how}")


def test_one_input(data: bytes) -> None:
    """One fuzz input: both passes, with every invariant of the module docstring."""
    limits, chunks = parse_input(data)
    stream = b"".join(chunks)
    for open_first in (False, True):
        chunked = _feed(limits, chunks, open_first)
        whole = _feed(limits, [stream], open_first)
        _same(chunked, whole, "in one piece")
        if len(stream) <= _BYTEWISE_MAX:
            bytewise = _feed(limits, [stream[i : i + 1] for i in range(len(stream))], open_first)
            _same(bytewise, whole, "byte by byte")


def main(argv: list[str] | None = None) -> None:
    run_fuzzer(test_one_input, sys.argv if argv is None else argv)


if __name__ == "__main__":
    main()
