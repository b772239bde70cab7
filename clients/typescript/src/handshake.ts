/**
 * The handshake [protocol §3]: our `Hello` (with the last will), held to the
 * handshake's frame limit, and the wait for the broker's `Welcome`: the
 * socket connects, the `Hello` goes out, the `Welcome` comes back, all
 * within the connect timeout. The Python client's `hello_frame`
 * (`client/connection.py`).
 *
 * @module
 */

import type * as net from "node:net";

import { create, toBinary, type DescMessage } from "@bufbuild/protobuf";

import { PublishSchema, type Welcome } from "./gen/daemoneye/eventbus/v1/frames_pb.js";
import { correlationMetadata, payloadTypeOf } from "./checks.js";
import { BrokenResourceError, LimitExceeded, RequestTimeout } from "./errors.js";
import type { Publication } from "./options.js";
import {
  ClientConnection,
  HANDSHAKE_MAX_FRAME_BYTES,
  PROTOCOL_VERSION,
  decodeLengthPrefix,
  frame,
} from "./protocol.js";

/** Who says hello: the client's name and component, and its last will. */
export interface HelloInit {
  readonly name: string;
  readonly component: string;
  readonly lastWill: Publication<DescMessage> | undefined;
}

/** The bytes of our `Hello` on `conn`, held to the handshake's frame limit [protocol §1, §3]. */
export function helloBytes(conn: ClientConnection, init: HelloInit): Uint8Array {
  let lastWill;
  const will = init.lastWill;
  if (will !== undefined) {
    const payloadType = payloadTypeOf(will.topic, will.message);
    lastWill = create(PublishSchema, {
      topic: will.topic.name,
      payloadType,
      payload: toBinary(will.topic.schema, will.message),
      correlation: correlationMetadata(will.correlation),
    });
  }
  const hello = frame({
    case: "hello",
    value: {
      protocolVersion: PROTOCOL_VERSION,
      clientName: init.name,
      component: init.component,
      acceptBatches: true, // decoded by Subscription.deliverBatch
      credit: true, // granted by Subscription.acknowledged's counter
      lastWill,
    },
  });
  const data = conn.send(hello);
  const [length] = decodeLengthPrefix(data) ?? [data.length];
  if (length > HANDSHAKE_MAX_FRAME_BYTES) {
    throw new LimitExceeded(
      `the Hello (with its last will) exceeds the handshake's limit of ${HANDSHAKE_MAX_FRAME_BYTES} bytes`,
    );
  }
  return data;
}

/**
 * Wait for `socket` (to the broker at `path`) to connect, write `hello`, and
 * wait for `welcome` (settled by the client's receiver: it rejects too if the
 * socket closes or fails while connecting), all within `timeoutMs`. Rejects
 * with a {@link BrokenResourceError} when the socket cannot connect, a
 * {@link RequestTimeout} at the deadline, or the error `welcome` rejects with.
 */
export async function handshake(
  socket: net.Socket,
  path: string,
  hello: Uint8Array,
  welcome: Promise<Welcome>,
  timeoutMs: number,
): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new RequestTimeout(`no handshake with ${path} within ${timeoutMs} ms`)),
      timeoutMs,
    );
  });
  const opened = new Promise<void>((resolve, reject) => {
    socket.once("connect", resolve);
    socket.once("error", (err: NodeJS.ErrnoException) => {
      const reason =
        err.code === "ENOENT" || err.code === "ECONNREFUSED" ? "no broker at" : "cannot connect to";
      reject(new BrokenResourceError(`${reason} ${path}: ${err.message}`, { cause: err }));
    });
  });
  opened.catch(() => undefined); // an error after the deadline won the race
  try {
    await Promise.race([opened, deadline, welcome]);
    socket.write(hello);
    await Promise.race([welcome, deadline]);
  } finally {
    clearTimeout(timer);
  }
}
