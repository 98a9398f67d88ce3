/** Headless Debian Chromium for the browser tests, driven by playwright-core (never a downloaded browser). */
import { existsSync } from 'node:fs';
import { chromium, type Browser } from 'playwright-core';

export const CHROMIUM = '/usr/bin/chromium';

// Root needs --no-sandbox; the rest keep Chromium from calling out on this closed network.
const FLAGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'];

/**
 * The `skip` option for browser tests: skipped with the reason where Chromium is not installed,
 * never in CI (.ci/run installs it), where a missing browser must fail the run.
 */
export const chromiumSkip: string | false = existsSync(CHROMIUM) || process.env.CI ? false : `Chromium is not installed at ${CHROMIUM} (apt-get install chromium)`;

export function launchChromium(): Promise<Browser> {
  return chromium.launch({ executablePath: CHROMIUM, args: FLAGS });
}
