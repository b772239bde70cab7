// Payloads that do not decode (behind a broker with validation off):
// ReceivedEvent.message() throws InvalidPayload, Subscription.messages()
// skips them, and the broker's refusal (ERROR_CODE_INVALID_PAYLOAD) maps to
// the same class. Deliveries are built directly, without a socket.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { create, toBinary } from "@bufbuild/protobuf";

import {
  Client,
  ErrorCode,
  EventBusError,
  EventQueue,
  InvalidPayload,
  PayloadTypeMismatch,
  ProcessEventSchema,
  ReceivedEvent,
  ServerError,
  Subscription,
  errorForCode,
  errorFromFrame,
} from "../src/index.js";
import {
  DeliverBatchSchema,
  DeliverSchema,
  ErrorSchema,
} from "../src/gen/daemoneye/eventbus/v1/frames_pb.js";

const TOPIC = "events.process.lifecycle";
const TYPE = "daemoneye.eventbus.v1.ProcessEvent";
const BAD = Uint8Array.of(0xff, 0xff, 0xff, 0xff);
const good = (pid: number) => toBinary(ProcessEventSchema, create(ProcessEventSchema, { pid }));

/** A subscription that no socket feeds: events come from `deliver`. */
function subscription(typed = true): Subscription<typeof ProcessEventSchema> {
  return new Subscription(
    new Client("/nonexistent/daemoneye.sock"),
    7,
    TOPIC,
    undefined,
    false,
    typed ? ProcessEventSchema : undefined,
    new EventQueue(100),
  );
}

function deliver(
  sub: Subscription<typeof ProcessEventSchema>,
  sequence: bigint,
  payload: Uint8Array,
  payloadType = TYPE,
): void {
  sub.deliver(
    create(DeliverSchema, {
      subscriptionId: sub.subscriptionId,
      sequence,
      publish: { topic: TOPIC, payloadType, payload },
    }),
  );
}

async function collect<T>(it: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const x of it) {
    out.push(x);
  }
  return out;
}

describe("InvalidPayload", () => {
  test("message() throws InvalidPayload with topic, payload type and sequence", () => {
    const event = new ReceivedEvent(TOPIC, TYPE, BAD, undefined, 5n, 7, ProcessEventSchema);
    assert.throws(
      () => event.message(),
      (err: unknown) => {
        assert.ok(err instanceof InvalidPayload);
        assert.ok(err instanceof EventBusError);
        assert.equal(err.name, "InvalidPayload");
        assert.equal(err.topic, TOPIC);
        assert.equal(err.payloadType, TYPE);
        assert.equal(err.sequence, 5n);
        assert.equal(err.subscriptionId, 7);
        assert.equal(err.code, ErrorCode.INVALID_PAYLOAD);
        assert.equal(err.codeName, "INVALID_PAYLOAD");
        assert.equal(err.fatal, false);
        assert.match(err.message, /#5 on "events\.process\.lifecycle" does not parse as/);
        assert.ok(err.cause instanceof Error); // the protobuf error
        return true;
      },
    );
    // Untyped: the schema comes from the registry, same error.
    const untyped = new ReceivedEvent(TOPIC, TYPE, BAD, undefined, 6n, 7);
    assert.throws(() => untyped.message(), InvalidPayload);
    // A payload that decodes still does; an unknown type is still a mismatch.
    assert.equal(
      new ReceivedEvent(TOPIC, TYPE, good(3), undefined, 1n, 7, ProcessEventSchema).message().pid,
      3,
    );
    const unknown = new ReceivedEvent(TOPIC, "x.Unknown", BAD, undefined, 1n, 7);
    assert.throws(() => unknown.message(), PayloadTypeMismatch);
  });

  test("messages() skips a bad event between two good ones, counting it", async () => {
    const sub = subscription();
    const skipped: InvalidPayload[] = [];
    sub.onInvalid = (err) => skipped.push(err);
    deliver(sub, 1n, good(1));
    deliver(sub, 2n, BAD);
    deliver(sub, 3n, good(3));
    sub.end();
    const got = await collect(sub.messages());
    assert.deepEqual(
      got.map(([event, message]) => [event.sequence, message.pid]),
      [
        [1n, 1],
        [3n, 3],
      ],
    );
    assert.equal(sub.invalid, 1);
    assert.equal(skipped.length, 1);
    assert.equal(skipped[0]?.sequence, 2n);
    assert.equal(skipped[0]?.topic, TOPIC);
    assert.equal(sub.received, 3);
  });

  test("messages() waits past a bad event for the next one", async () => {
    const sub = subscription();
    sub.onInvalid = () => undefined;
    const it = sub.messages()[Symbol.asyncIterator]();
    const next = it.next();
    deliver(sub, 1n, BAD);
    await new Promise((r) => setImmediate(r));
    deliver(sub, 2n, BAD);
    deliver(sub, 3n, good(3));
    const first = await next;
    assert.equal(first.done, false);
    assert.equal(first.value?.[1].pid, 3);
    assert.equal(sub.invalid, 2);
    sub.end();
    assert.equal((await it.next()).done, true);
  });

  test("without onInvalid, a skipped event is logged with console.warn", async (t) => {
    const warn = t.mock.method(console, "warn", () => undefined);
    const sub = subscription();
    sub.deliverBatch(
      create(DeliverBatchSchema, {
        subscriptionId: sub.subscriptionId,
        firstSequence: 1n,
        batch: { topic: TOPIC, payloadType: TYPE, payloads: [good(1), BAD, good(3)] },
      }),
    );
    sub.end();
    const got = await collect(sub.messages());
    assert.deepEqual(
      got.map(([, message]) => message.pid),
      [1, 3],
    );
    assert.equal(sub.invalid, 1);
    assert.equal(warn.mock.callCount(), 1);
    const line = String(warn.mock.calls[0]?.arguments[0]);
    assert.match(line, /^subscription events\.process\.lifecycle skipped an event: event #2 /);
    assert.ok(!line.includes("\n"));
  });

  test("plain iteration still yields undecoded events, bad ones included", async () => {
    const sub = subscription();
    deliver(sub, 1n, good(1));
    deliver(sub, 2n, BAD);
    sub.end();
    const events = await collect(sub);
    assert.deepEqual(
      events.map((e) => e.sequence),
      [1n, 2n],
    );
    assert.deepEqual([...(events[1]?.payload ?? [])], [...BAD]);
    assert.throws(() => events[1]?.message(), InvalidPayload);
    assert.equal(sub.invalid, 0);
  });

  test("messages() does not swallow other errors: an unknown payload type ends it", async () => {
    const sub = subscription(false);
    deliver(sub, 1n, good(1), "x.Unknown");
    sub.end();
    await assert.rejects(collect(sub.messages()), (err: unknown) => {
      assert.ok(err instanceof PayloadTypeMismatch);
      assert.match(err.message, /unknown payload type "x\.Unknown"/);
      return true;
    });
    assert.equal(sub.invalid, 0);
  });

  test("code 19 maps to InvalidPayload", () => {
    assert.equal(ErrorCode.INVALID_PAYLOAD, 19);
    const err = errorForCode(19, "refused", { topic: TOPIC });
    assert.ok(err instanceof InvalidPayload);
    assert.equal(err.code, ErrorCode.INVALID_PAYLOAD);
    assert.equal(err.topic, TOPIC);
    assert.equal(err.payloadType, "");
    assert.equal(err.sequence, 0n);
    const fromFrame = errorFromFrame(
      create(ErrorSchema, {
        code: ErrorCode.INVALID_PAYLOAD,
        message: "bad payload",
        topic: TOPIC,
      }),
    );
    assert.ok(fromFrame instanceof InvalidPayload);
    assert.equal(fromFrame.message, "bad payload (INVALID_PAYLOAD)");
    assert.equal(fromFrame.fatal, false);
    assert.ok(errorForCode(18, "internal") instanceof ServerError);
  });
});
