// Shared helpers of the interop programs run by tests/test_interop.py.
//
// Each program takes one JSON argument (its options) and writes one JSON
// object per line on stdout; the Python side reads them. Errors end the
// program with exit code 1 and a {"error": ...} line.

import { toJson, type JsonValue } from "@bufbuild/protobuf";

import { CorrelationMetadataSchema } from "../../src/gen/daemoneye/eventbus/v1/correlation_pb.js";
import { EventBusError, PAYLOAD_REGISTRY, type ReceivedEvent } from "../../src/index.js";

/** The program's options: its single command-line argument, as JSON. */
export function options<T>(): T {
  const arg = process.argv[2];
  if (arg === undefined) {
    throw new Error("usage: <program> '<options as JSON>'");
  }
  return JSON.parse(arg) as T;
}

/** Write one JSON line. */
export function emit(value: unknown): void {
  process.stdout.write(
    JSON.stringify(value, (_key, v: unknown) => (typeof v === "bigint" ? v.toString() : v)) + "\n",
  );
}

/** A JSON description of an error, with the broker's code when it sent one. */
export function describeError(err: unknown): Record<string, unknown> {
  if (err instanceof EventBusError) {
    return {
      class: err.name,
      code: err.codeName ?? null,
      fatal: err.fatal,
      subscriptionId: err.subscriptionId,
      topic: err.topic,
      message: err.message,
    };
  }
  return { class: err instanceof Error ? err.name : typeof err, message: String(err) };
}

/** A received event in the JSON mapping: what the Python side compares field by field. */
export function eventJson(event: ReceivedEvent): Record<string, JsonValue> {
  const schema = event.schema ?? PAYLOAD_REGISTRY.getMessage(event.payloadType);
  if (schema === undefined) {
    throw new Error(`unknown payload type ${event.payloadType}`);
  }
  return {
    topic: event.topic,
    payloadType: event.payloadType,
    sequence: event.sequence.toString(),
    subscriptionId: event.subscriptionId,
    correlation:
      event.correlation === undefined ? null : toJson(CorrelationMetadataSchema, event.correlation),
    payload: toJson(schema, event.message()),
    eventId: event.eventId.toString(),
    receivedAtNs: event.receivedAtNs.toString(),
    retained: event.retained,
  };
}

/** Exit once everything written to stdout is out: a pipe may take it asynchronously. */
function exit(code: number): void {
  process.stdout.write("", () => process.exit(code));
}

/** Run `main`, reporting a failure as a JSON line and exit code 1. */
export function run(main: () => Promise<void>): void {
  main().then(
    () => exit(0),
    (err: unknown) => {
      emit({ error: describeError(err) });
      exit(1);
    },
  );
}
