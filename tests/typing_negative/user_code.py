"""A user's right uses of the typed client: mypy --strict must accept them all.

Checked by tests/test_installed_typing.py with the package installed from its
wheel in a new virtualenv, as a user has it; excluded from the project's own
mypy and ruff runs (which check the same uses in tests/).
"""

from __future__ import annotations

from typing import assert_type

from daemoneye_eventbus import (
    Client,
    NetworkEvent,
    ProcessEvent,
    ReceivedEvent,
    new_correlation,
    registry,
)
from daemoneye.eventbus.v1.control_pb2 import (
    HealthCheckReply,
    HealthCheckRequest,
    TaskAck,
    TaskAssignment,
)


async def agent(client: Client) -> None:
    async with await client.subscribe(registry.EVENTS_NETWORK_CONNECTIONS) as sub:
        async for event in sub:
            assert_type(event, ReceivedEvent[NetworkEvent])
            n: NetworkEvent = event.message()
            print(n.ListFields())
    task = registry.control_collector_task_targeted(type="scan", id="procmond-1")
    await client.publish(task, TaskAssignment(task_id="t-1"))


async def collector(client: Client) -> None:
    await client.publish(
        registry.EVENTS_PROCESS_LIFECYCLE,
        ProcessEvent(pid=42, name="sshd"),
        correlation=new_correlation("scan-7"),
    )
    client.publish_nowait(registry.EVENTS_NETWORK_CONNECTIONS, NetworkEvent())
    print(ProcessEvent(pid=1).pid + 1)


async def ask(client: Client) -> None:
    health = registry.control_collector_rpc_health(id="procmond-1")
    reply = await client.request(health, HealthCheckRequest(component_id="procmond-1"))
    assert_type(reply, HealthCheckReply)
    print(reply.status)


async def answer(client: Client) -> None:
    async with client.serve(registry.CONTROL_COLLECTOR_QUEUE) as requests:
        async for request in requests:
            task = request.message
            assert_type(task, TaskAssignment)
            await request.reply(TaskAck(task_id=task.task_id))
