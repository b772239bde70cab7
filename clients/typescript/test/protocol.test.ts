// The sans-I/O framing and state machine of the client [protocol §1, §2].

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { create, toBinary } from "@bufbuild/protobuf";

import { ErrorCode, FrameSchema, type Frame } from "../src/gen/daemoneye/eventbus/v1/frames_pb.js";
import { LocalProtocolError, RemoteProtocolError } from "../src/errors.js";
import {
  ClientConnection,
  CreditCounter,
  DEFAULT_MAX_FRAME_BYTES,
  HANDSHAKE_MAX_FRAME_BYTES,
  MAX_UINT32,
  creditThreshold,
  decodeLengthPrefix,
  delimit,
  encodeFrame,
  encodeVarint,
  frame,
} from "../src/protocol.js";

const WELCOME = encodeFrame(
  frame({
    case: "welcome",
    value: { protocolVersion: 1, sessionId: "0123456789abcdef", limits: { maxFrameBytes: 64 } },
  }),
);
const PING = encodeFrame(frame({ case: "ping", value: { nonce: 5n } }));

function concat(...parts: Uint8Array[]): Uint8Array {
  return new Uint8Array(Buffer.concat(parts));
}

function open(limit = 64): ClientConnection {
  const conn = new ClientConnection();
  assert.equal(conn.receiveData(WELCOME).length, 1);
  conn.maxFrameBytes = limit;
  assert.equal(conn.state, "open");
  return conn;
}

describe("varints", () => {
  test("encode minimal varints", () => {
    assert.deepEqual([...encodeVarint(0)], [0]);
    assert.deepEqual([...encodeVarint(127)], [0x7f]);
    assert.deepEqual([...encodeVarint(128)], [0x80, 0x01]);
    assert.deepEqual([...encodeVarint(1048576)], [0x80, 0x80, 0x40]);
    assert.deepEqual([...encodeVarint(2 ** 35 - 1)], [0xff, 0xff, 0xff, 0xff, 0x7f]);
    assert.throws(() => encodeVarint(-1), RangeError);
  });

  test("decode prefixes, incomplete ones and non-minimal ones", () => {
    assert.deepEqual(decodeLengthPrefix(Uint8Array.of(0x18)), [24, 1]);
    assert.deepEqual(decodeLengthPrefix(Uint8Array.of(0x80, 0x80, 0x40)), [1048576, 3]);
    assert.equal(decodeLengthPrefix(Uint8Array.of(0x80, 0x80)), undefined);
    assert.deepEqual(decodeLengthPrefix(Uint8Array.of(0x85, 0x80, 0x80, 0x00)), [5, 4]);
    assert.deepEqual(decodeLengthPrefix(Uint8Array.of(9, 0x85, 0x00), 1), [5, 3]);
  });

  test("a 5th byte with the continuation bit is FRAME_TOO_LARGE at once", () => {
    assert.equal(decodeLengthPrefix(Uint8Array.of(0x80, 0x80, 0x80, 0x80)), undefined);
    assert.throws(
      () => decodeLengthPrefix(Uint8Array.of(0x80, 0x80, 0x80, 0x80, 0x80)),
      (err: unknown) =>
        err instanceof RemoteProtocolError && err.code === ErrorCode.FRAME_TOO_LARGE,
    );
  });
});

describe("ClientConnection", () => {
  test("handshake: welcome opens; the full limit applies from the next frame, same read", () => {
    const conn = new ClientConnection();
    assert.equal(conn.state, "connecting");
    assert.equal(conn.frameLimit, HANDSHAKE_MAX_FRAME_BYTES);
    const big = encodeFrame(frame({ case: "goodbye", value: { reason: "x".repeat(5000) } }));
    const frames = conn.receiveData(concat(WELCOME, big));
    assert.equal(conn.error, undefined);
    assert.deepEqual(
      frames.map((f) => f.kind.case),
      ["welcome", "goodbye"],
    );
    assert.equal(conn.frameLimit, DEFAULT_MAX_FRAME_BYTES);
    assert.equal(conn.state, "closing");
  });

  test("the handshake limit applies to the welcome itself", () => {
    const conn = new ClientConnection();
    const welcome = encodeFrame(frame({ case: "welcome", value: { sessionId: "x".repeat(5000) } }));
    assert.deepEqual(conn.receiveData(welcome), []);
    assert.equal(conn.error?.code, ErrorCode.FRAME_TOO_LARGE);
  });

  test("frames split at every byte are reassembled", () => {
    const conn = open(1024);
    const data = concat(PING, PING, encodeFrame(frame({ case: "pong", value: { nonce: 7n } })));
    const got: Frame[] = [];
    for (let i = 0; i < data.length; i++) {
      got.push(...conn.receiveData(data.subarray(i, i + 1)));
    }
    assert.deepEqual(
      got.map((f) => f.kind.case),
      ["ping", "ping", "pong"],
    );
    assert.equal(conn.bufferedInput, 0);
  });

  test("a declared length over the limit fails before any body byte arrives", () => {
    const conn = open(64);
    const frames = conn.receiveData(concat(PING, encodeVarint(65)));
    assert.deepEqual(
      frames.map((f) => f.kind.case),
      ["ping"],
    );
    assert.equal(conn.error?.code, ErrorCode.FRAME_TOO_LARGE);
    assert.equal(conn.state, "closing");
  });

  test("the frames before a violation in the same read are kept", () => {
    const conn = open(64);
    const frames = conn.receiveData(concat(PING, Uint8Array.of(0), PING));
    assert.deepEqual(
      frames.map((f) => f.kind.case),
      ["ping"],
    );
    assert.equal(conn.error?.code, ErrorCode.MALFORMED_FRAME);
    assert.deepEqual(conn.receiveData(PING), [], "nothing is read after a violation");
  });

  test("a body exactly at the limit is allowed", () => {
    const reason = "r".repeat(60);
    const body = toBinary(FrameSchema, frame({ case: "goodbye", value: { reason } }));
    const conn = open(body.length);
    assert.equal(conn.receiveData(delimit(body)).length, 1);
    assert.equal(conn.error, undefined);
  });

  test("undecodable bodies and bodies without a kind are MALFORMED_FRAME", () => {
    for (const bad of [Uint8Array.of(0x0a, 0x05, 0x08), Uint8Array.of(0x78, 0x01)]) {
      const conn = open();
      conn.receiveData(delimit(bad));
      assert.equal(conn.error?.code, ErrorCode.MALFORMED_FRAME, Buffer.from(bad).toString("hex"));
    }
  });

  test("a frame the broker may not send is UNEXPECTED_FRAME", () => {
    const conn = open();
    conn.receiveData(
      encodeFrame(frame({ case: "subscribe", value: { subscriptionId: 1, filter: "#" } })),
    );
    assert.equal(conn.error?.code, ErrorCode.UNEXPECTED_FRAME);
    const early = new ClientConnection();
    early.receiveData(PING);
    assert.equal(early.error?.code, ErrorCode.UNEXPECTED_FRAME, "ping before welcome");
    const second = open();
    second.receiveData(WELCOME);
    assert.equal(second.error?.code, ErrorCode.UNEXPECTED_FRAME, "a second welcome");
  });

  test("a fatal error or a goodbye closes; what follows is discarded", () => {
    const conn = new ClientConnection();
    const fatal = encodeFrame(
      frame({
        case: "error",
        value: { code: ErrorCode.CONNECTION_LIMIT, message: "full", fatal: true },
      }),
    );
    const frames = conn.receiveData(concat(fatal, WELCOME));
    assert.deepEqual(
      frames.map((f) => f.kind.case),
      ["error"],
    );
    assert.equal(conn.state, "closing");
    assert.equal(conn.error, undefined);
  });

  test("send checks the state and the limit", () => {
    const conn = new ClientConnection();
    assert.throws(() => conn.send(frame({ case: "ping", value: {} })), LocalProtocolError);
    const hello = conn.send(frame({ case: "hello", value: { protocolVersion: 1 } }));
    assert.deepEqual([...hello], [0x04, 0x0a, 0x02, 0x08, 0x01]);
    const opened = open(16);
    assert.throws(
      () => opened.send(frame({ case: "goodbye", value: { reason: "x".repeat(20) } })),
      LocalProtocolError,
    );
    assert.throws(() => opened.send(create(FrameSchema)), LocalProtocolError);
    opened.send(frame({ case: "goodbye", value: { reason: "bye" } }));
    assert.equal(opened.state, "closing");
    assert.throws(() => opened.send(PING_FRAME), LocalProtocolError);
  });
});

const PING_FRAME = frame({ case: "ping", value: { nonce: 1n } });

describe("credit-based delivery", () => {
  test("the threshold is a quarter of the window, at least 1", () => {
    const cases: [number, number][] = [
      [1, 1],
      [3, 1],
      [4, 1],
      [7, 1],
      [8, 2],
      [11, 2],
      [256, 64],
      [10_000, 2500],
      [MAX_UINT32, 1073741823],
    ];
    for (const [window, threshold] of cases) {
      assert.equal(creditThreshold(window), threshold, `window ${window}`);
      assert.equal(new CreditCounter(window).threshold, threshold);
    }
  });

  test("a counter grants what was taken once it reaches the threshold, then starts again", () => {
    const counter = new CreditCounter(10); // threshold 2
    const grants = Array.from({ length: 7 }, () => counter.take());
    assert.deepEqual(grants, [0, 2, 0, 2, 0, 2, 0]);
    assert.deepEqual([counter.granted, counter.grants, counter.pending], [6, 3, 1]);
    const one = new CreditCounter(1);
    assert.deepEqual([one.take(), one.take(), one.pending], [1, 1, 0]);
    for (const bad of [0, -1, 2.5, MAX_UINT32 + 1, Number.NaN]) {
      assert.throws(() => new CreditCounter(bad), RangeError, String(bad));
    }
  });

  test("Credit, Hello.credit, Subscribe.lossless/window and SubscribeAck on the wire", () => {
    const conn = open(1024);
    // Frame.credit = 17 (0x8a 0x01), Credit{subscription_id = 3, events = 250}.
    const credit = conn.send(frame({ case: "credit", value: { subscriptionId: 3, events: 250 } }));
    assert.deepEqual([...credit], [0x08, 0x8a, 0x01, 0x05, 0x08, 0x03, 0x10, 0xfa, 0x01]);
    // Hello.accept_batches = 4 and Hello.credit = 5.
    const hello = new ClientConnection().send(
      frame({ case: "hello", value: { protocolVersion: 1, acceptBatches: true, credit: true } }),
    );
    assert.deepEqual([...hello], [0x08, 0x0a, 0x06, 0x08, 0x01, 0x20, 0x01, 0x28, 0x01]);
    // Subscribe.lossless = 5 and Subscribe.window = 6 (300).
    const subscribe = conn.send(
      frame({
        case: "subscribe",
        value: { subscriptionId: 1, filter: "#", lossless: true, window: 300 },
      }),
    );
    assert.deepEqual(
      [...subscribe],
      [0x0c, 0x2a, 0x0a, 0x08, 0x01, 0x12, 0x01, 0x23, 0x28, 0x01, 0x30, 0xac, 0x02],
    );
    // SubscribeAck{subscription_id = 7, window = 128, lossless = true}, from the broker.
    const ack = Uint8Array.of(0x09, 0x32, 0x07, 0x08, 0x07, 0x10, 0x80, 0x01, 0x18, 0x01);
    const [decoded] = conn.receiveData(ack);
    assert.ok(decoded?.kind.case === "subscribeAck");
    assert.deepEqual(
      [decoded.kind.value.subscriptionId, decoded.kind.value.window, decoded.kind.value.lossless],
      [7, 128, true],
    );
    assert.equal(conn.error, undefined);
  });

  test("Credit only once open, and only from the client", () => {
    const early = new ClientConnection();
    assert.throws(
      () => early.send(frame({ case: "credit", value: { subscriptionId: 1, events: 1 } })),
      LocalProtocolError,
    );
    const conn = open();
    conn.receiveData(
      encodeFrame(frame({ case: "credit", value: { subscriptionId: 1, events: 1 } })),
    );
    assert.equal(conn.error?.code, ErrorCode.UNEXPECTED_FRAME);
  });
});
