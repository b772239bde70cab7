// The shared wire vectors of tests/vectors/ (written by tests/vectors/generate.py),
// checked with protobuf-es and this client's framing: the same files are checked
// by the Python runtime in tests/test_vectors.py.

import assert from "node:assert/strict";
import { readFileSync, readdirSync } from "node:fs";
import { describe, test } from "node:test";

import { equals, fromBinary, fromJson, toBinary, toJson, type JsonValue } from "@bufbuild/protobuf";

import {
  FrameSchema,
  PublishSchema,
  type Frame,
} from "../src/gen/daemoneye/eventbus/v1/frames_pb.js";
import { PAYLOAD_REGISTRY } from "../src/gen/daemoneye/eventbus/v1/registry.js";
import {
  EventQueue,
  ReceivedEvent,
  RequestTimeout,
  Responder,
  Subscription,
  errorFromFrame,
} from "../src/index.js";
import { PendingRequests } from "../src/rpc.js";
import {
  ClientConnection,
  decodeLengthPrefix,
  delimit,
  encodeFrame,
  encodeVarint,
  publishFrameBody,
} from "../src/protocol.js";

const DIR = new URL("../../../tests/vectors/", import.meta.url);

interface Description {
  name: string;
  description: string;
  kind: string;
  size: number;
  hex: string;
  frame: JsonValue;
  payload?: JsonValue;
}

interface Vector {
  name: string;
  data: Uint8Array;
  json: Description;
}

function load(): Vector[] {
  const names = readdirSync(DIR)
    .filter((f) => f.endsWith(".json"))
    .map((f) => f.slice(0, -".json".length))
    .sort();
  return names.map((name) => ({
    name,
    data: new Uint8Array(readFileSync(new URL(`${name}.bin`, DIR))),
    json: JSON.parse(readFileSync(new URL(`${name}.json`, DIR), "utf8")) as Description,
  }));
}

const VECTORS = load();
const BROKER_TO_CLIENT = new Set([
  "welcome",
  "deliver",
  "deliver_batch",
  "subscribe_ack",
  "unsubscribe_ack",
  "stats_response",
  "request_deliver",
  "reply_deliver",
]);
const ALL_KINDS = FrameSchema.oneofs[0]?.fields.map((f) => f.name) ?? [];

function body(v: Vector): Uint8Array {
  const prefix = decodeLengthPrefix(v.data);
  assert.ok(prefix, "complete length prefix");
  const [length, start] = prefix;
  assert.equal(length, v.data.length - start, "the prefix covers exactly the rest of the file");
  assert.equal(start, encodeVarint(length).length, "the prefix is minimal");
  return v.data.subarray(start);
}

/** The proto name of the frame's kind, e.g. `subscribe_ack`. */
function kindName(frame: Frame): string | undefined {
  return FrameSchema.oneofs[0]?.fields.find((f) => f.localName === frame.kind.case)?.name;
}

function hex(bytes: Uint8Array): string {
  return Buffer.from(bytes).toString("hex");
}

function publishOf(frame: Frame) {
  if (frame.kind.case === "publish") {
    return frame.kind.value;
  }
  if (frame.kind.case === "deliver") {
    return frame.kind.value.publish;
  }
  return undefined;
}

describe("wire vectors", () => {
  test("every Frame.kind member has a vector", () => {
    assert.ok(ALL_KINDS.length === 21);
    assert.deepEqual(new Set(VECTORS.map((v) => v.json.kind)), new Set(ALL_KINDS));
  });

  test("a publish with correlation metadata and a deliver are covered", () => {
    const frames = VECTORS.map((v) => fromBinary(FrameSchema, body(v)));
    assert.ok(
      frames.some((f) => f.kind.case === "publish" && f.kind.value.correlation !== undefined),
    );
    assert.ok(frames.some((f) => f.kind.case === "deliver"));
  });

  test("batches: every payload decodes to the batch's payload type and back", () => {
    const batches = VECTORS.map((v) => fromBinary(FrameSchema, body(v)).kind).flatMap((k) =>
      k.case === "publishBatch" ? [k.value] : k.case === "deliverBatch" ? [k.value.batch] : [],
    );
    assert.equal(batches.length, 3);
    for (const batch of batches) {
      assert.ok(batch && batch.payloads.length >= 2);
      const schema = PAYLOAD_REGISTRY.getMessage(batch.payloadType);
      assert.ok(schema, `payload type ${batch.payloadType} is in the registry`);
      for (const payload of batch.payloads) {
        assert.equal(hex(toBinary(schema, fromBinary(schema, payload))), hex(payload));
      }
    }
  });

  test("stamped deliveries: exact event ids, receive times and the retained flag", () => {
    const frames = new Map(VECTORS.map((v) => [v.name, fromBinary(FrameSchema, body(v))]));
    const events: ReceivedEvent[] = [];
    const owner = { unsubscribe: () => Promise.resolve(), grantCredit: () => undefined };
    const sub = (id: number) =>
      new Subscription(owner, id, "#", undefined, false, undefined, new EventQueue(100));
    for (const name of [
      "deliver_stamped",
      "deliver_retained",
      "deliver_batch_stamped",
      "deliver",
    ]) {
      const kind = frames.get(name)?.kind;
      assert.ok(kind, name);
      const s = sub(kind.value && "subscriptionId" in kind.value ? kind.value.subscriptionId : 0);
      if (kind.case === "deliver") {
        s.deliver(kind.value);
      } else if (kind.case === "deliverBatch") {
        s.deliverBatch(kind.value);
      }
      for (let e = s.getNowait(); e !== undefined; e = s.getNowait()) {
        events.push(e);
      }
    }
    const ns = 1767323045000000006n; // 2026-01-02T03:04:05.000000006Z: beyond 2^53
    assert.deepEqual(
      events.map((e) => [e.eventId, e.receivedAtNs, e.retained, e.sequence]),
      [
        [1000n, ns, false, 42n],
        [17n, ns, true, 1n],
        [1000n, ns, false, 42n],
        [1001n, ns, false, 43n],
        [0n, 0n, false, 42n], // a broker without stamps
      ],
    );
    assert.equal(events[0]?.receivedAt?.toISOString(), "2026-01-02T03:04:05.000Z");
    assert.equal(events[4]?.receivedAt, undefined);
    assert.equal(events[1]?.topic, "control.health.status");
  });

  const named = (name: string) => VECTORS.find((v) => v.name === name);
  const requestVectors = ["request_deliver", "reply_deliver", "error_request"].every(named);

  test(
    "request/reply vectors reach the responder and the requester",
    { skip: requestVectors ? false : "no request/reply vectors yet" },
    async () => {
      const frameOf = (name: string) => {
        const v = named(name);
        assert.ok(v);
        return fromBinary(FrameSchema, body(v)).kind;
      };
      const deliver = frameOf("request_deliver");
      assert.ok(deliver.case === "requestDeliver");
      const replies: unknown[][] = [];
      const owner = {
        sendReply: (...args: unknown[]) => replies.push(args) > 0,
        stopServing: () => Promise.resolve(),
      };
      const responder = new Responder(
        owner,
        3,
        "control.collector.rpc.health.+",
        undefined,
        undefined,
        10,
      );
      responder.deliver(deliver.value, 1);
      const req = responder.getNowait();
      assert.ok(req);
      assert.deepEqual(
        [req.token, req.eventId, req.receivedAtNs, req.requester, req.topic],
        [
          7n,
          42n,
          1714564800123456789n,
          "daemoneye-agent",
          "control.collector.rpc.health.procmond-1",
        ],
      );
      assert.equal((req.message as unknown as { componentId: string }).componentId, "procmond-1");
      assert.ok(req.remaining > 1900 && req.remaining <= 2000);
      assert.equal(await req.fail("no"), true);
      assert.deepEqual(replies, [[1, 7n, "", new Uint8Array(), "no"]]);

      const pending = new PendingRequests();
      const first = pending.open("control.collector.rpc.health.procmond-1", 5000);
      const second = pending.open("control.collector.rpc.health.procmond-1", 5000);
      assert.deepEqual([first.id, second.id], [1n, 2n]);
      const reply = frameOf("reply_deliver");
      assert.ok(reply.case === "replyDeliver");
      assert.equal(pending.replied(reply.value), true);
      const got = await first.reply;
      assert.equal(got.responder, "procmond");
      assert.equal(got.payloadType, "daemoneye.eventbus.v1.HealthCheckReply");
      const timeout = frameOf("error_request");
      assert.ok(timeout.case === "error");
      const exc = errorFromFrame({ ...timeout.value, requestId: 2n });
      assert.ok(exc instanceof RequestTimeout);
      assert.equal(pending.fail(exc.requestId, exc), true);
      await assert.rejects(second.reply, RequestTimeout);
      assert.equal(pending.size, 0);
    },
  );

  for (const v of VECTORS) {
    describe(v.name, () => {
      test("header fields", () => {
        assert.equal(v.json.name, v.name);
        assert.equal(v.json.size, v.data.length);
        assert.equal(v.json.hex, hex(v.data));
      });

      test("decodes and re-encodes to the same bytes", () => {
        const b = body(v);
        const frame = fromBinary(FrameSchema, b);
        assert.equal(kindName(frame), v.json.kind);
        assert.equal(hex(toBinary(FrameSchema, frame)), hex(b));
        assert.equal(hex(encodeFrame(frame)), hex(v.data));
      });

      test("matches its JSON description, both ways", () => {
        const frame = fromBinary(FrameSchema, body(v));
        assert.deepEqual(toJson(FrameSchema, frame), v.json.frame);
        const parsed = fromJson(FrameSchema, v.json.frame);
        assert.ok(equals(FrameSchema, parsed, frame));
        assert.equal(hex(toBinary(FrameSchema, parsed)), hex(body(v)));
      });

      test("payload matches its JSON description", () => {
        const pub = publishOf(fromBinary(FrameSchema, body(v)));
        if (pub === undefined) {
          assert.equal(v.json.payload, undefined);
          return;
        }
        const schema = PAYLOAD_REGISTRY.getMessage(pub.payloadType);
        assert.ok(schema, `payload type ${pub.payloadType} is in the registry`);
        const payload = fromBinary(schema, pub.payload);
        assert.deepEqual(toJson(schema, payload), v.json.payload);
        assert.equal(hex(toBinary(schema, payload)), hex(pub.payload));
      });

      test("the client's receiver parses it, whole and byte by byte", () => {
        for (const step of [v.data.length, 1]) {
          const conn = new ClientConnection();
          const welcome = VECTORS.find((w) => w.name === "welcome");
          assert.ok(welcome);
          let frames: Frame[] = [];
          if (v.json.kind !== "welcome" && v.json.kind !== "error") {
            frames.push(...conn.receiveData(welcome.data));
          }
          for (let i = 0; i < v.data.length; i += step) {
            frames.push(...conn.receiveData(v.data.subarray(i, i + step)));
          }
          if (v.json.kind !== "welcome" && v.json.kind !== "error") {
            frames = frames.slice(1);
          }
          if (
            BROKER_TO_CLIENT.has(v.json.kind) ||
            ["ping", "pong", "error", "goodbye"].includes(v.json.kind)
          ) {
            assert.equal(conn.error, undefined, conn.error?.message);
            assert.deepEqual(frames.map(kindName), [v.json.kind]);
          } else {
            // A client-to-broker frame arriving at a client is a violation [protocol §2].
            assert.equal(conn.error?.code, 3 /* UNEXPECTED_FRAME */);
            assert.deepEqual(frames, []);
          }
        }
      });

      if (["request", "reply", "subscribe"].includes(v.json.kind)) {
        test(`the client's ${v.json.kind} frame has the same bytes`, () => {
          const frame = fromBinary(FrameSchema, body(v));
          const conn = new ClientConnection();
          const welcome = VECTORS.find((w) => w.name === "welcome");
          assert.ok(welcome);
          conn.receiveData(welcome.data);
          assert.equal(hex(conn.send(frame)), hex(v.data));
        });
      }

      if (v.json.kind === "credit") {
        test("the client's Credit frame has the same bytes", () => {
          const frame = fromBinary(FrameSchema, body(v));
          assert.equal(frame.kind.case, "credit");
          const conn = new ClientConnection();
          const welcome = VECTORS.find((w) => w.name === "welcome");
          assert.ok(welcome);
          conn.receiveData(welcome.data);
          assert.equal(hex(conn.send(frame)), hex(v.data));
        });
      }

      if (v.json.kind === "publish") {
        test("the client's publish encoder produces the same bytes", () => {
          const frame = fromBinary(FrameSchema, body(v));
          assert.equal(frame.kind.case, "publish");
          const inner = toBinary(PublishSchema, frame.kind.value);
          assert.equal(hex(delimit(publishFrameBody(inner))), hex(v.data));
        });
      }
    });
  }
});
