import { readFile } from 'node:fs/promises';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { extname, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';
import { RelayError } from '../errors.ts';
import { JSON_TYPE } from '../http/shared.ts';

/**
 * The demo page and its assets, from `public/` at the package root. Resolved from this file
 * (src/server or dist/server, both two levels below the root), so it works from a checkout
 * and from an installed package alike.
 */
export const PUBLIC_DIR = fileURLToPath(new URL('../../public/', import.meta.url));
/** The browser client (livepipe/client), built into dist/client/ by `npm run build`; served under /client/ for the demo page. */
export const CLIENT_DIR = fileURLToPath(new URL('../../dist/client/', import.meta.url));

const TYPES: Record<string, string> = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.svg': 'image/svg+xml',
  '.png': 'image/png',
  '.ico': 'image/x-icon',
  '.json': JSON_TYPE,
  '.txt': 'text/plain; charset=utf-8',
};

/** Serves a file of `root` (`/` is index.html), or answers a JSON 404 like the relay's other errors. */
export async function serveStatic(req: IncomingMessage, res: ServerResponse, root = PUBLIC_DIR): Promise<void> {
  let pathname = new URL(req.url ?? '/', 'http://relay').pathname;
  if (root === PUBLIC_DIR && pathname.startsWith('/client/')) {
    root = CLIENT_DIR;
    pathname = pathname.slice('/client'.length);
  }
  const file = await findFile(root, pathname);
  if (file === undefined) return sendError(res, new RelayError('not-found', `nothing at ${req.url ?? '/'}`));
  if (req.method !== 'GET' && req.method !== 'HEAD') {
    res.setHeader('allow', 'GET, HEAD');
    return sendError(res, new RelayError('method-not-allowed', `${req.url} answers only GET and HEAD`));
  }
  res.writeHead(200, {
    'content-type': TYPES[extname(file.path)] ?? 'application/octet-stream',
    'content-length': file.body.length,
    // The page changes with the package version; always revalidate so an upgrade shows at once.
    'cache-control': 'no-cache',
    'x-content-type-options': 'nosniff',
  });
  res.end(req.method === 'HEAD' ? undefined : file.body);
}

async function findFile(root: string, pathname: string): Promise<{ path: string; body: Buffer } | undefined> {
  let decoded: string;
  try {
    decoded = decodeURIComponent(pathname);
  } catch {
    return undefined;
  }
  if (decoded.includes('\0')) return undefined;
  const path = resolve(root, `.${decoded.endsWith('/') ? `${decoded}index.html` : decoded}`);
  // Nothing outside the public folder, whatever `..` or encoded separators the path holds.
  if (!path.startsWith(root.endsWith(sep) ? root : root + sep)) return undefined;
  try {
    return { path, body: await readFile(path) };
  } catch {
    return undefined; // missing, or a directory
  }
}

function sendError(res: ServerResponse, error: RelayError): void {
  res.writeHead(error.status, { 'content-type': JSON_TYPE }).end(JSON.stringify(error.toJSON()));
}
