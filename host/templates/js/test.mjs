// Runs the service's logic under plain Node: node --test
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { Echo } from './service.js';

test('numbers lines and keeps a half line across a swap', () => {
  const sent = [];
  const host = { send: (_conn, data) => sent.push(new TextDecoder().decode(data)), close() {} };
  const echo = new Echo();
  echo.connect(7n);
  echo.data(7n, new TextEncoder().encode('a\nb\nha'), host);
  assert.deepEqual(sent, ['1 a\n', '2 b\n']);
  const state = echo.export();
  const after = Echo.load(state);
  assert.deepEqual(after.export(), state);
  after.data(7n, new TextEncoder().encode('lf\n'), host);
  assert.equal(sent.at(-1), '3 half\n');
});
