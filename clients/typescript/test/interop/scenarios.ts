// Named scenarios of the client against a real broker, for tests/test_interop.py.
//
// Options: {"socket", "scenario", ...}. Each scenario prints JSON lines and a
// final {"result": {...}} line that the Python side checks.

import { create, toBinary } from "@bufbuild/protobuf";

import {
  AccessDenied,
  BrokenResourceError,
  ClosedResourceError,
  ConnectionLost,
  EVENTS_PROCESS_ANOMALY,
  EVENTS_PROCESS_LIFECYCLE,
  NetworkEventSchema,
  ProcessEventSchema,
  connect,
  type EventBusError,
} from "../../src/index.js";
import { describeError, emit, options, run } from "./common.js";

interface Options {
  socket: string;
  scenario: string;
  sleepMs?: number;
}

/** The error `action` throws, described; fails if it does not throw. */
async function thrown(action: () => Promise<unknown> | unknown): Promise<Record<string, unknown>> {
  try {
    await action();
  } catch (err) {
    return describeError(err);
  }
  throw new Error("expected an error");
}

const scenarios: Record<string, (opts: Options) => Promise<Record<string, unknown>>> = {
  /** Refusals arrive as typed errors carrying the broker's code; none closes the connection. */
  async errors(opts) {
    const client = await connect(opts.socket, { name: "ts-errors" }); // anonymous
    const refused: EventBusError[] = [];
    client.onError = (err) => refused.push(err);
    const result: Record<string, unknown> = {};
    result.subscribeRestricted = await thrown(() => client.subscribe("events.network.#"));
    result.subscribeRestrictedIsAccessDenied =
      (await client.subscribe(EVENTS_PROCESS_LIFECYCLE).catch((e: unknown) => e)) instanceof
      AccessDenied;
    result.subscribeInvalidFilter = await thrown(() => client.subscribe("events..process"));
    result.publishInvalidCorrelation = await thrown(() =>
      client.publish(EVENTS_PROCESS_ANOMALY, create(ProcessEventSchema, { pid: 1 }), {
        correlation: { correlationId: "", rootCorrelationId: "r" },
      }),
    );
    const process = create(ProcessEventSchema, { pid: 1, name: "x" });
    await client.publish(EVENTS_PROCESS_LIFECYCLE, process); // restricted: refused later
    const network = toBinary(NetworkEventSchema, create(NetworkEventSchema, { localPort: 1 }));
    await client.publishRaw(
      "events.process.anomaly",
      "daemoneye.eventbus.v1.NetworkEvent",
      network,
    );
    await client.publishRaw("events.not.declared", "daemoneye.eventbus.v1.NetworkEvent", network);
    await client.publish(EVENTS_PROCESS_ANOMALY, process); // public: accepted
    await client.flush(); // every refusal has arrived once the pong has
    result.publishRefusals = refused.map(describeError);
    result.statistics = client.statistics();
    result.stillConnected = client.isConnected;
    const sub = await client.subscribe("events.process.anomaly"); // public: allowed
    result.publicSubscription = sub.subscriptionId;
    await client.close();
    result.afterClose = await thrown(() => client.publish(EVENTS_PROCESS_ANOMALY, process));
    return result;
  },

  /** Silent past the broker's idle timeout: alive only because the client answers pings. */
  async heartbeat(opts) {
    const client = await connect(opts.socket, { name: "ts-heartbeat" });
    const idle = client.limits?.idleTimeoutMs ?? 0;
    const interval = client.limits?.heartbeatIntervalMs ?? 0;
    emit({ ready: true, idleTimeoutMs: idle, heartbeatIntervalMs: interval });
    await new Promise((resolve) => setTimeout(resolve, opts.sleepMs ?? idle + 1000));
    const alive = client.isConnected;
    const rttMs = await client.flush();
    await client.close();
    return { alive, rttMs, idleTimeoutMs: idle, heartbeatIntervalMs: interval };
  },

  /** Broker statistics list this connection and its subscription. */
  async stats(opts) {
    const client = await connect(opts.socket, { name: "ts-stats", component: "daemoneye-agent" });
    const sub = await client.subscribe("events.#");
    const stats = await client.brokerStatistics();
    const result = {
      connections: stats.connections,
      sessionListed: stats.connectionStats.some(
        (c) =>
          c.sessionId === client.sessionId &&
          c.clientName === "ts-stats" &&
          c.component === "daemoneye-agent",
      ),
      subscriptionListed: stats.subscriptionStats.some(
        (s) =>
          s.sessionId === client.sessionId &&
          s.subscriptionId === sub.subscriptionId &&
          s.filter === "events.#",
      ),
    };
    await client.close();
    return result;
  },

  /** Unsubscribe ends iteration; ids are not reused; close ends everything. */
  async lifecycle(opts) {
    const client = await connect(opts.socket, {
      name: "ts-lifecycle",
      component: "daemoneye-agent",
    });
    const first = await client.subscribe(EVENTS_PROCESS_LIFECYCLE);
    await first.unsubscribe();
    await first.unsubscribe(); // idempotent
    let iterated = 0;
    for await (const _ of first) {
      iterated += 1;
    }
    const second = await client.subscribe(EVENTS_PROCESS_LIFECYCLE);
    const third = await client.subscribe("events.#");
    let thirdEnded = false;
    const reader = (async () => {
      for await (const _ of third) {
        iterated += 1;
      }
      thirdEnded = true;
    })();
    await client.close();
    await reader;
    return {
      firstActive: first.active,
      iterated,
      ids: [first.subscriptionId, second.subscriptionId, third.subscriptionId],
      thirdEnded,
      afterClose: await thrown(() => client.flush()),
      closedIsClosedResourceError:
        (await client.flush().catch((e: unknown) => e)) instanceof ClosedResourceError,
    };
  },

  /** The broker shuts down: iteration ends with ConnectionLost (a BrokenResourceError), goodbye set. */
  async goodbye(opts) {
    const client = await connect(opts.socket, { name: "ts-goodbye", component: "daemoneye-agent" });
    const sub = await client.subscribe("#");
    emit({ ready: true });
    let received = 0;
    try {
      for await (const _ of sub) {
        received += 1;
      }
    } catch (err) {
      return {
        ended: describeError(err),
        broken: err instanceof BrokenResourceError,
        goodbye: err instanceof ConnectionLost && err.goodbye,
        closed: (await client.closed)?.name ?? null,
        received,
        connected: client.isConnected,
      };
    }
    return { ended: null, received };
  },
};

run(async () => {
  const opts = options<Options>();
  const scenario = scenarios[opts.scenario];
  if (scenario === undefined) {
    throw new Error(`unknown scenario ${opts.scenario}`);
  }
  emit({ result: await scenario(opts) });
});
