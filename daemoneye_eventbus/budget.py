"""What the broker holds for its peers, counted against ceilings (pure).

Every resource a peer can make the broker hold is counted in bytes of the
broker's memory, not of the wire: per connection by the session or the
router, and in total here. The totals are what keep the broker under its
stated ceiling whatever peers do within the connection limits
(docs/security.md, "Memory").

* **Subscriptions** (filters and compiled correlation filters): charged by
  the router at subscribe, released at unsubscribe or when the session ends.
* **Pending output** (deliveries and replies waiting for a peer that does not
  read): charged by the socket session after each write, each frame counted
  with :data:`FRAME_COST` bytes of overhead so that many small replies count
  for what they cost.
* **Partial input** (a frame not yet complete, input waiting for its turn):
  charged by the socket session after each read.
"""

from __future__ import annotations

from typing import Final

from daemoneye_eventbus.config import BrokerConfig

__all__ = [
    "FRAME_COST",
    "SUBSCRIPTION_COST",
    "Account",
    "MemoryBudget",
    "queued_cost",
    "subscription_cost",
]

#: Bytes of memory a queued frame costs beyond its own bytes (the bytes
#: object's header and its slot in the queue), measured with CPython 3.11.
FRAME_COST: Final = 96
#: Bytes of memory a subscription costs beyond its filters (its entry, its
#: place in the trie and in the route caches), measured with CPython 3.11.
SUBSCRIPTION_COST: Final = 512
#: Memory per byte of an encoded correlation filter once compiled into a
#: matcher (sets, compiled patterns), measured at about 1.8.
_FILTER_FACTOR: Final = 2


def queued_cost(nbytes: int, frames: int) -> int:
    """Bytes of broker memory ``frames`` queued frames of ``nbytes`` in all are charged."""
    return nbytes + FRAME_COST * frames


def subscription_cost(filter: str, correlation_filter_bytes: int) -> int:
    """Bytes of broker memory one subscription is charged."""
    return SUBSCRIPTION_COST + 2 * len(filter) + _FILTER_FACTOR * correlation_filter_bytes


class MemoryBudget:
    """The broker's totals of pending output and partial input, with their ceilings.

    Sessions charge the difference between what they hold now and what they
    were charged before (:meth:`charge_output`, :meth:`charge_input`), so
    the totals stay exact whatever order things happen in.
    """

    def __init__(self, config: BrokerConfig) -> None:
        self.output_limit = config.max_total_queue_bytes
        self.input_limit = config.max_total_input_bytes
        #: Bytes of pending output held for every peer.
        self.output = 0
        #: Bytes of partial input held for every peer.
        self.input = 0

    def charge_output(self, before: int, now: int) -> int:
        """A session held ``before`` bytes of output and now holds ``now``; returns ``now``."""
        self.output += now - before
        return now

    def charge_input(self, before: int, now: int) -> int:
        """Like :meth:`charge_output`, for partial input."""
        self.input += now - before
        return now

    @property
    def output_full(self) -> bool:
        return self.output > self.output_limit

    @property
    def input_full(self) -> bool:
        return self.input > self.input_limit


class Account:
    """One session's charges in the broker's :class:`MemoryBudget`."""

    __slots__ = ("budget", "input", "output")

    def __init__(self, budget: MemoryBudget) -> None:
        self.budget = budget
        #: Bytes of pending output and of partial input charged now.
        self.output = 0
        self.input = 0

    def hold_output(self, held: int) -> None:
        """The session now holds ``held`` bytes of pending output."""
        self.output = self.budget.charge_output(self.output, held)

    def hold_input(self, held: int) -> bool:
        """The session now holds ``held`` bytes of partial input; True if it
        holds some while the broker's total is past its limit."""
        self.input = self.budget.charge_input(self.input, held)
        return bool(held) and self.budget.input_full

    def release(self) -> None:
        """The session has ended: it holds nothing."""
        self.hold_output(0)
        self.hold_input(0)
