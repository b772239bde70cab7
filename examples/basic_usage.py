"""The reference API's basic example, in Python.

A broker embedded in this process, the in-process event bus of the agent,
a subscriber and one published process event with a correlation id.
Run: python examples/basic_usage.py [SOCKET_PATH]
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from daemoneye_eventbus import (
    CollectionEvent,
    DaemoneyeBroker,
    DaemoneyeEventBus,
    EventSubscription,
    ProcessEvent,
    correlation_filter,
)


async def main(path: str) -> None:
    broker = await DaemoneyeBroker.new(path)
    event_bus = await DaemoneyeEventBus.from_broker(broker)

    subscription = EventSubscription(
        subscriber_id="example-subscriber",
        topic_patterns=["events.process.#"],
        correlation_filter=correlation_filter(correlation_ids=["correlation-123"]),
    )
    receiver = await event_bus.subscribe(subscription)

    event = CollectionEvent(
        process=ProcessEvent(
            pid=1234,
            name="example_process",
            command_line="example_process --flag",
            executable_path="/usr/bin/example_process",
            ppid=1,
        )
    )
    await event_bus.publish(event, "correlation-123")

    received = await receiver.recv(timeout=5)
    assert received.event is not None
    print(
        f"received on {received.topic}: pid={received.event.process.pid} "
        f"name={received.event.process.name} "
        f"correlation={received.correlation.correlation_id if received.correlation else None}"
    )
    stats = await event_bus.statistics()
    print(f"published={stats.published} received={stats.received} dropped={stats.dropped}")

    await event_bus.shutdown()
    await broker.shutdown()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="deb-example-") as tmp:
        asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else str(Path(tmp) / "bus.sock")))
