// Request/reply and the last will against a fake broker whose Welcome sets
// `requests`: the Request frame and its deadline, typed replies and every
// way a request fails; the responder side (Subscribe.respond, RequestDeliver,
// Reply, deadlines, a full queue, close); the last will in Hello.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, test } from "node:test";

import { create, fromBinary, toBinary } from "@bufbuild/protobuf";

import {
  AccessDenied,
  CONTROL_COLLECTOR_RPC_HEALTH,
  CONTROL_HEALTH_STATUS,
  ComponentStatusSchema,
  ConnectionLost,
  ErrorCode,
  EVENTS_PROCESS_LIFECYCLE,
  HealthCheckReplySchema,
  HealthCheckRequestSchema,
  HealthState,
  InvalidPayload,
  LimitExceeded,
  LocalProtocolError,
  NoResponders,
  PayloadTypeMismatch,
  ProcessEventSchema,
  RequestFailed,
  RequestTimeout,
  RpcStatus,
  connect,
  controlCollectorRpcHealth,
  publication,
  type FrameInit,
  type IncomingRequest,
} from "../src/index.js";
import type { Frame, Reply, Request } from "../src/gen/daemoneye/eventbus/v1/frames_pb.js";
import { fakeBroker, standard, until, type Peer } from "./fake_broker.js";

const HEALTH = controlCollectorRpcHealth({ id: "c1" });
const REQ = create(HealthCheckRequestSchema, { componentId: "c1", includeDiagnostics: true });
const REP = create(HealthCheckReplySchema, {
  status: RpcStatus.SUCCESS,
  component: { componentId: "c1", message: "fine" },
});

function rpcWelcome(requests = true): FrameInit {
  return {
    case: "welcome",
    value: {
      protocolVersion: 1,
      sessionId: "0123456789abcdef",
      component: "procmond",
      requests,
      limits: {
        maxFrameBytes: 1 << 20,
        maxTopicBytes: 255,
        maxTopicLevels: 16,
        maxPendingRequests: 16,
        maxRequestTimeoutMs: 10_000,
        defaultRequestTimeoutMs: 3000,
      },
    },
  };
}

type OnRequest = (request: Request, peer: Peer) => void;

/** A broker that welcomes with `requests`, acks subscribes, and hands each Request to `onRequest`. */
async function rpcBroker(onRequest: OnRequest = () => undefined, requests = true) {
  return fakeBroker((f, peer) => {
    if (f.kind.case === "hello") {
      peer.send(rpcWelcome(requests));
    } else if (f.kind.case === "request") {
      onRequest(f.kind.value, peer);
    } else {
      standard()(f, peer);
    }
  });
}

/** The frames of one kind the peer received, e.g. `sent(peer, "request")`. */
function frames<K extends keyof Sent>(peer: Peer | undefined, kind: K): Sent[K][] {
  return (peer?.frames ?? []).flatMap((f) =>
    f.kind.case === kind ? [f.kind.value as Sent[K]] : [],
  );
}

type Sent = {
  [F in Frame["kind"] as F["case"] & string]: F extends { value: infer V } ? V : never;
};

function replyWith(rep: Partial<{ payloadType: string; payload: Uint8Array; error: string }>) {
  return (request: Request, peer: Peer) => {
    peer.send({
      case: "replyDeliver",
      value: {
        requestId: request.requestId,
        payloadType: rep.payloadType ?? "",
        payload: rep.payload ?? new Uint8Array(),
        error: rep.error ?? "",
        responder: "procmond",
      },
    });
  };
}

function errorFor(code: ErrorCode, message = "no") {
  return (request: Request, peer: Peer) => {
    peer.send({
      case: "error",
      value: { code, message, requestId: request.requestId, topic: request.publish?.topic ?? "" },
    });
  };
}

describe("requests against a fake broker", () => {
  test("the Request frame, and the typed reply", async () => {
    const fake = await rpcBroker(
      replyWith({
        payloadType: HealthCheckReplySchema.typeName,
        payload: toBinary(HealthCheckReplySchema, REP),
      }),
    );
    const client = await connect(fake.path, { component: "daemoneye-agent" });
    assert.deepEqual(client.features, { batches: false, requests: true });
    const reply = await client.request(HEALTH, REQ, {
      timeoutMs: 250,
      correlation: { correlationId: "c", rootCorrelationId: "r" },
    });
    assert.equal(reply.$typeName, "daemoneye.eventbus.v1.HealthCheckReply");
    assert.equal(reply.component?.message, "fine");
    const second = await client.request(HEALTH, REQ);
    assert.equal(second.status, RpcStatus.SUCCESS);
    const sent = frames(fake.peers[0], "request");
    assert.deepEqual(
      sent.map((r) => [r.requestId, r.timeoutMs, r.publish?.topic, r.publish?.payloadType]),
      [
        [1n, 250, "control.collector.rpc.health.c1", "daemoneye.eventbus.v1.HealthCheckRequest"],
        [2n, 3000, "control.collector.rpc.health.c1", "daemoneye.eventbus.v1.HealthCheckRequest"],
      ],
    );
    assert.equal(sent[0]?.publish?.correlation?.correlationId, "c");
    assert.deepEqual(
      fromBinary(HealthCheckRequestSchema, sent[0]?.publish?.payload ?? new Uint8Array()),
      REQ,
    );
    assert.equal(client.statistics().pendingRequests, 0);
    await client.close();
    await fake.close();
  });

  test("every way a request fails, typed, with its request id", async () => {
    const cases: [OnRequest, (err: unknown) => boolean][] = [
      [
        errorFor(ErrorCode.NO_RESPONDERS),
        (e) => e instanceof NoResponders && e.code === ErrorCode.NO_RESPONDERS,
      ],
      [
        errorFor(ErrorCode.REQUEST_TIMEOUT),
        (e) => e instanceof RequestTimeout && e.code === ErrorCode.REQUEST_TIMEOUT,
      ],
      [
        errorFor(ErrorCode.ACCESS_DENIED),
        (e) => e instanceof AccessDenied && e.topic === HEALTH.name,
      ],
      [errorFor(ErrorCode.LIMIT_EXCEEDED), (e) => e instanceof LimitExceeded],
      [
        replyWith({ error: "collector is stopping" }),
        (e) =>
          e instanceof RequestFailed &&
          e.reason === "collector is stopping" &&
          e.responder === "procmond",
      ],
      [
        replyWith({ payloadType: "daemoneye.eventbus.v1.Heartbeat" }),
        (e) => e instanceof PayloadTypeMismatch,
      ],
      [
        replyWith({
          payloadType: HealthCheckReplySchema.typeName,
          payload: Uint8Array.of(0xff, 0xff),
        }),
        (e) => e instanceof InvalidPayload && e.topic === HEALTH.name,
      ],
    ];
    let which = 0;
    const fake = await rpcBroker((request, peer) => cases[which]?.[0](request, peer));
    const client = await connect(fake.path, { component: "daemoneye-agent" });
    for (which = 0; which < cases.length; which++) {
      const check = cases[which]?.[1] ?? (() => false);
      await assert.rejects(client.request(HEALTH, REQ), (err: unknown) => {
        assert.ok(check(err), `case ${which}: ${String(err)}`);
        if (which < 5) {
          assert.equal((err as { requestId: bigint }).requestId, BigInt(which + 1));
        }
        return true;
      });
    }
    assert.equal(client.statistics().refused, 0, "request errors go to the request, not onError");
    assert.ok(client.isConnected);
    await client.close();
    await fake.close();
  });

  test("the client's own deadline, the broker's maximum, abort, a lost connection", async () => {
    const fake = await rpcBroker(); // never answers
    const client = await connect(fake.path, { component: "daemoneye-agent" });
    const started = performance.now();
    await assert.rejects(client.request(HEALTH, REQ, { timeoutMs: 80 }), (err: unknown) => {
      assert.ok(err instanceof RequestTimeout);
      assert.equal(err.code, undefined); // ours, not the broker's
      return true;
    });
    assert.ok(performance.now() - started >= 75);
    const capped = client.request(HEALTH, REQ, { timeoutMs: 60_000 });
    const controller = new AbortController();
    const aborted = client.request(HEALTH, REQ, { signal: controller.signal });
    controller.abort(new Error("not needed"));
    await assert.rejects(aborted, /not needed/);
    await until(() => frames(fake.peers[0], "request").length === 3, "the requests");
    assert.deepEqual(
      frames(fake.peers[0], "request").map((r) => r.timeoutMs),
      [80, 10_000, 3000],
    );
    await assert.rejects(client.request(HEALTH, REQ, { timeoutMs: 0 }), RangeError);
    fake.drop();
    await assert.rejects(capped, ConnectionLost);
    await fake.close();
  });

  test("a request too large for the RequestDeliver envelope is refused before it is sent", async () => {
    const fake = await rpcBroker();
    const client = await connect(fake.path, { component: "daemoneye-agent" });
    const big = create(HealthCheckRequestSchema, { componentId: "x".repeat((1 << 20) - 500) });
    await assert.rejects(client.request(HEALTH, big), LimitExceeded);
    await client.flush();
    assert.deepEqual(frames(fake.peers[0], "request"), []);
    assert.equal(client.statistics().pendingRequests, 0);
    await client.close();
    await fake.close();
  });

  test("a wrong message type, and a broker that does not route requests", async () => {
    const fake = await rpcBroker(undefined, false);
    const client = await connect(fake.path, { component: "daemoneye-agent" });
    await assert.rejects(client.request(HEALTH, REQ), LocalProtocolError);
    await assert.rejects(client.serve(CONTROL_COLLECTOR_RPC_HEALTH), LocalProtocolError);
    await assert.rejects(
      client.request(HEALTH, create(ProcessEventSchema) as never),
      PayloadTypeMismatch,
    );
    assert.deepEqual(frames(fake.peers[0], "request"), []);
    await client.close();
    await fake.close();
  });
});

/** A RequestDeliver for subscription `sid`. */
function requestDeliver(sid: number, token: bigint, remainingMs: number, pid = 0): FrameInit {
  return {
    case: "requestDeliver",
    value: {
      subscriptionId: sid,
      token,
      remainingMs,
      eventId: 500n + token,
      receivedAtNs: 1767323045000000006n,
      requester: "daemoneye-agent",
      publish: {
        topic: `control.collector.rpc.health.c${pid}`,
        payloadType: HealthCheckRequestSchema.typeName,
        payload: toBinary(
          HealthCheckRequestSchema,
          create(HealthCheckRequestSchema, { componentId: `c${pid}` }),
        ),
        correlation: { correlationId: "k", rootCorrelationId: "k" },
      },
    },
  };
}

async function served(maxPending?: number) {
  const fake = await rpcBroker();
  const client = await connect(fake.path, { component: "procmond" });
  const responder = await client.serve(CONTROL_COLLECTOR_RPC_HEALTH, { maxPending });
  const peer = fake.peers[0] as Peer;
  return { fake, client, responder, peer };
}

const replies = (peer: Peer): Reply[] => frames(peer, "reply");

describe("responders against a fake broker", () => {
  test("serve subscribes with respond; a request is typed, stamped and answered once", async () => {
    const { fake, client, responder, peer } = await served();
    const subscribe = frames(peer, "subscribe")[0];
    assert.equal(subscribe?.filter, "control.collector.rpc.health.+");
    assert.equal(subscribe?.respond, true);
    assert.equal(responder.filter, "control.collector.rpc.health.+");
    peer.send(requestDeliver(responder.subscriptionId, 77n, 1000, 3));
    const req = await responder.get(1000);
    assert.equal(req.topic, "control.collector.rpc.health.c3");
    assert.equal(req.message.componentId, "c3");
    assert.deepEqual([req.token, req.eventId, req.receivedAtNs], [77n, 577n, 1767323045000000006n]);
    assert.equal(req.requester, "daemoneye-agent");
    assert.equal(req.correlation?.correlationId, "k");
    assert.ok(req.remaining > 900 && req.remaining <= 1000, String(req.remaining));
    assert.ok(Math.abs(req.deadline.getTime() - (Date.now() + 1000)) < 100);
    assert.equal(req.receivedAt?.toISOString(), "2026-01-02T03:04:05.000Z");
    assert.equal(await req.reply(REP), true);
    assert.equal(req.answered, true);
    await assert.rejects(req.reply(REP), LocalProtocolError);
    await client.flush();
    const [reply] = replies(peer);
    assert.equal(reply?.token, 77n);
    assert.equal(reply?.error, "");
    assert.equal(reply?.payloadType, HealthCheckReplySchema.typeName);
    assert.deepEqual(fromBinary(HealthCheckReplySchema, reply?.payload ?? new Uint8Array()), REP);
    await assert.rejects(
      (
        await (async () => {
          peer.send(requestDeliver(responder.subscriptionId, 78n, 1000));
          return responder.get(1000);
        })()
      ).reply(create(ComponentStatusSchema) as never),
      PayloadTypeMismatch,
    );
    await client.close();
    await fake.close();
  });

  test("fail() sends the reason; expired requests are dropped, never answered", async () => {
    const { fake, client, responder, peer } = await served();
    const sid = responder.subscriptionId;
    peer.send(requestDeliver(sid, 1n, 1000));
    const first = await responder.get(1000);
    assert.equal(await first.fail("cannot now"), true);
    peer.send(requestDeliver(sid, 2n, 0)); // already past its deadline
    peer.send(requestDeliver(sid, 3n, 30)); // past it before it is taken
    peer.send(requestDeliver(sid, 4n, 5000));
    await client.flush();
    await new Promise((r) => setTimeout(r, 60));
    const next = await responder.get(1000);
    assert.equal(next.token, 4n);
    assert.equal(responder.expired, 2);
    peer.send(requestDeliver(sid, 5n, 20));
    await client.flush();
    const late = await responder.get(1000);
    await new Promise((r) => setTimeout(r, 40));
    assert.equal(late.expired, true);
    assert.equal(await late.reply(REP), false, "not sent after the deadline");
    await client.flush();
    assert.deepEqual(
      replies(peer).map((r) => [r.token, r.error]),
      [[1n, "cannot now"]],
    );
    await client.close();
    await fake.close();
  });

  test("a full queue fails new requests at once; close() fails the queued ones and ends iteration", async () => {
    const { fake, client, responder, peer } = await served(2);
    const sid = responder.subscriptionId;
    for (const token of [1n, 2n, 3n, 4n]) {
      peer.send(requestDeliver(sid, token, 5000));
    }
    await client.flush();
    assert.equal(responder.length, 2);
    assert.equal(responder.busy, 2);
    const iteration = (async () => {
      const got: IncomingRequest[] = [];
      for await (const req of responder) {
        got.push(req as IncomingRequest);
        break;
      }
      return got.map((r) => r.token);
    })();
    assert.deepEqual(await iteration, [1n]);
    await responder.close();
    assert.equal(responder.active, false);
    assert.ok(frames(peer, "unsubscribe").some((u) => u.subscriptionId === sid));
    const rest = [];
    for await (const req of responder) {
      rest.push(req);
    }
    assert.deepEqual(rest, []);
    await client.flush();
    assert.deepEqual(
      replies(peer).map((r) => [r.token, r.error.replace(/:.*/, "")]),
      [
        [3n, "the responder is busy"],
        [4n, "the responder is busy"],
        [2n, "the responder has stopped"],
      ],
    );
    await client.close();
    await fake.close();
  });

  test("a responder's correlation filter travels in its subscribe; never lossless or include_control", async () => {
    const fake = await rpcBroker();
    const client = await connect(fake.path, { component: "procmond" });
    await client.serve(CONTROL_COLLECTOR_RPC_HEALTH, {
      correlationFilter: { workflowStages: ["triage"] },
    });
    const subscribe = frames(fake.peers[0], "subscribe")[0];
    assert.deepEqual(subscribe?.correlationFilter?.workflowStages, ["triage"]);
    assert.deepEqual(
      [subscribe?.respond, subscribe?.lossless, subscribe?.includeControl, subscribe?.window],
      [true, false, false, 0],
    );
    await assert.rejects(
      client.serve(CONTROL_COLLECTOR_RPC_HEALTH, { correlationFilter: { workflowStages: [""] } }),
      (err: unknown) => (err as { name: string }).name === "InvalidCorrelation",
    );
    await client.close();
    await fake.close();
  });

  test("a request for a responder already stopped is failed at once", async () => {
    const { fake, client, responder, peer } = await served();
    await responder.close();
    peer.send(requestDeliver(responder.subscriptionId, 31n, 5000));
    peer.send(requestDeliver(999, 32n, 5000)); // never ours: the same
    await client.flush();
    assert.deepEqual(
      replies(peer).map((r) => [r.token, r.error]),
      [
        [31n, "the responder has stopped"],
        [32n, "the responder has stopped"],
      ],
    );
    await client.close();
    await fake.close();
  });

  test("an untyped responder replies with the topic's declared reply type", async () => {
    const fake = await rpcBroker();
    const client = await connect(fake.path, { component: "procmond" });
    const responder = await client.serve("control.collector.rpc.#");
    const peer = fake.peers[0] as Peer;
    peer.send(requestDeliver(responder.subscriptionId, 9n, 1000));
    const req = await responder.get(1000);
    assert.equal(req.message.$typeName, HealthCheckRequestSchema.typeName);
    await assert.rejects(req.reply(create(ComponentStatusSchema)), PayloadTypeMismatch);
    assert.equal(req.answered, false);
    assert.equal(await req.reply(REP), true);
    await client.flush();
    assert.equal(replies(peer)[0]?.payloadType, HealthCheckReplySchema.typeName);
    await client.close();
    await fake.close();
  });

  test("a request from a lost connection is not answered on the next one", async () => {
    const fake = await rpcBroker();
    const client = await connect(fake.path, {
      component: "procmond",
      reconnect: { initialDelayMs: 5, jitter: 0 },
    });
    const responder = await client.serve(HEALTH);
    const first = fake.peers[0] as Peer;
    assert.equal(frames(first, "subscribe")[0]?.filter, HEALTH.name);
    first.send(requestDeliver(responder.subscriptionId, 1n, 5000));
    const req = await responder.get(1000);
    fake.drop();
    await until(() => client.statistics().reconnects === 1, "the reconnection");
    const again = fake.peers[1] as Peer;
    assert.equal(frames(again, "subscribe")[0]?.respond, true, "serving again");
    assert.equal(await req.reply(REP), false);
    await client.flush();
    assert.deepEqual(replies(again), []);
    await client.close();
    await fake.close();
  });
});

describe("the last will", () => {
  test("the Hello has the bytes of the hello_last_will vector", async () => {
    const vector = readFileSync(
      new URL("../../../tests/vectors/hello_last_will.bin", import.meta.url),
    );
    const fake = await rpcBroker();
    const client = await connect(fake.path, {
      name: "procmond",
      component: "procmond",
      lastWill: publication(
        CONTROL_HEALTH_STATUS,
        create(ComponentStatusSchema, {
          componentId: "procmond-1",
          state: HealthState.UNHEALTHY,
          message: "gone",
        }),
      ),
    });
    const sent = Buffer.concat(fake.peers[0]?.received ?? []);
    assert.equal(sent.subarray(0, vector.length).toString("hex"), vector.toString("hex"));
    await client.close();
    await fake.close();
  });

  test("travels in every Hello; a wrong one fails before connecting", async () => {
    const fake = await rpcBroker();
    const status = create(ComponentStatusSchema, { componentId: "procmond-1", message: "gone" });
    const client = await connect(fake.path, {
      component: "procmond",
      lastWill: publication(CONTROL_HEALTH_STATUS, status, {
        correlation: { correlationId: "w", rootCorrelationId: "w" },
      }),
    });
    const hello = frames(fake.peers[0], "hello")[0];
    const will = hello?.lastWill;
    assert.equal(will?.topic, "control.health.status");
    assert.equal(will?.payloadType, ComponentStatusSchema.typeName);
    assert.equal(will?.correlation?.correlationId, "w");
    assert.deepEqual(fromBinary(ComponentStatusSchema, will?.payload ?? new Uint8Array()), status);
    await client.close();

    const plain = await connect(fake.path);
    assert.equal(frames(fake.peers[1], "hello")[0]?.lastWill, undefined);
    await plain.close();

    const big = create(ComponentStatusSchema, { message: "x".repeat(5000) });
    await assert.rejects(
      connect(fake.path, { lastWill: publication(CONTROL_HEALTH_STATUS, big) }),
      LimitExceeded,
    );
    const wrong = { topic: EVENTS_PROCESS_LIFECYCLE, message: status } as never;
    await assert.rejects(connect(fake.path, { lastWill: wrong }), PayloadTypeMismatch);
    assert.equal(fake.peers.length, 2, "no connection for a will that cannot be sent");
    await fake.close();
  });
});
