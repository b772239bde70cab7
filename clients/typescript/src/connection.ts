/**
 * The connection half of a client ({@link BrokerConnection}): opening and
 * the handshake, the frames it receives, acknowledgements and round trips,
 * closing, and reconnecting with back-off. `Client` (client.ts) adds the
 * API: publish, subscribe, request and serve. The split mirrors the Python
 * client's `client/connection.py` and `client/core.py`.
 *
 * @module
 */

import * as net from "node:net";

import { create, toBinary, type DescMessage, type MessageShape } from "@bufbuild/protobuf";

import { CorrelationMetadataSchema } from "./gen/daemoneye/eventbus/v1/correlation_pb.js";
import {
  ErrorCode,
  PublishSchema,
  type Error as ErrorFrame,
  type Frame,
  type Limits,
  type StatsResponse,
  type SubscribeAck,
  type Welcome,
} from "./gen/daemoneye/eventbus/v1/frames_pb.js";
import type { Topic } from "./gen/daemoneye/eventbus/v1/registry.js";
import { validateMetadata } from "./correlation.js";
import {
  BrokenResourceError,
  ClosedResourceError,
  ConnectionClosed,
  ConnectionLost,
  EventBusError,
  LimitExceeded,
  PayloadTypeMismatch,
  RequestTimeout,
  errorFromFrame,
} from "./errors.js";
import {
  DEFAULT_SOCKET_PATH,
  type BrokerFeatures,
  type ClientOptions,
  type CorrelationMetadataInit,
  type Publication,
} from "./options.js";
import {
  ClientConnection,
  DEFAULT_MAX_FRAME_BYTES,
  HANDSHAKE_MAX_FRAME_BYTES,
  PROTOCOL_VERSION,
  decodeLengthPrefix,
  encodeFrame,
  frame,
} from "./protocol.js";
import { reconnectDelay, reconnectPolicy, type ReconnectPolicy } from "./reconnect.js";
import { PendingRequests, Responder, STOPPED } from "./rpc.js";
import { Subscription, type SubscriptionRequest } from "./subscription.js";
import { Writer } from "./writer.js";

interface Pending {
  resolve(value: unknown): void;
  reject(error: Error): void;
}

/** A subscription or a responder: what the broker is asked for again after a reconnection. */
type Registration = Subscription<DescMessage> | Responder;

const NO_FEATURES: BrokerFeatures = Object.freeze({ batches: false, requests: false });

/**
 * A connection to a broker, without the API: see `Client`, which extends it.
 * It opens the socket and completes the handshake, dispatches what the broker
 * sends (deliveries to subscriptions, requests to responders, replies and
 * acknowledgements to their waiters, errors, heartbeats), closes, and
 * reconnects with back-off when asked to.
 */
export class BrokerConnection {
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
  /** Called with the typed error when the broker refuses a publish. */
  onError: ((error: EventBusError) => void) | undefined;
  /** The last non-fatal error the broker sent. */
  lastError: EventBusError | undefined;
  /** With `reconnect`: called when the connection is lost, before reconnecting. */
  onDisconnect: ((error: ConnectionLost) => void) | undefined;
  /** With `reconnect`: called once reconnected and every subscription asked for again. */
  onReconnect: (() => void) | undefined;

  protected readonly writer = new Writer();
  protected socket: net.Socket | undefined;
  protected socketClosed: Promise<void> = Promise.resolve();
  /** Counts connections: a request is answered on the one it came on. */
  protected generation = 0;
  /** The current socket completed its handshake. */
  protected established = false;
  /** A connection was established once: losing one later reconnects (with `reconnect`). */
  protected connectedOnce = false;
  /** Reconnecting: the error that lost the last connection (what publish and the others throw). */
  protected disconnected: ConnectionLost | undefined;
  protected welcome: Pending | undefined;
  protected readonly pending = new Map<string, Pending>();
  protected readonly subs = new Map<number, Subscription<DescMessage>>();
  protected readonly responders = new Map<number, Responder>();
  protected readonly requests = new PendingRequests();
  protected nextId = 1;
  protected nextNonce = 1n;
  protected closing = false;
  protected closeTask: Promise<void> | undefined;
  protected closedError: Error | undefined;
  protected refused = 0;
  protected reconnects = 0;
  protected reconnecting: Promise<void> | undefined;
  protected reconnectWake: { timer: NodeJS.Timeout; wake(): void } | undefined;
  protected closedDone: ((error: ConnectionClosed | undefined) => void) | undefined;
  protected closedPromise: Promise<ConnectionClosed | undefined>;

  constructor(path: string = DEFAULT_SOCKET_PATH, options: ClientOptions = {}) {
    this.path = path;
    this.name = options.name ?? "daemoneye-eventbus-ts";
    this.component = options.component ?? "";
    this.connectTimeoutMs = options.connectTimeoutMs ?? 5000;
    this.requestTimeoutMs = options.requestTimeoutMs ?? 5000;
    this.maxPending = options.maxPending ?? 10_000;
    this.maxBufferBytes = options.maxBufferBytes ?? 8 * 1024 * 1024;
    this.reconnect = reconnectPolicy(options.reconnect);
    this.lastWill = options.lastWill;
    this.closedPromise = this.newClosed();
  }

  protected get conn(): ClientConnection {
    return this.writer.conn;
  }

  protected newClosed(): Promise<ConnectionClosed | undefined> {
    return new Promise((resolve) => {
      this.closedDone = resolve;
    });
  }

  // -- connection ---------------------------------------------------------------

  get isConnected(): boolean {
    return this.conn.state === "open" && !this.closing;
  }

  /**
   * Resolves once the client is closed for good: to undefined after
   * {@link close}, to the {@link ConnectionLost} (or other error) that ended
   * it otherwise (the broker went away and the client does not reconnect, or
   * gave up). Never rejects.
   */
  get closed(): Promise<ConnectionClosed | undefined> {
    return this.closedPromise;
  }

  /** Open the connection and complete the handshake [protocol §3]. */
  async connect(): Promise<void> {
    if ((this.socket !== undefined && !this.socket.destroyed) || this.reconnecting !== undefined) {
      throw new EventBusError("client is already connected");
    }
    if (this.closeTask !== undefined) {
      // Connecting again after close(): a new life, a new `closed`.
      this.closeTask = undefined;
      this.closedPromise = this.newClosed();
    }
    this.closing = false;
    try {
      await this.open();
    } catch (err) {
      this.socket?.destroy();
      throw err;
    }
    this.connectedOnce = true;
  }

  /** The bytes of our `Hello`, held to the handshake's frame limit [protocol §1, §3]. */
  protected helloBytes(conn: ClientConnection): Uint8Array {
    let lastWill;
    const will = this.lastWill;
    if (will !== undefined) {
      const payloadType = this.checkedPublish(will.topic, will.message);
      lastWill = create(PublishSchema, {
        topic: will.topic.name,
        payloadType,
        payload: toBinary(will.topic.schema, will.message),
        correlation: this.correlation(will.correlation),
      });
    }
    const hello = frame({
      case: "hello",
      value: {
        protocolVersion: PROTOCOL_VERSION,
        clientName: this.name,
        component: this.component,
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

  protected async open(): Promise<void> {
    const conn = new ClientConnection();
    const hello = this.helloBytes(conn);
    const socket = net.createConnection({ path: this.path });
    this.socket = socket;
    this.writer.attach(socket, conn);
    this.closedError = undefined;
    this.established = false;
    this.generation += 1;
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
    welcome.catch(() => undefined); // rejected when the socket fails first: raced below
    let timer: NodeJS.Timeout | undefined;
    const deadline = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () =>
          reject(
            new RequestTimeout(`no handshake with ${this.path} within ${this.connectTimeoutMs} ms`),
          ),
        this.connectTimeoutMs,
      );
    });
    const opened = new Promise<void>((resolve, reject) => {
      socket.once("connect", resolve);
      socket.once("error", (err: NodeJS.ErrnoException) => {
        const reason =
          err.code === "ENOENT" || err.code === "ECONNREFUSED"
            ? "no broker at"
            : "cannot connect to";
        reject(new BrokenResourceError(`${reason} ${this.path}: ${err.message}`, { cause: err }));
      });
    });
    opened.catch(() => undefined); // an error after the deadline won the race
    try {
      // The welcome's promise rejects too if the socket closes while connecting.
      await Promise.race([opened, deadline, welcome]);
      socket.write(hello);
      await Promise.race([welcome, deadline]);
      if (!current() || conn.state !== "open") {
        throw this.lostError();
      }
    } catch (err) {
      this.welcome = undefined;
      socket.destroy();
      throw err;
    } finally {
      clearTimeout(timer);
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

  /**
   * Wait until the broker has handled everything sent (a {@link flush}), say
   * goodbye, write what is pending and close (idempotent) [protocol §8]. Stops
   * reconnecting; subscriptions and responders end, their iterations quietly.
   */
  close(): Promise<void> {
    this.closeTask ??= this.doClose();
    return this.closeTask;
  }

  protected async doClose(): Promise<void> {
    if (!this.isConnected) {
      this.closing = true;
      this.stopReconnect();
      this.socket?.destroy();
      this.finish(new ClosedResourceError("client closed"));
      return;
    }
    // A round trip first, so the broker has handled every event published
    // before the goodbye even if it stops reading at the goodbye.
    try {
      await this.flush();
    } catch {
      // Closing anyway: the broker is gone or too slow.
    }
    this.closing = true;
    this.stopReconnect();
    const socket = this.socket;
    if (this.conn.state === "open") {
      this.writer.send(
        this.conn.send(frame({ case: "goodbye", value: { reason: "client closing" } })),
      );
      this.writer.writeNow();
      socket?.end();
    } else {
      socket?.destroy(); // lost during the flush, or reconnecting
    }
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      this.socketClosed,
      new Promise<void>((resolve) => {
        timer = setTimeout(resolve, this.requestTimeoutMs);
      }),
    ]);
    clearTimeout(timer);
    socket?.destroy();
    this.finish(new ClosedResourceError("client closed"));
  }

  /** `await using client = await connect(...)` closes at the end of the scope. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  /** Fail whatever waited on the lost connection: acknowledgements, replies, queued requests. */
  protected failPending(error: Error): void {
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const p of pending) {
      p.reject(error);
    }
    this.requests.failAll(error);
    for (const responder of this.responders.values()) {
      responder.restart();
    }
  }

  /** The client is closed for good: fail every waiter, end every subscription and responder. */
  protected finish(error: ConnectionClosed): void {
    this.closedError = error;
    this.disconnected = undefined;
    this.stopReconnect();
    const welcome = this.welcome;
    this.welcome = undefined;
    welcome?.reject(error);
    this.failPending(error);
    // Our own close ends iterations quietly; anything else ends them with the error.
    const reason = error instanceof ClosedResourceError ? undefined : error;
    const registrations: Registration[] = [...this.subs.values(), ...this.responders.values()];
    this.subs.clear();
    this.responders.clear();
    for (const registration of registrations) {
      registration.end(reason);
    }
    this.writer.drained();
    this.closedDone?.(reason);
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
      const welcome = this.welcome;
      this.welcome = undefined;
      welcome?.reject(this.closedError ?? new ConnectionLost(`${this.path} closed the connection`));
      return;
    }
    this.established = false;
    if (this.closing) {
      return; // doClose() finishes
    }
    const error = this.lostError();
    this.closedError = error;
    if (this.reconnect === undefined || !this.connectedOnce) {
      this.finish(error);
      return;
    }
    this.disconnected = error;
    this.failPending(error);
    this.reconnecting ??= this.reconnectLoop(this.reconnect)
      .catch((err: unknown) => {
        this.finish(err instanceof ConnectionClosed ? err : this.lostError());
      })
      .finally(() => {
        this.reconnecting = undefined;
      });
    this.notify(() => this.onDisconnect?.(error));
  }

  /**
   * Call an application callback once the client's own state is settled: an
   * exception it throws is the application's (uncaught, as from an event
   * listener) and cannot stop the client reconnecting.
   */
  protected notify(callback: () => void): void {
    queueMicrotask(callback);
  }

  /** Wait `ms`, or less if {@link stopReconnect} is called. */
  protected pause(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const wake = (): void => {
        clearTimeout(timer);
        this.reconnectWake = undefined;
        resolve();
      };
      const timer = setTimeout(wake, ms);
      this.reconnectWake = { timer, wake };
    });
  }

  protected stopReconnect(): void {
    this.reconnectWake?.wake();
  }

  protected async reconnectLoop(policy: ReconnectPolicy): Promise<void> {
    let attempt = 0;
    let lastError: unknown = this.closedError;
    while (!this.closing) {
      if (attempt >= policy.maxAttempts) {
        const why = lastError instanceof Error ? `: ${lastError.message}` : "";
        this.finish(
          new ConnectionLost(
            `gave up reconnecting to ${this.path} after ${attempt} attempts${why}`,
            {
              cause: lastError,
            },
          ),
        );
        return;
      }
      await this.pause(reconnectDelay(policy, attempt));
      if (this.closing) {
        return;
      }
      attempt += 1;
      try {
        await this.open();
      } catch (err) {
        lastError = err;
        continue;
      }
      if (this.closing) {
        return;
      }
      await this.resubscribeAll();
      if (this.isConnected) {
        this.reconnects += 1;
        this.notify(() => this.onReconnect?.());
        return;
      }
      attempt = 0; // lost again at once: start over
    }
  }

  /** Ask the broker again for every subscription and responder, in parallel. */
  protected async resubscribeAll(): Promise<void> {
    const registrations: [number, Registration][] = [...this.subs, ...this.responders];
    await Promise.all(
      registrations.map(async ([id, registration]) => {
        if (registration instanceof Subscription) {
          registration.queue.restartSequence();
        }
        try {
          await this.requestSubscribe(id, registration.request, registration instanceof Responder);
        } catch (err) {
          if (err instanceof ConnectionClosed) {
            return; // lost again: asked for once more on the next connection
          }
          if (err instanceof RequestTimeout) {
            this.socket?.destroy(); // the broker does not answer: start over
            return;
          }
          // Refused on this connection (say, the policy changed): the subscription ends.
          this.subs.delete(id);
          this.responders.delete(id);
          registration.end(err instanceof EventBusError ? err : undefined);
        }
      }),
    );
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
      this.welcome?.reject(conn.error);
      this.welcome = undefined;
    }
    if (this.writer.buffered) {
      this.writer.writeNow(); // pongs, or the fatal Error of a violation
    }
    if (conn.closeExpected) {
      this.socket?.end();
    }
  }

  protected handle(f: Frame): void {
    const kind = f.kind;
    switch (kind.case) {
      case "deliver":
        this.subs.get(kind.value.subscriptionId)?.deliver(kind.value);
        break;
      case "deliverBatch":
        this.subs.get(kind.value.subscriptionId)?.deliverBatch(kind.value);
        break;
      case "requestDeliver": {
        const responder = this.responders.get(kind.value.subscriptionId);
        if (responder !== undefined) {
          responder.deliver(kind.value, this.generation);
        } else if (!this.conn.closeExpected) {
          // Stopped (sent before our unsubscribe arrived): its requester learns it at once.
          this.writer.send(
            this.conn.send(
              frame({ case: "reply", value: { token: kind.value.token, error: STOPPED } }),
            ),
          );
        }
        break;
      }
      case "replyDeliver":
        this.requests.replied(kind.value);
        break;
      case "ping":
        if (!this.conn.closeExpected) {
          this.writer.send(
            this.conn.send(frame({ case: "pong", value: { nonce: kind.value.nonce } })),
          );
        }
        break;
      case "pong":
        this.resolve(`pong:${kind.value.nonce}`, undefined);
        break;
      case "subscribeAck": {
        // Before any event that follows the ack in the same read is queued.
        const id = kind.value.subscriptionId;
        (this.subs.get(id) ?? this.responders.get(id))?.acknowledged(kind.value);
        this.resolve(`sub:${id}`, kind.value);
        break;
      }
      case "unsubscribeAck":
        this.resolve(`unsub:${kind.value.subscriptionId}`, undefined);
        break;
      case "statsResponse":
        this.resolve(`stats:${kind.value.requestId}`, kind.value);
        break;
      case "welcome":
        this.welcomed(kind.value);
        break;
      case "error":
        this.errorReceived(kind.value);
        break;
      case "goodbye":
        this.closedError ??= new ConnectionLost(`broker said goodbye: ${kind.value.reason}`, {
          goodbye: true,
        });
        break;
      default:
        break;
    }
  }

  protected resolve(key: string, value: unknown): void {
    const p = this.pending.get(key);
    if (p !== undefined) {
      this.pending.delete(key);
      p.resolve(value);
    }
  }

  protected errorReceived(error: ErrorFrame): void {
    const exc = errorFromFrame(error);
    if (error.fatal) {
      this.closedError = new ConnectionLost(exc.message, {
        cause: exc,
        code: exc.code,
        fatal: true,
      });
      const welcome = this.welcome;
      this.welcome = undefined;
      welcome?.reject(exc);
      return;
    }
    if (error.requestId !== 0n) {
      this.requests.fail(error.requestId, exc); // ignored if the request was given up on
      return;
    }
    const sid = error.subscriptionId;
    if (sid !== 0) {
      for (const key of [`sub:${sid}`, `unsub:${sid}`]) {
        const p = this.pending.get(key);
        if (p !== undefined) {
          this.pending.delete(key);
          p.reject(exc);
          return;
        }
      }
    }
    this.refused += 1;
    this.lastError = exc;
    if (this.onError !== undefined) {
      this.onError(exc);
    } else {
      process.emitWarning(`broker refused a request: ${exc.message}`, {
        code: "DAEMONEYE_EVENTBUS_REFUSED",
      });
    }
  }

  // -- sending -----------------------------------------------------------------------

  protected send(f: Frame): void {
    this.checkOpen();
    this.writer.send(this.conn.send(f));
  }

  /**
   * Grant `events` more events of a credit-based subscription (a `Credit`
   * frame, written at once so that the broker resumes as early as possible).
   * Nothing once the connection is closing or gone: the broker forgets its
   * subscriptions with the connection.
   *
   * @internal
   */
  grantCredit(subscriptionId: number, events: number): void {
    if (!this.isConnected) {
      return;
    }
    this.writer.send(this.conn.send(frame({ case: "credit", value: { subscriptionId, events } })));
    this.writer.writeNow();
  }

  protected correlation(init: CorrelationMetadataInit | undefined) {
    if (init === undefined) {
      return undefined;
    }
    const correlation = create(CorrelationMetadataSchema, init);
    validateMetadata(correlation);
    return correlation;
  }

  /** The payload type of `topic` once `message` is checked to be of it. */
  protected checkedPublish<Desc extends DescMessage>(
    topic: Topic<Desc>,
    message: MessageShape<Desc>,
  ): string {
    const actual = (message as { $typeName?: unknown }).$typeName;
    if (actual !== topic.payloadName) {
      throw new PayloadTypeMismatch(
        `topic ${JSON.stringify(topic.name)} carries ${topic.payloadName}, not ${String(actual)}`,
        { topic: topic.name },
      );
    }
    return topic.payloadName;
  }

  /** Send `f` and wait for the broker's answer to `key` (within `requestTimeoutMs`). */
  protected ask<T>(key: string, f: Frame): Promise<T> {
    this.checkOpen();
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(key);
        reject(new RequestTimeout(`no answer from the broker within ${this.requestTimeoutMs} ms`));
      }, this.requestTimeoutMs);
      this.pending.set(key, {
        resolve: (value) => {
          clearTimeout(timer);
          resolve(value as T);
        },
        reject: (error) => {
          clearTimeout(timer);
          reject(error);
        },
      });
      try {
        this.send(f);
        this.writer.writeNow();
      } catch (err) {
        this.pending.delete(key);
        clearTimeout(timer);
        reject(err as Error);
      }
    });
  }

  protected requestSubscribe(
    id: number,
    request: SubscriptionRequest,
    respond: boolean,
  ): Promise<SubscribeAck> {
    return this.ask<SubscribeAck>(
      `sub:${id}`,
      frame({
        case: "subscribe",
        value: {
          subscriptionId: id,
          filter: request.filter,
          correlationFilter: request.correlationFilter,
          includeControl: request.includeControl,
          lossless: request.lossless,
          window: request.window,
          respond,
        },
      }),
    );
  }

  /**
   * Round trip to the broker (a `Ping`): when it resolves, everything sent
   * before was handled [protocol §5]. Resolves to the round-trip time in ms.
   */
  async flush(): Promise<number> {
    const nonce = this.nextNonce++;
    const start = performance.now();
    await this.ask(`pong:${nonce}`, frame({ case: "ping", value: { nonce } }));
    return performance.now() - start;
  }

  /** Same as {@link flush}. */
  ping(): Promise<number> {
    return this.flush();
  }

  /** The broker's statistics [protocol §9]. */
  async brokerStatistics(): Promise<StatsResponse> {
    const id = this.nextNonce++;
    return this.ask<StatsResponse>(
      `stats:${id}`,
      frame({ case: "statsRequest", value: { requestId: id } }),
    );
  }
}
