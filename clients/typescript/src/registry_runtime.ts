/**
 * The hand-written runtime of the generated topic registry.
 *
 * The generated `gen/daemoneye/eventbus/v1/registry.ts` (written by
 * `codegen/render_ts.py`) holds only data and typed declarations: one
 * {@link Topic} or {@link TopicTemplate} constant per topic the schema
 * declares (a {@link RequestTopic} or {@link RequestTopicTemplate} for a topic
 * declared with a `reply` type), builder functions for the templates, the `TOPICS` / `TEMPLATES` /
 * `ACCESS_TABLE` tables and a {@link TopicRegistry} over them. It imports the
 * classes from here, so that they are ordinary source: type-checked,
 * formatted and tested like the rest of the client.
 *
 * This module imports only `@bufbuild/protobuf` and, for its types, the
 * generated `options_pb` (for `AccessLevel`).
 *
 * @module
 */

import type { DescMessage } from "@bufbuild/protobuf";

import type { AccessLevel } from "./gen/daemoneye/eventbus/v1/options_pb.js";

/** One topic level as a template parameter may take it: no dot, no wildcard. */
const LEVEL = /^[A-Za-z0-9_-]+$/;

/**
 * A concrete topic and what the schema declares for it.
 *
 * The payload schema is part of the type, so publishing the wrong message on a
 * topic is a type error.
 */
export class Topic<Desc extends DescMessage = DescMessage> {
  constructor(
    /** The topic name, e.g. `events.process.lifecycle`. */
    readonly name: string,
    /** The protobuf-es schema of the payload message. */
    readonly schema: Desc,
    /** Who may use the topic. */
    readonly access: AccessLevel,
    /** Components allowed to publish (empty on a public topic: everyone). */
    readonly publishers: readonly string[],
    /** Components allowed to subscribe (empty on a public topic: everyone). */
    readonly subscribers: readonly string[],
    /** A control-plane topic, which reaches only subscribers that opt in. */
    readonly control: boolean,
    /** The template this topic was built from, if any. */
    readonly template?: string,
    /**
     * Declared lossless: its events wait for a subscriber that falls behind
     * instead of being dropped (for clients that grant credit, as this one does).
     */
    readonly lossless: boolean = false,
    /**
     * Declared retained: the broker keeps its last event and gives it first to
     * each new subscription that may read it.
     */
    readonly retained: boolean = false,
  ) {
    Object.freeze(this.publishers);
    Object.freeze(this.subscribers);
    // A subclass adds its own fields first, then freezes itself.
    if (new.target === Topic) {
      Object.freeze(this);
    }
  }

  /** Fully qualified name of the payload message type. */
  get payloadName(): string {
    return this.schema.typeName;
  }

  toString(): string {
    return this.name;
  }
}

/**
 * A parametrised topic such as `control.collector.task.{type}.{id}`.
 *
 * Each parameter stands for exactly one topic level.
 */
export class TopicTemplate<Desc extends DescMessage = DescMessage, Param extends string = string> {
  constructor(
    /** The template, e.g. `control.collector.task.{type}.{id}`. */
    readonly pattern: string,
    /** The parameter names, in order. */
    readonly parameters: readonly Param[],
    /** The protobuf-es schema of the payload message. */
    readonly schema: Desc,
    /** Who may use the topics built from the template. */
    readonly access: AccessLevel,
    /** Components allowed to publish. */
    readonly publishers: readonly string[],
    /** Components allowed to subscribe. */
    readonly subscribers: readonly string[],
    /** Control-plane topics. */
    readonly control: boolean,
    /** Declared lossless (see {@link Topic.lossless}). */
    readonly lossless: boolean = false,
    /** Declared retained (see {@link Topic.retained}). */
    readonly retained: boolean = false,
  ) {
    Object.freeze(this.parameters);
    Object.freeze(this.publishers);
    Object.freeze(this.subscribers);
    // A subclass adds its own fields first, then freezes itself.
    if (new.target === TopicTemplate) {
      Object.freeze(this);
    }
  }

  /** Fully qualified name of the payload message type. */
  get payloadName(): string {
    return this.schema.typeName;
  }

  /** A subscription filter matching every topic built from this template. */
  get filter(): string {
    return this.pattern
      .split(".")
      .map((level) => (level.startsWith("{") ? "+" : level))
      .join(".");
  }

  /** Build the concrete topic; each value must be one valid topic level. */
  build(values: Readonly<Record<Param, string>>): Topic<Desc> {
    return new Topic(
      this.concreteName(values),
      this.schema,
      this.access,
      this.publishers,
      this.subscribers,
      this.control,
      this.pattern,
      this.lossless,
      this.retained,
    );
  }

  /** The concrete topic name for `values`; each must be one valid topic level. */
  protected concreteName(values: Readonly<Record<Param, string>>): string {
    const given = Object.keys(values).sort();
    const wanted = [...this.parameters].sort();
    if (given.length !== wanted.length || given.some((key, i) => key !== wanted[i])) {
      throw new TypeError(
        `topic template ${JSON.stringify(this.pattern)} takes parameters ` +
          `${JSON.stringify(this.parameters)}, got ${JSON.stringify(given)}`,
      );
    }
    return this.pattern
      .split(".")
      .map((level) => {
        if (!level.startsWith("{")) {
          return level;
        }
        const key = level.slice(1, -1) as Param;
        const value: unknown = values[key];
        if (typeof value !== "string" || !LEVEL.test(value)) {
          throw new TypeError(
            `parameter ${JSON.stringify(key)} of topic template ${JSON.stringify(this.pattern)} ` +
              `must be one topic level made of [A-Za-z0-9_-], got ${JSON.stringify(value)}`,
          );
        }
        return value;
      })
      .join(".");
  }

  /** The parameter values if `topic` was built from this template, else undefined. */
  match(topic: string): Record<Param, string> | undefined {
    const levels = topic.split(".");
    const pattern = this.pattern.split(".");
    if (levels.length !== pattern.length) {
      return undefined;
    }
    const values: Partial<Record<Param, string>> = {};
    for (let i = 0; i < pattern.length; i++) {
      const want = pattern[i] ?? "";
      const got = levels[i] ?? "";
      if (want.startsWith("{")) {
        if (!LEVEL.test(got)) {
          return undefined;
        }
        values[want.slice(1, -1) as Param] = got;
      } else if (want !== got) {
        return undefined;
      }
    }
    return values as Record<Param, string>;
  }
}

/**
 * A concrete request topic: requests of schema `Req`, each answered by one
 * message of schema `Rep`.
 *
 * Declared in the schema by a `reply` type on the topic. It is a {@link Topic}
 * of its request schema (same name, access rules and payload), and its reply
 * schema is part of its type too, so that the compiler knows what a request on
 * it returns. A request topic is never retained.
 */
export class RequestTopic<
  Req extends DescMessage = DescMessage,
  Rep extends DescMessage = DescMessage,
> extends Topic<Req> {
  constructor(
    name: string,
    schema: Req,
    /** The protobuf-es schema of the reply message. */
    readonly replySchema: Rep,
    access: AccessLevel,
    publishers: readonly string[],
    subscribers: readonly string[],
    control: boolean,
    template?: string,
    lossless = false,
  ) {
    super(name, schema, access, publishers, subscribers, control, template, lossless);
    if (new.target === RequestTopic) {
      Object.freeze(this);
    }
  }

  /** Fully qualified name of the reply message type. */
  get replyName(): string {
    return this.replySchema.typeName;
  }
}

/**
 * A parametrised request topic such as `control.collector.rpc.health.{id}`:
 * what it builds is a {@link RequestTopic} with the same request and reply schemas.
 */
export class RequestTopicTemplate<
  Req extends DescMessage = DescMessage,
  Rep extends DescMessage = DescMessage,
  Param extends string = string,
> extends TopicTemplate<Req, Param> {
  constructor(
    pattern: string,
    parameters: readonly Param[],
    schema: Req,
    /** The protobuf-es schema of the reply message. */
    readonly replySchema: Rep,
    access: AccessLevel,
    publishers: readonly string[],
    subscribers: readonly string[],
    control: boolean,
    lossless = false,
  ) {
    super(pattern, parameters, schema, access, publishers, subscribers, control, lossless);
    if (new.target === RequestTopicTemplate) {
      Object.freeze(this);
    }
  }

  /** Fully qualified name of the reply message type. */
  get replyName(): string {
    return this.replySchema.typeName;
  }

  /** Build the concrete request topic; each value must be one valid topic level. */
  override build(values: Readonly<Record<Param, string>>): RequestTopic<Req, Rep> {
    return new RequestTopic(
      this.concreteName(values),
      this.schema,
      this.replySchema,
      this.access,
      this.publishers,
      this.subscribers,
      this.control,
      this.pattern,
      this.lossless,
    );
  }
}

/**
 * The declared topics and templates of a schema, and the look-ups over them.
 *
 * `ByName` types the concrete topics by name (the generated `TopicsByName`),
 * so that {@link TopicRegistry.lookup} of a literal declared name returns that
 * topic's type.
 */
export class TopicRegistry<ByName extends Record<keyof ByName, Topic> = Record<never, never>> {
  constructor(
    /** Every concrete topic by name, in schema order. */
    readonly topics: ReadonlyMap<string, Topic>,
    /** Every topic template, in schema order. */
    readonly templates: readonly TopicTemplate[],
  ) {
    Object.freeze(this);
  }

  /** The declared topic of that name, built from a template if need be. */
  lookup<N extends keyof ByName & string>(name: N): ByName[N];
  lookup(name: string): Topic | undefined;
  lookup(name: string): Topic | undefined {
    const topic = this.topics.get(name);
    if (topic !== undefined) {
      return topic;
    }
    for (const template of this.templates) {
      const values = template.match(name);
      if (values !== undefined) {
        return template.build(values);
      }
    }
    return undefined;
  }

  /** The concrete topics whose payload is `schema`, in schema order. */
  topicsForPayload<Desc extends DescMessage>(schema: Desc): readonly Topic<Desc>[] {
    return [...this.topics.values()].filter(
      (topic): topic is Topic<Desc> => topic.schema.typeName === schema.typeName,
    );
  }
}
