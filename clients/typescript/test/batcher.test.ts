// The publish encoder and the batcher (src/batcher.ts), sans I/O: their bytes
// against the shared wire vectors of tests/vectors/ and against protobuf-es,
// and the rules that seal a batch. The reconnection back-off (src/reconnect.ts)
// is pure too and tested here.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, test } from "node:test";

import { create, toBinary } from "@bufbuild/protobuf";

import {
  BATCH_BYTES,
  DEFAULT_RECONNECT,
  LimitExceeded,
  LocalProtocolError,
  PublishBatcher,
  batchBudget,
  decodeFrameBody,
  decodeLengthPrefix,
  encodeFrame,
  encodePublish,
  frame,
  publishHeader,
  reconnectDelay,
  reconnectPolicy,
} from "../src/index.js";
import {
  CorrelationMetadataSchema,
  type CorrelationMetadata,
} from "../src/gen/daemoneye/eventbus/v1/correlation_pb.js";
import { PublishBatchSchema } from "../src/gen/daemoneye/eventbus/v1/frames_pb.js";

const TOPIC = "events.process.lifecycle";
const TYPE = "daemoneye.eventbus.v1.ProcessEvent";

function vector(name: string): Uint8Array {
  return new Uint8Array(
    readFileSync(new URL(`../../../tests/vectors/${name}.bin`, import.meta.url)),
  );
}

function decoded(data: Uint8Array) {
  const prefix = decodeLengthPrefix(data);
  assert.ok(prefix);
  return decodeFrameBody(data.subarray(prefix[1])).kind;
}

const hex = (b: Uint8Array) => Buffer.from(b).toString("hex");

/** The bytes protobuf-es writes for a PublishBatch frame. */
function batchFrame(payloads: Uint8Array[], correlation?: CorrelationMetadata, topic = TOPIC) {
  return encodeFrame(
    frame({
      case: "publishBatch",
      value: create(PublishBatchSchema, { topic, payloadType: TYPE, payloads, correlation }),
    }),
  );
}

describe("publish encoding", () => {
  test("a batch of the vector's three events has the vector's bytes", () => {
    const data = vector("publish_batch");
    const kind = decoded(data);
    assert.ok(kind.case === "publishBatch");
    const batch = kind.value;
    assert.ok(batch.correlation);
    const correlation = toBinary(CorrelationMetadataSchema, batch.correlation);
    const batcher = new PublishBatcher(batchBudget(1 << 20));
    const header = publishHeader(batch.topic, batch.payloadType);
    for (const payload of batch.payloads) {
      assert.equal(batcher.add(header, payload, correlation), undefined);
    }
    assert.equal(batcher.pendingEvents, 3);
    const sealed = batcher.seal();
    assert.ok(sealed);
    assert.equal(sealed.events, 3);
    assert.equal(hex(sealed.frame), hex(data));
    assert.equal(batcher.pendingEvents, 0);
    assert.equal(batcher.pendingBytes, 0);
  });

  test("a publish of the vectors has their bytes", () => {
    for (const name of ["publish", "publish_correlation"]) {
      const data = vector(name);
      const kind = decoded(data);
      assert.ok(kind.case === "publish");
      const pub = kind.value;
      const correlation =
        pub.correlation === undefined
          ? undefined
          : toBinary(CorrelationMetadataSchema, pub.correlation);
      const bytes = encodePublish(
        publishHeader(pub.topic, pub.payloadType),
        pub.payload,
        correlation,
        1 << 20,
      );
      assert.equal(hex(bytes), hex(data), name);
    }
  });

  test("a batch of one, and empty payloads, as protobuf-es writes them", () => {
    const batcher = new PublishBatcher(batchBudget(1 << 20));
    const header = publishHeader(TOPIC, TYPE);
    const one = batcher.single(header, Uint8Array.of(8, 1));
    assert.equal(hex(one), hex(batchFrame([Uint8Array.of(8, 1)])));
    assert.equal(
      hex(batcher.single(header, new Uint8Array())),
      hex(batchFrame([new Uint8Array()])),
    );
    batcher.add(header, new Uint8Array());
    batcher.add(header, new Uint8Array());
    assert.equal(
      hex(batcher.seal()?.frame ?? new Uint8Array()),
      hex(batchFrame([new Uint8Array(), new Uint8Array()])),
    );
    batcher.add(header, Uint8Array.of(1));
    assert.throws(() => batcher.single(header, Uint8Array.of(2)), LocalProtocolError);
  });

  test("a frame of every size up to several varint bytes decodes back", () => {
    const header = publishHeader(TOPIC, TYPE);
    for (const size of [0, 1, 100, 127, 128, 16_383, 16_384, 70_000]) {
      const payload = new Uint8Array(size).fill(7);
      const batcher = new PublishBatcher(batchBudget(1 << 20), 1 << 20);
      batcher.add(header, payload);
      batcher.add(header, payload);
      assert.equal(
        hex(batcher.seal()?.frame ?? new Uint8Array()),
        hex(batchFrame([payload, payload])),
      );
    }
  });
});

describe("PublishBatcher sealing rules", () => {
  const header = publishHeader(TOPIC, TYPE);
  const other = publishHeader("events.process.tree", TYPE);
  const corr = (id: string) =>
    toBinary(
      CorrelationMetadataSchema,
      create(CorrelationMetadataSchema, { correlationId: id, rootCorrelationId: id }),
    );

  test("a new topic or correlation seals the open batch first", () => {
    const batcher = new PublishBatcher(batchBudget(1 << 20));
    assert.equal(batcher.add(header, Uint8Array.of(1)), undefined);
    assert.equal(batcher.add(header, Uint8Array.of(2)), undefined);
    const first = batcher.add(other, Uint8Array.of(3));
    assert.equal(first?.events, 2);
    assert.equal(
      hex(first?.frame ?? new Uint8Array()),
      hex(batchFrame([Uint8Array.of(1), Uint8Array.of(2)])),
    );
    const second = batcher.add(other, Uint8Array.of(4), corr("a"));
    assert.equal(second?.events, 1);
    assert.equal(batcher.add(other, Uint8Array.of(5), corr("a")), undefined, "equal bytes join");
    assert.equal(batcher.add(other, Uint8Array.of(6), corr("b"))?.events, 2);
    assert.equal(batcher.add(other, Uint8Array.of(7))?.events, 1, "none after some");
    assert.equal(batcher.seal()?.events, 1);
    assert.equal(batcher.seal(), undefined);
  });

  test("a batch holds at most maxEvents events and target bytes", () => {
    const byCount = new PublishBatcher(batchBudget(1 << 20), BATCH_BYTES, 3);
    const sealed = [];
    for (let i = 0; i < 10; i++) {
      const s = byCount.add(header, Uint8Array.of(i));
      if (s) {
        sealed.push(s.events);
      }
    }
    assert.deepEqual(sealed, [3, 3, 3]);
    assert.equal(byCount.pendingEvents, 1);

    const bySize = new PublishBatcher(batchBudget(1 << 20), 1000);
    const payload = new Uint8Array(300);
    const sizes = [];
    for (let i = 0; i < 7; i++) {
      const s = bySize.add(header, payload);
      if (s) {
        sizes.push(s.events);
        assert.ok(s.frame.length <= 1000 + 10);
      }
    }
    assert.deepEqual(sizes, [3, 3]); // the header and three payloads of 303 bytes fit 1000
  });

  test("an event too large to travel even alone is refused, nothing changes", () => {
    const limit = 4096;
    const batcher = new PublishBatcher(batchBudget(limit));
    batcher.add(header, Uint8Array.of(1));
    assert.throws(() => batcher.add(header, new Uint8Array(limit)), LimitExceeded);
    assert.throws(
      () => batcher.single(publishHeader(TOPIC, TYPE), new Uint8Array(limit)),
      LocalProtocolError,
    );
    assert.equal(batcher.pendingEvents, 1);
    // The largest that fits: the frame body is then at most the limit.
    const room = batchBudget(limit) - header.topic.length - header.payloadType.length - 3;
    batcher.seal();
    const frameBytes = batcher.single(header, new Uint8Array(room));
    const prefix = decodeLengthPrefix(frameBytes);
    assert.ok(prefix && prefix[0] <= limit);
    assert.throws(
      () => encodePublish(header, new Uint8Array(limit), undefined, limit),
      LimitExceeded,
    );
    const kind = decoded(frameBytes);
    assert.ok(kind.case === "publishBatch");
    assert.equal(kind.value.payloads[0]?.length, room);
  });
});

describe("reconnection back-off", () => {
  test("off unless asked; defaults as the Python client, with jitter", () => {
    assert.equal(reconnectPolicy(undefined), undefined);
    assert.equal(reconnectPolicy(false), undefined);
    assert.deepEqual(reconnectPolicy(true), DEFAULT_RECONNECT);
    assert.deepEqual(
      { ...reconnectPolicy({ initialDelayMs: 10, maxDelayMs: 50, jitter: 0, maxAttempts: 3 }) },
      { initialDelayMs: 10, maxDelayMs: 50, jitter: 0, maxAttempts: 3 },
    );
    for (const bad of [
      { initialDelayMs: -1 },
      { initialDelayMs: 100, maxDelayMs: 50 },
      { jitter: 1.5 },
      { jitter: Number.NaN },
      { maxAttempts: 0 },
    ]) {
      assert.throws(() => reconnectPolicy(bad), RangeError, JSON.stringify(bad));
    }
  });

  test("doubles from the initial delay up to the maximum; jitter only shortens", () => {
    const policy = reconnectPolicy({ initialDelayMs: 100, maxDelayMs: 1000, jitter: 0.5 });
    assert.ok(policy);
    const none = () => 0;
    assert.deepEqual(
      [0, 1, 2, 3, 4, 5, 60, 5000].map((n) => reconnectDelay(policy, n, none)),
      [100, 200, 400, 800, 1000, 1000, 1000, 1000],
    );
    const most = () => 0.999_999;
    assert.ok(Math.abs(reconnectDelay(policy, 0, most) - 50) < 0.01);
    for (let i = 0; i < 200; i++) {
      const d = reconnectDelay(policy, 3);
      assert.ok(d > 400 && d <= 800, String(d));
    }
  });
});
