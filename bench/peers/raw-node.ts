// The floor for Node itself: a bare node:http server that writes each published body as one
// SSE frame (encoded once, the same Buffer) to every open response of its topic.
//   node bench/peers/raw-node.ts --port P
// GET /events?topics=a,b   POST /publish?topic=a (body = the event's data, one line)
import { createServer, type ServerResponse } from 'node:http';

const port = Number(process.argv[process.argv.indexOf('--port') + 1]);
const topics = new Map<string, Set<ServerResponse>>();

createServer((req, res) => {
  const url = new URL(req.url ?? '/', 'http://x');
  if (req.method === 'GET' && url.pathname === '/events') {
    const mine = (url.searchParams.get('topics') ?? '').split(',').filter(Boolean);
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
    res.write(':ok\n\n');
    for (const t of mine) {
      let set = topics.get(t);
      if (!set) topics.set(t, (set = new Set()));
      set.add(res);
    }
    res.on('close', () => {
      for (const t of mine) topics.get(t)?.delete(res);
    });
  } else if (req.method === 'POST' && url.pathname === '/publish') {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const frame = Buffer.concat([Buffer.from('data: '), ...chunks, Buffer.from('\n\n')]);
      for (const r of topics.get(url.searchParams.get('topic') ?? '') ?? []) r.write(frame);
      res.writeHead(204).end();
    });
  } else {
    res.writeHead(url.pathname === '/healthz' ? 200 : 404).end();
  }
}).listen(port, '127.0.0.1');
