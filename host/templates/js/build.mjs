// Builds {{name}}.wasm with componentize-js: node build.mjs [OUT]
import { componentize } from '@bytecodealliance/componentize-js';
import { rename, writeFile } from 'node:fs/promises';

const out = process.argv[2] ?? '{{name}}.wasm';
const { component } = await componentize({
  sourcePath: 'app.js',
  witPath: 'guest-wit',
  worldName: 'service',
  // The host grants a guest nothing; these are what the service uses.
  disableFeatures: ['http', 'fetch-event', 'random', 'clocks', 'stdio'],
});
await writeFile(`${out}.tmp`, component);
await rename(`${out}.tmp`, out);
console.error(`built ${out}`);
