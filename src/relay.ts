import { Authorizer, type Credentials, type Principal } from './auth.ts';
import { openBroker, type Broker } from './brokers/index.ts';
import type { ConnectionStats, QueuedConnection } from './connection.ts';
import { RelayError } from './errors.ts';
import { RelayMessage, eventId, parseEventId, topicTag, type ParsedEventId } from './frames.ts';
import { Hub } from './hub.ts';
import { CONTROL_TOPIC_PREFIX, SHARED_CONTROL_TOPIC, isControlTopic } from './scaleout/node-id.ts';
import { joinPeers } from './scaleout/peers.ts';
import { Limits, checkLimitOptions, type ConnectionSlot } from './limits.ts';
import { resolveOptions, type RelayOptions, type ResolvedOptions } from './options.ts';
import { Session, newSessionId } from './session.ts';
import { assertTopic, parseTopicList } from './topics.ts';
import { SPAN_KIND, describeStream, traced } from './tracer.ts';

/** What a client asks for when it opens a stream. */
export interface StreamRequest {
  /** The raw `topics=` query value. */
  topics: string | null;
  /** The `session_id=` query value. */
  sessionId: string | null;
  /** The `Last-Event-ID` header (or `last_event_id=` query). */
  lastEventId: string | null;
  /** The client's address (see `Limits.clientAddress`), for the per-address stream cap; none applies when unknown. */
  clientAddress?: string | undefined;
  /** Where the bearer token may be (with `auth` set; the cookie only where it may count, see Credentials). */
  credentials?: Credentials | undefined;
}

export interface UpdateRequest {
  sessionId: string;
  add: string[];
  remove: string[];
}

export interface UpdateResult {
  session_id: string;
  subscriptions: string[];
  failed: Array<{ topic: string; code: string; message: string }>;
}

/** A session another node held, taken over by this one (src/scaleout). */
export interface AdoptedSession {
  id: string;
  topics: string[];
  /** Messages the client had not received (oldest first): handed over by a live owner as encoded there, or read back from the broker. */
  missed: Array<{ topic: string; envelope: string; receivedAt: number; position?: number | undefined }>;
  /** Set when messages may have been lost: the owner was gone, or its history no longer held all of them. */
  lost: string | undefined;
}

/** What a session record says about a session, for the other nodes. */
export interface SessionSnapshot {
  id: string;
  topics: string[];
  identity: string | undefined;
}

/** The other nodes of a scaled-out deployment, as the relay sees them (src/scaleout/peers.ts). */
export interface SessionPeers {
  /**
   * Takes over a session that another node holds or held; undefined when no node knows it.
   * Throws `forbidden` when it belongs to another identity.
   */
  adopt(sessionId: string, seq: number | undefined, identity: string | undefined): Promise<AdoptedSession | undefined>;
  /** This node now holds `session` (opened, changed, taken over). */
  held(session: SessionSnapshot): void;
  /** This node dropped the session (it expired). */
  dropped(sessionId: string): void;
  /** Leaves the other nodes (on a clean shutdown, before the broker closes). */
  close(): Promise<void>;
  /** For the metrics. */
  stats(): PeerStats;
}

export interface PeerStats {
  /** Other nodes heard from within three heartbeats. */
  nodes: number;
  /** Session records of other nodes held here. */
  records: number;
  /** Sessions taken over from other nodes: handed over by a live owner, or restored from a record. */
  handedOver: number;
  restored: number;
  /** Sessions this node gave to other nodes. */
  given: number;
  /** Updates sent to the node that holds their session. */
  updatesForwarded: number;
  /** Requests to other nodes that got no answer in time. */
  unanswered: number;
}

export interface RelayStats {
  connections: Record<string, number>;
  sessions: number;
  topics: number;
  messagesIn: number;
  messagesDelivered: number;
  messagesDropped: number;
  brokerErrors: number;
  /** Broker subscriptions that recovered after an outage (one per topic per recovery). */
  brokerReconnects: number;
}

export interface CloseOptions {
  /**
   * Tell clients to reconnect within this many ms (each one a random delay up to it, so they do
   * not all arrive at once): SSE streams get a `retry:` line before they end. Without it, SSE
   * clients wait their usual retry delay. WebSocket clients get close code 1001 either way.
   */
  reconnectDelayMs?: number;
  /**
   * With scale-out: how long to wait for other nodes to take this node's sessions over (their
   * clients reconnect there), so that nothing published meanwhile is lost. Default: the
   * reconnect delay (or retryMs) plus one second.
   */
  handOverMs?: number;
}

const HAND_OVER_MARGIN_MS = 1000;

/**
 * The transport-independent relay: sessions, subscriptions, resume and publishing. The HTTP
 * adapters (node:http, fetch) and transports build on it.
 */
export class RelayCore {
  readonly broker: Broker;
  readonly options: ResolvedOptions;
  readonly hub: Hub;
  readonly deliveries: ConnectionStats = { delivered: 0, dropped: 0 };
  readonly limits: Limits;
  private readonly sessions = new Map<string, Session>();
  private readonly connections = new Set<QueuedConnection>();
  /** Open connections by transport, kept as they come and go so that stats() does not walk them all. */
  private readonly openByTransport = new Map<string, number>();
  /** Each connection's stream slot, so that a resume from the same address can take over its slot. */
  private readonly slots = new WeakMap<QueuedConnection, ConnectionSlot>();
  private readonly ownsBroker: boolean;
  private readonly sweeper: NodeJS.Timeout;
  private closing = false;
  /** Told how long each update_subscriptions took, in seconds, and whether it succeeded (the metrics' latency histogram). */
  updateTimed: ((seconds: number, ok: boolean) => void) | undefined;
  /**
   * Set in a cluster worker (src/server/cluster.ts): applies an update to a session that another
   * worker owns there, and answers with that worker's result; undefined for this process's own.
   */
  forwardUpdate: ((request: UpdateRequest, principal: Principal | undefined) => Promise<UpdateResult> | undefined) | undefined;

  /** Authorization (PROTOCOL.md section 6); undefined when the relay is open. */
  readonly auth: Authorizer | undefined;
  /** Set when this relay is one node of several (src/scaleout): sessions move between nodes. */
  peers: SessionPeers | undefined;
  /** Bytes before the random part of new session ids: the node's tag when scaled out (else the process-wide prefix). */
  sessionIdPrefix: Buffer | undefined;

  constructor(broker: Broker, ownsBroker: boolean, options: ResolvedOptions, auth?: Authorizer) {
    this.auth = auth;
    this.broker = broker;
    this.ownsBroker = ownsBroker;
    this.options = options;
    this.limits = new Limits(options.limits);
    this.hub = new Hub(broker, {
      history: options.history,
      topicGraceMs: options.topicGraceMs,
      embedJsonPayloads: options.embedJsonPayloads,
    });
    // One timer for every connection's heartbeat and every topic's history expiry.
    const every = Math.max(50, Math.floor(options.heartbeatMs / 2));
    this.sweeper = setInterval(() => this.sweep(every), every);
    this.sweeper.unref();
  }

  get isClosing(): boolean {
    return this.closing;
  }

  /** Ready to serve: the broker is connected and the relay is not shutting down. */
  isReady(): boolean {
    return !this.closing && this.broker.isConnected();
  }

  /**
   * Opens a stream: resumes the session named by Last-Event-ID or session_id if it still
   * exists, else creates one subscribed to `topics`. Throws a RelayError before anything is
   * written when the request is bad; `connect` creates the transport's connection once the
   * request is known to be good.
   */
  async openStream(request: StreamRequest, connect: (session: Session, principal: Principal | undefined) => QueuedConnection): Promise<QueuedConnection> {
    const held: { slot?: ConnectionSlot } = {};
    try {
      return await traced(this.options.tracer, 'livepipe.stream.open', SPAN_KIND.server, (span) => this.attach(request, describeStream(span, request, connect), held));
    } catch (err) {
      // An open that fails at any step holds no stream slot.
      held.slot?.release();
      throw err;
    }
  }

  private async attach(request: StreamRequest, connect: (session: Session, principal: Principal | undefined) => QueuedConnection, held: { slot?: ConnectionSlot }): Promise<QueuedConnection> {
    if (this.closing) throw new RelayError('broker-unavailable', 'the relay is shutting down; reconnect to another instance');
    const urlTopics = parseTopicList(request.topics);
    const fromEventId = parseEventId(request.lastEventId);
    // Once per stream: what the bearer may do is not looked at again per message.
    const principal = await this.authenticate(request.credentials ?? {});
    let resumable = (fromEventId && this.sessions.get(fromEventId.sessionId)) || (request.sessionId ? this.sessions.get(request.sessionId) : undefined);
    // Another node's session: it moves here (with what its owner still held for the client).
    const adopted = resumable === undefined ? await this.adopt(fromEventId, request.sessionId, principal) : undefined;

    let session: Session;
    let position: number;
    const failures: RelayError[] = [];
    if (resumable !== undefined && principal !== undefined) {
      // A session answers only to the identity that opened it: a refused resume changes nothing.
      if (resumable.identity !== principal.identity) throw new RelayError('forbidden', 'this session was opened by another identity: open a new stream');
      // Grants may have shrunk since the session was opened (a new token, a callout that changed its mind).
      const revoked = await this.auth!.denied(principal, 'subscribe', [...resumable.topics.keys()]);
      if (this.sessions.get(resumable.id) !== resumable) {
        resumable = undefined; // it expired meanwhile: a new session follows
      } else {
        for (const refusal of revoked) {
          if (resumable.topics.delete(refusal.topic!)) this.hub.unsubscribe(resumable, refusal.topic!);
          failures.push(refusal);
        }
      }
    }
    if (resumable !== undefined) {
      session = resumable;
      position = fromEventId?.sessionId === session.id ? Math.min(fromEventId.seq, this.hub.lastSeq) : session.position;
      // Taken before anything changes (a refused resume leaves the old connection alone), and
      // before any await, so that concurrent opens from one address cannot all pass the cap.
      held.slot = this.limits.openConnection(request.clientAddress, session.connection && this.slots.get(session.connection));
      // The newest connection wins: a half-dead older one is ended first.
      session.connection?.close();
      this.cancelExpiry(session);
    } else if (adopted !== undefined) {
      this.limits.checkSessions(this.sessions.size);
      held.slot = this.limits.openConnection(request.clientAddress);
      session = new Session(adopted.id, this.hub.lastSeq, principal?.identity);
      position = session.position;
      this.sessions.set(session.id, session);
      failures.push(...(await this.addTopics(session, adopted.topics)));
      // Subscribed first: what the broker still holds reaches back to where the client was, and live delivery carries on from there.
      if (adopted.lost !== undefined && fromEventId?.position !== undefined) await this.recoverFromBroker(adopted, session, fromEventId);
      this.peers?.held(snapshot(session));
    } else {
      this.checkTopics(urlTopics);
      this.checkTopicCap(urlTopics.length);
      // Denied topics get a `forbidden` error event; the others proceed.
      const refused = principal === undefined ? [] : await this.auth!.denied(principal, 'subscribe', urlTopics);
      this.limits.checkSessions(this.sessions.size);
      held.slot = this.limits.openConnection(request.clientAddress);
      session = new Session(newSessionId(this.sessionIdPrefix), this.hub.lastSeq, principal?.identity);
      position = session.position;
      this.sessions.set(session.id, session);
      failures.push(...refused, ...(await this.addTopics(session, urlTopics.filter((t) => !refused.some((r) => r.topic === t)))));
      this.peers?.held(snapshot(session));
    }
    if (this.closing) {
      // close() ran during an await above: it ended every stream it knew of, and would never end this one.
      if (resumable === undefined) this.sessions.delete(session.id);
      throw new RelayError('broker-unavailable', 'the relay is shutting down; reconnect to another instance');
    }

    const connection = connect(session, principal);
    this.connections.add(connection);
    this.openByTransport.set(connection.transport, (this.openByTransport.get(connection.transport) ?? 0) + 1);
    const slot = held.slot!;
    this.slots.set(connection, slot);
    if (connection.isClosed) {
      // The client left while its subscriptions were being set up.
      slot.release();
      this.detach(session, connection);
      return connection;
    }
    connection.onClose = () => {
      slot.release();
      this.detach(session, connection);
    };
    connection.open(
      {
        session_id: session.id,
        subscriptions: [...session.topics.keys()],
        resumed: resumable !== undefined || adopted !== undefined,
        heartbeat_ms: this.options.heartbeatMs,
        session_ttl_ms: this.options.sessionTtlMs,
      },
      // A fresh position also names the broker's, so that a client that saw no message yet can resume on another node from the broker.
      eventId(session.id, position, position === this.hub.lastSeq ? this.hub.position : undefined),
      this.options.retryMs,
    );
    for (const failure of failures) connection.sendError(failure);
    if (adopted !== undefined) this.replayAdopted(adopted, position, connection);
    this.replay(session, position, connection);
    if (!connection.isClosed) session.connection = connection;
    return connection;
  }

  /**
   * Applies a subscription change atomically: a rejected request changes nothing. With auth on,
   * `principal` is who asks (from `authenticate`); without one the call is the app's own, trusted.
   */
  async updateSubscriptions(request: UpdateRequest, principal?: Principal): Promise<UpdateResult> {
    const forwarded = this.forwardUpdate?.(request, principal);
    if (forwarded !== undefined) return forwarded;
    return this.updateHere(request, principal);
  }

  private async updateHere(request: UpdateRequest, principal?: Principal): Promise<UpdateResult> {
    const started = performance.now();
    let ok = false;
    try {
      const result = await traced(this.options.tracer, 'livepipe.update_subscriptions', SPAN_KIND.server, async (span) => {
        span.setAttributes({ 'livepipe.topics.add': request.add.length, 'livepipe.topics.remove': request.remove.length });
        const result = await this.applyUpdate(request, principal);
        span.setAttributes({ 'livepipe.topics.count': result.subscriptions.length, 'livepipe.topics.failed': result.failed.length });
        return result;
      });
      ok = true;
      return result;
    } finally {
      this.updateTimed?.((performance.now() - started) / 1000, ok);
    }
  }

  private async applyUpdate(request: UpdateRequest, principal?: Principal): Promise<UpdateResult> {
    const session = this.sessions.get(request.sessionId);
    if (session === undefined) throw new RelayError('unknown-session', 'no such session (it may have expired); open a new stream');
    if (principal !== undefined) {
      this.auth?.assertCurrent(principal);
      // Before the rate limit: another identity must not spend this session's updates either.
      if (session.identity !== principal.identity) throw new RelayError('forbidden', 'this session was opened by another identity');
    }
    // Counted before anything is checked or changed: a flood of bad requests is limited too.
    this.limits.takeUpdate(session.id);
    this.checkTopics(request.add);
    return session.serialize(async () => {
      const removing = new Set(request.remove.filter((t) => session.topics.has(t)));
      const adding = request.add.filter((t) => !session.topics.has(t) || removing.has(t));
      const resulting = session.topics.size - removing.size + adding.length;
      if (adding.length > 0) this.checkTopicCap(resulting);
      if (principal !== undefined && this.auth !== undefined) {
        const refused = await this.auth.denied(principal, 'subscribe', adding);
        if (refused.length > 0) throw new RelayError('forbidden', refused.map((r) => r.message).join('; '), { topic: refused[0]!.topic! });
      }
      // The session may have expired while this update waited its turn (or for the auth check):
      // topics added to it now would hold their broker subscriptions forever.
      if (this.sessions.get(session.id) !== session) throw new RelayError('unknown-session', 'no such session (it expired); open a new stream');
      for (const topic of removing) {
        session.topics.delete(topic);
        this.hub.unsubscribe(session, topic);
      }
      const failures = await this.addTopics(session, adding);
      for (const failure of failures) session.connection?.sendError(failure);
      if (removing.size > 0 || adding.length > failures.length) this.peers?.held(snapshot(session));
      return {
        session_id: session.id,
        subscriptions: [...session.topics.keys()],
        failed: failures.map((f) => ({ topic: f.topic ?? '', code: f.code, message: f.message })),
      };
    });
  }

  /**
   * Another node's session, taken over through `peers`; undefined when there are no peers, no
   * id was given, or no node knows it (then the stream opens a new session).
   */
  private async adopt(fromEventId: { sessionId: string; seq: number } | undefined, sessionId: string | null, principal: Principal | undefined): Promise<AdoptedSession | undefined> {
    if (this.peers === undefined) return undefined;
    const identity = principal?.identity;
    if (fromEventId !== undefined) {
      const adopted = await this.peers.adopt(fromEventId.sessionId, fromEventId.seq, identity);
      if (adopted !== undefined) return adopted;
    }
    if (sessionId === null || sessionId === fromEventId?.sessionId) return undefined;
    return this.peers.adopt(sessionId, undefined, identity);
  }

  /** Queues what the previous owner of an adopted session still held for the client, with `events-lost` first when that was not everything. */
  private replayAdopted(adopted: AdoptedSession, position: number, connection: QueuedConnection): void {
    if (adopted.lost !== undefined) connection.sendError(new RelayError('events-lost', adopted.lost));
    if (adopted.missed.length === 0) return;
    // Numbered at the session's starting position: a resume from one of them replays what this node received since.
    connection.replay(adopted.missed.map((m) => new RelayMessage(position, m.topic, m.envelope, m.receivedAt, m.position)));
  }

  /**
   * A session whose node died, on a broker that keeps history: what the broker holds after the
   * client's last position becomes the replay, and `events-lost` goes unless some is gone.
   */
  private async recoverFromBroker(adopted: AdoptedSession, session: Session, from: ParsedEventId): Promise<void> {
    if (this.broker.replay === undefined) return;
    try {
      const topics = [...session.topics.keys()];
      const last = from.topicTag === undefined ? undefined : topics.find((t) => topicTag(t) === from.topicTag);
      const held = await this.broker.replay(topics, from.position!, this.options.history.maxMessages, last);
      const now = Date.now();
      adopted.missed = held.messages.map((m) => ({ topic: m.topic, envelope: RelayMessage.fromBody(0, m.topic, m.body, this.options.embedJsonPayloads, now).envelope().toString('utf8'), receivedAt: now, position: m.position }));
      adopted.lost = held.complete ? undefined : 'the broker no longer holds every event published since this client\'s last one';
      // Messages that arrive live as well are not sent twice (positions order a topic's messages).
      session.replayedUpTo = new Map();
      for (const m of held.messages) session.replayedUpTo.set(m.topic, Math.max(m.position, session.replayedUpTo.get(m.topic) ?? 0));
    } catch (err) {
      adopted.lost += ` (the broker's history could not be read: ${(err as Error).message})`;
    }
  }

  /**
   * Gives a session of this node to another node that a client resumed it on: ends its stream
   * here, returns its topics and the messages after `seq` that the client has not received,
   * and forgets it. Undefined when this node does not hold it. Throws `forbidden` for another identity.
   */
  handOver(sessionId: string, seq: number | undefined, identity: string | undefined): { topics: string[]; missed: RelayMessage[]; incomplete: boolean } | undefined {
    const session = this.sessions.get(sessionId);
    if (session === undefined) return undefined;
    if (session.identity !== identity) throw new RelayError('forbidden', 'this session was opened by another identity: open a new stream');
    const connection = session.connection;
    // What the client missed: after the id it sent back, or else after what was handed to its connection.
    const { missed, incomplete } = this.missedSince(session, seq === undefined ? session.position : Math.min(seq, this.hub.lastSeq));
    const topics = [...session.topics.keys()];
    session.connection = undefined;
    connection?.close();
    this.drop(session);
    return { topics, missed, incomplete };
  }

  /**
   * An update that another node received for a session of this node, already authorized there
   * for `identity` (the grants of its bearer were checked on that node).
   */
  async updateForwarded(request: UpdateRequest, identity: string | undefined): Promise<UpdateResult> {
    const session = this.sessions.get(request.sessionId);
    if (session === undefined) throw new RelayError('unknown-session', 'no such session (it may have expired); open a new stream');
    if (session.identity !== identity) throw new RelayError('forbidden', 'this session was opened by another identity');
    return this.updateHere(request);
  }

  /** True when this process holds the session (attached or waiting for its client). */
  holds(sessionId: string): boolean {
    return this.sessions.has(sessionId);
  }

  /** Every session this process holds, as other nodes record them. */
  snapshots(): SessionSnapshot[] {
    return [...this.sessions.values()].map(snapshot);
  }

  /** Who a request is, per its credentials; undefined when the relay has no auth. Throws `forbidden`. */
  async authenticate(credentials: Credentials): Promise<Principal | undefined> {
    return this.auth?.authenticate(credentials);
  }

  /** Publishes `body` on `topic` through the broker. */
  async publish(topic: string, body: Uint8Array): Promise<void> {
    return traced(this.options.tracer, 'livepipe.publish', SPAN_KIND.producer, (span) => {
      span.setAttributes({ 'messaging.system': this.broker.scheme, 'messaging.message.body.size': body.byteLength });
      return this.publishNow(topic, body);
    });
  }

  private async publishNow(topic: string, body: Uint8Array): Promise<void> {
    assertTopic(topic);
    this.checkTopics([topic]);
    try {
      await this.broker.publish(topic, body);
    } catch (err) {
      if (err instanceof RelayError) throw err;
      throw new RelayError('broker-unavailable', `the broker did not accept the message: ${(err as Error).message}`, { topic, cause: err });
    }
  }

  stats(): RelayStats {
    return {
      connections: Object.fromEntries([...this.openByTransport].filter(([, n]) => n > 0)),
      sessions: this.sessions.size,
      topics: this.hub.topicCount,
      messagesIn: this.hub.counters.messagesIn,
      messagesDelivered: this.deliveries.delivered,
      messagesDropped: this.deliveries.dropped,
      brokerErrors: this.hub.counters.brokerErrors,
      brokerReconnects: this.hub.counters.brokerReconnects,
    };
  }

  /** Ends every stream (clients reconnect elsewhere), releases broker subscriptions, and closes a broker the relay opened. */
  async close(options: CloseOptions = {}): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    clearInterval(this.sweeper);
    const within = options.reconnectDelayMs;
    // Sessions whose clients are about to reconnect (to another node, when scaled out).
    const attached = [...this.sessions.values()].filter((session) => session.connection !== undefined);
    for (const connection of [...this.connections]) connection.goAway(within === undefined ? undefined : Math.floor(Math.random() * (within + 1)));
    for (const session of this.sessions.values()) this.cancelExpiry(session);
    if (this.peers !== undefined) await this.awaitHandOver(attached, options.handOverMs ?? (within ?? this.options.retryMs) + HAND_OVER_MARGIN_MS);
    this.sessions.clear();
    await this.peers?.close();
    await this.hub.close();
    if (this.ownsBroker) await this.broker.close();
  }

  /**
   * Scale-out: the clients told to go away reconnect to other nodes, which take their sessions
   * from this one, with what they missed; waits for that (still receiving their topics) for up
   * to `ms`. Sessions without a client are restored from their records wherever they come back.
   */
  private async awaitHandOver(sessions: Session[], ms: number): Promise<void> {
    const deadline = Date.now() + ms;
    while (sessions.some((s) => this.sessions.get(s.id) === s) && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20));
  }

  private async addTopics(session: Session, topics: string[]): Promise<RelayError[]> {
    const since = this.hub.lastSeq;
    for (const topic of topics) session.topics.set(topic, since);
    const results = await Promise.all(topics.map((topic) => this.hub.subscribe(session, topic)));
    const failures: RelayError[] = [];
    results.forEach((failure, i) => {
      if (failure === undefined) return;
      session.topics.delete(topics[i]!);
      failures.push(failure);
    });
    return failures;
  }

  /** What the topics' history holds for the session after `position`, oldest first, and whether that is all of it. */
  private missedSince(session: Session, position: number): { missed: RelayMessage[]; incomplete: boolean } {
    const now = Date.now();
    const missed: RelayMessage[] = [];
    let incomplete = false;
    for (const [topic, since] of session.topics) {
      const part = this.hub.historySince(topic, Math.max(position, since), now);
      missed.push(...part.messages);
      incomplete ||= part.incomplete;
    }
    missed.sort((a, b) => a.seq - b.seq);
    return { missed, incomplete };
  }

  /** Queues what the session missed since `position`, with `events-lost` first when history no longer holds all of it. */
  private replay(session: Session, position: number, connection: QueuedConnection): void {
    if (position >= this.hub.lastSeq) {
      session.position = position;
      return;
    }
    const { missed, incomplete } = this.missedSince(session, position);
    if (incomplete) {
      connection.sendError(new RelayError('events-lost', 'some events published while this client was away are no longer held by the relay'));
    }
    connection.replay(session.replayedUpTo === undefined ? missed : missed.filter((m) => !session.hasHad(m)));
    session.position = Math.max(position, this.hub.lastSeq);
  }

  private detach(session: Session, connection: QueuedConnection): void {
    if (this.connections.delete(connection)) this.openByTransport.set(connection.transport, this.openByTransport.get(connection.transport)! - 1);
    if (session.connection !== connection && session.connection !== undefined) return;
    session.connection = undefined;
    if (this.closing || !this.sessions.has(session.id)) return;
    session.expiryTimer = setTimeout(() => this.expire(session), this.options.sessionTtlMs);
    session.expiryTimer.unref();
  }

  private expire(session: Session): void {
    if (session.connection !== undefined) return;
    this.drop(session);
    this.peers?.dropped(session.id);
  }

  private drop(session: Session): void {
    this.cancelExpiry(session);
    this.sessions.delete(session.id);
    for (const topic of session.topics.keys()) this.hub.unsubscribe(session, topic);
  }

  private cancelExpiry(session: Session): void {
    if (session.expiryTimer !== undefined) clearTimeout(session.expiryTimer);
    session.expiryTimer = undefined;
  }

  /** Topics must pass PROTOCOL.md section 1 (checked when parsed) and the broker's own naming rules. */
  private checkTopics(topics: string[]): void {
    for (const topic of topics) {
      // The transports checked section 1 already; the app's own updateSubscriptions call did not.
      assertTopic(topic);
      if (isControlTopic(topic)) throw new RelayError('invalid-topic', `${SHARED_CONTROL_TOPIC} and topics starting with ${CONTROL_TOPIC_PREFIX} are reserved for livepipe's own node-to-node messages`, { topic });
      const problem = this.broker.topicProblem(topic);
      if (problem !== undefined) {
        throw new RelayError('invalid-topic', `invalid topic ${JSON.stringify(topic)} for ${this.broker.scheme}://: ${problem}`, { topic });
      }
    }
  }

  private checkTopicCap(count: number): void {
    if (count > this.options.maxTopicsPerSession) {
      throw this.limits.reject('topics_per_session', `a session may hold at most ${this.options.maxTopicsPerSession} topics (this request would make ${count})`);
    }
  }

  private sweep(every: number): void {
    const now = Date.now();
    for (const connection of this.connections) {
      if (now - connection.lastWriteAt >= every) {
        connection.keepAlive(now);
        connection.lastWriteAt = now;
      }
    }
    this.hub.expireHistory(now);
    this.limits.sweep();
  }
}

function snapshot(session: Session): SessionSnapshot {
  return { id: session.id, topics: [...session.topics.keys()], identity: session.identity };
}

/** Opens the broker (when given a URL) and creates the relay core. */
export async function createRelayCore(options: RelayOptions): Promise<RelayCore> {
  const resolved = resolveOptions(options);
  const owns = typeof options.broker === 'string';
  // Checked before the broker opens, so that bad limit or auth options leave nothing open.
  checkLimitOptions(resolved.limits);
  // An empty token would match every request that sends none (an unset environment variable, say).
  const publish = resolved.publish;
  if (typeof publish === 'object' && !(typeof publish.token === 'string' && publish.token.length > 0)) {
    throw new TypeError('publish.token must be a non-empty string');
  }
  const auth = options.auth === undefined ? undefined : await Authorizer.create(options.auth, resolved.cors);
  const broker = typeof options.broker === 'string' ? await openBroker(options.broker) : options.broker;
  // With auth, publish grants decide who may publish over HTTP.
  if (resolved.publish === undefined) resolved.publish = auth !== undefined ? true : broker.scheme === 'mem' ? 'loopback' : false;
  const core = new RelayCore(broker, owns, resolved, auth);
  if (resolved.scaleOut !== undefined) {
    try {
      await joinPeers(core, resolved.scaleOut);
    } catch (err) {
      await core.close();
      throw err;
    }
  }
  return core;
}
