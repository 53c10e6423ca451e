"""Tests of protocol.py: RESP parsing, replies, commands and the service,
run against a fake host and a fake clock."""

import sys
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol import (  # noqa: E402
    SWEEP_TIMER,
    CommandReader,
    DebugSegfault,
    KvService,
    ProtocolError,
    Reply,
    parse_i64,
    parse_int,
)


def parse_command(data: bytes) -> tuple[list[bytes], int] | None:
    """The first command in ``data`` and the bytes it used, or None."""
    reader = CommandReader(data)
    args = reader.next_command()
    return None if args is None else (args, len(data) - len(reader.pending))


def resp(*args: bytes | str) -> bytes:
    out = b"*%d\r\n" % len(args)
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        out += b"$%d\r\n%s\r\n" % (len(data), data)
    return out


class FakeHost:
    def __init__(self) -> None:
        self.sent: dict[int, bytearray] = {}
        self.closed: list[int] = []
        self.timers: list[tuple[int, int]] = []

    def send(self, conn: int, data: bytes) -> None:
        self.sent.setdefault(conn, bytearray()).extend(data)

    def close(self, conn: int) -> None:
        self.closed.append(conn)

    def set_timer(self, token: int, delay_ms: int) -> None:
        self.timers.append((token, delay_ms))


class Harness(unittest.TestCase):
    def setUp(self) -> None:
        self.host = FakeHost()
        self.now = 1_000_000
        self.kv = KvService(self.host, clock=lambda: self.now)
        self.kv.on_connect(1)

    def send(self, data: bytes, conn: int = 1) -> bytes:
        """Delivers ``data`` and returns what the service replied."""
        before = len(self.host.sent.get(conn, b""))
        self.kv.on_data(conn, data)
        return bytes(self.host.sent.get(conn, b""))[before:]

    def cmd(self, *args: str | bytes) -> bytes:
        return self.send(resp(*args))


class ParseTest(unittest.TestCase):
    def test_multibulk_whole_and_split(self) -> None:
        cmd = b"*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n"
        self.assertEqual(parse_command(cmd), ([b"GET", b"key"], len(cmd)))
        for cut in range(len(cmd)):
            self.assertIsNone(parse_command(cmd[:cut]), cut)

    def test_reader_takes_commands_off_the_front(self) -> None:
        reader = CommandReader(b"PING\r\n*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET")
        self.assertEqual(reader.next_command(), [b"PING"])
        self.assertEqual(reader.next_command(), [b"PING"])
        self.assertIsNone(reader.next_command())
        reader.compact()
        self.assertEqual(reader.pending, b"*2\r\n$3\r\nGET")
        reader.feed(b"\r\n$1\r\nk\r\n")
        args = reader.next_command()
        self.assertEqual(args, [b"GET", b"k"])
        self.assertIs(type(args[0]), bytes)  # type: ignore[index]
        self.assertEqual(reader.pending, b"")

    def test_a_command_fed_byte_by_byte_resumes(self) -> None:
        cmd = b"*4\r\n$4\r\nMSET\r\n$1\r\na\r\n$10\r\n0123456789\r\n$0\r\n\r\nPING\r\n"
        reader = CommandReader()
        commands = []
        for byte in cmd:
            reader.feed(bytes([byte]))
            while (args := reader.next_command()) is not None:
                commands.append(args)
            reader.compact()
        self.assertEqual(commands, [[b"MSET", b"a", b"0123456789", b""], [b"PING"]])
        self.assertEqual(reader.pending, b"")

    def test_a_resumed_command_still_fails_like_a_fresh_parse(self) -> None:
        reader = CommandReader(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n")
        self.assertIsNone(reader.next_command())
        reader.feed(b"+v\r\n")
        with self.assertRaisesRegex(ProtocolError, "^Protocol error: expected '\\$'$"):
            reader.next_command()
        reader = CommandReader(b"*2\r\n$3\r\nGET\r\n$")
        self.assertIsNone(reader.next_command())
        reader.feed(b"9" * 40)  # a length line over 32 bytes without CR
        with self.assertRaisesRegex(ProtocolError, "invalid bulk length"):
            reader.next_command()

    def test_inline(self) -> None:
        self.assertEqual(parse_command(b"PING\r\n"), ([b"PING"], 6))
        self.assertEqual(parse_command(b"set a  b\n"), ([b"set", b"a", b"b"], 9))
        self.assertEqual(parse_command(b"\r\n"), ([], 2))
        self.assertEqual(parse_command(b"a\tb\x0cc\rd\r\n"), ([b"a", b"b", b"c", b"d"], 9))
        # Like Rust's is_ascii_whitespace: a vertical tab is not a separator.
        self.assertEqual(parse_command(b"a \x0bb\n"), ([b"a", b"\x0bb"], 5))
        self.assertEqual(parse_command(b'ECHO "a b"\n'), ([b"ECHO", b'"a', b'b"'], 11))
        self.assertIsNone(parse_command(b"PING"))

    def test_empty_multibulk_is_skipped(self) -> None:
        self.assertEqual(parse_command(b"*0\r\n"), ([], 4))
        self.assertEqual(parse_command(b"*-1\r\n"), ([], 5))

    def test_lengths_accept_plus_and_leading_zeros(self) -> None:
        self.assertEqual(parse_command(b"*+1\r\n$04\r\nPING\r\n"), ([b"PING"], 16))

    def test_crlf_after_a_bulk_is_not_checked(self) -> None:
        self.assertEqual(parse_command(b"*1\r\n$4\r\nPINGxx"), ([b"PING"], 14))

    def test_protocol_errors(self) -> None:
        cases = [
            (b"*x\r\n", "invalid multibulk length"),
            (b"*\r\n", "invalid multibulk length"),
            (b"*1048577\r\n", "invalid multibulk length"),
            (b"*" + b"1" * 40, "invalid multibulk length"),  # no CR within 32 bytes
            (b"*1\r\n+PING\r\n", "expected '$'"),
            (b"*1\r\n$-5\r\n", "invalid bulk length"),
            (b"*1\r\n$ 4\r\n", "invalid bulk length"),
            (b"*1\r\n$536870913\r\n", "invalid bulk length"),
            (b"*1\r\n$" + b"1" * 40, "invalid bulk length"),
            (b"x" * (64 * 1024 + 1), "too big inline request"),
        ]
        for data, message in cases:
            with self.subTest(data=data[:20]):
                with self.assertRaises(ProtocolError) as caught:
                    parse_command(data)
                self.assertEqual(str(caught.exception), "Protocol error: " + message)

    def test_incomplete_up_to_the_limits(self) -> None:
        self.assertIsNone(parse_command(b"*" + b"1" * 31))
        self.assertIsNone(parse_command(b"x" * (64 * 1024)))
        self.assertIsNone(parse_command(b"*1\r\n$536870912\r\nabc"))
        self.assertIsNone(parse_command(b"*1048576\r\n"))

    def test_integers(self) -> None:
        self.assertEqual(parse_i64(b"+5"), 5)
        self.assertEqual(parse_i64(b"-0"), 0)
        self.assertEqual(parse_i64(b"0" * 50 + b"7"), 7)
        self.assertEqual(parse_i64(b"9223372036854775807"), 2**63 - 1)
        self.assertEqual(parse_i64(b"-9223372036854775808"), -(2**63))
        for bad in [b"", b"-", b"+", b" 1", b"1 ", b"1_0", b"9223372036854775808", "٣".encode(), b"0x1"]:
            self.assertIsNone(parse_i64(bad), bad)
        # Command arguments are stricter: no '+', at most 20 bytes.
        self.assertIsNone(parse_int(b"+5"))
        self.assertIsNone(parse_int(b"000000000000000000005"))
        self.assertEqual(parse_int(b"00000000000000000005"), 5)


class ReplyTest(unittest.TestCase):
    def test_encoding(self) -> None:
        reply = Reply()
        self.assertFalse(reply)
        reply.ok()
        reply.simple("PONG")
        reply.error("ERR x")
        reply.int(-3)
        reply.bulk(b"a\r\nb")
        reply.nil()
        reply.opt_bulk(None)
        reply.array(2)
        reply.nil_array()
        self.assertEqual(
            bytes(reply.buf),
            b"+OK\r\n+PONG\r\n-ERR x\r\n:-3\r\n$4\r\na\r\nb\r\n$-1\r\n$-1\r\n*2\r\n*-1\r\n",
        )


class CommandTest(Harness):
    def test_strings(self) -> None:
        self.assertEqual(self.cmd("SET", "k", "v"), b"+OK\r\n")
        self.assertEqual(self.cmd("GET", "k"), b"$1\r\nv\r\n")
        self.assertEqual(self.cmd("SET", "k", "w", "NX"), b"$-1\r\n")
        self.assertEqual(self.cmd("SET", "k", "w", "XX", "GET"), b"$1\r\nv\r\n")
        self.assertEqual(self.cmd("APPEND", "k", "xyz"), b":4\r\n")
        self.assertEqual(self.cmd("GET", "k"), b"$4\r\nwxyz\r\n")
        self.assertEqual(self.cmd("STRLEN", "k"), b":4\r\n")
        self.assertEqual(self.cmd("MSET", "a", "1", "b", "2"), b"+OK\r\n")
        self.assertEqual(self.cmd("MGET", "a", "zz", "b"), b"*3\r\n$1\r\n1\r\n$-1\r\n$1\r\n2\r\n")
        self.assertEqual(self.cmd("DEL", "a", "a", "zz"), b":1\r\n")
        self.assertEqual(self.cmd("EXISTS", "b", "b", "zz"), b":2\r\n")
        self.assertEqual(self.cmd("TYPE", "b"), b"+string\r\n")

    def test_counters(self) -> None:
        self.assertEqual(self.cmd("INCR", "n"), b":1\r\n")
        self.assertEqual(self.cmd("INCRBY", "n", "41"), b":42\r\n")
        self.assertEqual(self.cmd("DECRBY", "n", "50"), b":-8\r\n")
        self.assertEqual(self.cmd("DECR", "n"), b":-9\r\n")
        self.cmd("SET", "big", str(2**63 - 1))
        self.assertEqual(self.cmd("INCR", "big"), b"-ERR increment or decrement would overflow\r\n")
        self.assertEqual(
            self.cmd("DECRBY", "n", str(-(2**63))), b"-ERR increment or decrement would overflow\r\n"
        )
        self.assertEqual(self.cmd("INCRBY", "n", "+1"), b"-ERR value is not an integer or out of range\r\n")
        self.cmd("SET", "s", "text")
        self.assertEqual(self.cmd("INCR", "s"), b"-ERR value is not an integer or out of range\r\n")

    def test_set_options(self) -> None:
        errors = {
            ("EX", "0"): b"-ERR invalid expire time in 'set' command\r\n",
            ("EX", "abc"): b"-ERR value is not an integer or out of range\r\n",
            ("EX",): b"-ERR syntax error\r\n",
            ("NX", "XX"): b"-ERR syntax error\r\n",
            ("EX", "1", "PX", "1"): b"-ERR syntax error\r\n",
            ("EX", "1", "KEEPTTL"): b"-ERR syntax error\r\n",
            ("EX", str(2**63 - 1)): b"-ERR invalid expire time in 'set' command\r\n",
            ("BOGUS",): b"-ERR syntax error\r\n",
        }
        for options, expected in errors.items():
            with self.subTest(options=options):
                self.assertEqual(self.cmd("SET", "k", "v", *options), expected)
        self.assertEqual(self.cmd("EXISTS", "k"), b":0\r\n")

    def test_wrong_type_and_arity(self) -> None:
        self.cmd("RPUSH", "l", "x")
        wrongtype = b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"
        self.assertEqual(self.cmd("GET", "l"), wrongtype)
        self.assertEqual(self.cmd("SET", "l", "v", "GET"), wrongtype)
        self.assertEqual(self.cmd("GET"), b"-ERR wrong number of arguments for 'get' command\r\n")
        self.assertEqual(self.cmd("mset", "a"), b"-ERR wrong number of arguments for 'mset' command\r\n")
        self.assertEqual(self.cmd("MSET", "a", "1", "b"), b"-ERR wrong number of arguments for 'mset' command\r\n")
        self.assertEqual(self.cmd("LPOP", "l", "1", "2"), b"-ERR wrong number of arguments for 'lpop' command\r\n")
        self.assertEqual(self.cmd("PING", "a", "b"), b"-ERR wrong number of arguments for 'ping' command\r\n")

    def test_unknown_command_message(self) -> None:
        self.assertEqual(
            self.cmd("NOSUCH", "a", "b\r\nc"),
            b"-ERR unknown command 'NOSUCH', with args beginning with: 'a' 'b  c' \r\n",
        )
        many = self.cmd("X", *[str(i) for i in range(20)])
        self.assertTrue(many.endswith(b"'14' '15' \r\n"), many)
        long = self.cmd("X", "a" * 127 + "\u00e9")  # cut inside the 2-byte character
        self.assertEqual(long, b"-ERR unknown command 'X', with args beginning with: '" + b"a" * 127 + "\ufffd".encode() + b"' \r\n")

    def test_lists(self) -> None:
        self.assertEqual(self.cmd("RPUSH", "l", "b", "c"), b":2\r\n")
        self.assertEqual(self.cmd("LPUSH", "l", "a", "z"), b":4\r\n")
        self.assertEqual(self.cmd("LRANGE", "l", "0", "-1"), resp_array(b"z", b"a", b"b", b"c"))
        self.assertEqual(self.cmd("LRANGE", "l", "-2", "100"), resp_array(b"b", b"c"))
        self.assertEqual(self.cmd("LRANGE", "l", "3", "1"), b"*0\r\n")
        self.assertEqual(self.cmd("LLEN", "l"), b":4\r\n")
        self.assertEqual(self.cmd("LPOP", "l"), b"$1\r\nz\r\n")
        self.assertEqual(self.cmd("RPOP", "l", "2"), resp_array(b"c", b"b"))
        self.assertEqual(self.cmd("LPOP", "l", "-1"), b"-ERR value is out of range, must be positive\r\n")
        self.assertEqual(self.cmd("LPOP", "l", "5"), resp_array(b"a"))
        self.assertEqual(self.cmd("EXISTS", "l"), b":0\r\n")
        self.assertEqual(self.cmd("LPOP", "l"), b"$-1\r\n")
        self.assertEqual(self.cmd("LPOP", "l", "1"), b"*-1\r\n")

    def test_info_sections(self) -> None:
        self.cmd("SET", "a", "1")
        every = self.cmd("INFO")
        for section in (b"# Server", b"# Replication", b"role:master", b"db0:keys=1"):
            self.assertIn(section, every)
        replication = self.cmd("INFO", "replication")
        self.assertIn(b"role:master", replication)
        self.assertNotIn(b"# Server", replication)
        self.assertNotIn(b"# Keyspace", replication)
        self.assertEqual(self.cmd("INFO", "nosuch"), b"$0\r\n\r\n")

    def test_handshake(self) -> None:
        self.assertEqual(self.cmd("PING"), b"+PONG\r\n")
        self.assertEqual(self.cmd("CLIENT", "SETNAME", "x"), b"+OK\r\n")
        self.assertEqual(self.cmd("CLIENT", "ID"), b":1\r\n")
        self.assertEqual(self.cmd("CLIENT", "kill"), b"-ERR unknown subcommand 'kill'. Try CLIENT HELP.\r\n")
        self.assertEqual(self.cmd("COMMAND", "COUNT"), b":38\r\n")
        self.assertEqual(self.cmd("COMMAND", "DOCS"), b"*0\r\n")
        self.assertEqual(self.cmd("COMMAND", "INFO", "get"), b"*1\r\n*-1\r\n")
        self.assertEqual(self.cmd("CONFIG", "GET", "SAVE"), resp_array(b"save", b""))
        self.assertEqual(
            self.cmd("CONFIG", "SET", "a", "b"),
            b"-ERR CONFIG SET and CONFIG REWRITE are not supported by this service\r\n",
        )
        self.assertEqual(self.cmd("SELECT", "0"), b"+OK\r\n")
        self.assertEqual(self.cmd("SELECT", "1"), b"-ERR DB index is out of range\r\n")
        self.assertIn(b"db0:keys=0,", self.cmd("INFO"))
        self.assertTrue(self.cmd("HELLO", "2").startswith(b"*14\r\n"))
        self.assertEqual(self.cmd("HELLO", "3"), b"-NOPROTO this server only speaks RESP2 (HELLO 2)\r\n")


def resp_array(*items: bytes) -> bytes:
    return b"*%d\r\n" % len(items) + b"".join(b"$%d\r\n%s\r\n" % (len(i), i) for i in items)


class ConnectionTest(Harness):
    def test_pipelined_and_split_commands(self) -> None:
        batch = b"".join(resp("INCR", "n") for _ in range(100))
        self.assertEqual(self.send(batch), b"".join(b":%d\r\n" % i for i in range(1, 101)))
        cmd = resp("SET", "split", "value")
        for cut in range(1, len(cmd)):
            self.assertEqual(self.send(cmd[:cut]), b"")
            self.assertEqual(self.send(cmd[cut:]), b"+OK\r\n")
        self.assertEqual(self.send(b"PING\r\nGET sp"), b"+PONG\r\n")
        self.assertEqual(self.kv.readers[1].pending, b"GET sp")
        self.assertEqual(self.send(b"lit\r\n"), b"$5\r\nvalue\r\n")
        self.assertEqual(self.kv.readers[1].pending, b"")

    def test_one_send_per_on_data(self) -> None:
        calls: list[bytes] = []
        self.host.send = lambda conn, data: calls.append(data)  # type: ignore[method-assign]
        self.kv.on_data(1, b"PING\r\nPING\r\n\r\n")
        self.assertEqual(calls, [b"+PONG\r\n+PONG\r\n"])
        self.kv.on_data(1, b"\r\n")
        self.assertEqual(len(calls), 1)  # nothing to say: no send

    def test_quit_closes_and_drops_the_rest(self) -> None:
        self.assertEqual(self.send(b"PING\r\nQUIT\r\nSET a b\r\n"), b"+PONG\r\n+OK\r\n")
        self.assertEqual(self.host.closed, [1])
        self.assertNotIn(1, self.kv.readers)
        self.assertEqual(self.cmd("EXISTS", "a"), b":0\r\n")

    def test_protocol_error_replies_and_closes(self) -> None:
        self.kv.on_connect(2)
        self.assertEqual(self.send(b"PING\r\n*1\r\n+X\r\nPING\r\n", conn=2), b"+PONG\r\n-Protocol error: expected '$'\r\n")
        self.assertEqual(self.host.closed, [2])
        self.assertNotIn(2, self.kv.readers)

    def test_buffers_are_dropped_on_close(self) -> None:
        self.send(b"*2\r\n$3\r\nGET")
        self.kv.on_close(1)
        self.assertEqual(self.kv.readers, {})

    def test_debug_segfault_only_when_enabled(self) -> None:
        self.assertTrue(self.cmd("DEBUG", "SEGFAULT").startswith(b"-ERR DEBUG command not allowed."))
        self.kv.init([("enable-debug-command", "yes")])
        self.assertEqual(self.cmd("DEBUG", "x"), b"-ERR unknown subcommand 'x'. Try DEBUG HELP.\r\n")
        with self.assertRaises(DebugSegfault):
            self.cmd("DEBUG", "SEGFAULT")

    def test_init_rejects_configuration(self) -> None:
        self.kv.init([])
        with self.assertRaisesRegex(ValueError, "^unknown setting `a` \\(kv knows enable-debug-command=yes\\|no\\)$"):
            self.kv.init([("a", "1")])


class ExpiryTest(Harness):
    def test_ttl_and_lazy_expiry(self) -> None:
        self.assertEqual(self.cmd("SET", "k", "v", "EX", "100"), b"+OK\r\n")
        self.assertEqual(self.host.timers, [(SWEEP_TIMER, 100)])
        self.assertEqual(self.cmd("TTL", "k"), b":100\r\n")
        self.now += 1499
        self.assertEqual(self.cmd("TTL", "k"), b":99\r\n")  # rounded: 98.501 s
        self.assertEqual(self.cmd("PTTL", "k"), b":98501\r\n")
        self.now += 98501
        self.assertEqual(self.cmd("DBSIZE"), b":1\r\n")  # not reclaimed yet
        self.assertEqual(self.cmd("GET", "k"), b"$-1\r\n")
        self.assertEqual(self.cmd("DBSIZE"), b":0\r\n")
        self.assertEqual(self.cmd("TTL", "k"), b":-2\r\n")

    def test_expire_options(self) -> None:
        self.cmd("SET", "k", "v")
        self.assertEqual(self.cmd("EXPIRE", "k", "10", "XX"), b":0\r\n")
        self.assertEqual(self.cmd("EXPIRE", "k", "10", "NX"), b":1\r\n")
        self.assertEqual(self.cmd("EXPIRE", "k", "5", "GT"), b":0\r\n")
        self.assertEqual(self.cmd("EXPIRE", "k", "5", "LT"), b":1\r\n")
        self.assertEqual(self.cmd("EXPIRE", "k", "5", "BAD"), b"-ERR Unsupported option bad\r\n")
        self.assertEqual(self.cmd("EXPIRE", "nokey", "5", "BAD"), b":0\r\n")
        self.assertEqual(self.cmd("PEXPIRE", "k", str(2**63 - 1)), b"-ERR invalid expire time in 'pexpire' command\r\n")
        self.assertEqual(self.cmd("PERSIST", "k"), b":1\r\n")
        self.assertEqual(self.cmd("TTL", "k"), b":-1\r\n")
        self.assertEqual(self.cmd("EXPIRE", "k", "-1"), b":1\r\n")
        self.assertEqual(self.cmd("EXISTS", "k"), b":0\r\n")

    def test_sweep_timer(self) -> None:
        self.cmd("SET", "a", "v", "PX", "50")
        self.cmd("SET", "b", "v", "PX", "5000")
        self.assertEqual(self.host.timers, [(SWEEP_TIMER, 100)])  # armed once
        self.now += 100
        self.kv.on_timer(SWEEP_TIMER)
        self.assertEqual(self.cmd("DBSIZE"), b":1\r\n")
        self.assertEqual(self.host.timers[-1], (SWEEP_TIMER, 100))  # b still due
        self.now += 5000
        self.kv.on_timer(SWEEP_TIMER)
        self.assertEqual(self.cmd("DBSIZE"), b":0\r\n")
        self.assertEqual(len(self.host.timers), 2)  # nothing left: not re-armed
        self.kv.on_timer(99)  # not ours
        self.assertEqual(len(self.host.timers), 2)

    def test_sweep_budget_rearms_soon(self) -> None:
        self.send(b"".join(resp("SET", "k%d" % i, "v", "PX", "10") for i in range(1500)))
        self.now += 20
        self.kv.on_timer(SWEEP_TIMER)
        self.assertEqual(self.host.timers[-1], (SWEEP_TIMER, 1))
        self.kv.on_timer(SWEEP_TIMER)
        self.assertEqual(self.cmd("DBSIZE"), b":0\r\n")


class MigrateTest(Harness):
    def test_state_round_trip_with_pending_bytes(self) -> None:
        self.cmd("SET", "s", "v", "EX", "100")
        self.cmd("RPUSH", "l", "a", "b")
        self.send(b"*2\r\n$3\r\nGET\r\n$1\r\n")
        self.assertEqual(self.kv.exportable(), ["kv/1"])
        blob = self.kv.export_state("kv/1")

        host = FakeHost()
        other = KvService(host, clock=lambda: self.now)
        self.assertEqual(other.importable(), ["kv/1"])
        other.import_state("kv/1", blob)
        self.assertEqual(host.timers, [(SWEEP_TIMER, 100)])
        other.on_data(1, b"s\r\n")  # completes the half-sent GET
        self.assertEqual(bytes(host.sent[1]), b"$1\r\nv\r\n")
        half = b"*2\r\n$3\r\nGET\r\n$1\r\n"
        self.assertIn(len(half).to_bytes(4, "little") + half, blob)
        after = other.export_state("kv/1")
        self.assertEqual(after, blob.replace(len(half).to_bytes(4, "little") + half, bytes(4)))

    def test_import_rejects_bad_state_and_keeps_the_old(self) -> None:
        self.cmd("SET", "keep", "1")
        with self.assertRaises(ValueError):
            self.kv.import_state("kv/1", b"KV/1\x01")
        self.assertEqual(self.cmd("GET", "keep"), b"$1\r\n1\r\n")


if __name__ == "__main__":
    unittest.main()
