/**
 * The frames a client exchanges with the broker on whichever connection is
 * open ({@link FrameExchange}): what the broker sends, dispatched
 * (deliveries to subscriptions, requests to responders, replies and
 * acknowledgements to their waiters, heartbeats answered, non-fatal errors),
 * and what the client sends, with the round trips that wait for the
 * broker's answer. `BrokerSession` (session.ts) and `BrokerConnection`
 * (connection.ts) build the connection itself on it, and `Client`
 * (client.ts) the API.
 *
 * @module
 */

import type * as net from "node:net";

import type {
  Error as ErrorFrame,
  Frame,
  StatsResponse,
  SubscribeAck,
} from "./gen/daemoneye/eventbus/v1/frames_pb.js";
import { PendingAnswers } from "./answers.js";
import { EventBusError, errorFromFrame } from "./errors.js";
import { ClientConnection, frame } from "./protocol.js";
import { Registrations } from "./registrations.js";
import { PendingRequests, STOPPED } from "./rpc.js";
import type { SubscriptionRequest } from "./subscription.js";
import { Writer } from "./writer.js";

/**
 * The frames of a client, without the connection: see `BrokerSession`, which
 * extends it, opens connections, handles the frames about them (`Welcome`,
 * `Goodbye`, a fatal `Error`) and says when the client is open
 * ({@link isConnected}, {@link checkOpen}). Also the client's side of its
 * subscriptions and responders: `Credit` and `Reply` frames
 * ({@link grantCredit}, {@link sendReply}).
 */
export abstract class FrameExchange {
  /** Called with the typed error when the broker refuses a publish. */
  onError: ((error: EventBusError) => void) | undefined;
  /** The last non-fatal error the broker sent. */
  lastError: EventBusError | undefined;

  protected readonly writer = new Writer();
  /** Counts connections: a request is answered on the one it came on. */
  protected generation = 0;
  /** Acknowledgements and round trips awaited from the broker. */
  protected readonly answers = new PendingAnswers();
  /** The subscriptions and responders, asked for again on each connection. */
  protected readonly registrations = new Registrations();
  protected readonly requests = new PendingRequests();
  protected nextNonce = 1n;
  protected refused = 0;

  /** How long to wait for an answer of the broker, in ms. */
  abstract readonly requestTimeoutMs: number;

  /** The connection is open and the client not closing. */
  abstract get isConnected(): boolean;

  /** Throw unless the client can send now (the connection is open, the client not closing). */
  protected abstract checkOpen(): void;

  protected get conn(): ClientConnection {
    return this.writer.conn;
  }

  /** A new connection, on `socket` with the state machine `conn`: sent on from now on. */
  protected attach(socket: net.Socket, conn: ClientConnection): void {
    this.writer.attach(socket, conn);
    this.generation += 1;
  }

  // -- receiving --------------------------------------------------------------------

  /** One frame of the broker's: deliveries, requests, replies, answers, heartbeats, errors. */
  protected handle(f: Frame): void {
    const kind = f.kind;
    switch (kind.case) {
      case "deliver":
        this.registrations.subscription(kind.value.subscriptionId)?.deliver(kind.value);
        break;
      case "deliverBatch":
        this.registrations.subscription(kind.value.subscriptionId)?.deliverBatch(kind.value);
        break;
      case "requestDeliver": {
        const responder = this.registrations.responder(kind.value.subscriptionId);
        if (responder !== undefined) {
          responder.deliver(kind.value, this.generation);
        } else if (!this.conn.closeExpected) {
          // Stopped (sent before our unsubscribe arrived): its requester learns it at once.
          this.writer.send(
            this.conn.send(
              frame({ case: "reply", value: { token: kind.value.token, error: STOPPED } }),
            ),
          );
        }
        break;
      }
      case "replyDeliver":
        this.requests.replied(kind.value);
        break;
      case "ping":
        if (!this.conn.closeExpected) {
          this.writer.send(
            this.conn.send(frame({ case: "pong", value: { nonce: kind.value.nonce } })),
          );
        }
        break;
      case "pong":
        this.answers.resolve(`pong:${kind.value.nonce}`, undefined);
        break;
      case "subscribeAck": {
        // Before any event that follows the ack in the same read is queued.
        const id = kind.value.subscriptionId;
        this.registrations.get(id)?.acknowledged(kind.value);
        this.answers.resolve(`sub:${id}`, kind.value);
        break;
      }
      case "unsubscribeAck":
        this.answers.resolve(`unsub:${kind.value.subscriptionId}`, undefined);
        break;
      case "statsResponse":
        this.answers.resolve(`stats:${kind.value.requestId}`, kind.value);
        break;
      case "error":
        this.errorReceived(kind.value);
        break;
      default:
        break;
    }
  }

  /** A non-fatal `Error`: for a request, a subscription, or else a refused publish. */
  protected errorReceived(error: ErrorFrame): void {
    const exc = errorFromFrame(error);
    if (error.requestId !== 0n) {
      this.requests.fail(error.requestId, exc); // ignored if the request was given up on
      return;
    }
    const sid = error.subscriptionId;
    if (sid !== 0) {
      if (this.answers.reject(`sub:${sid}`, exc) || this.answers.reject(`unsub:${sid}`, exc)) {
        return;
      }
    }
    this.refused += 1;
    this.lastError = exc;
    if (this.onError !== undefined) {
      this.onError(exc);
    } else {
      process.emitWarning(`broker refused a request: ${exc.message}`, {
        code: "DAEMONEYE_EVENTBUS_REFUSED",
      });
    }
  }

  /** Fail whatever waited on the lost connection: acknowledgements, replies, queued requests. */
  protected failPending(error: Error): void {
    this.answers.failAll(error);
    this.requests.failAll(error);
    this.registrations.restartResponders();
  }

  // -- sending -----------------------------------------------------------------------

  protected send(f: Frame): void {
    this.checkOpen();
    this.writer.send(this.conn.send(f));
  }

  /**
   * Grant `events` more events of a credit-based subscription (a `Credit`
   * frame, written at once so that the broker resumes as early as possible).
   * Nothing once the connection is closing or gone: the broker forgets its
   * subscriptions with the connection.
   *
   * @internal
   */
  grantCredit(subscriptionId: number, events: number): void {
    if (!this.isConnected) {
      return;
    }
    this.writer.send(this.conn.send(frame({ case: "credit", value: { subscriptionId, events } })));
    this.writer.writeNow();
  }

  /**
   * Send a responder's `Reply` for `token`, on the connection the request
   * came on (`generation`); false if that connection is gone.
   *
   * @internal
   */
  sendReply(
    generation: number,
    token: bigint,
    payloadType: string,
    payload: Uint8Array,
    error: string,
  ): boolean {
    if (generation !== this.generation || !this.isConnected) {
      return false; // the token belonged to a connection that is gone
    }
    this.writer.send(
      this.conn.send(frame({ case: "reply", value: { token, payloadType, payload, error } })),
    );
    return true;
  }

  /** Send `f` and wait for the broker's answer to `key` (within `requestTimeoutMs`). */
  protected ask<T>(key: string, f: Frame): Promise<T> {
    this.checkOpen();
    return this.answers.wait<T>(key, this.requestTimeoutMs, () => {
      this.send(f);
      this.writer.writeNow();
    });
  }

  protected requestSubscribe(
    id: number,
    request: SubscriptionRequest,
    respond: boolean,
  ): Promise<SubscribeAck> {
    return this.ask<SubscribeAck>(
      `sub:${id}`,
      frame({
        case: "subscribe",
        value: {
          subscriptionId: id,
          filter: request.filter,
          correlationFilter: request.correlationFilter,
          includeControl: request.includeControl,
          lossless: request.lossless,
          window: request.window,
          respond,
        },
      }),
    );
  }

  /**
   * Round trip to the broker (a `Ping`): when it resolves, everything sent
   * before was handled [protocol §5]. Resolves to the round-trip time in ms.
   */
  async flush(): Promise<number> {
    const nonce = this.nextNonce++;
    const start = performance.now();
    await this.ask(`pong:${nonce}`, frame({ case: "ping", value: { nonce } }));
    return performance.now() - start;
  }

  /** Same as {@link flush}. */
  ping(): Promise<number> {
    return this.flush();
  }

  /** The broker's statistics [protocol §9]. */
  async brokerStatistics(): Promise<StatsResponse> {
    const id = this.nextNonce++;
    return this.ask<StatsResponse>(
      `stats:${id}`,
      frame({ case: "statsRequest", value: { requestId: id } }),
    );
  }
}
