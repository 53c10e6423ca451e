// Connects the service in service.js to wasmhost (the WIT world's exports).
import { send, close } from 'wasmhost:service/host';

import { Echo, FORMAT } from './service.js';

let echo = new Echo();
const host = { send, close };

export const handler = {
  init(_config) {
    echo = new Echo();
  },
  onConnect(info) {
    echo.connect(info.id);
  },
  onData(conn, data) {
    echo.data(conn, data, host);
  },
  onClose(conn) {
    echo.close(conn);
  },
  onTimer(_token) {},
};

export const migrate = {
  importable: () => [FORMAT],
  exportable: () => [FORMAT],
  exportState(format) {
    if (format !== FORMAT) throw `cannot export ${format}: this version exports [${FORMAT}]`;
    return echo.export();
  },
  importState(format, state) {
    if (format !== FORMAT) throw `cannot import ${format}: this version imports [${FORMAT}]`;
    try {
      echo = Echo.load(state);
    } catch (e) {
      throw `invalid ${FORMAT} state: ${e.message}`;
    }
  },
};
