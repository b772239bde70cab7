/**
 * A subscription: the events of one filter, as an async iterable, with the
 * credit it grants back when delivery is credit based.
 *
 * @module
 */

import type { DescMessage, MessageShape } from "@bufbuild/protobuf";

import type { CorrelationFilter } from "./gen/daemoneye/eventbus/v1/correlation_pb.js";
import type { Deliver, DeliverBatch, SubscribeAck } from "./gen/daemoneye/eventbus/v1/frames_pb.js";
import { ConnectionClosed, InvalidPayload } from "./errors.js";
import { EventQueue, ReceivedEvent } from "./events.js";
import { CreditCounter } from "./protocol.js";

/** What a subscription needs from its client. */
export interface SubscriptionOwner {
  /** End the subscription with the broker. */
  unsubscribe<D extends DescMessage>(sub: Subscription<D>): Promise<void>;
  /** Send a `Credit` frame for a credit-based subscription. */
  grantCredit(subscriptionId: number, events: number): void;
}

/** What a subscription asked the broker for, to ask again after a reconnection. */
export interface SubscriptionRequest {
  readonly filter: string;
  readonly correlationFilter: CorrelationFilter | undefined;
  readonly includeControl: boolean;
  /** `Subscribe.lossless`. */
  readonly lossless: boolean;
  /** `Subscribe.window`: 0 lets the broker choose. */
  readonly window: number;
}

/**
 * Events matching one filter: an async iterable of undecoded
 * {@link ReceivedEvent}s, or of `[event, message]` pairs through
 * {@link messages}. Iteration ends after {@link unsubscribe} or the
 * client's `close()`; it throws a `ConnectionLost` (a `BrokenResourceError`)
 * if the broker went away and the client does not reconnect: after the
 * broker's goodbye (`goodbye` set), a fatal error, or the end of the stream.
 * A client that reconnects keeps the subscription: the broker is asked for it
 * again (same filter and options) on the new connection, and iteration goes
 * on; its sequence numbers start again at 1.
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
    readonly client: SubscriptionOwner,
    readonly subscriptionId: number,
    readonly filter: string,
    readonly correlationFilter: CorrelationFilter | undefined,
    readonly includeControl: boolean,
    readonly schema: Desc | undefined,
    readonly queue: EventQueue<Desc>,
    /** Lossless delivery was asked for (`Subscribe.lossless`). */
    readonly requestedLossless = false,
    /** The credit window asked for (`Subscribe.window`, 0: the broker's choice). */
    readonly requestedWindow = 0,
  ) {}

  /** What to ask the broker for, on this connection or the next. @internal */
  get request(): SubscriptionRequest {
    return {
      filter: this.filter,
      correlationFilter: this.correlationFilter,
      includeControl: this.includeControl,
      lossless: this.requestedLossless,
      window: this.requestedWindow,
    };
  }

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
    this.queue.put(
      new ReceivedEvent(
        pub?.topic ?? "",
        pub?.payloadType ?? "",
        pub?.payload ?? new Uint8Array(),
        pub?.correlation,
        deliver.sequence,
        this.subscriptionId,
        this.schema,
        deliver.eventId,
        deliver.receivedAtNs,
        deliver.retained,
      ),
    );
  }

  /**
   * Consecutive events, queued one by one as if each came in its own
   * `Deliver`: event `i` has sequence `firstSequence + i` and event id
   * `firstEventId + i` (0n for all from a broker without ids); they share
   * the batch's receive time.
   *
   * @internal
   */
  deliverBatch(deliver: DeliverBatch): void {
    const batch = deliver.batch;
    if (batch === undefined) {
      return;
    }
    let sequence = deliver.firstSequence;
    let eventId = deliver.firstEventId;
    const step = eventId === 0n ? 0n : 1n;
    for (const payload of batch.payloads) {
      this.queue.put(
        new ReceivedEvent(
          batch.topic,
          batch.payloadType,
          payload,
          batch.correlation,
          sequence,
          this.subscriptionId,
          this.schema,
          eventId,
          deliver.receivedAtNs,
        ),
      );
      sequence += 1n;
      eventId += step;
    }
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
