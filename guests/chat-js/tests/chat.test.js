// Tests of the chat logic: registration, channels, messages, errors, line
// handling; outputs are captured with an Outbox, no host involved.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Chat, MAX_PENDING, Outbox, compareCodePoints, parseUsize } from '../src/chat.js';

const enc = new TextEncoder();

/** A chat with connections 1 (127.0.0.1) and 2 (::1), and a helper to talk. */
function setup(config = []) {
  const chat = Chat.configure(config);
  chat.connect(1n, '127.0.0.1:5000');
  chat.connect(2n, '[::1]:5001');
  /** @param {bigint} conn @param {string | Uint8Array} data */
  const say = (conn, data) => {
    const out = new Outbox();
    chat.data(conn, typeof data === 'string' ? enc.encode(data) : data, out);
    return out;
  };
  return { chat, say };
}

/** @param {Outbox} out @param {bigint} conn */
const to = (out, conn) => out.lines.filter(([c]) => c === conn).map(([, l]) => l);

/** @param {ReturnType<typeof setup>['say']} say */
function register(say, conn = 1n, nick = 'alice') {
  return say(conn, `NICK ${nick}\r\nUSER ${nick[0]} 0 * :${nick} R\r\n`);
}

test('registers with NICK and USER in either order', () => {
  const { say } = setup();
  let out = say(1n, 'NICK alice\r\n');
  assert.deepEqual(out.lines, []);
  out = say(1n, 'USER a 0 * :Alice A\r\n');
  assert.deepEqual(to(out, 1n), [
    ':wasmhost 001 alice :Welcome to the wasmhost chat network alice!a@127.0.0.1',
    ':wasmhost 002 alice :Your host is wasmhost, running wasmhost-chat',
    ':wasmhost 003 alice :This server is a WebAssembly component',
    ':wasmhost 004 alice wasmhost wasmhost-chat o o',
    ':wasmhost 422 alice :MOTD File is missing',
  ]);
  out = say(2n, 'USER b\to\u3000b 0 * :B\nNICK bob\n');
  assert.equal(to(out, 2n)[0], ':wasmhost 001 bob :Welcome to the wasmhost chat network bob!bob@::1');
  out = say(2n, 'USER b 0 * :B\r\n');
  assert.deepEqual(to(out, 2n), [':wasmhost 462 bob :You may not reregister']);
});

test('configures server name and history', () => {
  const { chat, say } = setup([['server_name', 'irc.test'], ['history', '+2']]);
  assert.equal(chat.historyLimit, 2);
  assert.equal(to(register(say), 1n)[3], ':irc.test 004 alice irc.test wasmhost-chat o o');
  assert.throws(() => Chat.configure([['history', 'lots']]), { message: 'history must be a number of messages, got `lots`' });
  assert.throws(() => Chat.configure([['server_name', 'a b']]),
    { message: 'unknown or invalid setting `server_name=a b` (known: server_name, history)' });
  assert.throws(() => Chat.configure([['colour', 'red']]), /unknown or invalid setting `colour=red`/);
  assert.equal(parseUsize('4294967295'), 4294967295);
  assert.equal(parseUsize('4294967296'), null);
  assert.equal(parseUsize('-1'), null);
  assert.equal(parseUsize(' 1'), null);
  assert.equal(parseUsize('007'), 7);
});

test('answers errors before and after registration', () => {
  const { say } = setup();
  assert.deepEqual(to(say(1n, 'JOIN #a\r\n'), 1n), [':wasmhost 451 * :You have not registered']);
  assert.deepEqual(to(say(1n, 'NICK\r\n'), 1n), [':wasmhost 431 * :No nickname given']);
  assert.deepEqual(to(say(1n, 'NICK 9lives\r\n'), 1n), [':wasmhost 432 * 9lives :Erroneous nickname']);
  assert.deepEqual(to(say(1n, 'USER a b c\r\n'), 1n), [':wasmhost 461 * USER :Not enough parameters']);
  assert.deepEqual(to(say(1n, 'PING\r\n'), 1n), [':wasmhost 409 * :No origin specified']);
  assert.deepEqual(to(say(1n, 'PING x y\r\n'), 1n), [':wasmhost PONG wasmhost :x']);
  assert.deepEqual(to(say(1n, 'PONG x\r\nPASS y\r\n'), 1n), []);
  register(say);
  const e = (/** @type {string} */ line) => to(say(1n, `${line}\r\n`), 1n);
  assert.deepEqual(e('FROB x'), [':wasmhost 421 alice FROB :Unknown command']);
  assert.deepEqual(e('list'), [':wasmhost 421 alice LIST :Unknown command']);
  assert.deepEqual(e('JOIN'), [':wasmhost 461 alice JOIN :Not enough parameters']);
  assert.deepEqual(e('JOIN rust,#'), [':wasmhost 403 alice rust :No such channel', ':wasmhost 403 alice # :No such channel']);
  assert.deepEqual(e('PART'), [':wasmhost 461 alice PART :Not enough parameters']);
  assert.deepEqual(e('PART #none'), [':wasmhost 403 alice #none :No such channel']);
  assert.deepEqual(e('PRIVMSG'), [':wasmhost 411 alice :No recipient given (PRIVMSG)']);
  assert.deepEqual(e('PRIVMSG bob'), [':wasmhost 412 alice :No text to send']);
  assert.deepEqual(e('PRIVMSG bob :'), [':wasmhost 412 alice :No text to send']);
  assert.deepEqual(e('PRIVMSG bob :hi'), [':wasmhost 401 alice bob :No such nick/channel']);
  assert.deepEqual(e('PRIVMSG #none :hi'), [':wasmhost 403 alice #none :No such channel']);
  assert.deepEqual(e('NOTICE'), []);
  assert.deepEqual(e('NOTICE bob :hi'), []);
  assert.deepEqual(e('TOPIC'), [':wasmhost 461 alice TOPIC :Not enough parameters']);
  assert.deepEqual(e('MODE'), [':wasmhost 461 alice MODE :Not enough parameters']);
  assert.deepEqual(e('MODE alice +i'), [':wasmhost 221 alice +']);
  assert.deepEqual(e('MODE #none'), [':wasmhost 403 alice #none :No such channel']);
  assert.deepEqual(e('WHO'), [':wasmhost 315 alice * :End of WHO list']);
  assert.deepEqual(e('CAP LS 302'), [':wasmhost CAP alice LS :']);
  assert.deepEqual(e('CAP req :server-time'), [':wasmhost CAP alice NAK :server-time']);
  assert.deepEqual(e('CAP END'), []);
});

test('nicks are unique case-insensitively and changes are announced', () => {
  const { chat, say } = setup();
  register(say);
  assert.deepEqual(to(say(2n, 'NICK ALICE\r\n'), 2n), [':wasmhost 433 * ALICE :Nickname is already in use']);
  register(say, 2n, 'bob');
  say(1n, 'JOIN #r\r\n');
  say(2n, 'JOIN #r\r\n');
  const out = say(1n, 'NICK Alice\r\n');
  assert.deepEqual(out.lines, [[1n, ':alice!a@127.0.0.1 NICK :Alice'], [2n, ':alice!a@127.0.0.1 NICK :Alice']]);
  assert.deepEqual(new Map(chat.nicks), new Map([['alice', 1n], ['bob', 2n]]));
  say(1n, 'NICK carol\r\n');
  assert.deepEqual(new Map(chat.nicks), new Map([['bob', 2n], ['carol', 1n]]));
  assert.equal(to(say(2n, 'NICK alice\r\n'), 2n)[0], ':bob!b@::1 NICK :alice');
});

test('joins, talks, keeps history and replays it', () => {
  const { chat, say } = setup([['history', '2']]);
  register(say);
  register(say, 2n, 'bob');
  let out = say(1n, 'JOIN #Rust,#rust,,#go\r\n');
  assert.deepEqual(to(out, 1n), [
    ':alice!a@127.0.0.1 JOIN #Rust',
    ':wasmhost 353 alice = #Rust :alice',
    ':wasmhost 366 alice #Rust :End of /NAMES list',
    ':alice!a@127.0.0.1 JOIN #go',
    ':wasmhost 353 alice = #go :alice',
    ':wasmhost 366 alice #go :End of /NAMES list',
  ]);
  say(1n, 'TOPIC #rust :Rust talk\r\n');
  for (const m of ['one', 'two', 'three']) assert.deepEqual(say(1n, `PRIVMSG #rust :${m}\r\n`).lines, []);
  say(1n, 'NOTICE #rust :not kept\r\n');
  out = say(2n, 'join #RUST\r\n');
  assert.deepEqual(out.lines, [
    [1n, ':bob!b@::1 JOIN #Rust'],
    [2n, ':bob!b@::1 JOIN #Rust'],
    [2n, ':wasmhost 332 bob #Rust :Rust talk'],
    [2n, ':wasmhost 353 bob = #Rust :alice bob'],
    [2n, ':wasmhost 366 bob #Rust :End of /NAMES list'],
    [2n, ':alice!a@127.0.0.1 PRIVMSG #Rust :two'],
    [2n, ':alice!a@127.0.0.1 PRIVMSG #Rust :three'],
  ]);
  assert.deepEqual(chat.channels.get('#rust')?.history.map((h) => h.text), ['two', 'three']);
  out = say(2n, 'PRIVMSG #rust,alice,#go :hey\r\n');
  assert.deepEqual(out.lines, [
    [1n, ':bob!b@::1 PRIVMSG #rust :hey'],
    [1n, ':bob!b@::1 PRIVMSG alice :hey'],
    [2n, ':wasmhost 404 bob #go :Cannot send to channel'],
  ]);
  assert.deepEqual(to(say(2n, 'NOTICE #go :x\r\n'), 2n), []);
  assert.deepEqual(to(say(2n, 'TOPIC #rust\r\n'), 2n), [':wasmhost 332 bob #Rust :Rust talk']);
  assert.deepEqual(to(say(2n, 'TOPIC #go\r\n'), 2n), [':wasmhost 442 bob #go :You\'re not on that channel']);
  assert.deepEqual(say(2n, 'TOPIC #rust :\r\n').lines, [[1n, ':bob!b@::1 TOPIC #Rust :'], [2n, ':bob!b@::1 TOPIC #Rust :']]);
  assert.deepEqual(to(say(1n, 'TOPIC #rust\r\n'), 1n), [':wasmhost 331 alice #Rust :No topic is set']);
  assert.deepEqual(to(say(1n, 'MODE #RUST +n\r\n'), 1n), [':wasmhost 324 alice #Rust +']);
  assert.deepEqual(to(say(1n, 'WHO #rust\r\n'), 1n), [
    ':wasmhost 352 alice #Rust a 127.0.0.1 wasmhost alice H :0 alice R',
    ':wasmhost 352 alice #Rust b ::1 wasmhost bob H :0 bob R',
    ':wasmhost 315 alice #rust :End of WHO list',
  ]);
  assert.deepEqual(to(say(1n, 'NAMES\r\n'), 1n), [
    ':wasmhost 353 alice = #go :alice',
    ':wasmhost 353 alice = #Rust :alice bob',
    ':wasmhost 366 alice * :End of /NAMES list',
  ]);
  assert.deepEqual(to(say(1n, 'NAMES #none,#GO\r\n'), 1n), [
    ':wasmhost 353 alice = #go :alice', ':wasmhost 366 alice #none,#GO :End of /NAMES list']);
  out = say(2n, 'PART #rust,#go :see you\r\n');
  assert.deepEqual(out.lines, [
    [1n, ':bob!b@::1 PART #Rust :see you'],
    [2n, ':bob!b@::1 PART #Rust :see you'],
    [2n, ':wasmhost 442 bob #go :You\'re not on that channel'],
  ]);
  assert.deepEqual(chat.channels.get('#rust')?.members, [1n]);
  say(1n, 'PART #go\r\n');
  // An empty channel stays, with its history.
  assert.deepEqual(chat.channels.get('#go')?.members, []);
  assert.equal(to(say(1n, 'PRIVMSG alice :me\r\n'), 1n)[0], ':alice!a@127.0.0.1 PRIVMSG alice :me');
});

test('QUIT and close tell the peers once and free the nick', () => {
  const { chat, say } = setup();
  chat.connect(3n, '10.0.0.3:7');
  register(say);
  register(say, 2n, 'bob');
  register(say, 3n, 'carol');
  say(1n, 'JOIN #a,#b\r\n');
  say(2n, 'JOIN #a,#b\r\n');
  say(3n, 'JOIN #b\r\n');
  let out = say(2n, 'QUIT :gone\r\nPRIVMSG #a :never\r\n');
  assert.deepEqual(out.lines, [
    [2n, 'ERROR :Closing Link: ::1 (Quit: gone)'],
    [1n, ':bob!b@::1 QUIT :Quit: gone'],
    [3n, ':bob!b@::1 QUIT :Quit: gone'],
  ]);
  assert.deepEqual(out.closes, [2n]);
  assert.ok(!chat.users.has(2n) && !chat.nicks.has('bob'));
  assert.deepEqual(chat.channels.get('#a')?.members, [1n]);
  out = new Outbox();
  chat.disconnect(2n, 'Connection closed', out);
  assert.deepEqual(out.lines, []);
  chat.disconnect(3n, 'Connection closed', out);
  assert.deepEqual(out.lines, [[1n, ':carol!c@10.0.0.3 QUIT :Connection closed']]);
  assert.deepEqual(to(say(1n, 'QUIT\r\n'), 1n), ['ERROR :Closing Link: 127.0.0.1 (Quit: leaving)']);
  assert.deepEqual(say(1n, 'NICK x\r\n').lines, []); // gone: ignored
});

test('splits lines on LF with optional CRs, across calls, and caps partial lines', () => {
  const { chat, say } = setup();
  say(1n, 'NICK al');
  say(1n, 'ice\r');
  assert.deepEqual(chat.users.get(1n)?.pending, enc.encode('NICK alice\r'));
  let out = say(1n, '\nUSER a 0 * :A\r\r\n\r\n\n   \nPING :x\r\nPI');
  assert.equal(to(out, 1n).length, 6);
  assert.equal(to(out, 1n)[5], ':wasmhost PONG wasmhost :x');
  assert.deepEqual(chat.users.get(1n)?.pending, enc.encode('PI'));
  out = say(1n, 'NG y\n');
  assert.deepEqual(to(out, 1n), [':wasmhost PONG wasmhost :y']);
  // Invalid UTF-8 becomes U+FFFD; a long complete line is handled.
  out = say(1n, Uint8Array.from([...enc.encode('PING '), 0xff, 0xc3, 0x0a]));
  assert.deepEqual(to(out, 1n), [':wasmhost PONG wasmhost :\ufffd\ufffd']);
  out = say(1n, `PING ${'x'.repeat(20000)}\n`);
  assert.equal(to(out, 1n)[0], `:wasmhost PONG wasmhost :${'x'.repeat(20000)}`);
  // A partial line over the cap is dropped with 417.
  out = say(1n, 'y'.repeat(MAX_PENDING));
  assert.deepEqual(out.lines, []);
  out = say(1n, 'PING :a\nzz');
  assert.deepEqual(out.lines, [[1n, `:wasmhost 421 alice ${'Y'.repeat(MAX_PENDING)}PING :Unknown command`]]);
  out = say(1n, 'z'.repeat(MAX_PENDING));
  assert.deepEqual(out.lines, [[1n, ':wasmhost 417 alice :Input line was too long']]);
  assert.equal(chat.users.get(1n)?.pending.length, 0);
  assert.deepEqual(say(99n, 'PING x\n').lines, []); // unknown connection
});

test('orders strings by code point like Rust', () => {
  const names = ['#b', '#a', '#\uffff', '#😀', '#é', '#A'];
  assert.deepEqual(names.sort(compareCodePoints), ['#A', '#a', '#b', '#é', '#\uffff', '#😀']);
});
