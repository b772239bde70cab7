/**
 * Correlation metadata helpers and bounds ([protocol §4, §5],
 * `correlation.proto`), mirroring `daemoneye_eventbus.correlation`. Every
 * helper returns a new message and validates it, throwing
 * {@link InvalidCorrelation} instead of truncating.
 *
 * @module
 */

import { randomUUID } from "node:crypto";

import { clone, create } from "@bufbuild/protobuf";
import { timestampNow } from "@bufbuild/protobuf/wkt";

import {
  CorrelationMetadataSchema,
  type CorrelationFilter,
  type CorrelationMetadata,
} from "./gen/daemoneye/eventbus/v1/correlation_pb.js";
import { InvalidCorrelation } from "./errors.js";

/** Largest correlation, parent or root id, in UTF-8 bytes. */
export const MAX_ID_BYTES = 256;
/** Largest workflow stage, in UTF-8 bytes. */
export const MAX_STAGE_BYTES = 128;
/** Most tags on one metadata, and most entries in each tag map of a filter. */
export const MAX_TAGS = 64;
/** Largest tag key, in UTF-8 bytes. */
export const MAX_TAG_KEY_BYTES = 128;
/** Largest tag value, in UTF-8 bytes. */
export const MAX_TAG_VALUE_BYTES = 1024;
/** Most entries in each repeated field of a filter. */
export const MAX_FILTER_ENTRIES = 64;
/** Largest correlation id pattern, in UTF-8 bytes. */
export const MAX_PATTERN_BYTES = 256;

function show(value: string): string {
  return JSON.stringify(value.length > 40 ? value.slice(0, 40) + "..." : value);
}

function checkStr(value: string, what: string, limit: number, allowEmpty = false): void {
  if (value === "") {
    if (allowEmpty) {
      return;
    }
    throw new InvalidCorrelation(`${what} is empty`);
  }
  if (!value.isWellFormed()) {
    throw new InvalidCorrelation(`${what} is not valid UTF-8`);
  }
  const size = Buffer.byteLength(value, "utf8");
  if (size > limit) {
    throw new InvalidCorrelation(`${what} is ${size} bytes, the limit is ${limit}`);
  }
}

function checkTags(tags: Readonly<Record<string, string>>, what: string): void {
  const entries = Object.entries(tags);
  if (entries.length > MAX_TAGS) {
    throw new InvalidCorrelation(`${what} has ${entries.length} entries, the limit is ${MAX_TAGS}`);
  }
  for (const [key, value] of entries) {
    checkStr(key, `${what} key ${show(key)}`, MAX_TAG_KEY_BYTES);
    checkStr(value, `${what} value for key ${show(key)}`, MAX_TAG_VALUE_BYTES, true);
  }
}

/** Throw {@link InvalidCorrelation} unless `meta` is within the bounds [protocol §5]. */
export function validateMetadata(meta: CorrelationMetadata): void {
  checkStr(meta.correlationId, "correlation_id", MAX_ID_BYTES);
  checkStr(meta.rootCorrelationId, "root_correlation_id", MAX_ID_BYTES);
  if (meta.parentCorrelationId !== undefined) {
    checkStr(meta.parentCorrelationId, "parent_correlation_id", MAX_ID_BYTES);
  }
  if (meta.workflowStage !== undefined) {
    checkStr(meta.workflowStage, "workflow_stage", MAX_STAGE_BYTES);
  }
  checkTags(meta.tags, "tag");
}

function checkList(values: readonly string[], what: string, limit: number): void {
  if (values.length > MAX_FILTER_ENTRIES) {
    throw new InvalidCorrelation(
      `${what} has ${values.length} entries, the limit is ${MAX_FILTER_ENTRIES}`,
    );
  }
  values.forEach((value, i) => checkStr(value, `${what}[${i}]`, limit));
}

/** Throw {@link InvalidCorrelation} unless `filter` is within the bounds [protocol §4]. */
export function validateCorrelationFilter(filter: CorrelationFilter): void {
  checkList(filter.correlationIds, "correlation_ids", MAX_ID_BYTES);
  checkList(filter.correlationIdPatterns, "correlation_id_patterns", MAX_PATTERN_BYTES);
  checkList(filter.parentCorrelationIds, "parent_correlation_ids", MAX_ID_BYTES);
  checkList(filter.rootCorrelationIds, "root_correlation_ids", MAX_ID_BYTES);
  checkList(filter.workflowStages, "workflow_stages", MAX_STAGE_BYTES);
  checkTags(filter.requiredTags, "required_tags");
  checkTags(filter.anyTags, "any_tags");
  const range = filter.sequenceRange;
  if (range !== undefined && range.min > range.max) {
    throw new InvalidCorrelation(
      `sequence_range min ${range.min} is greater than its max ${range.max}`,
    );
  }
}

/**
 * Metadata for the first step of a workflow: the id is `correlationId` (a
 * fresh UUID if omitted), the root id is the id itself, no parent, sequence
 * number 0, `createdAt` now.
 */
export function newCorrelation(correlationId?: string): CorrelationMetadata {
  const id = correlationId ?? randomUUID();
  const meta = create(CorrelationMetadataSchema, {
    correlationId: id,
    rootCorrelationId: id,
    createdAt: timestampNow(),
  });
  validateMetadata(meta);
  return meta;
}

/** Metadata for a step caused by `parent`: same root, stage and tags; parent = `parent`. */
export function createChild(parent: CorrelationMetadata, childId?: string): CorrelationMetadata {
  validateMetadata(parent);
  const id = childId ?? randomUUID();
  if (id === parent.correlationId) {
    throw new InvalidCorrelation(`child correlation_id ${show(id)} is the parent's own id`);
  }
  const out = clone(CorrelationMetadataSchema, parent);
  out.correlationId = id;
  out.parentCorrelationId = parent.correlationId;
  out.sequenceNumber = 0n;
  out.createdAt = timestampNow();
  validateMetadata(out);
  return out;
}

/** A copy of `meta` whose `workflowStage` is `stage`. */
export function withStage(meta: CorrelationMetadata, stage: string): CorrelationMetadata {
  const out = clone(CorrelationMetadataSchema, meta);
  out.workflowStage = stage;
  validateMetadata(out);
  return out;
}

/** A copy of `meta` with every tag of `tags` set, replacing previous values. */
export function withTags(
  meta: CorrelationMetadata,
  tags: Readonly<Record<string, string>>,
): CorrelationMetadata {
  const out = clone(CorrelationMetadataSchema, meta);
  Object.assign(out.tags, tags);
  validateMetadata(out);
  return out;
}
