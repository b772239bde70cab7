// The generated topic registry (codegen/render_ts.py), at run time.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  HealthCheckReplySchema,
  HealthCheckRequestSchema,
  TaskAckSchema,
  TaskAssignmentSchema,
} from "../src/gen/daemoneye/eventbus/v1/control_pb.js";
import { ProcessEventSchema } from "../src/gen/daemoneye/eventbus/v1/events_pb.js";
import {
  ACCESS_TABLE,
  AccessLevel,
  CONTROL_COLLECTOR_RPC_HEALTH,
  CONTROL_COLLECTOR_TASK_TARGETED,
  EVENTS_PROCESS_ANOMALY,
  EVENTS_PROCESS_LIFECYCLE,
  PAYLOAD_REGISTRY,
  TEMPLATES,
  TOPICS,
  RequestTopic,
  RequestTopicTemplate,
  Topic,
  TopicTemplate,
  controlCollectorQueue,
  controlCollectorRpcHealth,
  controlCollectorTaskTargeted,
  lookup,
  topicsForPayload,
} from "../src/gen/daemoneye/eventbus/v1/registry.js";
import { validateFilter, validateTopic, matches } from "../src/topics.js";

describe("registry", () => {
  test("a topic constant carries its declaration", () => {
    assert.equal(EVENTS_PROCESS_LIFECYCLE.name, "events.process.lifecycle");
    assert.equal(EVENTS_PROCESS_LIFECYCLE.schema, ProcessEventSchema);
    assert.equal(EVENTS_PROCESS_LIFECYCLE.payloadName, "daemoneye.eventbus.v1.ProcessEvent");
    assert.equal(EVENTS_PROCESS_LIFECYCLE.access, AccessLevel.RESTRICTED);
    assert.deepEqual(EVENTS_PROCESS_LIFECYCLE.publishers, ["procmond"]);
    assert.deepEqual(EVENTS_PROCESS_LIFECYCLE.subscribers, ["bridge", "daemoneye-agent"]);
    assert.equal(EVENTS_PROCESS_LIFECYCLE.control, false);
    assert.equal(String(EVENTS_PROCESS_LIFECYCLE), "events.process.lifecycle");
    assert.ok(Object.isFrozen(EVENTS_PROCESS_LIFECYCLE));
    assert.ok(Object.isFrozen(EVENTS_PROCESS_LIFECYCLE.publishers));
    assert.equal(EVENTS_PROCESS_ANOMALY.access, AccessLevel.PUBLIC);
  });

  test("every topic name is valid, and every template builds valid topics", () => {
    for (const [name, topic] of TOPICS) {
      assert.equal(topic.name, name);
      validateTopic(name);
      assert.ok(PAYLOAD_REGISTRY.getMessage(topic.payloadName), topic.payloadName);
    }
    for (const template of TEMPLATES) {
      validateFilter(template.filter);
    }
  });

  test("template builders", () => {
    const topic = controlCollectorTaskTargeted({ type: "scan", id: "procmond-1" });
    assert.ok(topic instanceof Topic);
    assert.equal(topic.name, "control.collector.task.scan.procmond-1");
    assert.equal(topic.schema, TaskAssignmentSchema);
    assert.equal(topic.template, "control.collector.task.{type}.{id}");
    assert.equal(topic.control, true);
    assert.equal(CONTROL_COLLECTOR_TASK_TARGETED.filter, "control.collector.task.+.+");
    assert.ok(matches(CONTROL_COLLECTOR_TASK_TARGETED.filter, topic.name));
    assert.throws(() => controlCollectorTaskTargeted({ type: "a.b", id: "x" }), TypeError);
    assert.throws(() => controlCollectorTaskTargeted({ type: "", id: "x" }), TypeError);
    assert.throws(
      () => CONTROL_COLLECTOR_TASK_TARGETED.build({ type: "a" } as { type: string; id: string }),
      TypeError,
    );
    assert.deepEqual(CONTROL_COLLECTOR_TASK_TARGETED.match("control.collector.task.scan.p1"), {
      type: "scan",
      id: "p1",
    });
    assert.equal(CONTROL_COLLECTOR_TASK_TARGETED.match("control.collector.task.scan"), undefined);
  });

  test("the topics the schema declares lossless, and only those, carry the flag", () => {
    const lossless = [...TOPICS.values()].filter((t) => t.lossless).map((t) => t.name);
    assert.deepEqual(lossless, [
      "events.process.integrity",
      "control.collector.task",
      "control.collector.result",
    ]);
    assert.equal(EVENTS_PROCESS_LIFECYCLE.lossless, false);
    assert.deepEqual(
      TEMPLATES.filter((t) => t.lossless).map((t) => t.pattern),
      ["control.collector.task.{type}.{id}"],
    );
    // A built topic carries its template's flag, whichever way it is built.
    assert.equal(controlCollectorTaskTargeted({ type: "scan", id: "p1" }).lossless, true);
    assert.equal(lookup("control.collector.task.scan.p1")?.lossless, true);
    assert.equal(lookup("events.process.integrity")?.lossless, true);
  });

  test("the topics the schema declares retained, and only those, carry the flag", () => {
    const retained = [...TOPICS.values()].filter((t) => t.retained).map((t) => t.name);
    assert.deepEqual(retained, [
      "control.collector.config",
      "control.agent.policy",
      "control.health.status",
    ]);
    assert.deepEqual(
      TEMPLATES.filter((t) => t.retained).map((t) => t.pattern),
      [],
    );
    assert.equal(lookup("control.agent.policy")?.retained, true);
    assert.equal(EVENTS_PROCESS_LIFECYCLE.retained, false);
  });

  test("request topics carry their reply schema, and build request topics", () => {
    const requests = TEMPLATES.filter((t) => t instanceof RequestTopicTemplate).map((t) => [
      t.pattern,
      t.payloadName,
      (t as RequestTopicTemplate).replyName,
    ]);
    const v1 = "daemoneye.eventbus.v1.";
    assert.deepEqual(requests, [
      ["control.collector.rpc.health.{id}", v1 + "HealthCheckRequest", v1 + "HealthCheckReply"],
      ["control.collector.rpc.config.{id}", v1 + "ConfigurationUpdate", v1 + "ConfigurationAck"],
      [
        "control.collector.rpc.lifecycle.{id}",
        v1 + "CollectorLifecycleCommand",
        v1 + "LifecycleReply",
      ],
      ["control.collector.rpc.task.{id}", v1 + "TaskAssignment", v1 + "TaskAck"],
      ["control.collector.queue.{type}", v1 + "TaskAssignment", v1 + "TaskAck"],
    ]);
    assert.ok(![...TOPICS.values()].some((t) => t instanceof RequestTopic));
    assert.ok(CONTROL_COLLECTOR_RPC_HEALTH instanceof TopicTemplate);
    assert.ok(Object.isFrozen(CONTROL_COLLECTOR_RPC_HEALTH));
    const health = controlCollectorRpcHealth({ id: "procmond-1" });
    assert.ok(health instanceof RequestTopic && health instanceof Topic);
    assert.ok(Object.isFrozen(health));
    assert.equal(health.name, "control.collector.rpc.health.procmond-1");
    assert.equal(health.schema, HealthCheckRequestSchema);
    assert.equal(health.replySchema, HealthCheckReplySchema);
    assert.equal(health.template, "control.collector.rpc.health.{id}");
    assert.equal(health.retained, false);
    const found = lookup("control.collector.queue.scan");
    assert.ok(found instanceof RequestTopic);
    assert.equal(found.replySchema, TaskAckSchema);
    assert.equal(controlCollectorQueue({ type: "scan" }).name, found.name);
    // The reply types are in the payload registry too, to decode a reply by its type name.
    assert.ok(PAYLOAD_REGISTRY.getMessage(v1 + "HealthCheckReply"));
    assert.ok(PAYLOAD_REGISTRY.getMessage(v1 + "TaskAck"));
  });

  test("lookup finds topics and template instances", () => {
    assert.equal(lookup("events.process.lifecycle"), EVENTS_PROCESS_LIFECYCLE);
    const built = lookup("control.collector.task.hash.fsmond");
    assert.equal(built?.template, "control.collector.task.{type}.{id}");
    assert.equal(built?.payloadName, "daemoneye.eventbus.v1.TaskAssignment");
    assert.equal(lookup("events.nope"), undefined);
    assert.equal(lookup("control.collector.task.a.b.c"), undefined);
  });

  test("topicsForPayload and the access table", () => {
    const names = topicsForPayload(ProcessEventSchema).map((t) => t.name);
    assert.deepEqual(names, [
      "events.process.lifecycle",
      "events.process.metadata",
      "events.process.tree",
      "events.process.integrity",
      "events.process.anomaly",
    ]);
    assert.equal(ACCESS_TABLE.get("control.collector.task.{type}.{id}"), AccessLevel.PRIVILEGED);
    assert.equal(ACCESS_TABLE.size, TOPICS.size + TEMPLATES.length);
  });
});
