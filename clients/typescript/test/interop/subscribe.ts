// Subscribe to a filter and print every event received, in the protobuf JSON
// mapping, until `count` events arrived.
//
// Options: {"socket", "component", "filter", "count", "includeControl"?,
// "correlationFilter"?, "timeoutMs"?}. Prints {"ready": ...} once the
// subscription is acknowledged, one {"event": ...} per event, then
// {"done": n, "missed": m, "dropped": d}.

import { fromJson, type JsonValue } from "@bufbuild/protobuf";

import { CorrelationFilterSchema, connect } from "../../src/index.js";
import { emit, eventJson, options, run } from "./common.js";

interface Options {
  socket: string;
  component: string;
  filter: string;
  count: number;
  includeControl?: boolean;
  correlationFilter?: JsonValue;
  timeoutMs?: number;
}

run(async () => {
  const opts = options<Options>();
  const client = await connect(opts.socket, { name: "ts-subscriber", component: opts.component });
  const sub = await client.subscribe(opts.filter, {
    includeControl: opts.includeControl ?? false,
    correlationFilter:
      opts.correlationFilter === undefined
        ? undefined
        : fromJson(CorrelationFilterSchema, opts.correlationFilter),
  });
  emit({ ready: true, sessionId: client.sessionId, subscriptionId: sub.subscriptionId });
  let got = 0;
  while (got < opts.count) {
    const event = await sub.get(opts.timeoutMs ?? 20_000);
    emit({ event: eventJson(event) });
    got += 1;
  }
  emit({ done: got, missed: sub.missed, dropped: sub.dropped });
  await sub.unsubscribe();
  await client.close();
});
