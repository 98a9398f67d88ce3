import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Http2ServerRequest, Http2ServerResponse } from 'node:http2';
import type { RelayCore } from '../relay.ts';

/** Where the livepipe.v1.Relay service's methods live: `/livepipe.v1.Relay/Stream`, `/livepipe.v1.Relay/UpdateSubscriptions`. */
export const RELAY_SERVICE_PATH = '/livepipe.v1.Relay/';

/** A node:http or node:http2 handler; Express / Connect style `next` for other paths. */
export type RpcMiddleware = (
  req: IncomingMessage | Http2ServerRequest,
  res: ServerResponse | Http2ServerResponse,
  next?: (err?: unknown) => void,
) => Promise<void>;

/**
 * The gRPC / gRPC-Web / Connect handler (PROTOCOL.md section 5). It loads ConnectRPC and the
 * protobuf code on the first request to the service, so a relay that serves only SSE never does.
 */
export function createRpcMiddleware(core: RelayCore): RpcMiddleware {
  let loading: Promise<(req: IncomingMessage | Http2ServerRequest, res: ServerResponse | Http2ServerResponse) => void> | undefined;
  return async (req, res, next) => {
    if (!(req.url ?? '').startsWith(RELAY_SERVICE_PATH)) {
      if (next) return next();
      res.statusCode = 404;
      res.setHeader('content-type', 'application/json; charset=utf-8');
      res.end('{"error":{"code":"not-found","message":"not a livepipe.v1.Relay method"}}');
      return;
    }
    loading ??= import('../connect.ts').then((m) => m.createConnectNodeHandler(core));
    (await loading)(req, res);
  };
}
