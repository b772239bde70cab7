"""A client's connection: lifecycle and reconnect, and the frames it receives.

:class:`ClientConnection` opens the transport, completes the handshake,
dispatches what the broker sends (deliveries to subscriptions, answers to
pending requests, errors, heartbeats), and reconnects with back-off when
asked to. :class:`~daemoneye_eventbus.client.core.Client` adds the public API
(publish, subscribe, requests) on top.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

from daemoneye.eventbus.v1 import frames_pb2
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode, Frame
from daemoneye_eventbus.client.pump import ClientPump
from daemoneye_eventbus.client.requests import PendingRequests, RequestKey, RequestKind
from daemoneye_eventbus.client.rpc import ClientRpc
from daemoneye_eventbus.client.writer import PublishWriter
from daemoneye_eventbus.delivery import Credits
from daemoneye_eventbus.errors import (
    BrokenResourceError,
    ClosedResourceError,
    ConnectionClosed,
    EventBusError,
    LimitExceeded,
    RequestTimeout,
)
from daemoneye_eventbus.frames import HANDSHAKE_MAX_FRAME_BYTES
from daemoneye_eventbus.protocol import (
    PROTOCOL_VERSION,
    Connection,
    Role,
    State,
    build_publish,
    error_from_frame,
)
from daemoneye_eventbus.registry_runtime import Publication
from daemoneye_eventbus.subscription import Subscription
from daemoneye_eventbus.transports import DEFAULT_ADDRESS
from daemoneye_eventbus.transports import connect as transport_connect

__all__ = ["ClientConnection", "hello_frame"]

log = logging.getLogger("daemoneye_eventbus.client")

_SUBSCRIBE = RequestKind.SUBSCRIBE
_UNSUBSCRIBE = RequestKind.UNSUBSCRIBE


class ClientConnection:
    """A client's connection to a broker: lifecycle, reconnect, what it receives
    (the :class:`~daemoneye_eventbus.client.Client` says how to use it)."""

    def __init__(
        self,
        path: str = DEFAULT_ADDRESS,
        *,
        name: str = "daemoneye-eventbus-client",
        component: str = "",
        connect_timeout: float = 5.0,
        request_timeout: float = 5.0,
        max_pending: int = 10_000,
        max_buffer_bytes: int = 8 * 1024 * 1024,
        reconnect: bool = False,
        reconnect_delay: float = 0.1,
        reconnect_max_delay: float = 5.0,
        last_will: Publication[Any] | None = None,
    ) -> None:
        self.path = path
        self.name = name
        self.component = component
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.max_pending = max_pending
        self.max_buffer_bytes = max_buffer_bytes
        self.reconnect = reconnect
        self.reconnect_delay = reconnect_delay
        self.reconnect_max_delay = reconnect_max_delay
        #: Published by the broker for this client if a connection ends without a goodbye.
        self.last_will = last_will
        hello_frame(name, component, last_will)  # a will too large fails here, not at connect
        self.session_id = ""
        self.limits = frames_pb2.Limits()
        #: Called with the typed error of a refused publish (else it is logged as a warning).
        self.on_error: Callable[[EventBusError], None] | None = None
        #: The last non-fatal error the broker sent.
        self.last_error: EventBusError | None = None
        self._writer = PublishWriter()
        self._conn = self._writer.conn
        self._pump: ClientPump | None = None
        self._welcome: asyncio.Future[frames_pb2.Welcome] | None = None
        self._requests = PendingRequests()
        self._subs: dict[int, Subscription[Any]] = {}
        self._ids = itertools.count(1)
        self._nonces = itertools.count(1)
        self._closing = False
        self._closed_error: BaseException | None = None
        self._reconnector: asyncio.Task[None] | None = None
        self._entered = False
        self._refused = 0
        self._reconnects = 0
        self._credits = Credits(self._writer.grant)  # reads of credit-based subscriptions
        self._rpc = ClientRpc(self, self._writer, self._requests, self._ids, self._check_open)

    # -- connection -------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self._conn.state is State.OPEN and not self._closing

    async def connect(self) -> None:
        """Open the connection and complete the handshake."""
        loop = asyncio.get_running_loop()
        pump = ClientPump(self._data_received, self._eof_received, self._connection_lost)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await transport_connect(self.path, lambda: pump)
                self._pump = pump
                self._conn = Connection(Role.CLIENT)
                self._writer.attach(self._conn, pump)
                self._closed_error = None
                self._welcome = loop.create_future()
                self._conn.send(hello_frame(self.name, self.component, self.last_will))
                self._writer.write_now()
                welcome = await self._welcome
        except TimeoutError:
            pump.abort()
            raise RequestTimeout(
                f"no handshake with {self.path} within {self.connect_timeout} s"
            ) from None
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise BrokenResourceError(f"no broker at {self.path}: {exc.strerror}") from exc
        self.session_id = welcome.session_id
        self.limits = welcome.limits
        self._rpc.routed = welcome.requests  # the broker routes requests
        self._conn.max_frame_bytes = welcome.limits.max_frame_bytes or self._conn.max_frame_bytes
        if welcome.batches:
            self._writer.enable_batches(
                self._conn.max_frame_bytes, welcome.limits.max_queue_messages
            )

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError("Client is not re-entrant")
        self._entered = True
        try:
            if not self.is_connected:
                await self.connect()
        except BaseException:
            self._entered = False
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.close()
        finally:
            self._entered = False

    async def close(self) -> None:
        """Say goodbye, flush what is pending and close (idempotent)."""
        self._closing = True
        if self._reconnector is not None:
            self._reconnector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnector
            self._reconnector = None
        pump = self._pump
        if pump is None or pump.transport is None:
            self._finish(ClosedResourceError("client closed"))
            return
        # One output buffer: the goodbye goes out after everything published before.
        if self._conn.state is State.OPEN:
            self._writer.seal()
            self._conn.send(Frame(goodbye=frames_pb2.Goodbye(reason="client closing")))
        self._writer.write_now()
        pump.transport.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.request_timeout):
                await pump.lost
        pump.abort()  # the broker did not take the rest in time
        self._finish(ClosedResourceError("client closed"))

    def _finish(self, error: BaseException) -> None:
        """Fail every waiter and end every subscription."""
        self._closed_error = error
        if self._welcome is not None and not self._welcome.done():
            self._welcome.set_exception(error)
        self._requests.fail_all(error)
        self._rpc.connection_lost(error, not self.reconnect or self._closing)
        if not self.reconnect or self._closing:
            for sub in self._subs.values():
                sub.end(None if isinstance(error, ClosedResourceError) else error)
            self._subs.clear()

    def _eof_received(self) -> None:
        self._conn.receive_eof()

    def _connection_lost(self, exc: Exception | None) -> None:
        self._conn.close()
        error = self._closed_error
        if not isinstance(error, EventBusError):
            error = BrokenResourceError(
                f"connection to {self.path} lost" + (f": {exc}" if exc else "")
            )
        if self._closing:
            return
        self._finish(error)
        if self.reconnect and self.session_id:
            self._reconnector = asyncio.get_running_loop().create_task(
                self._reconnect_loop(), name=f"eventbus[{self.name}].reconnect"
            )

    async def _reconnect_loop(self) -> None:
        delay = self.reconnect_delay
        while not self._closing:
            await asyncio.sleep(delay)
            try:
                await self.connect()
            except (ConnectionClosed, RequestTimeout, OSError) as exc:
                log.debug("reconnect to %s failed: %s", self.path, exc)
                delay = min(delay * 2, self.reconnect_max_delay)
                continue
            self._reconnects += 1
            await self._resubscribe()
            log.info("reconnected to %s (session %s)", self.path, self.session_id)
            return

    def _publishing(self) -> ClientPump:
        """The pump to publish through; raises if the client cannot publish."""
        if self._conn.state is not State.OPEN or self._closing:
            self._check_open()  # raises
        pump = self._pump
        assert pump is not None
        return pump

    def _check_open(self) -> None:
        if self._conn.state is not State.OPEN or self._closing:
            if self._closed_error is not None:
                closed = ClosedResourceError if self._closing else BrokenResourceError
                raise closed(str(self._closed_error))
            raise ClosedResourceError("client is not connected")

    # -- receiving ----------------------------------------------------------------

    def _data_received(self, data: bytes) -> None:
        conn = self._conn
        conn.receive_data(data)
        for frame in conn.events_received():
            kind = frame.WhichOneof("kind")
            if kind == "deliver_batch":
                deliver_batch = frame.deliver_batch
                sub = self._subs.get(deliver_batch.subscription_id)
                if sub is not None:
                    sub.deliver_frame_batch(deliver_batch)
            elif kind == "deliver":
                deliver = frame.deliver
                sub = self._subs.get(deliver.subscription_id)
                if sub is not None:
                    sub.deliver_frame(deliver)
            elif kind == "ping":
                if not conn.close_expected:  # no answers once closing [protocol §8]
                    conn.send(Frame(pong=frames_pb2.Pong(nonce=frame.ping.nonce)))
            elif kind == "pong":
                self._requests.resolve(RequestKey(RequestKind.PING, frame.pong.nonce), None)
            elif kind == "subscribe_ack":
                ack = frame.subscribe_ack
                self._requests.resolve(RequestKey(_SUBSCRIBE, ack.subscription_id), ack)
            elif kind == "unsubscribe_ack":
                sid = frame.unsubscribe_ack.subscription_id
                self._requests.resolve(RequestKey(_UNSUBSCRIBE, sid), None)
            elif kind == "reply_deliver":
                reply = frame.reply_deliver
                self._requests.resolve(RequestKey(RequestKind.REQUEST, reply.request_id), reply)
            elif kind == "request_deliver":
                self._rpc.received(frame.request_deliver)
            elif kind == "stats_response":
                stats = frame.stats_response
                self._requests.resolve(RequestKey(RequestKind.STATS, stats.request_id), stats)
            elif kind == "welcome":
                if self._welcome is not None and not self._welcome.done():
                    self._welcome.set_result(frame.welcome)
            elif kind == "error":
                self._error_received(frame.error)
            elif kind == "goodbye":
                self._closed_error = BrokenResourceError(
                    f"broker said goodbye: {frame.goodbye.reason}"
                )
        if conn.error is not None:
            self._closed_error = conn.error
            log.warning("protocol violation by the broker: %s", conn.error)
        if conn.buffered_bytes:  # pongs, or the fatal Error of a violation
            self._writer.write_now()
        pump = self._pump
        if conn.close_expected and pump is not None and pump.transport:
            pump.transport.close()

    def _error_received(self, error: frames_pb2.Error) -> None:
        exc = error_from_frame(error)
        if error.fatal:
            self._closed_error = BrokenResourceError(str(exc))
            self._closed_error.__cause__ = exc
            if self._welcome is not None and not self._welcome.done():
                self._welcome.set_exception(exc)
            return
        if error.request_id:  # its request() raises it (unless it has given up already)
            self._requests.reject(RequestKey(RequestKind.REQUEST, error.request_id), exc)
            return
        sid = error.subscription_id
        if sid and (
            self._requests.reject(RequestKey(_SUBSCRIBE, sid), exc)
            or self._requests.reject(RequestKey(_UNSUBSCRIBE, sid), exc)
        ):
            return
        self._refused += 1
        self.last_error = exc
        if self.on_error is not None:
            self.on_error(exc)  # the application reports it: not logged a second time
        else:
            log.warning("broker refused a request: %s", exc)

    async def _resubscribe(self) -> None:
        raise NotImplementedError("Client makes its subscriptions again on a new connection")


def hello_frame(name: str, component: str, last_will: Publication[Any] | None = None) -> Frame:
    """The client's ``Hello`` [protocol §3], with ``last_will`` (a topic's call,
    ``topic(message, correlation=…)``) as ``Hello.last_will``.

    Raises :class:`LimitExceeded` when the frame would not fit the handshake's
    frame limit (4096 bytes), which a large will can make it exceed.
    """
    hello = frames_pb2.Hello(
        protocol_version=PROTOCOL_VERSION,
        client_name=name,
        component=component,
        accept_batches=True,
        credit=True,
    )
    if last_will is not None:
        hello.last_will.CopyFrom(build_publish(*last_will))
    frame = Frame(hello=hello)
    if frame.ByteSize() > HANDSHAKE_MAX_FRAME_BYTES:
        raise LimitExceeded(
            f"the Hello with this last will is {frame.ByteSize()} bytes; the handshake "
            f"allows {HANDSHAKE_MAX_FRAME_BYTES}",
            code=ErrorCode.ERROR_CODE_FRAME_TOO_LARGE,
        )
    return frame
