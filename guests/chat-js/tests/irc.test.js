// Tests of the IRC protocol module: parsing, names, UTF-8 handling.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  decodeUtf8, encodeUtf8, fold, isWhitespace, isoTime, numeric, parse, prefix, utf8Length, validChannel,
  validNick,
} from '../src/irc.js';

test('parses commands, middle and trailing parameters', () => {
  assert.deepEqual(parse(':alice PRIVMSG #rust :hello there'),
    { command: 'PRIVMSG', params: ['#rust', 'hello there'] });
  assert.deepEqual(parse('user bob 0 * :Bob B'), { command: 'USER', params: ['bob', '0', '*', 'Bob B'] });
  assert.deepEqual(parse('  JOIN   #a,#b   key '), { command: 'JOIN', params: ['#a,#b', 'key'] });
  assert.deepEqual(parse('PING :'), { command: 'PING', params: [''] });
  assert.deepEqual(parse('TOPIC #x ::-) '), { command: 'TOPIC', params: ['#x', ':-) '] });
  assert.deepEqual(parse('quit'), { command: 'QUIT', params: [] });
  assert.deepEqual(parse(':prefix-only'), null);
  assert.equal(parse('   '), null);
  assert.equal(parse(''), null);
  // Only ASCII letters change case; tabs are not separators.
  assert.deepEqual(parse('prİvmsg\tx'), { command: 'PRİVMSG\tX', params: [] });
  assert.deepEqual(parse('ß'), { command: 'ß', params: [] });
});

test('validates nicks and channel names', () => {
  assert.ok(validNick('alice'));
  assert.ok(validNick('[bot]-1'));
  assert.ok(validNick('a'.repeat(30)));
  assert.ok(!validNick('a'.repeat(31)));
  assert.ok(!validNick('1abc'));
  assert.ok(!validNick('-abc'));
  assert.ok(!validNick(''));
  assert.ok(!validNick('é'));
  assert.ok(validChannel('#rust'));
  assert.ok(validChannel('&local'));
  assert.ok(validChannel('#é'));
  assert.ok(!validChannel('#'));
  assert.ok(!validChannel('rust'));
  assert.ok(!validChannel('#a,b'));
  assert.ok(!validChannel('#a b'));
  assert.ok(!validChannel('#a\x07'));
  assert.ok(!validChannel('#a\u0085'));
  assert.ok(validChannel(`#${'a'.repeat(49)}`));
  assert.ok(!validChannel(`#${'a'.repeat(50)}`));
  // 50 bytes of UTF-8, not 50 characters.
  assert.ok(validChannel(`#${'é'.repeat(24)}a`));
  assert.ok(!validChannel(`#${'é'.repeat(25)}`));
});

test('folds ASCII letters only', () => {
  assert.equal(fold('#RuSt'), '#rust');
  assert.equal(fold('ÉCOLE[]'), 'École[]');
  assert.equal(fold('[]\\~'), '[]\\~');
  assert.equal(fold('#ÀB'), '#Àb');
});

test('formats prefixes and numerics', () => {
  assert.equal(prefix(null, null, '::1'), '*!unknown@::1');
  assert.equal(prefix('al', 'a', 'h'), 'al!a@h');
  assert.equal(numeric('srv', '001', 'al', ':hi'), ':srv 001 al :hi');
});

test('Unicode whitespace is what Rust calls whitespace', () => {
  for (const cp of [9, 10, 11, 12, 13, 32, 0x85, 0xa0, 0x1680, 0x2000, 0x200a, 0x2028, 0x2029, 0x202f, 0x205f, 0x3000]) {
    assert.ok(isWhitespace(cp), cp.toString(16));
  }
  for (const cp of [0, 8, 14, 0x1f, 0x200b, 0xfeff, 0x41]) assert.ok(!isWhitespace(cp), cp.toString(16));
});

test('decodes UTF-8 replacing each maximal ill-formed subsequence', () => {
  const d = (/** @type {number[]} */ bytes) => decodeUtf8(Uint8Array.from(bytes));
  assert.equal(d([0x68, 0xc3, 0xa9]), 'hé');
  assert.equal(d([0xef, 0xbb, 0xbf, 0x41]), '\ufeffA'); // a BOM is kept
  assert.equal(d([0xf0, 0x9f, 0x98, 0x80]), '😀');
  assert.equal(d([0xff]), '\ufffd');
  assert.equal(d([0xc3]), '\ufffd');
  assert.equal(d([0xe2, 0x82]), '\ufffd');
  assert.equal(d([0xe2, 0x82, 0x41]), '\ufffdA');
  assert.equal(d([0xc0, 0xaf]), '\ufffd\ufffd');
  assert.equal(d([0xed, 0xa0, 0x80]), '\ufffd\ufffd\ufffd'); // a surrogate
  assert.equal(d([0xf4, 0x90, 0x80, 0x80]), '\ufffd\ufffd\ufffd\ufffd');
  assert.equal(d([0xf0, 0x9f, 0x98]), '\ufffd');
  // Rust's from_utf8_lossy on the Unicode standard's example (table 3-8).
  assert.equal(d([0x61, 0xf1, 0x80, 0x80, 0xe1, 0x80, 0xc2, 0x62, 0x80, 0x63, 0x80, 0xbf, 0x64]),
    'a\ufffd\ufffd\ufffdb\ufffdc\ufffd\ufffdd');
  assert.equal(decodeUtf8(new Uint8Array(20000).fill(0x61)), 'a'.repeat(20000));
  assert.throws(() => decodeUtf8(Uint8Array.from([0x61, 0xff]), true), TypeError);
  assert.equal(decodeUtf8(Uint8Array.from([0xef, 0xbb, 0xbf]), true), '\ufeff');
});

test('measures and encodes UTF-8', () => {
  for (const s of ['', 'abc', 'é', '€', '😀', 'a😀é€']) {
    assert.equal(utf8Length(s), encodeUtf8(s).length, s);
  }
});

test('formats IRCv3 server-time', () => {
  assert.equal(isoTime(0n), '1970-01-01T00:00:00.000Z');
  assert.equal(isoTime(1_795_615_205_123n), '2026-11-25T14:00:05.123Z');
  assert.equal(isoTime(951_782_400_000n), '2000-02-29T00:00:00.000Z');
});
