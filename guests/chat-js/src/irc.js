// IRC protocol (RFC 2812 section 2.3) for chat-js: message lines, names,
// numeric replies, server-time, and the text helpers the line handling needs
// (UTF-8 with the replacement rules of Rust's `String::from_utf8_lossy`,
// Rust's whitespace and control classes), so that it answers byte for byte
// as the Rust chat does.

/** Numeric replies and errors the server sends (RFC 2812 section 5). */
export const Numeric = Object.freeze({
  RPL_WELCOME: '001',
  RPL_YOURHOST: '002',
  RPL_CREATED: '003',
  RPL_MYINFO: '004',
  RPL_UMODEIS: '221',
  RPL_ENDOFWHO: '315',
  RPL_CHANNELMODEIS: '324',
  RPL_NOTOPIC: '331',
  RPL_TOPIC: '332',
  RPL_WHOREPLY: '352',
  RPL_NAMREPLY: '353',
  RPL_ENDOFNAMES: '366',
  ERR_NOSUCHNICK: '401',
  ERR_NOSUCHCHANNEL: '403',
  ERR_CANNOTSENDTOCHAN: '404',
  ERR_NOORIGIN: '409',
  ERR_NORECIPIENT: '411',
  ERR_NOTEXTTOSEND: '412',
  ERR_INPUTTOOLONG: '417',
  ERR_UNKNOWNCOMMAND: '421',
  ERR_NOMOTD: '422',
  ERR_NONICKNAMEGIVEN: '431',
  ERR_ERRONEUSNICKNAME: '432',
  ERR_NICKNAMEINUSE: '433',
  ERR_NOTONCHANNEL: '442',
  ERR_NOTREGISTERED: '451',
  ERR_NEEDMOREPARAMS: '461',
  ERR_ALREADYREGISTRED: '462',
});

/**
 * A parsed client message. The prefix, if any, is dropped: a client's prefix
 * is its own nick, which the server knows better.
 * @typedef {{ command: string, params: string[] }} Message
 */

/**
 * Parses one line (without its line ending).
 * @param {string} line
 * @returns {Message | null} null for an empty line
 */
export function parse(line) {
  let rest = trimSpaces(line);
  if (rest.startsWith(':')) {
    const space = rest.indexOf(' ', 1);
    rest = space < 0 ? '' : trimSpaces(rest.slice(space + 1));
  }
  const space = rest.indexOf(' ');
  const command = space < 0 ? rest : rest.slice(0, space);
  if (command === '') return null;
  rest = space < 0 ? '' : rest.slice(space + 1);
  const params = [];
  // Each turn consumes at least one character.
  for (;;) {
    rest = trimSpaces(rest);
    if (rest === '') break;
    if (rest.startsWith(':')) {
      params.push(rest.slice(1));
      break;
    }
    const end = rest.indexOf(' ');
    params.push(end < 0 ? rest : rest.slice(0, end));
    rest = end < 0 ? '' : rest.slice(end + 1);
  }
  return { command: asciiUpper(command), params };
}

/** @param {string} s */
function trimSpaces(s) {
  let i = 0;
  while (i < s.length && s.charCodeAt(i) === 0x20) i++;
  return i === 0 ? s : s.slice(i);
}

const SPECIAL = '[]\\`_^{|}';

/**
 * RFC 2812 nickname: a letter or special first, then letters, digits,
 * specials or `-`; at most 30 characters here.
 * @param {string} nick
 */
export function validNick(nick) {
  if (nick === '' || nick.length > 30) return false;
  for (let i = 0; i < nick.length; i++) {
    const c = nick[i];
    const ok = isAsciiAlpha(c) || SPECIAL.includes(c) ||
      (i > 0 && (isAsciiDigit(c) || c === '-'));
    if (!ok) return false;
  }
  return true;
}

/**
 * `#name` or `&name`, at most 50 bytes of UTF-8, without space, comma or
 * control characters.
 * @param {string} name
 */
export function validChannel(name) {
  if (!(name.startsWith('#') || name.startsWith('&'))) return false;
  const bytes = utf8Length(name);
  if (bytes <= 1 || bytes > 50) return false;
  for (const c of name) {
    if (c === ' ' || c === ',' || isControl(c.codePointAt(0))) return false;
  }
  return true;
}

/**
 * Whether `name` is a channel name rather than a nick (as a message target).
 * @param {string} name
 */
export const isChannelName = (name) => name.startsWith('#') || name.startsWith('&');

const ASCII = /^[\0-\x7f]*$/;

/**
 * Case-insensitive key for nicks and channel names (ASCII letters only).
 * @param {string} name
 */
export function fold(name) {
  if (!/[A-Z]/.test(name)) return name;
  return ASCII.test(name) ? name.toLowerCase() : name.replace(/[A-Z]+/g, (s) => s.toLowerCase());
}

/** ASCII-only upper case (commands). @param {string} s */
export function asciiUpper(s) {
  if (!/[a-z]/.test(s)) return s;
  return ASCII.test(s) ? s.toUpperCase() : s.replace(/[a-z]+/g, (t) => t.toUpperCase());
}

/**
 * `nick!user@host`, with `*` and `unknown` for what is not known yet.
 * @param {string | null} nick @param {string | null} user @param {string} host
 */
export const prefix = (nick, user, host) => `${nick ?? '*'}!${user ?? 'unknown'}@${host}`;

/**
 * A numeric reply line: `:server CODE nick params`.
 * @param {string} server @param {string} code @param {string} nick @param {string} params
 */
export const numeric = (server, code, nick, params) => `:${server} ${code} ${nick} ${params}`;

/**
 * `2026-11-25T14:00:05.123Z` for Unix milliseconds `ms` (IRCv3 server-time).
 * @param {bigint} ms
 */
export function isoTime(ms) {
  const days = ms / 86_400_000n;
  const rem = ms % 86_400_000n;
  // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
  const z = days + 719_468n;
  const era = z / 146_097n;
  const doe = z % 146_097n;
  const yoe = (doe - doe / 1460n + doe / 36_524n - doe / 146_096n) / 365n;
  const doy = doe - (365n * yoe + yoe / 4n - yoe / 100n);
  const mp = (5n * doy + 2n) / 153n;
  const day = doy - (153n * mp + 2n) / 5n + 1n;
  const month = mp < 10n ? mp + 3n : mp - 9n;
  const year = yoe + era * 400n + (month <= 2n ? 1n : 0n);
  const pad = (/** @type {bigint} */ n, /** @type {number} */ width) => String(n).padStart(width, '0');
  return `${pad(year, 4)}-${pad(month, 2)}-${pad(day, 2)}T${pad(rem / 3_600_000n, 2)}:` +
    `${pad(rem / 60_000n % 60n, 2)}:${pad(rem / 1000n % 60n, 2)}.${pad(rem % 1000n, 3)}Z`;
}

/** @param {string} c */
const isAsciiAlpha = (c) => (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
/** @param {string} c */
const isAsciiDigit = (c) => c >= '0' && c <= '9';

/** Unicode general category Cc (Rust's `char::is_control`). @param {number} cp */
const isControl = (cp) => cp <= 0x1f || (cp >= 0x7f && cp <= 0x9f);

/**
 * Unicode White_Space (Rust's `char::is_whitespace`).
 * @param {number} cp
 */
export function isWhitespace(cp) {
  return (cp >= 0x09 && cp <= 0x0d) || cp === 0x20 || cp === 0x85 || cp === 0xa0 ||
    cp === 0x1680 || (cp >= 0x2000 && cp <= 0x200a) || cp === 0x2028 || cp === 0x2029 ||
    cp === 0x202f || cp === 0x205f || cp === 0x3000;
}

/**
 * Length of `s` in UTF-8 bytes.
 * @param {string} s
 */
export function utf8Length(s) {
  let n = 0;
  for (let i = 0; i < s.length; i++) {
    const u = s.charCodeAt(i);
    if (u < 0x80) n += 1;
    else if (u < 0x800) n += 2;
    else if (u >= 0xd800 && u <= 0xdbff && i + 1 < s.length &&
      (s.charCodeAt(i + 1) & 0xfc00) === 0xdc00) {
      n += 4;
      i++;
    } else n += 3;
  }
  return n;
}

const encoder = new TextEncoder();

/**
 * UTF-8 bytes of `s`.
 * @param {string} s
 * @returns {Uint8Array}
 */
export const encodeUtf8 = (s) => encoder.encode(s);

const lossy = new TextDecoder('utf-8', { ignoreBOM: true });
const strict = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

/**
 * Decodes UTF-8 as Rust's `String::from_utf8_lossy` does: each maximal
 * ill-formed subsequence becomes U+FFFD (the WHATWG decoder's rule too), and
 * a byte order mark is kept. With `fatal`, ill-formed input throws instead.
 * @param {Uint8Array} bytes
 * @param {boolean} [fatal]
 * @returns {string}
 */
export const decodeUtf8 = (bytes, fatal = false) => (fatal ? strict : lossy).decode(bytes);
