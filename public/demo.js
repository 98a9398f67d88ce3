// The livepipe demo page: the livepipe client (served at client/index.js) over the browser's own
// EventSource, or WebSocket with ?transport=ws, and plain fetch for /publish. URLs are relative
// so the page also works under a prefix.
import { connect as connectClient } from './client/index.js';

const MAX_ROWS = 500;

const $ = (id) => document.getElementById(id);
const ui = {
  state: $('state'),
  reconnect: $('reconnect'),
  session: $('session'),
  subscribeForm: $('subscribe-form'),
  topics: $('topics'),
  unsubscribe: $('unsubscribe'),
  subscriptions: $('subscriptions'),
  subscribeStatus: $('subscribe-status'),
  publishForm: $('publish-form'),
  publishTopic: $('publish-topic'),
  publishBody: $('publish-body'),
  publishStatus: $('publish-status'),
  messages: $('messages'),
  count: $('count'),
  empty: $('empty'),
  clear: $('clear'),
};

const params = new URLSearchParams(location.search);
const transport = params.get('transport') === 'ws' ? 'ws' : 'sse';
/** The client keeps the topics the user asked for, and restores them if the server forgot the session. */
let client;
let received = 0;

function splitTopics(text) {
  return text.split(',').map((t) => t.trim()).filter((t) => t !== '');
}

function connect() {
  client?.close();
  setState('connecting');
  const topics = client ? client.subscriptions : splitTopics(params.get('topics') ?? 'demo');
  client = connectClient('./', { topics, transport });
  client.on('state', (change) => {
    setState(change.state);
    if (change.state !== 'open') return;
    ui.session.textContent = change.sessionId;
    showSubscriptions(client.subscriptions);
    addRow('system', { title: change.resumed ? 'session resumed' : 'session started', text: change.sessionId });
  });
  client.on('message', (message) => onMessage(message, message.id));
  client.on('error', (error) => onError(error));
}

function setState(state) {
  ui.state.dataset.state = state;
  ui.state.textContent = state;
  ui.reconnect.hidden = state !== 'closed';
}

function onMessage(data, id) {
  const binary = data.payload_base64 !== undefined;
  const payload = binary ? data.payload_base64 : typeof data.payload === 'string' ? data.payload : JSON.stringify(data.payload);
  addRow('message', { topic: data.topic, text: payload, id, note: binary ? 'binary, base64' : '' });
}

function onError(error, id) {
  const extra = error.topic !== undefined ? `topic ${error.topic}` : error.count !== undefined ? `${error.count} lost` : '';
  addRow('error', { title: error.code, text: error.message, id, note: extra });
}

/** Adds one row at the top of the list: time, topic or title, payload, event id. */
function addRow(kind, { topic, title, text, id, note }) {
  const li = document.createElement('li');
  li.className = `row-${kind}`;
  if (topic !== undefined) li.dataset.topic = topic;
  const head = document.createElement('div');
  head.className = 'head';
  const time = document.createElement('time');
  const now = new Date();
  time.dateTime = now.toISOString();
  time.textContent = now.toLocaleTimeString([], { hour12: false }) + `.${String(now.getMilliseconds()).padStart(3, '0')}`;
  const label = document.createElement('span');
  label.className = topic !== undefined ? 'topic' : 'title';
  label.textContent = topic ?? title;
  head.append(time, label);
  if (note) head.append(span('meta', note));
  if (id) head.append(span('id', `id ${id}`));
  const body = document.createElement('pre');
  body.className = 'payload';
  body.textContent = text;
  li.append(head, body);
  ui.messages.prepend(li);
  while (ui.messages.childElementCount > MAX_ROWS) ui.messages.lastElementChild.remove();
  if (kind === 'message') ui.count.textContent = String(++received);
  ui.empty.hidden = true;
}

function span(className, text) {
  const el = document.createElement('span');
  el.className = className;
  el.textContent = text;
  return el;
}

function showSubscriptions(topics) {
  ui.subscriptions.replaceChildren(
    ...topics.map((topic) => {
      const li = document.createElement('li');
      li.dataset.topic = topic;
      const remove = document.createElement('button');
      remove.type = 'button';
      remove.className = 'chip-remove';
      remove.title = `unsubscribe ${topic}`;
      remove.setAttribute('aria-label', `unsubscribe ${topic}`);
      remove.textContent = '×';
      remove.onclick = () => void update([], [topic]);
      li.append(span('chip-name', topic), remove);
      return li;
    }),
  );
  if (topics.length === 0) ui.subscriptions.append(Object.assign(document.createElement('li'), { className: 'none', textContent: 'no topics' }));
  if (!ui.publishTopic.value && topics.length > 0) ui.publishTopic.value = topics[0];
}

/** Subscribes and unsubscribes through the client (which waits until connected); true when the server applied it. */
async function update(add, remove) {
  try {
    if (add.length > 0) await client.subscribe(add);
    if (remove.length > 0) await client.unsubscribe(remove);
    showSubscriptions(client.subscriptions);
    status(ui.subscribeStatus, [add.length ? `added ${add.join(', ')}` : '', remove.length ? `removed ${remove.join(', ')}` : ''].filter(Boolean).join('; '));
    return true;
  } catch (err) {
    showSubscriptions(client.subscriptions);
    return status(ui.subscribeStatus, err.topic !== undefined && err.code === 'subscription-failure' ? `${err.topic}: ${err.message}` : err.message, true);
  }
}

/** Shows a short result next to a form; returns false so callers can `return status(…)` on failure. */
function status(el, text, isError = false) {
  el.textContent = text;
  el.classList.toggle('bad', isError);
  return false;
}

ui.subscribeForm.addEventListener('submit', (event) => {
  event.preventDefault();
  const topics = splitTopics(ui.topics.value);
  if (topics.length === 0) return status(ui.subscribeStatus, 'type one or more topics', true);
  void update(topics, []).then((ok) => ok && (ui.topics.value = ''));
});

ui.unsubscribe.addEventListener('click', () => {
  const topics = splitTopics(ui.topics.value);
  if (topics.length === 0) return status(ui.subscribeStatus, 'type the topics to unsubscribe', true);
  void update([], topics).then((ok) => ok && (ui.topics.value = ''));
});

ui.publishForm.addEventListener('submit', async (event) => {
  event.preventDefault();
  const topic = ui.publishTopic.value.trim();
  try {
    const res = await fetch(`publish?topic=${encodeURIComponent(topic)}`, {
      method: 'POST',
      headers: { 'content-type': 'text/plain; charset=utf-8' },
      body: ui.publishBody.value,
    });
    if (res.ok) return status(ui.publishStatus, `published to ${topic}`);
    const body = await res.json().catch(() => ({}));
    status(ui.publishStatus, body.error?.message ?? `HTTP ${res.status}`, true);
  } catch (err) {
    status(ui.publishStatus, `request failed: ${err.message}`, true);
  }
});

ui.clear.addEventListener('click', () => {
  ui.messages.replaceChildren();
  received = 0;
  ui.count.textContent = '0';
  ui.empty.hidden = false;
});

ui.reconnect.addEventListener('click', connect);

connect();
