/**
 * The demo page and a gochan-style page in a real browser: Debian's headless Chromium driven by
 * playwright-core, so every event arrives through the browser's own EventSource.
 */
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import type { Browser, Page } from 'playwright-core';
import { chromiumSkip, launchChromium } from './support/browser.ts';
import { ensureBuilt, LivepipeProcess } from './support/livepipe.ts';
import { post } from './support/relay.ts';

// The callbacks given to page.evaluate / waitForFunction run in the browser; the project's
// types have no DOM, so these declare the little of it they use.
interface DomElement {
  textContent: string | null;
  classList: { contains(name: string): boolean };
  dataset: Record<string, string | undefined>;
}
declare const document: { querySelector(selector: string): DomElement | null; querySelectorAll(selector: string): { length: number } };
declare const window: { gochan: { received: unknown[]; source: EventSource } };

const SCREENSHOT = '/tmp/livepipe-demo.png';

describe('demo page in Chromium', { skip: chromiumSkip }, () => {
  let lp: LivepipeProcess;
  let base: string;
  let browser: Browser;
  let page: Page;
  const pageErrors: string[] = [];
  const failedResponses: string[] = [];

  before(async () => {
    ensureBuilt();
    lp = new LivepipeProcess(['--port', '0']);
    ({ base } = await lp.started());
    browser = await launchChromium();
    page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
    page.setDefaultTimeout(10_000);
    page.on('pageerror', (err) => pageErrors.push(err.message));
    page.on('console', (msg) => {
      // Failed requests are checked through `failedResponses`, with their URLs.
      if (msg.type() === 'error' && !msg.text().startsWith('Failed to load resource')) pageErrors.push(msg.text());
    });
    page.on('response', (res) => {
      if (res.status() >= 400) failedResponses.push(`${res.status()} ${new URL(res.url()).pathname}`);
    });
  });

  after(async () => {
    await browser?.close();
    await lp?.kill();
  });

  it('connects and shows its session id and the default topic', async () => {
    await page.goto(`${base}/`);
    await page.locator('#state[data-state="open"]').waitFor();
    await page.waitForFunction(() => /^[\w-]{16,}$/.test(document.querySelector('#session')?.textContent ?? ''));
    assert.deepEqual(await subscriptionChips(page), ['demo']);
  });

  it('subscribes through the form and shows a message published through the form', async () => {
    await page.locator('#topics').fill('news, weather');
    await page.locator('#subscribe').click();
    await page.waitForFunction(() => document.querySelectorAll('#subscriptions li[data-topic]').length === 3);
    assert.deepEqual(await subscriptionChips(page), ['demo', 'news', 'weather']);

    await page.locator('#publish-topic').fill('news');
    await page.locator('#publish-body').fill('hello from the page');
    await page.locator('#publish').click();
    const row = page.locator('#messages li[data-topic="news"]');
    await row.waitFor();
    assert.equal(await row.locator('.payload').textContent(), 'hello from the page');
    assert.equal(await page.locator('#publish-status').textContent(), 'published to news');
    // The event id shown is the SSE id, which starts with the session id.
    const session = await page.locator('#session').textContent();
    assert.match((await row.locator('.id').textContent()) ?? '', new RegExp(`^id ${session}\\.\\d+$`));
  });

  it('shows messages published by others, and stops after unsubscribing', async () => {
    assert.equal((await post(`${base}/publish?topic=weather`, '{"temp": 21, "sky": "clear"}', { 'content-type': 'application/json' })).status, 204);
    await page.locator('#messages li[data-topic="weather"]').waitFor();
    assert.equal(await page.locator('#messages li[data-topic="weather"] .payload').textContent(), '{"temp": 21, "sky": "clear"}');

    await page.locator('#subscriptions li[data-topic="weather"] button').click();
    await page.waitForFunction(() => document.querySelector('#subscriptions li[data-topic="weather"]') === null);
    await post(`${base}/publish?topic=weather`, 'not shown', {});
    await post(`${base}/publish?topic=demo`, 'after the unsubscribe', {});
    await page.locator('#messages li[data-topic="demo"]').waitFor();
    // Messages of one stream arrive in order: the demo message came after the weather one would have.
    assert.equal(await page.locator('#messages li[data-topic="weather"]').count(), 1);
    assert.equal(await page.locator('#count').textContent(), '3');
  });

  it('shows an invalid topic as an error and keeps the stream', async () => {
    await page.locator('#topics').fill('/livepipe/reserved');
    await page.locator('#subscribe').click();
    await page.waitForFunction(() => document.querySelector('#subscribe-status')?.classList.contains('bad') === true);
    assert.match((await page.locator('#subscribe-status').textContent()) ?? '', /reserved/);
    assert.equal(await page.locator('#topics').inputValue(), '/livepipe/reserved', 'kept for correcting');
    assert.equal(await page.locator('#state').getAttribute('data-state'), 'open');

    await page.locator('#publish-topic').fill('news');
    await page.locator('#publish-body').fill('Still streaming: a message on "news" with <b>markup</b> that is shown as text.');
    await page.locator('#publish').click();
    await page.waitForFunction(() => document.querySelectorAll('#messages li[data-topic="news"]').length === 2);
    assert.equal(await page.locator('#messages b').count(), 0, 'payloads must never become HTML');
    await page.screenshot({ path: SCREENSHOT, fullPage: true });
  });

  it('runs a gochan-style page unchanged', async () => {
    // What a page written for gochan does: EventSource with topics, session_id from the first
    // event, JSON update_subscriptions, messages as {topic, payload}.
    const sessionId = await page.evaluate(async () => {
      const w = window;
      w.gochan = { received: [], source: new EventSource('/events?topics=x') };
      const first = await new Promise<MessageEvent>((resolve) => w.gochan.source.addEventListener('message', resolve, { once: true }));
      const sid = JSON.parse(first.data).payload.session_id as string;
      w.gochan.source.addEventListener('message', (e) => w.gochan.received.push(JSON.parse(e.data)));
      const res = await fetch('/update_subscriptions', { method: 'POST', body: JSON.stringify({ session_id: sid, add: ['y'], remove: [] }) });
      if (res.status !== 200) throw new Error(`update_subscriptions answered ${res.status}`);
      return sid;
    });
    assert.match(sessionId, /^[\w-]{16,}$/);
    await post(`${base}/publish?topic=y`, 'on y', {});
    await post(`${base}/publish?topic=x`, 'on x', {});
    const received = await page.waitForFunction(() => {
      const got = window.gochan.received;
      return got.length >= 2 ? got : undefined;
    });
    assert.deepEqual(await received.jsonValue(), [
      { topic: 'y', payload: 'on y' },
      { topic: 'x', payload: 'on x' },
    ]);
    await page.evaluate(() => window.gochan.source.close());
  });

  it('logged no page errors, and no failed request but the invalid topic', () => {
    assert.deepEqual(pageErrors, []);
    assert.deepEqual(failedResponses, ['400 /update_subscriptions']);
  });
});

async function subscriptionChips(page: Page): Promise<string[]> {
  return page.locator('#subscriptions li[data-topic]').evaluateAll((items) => items.map((li) => (li as unknown as DomElement).dataset.topic ?? ''));
}
