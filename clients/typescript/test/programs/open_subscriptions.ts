// A client with open subscriptions (and a responder, if the broker routes
// requests) whose broker shuts down under it: run by
// test/broker_lifecycle.test.ts, which stops the broker once this program
// printed its "ready" line. Every iteration ends with the typed error, as
// documented; `closed` resolves; the program then ends by itself (no
// process.exit: a timer or socket left open would keep it alive) with
// nothing on stderr.
//
// Usage: node --import tsx open_subscriptions.ts <socket>

import {
  CONTROL_COLLECTOR_RPC_HEALTH,
  ConnectionLost,
  EVENTS_PROCESS_LIFECYCLE,
  connect,
} from "../../src/index.js";

const socket = process.argv[2] ?? "/tmp/daemoneye.sock";

async function drain(iterable: AsyncIterable<unknown>): Promise<string> {
  try {
    for await (const _ of iterable) {
      // nothing is published
    }
    return "ended";
  } catch (err) {
    return err instanceof ConnectionLost ? `ConnectionLost goodbye=${err.goodbye}` : String(err);
  }
}

const client = await connect(socket, { name: "open-subscriptions", component: "daemoneye-agent" });
const iterations = [
  drain(await client.subscribe(EVENTS_PROCESS_LIFECYCLE)),
  drain(await client.subscribe("events.#", { includeControl: true })),
];
if (client.features.requests) {
  // A responder (serving needs a collector's claim: a second connection).
  const collector = await connect(socket, { name: "open-responder", component: "procmond" });
  iterations.push(drain(await collector.serve(CONTROL_COLLECTOR_RPC_HEALTH)));
  void collector.closed;
}
process.stdout.write(JSON.stringify({ ready: true }) + "\n");
const reason = await client.closed;
const ended = await Promise.all(iterations);
process.stdout.write(
  JSON.stringify({
    requests: client.features.requests,
    closed: reason?.constructor.name ?? null,
    goodbye: reason instanceof ConnectionLost ? reason.goodbye : null,
    ended,
  }) + "\n",
);
