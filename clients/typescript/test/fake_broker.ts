// A scripted fake broker on a Unix socket, for the client's unit tests: it
// decodes what the client sends and answers as each test scripts it. The
// real broker is exercised by tests/test_interop.py and test/*_broker.test.ts.

import { mkdtempSync, rmSync } from "node:fs";
import * as net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after } from "node:test";

import {
  decodeFrameBody,
  decodeLengthPrefix,
  encodeFrame,
  frame,
  type FrameInit,
} from "../src/index.js";
import type { Frame } from "../src/gen/daemoneye/eventbus/v1/frames_pb.js";

export const DIR = mkdtempSync(join(tmpdir(), "deb-ts-"));
after(() => rmSync(DIR, { recursive: true, force: true }));
let counter = 0;

export type Reply = (frame: Frame, peer: Peer) => void;

/** One connection to the fake broker. */
export class Peer {
  readonly frames: Frame[] = [];
  /** Every chunk read, as read. */
  readonly received: Uint8Array[] = [];
  chunks = 0;
  private buf = new Uint8Array(0);
  ended = false;

  constructor(
    readonly socket: net.Socket,
    onFrame: Reply,
  ) {
    socket.on("data", (chunk: Buffer) => {
      this.chunks += 1;
      this.received.push(new Uint8Array(chunk));
      this.buf = new Uint8Array(Buffer.concat([this.buf, chunk]));
      for (;;) {
        const prefix = decodeLengthPrefix(this.buf);
        if (prefix === undefined || prefix[1] + prefix[0] > this.buf.length) {
          break;
        }
        const f = decodeFrameBody(this.buf.subarray(prefix[1], prefix[1] + prefix[0]));
        this.buf = this.buf.subarray(prefix[1] + prefix[0]);
        this.frames.push(f);
        onFrame(f, this);
      }
    });
    socket.on("end", () => {
      this.ended = true;
      socket.end();
    });
    socket.on("error", () => undefined);
  }

  send(kind: FrameInit): void {
    this.socket.write(encodeFrame(frame(kind)));
  }

  raw(bytes: Uint8Array): void {
    this.socket.write(bytes);
  }

  kinds(): (string | undefined)[] {
    return this.frames.map((f) => f.kind.case);
  }
}

export const WELCOME: FrameInit = {
  case: "welcome",
  value: {
    protocolVersion: 1,
    sessionId: "0123456789abcdef",
    limits: { maxFrameBytes: 1 << 20, maxTopicBytes: 255, maxTopicLevels: 16 },
    component: "procmond",
  },
};

/** A broker that welcomes, answers pings and subscribes, then runs `extra`. */
export function standard(extra?: Reply): Reply {
  return (f, peer) => {
    switch (f.kind.case) {
      case "hello":
        peer.send(WELCOME);
        break;
      case "ping":
        peer.send({ case: "pong", value: { nonce: f.kind.value.nonce } });
        break;
      case "subscribe":
        peer.send({ case: "subscribeAck", value: { subscriptionId: f.kind.value.subscriptionId } });
        break;
      case "unsubscribe":
        peer.send({
          case: "unsubscribeAck",
          value: { subscriptionId: f.kind.value.subscriptionId },
        });
        break;
      default:
        break;
    }
    extra?.(f, peer);
  };
}

/** A fake broker: its socket path, the connections it accepted, and controls. */
export interface FakeBroker {
  readonly path: string;
  /** Every connection accepted so far, in order. */
  readonly peers: Peer[];
  /** End every connection at once (as a crash), keep listening. */
  drop(): void;
  /** Stop listening (the socket file goes) and end every connection. */
  stop(): Promise<void>;
  /** Listen again on the same path. */
  start(): Promise<void>;
  /** Stop for good. */
  close(): Promise<void>;
}

export async function fakeBroker(onFrame: Reply): Promise<FakeBroker> {
  const path = join(DIR, `fake-${counter++}.sock`);
  const peers: Peer[] = [];
  let server: net.Server | undefined;
  const drop = (): void => {
    for (const p of peers) {
      p.socket.destroy();
    }
  };
  const start = async (): Promise<void> => {
    const s = net.createServer((socket) => peers.push(new Peer(socket, onFrame)));
    server = s;
    await new Promise<void>((resolve) => s.listen(path, resolve));
  };
  const stop = (): Promise<void> =>
    new Promise<void>((resolve) => {
      drop();
      const s = server;
      server = undefined;
      if (s === undefined) {
        resolve();
      } else {
        s.close(() => resolve());
      }
    });
  await start();
  return { path, peers, drop, stop, start, close: stop };
}

export async function until(check: () => boolean, what: string, ms = 2000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) {
      throw new Error(`timed out waiting for ${what}`);
    }
    await new Promise((r) => setTimeout(r, 5));
  }
}
