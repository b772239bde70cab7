/**
 * daemoneye-eventbus client for Node.js.
 *
 * - {@link connect} / {@link Client}: the connection, typed publish and subscribe;
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
  ClientConnection,
  CreditCounter,
  DEFAULT_MAX_FRAME_BYTES,
  DELIVER_OVERHEAD,
  HANDSHAKE_MAX_FRAME_BYTES,
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
