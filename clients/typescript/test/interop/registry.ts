// Print the generated TypeScript registry as JSON, for comparison with the
// Python registry (tests/test_interop.py).

import {
  ACCESS_TABLE,
  RequestTopic,
  RequestTopicTemplate,
  TEMPLATES,
  TOPICS,
  lookup,
} from "../../src/index.js";
import { emit } from "./common.js";

emit({
  topics: [...TOPICS.values()].map((t) => ({
    name: t.name,
    payload: t.payloadName,
    access: t.access,
    publishers: t.publishers,
    subscribers: t.subscribers,
    control: t.control,
    lossless: t.lossless,
    retained: t.retained,
    reply: t instanceof RequestTopic ? t.replyName : null,
  })),
  templates: TEMPLATES.map((t) => ({
    pattern: t.pattern,
    parameters: t.parameters,
    filter: t.filter,
    payload: t.payloadName,
    access: t.access,
    publishers: t.publishers,
    subscribers: t.subscribers,
    control: t.control,
    lossless: t.lossless,
    retained: t.retained,
    reply: t instanceof RequestTopicTemplate ? t.replyName : null,
  })),
  access: Object.fromEntries(ACCESS_TABLE),
  lookupTemplate: lookup("control.collector.task.scan.procmond-1")?.template ?? null,
  lookupRequest: ((t) => (t instanceof RequestTopic ? [t.name, t.template, t.replyName] : null))(
    lookup("control.collector.rpc.health.procmond-1"),
  ),
});
