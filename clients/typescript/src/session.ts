/**
 * One connection to the broker at a time ({@link BrokerSession}): the client's
 * settings, the socket and the handshake (its `Hello` and the wait for the
 * `Welcome`: handshake.ts), what the broker said in its `Welcome`, the frames
 * about the connection itself (`Welcome`, `Goodbye`, a fatal `Error`, a
 * protocol violation) and what ended it. It builds on `FrameExchange`
 * (exchange.ts), the frames exchanged on whichever connection is open;
 * `BrokerConnection` (connection.ts) adds the client's life across
 * connections: connect, close and reconnect.
 *
 * @module
 */

import * as net from "node:net";

import type { DescMessage } from "@bufbuild/protobuf";

import {
  ErrorCode,
  type Frame,
  type Limits,
  type Welcome,
} from "./gen/daemoneye/eventbus/v1/frames_pb.js";
import type { Pending } from "./answers.js";
import { ClosedResourceError, ConnectionLost, EventBusError, errorFromFrame } from "./errors.js";
import { FrameExchange } from "./exchange.js";
import { handshake, helloBytes } from "./handshake.js";
import {
  DEFAULT_SOCKET_PATH,
  type BrokerFeatures,
  type ClientOptions,
  type Publication,
} from "./options.js";
import { ClientConnection, DEFAULT_MAX_FRAME_BYTES, encodeFrame, frame } from "./protocol.js";
import { reconnectPolicy, type ReconnectPolicy } from "./reconnect.js";

const NO_FEATURES: BrokerFeatures = Object.freeze({ batches: false, requests: false });

/**
 * The connection of the moment: see `BrokerConnection`, which extends it. It
 * opens the socket and completes the handshake, handles the frames about the
 * connection, says whether the client can send ({@link isConnected},
 * {@link checkOpen}) and, when the socket closes, why it ended; losing an
 * established connection is {@link sessionLost}'s to handle.
 */
export abstract class BrokerSession extends FrameExchange {
  readonly path: string;
  readonly name: string;
  readonly component: string;
  readonly connectTimeoutMs: number;
  readonly requestTimeoutMs: number;
  readonly maxPending: number;
  readonly maxBufferBytes: number;
  /** The reconnection policy; undefined when the client does not reconnect. */
  readonly reconnect: ReconnectPolicy | undefined;
  readonly lastWill: Publication<DescMessage> | undefined;
  /** Session id from `Welcome`, "" before the handshake. */
  sessionId = "";
  /** The component the broker accepted (from `Welcome`), "" if anonymous. */
  acceptedComponent = "";
  /** The limits in force, from `Welcome`. */
  limits: Limits | undefined;
  /** What the broker does, from `Welcome`. */
  features: BrokerFeatures = NO_FEATURES;

  protected socket: net.Socket | undefined;
  protected socketClosed: Promise<void> = Promise.resolve();
  /** The current socket completed its handshake. */
  protected established = false;
  /** Reconnecting: the error that lost the last connection (what publish and the others throw). */
  protected disconnected: ConnectionLost | undefined;
  protected welcome: Pending | undefined;
  protected closing = false;
  protected closedError: Error | undefined;

  constructor(path: string = DEFAULT_SOCKET_PATH, options: ClientOptions = {}) {
    super();
    this.path = path;
    this.name = options.name ?? "daemoneye-eventbus-ts";
    this.component = options.component ?? "";
    this.connectTimeoutMs = options.connectTimeoutMs ?? 5000;
    this.requestTimeoutMs = options.requestTimeoutMs ?? 5000;
    this.maxPending = options.maxPending ?? 10_000;
    this.maxBufferBytes = options.maxBufferBytes ?? 8 * 1024 * 1024;
    this.reconnect = reconnectPolicy(options.reconnect);
    this.lastWill = options.lastWill;
  }

  /**
   * The established connection was lost, not closed by the client: close
   * for good, or reconnect. `closedError` is `error` already.
   */
  protected abstract sessionLost(error: ConnectionLost): void;

  get isConnected(): boolean {
    return this.conn.state === "open" && !this.closing;
  }

  protected checkOpen(): void {
    if (this.conn.state !== "open" || this.closing) {
      // While reconnecting, the error that lost the last connection.
      const error = this.disconnected ?? this.closedError;
      if (error !== undefined && !this.closing && !(error instanceof ClosedResourceError)) {
        throw new ConnectionLost(error.message, {
          cause: error,
          goodbye: error instanceof ConnectionLost && error.goodbye,
        });
      }
      throw new ClosedResourceError("client is not connected");
    }
  }

  /** Open a connection and complete the handshake [protocol §3]; rejects if either fails. */
  protected async open(): Promise<void> {
    const conn = new ClientConnection();
    const hello = helloBytes(conn, this);
    const socket = net.createConnection({ path: this.path });
    this.socket = socket;
    this.attach(socket, conn);
    this.closedError = undefined;
    this.established = false;
    this.socketClosed = new Promise((resolve) => socket.once("close", () => resolve()));
    const current = () => this.socket === socket;
    socket.on("data", (chunk: Buffer) => current() && this.dataReceived(chunk));
    socket.on("end", () => current() && conn.receiveEof());
    socket.on("drain", () => current() && this.writer.drained());
    socket.on("error", (err: NodeJS.ErrnoException) => {
      if (current()) {
        this.closedError ??= new ConnectionLost(
          `connection to ${this.path} failed: ${err.message}`,
          { cause: err },
        );
      }
    });
    socket.on("close", () => this.socketGone(socket));

    const welcome = new Promise<Welcome>((resolve, reject) => {
      this.welcome = { resolve: (w) => resolve(w as Welcome), reject };
    });
    welcome.catch(() => undefined); // rejected when the socket fails first: raced by handshake()
    try {
      await handshake(socket, this.path, hello, welcome, this.connectTimeoutMs);
      if (!current() || conn.state !== "open") {
        throw this.lostError();
      }
    } catch (err) {
      this.welcome = undefined;
      socket.destroy();
      throw err;
    }
  }

  /** Our `Welcome` arrived: the connection is open (before anything after it in the read). */
  protected welcomed(answer: Welcome): void {
    this.established = true;
    this.disconnected = undefined;
    this.sessionId = answer.sessionId;
    this.acceptedComponent = answer.component;
    this.limits = answer.limits;
    this.features = Object.freeze({ batches: answer.batches, requests: answer.requests });
    this.conn.maxFrameBytes = answer.limits?.maxFrameBytes || DEFAULT_MAX_FRAME_BYTES;
    if (answer.batches) {
      this.writer.enableBatches(this.conn.maxFrameBytes, answer.limits?.maxQueueMessages ?? 0);
    }
    const welcome = this.welcome;
    this.welcome = undefined;
    welcome?.resolve(answer);
  }

  /** The handshake failed: {@link open} rejects with `error` (if it still waits). */
  protected rejectWelcome(error: Error): void {
    const welcome = this.welcome;
    this.welcome = undefined;
    welcome?.reject(error);
  }

  /** The error that ends the connection, as a {@link ConnectionLost}. */
  protected lostError(): ConnectionLost {
    const error = this.closedError;
    if (error instanceof ConnectionLost) {
      return error;
    }
    if (error instanceof EventBusError) {
      return new ConnectionLost(error.message, {
        cause: error,
        code: error.code,
        fatal: error.fatal,
      });
    }
    return new ConnectionLost(`connection to ${this.path} lost`, { cause: error });
  }

  protected socketGone(socket: net.Socket): void {
    if (socket !== this.socket) {
      return;
    }
    this.conn.close();
    this.writer.detach();
    if (!this.established) {
      // The handshake failed: open() rejects.
      this.rejectWelcome(
        this.closedError ?? new ConnectionLost(`${this.path} closed the connection`),
      );
      return;
    }
    this.established = false;
    if (this.closing) {
      return; // doClose() finishes
    }
    const error = this.lostError();
    this.closedError = error;
    this.sessionLost(error);
  }

  // -- receiving --------------------------------------------------------------------

  protected dataReceived(chunk: Uint8Array): void {
    const conn = this.conn;
    const wasOpen = conn.state === "open";
    for (const f of conn.receiveData(chunk)) {
      this.handle(f);
    }
    if (conn.error !== undefined && this.closedError === undefined) {
      // The broker broke the protocol: tell it (once open) and close [protocol §2, §7].
      this.closedError = new ConnectionLost(
        `protocol violation by the broker: ${conn.error.message}`,
        { cause: conn.error, code: conn.error.code },
      );
      if (wasOpen) {
        const code = conn.error.code ?? ErrorCode.INTERNAL;
        // Sent as is: the connection is already closing, so conn.send would refuse it.
        this.writer.send(
          encodeFrame(
            frame({ case: "error", value: { code, message: conn.error.message, fatal: true } }),
          ),
        );
      }
      this.rejectWelcome(conn.error);
    }
    if (this.writer.buffered) {
      this.writer.writeNow(); // pongs, or the fatal Error of a violation
    }
    if (conn.closeExpected) {
      this.socket?.end();
    }
  }

  /** The frames about the connection itself; the others are `FrameExchange`'s. */
  protected override handle(f: Frame): void {
    const kind = f.kind;
    if (kind.case === "welcome") {
      this.welcomed(kind.value);
    } else if (kind.case === "goodbye") {
      this.closedError ??= new ConnectionLost(`broker said goodbye: ${kind.value.reason}`, {
        goodbye: true,
      });
    } else if (kind.case === "error" && kind.value.fatal) {
      const exc = errorFromFrame(kind.value);
      this.closedError = new ConnectionLost(exc.message, {
        cause: exc,
        code: exc.code,
        fatal: true,
      });
      this.rejectWelcome(exc);
    } else {
      super.handle(f);
    }
  }
}
