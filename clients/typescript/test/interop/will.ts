// A TypeScript client with a last will, for tests/test_interop.py.
//
// Options: {"socket", "component", "componentId", "mode": "kill" | "close"}.
// Connects with a will (a ComponentStatus on control.health.status whose
// componentId and message name it), prints {"ready": ...}; with "kill" it
// then waits to be killed (the broker publishes the will), with "close" it
// closes (a goodbye: no will) and prints {"closed": true}.

import { create } from "@bufbuild/protobuf";

import {
  CONTROL_HEALTH_STATUS,
  ComponentStatusSchema,
  HealthState,
  connect,
  publication,
} from "../../src/index.js";
import { emit, options, run } from "./common.js";

interface Options {
  socket: string;
  component: string;
  componentId: string;
  mode: "kill" | "close";
}

run(async () => {
  const opts = options<Options>();
  const client = await connect(opts.socket, {
    name: "ts-will",
    component: opts.component,
    lastWill: publication(
      CONTROL_HEALTH_STATUS,
      create(ComponentStatusSchema, {
        componentId: opts.componentId,
        state: HealthState.UNHEALTHY,
        message: `${opts.componentId} went away`,
      }),
    ),
  });
  emit({ ready: true, sessionId: client.sessionId, requests: client.features.requests });
  if (opts.mode === "close") {
    await client.close();
    emit({ closed: true });
    return;
  }
  await new Promise(() => undefined); // until killed
});
