import { randomBytes } from 'node:crypto';
import { z } from 'zod';
import type { BrokerSubscription, ControlBus } from '../brokers/broker.ts';
import { RelayError, isErrorCode } from '../errors.ts';
import { type AdoptedSession, type PeerStats, type RelayCore, type SessionPeers, type SessionSnapshot, type UpdateRequest, type UpdateResult } from '../relay.ts';
import type { Principal } from '../auth.ts';
import type { ScaleOutOptions } from '../options.ts';
import { REJECT_REASONS } from '../limits.ts';
import { fromWire, toWire, type WireError } from '../wire-error.ts';
import { CONTROL_TOPIC_PREFIX, NODE_TAG_BYTES, nodeOfSession } from './node-id.ts';
import { sharedControlBus } from './shared-bus.ts';

/**
 * Scale-out: many relays (nodes) behind a plain load balancer, over the user's own broker.
 *
 * - A session lives on one node, named in its id (the node's tag before the random part).
 * - Nodes talk over the broker's control bus: `livepipe-control.all` (heartbeats, session
 *   records) and `livepipe-control.<node>` (requests to one node). Nothing there is retained
 *   and nothing outlives a node's broker connection, so a crashed node leaves nothing behind.
 * - Every node keeps a small record (topics, identity, owner) of every session, sent by its
 *   owner when the session opens or changes, so that a client whose node died can resume its
 *   subscriptions anywhere. A new node asks the others for theirs when it starts.
 * - update_subscriptions for another node's session goes to the owner, which applies it.
 * - A stream that resumes another node's session takes the session over: a live owner hands
 *   it over with the messages the client has not received; a gone owner's session is restored
 *   from its record, with `events-lost` for what was published meanwhile.
 */

const ALL = `${CONTROL_TOPIC_PREFIX}all`;
const MISSED_BEATS = 3;
/** How many times a hand-over request follows a session that moved on meanwhile. */
const MAX_HOPS = 3;
/** Records per message when a node sends all of its sessions to a new one. */
const RECORDS_PER_MESSAGE = 500;

// Node-to-node messages, checked on arrival: anything on the broker can publish to these topics.
const count = z.number().int().nonnegative();
const text = z.string();
const wireError = z.object({
  code: z.string().refine(isErrorCode),
  message: text,
  topic: text.optional(),
  count: count.optional(),
  reason: z.enum(REJECT_REASONS).optional(),
  retryAfterSec: z.number().optional(),
}) satisfies z.ZodType<WireError>;
/** An encoded envelope goes onto a client's stream as is: one `data:` line, never a line break that could add SSE fields. */
const oneLine = z.string().regex(/^[^\r\n]*$/);
const wireRecord = z.object({ id: text, topics: z.array(text), identity: text.optional() });
const updateRequest = z.object({ sessionId: text, add: z.array(text), remove: z.array(text) });
const updateResult = z.object({ session_id: text, subscriptions: z.array(text), failed: z.array(z.object({ topic: text, code: text, message: text })) });
const BODY = z.discriminatedUnion('t', [
  z.object({ t: z.literal('hello') }),
  z.object({ t: z.literal('beat') }),
  z.object({ t: z.literal('bye') }),
  z.object({ t: z.literal('held'), records: z.array(wireRecord) }),
  z.object({ t: z.literal('dropped'), ids: z.array(text) }),
  z.object({ t: z.literal('take'), ref: count, id: text, seq: count.optional(), identity: text.optional() }),
  z.object({ t: z.literal('taken'), ref: count, movedTo: text.optional(), topics: z.array(text).optional(), missed: z.array(z.tuple([text, oneLine, z.number()])).optional(), incomplete: z.boolean().optional(), error: wireError.optional() }),
  z.object({ t: z.literal('update'), ref: count, request: updateRequest, identity: text.optional() }),
  z.object({ t: z.literal('updated'), ref: count, result: updateResult.optional(), error: wireError.optional() }),
]);
const ENVELOPE = z.intersection(BODY, z.object({ from: text }));

type WireRecord = z.infer<typeof wireRecord>;
type Body = z.infer<typeof BODY>;
type Envelope = z.infer<typeof ENVELOPE>;
type Reply = Extract<Body, { t: 'taken' } | { t: 'updated' }>;

interface SessionRecord {
  owner: string;
  topics: string[];
  identity: string | undefined;
}

export class Peers implements SessionPeers {
  /** This node's name, also the start of its session ids. */
  readonly node: string;
  private readonly core: RelayCore;
  private readonly bus: ControlBus;
  private readonly heartbeatMs: number;
  private readonly requestTimeoutMs: number;
  private readonly log: ScaleOutOptions['log'];
  private readonly records = new Map<string, SessionRecord>();
  /** When each other node was last heard from; `gone` once it said goodbye. */
  private readonly nodes = new Map<string, { lastSeen: number; gone: boolean }>();
  private readonly pending = new Map<number, { settle: (reply: Reply | undefined) => void; timer: NodeJS.Timeout }>();
  private readonly subscriptions: BrokerSubscription[] = [];
  private readonly startedAt = Date.now();
  /** Sessions this node handed over recently, and to whom: a late request for one is sent on there. */
  private readonly movedTo = new Map<string, { node: string; at: number }>();
  private outgoing = { held: new Map<string, WireRecord>(), dropped: new Set<string>(), scheduled: false };
  private readonly counters = { handedOver: 0, restored: 0, given: 0, updatesForwarded: 0, unanswered: 0 };
  private timer: NodeJS.Timeout | undefined;
  private nextRef = 0;
  private closed = false;

  constructor(core: RelayCore, bus: ControlBus, node: string, options: ScaleOutOptions) {
    this.core = core;
    this.bus = bus;
    this.node = node;
    this.heartbeatMs = options.heartbeatMs ?? 1000;
    this.requestTimeoutMs = options.requestTimeoutMs ?? 2000;
    this.log = options.log;
  }

  /** Subscribes the control topics, announces this node and starts its heartbeat. */
  async start(): Promise<void> {
    const listener = {
      message: (body: Uint8Array) => this.receive(body),
      error: (error: RelayError) => this.log?.('warn', `node-to-node messages are interrupted: ${error.message}`),
      // What was broadcast meanwhile is lost: ask the other nodes for their sessions again.
      recovered: () => void this.send(ALL, { t: 'hello' }).catch(() => {}),
    };
    for (const topic of [ALL, `${CONTROL_TOPIC_PREFIX}${this.node}`]) this.subscriptions.push(await this.bus.subscribe(topic, listener));
    await this.send(ALL, { t: 'hello' });
    this.timer = setInterval(() => this.beat(), this.heartbeatMs);
    this.timer.unref();
  }

  async adopt(sessionId: string, seq: number | undefined, identity: string | undefined): Promise<AdoptedSession | undefined> {
    const record = this.records.get(sessionId);
    const owner = record?.owner ?? nodeOfSession(sessionId);
    // This node's own session that it no longer holds has expired.
    if (this.closed || owner === undefined || owner === this.node) return undefined;
    // A session handed over meanwhile (the client reconnected twice at once) is followed to its new node.
    for (let hop = 0, at = owner; hop < MAX_HOPS && at !== this.node && this.mayAnswer(at); hop++) {
      const reply = await this.request(at, { t: 'take', ref: 0, id: sessionId, seq, identity });
      if (reply?.t !== 'taken') break;
      if (reply.error !== undefined) throw fromWire(reply.error);
      if (reply.movedTo !== undefined) {
        at = reply.movedTo;
        continue;
      }
      this.records.delete(sessionId);
      // The owner no longer has it: it expired there.
      if (reply.topics === undefined) return undefined;
      this.counters.handedOver++;
      return {
        id: sessionId,
        topics: reply.topics,
        missed: (reply.missed ?? []).map(([topic, envelope, receivedAt]) => ({ topic, envelope, receivedAt })),
        lost: reply.incomplete ? 'some events published while this client was away are no longer held by the relay' : undefined,
      };
    }
    if (record === undefined) return undefined;
    if (record.identity !== identity) throw new RelayError('forbidden', 'this session was opened by another identity: open a new stream');
    this.records.delete(sessionId);
    this.counters.restored++;
    return { id: sessionId, topics: record.topics, missed: [], lost: 'the relay node that held this session stopped; events published on its topics since then may be lost' };
  }

  /** Sends an update of another node's session to that node; undefined when no other node holds it. */
  forwardUpdate(request: UpdateRequest, principal: Principal | undefined): Promise<UpdateResult> | undefined {
    if (this.core.holds(request.sessionId)) return undefined;
    const owner = this.records.get(request.sessionId)?.owner ?? nodeOfSession(request.sessionId);
    if (this.closed || owner === undefined || owner === this.node) return undefined;
    return this.updateAt(owner, request, principal);
  }

  held(session: SessionSnapshot): void {
    this.outgoing.held.set(session.id, toWireRecord(session));
    this.outgoing.dropped.delete(session.id);
    this.sendSoon();
  }

  dropped(sessionId: string): void {
    this.outgoing.held.delete(sessionId);
    this.outgoing.dropped.add(sessionId);
    this.sendSoon();
  }

  /** Record changes go out once per event-loop turn, together: a burst of opens is a few messages, not one each. */
  private sendSoon(): void {
    if (this.outgoing.scheduled) return;
    this.outgoing.scheduled = true;
    setImmediate(() => {
      const { held, dropped } = this.outgoing;
      this.outgoing = { held: new Map(), dropped: new Set(), scheduled: false };
      const records = [...held.values()];
      for (let i = 0; i < records.length; i += RECORDS_PER_MESSAGE) this.broadcast({ t: 'held', records: records.slice(i, i + RECORDS_PER_MESSAGE) });
      if (dropped.size > 0) this.broadcast({ t: 'dropped', ids: [...dropped] });
    });
  }

  stats(): PeerStats {
    const now = Date.now();
    let nodes = 0;
    for (const seen of this.nodes.values()) if (!seen.gone && now - seen.lastSeen < MISSED_BEATS * this.heartbeatMs) nodes++;
    return { nodes, records: this.records.size, ...this.counters };
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.timer);
    for (const [ref, call] of this.pending) {
      clearTimeout(call.timer);
      call.settle(undefined);
      this.pending.delete(ref);
    }
    // The others restore this node's sessions from their records without waiting for its heartbeat to stop.
    await this.send(ALL, { t: 'bye' }).catch(() => {});
    await Promise.all(this.subscriptions.map((s) => s.close().catch(() => {})));
  }

  private async updateAt(owner: string, request: UpdateRequest, principal: Principal | undefined): Promise<UpdateResult> {
    // The bearer's grants are checked here (the owner gets only its identity): tokens never travel over the broker.
    const auth = this.core.auth;
    if (auth !== undefined && principal !== undefined) {
      auth.assertCurrent(principal);
      const refused = await auth.denied(principal, 'subscribe', request.add);
      if (refused.length > 0) throw new RelayError('forbidden', refused.map((r) => r.message).join('; '), { topic: refused[0]!.topic! });
    }
    this.counters.updatesForwarded++;
    // Asked even when silent for a while (only a goodbye is final): a slow node is not a dead one, and an update has no other way to succeed.
    const reply = this.nodes.get(owner)?.gone ? undefined : await this.request(owner, { t: 'update', ref: 0, request, identity: principal?.identity });
    if (reply?.t !== 'updated') {
      throw new RelayError('broker-unavailable', 'the relay node that holds this session does not answer; reconnect the stream (it resumes on another node), then retry');
    }
    if (reply.error !== undefined) throw fromWire(reply.error);
    return reply.result!;
  }

  /** A node heard from recently, or one not heard of yet while this node has just started. */
  private mayAnswer(node: string): boolean {
    const now = Date.now();
    const seen = this.nodes.get(node);
    if (seen === undefined) return now - this.startedAt < MISSED_BEATS * this.heartbeatMs;
    return !seen.gone && now - seen.lastSeen < MISSED_BEATS * this.heartbeatMs;
  }

  private beat(): void {
    this.broadcast({ t: 'beat' });
    // A gone node's sessions could be resumed for as long as they would have lived there.
    const now = Date.now();
    const ttl = this.core.options.sessionTtlMs;
    for (const [id, moved] of this.movedTo) if (now - moved.at >= ttl) this.movedTo.delete(id);
    const expired = new Set<string>();
    for (const [node, seen] of this.nodes) {
      if ((seen.gone || now - seen.lastSeen >= MISSED_BEATS * this.heartbeatMs) && now - seen.lastSeen >= ttl) expired.add(node);
    }
    if (expired.size === 0) return;
    for (const [id, record] of this.records) if (expired.has(record.owner)) this.records.delete(id);
    for (const node of expired) this.nodes.delete(node);
  }

  private receive(bytes: Uint8Array): void {
    let message: Envelope;
    try {
      const parsed: unknown = JSON.parse(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('utf8'));
      // This node's own broadcasts come back to it: dropped before the (costlier) check.
      if ((parsed as { from?: unknown } | null)?.from === this.node) return;
      message = ENVELOPE.parse(parsed);
    } catch {
      this.log?.('warn', 'ignored a malformed node-to-node message');
      return;
    }
    const from = message.from;
    if (message.t !== 'bye') this.nodes.set(from, { lastSeen: Date.now(), gone: false });
    switch (message.t) {
      case 'hello':
        void this.sendRecords(from);
        return;
      case 'bye':
        this.nodes.set(from, { lastSeen: Date.now(), gone: true });
        return;
      case 'held':
        for (const r of message.records) {
          // Another node restored a session this one still holds (it thought this node gone): the newer copy wins.
          if (this.core.holds(r.id)) this.giveUp(r.id, r.identity);
          this.records.set(r.id, { owner: from, topics: r.topics, identity: r.identity });
        }
        return;
      case 'dropped':
        for (const id of message.ids) if (this.records.get(id)?.owner === from) this.records.delete(id);
        return;
      case 'take':
        this.answerTake(from, message);
        return;
      case 'update':
        void this.answerUpdate(from, message);
        return;
      case 'taken':
      case 'updated': {
        const call = this.pending.get(message.ref);
        if (call === undefined) return;
        this.pending.delete(message.ref);
        clearTimeout(call.timer);
        call.settle(message);
        return;
      }
      case 'beat':
        return;
    }
  }

  private giveUp(sessionId: string, identity: string | undefined): void {
    try {
      this.core.handOver(sessionId, undefined, identity);
      this.log?.('warn', 'a session was restored on another node while this one still held it (it was thought gone); this node let it go');
    } catch (err) {
      this.log?.('warn', 'another node claims a session of this one for another identity; ignored', { error: (err as Error).message });
    }
  }

  private answerTake(to: string, message: Extract<Body, { t: 'take' }>): void {
    let reply: Extract<Body, { t: 'taken' }>;
    try {
      const given = this.core.handOver(message.id, message.seq, message.identity);
      if (given !== undefined) {
        this.counters.given++;
        this.movedTo.set(message.id, { node: to, at: Date.now() });
      }
      const moved = this.movedTo.get(message.id)?.node;
      reply =
        given === undefined
          ? { t: 'taken', ref: message.ref, ...(moved === undefined ? {} : { movedTo: moved }) }
          : {
              t: 'taken',
              ref: message.ref,
              topics: given.topics,
              missed: given.missed.map((m) => [m.topic, m.envelope().toString('utf8'), m.receivedAt]),
              incomplete: given.incomplete,
            };
    } catch (err) {
      reply = { t: 'taken', ref: message.ref, error: toWire(err) };
    }
    void this.send(direct(to), reply).catch((err: unknown) => this.log?.('warn', `could not hand session ${message.id} over to node ${to}: ${(err as Error).message}`));
  }

  private async answerUpdate(to: string, message: Extract<Body, { t: 'update' }>): Promise<void> {
    let reply: Extract<Body, { t: 'updated' }>;
    try {
      reply = { t: 'updated', ref: message.ref, result: await this.core.updateForwarded(message.request, message.identity) };
    } catch (err) {
      reply = { t: 'updated', ref: message.ref, error: toWire(err) };
    }
    await this.send(direct(to), reply).catch(() => {});
  }

  /** Tells a new node about every session this one holds. */
  private async sendRecords(to: string): Promise<void> {
    await this.send(direct(to), { t: 'beat' }).catch(() => {});
    const all = this.core.snapshots().map(toWireRecord);
    for (let i = 0; i < all.length; i += RECORDS_PER_MESSAGE) {
      await this.send(direct(to), { t: 'held', records: all.slice(i, i + RECORDS_PER_MESSAGE) }).catch(() => {});
    }
  }

  /** Asks `node` and waits for its answer; undefined when none came in time. */
  private request(node: string, body: Extract<Body, { t: 'take' } | { t: 'update' }>): Promise<Reply | undefined> {
    return new Promise((resolve) => {
      const ref = this.nextRef++;
      const timer = setTimeout(() => {
        this.pending.delete(ref);
        this.counters.unanswered++;
        resolve(undefined);
      }, this.requestTimeoutMs);
      this.pending.set(ref, { settle: resolve, timer });
      this.send(direct(node), { ...body, ref }).catch(() => {
        clearTimeout(timer);
        this.pending.delete(ref);
        resolve(undefined);
      });
    });
  }

  private broadcast(body: Body): void {
    if (this.closed) return;
    this.send(ALL, body).catch((err: unknown) => this.log?.('warn', `could not tell the other nodes (${body.t}): ${(err as Error).message}`));
  }

  private send(topic: string, body: Body): Promise<void> {
    return this.bus.publish(topic, Buffer.from(JSON.stringify({ ...body, from: this.node })));
  }
}

function direct(node: string): string {
  return `${CONTROL_TOPIC_PREFIX}${node}`;
}

function toWireRecord(session: SessionSnapshot): WireRecord {
  return session.identity === undefined ? { id: session.id, topics: session.topics } : session;
}

/** Makes `core` one node of several over its broker. */
export async function joinPeers(core: RelayCore, options: ScaleOutOptions): Promise<Peers> {
  if (core.broker.competingReaders) {
    throw new RelayError('bad-request', `scale-out needs a broker that gives every node each message; ${core.broker.scheme}:// splits them between its readers`);
  }
  const bus = core.broker.control ?? sharedControlBus(core.broker);
  const tag = randomBytes(NODE_TAG_BYTES);
  const peers = new Peers(core, bus, tag.toString('base64url'), options);
  core.sessionIdPrefix = tag;
  core.peers = peers;
  const forward = core.forwardUpdate;
  core.forwardUpdate = (request, principal) => forward?.(request, principal) ?? peers.forwardUpdate(request, principal);
  await peers.start();
  return peers;
}
