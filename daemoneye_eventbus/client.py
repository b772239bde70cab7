"""The asyncio client: connect, publish, subscribe, request statistics.

``async with await connect(path) as client:`` or ``async with Client(path) as
client:`` opens a connection and completes the handshake. Publishing is typed
by the registry: ``await client.publish(registry.EVENTS_PROCESS_LIFECYCLE,
ProcessEvent(...))`` is checked by mypy. Subscriptions are async iterators and
async context managers::

    async with await client.subscribe("events.process.#") as sub:
        async for event in sub:
            print(event.topic, event.message())

Writes are coalesced: publishing many small events costs one system call per
batch, not per event. The client answers the broker's heartbeats on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Generic, Self, TypeVar, cast, overload

from google.protobuf.message import Message

from daemoneye.eventbus.v1 import frames_pb2
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationFilter, CorrelationMetadata
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode, Frame
from daemoneye.eventbus.v1.registry import Topic
from daemoneye_eventbus.correlation import validate_metadata
from daemoneye_eventbus.delivery import EventQueue, ReceivedEvent
from daemoneye_eventbus.errors import (
    BrokenResourceError,
    ClosedResourceError,
    ConnectionClosed,
    EventBusError,
    LimitExceeded,
    PayloadTypeMismatch,
    RequestTimeout,
)
from daemoneye_eventbus.protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    DELIVER_BATCH_OVERHEAD,
    DELIVER_OVERHEAD,
    PROTOCOL_VERSION,
    Connection,
    PublishBatcher,
    Role,
    State,
    encode_publish,
    error_for_code,
    publish_header,
)
from daemoneye_eventbus.topics import validate_filter, validate_topic
from daemoneye_eventbus.transport import DEFAULT_SOCKET_PATH

__all__ = [
    "Client",
    "ClientStatistics",
    "Subscription",
    "build_publish",
    "connect",
    "error_from_frame",
]

log = logging.getLogger("daemoneye_eventbus.client")

P = TypeVar("P", bound=Message)

# Pending output is written at once past this size, otherwise at the end of
# the current loop iteration, so that bursts of publishes share one write.
_FLUSH_BYTES: Final = 64 * 1024
_WRITE_HIGH: Final = 1024 * 1024
# Consecutive publishes on one topic travel as one PublishBatch of up to this
# many bytes, when the broker accepts batches [protocol §5].
_BATCH_BYTES: Final = 64 * 1024
# ... and at most the broker's max_queue_messages events (this many if it
# announced none).
_BATCH_EVENTS: Final = 1000
# Encoded topic fields kept per topic name; cleared when it grows past this.
_HEADER_CACHE_SIZE: Final = 1024


def build_publish(
    topic: Topic[P], message: P, correlation: CorrelationMetadata | None = None
) -> frames_pb2.Publish:
    """The ``Publish`` frame body for ``message`` on ``topic``.

    ``message`` must be of the topic's payload type: mypy checks it through
    the registry, and this function checks it again at run time.
    """
    if type(message) is not topic.payload_type:
        raise PayloadTypeMismatch(
            f"topic {topic.name!r} carries {topic.payload_name}, "
            f"not {type(message).DESCRIPTOR.full_name}"
        )
    publish = frames_pb2.Publish(
        topic=topic.name,
        payload_type=topic.payload_name,
        payload=message.SerializeToString(),
    )
    if correlation is not None:
        validate_metadata(correlation)
        publish.correlation.CopyFrom(correlation)
    return publish


@dataclass(frozen=True, slots=True)
class ClientStatistics:
    """A snapshot of a client's figures."""

    published: int
    received: int
    #: Events dropped by this client because a subscription's queue was full.
    dropped: int
    #: Events the broker dropped, as seen from sequence gaps.
    missed: int
    #: Requests the broker refused (non-fatal ``Error`` frames).
    refused: int
    subscriptions: int
    reconnects: int


def error_from_frame(error: frames_pb2.Error) -> EventBusError:
    """The typed exception for an ``Error`` frame from the broker."""
    name = ErrorCode.Name(error.code) if error.code in ErrorCode.values() else str(error.code)
    message = f"{error.message} ({name})"
    return error_for_code(error.code, message)


class Subscription(Generic[P]):
    """Events matching one filter: an async iterator and async context manager.

    Received events wait in an :class:`EventQueue` bounded by ``max_pending``;
    when the application does not keep up, new events are dropped and counted
    in :attr:`dropped`. Events the broker dropped show as gaps in
    :attr:`ReceivedEvent.sequence` and are counted in :attr:`missed`. Several
    subscriptions may share one queue (pass ``queue=`` to
    :meth:`Client.subscribe`).
    """

    def __init__(
        self,
        client: Client,
        subscription_id: int,
        filter: str,
        correlation_filter: CorrelationFilter | None,
        include_control: bool,
        payload_class: type[P] | None,
        queue: EventQueue[P],
    ) -> None:
        self.client = client
        self.subscription_id = subscription_id
        self.filter = filter
        self.correlation_filter = correlation_filter
        self.include_control = include_control
        self.queue = queue
        self._cls = payload_class
        self._active = True

    @property
    def active(self) -> bool:
        return self._active

    @property
    def dropped(self) -> int:
        """Events dropped here because the application did not keep up."""
        return self.queue.dropped

    @property
    def missed(self) -> int:
        """Events the broker dropped, from sequence gaps."""
        return self.queue.missed

    @property
    def received(self) -> int:
        return self.queue.received

    def _put(
        self,
        publish: frames_pb2.Publish | frames_pb2.PublishBatch,
        payloads: Sequence[bytes],
        first_sequence: int,
    ) -> None:
        """Queue the events of one Deliver or DeliverBatch, numbered from ``first_sequence``."""
        self.queue.put_payloads(
            publish.topic,
            publish.payload_type,
            payloads,
            publish.correlation if publish.HasField("correlation") else None,
            first_sequence,
            self.subscription_id,
            self._cls,
        )

    def _end(self, error: BaseException | None) -> None:
        self._active = False
        self.queue.close(error)

    def get_nowait(self) -> ReceivedEvent[P] | None:
        """The next queued event, or None."""
        return self.queue.get_nowait()

    async def get(self, timeout: float | None = None) -> ReceivedEvent[P]:
        """The next event; raises :class:`ConnectionClosed` once none can come."""
        return await self.queue.get(timeout)

    def __aiter__(self) -> AsyncIterator[ReceivedEvent[P]]:
        return aiter(self.queue)

    async def unsubscribe(self) -> None:
        """End the subscription (idempotent)."""
        if self._active:
            await self.client.unsubscribe(self)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self.unsubscribe()


class _ClientProtocol(asyncio.Protocol):
    """The asyncio pump between a socket and the client's Connection."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._drain: asyncio.Future[None] | None = None
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's do not subclass asyncio.Transport.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=_WRITE_HIGH)

    def data_received(self, data: bytes) -> None:
        self.client._data_received(data)

    def eof_received(self) -> bool | None:
        self.client._conn.receive_eof()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._connection_lost(exc)
        if not self.lost.done():
            self.lost.set_result(None)
        self.resume_writing()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    async def drain(self) -> None:
        if self.paused:
            if self._drain is None:
                self._drain = asyncio.get_running_loop().create_future()
            await self._drain


class Client:
    """A connection to a broker.

    Not re-entrant: one ``async with`` at a time. With ``reconnect=True`` the
    client reconnects after the broker goes away (with back-off) and
    re-subscribes; events published while disconnected raise
    :class:`ConnectionClosed`.
    """

    def __init__(
        self,
        path: str = DEFAULT_SOCKET_PATH,
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
        self.session_id = ""
        self.limits = frames_pb2.Limits()
        #: Called with the typed error when the broker refuses a publish.
        self.on_error: Callable[[EventBusError], None] | None = None
        self._conn = Connection(Role.CLIENT)
        self._protocol: _ClientProtocol | None = None
        self._welcome: asyncio.Future[frames_pb2.Welcome] | None = None
        self._pending: dict[tuple[str, int], asyncio.Future[Any]] = {}
        self._subs: dict[int, Subscription[Any]] = {}
        self._ids = itertools.count(1)
        self._nonces = itertools.count(1)
        #: Encoded Publish fields by topic name (typed) or (topic, payload type) (raw).
        self._headers: dict[object, tuple[bytes, bytes]] = {}
        #: Set once the broker said it accepts batches (in its Welcome).
        self._batcher: PublishBatcher | None = None
        self._flush_handle: asyncio.Handle | None = None
        #: The last loop turn ended with a batch of several events: while such
        #: bursts go on, a turn's first event waits for the rest of the turn.
        self._bursting = False
        self._closing = False
        self._closed_error: BaseException | None = None
        self._reconnector: asyncio.Task[None] | None = None
        self._entered = False
        self._published = 0
        self._refused = 0
        self._reconnects = 0
        #: The last non-fatal error the broker sent.
        self.last_error: EventBusError | None = None

    # -- connection -------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self._conn.state is State.OPEN and not self._closing

    async def connect(self) -> None:
        """Open the connection and complete the handshake."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, protocol = await loop.create_unix_connection(
                    lambda: _ClientProtocol(self), self.path
                )
                self._protocol = protocol
                self._conn = Connection(Role.CLIENT)
                self._batcher = None
                self._closed_error = None
                self._welcome = loop.create_future()
                hello = frames_pb2.Hello(
                    protocol_version=PROTOCOL_VERSION,
                    client_name=self.name,
                    component=self.component,
                    accept_batches=True,
                )
                self._conn.send(Frame(hello=hello))
                self._write_now()
                welcome = await self._welcome
        except TimeoutError:
            self._abort()
            raise RequestTimeout(
                f"no handshake with {self.path} within {self.connect_timeout} s"
            ) from None
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise BrokenResourceError(f"no broker at {self.path}: {exc.strerror}") from exc
        self.session_id = welcome.session_id
        self.limits = welcome.limits
        self._conn.max_frame_bytes = welcome.limits.max_frame_bytes or self._conn.max_frame_bytes
        if welcome.batches:
            self._batcher = PublishBatcher(
                self._conn.max_frame_bytes - DELIVER_BATCH_OVERHEAD,
                _BATCH_BYTES,
                welcome.limits.max_queue_messages or _BATCH_EVENTS,
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
        protocol = self._protocol
        if protocol is None or protocol.transport is None:
            self._finish(ClosedResourceError("client closed"))
            return
        # One output buffer: the goodbye goes out after everything published before.
        if self._conn.state is State.OPEN:
            self._seal()
            self._conn.send(Frame(goodbye=frames_pb2.Goodbye(reason="client closing")))
        self._write_now()
        protocol.transport.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.request_timeout):
                await protocol.lost
        self._abort()  # the broker did not take the rest in time
        self._finish(ClosedResourceError("client closed"))

    def _abort(self) -> None:
        protocol = self._protocol
        # A transport that has closed (asyncio's, once its buffer drained) has
        # no loop left to abort with.
        if protocol is not None and protocol.transport is not None and not protocol.lost.done():
            protocol.transport.abort()

    def _finish(self, error: BaseException) -> None:
        """Fail every waiter and end every subscription."""
        self._closed_error = error
        if self._welcome is not None and not self._welcome.done():
            self._welcome.set_exception(error)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(error)
        self._pending.clear()
        if not self.reconnect or self._closing:
            for sub in self._subs.values():
                sub._end(None if isinstance(error, ClosedResourceError) else error)
            self._subs.clear()

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
            for sub in list(self._subs.values()):
                sub.queue.restart_sequence(sub.subscription_id)
                try:
                    await self._request_subscribe(sub)
                except EventBusError as exc:
                    self._subs.pop(sub.subscription_id, None)
                    sub._end(exc)
            log.info("reconnected to %s (session %s)", self.path, self.session_id)
            return

    def _publishing(self) -> _ClientProtocol:
        """The protocol to publish through; raises if the client cannot publish."""
        if self._conn.state is not State.OPEN or self._closing:
            self._check_open()  # raises
        protocol = self._protocol
        assert protocol is not None
        return protocol

    def _check_open(self) -> None:
        if self._conn.state is not State.OPEN or self._closing:
            if self._closed_error is not None:
                raise (
                    ClosedResourceError(str(self._closed_error))
                    if self._closing
                    else BrokenResourceError(str(self._closed_error))
                )
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
                    batch = deliver_batch.batch
                    sub._put(batch, batch.payloads, deliver_batch.first_sequence)
            elif kind == "deliver":
                deliver = frame.deliver
                sub = self._subs.get(deliver.subscription_id)
                if sub is not None:
                    publish = deliver.publish
                    sub._put(publish, (publish.payload,), deliver.sequence)
            elif kind == "ping":
                if not conn.close_expected:  # no answers once closing [protocol §8]
                    conn.send(Frame(pong=frames_pb2.Pong(nonce=frame.ping.nonce)))
            elif kind == "pong":
                self._resolve(("pong", frame.pong.nonce), None)
            elif kind == "subscribe_ack":
                self._resolve(("sub", frame.subscribe_ack.subscription_id), None)
            elif kind == "unsubscribe_ack":
                self._resolve(("unsub", frame.unsubscribe_ack.subscription_id), None)
            elif kind == "stats_response":
                self._resolve(("stats", frame.stats_response.request_id), frame.stats_response)
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
            self._write_now()
        if conn.close_expected and self._protocol is not None and self._protocol.transport:
            self._protocol.transport.close()

    def _resolve(self, key: tuple[str, int], value: object) -> None:
        fut = self._pending.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result(value)

    def _error_received(self, error: frames_pb2.Error) -> None:
        exc = error_from_frame(error)
        if error.fatal:
            self._closed_error = BrokenResourceError(str(exc))
            self._closed_error.__cause__ = exc
            if self._welcome is not None and not self._welcome.done():
                self._welcome.set_exception(exc)
            return
        sid = error.subscription_id
        for key in (("sub", sid), ("unsub", sid)):
            fut = self._pending.pop(key, None)
            if sid and fut is not None and not fut.done():
                fut.set_exception(exc)
                return
        self._refused += 1
        self.last_error = exc
        log.warning("broker refused a request: %s", exc)
        if self.on_error is not None:
            self.on_error(exc)

    # -- sending --------------------------------------------------------------------

    def _coalesce(self) -> None:
        """Write what was just queued if nothing was written yet this loop
        turn (unless a burst goes on), or if _FLUSH_BYTES are waiting; what
        follows in the turn is then written at its end.

        So one event in flight is not held back, and a burst shares one write
        per turn or per _FLUSH_BYTES. The open batch holds at most
        _BATCH_BYTES and is sealed into the buffer once it is that full.
        """
        if self._flush_handle is None and self._bursting:
            # In a burst, what a turn queues leaves together at its end.
            self._flush_handle = asyncio.get_running_loop().call_soon(self._write_now)
        elif self._flush_handle is None or self._conn.buffered_bytes >= _FLUSH_BYTES:
            self._write_now()
            self._flush_handle = asyncio.get_running_loop().call_soon(self._write_now)

    def _write_first(self, frame: bytes) -> None:
        """Write ``frame`` at once: the first frame of a loop turn. What follows
        in the turn is written at its end."""
        protocol = self._protocol
        transport = protocol.transport if protocol is not None else None
        if transport is None or transport.is_closing():
            return  # the connection is going: like anything unwritten, lost
        # Nothing waits in the connection's buffer while no write is scheduled
        # (_coalesce writes what is queued at once or at the turn's end), so
        # the frame keeps its place in the stream.
        transport.write(frame)
        self._flush_handle = asyncio.get_running_loop().call_soon(self._write_now)

    def _write_now(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        protocol = self._protocol
        if protocol is None or protocol.transport is None or protocol.transport.is_closing():
            return
        self._bursting = self._seal() > 1
        pending = self._conn.data_to_send()
        if pending:
            protocol.transport.write(pending)

    def _seal(self) -> int:
        """Queue the open batch, so that what is sent next follows it; return its events."""
        if self._batcher is not None and self._conn.state is State.OPEN:
            sealed = self._batcher.seal()
            if sealed is not None:
                self._conn.send_encoded(*sealed)
                return sealed[1]
        return 0

    def _send(self, frame: Frame) -> None:
        self._check_open()
        self._seal()
        # Raises LocalProtocolError for a frame over the broker's limit (a misuse).
        self._conn.send(frame)
        self._coalesce()

    def _queue_publish(
        self, topic: Topic[P], message: P, correlation: CorrelationMetadata | None
    ) -> None:
        """Queue one typed event and see that it is written [protocol §5]."""
        if type(message) is not topic.payload_type:
            build_publish(topic, message, correlation)  # raises the precise error
        name = topic.name
        header = self._headers.get(name)
        if header is None:
            header = self._header(name, name, topic.payload_name)
        self._queue_encoded(header, message.SerializeToString(), correlation)

    def _header(self, key: object, topic: str, payload_type: str) -> tuple[bytes, bytes]:
        """The encoded topic and payload-type fields, computed once per ``key``."""
        if len(self._headers) >= _HEADER_CACHE_SIZE:
            self._headers.clear()
        header = self._headers[key] = publish_header(topic, payload_type)
        return header

    def _queue_encoded(
        self, header: tuple[bytes, bytes], payload: bytes, correlation: CorrelationMetadata | None
    ) -> None:
        """Queue one event (the first of a loop turn alone, the rest of the
        turn in a batch) and see that it is written [protocol §5].

        Frames are built from cached topic fields without protobuf objects.
        """
        corr = None
        if correlation is not None:
            validate_metadata(correlation)
            corr = correlation.SerializeToString()
        conn = self._conn
        batcher = self._batcher
        if batcher is None:  # a broker without batches
            data = encode_publish(header, payload, corr)
            # The Publish message (frame minus its 1-byte tag and two prefixes)
            # must leave room for the Deliver envelope [protocol §5].
            limit = (self.limits.max_frame_bytes or DEFAULT_MAX_FRAME_BYTES) - DELIVER_OVERHEAD
            if len(data) > limit:
                raise LimitExceeded(
                    f"event of about {len(data)} bytes exceeds the limit of {limit} bytes"
                )
            conn.send_encoded(data)
        elif self._flush_handle is None and not self._bursting and not batcher.pending_events:
            # The first event of a loop turn is written at once, alone.
            self._write_first(batcher.single(header, payload, corr))
        else:
            sealed = batcher.add(header, payload, corr)
            if sealed is not None:
                conn.send_encoded(*sealed)
        self._published += 1
        # While a write is scheduled for the end of this turn, there is
        # nothing to do unless the buffer has grown past _FLUSH_BYTES.
        if self._flush_handle is None or conn.buffered_bytes >= _FLUSH_BYTES:
            self._coalesce()

    def publish_nowait(
        self, topic: Topic[P], message: P, *, correlation: CorrelationMetadata | None = None
    ) -> None:
        """Queue one event without waiting.

        Raises :class:`LimitExceeded` when more than ``max_buffer_bytes`` wait
        to be written (the broker is not reading fast enough).
        """
        self._check_open()
        protocol = self._protocol
        assert protocol is not None
        assert protocol.transport is not None
        waiting = self._conn.buffered_bytes + protocol.transport.get_write_buffer_size()
        if self._batcher is not None:
            waiting += self._batcher.pending_bytes
        if waiting > self.max_buffer_bytes:
            raise LimitExceeded(f"more than {self.max_buffer_bytes} bytes wait to be written")
        self._queue_publish(topic, message, correlation)

    async def publish(
        self, topic: Topic[P], message: P, *, correlation: CorrelationMetadata | None = None
    ) -> None:
        """Publish one event, waiting only while the socket is backed up.

        Delivery is at most once: there is no acknowledgement. A refusal by the
        broker (say, access denied) arrives later as a non-fatal error, counted
        in :meth:`statistics` and passed to :attr:`on_error`; :meth:`flush`
        waits until the broker has handled everything published before it.
        """
        protocol = self._publishing()
        if protocol.paused:
            await protocol.drain()
            self._check_open()
        self._queue_publish(topic, message, correlation)

    async def publish_raw(
        self,
        topic: str,
        payload_type: str,
        payload: bytes,
        *,
        correlation: CorrelationMetadata | None = None,
    ) -> None:
        """Publish an already serialized payload on a topic given by name (untyped).

        It travels like :meth:`publish`'s events; the broker checks the topic,
        the payload type and the access rules all the same.
        """
        key = (topic, payload_type)
        header = self._headers.get(key)
        if header is None:
            validate_topic(topic)
            header = self._header(key, topic, payload_type)
        protocol = self._publishing()
        if protocol.paused:
            await protocol.drain()
            self._check_open()
        self._queue_encoded(header, payload, correlation)

    async def _request(self, key: tuple[str, int], frame: Frame) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[key] = fut
        try:
            self._send(frame)
            self._write_now()
            async with asyncio.timeout(self.request_timeout):
                return await fut
        except TimeoutError:
            raise RequestTimeout(
                f"no answer from the broker within {self.request_timeout} s"
            ) from None
        finally:
            self._pending.pop(key, None)

    @overload
    async def subscribe(
        self,
        filter: Topic[P],
        *,
        correlation_filter: CorrelationFilter | None = None,
        include_control: bool = False,
        max_pending: int | None = None,
        queue: EventQueue[P] | None = None,
    ) -> Subscription[P]: ...

    @overload
    async def subscribe(
        self,
        filter: str,
        *,
        correlation_filter: CorrelationFilter | None = None,
        include_control: bool = False,
        max_pending: int | None = None,
        queue: EventQueue[Message] | None = None,
    ) -> Subscription[Message]: ...

    async def subscribe(
        self,
        filter: Topic[Any] | str,
        *,
        correlation_filter: CorrelationFilter | None = None,
        include_control: bool = False,
        max_pending: int | None = None,
        queue: EventQueue[Any] | None = None,
    ) -> Subscription[Any]:
        """Subscribe to a topic or a filter with ``+`` / ``#`` wildcards.

        With a :class:`Topic`, events decode to its payload type. A
        ``correlation_filter`` is applied by the broker, so events it rejects
        never cross the socket. Control topics reach a wildcard filter only
        with ``include_control=True``.
        """
        if isinstance(filter, Topic):
            text, cls = filter.name, filter.payload_type
        else:
            text, cls = filter, None
        validate_filter(
            text,
            max_bytes=self.limits.max_topic_bytes or 255,
            max_levels=self.limits.max_topic_levels or 16,
        )
        sub: Subscription[Any] = Subscription(
            self,
            next(self._ids),
            text,
            correlation_filter,
            include_control,
            cls,
            queue if queue is not None else EventQueue(max_pending or self.max_pending),
        )
        self._subs[sub.subscription_id] = sub
        try:
            await self._request_subscribe(sub)
        except BaseException:
            self._subs.pop(sub.subscription_id, None)
            raise
        return sub

    async def _request_subscribe(self, sub: Subscription[Any]) -> None:
        req = frames_pb2.Subscribe(
            subscription_id=sub.subscription_id,
            filter=sub.filter,
            include_control=sub.include_control,
        )
        if sub.correlation_filter is not None:
            req.correlation_filter.CopyFrom(sub.correlation_filter)
        await self._request(("sub", sub.subscription_id), Frame(subscribe=req))

    async def unsubscribe(self, sub: Subscription[Any]) -> None:
        """End a subscription; events still queued for it are kept for reading."""
        if self._subs.pop(sub.subscription_id, None) is None:
            sub._end(None)
            return
        sub._end(None)
        if self.is_connected:
            frame = Frame(unsubscribe=frames_pb2.Unsubscribe(subscription_id=sub.subscription_id))
            await self._request(("unsub", sub.subscription_id), frame)

    async def flush(self) -> float:
        """Round trip to the broker: when it returns, everything sent before was handled.

        Returns the round-trip time in seconds.
        """
        loop = asyncio.get_running_loop()
        nonce = next(self._nonces)
        start = loop.time()
        await self._request(("pong", nonce), Frame(ping=frames_pb2.Ping(nonce=nonce)))
        return loop.time() - start

    ping = flush

    async def broker_statistics(self) -> frames_pb2.StatsResponse:
        """The broker's statistics."""
        rid = next(self._nonces)
        stats: frames_pb2.StatsResponse = await self._request(
            ("stats", rid), Frame(stats_request=frames_pb2.StatsRequest(request_id=rid))
        )
        return stats

    def statistics(self) -> ClientStatistics:
        """A frozen snapshot of this client's figures."""
        subs = list(self._subs.values())
        queues = {id(s.queue): s.queue for s in subs}.values()
        return ClientStatistics(
            published=self._published,
            received=sum(q.received for q in queues),
            dropped=sum(q.dropped for q in queues),
            missed=sum(q.missed for q in queues),
            refused=self._refused,
            subscriptions=len(subs),
            reconnects=self._reconnects,
        )


async def connect(path: str = DEFAULT_SOCKET_PATH, **kwargs: Any) -> Client:
    """Connect to the broker at ``path``; use the result as an async context manager."""
    client = Client(path, **kwargs)
    await client.connect()
    return client
