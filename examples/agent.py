"""An agent that hands ``scan`` tasks to collectors and gathers the results.

Start a broker (``daemoneye-eventbus serve``) and a collector
(``examples/collector.py``) first: the agent learns of collectors already
running from their heartbeats. It waits for one, distributes three tasks as
one workflow, and prints each outcome and the workflow's aggregate.
Run: python examples/agent.py [SOCKET_PATH]
"""

from __future__ import annotations

import asyncio
import sys

from daemoneye.eventbus.v1.control_pb2 import TaskAssignment
from daemoneye_eventbus import Client
from daemoneye_eventbus.control import AggregateKind
from daemoneye_eventbus.control.agent import Agent
from daemoneye_eventbus.correlation import new_correlation, with_stage
from daemoneye_eventbus.transports import DEFAULT_ADDRESS


async def main(socket: str) -> None:
    # Only the daemoneye-agent component may hand collectors tasks.
    client = Client(socket, name="example-agent", component="daemoneye-agent")
    async with client, Agent(client) as agent:
        # Collectors that registered before we started are known about one
        # heartbeat interval later.
        ready = await agent.wait_ready(1, task_type="scan", timeout=10)
        print("collectors:", ", ".join(c.collector_id for c in ready))

        # One workflow: its tasks and results share the correlation's root.
        workflow = with_stage(new_correlation(), "scan")
        root = workflow.correlation_id
        agent.expect_workflow(root, deadline=10)  # complete once each task has its result
        paths = ["/", "/tmp", "/no/such/dir"]
        for n, path in enumerate(paths):
            task = TaskAssignment(task_id=f"scan-{n}", task_type="scan")
            task.parameters["path"] = path
            agent.distribute(task, deadline=10, correlation=workflow)

        for n, path in enumerate(paths):
            outcome = await agent.result(f"scan-{n}", timeout=15)
            if outcome.ok and outcome.result is not None:
                shown = f"{outcome.result.fields['entries']} entries"
            else:
                shown = f"{outcome.status_name}: {outcome.error}"
            print(f"scan-{n} {path}: {shown}")

        aggregate = await agent.aggregate(AggregateKind.WORKFLOW, root, timeout=15)
        missing = ", ".join(sorted(aggregate.missing_tasks)) or "none"
        print(f"workflow {aggregate.state.value}, missing: {missing}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if sys.argv[1:] else DEFAULT_ADDRESS))
