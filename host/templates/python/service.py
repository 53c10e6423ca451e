"""{{name}}: echoes every line back, numbered.

The logic, free of the WebAssembly bindings so that it runs under plain
CPython too (see test_service.py); app.py connects it to the host.

State format ``{{name}}/1`` (little-endian; ``bytes`` = u32 length + bytes)::

    lines    u64      lines echoed so far
    nconns   u64
    nconns times:
      conn     u64    connection id
      pending  bytes  the connection's unfinished line
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable

FORMAT = "{{name}}/1"
MAX_LINE = 64 * 1024

Send = Callable[[int, bytes], None]
Close = Callable[[int], None]


@dataclass
class Echo:
    lines: int = 0
    pending: dict[int, bytearray] = field(default_factory=dict)

    def connect(self, conn: int) -> None:
        self.pending[conn] = bytearray()

    def data(self, conn: int, data: bytes, send: Send, close: Close) -> None:
        buf = self.pending.setdefault(conn, bytearray())
        buf += data
        while (end := buf.find(b"\n")) >= 0:
            line = bytes(buf[:end]).removesuffix(b"\r")
            del buf[: end + 1]
            self.lines += 1
            send(conn, b"%d %s\n" % (self.lines, line))
        if len(buf) > MAX_LINE:
            close(conn)

    def close(self, conn: int) -> None:
        self.pending.pop(conn, None)

    def export(self) -> bytes:
        out = bytearray(struct.pack("<QQ", self.lines, len(self.pending)))
        for conn, buf in sorted(self.pending.items()):
            out += struct.pack("<QI", conn, len(buf)) + buf
        return bytes(out)

    @classmethod
    def load(cls, state: bytes) -> Echo:
        try:
            lines, nconns = struct.unpack_from("<QQ", state, 0)
            at = 16
            pending = {}
            for _ in range(nconns):
                conn, size = struct.unpack_from("<QI", state, at)
                at += 12
                if at + size > len(state):
                    raise ValueError(f"truncated at byte {at}")
                pending[conn] = bytearray(state[at : at + size])
                at += size
        except struct.error as e:
            raise ValueError(f"truncated {FORMAT} state: {e}") from None
        if at != len(state):
            raise ValueError(f"{len(state) - at} unexpected bytes at the end")
        return cls(lines, pending)
