// Request/reply with the TypeScript client, for tests/test_interop.py.
//
// Options: {"socket", "component", "role": "request" | "serve", ...}.
//
// role "request": {"ids": [...], "timeoutMs"?}: one health request to
// `control.collector.rpc.health.{id}` per id, in order, with componentId set
// to the id; prints {"ready": ...}, then per id {"reply": <HealthCheckReply
// in the JSON mapping>} or {"failed": <error described>}, then {"done": n}.
//
// role "serve": {"id", "count"}: serves `control.collector.rpc.health.{id}`,
// prints {"ready": ...}, answers `count` requests (componentId "fail-me" is
// failed with the reason "refused by ts", any other is answered with
// status SUCCESS and the componentId echoed), printing {"served": {...}} for
// each, then closes the responder and prints {"done": n}.

import { create, toJson } from "@bufbuild/protobuf";

import {
  HealthCheckReplySchema,
  HealthCheckRequestSchema,
  HealthState,
  RpcStatus,
  connect,
  controlCollectorRpcHealth,
} from "../../src/index.js";
import { describeError, emit, options, run } from "./common.js";

interface Options {
  socket: string;
  component: string;
  role: "request" | "serve";
  ids?: string[];
  timeoutMs?: number;
  id?: string;
  count?: number;
}

run(async () => {
  const opts = options<Options>();
  const client = await connect(opts.socket, { name: `ts-${opts.role}`, component: opts.component });
  if (opts.role === "request") {
    emit({ ready: true, requests: client.features.requests });
    let done = 0;
    for (const id of opts.ids ?? []) {
      try {
        const reply = await client.request(
          controlCollectorRpcHealth({ id }),
          create(HealthCheckRequestSchema, { componentId: id, includeDiagnostics: true }),
          { timeoutMs: opts.timeoutMs },
        );
        emit({ reply: toJson(HealthCheckReplySchema, reply) });
      } catch (err) {
        emit({ failed: describeError(err) });
      }
      done += 1;
    }
    emit({ done });
  } else {
    const responder = await client.serve(controlCollectorRpcHealth({ id: opts.id ?? "ts" }));
    emit({ ready: true, filter: responder.filter });
    let served = 0;
    for await (const req of responder) {
      const componentId = req.message.componentId;
      const sent =
        componentId === "fail-me"
          ? await req.fail("refused by ts")
          : await req.reply(
              create(HealthCheckReplySchema, {
                status: RpcStatus.SUCCESS,
                component: {
                  componentId,
                  state: HealthState.HEALTHY,
                  message: `ts answered ${req.requester}`,
                },
              }),
            );
      emit({
        served: {
          topic: req.topic,
          componentId,
          requester: req.requester,
          eventId: req.eventId.toString(),
          remainingPositive: req.remaining > 0,
          sent,
        },
      });
      served += 1;
      if (served >= (opts.count ?? 1)) {
        break;
      }
    }
    await responder.close();
    emit({ done: served });
  }
  await client.close();
});
