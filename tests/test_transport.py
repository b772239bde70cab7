"""The transport seam over real sockets: listeners, connections, peer credentials.

The bodies go through the dispatcher (:mod:`daemoneye_eventbus.transports`:
``listener()``, ``connect()``, ``default_address()``) and the
:class:`~daemoneye_eventbus.transports.Listener` interface, so that they can
run over another platform's transport. What only a socket *file* has (its
mode, a stale file left behind, a symlink at its path) is in the second part.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemoneye_eventbus import transports
from daemoneye_eventbus.access import PeerCredentials
from daemoneye_eventbus.errors import BrokerAlreadyRunning, BrokerError
from daemoneye_eventbus.transports import Listener
from daemoneye_eventbus.transports.unix import default_socket_path, peer_executable

unix_only = pytest.mark.skipif(sys.platform == "win32", reason="socket files")


def assert_is_this_process(peer: PeerCredentials | None) -> None:
    """``peer`` is this process, as the kernel tells (uid and gid; on Windows the SID)."""
    assert peer is not None
    if sys.platform == "win32":
        from daemoneye_eventbus.transports import windows

        assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), -1, -1)
        assert peer.sid == windows.current_user_sid()
    else:
        assert peer == PeerCredentials(os.getpid(), os.geteuid(), os.getegid())


class Served(asyncio.Protocol):
    """The listener's side of one connection: reports the peer, echoes what it reads."""

    def __init__(self, listener: Listener, accepted: asyncio.Queue[Served]) -> None:
        self.listener = listener
        self.accepted = accepted
        self.peer: PeerCredentials | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = self.listener.accept(transport)
        self.accepted.put_nowait(self)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class Caller(asyncio.Protocol):
    """The connecting side: collects what it reads until ``wanted`` bytes came."""

    def __init__(self, wanted: int) -> None:
        self.wanted = wanted
        self.data = b""
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= self.wanted and not self.done.done():
            self.done.set_result(self.data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


class Serving:
    """A started listener and the connections it accepted."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.accepted: asyncio.Queue[Served] = asyncio.Queue()
        self.served: list[Served] = []

    def factory(self) -> Served:
        return Served(self.listener, self.accepted)

    async def next_accepted(self, timeout: float = 5.0) -> Served:
        async with asyncio.timeout(timeout):
            served = await self.accepted.get()
        self.served.append(served)
        return served

    def close(self) -> None:
        for served in self.served:
            if served.transport is not None:
                served.transport.abort()
        self.listener.close()


@contextlib.asynccontextmanager
async def serving(address: str, **options: Any) -> AsyncIterator[Serving]:
    """A listener for ``address`` (``transports.listener(address, **options)``), started."""
    server = Serving(transports.listener(address, **options))
    await server.listener.start(server.factory)
    try:
        yield server
    finally:
        server.close()
        await server.listener.wait_closed()


async def call(address: str, message: bytes = b"hello") -> tuple[bytes, asyncio.BaseTransport]:
    """Connect, send ``message`` and return its echo with the (open) transport."""
    caller = Caller(len(message))
    transport = await transports.connect(address, lambda: caller)
    assert isinstance(transport, asyncio.WriteTransport)
    transport.write(message)
    async with asyncio.timeout(5):
        echo = await caller.done
    return echo, transport


async def hang_up(transport: asyncio.BaseTransport) -> None:
    transport.close()
    await asyncio.sleep(0)  # let connection_lost run


async def answers(address: str) -> bool:
    """Whether a listener answers at ``address`` (an echo round trip works)."""
    try:
        echo, transport = await call(address, b"ping")
    except (FileNotFoundError, ConnectionRefusedError):
        return False
    await hang_up(transport)
    return echo == b"ping"


# -- the seam --------------------------------------------------------------------------------


async def test_listener_accepts_a_connection_and_names_the_peer(sock_path: str) -> None:
    async with serving(sock_path) as server:
        assert server.listener.address == sock_path
        echo, transport = await call(sock_path, b"over the seam")
        assert echo == b"over the seam"
        served = await server.next_accepted()
        # The connecting process is this one: the kernel says so, not the peer.
        assert_is_this_process(served.peer)
        await hang_up(transport)


async def test_listener_serves_several_connections(sock_path: str) -> None:
    async with serving(sock_path) as server:
        calls = [await call(sock_path, f"caller {i}".encode()) for i in range(3)]
        assert [echo for echo, _ in calls] == [b"caller 0", b"caller 1", b"caller 2"]
        peers = [(await server.next_accepted()).peer for _ in calls]
        assert all(p is not None and p.pid == os.getpid() for p in peers)
        for _, transport in calls:
            await hang_up(transport)


async def test_listener_names_the_peer_executable(sock_path: str) -> None:
    async with serving(sock_path) as server:
        _, transport = await call(sock_path)
        served = await server.next_accepted()
        assert served.peer is not None
        if sys.platform.startswith("linux"):
            assert server.listener.executable(served.peer) == os.path.realpath(sys.executable)
        if sys.platform == "win32":  # the interpreter, maybe behind a virtualenv's launcher
            executable = server.listener.executable(served.peer)
            assert executable is not None
            assert executable.lower().endswith(".exe")
        await hang_up(transport)


@unix_only
async def test_listener_applies_the_send_buffer(sock_path: str) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        default = a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    # Smaller than the default: the kernel may double it (Linux), never cap it.
    asked = default // 4
    async with serving(sock_path, send_buffer=asked) as small, serving(sock_path + "2") as plain:
        _, t1 = await call(sock_path)
        _, t2 = await call(sock_path + "2")
        sizes = []
        for server in (small, plain):
            served = await server.next_accepted()
            assert served.transport is not None
            sock = served.transport.get_extra_info("socket")
            sizes.append(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
        assert sizes[0] < default <= sizes[1], (asked, sizes)
        await hang_up(t1)
        await hang_up(t2)


async def test_connect_without_a_listener(sock_path: str) -> None:
    with pytest.raises(FileNotFoundError):
        await transports.connect(sock_path, asyncio.Protocol)


async def test_listener_cannot_start_twice(sock_path: str) -> None:
    async with serving(sock_path) as server:
        with pytest.raises(BrokerError, match="already listening"):
            await server.listener.start(server.factory)
        assert await answers(sock_path)


async def test_live_address_cannot_be_claimed(sock_path: str) -> None:
    async with serving(sock_path):
        unix = sys.platform != "win32"
        inode = os.stat(sock_path).st_ino if unix else None
        second = transports.listener(sock_path)
        with pytest.raises(BrokerAlreadyRunning):
            await second.start(asyncio.Protocol)
        # The first listener keeps its address and keeps serving.
        if unix:
            assert os.stat(sock_path).st_ino == inode
        assert await answers(sock_path)


# A listener whose start() was refused (BrokerAlreadyRunning) owns nothing at
# the path: closing it must leave the live broker's socket alone.
async def test_close_after_a_refused_start_leaves_the_live_socket_alone(sock_path: str) -> None:
    async with serving(sock_path):
        second = transports.listener(sock_path)
        with pytest.raises(BrokerAlreadyRunning):
            await second.start(asyncio.Protocol)
        second.close()
        await second.wait_closed()
        if sys.platform != "win32":
            assert os.path.exists(sock_path)
        assert await answers(sock_path)


async def test_close_stops_accepting(sock_path: str) -> None:
    async with serving(sock_path) as server:
        assert await answers(sock_path)
        server.listener.close()
        await server.listener.wait_closed()
        assert not await answers(sock_path)
        server.listener.close()  # again: nothing left to do


def test_default_address() -> None:
    assert transports.default_address() == transports.DEFAULT_ADDRESS
    assert transports.default_address(None) == transports.DEFAULT_ADDRESS
    named = transports.default_address("x-1")
    assert named != transports.DEFAULT_ADDRESS
    assert "x-1" in named
    assert transports.default_address("x_2") != named
    if sys.platform != "win32":
        assert transports.DEFAULT_ADDRESS == "/tmp/daemoneye.sock"
        assert named == "/tmp/daemoneye-x-1.sock"
        # The dispatcher's (pure) answer and the Unix transport's agree.
        assert named == default_socket_path("x-1")
        assert default_socket_path() == transports.DEFAULT_ADDRESS


@pytest.mark.parametrize("instance", ["a/b", "../x", "x y", "x.sock", "é\n", "a\0b"])
def test_default_address_refuses_an_invalid_instance_name(instance: str) -> None:
    with pytest.raises(ValueError, match="instance name"):
        transports.default_address(instance)


# -- socket files ----------------------------------------------------------------------------


def mode_of(path: str | Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@unix_only
async def test_socket_file_is_0600_whatever_the_umask(sock_path: str) -> None:
    old = os.umask(0)  # a permissive umask must not widen the socket
    try:
        async with serving(sock_path):
            st = os.lstat(sock_path)
            assert stat.S_ISSOCK(st.st_mode)
            assert mode_of(sock_path) == 0o600
    finally:
        os.umask(old)


@unix_only
async def test_socket_file_takes_the_given_mode_and_group(sock_path: str) -> None:
    group = 4242 if os.geteuid() == 0 else os.getegid()  # root may give it any group
    async with serving(sock_path, mode=0o660, group=group):
        assert mode_of(sock_path) == 0o660
        assert os.lstat(sock_path).st_gid == group
        assert await answers(sock_path)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """A umask that takes nothing away, so that only the code decides the modes."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@unix_only
@pytest.mark.usefixtures("open_umask")
async def test_every_missing_directory_is_created_private(sock_dir: Path) -> None:
    outer = sock_dir / "run"
    levels = [outer, outer / "daemoneye", outer / "daemoneye" / "bus"]
    path = levels[-1] / "bus.sock"
    os.chmod(sock_dir, 0o755)
    async with serving(str(path)):
        for directory in levels:
            st = os.stat(directory)
            assert stat.S_ISDIR(st.st_mode), directory
            assert stat.S_IMODE(st.st_mode) == 0o700, directory
            assert st.st_uid == os.geteuid(), directory
        assert mode_of(path) == 0o600
        assert await answers(str(path))
    # The directory that existed is as it was.
    assert mode_of(sock_dir) == 0o755
    assert not path.exists()


@unix_only
async def test_existing_parent_directory_is_left_as_it_is(sock_dir: Path) -> None:
    parent = sock_dir / "shared"
    parent.mkdir(mode=0o755)
    os.chmod(parent, 0o755)
    async with serving(str(parent / "bus.sock")):
        assert mode_of(parent) == 0o755


@unix_only
async def test_stale_socket_file_is_reclaimed(sock_path: str) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    stale.close()  # the file stays; nobody listens
    os.chmod(sock_path, 0o666)  # tells it from a new file (its inode may be reused)
    with pytest.raises(ConnectionRefusedError):
        await transports.connect(sock_path, asyncio.Protocol)
    async with serving(sock_path):
        assert mode_of(sock_path) == 0o600  # a new socket file, not the stale one
        assert await answers(sock_path)


@unix_only
@pytest.mark.parametrize("kind", ["symlink", "file", "directory", "dangling-symlink"])
async def test_foreign_file_at_the_path_is_refused_and_left_alone(
    sock_dir: Path, kind: str
) -> None:
    path = sock_dir / "bus.sock"
    target = sock_dir / "target"
    if kind == "symlink":
        # Even a link to a live socket is not followed.
        target_path = str(target)
        async with serving(target_path):
            path.symlink_to(target)
            with pytest.raises(BrokerError, match="symbolic link") as info:
                await transports.listener(str(path)).start(asyncio.Protocol)
            assert not isinstance(info.value, BrokerAlreadyRunning)
            assert path.is_symlink()
            assert await answers(target_path)
        return
    if kind == "file":
        path.write_text("keep me")
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to(target)
    with pytest.raises(BrokerError, match="refusing"):
        await transports.listener(str(path)).start(asyncio.Protocol)
    if kind == "file":
        assert path.read_text() == "keep me"
    elif kind == "directory":
        assert path.is_dir()
    else:
        assert path.is_symlink()
        assert not target.exists()  # nothing was created through the link


@unix_only
async def test_close_removes_the_socket_file(sock_path: str) -> None:
    async with serving(sock_path):
        assert os.path.exists(sock_path)
    assert not os.path.lexists(sock_path)


@unix_only
async def test_close_leaves_a_socket_another_listener_created_since(sock_path: str) -> None:
    async with serving(sock_path) as first:
        os.unlink(sock_path)  # somebody removed our file ...
        async with serving(sock_path):  # ... and another listener took the path
            theirs = os.lstat(sock_path).st_ino
            first.listener.close()
            await first.listener.wait_closed()
            assert os.lstat(sock_path).st_ino == theirs  # not ours: kept
            assert await answers(sock_path)
        assert not os.path.lexists(sock_path)  # the other one removed its own


@unix_only
async def test_close_leaves_a_foreign_file_at_the_path(sock_path: str) -> None:
    async with serving(sock_path) as server:
        os.unlink(sock_path)
        Path(sock_path).write_text("not a socket")
        server.listener.close()
        assert Path(sock_path).read_text() == "not a socket"


@pytest.mark.linux_only("/proc/<pid>/exe")
def test_peer_executable() -> None:
    assert peer_executable(os.getpid()) == os.path.realpath(sys.executable)
    assert peer_executable(2**22 + 12345) is None  # above pid_max: no such process
