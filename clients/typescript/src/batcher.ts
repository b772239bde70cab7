/**
 * Publish frames built by hand from cached fields, and the batcher that
 * gathers consecutive publishes into `PublishBatch` frames ([protocol §5],
 * "Batches"). Sans I/O: bytes in, bytes out; {@link Writer} decides when
 * they go to the socket.
 *
 * The bytes are exactly what `toBinary(FrameSchema, ...)` writes for the
 * same frame (fields in field-number order, empty strings left out), so
 * that they can be checked against the shared wire vectors. Mirrors
 * `daemoneye_eventbus/frames.py` (`publish_header`, `encode_publish`,
 * `PublishBatcher`).
 *
 * @module
 */

import { LimitExceeded, LocalProtocolError } from "./errors.js";
import { DELIVER_BATCH_OVERHEAD, DELIVER_OVERHEAD, encodeVarint } from "./protocol.js";

/** Consecutive publishes travel as one `PublishBatch` of up to this many bytes. */
export const BATCH_BYTES = 64 * 1024;
/** Events per batch when the broker announced no `max_queue_messages`. */
export const DEFAULT_BATCH_EVENTS = 1000;

// Field tags of Publish and PublishBatch, which number their fields alike:
// topic 1, correlation 2, payload type 3, payload(s) 4 (length-delimited).
const TAG_TOPIC = 0x0a;
const TAG_CORRELATION = 0x12;
const TAG_TYPE = 0x1a;
const TAG_PAYLOAD = 0x22;
const TAG_FRAME_PUBLISH = 0x1a; // Frame.publish = 3
const TAG_FRAME_PUBLISH_BATCH = 0x7a; // Frame.publish_batch = 15

const ENCODER = new TextEncoder();

/** The encoded topic and payload-type fields of a publish, computed once per topic. */
export interface PublishHeader {
  /** Identifies the (topic, payload type) pair: batches join on equal keys. */
  readonly key: string;
  /** `Publish.topic` with its tag and length; empty for an empty topic. */
  readonly topic: Uint8Array;
  /** `Publish.payload_type` with its tag and length; empty for an empty name. */
  readonly payloadType: Uint8Array;
}

function field(tag: number, value: Uint8Array): Uint8Array {
  const length = encodeVarint(value.length);
  const out = new Uint8Array(1 + length.length + value.length);
  out[0] = tag;
  out.set(length, 1);
  out.set(value, 1 + length.length);
  return out;
}

/** The header of publishes of `payloadType` on `topic`. */
export function publishHeader(topic: string, payloadType: string): PublishHeader {
  const t = ENCODER.encode(topic);
  const p = ENCODER.encode(payloadType);
  // proto3 leaves empty strings out of the encoding; so do we.
  return {
    key: `${topic}\u0000${payloadType}`,
    topic: t.length ? field(TAG_TOPIC, t) : new Uint8Array(0),
    payloadType: p.length ? field(TAG_TYPE, p) : new Uint8Array(0),
  };
}

function join(parts: readonly Uint8Array[], size?: number): Uint8Array {
  const total = size ?? parts.reduce((n, part) => n + part.length, 0);
  const out = new Uint8Array(total);
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

/** A length-prefixed `Frame` whose one field, of tag `tag`, holds `inner`. */
function frameAround(tag: number, inner: Uint8Array): Uint8Array {
  const innerPrefix = encodeVarint(inner.length);
  const body = 1 + innerPrefix.length + inner.length;
  const prefix = encodeVarint(body);
  const out = new Uint8Array(prefix.length + body);
  out.set(prefix, 0);
  out[prefix.length] = tag;
  out.set(innerPrefix, prefix.length + 1);
  out.set(inner, prefix.length + 1 + innerPrefix.length);
  return out;
}

/**
 * An encoded `Publish` message (without the frame around it).
 * `correlation` is a serialized `CorrelationMetadata`, or undefined for none.
 */
export function publishBody(
  header: PublishHeader,
  payload: Uint8Array,
  correlation?: Uint8Array,
): Uint8Array {
  const parts = [header.topic];
  if (correlation !== undefined) {
    parts.push(field(TAG_CORRELATION, correlation));
  }
  parts.push(header.payloadType);
  if (payload.length) {
    parts.push(field(TAG_PAYLOAD, payload)); // an empty bytes field is left out
  }
  return join(parts);
}

/**
 * The length-prefixed `Frame{publish}` of one event. Throws
 * {@link LimitExceeded} if the `Publish` would not leave room for the
 * `Deliver` envelope under `maxFrameBytes` [protocol §1, §5].
 */
export function encodePublish(
  header: PublishHeader,
  payload: Uint8Array,
  correlation: Uint8Array | undefined,
  maxFrameBytes: number,
): Uint8Array {
  const body = publishBody(header, payload, correlation);
  const limit = maxFrameBytes - DELIVER_OVERHEAD;
  if (body.length > limit) {
    throw new LimitExceeded(`event of ${body.length} bytes exceeds the limit of ${limit} bytes`);
  }
  return frameAround(TAG_FRAME_PUBLISH, body);
}

/** The largest encoded `PublishBatch` a broker delivers within `maxFrameBytes` [protocol §5]. */
export function batchBudget(maxFrameBytes: number): number {
  return maxFrameBytes - DELIVER_BATCH_OVERHEAD;
}

function payloadPrefix(length: number): Uint8Array {
  const varint = encodeVarint(length);
  const out = new Uint8Array(1 + varint.length);
  out[0] = TAG_PAYLOAD;
  out.set(varint, 1);
  return out;
}

function sameBytes(a: Uint8Array | undefined, b: Uint8Array | undefined): boolean {
  if (a === b) {
    return true;
  }
  if (a === undefined || b === undefined || a.length !== b.length) {
    return false;
  }
  for (let i = 0; i < a.length; i++) {
    if (a[i] !== b[i]) {
      return false;
    }
  }
  return true;
}

/** A sealed batch: its length-prefixed frame and how many events it carries. */
export interface SealedBatch {
  readonly frame: Uint8Array;
  readonly events: number;
}

/**
 * Gathers consecutive publishes into `PublishBatch` frames [protocol §5].
 *
 * Events join the open batch while they share its topic, payload type and
 * correlation (compared as encoded bytes), it stays within `target` bytes and
 * holds fewer than `maxEvents` events (the broker's `max_queue_messages`);
 * otherwise the open batch is sealed first. One event alone may use up to
 * `maxBody` bytes (the frame limit less the `DeliverBatch` envelope). The
 * caller queues the sealed frames, in order.
 */
export class PublishBatcher {
  readonly target: number;
  private header: PublishHeader | undefined;
  private correlation: Uint8Array | undefined;
  /** The open batch's fields: its header, then each payload's tag, length and bytes. */
  private parts: Uint8Array[] = [];
  private events = 0;
  private size = 0;

  constructor(
    /** The largest `PublishBatch` message: {@link batchBudget} of the frame limit. */
    readonly maxBody: number,
    target: number = BATCH_BYTES,
    /** Most events in one batch. */
    readonly maxEvents: number = DEFAULT_BATCH_EVENTS,
  ) {
    if (!Number.isInteger(maxEvents) || maxEvents < 1) {
      throw new RangeError("a batch must be allowed at least one event");
    }
    this.target = Math.min(target, maxBody);
  }

  /** Bytes of the open batch's message so far (0 when none is open). */
  get pendingBytes(): number {
    return this.size;
  }

  /** Events in the open batch. */
  get pendingEvents(): number {
    return this.events;
  }

  /**
   * Add one event. Returns the sealed batch the event could not join, if
   * any. Throws {@link LimitExceeded} for an event that cannot travel even
   * alone; nothing changes then.
   */
  add(
    header: PublishHeader,
    payload: Uint8Array,
    correlation?: Uint8Array,
  ): SealedBatch | undefined {
    const prefix = payloadPrefix(payload.length);
    const entry = prefix.length + payload.length;
    if (
      this.events > 0 &&
      header.key === this.header?.key &&
      sameBytes(correlation, this.correlation) &&
      this.size + entry <= this.target &&
      this.events < this.maxEvents
    ) {
      this.parts.push(prefix, payload);
      this.events += 1;
      this.size += entry;
      return undefined;
    }
    const [parts, size] = this.first(header, prefix, payload, correlation);
    const sealed = this.seal();
    this.parts = parts;
    this.header = header;
    this.correlation = correlation;
    this.events = 1;
    this.size = size;
    return sealed;
  }

  /**
   * One event as a `PublishBatch` frame of its own, while no batch is open:
   * for an event that leaves at once. The same limit as {@link add}.
   */
  single(header: PublishHeader, payload: Uint8Array, correlation?: Uint8Array): Uint8Array {
    if (this.events > 0) {
      throw new LocalProtocolError("a batch is open: add() the event or seal() first");
    }
    const [parts, size] = this.first(header, payloadPrefix(payload.length), payload, correlation);
    return frameAround(TAG_FRAME_PUBLISH_BATCH, join(parts, size));
  }

  private first(
    header: PublishHeader,
    prefix: Uint8Array,
    payload: Uint8Array,
    correlation: Uint8Array | undefined,
  ): [Uint8Array[], number] {
    const parts =
      correlation === undefined
        ? [header.topic, header.payloadType, prefix, payload]
        : [header.topic, field(TAG_CORRELATION, correlation), header.payloadType, prefix, payload];
    const size = parts.reduce((n, part) => n + part.length, 0);
    if (size > this.maxBody) {
      throw new LimitExceeded(
        `event of about ${size} bytes exceeds the limit of ${this.maxBody} bytes`,
      );
    }
    return [parts, size];
  }

  /** The open batch as a frame, and its event count; undefined if none is open. */
  seal(): SealedBatch | undefined {
    const events = this.events;
    if (events === 0) {
      return undefined;
    }
    const frame = frameAround(TAG_FRAME_PUBLISH_BATCH, join(this.parts, this.size));
    this.discard();
    return { frame, events };
  }

  /** Forget the open batch (its connection is gone). */
  discard(): void {
    this.parts = [];
    this.events = 0;
    this.size = 0;
    this.header = undefined;
    this.correlation = undefined;
  }
}
