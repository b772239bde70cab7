/**
 * The Node.js client: connect, publish, subscribe, request statistics.
 *
 * ```ts
 * const client = await connect("/tmp/daemoneye.sock", { component: "daemoneye-agent" });
 * const sub = await client.subscribe("events.process.#");
 * for await (const event of sub) {
 *   console.log(event.topic, event.message());
 * }
 * ```
 *
 * Publishing is typed by the registry: `client.publish(EVENTS_PROCESS_LIFECYCLE,
 * create(ProcessEventSchema, {...}))` type-checks, a `NetworkEvent` there does
 * not. Writes are coalesced: events published in one turn of the event loop
 * share one socket write. The client answers the broker's heartbeats itself.
 * The API mirrors the Python client (`daemoneye_eventbus.client`); times are
 * in milliseconds.
 *
 * Delivery is at most once unless a subscription is credit based: one that
 * asks for it (`client.subscribe(filter, { lossless: true })`) or whose filter
 * reaches a topic the schema declares lossless. The client grants credit back
 * to the broker as the application takes events, and the broker holds back
 * the publishers instead of dropping events for a subscriber that falls behind.
 *
 * @module
 */

import * as net from "node:net";

import {
  create,
  fromBinary,
  toBinary,
  type DescMessage,
  type MessageInitShape,
  type MessageShape,
} from "@bufbuild/protobuf";

import {
  CorrelationFilterSchema,
  CorrelationMetadataSchema,
  type CorrelationFilter,
  type CorrelationMetadata,
} from "./gen/daemoneye/eventbus/v1/correlation_pb.js";
import {
  ErrorCode,
  PublishSchema,
  type Deliver,
  type DeliverBatch,
  type Error as ErrorFrame,
  type Frame,
  type Limits,
  type StatsResponse,
  type SubscribeAck,
  type Welcome,
} from "./gen/daemoneye/eventbus/v1/frames_pb.js";
import { PAYLOAD_REGISTRY, type Topic } from "./gen/daemoneye/eventbus/v1/registry.js";
import { validateCorrelationFilter, validateMetadata } from "./correlation.js";
import {
  BrokenResourceError,
  ClosedResourceError,
  ConnectionClosed,
  EventBusError,
  InvalidPayload,
  LimitExceeded,
  PayloadTypeMismatch,
  RequestTimeout,
  errorFromFrame,
} from "./errors.js";
import {
  ClientConnection,
  CreditCounter,
  DEFAULT_MAX_FRAME_BYTES,
  DELIVER_OVERHEAD,
  MAX_UINT32,
  PROTOCOL_VERSION,
  encodeFrame,
  frame,
  publishFrameBody,
} from "./protocol.js";
import { validateFilter, validateTopic } from "./topics.js";

/** The broker's default socket [protocol: Transport]. */
export const DEFAULT_SOCKET_PATH = "/tmp/daemoneye.sock";

// Pending output is written at once past this size, otherwise on the next
// turn of the event loop, so that bursts of publishes share one write.
const FLUSH_BYTES = 64 * 1024;

/** `CorrelationMetadata`, or an initializer for one. */
export type CorrelationMetadataInit = MessageInitShape<typeof CorrelationMetadataSchema>;
/** `CorrelationFilter`, or an initializer for one. */
export type CorrelationFilterInit = MessageInitShape<typeof CorrelationFilterSchema>;

/** Options of {@link Client}. */
export interface ClientOptions {
  /** Free-form name, for the broker's logs and statistics. */
  name?: string;
  /** The component to claim in `Hello` (e.g. `procmond`); "" for anonymous. */
  component?: string;
  /** Handshake deadline, in ms (default 5000). */
  connectTimeoutMs?: number;
  /** Deadline for acks, pongs and statistics, in ms (default 5000). */
  requestTimeoutMs?: number;
  /**
   * Events kept per subscription before new ones are dropped (default 10000);
   * also the default credit window of a subscription (see
   * {@link SubscribeOptions.window}).
   */
  maxPending?: number;
  /** `publishNowait` refuses once this many bytes wait to be written (default 8 MiB). */
  maxBufferBytes?: number;
}

/** Options of {@link Client.publish}. */
export interface PublishOptions {
  /** Correlation metadata of the event (a message or its initializer). */
  correlation?: CorrelationMetadataInit | undefined;
}

/** Options of {@link Client.subscribe}. */
export interface SubscribeOptions {
  /** Applied by the broker: events it rejects never cross the socket [protocol §4]. */
  correlationFilter?: CorrelationFilterInit | undefined;
  /** Deliver control topics matched only through a wildcard (e.g. `#`). */
  includeControl?: boolean | undefined;
  /**
   * Events kept before new ones are dropped (default: the client's
   * `maxPending`). A credit-based subscription never drops: the broker sends
   * no more than its window beyond what was granted back.
   */
  maxPending?: number | undefined;
  /**
   * Ask for lossless delivery: when this subscriber falls behind, the broker
   * holds back the publishers of its events instead of dropping them (credit
   * based: {@link Subscription.window}). Without it, only the events of topics
   * the schema declares lossless (`Topic.lossless`) are held rather than
   * dropped. A broker may refuse it (e.g. `AccessDenied` or `LimitExceeded`).
   */
  lossless?: boolean | undefined;
  /**
   * Credit-based delivery only: how many events the broker may send beyond
   * what the application has taken (an integer, at most 2^32 - 1; 0 lets the
   * broker choose). Default: the subscription's `maxPending`. The broker may
   * grant fewer: {@link Subscription.window} is what it granted.
   */
  window?: number | undefined;
}

/** A snapshot of a client's figures. */
export interface ClientStatistics {
  readonly published: number;
  readonly received: number;
  /** Events dropped by this client because a subscription's queue was full. */
  readonly dropped: number;
  /** Events the broker dropped, as seen from sequence gaps. */
  readonly missed: number;
  /** Requests the broker refused (non-fatal `Error` frames). */
  readonly refused: number;
  readonly subscriptions: number;
}

/** An event received on a subscription. */
export class ReceivedEvent<Desc extends DescMessage = DescMessage> {
  constructor(
    /** The concrete topic it was published on. */
    readonly topic: string,
    /** Fully qualified name of the payload type, as published. */
    readonly payloadType: string,
    /** The serialized payload, as the publisher sent it. */
    readonly payload: Uint8Array,
    /**
     * Correlation metadata, or undefined if the event had none. The events of
     * one delivered batch share it: treat it as read-only.
     */
    readonly correlation: CorrelationMetadata | undefined,
    /** Per-subscription sequence number from 1; a gap means events were dropped. */
    readonly sequence: bigint,
    readonly subscriptionId: number,
    /** The payload schema of a typed subscription. */
    readonly schema: Desc | undefined = undefined,
  ) {}

  /**
   * Decode the payload into its message type.
   *
   * Throws {@link InvalidPayload} (with `topic`, `payloadType` and `sequence`)
   * if the payload does not parse as that type, {@link PayloadTypeMismatch} if
   * the type is unknown here or not the one of a typed subscription.
   */
  message(): MessageShape<Desc> {
    const schema: DescMessage | undefined =
      this.schema ?? PAYLOAD_REGISTRY.getMessage(this.payloadType);
    if (schema === undefined) {
      throw new PayloadTypeMismatch(`unknown payload type ${JSON.stringify(this.payloadType)}`);
    }
    if (schema.typeName !== this.payloadType) {
      throw new PayloadTypeMismatch(
        `event on ${this.topic} carries ${this.payloadType}, not ${schema.typeName}`,
      );
    }
    try {
      return fromBinary(schema, this.payload) as MessageShape<Desc>;
    } catch (err) {
      const reason = err instanceof Error ? err.message : String(err);
      throw new InvalidPayload(
        `event #${this.sequence} on ${JSON.stringify(this.topic)} does not parse as ` +
          `${this.payloadType}: ${reason}`,
        {
          topic: this.topic,
          payloadType: this.payloadType,
          sequence: this.sequence,
          subscriptionId: this.subscriptionId,
          cause: err,
        },
      );
    }
  }
}

/**
 * Received events, bounded: when the application does not keep up, new
 * events are dropped and counted in {@link dropped}; sequence gaps (events
 * the broker dropped) are counted in {@link missed}. A credit-based
 * subscription's queue (see {@link dropWhenFull}) never drops: the broker
 * bounds what it sends.
 */
export class EventQueue<Desc extends DescMessage = DescMessage> {
  private readonly items: ReceivedEvent<Desc>[] = [];
  private head = 0;
  private waiter: (() => void) | undefined;
  private closedWith: { error: Error | undefined } | undefined;
  private lastSequence = 0n;
  /** Events dropped because the queue was full. */
  dropped = 0;
  /** Events missing from the sequence numbers. */
  missed = 0;
  /** Events accepted into the queue. */
  received = 0;
  /**
   * Drop new events once {@link maxMessages} are queued (at-most-once
   * delivery). False for a credit-based subscription, whose broker sends at
   * most its window (plus the rest of one batch) beyond what was granted
   * back: every event it sends is kept.
   */
  dropWhenFull = true;
  /**
   * Called each time the queue hands an event to the application
   * ({@link getNowait}, {@link get}, iteration): a credit-based subscription
   * counts the events taken there, to grant credit.
   */
  onTake: (() => void) | undefined;

  constructor(readonly maxMessages: number) {}

  get length(): number {
    return this.items.length - this.head;
  }

  get closed(): boolean {
    return this.closedWith !== undefined;
  }

  /** Queue `event`; return false (and count it) if it had to be dropped. */
  put(event: ReceivedEvent<Desc>): boolean {
    if (event.sequence > this.lastSequence + 1n) {
      this.missed += Number(event.sequence - this.lastSequence - 1n);
    }
    this.lastSequence = event.sequence;
    if (this.closedWith !== undefined || (this.dropWhenFull && this.length >= this.maxMessages)) {
      this.dropped += 1;
      return false;
    }
    this.items.push(event);
    this.received += 1;
    this.wake();
    return true;
  }

  /** The next queued event, or undefined. */
  getNowait(): ReceivedEvent<Desc> | undefined {
    if (this.head >= this.items.length) {
      return undefined;
    }
    const event = this.items[this.head];
    this.items[this.head] = undefined as unknown as ReceivedEvent<Desc>;
    this.head += 1;
    if (this.head > 1024 && this.head * 2 > this.items.length) {
      this.items.splice(0, this.head);
      this.head = 0;
    }
    this.onTake?.();
    return event;
  }

  /**
   * Wait for the next event. Throws {@link ClosedResourceError} (or the error
   * the queue was closed with) once it is closed and empty, and
   * {@link RequestTimeout} after `timeoutMs`.
   */
  async get(timeoutMs?: number): Promise<ReceivedEvent<Desc>> {
    for (;;) {
      const event = this.getNowait();
      if (event !== undefined) {
        return event;
      }
      if (this.closedWith !== undefined) {
        throw this.closedWith.error ?? new ClosedResourceError("subscription ended");
      }
      await new Promise<void>((resolve, reject) => {
        let timer: NodeJS.Timeout | undefined;
        this.waiter = () => {
          if (timer !== undefined) {
            clearTimeout(timer);
          }
          this.waiter = undefined;
          resolve();
        };
        if (timeoutMs !== undefined) {
          timer = setTimeout(() => {
            this.waiter = undefined;
            reject(new RequestTimeout(`no event within ${timeoutMs} ms`));
          }, timeoutMs);
        }
      });
    }
  }

  /** No more events will come; waiting readers wake up. */
  close(error?: Error): void {
    if (this.closedWith === undefined) {
      this.closedWith = { error };
    }
    this.wake();
  }

  private wake(): void {
    this.waiter?.();
  }

  /** Iterate until the queue is closed; rethrows the error it was closed with. */
  async *[Symbol.asyncIterator](): AsyncGenerator<ReceivedEvent<Desc>, void, undefined> {
    for (;;) {
      let event: ReceivedEvent<Desc>;
      try {
        event = await this.get();
      } catch (err) {
        if (err instanceof ClosedResourceError) {
          return;
        }
        throw err;
      }
      yield event;
    }
  }
}

/**
 * Events matching one filter: an async iterable of undecoded
 * {@link ReceivedEvent}s, or of `[event, message]` pairs through
 * {@link messages}. Iteration ends after {@link unsubscribe} or
 * {@link Client.close}; it throws a {@link BrokenResourceError} if the broker
 * went away.
 *
 * A credit-based subscription ({@link window} > 0) grants credit back to the
 * broker as the application takes events (iteration, {@link get},
 * {@link getNowait}, {@link messages}): one `Credit` frame per quarter of the
 * window. Events received but not taken hold the broker back, never drop.
 */
export class Subscription<Desc extends DescMessage = DescMessage> implements AsyncIterable<
  ReceivedEvent<Desc>
> {
  private activeFlag = true;
  /**
   * Called by {@link messages} with the error of each event it skips because
   * its payload does not decode; if unset, one line goes to `console.warn`.
   */
  onInvalid: ((error: InvalidPayload) => void) | undefined;
  /** Events {@link messages} skipped because their payload did not decode. */
  invalid = 0;
  private credit: CreditCounter | undefined;
  private losslessFlag = false;

  constructor(
    readonly client: Client,
    readonly subscriptionId: number,
    readonly filter: string,
    readonly correlationFilter: CorrelationFilter | undefined,
    readonly includeControl: boolean,
    readonly schema: Desc | undefined,
    readonly queue: EventQueue<Desc>,
  ) {}

  get active(): boolean {
    return this.activeFlag;
  }

  /**
   * The credit window the broker granted (`SubscribeAck.window`): 0 for
   * at-most-once delivery; otherwise delivery is credit based, with at most
   * this many events (plus the rest of one batch) sent beyond what the
   * application has taken.
   */
  get window(): number {
    return this.credit?.window ?? 0;
  }

  /**
   * Every event is delivered losslessly (the subscription asked, and the
   * broker agreed). False with a {@link window}: only events of topics the
   * schema declares lossless are held rather than dropped.
   */
  get lossless(): boolean {
    return this.losslessFlag;
  }

  /** Events granted back to the broker in `Credit` frames, in total. */
  get credited(): number {
    return this.credit?.granted ?? 0;
  }

  /** Events dropped here because the application did not keep up (never when credit based). */
  get dropped(): number {
    return this.queue.dropped;
  }

  /** Events the broker dropped, from sequence gaps. */
  get missed(): number {
    return this.queue.missed;
  }

  get received(): number {
    return this.queue.received;
  }

  /**
   * The broker's `SubscribeAck`: credit based if it has a window, with the
   * count of events taken starting from 0.
   *
   * @internal
   */
  acknowledged(ack: SubscribeAck): void {
    this.losslessFlag = ack.lossless;
    if (ack.window > 0) {
      const credit = new CreditCounter(ack.window);
      this.credit = credit;
      this.queue.dropWhenFull = false;
      this.queue.onTake = () => {
        const events = credit.take();
        if (events > 0 && this.activeFlag && this.credit === credit) {
          this.client.grantCredit(this.subscriptionId, events);
        }
      };
    } else {
      this.credit = undefined;
      this.queue.dropWhenFull = true;
      this.queue.onTake = undefined;
    }
  }

  /** @internal */
  deliver(deliver: Deliver): void {
    const pub = deliver.publish;
    this.put(
      pub?.topic ?? "",
      pub?.payloadType ?? "",
      pub?.payload ?? new Uint8Array(),
      pub?.correlation,
      deliver.sequence,
    );
  }

  /**
   * Consecutive events, queued one by one as if each came in its own
   * `Deliver`: event `i` has sequence `firstSequence + i`.
   *
   * @internal
   */
  deliverBatch(deliver: DeliverBatch): void {
    const batch = deliver.batch;
    if (batch === undefined) {
      return;
    }
    let sequence = deliver.firstSequence;
    for (const payload of batch.payloads) {
      this.put(batch.topic, batch.payloadType, payload, batch.correlation, sequence);
      sequence += 1n;
    }
  }

  private put(
    topic: string,
    payloadType: string,
    payload: Uint8Array,
    correlation: CorrelationMetadata | undefined,
    sequence: bigint,
  ): void {
    this.queue.put(
      new ReceivedEvent(
        topic,
        payloadType,
        payload,
        correlation,
        sequence,
        this.subscriptionId,
        this.schema,
      ),
    );
  }

  /** @internal */
  end(error?: Error): void {
    this.activeFlag = false;
    this.queue.close(error);
  }

  /** The next queued event, or undefined. */
  getNowait(): ReceivedEvent<Desc> | undefined {
    return this.queue.getNowait();
  }

  /** The next event; throws {@link ConnectionClosed} once none can come. */
  get(timeoutMs?: number): Promise<ReceivedEvent<Desc>> {
    return this.queue.get(timeoutMs);
  }

  [Symbol.asyncIterator](): AsyncIterator<ReceivedEvent<Desc>> {
    return this.queue[Symbol.asyncIterator]();
  }

  /**
   * Each event with its decoded message. Events whose payload does not decode
   * (possible only behind a broker with validation off) are skipped: counted
   * in {@link invalid} and passed to {@link onInvalid} (or logged), so that bad
   * data never ends the loop. Other errors (an unknown payload type, the
   * connection lost) end it as for plain iteration.
   */
  async *messages(): AsyncGenerator<[ReceivedEvent<Desc>, MessageShape<Desc>], void, undefined> {
    for await (const event of this.queue) {
      let message: MessageShape<Desc>;
      try {
        message = event.message();
      } catch (err) {
        if (!(err instanceof InvalidPayload)) {
          throw err;
        }
        this.invalid += 1;
        if (this.onInvalid !== undefined) {
          this.onInvalid(err);
        } else {
          console.warn(`subscription ${this.filter} skipped an event: ${err.message}`);
        }
        continue;
      }
      yield [event, message];
    }
  }

  /** End the subscription (idempotent); events already queued can still be read. */
  async unsubscribe(): Promise<void> {
    if (this.activeFlag) {
      await this.client.unsubscribe(this);
    }
  }

  /** `await using sub = await client.subscribe(...)` unsubscribes at the end of the scope. */
  async [Symbol.asyncDispose](): Promise<void> {
    try {
      await this.unsubscribe();
    } catch (err) {
      if (!(err instanceof ConnectionClosed)) {
        throw err;
      }
    }
  }
}

interface Pending {
  resolve(value: unknown): void;
  reject(error: Error): void;
}

/**
 * A connection to a broker. Use {@link connect}, or `new Client(path)` then
 * {@link Client.connect}; {@link Client.close} says goodbye.
 */
export class Client {
  readonly path: string;
  readonly name: string;
  readonly component: string;
  readonly connectTimeoutMs: number;
  readonly requestTimeoutMs: number;
  readonly maxPending: number;
  readonly maxBufferBytes: number;
  /** Session id from `Welcome`, "" before the handshake. */
  sessionId = "";
  /** The component the broker accepted (from `Welcome`), "" if anonymous. */
  acceptedComponent = "";
  /** The limits in force, from `Welcome`. */
  limits: Limits | undefined;
  /** Called with the typed error when the broker refuses a publish. */
  onError: ((error: EventBusError) => void) | undefined;
  /** The last non-fatal error the broker sent. */
  lastError: EventBusError | undefined;

  private socket: net.Socket | undefined;
  private conn = new ClientConnection();
  private welcome: Pending | undefined;
  private readonly pending = new Map<string, Pending>();
  private readonly subs = new Map<number, Subscription<DescMessage>>();
  private nextId = 1;
  private nextNonce = 1n;
  private out: Uint8Array[] = [];
  private outBytes = 0;
  private flushScheduled: NodeJS.Immediate | undefined;
  private backedUp = false;
  private drainWaiters: (() => void)[] = [];
  private closing = false;
  private closeTask: Promise<void> | undefined;
  private closedError: Error | undefined;
  private closedPromise: Promise<void> | undefined;
  private published = 0;
  private refused = 0;

  constructor(path: string = DEFAULT_SOCKET_PATH, options: ClientOptions = {}) {
    this.path = path;
    this.name = options.name ?? "daemoneye-eventbus-ts";
    this.component = options.component ?? "";
    this.connectTimeoutMs = options.connectTimeoutMs ?? 5000;
    this.requestTimeoutMs = options.requestTimeoutMs ?? 5000;
    this.maxPending = options.maxPending ?? 10_000;
    this.maxBufferBytes = options.maxBufferBytes ?? 8 * 1024 * 1024;
  }

  // -- connection ---------------------------------------------------------------

  get isConnected(): boolean {
    return this.conn.state === "open" && !this.closing;
  }

  /** Open the connection and complete the handshake [protocol §3]. */
  async connect(): Promise<void> {
    if (this.socket !== undefined && !this.socket.destroyed) {
      throw new EventBusError("client is already connected");
    }
    this.conn = new ClientConnection();
    this.closing = false;
    this.closedError = undefined;
    const socket = net.createConnection({ path: this.path });
    this.socket = socket;
    this.closedPromise = new Promise((resolve) => socket.once("close", () => resolve()));
    socket.on("data", (chunk: Buffer) => this.dataReceived(chunk));
    socket.on("end", () => this.conn.receiveEof());
    socket.on("drain", () => this.drained());
    socket.on("error", (err: NodeJS.ErrnoException) => {
      this.closedError ??= new BrokenResourceError(
        `connection to ${this.path} failed: ${err.message}`,
        {
          cause: err,
        },
      );
    });
    socket.on("close", () => this.connectionLost());

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
    try {
      await Promise.race([opened, deadline]);
      const hello = frame({
        case: "hello",
        value: {
          protocolVersion: PROTOCOL_VERSION,
          clientName: this.name,
          component: this.component,
          acceptBatches: true, // decoded by Subscription.deliverBatch
          credit: true, // granted by Subscription.acknowledged's counter
        },
      });
      socket.write(this.conn.send(hello));
      const answer = await Promise.race([welcome, deadline]);
      this.sessionId = answer.sessionId;
      this.acceptedComponent = answer.component;
      this.limits = answer.limits;
      this.conn.maxFrameBytes = answer.limits?.maxFrameBytes || DEFAULT_MAX_FRAME_BYTES;
    } catch (err) {
      this.welcome = undefined;
      socket.destroy();
      throw err;
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * Wait until the broker has handled everything sent (a {@link flush}), say
   * goodbye, write what is pending and close (idempotent) [protocol §8].
   */
  close(): Promise<void> {
    this.closeTask ??= this.doClose().finally(() => {
      this.closeTask = undefined;
    });
    return this.closeTask;
  }

  private async doClose(): Promise<void> {
    const socket = this.socket;
    if (socket === undefined || socket.destroyed) {
      this.closing = true;
      this.finish(new ClosedResourceError("client closed"));
      return;
    }
    if (this.isConnected) {
      // A round trip first, so the broker has handled every event published
      // before the goodbye even if it stops reading at the goodbye.
      try {
        await this.flush();
      } catch {
        // Closing anyway: the broker is gone or too slow.
      }
    }
    this.closing = true;
    if (this.conn.state === "open") {
      this.queue(this.conn.send(frame({ case: "goodbye", value: { reason: "client closing" } })));
    }
    this.writeNow();
    socket.end();
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      this.closedPromise,
      new Promise<void>((resolve) => {
        timer = setTimeout(resolve, this.requestTimeoutMs);
      }),
    ]);
    clearTimeout(timer);
    socket.destroy();
    this.finish(new ClosedResourceError("client closed"));
  }

  /** `await using client = await connect(...)` closes at the end of the scope. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  /** Fail every waiter and end every subscription. */
  private finish(error: Error): void {
    this.closedError = error;
    const welcome = this.welcome;
    this.welcome = undefined;
    welcome?.reject(error);
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const p of pending) {
      p.reject(error);
    }
    const subs = [...this.subs.values()];
    this.subs.clear();
    // Our own close ends iterations quietly; anything else ends them with the error.
    const reason = error instanceof ClosedResourceError ? undefined : error;
    for (const sub of subs) {
      sub.end(reason);
    }
    for (const wake of this.drainWaiters.splice(0)) {
      wake();
    }
  }

  private connectionLost(): void {
    this.conn.close();
    this.out = [];
    this.outBytes = 0;
    if (this.flushScheduled !== undefined) {
      clearImmediate(this.flushScheduled);
      this.flushScheduled = undefined;
    }
    if (this.closing) {
      this.finish(new ClosedResourceError("client closed"));
      return;
    }
    const error =
      this.closedError instanceof EventBusError
        ? this.closedError
        : new BrokenResourceError(`connection to ${this.path} lost`);
    this.closedError = error;
    this.finish(error);
  }

  private checkOpen(): void {
    if (this.conn.state !== "open" || this.closing) {
      if (this.closedError !== undefined && !this.closing) {
        throw new BrokenResourceError(this.closedError.message, { cause: this.closedError });
      }
      throw new ClosedResourceError("client is not connected");
    }
  }

  // -- receiving --------------------------------------------------------------------

  private dataReceived(chunk: Uint8Array): void {
    const conn = this.conn;
    const wasOpen = conn.state === "open";
    for (const f of conn.receiveData(chunk)) {
      this.handle(f);
    }
    if (conn.error !== undefined && this.closedError === undefined) {
      // The broker broke the protocol: tell it (once open) and close [protocol §2, §7].
      this.closedError = new BrokenResourceError(
        `protocol violation by the broker: ${conn.error.message}`,
        {
          cause: conn.error,
        },
      );
      if (wasOpen) {
        const code = conn.error.code ?? ErrorCode.INTERNAL;
        // Sent as is: the connection is already closing, so conn.send would refuse it.
        this.queue(
          encodeFrame(
            frame({ case: "error", value: { code, message: conn.error.message, fatal: true } }),
          ),
        );
      }
      this.welcome?.reject(conn.error);
      this.welcome = undefined;
    }
    this.writeNow();
    if (conn.closeExpected) {
      this.socket?.end();
    }
  }

  private handle(f: Frame): void {
    const kind = f.kind;
    switch (kind.case) {
      case "deliver":
        this.subs.get(kind.value.subscriptionId)?.deliver(kind.value);
        break;
      case "deliverBatch":
        this.subs.get(kind.value.subscriptionId)?.deliverBatch(kind.value);
        break;
      case "ping":
        if (!this.conn.closeExpected) {
          this.queue(this.conn.send(frame({ case: "pong", value: { nonce: kind.value.nonce } })));
        }
        break;
      case "pong":
        this.resolve(`pong:${kind.value.nonce}`, undefined);
        break;
      case "subscribeAck":
        // Before any event that follows the ack in the same read is queued.
        this.subs.get(kind.value.subscriptionId)?.acknowledged(kind.value);
        this.resolve(`sub:${kind.value.subscriptionId}`, undefined);
        break;
      case "unsubscribeAck":
        this.resolve(`unsub:${kind.value.subscriptionId}`, undefined);
        break;
      case "statsResponse":
        this.resolve(`stats:${kind.value.requestId}`, kind.value);
        break;
      case "welcome": {
        const welcome = this.welcome;
        this.welcome = undefined;
        welcome?.resolve(kind.value);
        break;
      }
      case "error":
        this.errorReceived(kind.value);
        break;
      case "goodbye":
        this.closedError ??= new BrokenResourceError(`broker said goodbye: ${kind.value.reason}`);
        break;
      default:
        break;
    }
  }

  private resolve(key: string, value: unknown): void {
    const p = this.pending.get(key);
    if (p !== undefined) {
      this.pending.delete(key);
      p.resolve(value);
    }
  }

  private errorReceived(error: ErrorFrame): void {
    const exc = errorFromFrame(error);
    if (error.fatal) {
      this.closedError = new BrokenResourceError(exc.message, {
        cause: exc,
        code: exc.code,
        fatal: true,
      });
      const welcome = this.welcome;
      this.welcome = undefined;
      welcome?.reject(exc);
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

  private queue(data: Uint8Array): void {
    this.out.push(data);
    this.outBytes += data.length;
    if (this.outBytes >= FLUSH_BYTES) {
      this.writeNow();
    } else if (this.flushScheduled === undefined) {
      this.flushScheduled = setImmediate(() => this.writeNow());
    }
  }

  private writeNow(): void {
    if (this.flushScheduled !== undefined) {
      clearImmediate(this.flushScheduled);
      this.flushScheduled = undefined;
    }
    const socket = this.socket;
    if (socket === undefined || socket.destroyed || !socket.writable || this.out.length === 0) {
      return;
    }
    const data = this.out.length === 1 ? this.out[0] : Buffer.concat(this.out, this.outBytes);
    this.out = [];
    this.outBytes = 0;
    if (data !== undefined && !socket.write(data)) {
      this.backedUp = true;
    }
  }

  private drained(): void {
    this.backedUp = false;
    for (const wake of this.drainWaiters.splice(0)) {
      wake();
    }
  }

  private async waitDrain(): Promise<void> {
    while (this.backedUp && !this.closing && this.conn.state === "open") {
      await new Promise<void>((resolve) => this.drainWaiters.push(resolve));
    }
  }

  private send(f: Frame): void {
    this.checkOpen();
    this.queue(this.conn.send(f));
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
    this.queue(this.conn.send(frame({ case: "credit", value: { subscriptionId, events } })));
    this.writeNow();
  }

  /** The bytes of a Publish frame, size-checked against the Deliver envelope [protocol §5]. */
  private encodePublish(
    topic: string,
    payloadType: string,
    payload: Uint8Array,
    init: CorrelationMetadataInit | undefined,
  ): Uint8Array {
    const correlation = init === undefined ? undefined : create(CorrelationMetadataSchema, init);
    if (correlation !== undefined) {
      validateMetadata(correlation);
    }
    const body = toBinary(
      PublishSchema,
      create(PublishSchema, { topic, payloadType, payload, correlation }),
    );
    const limit = (this.limits?.maxFrameBytes || DEFAULT_MAX_FRAME_BYTES) - DELIVER_OVERHEAD;
    if (body.length > limit) {
      throw new LimitExceeded(`event of ${body.length} bytes exceeds the limit of ${limit} bytes`);
    }
    return this.conn.encoded("publish", publishFrameBody(body));
  }

  private encodeTyped<Desc extends DescMessage>(
    topic: Topic<Desc>,
    message: MessageShape<Desc>,
    options: PublishOptions,
  ): Uint8Array {
    const actual = (message as { $typeName?: unknown }).$typeName;
    if (actual !== topic.payloadName) {
      throw new PayloadTypeMismatch(
        `topic ${JSON.stringify(topic.name)} carries ${topic.payloadName}, not ${String(actual)}`,
      );
    }
    return this.encodePublish(
      topic.name,
      topic.payloadName,
      toBinary(topic.schema, message),
      options.correlation,
    );
  }

  /**
   * Queue one event without waiting. Throws {@link LimitExceeded} when more
   * than `maxBufferBytes` wait to be written (the broker is not reading).
   */
  publishNowait<Desc extends DescMessage>(
    topic: Topic<Desc>,
    message: NoInfer<MessageShape<Desc>>,
    options: PublishOptions = {},
  ): void {
    this.checkOpen();
    const waiting = this.outBytes + (this.socket?.writableLength ?? 0);
    if (waiting > this.maxBufferBytes) {
      throw new LimitExceeded(`more than ${this.maxBufferBytes} bytes wait to be written`);
    }
    this.queue(this.encodeTyped(topic, message, options));
    this.published += 1;
  }

  /**
   * Publish one event, waiting only while the socket is backed up.
   *
   * Delivery is at most once and there is no acknowledgement: a refusal by
   * the broker arrives later as a non-fatal error, passed to {@link onError}
   * and counted in {@link statistics}; {@link flush} waits until the broker
   * has handled everything published before it.
   */
  async publish<Desc extends DescMessage>(
    topic: Topic<Desc>,
    message: NoInfer<MessageShape<Desc>>,
    options: PublishOptions = {},
  ): Promise<void> {
    this.checkOpen();
    if (this.backedUp) {
      await this.waitDrain();
      this.checkOpen();
    }
    this.queue(this.encodeTyped(topic, message, options));
    this.published += 1;
  }

  /** Publish an already serialized payload on a topic given by name (untyped). */
  async publishRaw(
    topic: string,
    payloadType: string,
    payload: Uint8Array,
    options: PublishOptions = {},
  ): Promise<void> {
    validateTopic(topic, {
      maxBytes: this.limits?.maxTopicBytes,
      maxLevels: this.limits?.maxTopicLevels,
    });
    this.checkOpen();
    if (this.backedUp) {
      await this.waitDrain();
      this.checkOpen();
    }
    this.queue(this.encodePublish(topic, payloadType, payload, options.correlation));
    this.published += 1;
  }

  private request<T>(key: string, f: Frame): Promise<T> {
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
        this.writeNow();
      } catch (err) {
        this.pending.delete(key);
        clearTimeout(timer);
        reject(err as Error);
      }
    });
  }

  /**
   * Subscribe to a topic, or to a filter with `+` / `#` wildcards [protocol §4].
   *
   * With a {@link Topic}, events decode to its payload type. Control topics
   * reach a wildcard filter only with `includeControl`. With `lossless` (or a
   * filter that reaches a topic the schema declares lossless) delivery is
   * credit based: see {@link SubscribeOptions.lossless} and
   * {@link Subscription.window}. Throws the typed error of the broker's
   * refusal (e.g. {@link AccessDenied} with its `code`), and a `RangeError`
   * for a `window` that is not a `uint32`.
   */
  subscribe<Desc extends DescMessage>(
    filter: Topic<Desc>,
    options?: SubscribeOptions,
  ): Promise<Subscription<Desc>>;
  subscribe(filter: string, options?: SubscribeOptions): Promise<Subscription>;
  async subscribe(filter: Topic | string, options: SubscribeOptions = {}): Promise<Subscription> {
    const [text, schema] =
      typeof filter === "string" ? [filter, undefined] : [filter.name, filter.schema];
    validateFilter(text, {
      maxBytes: this.limits?.maxTopicBytes,
      maxLevels: this.limits?.maxTopicLevels,
    });
    const correlationFilter =
      options.correlationFilter === undefined
        ? undefined
        : create(CorrelationFilterSchema, options.correlationFilter);
    if (correlationFilter !== undefined) {
      validateCorrelationFilter(correlationFilter);
    }
    const maxPending = options.maxPending ?? this.maxPending;
    const window = options.window ?? Math.min(Math.max(Math.floor(maxPending), 0), MAX_UINT32);
    if (!Number.isInteger(window) || window < 0 || window > MAX_UINT32) {
      throw new RangeError(`window must be an integer from 0 to ${MAX_UINT32}, got ${window}`);
    }
    const lossless = options.lossless ?? false;
    this.checkOpen();
    const id = this.nextId++;
    const sub = new Subscription<DescMessage>(
      this,
      id,
      text,
      correlationFilter,
      options.includeControl ?? false,
      schema,
      new EventQueue(maxPending),
    );
    this.subs.set(id, sub);
    try {
      await this.request(
        `sub:${id}`,
        frame({
          case: "subscribe",
          value: {
            subscriptionId: id,
            filter: text,
            correlationFilter,
            includeControl: sub.includeControl,
            lossless,
            window,
          },
        }),
      );
    } catch (err) {
      this.subs.delete(id);
      sub.end();
      throw err;
    }
    return sub;
  }

  /** End a subscription; events still queued for it are kept for reading. */
  async unsubscribe<Desc extends DescMessage>(sub: Subscription<Desc>): Promise<void> {
    const id = sub.subscriptionId;
    const known = this.subs.get(id) === (sub as unknown) && this.subs.delete(id);
    sub.end();
    if (known && this.isConnected) {
      await this.request(
        `unsub:${id}`,
        frame({ case: "unsubscribe", value: { subscriptionId: id } }),
      );
    }
  }

  /**
   * Round trip to the broker (a `Ping`): when it resolves, everything sent
   * before was handled [protocol §5]. Resolves to the round-trip time in ms.
   */
  async flush(): Promise<number> {
    const nonce = this.nextNonce++;
    const start = performance.now();
    await this.request(`pong:${nonce}`, frame({ case: "ping", value: { nonce } }));
    return performance.now() - start;
  }

  /** Same as {@link flush}. */
  ping(): Promise<number> {
    return this.flush();
  }

  /** The broker's statistics [protocol §9]. */
  async brokerStatistics(): Promise<StatsResponse> {
    const id = this.nextNonce++;
    return this.request<StatsResponse>(
      `stats:${id}`,
      frame({ case: "statsRequest", value: { requestId: id } }),
    );
  }

  /** A snapshot of this client's figures. */
  statistics(): ClientStatistics {
    const queues = new Set([...this.subs.values()].map((s) => s.queue));
    let received = 0;
    let dropped = 0;
    let missed = 0;
    for (const q of queues) {
      received += q.received;
      dropped += q.dropped;
      missed += q.missed;
    }
    return {
      published: this.published,
      received,
      dropped,
      missed,
      refused: this.refused,
      subscriptions: this.subs.size,
    };
  }
}

/** Connect to the broker at `path` and complete the handshake. */
export async function connect(
  path: string = DEFAULT_SOCKET_PATH,
  options: ClientOptions = {},
): Promise<Client> {
  const client = new Client(path, options);
  await client.connect();
  return client;
}
