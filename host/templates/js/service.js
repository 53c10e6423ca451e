// {{name}}: echoes every line back, numbered.
//
// The logic, free of the WebAssembly bindings so that it runs under plain
// Node too (see test.mjs); app.js connects it to the host.
//
// State format `{{name}}/1` (little-endian; `bytes` = u32 length + bytes):
//
//     lines    u64      lines echoed so far
//     nconns   u64
//     nconns times:
//       conn     u64    connection id
//       pending  bytes  the connection's unfinished line

export const FORMAT = '{{name}}/1';
const MAX_LINE = 64 * 1024;
const encoder = new TextEncoder();

export class Echo {
  constructor(lines = 0n, pending = new Map()) {
    /** @type {bigint} */
    this.lines = lines;
    /** @type {Map<bigint, Uint8Array>} each connection's unfinished line */
    this.pending = pending;
  }

  connect(conn) {
    this.pending.set(conn, new Uint8Array(0));
  }

  /**
   * @param {bigint} conn
   * @param {Uint8Array} data
   * @param {{send(conn: bigint, data: Uint8Array): void, close(conn: bigint): void}} host
   */
  data(conn, data, host) {
    let buf = concat(this.pending.get(conn) ?? new Uint8Array(0), data);
    let end;
    while ((end = buf.indexOf(10)) >= 0) {
      let line = buf.subarray(0, end);
      if (line.at(-1) === 13) line = line.subarray(0, -1);
      buf = buf.subarray(end + 1);
      this.lines += 1n;
      host.send(conn, concat(encoder.encode(`${this.lines} `), line, Uint8Array.of(10)));
    }
    this.pending.set(conn, buf.slice());
    if (buf.length > MAX_LINE) host.close(conn);
  }

  close(conn) {
    this.pending.delete(conn);
  }

  /** @returns {Uint8Array} */
  export() {
    const conns = [...this.pending.keys()].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
    const size = 16 + conns.reduce((n, c) => n + 12 + this.pending.get(c).length, 0);
    const out = new Uint8Array(size);
    const view = new DataView(out.buffer);
    view.setBigUint64(0, this.lines, true);
    view.setBigUint64(8, BigInt(conns.length), true);
    let at = 16;
    for (const conn of conns) {
      const bytes = this.pending.get(conn);
      view.setBigUint64(at, conn, true);
      view.setUint32(at + 8, bytes.length, true);
      out.set(bytes, at + 12);
      at += 12 + bytes.length;
    }
    return out;
  }

  /** @param {Uint8Array} state */
  static load(state) {
    const view = new DataView(state.buffer, state.byteOffset, state.byteLength);
    const need = (at, n) => {
      if (at + n > state.length) throw new Error(`truncated ${FORMAT} state at byte ${at}`);
    };
    need(0, 16);
    const lines = view.getBigUint64(0, true);
    const nconns = view.getBigUint64(8, true);
    const pending = new Map();
    let at = 16;
    for (let i = 0n; i < nconns; i++) {
      need(at, 12);
      const conn = view.getBigUint64(at, true);
      const size = view.getUint32(at + 8, true);
      need(at + 12, size);
      pending.set(conn, state.slice(at + 12, at + 12 + size));
      at += 12 + size;
    }
    if (at !== state.length) throw new Error(`${state.length - at} unexpected bytes at the end`);
    return new Echo(lines, pending);
  }
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}
