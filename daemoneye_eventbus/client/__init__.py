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

The parts: :mod:`~daemoneye_eventbus.client.core` (the :class:`Client`: connection
lifecycle, reconnect, what it receives), :mod:`~daemoneye_eventbus.client.writer`
(encoding, batching and coalescing what it sends),
:mod:`~daemoneye_eventbus.client.requests` (answers awaited from the broker),
:mod:`~daemoneye_eventbus.client.pump` (the asyncio protocol).
"""

from __future__ import annotations

from daemoneye_eventbus.client.core import Client, ClientStatistics, connect
from daemoneye_eventbus.protocol import build_publish, error_from_frame
from daemoneye_eventbus.subscription import Subscription

__all__ = [
    "Client",
    "ClientStatistics",
    "Subscription",
    "build_publish",
    "connect",
    "error_from_frame",
]
