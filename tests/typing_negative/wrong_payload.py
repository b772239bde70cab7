"""Wrong uses of the typed topic registry: mypy must reject each ``# E:`` line.

Checked by tests/test_registry_typing.py; excluded from the project's own mypy
and ruff runs.
"""

from __future__ import annotations

from daemoneye.eventbus.v1 import control_pb2, events_pb2
from daemoneye.eventbus.v1.registry import (
    CONTROL_COLLECTOR_RPC_HEALTH,
    CONTROL_HEALTH_STATUS,
    EVENTS_PROCESS_LIFECYCLE,
    RequestTopic,
    Topic,
    control_collector_queue,
    control_collector_rpc_health,
    control_collector_task_targeted,
)
from daemoneye_eventbus.client import Client, build_publish
from daemoneye_eventbus.sessions import LocalSession

# A NetworkEvent published on a topic that carries ProcessEvent.
build_publish(EVENTS_PROCESS_LIFECYCLE, events_pb2.NetworkEvent())  # E: Cannot infer value of type parameter "P" of "build_publish"

# A topic template built without one of its parameters.
control_collector_task_targeted(type="x")  # E: Missing named argument "id" for "control_collector_task_targeted"

# A topic's payload type is part of its type.
network_topic: Topic[events_pb2.NetworkEvent] = EVENTS_PROCESS_LIFECYCLE  # E: Incompatible types in assignment (expression has type "Topic[ProcessEvent]", variable has type "Topic[NetworkEvent]")

# A targeted task topic carries TaskAssignment, not ProcessEvent.
build_publish(control_collector_task_targeted(type="scan", id="procmond-1"), events_pb2.ProcessEvent())  # E: Cannot infer value of type parameter "P" of "build_publish"

# A topic template takes no parameter it does not declare.
control_collector_task_targeted(type="scan", id="procmond-1", host="h")  # E: Unexpected keyword argument "host" for "control_collector_task_targeted"


async def publish_wrong(client: Client, session: LocalSession) -> None:
    # The client's publish names the payload type the topic expects.
    await client.publish(EVENTS_PROCESS_LIFECYCLE, events_pb2.NetworkEvent())  # E: Argument 2 to "publish" of "Client" has incompatible type "NetworkEvent"; expected "ProcessEvent"
    client.publish_nowait(control_collector_task_targeted(type="scan", id="p-1"), events_pb2.ProcessEvent())  # E: Argument 2 to "publish_nowait" of "Client" has incompatible type "ProcessEvent"; expected "TaskAssignment"
    await session.publish(EVENTS_PROCESS_LIFECYCLE, events_pb2.NetworkEvent())  # E: Argument 2 to "publish" of "LocalSession" has incompatible type "NetworkEvent"; expected "ProcessEvent"
    session.publish_nowait(EVENTS_PROCESS_LIFECYCLE, events_pb2.NetworkEvent())  # E: Argument 2 to "publish_nowait" of "LocalSession" has incompatible type "NetworkEvent"; expected "ProcessEvent"
    # A misspelt keyword, a missing message, a message class instead of a topic.
    await client.publish(EVENTS_PROCESS_LIFECYCLE, events_pb2.ProcessEvent(), correlaton=None)  # E: Unexpected keyword argument "correlaton" for "publish" of "Client"
    await client.publish(EVENTS_PROCESS_LIFECYCLE)  # E: Too few arguments for "publish" of "Client"
    await client.publish(events_pb2.ProcessEvent, pid=1)  # E: Argument 1 to "publish" of "Client" has incompatible type "type[ProcessEvent]"
    # The message is positional, as in the topic's own call.
    await client.publish(EVENTS_PROCESS_LIFECYCLE, message=events_pb2.ProcessEvent())  # E: Unexpected keyword argument "message" for "publish" of "Client"
    EVENTS_PROCESS_LIFECYCLE(events_pb2.NetworkEvent())  # E: Argument 1 to "__call__" of "Topic" has incompatible type "NetworkEvent"; expected "ProcessEvent"


# -- request topics: a wrong request or reply type ----------------------------------------------

async def ask_wrong(client: Client, session: LocalSession) -> None:
    health = control_collector_rpc_health(id="procmond-1")
    # A TaskAssignment on the health request topic, which takes HealthCheckRequest.
    await client.request(health, control_pb2.TaskAssignment())  # E: Cannot infer value of type parameter "P" of "request" of "RequestReply"
    await session.request(health, control_pb2.TaskAssignment())  # E: Cannot infer value of type parameter "P" of "request" of "RequestReply"
    # The reply of a health request is a HealthCheckReply, not a TaskAck.
    answer = await client.request(health, control_pb2.HealthCheckRequest())
    ack: control_pb2.TaskAck = answer  # E: Incompatible types in assignment (expression has type "HealthCheckReply", variable has type "TaskAck")
    # The same, the expected type given at the call: the topic does not answer with it.
    ack = await client.request(health, control_pb2.HealthCheckRequest())  # E: Argument 1 to "request" of "RequestReply" has incompatible type "RequestTopic[HealthCheckRequest, HealthCheckReply]"; expected "RequestTopic[HealthCheckRequest, TaskAck]"
    # The work queue answers with a TaskAck.
    reply: control_pb2.HealthCheckReply = await session.request(control_collector_queue(type="scan"), control_pb2.TaskAssignment())  # E: Argument 1 to "request" of "RequestReply" has incompatible type "RequestTopic[TaskAssignment, TaskAck]"; expected "RequestTopic[TaskAssignment, HealthCheckReply]"
    # A publish/subscribe topic is not a request topic.
    await client.request(CONTROL_HEALTH_STATUS, control_pb2.ComponentStatus())  # E: Argument 1 to "request" of "RequestReply" has incompatible type "Topic[ComponentStatus]"; expected "RequestTopic[ComponentStatus, Never]"
    # A template is served, not asked.
    await client.request(CONTROL_COLLECTOR_RPC_HEALTH, control_pb2.HealthCheckRequest())  # E: Argument 1 to "request" of "RequestReply" has incompatible type "RequestTopicTemplate[HealthCheckRequest, HealthCheckReply]"
    print(ack, reply)


async def serve_wrong(client: Client) -> None:
    # Only request topics (and their templates) are served.
    client.serve(CONTROL_HEALTH_STATUS)  # E: Argument 1 to "serve" of "RequestReply" has incompatible type "Topic[ComponentStatus]"
    async with client.serve(CONTROL_COLLECTOR_RPC_HEALTH) as requests:
        async for request in requests:
            # A health request is answered with a HealthCheckReply.
            await request.reply(control_pb2.TaskAck())  # E: Argument 1 to "reply" of "IncomingRequest" has incompatible type "TaskAck"; expected "HealthCheckReply"
            task: control_pb2.TaskAssignment = request.message  # E: Incompatible types in assignment (expression has type "HealthCheckRequest", variable has type "TaskAssignment")
            print(task)


# The reply type is part of a request topic's type.
wrong_reply: RequestTopic[control_pb2.HealthCheckRequest, control_pb2.TaskAck] = control_collector_rpc_health(id="p-1")  # E: Incompatible types in assignment (expression has type "RequestTopic[HealthCheckRequest, HealthCheckReply]", variable has type "RequestTopic[HealthCheckRequest, TaskAck]")
# So is the request type.
wrong_request: RequestTopic[control_pb2.TaskAssignment, control_pb2.HealthCheckReply] = control_collector_rpc_health(id="p-1")  # E: Incompatible types in assignment (expression has type "RequestTopic[HealthCheckRequest, HealthCheckReply]", variable has type "RequestTopic[TaskAssignment, HealthCheckReply]")
# A request topic template takes its parameters by name.
control_collector_rpc_health()  # E: Missing named argument "id" for "control_collector_rpc_health"
