/**
 * The topic grammar [protocol §4]: levels of `[A-Za-z0-9_-]+` separated by
 * `.`; in a filter a level may also be `+` (one level) or, last, `#` (zero or
 * more levels). Mirrors `daemoneye_eventbus.topics`.
 *
 * @module
 */

import { InvalidTopic } from "./errors.js";

/** Default limit on a topic or filter, in UTF-8 bytes. */
export const DEFAULT_MAX_TOPIC_BYTES = 255;
/** Default limit on the levels of a topic or filter. */
export const DEFAULT_MAX_TOPIC_LEVELS = 16;

/** Limits on topics and filters, as announced in `Welcome.limits`. */
export interface TopicLimits {
  maxBytes?: number | undefined;
  maxLevels?: number | undefined;
}

const LEVEL = /^[A-Za-z0-9_-]+$/;
const LEVEL_CHAR = /[A-Za-z0-9_-]/;

function checkLimits(kind: string, text: unknown, limits: TopicLimits): string {
  const maxBytes = limits.maxBytes || DEFAULT_MAX_TOPIC_BYTES;
  const maxLevels = limits.maxLevels || DEFAULT_MAX_TOPIC_LEVELS;
  if (typeof text !== "string") {
    throw new InvalidTopic(`${kind} must be a string, not ${typeof text}`);
  }
  if (text.length === 0) {
    throw new InvalidTopic(`${kind} is empty`);
  }
  const bytes = Buffer.byteLength(text, "utf8");
  if (bytes > maxBytes) {
    throw new InvalidTopic(`${kind} is ${bytes} bytes long, the limit is ${maxBytes}`);
  }
  const levels = text.split(".").length;
  if (levels > maxLevels) {
    throw new InvalidTopic(`${kind} has ${levels} levels, the limit is ${maxLevels}`);
  }
  return text;
}

function checkLevels(kind: string, text: string, isFilter: boolean): void {
  const levels = text.split(".");
  const count = levels.length;
  levels.forEach((level, index) => {
    const i = index + 1;
    if (level === "") {
      const where = i === 1 ? "leading '.'" : i === count ? "trailing '.'" : "consecutive '..'";
      throw new InvalidTopic(`${kind} level ${i} is empty (${where})`);
    }
    for (const wildcard of ["+", "#"]) {
      if (!level.includes(wildcard)) {
        continue;
      }
      if (!isFilter) {
        throw new InvalidTopic(
          `wildcard '${wildcard}' is not allowed in a published topic (level ${i})`,
        );
      }
      if (level !== wildcard) {
        throw new InvalidTopic(
          `wildcard '${wildcard}' must be a whole level, but ${kind} level ${i} is '${level}'`,
        );
      }
      if (wildcard === "#" && i !== count) {
        throw new InvalidTopic(
          `wildcard '#' may only be the last level of a filter, but it is level ${i} of ${count}`,
        );
      }
    }
    if (level === "+" || level === "#" || LEVEL.test(level)) {
      return;
    }
    for (const ch of level) {
      if (!LEVEL_CHAR.test(ch)) {
        const code = (ch.codePointAt(0) ?? 0).toString(16).toUpperCase().padStart(4, "0");
        throw new InvalidTopic(
          `character '${ch}' (U+${code}) is not allowed in ${kind} level ${i}; ` +
            "allowed are A-Z a-z 0-9 '_' '-'",
        );
      }
    }
  });
}

/** Throw {@link InvalidTopic} unless `topic` is a valid concrete (published) topic. */
export function validateTopic(topic: string, limits: TopicLimits = {}): void {
  checkLevels("topic", checkLimits("topic", topic, limits), false);
}

/** Throw {@link InvalidTopic} unless `filter` is a valid subscription filter. */
export function validateFilter(filter: string, limits: TopicLimits = {}): void {
  checkLevels("filter", checkLimits("filter", filter, limits), true);
}

/** Whether `filter` matches `topic` (both assumed valid). */
export function matches(filter: string, topic: string): boolean {
  if (filter === topic || filter === "#") {
    return true;
  }
  const f = filter.split(".");
  const t = topic.split(".");
  for (let i = 0; i < f.length; i++) {
    const level = f[i];
    if (level === "#") {
      return true;
    }
    if (i >= t.length) {
      return false;
    }
    if (level !== "+" && level !== t[i]) {
      return false;
    }
  }
  return f.length === t.length;
}
