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
