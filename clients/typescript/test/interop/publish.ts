// Publish events given in the protobuf JSON mapping, then flush and close.
//
// Options: {"socket", "component", "name"?, "events": [{"topic", "payload",
// "correlation"?}]}. Prints {"ready": ...} after the handshake, then
// {"published": n, "refused": [...]} once the broker has handled every event.

import { fromJson, type JsonValue } from "@bufbuild/protobuf";

import { CorrelationMetadataSchema, connect, lookup, type EventBusError } from "../../src/index.js";
import { describeError, emit, options, run } from "./common.js";

interface Options {
  socket: string;
  component: string;
  name?: string;
  events: { topic: string; payload: JsonValue; correlation?: JsonValue }[];
}

run(async () => {
  const opts = options<Options>();
  const client = await connect(opts.socket, {
    name: opts.name ?? "ts-publisher",
    component: opts.component,
  });
  const refused: EventBusError[] = [];
  client.onError = (err) => refused.push(err);
  emit({ ready: true, sessionId: client.sessionId, component: client.acceptedComponent });
  for (const event of opts.events) {
    const topic = lookup(event.topic);
    if (topic === undefined) {
      throw new Error(`topic ${event.topic} is not declared`);
    }
    const correlation =
      event.correlation === undefined
        ? undefined
        : fromJson(CorrelationMetadataSchema, event.correlation);
    await client.publish(topic, fromJson(topic.schema, event.payload), { correlation });
  }
  await client.flush();
  emit({ published: opts.events.length, refused: refused.map(describeError) });
  await client.close();
});
