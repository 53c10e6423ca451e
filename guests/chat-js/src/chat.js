// The chat server's state and its handling of IRC commands: users, nicks,
// channels and their history. Pure logic with no host bindings: each event
// writes its lines and closes to an `Out` (an `Outbox` in the service, a
// capture in the tests). A port of guests/chat/src/chat.rs without `v2`.

import {
  Numeric as N, asciiUpper, decodeUtf8, fold, isChannelName, isWhitespace, isoTime, numeric, parse, prefix,
  validChannel, validNick,
} from './irc.js';

/** @typedef {bigint} ConnId */
/** @typedef {import('./irc.js').Message} Message */

/**
 * Where one event's output goes.
 * @typedef {object} Out
 * @property {(conn: ConnId, line: string) => void} line a line to send, without its CRLF
 * @property {(conn: ConnId) => void} close close the connection after what was sent
 */

/** Longest partial line kept for a connection before it is dropped. */
export const MAX_PENDING = 8192;

const NO_BYTES = new Uint8Array(0);

/** One connection: registered or not yet. */
export class User {
  /** @param {ConnId} conn @param {string} host the peer's address without the port */
  constructor(conn, host) {
    this.conn = conn;
    /** @type {string | null} */
    this.nick = null;
    /** @type {string | null} */
    this.user = null;
    this.realname = '';
    this.host = host;
    this.registered = false;
    /** Bytes received after the last line ending. @type {Uint8Array} */
    this.pending = NO_BYTES;
    /**
     * IRCv3 capabilities the client enabled. This chat enables none; only a
     * state written by chat-v2 brings them (see state.js).
     * @type {string[]}
     */
    this.caps = [];
  }

  /** `nick!user@host`. */
  get prefix() {
    return prefix(this.nick, this.user, this.host);
  }

  get nickOrStar() {
    return this.nick ?? '*';
  }
}

/**
 * A message kept for replay. `from` is `nick!user@host`; `time` (Unix
 * milliseconds) only comes with a state written by chat-v2.
 * @typedef {{ from: string, text: string, time?: bigint }} HistoryLine
 */

/** A channel. Channels are never removed, so their topic and history stay. */
export class Channel {
  /** @param {string} name as first joined */
  constructor(name) {
    this.name = name;
    /** @type {string | null} */
    this.topic = null;
    /** Members in join order. @type {ConnId[]} */
    this.members = [];
    /** The most recent messages, oldest first. @type {HistoryLine[]} */
    this.history = [];
  }
}

/** Lines to send and connections to close, produced by one event. */
export class Outbox {
  constructor() {
    /** @type {[ConnId, string][]} */
    this.lines = [];
    /** @type {ConnId[]} */
    this.closes = [];
  }

  /** @param {ConnId} conn @param {string} line */
  line(conn, line) {
    this.lines.push([conn, line]);
  }

  /** @param {ConnId} conn */
  close(conn) {
    this.closes.push(conn);
  }
}

/**
 * Orders strings by code point (the order of their UTF-8 bytes, as Rust's
 * `BTreeMap<String, _>` keeps them).
 * @param {string} a @param {string} b
 */
export function compareCodePoints(a, b) {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) {
    const x = a.charCodeAt(i);
    const y = b.charCodeAt(i);
    if (x === y) continue;
    // A surrogate (a code point above U+FFFF) sorts after U+E000..U+FFFF.
    const sx = x >= 0xd800 && x <= 0xdfff;
    const sy = y >= 0xd800 && y <= 0xdfff;
    if (sx !== sy) return sx ? 1 : -1;
    return x - y;
  }
  return a.length - b.length;
}

/** @param {ConnId} a @param {ConnId} b */
const compareIds = (a, b) => (a < b ? -1 : a > b ? 1 : 0);

/** The whole server state; this is what `chat/1` carries. */
export class Chat {
  constructor() {
    this.server = 'wasmhost';
    this.historyLimit = 50;
    /** @type {Map<ConnId, User>} */
    this.users = new Map();
    /** Channels by folded name. @type {Map<string, Channel>} */
    this.channels = new Map();
    /** Registered and pending nicks by folded name (derived). @type {Map<string, ConnId>} */
    this.nicks = new Map();
  }

  /**
   * A fresh chat configured by `--config` pairs: `server_name` (no spaces)
   * and `history` (messages kept per channel).
   * @param {Iterable<[string, string]>} config
   * @returns {Chat}
   * @throws {Error} an unknown key or an invalid value
   */
  static configure(config) {
    const chat = new Chat();
    for (const [key, value] of config) {
      if (key === 'server_name' && value !== '' && !value.includes(' ')) {
        chat.server = value;
      } else if (key === 'history') {
        const limit = parseUsize(value);
        if (limit === null) {
          throw new Error(`history must be a number of messages, got \`${value}\``);
        }
        chat.historyLimit = limit;
      } else {
        throw new Error(
          `unknown or invalid setting \`${key}=${value}\` (known: server_name, history)`);
      }
    }
    return chat;
  }

  /** Users by ascending connection id. */
  sortedUsers() {
    return [...this.users.values()].sort((a, b) => compareIds(a.conn, b.conn));
  }

  /** Channels by folded name, in code point order. @returns {[string, Channel][]} */
  sortedChannels() {
    return [...this.channels.entries()].sort(([a], [b]) => compareCodePoints(a, b));
  }

  /**
   * Rebuilds the nick index from the users (after an import). Should two
   * users share a nick, the later by id has it (as in the Rust chat).
   */
  rebuildNicks() {
    this.nicks = new Map();
    for (const u of this.users.values()) {
      if (u.nick === null) continue;
      const key = fold(u.nick);
      const other = this.nicks.get(key);
      if (other === undefined || other < u.conn) this.nicks.set(key, u.conn);
    }
  }

  /**
   * A client connected from `peer` (`127.0.0.1:5000`, `[::1]:5000`).
   * @param {ConnId} conn @param {string} peer
   */
  connect(conn, peer) {
    const colon = peer.lastIndexOf(':');
    const host = (colon < 0 ? peer : peer.slice(0, colon)).replace(/^\[+/, '').replace(/\]+$/, '');
    this.users.set(conn, new User(conn, host));
  }

  /**
   * Bytes arrived: split into lines (LF, an optional CR before it) and handle each.
   * @param {ConnId} conn @param {Uint8Array} data @param {Out} out
   */
  data(conn, data, out) {
    const user = this.users.get(conn);
    if (!user) return;
    const buf = concat(user.pending, data);
    user.pending = NO_BYTES;
    let start = 0;
    // Each turn moves `start` past a newline.
    for (let nl = buf.indexOf(10, start); nl >= 0; nl = buf.indexOf(10, start)) {
      const line = trimCRs(decodeUtf8(buf.subarray(start, nl)));
      start = nl + 1;
      const msg = parse(line);
      if (msg) this.#command(conn, msg, out);
      if (!this.users.has(conn)) return; // QUIT
    }
    let rest = buf.subarray(start);
    if (rest.length > MAX_PENDING) {
      this.#reply(conn, N.ERR_INPUTTOOLONG, ':Input line was too long', out);
      rest = NO_BYTES;
    }
    user.pending = rest.length === 0 ? NO_BYTES : rest.slice();
  }

  /**
   * The connection is gone: leave every channel, telling the others.
   * @param {ConnId} conn @param {string} reason @param {Out} out
   */
  disconnect(conn, reason, out) {
    const user = this.users.get(conn);
    if (!user) return;
    this.users.delete(conn);
    if (user.nick !== null) this.nicks.delete(fold(user.nick));
    const line = `:${user.prefix} QUIT :${reason}`;
    for (const to of this.#peersOf(conn)) out.line(to, line);
    for (const channel of this.channels.values()) removeMember(channel, conn);
  }

  /** Everyone sharing a channel with `conn`, once each, not `conn`. @param {ConnId} conn */
  #peersOf(conn) {
    /** @type {Set<ConnId>} */
    const peers = new Set();
    for (const channel of this.channels.values()) {
      if (!channel.members.includes(conn)) continue;
      for (const m of channel.members) if (m !== conn) peers.add(m);
    }
    return [...peers].sort(compareIds);
  }

  /**
   * A numeric reply to `conn`: `:server CODE nick params`.
   * @param {ConnId} conn @param {string} code @param {string} params @param {Out} out
   */
  #reply(conn, code, params, out) {
    const nick = this.users.get(conn)?.nickOrStar ?? '*';
    out.line(conn, numeric(this.server, code, nick, params));
  }

  /** @param {ConnId} conn @param {Message} msg @param {Out} out */
  #command(conn, msg, out) {
    const registered = this.users.get(conn)?.registered ?? false;
    const p = msg.params;
    switch (msg.command) {
      case 'NICK': return this.#nick(conn, p, out);
      case 'USER': return this.#user(conn, p, out);
      case 'PING':
        if (p.length > 0) out.line(conn, `:${this.server} PONG ${this.server} :${p[0]}`);
        else this.#reply(conn, N.ERR_NOORIGIN, ':No origin specified', out);
        return;
      case 'PONG': case 'PASS': return;
      case 'CAP': return this.#cap(conn, p, out);
      case 'QUIT': return this.#quit(conn, p[0], out);
    }
    if (!registered) return this.#reply(conn, N.ERR_NOTREGISTERED, ':You have not registered', out);
    switch (msg.command) {
      case 'JOIN': return this.#join(conn, p, out);
      case 'PART': return this.#part(conn, p, out);
      case 'PRIVMSG': case 'NOTICE': return this.#privmsg(conn, msg.command, p, out);
      case 'NAMES': return this.#namesCommand(conn, p, out);
      case 'TOPIC': return this.#topic(conn, p, out);
      case 'MODE': return this.#mode(conn, p, out);
      case 'WHO': return this.#who(conn, p, out);
      default: return this.#reply(conn, N.ERR_UNKNOWNCOMMAND, `${msg.command} :Unknown command`, out);
    }
  }

  /** @param {ConnId} conn @param {string[]} p @param {Out} out */
  #cap(conn, p, out) {
    const nick = this.#connected(conn).nickOrStar;
    const sub = p.length > 0 ? asciiUpper(p[0]) : null;
    if (sub === 'LS' || sub === 'LIST') {
      out.line(conn, `:${this.server} CAP ${nick} LS :`);
    } else if (sub === 'REQ') {
      out.line(conn, `:${this.server} CAP ${nick} NAK :${p[1] ?? ''}`);
    }
  }

  /** @param {ConnId} conn @param {string[]} p @param {Out} out */
  #nick(conn, p, out) {
    if (p.length === 0) return this.#reply(conn, N.ERR_NONICKNAMEGIVEN, ':No nickname given', out);
    const nick = p[0];
    if (!validNick(nick)) return this.#reply(conn, N.ERR_ERRONEUSNICKNAME, `${nick} :Erroneous nickname`, out);
    const key = fold(nick);
    const owner = this.nicks.get(key);
    if (owner !== undefined && owner !== conn) {
      // The same nick in another case is a change of one's own nick, allowed.
      return this.#reply(conn, N.ERR_NICKNAMEINUSE, `${nick} :Nickname is already in use`, out);
    }
    const user = this.#connected(conn);
    const oldPrefix = user.prefix;
    if (user.nick !== null) this.nicks.delete(fold(user.nick));
    user.nick = nick;
    this.nicks.set(key, conn);
    if (user.registered) {
      const line = `:${oldPrefix} NICK :${nick}`;
      out.line(conn, line);
      for (const to of this.#peersOf(conn)) out.line(to, line);
    } else {
      this.#tryRegister(conn, out);
    }
  }

  /** @param {ConnId} conn @param {string[]} p @param {Out} out */
  #user(conn, p, out) {
    const user = this.#connected(conn);
    if (user.registered) return this.#reply(conn, N.ERR_ALREADYREGISTRED, ':You may not reregister', out);
    if (p.length < 4) return this.#reply(conn, N.ERR_NEEDMOREPARAMS, 'USER :Not enough parameters', out);
    // The user name without whitespace, at most 16 characters.
    let name = '';
    let count = 0;
    for (const c of p[0]) {
      if (count === 16) break;
      if (isWhitespace(/** @type {number} */ (c.codePointAt(0)))) continue;
      name += c;
      count++;
    }
    user.user = name;
    user.realname = p[3];
    this.#tryRegister(conn, out);
  }

  /** @param {ConnId} conn @param {Out} out */
  #tryRegister(conn, out) {
    const user = this.#connected(conn);
    if (user.registered || user.nick === null || user.user === null) return;
    user.registered = true;
    const server = this.server;
    this.#reply(conn, N.RPL_WELCOME, `:Welcome to the wasmhost chat network ${user.prefix}`, out);
    this.#reply(conn, N.RPL_YOURHOST, `:Your host is ${server}, running wasmhost-chat`, out);
    this.#reply(conn, N.RPL_CREATED, ':This server is a WebAssembly component', out);
    this.#reply(conn, N.RPL_MYINFO, `${server} wasmhost-chat o o`, out);
    this.#reply(conn, N.ERR_NOMOTD, ':MOTD File is missing', out);
  }

  /** @param {ConnId} conn @param {string | undefined} reason @param {Out} out */
  #quit(conn, reason, out) {
    const why = `Quit: ${reason ?? 'leaving'}`;
    out.line(conn, `ERROR :Closing Link: ${this.#connected(conn).host} (${why})`);
    this.disconnect(conn, why, out);
    out.close(conn);
  }

  /** @param {ConnId} conn @param {string[]} p @param {Out} out */
  #join(conn, p, out) {
    if (p.length === 0) return this.#reply(conn, N.ERR_NEEDMOREPARAMS, 'JOIN :Not enough parameters', out);
    for (const name of p[0].split(',')) {
      if (name === '') continue;
      if (!validChannel(name)) {
        this.#reply(conn, N.ERR_NOSUCHCHANNEL, `${name} :No such channel`, out);
        continue;
      }
      const key = fold(name);
      let channel = this.channels.get(key);
      if (!channel) {
        channel = new Channel(name);
        this.channels.set(key, channel);
      }
      if (channel.members.includes(conn)) continue;
      channel.members.push(conn);
      const line = `:${this.#connected(conn).prefix} JOIN ${channel.name}`;
      for (const to of channel.members) out.line(to, line);
      this.#joinInfo(conn, channel, out);
    }
  }

  /**
   * What a joiner receives: topic, names, then the recent history.
   * @param {ConnId} conn @param {Channel} channel @param {Out} out
   */
  #joinInfo(conn, channel, out) {
    const name = channel.name;
    if (channel.topic !== null) this.#reply(conn, N.RPL_TOPIC, `${name} :${channel.topic}`, out);
    this.#names(conn, channel, out);
    this.#reply(conn, N.RPL_ENDOFNAMES, `${name} :End of /NAMES list`, out);
    const tagged = this.users.get(conn)?.caps.includes('server-time') ?? false;
    for (const h of channel.history) {
      let line;
      if (h.time === undefined) line = `:${h.from} PRIVMSG ${name} :${h.text}`;
      // IRCv3 server-time for clients that asked, else in the text.
      else if (tagged) line = `@time=${isoTime(h.time)} :${h.from} PRIVMSG ${name} :${h.text}`;
      else line = `:${h.from} PRIVMSG ${name} :[${isoTime(h.time).slice(0, 19).replace('T', ' ')}] ${h.text}`;
      out.line(conn, line);
    }
  }

  /** @param {ConnId} conn @param {Channel} channel @param {Out} out */
  #names(conn, channel, out) {
    const nicks = [];
    for (const m of channel.members) {
      const nick = this.users.get(m)?.nick;
      if (nick != null) nicks.push(nick);
    }
    this.#reply(conn, N.RPL_NAMREPLY, `= ${channel.name} :${nicks.join(' ')}`, out);
  }

  /** @param {ConnId} conn @param {string[]} p @param {Out} out */
  #namesCommand(conn, p, out) {
    const wanted = p.length > 0
      ? p[0].split(',')
      : this.sortedChannels().map(([, c]) => c.name);
    for (const name of wanted) {
      const channel = this.channels.get(fold(name));
      if (channel) this.#names(conn, channel, out);
    }
    this.#reply(conn, N.RPL_ENDOFNAMES, `${p.length > 0 ? p[0] : '*'} :End of /NAMES list`, out);
  }

  /**
   * The channel `name` if `conn` is on it, else the error reply and null.
   * @param {ConnId} conn @param {string} name @param {Out} out
   * @returns {Channel | null}
   */
  #memberChannel(conn, name, out) {
    const channel = this.channels.get(fold(name));
    if (!channel) {
      this.#reply(conn, N.ERR_NOSUCHCHANNEL, `${name} :No such channel`, out);
      return null;
    }
    if (!channel.members.includes(conn)) {
      this.#reply(conn, N.ERR_NOTONCHANNEL, `${channel.name} :You're not on that channel`, out);
      return null;
    }
    return channel;
  }

  /** @param {ConnId} conn @param {string[]} p @param {Out} out */
  #part(conn, p, out) {
    if (p.length === 0) return this.#reply(conn, N.ERR_NEEDMOREPARAMS, 'PART :Not enough parameters', out);
    const reason = p.length > 1 ? ` :${p[1]}` : '';
    for (const name of p[0].split(',')) {
      if (name === '') continue;
      const channel = this.#memberChannel(conn, name, out);
      if (!channel) continue;
      const line = `:${this.#connected(conn).prefix} PART ${channel.name}${reason}`;
      for (const to of channel.members) out.line(to, line);
      removeMember(channel, conn);
    }
  }

  /** @param {ConnId} conn @param {string} command @param {string[]} p @param {Out} out */
  #privmsg(conn, command, p, out) {
    const notice = command === 'NOTICE';
    if (p.length === 0) {
      if (!notice) this.#reply(conn, N.ERR_NORECIPIENT, `:No recipient given (${command})`, out);
      return;
    }
    const text = p[1];
    if (text === undefined || text === '') {
      if (!notice) this.#reply(conn, N.ERR_NOTEXTTOSEND, ':No text to send', out);
      return;
    }
    const from = this.#connected(conn).prefix;
    for (const target of p[0].split(',')) {
      if (target === '') continue;
      const line = `:${from} ${command} ${target} :${text}`;
      if (isChannelName(target)) {
        this.#sendToChannel(conn, target, from, text, line, notice, out);
        continue;
      }
      const to = this.nicks.get(fold(target));
      if (to !== undefined) out.line(to, line);
      else if (!notice) this.#reply(conn, N.ERR_NOSUCHNICK, `${target} :No such nick/channel`, out);
    }
  }

  /**
   * @param {ConnId} conn @param {string} target @param {string} from @param {string} text
   * @param {string} line @param {boolean} notice @param {Out} out
   */
  #sendToChannel(conn, target, from, text, line, notice, out) {
    const channel = this.channels.get(fold(target));
    if (channel && channel.members.includes(conn)) {
      for (const to of channel.members) if (to !== conn) out.line(to, line);
      if (!notice) {
        channel.history.push({ from, text });
        const excess = channel.history.length - this.historyLimit;
        if (excess > 0) channel.history.splice(0, excess);
      }
    } else if (notice) {
      // NOTICE never answers with an error.
    } else if (channel) {
      this.#reply(conn, N.ERR_CANNOTSENDTOCHAN, `${channel.name} :Cannot send to channel`, out);
    } else {
      this.#reply(conn, N.ERR_NOSUCHCHANNEL, `${target} :No such channel`, out);
    }
  }

  /** @param {ConnId} conn @param {string[]} p @param {Out} out */
  #topic(conn, p, out) {
    if (p.length === 0) return this.#reply(conn, N.ERR_NEEDMOREPARAMS, 'TOPIC :Not enough parameters', out);
    const channel = this.#memberChannel(conn, p[0], out);
    if (!channel) return;
    const name = channel.name;
    if (p.length < 2) {
      if (channel.topic !== null) this.#reply(conn, N.RPL_TOPIC, `${name} :${channel.topic}`, out);
      else this.#reply(conn, N.RPL_NOTOPIC, `${name} :No topic is set`, out);
      return;
    }
    const topic = p[1];
    channel.topic = topic === '' ? null : topic;
    const line = `:${this.#connected(conn).prefix} TOPIC ${name} :${topic}`;
    for (const to of channel.members) out.line(to, line);
  }

  /** @param {ConnId} conn @param {string[]} p @param {Out} out */
  #mode(conn, p, out) {
    if (p.length === 0) return this.#reply(conn, N.ERR_NEEDMOREPARAMS, 'MODE :Not enough parameters', out);
    const target = p[0];
    if (!isChannelName(target)) return this.#reply(conn, N.RPL_UMODEIS, '+', out);
    const channel = this.channels.get(fold(target));
    if (channel) this.#reply(conn, N.RPL_CHANNELMODEIS, `${channel.name} +`, out);
    else this.#reply(conn, N.ERR_NOSUCHCHANNEL, `${target} :No such channel`, out);
  }

  /** @param {ConnId} conn @param {string[]} p @param {Out} out */
  #who(conn, p, out) {
    const mask = p.length > 0 ? p[0] : '*';
    const channel = this.channels.get(fold(mask));
    if (channel) {
      for (const m of channel.members) {
        const u = this.users.get(m);
        if (!u) continue;
        this.#reply(conn, N.RPL_WHOREPLY,
          `${channel.name} ${u.user ?? 'unknown'} ${u.host} ${this.server} ${u.nickOrStar} H :0 ${u.realname}`,
          out);
      }
    }
    this.#reply(conn, N.RPL_ENDOFWHO, `${mask} :End of WHO list`, out);
  }

  /**
   * The user of a connection that is known to be connected.
   * @param {ConnId} conn
   * @returns {User}
   */
  #connected(conn) {
    const user = this.users.get(conn);
    if (!user) throw new Error(`connection ${conn} is not connected`);
    return user;
  }
}

/**
 * A non-negative integer as Rust's `usize::from_str` reads it on wasm32
 * (optional `+`, decimal digits, at most 2^32 - 1), else null.
 * @param {string} text
 * @returns {number | null}
 */
export function parseUsize(text) {
  if (!/^\+?[0-9]+$/.test(text)) return null;
  const n = Number(text);
  return n <= 0xffffffff ? n : null;
}

/**
 * Removes `conn` from the members (every time it is there: an imported state
 * may list a member twice).
 * @param {Channel} channel @param {ConnId} conn
 */
function removeMember(channel, conn) {
  if (channel.members.includes(conn)) channel.members = channel.members.filter((m) => m !== conn);
}

/** @param {string} line */
function trimCRs(line) {
  let end = line.length;
  while (end > 0 && line.charCodeAt(end - 1) === 0x0d) end--;
  return end === line.length ? line : line.slice(0, end);
}

/** @param {Uint8Array} a @param {Uint8Array} b */
function concat(a, b) {
  if (a.length === 0) return b;
  const joined = new Uint8Array(a.length + b.length);
  joined.set(a);
  joined.set(b, a.length);
  return joined;
}
