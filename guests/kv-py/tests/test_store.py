"""Tests of store.py: glob matching, the keyspace's expiry, and kv/1."""

import random
import struct
import sys
import unittest
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from store import Entry, Glob, Keyspace, StateError, decode_state, encode_state, glob_match  # noqa: E402


class GlobTest(unittest.TestCase):
    def test_matches_like_the_rust_kv(self) -> None:
        cases = [
            (b"*", b"anything", True),
            (b"user:*", b"user:42", True),
            (b"user:*", b"session:1", False),
            (b"h?llo", b"hello", True),
            (b"h[ae]llo", b"hallo", True),
            (b"h[^e]llo", b"hello", False),
            (b"h[a-c]llo", b"hbllo", True),
            (b"h[c-a]llo", b"hbllo", True),  # reversed range
            (b"a\\*b", b"a*b", True),
            (b"a\\*b", b"axb", False),
            (b"*b*c", b"aabxxc", True),
            (b"a\\", b"a\\", True),  # a trailing backslash is literal
            (b"[", b"[", False),  # an unclosed class matches nothing
            (b"[]", b"x", False),
            (b"[^]", b"x", True),
            (b"h[\\a]llo", b"hallo", True),
            (b"**", b"", True),
            (b"?", b"", False),
            (b"", b"", True),
            (b"", b"a", False),
            (b"*?*", b"x", True),
        ]
        for pattern, text, expected in cases:
            with self.subTest(pattern=pattern, text=text):
                self.assertEqual(glob_match(pattern, text), expected)
                self.assertEqual(rust_glob_match(pattern, text), expected)


def rust_glob_match(pattern: bytes, text: bytes) -> bool:
    """A line-by-line port of `glob_match` in guests/kv/src/db.rs: the oracle."""
    p = t = 0
    star = None
    while t < len(text):
        if p < len(pattern):
            c = pattern[p]
            if c == ord("*"):
                star = (p, t)
                p += 1
                continue
            if c == ord("?"):
                p, t = p + 1, t + 1
                continue
            if c == ord("["):
                found = rust_class_match(pattern, p, text[t])
                if found is not None and found[0]:
                    p, t = found[1], t + 1
                    continue
            elif c == ord("\\") and p + 1 < len(pattern):
                if pattern[p + 1] == text[t]:
                    p, t = p + 2, t + 1
                    continue
            elif c == text[t]:
                p, t = p + 1, t + 1
                continue
        if star is None:
            return False
        p, t = star[0] + 1, star[1] + 1
        star = (star[0], star[1] + 1)
    return all(c == ord("*") for c in pattern[p:])


def rust_class_match(pattern: bytes, i: int, c: int) -> tuple[bool, int] | None:
    i += 1
    negate = i < len(pattern) and pattern[i] == ord("^")
    i += negate
    matched = False
    while i < len(pattern) and pattern[i] != ord("]"):
        if pattern[i] == ord("\\") and i + 1 < len(pattern):
            matched |= pattern[i + 1] == c
            i += 2
        elif i + 2 < len(pattern) and pattern[i + 1] == ord("-") and pattern[i + 2] != ord("]"):
            matched |= min(pattern[i], pattern[i + 2]) <= c <= max(pattern[i], pattern[i + 2])
            i += 3
        else:
            matched |= pattern[i] == c
            i += 1
    return (matched != negate, i + 1) if i < len(pattern) else None


class GlobOracleTest(unittest.TestCase):
    def test_agrees_with_the_rust_algorithm_on_random_patterns(self) -> None:
        rng = random.Random(1)
        pattern_bytes = b"ab*?[]^-\\\n"
        for _ in range(20000):
            pattern = bytes(rng.choice(pattern_bytes) for _ in range(rng.randint(0, 8)))
            glob = Glob(pattern)
            for _ in range(5):
                text = bytes(rng.choice(b"ab[]-^*\\\n") for _ in range(rng.randint(0, 8)))
                with self.subTest(pattern=pattern, text=text):
                    self.assertEqual(glob.match(text), rust_glob_match(pattern, text))


    def test_many_stars_do_not_backtrack(self) -> None:
        self.assertFalse(Glob(b"*a*a*a*a*a*a*a*b").match(b"a" * 5000))
        self.assertTrue(Glob(b"*a*a*a*a*a*a*a*b").match(b"a" * 5000 + b"b"))


class KeyspaceTest(unittest.TestCase):
    def test_expiry_is_lazy_and_swept(self) -> None:
        ks = Keyspace()
        ks.insert(b"a", Entry(b"1", 100))
        ks.insert(b"b", Entry(b"2"))
        self.assertTrue(ks.contains(b"a", 99))
        self.assertEqual(ks.sweep(100, 10), 1)
        self.assertFalse(ks.contains(b"a", 50))
        self.assertEqual(len(ks), 1)

    def test_get_deletes_an_expired_key(self) -> None:
        ks = Keyspace()
        ks.insert(b"a", Entry(b"1", 100))
        self.assertEqual(len(ks), 1)
        self.assertIsNone(ks.get(b"a", 100))  # the deadline itself is past
        self.assertEqual(len(ks), 0)

    def test_stale_deadlines_are_skipped(self) -> None:
        ks = Keyspace()
        ks.insert(b"a", Entry(b"1", 100))
        ks.set_expiry(b"a", 500)
        self.assertEqual(ks.sweep(200, 10), 0)  # the old deadline is stale
        self.assertTrue(ks.contains(b"a", 200))
        self.assertTrue(ks.has_deadlines())
        self.assertEqual(ks.sweep(500, 10), 1)
        self.assertFalse(ks.has_deadlines())

    def test_sweep_budget(self) -> None:
        ks = Keyspace()
        for i in range(5):
            ks.insert(b"k%d" % i, Entry(b"v", 10 + i))
        self.assertEqual(ks.sweep(100, 3), 3)
        self.assertEqual(ks.sweep(100, 3), 2)

    def test_remove_reports_only_live_keys(self) -> None:
        ks = Keyspace()
        ks.insert(b"old", Entry(b"x", 10))
        self.assertIsNone(ks.remove(b"old", 20))
        self.assertEqual(len(ks), 0)  # but it is gone

    def test_keys_skips_expired_without_deleting(self) -> None:
        ks = Keyspace()
        ks.insert(b"old", Entry(b"x", 10))
        ks.insert(b"new", Entry(b"y"))
        self.assertEqual(list(ks.keys(20)), [b"new"])
        self.assertEqual(len(ks), 2)


def golden_blob() -> bytes:
    """A kv/1 state written by hand from the layout in guests/kv/src/state.rs."""
    return b"".join(
        [
            b"KV/1",
            (2).to_bytes(8, "little"),  # nkeys
            # key "s": expires 5000, string "v"
            (1).to_bytes(4, "little") + b"s",
            (5000).to_bytes(8, "little"),
            b"\x00",
            (1).to_bytes(4, "little") + b"v",
            # key "l": no expiry, list ["a", "bc"] head first
            (1).to_bytes(4, "little") + b"l",
            (0).to_bytes(8, "little"),
            b"\x01",
            (2).to_bytes(4, "little"),
            (1).to_bytes(4, "little") + b"a",
            (2).to_bytes(4, "little") + b"bc",
            (2).to_bytes(8, "little"),  # nconns
            (7).to_bytes(8, "little"),
            (10).to_bytes(4, "little") + b"*1\r\n$4\r\nPI",
            (9).to_bytes(8, "little"),
            (0).to_bytes(4, "little"),
        ]
    )


class StateTest(unittest.TestCase):
    def test_golden_blob_decodes(self) -> None:
        ks, pending = decode_state(golden_blob(), "kv/1")
        self.assertEqual(len(ks), 2)
        s = ks.get(b"s", 100)
        assert s is not None
        self.assertEqual((s.value, s.expires_at), (b"v", 5000))
        lst = ks.get(b"l", 100)
        assert lst is not None
        self.assertEqual((list(lst.value), lst.expires_at), ([b"a", b"bc"], None))
        self.assertEqual(pending, {7: bytearray(b"*1\r\n$4\r\nPI"), 9: bytearray()})
        self.assertTrue(ks.has_deadlines())

    def test_golden_blob_encodes_byte_for_byte(self) -> None:
        ks = Keyspace()
        ks.insert(b"s", Entry(b"v", 5000))
        ks.insert(b"l", Entry(deque([b"a", b"bc"])))
        pending = {7: bytearray(b"*1\r\n$4\r\nPI"), 9: bytearray()}
        self.assertEqual(encode_state(ks, pending, "kv/1"), golden_blob())

    def test_round_trip_keeps_expired_keys_until_swept(self) -> None:
        ks = Keyspace()
        ks.insert(b"s", Entry(b"v", 5000))
        ks.insert(b"appended", Entry(bytearray(b"grown")))
        ks.insert(b"l", Entry(deque([b"a", b"\x00\xff"])))
        ks.insert(b"empty-list", Entry(deque()))
        ks.insert(b"old", Entry(b"x", 10))
        ks.insert(b"edge", Entry(b"x", 100))  # deadline == now: expired
        ks.insert(b"", Entry(b""))
        pending = {7: bytearray(b"*1\r\n$4\r\nPI"), 2**64 - 1: bytearray(b"GET")}
        blob = encode_state(ks, pending, "kv/1")
        back, back_pending = decode_state(blob, "kv/1")
        self.assertEqual(sorted(back.keys(100)), [b"", b"appended", b"empty-list", b"l", b"s"])
        self.assertEqual(back_pending, pending)
        self.assertEqual(bytes(back.get(b"appended", 100).value), b"grown")  # type: ignore[union-attr, arg-type]
        self.assertEqual(len(back), 7, "expired keys stay until the sweep")
        # Exporting what was imported gives the same bytes.
        self.assertEqual(encode_state(back, back_pending, "kv/1"), blob)

    def test_expired_keys_are_exported(self) -> None:
        ks = Keyspace()
        ks.insert(b"old", Entry(b"x", 10))
        blob = encode_state(ks, {}, "kv/1")
        self.assertEqual(blob[4:12], (1).to_bytes(8, "little"))

    def test_every_truncation_fails_clearly(self) -> None:
        blob = golden_blob()
        for cut in range(len(blob)):
            with self.subTest(cut=cut):
                with self.assertRaises(StateError) as caught:
                    decode_state(blob[:cut], "kv/1")
                self.assertRegex(str(caught.exception), r"^kv/1 state truncated at byte \d+$")

    def test_malformed_blobs(self) -> None:
        blob = golden_blob()
        cases = [
            (b"KV/2" + blob[4:], "not a kv/1 state (bad magic)"),
            (blob + b"\x00", "1 unexpected bytes after the kv/1 state"),
            (
                blob[:4] + (1).to_bytes(8, "little") + struct.pack("<I", 1) + b"h" + bytes(8) + b"\x02",
                "unknown value type 2 for a key in kv/1 state",
            ),
            (b"KV/1" + (2**64 - 1).to_bytes(8, "little"), "kv/1 state truncated at byte 12"),
        ]
        for bad, message in cases:
            with self.subTest(message=message):
                with self.assertRaises(StateError) as caught:
                    decode_state(bad, "kv/1")
                self.assertEqual(str(caught.exception), message)

    def test_unknown_format(self) -> None:
        with self.assertRaisesRegex(StateError, r"^this version of kv handles \[kv/1\], not kv/2$"):
            decode_state(golden_blob(), "kv/2")
        with self.assertRaisesRegex(StateError, "not kv/9"):
            encode_state(Keyspace(), {}, "kv/9")


if __name__ == "__main__":
    unittest.main()
