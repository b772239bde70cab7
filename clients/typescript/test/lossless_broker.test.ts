// Credit-based (lossless) delivery against the real Python broker: `serve`
// runs from the project's virtualenv (.venv, `make venv`) in its own process,
// and the subscribers connect through a relay that decodes the frames both
// ways, to see the Credit frames the client sends and to check the window the
// broker keeps. Publishers: this client in the same process, and the Python
// CLI (`daemoneye-eventbus pub --count`) in another.

import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import * as net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";

import { create, fromBinary } from "@bufbuild/protobuf";

import {
  EVENTS_PROCESS_INTEGRITY,
  EVENTS_PROCESS_LIFECYCLE,
  ProcessEventSchema,
  connect,
  decodeFrameBody,
  decodeLengthPrefix,
  type Client,
  type ReceivedEvent,
  type Subscription,
} from "../src/index.js";
import type { Frame } from "../src/gen/daemoneye/eventbus/v1/frames_pb.js";
import { SKIP, cli, sleep, startBroker, stopBroker, type Broker } from "./python_broker.js";

const EVENTS = 20_000;

/** What went through the relay for one client connection. */
class Tap {
  /** Subscription id -> `SubscribeAck.window`. */
  readonly windows = new Map<number, number>();
  /** Subscription id -> events delivered so far. */
  readonly delivered = new Map<number, number>();
  /** Subscription id -> events granted back so far. */
  readonly credited = new Map<number, number>();
  /** Subscription id -> Credit frames. */
  readonly creditFrames = new Map<number, number>();
  /** Subscription id -> most events sent beyond the credit, right after a frame. */
  readonly maxOutstanding = new Map<number, number>();
  /** Deliveries the broker started with no credit left: [subscription, outstanding, window]. */
  readonly overruns: [number, number, number][] = [];

  fromClient(f: Frame): void {
    if (f.kind.case === "credit") {
      const id = f.kind.value.subscriptionId;
      this.credited.set(id, (this.credited.get(id) ?? 0) + f.kind.value.events);
      this.creditFrames.set(id, (this.creditFrames.get(id) ?? 0) + 1);
    }
  }

  fromBroker(f: Frame): void {
    let id: number;
    let events: number;
    if (f.kind.case === "subscribeAck") {
      this.windows.set(f.kind.value.subscriptionId, f.kind.value.window);
      return;
    } else if (f.kind.case === "deliver") {
      id = f.kind.value.subscriptionId;
      events = 1;
    } else if (f.kind.case === "deliverBatch") {
      id = f.kind.value.subscriptionId;
      events = f.kind.value.batch?.payloads.length ?? 0;
    } else {
      return;
    }
    const window = this.windows.get(id) ?? 0;
    const before = (this.delivered.get(id) ?? 0) - (this.credited.get(id) ?? 0);
    // Credit seen here has not all reached the broker yet, and every event
    // seen here had left it: so `before` is at most what the broker counts.
    if (window > 0 && before >= window) {
      this.overruns.push([id, before, window]);
    }
    this.delivered.set(id, (this.delivered.get(id) ?? 0) + events);
    this.maxOutstanding.set(id, Math.max(this.maxOutstanding.get(id) ?? 0, before + events));
  }
}

/** Parses length-delimited frames from a byte stream. */
class FrameReader {
  private buf: Uint8Array = new Uint8Array(0);

  constructor(private readonly onFrame: (f: Frame) => void) {}

  push(chunk: Uint8Array): void {
    this.buf = this.buf.length ? new Uint8Array(Buffer.concat([this.buf, chunk])) : chunk;
    let pos = 0;
    for (;;) {
      const prefix = decodeLengthPrefix(this.buf, pos);
      if (prefix === undefined || prefix[1] + prefix[0] > this.buf.length) {
        break;
      }
      this.onFrame(decodeFrameBody(this.buf.subarray(prefix[1], prefix[1] + prefix[0])));
      pos = prefix[1] + prefix[0];
    }
    this.buf = this.buf.subarray(pos);
  }
}

/** A Unix socket in front of the broker's, passing bytes through unchanged and tapping them. */
async function relay(
  target: string,
  path: string,
): Promise<{ path: string; taps: Tap[]; close(): Promise<void> }> {
  const taps: Tap[] = [];
  const sockets: net.Socket[] = [];
  const server = net.createServer((client) => {
    const tap = new Tap();
    taps.push(tap);
    const upstream = net.createConnection({ path: target });
    sockets.push(client, upstream);
    const up = new FrameReader((f) => tap.fromClient(f));
    const down = new FrameReader((f) => tap.fromBroker(f));
    client.on("data", (chunk: Buffer) => {
      up.push(chunk);
      if (!upstream.write(chunk)) {
        client.pause();
      }
    });
    upstream.on("drain", () => client.resume());
    upstream.on("data", (chunk: Buffer) => {
      down.push(chunk);
      if (!client.write(chunk)) {
        upstream.pause();
      }
    });
    client.on("drain", () => upstream.resume());
    client.on("end", () => upstream.end());
    upstream.on("end", () => client.end());
    client.on("error", () => upstream.destroy());
    upstream.on("error", () => client.destroy());
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  return {
    path,
    taps,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) {
          s.destroy();
        }
        server.close(() => resolve());
      }),
  };
}

/**
 * A slow reader: take `count` events (or, with `count` undefined, every event
 * until `done()` and the queue is empty), pausing 1 ms every `every` events.
 * Checks that sequence numbers only increase; returns the events' pids with
 * their sequences.
 */
async function readSlowly(
  sub: Subscription<typeof ProcessEventSchema>,
  options: { count?: number; every: number; done?: () => boolean; timeoutMs?: number },
): Promise<[bigint, number][]> {
  const got: [bigint, number][] = [];
  let last = 0n;
  const deadline = Date.now() + (options.timeoutMs ?? 60_000);
  while (options.count === undefined || got.length < options.count) {
    let event: ReceivedEvent<typeof ProcessEventSchema> | undefined = sub.getNowait();
    if (event === undefined) {
      if (options.count === undefined) {
        if (options.done?.()) {
          break;
        }
        await sleep(1);
        continue;
      }
      event = await sub.get(Math.max(1, deadline - Date.now()));
    }
    assert.ok(event.sequence > last, `sequence ${event.sequence} after ${last}`);
    last = event.sequence;
    got.push([event.sequence, event.message().pid]);
    if (got.length % options.every === 0) {
      await sleep(1);
    }
    if (Date.now() > deadline) {
      throw new Error(`read ${got.length} events in ${options.timeoutMs ?? 60_000} ms`);
    }
  }
  return got;
}

/** Publish `count` process events with pids 1..count, then wait until the broker handled them. */
async function publishAll(client: Client, count: number): Promise<void> {
  for (let pid = 1; pid <= count; pid++) {
    await client.publish(EVENTS_PROCESS_LIFECYCLE, create(ProcessEventSchema, { pid }));
  }
  await client.flush();
}

describe("credit-based delivery against the Python broker", { skip: SKIP }, () => {
  let dir: string;
  let socket: string;
  let broker: Broker;
  let counter = 0;

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), "deb-ts-lossless-"));
    socket = join(dir, "broker.sock");
    broker = await startBroker(socket);
  });

  after(async () => {
    await stopBroker(broker);
    rmSync(dir, { recursive: true, force: true });
  });

  test(
    `a lossless subscriber reading slowly gets all ${EVENTS} events in order; credit flows`,
    { timeout: 120_000 },
    async () => {
      const tapped = await relay(socket, join(dir, `relay-${counter++}.sock`));
      const reader = await connect(tapped.path, { component: "daemoneye-agent" });
      const writer = await connect(socket, { component: "procmond", requestTimeoutMs: 60_000 });
      try {
        const window = 256;
        const sub = await reader.subscribe(EVENTS_PROCESS_LIFECYCLE, {
          lossless: true,
          window,
          maxPending: 64, // what at most once would keep: credit mode keeps everything
        });
        assert.equal(sub.lossless, true);
        assert.ok(sub.window > 0 && sub.window <= window, `window ${sub.window}`);
        const published = publishAll(writer, EVENTS);
        published.catch(() => undefined); // awaited below
        const got = await readSlowly(sub, { count: EVENTS, every: 20 });
        await published;
        assert.deepEqual(
          got.map(([sequence]) => sequence),
          Array.from({ length: EVENTS }, (_, i) => BigInt(i + 1)),
        );
        assert.deepEqual(
          got.map(([, pid]) => pid),
          Array.from({ length: EVENTS }, (_, i) => i + 1),
        );
        assert.deepEqual([sub.received, sub.missed, sub.dropped], [EVENTS, 0, 0]);
        assert.equal(sub.getNowait(), undefined);

        await reader.flush(); // the last Credit frames have gone through the relay
        const tap = tapped.taps[0];
        assert.ok(tap);
        const id = sub.subscriptionId;
        const threshold = Math.max(1, Math.floor(sub.window / 4));
        assert.equal(tap.windows.get(id), sub.window);
        assert.equal(tap.delivered.get(id), EVENTS);
        assert.equal(tap.credited.get(id), sub.credited);
        assert.equal(sub.credited, EVENTS - (EVENTS % threshold));
        assert.equal(tap.creditFrames.get(id), Math.floor(EVENTS / threshold));
        assert.deepEqual(tap.overruns, [], "deliveries started with no credit left");
        // The reader was slow enough for the broker to use the whole window.
        const outstanding = tap.maxOutstanding.get(id) ?? 0;
        assert.ok(outstanding >= sub.window, `at most ${outstanding} events outstanding`);
      } finally {
        await writer.close();
        await reader.close();
        await tapped.close();
      }
    },
  );

  test(
    `at most once in the same conditions: no credit, events dropped and counted`,
    { timeout: 120_000 },
    async () => {
      const tapped = await relay(socket, join(dir, `relay-${counter++}.sock`));
      const reader = await connect(tapped.path, { component: "daemoneye-agent" });
      const writer = await connect(socket, { component: "procmond", requestTimeoutMs: 60_000 });
      try {
        const sub = await reader.subscribe(EVENTS_PROCESS_LIFECYCLE, { maxPending: 64 });
        assert.deepEqual([sub.window, sub.lossless], [0, false]);
        let done = false;
        const published = publishAll(writer, EVENTS).then(async () => {
          await reader.flush(); // what the broker queued for the reader is here
          done = true;
        });
        published.catch(() => {
          done = true;
        });
        const got = await readSlowly(sub, { every: 20, done: () => done });
        await published;
        for (const [sequence, pid] of got) {
          assert.equal(pid, Number(sequence)); // the broker numbers every event it matched
        }
        const lost = sub.dropped + sub.missed;
        assert.equal(sub.received, got.length);
        assert.ok(got.length + lost <= EVENTS);
        assert.ok(lost > 0, `a slow reader lost nothing (received ${got.length})`);
        assert.equal(sub.credited, 0);
        const tap = tapped.taps[0];
        assert.ok(tap);
        assert.equal(tap.windows.get(sub.subscriptionId), 0);
        assert.equal(tap.creditFrames.size, 0);
      } finally {
        await writer.close();
        await reader.close();
        await tapped.close();
      }
    },
  );

  test(
    "a filter reaching a lossless and a plain topic: every lossless event, nothing dropped here",
    { timeout: 120_000 },
    async (t) => {
      const count = 10_000;
      const tapped = await relay(socket, join(dir, `relay-${counter++}.sock`));
      const reader = await connect(tapped.path, { component: "daemoneye-agent" });
      const writer = await connect(socket, { component: "procmond", requestTimeoutMs: 60_000 });
      try {
        // No window given: the subscription's maxPending is asked for.
        const sub = await reader.subscribe("events.process.+", { maxPending: 200 });
        assert.equal(sub.lossless, false);
        assert.ok(sub.window > 0 && sub.window <= 200, `window ${sub.window}`);
        let done = false;
        const published = (async () => {
          for (let pid = 1; pid <= count; pid++) {
            const event = create(ProcessEventSchema, { pid });
            await writer.publish(EVENTS_PROCESS_LIFECYCLE, event);
            await writer.publish(EVENTS_PROCESS_INTEGRITY, event);
          }
          await writer.flush();
          await reader.flush(); // what the broker sent the reader is here
        })().finally(() => {
          done = true;
        });
        published.catch(() => undefined); // awaited below
        const integrity: number[] = [];
        const lifecycle: number[] = [];
        let last = 0n;
        for (let taken = 0; ; taken++) {
          const event = sub.getNowait();
          if (event === undefined) {
            if (done) {
              break;
            }
            await sleep(1);
            continue;
          }
          assert.ok(event.sequence > last);
          last = event.sequence;
          const pid = fromBinary(ProcessEventSchema, event.payload).pid;
          (event.topic === EVENTS_PROCESS_INTEGRITY.name ? integrity : lifecycle).push(pid);
          if (taken % 20 === 0) {
            await sleep(1);
          }
        }
        await published;
        assert.deepEqual(
          integrity,
          Array.from({ length: count }, (_, i) => i + 1),
        );
        assert.ok(lifecycle.every((pid, i) => i === 0 || pid > (lifecycle[i - 1] ?? 0)));
        assert.equal(sub.dropped, 0, "a credit-based queue never drops");
        assert.equal(sub.received, integrity.length + lifecycle.length);
        const tap = tapped.taps[0];
        assert.ok(tap);
        assert.deepEqual(tap.overruns, []);
        assert.equal(tap.credited.get(sub.subscriptionId), sub.credited);
        assert.ok((tap.creditFrames.get(sub.subscriptionId) ?? 0) > 0);
        t.diagnostic(
          `  plain topic: ${lifecycle.length} of ${count} events received, ` +
            `${sub.missed} missed (sequence gaps), window ${sub.window}`,
        );
      } finally {
        await writer.close();
        await reader.close();
        await tapped.close();
      }
    },
  );

  test(
    "a topic the schema declares lossless is credit based without asking (Python publisher)",
    { timeout: 120_000 },
    async () => {
      const count = 5000;
      const tapped = await relay(socket, join(dir, `relay-${counter++}.sock`));
      const reader = await connect(tapped.path, { component: "daemoneye-agent" });
      try {
        assert.equal(EVENTS_PROCESS_INTEGRITY.lossless, true);
        const sub = await reader.subscribe(EVENTS_PROCESS_INTEGRITY, { window: 100 });
        assert.equal(sub.lossless, false);
        assert.ok(sub.window > 0 && sub.window <= 100, `window ${sub.window}`);
        const published = cli(
          socket,
          "pub",
          "events.process.integrity",
          "--component",
          "procmond",
          "--json",
          '{"pid": 4242, "name": "sshd"}',
          "--count",
          String(count),
        );
        // A publisher that fails ends the test at once, not at the read's deadline.
        const failed = published.then((result) => {
          if (result.code !== 0) {
            throw new Error(`pub exited with ${result.code}: ${result.output}`);
          }
          return new Promise<never>(() => undefined);
        });
        const got = await Promise.race([readSlowly(sub, { count, every: 10 }), failed]);
        const result = await published;
        assert.equal(result.code, 0, result.output);
        assert.deepEqual(
          got.map(([sequence]) => sequence),
          Array.from({ length: count }, (_, i) => BigInt(i + 1)),
        );
        assert.ok(got.every(([, pid]) => pid === 4242));
        assert.deepEqual([sub.missed, sub.dropped], [0, 0]);
        await reader.flush();
        const tap = tapped.taps[0];
        assert.ok(tap);
        assert.equal(tap.credited.get(sub.subscriptionId), sub.credited);
        assert.ok(sub.credited >= count - sub.window, `credited ${sub.credited}`);
        assert.deepEqual(tap.overruns, []);
        const outstanding = tap.maxOutstanding.get(sub.subscriptionId) ?? 0;
        assert.ok(outstanding >= sub.window, `at most ${outstanding} events outstanding`);
      } finally {
        await reader.close();
        await tapped.close();
      }
    },
  );
});
