/**
 * Reconnecting after a lost connection: attempt after attempt, each after
 * the back-off of the policy ({@link reconnectDelay}, reconnect.ts), until
 * one completes its handshake and has every subscription and responder
 * asked for again, the client closes, or the attempts run out (the client
 * then closes with a `ConnectionLost`).
 *
 * @module
 */

import { ConnectionClosed, ConnectionLost } from "./errors.js";
import { reconnectDelay, type ReconnectPolicy } from "./reconnect.js";

/** What a {@link Reconnector} needs from its connection. */
export interface ReconnectHost {
  /** The broker's socket path, for the error of the last attempt. */
  readonly path: string;
  /** The client is closing: stop. */
  closing(): boolean;
  /** Open a new connection and complete the handshake (rejects if it fails). */
  open(): Promise<void>;
  /** Ask the broker again for every subscription and responder. */
  resubscribe(): Promise<void>;
  /** The connection is open (it was not lost again while resubscribing). */
  connected(): boolean;
  /** Reconnected: tell the application. */
  reconnected(): void;
  /** Close the client for good, ending everything with `error`. */
  finish(error: ConnectionClosed): void;
  /** The error that ended the connection, as a `ConnectionLost`. */
  lostError(): ConnectionLost;
}

/** The reconnection loop of one client, and its wait between attempts. */
export class Reconnector {
  /** Reconnections that succeeded. */
  count = 0;
  private running: Promise<void> | undefined;
  private wake: { timer: NodeJS.Timeout; wake(): void } | undefined;

  constructor(private readonly host: ReconnectHost) {}

  /** The loop is running. */
  get active(): boolean {
    return this.running !== undefined;
  }

  /**
   * Reconnect with `policy`, the last connection lost with `lastError`
   * (nothing if the loop is running already: it goes on).
   */
  start(policy: ReconnectPolicy, lastError: unknown): void {
    this.running ??= this.loop(policy, lastError)
      .catch((err: unknown) => {
        this.host.finish(err instanceof ConnectionClosed ? err : this.host.lostError());
      })
      .finally(() => {
        this.running = undefined;
      });
  }

  /** Cut short the wait before the next attempt (the client is closing). */
  stop(): void {
    this.wake?.wake();
  }

  /** Wait `ms`, or less if {@link stop} is called. */
  private pause(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const wake = (): void => {
        clearTimeout(timer);
        this.wake = undefined;
        resolve();
      };
      const timer = setTimeout(wake, ms);
      this.wake = { timer, wake };
    });
  }

  private async loop(policy: ReconnectPolicy, lastError: unknown): Promise<void> {
    const host = this.host;
    let attempt = 0;
    while (!host.closing()) {
      if (attempt >= policy.maxAttempts) {
        const why = lastError instanceof Error ? `: ${lastError.message}` : "";
        host.finish(
          new ConnectionLost(
            `gave up reconnecting to ${host.path} after ${attempt} attempts${why}`,
            {
              cause: lastError,
            },
          ),
        );
        return;
      }
      await this.pause(reconnectDelay(policy, attempt));
      if (host.closing()) {
        return;
      }
      attempt += 1;
      try {
        await host.open();
      } catch (err) {
        lastError = err;
        continue;
      }
      if (host.closing()) {
        return;
      }
      await host.resubscribe();
      if (host.connected()) {
        this.count += 1;
        host.reconnected();
        return;
      }
      attempt = 0; // lost again at once: start over
    }
  }
}
