"""Wrong uses of the typed topic registry: mypy must reject each ``# E:`` line.

Checked by tests/test_registry_typing.py; excluded from the project's own mypy
and ruff runs.
"""

from __future__ import annotations

from daemoneye.eventbus.v1 import events_pb2
from daemoneye.eventbus.v1.registry import (
    EVENTS_PROCESS_LIFECYCLE,
    Topic,
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
