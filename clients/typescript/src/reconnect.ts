/**
 * Reconnection with exponential back-off, sans I/O: how long to wait before
 * each attempt. The Python client (`daemoneye_eventbus/client/connection.py`,
 * `reconnect`, `reconnect_delay`, `reconnect_max_delay`) waits 0.1 s, then
 * twice as long after each failed attempt, at most 5 s; this client does the
 * same, with jitter so that the clients of a restarted broker do not all
 * come back in the same instant, and an optional bound on the attempts.
 *
 * @module
 */

/** Options of reconnection (`ClientOptions.reconnect`). */
export interface ReconnectOptions {
  /** Delay before the first attempt, in ms (default 100). */
  initialDelayMs?: number | undefined;
  /** The delay doubles after each failed attempt up to this, in ms (default 5000). */
  maxDelayMs?: number | undefined;
  /**
   * Fraction of each delay taken off at random, from 0 (none) to 1 (default
   * 0.2: each delay is between 80 % and 100 % of its nominal value).
   */
  jitter?: number | undefined;
  /**
   * Attempts in a row before the client gives up and closes, ending its
   * subscriptions with the last error (default: no limit).
   */
  maxAttempts?: number | undefined;
}

/** {@link ReconnectOptions} with every default applied and checked. */
export interface ReconnectPolicy {
  readonly initialDelayMs: number;
  readonly maxDelayMs: number;
  readonly jitter: number;
  readonly maxAttempts: number;
}

/** The defaults, as the Python client's (0.1 s doubling up to 5 s), with 20 % jitter. */
export const DEFAULT_RECONNECT: ReconnectPolicy = Object.freeze({
  initialDelayMs: 100,
  maxDelayMs: 5000,
  jitter: 0.2,
  maxAttempts: Number.POSITIVE_INFINITY,
});

/**
 * The policy for `ClientOptions.reconnect`: undefined when it is off (false,
 * or not given). Throws a `RangeError` for a negative delay, a jitter outside
 * [0, 1] or fewer than 1 attempt.
 */
export function reconnectPolicy(
  option: boolean | ReconnectOptions | undefined,
): ReconnectPolicy | undefined {
  if (option === undefined || option === false) {
    return undefined;
  }
  const given = option === true ? {} : option;
  const initialDelayMs = given.initialDelayMs ?? DEFAULT_RECONNECT.initialDelayMs;
  const maxDelayMs = given.maxDelayMs ?? Math.max(DEFAULT_RECONNECT.maxDelayMs, initialDelayMs);
  const jitter = given.jitter ?? DEFAULT_RECONNECT.jitter;
  const maxAttempts = given.maxAttempts ?? DEFAULT_RECONNECT.maxAttempts;
  if (!(initialDelayMs >= 0) || !(maxDelayMs >= initialDelayMs)) {
    throw new RangeError(
      `reconnect delays must satisfy 0 <= initialDelayMs <= maxDelayMs, got ${initialDelayMs} and ${maxDelayMs}`,
    );
  }
  if (!(jitter >= 0 && jitter <= 1)) {
    throw new RangeError(`reconnect jitter must be from 0 to 1, got ${jitter}`);
  }
  if (!(maxAttempts >= 1)) {
    throw new RangeError(`reconnect maxAttempts must be at least 1, got ${maxAttempts}`);
  }
  return Object.freeze({ initialDelayMs, maxDelayMs, jitter, maxAttempts });
}

/**
 * The delay before attempt `attempt` (0 for the first), in ms: the initial
 * delay doubled `attempt` times, at most the maximum, less a random share of
 * up to `jitter` of it. `random` returns a number in [0, 1).
 */
export function reconnectDelay(
  policy: ReconnectPolicy,
  attempt: number,
  random: () => number = Math.random,
): number {
  const nominal = Math.min(policy.initialDelayMs * 2 ** Math.min(attempt, 52), policy.maxDelayMs);
  return nominal * (1 - policy.jitter * random());
}
