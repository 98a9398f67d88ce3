// better-sse (npm) behind node:http: one Channel per topic, sessions registered on the topics
// they ask for, POST /publish broadcasts the body as the event's data (no re-serialising).
//   node bench/peers/better-sse.ts --port P
import { createServer } from 'node:http';
import { createChannel, createSession, type Channel } from 'better-sse';

const port = Number(process.argv[process.argv.indexOf('--port') + 1]);
const channels = new Map<string, Channel>();
const channel = (t: string): Channel => {
  let c = channels.get(t);
  if (!c) channels.set(t, (c = createChannel()));
  return c;
};

createServer((req, res) => {
  const url = new URL(req.url ?? '/', 'http://x');
  if (req.method === 'GET' && url.pathname === '/events') {
    // The body is already a JSON string: send it as is rather than JSON.stringify it again.
    createSession(req, res, { serializer: (d) => String(d) }).then(
      (session) => {
        for (const t of (url.searchParams.get('topics') ?? '').split(',').filter(Boolean)) channel(t).register(session);
      },
      () => res.destroy(),
    );
  } else if (req.method === 'POST' && url.pathname === '/publish') {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      channels.get(url.searchParams.get('topic') ?? '')?.broadcast(Buffer.concat(chunks).toString());
      res.writeHead(204).end();
    });
  } else {
    res.writeHead(url.pathname === '/healthz' ? 200 : 404).end();
  }
}).listen(port, '127.0.0.1');
