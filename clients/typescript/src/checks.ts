/**
 * What the application hands the client, checked before anything is sent: a
 * typed message against its topic's payload type, correlation metadata and
 * filters against their bounds (made into messages from their
 * initializers), and a request's timeout against the broker's limits.
 * Shared by the publishes, requests and subscriptions of `Client` and the
 * last will of the handshake.
 *
 * @module
 */

import { create, toBinary, type DescMessage, type MessageShape } from "@bufbuild/protobuf";

import {
  CorrelationFilterSchema,
  CorrelationMetadataSchema,
  type CorrelationFilter,
  type CorrelationMetadata,
} from "./gen/daemoneye/eventbus/v1/correlation_pb.js";
import type { Limits } from "./gen/daemoneye/eventbus/v1/frames_pb.js";
import type { Topic } from "./gen/daemoneye/eventbus/v1/registry.js";
import { validateCorrelationFilter, validateMetadata } from "./correlation.js";
import { PayloadTypeMismatch } from "./errors.js";
import type { CorrelationFilterInit, CorrelationMetadataInit } from "./options.js";

/** The longest request deadline without the broker's word on it (protocol §10), in ms. */
const MAX_REQUEST_TIMEOUT_MS = 300_000;

/** The payload type of `topic` once `message` is checked to be of it. */
export function payloadTypeOf<Desc extends DescMessage>(
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

/** Correlation metadata as a message, checked against its bounds; undefined for none. */
export function correlationMetadata(
  init: CorrelationMetadataInit | undefined,
): CorrelationMetadata | undefined {
  if (init === undefined) {
    return undefined;
  }
  const correlation = create(CorrelationMetadataSchema, init);
  validateMetadata(correlation);
  return correlation;
}

/** {@link correlationMetadata}, serialized. */
export function correlationBytes(
  init: CorrelationMetadataInit | undefined,
): Uint8Array | undefined {
  const correlation = correlationMetadata(init);
  return correlation === undefined ? undefined : toBinary(CorrelationMetadataSchema, correlation);
}

/** A correlation filter as a message, checked against its bounds; undefined for none. */
export function correlationFilter(
  init: CorrelationFilterInit | undefined,
): CorrelationFilter | undefined {
  if (init === undefined) {
    return undefined;
  }
  const filter = create(CorrelationFilterSchema, init);
  validateCorrelationFilter(filter);
  return filter;
}

/**
 * The deadline of a request, in ms: what was asked, or the broker's default
 * (from its `limits`; `fallbackMs` if it announced none), at most its maximum.
 */
export function requestDeadline(
  asked: number | undefined,
  limits: Limits | undefined,
  fallbackMs: number,
): number {
  const ms = asked ?? (limits?.defaultRequestTimeoutMs || fallbackMs);
  if (!(ms > 0) || !Number.isFinite(ms)) {
    throw new RangeError(`a request timeout must be a positive number of ms, got ${ms}`);
  }
  return Math.min(Math.ceil(ms), limits?.maxRequestTimeoutMs || MAX_REQUEST_TIMEOUT_MS);
}
