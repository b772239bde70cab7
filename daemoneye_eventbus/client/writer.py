"""The client's publish writer: frames built from cached fields, batched, coalesced.

One :class:`PublishWriter` serves a client for its whole life; each new
connection is attached to it. Writes are coalesced [protocol §5]:

* the first event of an event-loop turn goes to the socket at once, alone
  (a batch of one), so a lone event is never held back;
* the events that follow it in the same turn, while they share a topic and a
  correlation, travel as one ``PublishBatch`` frame (up to 64 KiB), sealed
  and written at the end of the turn;
* while events come in bursts (the last turn ended with a batch of several),
  a turn's first event waits for the rest of the turn too: one system call
  per turn.
"""

from __future__ import annotations

import asyncio
from typing import Final, Protocol, TypeVar

from google.protobuf.message import Message

from daemoneye.eventbus.v1 import frames_pb2
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationMetadata
from daemoneye.eventbus.v1.frames_pb2 import Frame
from daemoneye_eventbus.correlation import validate_metadata
from daemoneye_eventbus.errors import LimitExceeded
from daemoneye_eventbus.frames import (
    DEFAULT_MAX_FRAME_BYTES,
    PublishBatcher,
    batch_budget,
    encode_publish,
    event_budget,
    publish_header,
)
from daemoneye_eventbus.protocol import Connection, Role, State, build_publish
from daemoneye_eventbus.registry_runtime import Topic

__all__ = ["BATCH_BYTES", "FLUSH_BYTES", "PublishWriter", "WriteTarget"]

P = TypeVar("P", bound=Message)

#: Pending output is written at once past this size, otherwise at the end of
#: the current loop iteration, so that bursts of publishes share one write.
FLUSH_BYTES: Final = 64 * 1024
#: Consecutive publishes on one topic travel as one PublishBatch of up to this
#: many bytes, when the broker accepts batches [protocol §5].
BATCH_BYTES: Final = 64 * 1024
# ... and at most the broker's max_queue_messages events (this many if it
# announced none).
_BATCH_EVENTS: Final = 1000
# Encoded topic fields kept per topic name; cleared when it grows past this.
_HEADER_CACHE_SIZE: Final = 1024


class WriteTarget(Protocol):
    """Where the writer's bytes go: the connection's asyncio transport, or None."""

    @property
    def transport(self) -> asyncio.WriteTransport | None: ...


class PublishWriter:
    """Encodes, batches and writes what a client sends (see the module docstring)."""

    def __init__(self) -> None:
        self.conn = Connection(Role.CLIENT)
        self.target: WriteTarget | None = None
        #: Set once the broker said it accepts batches (in its Welcome).
        self.batcher: PublishBatcher | None = None
        #: Events queued since the client was made, over every connection.
        self.published = 0
        #: Encoded Publish fields by topic name (typed) or (topic, payload type) (raw).
        self._headers: dict[object, tuple[bytes, bytes]] = {}
        self._flush_handle: asyncio.Handle | None = None
        #: The last loop turn ended with a batch of several events: while such
        #: bursts go on, a turn's first event waits for the rest of the turn.
        self._bursting = False

    def attach(self, conn: Connection, target: WriteTarget) -> None:
        """Write to a new connection from now on (nothing is carried over)."""
        self._cancel_flush()
        self.conn = conn
        self.target = target
        self.batcher = None
        self._bursting = False

    def enable_batches(self, max_frame_bytes: int, max_events: int) -> None:
        """The broker accepts batches of at most ``max_events`` within ``max_frame_bytes``."""
        self.batcher = PublishBatcher(
            batch_budget(max_frame_bytes), BATCH_BYTES, max_events or _BATCH_EVENTS
        )

    def _transport(self) -> asyncio.WriteTransport | None:
        target = self.target
        transport = target.transport if target is not None else None
        if transport is None or transport.is_closing():
            return None
        return transport

    @property
    def waiting_bytes(self) -> int:
        """Bytes queued and not yet taken by the kernel: the open batch, the
        connection's buffer and the transport's."""
        waiting = self.conn.buffered_bytes
        transport = self._transport()
        if transport is not None:
            waiting += transport.get_write_buffer_size()
        if self.batcher is not None:
            waiting += self.batcher.pending_bytes
        return waiting

    # -- writing ----------------------------------------------------------------

    def _cancel_flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None

    def _coalesce(self) -> None:
        """Write what was just queued if nothing was written yet this loop
        turn (unless a burst goes on), or if FLUSH_BYTES are waiting; what
        follows in the turn is then written at its end.

        So one event in flight is not held back, and a burst shares one write
        per turn or per FLUSH_BYTES. The open batch holds at most
        BATCH_BYTES and is sealed into the buffer once it is that full.
        """
        if self._flush_handle is None and self._bursting:
            # In a burst, what a turn queues leaves together at its end.
            self._flush_handle = asyncio.get_running_loop().call_soon(self.write_now)
        elif self._flush_handle is None or self.conn.buffered_bytes >= FLUSH_BYTES:
            self.write_now()
            self._flush_handle = asyncio.get_running_loop().call_soon(self.write_now)

    def _write_first(self, frame: bytes) -> None:
        """Write ``frame`` at once: the first frame of a loop turn. What follows
        in the turn is written at its end."""
        transport = self._transport()
        if transport is None:
            return  # the connection is going: like anything unwritten, lost
        # Nothing waits in the connection's buffer while no write is scheduled
        # (_coalesce writes what is queued at once or at the turn's end), so
        # the frame keeps its place in the stream.
        transport.write(frame)
        self._flush_handle = asyncio.get_running_loop().call_soon(self.write_now)

    def write_now(self) -> None:
        """Seal the open batch and write everything queued."""
        self._cancel_flush()
        transport = self._transport()
        if transport is None:
            return
        self._bursting = self.seal() > 1
        pending = self.conn.data_to_send()
        if pending:
            transport.write(pending)

    def seal(self) -> int:
        """Queue the open batch, so that what is sent next follows it; return its events."""
        if self.batcher is not None and self.conn.state is State.OPEN:
            sealed = self.batcher.seal()
            if sealed is not None:
                self.conn.send_encoded(*sealed)
                return sealed[1]
        return 0

    def grant(self, subscription_id: int, events: int) -> None:
        """Send credit for a credit-based subscription (written at the end of the turn)."""
        if self.conn.state is State.OPEN and not self.conn.close_expected:
            self.send(
                Frame(credit=frames_pb2.Credit(subscription_id=subscription_id, events=events))
            )

    def send(self, frame: Frame) -> None:
        """Queue a control frame after everything published before it."""
        self.seal()
        # Raises LocalProtocolError for a frame over the broker's limit (a misuse).
        self.conn.send(frame)
        self._coalesce()

    # -- publishing -------------------------------------------------------------

    def queue_publish(
        self, topic: Topic[P], message: P, correlation: CorrelationMetadata | None
    ) -> None:
        """Queue one typed event and see that it is written [protocol §5]."""
        if type(message) is not topic.payload_type:
            build_publish(topic, message, correlation)  # raises the precise error
        name = topic.name
        header = self._headers.get(name)
        if header is None:
            header = self.header(name, name, topic.payload_name)
        self.queue_encoded(header, message.SerializeToString(), correlation)

    def cached_header(self, key: object) -> tuple[bytes, bytes] | None:
        """The header computed before for ``key``, if it is still cached."""
        return self._headers.get(key)

    def header(self, key: object, topic: str, payload_type: str) -> tuple[bytes, bytes]:
        """The encoded topic and payload-type fields, computed once per ``key``."""
        header = self._headers.get(key)
        if header is None:
            if len(self._headers) >= _HEADER_CACHE_SIZE:
                self._headers.clear()
            header = self._headers[key] = publish_header(topic, payload_type)
        return header

    def queue_encoded(
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
        conn = self.conn
        batcher = self.batcher
        if batcher is None:  # a broker without batches
            data = encode_publish(header, payload, corr)
            # The Publish message must leave room for the Deliver envelope [protocol §5].
            limit = event_budget(conn.max_frame_bytes or DEFAULT_MAX_FRAME_BYTES)
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
        self.published += 1
        # While a write is scheduled for the end of this turn, there is
        # nothing to do unless the buffer has grown past FLUSH_BYTES.
        if self._flush_handle is None or conn.buffered_bytes >= FLUSH_BYTES:
            self._coalesce()
