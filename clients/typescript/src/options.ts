/**
 * The options and figures of a client, and its last will ({@link publication}).
 *
 * @module
 */

import type { DescMessage, MessageInitShape, MessageShape } from "@bufbuild/protobuf";

import type {
  CorrelationFilterSchema,
  CorrelationMetadataSchema,
} from "./gen/daemoneye/eventbus/v1/correlation_pb.js";
import type { Topic } from "./gen/daemoneye/eventbus/v1/registry.js";
import type { ReconnectOptions } from "./reconnect.js";

/** The broker's default socket [protocol: Transport]. */
export const DEFAULT_SOCKET_PATH = "/tmp/daemoneye.sock";

/** `CorrelationMetadata`, or an initializer for one. */
export type CorrelationMetadataInit = MessageInitShape<typeof CorrelationMetadataSchema>;
/** `CorrelationFilter`, or an initializer for one. */
export type CorrelationFilterInit = MessageInitShape<typeof CorrelationFilterSchema>;

/** A message on its topic, with its correlation: a last will ({@link publication}). */
export interface Publication<Desc extends DescMessage = DescMessage> {
  readonly topic: Topic<Desc>;
  readonly message: MessageShape<Desc>;
  readonly correlation?: CorrelationMetadataInit | undefined;
}

/** A typed {@link Publication}: `publication(topic, message)` fails to compile for a wrong message. */
export function publication<Desc extends DescMessage>(
  topic: Topic<Desc>,
  message: NoInfer<MessageShape<Desc>>,
  options: PublishOptions = {},
): Publication<Desc> {
  return { topic, message, correlation: options.correlation };
}

/** Options of {@link Client}. */
export interface ClientOptions {
  /** Free-form name, for the broker's logs and statistics. */
  name?: string;
  /** The component to claim in `Hello` (e.g. `procmond`); "" for anonymous. */
  component?: string;
  /** Handshake deadline, in ms (default 5000). */
  connectTimeoutMs?: number;
  /**
   * Deadline for acks, pongs and statistics, in ms (default 5000); also the
   * deadline of a request when the broker announced no default.
   */
  requestTimeoutMs?: number;
  /**
   * Events kept per subscription before new ones are dropped (default 10000);
   * also the default credit window of a subscription (see
   * {@link SubscribeOptions.window}) and the requests a responder keeps.
   */
  maxPending?: number;
  /** `publishNowait` refuses once this many bytes wait to be written (default 8 MiB). */
  maxBufferBytes?: number;
  /**
   * Reconnect after the broker goes away (default: off). `true` waits 100 ms
   * before the first attempt, then twice as long after each failure up to
   * 5 s, each delay shortened by up to 20 % at random; an object sets these
   * ({@link ReconnectOptions}). While disconnected, subscriptions stay open
   * (they are asked for again once reconnected), `publish`, `subscribe`,
   * `request` and `flush` throw a {@link ConnectionLost}, and whatever waited
   * on the lost connection (acknowledgements, replies) rejects with one.
   */
  reconnect?: boolean | ReconnectOptions;
  /**
   * An event the broker publishes on this client's behalf if the connection
   * ends without the client's goodbye (it crashed, was killed, lost the
   * socket): `publication(topic, message, { correlation })`. Sent in every
   * `Hello` and checked there as a publish: a will the client may not
   * publish refuses the connection. {@link close} says goodbye, so no will.
   */
  lastWill?: Publication<DescMessage> | undefined;
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

/** What the broker's `Welcome` said it does. */
export interface BrokerFeatures {
  /** It accepts `PublishBatch` frames: consecutive publishes are batched. */
  readonly batches: boolean;
  /**
   * It routes requests, delivers retained events, publishes presence, honours
   * the last will and stamps every event with an id and a receive time.
   */
  readonly requests: boolean;
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
  /** Responders serving now. */
  readonly responders: number;
  /** Requests of this client waiting for a reply. */
  readonly pendingRequests: number;
  /** Successful reconnections. */
  readonly reconnects: number;
}
