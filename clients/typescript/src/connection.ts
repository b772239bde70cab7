/**
 * The connection half of a client ({@link BrokerConnection}): its life
 * across connections: connecting, closing, and reconnecting with back-off
 * (the loop is in reconnector.ts). It builds on `BrokerSession` (session.ts:
 * the socket, the handshake and the frames about one connection), itself on
 * `FrameExchange` (exchange.ts: the frames received and sent, acknowledgements
 * and round trips). `Client` (client.ts) adds the API: publish, subscribe,
 * request and serve. The split mirrors the Python client's
 * `client/connection.py` and `client/core.py`.
 *
 * @module
 */

import {
  ClosedResourceError,
  ConnectionClosed,
  ConnectionLost,
  EventBusError,
  RequestTimeout,
} from "./errors.js";
import type { ClientOptions, ClientStatistics } from "./options.js";
import { frame } from "./protocol.js";
import { Reconnector } from "./reconnector.js";
import { Responder } from "./rpc.js";
import { BrokerSession } from "./session.js";
import { Subscription } from "./subscription.js";

/**
 * A connection to a broker, without the API: see `Client`, which extends it.
 * It opens the socket and completes the handshake, dispatches what the broker
 * sends (deliveries to subscriptions, requests to responders, replies and
 * acknowledgements to their waiters, errors, heartbeats), closes, and
 * reconnects with back-off when asked to. Connecting, closing and
 * reconnecting are here; opening a socket and the handshake are in
 * `BrokerSession`, dispatching in `FrameExchange`, which it extends.
 */
export class BrokerConnection extends BrokerSession {
  /** With `reconnect`: called when the connection is lost, before reconnecting. */
  onDisconnect: ((error: ConnectionLost) => void) | undefined;
  /** With `reconnect`: called once reconnected and every subscription asked for again. */
  onReconnect: (() => void) | undefined;

  /** A connection was established once: losing one later reconnects (with `reconnect`). */
  protected connectedOnce = false;
  protected closeTask: Promise<void> | undefined;
  protected readonly reconnector: Reconnector;
  protected closedDone: ((error: ConnectionClosed | undefined) => void) | undefined;
  protected closedPromise: Promise<ConnectionClosed | undefined>;

  constructor(path?: string, options?: ClientOptions) {
    super(path, options);
    this.reconnector = new Reconnector({
      path: this.path,
      closing: () => this.closing,
      open: () => this.open(),
      resubscribe: () => this.resubscribeAll(),
      connected: () => this.isConnected,
      reconnected: () => this.notify(() => this.onReconnect?.()),
      finish: (error) => this.finish(error),
      lostError: () => this.lostError(),
    });
    this.closedPromise = this.newClosed();
  }

  protected newClosed(): Promise<ConnectionClosed | undefined> {
    return new Promise((resolve) => {
      this.closedDone = resolve;
    });
  }

  /**
   * Resolves once the client is closed for good: to undefined after
   * {@link close}, to the {@link ConnectionLost} (or other error) that ended
   * it otherwise (the broker went away and the client does not reconnect, or
   * gave up). Never rejects.
   */
  get closed(): Promise<ConnectionClosed | undefined> {
    return this.closedPromise;
  }

  /** Open the connection and complete the handshake [protocol §3]. */
  async connect(): Promise<void> {
    if ((this.socket !== undefined && !this.socket.destroyed) || this.reconnector.active) {
      throw new EventBusError("client is already connected");
    }
    if (this.closeTask !== undefined) {
      // Connecting again after close(): a new life, a new `closed`.
      this.closeTask = undefined;
      this.closedPromise = this.newClosed();
    }
    this.closing = false;
    try {
      await this.open();
    } catch (err) {
      this.socket?.destroy();
      throw err;
    }
    this.connectedOnce = true;
  }

  /**
   * Wait until the broker has handled everything sent (a {@link flush}), say
   * goodbye, write what is pending and close (idempotent) [protocol §8]. Stops
   * reconnecting; subscriptions and responders end, their iterations quietly.
   */
  close(): Promise<void> {
    this.closeTask ??= this.doClose();
    return this.closeTask;
  }

  protected async doClose(): Promise<void> {
    if (!this.isConnected) {
      this.closing = true;
      this.reconnector.stop();
      this.socket?.destroy();
      this.finish(new ClosedResourceError("client closed"));
      return;
    }
    // A round trip first, so the broker has handled every event published
    // before the goodbye even if it stops reading at the goodbye.
    try {
      await this.flush();
    } catch {
      // Closing anyway: the broker is gone or too slow.
    }
    this.closing = true;
    this.reconnector.stop();
    const socket = this.socket;
    if (this.conn.state === "open") {
      this.writer.send(
        this.conn.send(frame({ case: "goodbye", value: { reason: "client closing" } })),
      );
      this.writer.writeNow();
      socket?.end();
    } else {
      socket?.destroy(); // lost during the flush, or reconnecting
    }
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      this.socketClosed,
      new Promise<void>((resolve) => {
        timer = setTimeout(resolve, this.requestTimeoutMs);
      }),
    ]);
    clearTimeout(timer);
    socket?.destroy();
    this.finish(new ClosedResourceError("client closed"));
  }

  /** `await using client = await connect(...)` closes at the end of the scope. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  /** The client is closed for good: fail every waiter, end every subscription and responder. */
  protected finish(error: ConnectionClosed): void {
    this.closedError = error;
    this.disconnected = undefined;
    this.reconnector.stop();
    this.rejectWelcome(error);
    this.failPending(error);
    // Our own close ends iterations quietly; anything else ends them with the error.
    const reason = error instanceof ClosedResourceError ? undefined : error;
    this.registrations.endAll(reason);
    this.writer.drained();
    this.closedDone?.(reason);
  }

  /**
   * The established connection was lost: close for good, or reconnect (with
   * `reconnect`, once a connection was established by {@link connect}).
   */
  protected sessionLost(error: ConnectionLost): void {
    if (this.reconnect === undefined || !this.connectedOnce) {
      this.finish(error);
      return;
    }
    this.disconnected = error;
    this.failPending(error);
    this.reconnector.start(this.reconnect, error);
    this.notify(() => this.onDisconnect?.(error));
  }

  /**
   * Call an application callback once the client's own state is settled: an
   * exception it throws is the application's (uncaught, as from an event
   * listener) and cannot stop the client reconnecting.
   */
  protected notify(callback: () => void): void {
    queueMicrotask(callback);
  }

  /** A snapshot of this client's figures. */
  statistics(): ClientStatistics {
    const queues = this.registrations.queues();
    let received = 0;
    let dropped = 0;
    let missed = 0;
    for (const q of queues) {
      received += q.received;
      dropped += q.dropped;
      missed += q.missed;
    }
    return {
      published: this.writer.published,
      received,
      dropped,
      missed,
      refused: this.refused,
      subscriptions: this.registrations.subscriptionCount,
      responders: this.registrations.responderCount,
      pendingRequests: this.requests.size,
      reconnects: this.reconnector.count,
    };
  }

  /** Ask the broker again for every subscription and responder, in parallel. */
  protected async resubscribeAll(): Promise<void> {
    await Promise.all(
      this.registrations.entries().map(async ([id, registration]) => {
        if (registration instanceof Subscription) {
          registration.queue.restartSequence();
        }
        try {
          await this.requestSubscribe(id, registration.request, registration instanceof Responder);
        } catch (err) {
          if (err instanceof ConnectionClosed) {
            return; // lost again: asked for once more on the next connection
          }
          if (err instanceof RequestTimeout) {
            this.socket?.destroy(); // the broker does not answer: start over
            return;
          }
          // Refused on this connection (say, the policy changed): the subscription ends.
          this.registrations.delete(id);
          registration.end(err instanceof EventBusError ? err : undefined);
        }
      }),
    );
  }
}
