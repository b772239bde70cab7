"""A user's mistakes with the typed client: mypy must report each ``# E:`` line.

Checked by tests/test_installed_typing.py with the package installed from its
wheel in a new virtualenv, as a user has it; excluded from the project's own
mypy and ruff runs.
"""

from __future__ import annotations

from daemoneye.eventbus.v1.control_pb2 import ComponentStatus, HealthCheckRequest, TaskAck
from daemoneye_eventbus import Client, NetworkEvent, ProcessEvent, registry


async def agent(client: Client) -> None:
    async with await client.subscribe(registry.EVENTS_NETWORK_CONNECTIONS) as sub:
        async for event in sub:
            # A network subscription's events are NetworkEvents.
            p: ProcessEvent = event.message()  # E: Incompatible types in assignment (expression has type "NetworkEvent", variable has type "ProcessEvent")
            print(p.pid)


def read_a_field() -> None:
    # A field the schema does not declare.
    print(ProcessEvent().no_such_field)  # E: "ProcessEvent" has no attribute "no_such_field"


async def collector(client: Client) -> None:
    # A NetworkEvent on a topic that carries ProcessEvent.
    await client.publish(registry.EVENTS_PROCESS_LIFECYCLE, NetworkEvent())  # E: Argument 2 to "publish" of "Client" has incompatible type "NetworkEvent"; expected "ProcessEvent"


async def ask_wrong(client: Client) -> None:
    health = registry.control_collector_rpc_health(id="procmond-1")
    # The reply of a health request is a HealthCheckReply, not a TaskAck.
    answer = await client.request(health, HealthCheckRequest())
    ack: TaskAck = answer  # E: Incompatible types in assignment (expression has type "HealthCheckReply", variable has type "TaskAck")
    print(ack)
    # A publish/subscribe topic is not a request topic.
    await client.request(registry.CONTROL_HEALTH_STATUS, ComponentStatus())  # E: Argument 1 to "request" of "RequestReply" has incompatible type "Topic[ComponentStatus]"; expected "RequestTopic[ComponentStatus, Never]"
