import { readFileSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createSecureServer, type Http2SecureServer, type Http2Session } from 'node:http2';
import { createServer as createHttpsServer, type Server as HttpsServer } from 'node:https';
import { createSecureContext, type TLSSocket } from 'node:tls';
import type { Duplex } from 'node:stream';
import type { ServerConfig } from './args.ts';

/**
 * The standalone server's main listener: HTTP; HTTPS with `tls`; or, with `http2` too, HTTP/2
 * over TLS that still accepts HTTP/1.1 (ALPN picks), so that many SSE streams share one
 * connection while WebSocket (an HTTP/1.1 upgrade) and older clients keep working on the same port.
 */

export type RequestListener = (req: IncomingMessage, res: ServerResponse) => void;
export type UpgradeListener = (req: IncomingMessage, socket: Duplex, head: Buffer) => void;

/** PEM certificate chain and private key, read and checked. */
export interface TlsMaterial {
  cert: Buffer;
  key: Buffer;
}

export interface Listener {
  readonly server: Server | HttpsServer | Http2SecureServer;
  readonly scheme: 'http' | 'https';
  /**
   * After `server.close()`: closes idle HTTP/1.1 keep-alive connections, and sends GOAWAY to
   * HTTP/2 sessions, which then close once their open streams end.
   */
  closeIdle(): void;
  /** Cuts every connection, busy or not (a shutdown past its patience). */
  closeAll(): void;
}

/** Reads the certificate and key, and checks that they are PEM and belong together. Throws an Error naming the file. */
export function readTls(tls: NonNullable<ServerConfig['tls']>): TlsMaterial {
  const read = (path: string, what: string) => {
    try {
      return readFileSync(path);
    } catch (err) {
      throw new Error(`cannot read the TLS ${what} ${path}: ${(err as Error).message}`, { cause: err });
    }
  };
  const material = { cert: read(tls.cert, 'certificate'), key: read(tls.key, 'key') };
  try {
    createSecureContext(material);
  } catch (err) {
    throw new Error(`unusable TLS certificate ${tls.cert} or key ${tls.key}: ${(err as Error).message}`, { cause: err });
  }
  return material;
}

export function createListener(tls: TlsMaterial | undefined, http2: boolean, onRequest: RequestListener, onUpgrade: UpgradeListener): Listener {
  if (tls === undefined) {
    const server = createServer(onRequest).on('upgrade', onUpgrade);
    return { server, scheme: 'http', closeIdle: () => server.closeIdleConnections(), closeAll: () => server.closeAllConnections() };
  }
  if (!http2) {
    const server = createHttpsServer(tls, onRequest).on('upgrade', onUpgrade);
    return { server, scheme: 'https', closeIdle: () => server.closeIdleConnections(), closeAll: () => server.closeAllConnections() };
  }
  // HTTP/1.1 connections on this server are served by node:http's own code, with the same
  // 'request' and 'upgrade' events; HTTP/2 requests arrive through the compatibility API.
  const server = createSecureServer({ ...tls, allowHTTP1: true }, onRequest as unknown as Parameters<typeof createSecureServer>[1]);
  server.on('upgrade', onUpgrade);
  const sessions = new Set<Http2Session>();
  server.on('session', (session) => {
    sessions.add(session);
    session.once('close', () => sessions.delete(session));
  });
  const sockets = new Set<TLSSocket>();
  server.on('secureConnection', (socket: TLSSocket) => {
    sockets.add(socket);
    socket.once('close', () => sockets.delete(socket));
  });
  return {
    server,
    scheme: 'https',
    closeIdle() {
      // Node's HTTP/1.1 half of an allowHTTP1 server has this method; the types do not say so.
      (server as unknown as { closeIdleConnections(): void }).closeIdleConnections();
      for (const session of sessions) session.close();
    },
    closeAll() {
      for (const socket of sockets) socket.destroy();
    },
  };
}
