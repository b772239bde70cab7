"""Outbound: local events into the spool, and from the spool into JetStream.

Every event the bridge forwards takes the same path, whether NATS is there
or not:

1. :class:`Forwarder` reads the bridge's subscriptions on the local bus and
   writes each event, with its subject and headers, to the spool (one SQLite
   transaction per batch of what is waiting);
2. :class:`Sender` reads the spool in order and publishes to JetStream with
   up to ``max_in_flight`` publishes awaiting their acknowledgement
   (nats-py's ``publish_async``);
3. an acknowledged event leaves the spool (in order: an event leaves only
   when every event before it was acknowledged too).

When the link drops, or an acknowledgement does not come within
``ack_timeout``, or JetStream answers with an error, the sender goes back to
the oldest event not acknowledged and sends from there again (counted in
``resent``); the ``Nats-Msg-Id`` of each event lets JetStream drop the copies
of those it had stored. So an event is in the spool from the moment the
bridge wrote it until JetStream has it: a bridge killed at any point sends
it (again) after its restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final

from nats.errors import Error as NatsError
from nats.js import api as js_api

from daemoneye_eventbus.bridge.config import BridgeConfig, BridgeConfigError
from daemoneye_eventbus.bridge.headers import MSG_ID, RECEIVED_AT, event_headers
from daemoneye_eventbus.bridge.link import NatsLink, ensure_stream
from daemoneye_eventbus.bridge.spool import Spool, SpooledEvent, SpoolError
from daemoneye_eventbus.bridge.stats import BridgeCounters
from daemoneye_eventbus.bridge.subjects import topic_to_subject
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.delivery import EventQueue, ReceivedEvent
from daemoneye_eventbus.subscription import Subscription

__all__ = ["Forwarder", "Sender", "wire_size"]

log = logging.getLogger("daemoneye_eventbus.bridge")

#: Events written to the spool in one transaction, at most.
SPOOL_BATCH: Final = 512
#: Events read from the spool at a time, at most.
SEND_BATCH: Final = 256
#: Topics whose subjects the forwarder remembers, at most.
SUBJECT_CACHE: Final = 4096
#: At most one log line about lost events per this many seconds.
ERROR_LOG_EVERY: Final = 10.0
#: Seconds to wait before trying again after JetStream refused a publish.
RETRY_WAIT: Final = 1.0


def _reraise_cancellation() -> None:
    """Raise :class:`asyncio.CancelledError` if the current task is being cancelled.

    nats-py turns a cancellation that arrives while ``publish_async`` waits
    for its in-flight semaphore into ``TooManyStalledMsgsError`` (a nats
    error): caught as a failed publish, it would keep a closing bridge running.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class Forwarder:
    """The bridge's subscriptions on the local bus, written to the spool."""

    def __init__(
        self,
        client: Client,
        spool: Spool,
        config: BridgeConfig,
        counters: BridgeCounters,
        wake: asyncio.Event,
    ) -> None:
        self._client = client
        self._spool = spool
        self._config = config
        self._counters = counters
        self._wake = wake
        self._queue: EventQueue[Any] = client.new_queue()
        self._subs: list[Subscription[Any]] = []
        self._subjects: dict[str, str] = {}
        self._last_error_log = -ERROR_LOG_EVERY

    @property
    def missed(self) -> int:
        """Events the broker dropped for the bridge (gaps in the sequences)."""
        return self._queue.missed + self._queue.dropped

    async def subscribe(self) -> None:
        """Subscribe to every forward filter (control topics never match them)."""
        for flt in self._config.forward:
            sub = await self._client.subscribe(
                flt,
                queue=self._queue,
                lossless=self._config.lossless,
                window=self._config.window if self._config.lossless else None,
            )
            self._subs.append(sub)

    async def run(self) -> None:
        """Spool events as they come, until cancelled."""
        while True:
            batch = [await self._queue.get()]
            while len(batch) < SPOOL_BATCH and (event := self._queue.get_nowait()) is not None:
                batch.append(event)
            self._spool_batch(batch)

    def _subject(self, topic: str) -> str:
        """The subject of ``topic``, remembered (for a bounded number of topics)."""
        if len(self._subjects) >= SUBJECT_CACHE:
            self._subjects.clear()
        subject = self._subjects[topic] = topic_to_subject(self._config.host_id, topic)
        return subject

    async def stop(self) -> None:
        """Unsubscribe, then spool what is still queued."""
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        batch: list[ReceivedEvent[Any]] = []
        while (event := self._queue.get_nowait()) is not None:
            batch.append(event)
        if batch:
            self._spool_batch(batch)

    def _spool_batch(self, batch: list[ReceivedEvent[Any]]) -> None:
        host = self._config.host_id
        rows: list[tuple[str, bytes, dict[str, str] | None]] = []
        for event in batch:
            try:
                subject = self._subjects.get(event.topic)
                if subject is None:
                    subject = self._subject(event.topic)
                headers = event_headers(
                    host,
                    event.topic,
                    event.payload_type,
                    event.event_id,
                    event.received_at_ns,
                    event.correlation,
                )
            except ValueError as exc:
                self._lost(1, f"an event on {event.topic} cannot be forwarded: {exc}")
                continue
            rows.append((subject, event.payload, headers))
        self._counters.received += len(batch)
        if not rows:
            return
        try:
            self._spool.put_many(rows)
        except ValueError:
            # An event larger than the whole spool refuses its batch: put the
            # others one by one, and lose only it.
            for row in rows:
                try:
                    self._spool.put_many([row])
                except (SpoolError, ValueError) as exc:
                    self._lost(1, f"an event could not be spooled: {exc}")
                else:
                    self._counters.spooled += 1
        except SpoolError as exc:
            # The disk is full or failing: these events are lost, and counted so.
            self._lost(len(rows), f"{len(rows)} events could not be spooled: {exc}")
            return
        else:
            self._counters.spooled += len(rows)
        self._wake.set()

    def _lost(self, count: int, why: str) -> None:
        """Count ``count`` events as unforwardable; log why (at most every few seconds)."""
        self._counters.unforwardable += count
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_EVERY:
            self._last_error_log = now
            log.error("%s (%d lost so far)", why, self._counters.unforwardable)


def wire_size(event: SpooledEvent) -> int:
    """The bytes of ``event``'s headers and payload as nats-py sends them (what the
    server holds against its ``max_payload``)."""
    headers = sum(len(k.encode()) + len(v.encode()) + 4 for k, v in event.headers.items())
    return len("NATS/1.0\r\n") + headers + 2 + len(event.payload)


@dataclass(slots=True)
class _Pending:
    """One event sent to JetStream, awaiting its acknowledgement."""

    future: asyncio.Future[js_api.PubAck]
    sent_at: float
    received_at_ns: int
    acked: bool = False


class Sender:
    """Sends the spool to JetStream in order, with acknowledgements, at least once."""

    def __init__(
        self,
        spool: Spool,
        link: NatsLink,
        config: BridgeConfig,
        counters: BridgeCounters,
        wake: asyncio.Event,
    ) -> None:
        self._spool = spool
        self._link = link
        self._config = config
        self._counters = counters
        self._wake = wake
        self._in_flight: OrderedDict[int, _Pending] = OrderedDict()
        #: The last spool seq sent; the next send is the event after it.
        self._cursor = 0
        #: The last seq acknowledged with everything before it.
        self._settled = 0
        #: The highest seq ever sent in this run: sending up to it again is a re-send.
        self._highest_sent = 0
        self._failure: BaseException | None = None
        #: A configuration problem JetStream revealed (the stream does not
        #: store the bridge's subjects): the bridge stops with it.
        self.fatal: BridgeConfigError | None = None

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def run(self) -> None:
        """Send for as long as the bridge runs (cancel to stop)."""
        while True:
            await self._link.wait_up()
            generation = self._link.generation
            try:
                await ensure_stream(self._link.js, self._config)
            except BridgeConfigError as exc:
                self.fatal = exc
                self._wake.set()
                return
            except (TimeoutError, NatsError, OSError) as exc:
                _reraise_cancellation()
                reason = str(exc) or type(exc).__name__
                log.warning("JetStream is not answering (%s); trying again", reason)
                await asyncio.sleep(RETRY_WAIT)
                continue
            try:
                await self._pump(generation)
            except (NatsError, OSError) as exc:
                _reraise_cancellation()
                log.warning("publishing to JetStream failed: %s", exc or type(exc).__name__)
            self._go_back()
            if self._failure is not None:
                self._failure = None
                await asyncio.sleep(RETRY_WAIT)

    async def _pump(self, generation: int) -> None:
        """Send and settle while the connection of ``generation`` lasts and all goes well."""
        js = self._link.js
        loop = asyncio.get_running_loop()
        while self._link.up and self._link.generation == generation:
            self._wake.clear()
            self._settle()
            if self._failure is not None:
                return
            now = loop.time()
            if self._in_flight:
                oldest = next(iter(self._in_flight.values()))
                if now - oldest.sent_at > self._config.ack_timeout:
                    log.warning(
                        "no acknowledgement from JetStream in %.1f s; sending again",
                        self._config.ack_timeout,
                    )
                    return
            room = self._config.max_in_flight - len(self._in_flight)
            events = self._spool.peek_after(self._cursor, min(room, SEND_BATCH)) if room else []
            if not events:
                wait = None
                if self._in_flight:
                    oldest = next(iter(self._in_flight.values()))
                    wait = max(0.0, oldest.sent_at + self._config.ack_timeout - now) + 0.01
                await self._sleep(wait)
                continue
            max_payload = self._link.nc.max_payload
            for event in events:
                if wire_size(event) > max_payload:
                    # The server would refuse it (and close the connection) every
                    # time: it can never be forwarded. Settled at once, counted.
                    self._too_large(event, max_payload, loop.create_future())
                    continue
                future = await js.publish_async(
                    event.subject, event.payload, headers=dict(event.headers)
                )
                pending = _Pending(future, loop.time(), int(event.headers.get(RECEIVED_AT, 0)))
                self._in_flight[event.seq] = pending
                future.add_done_callback(self._acknowledged(event.seq, pending))
                if event.seq <= self._highest_sent:
                    self._counters.resent += 1
                else:
                    self._counters.forwarded += 1
                    self._highest_sent = event.seq
                self._cursor = event.seq

    def _too_large(
        self, event: SpooledEvent, max_payload: int, future: asyncio.Future[js_api.PubAck]
    ) -> None:
        """Settle ``event`` without sending it: larger than the server takes."""
        self._in_flight[event.seq] = _Pending(future, 0.0, 0, acked=True)
        self._cursor = event.seq
        if event.seq > self._highest_sent:  # counted once, not again after a go-back
            self._highest_sent = event.seq
            self._counters.unforwardable += 1
            log.error(
                "event %s on %s is larger than the NATS server takes (%d bytes): not forwarded",
                event.headers.get(MSG_ID, event.seq),
                event.subject,
                max_payload,
            )

    def _acknowledged(
        self, seq: int, pending: _Pending
    ) -> Any:  # a done-callback of the publish's future
        def done(future: asyncio.Future[js_api.PubAck]) -> None:
            if future.cancelled() or self._in_flight.get(seq) is not pending:
                return
            exc = future.exception()
            if exc is not None:
                if self._failure is None:
                    log.warning("JetStream refused event %d: %s", seq, exc)
                self._failure = exc
            else:
                pending.acked = True
                self._counters.acknowledged += 1
                if future.result().duplicate:
                    self._counters.duplicates += 1
                if pending.received_at_ns:
                    self._counters.latencies.append(
                        max(0.0, (time.time_ns() - pending.received_at_ns) / 1e9)
                    )
            self._wake.set()

        return done

    async def _sleep(self, timeout: float | None) -> None:
        """Until woken (an acknowledgement, new events, the link), at most ``timeout`` s.

        ``asyncio.timeout`` rather than ``wait_for``: Python 3.11's ``wait_for``
        can lose a cancellation that arrives as the wait ends, and a closing
        bridge would then wait here for ever.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()

    def _settle(self) -> None:
        """Remove from the spool every event acknowledged with all before it."""
        last = 0
        while self._in_flight:
            seq, pending = next(iter(self._in_flight.items()))
            if not pending.acked:
                break
            self._in_flight.popitem(last=False)
            last = seq
        if last:
            self._settled = last
            self._spool.ack(last)

    def _go_back(self) -> None:
        """Forget what is in flight; send again from the oldest not acknowledged."""
        self._settle()
        for pending in self._in_flight.values():
            pending.future.cancel()
        self._in_flight.clear()
        self._cursor = self._settled

    async def finish(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the acknowledgements in flight, then settle."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._in_flight and self._failure is None and loop.time() < deadline:
            self._settle()
            self._wake.clear()
            if not self._in_flight:
                break
            await self._sleep(max(0.0, deadline - loop.time()))
        self._go_back()
