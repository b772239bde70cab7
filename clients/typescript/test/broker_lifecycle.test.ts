// The client's connection lifecycle against the real Python broker (from the
// project's .venv; skipped without it): a broker stopped and started again on
// the same socket path, which a client with `reconnect` survives with its
// subscriptions; and a broker shutting down under a client with open
// subscriptions, in a child process that must end by itself, exit code 0,
// nothing on stderr.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";

import { create } from "@bufbuild/protobuf";

import {
  ConnectionLost,
  EVENTS_PROCESS_LIFECYCLE,
  ProcessEventSchema,
  connect,
  type Client,
} from "../src/index.js";
import { SKIP, sleep, startBroker, stopBroker, type Broker } from "./python_broker.js";

const TS_DIR = fileURLToPath(new URL("../", import.meta.url));

async function publish(socket: string, pids: number[]): Promise<void> {
  const publisher = await connect(socket, { name: "ts-publisher", component: "procmond" });
  for (const pid of pids) {
    await publisher.publish(EVENTS_PROCESS_LIFECYCLE, create(ProcessEventSchema, { pid }));
  }
  await publisher.close();
}

async function until(check: () => boolean, what: string, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) {
      throw new Error(`timed out waiting for ${what}`);
    }
    await sleep(10);
  }
}

describe("the connection lifecycle against the Python broker", { skip: SKIP }, () => {
  let dir: string;
  let socket: string;
  let broker: Broker | undefined;

  before(() => {
    dir = mkdtempSync(join(tmpdir(), "deb-ts-lifecycle-"));
    socket = join(dir, "broker.sock");
  });

  after(async () => {
    await stopBroker(broker);
    rmSync(dir, { recursive: true, force: true });
  });

  test(
    "a broker restarted on the same socket: subscriptions resume",
    { timeout: 60_000 },
    async () => {
      broker = await startBroker(socket);
      let subscriber: Client | undefined;
      try {
        subscriber = await connect(socket, {
          name: "ts-reconnecting",
          component: "daemoneye-agent",
          reconnect: { initialDelayMs: 50, maxDelayMs: 400 },
        });
        const lost: ConnectionLost[] = [];
        let back = 0;
        subscriber.onDisconnect = (err) => lost.push(err);
        subscriber.onReconnect = () => (back += 1);
        const typed = await subscriber.subscribe(EVENTS_PROCESS_LIFECYCLE);
        const filtered = await subscriber.subscribe("events.process.+", {
          correlationFilter: { rootCorrelationIds: ["never"] },
        });
        await publish(socket, [1, 2]);
        assert.deepEqual(
          [(await typed.get(5000)).message().pid, (await typed.get(5000)).message().pid],
          [1, 2],
        );

        await stopBroker(broker); // an orderly shutdown: a goodbye, then the socket goes
        broker = undefined;
        await until(() => lost.length === 1, "the disconnection");
        assert.equal(lost[0]?.goodbye, true);
        await assert.rejects(subscriber.flush(), ConnectionLost);
        assert.equal(typed.active, true);
        await sleep(300); // a few attempts find no broker

        broker = await startBroker(socket);
        await until(() => back === 1, "the reconnection", 20_000);
        assert.ok(subscriber.isConnected);
        await publish(socket, [3, 4]);
        const after = [await typed.get(5000), await typed.get(5000)];
        assert.deepEqual(
          after.map((e) => [e.message().pid, e.sequence]),
          [
            [3, 1n],
            [4, 2n],
          ],
        );
        assert.equal(typed.missed, 0);
        assert.equal(filtered.getNowait(), undefined, "the correlation filter came back too");
        const stats = await subscriber.brokerStatistics();
        const mine = stats.subscriptionStats.filter((s) => s.sessionId === subscriber?.sessionId);
        assert.deepEqual(mine.map((s) => s.filter).sort(), [
          "events.process.+",
          "events.process.lifecycle",
        ]);
        assert.equal(subscriber.statistics().reconnects, 1);
      } finally {
        await subscriber?.close();
      }
    },
  );

  test(
    "a broker shutting down under open subscriptions: the client's process ends cleanly",
    { timeout: 60_000 },
    async () => {
      broker ??= await startBroker(socket);
      const child = spawn(
        process.execPath,
        ["--import", "tsx", join("test", "programs", "open_subscriptions.ts"), socket],
        { cwd: TS_DIR, stdio: ["ignore", "pipe", "pipe"] },
      );
      let stdout = "";
      let stderr = "";
      child.stdout.on("data", (chunk: Buffer) => (stdout += chunk.toString()));
      child.stderr.on("data", (chunk: Buffer) => (stderr += chunk.toString()));
      const exited = new Promise<number | null>((resolve) => child.once("exit", resolve));
      try {
        await until(() => stdout.includes('"ready"'), "the program to subscribe", 30_000);
        assert.equal(await stopBroker(broker), 0);
        broker = undefined;
        let timer: NodeJS.Timeout | undefined;
        const code = await Promise.race([
          exited,
          new Promise<string>(
            (resolve) => (timer = setTimeout(() => resolve("still running"), 15_000)),
          ),
        ]);
        clearTimeout(timer);
        assert.equal(code, 0, `exit: ${String(code)}\n${stderr}`);
        assert.equal(stderr, "");
        const lines = stdout
          .trim()
          .split("\n")
          .map((line) => JSON.parse(line) as Record<string, unknown>);
        const summary = lines.at(-1);
        assert.equal(summary?.["closed"], "ConnectionLost");
        assert.equal(summary?.["goodbye"], true);
        const ended = summary?.["ended"] as string[];
        // Two subscriptions, and a responder when the broker routes requests.
        assert.equal(ended.length, summary?.["requests"] === true ? 3 : 2);
        for (const how of ended) {
          assert.equal(how, "ConnectionLost goodbye=true");
        }
      } finally {
        child.kill("SIGKILL");
      }
    },
  );
});
