import type { IncomingMessage, ServerResponse } from 'node:http';
import { pino, type DestinationStream, type Logger } from 'pino';
import type { BrokerOptions } from '../brokers/index.ts';
import type { ServerConfig } from './args.ts';
import { SERVER_DEFAULTS } from './config.ts';

/**
 * The server's logs: one JSON object per line on stdout (pino), e.g.
 * `{"level":"info","time":"2026-01-02T03:04:05.678Z","pid":1,"hostname":"h","msg":"…",…}`.
 * `level` is the name, not pino's number, so log pipelines need no mapping table. The
 * library logs nothing itself; only the command line does, through this module.
 */

export type { Logger };
export type LogLevel = NonNullable<ServerConfig['logLevel']>;


/**
 * A logger at `level` writing to `destination`: stdout by default, synchronously, as
 * process.stdout writes to a pipe on Linux anyway. An asynchronous stream could lose or reorder
 * the last records when the process exits right after them, as it does after a shutdown.
 */
export function createLogger(level: LogLevel = SERVER_DEFAULTS.logLevel, destination: DestinationStream = pino.destination({ dest: 1, sync: true })): Logger {
  return pino(
    {
      level,
      timestamp: pino.stdTimeFunctions.isoTime,
      formatters: { level: (label) => ({ level: label }) },
    },
    destination,
  );
}

/** For callers of startServer that do not log (tests, embedding). */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}

/** The `log` callback of broker drivers (reconnects, errors), as records with `component: "broker"`. */
export function brokerLog(log: Logger, component = 'broker'): NonNullable<BrokerOptions['log']> {
  const child = log.child({ component });
  return (level, message, details) => child[level](details ?? {}, message);
}

/**
 * At debug level, one record per finished HTTP request or stream: method, path, status and
 * duration. Never the query string: it can hold an `access_token` or a session id, both bearer
 * secrets.
 */
export function logRequest(log: Logger, req: IncomingMessage, res: ServerResponse): void {
  if (!log.isLevelEnabled('debug')) return;
  const started = performance.now();
  res.once('close', () => {
    log.debug(
      {
        method: req.method,
        path: pathOf(req.url),
        status: res.statusCode,
        // A stream that the client left before it ended was not answered in full.
        complete: res.writableFinished,
        ms: Math.round(performance.now() - started),
      },
      'request',
    );
  });
}

/** The path of a request URL, without its query. */
export function pathOf(url: string | undefined): string {
  return (url ?? '/').split('?', 1)[0]!;
}
