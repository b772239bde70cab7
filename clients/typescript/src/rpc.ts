/**
 * Request/reply: the requests this client waits on ({@link PendingRequests}),
 * and the responder side ({@link Responder}, {@link IncomingRequest}).
 *
 * A request is one event on a request topic (a topic the schema declares
 * with a reply type) for one responder: the broker picks one responder
 * subscription (`Subscribe.respond`) among those whose filters match, in
 * turn, hands it a `RequestDeliver` with a token and the time left, and
 * routes its `Reply` back to the requester alone as a `ReplyDeliver`. Or it
 * answers with an `Error` naming the request: no responders, timeout.
 *
 * @module
 */

import {
  toBinary,
  type DescMessage,
  type MessageInitShape,
  type MessageShape,
} from "@bufbuild/protobuf";

import type {
  CorrelationFilter,
  CorrelationFilterSchema,
  CorrelationMetadata,
  CorrelationMetadataSchema,
} from "./gen/daemoneye/eventbus/v1/correlation_pb.js";
import type {
  ReplyDeliver,
  RequestDeliver,
  SubscribeAck,
} from "./gen/daemoneye/eventbus/v1/frames_pb.js";
import { PAYLOAD_REGISTRY, lookup } from "./gen/daemoneye/eventbus/v1/registry.js";
import {
  ClosedResourceError,
  LocalProtocolError,
  PayloadTypeMismatch,
  RequestFailed,
  RequestTimeout,
  type EventBusError,
} from "./errors.js";
import { dateFromNs, decodePayload } from "./events.js";
import { RequestTopic } from "./registry_runtime.js";
import type { SubscriptionRequest } from "./subscription.js";

/** Options of `Client.request`. */
export interface RequestOptions {
  /**
   * How long to wait for the reply, in ms: the broker's deadline for the
   * responder and the client's own. Default: the broker's
   * `Limits.default_request_timeout_ms` (the client's `requestTimeoutMs` if it
   * announced none); at most its `max_request_timeout_ms`.
   */
  timeoutMs?: number | undefined;
  /** Correlation metadata of the request (a message or its initializer). */
  correlation?: MessageInitShape<typeof CorrelationMetadataSchema> | undefined;
  /** Stop waiting when this signal aborts (the promise rejects with its reason). */
  signal?: AbortSignal | undefined;
}

/** A reply as it came, undecoded (`Client.requestRaw`). */
export interface RawReply {
  /** Fully qualified name of the reply message type. */
  readonly payloadType: string;
  /** The serialized reply. */
  readonly payload: Uint8Array;
  /** The component that answered; "" if anonymous. */
  readonly responder: string;
}

interface Waiter {
  readonly topic: string;
  resolve(reply: RawReply): void;
  reject(error: Error): void;
}

/**
 * The requests of one client waiting for their reply, by request id. Each
 * has its own deadline; ids count from 1 over the client's life, so a reply
 * or error for a request given up on (deadline, abort, lost connection)
 * finds nothing and is ignored.
 */
export class PendingRequests {
  private readonly waiting = new Map<bigint, Waiter>();
  private nextId = 1n;

  /** Requests waiting now. */
  get size(): number {
    return this.waiting.size;
  }

  /**
   * A new request on `topic`: its id, and the promise of its reply, which
   * rejects with {@link RequestTimeout} after `timeoutMs` and with the
   * signal's reason if `signal` aborts.
   */
  open(
    topic: string,
    timeoutMs: number,
    signal?: AbortSignal,
  ): { id: bigint; reply: Promise<RawReply> } {
    const id = this.nextId++;
    const reply = new Promise<RawReply>((resolve, reject) => {
      const onAbort = (): void => {
        this.fail(id, signal?.reason instanceof Error ? signal.reason : new Error("aborted"));
      };
      const timer = setTimeout(() => {
        this.fail(id, new RequestTimeout(`no reply on ${topic} within ${timeoutMs} ms`));
      }, timeoutMs);
      const settle = (): void => {
        clearTimeout(timer);
        signal?.removeEventListener("abort", onAbort);
        this.waiting.delete(id);
      };
      this.waiting.set(id, {
        topic,
        resolve: (value) => {
          settle();
          resolve(value);
        },
        reject: (error) => {
          settle();
          reject(error);
        },
      });
      signal?.addEventListener("abort", onAbort, { once: true });
    });
    return { id, reply };
  }

  /** The reply to a request; false if none waits for it. */
  replied(frame: ReplyDeliver): boolean {
    const waiter = this.waiting.get(frame.requestId);
    if (waiter === undefined) {
      return false;
    }
    if (frame.error) {
      const who = frame.responder ? ` (${frame.responder})` : "";
      waiter.reject(
        new RequestFailed(`request on ${waiter.topic} failed${who}: ${frame.error}`, {
          reason: frame.error,
          responder: frame.responder,
          topic: waiter.topic,
          requestId: frame.requestId,
        }),
      );
    } else {
      waiter.resolve({
        payloadType: frame.payloadType,
        payload: frame.payload,
        responder: frame.responder,
      });
    }
    return true;
  }

  /** Fail request `id` with `error`; false if none waits. */
  fail(id: bigint, error: Error): boolean {
    const waiter = this.waiting.get(id);
    waiter?.reject(error);
    return waiter !== undefined;
  }

  /** Fail every waiting request (the connection is gone). */
  failAll(error: Error): void {
    for (const waiter of [...this.waiting.values()]) {
      waiter.reject(error);
    }
  }
}

/** The reply schema a request topic declares, looked up by name; undefined if none. */
export function replySchemaOf(topic: string): DescMessage | undefined {
  const declared = lookup(topic);
  return declared instanceof RequestTopic ? declared.replySchema : undefined;
}

/** What a responder needs from its client. */
export interface ResponderOwner {
  /**
   * Send a `Reply` for `token`, on the connection the request came on
   * (`generation`); false if that connection is gone.
   */
  sendReply(
    generation: number,
    token: bigint,
    payloadType: string,
    payload: Uint8Array,
    error: string,
  ): boolean;
  /** End the responder's subscription with the broker. */
  stopServing(responder: Responder<DescMessage, DescMessage>): Promise<void>;
}

/** The reason a request is failed with when its responder's queue is full (as in the Python client). */
export const BUSY = "the responder is busy";
/** The reason a request is failed with when its responder has stopped (as in the Python client). */
export const STOPPED = "the responder has stopped";

/** Options of `Client.serve`. */
export interface ServeOptions {
  /**
   * Requests kept waiting for the application before new ones are failed
   * at once with the reason "the responder is busy" (default: the client's
   * `maxPending`).
   */
  maxPending?: number | undefined;
  /**
   * Take only the requests whose correlation metadata this filter accepts
   * (applied by the broker, as for a subscription); the others go to other
   * responders, or get `NoResponders`.
   */
  correlationFilter?: MessageInitShape<typeof CorrelationFilterSchema> | undefined;
}

/**
 * One request for a responder. Answer it once, with {@link reply} (or
 * {@link replyRaw}) or {@link fail}, before its {@link deadline}: the broker
 * discards a later answer, so this client does not send it.
 */
export class IncomingRequest<
  Req extends DescMessage = DescMessage,
  Rep extends DescMessage = DescMessage,
> {
  /** The concrete request topic. */
  readonly topic: string;
  /** Fully qualified name of the request message type. */
  readonly payloadType: string;
  /** The serialized request. */
  readonly payload: Uint8Array;
  /** Correlation metadata of the request, if any. */
  readonly correlation: CorrelationMetadata | undefined;
  /** The broker's token for the request, valid on this connection only. */
  readonly token: bigint;
  /** The broker's id of the request (numbered with the events). */
  readonly eventId: bigint;
  /** When the broker accepted the request, in ns since the epoch; 0n if unknown. */
  readonly receivedAtNs: bigint;
  /** The component that sent the request; "" if anonymous. */
  readonly requester: string;
  /** The responder subscription the request came to. */
  readonly subscriptionId: number;
  /** When the requester stops waiting (by this host's clock, from the time left on receipt). */
  readonly deadline: Date;
  private readonly deadlineMono: number;
  private answeredFlag = false;
  private decoded: MessageShape<Req> | undefined;

  constructor(
    private readonly responder: Responder<Req, Rep>,
    private readonly owner: ResponderOwner,
    frame: RequestDeliver,
    /** The connection the request came on. */
    private readonly generation: number,
  ) {
    const pub = frame.publish;
    this.topic = pub?.topic ?? "";
    this.payloadType = pub?.payloadType ?? "";
    this.payload = pub?.payload ?? new Uint8Array();
    this.correlation = pub?.correlation;
    this.token = frame.token;
    this.eventId = frame.eventId;
    this.receivedAtNs = frame.receivedAtNs;
    this.requester = frame.requester;
    this.subscriptionId = frame.subscriptionId;
    this.deadlineMono = performance.now() + frame.remainingMs;
    this.deadline = new Date(Date.now() + frame.remainingMs);
  }

  /** Milliseconds left before the deadline (0 once it passed). */
  get remaining(): number {
    return Math.max(0, this.deadlineMono - performance.now());
  }

  /** The deadline passed: the requester no longer waits. */
  get expired(): boolean {
    return this.remaining <= 0;
  }

  /** {@link receivedAtNs} as a `Date` (millisecond precision); undefined if unknown. */
  get receivedAt(): Date | undefined {
    return dateFromNs(this.receivedAtNs);
  }

  /** A reply or failure was given. */
  get answered(): boolean {
    return this.answeredFlag;
  }

  /**
   * The decoded request, decoded once on first use. Throws
   * {@link PayloadTypeMismatch} for a type other than the topic's,
   * `InvalidPayload` if it does not parse (then {@link fail} it).
   */
  get message(): MessageShape<Req> {
    this.decoded ??= decodePayload(
      this.responder.schema,
      this.payloadType,
      this.payload,
      `request on ${JSON.stringify(this.topic)}`,
      { topic: this.topic, subscriptionId: this.subscriptionId },
    );
    return this.decoded;
  }

  /**
   * Answer with `message`, of the topic's reply type. Resolves to true once
   * the reply is on its way, false if it was not sent: the deadline had
   * passed, or the connection the request came on is gone. Throws
   * {@link LocalProtocolError} if the request was already answered and
   * {@link PayloadTypeMismatch} for a message of another type.
   */
  reply(message: NoInfer<MessageShape<Rep>>): Promise<boolean> {
    const actual = (message as { $typeName?: unknown }).$typeName;
    const schema =
      this.responder.replySchema ??
      replySchemaOf(this.topic) ??
      (typeof actual === "string" ? PAYLOAD_REGISTRY.getMessage(actual) : undefined);
    if (schema === undefined || actual !== schema.typeName) {
      return Promise.reject(
        new PayloadTypeMismatch(
          `request topic ${JSON.stringify(this.topic)} replies with ` +
            `${schema?.typeName ?? "an unknown type"}, not ${String(actual)}`,
          { topic: this.topic },
        ),
      );
    }
    return this.answer(schema.typeName, toBinary(schema, message as MessageShape<DescMessage>), "");
  }

  /** Answer with an already serialized reply (untyped). */
  replyRaw(payloadType: string, payload: Uint8Array): Promise<boolean> {
    return this.answer(payloadType, payload, "");
  }

  /**
   * Answer that the request could not be served: the requester's `request`
   * rejects with a `RequestFailed` carrying `reason` (not empty).
   */
  fail(reason: string): Promise<boolean> {
    return this.answer("", new Uint8Array(), reason || "failed");
  }

  private answer(payloadType: string, payload: Uint8Array, error: string): Promise<boolean> {
    if (this.answeredFlag) {
      return Promise.reject(
        new LocalProtocolError(`the request on ${this.topic} was already answered`),
      );
    }
    if (this.expired) {
      this.answeredFlag = true;
      this.responder.answeredOne();
      return Promise.resolve(false);
    }
    let sent: boolean;
    try {
      sent = this.owner.sendReply(this.generation, this.token, payloadType, payload, error);
    } catch (err) {
      return Promise.reject(err as Error); // e.g. a reply over the frame limit: fail() it instead
    }
    this.answeredFlag = true;
    this.responder.answeredOne();
    return Promise.resolve(sent);
  }

  /** Fail the request from inside the client (busy, closed), ignoring the outcome. @internal */
  dismiss(reason: string): void {
    this.fail(reason).catch(() => undefined);
  }
}

/**
 * Serves one request topic, template or filter: an async iterable of
 * {@link IncomingRequest}s, each for this responder alone (the broker gives
 * every request to one responder among those that serve its topic, in turn).
 *
 * Requests wait in a bounded queue; when it is full, new ones are failed at
 * once ("the responder is busy", counted in {@link busy}). A request whose deadline
 * passed before the application took it is dropped (counted in
 * {@link expired}). Iteration ends after {@link close} or the client's
 * `close()`, and throws a `ConnectionLost` if the broker went away and the
 * client does not reconnect; a client that reconnects serves again on the
 * new connection (requests in flight on the old one are lost).
 */
export class Responder<
  Req extends DescMessage = DescMessage,
  Rep extends DescMessage = DescMessage,
> implements AsyncIterable<IncomingRequest<Req, Rep>> {
  private readonly items: IncomingRequest<Req, Rep>[] = [];
  private waiter: (() => void) | undefined;
  private closedWith: { error: Error | undefined } | undefined;
  /** Requests received. */
  received = 0;
  /** Requests failed at once because the queue was full. */
  busy = 0;
  /** Requests dropped because their deadline passed before they were taken. */
  expired = 0;
  /** Requests answered (a reply or a failure). */
  answered = 0;

  constructor(
    private readonly owner: ResponderOwner,
    readonly subscriptionId: number,
    /** The filter served: a request topic, or a template's or caller's filter. */
    readonly filter: string,
    /** The request schema of a typed responder. */
    readonly schema: Req | undefined,
    /** The reply schema of a typed responder. */
    readonly replySchema: Rep | undefined,
    readonly maxPending: number,
    /** The requests it takes, by their correlation metadata (undefined: all). */
    readonly correlationFilter: CorrelationFilter | undefined = undefined,
  ) {}

  /** Still serving. */
  get active(): boolean {
    return this.closedWith === undefined;
  }

  /** Requests waiting for the application. */
  get length(): number {
    return this.items.length;
  }

  /** What to ask the broker for, on this connection or the next. @internal */
  get request(): SubscriptionRequest & { respond: true } {
    return {
      filter: this.filter,
      correlationFilter: this.correlationFilter,
      includeControl: false, // the control-topic rule does not apply to responders
      lossless: false, // refused for responders
      window: 0,
      respond: true,
    };
  }

  /** @internal */
  acknowledged(_ack: SubscribeAck): void {
    // Requests are not credit based: each carries its own deadline.
  }

  /** A request from the broker, on connection `generation`. @internal */
  deliver(frame: RequestDeliver, generation: number): void {
    const request = new IncomingRequest(this, this.owner, frame, generation);
    this.received += 1;
    if (this.closedWith !== undefined) {
      request.dismiss(STOPPED);
    } else if (frame.remainingMs === 0) {
      this.expired += 1; // nobody waits for it any more
    } else if (this.items.length >= this.maxPending) {
      this.busy += 1;
      request.dismiss(BUSY);
    } else {
      this.items.push(request);
      this.waiter?.();
    }
  }

  /** @internal */
  answeredOne(): void {
    this.answered += 1;
  }

  /** The next request whose deadline has not passed, or undefined. */
  getNowait(): IncomingRequest<Req, Rep> | undefined {
    for (;;) {
      const request = this.items.shift();
      if (request === undefined || !request.expired) {
        return request;
      }
      this.expired += 1;
    }
  }

  /**
   * Wait for the next request. Throws {@link ClosedResourceError} (or the
   * error the responder ended with) once it ended and none is left, and
   * {@link RequestTimeout} after `timeoutMs`.
   */
  async get(timeoutMs?: number): Promise<IncomingRequest<Req, Rep>> {
    for (;;) {
      const request = this.getNowait();
      if (request !== undefined) {
        return request;
      }
      if (this.closedWith !== undefined) {
        throw this.closedWith.error ?? new ClosedResourceError("responder closed");
      }
      await new Promise<void>((resolve, reject) => {
        let timer: NodeJS.Timeout | undefined;
        this.waiter = () => {
          clearTimeout(timer);
          this.waiter = undefined;
          resolve();
        };
        if (timeoutMs !== undefined) {
          timer = setTimeout(() => {
            this.waiter = undefined;
            reject(new RequestTimeout(`no request within ${timeoutMs} ms`));
          }, timeoutMs);
        }
      });
    }
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<IncomingRequest<Req, Rep>, void, undefined> {
    for (;;) {
      let request: IncomingRequest<Req, Rep>;
      try {
        request = await this.get();
      } catch (err) {
        if (err instanceof ClosedResourceError) {
          return;
        }
        throw err;
      }
      yield request;
    }
  }

  /**
   * No more requests will come: those still queued are failed ("the
   * responder has stopped") so that their requesters do not wait for the deadline, and
   * iteration ends (with `error`, if given). @internal
   */
  end(error?: EventBusError): void {
    if (this.closedWith === undefined) {
      this.closedWith = { error };
    }
    for (const request of this.items.splice(0)) {
      request.dismiss(STOPPED);
    }
    this.waiter?.();
  }

  /** A new connection: requests of the old one cannot be answered any more. @internal */
  restart(): void {
    this.items.splice(0);
  }

  /** Stop serving (idempotent): the broker gives the topic's requests to other responders. */
  async close(): Promise<void> {
    if (this.closedWith === undefined) {
      await this.owner.stopServing(this as unknown as Responder);
    }
  }

  /** `await using responder = await client.serve(...)` stops serving at the end of the scope. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
