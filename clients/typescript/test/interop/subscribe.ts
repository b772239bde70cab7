// Subscribe to a filter and print every event received, in the protobuf JSON
// mapping, until `count` events arrived.
//
// Options: {"socket", "component", "filter", "count", "includeControl"?,
// "correlationFilter"?, "timeoutMs"?, "collect"?}. Prints {"ready": ...} once
// the subscription is acknowledged, one {"event": ...} per event, then
// {"done": n, "missed": m, "dropped": d, "batches": b}, b being the number of
// DeliverBatch frames received. With "collect", the events are printed only
// once all `count` have arrived: a test that reads the output later cannot
// stall the socket through a full stdout pipe.

import { fromJson, type JsonValue } from "@bufbuild/protobuf";

import { CorrelationFilterSchema, connect, type ReceivedEvent } from "../../src/index.js";
import { emit, eventJson, options, run } from "./common.js";

interface Options {
  socket: string;
  component: string;
  filter: string;
  count: number;
  includeControl?: boolean;
  correlationFilter?: JsonValue;
  timeoutMs?: number;
  collect?: boolean;
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
  let batches = 0; // counted around the (internal) entry point of DeliverBatch frames
  const deliverBatch = sub.deliverBatch.bind(sub);
  sub.deliverBatch = (deliver) => {
    batches += 1;
    deliverBatch(deliver);
  };
  emit({ ready: true, sessionId: client.sessionId, subscriptionId: sub.subscriptionId });
  const collected: ReceivedEvent[] = [];
  let got = 0;
  while (got < opts.count) {
    const event = await sub.get(opts.timeoutMs ?? 20_000);
    if (opts.collect) {
      collected.push(event);
    } else {
      emit({ event: eventJson(event) });
    }
    got += 1;
  }
  for (const event of collected) {
    emit({ event: eventJson(event) });
  }
  emit({ done: got, missed: sub.missed, dropped: sub.dropped, batches });
  await sub.unsubscribe();
  await client.close();
});
