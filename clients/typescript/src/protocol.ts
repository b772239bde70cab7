/**
 * The wire protocol, sans I/O ([protocol §1, §2]): bytes in, frames out;
 * frames in, bytes out. {@link ClientConnection} keeps the state of the
 * client end of one connection and never touches a socket.
 *
 * Framing: each frame is one serialized `Frame` message preceded by its
 * length as a protobuf varint (1 to 5 bytes). The declared length is checked
 * against the limit in force as soon as the prefix is complete, before any
 * byte of the body is kept.
 *
 * @module
 */

import { create, fromBinary, toBinary, type MessageInitShape } from "@bufbuild/protobuf";

import { ErrorCode, FrameSchema, type Frame } from "./gen/daemoneye/eventbus/v1/frames_pb.js";
import { LocalProtocolError, RemoteProtocolError } from "./errors.js";

/** The protocol version this client speaks [protocol §3]. */
export const PROTOCOL_VERSION = 1;
/** Default limit on a frame body, in bytes [protocol §1]. */
export const DEFAULT_MAX_FRAME_BYTES = 1 << 20;
/** Limit on a frame body before the handshake completes [protocol §1]. */
export const HANDSHAKE_MAX_FRAME_BYTES = 4096;
/** A length prefix is at most 5 bytes. */
export const MAX_PREFIX_BYTES = 5;
/** Room a `Publish` must leave for the `Deliver` envelope [protocol §1, §5]. */
export const DELIVER_OVERHEAD = 51;

/** The name of a `Frame.kind` member, e.g. `"subscribe_ack"` is `"subscribeAck"`. */
export type FrameKind = NonNullable<Frame["kind"]["case"]>;

/** Connection states [protocol §2]. */
export type State = "connecting" | "open" | "closing" | "closed";

const CLIENT_SENDS: Readonly<Record<"connecting" | "open", ReadonlySet<FrameKind>>> = {
  connecting: new Set<FrameKind>(["hello", "goodbye"]),
  open: new Set<FrameKind>([
    "publish",
    "subscribe",
    "unsubscribe",
    "ping",
    "pong",
    "error",
    "goodbye",
    "statsRequest",
    "credit",
  ]),
};

const CLIENT_RECEIVES: Readonly<Record<"connecting" | "open", ReadonlySet<FrameKind>>> = {
  connecting: new Set<FrameKind>(["welcome", "error"]),
  open: new Set<FrameKind>([
    "deliver",
    "deliverBatch",
    "subscribeAck",
    "unsubscribeAck",
    "ping",
    "pong",
    "error",
    "goodbye",
    "statsResponse",
  ]),
};

/** The largest `uint32`: the bound of `Subscribe.window` and of `Credit.events`. */
export const MAX_UINT32 = 0xffff_ffff;

/**
 * Events a credit-based subscription takes before it grants them back in one
 * `Credit` frame: a quarter of the window `SubscribeAck` announced, at least 1.
 */
export function creditThreshold(window: number): number {
  return Math.max(1, Math.floor(window / 4));
}

/**
 * The credit bookkeeping of one credit-based subscription (a `SubscribeAck`
 * with a window), sans I/O.
 *
 * The broker sends at most `window` events (plus the rest of one batch)
 * beyond what the client has granted back. The client counts the events the
 * application has taken from the subscription (not those merely received)
 * and grants them back with a `Credit` frame as soon as they reach
 * {@link threshold}; the count then starts again. A new `SubscribeAck` (after
 * a resubscription) means a new counter: the window starts afresh.
 */
export class CreditCounter {
  /** Events taken since the last grant. */
  private taken = 0;
  /** Events granted back so far, in total. */
  granted = 0;
  /** Grants (`Credit` frames) so far. */
  grants = 0;
  /** Events taken before a grant is due: {@link creditThreshold} of the window. */
  readonly threshold: number;

  /** `window`: `SubscribeAck.window`, greater than 0. */
  constructor(readonly window: number) {
    if (!Number.isInteger(window) || window < 1 || window > MAX_UINT32) {
      throw new RangeError(
        `a credit window must be an integer from 1 to ${MAX_UINT32}, got ${window}`,
      );
    }
    this.threshold = creditThreshold(window);
  }

  /** Events taken and not yet granted back. */
  get pending(): number {
    return this.taken;
  }

  /**
   * The application took one event: the number of events to grant back now
   * in a `Credit` frame (the count since the last grant), or 0 if none is due.
   */
  take(): number {
    this.taken += 1;
    if (this.taken < this.threshold) {
      return 0;
    }
    const events = this.taken;
    this.taken = 0;
    this.granted += events;
    this.grants += 1;
    return events;
  }
}

/** Encode a non-negative integer (at most 2^53 - 1) as a protobuf varint. */
export function encodeVarint(value: number): Uint8Array {
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new RangeError(`a varint must be a non-negative safe integer, got ${value}`);
  }
  const out: number[] = [];
  while (value > 0x7f) {
    out.push((value % 0x80) | 0x80);
    value = Math.floor(value / 0x80);
  }
  out.push(value);
  return Uint8Array.from(out);
}

/**
 * Decode a length prefix at `pos`: `[value, nextPos]`, or undefined if incomplete.
 *
 * Throws {@link RemoteProtocolError} (`FRAME_TOO_LARGE`) as soon as a 5th
 * byte still has its continuation bit [protocol §1].
 */
export function decodeLengthPrefix(data: Uint8Array, pos = 0): [number, number] | undefined {
  let value = 0;
  let scale = 1;
  for (let i = 0; pos + i < data.length; i++) {
    const byte = data[pos + i] ?? 0;
    value += (byte & 0x7f) * scale;
    if ((byte & 0x80) === 0) {
      return [value, pos + i + 1];
    }
    scale *= 0x80;
    if (i + 1 >= MAX_PREFIX_BYTES) {
      throw new RemoteProtocolError(`length prefix longer than ${MAX_PREFIX_BYTES} bytes`, {
        code: ErrorCode.FRAME_TOO_LARGE,
      });
    }
  }
  return undefined;
}

function concat(parts: readonly Uint8Array[], size: number): Uint8Array {
  if (parts.length === 1 && parts[0] !== undefined) {
    return parts[0];
  }
  const out = new Uint8Array(size);
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

/** A length prefix followed by `body`. */
export function delimit(body: Uint8Array): Uint8Array {
  const prefix = encodeVarint(body.length);
  const out = new Uint8Array(prefix.length + body.length);
  out.set(prefix, 0);
  out.set(body, prefix.length);
  return out;
}

const TAG_FRAME_PUBLISH = 0x1a; // Frame.publish = 3, length-delimited

/**
 * The body of `Frame{publish}` around an encoded `Publish` message, without
 * building the frame: the same bytes as `toBinary(FrameSchema, ...)`.
 */
export function publishFrameBody(publish: Uint8Array): Uint8Array {
  const length = encodeVarint(publish.length);
  const body = new Uint8Array(1 + length.length + publish.length);
  body[0] = TAG_FRAME_PUBLISH;
  body.set(length, 1);
  body.set(publish, 1 + length.length);
  return body;
}

/** Serialize `frame` with its length prefix [protocol §1]. */
export function encodeFrame(frame: Frame): Uint8Array {
  return delimit(toBinary(FrameSchema, frame));
}

/** The `kind` of a frame as an initializer, e.g. `{ case: "ping", value: { nonce: 1n } }`. */
export type FrameInit = NonNullable<MessageInitShape<typeof FrameSchema>["kind"]>;

/** A `Frame` of the given kind: `frame({ case: "ping", value: { nonce: 1n } })`. */
export function frame(kind: FrameInit): Frame {
  return create(FrameSchema, { kind });
}

/**
 * Parse one frame body [protocol §1]: a decodable `Frame` that sets a kind.
 * Throws {@link RemoteProtocolError} (`MALFORMED_FRAME`) otherwise.
 */
export function decodeFrameBody(body: Uint8Array): Frame {
  let decoded: Frame;
  try {
    decoded = fromBinary(FrameSchema, body);
  } catch (err) {
    throw new RemoteProtocolError(`undecodable frame: ${String(err)}`, {
      code: ErrorCode.MALFORMED_FRAME,
      cause: err,
    });
  }
  if (decoded.kind.case === undefined) {
    throw new RemoteProtocolError("frame sets no known kind", { code: ErrorCode.MALFORMED_FRAME });
  }
  return decoded;
}

/**
 * The client end of a connection, as a state machine with an input buffer.
 *
 * `receiveData` returns the frames parsed from what was read. A protocol
 * violation by the broker moves to `closing` and is kept in {@link error};
 * the frames parsed before it are still returned, everything after it is
 * discarded. `send` returns the bytes to write.
 */
export class ClientConnection {
  state: State = "connecting";
  /** The limit once open; set it from `Welcome.limits.max_frame_bytes`. */
  maxFrameBytes = DEFAULT_MAX_FRAME_BYTES;
  readonly handshakeMaxFrameBytes: number;
  /** The broker's protocol violation, once there was one. */
  error: RemoteProtocolError | undefined;
  private parts: Uint8Array[] = [];
  private buffered = 0;
  private bodyLength: number | undefined;

  constructor(handshakeMaxFrameBytes = HANDSHAKE_MAX_FRAME_BYTES) {
    this.handshakeMaxFrameBytes = handshakeMaxFrameBytes;
  }

  /** True once the socket should be closed after writing what is pending. */
  get closeExpected(): boolean {
    return this.state === "closing" || this.state === "closed";
  }

  /** The frame size limit in force now [protocol §1]. */
  get frameLimit(): number {
    return this.state === "connecting" ? this.handshakeMaxFrameBytes : this.maxFrameBytes;
  }

  /** Bytes of an incomplete frame held in memory. */
  get bufferedInput(): number {
    return this.buffered;
  }

  /** Feed bytes read from the broker; return the whole frames they complete, in order. */
  receiveData(data: Uint8Array): Frame[] {
    if (this.closeExpected || data.length === 0) {
      return [];
    }
    this.parts.push(data);
    this.buffered += data.length;
    if (this.bodyLength !== undefined && this.buffered < this.bodyLength) {
      return []; // still inside one body: do not copy anything yet
    }
    const buf = concat(this.parts, this.buffered);
    const frames: Frame[] = [];
    let pos = 0;
    try {
      for (;;) {
        if (this.bodyLength === undefined) {
          const prefix = decodeLengthPrefix(buf, pos);
          if (prefix === undefined) {
            break;
          }
          const [length, next] = prefix;
          this.checkLength(length);
          this.bodyLength = length;
          pos = next;
        }
        const end = pos + this.bodyLength;
        if (end > buf.length) {
          break;
        }
        this.bodyLength = undefined;
        frames.push(this.receiveFrame(buf.subarray(pos, end)));
        pos = end;
        if (this.closeExpected) {
          break;
        }
      }
    } catch (err) {
      if (!(err instanceof RemoteProtocolError)) {
        throw err;
      }
      this.fail(err);
      return frames;
    }
    if (this.closeExpected) {
      this.clearInput(); // after a goodbye or a fatal error nothing more is read
    } else {
      const rest = buf.subarray(pos);
      this.parts = rest.length ? [rest] : [];
      this.buffered = rest.length;
    }
    return frames;
  }

  private checkLength(length: number): void {
    const limit = this.frameLimit;
    if (length > limit) {
      throw new RemoteProtocolError(
        `frame of ${length} bytes exceeds the limit of ${limit} bytes`,
        {
          code: ErrorCode.FRAME_TOO_LARGE,
        },
      );
    }
    if (length === 0) {
      throw new RemoteProtocolError("empty frame: a frame must set exactly one kind", {
        code: ErrorCode.MALFORMED_FRAME,
      });
    }
  }

  private receiveFrame(body: Uint8Array): Frame {
    const decoded = decodeFrameBody(body);
    const kind = decoded.kind.case as FrameKind;
    const legal = this.state === "open" ? CLIENT_RECEIVES.open : CLIENT_RECEIVES.connecting;
    if (!legal.has(kind)) {
      throw new RemoteProtocolError(`${kind} frame not allowed while ${this.state}`, {
        code: ErrorCode.UNEXPECTED_FRAME,
      });
    }
    if (decoded.kind.case === "welcome") {
      this.state = "open";
    } else if (
      decoded.kind.case === "goodbye" ||
      (decoded.kind.case === "error" && decoded.kind.value.fatal)
    ) {
      this.state = "closing";
    }
    return decoded;
  }

  private clearInput(): void {
    this.parts = [];
    this.buffered = 0;
    this.bodyLength = undefined;
  }

  /** The broker closed its side, or the socket is gone. */
  receiveEof(): void {
    this.clearInput();
    this.state = "closed";
  }

  /** Record the broker's violation and start closing. */
  fail(err: RemoteProtocolError): void {
    if (this.closeExpected) {
      return;
    }
    this.error = err;
    this.clearInput();
    this.state = "closing";
  }

  /** Whether a frame of `kind` may be sent now. */
  maySend(kind: FrameKind): boolean {
    if (this.state === "connecting") {
      return CLIENT_SENDS.connecting.has(kind);
    }
    return this.state === "open" && CLIENT_SENDS.open.has(kind);
  }

  /**
   * The bytes of `frame`, prefix included; throws {@link LocalProtocolError}
   * if it may not be sent now or is over the frame limit.
   */
  send(value: Frame): Uint8Array {
    const kind = value.kind.case;
    if (kind === undefined) {
      throw new LocalProtocolError("cannot send a frame that sets no kind");
    }
    const data = this.encoded(kind, toBinary(FrameSchema, value));
    if (kind === "goodbye" || (kind === "error" && value.kind.value.fatal)) {
      this.state = "closing";
    }
    return data;
  }

  /** The bytes of an already serialized frame body of `kind` (checked like {@link send}). */
  encoded(kind: FrameKind, body: Uint8Array): Uint8Array {
    if (!this.maySend(kind)) {
      throw new LocalProtocolError(`cannot send a ${kind} frame while ${this.state}`);
    }
    if (body.length > this.maxFrameBytes) {
      throw new LocalProtocolError(
        `${kind} frame of ${body.length} bytes exceeds the limit of ${this.maxFrameBytes} bytes`,
      );
    }
    return delimit(body);
  }

  /** The socket is closed: no more frames either way. */
  close(): void {
    this.clearInput();
    this.state = "closed";
  }
}
