"""The Windows named-pipe transport, on asyncio's proactor event loop.

The broker serves ``\\\\.\\pipe\\DaemonEye`` (or ``...\\DaemonEye-{instance}``)
through :class:`PipeListener`, behind the same
:class:`~daemoneye_eventbus.transports.base.Listener` interface as the Unix
socket transport; clients :func:`connect` with
``ProactorEventLoop.create_pipe_connection``. What is decided without calling
Windows (names, the default security descriptor, which token groups count)
is in the pure :mod:`daemoneye_eventbus.transports.pipes`.

* Every pipe instance is created with an explicit security descriptor (the
  default one, :func:`~daemoneye_eventbus.transports.pipes.default_sddl`, or
  ``BrokerConfig.pipe_sddl``), with ``PIPE_REJECT_REMOTE_CLIENTS``, in byte
  mode, overlapped; the first one with ``FILE_FLAG_FIRST_PIPE_INSTANCE``, so
  that the broker refuses to start (:class:`BrokerAlreadyRunning`) when
  another process already owns the name.
* One unconnected instance is always listening; when a client connects to
  it, a new one is created and the connected one becomes an asyncio duplex
  pipe transport served by the session protocol.
* The peer's identity comes from the kernel, never from what it claims: the
  client's process id (``GetNamedPipeClientProcessId``), that process's token,
  its user SID and the groups that count (enabled, not deny-only); the
  executable path from ``QueryFullProcessImageNameW``.

The Win32 calls go through pywin32, except ``QueryFullProcessImageNameW``,
which pywin32 does not wrap: it is declared once with ``ctypes``. This module
imports only on Windows (``sys.platform == "win32"``); mypy checks it with
``--platform win32``.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import sys
from asyncio import windows_utils
from collections.abc import Callable
from ctypes import wintypes
from typing import Any, Final

import pywintypes
import win32api
import win32con
import win32file
import win32pipe
import win32security

import daemoneye_eventbus.transports.pipes as pipes
from daemoneye_eventbus.access import PeerCredentials
from daemoneye_eventbus.errors import BrokerError
from daemoneye_eventbus.transports.base import Listener, ProtocolFactory

# The rest of this module exists on Windows only (mypy skips it elsewhere).
assert sys.platform == "win32", "the named-pipe transport runs only on Windows"

__all__ = [
    "PIPE_BUFFER",
    "PipeListener",
    "connect",
    "current_user_sid",
    "peer_credentials",
    "peer_executable",
    "security_attributes",
]

log = logging.getLogger("daemoneye_eventbus.broker")

#: Bytes Windows reserves for each direction of a pipe instance (advisory).
PIPE_BUFFER: Final = 64 * 1024
#: Seconds before trying again when no new pipe instance could be created.
RETRY_DELAY: Final = 1.0

_OPEN_MODE: Final = win32pipe.PIPE_ACCESS_DUPLEX | win32file.FILE_FLAG_OVERLAPPED
_PIPE_MODE: Final = (
    win32pipe.PIPE_TYPE_BYTE
    | win32pipe.PIPE_READMODE_BYTE
    | win32pipe.PIPE_WAIT
    | win32pipe.PIPE_REJECT_REMOTE_CLIENTS
)
_NEEDS_PROACTOR: Final = (
    "named pipes need asyncio's ProactorEventLoop (the default event loop on Windows)"
)

AcceptPipe = Callable[[windows_utils.PipeHandle], asyncio.Future[Any]]
MakeTransport = Callable[[windows_utils.PipeHandle, asyncio.Protocol, dict[str, Any]], object]


def _asyncio_pipe_internals(loop: asyncio.AbstractEventLoop) -> tuple[AcceptPipe, MakeTransport]:
    """The two asyncio internals this transport needs, and the only place that names them.

    asyncio has no public API to serve pipe instances created by the caller:
    ``ProactorEventLoop.start_serving_pipe`` creates its own, with the default
    security descriptor and without ``PIPE_REJECT_REMOTE_CLIENTS``. It serves
    them with these two calls (CPython ``Lib/asyncio/windows_events.py``,
    the same since Python 3.4), which this transport makes with its own
    instances: ``loop._proactor.accept_pipe(pipe)``, an overlapped
    ``ConnectNamedPipe`` on the loop's completion port whose future gives the
    connected pipe, and ``loop._make_duplex_pipe_transport(pipe, protocol,
    extra=...)``, the stream transport over a connected instance (the one
    ``create_pipe_connection`` gives clients).
    """
    internals: Any = loop
    proactor: Any = internals._proactor

    def accept(pipe: windows_utils.PipeHandle) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = proactor.accept_pipe(pipe)
        return future

    def transport(
        pipe: windows_utils.PipeHandle, protocol: asyncio.Protocol, extra: dict[str, Any]
    ) -> object:
        made: object = internals._make_duplex_pipe_transport(pipe, protocol, extra=extra)
        return made

    return accept, transport


def _detach(handle: object) -> int:
    """The raw value of a pywin32 handle, which then no longer closes it."""
    # pywin32 returns PyHANDLE objects (its stubs say int); Detach() hands the
    # handle over, so that closing it is the PipeHandle's job alone.
    detach = getattr(handle, "Detach", None)
    raw: Any = detach() if detach is not None else handle
    return int(raw)


def security_attributes(sddl: str) -> Any:
    """SECURITY_ATTRIBUTES holding the security descriptor ``sddl`` (not inheritable)."""
    try:
        descriptor = win32security.ConvertStringSecurityDescriptorToSecurityDescriptor(
            sddl, win32security.SDDL_REVISION_1
        )
    except pywintypes.error as exc:
        raise BrokerError(
            f"Windows refuses the pipe security descriptor {sddl!r}: {exc.strerror}"
        ) from None
    attributes = pywintypes.SECURITY_ATTRIBUTES()
    attributes.SECURITY_DESCRIPTOR = descriptor
    attributes.bInheritHandle = False
    return attributes


def _token_user_sid(token: int) -> str:
    user = win32security.GetTokenInformation(token, win32security.TokenUser)
    return win32security.ConvertSidToStringSid(user[0])


def _token_group_sids(token: int) -> frozenset[str]:
    groups = win32security.GetTokenInformation(token, win32security.TokenGroups)
    return pipes.effective_group_sids(
        (win32security.ConvertSidToStringSid(sid), int(attributes)) for sid, attributes in groups
    )


def current_user_sid() -> str:
    """The user SID of this process's token (the broker's own user)."""
    token = win32security.OpenProcessToken(win32api.GetCurrentProcess(), win32security.TOKEN_QUERY)
    try:
        return _token_user_sid(token)
    finally:
        win32api.CloseHandle(token)


def peer_credentials(pipe: int) -> PeerCredentials | None:
    """Who is at the client end of the connected pipe instance ``pipe``.

    The client process's id comes from the kernel; its token gives the user
    SID and the groups that count. None when the process cannot be opened or
    its token read (a broker that is not LocalSystem or an administrator may
    not read the tokens of other users' processes).
    """
    try:
        pid = int(win32pipe.GetNamedPipeClientProcessId(pipe))
        process = win32api.OpenProcess(win32con.PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
    except pywintypes.error:
        return None
    try:
        token = win32security.OpenProcessToken(process, win32security.TOKEN_QUERY)
        try:
            sid = _token_user_sid(token)
            groups = _token_group_sids(token)
        finally:
            win32api.CloseHandle(token)
    except pywintypes.error:
        return None
    finally:
        win32api.CloseHandle(process)
    return PeerCredentials(pid, -1, -1, sid=sid, group_sids=groups)


# pywin32 does not wrap QueryFullProcessImageNameW (GetModuleFileNameEx, which
# it does, needs PROCESS_VM_READ and fails on protected processes).
_kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
_query_image_name = _kernel32.QueryFullProcessImageNameW
_query_image_name.argtypes = (
    wintypes.HANDLE,
    wintypes.DWORD,
    wintypes.LPWSTR,
    ctypes.POINTER(wintypes.DWORD),
)
_query_image_name.restype = wintypes.BOOL
_MAX_PATH_CHARS: Final = 32768


def peer_executable(pid: int) -> str | None:
    """The full path of process ``pid``'s executable; None if it cannot be read."""
    try:
        process = win32api.OpenProcess(win32con.PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
    except pywintypes.error:
        return None
    try:
        size = wintypes.DWORD(_MAX_PATH_CHARS)
        buffer = ctypes.create_unicode_buffer(_MAX_PATH_CHARS)
        if not _query_image_name(int(process), 0, buffer, ctypes.byref(size)):
            return None
        return buffer.value[: size.value]
    finally:
        win32api.CloseHandle(process)


class PipeListener(Listener):
    """A broker's named pipe: one listening instance at a time, each connected
    instance handed to asyncio as a stream transport."""

    def __init__(
        self, name: str, *, sddl: str | None = None, send_buffer: int | None = None
    ) -> None:
        try:
            self.address = pipes.check_pipe_name(name)
            self.sddl = None if sddl is None else pipes.check_sddl(sddl)
        except ValueError as exc:
            raise BrokerError(str(exc)) from None
        self.out_buffer = send_buffer or PIPE_BUFFER
        self._factory: ProtocolFactory | None = None
        self._security: Any = None
        self._accept: AcceptPipe | None = None
        self._make_transport: MakeTransport | None = None
        #: The unconnected instance clients connect to next.
        self._waiting: windows_utils.PipeHandle | None = None
        #: The pending ConnectNamedPipe on it, once serving.
        self._accepting: asyncio.Future[Any] | None = None
        #: Instances that failed, closed once a successor exists (see _listen).
        self._failed: list[windows_utils.PipeHandle] = []
        self._retry: asyncio.TimerHandle | None = None
        self._serving = False
        self._closed = False

    def _instance(self, *, first: bool) -> windows_utils.PipeHandle:
        """A new instance of the pipe, with the security descriptor, rejecting remote clients."""
        mode = _OPEN_MODE | (win32pipe.FILE_FLAG_FIRST_PIPE_INSTANCE if first else 0)
        try:
            handle = win32pipe.CreateNamedPipe(
                self.address,
                mode,
                _PIPE_MODE,
                win32pipe.PIPE_UNLIMITED_INSTANCES,
                self.out_buffer,
                PIPE_BUFFER,
                0,
                self._security,
            )
        except pywintypes.error as exc:
            raise pipes.create_error(exc.winerror, self.address, first=first) from None
        return windows_utils.PipeHandle(_detach(handle))

    async def start(self, factory: ProtocolFactory, *, serve: bool = True) -> None:
        if self._factory is not None:
            raise BrokerError(f"already listening on {self.address}")
        loop = asyncio.get_running_loop()
        if not isinstance(loop, asyncio.ProactorEventLoop):
            raise BrokerError(_NEEDS_PROACTOR)
        self._accept, self._make_transport = _asyncio_pipe_internals(loop)
        try:
            sddl = self.sddl or pipes.default_sddl(current_user_sid())
        except pywintypes.error as exc:
            raise BrokerError(f"cannot read this process's user SID: {exc.strerror}") from None
        self._security = security_attributes(sddl)
        # Peers may connect to this first instance at once; it is accepted on serve().
        self._waiting = self._instance(first=True)
        self._factory = factory
        if serve:
            await self.serve()

    async def serve(self) -> None:
        if self._factory is None:
            raise BrokerError(f"not listening on {self.address}: start() first")
        if not self._serving and not self._closed:
            self._serving = True
            self._listen()

    def _listen(self) -> None:
        """Wait for a client on the unconnected instance, creating one if needed.

        An instance that failed is closed only once its successor exists, so
        that the name is never left without an instance of this broker, which
        another process could then claim.
        """
        self._retry = None
        if self._closed or self._accept is None:
            return
        if self._waiting is None:
            try:
                self._waiting = self._instance(first=False)
            except BrokerError as exc:
                self._listen_later(exc)
                return
        self._close_failed()
        pipe = self._waiting
        try:
            self._accepting = self._accept(pipe)
        except OSError as exc:  # ConnectNamedPipe failed on this instance
            self._waiting = None
            self._failed.append(pipe)
            self._listen_later(exc)
            return
        self._accepting.add_done_callback(functools.partial(self._connected, pipe))

    def _listen_later(self, exc: Exception) -> None:
        if isinstance(exc, BrokenPipeError):  # a client that left before it was accepted
            log.debug("pipe client of %s gone before accept: %s", self.address, exc)
            delay = 0.0
        else:  # out of resources, most likely: nobody can connect until this works
            log.error("cannot listen on %s (again in %g s): %s", self.address, RETRY_DELAY, exc)
            delay = RETRY_DELAY
        self._retry = asyncio.get_running_loop().call_later(delay, self._listen)

    def _close_failed(self) -> None:
        while self._failed:
            self._failed.pop().close()

    def _connected(self, pipe: windows_utils.PipeHandle, done: asyncio.Future[Any]) -> None:
        """A client connected to ``pipe`` (or the wait ended): serve it, listen again."""
        if self._waiting is pipe:
            self._waiting = None
        self._accepting = None
        if self._closed or done.cancelled():
            pipe.close()
            return
        try:
            done.result()
        except Exception as exc:
            if not isinstance(exc, OSError):
                log.error("accepting on %s failed: %r", self.address, exc)
            self._failed.append(pipe)
            self._listen()
            return
        self._listen()  # the next instance first, so that the next client finds one
        self._hand_over(pipe)

    def _hand_over(self, pipe: windows_utils.PipeHandle) -> None:
        """Make ``pipe`` a stream transport served by a new session protocol."""
        assert self._factory is not None
        assert self._make_transport is not None
        try:
            self._make_transport(pipe, self._factory(), {"addr": self.address})
        except Exception:
            log.exception("cannot serve a connection on %s", self.address)
            pipe.close()

    def chown(self, uid: int, gid: int) -> None:
        raise BrokerError(
            "a named pipe has no owner to give away: its security descriptor says who may "
            "connect (pipe_sddl); dropping to another user is for Unix sockets"
        )

    def accept(self, transport: asyncio.BaseTransport) -> PeerCredentials | None:
        pipe = transport.get_extra_info("pipe")
        if not isinstance(pipe, windows_utils.PipeHandle):
            return None
        try:
            handle = pipe.fileno()
        except ValueError:  # closed already
            return None
        return peer_credentials(handle)

    def executable(self, peer: PeerCredentials) -> str | None:
        return peer_executable(peer.pid)

    def close(self) -> None:
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._accepting is not None:
            self._accepting.cancel()  # cancels the pending ConnectNamedPipe
            self._accepting = None
        if self._waiting is not None:
            self._waiting.close()
            self._waiting = None
        self._close_failed()

    async def wait_closed(self) -> None:
        # Connected instances belong to their transports; the listening one is
        # closed by close(): nothing is left to wait for.
        return


async def connect(name: str, factory: ProtocolFactory) -> asyncio.BaseTransport:
    """Connect to the broker serving the pipe ``name``.

    Raises ``FileNotFoundError`` when no broker serves it and
    ``PermissionError`` when its security descriptor does not let this user in.
    """
    pipes.check_pipe_name(name)
    loop = asyncio.get_running_loop()
    if not isinstance(loop, asyncio.ProactorEventLoop):
        raise BrokerError(_NEEDS_PROACTOR)
    # typeshed narrows the factory to StreamReaderProtocol; any protocol works.
    any_factory: Any = factory
    transport, _ = await loop.create_pipe_connection(any_factory, name)
    return transport
