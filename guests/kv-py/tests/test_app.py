"""Tests of app.py, the WIT glue, with stand-ins for the generated bindings
(which exist only inside the component build)."""

import importlib
import sys
import types
import unittest
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass(frozen=True)
class Err(Exception):
    value: str


@dataclass
class ConnInfo:
    id: int
    listener: str
    peer: str


def install_fake_bindings(host: types.SimpleNamespace) -> None:
    """Registers modules shaped like componentize-py's generated ones."""
    wit_world = types.ModuleType("wit_world")
    exports = types.ModuleType("wit_world.exports")
    exports.Handler = type("Handler", (), {})  # type: ignore[attr-defined]
    exports.Migrate = type("Migrate", (), {})  # type: ignore[attr-defined]
    imports = types.ModuleType("wit_world.imports")
    imports.host = host  # type: ignore[attr-defined]
    imports.types = types.SimpleNamespace(ConnInfo=ConnInfo)  # type: ignore[attr-defined]
    cpt = types.ModuleType("componentize_py_types")
    cpt.Err = Err  # type: ignore[attr-defined]
    sys.modules.update(
        {"wit_world": wit_world, "wit_world.exports": exports, "wit_world.imports": imports, "componentize_py_types": cpt}
    )


class AppTest(unittest.TestCase):
    def setUp(self) -> None:
        self.sent: list[tuple[int, bytes]] = []
        host = types.SimpleNamespace(
            send=lambda conn, data: self.sent.append((conn, data)),
            close=lambda conn: None,
            set_timer=lambda token, delay: None,
        )
        install_fake_bindings(host)
        sys.modules.pop("app", None)
        self.app = importlib.import_module("app")

    def tearDown(self) -> None:
        for name in ["app", "wit_world", "wit_world.exports", "wit_world.imports", "componentize_py_types"]:
            sys.modules.pop(name, None)

    def test_events_reach_the_service(self) -> None:
        handler = self.app.Handler()
        handler.init([])
        handler.on_connect(ConnInfo(5, "default", "127.0.0.1:1"))
        handler.on_data(5, b"PING\r\n")
        self.assertEqual(self.sent, [(5, b"+PONG\r\n")])
        handler.on_close(5)
        handler.on_timer(1)

    def test_errors_become_err(self) -> None:
        with self.assertRaises(Err) as caught:
            self.app.Handler().init([("x", "1")])
        self.assertEqual(
            caught.exception.value, "unknown setting `x` (kv knows enable-debug-command=yes|no)"
        )
        migrate = self.app.Migrate()
        self.assertEqual((migrate.importable(), migrate.exportable()), (["kv/1"], ["kv/1"]))
        with self.assertRaises(Err) as caught:
            migrate.import_state("kv/1", b"KV/1\x00")
        self.assertEqual(caught.exception.value, "kv/1 state truncated at byte 4")
        with self.assertRaises(Err):
            migrate.export_state("kv/2")
        migrate.import_state("kv/1", migrate.export_state("kv/1"))


if __name__ == "__main__":
    unittest.main()
