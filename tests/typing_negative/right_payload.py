"""Right uses of the typed topic registry: mypy --strict must accept them all.

Checked by tests/test_registry_typing.py; excluded from the project's own mypy
and ruff runs.
"""

from __future__ import annotations

from typing import Any, assert_type

from daemoneye.eventbus.v1 import control_pb2, events_pb2, frames_pb2
from daemoneye.eventbus.v1.registry import (
    CONTROL_COLLECTOR_CONFIG,
    CONTROL_COLLECTOR_RPC_HEALTH,
    CONTROL_COLLECTOR_TASK,
    CONTROL_COLLECTOR_TASK_TARGETED,
    EVENTS_NETWORK_CONNECTIONS,
    EVENTS_PROCESS_BATCH,
    EVENTS_PROCESS_LIFECYCLE,
    RequestTopic,
    RequestTopicTemplate,
    Topic,
    TopicTemplate,
    control_collector_queue,
    control_collector_rpc_config,
    control_collector_rpc_health,
    control_collector_task_targeted,
    lookup,
    topics_for_payload,
)
from daemoneye_eventbus import DaemoneyeEventBus, IncomingRequest, Responder
from daemoneye_eventbus.client import Client, build_publish
from daemoneye_eventbus.correlation import new_correlation
from daemoneye_eventbus.registry_runtime import Publication
from daemoneye_eventbus.sessions import LocalSession
from google.protobuf.message import Message

# Each topic carries its own payload type.
process: frames_pb2.Publish = build_publish(EVENTS_PROCESS_LIFECYCLE, events_pb2.ProcessEvent())
batch = build_publish(EVENTS_PROCESS_BATCH, events_pb2.ProcessBatch())
network = build_publish(EVENTS_NETWORK_CONNECTIONS, events_pb2.NetworkEvent())
broadcast = build_publish(CONTROL_COLLECTOR_TASK, control_pb2.TaskAssignment(task_id="t-1"))

# A topic template takes every parameter by name and keeps the payload type.
targeted = control_collector_task_targeted(type="scan", id="procmond-1")
assert_type(targeted, Topic[control_pb2.TaskAssignment])
assert_type(CONTROL_COLLECTOR_TASK_TARGETED, TopicTemplate[control_pb2.TaskAssignment])
assert_type(
    CONTROL_COLLECTOR_TASK_TARGETED.build(type="scan", id="procmond-1"),
    Topic[control_pb2.TaskAssignment],
)
task = build_publish(targeted, control_pb2.TaskAssignment(task_id="t-2"))

# The payload type is part of the topic's type.
process_topic: Topic[events_pb2.ProcessEvent] = EVENTS_PROCESS_LIFECYCLE
assert_type(
    topics_for_payload(events_pb2.ProcessEvent), tuple[Topic[events_pb2.ProcessEvent], ...]
)

# A topic found by name at run time has an unknown payload type.
found = lookup("events.process.lifecycle")
assert_type(found, Topic[Any] | None)
if found is not None:
    dynamic = build_publish(found, events_pb2.ProcessEvent())


async def publish_right(client: Client, session: LocalSession, message: Message) -> None:
    # The message of the topic's payload type, the correlation by keyword.
    await client.publish(EVENTS_PROCESS_LIFECYCLE, events_pb2.ProcessEvent(pid=1))
    await client.publish(
        EVENTS_PROCESS_LIFECYCLE, events_pb2.ProcessEvent(), correlation=new_correlation("c-1")
    )
    client.publish_nowait(targeted, control_pb2.TaskAssignment(task_id="t-3"), correlation=None)
    assert_type(session.publish_nowait(EVENTS_NETWORK_CONNECTIONS, events_pb2.NetworkEvent()), int)
    await session.publish(EVENTS_PROCESS_BATCH, events_pb2.ProcessBatch())
    # A topic found at run time takes any message (the broker checks it).
    if found is not None:
        await client.publish(found, message)
    # A topic applied to a message: the publication, typed by the topic.
    publication = EVENTS_PROCESS_LIFECYCLE(events_pb2.ProcessEvent(), correlation=None)
    assert_type(publication, Publication[events_pb2.ProcessEvent])
    assert_type(publication.message, events_pb2.ProcessEvent)


# -- request topics: the reply type is part of the topic's type ---------------------------------

health = control_collector_rpc_health(id="procmond-1")
assert_type(health, RequestTopic[control_pb2.HealthCheckRequest, control_pb2.HealthCheckReply])
assert_type(
    CONTROL_COLLECTOR_RPC_HEALTH,
    RequestTopicTemplate[control_pb2.HealthCheckRequest, control_pb2.HealthCheckReply],
)
assert_type(
    CONTROL_COLLECTOR_RPC_HEALTH.build(id="procmond-1"),
    RequestTopic[control_pb2.HealthCheckRequest, control_pb2.HealthCheckReply],
)
assert_type(health.reply_type, type[control_pb2.HealthCheckReply])
# A request topic is a topic of its request type; its template a template of it.
health_topic: Topic[control_pb2.HealthCheckRequest] = health
health_template: TopicTemplate[control_pb2.HealthCheckRequest] = CONTROL_COLLECTOR_RPC_HEALTH
# Retained is a flag of every topic.
assert_type(CONTROL_COLLECTOR_CONFIG.retained, bool)


async def ask_right(client: Client, session: LocalSession, bus: DaemoneyeEventBus) -> None:
    # The reply's type comes from the topic.
    reply = await client.request(health, control_pb2.HealthCheckRequest(component_id="procmond-1"))
    assert_type(reply, control_pb2.HealthCheckReply)
    status: control_pb2.RpcStatus.ValueType = reply.status
    ack = await session.request(
        control_collector_queue(type="scan"), control_pb2.TaskAssignment(), timeout=2.5
    )
    assert_type(ack, control_pb2.TaskAck)
    config = control_collector_rpc_config(id="procmond-1")
    applied: control_pb2.ConfigurationAck = await client.request(
        config, control_pb2.ConfigurationUpdate(config_version=2), correlation=None
    )
    assert_type(await bus.request(health, control_pb2.HealthCheckRequest()), control_pb2.HealthCheckReply)
    print(status, applied.applied_version)


async def serve_right(client: Client, session: LocalSession) -> None:
    # A template serves every topic built from it; each request is typed both ways.
    async with client.serve(CONTROL_COLLECTOR_RPC_HEALTH) as requests:
        assert_type(
            requests, Responder[control_pb2.HealthCheckRequest, control_pb2.HealthCheckReply]
        )
        async for request in requests:
            assert_type(
                request,
                IncomingRequest[control_pb2.HealthCheckRequest, control_pb2.HealthCheckReply],
            )
            assert_type(request.message, control_pb2.HealthCheckRequest)
            assert_type(request.remaining, float)
            await request.reply(control_pb2.HealthCheckReply(status=control_pb2.RPC_STATUS_SUCCESS))
    async with session.serve(control_collector_queue(type="scan"), max_pending=10) as tasks:
        task = await tasks.get(timeout=1.0)
        assert_type(task.message, control_pb2.TaskAssignment)
        await task.fail("not now")
