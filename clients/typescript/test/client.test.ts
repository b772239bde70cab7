// The client against a scripted fake broker on a Unix socket: handshake,
// heartbeats, coalesced writes, close order, errors, violations. The real
// broker is exercised by tests/test_interop.py.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, test } from "node:test";

import { create, fromBinary } from "@bufbuild/protobuf";

import {
  BrokenResourceError,
  ClosedResourceError,
  EVENTS_PROCESS_LIFECYCLE,
  ErrorCode,
  InvalidPayload,
  LimitExceeded,
  PayloadTypeMismatch,
  ProcessEventSchema,
  RequestTimeout,
  connect,
  decodeFrameBody,
  decodeLengthPrefix,
} from "../src/index.js";
import {
  PublishBatchSchema,
  PublishSchema,
  SubscribeAckSchema,
} from "../src/gen/daemoneye/eventbus/v1/frames_pb.js";
import { DIR, WELCOME, fakeBroker, standard, until, type Peer, type Reply } from "./fake_broker.js";

const event = (pid: number) => create(ProcessEventSchema, { pid, name: `p${pid}` });

describe("client against a fake broker", () => {
  test("handshake claims the component and keeps the limits", async () => {
    const fake = await fakeBroker(standard());
    const client = await connect(fake.path, { name: "unit", component: "procmond" });
    const hello = fake.peers[0]?.frames[0];
    assert.equal(hello?.kind.case, "hello");
    assert.deepEqual(
      hello?.kind.case === "hello" && [
        hello.kind.value.protocolVersion,
        hello.kind.value.clientName,
        hello.kind.value.component,
        hello.kind.value.acceptBatches,
      ],
      [1, "unit", "procmond", true],
    );
    assert.equal(client.sessionId, "0123456789abcdef");
    assert.equal(client.acceptedComponent, "procmond");
    assert.equal(client.limits?.maxFrameBytes, 1 << 20);
    assert.ok(client.isConnected);
    await client.close();
    await fake.close();
  });

  test("a fatal error in place of welcome rejects connect with a typed error", async () => {
    const fake = await fakeBroker((f, peer) => {
      if (f.kind.case === "hello") {
        peer.send({
          case: "error",
          value: { code: ErrorCode.CONNECTION_LIMIT, message: "full", fatal: true },
        });
      }
    });
    await assert.rejects(connect(fake.path), (err: unknown) => {
      assert.ok(err instanceof LimitExceeded);
      assert.equal(err.code, ErrorCode.CONNECTION_LIMIT);
      assert.equal(err.codeName, "CONNECTION_LIMIT");
      assert.equal(err.fatal, true);
      return true;
    });
    await fake.close();
  });

  test("no broker, and a broker that never answers", async () => {
    await assert.rejects(connect(join(DIR, "nothing.sock")), (err: unknown) => {
      assert.ok(err instanceof BrokenResourceError);
      assert.match(err.message, /no broker at/);
      return true;
    });
    const silent = await fakeBroker(() => undefined);
    await assert.rejects(connect(silent.path, { connectTimeoutMs: 100 }), RequestTimeout);
    await silent.close();
  });

  test("answers the broker's pings with the same nonce", async () => {
    const fake = await fakeBroker(
      standard((f, peer) => {
        if (f.kind.case === "hello") {
          peer.send({ case: "ping", value: { nonce: 18446744073709551615n } });
        }
      }),
    );
    const client = await connect(fake.path);
    const peer = fake.peers[0];
    assert.ok(peer);
    await until(() => peer.kinds().includes("pong"), "a pong");
    const pong = peer.frames.find((f) => f.kind.case === "pong");
    assert.equal(pong?.kind.case === "pong" && pong.kind.value.nonce, 18446744073709551615n);
    await client.close();
    await fake.close();
  });

  test("coalesces publishes into few writes; flush is a ping round trip", async () => {
    const fake = await fakeBroker(standard());
    const client = await connect(fake.path);
    const peer = fake.peers[0];
    assert.ok(peer);
    await until(() => peer.chunks === 1, "the hello");
    for (let i = 0; i < 200; i++) {
      await client.publish(EVENTS_PROCESS_LIFECYCLE, event(i));
    }
    const rtt = await client.flush();
    assert.ok(rtt >= 0);
    assert.equal(peer.kinds().filter((k) => k === "publish").length, 200);
    assert.ok(peer.chunks <= 3, `200 publishes and a ping took ${peer.chunks - 1} reads`);
    const pub = peer.frames[1];
    assert.equal(pub?.kind.case, "publish");
    if (pub?.kind.case === "publish") {
      assert.equal(pub.kind.value.topic, "events.process.lifecycle");
      assert.equal(pub.kind.value.payloadType, "daemoneye.eventbus.v1.ProcessEvent");
      assert.equal(fromBinary(ProcessEventSchema, pub.kind.value.payload).pid, 0);
    }
    assert.equal(client.statistics().published, 200);
    await client.close();
    await fake.close();
  });

  test("close: pending publishes, then a flush, then goodbye last", async () => {
    const fake = await fakeBroker(standard());
    const client = await connect(fake.path);
    client.publishNowait(EVENTS_PROCESS_LIFECYCLE, event(1));
    client.publishNowait(EVENTS_PROCESS_LIFECYCLE, event(2), {
      correlation: { correlationId: "c", rootCorrelationId: "c" },
    });
    await client.close();
    await client.close(); // idempotent
    const peer = fake.peers[0];
    assert.ok(peer);
    await until(() => peer.ended, "the end of the connection");
    assert.deepEqual(peer.kinds(), ["hello", "publish", "publish", "ping", "goodbye"]);
    const second = peer.frames[2];
    assert.equal(
      second?.kind.case === "publish" && second.kind.value.correlation?.correlationId,
      "c",
    );
    await assert.rejects(client.publish(EVENTS_PROCESS_LIFECYCLE, event(3)), ClosedResourceError);
    await fake.close();
  });

  test("typed subscription: decoding, sequence gaps, unsubscribe", async () => {
    const fake = await fakeBroker(
      standard((f, peer) => {
        if (f.kind.case !== "subscribe") {
          return;
        }
        const id = f.kind.value.subscriptionId;
        for (const sequence of [1n, 2n, 5n]) {
          const payload = create(PublishSchema, {
            topic: "events.process.lifecycle",
            payloadType: "daemoneye.eventbus.v1.ProcessEvent",
            payload: new Uint8Array([0x08, Number(sequence)]),
          });
          peer.send({ case: "deliver", value: { subscriptionId: id, sequence, publish: payload } });
        }
      }),
    );
    const client = await connect(fake.path, { component: "daemoneye-agent" });
    const sub = await client.subscribe(EVENTS_PROCESS_LIFECYCLE, {
      correlationFilter: { rootCorrelationIds: ["r"] },
    });
    const subscribe = fake.peers[0]?.frames.find((f) => f.kind.case === "subscribe");
    assert.ok(subscribe?.kind.case === "subscribe");
    assert.equal(subscribe.kind.value.filter, "events.process.lifecycle");
    assert.deepEqual(subscribe.kind.value.correlationFilter?.rootCorrelationIds, ["r"]);
    const pids: number[] = [];
    for await (const ev of sub) {
      pids.push(ev.message().pid);
      if (pids.length === 3) {
        break;
      }
    }
    assert.deepEqual(pids, [1, 2, 5]);
    assert.equal(sub.missed, 2);
    assert.equal(sub.received, 3);
    await sub.unsubscribe();
    assert.equal(sub.active, false);
    assert.ok(fake.peers[0]?.kinds().includes("unsubscribe"));
    await client.close();
    await fake.close();
  });

  test("a deliver_batch (the wire vector) is queued event by event after a gap", async () => {
    // Subscription 7, sequences 42 and 43: two ProcessEvents (pids 4242 and 2).
    const vector = readFileSync(
      new URL("../../../tests/vectors/deliver_batch.bin", import.meta.url),
    );
    const prefix = decodeLengthPrefix(vector);
    assert.ok(prefix);
    const decoded = decodeFrameBody(vector.subarray(prefix[1])).kind;
    assert.ok(decoded.case === "deliverBatch");
    const batch = decoded.value;
    const fake = await fakeBroker(
      standard((f, peer) => {
        if (f.kind.case !== "subscribe") {
          return;
        }
        const id = f.kind.value.subscriptionId;
        const publish = (pid: number) =>
          create(PublishSchema, {
            topic: "events.process.lifecycle",
            payloadType: "daemoneye.eventbus.v1.ProcessEvent",
            payload: new Uint8Array([0x08, pid]),
          });
        peer.send({
          case: "deliver",
          value: { subscriptionId: id, sequence: 1n, publish: publish(1) },
        });
        peer.send({ case: "deliverBatch", value: { ...batch, subscriptionId: id } });
        peer.send({
          case: "deliver",
          value: { subscriptionId: id, sequence: 44n, publish: publish(44) },
        });
      }),
    );
    const client = await connect(fake.path, { component: "daemoneye-agent" });
    const sub = await client.subscribe(EVENTS_PROCESS_LIFECYCLE);
    const got = [
      await sub.get(2000),
      await sub.get(2000),
      await sub.get(2000),
      await sub.get(2000),
    ];
    assert.deepEqual(
      got.map((e) => e.sequence),
      [1n, 42n, 43n, 44n],
    );
    assert.deepEqual(
      got.map((e) => e.message().pid),
      [1, 4242, 2, 44],
    );
    for (const e of got) {
      assert.equal(e.topic, "events.process.lifecycle");
      assert.equal(e.payloadType, "daemoneye.eventbus.v1.ProcessEvent");
      assert.equal(e.correlation, undefined);
      assert.equal(e.subscriptionId, sub.subscriptionId);
    }
    assert.equal(got[1]?.message().name, "sshd");
    assert.equal(sub.missed, 40); // 2 to 41, before the batch
    assert.equal(sub.received, 4);
    assert.equal(sub.dropped, 0);
    assert.deepEqual([client.statistics().received, client.statistics().missed], [4, 40]);
    await client.close();
    await fake.close();
  });

  test("a batch shares its correlation; a full queue drops its events one by one", async () => {
    const fake = await fakeBroker(
      standard((f, peer) => {
        if (f.kind.case !== "subscribe") {
          return;
        }
        const batch = create(PublishBatchSchema, {
          topic: "events.process.lifecycle",
          payloadType: "daemoneye.eventbus.v1.ProcessEvent",
          correlation: { correlationId: "c-1", rootCorrelationId: "r-1", workflowStage: "s" },
          payloads: [1, 2, 3, 4, 5].map((pid) => new Uint8Array([0x08, pid])),
        });
        const subscriptionId = f.kind.value.subscriptionId;
        peer.send({ case: "deliverBatch", value: { subscriptionId, firstSequence: 1n, batch } });
        peer.send({
          case: "deliverBatch",
          value: { subscriptionId: 99, firstSequence: 1n, batch },
        });
      }),
    );
    const client = await connect(fake.path, { component: "daemoneye-agent" });
    const sub = await client.subscribe(EVENTS_PROCESS_LIFECYCLE, { maxPending: 3 });
    await client.flush(); // the pong follows both batches
    assert.equal(sub.received, 3);
    assert.equal(sub.dropped, 2);
    assert.equal(sub.missed, 0);
    const got = [sub.getNowait(), sub.getNowait(), sub.getNowait()];
    assert.equal(sub.getNowait(), undefined);
    assert.deepEqual(
      got.map((e) => [e?.sequence, e?.message().pid, e?.correlation?.correlationId]),
      [
        [1n, 1, "c-1"],
        [2n, 2, "c-1"],
        [3n, 3, "c-1"],
      ],
    );
    assert.ok(client.isConnected); // a batch for an unknown subscription is ignored
    await client.close();
    await fake.close();
  });

  test("a refused subscribe rejects with the typed error and its code", async () => {
    const fake = await fakeBroker((f, peer) => {
      if (f.kind.case === "hello") {
        peer.send(WELCOME);
      } else if (f.kind.case === "ping") {
        peer.send({ case: "pong", value: { nonce: f.kind.value.nonce } });
      } else if (f.kind.case === "subscribe") {
        peer.send({
          case: "error",
          value: {
            code: ErrorCode.ACCESS_DENIED,
            message: "no",
            subscriptionId: f.kind.value.subscriptionId,
            topic: f.kind.value.filter,
          },
        });
      }
    });
    const client = await connect(fake.path);
    await assert.rejects(client.subscribe("events.#"), (err: unknown) => {
      assert.equal((err as { name: string }).name, "AccessDenied");
      assert.equal((err as { code: number }).code, ErrorCode.ACCESS_DENIED);
      assert.equal((err as { topic: string }).topic, "events.#");
      return true;
    });
    assert.ok(client.isConnected);
    await client.close();
    await fake.close();
  });

  test("a wrong message type is refused at run time too", async () => {
    const fake = await fakeBroker(standard());
    const client = await connect(fake.path);
    const wrong = create(PublishSchema) as never;
    await assert.rejects(client.publish(EVENTS_PROCESS_LIFECYCLE, wrong), PayloadTypeMismatch);
    await client.close();
    await fake.close();
  });

  test("a publish refused with INVALID_PAYLOAD reaches onError as InvalidPayload", async () => {
    const fake = await fakeBroker(
      standard((f, peer) => {
        if (f.kind.case === "publish") {
          peer.send({
            case: "error",
            value: {
              code: ErrorCode.INVALID_PAYLOAD,
              message: "payload does not parse as daemoneye.eventbus.v1.ProcessEvent",
              topic: f.kind.value.topic,
            },
          });
        }
      }),
    );
    const client = await connect(fake.path);
    const errors: unknown[] = [];
    client.onError = (err) => errors.push(err);
    await client.publishRaw(
      EVENTS_PROCESS_LIFECYCLE.name,
      "daemoneye.eventbus.v1.ProcessEvent",
      Uint8Array.of(0xff, 0xff, 0xff, 0xff),
    );
    await client.flush(); // the pong follows the error
    assert.equal(errors.length, 1);
    const err = errors[0];
    assert.ok(err instanceof InvalidPayload);
    assert.equal(err.code, ErrorCode.INVALID_PAYLOAD);
    assert.equal(err.fatal, false);
    assert.equal(err.topic, "events.process.lifecycle");
    assert.equal(client.lastError, err);
    assert.equal(client.statistics().refused, 1);
    assert.ok(client.isConnected);
    await client.close();
    await fake.close();
  });

  test("a broker violation: fatal MALFORMED_FRAME sent back, subscriptions broken", async () => {
    const fake = await fakeBroker(standard());
    const client = await connect(fake.path);
    const sub = await client.subscribe("events.#");
    const peer = fake.peers[0];
    assert.ok(peer);
    peer.raw(Uint8Array.of(0)); // an empty frame
    await assert.rejects(sub.get(2000), BrokenResourceError);
    await until(() => peer.kinds().includes("error"), "the client's error");
    const error = peer.frames.find((f) => f.kind.case === "error");
    assert.ok(error?.kind.case === "error");
    assert.equal(error.kind.value.code, ErrorCode.MALFORMED_FRAME);
    assert.equal(error.kind.value.fatal, true);
    assert.equal(client.isConnected, false);
    await client.close();
    await fake.close();
  });

  test("the broker's goodbye ends iteration with BrokenResourceError", async () => {
    const fake = await fakeBroker(
      standard((f, peer) => {
        if (f.kind.case === "subscribe") {
          peer.send({ case: "goodbye", value: { reason: "broker shutting down" } });
          peer.socket.end();
        }
      }),
    );
    const client = await connect(fake.path);
    const sub = await client.subscribe("#");
    await assert.rejects(
      (async () => {
        for await (const _ of sub) {
          // nothing is delivered
        }
      })(),
      (err: unknown) => err instanceof BrokenResourceError && /goodbye/.test(err.message),
    );
    await client.close();
    await fake.close();
  });
});

/** The `Credit` frames a peer received, as `[subscriptionId, events]`. */
function credits(peer: Peer): [number, number][] {
  return peer.frames.flatMap((f) =>
    f.kind.case === "credit" ? [[f.kind.value.subscriptionId, f.kind.value.events]] : [],
  );
}

/** A broker that acks every subscribe with `window` and `lossless`, then sends `count` events in one batch. */
function creditBroker(window: number, lossless: boolean, count: number): Reply {
  return (f, peer) => {
    switch (f.kind.case) {
      case "hello":
      case "ping":
      case "unsubscribe":
        standard()(f, peer);
        break;
      case "subscribe": {
        const subscriptionId = f.kind.value.subscriptionId;
        peer.send({ case: "subscribeAck", value: { subscriptionId, window, lossless } });
        const batch = create(PublishBatchSchema, {
          topic: "events.process.lifecycle",
          payloadType: "daemoneye.eventbus.v1.ProcessEvent",
          payloads: Array.from({ length: count }, (_, i) => new Uint8Array([0x08, i + 1])),
        });
        if (count > 0) {
          peer.send({ case: "deliverBatch", value: { subscriptionId, firstSequence: 1n, batch } });
        }
        break;
      }
      default:
        break;
    }
  };
}

describe("credit-based delivery against a fake broker", () => {
  test("hello grants credit; subscribe carries lossless and the window", async () => {
    const fake = await fakeBroker(standard());
    const client = await connect(fake.path, { maxPending: 300 });
    const peer = fake.peers[0];
    assert.ok(peer);
    const hello = peer.frames[0];
    assert.ok(hello?.kind.case === "hello");
    assert.equal(hello.kind.value.credit, true);
    await client.subscribe("events.#", { lossless: true, window: 8 });
    await client.subscribe(EVENTS_PROCESS_LIFECYCLE, { maxPending: 50 });
    await client.subscribe("events.process.+");
    await client.subscribe("events.process.+", { lossless: true, window: 0 });
    const subscribes = peer.frames.flatMap((f) =>
      f.kind.case === "subscribe" ? [[f.kind.value.lossless, f.kind.value.window]] : [],
    );
    // The default window is the subscription's bound on pending events.
    assert.deepEqual(subscribes, [
      [true, 8],
      [false, 50],
      [false, 300],
      [true, 0],
    ]);
    for (const window of [-1, 1.5, 2 ** 32, Number.NaN]) {
      await assert.rejects(client.subscribe("events.#", { window }), RangeError, String(window));
    }
    assert.equal(peer.kinds().filter((k) => k === "subscribe").length, 4);
    await client.close();
    await fake.close();
  });

  test("an ack without a window: at most once, no credit, a full queue drops", async () => {
    const fake = await fakeBroker(creditBroker(0, false, 5));
    const client = await connect(fake.path);
    const sub = await client.subscribe(EVENTS_PROCESS_LIFECYCLE, { maxPending: 3 });
    await client.flush();
    assert.deepEqual([sub.window, sub.lossless, sub.received, sub.dropped], [0, false, 3, 2]);
    for (let i = 0; i < 3; i++) {
      assert.ok(sub.getNowait());
    }
    await client.flush();
    assert.deepEqual(credits(fake.peers[0] as Peer), []);
    assert.equal(sub.credited, 0);
    await client.close();
    await fake.close();
  });

  test("credit for every quarter window the application takes, not receives; nothing dropped", async () => {
    // Window 8: a Credit every 2 events taken. 12 events (a batch may overrun
    // the window) into a queue bounded at 4 when at most once.
    const fake = await fakeBroker(creditBroker(8, true, 12));
    const client = await connect(fake.path, { component: "daemoneye-agent" });
    const sub = await client.subscribe(EVENTS_PROCESS_LIFECYCLE, {
      lossless: true,
      window: 8,
      maxPending: 4,
    });
    const peer = fake.peers[0];
    assert.ok(peer);
    assert.deepEqual([sub.window, sub.lossless], [8, true]);
    await client.flush();
    assert.deepEqual([sub.received, sub.dropped, sub.missed], [12, 0, 0]);
    assert.deepEqual(credits(peer), [], "received but not taken: no credit");

    const pids: number[] = [];
    const take = (event: { message(): { pid: number } } | undefined) => {
      assert.ok(event);
      pids.push(event.message().pid);
    };
    take(sub.getNowait());
    await client.flush();
    assert.deepEqual(credits(peer), []);
    take(await sub.get(1000));
    await until(() => credits(peer).length === 1, "the first credit");
    assert.deepEqual(credits(peer), [[sub.subscriptionId, 2]]);
    for await (const event of sub) {
      take(event);
      if (pids.length === 7) {
        break;
      }
    }
    for await (const [event] of sub.messages()) {
      take(event);
      if (pids.length === 12) {
        break;
      }
    }
    await client.flush();
    assert.deepEqual(pids, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    assert.deepEqual(
      credits(peer).map(([, events]) => events),
      [2, 2, 2, 2, 2, 2],
    );
    assert.equal(sub.credited, 12);
    await client.close();
    await fake.close();
  });

  test("a small window grants after every event; an odd one rounds the quarter down", async () => {
    for (const [window, expected] of [
      [1, [1, 1, 1, 1, 1]],
      [3, [1, 1, 1, 1, 1]],
      [11, [2, 2]],
    ] as const) {
      const fake = await fakeBroker(creditBroker(window, false, 5));
      const client = await connect(fake.path, { component: "daemoneye-agent" });
      const sub = await client.subscribe("events.process.+");
      assert.deepEqual([sub.window, sub.lossless], [window, false]);
      for (let i = 0; i < 5; i++) {
        await sub.get(1000);
      }
      await client.flush();
      assert.deepEqual(
        credits(fake.peers[0] as Peer).map(([, events]) => events),
        expected,
        `window ${window}`,
      );
      await client.close();
      await fake.close();
    }
  });

  test("a new ack restarts the count; an ended subscription grants nothing", async () => {
    const fake = await fakeBroker(creditBroker(8, true, 6));
    const client = await connect(fake.path, { component: "daemoneye-agent" });
    const sub = await client.subscribe(EVENTS_PROCESS_LIFECYCLE, { lossless: true });
    const peer = fake.peers[0];
    assert.ok(peer);
    await client.flush();
    assert.ok(sub.getNowait());
    // As after a resubscription: a fresh window, the count from 0.
    sub.acknowledged(create(SubscribeAckSchema, { subscriptionId: sub.subscriptionId, window: 8 }));
    assert.deepEqual([sub.window, sub.lossless], [8, false]);
    assert.ok(sub.getNowait());
    await client.flush();
    assert.deepEqual(credits(peer), [], "one event since the new ack");
    assert.ok(sub.getNowait());
    await client.flush();
    assert.deepEqual(credits(peer), [[sub.subscriptionId, 2]]);
    await sub.unsubscribe();
    assert.ok(sub.getNowait());
    assert.ok(sub.getNowait());
    assert.ok(sub.getNowait());
    assert.equal(sub.getNowait(), undefined);
    await client.flush();
    assert.deepEqual(credits(peer), [[sub.subscriptionId, 2]], "no credit once unsubscribed");
    await client.close();
    await fake.close();
  });
});
