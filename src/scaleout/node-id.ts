/**
 * A scaled-out node names itself in its session ids: base64url of [node tag: 6 bytes][128
 * random bits], 30 characters, the first 8 of which are the node's name. Ids stay opaque to
 * clients; a cluster worker's ids (24 characters) never look like these.
 */
export const NODE_TAG_BYTES = 6;
const NODE_NAME_CHARS = 8;
const SESSION_ID_CHARS = 30;

/** The node named in a session id, or undefined when the id is not a scaled-out node's. */
export function nodeOfSession(sessionId: string): string | undefined {
  if (sessionId.length !== SESSION_ID_CHARS || !/^[\w-]+$/.test(sessionId)) return undefined;
  return sessionId.slice(0, NODE_NAME_CHARS);
}

/** Topics under this prefix carry node-to-node messages; no client may subscribe or publish to them. */
export const CONTROL_TOPIC_PREFIX = 'livepipe-control.';
/** The one topic that carries them all on brokers without a plain publish/subscribe (see shared-bus.ts); reserved too. */
export const SHARED_CONTROL_TOPIC = 'livepipe-control';

/** True for a topic that livepipe keeps for its own node-to-node messages. */
export function isControlTopic(topic: string): boolean {
  return topic === SHARED_CONTROL_TOPIC || topic.startsWith(CONTROL_TOPIC_PREFIX);
}
