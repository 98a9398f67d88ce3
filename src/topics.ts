import { RelayError } from './errors.ts';

/** Limits of PROTOCOL.md section 1. */
export const MAX_TOPIC_BYTES = 256;
export const RESERVED_PREFIXES = ['/httpsub/', '/livepipe/'] as const;

// Control characters U+0000–U+001F and U+007F, and the comma that separates topics in queries.
const FORBIDDEN = /[\u0000-\u001f\u007f,]/;

/** Returns why `topic` breaks the rules of section 1, or undefined when it is valid. */
export function topicProblem(topic: string): string | undefined {
  if (topic.length === 0) return 'a topic must not be empty';
  const bytes = Buffer.byteLength(topic, 'utf8');
  if (bytes > MAX_TOPIC_BYTES) return `a topic is at most ${MAX_TOPIC_BYTES} bytes of UTF-8 (this one is ${bytes})`;
  if (FORBIDDEN.test(topic)) return 'a topic must not contain control characters or commas';
  if (!topic.isWellFormed()) return 'a topic must be valid UTF-8 (it holds a lone surrogate)';
  for (const prefix of RESERVED_PREFIXES) {
    if (topic.startsWith(prefix)) return `topics starting with ${prefix} are reserved for the relay`;
  }
  return undefined;
}

export function assertTopic(topic: unknown): string {
  if (typeof topic !== 'string') throw new RelayError('bad-request', 'topics must be strings');
  const problem = topicProblem(topic);
  if (problem !== undefined) throw new RelayError('invalid-topic', `invalid topic ${JSON.stringify(topic)}: ${problem}`, { topic });
  return topic;
}

/** Parses the comma-separated `topics=` query value; an absent or empty value is no topics. */
export function parseTopicList(value: string | null | undefined): string[] {
  if (value === null || value === undefined || value === '') return [];
  return dedupe(value.split(',').map(assertTopic));
}

/** Validates a JSON array of topics. */
export function assertTopicArray(value: unknown, field: string): string[] {
  if (value === undefined) return [];
  if (!Array.isArray(value)) throw new RelayError('bad-request', `${field} must be an array of topic strings`);
  return dedupe(value.map((t) => {
    if (typeof t !== 'string') throw new RelayError('bad-request', `${field} must be an array of topic strings`);
    return assertTopic(t);
  }));
}

function dedupe(topics: string[]): string[] {
  return [...new Set(topics)];
}
