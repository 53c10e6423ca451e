"""Runs the service's logic under plain CPython: python3 -m unittest."""

import unittest

from service import Echo


class EchoTest(unittest.TestCase):
    def test_numbers_lines_and_keeps_a_half_line_across_a_swap(self):
        sent = []
        echo = Echo()
        echo.connect(7)
        echo.data(7, b"a\nb\nha", lambda c, d: sent.append(d), lambda c: None)
        self.assertEqual(sent, [b"1 a\n", b"2 b\n"])
        state = echo.export()
        after = Echo.load(state)
        self.assertEqual(after.export(), state)
        after.data(7, b"lf\n", lambda c, d: sent.append(d), lambda c: None)
        self.assertEqual(sent[-1], b"3 half\n")


if __name__ == "__main__":
    unittest.main()
