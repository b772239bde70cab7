// A subscriber whose Hello does not set accept_batches (as clients did before
// batches existed), on the sans-I/O ClientConnection and a bare socket: the
// broker must send it one Deliver per event, batches unrolled.
//
// Options: {"socket", "component", "filter", "count", "timeoutMs"?}. Prints
// {"ready": true, "batches": <Welcome.batches>} once the subscription is
// acknowledged; once `count` events arrived, one {"event": ...} per event
// (as subscribe.ts) and {"done": n}. Any frame other than a Deliver (a
// DeliverBatch in particular) after the acknowledgement is an error; pings
// are answered.

import * as net from "node:net";

import {
  ClientConnection,
  PROTOCOL_VERSION,
  ReceivedEvent,
  frame,
  type FrameInit,
  type frames,
} from "../../src/index.js";
import { emit, eventJson, options, run } from "./common.js";

interface Options {
  socket: string;
  component: string;
  filter: string;
  count: number;
  timeoutMs?: number;
}

const SUBSCRIPTION_ID = 1;

run(async () => {
  const opts = options<Options>();
  const timeoutMs = opts.timeoutMs ?? 20_000;
  const conn = new ClientConnection();
  const socket = net.createConnection({ path: opts.socket });
  const send = (kind: FrameInit) => socket.write(conn.send(frame(kind)));

  const inbox: frames.Frame[] = [];
  let wake: (() => void) | undefined;
  socket.on("data", (chunk: Buffer) => {
    for (const f of conn.receiveData(chunk)) {
      if (f.kind.case === "ping") {
        send({ case: "pong", value: { nonce: f.kind.value.nonce } });
      } else {
        inbox.push(f);
      }
    }
    wake?.();
  });
  socket.on("close", () => wake?.());

  let head = 0;
  async function next(): Promise<frames.Frame> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const f = inbox[head];
      if (f !== undefined) {
        head += 1;
        return f;
      }
      if (conn.error !== undefined || socket.destroyed || Date.now() > deadline) {
        throw new Error(`no frame: ${conn.error?.message ?? "connection closed or timed out"}`);
      }
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, deadline - Date.now());
        wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
  }

  async function expect(kind: frames.Frame["kind"]["case"]): Promise<frames.Frame> {
    const f = await next();
    if (f.kind.case !== kind) {
      throw new Error(`expected a ${String(kind)} frame, got ${String(f.kind.case)}`);
    }
    return f;
  }

  await new Promise<void>((resolve, reject) => {
    socket.once("connect", resolve);
    socket.once("error", reject);
  });
  send({
    case: "hello",
    value: {
      protocolVersion: PROTOCOL_VERSION,
      clientName: "ts-unbatched",
      component: opts.component,
    },
  });
  const welcome = await expect("welcome");
  send({ case: "subscribe", value: { subscriptionId: SUBSCRIPTION_ID, filter: opts.filter } });
  await expect("subscribeAck");
  emit({ ready: true, batches: welcome.kind.case === "welcome" && welcome.kind.value.batches });

  const events: ReceivedEvent[] = [];
  while (events.length < opts.count) {
    const deliver = (await expect("deliver")).kind;
    if (deliver.case !== "deliver" || deliver.value.subscriptionId !== SUBSCRIPTION_ID) {
      throw new Error("a Deliver for another subscription");
    }
    const { publish, sequence } = deliver.value;
    events.push(
      new ReceivedEvent(
        publish?.topic ?? "",
        publish?.payloadType ?? "",
        publish?.payload ?? new Uint8Array(),
        publish?.correlation,
        sequence,
        SUBSCRIPTION_ID,
      ),
    );
  }
  for (const event of events) {
    emit({ event: eventJson(event) });
  }
  emit({ done: events.length });
  send({ case: "goodbye", value: { reason: "done" } });
  socket.end();
});
