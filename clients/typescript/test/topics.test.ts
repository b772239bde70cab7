// The topic grammar [protocol §4].

import assert from "node:assert/strict";
import { test } from "node:test";

import { InvalidTopic } from "../src/errors.js";
import { matches, validateFilter, validateTopic } from "../src/topics.js";

test("valid topics and filters", () => {
  for (const t of ["a", "events.process.lifecycle", "A-b_9.x"]) {
    validateTopic(t);
    validateFilter(t);
  }
  for (const f of ["#", "+", "a.+.c", "a.#", "+.+.#"]) {
    validateFilter(f);
  }
});

test("invalid topics and filters", () => {
  for (const t of ["", ".a", "a.", "a..b", "a b", "é", "a.+", "a.#"]) {
    assert.throws(() => validateTopic(t), InvalidTopic, JSON.stringify(t));
  }
  for (const f of ["a.b#", "+a", "##", "a.#.b", ""]) {
    assert.throws(() => validateFilter(f), InvalidTopic, JSON.stringify(f));
  }
  assert.throws(() => validateTopic("a".repeat(256)), /256 bytes long, the limit is 255/);
  assert.throws(() => validateTopic(Array(17).fill("a").join(".")), /17 levels/);
  assert.throws(() => validateTopic("a.b", { maxLevels: 1 }), /2 levels/);
});

test("matching", () => {
  assert.ok(matches("#", "a.b"));
  assert.ok(matches("a.#", "a"));
  assert.ok(matches("a.#", "a.b.c"));
  assert.ok(matches("a.+.c", "a.b.c"));
  assert.ok(!matches("a.+.c", "a.c"));
  assert.ok(!matches("a.+.c", "a.b.x.c"));
  assert.ok(!matches("a.b", "a.b.c"));
});
