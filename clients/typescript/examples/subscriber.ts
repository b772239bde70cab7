// The README's Node.js subscriber: print process lifecycle events as they come.
//
//   npx tsx examples/subscriber.ts [/tmp/daemoneye.sock]

import { EVENTS_PROCESS_LIFECYCLE, connect } from "../src/index.js";

const client = await connect(process.argv[2] ?? "/tmp/daemoneye.sock", {
  name: "node-subscriber",
  component: "daemoneye-agent", // restricted topic: claim a listed subscriber
});
const sub = await client.subscribe(EVENTS_PROCESS_LIFECYCLE); // or a filter: "events.#"
process.once("SIGINT", () => void client.close()); // Ctrl-C: goodbye, iteration ends
for await (const event of sub) {
  const p = event.message(); // typed: ProcessEvent
  console.log(
    `#${event.sequence} ${event.topic} pid=${p.pid} ${p.name}`,
    event.correlation?.correlationId ?? "",
  );
}
