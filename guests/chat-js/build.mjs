// Builds chat-js into a WebAssembly component of the world
// `wasmhost:service/service` (guest-wit/service.wit).
//
//   node build.mjs OUT.wasm      (run from any folder)

import { componentize } from '@bytecodealliance/componentize-js';
import { mkdir, writeFile } from 'node:fs/promises';
import { dirname, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const out = process.argv[2];
if (!out || process.argv.length > 3) {
  console.error('usage: node build.mjs OUT.wasm');
  process.exit(2);
}
const outPath = resolve(out);
const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, '../..');
// Work from the repository root with relative paths, so that the component
// names its sources by their place in the repository, not on this machine.
process.chdir(root);

const started = performance.now();
const { component } = await componentize({
  sourcePath: relative(root, resolve(here, 'app.js')),
  witPath: 'guest-wit',
  worldName: 'service',
  // A pure component: the chat needs no clock, randomness or stdio (it logs
  // nothing), and no HTTP.
  disableFeatures: ['http', 'fetch-event', 'random', 'clocks', 'stdio'],
});
await mkdir(dirname(outPath), { recursive: true });
await writeFile(outPath, component);
console.error(`built ${out} (${component.length} bytes) in ${((performance.now() - started) / 1000).toFixed(1)} s`);
