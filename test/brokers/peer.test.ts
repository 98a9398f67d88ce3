import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { importPeer } from '../../src/brokers/broker.ts';
import { RelayError } from '../../src/errors.ts';

describe('optional peer dependencies', () => {
  it('names the npm package to install when a driver client library is missing', async () => {
    const pkg = '@livepipe/no-such-client';
    await assert.rejects(importPeer(pkg, 'nope'), (err: unknown) => {
      assert.ok(err instanceof RelayError);
      assert.equal(err.code, 'missing-client');
      assert.equal(err.message, `the nope:// broker needs the npm package ${pkg}; install it with: npm install ${pkg}`);
      return true;
    });
  });
});
