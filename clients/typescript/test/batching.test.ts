// Batched publishing against a fake broker whose Welcome sets `batches`: the
// first event of a turn leaves alone at once, the rest of the turn in
// PublishBatch frames sealed by a change of topic or correlation, by the
// broker's max_queue_messages, by any other frame, and at the end of the turn;
// in a burst a turn's first event waits for the rest of the turn.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { create, fromBinary } from "@bufbuild/protobuf";

import {
  EVENTS_PROCESS_LIFECYCLE,
  EVENTS_PROCESS_TREE,
  ProcessEventSchema,
  connect,
  type FrameInit,
} from "../src/index.js";
import type { Frame } from "../src/gen/daemoneye/eventbus/v1/frames_pb.js";
import { fakeBroker, standard, until, type Peer } from "./fake_broker.js";

const event = (pid: number) => create(ProcessEventSchema, { pid });
const turn = () => new Promise((resolve) => setImmediate(resolve));

function batchesWelcome(maxQueueMessages: number): FrameInit {
  return {
    case: "welcome",
    value: {
      protocolVersion: 1,
      sessionId: "0123456789abcdef",
      component: "procmond",
      batches: true,
      limits: { maxFrameBytes: 1 << 20, maxTopicBytes: 255, maxTopicLevels: 16, maxQueueMessages },
    },
  };
}

/** A broker that welcomes with batches (at most `maxEvents` per batch) and answers pings. */
async function batchBroker(maxEvents = 1000) {
  return fakeBroker((f, peer) => {
    if (f.kind.case === "hello") {
      peer.send(batchesWelcome(maxEvents));
    } else {
      standard()(f, peer);
    }
  });
}

/** What the peer received after the hello: `[kind, topic, correlation id, pids]` per frame. */
function received(peer: Peer): [string, string, string, number[]][] {
  return peer.frames.slice(1).map((f: Frame) => {
    const k = f.kind;
    if (k.case === "publishBatch") {
      return [
        "batch",
        k.value.topic,
        k.value.correlation?.correlationId ?? "",
        k.value.payloads.map((p) => fromBinary(ProcessEventSchema, p).pid),
      ];
    }
    if (k.case === "publish") {
      return [
        "publish",
        k.value.topic,
        k.value.correlation?.correlationId ?? "",
        [fromBinary(ProcessEventSchema, k.value.payload).pid],
      ];
    }
    return [k.case ?? "", "", "", []];
  });
}

describe("batched publishing against a fake broker", () => {
  test("the first event alone, the rest of the turn in batches of max_queue_messages", async () => {
    const fake = await batchBroker(5);
    const client = await connect(fake.path, { component: "procmond" });
    assert.deepEqual(client.features, { batches: true, requests: false });
    for (let pid = 1; pid <= 12; pid++) {
      await client.publish(EVENTS_PROCESS_LIFECYCLE, event(pid));
    }
    await client.flush();
    const peer = fake.peers[0] as Peer;
    const L = EVENTS_PROCESS_LIFECYCLE.name;
    assert.deepEqual(received(peer), [
      ["batch", L, "", [1]],
      ["batch", L, "", [2, 3, 4, 5, 6]],
      ["batch", L, "", [7, 8, 9, 10, 11]],
      ["batch", L, "", [12]], // sealed by the ping, which follows it
      ["ping", "", "", []],
    ]);
    assert.equal(client.statistics().published, 12);
    await client.close();
    await fake.close();
  });

  test("a new topic, correlation or payload type seals the batch; raw publishes join", async () => {
    const fake = await batchBroker();
    const client = await connect(fake.path, { component: "procmond" });
    const c1 = { correlationId: "c1", rootCorrelationId: "r" };
    const c2 = { correlationId: "c2", rootCorrelationId: "r" };
    await client.publish(EVENTS_PROCESS_LIFECYCLE, event(1)); // alone, at once
    await client.publish(EVENTS_PROCESS_LIFECYCLE, event(2));
    await client.publish(EVENTS_PROCESS_LIFECYCLE, event(3), { correlation: c1 });
    await client.publish(EVENTS_PROCESS_LIFECYCLE, event(4), { correlation: c1 });
    await client.publish(EVENTS_PROCESS_LIFECYCLE, event(5), { correlation: c2 });
    await client.publish(EVENTS_PROCESS_TREE, event(6), { correlation: c2 });
    await client.publishRaw(
      EVENTS_PROCESS_TREE.name,
      EVENTS_PROCESS_TREE.payloadName,
      Uint8Array.of(0x08, 7),
      { correlation: c2 },
    );
    client.publishNowait(EVENTS_PROCESS_TREE, event(8), { correlation: c2 });
    await client.publishRaw(EVENTS_PROCESS_TREE.name, "x.Other", Uint8Array.of(0x08, 9), {
      correlation: c2,
    });
    await client.flush();
    const L = EVENTS_PROCESS_LIFECYCLE.name;
    const T = EVENTS_PROCESS_TREE.name;
    const got = received(fake.peers[0] as Peer);
    assert.deepEqual(got, [
      ["batch", L, "", [1]],
      ["batch", L, "", [2]],
      ["batch", L, "c1", [3, 4]],
      ["batch", L, "c2", [5]],
      ["batch", T, "c2", [6, 7, 8]],
      ["batch", T, "c2", [9]],
      ["ping", "", "", []],
    ]);
    const last = fake.peers[0]?.frames.at(-2);
    assert.ok(last?.kind.case === "publishBatch");
    assert.equal(last.kind.value.payloadType, "x.Other");
    await client.close();
    await fake.close();
  });

  test("in a burst a turn's first event joins the batch; after a lone one it leaves at once", async () => {
    const fake = await batchBroker();
    const client = await connect(fake.path, { component: "procmond" });
    const publish = async (from: number, count: number) => {
      for (let pid = from; pid < from + count; pid++) {
        await client.publish(EVENTS_PROCESS_LIFECYCLE, event(pid));
      }
      await turn();
    };
    await publish(1, 10); // [1] at once, [2..10] at the end of the turn: a burst
    await publish(11, 10); // in the burst: one batch [11..20]
    await publish(21, 1); // still in the burst: [21] at the end of the turn, which ends it
    await publish(22, 1); // a lone event: at once
    await client.flush();
    const sizes = received(fake.peers[0] as Peer)
      .filter(([kind]) => kind === "batch")
      .map(([, , , pids]) => pids);
    assert.deepEqual(sizes, [
      [1],
      [2, 3, 4, 5, 6, 7, 8, 9, 10],
      [11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
      [21],
      [22],
    ]);
    await client.close();
    await fake.close();
  });

  test("subscribe and close seal the open batch first: frames leave in call order", async () => {
    const fake = await batchBroker();
    const client = await connect(fake.path, { component: "daemoneye-agent" });
    client.publishNowait(EVENTS_PROCESS_LIFECYCLE, event(1));
    client.publishNowait(EVENTS_PROCESS_LIFECYCLE, event(2));
    client.publishNowait(EVENTS_PROCESS_LIFECYCLE, event(3));
    const sub = client.subscribe("events.#");
    client.publishNowait(EVENTS_PROCESS_LIFECYCLE, event(4));
    await sub;
    client.publishNowait(EVENTS_PROCESS_LIFECYCLE, event(5));
    await client.close();
    const peer = fake.peers[0] as Peer;
    await until(() => peer.ended, "the end of the connection");
    assert.deepEqual(
      received(peer).map(([kind, , , pids]) => [kind, pids]),
      [
        ["batch", [1]],
        ["batch", [2, 3]],
        ["subscribe", []],
        ["batch", [4]],
        ["batch", [5]],
        ["ping", []],
        ["goodbye", []],
      ],
    );
    await fake.close();
  });
});
