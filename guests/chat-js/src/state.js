// The `chat/1` state format (documented in guests/chat/src/lib.rs): UTF-8
// JSON carrying the server name, the history limit, every connection (with
// its unparsed bytes) and every channel with its members and history.
//
// The writer produces what the Rust chat's serde_json writes (compact, its
// field order, users by id, channels by name in code point order). The reader
// accepts what the Rust reader accepts: strict where the format is typed
// (integers without fraction or exponent, u64 ids, bytes 0-255, no field
// twice, no lone surrogates), a map key given twice keeps the last value, and
// fields it does not know are ignored, at any depth. Two fields of chat/2 are
// read as the Rust chat reads them (`caps` of a user, `time` of a history
// line) but never written. Unlike the Rust reader it also checks that each
// user's key is its `conn` and each channel's key its folded name.
//
// Reading runs in an interpreter (no JIT in WebAssembly), where the engine's
// own JSON.parse is some thirty times faster than JSON parsed in JavaScript.
// So a state is read with JSON.parse when a few whole-text checks show that
// nothing JSON.parse loses matters (a number that is not a small natural
// number, a member given twice, an escaped surrogate); else, and for every
// error, with the exact parser below.

import { Channel, Chat, User } from './chat.js';
import { decodeUtf8, encodeUtf8, fold } from './irc.js';

export const CHAT1 = 'chat/1';

/**
 * Writes the whole state as `chat/1`.
 * @param {Chat} chat
 * @returns {Uint8Array}
 */
export function encodeChat1(chat) {
  const s = JSON.stringify;
  const users = chat.sortedUsers().map((u) =>
    `"${u.conn}":{"conn":${u.conn},"nick":${s(u.nick)},"user":${s(u.user)},` +
    `"realname":${s(u.realname)},"host":${s(u.host)},"registered":${u.registered},` +
    `"pending":[${u.pending.join(',')}]}`);
  const channels = chat.sortedChannels().map(([key, c]) =>
    `${s(key)}:{"name":${s(c.name)},"topic":${s(c.topic)},"members":[${c.members.join(',')}],` +
    `"history":[${c.history.map((h) => `{"from":${s(h.from)},"text":${s(h.text)}}`).join(',')}]}`);
  return encodeUtf8(
    `{"server":${s(chat.server)},"history_limit":${chat.historyLimit},` +
    `"users":{${users.join(',')}},"channels":{${channels.join(',')}}}`);
}

/** A malformed `chat/1` state; the message says where and what. */
export class StateError extends Error {
  name = 'StateError';
}

/**
 * Reads a `chat/1` state.
 * @param {Uint8Array} bytes
 * @returns {Chat}
 * @throws {StateError}
 */
export function decodeChat1(bytes) {
  let text;
  try {
    text = decodeUtf8(bytes, true);
  } catch {
    throw new StateError('not valid UTF-8');
  }
  const quick = parseQuickly(text);
  if (quick) {
    try {
      const counted = { members: 0 };
      const chat = readChat(quick.value, counted);
      // As many members read as written: no member was given twice.
      if (counted.members === quick.members) return chat;
    } catch (e) {
      if (!(e instanceof StateError)) throw e;
    }
  }
  // Doubts and errors go to the exact parser, which also words the errors.
  return readChat(parseJson(text), null);
}

/**
 * @param {JsonValue} value
 * @param {Counted | null} counted where to count the members read, when
 *   `value` comes from JSON.parse
 */
function readChat(value, counted) {
  const root = new Fields(value, counted, '', null);
  const chat = new Chat();
  chat.server = root.str('server');
  chat.historyLimit = small(root.required('history_limit'), root, 'history_limit', undefined, USIZE_MAX);
  for (const [key, v] of root.map('users')) {
    const user = readUser(new Fields(v, counted, 'users', key));
    if (key !== String(user.conn)) {
      throw new StateError(`users.${key}: the key must be the user's \`conn\` (${user.conn})`);
    }
    chat.users.set(user.conn, user);
  }
  for (const [key, v] of root.map('channels')) {
    const channel = readChannel(new Fields(v, counted, 'channels', key));
    if (key !== fold(channel.name)) {
      throw new StateError(`channels.${key}: the key must be the channel's name in lower case (${fold(channel.name)})`);
    }
    chat.channels.set(key, channel);
  }
  root.done();
  chat.rebuildNicks();
  return chat;
}

/** @param {Fields} f */
function readUser(f) {
  const user = new User(u64(f.required('conn'), f, 'conn'), f.str('host'));
  user.nick = f.optStr('nick');
  user.user = f.optStr('user');
  user.realname = f.str('realname');
  const registered = f.required('registered');
  if (typeof registered !== 'boolean') throw typeError(f, 'registered', undefined, 'true or false', registered);
  user.registered = registered;
  const pending = f.array('pending');
  const bytes = new Uint8Array(pending.length);
  for (let i = 0; i < pending.length; i++) bytes[i] = small(pending[i], f, 'pending', i, 255);
  user.pending = bytes;
  if (f.has('caps')) {
    user.caps = f.array('caps').map((c, i) => {
      if (typeof c !== 'string') throw typeError(f, 'caps', i, 'a string', c);
      return c;
    });
  }
  f.done();
  return user;
}

/** @param {Fields} f */
function readChannel(f) {
  const channel = new Channel(f.str('name'));
  channel.topic = f.optStr('topic');
  channel.members = f.array('members').map((m, i) => u64(m, f, 'members', i));
  channel.history = f.array('history').map((h, i) => {
    const line = new Fields(h, f.counted, f, 'history', i);
    /** @type {import('./chat.js').HistoryLine} */
    const entry = { from: line.str('from'), text: line.str('text') };
    const time = line.get('time');
    if (time !== undefined && time !== null) entry.time = u64(time, line, 'time');
    line.done();
    return entry;
  });
  f.done();
  return channel;
}

// --- typed access to parsed JSON ----------------------------------------------
//
// A value comes from JSON.parse (plain objects; numbers known to be natural
// and below 10^15) or from parseJson (JsonObject, JsonNumber). The path of a
// value is only spelled out for an error.

/** @typedef {{ members: number }} Counted */

const U64_MAX = 0xffffffffffffffffn;
/** `usize` of the Rust chat, which runs on wasm32. */
const USIZE_MAX = 0xffffffff;

/** A JSON number, kept as its source text. */
class JsonNumber {
  /** @param {string} text @param {boolean} natural digits only: no sign, fraction or exponent */
  constructor(text, natural) {
    this.text = text;
    this.natural = natural;
  }
}

/** A JSON object, its members in source order (duplicates kept). */
class JsonObject {
  /** @param {[string, JsonValue][]} members */
  constructor(members) {
    this.members = members;
  }
}

/**
 * @typedef {null | boolean | number | string | JsonNumber | JsonObject
 *   | JsonValue[] | { [key: string]: JsonValue }} JsonValue
 */

/** @param {JsonValue | undefined} v @returns {v is JsonObject | { [key: string]: JsonValue }} */
const isObject = (v) => v instanceof JsonObject ||
  (typeof v === 'object' && v !== null && !Array.isArray(v) && !(v instanceof JsonNumber));

const EMPTY_MAP = new Map();
const EMPTY_SET = new Set();

/**
 * `base.name[index]`, leaving out what is absent.
 * @param {string} base @param {string | null} name @param {number} [index]
 */
function join(base, name, index) {
  const path = name === null ? base : base === '' ? name : `${base}.${name}`;
  return index === undefined ? path : `${path}[${index}]`;
}

/**
 * An object read as a record: fields it does not know are ignored, one it
 * reads must not be given twice (serde's rules for a struct).
 */
class Fields {
  /**
   * @param {JsonValue | undefined} value
   * @param {Counted | null} counted
   * @param {string | Fields} base the parent's path, or the parent
   * @param {string | null} name @param {number} [index] where in the parent
   */
  constructor(value, counted, base, name, index) {
    this.counted = counted;
    this.base = base;
    this.name = name;
    this.index = index;
    if (!isObject(value)) throw typeError(this, null, undefined, 'an object', value);
    /** Fields read so far. @type {string[]} */
    this.read = [];
    /** A plain object from JSON.parse. @type {{ [key: string]: JsonValue } | null} */
    this.object = null;
    /** The members of a JsonObject, by name. @type {Map<string, JsonValue>} */
    this.values = EMPTY_MAP;
    /** The names a JsonObject has more than once. @type {Set<string>} */
    this.twice = EMPTY_SET;
    if (!(value instanceof JsonObject)) {
      this.object = value;
      return;
    }
    this.values = new Map();
    this.twice = new Set();
    for (const [field, v] of value.members) {
      if (this.values.has(field)) this.twice.add(field);
      this.values.set(field, v);
    }
  }

  /** Where this object is, as `users.7`. */
  get path() {
    return join(typeof this.base === 'string' ? this.base : this.base.path, this.name, this.index);
  }

  /** The field `name`, or undefined when absent. @param {string} name */
  get(name) {
    let v;
    if (this.object) {
      // No field read here is a property of Object.prototype.
      v = this.object[name];
    } else {
      if (this.twice.has(name)) throw new StateError(`${prefix(this.path)}duplicate field \`${name}\``);
      v = this.values.get(name);
    }
    if (v !== undefined) this.read.push(name);
    return v;
  }

  /** @param {string} name */
  has(name) {
    return this.object ? this.object[name] !== undefined : this.values.has(name);
  }

  /** @param {string} name */
  required(name) {
    const v = this.get(name);
    if (v === undefined) throw new StateError(`${prefix(this.path)}missing field \`${name}\``);
    return v;
  }

  /** @param {string} name @returns {string} */
  str(name) {
    const v = this.required(name);
    if (typeof v !== 'string') throw typeError(this, name, undefined, 'a string', v);
    return v;
  }

  /** A string, or null when null or absent. @param {string} name @returns {string | null} */
  optStr(name) {
    const v = this.get(name);
    if (v === undefined || v === null) return null;
    if (typeof v !== 'string') throw typeError(this, name, undefined, 'a string', v);
    return v;
  }

  /** @param {string} name @returns {JsonValue[]} */
  array(name) {
    const v = this.required(name);
    if (!Array.isArray(v)) throw typeError(this, name, undefined, 'an array', v);
    return v;
  }

  /**
   * The entries of an object field read as a map, in source order: each
   * value is read, a key given twice keeps the last (as serde fills a BTreeMap).
   * @param {string} name @returns {[string, JsonValue][]}
   */
  map(name) {
    const v = this.required(name);
    if (v instanceof JsonObject) return v.members;
    if (!isObject(v)) throw typeError(this, name, undefined, 'an object', v);
    const members = Object.entries(v);
    if (this.counted) this.counted.members += members.length;
    return members;
  }

  /** After the last field: counts the members, those not read too. */
  done() {
    if (!this.object || !this.counted) return;
    const names = Object.keys(this.object);
    this.counted.members += names.length;
    if (names.length === this.read.length) return;
    for (const name of names) {
      if (!this.read.includes(name)) this.counted.members += countMembers(this.object[name], 1);
    }
  }
}

/**
 * A non-negative integer written without fraction or exponent, at most `max`
 * (which is below 2^53).
 * @param {JsonValue} v @param {Fields} f @param {string} name @param {number | undefined} index
 * @param {number} max
 */
function small(v, f, name, index, max) {
  if (typeof v === 'number' && v <= max) return v;
  if (v instanceof JsonNumber && v.natural && v.text.length <= 15) {
    const n = Number(v.text);
    if (n <= max) return n;
  }
  throw typeError(f, name, index, `an integer from 0 to ${max}`, v);
}

/**
 * An unsigned 64-bit integer written without fraction or exponent.
 * @param {JsonValue} v @param {Fields} f @param {string} name @param {number} [index]
 */
function u64(v, f, name, index) {
  if (typeof v === 'number') return BigInt(v);
  if (v instanceof JsonNumber && v.natural) {
    const n = BigInt(v.text);
    if (n <= U64_MAX) return n;
  }
  throw typeError(f, name, index, `an integer from 0 to ${U64_MAX}`, v);
}

/** @param {string} path */
const prefix = (path) => (path === '' ? '' : `${path}: `);

/**
 * @param {Fields} f @param {string | null} name @param {number | undefined} index
 * @param {string} expected @param {JsonValue | undefined} got
 */
function typeError(f, name, index, expected, got) {
  return new StateError(`${prefix(join(f.path, name, index))}expected ${expected}, got ${describe(got)}`);
}

/** @param {JsonValue | undefined} v */
function describe(v) {
  if (v === null) return 'null';
  if (v instanceof JsonNumber) return v.text;
  if (Array.isArray(v)) return 'an array';
  if (isObject(v)) return 'an object';
  if (typeof v === 'string') return JSON.stringify(v.length > 40 ? `${v.slice(0, 40)}...` : v);
  return String(v);
}

// --- JSON (RFC 8259) -------------------------------------------------------------

/**
 * Containers nested deeper than this are checked but not built: no field of
 * chat/1 is that deep, and serde skips what it does not read at any depth.
 */
const BUILD_DEPTH = 32;
/** What stands for a value nested too deep to be read. */
const TOO_DEEP = Object.freeze([]);
/**
 * What JSON.parse would lose, looked for outside strings (a match inside a
 * string only costs the exact parser): an escaped surrogate (which may be
 * lone), a number with a sign, fraction or exponent or of 16 digits, and
 * space before a colon (which would hide a member name from the count below).
 */
const DOUBT = /\\u[dD][89a-fA-F]|[:[,]\s*(?:-\d|\d+[.eE]|\d{16})[\d.eE+-]*[\s,\]}]|"\s+:/;

/**
 * JSON.parse, when nothing it loses matters here; else null. Whether an
 * object had a member twice shows only once it is read: `members` is how
 * many member names the text has (or more, never fewer).
 * @param {string} text
 * @returns {{ value: JsonValue, members: number } | null}
 */
export function parseQuickly(text) {
  let value;
  try {
    value = JSON.parse(text);
  } catch {
    return null;
  }
  if (DOUBT.test(text)) return null;
  // A member name ends with `":`; so does `\":` in a string, which only
  // makes the count too high.
  return { value, members: text.split('":').length - 1 };
}

/**
 * Members of every object in `v`; NaN when containers nest too deep to count
 * here (the exact parser takes those).
 * @param {unknown} v @param {number} depth of `v`
 * @returns {number}
 */
function countMembers(v, depth) {
  if (typeof v !== 'object' || v === null) return 0;
  if (depth >= BUILD_DEPTH) return NaN;
  let n = 0;
  if (Array.isArray(v)) {
    for (const x of v) if (typeof x === 'object' && x !== null) n += countMembers(x, depth + 1);
    return n;
  }
  for (const x of Object.values(v)) {
    n++;
    if (typeof x === 'object' && x !== null) n += countMembers(x, depth + 1);
  }
  return n;
}

const NEEDS_CARE = /[\\\u0000-\u001f]/;
const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/;
/** @type {Record<string, string>} */
const ESCAPES = { '"': '"', '\\': '\\', '/': '/', b: '\b', f: '\f', n: '\n', r: '\r', t: '\t' };
/** @type {[string, JsonValue][]} */
const LITERALS = [['true', true], ['false', false], ['null', null]];

/** @param {number} c */
const isDigit = (c) => c >= 0x30 && c <= 0x39;

/**
 * Parses one JSON text (with only whitespace around it), keeping numbers as
 * written and members given twice.
 * @param {string} text
 * @returns {JsonValue}
 */
export function parseJson(text) {
  let pos = 0;

  /** @param {string} what */
  const fail = (what) => {
    const before = text.slice(0, pos);
    const line = before.split('\n').length;
    const column = pos - before.lastIndexOf('\n');
    return new StateError(`${what} at line ${line} column ${column}`);
  };
  const space = () => {
    // Each turn consumes a character.
    for (;;) {
      const c = text.charCodeAt(pos);
      if (c === 0x20 || c === 0x0a || c === 0x0d || c === 0x09) pos++;
      else return;
    }
  };

  /** @returns {string} */
  const string = () => {
    const start = pos + 1;
    const end = text.indexOf('"', start);
    if (end < 0) {
      pos = text.length;
      throw fail('unterminated string');
    }
    const fast = text.slice(start, end);
    if (!NEEDS_CARE.test(fast)) {
      pos = end + 1;
      return fast;
    }
    pos = start;
    let out = '';
    let escaped = false;
    // Each turn consumes plain characters and then the closing quote (done)
    // or an escape.
    for (;;) {
      let i = pos;
      for (let c = text.charCodeAt(i); c >= 0x20 && c !== 0x22 && c !== 0x5c; c = text.charCodeAt(i)) i++;
      out += text.slice(pos, i);
      pos = i;
      const c = text[pos];
      if (c === '"') {
        pos++;
        if (escaped && LONE_SURROGATE.test(out)) throw fail('lone surrogate in a \\u escape');
        return out;
      }
      if (c === undefined) throw fail('unterminated string');
      if (c !== '\\') throw fail('control character in a string');
      const e = text[pos + 1];
      if (e === 'u') {
        const hex = text.slice(pos + 2, pos + 6);
        if (!/^[0-9a-fA-F]{4}$/.test(hex)) throw fail('invalid \\u escape');
        out += String.fromCharCode(parseInt(hex, 16));
        pos += 6;
      } else if (e !== undefined && Object.hasOwn(ESCAPES, e)) {
        out += ESCAPES[e];
        pos += 2;
      } else {
        throw fail('invalid escape');
      }
      escaped = true;
    }
  };

  /** @returns {JsonNumber} */
  const number = () => {
    const start = pos;
    let natural = true;
    if (text.charCodeAt(pos) === 0x2d) {
      pos++;
      natural = false;
    }
    if (text.charCodeAt(pos) === 0x30) pos++;
    else if (isDigit(text.charCodeAt(pos))) while (isDigit(text.charCodeAt(pos))) pos++;
    else throw fail('invalid number');
    if (text.charCodeAt(pos) === 0x2e) {
      pos++;
      natural = false;
      if (!isDigit(text.charCodeAt(pos))) throw fail('invalid number');
      while (isDigit(text.charCodeAt(pos))) pos++;
    }
    if ((text.charCodeAt(pos) | 0x20) === 0x65) {
      pos++;
      natural = false;
      if (text.charCodeAt(pos) === 0x2b || text.charCodeAt(pos) === 0x2d) pos++;
      if (!isDigit(text.charCodeAt(pos))) throw fail('invalid number');
      while (isDigit(text.charCodeAt(pos))) pos++;
    }
    return new JsonNumber(text.slice(start, pos), natural);
  };

  /** @param {number} depth of the value @returns {JsonValue} */
  const value = (depth) => {
    space();
    const c = text.charCodeAt(pos);
    if (c === 0x22) return string();
    if ((c === 0x7b || c === 0x5b) && depth >= BUILD_DEPTH) {
      skipContainer();
      return TOO_DEEP;
    }
    if (c === 0x7b) {
      pos++;
      /** @type {[string, JsonValue][]} */
      const members = [];
      space();
      if (text.charCodeAt(pos) === 0x7d) {
        pos++;
        return new JsonObject(members);
      }
      // Each turn consumes a member and a comma, or ends.
      for (;;) {
        space();
        if (text.charCodeAt(pos) !== 0x22) throw fail('expected a string as member name');
        const name = string();
        space();
        if (text.charCodeAt(pos) !== 0x3a) throw fail('expected `:`');
        pos++;
        members.push([name, value(depth + 1)]);
        space();
        const next = text.charCodeAt(pos);
        if (next !== 0x2c && next !== 0x7d) throw fail('expected `,` or `}`');
        pos++;
        if (next === 0x7d) return new JsonObject(members);
      }
    }
    if (c === 0x5b) {
      pos++;
      /** @type {JsonValue[]} */
      const items = [];
      space();
      if (text.charCodeAt(pos) === 0x5d) {
        pos++;
        return items;
      }
      // Each turn consumes an element and a comma, or ends.
      for (;;) {
        items.push(value(depth + 1));
        space();
        const next = text.charCodeAt(pos);
        if (next !== 0x2c && next !== 0x5d) throw fail('expected `,` or `]`');
        pos++;
        if (next === 0x5d) return items;
      }
    }
    return scalar();
  };

  /** A number, true, false or null. @returns {JsonValue} */
  const scalar = () => {
    const c = text.charCodeAt(pos);
    if (c === 0x2d || isDigit(c)) return number();
    for (const [word, v] of LITERALS) {
      if (text.startsWith(word, pos)) {
        pos += word.length;
        return v;
      }
    }
    throw fail(Number.isNaN(c) ? 'unexpected end of input' : 'expected a value');
  };

  /** A member name and its colon. */
  const memberName = () => {
    space();
    if (text.charCodeAt(pos) !== 0x22) throw fail('expected a string as member name');
    string();
    space();
    if (text.charCodeAt(pos) !== 0x3a) throw fail('expected `:`');
    pos++;
  };

  /** Checks the object or array at `pos` without building it, at any depth. */
  const skipContainer = () => {
    /** The closing brackets awaited, innermost last. @type {number[]} */
    const open = [];
    // Each turn consumes a value, then any closing brackets and a comma.
    for (;;) {
      space();
      const c = text.charCodeAt(pos);
      if (c === 0x7b || c === 0x5b) {
        pos++;
        space();
        const close = c === 0x7b ? 0x7d : 0x5d;
        if (text.charCodeAt(pos) !== close) {
          open.push(close);
          if (c === 0x7b) memberName();
          continue;
        }
        pos++;
      } else if (c === 0x22) {
        string();
      } else {
        scalar();
      }
      // After a value: close what ends here, then a comma goes on.
      for (;;) {
        if (open.length === 0) return;
        space();
        const next = text.charCodeAt(pos);
        const close = open[open.length - 1];
        if (next === close) {
          pos++;
          open.pop();
          continue;
        }
        if (next !== 0x2c) throw fail(close === 0x7d ? 'expected `,` or `}`' : 'expected `,` or `]`');
        pos++;
        if (close === 0x7d) memberName();
        break;
      }
    }
  };

  const result = value(0);
  space();
  if (pos < text.length) throw fail('trailing characters');
  return result;
}
