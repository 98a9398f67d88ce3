// The origin behind Pushpin: answers GET /events?topics=a,b with GRIP headers that tell
// Pushpin to hold the response open as an SSE stream subscribed to those channels; messages
// then go to Pushpin's HTTP publish API, never through here.
//   node bench/peers/grip-origin.ts --port P
import { createServer } from 'node:http';

const port = Number(process.argv[process.argv.indexOf('--port') + 1]);

createServer((req, res) => {
  const url = new URL(req.url ?? '/', 'http://x');
  if (url.pathname === '/events') {
    const channels = (url.searchParams.get('topics') ?? '').split(',').filter(Boolean);
    res.writeHead(200, {
      'content-type': 'text/event-stream',
      'grip-hold': 'stream',
      'grip-channel': channels.join(', '),
    });
    res.end(':ok\n\n');
  } else {
    res.writeHead(url.pathname === '/healthz' ? 200 : 404).end();
  }
}).listen(port, '127.0.0.1');
