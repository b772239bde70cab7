/**
 * daemoneye-eventbus client for Node.js.
 *
 * - {@link connect} / {@link Client}: the connection (with reconnection and a
 *   last will), typed publish and subscribe, request/reply ({@link Client.request},
 *   {@link Client.serve});
 * - the topic registry generated from the schema (`EVENTS_PROCESS_LIFECYCLE`,
 *   `controlCollectorTaskTargeted(...)`, `ACCESS_TABLE`, `lookup`, ...);
 * - the generated protobuf-es messages of the payloads (`ProcessEventSchema`,
 *   ...) and of the frames (namespace `frames`);
 * - typed errors ({@link AccessDenied}, {@link InvalidPayload}, ...) carrying the
 *   broker's `ErrorCode`.
 *
 * @module
 */

export * from "./client.js";
export * from "./correlation.js";
export * from "./errors.js";
export {
  BATCH_BYTES,
  PublishBatcher,
  batchBudget,
  encodePublish,
  publishBody,
  publishHeader,
  type PublishHeader,
  type SealedBatch,
} from "./batcher.js";
export {
  DEFAULT_RECONNECT,
  reconnectDelay,
  reconnectPolicy,
  type ReconnectOptions,
  type ReconnectPolicy,
} from "./reconnect.js";
export {
  IncomingRequest,
  Responder,
  type RawReply,
  type RequestOptions,
  type ServeOptions,
} from "./rpc.js";
export {
  ClientConnection,
  CreditCounter,
  DEFAULT_MAX_FRAME_BYTES,
  DELIVER_BATCH_OVERHEAD,
  DELIVER_OVERHEAD,
  HANDSHAKE_MAX_FRAME_BYTES,
  REQUEST_DELIVER_OVERHEAD,
  MAX_UINT32,
  PROTOCOL_VERSION,
  creditThreshold,
  decodeFrameBody,
  decodeLengthPrefix,
  encodeFrame,
  encodeVarint,
  frame,
  publishFrameBody,
  type FrameInit,
  type FrameKind,
  type State,
} from "./protocol.js";
export * from "./topics.js";
export * from "./gen/daemoneye/eventbus/v1/registry.js";
export * from "./gen/daemoneye/eventbus/v1/events_pb.js";
export * from "./gen/daemoneye/eventbus/v1/control_pb.js";
export * from "./gen/daemoneye/eventbus/v1/correlation_pb.js";
export {
  ErrorCode,
  type Limits,
  type StatsResponse,
} from "./gen/daemoneye/eventbus/v1/frames_pb.js";
export * as frames from "./gen/daemoneye/eventbus/v1/frames_pb.js";
