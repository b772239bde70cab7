/**
 * Errors thrown by the client, mirroring `daemoneye_eventbus.errors`:
 *
 * ```
 * EventBusError
 * ├── InvalidTopic            a topic or filter breaks the grammar (INVALID_TOPIC, _FILTER)
 * ├── InvalidCorrelation      correlation metadata or filter out of bounds
 * ├── PayloadTypeMismatch     a message of the wrong type for a topic
 * ├── InvalidPayload          a payload that does not parse as its type (INVALID_PAYLOAD)
 * ├── AccessDenied            the broker refused the peer (ACCESS_DENIED)
 * ├── LimitExceeded           a limit was reached (LIMIT_EXCEEDED, FRAME_TOO_LARGE, ...)
 * ├── UnknownSubscription     UNKNOWN_SUBSCRIPTION, INVALID_SUBSCRIPTION_ID
 * ├── ProtocolError           the wire protocol was broken
 * │   ├── LocalProtocolError  ... by us (a bug or misuse)
 * │   └── RemoteProtocolError ... by the broker; closes the connection
 * ├── ConnectionClosed        the connection is gone
 * │   ├── ClosedResourceError ... because we closed it
 * │   └── BrokenResourceError ... because the broker did, or it broke
 * │       └── ConnectionLost  ... while in use: goodbye, fatal error, end of stream
 * ├── ServerError             any other Error frame from the broker
 * ├── RequestTimeout          an answer did not come in time (REQUEST_TIMEOUT)
 * ├── NoResponders            no responder may answer a request (NO_RESPONDERS)
 * ├── RequestFailed           the responder answered a request with an error
 * └── UnknownRequest          a reply named a request the broker no longer holds
 * ```
 *
 * An error built from an `Error` frame of the broker carries its `code`,
 * `fatal`, `subscriptionId`, `topic` and `requestId` ([protocol §7]); a local
 * error has `code === undefined`, except {@link InvalidPayload}, which always
 * carries `ErrorCode.INVALID_PAYLOAD`.
 *
 * @module
 */

import { ErrorCode, type Error as ErrorFrame } from "./gen/daemoneye/eventbus/v1/frames_pb.js";

/** Where an error came from, when the broker sent it. */
export interface ErrorDetails {
  /** The `ErrorCode` of the broker's `Error` frame. */
  code?: ErrorCode | undefined;
  /** Whether the broker closes the connection after the error. */
  fatal?: boolean | undefined;
  /** The subscription the error concerns, 0 if none. */
  subscriptionId?: number | undefined;
  /** The topic or filter the error concerns, "" if none. */
  topic?: string | undefined;
  /** The request the error concerns (`Request.request_id`), 0n if none. */
  requestId?: bigint | undefined;
  /** The underlying error. */
  cause?: unknown;
}

/** Base class of every error the client throws on purpose. */
export class EventBusError extends Error {
  /** The broker's error code; undefined for an error raised locally. */
  readonly code: ErrorCode | undefined;
  /** Whether the broker closed the connection with this error. */
  readonly fatal: boolean;
  /** The subscription concerned, 0 if none. */
  readonly subscriptionId: number;
  /** The topic or filter concerned, "" if none. */
  readonly topic: string;
  /** The request concerned (`Request.request_id`), 0n if none. */
  readonly requestId: bigint;

  constructor(message: string, details: ErrorDetails = {}) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.name = new.target.name;
    this.code = details.code;
    this.fatal = details.fatal ?? false;
    this.subscriptionId = details.subscriptionId ?? 0;
    this.topic = details.topic ?? "";
    this.requestId = details.requestId ?? 0n;
  }

  /** The name of `code` without its prefix, e.g. `ACCESS_DENIED`; undefined if local. */
  get codeName(): string | undefined {
    return this.code === undefined ? undefined : errorCodeName(this.code);
  }
}

/** A topic or topic filter breaks the grammar. */
export class InvalidTopic extends EventBusError {}
/** Correlation metadata or a correlation filter is out of bounds. */
export class InvalidCorrelation extends EventBusError {}
/** A message is not of the payload type declared for the topic. */
export class PayloadTypeMismatch extends EventBusError {}

/** What an {@link InvalidPayload} says about the event, besides {@link ErrorDetails}. */
export interface InvalidPayloadDetails extends ErrorDetails {
  /** Fully qualified name of the payload type the payload did not parse as. */
  payloadType?: string | undefined;
  /** The event's sequence number on its subscription, 0n if none. */
  sequence?: bigint | undefined;
}

/**
 * A payload does not parse as the payload type its topic declares.
 *
 * The broker refuses such a publish with a non-fatal `Error` frame
 * (`ERROR_CODE_INVALID_PAYLOAD`, passed to `Client.onError`; its `topic` is
 * set, `payloadType` is "" and `sequence` 0n). Behind a broker with validation
 * off, `ReceivedEvent.message()` throws it for an event that does not decode,
 * with the event's `topic`, `payloadType` and `sequence`. `code` is always
 * `ErrorCode.INVALID_PAYLOAD`.
 */
export class InvalidPayload extends EventBusError {
  /** Fully qualified name of the payload type, "" if unknown. */
  readonly payloadType: string;
  /** The event's sequence number on its subscription, 0n if none. */
  readonly sequence: bigint;

  constructor(message: string, details: InvalidPayloadDetails = {}) {
    super(message, { ...details, code: ErrorCode.INVALID_PAYLOAD });
    this.payloadType = details.payloadType ?? "";
    this.sequence = details.sequence ?? 0n;
  }
}

/** The broker refused what this peer asked for. */
export class AccessDenied extends EventBusError {}
/** A limit was reached (subscriptions, frame size, connections, buffered output). */
export class LimitExceeded extends EventBusError {}
/** No active subscription has that id, or the id is invalid or taken. */
export class UnknownSubscription extends EventBusError {}
/** The wire protocol was broken. */
export class ProtocolError extends EventBusError {}
/** We tried to do something the protocol forbids. */
export class LocalProtocolError extends ProtocolError {}
/** The broker sent something the protocol forbids; `code` is what we answer with. */
export class RemoteProtocolError extends ProtocolError {}
/** The connection is closed; nothing more can be sent or received. */
export class ConnectionClosed extends EventBusError {}
/** The connection was closed by this side. */
export class ClosedResourceError extends ConnectionClosed {}
/** The connection was closed by the broker, or broken. */
export class BrokenResourceError extends ConnectionClosed {}

/** What a {@link ConnectionLost} says about the end, besides {@link ErrorDetails}. */
export interface ConnectionLostDetails extends ErrorDetails {
  /** The broker said goodbye (it shuts down) before closing. */
  goodbye?: boolean | undefined;
}

/**
 * The connection ended while the client used it, not by its own
 * {@link ClosedResourceError | close}: the broker said goodbye (it shuts
 * down), sent a fatal error (`code`, `fatal`), broke the protocol, or the
 * stream ended. Subscriptions, acknowledgements and requests waiting on the
 * connection fail with it. A client with `reconnect` keeps its subscriptions
 * and reconnects; without it, the client is closed.
 */
export class ConnectionLost extends BrokenResourceError {
  /** The broker said goodbye first: an orderly shutdown [protocol §8]. */
  readonly goodbye: boolean;

  constructor(message: string, details: ConnectionLostDetails = {}) {
    super(message, details);
    this.goodbye = details.goodbye ?? false;
  }
}

/** The broker refused a request with an error code that has no class of its own. */
export class ServerError extends EventBusError {}
/**
 * An answer did not arrive in time: an acknowledgement of the broker, or the
 * reply to a request (`code` `REQUEST_TIMEOUT` when the broker said so,
 * undefined when the client's own deadline passed first).
 */
export class RequestTimeout extends EventBusError {}
/** No responder may answer the request: none serves its topic, or none may read it. */
export class NoResponders extends EventBusError {}

/** What a {@link RequestFailed} says, besides {@link ErrorDetails}. */
export interface RequestFailedDetails extends ErrorDetails {
  /** The responder's reason (`ReplyDeliver.error`). */
  reason?: string | undefined;
  /** The component that answered, "" if anonymous. */
  responder?: string | undefined;
}

/** The responder could not answer the request: `reason` says why. */
export class RequestFailed extends EventBusError {
  /** The responder's reason, as it gave it. */
  readonly reason: string;
  /** The component that answered; "" if anonymous. */
  readonly responder: string;

  constructor(message: string, details: RequestFailedDetails = {}) {
    super(message, details);
    this.reason = details.reason ?? "";
    this.responder = details.responder ?? "";
  }
}

/** A reply named a request the broker does not hold (answered, expired, or not this connection's). */
export class UnknownRequest extends EventBusError {}

type ErrorClass = new (message: string, details?: ErrorDetails) => EventBusError;

const BY_CODE: ReadonlyMap<ErrorCode, ErrorClass> = new Map<ErrorCode, ErrorClass>([
  [ErrorCode.INVALID_TOPIC, InvalidTopic],
  [ErrorCode.INVALID_FILTER, InvalidTopic],
  [ErrorCode.INVALID_CORRELATION, InvalidCorrelation],
  [ErrorCode.ACCESS_DENIED, AccessDenied],
  [ErrorCode.LIMIT_EXCEEDED, LimitExceeded],
  [ErrorCode.CONNECTION_LIMIT, LimitExceeded],
  [ErrorCode.FRAME_TOO_LARGE, LimitExceeded],
  [ErrorCode.PAYLOAD_MISMATCH, PayloadTypeMismatch],
  [ErrorCode.INVALID_PAYLOAD, InvalidPayload],
  [ErrorCode.UNKNOWN_SUBSCRIPTION, UnknownSubscription],
  [ErrorCode.INVALID_SUBSCRIPTION_ID, UnknownSubscription],
  [ErrorCode.NO_RESPONDERS, NoResponders],
  [ErrorCode.REQUEST_TIMEOUT, RequestTimeout],
  [ErrorCode.UNKNOWN_REQUEST, UnknownRequest],
]);

/** `ERROR_CODE_ACCESS_DENIED` -> `ACCESS_DENIED`; unknown codes as their number. */
export function errorCodeName(code: number): string {
  const name: unknown = (ErrorCode as unknown as Record<number, unknown>)[code];
  return typeof name === "string" ? name : String(code);
}

/** The typed error for an error code [protocol §7]; `ServerError` by default. */
export function errorForCode(
  code: number,
  message: string,
  details: ErrorDetails = {},
): EventBusError {
  const cls = BY_CODE.get(code) ?? ServerError;
  return new cls(message, { ...details, code });
}

/** The typed error for an `Error` frame from the broker. */
export function errorFromFrame(frame: ErrorFrame): EventBusError {
  return errorForCode(frame.code, `${frame.message} (${errorCodeName(frame.code)})`, {
    fatal: frame.fatal,
    subscriptionId: frame.subscriptionId,
    topic: frame.topic,
    requestId: frame.requestId,
  });
}
