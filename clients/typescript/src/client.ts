/**
 * The Node.js client: connect, publish, subscribe, request and serve.
 *
 * ```ts
 * const client = await connect("/tmp/daemoneye.sock", { component: "daemoneye-agent" });
 * const sub = await client.subscribe("events.process.#");
 * for await (const event of sub) {
 *   console.log(event.topic, event.eventId, event.message());
 * }
 * ```
 *
 * Publishing is typed by the registry: `client.publish(EVENTS_PROCESS_LIFECYCLE,
 * create(ProcessEventSchema, {...}))` type-checks, a `NetworkEvent` there does
 * not. Writes are coalesced and consecutive events batched ({@link Writer}).
 * The client answers the broker's heartbeats itself, and with `reconnect`
 * comes back after the broker goes away, subscriptions included. The API
 * mirrors the Python client (`daemoneye_eventbus.client`); times are in
 * milliseconds.
 *
 * Delivery is at most once unless a subscription is credit based: one that
 * asks for it (`client.subscribe(filter, { lossless: true })`) or whose filter
 * reaches a topic the schema declares lossless. The client grants credit back
 * to the broker as the application takes events, and the broker holds back
 * the publishers instead of dropping events for a subscriber that falls behind.
 *
 * @module
 */

import { create, toBinary, type DescMessage, type MessageShape } from "@bufbuild/protobuf";

import { PublishSchema } from "./gen/daemoneye/eventbus/v1/frames_pb.js";
import type { Topic } from "./gen/daemoneye/eventbus/v1/registry.js";
import { publishHeader, type PublishHeader } from "./batcher.js";
import {
  correlationBytes,
  correlationFilter,
  correlationMetadata,
  payloadTypeOf,
  requestDeadline,
} from "./checks.js";
import { BrokerConnection } from "./connection.js";
import { LimitExceeded, LocalProtocolError } from "./errors.js";
import { EventQueue, decodePayload } from "./events.js";
import {
  DEFAULT_SOCKET_PATH,
  type ClientOptions,
  type PublishOptions,
  type SubscribeOptions,
} from "./options.js";
import {
  DEFAULT_MAX_FRAME_BYTES,
  MAX_UINT32,
  REQUEST_DELIVER_OVERHEAD,
  frame,
} from "./protocol.js";
import type { RequestTopic, RequestTopicTemplate } from "./registry_runtime.js";
import { Responder, type RawReply, type RequestOptions, type ServeOptions } from "./rpc.js";
import { Subscription } from "./subscription.js";
import { validateFilter, validateTopic } from "./topics.js";

export { EventQueue, ReceivedEvent, dateFromNs, decodePayload } from "./events.js";
export * from "./options.js";
export { Subscription, type SubscriptionOwner, type SubscriptionRequest } from "./subscription.js";

/** Publish headers kept per (topic, payload type); cleared when the cache grows past this. */
const HEADER_CACHE_SIZE = 1024;

/**
 * A connection to a broker. Use {@link connect}, or `new Client(path)` then
 * {@link Client.connect}; {@link Client.close} says goodbye.
 */
export class Client extends BrokerConnection {
  private readonly headers = new Map<string, PublishHeader>();

  /** The encoded topic and payload-type fields of a publish, cached. */
  private header(topic: string, payloadType: string): PublishHeader {
    const key = `${topic}\u0000${payloadType}`;
    let header = this.headers.get(key);
    if (header === undefined) {
      if (this.headers.size >= HEADER_CACHE_SIZE) {
        this.headers.clear();
      }
      header = publishHeader(topic, payloadType);
      this.headers.set(key, header);
    }
    return header;
  }

  private queueTyped<Desc extends DescMessage>(
    topic: Topic<Desc>,
    message: MessageShape<Desc>,
    options: PublishOptions,
  ): void {
    const payloadType = payloadTypeOf(topic, message);
    this.writer.queuePublish(
      this.header(topic.name, payloadType),
      toBinary(topic.schema, message),
      correlationBytes(options.correlation),
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
    if (this.writer.waitingBytes > this.maxBufferBytes) {
      throw new LimitExceeded(`more than ${this.maxBufferBytes} bytes wait to be written`);
    }
    this.queueTyped(topic, message, options);
  }

  /**
   * Publish one event, waiting only while the socket is backed up.
   *
   * Delivery is at most once and there is no acknowledgement: a refusal by
   * the broker arrives later as a non-fatal error, passed to {@link onError}
   * and counted in {@link statistics}; {@link flush} waits until the broker
   * has handled everything published before it. While disconnected (with
   * `reconnect`), throws a {@link ConnectionLost}: nothing is kept for later.
   */
  async publish<Desc extends DescMessage>(
    topic: Topic<Desc>,
    message: NoInfer<MessageShape<Desc>>,
    options: PublishOptions = {},
  ): Promise<void> {
    this.checkOpen();
    if (this.writer.isBackedUp) {
      await this.writer.waitDrain();
      this.checkOpen();
    }
    this.queueTyped(topic, message, options);
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
    if (this.writer.isBackedUp) {
      await this.writer.waitDrain();
      this.checkOpen();
    }
    this.writer.queuePublish(
      this.header(topic, payloadType),
      payload,
      correlationBytes(options.correlation),
    );
  }

  /**
   * Subscribe to a topic, or to a filter with `+` / `#` wildcards [protocol §4].
   *
   * With a {@link Topic}, events decode to its payload type. Control topics
   * reach a wildcard filter only with `includeControl`. With `lossless` (or a
   * filter that reaches a topic the schema declares lossless) delivery is
   * credit based: see {@link SubscribeOptions.lossless} and
   * {@link Subscription.window}. A topic declared retained gives its retained
   * event first (`event.retained`). Throws the typed error of the broker's
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
    const filterMessage = correlationFilter(options.correlationFilter);
    const maxPending = options.maxPending ?? this.maxPending;
    const window = options.window ?? Math.min(Math.max(Math.floor(maxPending), 0), MAX_UINT32);
    if (!Number.isInteger(window) || window < 0 || window > MAX_UINT32) {
      throw new RangeError(`window must be an integer from 0 to ${MAX_UINT32}, got ${window}`);
    }
    this.checkOpen();
    const id = this.registrations.newId();
    const sub = new Subscription<DescMessage>(
      this,
      id,
      text,
      filterMessage,
      options.includeControl ?? false,
      schema,
      new EventQueue(maxPending),
      options.lossless ?? false,
      window,
    );
    this.registrations.addSubscription(sub);
    try {
      await this.requestSubscribe(id, sub.request, false);
    } catch (err) {
      this.registrations.delete(id);
      sub.end();
      throw err;
    }
    return sub;
  }

  /** End a subscription; events still queued for it are kept for reading. */
  async unsubscribe<Desc extends DescMessage>(sub: Subscription<Desc>): Promise<void> {
    const id = sub.subscriptionId;
    const known = this.registrations.removeSubscription(sub);
    sub.end();
    if (known && this.isConnected) {
      await this.ask(`unsub:${id}`, frame({ case: "unsubscribe", value: { subscriptionId: id } }));
    }
  }

  // -- request/reply -----------------------------------------------------------------

  private checkRequests(): void {
    if (!this.features.requests) {
      throw new LocalProtocolError(
        `the broker at ${this.path} does not route requests (its Welcome did not set requests)`,
      );
    }
  }

  /**
   * Ask one responder of a request topic and wait for its reply, typed by the
   * topic (`RequestTopic<Req, Rep>`): `await client.request(controlCollectorRpcHealth({ id }), req)`.
   *
   * Rejects with {@link NoResponders} when nobody serves the topic (at once),
   * {@link RequestTimeout} when no reply came within the deadline (the
   * broker's, or this client's own), {@link RequestFailed} when the
   * responder failed it (its reason), {@link ConnectionLost} when the
   * connection was lost first, and the typed error of a refusal (access,
   * topic, too many requests pending: `LimitExceeded`).
   */
  async request<Req extends DescMessage, Rep extends DescMessage>(
    topic: RequestTopic<Req, Rep>,
    message: NoInfer<MessageShape<Req>>,
    options: RequestOptions = {},
  ): Promise<MessageShape<Rep>> {
    const payloadType = payloadTypeOf(topic, message);
    const reply = await this.requestRaw(
      topic.name,
      payloadType,
      toBinary(topic.schema, message),
      options,
    );
    return decodePayload(
      topic.replySchema,
      reply.payloadType,
      reply.payload,
      `the reply on ${JSON.stringify(topic.name)}`,
      { topic: topic.name },
    );
  }

  /** {@link request} with an already serialized request; the reply comes undecoded. */
  async requestRaw(
    topic: string,
    payloadType: string,
    payload: Uint8Array,
    options: RequestOptions = {},
  ): Promise<RawReply> {
    validateTopic(topic, {
      maxBytes: this.limits?.maxTopicBytes,
      maxLevels: this.limits?.maxTopicLevels,
    });
    this.checkOpen();
    this.checkRequests();
    const timeoutMs = requestDeadline(options.timeoutMs, this.limits, this.requestTimeoutMs);
    const correlation = correlationMetadata(options.correlation);
    options.signal?.throwIfAborted();
    if (this.writer.isBackedUp) {
      await this.writer.waitDrain();
      this.checkOpen();
    }
    const publish = create(PublishSchema, { topic, payloadType, payload, correlation });
    const size = toBinary(PublishSchema, publish).length;
    const limit =
      (this.limits?.maxFrameBytes || DEFAULT_MAX_FRAME_BYTES) - REQUEST_DELIVER_OVERHEAD;
    if (size > limit) {
      throw new LimitExceeded(`request of ${size} bytes exceeds the limit of ${limit} bytes`);
    }
    const { id, reply } = this.requests.open(topic, timeoutMs, options.signal);
    try {
      this.send(frame({ case: "request", value: { requestId: id, publish, timeoutMs } }));
    } catch (err) {
      this.requests.fail(id, err instanceof Error ? err : new Error(String(err)));
    }
    return reply;
  }

  /**
   * Answer the requests of a request topic, of every topic of a request
   * template (`CONTROL_COLLECTOR_RPC_HEALTH`), or of a filter: resolves once
   * the broker acknowledged the responder subscription, to a
   * {@link Responder} to iterate: `for await (const req of responder) await
   * req.reply(answer)`. Each request goes to one responder among those that
   * serve its topic, in turn. Throws the typed error of the broker's refusal.
   */
  serve<Req extends DescMessage, Rep extends DescMessage>(
    topic: RequestTopic<Req, Rep> | RequestTopicTemplate<Req, Rep, string>,
    options?: ServeOptions,
  ): Promise<Responder<Req, Rep>>;
  serve(filter: string, options?: ServeOptions): Promise<Responder>;
  async serve(
    target: RequestTopic | RequestTopicTemplate | string,
    options: ServeOptions = {},
  ): Promise<Responder> {
    const [filter, schema, replySchema] =
      typeof target === "string"
        ? [target, undefined, undefined]
        : "pattern" in target
          ? [target.filter, target.schema, target.replySchema]
          : [target.name, target.schema, target.replySchema];
    validateFilter(filter, {
      maxBytes: this.limits?.maxTopicBytes,
      maxLevels: this.limits?.maxTopicLevels,
    });
    const filterMessage = correlationFilter(options.correlationFilter);
    this.checkOpen();
    this.checkRequests();
    const id = this.registrations.newId();
    const responder = new Responder(
      this,
      id,
      filter,
      schema,
      replySchema,
      options.maxPending ?? this.maxPending,
      filterMessage,
    );
    this.registrations.addResponder(responder);
    try {
      await this.requestSubscribe(id, responder.request, true);
    } catch (err) {
      this.registrations.delete(id);
      responder.end();
      throw err;
    }
    return responder;
  }

  /** @internal */
  async stopServing(responder: Responder): Promise<void> {
    const id = responder.subscriptionId;
    const known = this.registrations.removeResponder(responder);
    responder.end();
    if (known && this.isConnected) {
      await this.ask(`unsub:${id}`, frame({ case: "unsubscribe", value: { subscriptionId: id } }));
    }
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
