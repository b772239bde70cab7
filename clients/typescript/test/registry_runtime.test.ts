// The hand-written registry runtime (src/registry_runtime.ts) on its own, and
// the generated registry's use of it: re-exported classes, the bound look-ups
// and the event-kind tables from the schema's (event_topic) options.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  HealthCheckReplySchema,
  HealthCheckRequestSchema,
  TaskAssignmentSchema,
} from "../src/gen/daemoneye/eventbus/v1/control_pb.js";
import {
  ProcessEventKind,
  ProcessEventKindSchema,
  ProcessEventSchema,
  NetworkEventSchema,
} from "../src/gen/daemoneye/eventbus/v1/events_pb.js";
import { AccessLevel } from "../src/gen/daemoneye/eventbus/v1/options_pb.js";
import * as generated from "../src/gen/daemoneye/eventbus/v1/registry.js";
import * as client from "../src/index.js";
import {
  RequestTopic,
  RequestTopicTemplate,
  Topic,
  TopicRegistry,
  TopicTemplate,
} from "../src/registry_runtime.js";
import { matches } from "../src/topics.js";

const EVENT = new Topic(
  "svc.events.a",
  ProcessEventSchema,
  AccessLevel.RESTRICTED,
  ["smalld"],
  ["daemoneye-agent"],
  false,
);
const OTHER = new Topic("svc.events.b", ProcessEventSchema, AccessLevel.PUBLIC, [], [], false);
const COMMAND = new Topic(
  "svc.command",
  TaskAssignmentSchema,
  AccessLevel.PRIVILEGED,
  ["a"],
  ["b"],
  true,
);
const TARGETED = new TopicTemplate(
  "svc.command.{kind}.{id}",
  ["kind", "id"] as const,
  TaskAssignmentSchema,
  AccessLevel.PRIVILEGED,
  ["a"],
  ["b"],
  true,
);

interface ByName {
  "svc.events.a": Topic<typeof ProcessEventSchema>;
  "svc.command": Topic<typeof TaskAssignmentSchema>;
}

const REGISTRY = new TopicRegistry<ByName>(
  new Map<string, Topic>([
    [EVENT.name, EVENT],
    [OTHER.name, OTHER],
    [COMMAND.name, COMMAND],
  ]),
  [TARGETED],
);

describe("registry runtime", () => {
  test("a topic carries its declaration and is frozen", () => {
    assert.equal(String(EVENT), "svc.events.a");
    assert.equal(EVENT.payloadName, "daemoneye.eventbus.v1.ProcessEvent");
    assert.equal(EVENT.template, undefined);
    assert.ok(Object.isFrozen(EVENT));
    assert.ok(Object.isFrozen(EVENT.publishers));
    assert.ok(Object.isFrozen(EVENT.subscribers));
  });

  test("lossless is false unless passed, and a template passes it to what it builds", () => {
    assert.equal(EVENT.lossless, false);
    assert.equal(TARGETED.lossless, false);
    assert.equal(TARGETED.build({ kind: "scan", id: "p-1" }).lossless, false);
    const held = new Topic("svc.held", ProcessEventSchema, AccessLevel.PUBLIC, [], [], false);
    assert.equal(held.lossless, false);
    const kept = new Topic(
      "svc.kept",
      ProcessEventSchema,
      AccessLevel.PUBLIC,
      [],
      [],
      false,
      undefined,
      true,
    );
    assert.equal(kept.lossless, true);
    assert.equal(kept.template, undefined);
    const template = new TopicTemplate(
      "svc.kept.{id}",
      ["id"] as const,
      ProcessEventSchema,
      AccessLevel.PUBLIC,
      [],
      [],
      false,
      true,
    );
    assert.equal(template.lossless, true);
    const built = template.build({ id: "x" });
    assert.deepEqual(
      [built.name, built.template, built.lossless],
      ["svc.kept.x", "svc.kept.{id}", true],
    );
  });

  test("retained is false unless passed, and a template passes it to what it builds", () => {
    assert.equal(EVENT.retained, false);
    assert.equal(TARGETED.build({ kind: "scan", id: "p-1" }).retained, false);
    const kept = new Topic(
      "svc.kept",
      ProcessEventSchema,
      AccessLevel.PUBLIC,
      [],
      [],
      false,
      undefined,
      false,
      true,
    );
    assert.deepEqual([kept.lossless, kept.retained], [false, true]);
    const template = new TopicTemplate(
      "svc.kept.{id}",
      ["id"] as const,
      ProcessEventSchema,
      AccessLevel.PUBLIC,
      [],
      [],
      false,
      false,
      true,
    );
    const built = template.build({ id: "x" });
    assert.deepEqual([built.lossless, built.retained], [false, true]);
  });

  test("a request topic template builds frozen request topics with its reply schema", () => {
    const ask = new RequestTopicTemplate(
      "svc.ask.{id}",
      ["id"] as const,
      HealthCheckRequestSchema,
      HealthCheckReplySchema,
      AccessLevel.PRIVILEGED,
      ["a"],
      ["b"],
      true,
      true,
    );
    assert.ok(Object.isFrozen(ask));
    assert.ok(ask instanceof TopicTemplate);
    assert.equal(ask.replyName, "daemoneye.eventbus.v1.HealthCheckReply");
    assert.equal(ask.filter, "svc.ask.+");
    const built = ask.build({ id: "p-1" });
    assert.ok(built instanceof RequestTopic && built instanceof Topic);
    assert.ok(Object.isFrozen(built));
    assert.deepEqual(
      [built.name, built.template, built.payloadName, built.replyName, built.lossless],
      [
        "svc.ask.p-1",
        "svc.ask.{id}",
        "daemoneye.eventbus.v1.HealthCheckRequest",
        "daemoneye.eventbus.v1.HealthCheckReply",
        true,
      ],
    );
    assert.equal(built.retained, false);
    assert.throws(() => ask.build({ id: "a.b" }), TypeError);
    const registry = new TopicRegistry(new Map(), [ask]);
    assert.ok(registry.lookup("svc.ask.p-2") instanceof RequestTopic);
    const concrete = new RequestTopic(
      "svc.ask",
      HealthCheckRequestSchema,
      HealthCheckReplySchema,
      AccessLevel.PUBLIC,
      [],
      [],
      false,
    );
    assert.ok(Object.isFrozen(concrete));
    assert.deepEqual(
      [concrete.template, concrete.lossless, concrete.retained],
      [undefined, false, false],
    );
  });

  test("a template builds, matches and filters", () => {
    assert.equal(TARGETED.payloadName, "daemoneye.eventbus.v1.TaskAssignment");
    assert.equal(TARGETED.filter, "svc.command.+.+");
    assert.ok(Object.isFrozen(TARGETED));
    assert.ok(Object.isFrozen(TARGETED.parameters));
    const built = TARGETED.build({ kind: "scan", id: "p-1" });
    assert.ok(built instanceof Topic);
    assert.equal(built.name, "svc.command.scan.p-1");
    assert.equal(built.schema, TaskAssignmentSchema);
    assert.equal(built.template, "svc.command.{kind}.{id}");
    assert.equal(built.access, AccessLevel.PRIVILEGED);
    assert.deepEqual(built.publishers, ["a"]);
    assert.equal(built.control, true);
    assert.ok(matches(TARGETED.filter, built.name));
    assert.deepEqual(TARGETED.match(built.name), { kind: "scan", id: "p-1" });
    assert.equal(TARGETED.match("svc.command.scan"), undefined);
    assert.equal(TARGETED.match("svc.command.scan.p-1.x"), undefined);
    assert.equal(TARGETED.match("svc.other.scan.p-1"), undefined);
    assert.equal(TARGETED.match("svc.command.+.p-1"), undefined);
    assert.throws(
      () => TARGETED.build({ kind: "scan" } as { kind: string; id: string }),
      /takes parameters \["kind","id"\], got \["kind"\]/,
    );
    assert.throws(
      () => TARGETED.build({ kind: "scan", id: "a.b" }),
      /parameter "id" of topic template .* must be one topic level/,
    );
  });

  test("the registry looks up topics and template instances", () => {
    const event: Topic<typeof ProcessEventSchema> = REGISTRY.lookup("svc.events.a");
    assert.equal(event, EVENT);
    assert.equal(REGISTRY.lookup("svc.command"), COMMAND);
    const built = REGISTRY.lookup("svc.command.hash.fsmond");
    assert.equal(built?.name, "svc.command.hash.fsmond");
    assert.equal(built?.template, TARGETED.pattern);
    for (const name of ["svc.events", "svc.events.c", "svc.command.a.b.c", "svc.command.+.x", ""]) {
      assert.equal(REGISTRY.lookup(name), undefined, name);
    }
    assert.equal(new TopicRegistry(new Map(), []).lookup("svc.events.a"), undefined);
    assert.ok(Object.isFrozen(REGISTRY));
  });

  test("the registry finds the concrete topics of a payload, in order", () => {
    assert.deepEqual(REGISTRY.topicsForPayload(ProcessEventSchema), [EVENT, OTHER]);
    // Concrete topics only: the template's payload does not count.
    assert.deepEqual(REGISTRY.topicsForPayload(TaskAssignmentSchema), [COMMAND]);
    assert.deepEqual(REGISTRY.topicsForPayload(NetworkEventSchema), []);
  });
});

describe("generated registry over the runtime", () => {
  test("re-exports the runtime's classes, also from the package entry point", () => {
    assert.equal(generated.Topic, Topic);
    assert.equal(generated.TopicTemplate, TopicTemplate);
    assert.equal(generated.TopicRegistry, TopicRegistry);
    assert.equal(client.Topic, Topic);
    assert.equal(client.TopicTemplate, TopicTemplate);
    assert.ok(generated.EVENTS_PROCESS_LIFECYCLE instanceof Topic);
    assert.ok(generated.CONTROL_COLLECTOR_TASK_TARGETED instanceof TopicTemplate);
  });

  test("its look-ups are bound to one registry over TOPICS and TEMPLATES", () => {
    assert.ok(generated.REGISTRY instanceof TopicRegistry);
    assert.equal(generated.REGISTRY.topics, generated.TOPICS);
    assert.equal(generated.REGISTRY.templates, generated.TEMPLATES);
    const { lookup, topicsForPayload } = generated;
    assert.equal(lookup("events.process.lifecycle"), generated.EVENTS_PROCESS_LIFECYCLE);
    assert.equal(
      lookup("control.collector.task.scan.p1")?.template,
      "control.collector.task.{type}.{id}",
    );
    assert.equal(topicsForPayload(ProcessEventSchema).length, 5);
  });

  test("PROCESS_EVENT_KIND_TOPICS maps every ProcessEventKind value", () => {
    const table = client.PROCESS_EVENT_KIND_TOPICS;
    assert.equal(table, generated.PROCESS_EVENT_KIND_TOPICS);
    const expected: Record<string, string> = {
      PROCESS_EVENT_KIND_UNSPECIFIED: "events.process.lifecycle",
      PROCESS_EVENT_KIND_START: "events.process.lifecycle",
      PROCESS_EVENT_KIND_STOP: "events.process.lifecycle",
      PROCESS_EVENT_KIND_EXIT: "events.process.lifecycle",
      PROCESS_EVENT_KIND_SNAPSHOT: "events.process.lifecycle",
      PROCESS_EVENT_KIND_METADATA_UPDATE: "events.process.metadata",
      PROCESS_EVENT_KIND_TREE_CHANGE: "events.process.tree",
      PROCESS_EVENT_KIND_INTEGRITY_CHECK: "events.process.integrity",
      PROCESS_EVENT_KIND_ANOMALY: "events.process.anomaly",
    };
    const values = ProcessEventKindSchema.values;
    assert.deepEqual(values.map((v) => v.name).sort(), Object.keys(expected).sort());
    assert.equal(table.size, values.length);
    for (const value of values) {
      const topic = table.get(value.number);
      assert.ok(topic !== undefined, value.name);
      assert.equal(topic.name, expected[value.name], value.name);
      assert.equal(topic.schema, ProcessEventSchema);
      assert.equal(generated.TOPICS.get(topic.name), topic);
    }
    assert.equal(table.get(ProcessEventKind.TREE_CHANGE), generated.EVENTS_PROCESS_TREE);
  });
});
