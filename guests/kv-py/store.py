"""The keyspace of kv-py and its `kv/1` state format.

Values are strings (``bytes``, or a ``bytearray`` once appended to) and
lists (``deque`` of ``bytes``). Expiry is lazy on access plus a periodic
sweep driven by a heap of deadlines, exactly as in the Rust kv
(guests/kv/src/db.rs). `kv/1` is documented in guests/kv/src/state.rs.

This module is plain Python: it does not import the WIT bindings.
"""

from __future__ import annotations

import heapq
import re
import struct
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

# A string is ``bytes`` (or ``bytearray`` after APPEND); a list is a deque.
Value = bytes | bytearray | deque


@dataclass(slots=True)
class Entry:
    value: Value
    # Wall-clock deadline in Unix milliseconds; None = no expiry.
    expires_at: int | None = None

    @property
    def is_list(self) -> bool:
        return isinstance(self.value, deque)

    def live(self, now: int) -> bool:
        return self.expires_at is None or self.expires_at > now


class Keyspace:
    """All keys, with lazy expiry on access and a deadline heap for the sweep.

    The heap holds ``(deadline, key)`` for every deadline ever set; stale
    pairs (the key's deadline changed or the key is gone) are skipped when
    popped. ``has_deadlines`` is true while the heap is not empty, which is
    when the sweep timer must run.
    """

    def __init__(self) -> None:
        self._entries: dict[bytes, Entry] = {}
        self._deadlines: list[tuple[int, bytes]] = []

    def __len__(self) -> int:
        """Keys stored, expired ones included until they are reclaimed."""
        return len(self._entries)

    def has_deadlines(self) -> bool:
        return bool(self._deadlines)

    def get(self, key: bytes, now: int) -> Entry | None:
        """The live entry for ``key``; an expired one is deleted first."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at is not None and entry.expires_at <= now:
            del self._entries[key]
            return None
        return entry

    def contains(self, key: bytes, now: int) -> bool:
        return self.get(key, now) is not None

    def insert(self, key: bytes, entry: Entry) -> None:
        if entry.expires_at is not None:
            heapq.heappush(self._deadlines, (entry.expires_at, key))
        self._entries[key] = entry

    def remove(self, key: bytes, now: int) -> Entry | None:
        """Deletes ``key``; returns its entry if it was still live."""
        entry = self._entries.pop(key, None)
        if entry is None or not entry.live(now):
            return None
        return entry

    def set_expiry(self, key: bytes, at: int | None) -> None:
        """Sets or clears the deadline of an existing key."""
        entry = self._entries.get(key)
        if entry is None:
            return
        entry.expires_at = at
        if at is not None:
            heapq.heappush(self._deadlines, (at, key))

    def clear(self) -> None:
        self._entries.clear()
        self._deadlines.clear()

    def keys(self, now: int) -> Iterator[bytes]:
        """Live keys, in no particular order (without deleting expired ones)."""
        return (key for key, entry in self._entries.items() if entry.live(now))

    def entries(self) -> Iterator[tuple[bytes, Entry]]:
        """Every entry, expired or not (for export)."""
        return iter(self._entries.items())

    def sweep(self, now: int, budget: int) -> int:
        """Deletes up to ``budget`` keys whose deadline has passed."""
        removed = 0
        heap = self._deadlines
        while removed < budget and heap and heap[0][0] <= now:
            deadline, key = heapq.heappop(heap)
            entry = self._entries.get(key)
            if entry is not None and entry.expires_at == deadline:
                del self._entries[key]
                removed += 1
        return removed


class Glob:
    """A Redis-style glob for KEYS and CONFIG GET: ``*``, ``?``, ``[abc]``,
    ``[^a]``, ``[a-z]`` and ``\\`` to escape, with the Rust kv's rules (an
    unclosed ``[`` matches nothing; a trailing ``\\`` is literal).

    Every token but ``*`` matches exactly one byte, so the pattern is split
    at its stars into fixed-length segments, each a regular expression:
    the first must match at the start, the last at the end, and the middle
    ones are found leftmost in between. No backtracking across stars (at
    most text length x pattern length steps), and it runs in the regex
    engine, not in Python bytecode.
    """

    def __init__(self, pattern: bytes) -> None:
        segments = _glob_segments(pattern)
        self._anything = segments is not None and len(segments) > 1 and not any(segments)
        self._segments = None if segments is None else [
            (re.compile(b"".join(tokens), re.DOTALL), len(tokens)) for tokens in segments
        ]

    def match(self, text: bytes) -> bool:
        if self._anything:  # only stars
            return True
        if self._segments is None:
            return False
        if len(self._segments) == 1:
            return self._segments[0][0].fullmatch(text) is not None
        (head, head_len), *middle, (tail, tail_len) = self._segments
        start, end = head_len, len(text) - tail_len
        if end < start or head.match(text) is None:
            return False
        for regex, _ in middle:
            found = regex.search(text, start, end)
            if found is None:
                return False
            start = found.end()
        return tail.match(text, end) is not None


def glob_match(pattern: bytes, text: bytes) -> bool:
    return Glob(pattern).match(text)


def _glob_segments(pattern: bytes) -> list[list[bytes]] | None:
    """The pattern's star-separated segments, each a list of one-byte regex
    tokens; None if some token can match no byte (then nothing matches)."""
    segments: list[list[bytes]] = [[]]
    p = 0
    while p < len(pattern):
        head = pattern[p]
        if head == 0x2A:  # '*'
            segments.append([])
            p += 1
            continue
        if head == 0x3F:  # '?'
            token, p = b".", p + 1
        elif head == 0x5B:  # '['
            parsed = _parse_class(pattern, p)
            if parsed is None or not parsed[0]:
                return None
            token, p = _byte_class(parsed[0]), parsed[1]
        elif head == 0x5C and p + 1 < len(pattern):  # '\' escapes the next byte
            token, p = _byte_class({pattern[p + 1]}), p + 2
        else:
            token, p = _byte_class({head}), p + 1
        segments[-1].append(token)
    return segments


def _byte_class(accepted: set[int]) -> bytes:
    """A regex token matching one byte of ``accepted``."""
    escaped = b"".join(b"\\x%02x" % byte for byte in sorted(accepted))
    return escaped if len(accepted) == 1 else b"[" + escaped + b"]"


def _parse_class(pattern: bytes, open_at: int) -> tuple[set[int], int] | None:
    """The bytes the class opening at ``pattern[open_at]`` accepts and the
    index after its ``]``; None if it is not closed."""
    i = open_at + 1
    negate = i < len(pattern) and pattern[i] == 0x5E  # '^'
    if negate:
        i += 1
    accepted: set[int] = set()
    while i < len(pattern) and pattern[i] != 0x5D:  # ']'
        if pattern[i] == 0x5C and i + 1 < len(pattern):
            accepted.add(pattern[i + 1])
            i += 2
        elif i + 2 < len(pattern) and pattern[i + 1] == 0x2D and pattern[i + 2] != 0x5D:
            low, high = sorted((pattern[i], pattern[i + 2]))
            accepted.update(range(low, high + 1))
            i += 3
        else:
            accepted.add(pattern[i])
            i += 1
    if i >= len(pattern):
        return None
    return (set(range(256)) - accepted if negate else accepted), i + 1


# --- the kv/1 state format -------------------------------------------------
#
# All integers little-endian; `bytes` = u32 length + that many bytes.
#   magic "KV/1" | nkeys u64 | nkeys x (key bytes, expires u64 (0 = none),
#   type u8 (0 string: bytes | 1 list: u32 count, count x bytes, head first))
#   | nconns u64 | nconns x (conn u64, pending bytes)

KV1 = "kv/1"
FORMATS = [KV1]
_MAGIC = b"KV/1"
_TYPE_STRING = 0
_TYPE_LIST = 1

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_KEY_HEAD = struct.Struct("<QB")  # expires, type


class StateError(ValueError):
    """A state that cannot be exported or imported; the text says why."""


def _check_format(fmt: str) -> None:
    if fmt != KV1:
        raise StateError(f"this version of kv handles [{', '.join(FORMATS)}], not {fmt}")


def encode_state(keyspace: Keyspace, pending: Mapping[int, bytes | bytearray], fmt: str) -> bytes:
    """The whole keyspace and every connection's unparsed bytes as ``fmt``."""
    _check_format(fmt)
    u32, u64 = _U32.pack, _U64.pack
    parts: list[bytes | bytearray] = [_MAGIC, u64(len(keyspace))]
    for key, entry in keyspace.entries():
        parts += (u32(len(key)), key)
        value = entry.value
        if isinstance(value, deque):
            parts += (_KEY_HEAD.pack(entry.expires_at or 0, _TYPE_LIST), u32(len(value)))
            for item in value:
                parts += (u32(len(item)), item)
        else:
            parts += (_KEY_HEAD.pack(entry.expires_at or 0, _TYPE_STRING), u32(len(value)), value)
    parts.append(u64(len(pending)))
    for conn, data in sorted(pending.items()):
        parts += (u64(conn), u32(len(data)), data)
    return b"".join(parts)


class _Reader:
    """Reads the fields of a state blob, failing clearly when it runs out."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob
        self.pos = 0

    def _need(self, n: int) -> int:
        """Claims the next ``n`` bytes; returns where they start."""
        start = self.pos
        if start + n > len(self.blob):
            raise StateError(f"kv/1 state truncated at byte {start}")
        self.pos = start + n
        return start

    def take(self, n: int) -> bytes:
        start = self._need(n)
        return self.blob[start:start + n]

    def u8(self) -> int:
        return self.blob[self._need(1)]

    def u32(self) -> int:
        return _U32.unpack_from(self.blob, self._need(4))[0]

    def u64(self) -> int:
        return _U64.unpack_from(self.blob, self._need(8))[0]

    def bytes(self) -> bytes:
        return self.take(self.u32())


def decode_state(blob: bytes, fmt: str) -> tuple[Keyspace, dict[int, bytearray]]:
    """Decodes a ``fmt`` state.

    Keys already past their deadline are kept, as the Rust kv keeps them:
    they count as absent and the sweep reclaims them, and exporting again
    gives exactly the bytes imported.
    """
    _check_format(fmt)
    reader = _Reader(bytes(blob))
    if reader.take(4) != _MAGIC:
        raise StateError(f"not a {fmt} state (bad magic)")
    keyspace = Keyspace()
    read_bytes, read_u64, read_u8 = reader.bytes, reader.u64, reader.u8
    for _ in range(read_u64()):  # each key uses >= 17 bytes: bounded by the blob
        key = read_bytes()
        expires_at = read_u64() or None
        kind = read_u8()
        value: Value
        if kind == _TYPE_STRING:
            value = read_bytes()
        elif kind == _TYPE_LIST:
            value = deque(read_bytes() for _ in range(reader.u32()))
        else:
            raise StateError(f"unknown value type {kind} for a key in {fmt} state")
        keyspace.insert(key, Entry(value, expires_at))
    pending: dict[int, bytearray] = {}
    for _ in range(reader.u64()):
        conn = reader.u64()
        pending[conn] = bytearray(reader.bytes())
    if reader.pos != len(reader.blob):
        raise StateError(f"{len(reader.blob) - reader.pos} unexpected bytes after the kv/1 state")
    return keyspace, pending
