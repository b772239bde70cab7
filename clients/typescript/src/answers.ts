/**
 * The broker's answers a client waits for, by key: `sub:<id>` and
 * `unsub:<id>` (a `SubscribeAck`, an `UnsubscribeAck`, or the `Error`
 * naming the subscription), `pong:<nonce>` and `stats:<id>` (the round
 * trips of `Ping` and `StatsRequest`), each within a deadline. The Python
 * client's `client/requests.py`; the replies of request/reply wait in
 * `PendingRequests` (rpc.ts).
 *
 * @module
 */

import { RequestTimeout } from "./errors.js";

/** A waiter: settled once, by its answer or by an error. */
export interface Pending {
  resolve(value: unknown): void;
  reject(error: Error): void;
}

/** The waiters for the broker's answers, by key (see the module comment). */
export class PendingAnswers {
  private readonly pending = new Map<string, Pending>();

  /**
   * Wait for the broker's answer to `key`, asked for by `send` (called at
   * once: what it throws rejects the promise). Rejects with
   * {@link RequestTimeout} when no answer came within `timeoutMs`.
   */
  wait<T>(key: string, timeoutMs: number, send: () => void): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(key);
        reject(new RequestTimeout(`no answer from the broker within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(key, {
        resolve: (value) => {
          clearTimeout(timer);
          resolve(value as T);
        },
        reject: (error) => {
          clearTimeout(timer);
          reject(error);
        },
      });
      try {
        send();
      } catch (err) {
        this.pending.delete(key);
        clearTimeout(timer);
        reject(err as Error);
      }
    });
  }

  /** The broker answered `key` with `value`; nothing if nobody waits for it (any more). */
  resolve(key: string, value: unknown): void {
    const p = this.pending.get(key);
    if (p !== undefined) {
      this.pending.delete(key);
      p.resolve(value);
    }
  }

  /** Fail the waiter of `key` with `error`; false if nobody waits for it. */
  reject(key: string, error: Error): boolean {
    const p = this.pending.get(key);
    if (p === undefined) {
      return false;
    }
    this.pending.delete(key);
    p.reject(error);
    return true;
  }

  /** Fail every waiter with `error` (the connection is gone). */
  failAll(error: Error): void {
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const p of pending) {
      p.reject(error);
    }
  }
}
