// A bare relay for the benchmark when the CLI (bin/livepipe.js) is not available:
// createRelay over the in-memory broker on node:http, 127.0.0.1 only.
// Usage: node bench/relay-server.ts --port 18080
import { createServer } from 'node:http';
import { createRelay } from '../src/index.ts';

const at = process.argv.indexOf('--port');
const port = Number(at > 0 ? process.argv[at + 1] : 8080);
const relay = await createRelay({ broker: 'mem://bench' });
const server = createServer((req, res) => void relay.handler(req, res));
server.listen(port, '127.0.0.1', () => process.stdout.write(`bench relay listening on http://127.0.0.1:${port}\n`));

// Exit through process.exit so that --cpu-prof writes its profile.
const stop = () => {
  server.close();
  void relay.close().finally(() => process.exit(0));
};
process.once('SIGTERM', stop);
process.once('SIGINT', stop);
