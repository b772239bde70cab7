/**
 * The client's writer: what it sends, batched and coalesced into few socket
 * writes ([protocol §5], "Batches"; the rules of the Python client's
 * `daemoneye_eventbus/client/writer.py`):
 *
 * - the first frame of a turn of the event loop goes to the socket at once
 *   (an event as a `PublishBatch` of one), so a lone event is never held back;
 * - the events that follow it in the same turn, while they share a topic,
 *   payload type and correlation, join one `PublishBatch` (up to 64 KiB and
 *   the broker's `max_queue_messages` events), sealed and written with
 *   everything else at the end of the turn (`setImmediate`), or at once past
 *   64 KiB;
 * - while events come in bursts (the last turn ended with a batch of
 *   several), a turn's first event waits for the end of the turn too: one
 *   write per turn;
 * - any other frame seals the open batch first, so frames leave in call order.
 *
 * Batches are used only with a broker whose `Welcome` set `batches`; without
 * it every event is its own `Publish` frame, coalesced the same way. One
 * writer serves a client for its life; each new connection is attached to it.
 *
 * @module
 */

import type * as net from "node:net";

import { BATCH_BYTES, DEFAULT_BATCH_EVENTS, PublishBatcher, batchBudget } from "./batcher.js";
import { encodePublish, type PublishHeader } from "./batcher.js";
import { ClientConnection, DEFAULT_MAX_FRAME_BYTES } from "./protocol.js";

/** Pending output is written at once past this size, otherwise at the end of the turn. */
export const FLUSH_BYTES = 64 * 1024;

/** Encodes, batches and writes what a client sends (see the module comment). */
export class Writer {
  /** The connection's state machine (replaced on each connection). */
  conn = new ClientConnection();
  /** Set once the broker said it accepts batches (in its `Welcome`). */
  batcher: PublishBatcher | undefined;
  /** Events queued since the writer was made, over every connection. */
  published = 0;
  private socket: net.Socket | undefined;
  private out: Uint8Array[] = [];
  private outBytes = 0;
  private flushScheduled: NodeJS.Immediate | undefined;
  /** The last turn ended with a batch of several events. */
  private bursting = false;
  private backedUp = false;
  private drainWaiters: (() => void)[] = [];

  /** Write to a new connection from now on (nothing is carried over). */
  attach(socket: net.Socket, conn: ClientConnection): void {
    this.detach();
    this.socket = socket;
    this.conn = conn;
  }

  /** The connection is gone: what was not written is lost, waiting writers wake. */
  detach(): void {
    this.cancelFlush();
    this.socket = undefined;
    this.out = [];
    this.outBytes = 0;
    this.batcher = undefined;
    this.bursting = false;
    this.drained();
  }

  /** The broker accepts batches of at most `maxEvents` events (0: the default). */
  enableBatches(maxFrameBytes: number, maxEvents: number): void {
    this.batcher = new PublishBatcher(
      batchBudget(maxFrameBytes),
      BATCH_BYTES,
      maxEvents || DEFAULT_BATCH_EVENTS,
    );
  }

  /** Bytes queued and not yet taken by the kernel: the open batch, our buffer, the socket's. */
  get waitingBytes(): number {
    return this.outBytes + (this.socket?.writableLength ?? 0) + (this.batcher?.pendingBytes ?? 0);
  }

  /** Frames (not counting the open batch) wait in our buffer. */
  get buffered(): boolean {
    return this.outBytes > 0;
  }

  /** The socket's buffer is over its high-water mark: publishers should wait. */
  get isBackedUp(): boolean {
    return this.backedUp;
  }

  private usable(): net.Socket | undefined {
    const socket = this.socket;
    return socket === undefined || socket.destroyed || !socket.writable ? undefined : socket;
  }

  private cancelFlush(): void {
    if (this.flushScheduled !== undefined) {
      clearImmediate(this.flushScheduled);
      this.flushScheduled = undefined;
    }
  }

  private schedule(): void {
    this.flushScheduled ??= setImmediate(() => {
      this.flushScheduled = undefined;
      this.writeNow();
    });
  }

  private push(data: Uint8Array): void {
    this.out.push(data);
    this.outBytes += data.length;
  }

  private write(socket: net.Socket, data: Uint8Array): void {
    if (!socket.write(data)) {
      this.backedUp = true;
    }
  }

  /**
   * Write what was just queued if nothing was written yet this turn (unless
   * a burst goes on), or if {@link FLUSH_BYTES} wait; what follows in the
   * turn is written at its end.
   */
  private coalesce(): void {
    if (this.flushScheduled === undefined && this.bursting) {
      this.schedule(); // in a burst, what a turn queues leaves together at its end
    } else if (this.flushScheduled === undefined || this.outBytes >= FLUSH_BYTES) {
      this.writeNow();
      this.schedule();
    }
  }

  /** Seal the open batch and write everything queued. */
  writeNow(): void {
    this.cancelFlush();
    const socket = this.usable();
    if (socket === undefined) {
      return;
    }
    this.bursting = this.seal() > 1;
    if (this.out.length === 0) {
      return;
    }
    const data = this.out.length === 1 ? this.out[0] : Buffer.concat(this.out, this.outBytes);
    this.out = [];
    this.outBytes = 0;
    if (data !== undefined) {
      this.write(socket, data);
    }
  }

  /** Queue the open batch, so that what is sent next follows it; return its events. */
  seal(): number {
    if (this.batcher !== undefined && this.conn.state === "open") {
      const sealed = this.batcher.seal();
      if (sealed !== undefined) {
        this.push(sealed.frame);
        return sealed.events;
      }
    }
    return 0;
  }

  /** Queue an encoded frame (not an event) after everything published before it. */
  send(data: Uint8Array): void {
    this.seal();
    this.push(data);
    this.coalesce();
  }

  /**
   * Queue one event (the first of a turn alone, the rest of the turn in a
   * batch) and see that it is written. `correlation` is a serialized
   * `CorrelationMetadata`. Throws `LimitExceeded` for an event too large to
   * be delivered under the broker's frame limit; nothing is queued then.
   */
  queuePublish(header: PublishHeader, payload: Uint8Array, correlation?: Uint8Array): void {
    const batcher = this.batcher;
    if (batcher === undefined) {
      // A broker without batches: one Publish frame per event.
      const max = this.conn.maxFrameBytes || DEFAULT_MAX_FRAME_BYTES;
      this.push(encodePublish(header, payload, correlation, max));
    } else if (this.flushScheduled === undefined && !this.bursting && batcher.pendingEvents === 0) {
      // The first event of a turn is written at once, alone. Nothing waits in
      // our buffer while no write is scheduled, so it keeps its place.
      const frame = batcher.single(header, payload, correlation);
      const socket = this.usable();
      if (socket !== undefined) {
        this.write(socket, frame);
      }
      this.schedule();
    } else {
      const sealed = batcher.add(header, payload, correlation);
      if (sealed !== undefined) {
        this.push(sealed.frame);
      }
    }
    this.published += 1;
    if (this.flushScheduled === undefined || this.outBytes >= FLUSH_BYTES) {
      this.coalesce();
    }
  }

  /** The socket took its buffer below the low-water mark. */
  drained(): void {
    this.backedUp = false;
    for (const wake of this.drainWaiters.splice(0)) {
      wake();
    }
  }

  /** Wait while the socket is backed up (returns at once when the connection goes). */
  async waitDrain(): Promise<void> {
    while (this.backedUp && this.usable() !== undefined && this.conn.state === "open") {
      await new Promise<void>((resolve) => this.drainWaiters.push(resolve));
    }
  }
}
