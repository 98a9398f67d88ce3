/**
 * A strict reader for the one request head the fast lane serves (fast-streams.ts): a complete
 * `GET <events path>[?query] HTTP/1.1` head with no body, alone in the bytes read. It does not
 * try to understand HTTP: anything it does not recognise exactly (a split or pipelined head,
 * folded or repeated headers, a body, an upgrade, HTTP/1.0, an odd character) is answered
 * `undefined`, and node:http then reads the same bytes with its own parser, errors and all.
 * Whatever it accepts is a request node:http would accept too, and the connection closes with
 * the stream, so no byte after the head is ever read as a request.
 */

export interface StreamHead {
  /** The request target as sent: path and query. */
  target: string;
  /** The query string without its `?` ('' when none). */
  query: string;
  /** Header values by lower-case name (each name once). */
  headers: Record<string, string>;
}

/** node:http's default limit on a request head (`maxHeaderSize`, 16 KiB); a larger one goes to node:http, which answers 431. */
export const MAX_STREAM_HEAD_BYTES = 16 * 1024;
const MAX_HEADERS = 100;

// RFC 9110 5.1 token characters, and a field value of visible ASCII, SP, HTAB and obs-text.
const HEADER_LINE = /^([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*$/;
// origin-form (RFC 9112 3.2.1): an absolute path and an optional query, visible ASCII only.
const TARGET = /^\/[\x21-\x7e]*$/;
// Headers that mean a body, another protocol, or a request that node:http treats specially.
const DECLINED = new Set(['content-length', 'transfer-encoding', 'upgrade', 'expect', 'http2-settings']);

/** The head in `data` if it is a plain stream request for `path` (see above); undefined leaves it to node:http. */
export function readStreamHead(data: Buffer, path: string): StreamHead | undefined {
  const end = data.length - 4;
  // The head, whole and alone: it ends exactly where the bytes do.
  if (end <= 0 || data.length > MAX_STREAM_HEAD_BYTES || data[end] !== 13 || data[end + 1] !== 10 || data[end + 2] !== 13 || data[end + 3] !== 10) return undefined;
  const text = data.toString('latin1', 0, end);
  if (!text.startsWith('GET ')) return undefined;
  const lines = text.split('\r\n');
  const requestLine = lines[0]!;
  if (!requestLine.endsWith(' HTTP/1.1')) return undefined;
  const target = requestLine.slice(4, -9);
  if (!TARGET.test(target)) return undefined;
  const mark = target.indexOf('?');
  if ((mark < 0 ? target : target.slice(0, mark)) !== path) return undefined;
  if (lines.length - 1 > MAX_HEADERS) return undefined;
  const headers: Record<string, string> = Object.create(null);
  for (let i = 1; i < lines.length; i++) {
    const match = HEADER_LINE.exec(lines[i]!);
    if (match === null) return undefined;
    const name = match[1]!.toLowerCase();
    if (DECLINED.has(name) || name in headers) return undefined;
    headers[name] = match[2]!;
  }
  // HTTP/1.1 requires Host; node:http answers 400 without it.
  if (headers.host === undefined) return undefined;
  return { target, query: mark < 0 ? '' : target.slice(mark + 1), headers };
}
