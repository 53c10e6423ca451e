// chat-js: the glue between the WIT world `wasmhost:service/service` and the
// chat (src/chat.js), its IRC protocol (src/irc.js) and its state format
// chat/1 (src/state.js). Only this module imports the host.

import { close, send } from 'wasmhost:service/host';
import { Chat, Outbox } from './src/chat.js';
import { encodeUtf8 } from './src/irc.js';
import { CHAT1, decodeChat1, encodeChat1 } from './src/state.js';

const FORMATS = [CHAT1];

let chat = new Chat();

/**
 * Runs one event and hands its output to the host: every line (with CRLF)
 * in order, then the closes.
 * @param {(out: Outbox) => void} event
 */
function withChat(event) {
  const out = new Outbox();
  event(out);
  for (const [conn, line] of out.lines) send(conn, encodeUtf8(`${line}\r\n`));
  for (const conn of out.closes) close(conn);
}

/**
 * The message of an error, thrown as a string: componentize-js turns what an
 * export throws into the `err` of its `result`.
 * @param {unknown} e
 */
const message = (e) => (e instanceof Error ? e.message : String(e));

export const handler = {
  /** @param {[string, string][]} config */
  init(config) {
    try {
      chat = Chat.configure(config);
    } catch (e) {
      throw message(e);
    }
  },
  /** @param {{ id: bigint, listener: string, peer: string }} info */
  onConnect(info) {
    chat.connect(info.id, info.peer);
  },
  /** @param {bigint} conn @param {Uint8Array} data */
  onData(conn, data) {
    withChat((out) => chat.data(conn, data, out));
  },
  /** @param {bigint} conn */
  onClose(conn) {
    withChat((out) => chat.disconnect(conn, 'Connection closed', out));
  },
  /** The chat arms no timers. @param {bigint} _token */
  onTimer(_token) {},
};

export const migrate = {
  importable: () => FORMATS,
  exportable: () => FORMATS,
  /** @param {string} format */
  exportState(format) {
    if (!FORMATS.includes(format)) {
      throw `this chat cannot export ${format}; it exports [${FORMATS.join(', ')}]`;
    }
    return encodeChat1(chat);
  },
  /** @param {string} format @param {Uint8Array} state */
  importState(format, state) {
    if (!FORMATS.includes(format)) {
      throw `this chat cannot import ${format}; it imports [${FORMATS.join(', ')}]`;
    }
    try {
      chat = decodeChat1(state);
    } catch (e) {
      throw `invalid ${format} state: ${message(e)}`;
    }
  },
};

// Run the state reader and writer and a few commands once while the component
// is built (componentize-js snapshots the module after its top level ran): the
// snapshot then holds their compiled bytecode, which saves the first import
// and the first events after a start or a swap some work.
{
  const warm = new Chat();
  warm.connect(1n, '127.0.0.1:1');
  warm.data(1n, encodeUtf8('NICK a\r\nUSER a 0 * :A\r\nJOIN #a\r\nPRIVMSG #a :x\r\nPRIV'), new Outbox());
  decodeChat1(encodeChat1(warm));
}
