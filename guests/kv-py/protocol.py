"""RESP2, the Redis wire protocol, and the commands kv-py answers.

Request parsing (``CommandReader``: multibulk and inline, one per
connection), reply encoding (``Reply``), the command table with Redis's
replies and error messages (``COMMANDS``, ``execute``), and ``KvService``,
which routes the host's events and drives the expiry sweep timer. A port of
the Rust kv guest (guests/kv/src/{lib,resp,commands}.rs) without its `v2`
feature; it behaves the same byte for byte.

This module is plain Python: the host functions are passed in (see
``Host``), so it runs and is tested without the WIT bindings.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from typing import Protocol

from store import FORMATS, Entry, Glob, Keyspace, decode_state, encode_state

# --- limits ------------------------------------------------------------------

MAX_BULK = 512 * 1024 * 1024  # largest bulk argument (proto-max-bulk-len)
MAX_ARGS = 1024 * 1024  # most arguments in one command
MAX_INLINE = 64 * 1024  # longest inline command line

I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1

# --- request parsing -----------------------------------------------------------


class ProtocolError(Exception):
    """The client broke the protocol: reply with the message and close."""


# Bytes Rust's `u8::is_ascii_whitespace` accepts (no vertical tab).
_INLINE_ARG = re.compile(rb"[^ \t\n\x0c\r]+")


def parse_i64(text: bytes | bytearray) -> int | None:
    """Rust's ``str::parse::<i64>``: an optional sign, then ASCII digits."""
    if len(text) < 19 and text.isdigit():  # the common case; cannot overflow
        return int(text)
    negative = text[:1] == b"-"
    digits = text[1:] if negative or text[:1] == b"+" else text
    if not digits.isdigit():  # ASCII only for bytes; False when empty
        return None
    digits = digits.lstrip(b"0")
    if len(digits) > 19:
        return None
    value = -int(digits or b"0") if negative else int(digits or b"0")
    return value if I64_MIN <= value <= I64_MAX else None


def _read_int_line(buf: bytes | bytearray, at: int) -> tuple[int, int] | None:
    """Reads ``<int>\\r\\n`` at ``at``: the number and the index after the
    line, or None if the line is not complete. Raises ValueError if the line
    is not a number."""
    end = buf.find(b"\r", at)
    if end < 0 or end + 1 >= len(buf):
        return None
    value = parse_i64(buf[at:end])
    if value is None:
        raise ValueError
    return value, end + 2


def _parse_inline(buf: bytes | bytearray, start: int) -> tuple[list[bytes], int] | None:
    newline = buf.find(b"\n", start)
    if newline < 0:
        if len(buf) - start > MAX_INLINE:
            raise ProtocolError("Protocol error: too big inline request")
        return None
    args = [bytes(arg) for arg in _INLINE_ARG.findall(buf, start, newline)]
    return args, newline + 1


@dataclass(slots=True)
class _Partial:
    """A multibulk command not yet whole: its argument count, the arguments
    read so far, and where the next one starts."""

    count: int
    args: list[bytes]
    pos: int


class CommandReader:
    """One connection's input: splits the byte stream into commands.

    ``feed`` appends bytes as they arrive; ``next_command`` takes whole
    commands (multibulk or inline) off the front; ``compact`` drops what was
    consumed. ``pending`` is what is left: bytes that are not yet a whole
    command. The arguments of an incomplete multibulk command are kept, so
    a big command arriving in many pieces is parsed once, not once per
    piece (the replies and errors are the same as parsing it afresh).
    """

    def __init__(self, pending: bytes | bytearray = b"") -> None:
        self._buffer = bytearray(pending)
        self._start = 0  # where the next command begins
        self._partial: _Partial | None = None  # the command at _start, if incomplete

    @property
    def pending(self) -> bytes:
        return bytes(self._buffer[self._start:])

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def compact(self) -> None:
        if self._start:
            del self._buffer[: self._start]
            if self._partial is not None:
                self._partial.pos -= self._start
            self._start = 0

    def next_command(self) -> list[bytes] | None:
        """The next whole command, or None if more bytes are needed. An empty
        list (an empty inline line, ``*0``) is to be skipped. Raises
        ProtocolError on a malformed request."""
        buf, start = self._buffer, self._start
        if start >= len(buf):
            return None
        if buf[start] == 0x2A:  # '*'
            return self._multibulk(buf, start)
        parsed = _parse_inline(buf, start)
        if parsed is None:
            return None
        args, self._start = parsed
        return args

    def _multibulk(self, buf: bytearray, start: int) -> list[bytes] | None:
        partial = self._partial if self._partial is not None else self._header(buf, start)
        if partial is None:
            return None
        args, pos = partial.args, partial.pos
        while len(args) < partial.count:
            if pos >= len(buf):
                break
            if buf[pos] != 0x24:  # '$'
                raise ProtocolError("Protocol error: expected '$'")
            try:
                length_line = _read_int_line(buf, pos + 1)
            except ValueError:
                raise ProtocolError("Protocol error: invalid bulk length") from None
            if length_line is None:
                if len(buf) - pos > 32:
                    raise ProtocolError("Protocol error: invalid bulk length")
                break
            length, arg_start = length_line
            if length < 0 or length > MAX_BULK:
                raise ProtocolError("Protocol error: invalid bulk length")
            arg_end = arg_start + length
            if len(buf) < arg_end + 2:
                break
            args.append(bytes(buf[arg_start:arg_end]))
            pos = arg_end + 2
        if len(args) < partial.count:  # resume from here when more arrives
            partial.pos = pos
            self._partial = partial
            return None
        self._partial = None
        self._start = pos
        return args

    @staticmethod
    def _header(buf: bytearray, start: int) -> _Partial | None:
        """Reads ``*<count>\\r\\n``; None if the line is not complete."""
        try:
            header = _read_int_line(buf, start + 1)
        except ValueError:
            raise ProtocolError("Protocol error: invalid multibulk length") from None
        if header is None:
            if len(buf) - start > 32:
                raise ProtocolError("Protocol error: invalid multibulk length")
            return None
        count, pos = header
        if count > MAX_ARGS:
            raise ProtocolError("Protocol error: invalid multibulk length")
        return _Partial(count, [], pos)


# --- reply encoding ----------------------------------------------------------


class Reply:
    """The replies for one ``on-data`` call, sent in one piece."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def __bool__(self) -> bool:
        return bool(self.buf)

    def ok(self) -> None:
        self.buf += b"+OK\r\n"

    def simple(self, text: str) -> None:
        self.buf += b"+%s\r\n" % text.encode()

    def error(self, message: str) -> None:
        """An error reply; ``message`` starts with its code, e.g. ``ERR ...``."""
        self.buf += b"-%s\r\n" % message.encode()

    def int(self, n: int) -> None:
        self.buf += b":%d\r\n" % n

    def bulk(self, data: bytes | bytearray) -> None:
        self.buf += b"$%d\r\n" % len(data)
        self.buf += data
        self.buf += b"\r\n"

    def nil(self) -> None:
        self.buf += b"$-1\r\n"

    def opt_bulk(self, data: bytes | bytearray | None) -> None:
        if data is None:
            self.nil()
        else:
            self.bulk(data)

    def array(self, length: int) -> None:
        self.buf += b"*%d\r\n" % length

    def nil_array(self) -> None:
        self.buf += b"*-1\r\n"


# --- commands ------------------------------------------------------------------

WRONGTYPE = "WRONGTYPE Operation against a key holding the wrong kind of value"
NOT_INT = "ERR value is not an integer or out of range"
SYNTAX = "ERR syntax error"
OVERFLOW = "ERR increment or decrement would overflow"


class CommandError(Exception):
    """Ends a command with an error reply (the message includes its code)."""


@dataclass(slots=True)
class Call:
    """One command's context."""

    keyspace: Keyspace
    args: list[bytes]
    now: int
    conn: int
    reply: Reply
    # ``--config enable-debug-command=yes``: DEBUG may be used.
    debug: bool = False


def parse_int(text: bytes | bytearray) -> int | None:
    """A Redis integer argument, parsed strictly (no spaces, no ``+``)."""
    if not text or text[0] == 0x2B or len(text) > 20:
        return None
    return parse_i64(text)


def _int_arg(text: bytes) -> int:
    value = parse_int(text)
    if value is None:
        raise CommandError(NOT_INT)
    return value


def _checked(value: int) -> int | None:
    """``value`` if it fits an i64 (Rust's checked arithmetic), else None."""
    return value if I64_MIN <= value <= I64_MAX else None


def _as_i64(n: int) -> int:
    """An unsigned 64-bit number read as signed, like Rust's ``as i64``."""
    return n - (1 << 64) if n > I64_MAX else n


def lossy(data: bytes) -> str:
    """At most 128 bytes of ``data`` as text, for error messages."""
    text = data[:128].decode("utf-8", "replace")
    return text.replace("\r", " ").replace("\n", " ")


def _wrong_arity(name: str) -> CommandError:
    return CommandError(f"ERR wrong number of arguments for '{name}' command")


def _string(call: Call, key: bytes) -> bytes | bytearray | None:
    """The string at ``key``, None if there is none; WRONGTYPE for a list."""
    entry = call.keyspace.get(key, call.now)
    if entry is None:
        return None
    if entry.is_list:
        raise CommandError(WRONGTYPE)
    return entry.value  # type: ignore[return-value]


def _list(call: Call, key: bytes) -> deque | None:
    """The list at ``key``, None if there is none; WRONGTYPE for a string."""
    entry = call.keyspace.get(key, call.now)
    if entry is None:
        return None
    if not entry.is_list:
        raise CommandError(WRONGTYPE)
    return entry.value  # type: ignore[return-value]


def cmd_get(call: Call) -> None:
    call.reply.opt_bulk(_string(call, call.args[1]))


def _set_deadline(option: bytes, n: int, now: int) -> int | None:
    """The deadline SET's EX/PX/EXAT/PXAT ``n`` means; None on i64 overflow."""
    if option == b"ex":
        ms = _checked(n * 1000)
        return None if ms is None else _checked(ms + now)
    if option == b"px":
        return _checked(n + now)
    if option == b"exat":
        return _checked(n * 1000)
    return n


def cmd_set(call: Call) -> None:
    """SET key value [NX|XX] [GET] [EX s|PX ms|EXAT s|PXAT ms|KEEPTTL]"""
    args, now = call.args, call.now
    nx = xx = get = keep_ttl = False
    expires_at: int | None = None
    i = 3
    while i < len(args):
        option = args[i].lower()
        if option == b"nx" and not xx:
            nx = True
        elif option == b"xx" and not nx:
            xx = True
        elif option == b"get":
            get = True
        elif option == b"keepttl" and expires_at is None:
            keep_ttl = True
        elif option in (b"ex", b"px", b"exat", b"pxat") and expires_at is None and not keep_ttl:
            if i + 1 >= len(args):
                raise CommandError(SYNTAX)
            n = _int_arg(args[i + 1])
            at = _set_deadline(option, n, now)
            if at is None or n <= 0:
                raise CommandError("ERR invalid expire time in 'set' command")
            expires_at = at
            i += 1
        else:
            raise CommandError(SYNTAX)
        i += 1
    key = args[1]
    old = call.keyspace.get(key, now)
    if old is not None and old.is_list and get:
        raise CommandError(WRONGTYPE)
    old_value = old.value if old is not None and not old.is_list else None
    exists = old is not None
    if keep_ttl and old is not None and expires_at is None:
        expires_at = old.expires_at
    write = not (nx and exists or xx and not exists)
    if write:
        call.keyspace.insert(key, Entry(args[2], expires_at))
    if get:
        call.reply.opt_bulk(old_value)  # type: ignore[arg-type]
    elif write:
        call.reply.ok()
    else:
        call.reply.nil()


def _incr_by(call: Call, delta: int) -> None:
    key = call.args[1]
    current = _string(call, key)
    value = 0 if current is None else parse_int(current)
    if value is None:
        raise CommandError(NOT_INT)
    new = _checked(value + delta)
    if new is None:
        raise CommandError(OVERFLOW)
    digits = b"%d" % new
    entry = call.keyspace.get(key, call.now)
    if entry is not None:
        entry.value = digits
    else:
        call.keyspace.insert(key, Entry(digits))
    call.reply.int(new)


def cmd_incr(call: Call) -> None:
    _incr_by(call, 1)


def cmd_decr(call: Call) -> None:
    _incr_by(call, -1)


def cmd_incrby(call: Call) -> None:
    _incr_by(call, _int_arg(call.args[2]))


def cmd_decrby(call: Call) -> None:
    delta = _checked(-_int_arg(call.args[2]))
    if delta is None:
        raise CommandError(OVERFLOW)
    _incr_by(call, delta)


def cmd_append(call: Call) -> None:
    key, suffix = call.args[1], call.args[2]
    entry = call.keyspace.get(key, call.now)
    if entry is None:
        call.reply.int(len(suffix))
        call.keyspace.insert(key, Entry(suffix))
    elif entry.is_list:
        raise CommandError(WRONGTYPE)
    else:
        if not isinstance(entry.value, bytearray):
            entry.value = bytearray(entry.value)  # appends stay amortised O(1)
        entry.value += suffix
        call.reply.int(len(entry.value))


def cmd_strlen(call: Call) -> None:
    value = _string(call, call.args[1])
    call.reply.int(0 if value is None else len(value))


def cmd_del(call: Call) -> None:
    removed = sum(call.keyspace.remove(key, call.now) is not None for key in call.args[1:])
    call.reply.int(removed)


def cmd_exists(call: Call) -> None:
    call.reply.int(sum(call.keyspace.contains(key, call.now) for key in call.args[1:]))


def cmd_mget(call: Call) -> None:
    call.reply.array(len(call.args) - 1)
    for key in call.args[1:]:
        entry = call.keyspace.get(key, call.now)
        call.reply.opt_bulk(None if entry is None or entry.is_list else entry.value)  # type: ignore[arg-type]


def cmd_mset(call: Call) -> None:
    if len(call.args) % 2 == 0:
        raise _wrong_arity("mset")
    for key, value in zip(call.args[1::2], call.args[2::2]):
        call.keyspace.insert(key, Entry(value))
    call.reply.ok()


def cmd_keys(call: Call) -> None:
    glob = Glob(call.args[1])
    found = [key for key in call.keyspace.keys(call.now) if glob.match(key)]
    call.reply.array(len(found))
    for key in found:
        call.reply.bulk(key)


def cmd_dbsize(call: Call) -> None:
    # As in Redis: keys past their deadline count until reclaimed.
    call.reply.int(len(call.keyspace))


def cmd_flushall(call: Call) -> None:
    call.keyspace.clear()
    call.reply.ok()


def _expire(call: Call, unit: int, name: str) -> None:
    """EXPIRE/PEXPIRE key n [NX|XX|GT|LT]; ``unit`` is milliseconds per unit."""
    n = _int_arg(call.args[2])
    at = _checked(n * unit)
    at = None if at is None else _checked(at + call.now)
    if at is None:
        raise CommandError(f"ERR invalid expire time in '{name}' command")
    key = call.args[1]
    entry = call.keyspace.get(key, call.now)
    if entry is None:
        call.reply.int(0)
        return
    current = entry.expires_at
    at_u64 = at % (1 << 64)  # Rust compares `at as u64`
    option = call.args[3].lower() if len(call.args) > 3 else None
    if option is None:
        allowed = True
    elif option == b"nx":
        allowed = current is None
    elif option == b"xx":
        allowed = current is not None
    elif option == b"gt":
        allowed = current is not None and at_u64 > current
    elif option == b"lt":
        allowed = current is None or at_u64 < current
    else:
        raise CommandError(f"ERR Unsupported option {lossy(option)}")
    if not allowed:
        call.reply.int(0)
        return
    if at <= call.now:
        call.keyspace.remove(key, call.now)
    else:
        call.keyspace.set_expiry(key, at)
    call.reply.int(1)


def cmd_expire(call: Call) -> None:
    _expire(call, 1000, "expire")


def cmd_pexpire(call: Call) -> None:
    _expire(call, 1, "pexpire")


def _ttl(call: Call, unit: int) -> None:
    entry = call.keyspace.get(call.args[1], call.now)
    if entry is None:
        call.reply.int(-2)
    elif entry.expires_at is None:
        call.reply.int(-1)
    else:
        call.reply.int(_as_i64((entry.expires_at - call.now + unit // 2) // unit))


def cmd_ttl(call: Call) -> None:
    _ttl(call, 1000)


def cmd_pttl(call: Call) -> None:
    _ttl(call, 1)


def cmd_persist(call: Call) -> None:
    key = call.args[1]
    entry = call.keyspace.get(key, call.now)
    if entry is not None and entry.expires_at is not None:
        call.keyspace.set_expiry(key, None)
        call.reply.int(1)
    else:
        call.reply.int(0)


def cmd_type(call: Call) -> None:
    entry = call.keyspace.get(call.args[1], call.now)
    call.reply.simple("none" if entry is None else "list" if entry.is_list else "string")


def _push(call: Call, front: bool) -> None:
    key = call.args[1]
    items = _list(call, key)
    if items is None:
        items = deque()
        call.keyspace.insert(key, Entry(items))
    if front:
        items.extendleft(call.args[2:])
    else:
        items.extend(call.args[2:])
    call.reply.int(len(items))


def cmd_lpush(call: Call) -> None:
    _push(call, front=True)


def cmd_rpush(call: Call) -> None:
    _push(call, front=False)


def _pop(call: Call, front: bool) -> None:
    """LPOP/RPOP key [count]"""
    if len(call.args) > 3:
        raise _wrong_arity("lpop" if front else "rpop")
    count: int | None = None
    if len(call.args) == 3:
        count = parse_int(call.args[2])
        if count is None or count < 0:
            raise CommandError("ERR value is out of range, must be positive")
    key = call.args[1]
    items = _list(call, key)
    if items is None:
        if count is None:
            call.reply.nil()
        else:
            call.reply.nil_array()
        return
    take = min(1 if count is None else count, len(items))
    pop = items.popleft if front else items.pop
    popped = [pop() for _ in range(take)]
    if not items:
        call.keyspace.remove(key, call.now)
    if count is None:
        call.reply.opt_bulk(popped[0] if popped else None)
    else:
        call.reply.array(len(popped))
        for item in popped:
            call.reply.bulk(item)


def cmd_lpop(call: Call) -> None:
    _pop(call, front=True)


def cmd_rpop(call: Call) -> None:
    _pop(call, front=False)


def cmd_lrange(call: Call) -> None:
    start, stop = parse_int(call.args[2]), parse_int(call.args[3])
    if start is None or stop is None:
        raise CommandError(NOT_INT)
    items = _list(call, call.args[1])
    if items is None:
        call.reply.array(0)
        return
    length = len(items)
    start = max(length + start, 0) if start < 0 else start
    stop = length + stop if stop < 0 else min(stop, length - 1)
    if start > stop or start >= length:
        call.reply.array(0)
        return
    call.reply.array(stop - start + 1)
    for item in islice(items, start, stop + 1):
        call.reply.bulk(item)


def cmd_llen(call: Call) -> None:
    items = _list(call, call.args[1])
    call.reply.int(0 if items is None else len(items))


# PING, ECHO, SELECT and what clients send while connecting (CLIENT,
# COMMAND, CONFIG GET, INFO, HELLO), answered so that they carry on as
# they do with Redis.


def _subcommand(call: Call) -> bytes:
    return call.args[1].lower() if len(call.args) > 1 else b""


def cmd_ping(call: Call) -> None:
    if len(call.args) == 1:
        call.reply.simple("PONG")
    elif len(call.args) == 2:
        call.reply.bulk(call.args[1])
    else:
        raise _wrong_arity("ping")


def cmd_echo(call: Call) -> None:
    call.reply.bulk(call.args[1])


def cmd_select(call: Call) -> None:
    index = _int_arg(call.args[1])
    if index != 0:
        raise CommandError("ERR DB index is out of range")
    call.reply.ok()


def cmd_client(call: Call) -> None:
    sub = _subcommand(call)
    if sub in (b"setname", b"setinfo", b"no-evict", b"no-touch", b"reply"):
        call.reply.ok()
    elif sub == b"getname":
        call.reply.nil()
    elif sub == b"id":
        call.reply.int(_as_i64(call.conn))
    else:
        raise CommandError(f"ERR unknown subcommand '{lossy(call.args[1])}'. Try CLIENT HELP.")


# How many commands COMMANDS knows (as the Rust kv answers).
COMMAND_COUNT = 38

DEBUG_NOT_ALLOWED = (
    'ERR DEBUG command not allowed. If the enable-debug-command option is set to "local", you '
    "can run it from a local connection, otherwise you need to set this option in the "
    "configuration file, and then restart the server."
)


class DebugSegfault(Exception):
    """DEBUG SEGFAULT: not caught anywhere, so the guest traps."""


def cmd_debug(call: Call) -> None:
    """DEBUG SEGFAULT crashes the service (the guest traps), if enabled."""
    if not call.debug:
        raise CommandError(DEBUG_NOT_ALLOWED)
    if call.args[1].lower() == b"segfault":
        raise DebugSegfault("DEBUG SEGFAULT")
    raise CommandError(f"ERR unknown subcommand '{lossy(call.args[1])}'. Try DEBUG HELP.")


def cmd_command(call: Call) -> None:
    sub = _subcommand(call)
    if sub == b"count":
        call.reply.int(COMMAND_COUNT)
    elif sub == b"info":
        call.reply.array(len(call.args) - 2)
        for _ in call.args[2:]:
            call.reply.nil_array()
    else:
        call.reply.array(0)


CONFIG_SETTINGS = [
    (b"save", b""),
    (b"appendonly", b"no"),
    (b"databases", b"1"),
    (b"maxmemory", b"0"),
    (b"timeout", b"0"),
]


def cmd_config(call: Call) -> None:
    sub = _subcommand(call)
    if sub == b"resetstat":
        call.reply.ok()
        return
    if sub != b"get":
        raise CommandError("ERR CONFIG SET and CONFIG REWRITE are not supported by this service")
    globs = [Glob(pattern.lower()) for pattern in call.args[2:]]
    found = [setting for glob in globs for setting in CONFIG_SETTINGS if glob.match(setting[0])]
    call.reply.array(len(found) * 2)
    for name, value in found:
        call.reply.bulk(name)
        call.reply.bulk(value)


def cmd_info(call: Call) -> None:
    """INFO [section ...]: the sections asked for (all with none, `all`,
    `default` or `everything`; an unknown one adds nothing), as Redis does.
    role:master always: a host serves only where it is the primary."""
    sections = (
        (b"server", "# Server\r\nredis_version:7.2.0\r\nredis_mode:standalone\r\n"
         "os:wasmhost\r\narch_bits:32\r\nserver_name:wasmhost-kv\r\n"),
        (b"replication", "# Replication\r\nrole:master\r\nconnected_slaves:0\r\n"),
        (b"keyspace", f"# Keyspace\r\ndb0:keys={len(call.keyspace)},expires=0,avg_ttl=0\r\n"),
    )
    asked = [a.lower() for a in call.args[1:]]
    every = not asked or any(a in (b"all", b"default", b"everything") for a in asked)
    text = "\r\n".join(body for name, body in sections if every or name in asked)
    call.reply.bulk(text.encode())


def cmd_hello(call: Call) -> None:
    if len(call.args) > 1 and parse_int(call.args[1]) != 2:
        raise CommandError("NOPROTO this server only speaks RESP2 (HELLO 2)")
    reply = call.reply
    reply.array(14)
    for name, value in ((b"server", b"redis"), (b"version", b"7.2.0")):
        reply.bulk(name)
        reply.bulk(value)
    reply.bulk(b"proto")
    reply.int(2)
    reply.bulk(b"id")
    reply.int(_as_i64(call.conn))
    for name, value in ((b"mode", b"standalone"), (b"role", b"master")):
        reply.bulk(name)
        reply.bulk(value)
    reply.bulk(b"modules")
    reply.array(0)


@dataclass(frozen=True, slots=True)
class Command:
    # As in Redis's command table: n = exactly n arguments (with the name),
    # -n = at least n.
    arity: int
    run: Callable[[Call], None]

    def accepts(self, argc: int) -> bool:
        return argc == self.arity if self.arity > 0 else argc >= -self.arity


COMMANDS: dict[bytes, Command] = {
    b"get": Command(2, cmd_get),
    b"set": Command(-3, cmd_set),
    b"incr": Command(2, cmd_incr),
    b"decr": Command(2, cmd_decr),
    b"incrby": Command(3, cmd_incrby),
    b"decrby": Command(3, cmd_decrby),
    b"append": Command(3, cmd_append),
    b"strlen": Command(2, cmd_strlen),
    b"del": Command(-2, cmd_del),
    b"exists": Command(-2, cmd_exists),
    b"mget": Command(-2, cmd_mget),
    b"mset": Command(-3, cmd_mset),
    b"keys": Command(2, cmd_keys),
    b"dbsize": Command(1, cmd_dbsize),
    b"flushall": Command(-1, cmd_flushall),
    b"flushdb": Command(-1, cmd_flushall),
    b"expire": Command(-3, cmd_expire),
    b"pexpire": Command(-3, cmd_pexpire),
    b"ttl": Command(2, cmd_ttl),
    b"pttl": Command(2, cmd_pttl),
    b"persist": Command(2, cmd_persist),
    b"type": Command(2, cmd_type),
    b"lpush": Command(-3, cmd_lpush),
    b"rpush": Command(-3, cmd_rpush),
    b"lpop": Command(-2, cmd_lpop),
    b"rpop": Command(-2, cmd_rpop),
    b"lrange": Command(4, cmd_lrange),
    b"llen": Command(2, cmd_llen),
    b"ping": Command(-1, cmd_ping),
    b"echo": Command(2, cmd_echo),
    b"select": Command(2, cmd_select),
    b"client": Command(-2, cmd_client),
    b"command": Command(-1, cmd_command),
    b"config": Command(-2, cmd_config),
    b"debug": Command(-2, cmd_debug),
    b"info": Command(-1, cmd_info),
    b"hello": Command(-1, cmd_hello),
    b"quit": Command(-1, lambda call: call.reply.ok()),  # execute() closes
}


def _unknown_command(args: list[bytes]) -> str:
    quoted = "".join(f"'{lossy(arg)}' " for arg in args[1:17])
    return f"ERR unknown command '{lossy(args[0])}', with args beginning with: {quoted}"


def execute(call: Call) -> bool:
    """Runs one command, writing its reply; True if the connection must close."""
    name = call.args[0].lower()
    command = COMMANDS.get(name)
    if command is None:
        call.reply.error(_unknown_command(call.args))
        return False
    if not command.accepts(len(call.args)):
        call.reply.error(f"ERR wrong number of arguments for '{lossy(name)}' command")
        return False
    try:
        command.run(call)
    except CommandError as error:
        call.reply.error(str(error))
    return name == b"quit"


# --- the service -----------------------------------------------------------------

SWEEP_TIMER = 1  # the timer token that deletes expired keys
SWEEP_EVERY_MS = 100
SWEEP_BUDGET = 1000  # most keys deleted per sweep, so one timer event stays short


class Host(Protocol):
    """The host functions the service uses (wit_world.imports.host fits)."""

    def send(self, conn: int, data: bytes) -> None: ...

    def close(self, conn: int) -> None: ...

    def set_timer(self, token: int, delay_ms: int) -> None: ...


def wall_clock_ms() -> int:
    """Unix time in milliseconds (the wall clock, as kv/1 deadlines are)."""
    return time.time_ns() // 1_000_000


class KvService:
    """The kv service: the keyspace and each connection's unparsed bytes."""

    def __init__(self, host: Host, clock: Callable[[], int] = wall_clock_ms) -> None:
        self.host = host
        self.clock = clock
        self.keyspace = Keyspace()
        self.readers: dict[int, CommandReader] = {}  # per connection
        # Not part of the state: a version swapped in starts with it off.
        self.debug = False

    def init(self, config: list[tuple[str, str]]) -> None:
        """Reads ``--config``: ``enable-debug-command=yes|no`` (Redis's option)."""
        for key, value in config:
            if key != "enable-debug-command":
                raise ValueError(f"unknown setting `{key}` (kv knows enable-debug-command=yes|no)")
            if value not in ("yes", "no"):
                raise ValueError(f"enable-debug-command takes yes or no, got `{value}`")
            self.debug = value == "yes"

    def on_connect(self, conn: int) -> None:
        self.readers[conn] = CommandReader()

    def on_close(self, conn: int) -> None:
        self.readers.pop(conn, None)

    def on_data(self, conn: int, data: bytes) -> None:
        reader = self.readers.setdefault(conn, CommandReader())
        reader.feed(data)
        now = self.clock()
        reply = Reply()
        had_deadlines = self.keyspace.has_deadlines()
        close = False
        while True:
            try:
                args = reader.next_command()
            except ProtocolError as error:
                reply.error(str(error))
                close = True
                break
            if args is None:
                break
            if args and execute(Call(self.keyspace, args, now, conn, reply, self.debug)):
                close = True
                break
        if reply:
            self.host.send(conn, bytes(reply.buf))
        if close:
            self.host.close(conn)
            del self.readers[conn]
            return
        reader.compact()
        if not had_deadlines and self.keyspace.has_deadlines():
            self.host.set_timer(SWEEP_TIMER, SWEEP_EVERY_MS)

    def on_timer(self, token: int) -> None:
        if token != SWEEP_TIMER:
            return
        removed = self.keyspace.sweep(self.clock(), SWEEP_BUDGET)
        if removed == SWEEP_BUDGET:
            self.host.set_timer(SWEEP_TIMER, 1)  # more are due: go on soon
        elif self.keyspace.has_deadlines():
            self.host.set_timer(SWEEP_TIMER, SWEEP_EVERY_MS)

    # State transfer (kv/1, see store.py).

    def importable(self) -> list[str]:
        return list(FORMATS)

    def exportable(self) -> list[str]:
        return list(FORMATS)

    def export_state(self, fmt: str) -> bytes:
        pending = {conn: reader.pending for conn, reader in self.readers.items()}
        return encode_state(self.keyspace, pending, fmt)

    def import_state(self, fmt: str, blob: bytes) -> None:
        """Replaces the state; raises StateError (a ValueError) if malformed."""
        keyspace, pending = decode_state(blob, fmt)
        if keyspace.has_deadlines():
            self.host.set_timer(SWEEP_TIMER, SWEEP_EVERY_MS)
        self.keyspace = keyspace
        self.readers = {conn: CommandReader(data) for conn, data in pending.items()}
