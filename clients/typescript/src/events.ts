/**
 * What a subscription receives: {@link ReceivedEvent}s, and the bounded
 * {@link EventQueue} they wait in until the application takes them.
 *
 * @module
 */

import { fromBinary, type DescMessage, type MessageShape } from "@bufbuild/protobuf";

import type { CorrelationMetadata } from "./gen/daemoneye/eventbus/v1/correlation_pb.js";
import { PAYLOAD_REGISTRY } from "./gen/daemoneye/eventbus/v1/registry.js";
import {
  ClosedResourceError,
  InvalidPayload,
  PayloadTypeMismatch,
  RequestTimeout,
  type InvalidPayloadDetails,
} from "./errors.js";

/** Nanoseconds in a millisecond, as a bigint. */
const NS_PER_MS = 1_000_000n;

/** A time in nanoseconds since the epoch as a `Date` (millisecond precision); undefined for 0. */
export function dateFromNs(ns: bigint): Date | undefined {
  return ns === 0n ? undefined : new Date(Number(ns / NS_PER_MS));
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
    /**
     * The broker's id of the event: unique for the broker's life, increasing
     * in the order the broker accepted events, the same for every subscriber
     * (so consecutive for the events of one batch). 0n from a broker without
     * ids (its `Welcome` did not set `requests`).
     */
    readonly eventId: bigint = 0n,
    /**
     * When the broker accepted the event, in nanoseconds since the Unix epoch
     * (the broker's wall clock), exact; 0n from a broker without ids.
     */
    readonly receivedAtNs: bigint = 0n,
    /**
     * The topic's retained event, delivered first to this new subscription
     * because it is new, not because it was just published.
     */
    readonly retained: boolean = false,
  ) {}

  /** {@link receivedAtNs} as a `Date` (millisecond precision); undefined if unknown. */
  get receivedAt(): Date | undefined {
    return dateFromNs(this.receivedAtNs);
  }

  /**
   * Decode the payload into its message type.
   *
   * Throws {@link InvalidPayload} (with `topic`, `payloadType` and `sequence`)
   * if the payload does not parse as that type, {@link PayloadTypeMismatch} if
   * the type is unknown here or not the one of a typed subscription.
   */
  message(): MessageShape<Desc> {
    return decodePayload(
      this.schema,
      this.payloadType,
      this.payload,
      `event #${this.sequence} on ${JSON.stringify(this.topic)}`,
      { topic: this.topic, sequence: this.sequence, subscriptionId: this.subscriptionId },
    );
  }
}

/**
 * Decode `payload` as `schema`, or as the registered type named
 * `payloadType` without one. Throws {@link PayloadTypeMismatch} if the type
 * is unknown or not `schema`'s, {@link InvalidPayload} (with `details`) if the
 * bytes do not parse; `what` names the payload in the message.
 */
export function decodePayload<Desc extends DescMessage>(
  schema: Desc | undefined,
  payloadType: string,
  payload: Uint8Array,
  what: string,
  details: InvalidPayloadDetails = {},
): MessageShape<Desc> {
  const desc: DescMessage | undefined = schema ?? PAYLOAD_REGISTRY.getMessage(payloadType);
  if (desc === undefined) {
    throw new PayloadTypeMismatch(`unknown payload type ${JSON.stringify(payloadType)}`, details);
  }
  if (desc.typeName !== payloadType) {
    throw new PayloadTypeMismatch(`${what} carries ${payloadType}, not ${desc.typeName}`, details);
  }
  try {
    return fromBinary(desc, payload) as MessageShape<Desc>;
  } catch (err) {
    const reason = err instanceof Error ? err.message : String(err);
    throw new InvalidPayload(`${what} does not parse as ${payloadType}: ${reason}`, {
      ...details,
      payloadType,
      cause: err,
    });
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

  /**
   * A new session began for the subscription (after a reconnection): its
   * sequence numbers start again at 1, which is no gap.
   */
  restartSequence(): void {
    this.lastSequence = 0n;
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
