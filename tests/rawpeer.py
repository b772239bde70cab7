"""A hand-driven client on a raw Unix socket, and the small wire helpers it needs.

Shared by the tests that speak the protocol by hand, for what a normal client
never does (trickle a handshake, stop reading, send garbage):
``from rawpeer import RawPeer, hello, kind``. Frames are split with the
varint reader below, independent of the library's parser; frames are
encoded with the library's :func:`~daemoneye_eventbus.frames.encode_frame`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import ClassVar, Final

from google.protobuf.message import DecodeError

from daemoneye.eventbus.v1 import frames_pb2
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode, Frame
from daemoneye_eventbus.frames import encode_frame, encode_varint
from daemoneye_eventbus.protocol import PROTOCOL_VERSION

__all__ = [
    "HANDSHAKE_LIMIT",
    "RawPeer",
    "describe",
    "framed",
    "hello",
    "kind",
    "ping",
    "read_varint",
    "split_frames",
]

#: The limit on a frame body before the handshake completes (docs/protocol.md §1).
HANDSHAKE_LIMIT: Final = 4096
_READ_SIZE: Final = 256 * 1024


# -- wire helpers (independent of the library's parser) ------------------------------------


def read_varint(data: bytes | bytearray, pos: int, max_bytes: int = 10) -> tuple[int, int] | None:
    """A varint at ``pos``: ``(value, next_pos)``, None if incomplete; ValueError if too long."""
    value = shift = 0
    for i in range(pos, min(len(data), pos + max_bytes)):
        value |= (data[i] & 0x7F) << shift
        if not data[i] & 0x80:
            return value, i + 1
        shift += 7
    if len(data) >= pos + max_bytes:
        raise ValueError("varint too long")
    return None


def framed(body: bytes) -> bytes:
    """A length prefix and ``body``, whatever ``body`` is."""
    return encode_varint(len(body)) + body


def split_frames(data: bytes | bytearray) -> list[Frame]:
    """Every frame of ``data``, which must hold complete frames only."""
    frames = []
    pos = 0
    while pos < len(data):
        prefix = read_varint(data, pos, 5)
        assert prefix is not None, f"incomplete length prefix at {pos}: {bytes(data[pos:])!r}"
        length, start = prefix
        assert len(data) >= start + length, f"truncated frame at {pos}"
        frames.append(Frame.FromString(bytes(data[start : start + length])))
        pos = start + length
    return frames


def hello(
    name: str = "raw",
    component: str = "",
    version: int = PROTOCOL_VERSION,
    *,
    accept_batches: bool = False,
) -> Frame:
    return Frame(
        hello=frames_pb2.Hello(
            protocol_version=version,
            client_name=name,
            component=component,
            accept_batches=accept_batches,
        )
    )


def ping(nonce: int) -> Frame:
    return Frame(ping=frames_pb2.Ping(nonce=nonce))


def kind(frame: Frame) -> str | None:
    return frame.WhichOneof("kind")


def describe(frames: list[Frame]) -> list[str]:
    """Frame kinds, with code, fatality and message for Error frames (for assert messages)."""
    out = []
    for f in frames:
        k = kind(f)
        if k == "error":
            name = ErrorCode.Name(f.error.code)
            out.append(f"error({name}, fatal={f.error.fatal}): {f.error.message}")
        else:
            out.append(str(k))
    return out


# -- a raw peer ------------------------------------------------------------------------------


class RawPeer:
    """A hand-driven client on a plain non-blocking socket.

    No stream layer reads ahead: what this peer does not read stays in the
    kernel, exactly as with a client that stopped reading. Every frame the
    broker sends is checked against the frame limit it announced (§1).
    Usable as an async context manager (closed on exit); every peer not yet
    closed is in :attr:`open_peers`, for fixtures that close them after a test.
    """

    #: Every peer not yet closed.
    open_peers: ClassVar[set[RawPeer]] = set()

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        #: The limit on what the broker sends us (§1): 4096 bytes until its Welcome.
        self.limit = HANDSHAKE_LIMIT
        #: The stream ended inside a frame (the broker aborted the connection).
        self.truncated = False
        # Two sock_sendall() at once on one socket would lose one of them.
        self._writing = asyncio.Lock()
        self.open_peers.add(self)

    @classmethod
    async def connect(
        cls,
        path: str,
        *,
        handshake: bool = True,
        name: str = "raw",
        component: str = "",
        accept_batches: bool = False,
    ) -> RawPeer:
        """Connect to ``path`` and, with ``handshake``, send a Hello and read the Welcome."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, path)
            # asyncio reports success for a Unix socket whose connect() found the
            # listen queue full (EAGAIN); it is not connected: refuse it here.
            sock.getpeername()
        except BaseException:
            sock.close()
            raise
        peer = cls(sock)
        if handshake:
            try:
                await peer.send(hello(name, component, accept_batches=accept_batches))
                frame = await peer.recv()
            except BaseException:
                peer.close()
                raise
            assert kind(frame) == "welcome", describe([frame])
        return peer

    async def __aenter__(self) -> RawPeer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # -- writing ---------------------------------------------------------------------

    async def write(self, data: bytes) -> bool:
        """Send all of ``data``; False if the broker has hung up (the rest is lost)."""
        async with self._writing:
            try:
                await asyncio.get_running_loop().sock_sendall(self.sock, data)
            except (BrokenPipeError, ConnectionResetError):
                return False
            return True

    async def send(self, *frames: Frame) -> bool:
        """Send ``frames`` in one write; False if the broker has hung up."""
        return await self.write(b"".join(encode_frame(f) for f in frames))

    # -- reading ---------------------------------------------------------------------

    async def read_some(self, n: int = _READ_SIZE) -> bytes:
        """Up to ``n`` bytes into the frame buffer; b"" at end of file (or reset)."""
        try:
            chunk = await asyncio.get_running_loop().sock_recv(self.sock, n)
        except ConnectionResetError:
            chunk = b""
        self.buf += chunk
        return chunk

    async def recv_body(self, timeout: float = 5.0, *, allow_truncated: bool = False) -> bytes:
        """The next frame body; EOFError at end of file.

        A connection the broker closed ends between frames; one it aborted
        (a peer that did not read in time, §8) may end inside one: pass
        ``allow_truncated`` then.
        """
        async with asyncio.timeout(timeout):
            while True:
                prefix = read_varint(self.buf, 0, 5)
                if prefix is not None and len(self.buf) >= prefix[1] + prefix[0]:
                    length, pos = prefix
                    body = bytes(self.buf[pos : pos + length])
                    del self.buf[: pos + length]
                    self._check_limit(body)
                    return body
                if not await self.read_some():
                    assert allow_truncated or not self.buf, f"truncated frame: {self.buf[:64]!r}"
                    self.truncated = bool(self.buf)
                    raise EOFError

    async def drain(self, timeout: float = 10.0) -> None:
        """Read everything up to end of file, as fast as possible, parsing nothing yet."""
        async with asyncio.timeout(timeout):
            while await self.read_some():
                pass

    async def closed(self, timeout: float = 5.0) -> bool:
        """True once the broker has closed the connection (reads up to end of file)."""
        await self.drain(timeout)
        return True

    def _check_limit(self, body: bytes) -> None:
        assert len(body) <= self.limit, f"the broker sent {len(body)} bytes, over {self.limit}"
        if self.limit == HANDSHAKE_LIMIT:
            with contextlib.suppress(DecodeError):
                frame = Frame.FromString(body)
                if kind(frame) == "welcome":
                    self.limit = frame.welcome.limits.max_frame_bytes

    def complete_bodies(self) -> list[bytes]:
        """The bodies of the complete frames already read, taken out of the buffer."""
        bodies = []
        pos = 0
        buf = self.buf
        while (prefix := read_varint(buf, pos, 5)) is not None:
            length, start = prefix
            if len(buf) < start + length:
                break
            bodies.append(bytes(buf[start : start + length]))
            self._check_limit(bodies[-1])
            pos = start + length
        del buf[:pos]
        return bodies

    async def recv(self, timeout: float = 5.0, *, answer_pings: bool = True) -> Frame:
        """The next frame. The broker's heartbeat pings are answered and skipped,
        unless ``answer_pings`` is False: then they are returned, unanswered."""
        while True:
            frame = Frame.FromString(await self.recv_body(timeout))
            if kind(frame) != "ping" or not answer_pings:
                return frame
            await self.send(Frame(pong=frames_pb2.Pong(nonce=frame.ping.nonce)))

    async def until_eof(
        self, timeout: float = 5.0, *, allow_truncated: bool = False
    ) -> list[Frame]:
        """Every frame up to the broker's end of file, heartbeat pings left out."""
        frames: list[Frame] = []
        async with asyncio.timeout(timeout):
            while True:
                try:
                    body = await self.recv_body(timeout, allow_truncated=allow_truncated)
                    frame = Frame.FromString(body)
                except EOFError:
                    return frames
                if kind(frame) != "ping":
                    frames.append(frame)

    async def expect_fatal(self, code: ErrorCode.ValueType, timeout: float = 5.0) -> Frame:
        """The broker's last frame is its only Error: fatal, with ``code``; then it closes."""
        frames = await self.until_eof(timeout)
        assert frames, "closed without an Error frame"
        assert [kind(f) for f in frames].count("error") == 1, describe(frames)
        assert kind(frames[-1]) == "error", describe(frames)
        error = frames[-1].error
        assert (error.code, error.fatal) == (code, True), describe(frames)
        assert error.message
        return frames[-1]

    async def expect(self, wanted: str, timeout: float = 5.0) -> Frame:
        """The next frame (pings answered and skipped), which must be of kind ``wanted``."""
        frame = await self.recv(timeout)
        assert kind(frame) == wanted, describe([frame])
        return frame

    async def roundtrip(self, nonce: int = 4242, timeout: float = 5.0) -> None:
        """Ping the broker and get the pong: the connection works."""
        await self.send(ping(nonce))
        frame = await self.expect("pong", timeout)
        assert frame.pong.nonce == nonce

    def close(self) -> None:
        self.sock.close()
        self.open_peers.discard(self)
