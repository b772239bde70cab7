// Compile-time checks, type-checked by `npm run typecheck` (never run): each
// `@ts-expect-error` line MUST be a type error, or tsc fails.

import { create } from "@bufbuild/protobuf";

import {
  CONTROL_COLLECTOR_RPC_HEALTH,
  CONTROL_HEALTH_STATUS,
  ComponentStatusSchema,
  EVENTS_NETWORK_CONNECTIONS,
  EVENTS_PROCESS_LIFECYCLE,
  NetworkEventSchema,
  ProcessEventSchema,
  HealthCheckReplySchema,
  HealthCheckRequestSchema,
  RequestTopic,
  TaskAckSchema,
  TaskAssignmentSchema,
  Topic,
  connect,
  controlCollectorQueue,
  controlCollectorRpcHealth,
  controlCollectorTaskTargeted,
  lookup,
  publication,
  type Client,
  type ConnectionClosed,
  type HealthCheckReply,
  type HealthCheckRequest,
  type TaskAssignment,
  type TaskAck,
  type NetworkEvent,
  type ProcessEvent,
} from "../src/index.js";

export async function typedPublish(client: Client): Promise<void> {
  const process = create(ProcessEventSchema, { pid: 1, name: "init" });
  const network = create(NetworkEventSchema, { localPort: 22 });
  await client.publish(EVENTS_PROCESS_LIFECYCLE, process);
  await client.publish(EVENTS_NETWORK_CONNECTIONS, network);
  // @ts-expect-error a NetworkEvent on a process topic
  await client.publish(EVENTS_PROCESS_LIFECYCLE, network);
  // @ts-expect-error a ProcessEvent on a network topic
  client.publishNowait(EVENTS_NETWORK_CONNECTIONS, process);
  // @ts-expect-error a plain object is not a message
  await client.publish(EVENTS_PROCESS_LIFECYCLE, { pid: 1, name: "init" });
  // @ts-expect-error a ProcessEvent on a TaskAssignment template topic
  await client.publish(controlCollectorTaskTargeted({ type: "scan", id: "p1" }), process);
  await client.publish(
    controlCollectorTaskTargeted({ type: "scan", id: "p1" }),
    create(TaskAssignmentSchema),
  );
  // @ts-expect-error a template parameter is missing
  controlCollectorTaskTargeted({ type: "scan" });
  // lookup() of a literal name is typed by its payload.
  await client.publish(lookup("events.network.connections"), network);
  // @ts-expect-error the looked-up topic carries NetworkEvent
  await client.publish(lookup("events.network.connections"), process);
}

export async function typedSubscribe(client: Client): Promise<void> {
  const sub = await client.subscribe(EVENTS_PROCESS_LIFECYCLE);
  for await (const event of sub) {
    const message: ProcessEvent = event.message();
    // @ts-expect-error a process subscription decodes ProcessEvent
    const wrong: NetworkEvent = event.message();
    void message;
    void wrong;
  }
  const lossless = await client.subscribe(EVENTS_PROCESS_LIFECYCLE, { lossless: true, window: 64 });
  const credit: [number, boolean, number] = [lossless.window, lossless.lossless, lossless.credited];
  void credit;
  // @ts-expect-error the window is the broker's, read-only
  lossless.window = 8;
  // @ts-expect-error lossless is a boolean
  await client.subscribe("events.#", { lossless: 1 });
  const any = await client.subscribe("events.#");
  const decoded = (await any.get()).message();
  void decoded.$typeName;
}

export async function typedRequest(client: Client): Promise<void> {
  const request = client.request.bind(client);
  const health = controlCollectorRpcHealth({ id: "procmond-1" });
  const typed: RequestTopic<typeof HealthCheckRequestSchema, typeof HealthCheckReplySchema> =
    health;
  // A request topic is a topic of its request schema.
  const asTopic: Topic<typeof HealthCheckRequestSchema> = health;
  const reply: HealthCheckReply = await request(health, create(HealthCheckRequestSchema), {
    timeoutMs: 500,
  });
  const ack: TaskAck = await request(
    controlCollectorQueue({ type: "scan" }),
    create(TaskAssignmentSchema),
  );
  void [typed, asTopic, reply, ack, CONTROL_COLLECTOR_RPC_HEALTH.build({ id: "p" }).replySchema];
  // @ts-expect-error the health request topic takes a HealthCheckRequest
  await request(health, create(TaskAssignmentSchema));
  // @ts-expect-error the health request topic answers with a HealthCheckReply
  const wrong: TaskAck = await request(health, create(HealthCheckRequestSchema));
  // @ts-expect-error the work queue answers with a TaskAck
  const wrongAck: HealthCheckReply = await request(
    controlCollectorQueue({ type: "scan" }),
    create(TaskAssignmentSchema),
  );
  // @ts-expect-error a publish/subscribe topic is not a request topic
  await request(CONTROL_HEALTH_STATUS, create(ComponentStatusSchema));
  // @ts-expect-error the reply schema is part of the request topic's type
  const wrongType: RequestTopic<typeof HealthCheckRequestSchema, typeof TaskAssignmentSchema> =
    health;
  // @ts-expect-error a template parameter is missing
  controlCollectorRpcHealth({});
  void [wrong, wrongAck, wrongType];
  const retained: boolean = CONTROL_HEALTH_STATUS.retained;
  void retained;
}

export async function typedServe(client: Client): Promise<void> {
  // A template serves every topic built from it, typed by its schemas.
  const responder = await client.serve(CONTROL_COLLECTOR_RPC_HEALTH);
  for await (const req of responder) {
    const message: HealthCheckRequest = req.message;
    const left: number = req.remaining;
    const deadline: Date = req.deadline;
    const who: string = req.requester;
    const id: bigint = req.eventId;
    void [message, left, deadline, who, id];
    await req.reply(create(HealthCheckReplySchema));
    // @ts-expect-error the health topics answer with a HealthCheckReply
    await req.reply(create(TaskAckSchema));
    await req.fail("cannot");
  }
  const one = await client.serve(controlCollectorQueue({ type: "scan" }));
  const task: TaskAssignment = (await one.get()).message;
  void task;
  // @ts-expect-error a publish/subscribe topic has no reply type to serve
  await client.serve(CONTROL_HEALTH_STATUS);
  const untyped = await client.serve("control.collector.rpc.#");
  await (await untyped.get()).reply(create(HealthCheckReplySchema));
  await responder.close();
}

export async function typedEventsAndWill(client: Client): Promise<void> {
  const sub = await client.subscribe(CONTROL_HEALTH_STATUS);
  const event = await sub.get();
  const stamp: [bigint, bigint, boolean, Date | undefined] = [
    event.eventId,
    event.receivedAtNs,
    event.retained,
    event.receivedAt,
  ];
  void stamp;
  // @ts-expect-error event ids are exact: bigint, not number
  const lossy: number = event.eventId;
  void lossy;
  const will = publication(CONTROL_HEALTH_STATUS, create(ComponentStatusSchema));
  await connect("/tmp/daemoneye.sock", { lastWill: will, reconnect: { maxDelayMs: 2000 } });
  // @ts-expect-error a will's message is of its topic's payload type
  publication(CONTROL_HEALTH_STATUS, create(ProcessEventSchema));
  const reason: ConnectionClosed | undefined = await client.closed;
  void reason;
}
