// Tests of the chat/1 state format: a golden blob written by hand from the
// layout documented in guests/chat/src/lib.rs, round trips, and rejection of
// malformed states.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Chat, Outbox } from '../src/chat.js';
import { StateError, decodeChat1, encodeChat1, parseJson } from '../src/state.js';

const enc = new TextEncoder();
const dec = new TextDecoder();

// Two users (one registered with half a line pending, one that only said
// NICK), one channel with a topic and history, one empty channel; compact,
// fields in the documented order, users by id, channels by name.
const GOLDEN =
  '{"server":"irc.test","history_limit":3,"users":{' +
  '"7":{"conn":7,"nick":"Alice","user":"al","realname":"Alice A","host":"127.0.0.1","registered":true,"pending":[80,73,78,71,32,195]},' +
  '"12":{"conn":12,"nick":"bob","user":null,"realname":"","host":"::1","registered":false,"pending":[]}},' +
  '"channels":{"#empty":{"name":"#Empty","topic":null,"members":[],"history":[]},' +
  '"#rust":{"name":"#Rust","topic":"Rust \\"talk\\"\\u0001\\n","members":[7],"history":[' +
  '{"from":"Alice!al@127.0.0.1","text":"hello é ☃"},{"from":"Alice!al@127.0.0.1","text":"\\u0001ACTION waves\\u0001"}]}}}';

test('reads the golden chat/1 blob and writes it back byte for byte', () => {
  const chat = decodeChat1(enc.encode(GOLDEN));
  assert.equal(chat.server, 'irc.test');
  assert.equal(chat.historyLimit, 3);
  assert.deepEqual([...chat.users.keys()], [7n, 12n]);
  const alice = chat.users.get(7n);
  assert.equal(alice?.nick, 'Alice');
  assert.equal(alice?.user, 'al');
  assert.equal(alice?.realname, 'Alice A');
  assert.equal(alice?.registered, true);
  assert.deepEqual(alice?.pending, Uint8Array.from([80, 73, 78, 71, 32, 195]));
  assert.equal(chat.users.get(12n)?.user, null);
  assert.equal(chat.channels.get('#rust')?.topic, 'Rust "talk"\u0001\n');
  assert.deepEqual(chat.channels.get('#rust')?.members, [7n]);
  assert.deepEqual(chat.channels.get('#rust')?.history[1], { from: 'Alice!al@127.0.0.1', text: '\u0001ACTION waves\u0001' });
  assert.deepEqual(new Map(chat.nicks), new Map([['alice', 7n], ['bob', 12n]]));
  const bytes = encodeChat1(chat);
  assert.equal(dec.decode(bytes), GOLDEN);
  assert.deepEqual(bytes, enc.encode(GOLDEN));
});

test('an imported state serves: pending bytes complete, nicks taken, history replayed', () => {
  const chat = decodeChat1(enc.encode(GOLDEN));
  let out = new Outbox();
  chat.data(7n, Uint8Array.from([0xa9, 0x0d, 0x0a]), out); // completes "PING é"
  assert.deepEqual(out.lines, [[7n, ':irc.test PONG irc.test :é']]);
  out = new Outbox();
  chat.data(12n, enc.encode('NICK ALICE\r\nUSER b 0 * :B\r\nJOIN #RUST\r\n'), out);
  const bob = out.lines.filter(([c]) => c === 12n).map(([, l]) => l);
  assert.equal(bob[0], ':irc.test 433 bob ALICE :Nickname is already in use');
  assert.deepEqual(bob.slice(-5), [
    ':irc.test 332 bob #Rust :Rust "talk"\u0001\n',
    ':irc.test 353 bob = #Rust :Alice bob',
    ':irc.test 366 bob #Rust :End of /NAMES list',
    ':Alice!al@127.0.0.1 PRIVMSG #Rust :hello é ☃',
    ':Alice!al@127.0.0.1 PRIVMSG #Rust :\u0001ACTION waves\u0001',
  ]);
});

test('round trips a state built by talking, whatever the JSON spacing and order', () => {
  const chat = Chat.configure([['history', '5']]);
  const out = new Outbox();
  for (const [id, peer] of [[3n, '127.0.0.1:1'], [1n, '[::1]:2'], [2n, '10.0.0.2:3']]) {
    chat.connect(/** @type {bigint} */ (id), /** @type {string} */ (peer));
  }
  chat.data(3n, enc.encode('NICK zed\r\nUSER z 0 * :Zed\r\nJOIN #b,#a,&c\r\nPRIVMSG #a :x\r\n'), out);
  chat.data(1n, enc.encode('NICK amy\r\nUSER a 0 * :Amy\r\nJOIN #A\r\nTOPIC #a :t\r\nPRIVMSG #a :y\r\nPRIV'), out);
  chat.data(2n, enc.encode('NICK cat\r\n'), out);
  const bytes = encodeChat1(chat);
  const back = decodeChat1(bytes);
  assert.deepEqual(encodeChat1(back), bytes);
  assert.deepEqual(back.users, chat.users);
  assert.deepEqual(new Map(back.nicks), new Map(chat.nicks));
  assert.deepEqual(new Map(back.channels), new Map(chat.channels));
  // Users by id, channels by name in code point order.
  const text = dec.decode(bytes);
  assert.ok(text.indexOf('"1":') < text.indexOf('"2":') && text.indexOf('"2":') < text.indexOf('"3":'));
  assert.ok(text.indexOf('"#a":') < text.indexOf('"#b":') && text.indexOf('"#b":') < text.indexOf('"&c":'));
  // Read with JSON.parse or, when a number is not a small natural one, with
  // the exact parser: the same state.
  const slow = text.replace('{"server"', '{"unknown":-1.5e3,"server"');
  assert.deepEqual(encodeChat1(decodeChat1(enc.encode(slow))), bytes);
  // Reformatted, reordered, with unknown fields: the same state.
  const pretty = JSON.stringify({ extra: [1, { x: null }], ...JSON.parse(text) }, null, 2);
  assert.deepEqual(encodeChat1(decodeChat1(enc.encode(pretty))), bytes);
});

test('keeps u64 connection ids exact', () => {
  const big = '18446744073709551615';
  const blob = `{"server":"s","history_limit":0,"users":{"${big}":{"conn":${big},"nick":null,"user":null,` +
    `"realname":"","host":"h","registered":false,"pending":[]}},"channels":{"#a":{"name":"#a","topic":null,"members":[${big}],"history":[]}}}`;
  const chat = decodeChat1(enc.encode(blob));
  assert.ok(chat.users.has(2n ** 64n - 1n));
  assert.equal(dec.decode(encodeChat1(chat)), blob);
});

test('absent optional fields read as null', () => {
  const blob = '{"server":"s","history_limit":1,"users":{"1":{"conn":1,"realname":"","host":"h","registered":false,"pending":[]}},' +
    '"channels":{"#a":{"name":"#A","members":[1],"history":[]}}}';
  const chat = decodeChat1(enc.encode(blob));
  assert.equal(chat.users.get(1n)?.nick, null);
  assert.equal(chat.channels.get('#a')?.topic, null);
});

test('rejects malformed states with a message saying where', () => {
  const base = JSON.parse(GOLDEN);
  /** @param {(s: any) => void} change */
  const bad = (change) => {
    const s = structuredClone(base);
    change(s);
    return enc.encode(JSON.stringify(s));
  };
  /** @param {Uint8Array | string} bytes @param {RegExp} message */
  const rejects = (bytes, message) => assert.throws(
    () => decodeChat1(typeof bytes === 'string' ? enc.encode(bytes) : bytes),
    (e) => e instanceof StateError && message.test(e.message), String(message));
  rejects('', /unexpected end of input at line 1 column 1/);
  rejects('[]', /^expected an object, got an array$/);
  rejects('{"server":"s"', /expected `,` or `}` at line 1 column 14/);
  rejects(`${GOLDEN} x`, /trailing characters/);
  rejects(Uint8Array.from([0x7b, 0xff, 0x7d]), /^not valid UTF-8$/);
  rejects('{"server":"\\ud800","history_limit":1,"users":{},"channels":{}}', /lone surrogate/);
  rejects('{"server":"a\tb"}', /control character in a string/);
  rejects('{"server":"\\x"}', /invalid escape/);
  rejects(`${'['.repeat(200)}1${']'.repeat(199)}`, /expected `,` or `]` at line 1 column 401/);
  rejects(`[${'{"a":'.repeat(50)}[1}]`, /expected `,` or `]` at line 1 column 254/);
  rejects('{"server":"s","server":"t","history_limit":1,"users":{},"channels":{}}', /duplicate field `server`/);
  rejects(bad((s) => { delete s.users; }), /^missing field `users`$/);
  rejects(bad((s) => { s.server = 5; }), /^server: expected a string, got 5$/);
  rejects(bad((s) => { s.history_limit = -1; }), /history_limit: expected an integer from 0 to 4294967295, got -1/);
  rejects(GOLDEN.replace('"history_limit":3', '"history_limit":3.0'), /history_limit: expected an integer .* got 3.0/);
  rejects(GOLDEN.replace('"history_limit":3', '"history_limit":3e0'), /history_limit: expected an integer/);
  rejects(bad((s) => { s.history_limit = 2 ** 32; }), /history_limit: expected an integer from 0 to 4294967295, got 4294967296/);
  rejects(bad((s) => { s.users['7'].pending[0] = 256; }), /^users\.7\.pending\[0\]: expected an integer from 0 to 255, got 256$/);
  rejects(bad((s) => { s.users['7'].registered = 1; }), /users\.7\.registered: expected true or false, got 1/);
  rejects(bad((s) => { s.users['7'].nick = 3; }), /users\.7\.nick: expected a string, got 3/);
  rejects(bad((s) => { delete s.users['7'].host; }), /users\.7: missing field `host`/);
  rejects(bad((s) => { s.users['8'] = s.users['7']; }), /users\.8: the key must be the user's `conn` \(7\)/);
  rejects(bad((s) => { s.users['07'] = s.users['7']; delete s.users['7']; }), /users\.07: the key must be/);
  rejects(GOLDEN.replace('"conn":7', '"conn":18446744073709551616'), /users\.7\.conn: expected an integer from 0 to 18446744073709551615/);
  rejects(bad((s) => { s.channels['#RUST'] = s.channels['#rust']; delete s.channels['#rust']; }),
    /channels\.#RUST: the key must be the channel's name in lower case \(#rust\)/);
  rejects(bad((s) => { s.channels['#rust'].members = ['7']; }), /channels\.#rust\.members\[0\]: expected an integer .* got "7"/);
  rejects(bad((s) => { s.channels['#rust'].history = [{ from: 'x' }]; }), /channels\.#rust\.history\[0\]: missing field `text`/);
  rejects(bad((s) => { s.channels = []; }), /^channels: expected an object, got an array$/);
});

test('reads maps and records as serde does', () => {
  const user = (/** @type {string} */ nick) =>
    `{"conn":7,"nick":"${nick}","user":null,"realname":"","host":"h","registered":false,"pending":[]}`;
  const blob = (/** @type {string} */ users, extra = '') =>
    enc.encode(`{"server":"s",${extra}"history_limit":1,"users":{${users}},"channels":{}}`);
  // A map key given twice: each value is read, the last one kept.
  assert.equal(decodeChat1(blob(`"7":${user('a')},"7":${user('b')}`)).users.get(7n)?.nick, 'b');
  assert.throws(() => decodeChat1(blob(`"7":{},"7":${user('b')}`)), /users\.7: missing field `conn`/);
  // Unknown fields are skipped at any depth.
  for (const deep of [`${'['.repeat(100000)}${']'.repeat(100000)}`, `${'{"a":[1,{}],"b":'.repeat(1000)}0${'}'.repeat(1000)}`]) {
    assert.equal(decodeChat1(blob('', `"deep":${deep},`)).server, 's');
  }
  // An unknown field may come twice, a known one may not.
  assert.equal(decodeChat1(blob('', '"x":1,"x":[],"nicks":{},')).server, 's');
  assert.throws(() => decodeChat1(blob('', '"history_limit":2,')), /duplicate field `history_limit`$/);
  assert.throws(() => decodeChat1(blob('', '"history_limit" :2,')), /duplicate field `history_limit`$/);
  assert.throws(() => decodeChat1(blob(`"7":${user('a').replace('"nick"', '"nick":"x","nick"')}`)),
    /users\.7: duplicate field `nick`$/);
});

test('reads chat/2 times and caps as the Rust chat/1 reader does, and writes neither', () => {
  const blob = '{"server":"s","history_limit":5,"users":{' +
    '"1":{"conn":1,"nick":"a","user":"a","realname":"","host":"h","registered":true,"pending":[],"caps":["server-time"]},' +
    '"2":{"conn":2,"nick":"b","user":"b","realname":"","host":"h","registered":true,"pending":[]}},' +
    '"channels":{"#c":{"name":"#c","topic":null,"members":[],"history":[' +
    '{"from":"x!y@z","text":"old","time":1795615205123},{"from":"x!y@z","text":"older","time":null}]}}}';
  const chat = decodeChat1(enc.encode(blob));
  const out = new Outbox();
  chat.data(1n, enc.encode('JOIN #c\r\n'), out);
  chat.data(2n, enc.encode('JOIN #c\r\n'), out);
  const replays = out.lines.filter(([, l]) => l.includes('PRIVMSG')).map(([c, l]) => `${c} ${l}`);
  assert.deepEqual(replays, [
    '1 @time=2026-11-25T14:00:05.123Z :x!y@z PRIVMSG #c :old',
    '1 :x!y@z PRIVMSG #c :older',
    '2 :x!y@z PRIVMSG #c :[2026-11-25 14:00:05] old',
    '2 :x!y@z PRIVMSG #c :older',
  ]);
  const written = dec.decode(encodeChat1(chat));
  assert.ok(!written.includes('time') && !written.includes('caps'), written);
  assert.throws(() => decodeChat1(enc.encode(blob.replace('"caps":["server-time"]', '"caps":[1]'))),
    /users\.1\.caps\[0\]: expected a string, got 1/);
  assert.throws(() => decodeChat1(enc.encode(blob.replace('"time":null', '"time":-1'))),
    /channels\.#c\.history\[1\]\.time: expected an integer/);
});

test('parses JSON values', () => {
  assert.deepEqual(parseJson(' [ true , false , null , "a\\u00e9\\ud83d\\ude00\\/" ] '), [true, false, null, 'aé😀/']);
  assert.throws(() => parseJson('01'), /trailing characters/);
  assert.throws(() => parseJson('-'), /invalid number at line 1 column 2/);
  assert.throws(() => parseJson('1.'), /invalid number/);
  assert.throws(() => parseJson('1e'), /invalid number/);
  assert.throws(() => parseJson('x'), /expected a value at line 1 column 1/);
  assert.throws(() => parseJson('{"a" 1}'), /expected `:`/);
  assert.throws(() => parseJson('{1:1}'), /expected a string as member name/);
  assert.throws(() => parseJson('"abc'), /unterminated string/);
});
