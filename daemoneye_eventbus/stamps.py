"""Event identity and time: the broker's id and receive time of every event (pure).

Every event the broker accepts gets an id from its :class:`EventClock`,
unique for the broker's life and increasing in the order the broker accepted
events (a batch of ``n`` events takes ``n`` consecutive ids), and the broker's
wall-clock time of its receipt in nanoseconds since the Unix epoch
[protocol §5, "Event ids and receive times"]. Every subscriber of an event
sees the same id, so that the agent can deduplicate and order events for
forensics.

A :class:`Stamp` is made once per publish, not per delivery: its encoded
form (:attr:`Stamp.suffix`, the ``Deliver`` / ``DeliverBatch`` fields 4 to 6)
is built on first use and shared by every subscriber's frame.
"""

from __future__ import annotations

import struct
import time
from typing import Final

from daemoneye_eventbus.frames import encode_varint

__all__ = ["EventClock", "Stamp"]

# Deliver.event_id and DeliverBatch.first_event_id (4, varint), their
# received_at_ns (5, fixed64) and Deliver.retained (6, varint).
_TAG_EVENT_ID: Final = b"\x20"
_TAG_RECEIVED_AT: Final = b"\x29"
_RETAINED_FIELD: Final = b"\x30\x01"
_FIXED64: Final = struct.Struct("<Q").pack


class Stamp:
    """The broker's id and receive time of one published event or batch.

    ``event_id`` is the id of the first event (a batch's next events have
    the next ids); ``retained`` marks the delivery of a topic's retained event
    to a new subscription.
    """

    __slots__ = ("_suffix", "event_id", "retained", "time_ns")

    def __init__(self, event_id: int, time_ns: int, retained: bool = False) -> None:
        self.event_id = event_id
        self.time_ns = time_ns
        self.retained = retained
        self._suffix: bytes | None = None

    @property
    def suffix(self) -> bytes:
        """The encoded ``Deliver`` fields 4-6 (``DeliverBatch`` fields 4-5), as
        protobuf writes them after the ``publish`` field."""
        suffix = self._suffix
        if suffix is None:
            suffix = b"".join(
                (
                    _TAG_EVENT_ID,
                    encode_varint(self.event_id),
                    _TAG_RECEIVED_AT,
                    _FIXED64(self.time_ns),
                    _RETAINED_FIELD if self.retained else b"",
                )
            )
            self._suffix = suffix
        return suffix

    def at(self, index: int) -> Stamp:
        """The stamp of the ``index``-th event (from 0) of the batch this stamps."""
        return self if not index else Stamp(self.event_id + index, self.time_ns, self.retained)

    def as_retained(self) -> Stamp:
        """The same event, marked as a retained delivery."""
        return Stamp(self.event_id, self.time_ns, True)

    def __repr__(self) -> str:
        retained = ", retained" if self.retained else ""
        return f"Stamp({self.event_id}, {self.time_ns}{retained})"


class EventClock:
    """Hands out event ids (from 1) and receive times, for one broker."""

    __slots__ = ("next_id",)

    def __init__(self) -> None:
        #: The id the next event gets.
        self.next_id = 1

    def stamp(self, count: int = 1) -> Stamp:
        """The stamp of ``count`` events accepted now: ids ``next_id`` onwards."""
        first = self.next_id
        self.next_id = first + count
        return Stamp(first, time.time_ns())
