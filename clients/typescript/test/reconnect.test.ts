// Reconnection against a fake broker that drops its connections or stops and
// starts listening again: the subscriptions are asked for again with the same
// ids, filters and options; what waited on the lost connection fails with
// ConnectionLost; publishing while disconnected throws it; the client gives
// up after maxAttempts; close() stops reconnecting. And the end of a client
// that does not reconnect: `closed` resolves with the error, iterations end.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { create, fromBinary } from "@bufbuild/protobuf";

import {
  ClosedResourceError,
  ConnectionLost,
  EVENTS_PROCESS_LIFECYCLE,
  ErrorCode,
  ProcessEventSchema,
  connect,
  type Subscription,
} from "../src/index.js";
import { PublishSchema, type Frame } from "../src/gen/daemoneye/eventbus/v1/frames_pb.js";
import { fakeBroker, standard, until, type Peer, type Reply } from "./fake_broker.js";

const FAST = { initialDelayMs: 10, maxDelayMs: 40, jitter: 0 };

/** Every subscribe is acked and followed by one event, sequence 1, with pid = connection number. */
function deliveringBroker(connections: () => number): Reply {
  return standard((f, peer) => {
    if (f.kind.case === "subscribe" && !f.kind.value.respond) {
      peer.send({
        case: "deliver",
        value: {
          subscriptionId: f.kind.value.subscriptionId,
          sequence: 1n,
          publish: create(PublishSchema, {
            topic: "events.process.lifecycle",
            payloadType: "daemoneye.eventbus.v1.ProcessEvent",
            payload: new Uint8Array([0x08, connections()]),
          }),
        },
      });
    }
  });
}

function subscribes(peer: Peer | undefined): Frame[] {
  return (peer?.frames ?? []).filter((f) => f.kind.case === "subscribe");
}

async function rejectsLost(p: Promise<unknown>, pattern?: RegExp): Promise<ConnectionLost> {
  let caught: unknown;
  await assert.rejects(p, (err: unknown) => {
    caught = err;
    return err instanceof ConnectionLost && (pattern === undefined || pattern.test(err.message));
  });
  return caught as ConnectionLost;
}

describe("reconnection against a fake broker", () => {
  test("subscriptions are asked for again, same id, filter and options; events go on", async () => {
    const holder: { peers: Peer[] } = { peers: [] };
    const fake = await fakeBroker(deliveringBroker(() => holder.peers.length));
    holder.peers = fake.peers;
    const client = await connect(fake.path, {
      component: "daemoneye-agent",
      reconnect: FAST,
    });
    const events: string[] = [];
    client.onDisconnect = (err) => events.push(`lost: ${err.constructor.name}`);
    client.onReconnect = () => events.push("back");
    const sub = await client.subscribe(EVENTS_PROCESS_LIFECYCLE, {
      correlationFilter: { rootCorrelationIds: ["r"] },
      includeControl: true,
      lossless: true,
      window: 8,
    });
    const other = await client.subscribe("events.#", { maxPending: 50 });
    assert.equal((await sub.get(1000)).message().pid, 1);
    assert.equal(fromBinary(ProcessEventSchema, (await other.get(1000)).payload).pid, 1);

    await fake.stop();
    await until(() => !client.isConnected, "the connection to go");
    await rejectsLost(client.publish(EVENTS_PROCESS_LIFECYCLE, create(ProcessEventSchema)));
    await rejectsLost(client.flush());
    assert.throws(
      () => client.publishNowait(EVENTS_PROCESS_LIFECYCLE, create(ProcessEventSchema)),
      ConnectionLost,
    );
    assert.equal(sub.active, true, "the subscription waits for the next connection");
    await new Promise((r) => setTimeout(r, 60)); // a few failed attempts
    await fake.start();
    await until(() => events.includes("back"), "the reconnection", 3000);
    assert.deepEqual(events, ["lost: ConnectionLost", "back"]);
    assert.ok(client.isConnected);
    assert.equal(client.statistics().reconnects, 1);

    const again = fake.peers.at(-1);
    assert.equal(again?.frames[0]?.kind.case, "hello");
    const before = subscribes(fake.peers[0]).map((f) => f.kind.value);
    const after = subscribes(again).map((f) => f.kind.value);
    assert.equal(after.length, 2);
    assert.deepEqual(
      after.sort(
        (a, b) =>
          ((a as { subscriptionId: number }).subscriptionId ?? 0) -
          ((b as { subscriptionId: number }).subscriptionId ?? 0),
      ),
      before,
    );
    // Numbering starts again at 1 on the new connection: no gap counted.
    const next = await sub.get(1000);
    assert.equal(next.sequence, 1n);
    assert.equal(next.message().pid, fake.peers.length);
    assert.equal((await other.get(1000)).sequence, 1n);
    assert.deepEqual([sub.missed, other.missed], [0, 0]);
    await client.publish(EVENTS_PROCESS_LIFECYCLE, create(ProcessEventSchema, { pid: 9 }));
    await client.flush();
    assert.ok(again?.kinds().includes("publish"));
    await client.close();
    assert.equal(await client.closed, undefined);
    await fake.close();
  });

  test("while an attempt waits for its handshake, publishing still throws ConnectionLost", async () => {
    let answer = true;
    const fake = await fakeBroker((f, peer) => {
      if (f.kind.case !== "hello" || answer) {
        standard()(f, peer);
      }
    });
    const client = await connect(fake.path, { reconnect: FAST, connectTimeoutMs: 60_000 });
    answer = false; // the next handshakes hang
    const lost: ConnectionLost[] = [];
    client.onDisconnect = (err) => lost.push(err);
    fake.drop();
    await until(() => fake.peers.length === 2 && fake.peers[1]?.frames.length === 1, "an attempt");
    const err = await rejectsLost(
      client.publish(EVENTS_PROCESS_LIFECYCLE, create(ProcessEventSchema)),
    );
    assert.equal(err.message, lost[0]?.message);
    answer = true;
    fake.drop(); // the hanging attempt fails; the next one succeeds
    await until(() => client.statistics().reconnects === 1, "the reconnection");
    await client.publish(EVENTS_PROCESS_LIFECYCLE, create(ProcessEventSchema));
    await client.close();
    await fake.close();
  });

  test("a dropped connection with a request in flight: it fails, the client comes back", async () => {
    let silent = true;
    const fake = await fakeBroker(
      standard((f, peer) => {
        if (f.kind.case === "statsRequest" && !silent) {
          peer.send({ case: "statsResponse", value: { requestId: f.kind.value.requestId } });
        }
      }),
    );
    const client = await connect(fake.path, { reconnect: FAST });
    const stats = client.brokerStatistics();
    await until(() => fake.peers[0]?.kinds().includes("statsRequest") ?? false, "the request");
    fake.drop();
    await rejectsLost(stats);
    await until(() => client.statistics().reconnects === 1, "the reconnection");
    silent = false;
    await client.brokerStatistics();
    await client.close();
    await fake.close();
  });

  test("a resubscription the broker now refuses ends that subscription alone", async () => {
    let refuse = false;
    const fake = await fakeBroker((f, peer) => {
      if (f.kind.case === "subscribe" && refuse && f.kind.value.filter === "events.#") {
        peer.send({
          case: "error",
          value: {
            code: ErrorCode.ACCESS_DENIED,
            message: "no longer",
            subscriptionId: f.kind.value.subscriptionId,
            topic: f.kind.value.filter,
          },
        });
        return;
      }
      standard()(f, peer);
    });
    const client = await connect(fake.path, { reconnect: FAST });
    const refused = await client.subscribe("events.#");
    const kept = await client.subscribe("events.process.+");
    refuse = true;
    fake.drop();
    await until(() => client.statistics().reconnects === 1, "the reconnection");
    await assert.rejects(
      refused.get(1000),
      (err: unknown) => (err as { name: string }).name === "AccessDenied",
    );
    assert.equal(refused.active, false);
    assert.equal(kept.active, true);
    assert.equal(client.statistics().subscriptions, 1);
    await client.close();
    await fake.close();
  });

  test("gives up after maxAttempts: closed resolves with the error, iterations throw it", async () => {
    const fake = await fakeBroker(standard());
    const client = await connect(fake.path, { reconnect: { ...FAST, maxAttempts: 3 } });
    const sub = await client.subscribe("events.#");
    const iteration = (async () => {
      for await (const _ of sub) {
        // nothing comes
      }
    })();
    await fake.stop();
    const reason = await client.closed;
    assert.ok(reason instanceof ConnectionLost);
    assert.match(reason.message, /gave up reconnecting .* after 3 attempts/);
    await rejectsLost(iteration, /gave up/);
    assert.equal(client.isConnected, false);
    await assert.rejects(client.flush(), ConnectionLost);
    await client.close();
  });

  test("close() while reconnecting stops at once; iterations end quietly", async () => {
    const fake = await fakeBroker(standard());
    const client = await connect(fake.path, {
      reconnect: { initialDelayMs: 50, maxDelayMs: 60_000 },
    });
    const sub: Subscription = await client.subscribe("events.#");
    const iteration = (async () => {
      let n = 0;
      for await (const _ of sub) {
        n += 1;
      }
      return n;
    })();
    await fake.stop();
    await until(() => !client.isConnected, "the connection to go");
    await new Promise((r) => setTimeout(r, 120));
    const started = performance.now();
    await client.close();
    assert.ok(performance.now() - started < 200);
    assert.equal(await iteration, 0);
    assert.equal(await client.closed, undefined);
    await assert.rejects(
      client.publish(EVENTS_PROCESS_LIFECYCLE, create(ProcessEventSchema)),
      ClosedResourceError,
    );
    await fake.start();
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(fake.peers.length, 1, "no attempt after close()");
    await fake.close();
  });
});

describe("the end of a client that does not reconnect", () => {
  test("the broker's goodbye: closed resolves with ConnectionLost, goodbye set", async () => {
    const fake = await fakeBroker(
      standard((f, peer) => {
        if (f.kind.case === "subscribe") {
          peer.send({ case: "goodbye", value: { reason: "broker shutting down" } });
          peer.socket.end();
        }
      }),
    );
    const client = await connect(fake.path);
    const sub = client.subscribe("#");
    const reason = await client.closed;
    assert.ok(reason instanceof ConnectionLost);
    assert.equal(reason.goodbye, true);
    assert.match(reason.message, /broker said goodbye: broker shutting down/);
    // The subscribe was acked before the goodbye: the subscription then ended with it.
    const s = await sub;
    const lost = await rejectsLost(s.get(1000));
    assert.equal(lost.goodbye, true);
    await assert.rejects(
      client.publish(EVENTS_PROCESS_LIFECYCLE, create(ProcessEventSchema)),
      ConnectionLost,
    );
    await client.close(); // nothing to do, quietly
    await fake.close();
  });

  test("a fatal error: ConnectionLost with its code", async () => {
    const fake = await fakeBroker(
      standard((f, peer) => {
        if (f.kind.case === "subscribe") {
          peer.send({
            case: "error",
            value: { code: ErrorCode.SLOW_CONSUMER, message: "too slow", fatal: true },
          });
          peer.socket.end();
        }
      }),
    );
    const client = await connect(fake.path);
    const sub = await client.subscribe("#"); // acked, then the fatal error
    const reason = await client.closed;
    assert.equal(await rejectsLost(sub.get(1000)), reason);
    assert.ok(reason instanceof ConnectionLost);
    assert.equal(reason.code, ErrorCode.SLOW_CONSUMER);
    assert.equal(reason.fatal, true);
    assert.equal(reason.goodbye, false);
    await fake.close();
  });
});
