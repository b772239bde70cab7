"""The Unix domain socket transport (Linux, macOS and the BSDs).

This module knows nothing of frames, sessions or routing. It creates the
listening socket safely (see :func:`bind_unix_socket`), reads the peer's
credentials from the kernel (:func:`peer_credentials`, by the method
:func:`credentials_method` names for each system) and its executable
(:func:`peer_executable`), computes default socket paths, and offers the
:class:`~daemoneye_eventbus.transports.base.Listener` interface over them
(:class:`UnixListener`) and :func:`connect` for clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import os
import socket
import stat
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Final, Literal

from daemoneye_eventbus.access import PeerCredentials
from daemoneye_eventbus.errors import BrokerAlreadyRunning, BrokerError
from daemoneye_eventbus.transports.base import Listener, ProtocolFactory

__all__ = [
    "DEFAULT_SOCKET_PATH",
    "LISTEN_BACKLOG",
    "CredentialsMethod",
    "UnixListener",
    "bind_unix_socket",
    "connect",
    "credentials_method",
    "default_socket_path",
    "make_directories",
    "missing_directories",
    "parse_xucred",
    "peer_credentials",
    "peer_executable",
    "remove_socket",
]

#: Connections the kernel queues before the broker accepts them.
LISTEN_BACKLOG: Final = 512

#: Where the broker listens unless told otherwise.
DEFAULT_SOCKET_PATH = "/tmp/daemoneye.sock"


def default_socket_path(instance: str | None = None) -> str:
    """``/tmp/daemoneye.sock``, or ``/tmp/daemoneye-{instance}.sock`` for a named instance."""
    if not instance:
        return DEFAULT_SOCKET_PATH
    if not all(c.isalnum() or c in "-_" for c in instance):
        raise ValueError(f"instance name {instance!r} may hold only letters, digits, '-' and '_'")
    return f"/tmp/daemoneye-{instance}.sock"


#: How the broker asks a kernel who the peer of a Unix socket is.
CredentialsMethod = Literal["SO_PEERCRED", "LOCAL_PEERCRED", "getpeereid"]

_BSDS: Final = ("freebsd", "openbsd", "netbsd", "dragonfly")


def credentials_method(platform: str) -> CredentialsMethod | None:
    """How :func:`peer_credentials` reads a peer's credentials on ``platform``
    (a ``sys.platform`` value); None where it reads none.

    * ``SO_PEERCRED`` (Linux): pid, effective uid and gid at ``connect()``;
    * ``LOCAL_PEERCRED`` (macOS): effective uid and gid at ``connect()``, and
      ``LOCAL_PEERPID`` for the pid;
    * ``getpeereid`` (FreeBSD, OpenBSD, NetBSD, DragonFly): effective uid and
      gid at ``connect()``; no pid.
    """
    if platform.startswith("linux"):
        return "SO_PEERCRED"
    if platform == "darwin":
        return "LOCAL_PEERCRED"
    if platform.startswith(_BSDS):
        return "getpeereid"
    return None


def peer_credentials(sock: socket.socket) -> PeerCredentials | None:
    """Read the peer's credentials from the kernel (never from what it claims).

    None where :func:`credentials_method` names no method or the kernel's
    answer is not understood; OSError when the call fails.
    """
    if sys.platform.startswith("linux"):  # credentials_method: SO_PEERCRED
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        return PeerCredentials(pid, uid, gid)
    method = credentials_method(sys.platform)  # pragma: no cover - not Linux
    if method == "LOCAL_PEERCRED":  # pragma: no cover - macOS only
        return _darwin_peer_credentials(sock)
    if method == "getpeereid":  # pragma: no cover - the BSDs only
        return _bsd_peer_credentials(sock)
    return None  # pragma: no cover - no way to ask this kernel


# macOS <sys/un.h>: SOL_LOCAL is 0; LOCAL_PEERCRED returns a struct xucred
# {u_int cr_version; uid_t cr_uid; short cr_ngroups; gid_t cr_groups[NGROUPS]}
# (<sys/ucred.h>, NGROUPS 16, cr_version XUCRED_VERSION 0) taken when the peer
# connected; LOCAL_PEERPID returns a pid_t.
_SOL_LOCAL: Final = 0
_LOCAL_PEERCRED: Final = 0x001
_LOCAL_PEERPID: Final = 0x002
_XUCRED: Final = struct.Struct("=IIh2x16I")
_XUCRED_VERSION: Final = 0
_PID: Final = struct.Struct("=i")


def parse_xucred(raw: bytes) -> tuple[int, int] | None:
    """The effective uid and gid in a macOS ``struct xucred`` (``LOCAL_PEERCRED``).

    The gid is the credential's first group, the effective gid. None when
    ``raw`` is not one: too short, another layout version, or a group count
    out of range.
    """
    if len(raw) < _XUCRED.size:
        return None
    version, uid, ngroups, *groups = _XUCRED.unpack_from(raw)
    if version != _XUCRED_VERSION or not 0 < ngroups <= len(groups):
        return None
    return uid, groups[0]


def _darwin_peer_credentials(sock: socket.socket) -> PeerCredentials | None:  # pragma: no cover
    ids = parse_xucred(sock.getsockopt(_SOL_LOCAL, _LOCAL_PEERCRED, _XUCRED.size))
    if ids is None:
        return None
    uid, gid = ids
    try:
        pid = _PID.unpack(sock.getsockopt(_SOL_LOCAL, _LOCAL_PEERPID, _PID.size))[0]
    except (OSError, struct.error):
        pid = 0
    return PeerCredentials(max(pid, 0), uid, gid)


@functools.cache
def _getpeereid() -> Callable[..., int]:  # pragma: no cover - the BSDs only
    # int getpeereid(int s, uid_t *euid, gid_t *egid); uid_t and gid_t are
    # 32-bit unsigned on every BSD.
    function = ctypes.CDLL(None, use_errno=True).getpeereid
    function.argtypes = (
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_uint32),
        ctypes.POINTER(ctypes.c_uint32),
    )
    function.restype = ctypes.c_int
    return function


def _bsd_peer_credentials(sock: socket.socket) -> PeerCredentials:  # pragma: no cover
    uid, gid = ctypes.c_uint32(), ctypes.c_uint32()
    if _getpeereid()(sock.fileno(), ctypes.byref(uid), ctypes.byref(gid)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    # getpeereid gives no pid: 0, so the executable is unknown.
    return PeerCredentials(0, uid.value, gid.value)


def _is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as exc:
        # Cannot tell (e.g. no permission): assume somebody is there.
        return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    else:
        return True
    finally:
        probe.close()


def _reclaim(path: str) -> None:
    """Make room for a new socket at ``path``, or refuse [security: never steal, never follow]."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise BrokerError(f"{path} is a symbolic link; refusing to use or remove it")
    if not stat.S_ISSOCK(st.st_mode):
        kind = "directory" if stat.S_ISDIR(st.st_mode) else "file that is not a socket"
        raise BrokerError(f"{path} is a {kind}; refusing to use or remove it")
    if _is_live(path):
        raise BrokerAlreadyRunning(f"another broker is listening on {path}")
    os.unlink(path)


def missing_directories(path: str) -> list[str]:
    """The directories above ``path`` that do not exist yet, outermost first."""
    missing: list[str] = []
    parent = Path(path).absolute().parent
    while not os.path.lexists(parent):
        missing.append(str(parent))
        parent = parent.parent
    return missing[::-1]


def make_directories(directories: list[str]) -> None:
    """Create ``directories`` (outermost first), each with mode 0700, never wider.

    Each is created under a 0077 umask, so it is 0700 from the moment it
    exists, and then set to 0700 in case the file system widened it (a
    default ACL). One that exists meanwhile is an error: it is not ours.
    """
    for directory in directories:
        old_umask = os.umask(0o077)
        try:
            os.mkdir(directory, 0o700)
        finally:
            os.umask(old_umask)
        os.chmod(directory, 0o700)


def bind_unix_socket(
    path: str,
    *,
    mode: int = 0o600,
    group: int | None = None,
    backlog: int = LISTEN_BACKLOG,
) -> socket.socket:
    """Create a listening Unix socket at ``path`` that is never more open than ``mode``.

    Every missing directory above it is created with mode 0700 (see
    :func:`make_directories`), not only the socket's own. A stale socket
    (nothing listening) is removed; a live one raises
    :class:`BrokerAlreadyRunning`; a symlink or any other file raises
    :class:`BrokerError` and is left alone. The socket file is created under a
    0177 umask, so it is 0600 from the moment it exists; ``mode`` and ``group``
    are applied before ``listen()``, so before any peer can connect.
    """
    make_directories(missing_directories(path))
    _reclaim(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        if group is not None:
            os.chown(path, -1, group)
        os.chmod(path, mode)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        raise
    return sock


def remove_socket(path: str, inode: int | None) -> None:
    """Remove the socket file at ``path`` if it is still ours (same inode)."""
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode) and (inode is None or st.st_ino == inode):
            os.unlink(path)


class UnixListener(Listener):
    """A broker's listening Unix socket (see :func:`bind_unix_socket`)."""

    def __init__(
        self,
        path: str,
        *,
        mode: int = 0o600,
        group: int | None = None,
        send_buffer: int | None = None,
        backlog: int = LISTEN_BACKLOG,
    ) -> None:
        self.address = path
        self.mode = mode
        self.group = group
        self.send_buffer = send_buffer
        self.backlog = backlog
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        #: The directories :meth:`start` created for the socket, outermost first.
        self.created_directories: tuple[str, ...] = ()

    async def start(self, factory: ProtocolFactory, *, serve: bool = True) -> None:
        if self._server is not None:
            raise BrokerError(f"already listening on {self.address}")
        missing = missing_directories(self.address)
        sock = bind_unix_socket(
            self.address, mode=self.mode, group=self.group, backlog=self.backlog
        )
        self.created_directories = tuple(missing)
        self._inode = os.stat(self.address).st_ino
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_unix_server(
                factory, sock=sock, backlog=self.backlog, start_serving=serve
            )
        except BaseException:
            sock.close()
            remove_socket(self.address, self._inode)
            raise

    async def serve(self) -> None:
        if self._server is None:
            raise BrokerError(f"not listening on {self.address}: start() first")
        if not self._server.is_serving():
            await self._server.start_serving()

    def chown(self, uid: int, gid: int) -> None:
        # Only our own socket file, never one put in its place (nor a symlink).
        try:
            st = os.lstat(self.address)
        except OSError as exc:
            raise BrokerError(f"cannot give {self.address} to uid {uid}: {exc.strerror}") from None
        if self._inode is None or not stat.S_ISSOCK(st.st_mode) or st.st_ino != self._inode:
            raise BrokerError(f"{self.address} is not this listener's socket; not changing it")
        group = gid if self.group is None else self.group
        try:
            os.chown(self.address, uid, group, follow_symlinks=False)
            # All of them: the user must traverse each to reach (and remove) its socket.
            for directory in self.created_directories:
                os.chown(directory, uid, gid, follow_symlinks=False)
        except OSError as exc:
            raise BrokerError(f"cannot give {exc.filename} to uid {uid}: {exc.strerror}") from None

    def accept(self, transport: asyncio.BaseTransport) -> PeerCredentials | None:
        sock = transport.get_extra_info("socket")
        if sock is None:
            return None
        peer = None
        with contextlib.suppress(OSError):
            peer = peer_credentials(sock)
        if self.send_buffer:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer)
        return peer

    def executable(self, peer: PeerCredentials) -> str | None:
        return peer_executable(peer.pid)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        # Only our own socket file: another broker may have claimed the path
        # since, or this listener never started (a live broker holds the path).
        if self._inode is not None:
            remove_socket(self.address, self._inode)

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()


def peer_executable(pid: int) -> str | None:
    """The executable of process ``pid``; None if unknown (pid 0 included).

    Linux: the link ``/proc/<pid>/exe``; macOS: ``proc_pidpath`` (libproc);
    elsewhere None (a policy with ``executables`` is refused there at load).
    """
    if pid <= 0:
        return None
    if sys.platform == "darwin":  # pragma: no cover - macOS only
        return _darwin_executable(pid)
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


#: Longest path proc_pidpath writes (<libproc.h> PROC_PIDPATHINFO_MAXSIZE, 4 * MAXPATHLEN).
_PROC_PIDPATHINFO_MAXSIZE: Final = 4096


@functools.cache
def _proc_pidpath() -> Callable[..., int]:  # pragma: no cover - macOS only
    # int proc_pidpath(int pid, void *buffer, uint32_t buffersize): the length
    # written, or 0 (and errno) on failure.
    function = ctypes.CDLL("/usr/lib/libproc.dylib", use_errno=True).proc_pidpath
    function.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32)
    function.restype = ctypes.c_int
    return function


def _darwin_executable(pid: int) -> str | None:  # pragma: no cover - macOS only
    buffer = ctypes.create_string_buffer(_PROC_PIDPATHINFO_MAXSIZE)
    try:
        length = _proc_pidpath()(pid, buffer, _PROC_PIDPATHINFO_MAXSIZE)
    except OSError:  # libproc could not be loaded
        return None
    if length <= 0:
        return None
    return os.fsdecode(buffer.raw[:length])


async def connect(path: str, factory: ProtocolFactory) -> asyncio.BaseTransport:
    """Connect to the broker listening at ``path``."""
    transport, _ = await asyncio.get_running_loop().create_unix_connection(factory, path)
    return transport
