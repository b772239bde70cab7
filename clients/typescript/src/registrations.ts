/**
 * What a client asked the broker for and keeps asking for after a
 * reconnection: its subscriptions and its responders, by subscription id
 * (one numbering for both, as on the wire).
 *
 * @module
 */

import type { DescMessage } from "@bufbuild/protobuf";

import type { EventBusError } from "./errors.js";
import type { EventQueue } from "./events.js";
import type { Responder } from "./rpc.js";
import type { Subscription } from "./subscription.js";

/** A subscription or a responder: what the broker is asked for again after a reconnection. */
export type Registration = Subscription<DescMessage> | Responder;

/** The subscriptions and responders of a client, by subscription id. */
export class Registrations {
  private readonly subs = new Map<number, Subscription<DescMessage>>();
  private readonly responders = new Map<number, Responder>();
  private nextId = 1;

  /** A new subscription id, for a subscription or a responder. */
  newId(): number {
    return this.nextId++;
  }

  /** Subscriptions registered. */
  get subscriptionCount(): number {
    return this.subs.size;
  }

  /** Responders registered. */
  get responderCount(): number {
    return this.responders.size;
  }

  /** The event queues of the subscriptions, each once. */
  queues(): Set<EventQueue<DescMessage>> {
    return new Set([...this.subs.values()].map((s) => s.queue));
  }

  subscription(id: number): Subscription<DescMessage> | undefined {
    return this.subs.get(id);
  }

  responder(id: number): Responder | undefined {
    return this.responders.get(id);
  }

  /** The subscription or responder `id`. */
  get(id: number): Registration | undefined {
    return this.subs.get(id) ?? this.responders.get(id);
  }

  addSubscription(sub: Subscription<DescMessage>): void {
    this.subs.set(sub.subscriptionId, sub);
  }

  addResponder(responder: Responder): void {
    this.responders.set(responder.subscriptionId, responder);
  }

  /** Forget `sub` if it is still registered; false if it was not (it ended already). */
  removeSubscription<Desc extends DescMessage>(sub: Subscription<Desc>): boolean {
    const id = sub.subscriptionId;
    return this.subs.get(id) === (sub as unknown) && this.subs.delete(id);
  }

  /** Forget `responder` if it is still registered; false if it was not (it ended already). */
  removeResponder(responder: Responder): boolean {
    const id = responder.subscriptionId;
    return this.responders.get(id) === responder && this.responders.delete(id);
  }

  /** Forget the subscription or responder `id`, whichever it is. */
  delete(id: number): void {
    this.subs.delete(id);
    this.responders.delete(id);
  }

  /** Every registration with its id: the subscriptions, then the responders. */
  entries(): [number, Registration][] {
    return [...this.subs, ...this.responders];
  }

  /** A new connection: the requests the responders hold from the old one cannot be answered. */
  restartResponders(): void {
    for (const responder of this.responders.values()) {
      responder.restart();
    }
  }

  /** Forget every registration and end it (with `reason`, if given). */
  endAll(reason: EventBusError | undefined): void {
    const registrations: Registration[] = [...this.subs.values(), ...this.responders.values()];
    this.subs.clear();
    this.responders.clear();
    for (const registration of registrations) {
      registration.end(reason);
    }
  }
}
