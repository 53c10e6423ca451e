"""Connects the service in service.py to wasmhost (the WIT world's exports)."""

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host, types

from service import FORMAT, Echo

echo = Echo()


class Handler(exports.Handler):
    def init(self, config: list[tuple[str, str]]) -> None:
        global echo
        echo = Echo()

    def on_connect(self, conn: types.ConnInfo) -> None:
        echo.connect(conn.id)

    def on_data(self, conn: int, data: bytes) -> None:
        echo.data(conn, data, host.send, host.close)

    def on_close(self, conn: int) -> None:
        echo.close(conn)

    def on_timer(self, token: int) -> None:
        pass


class Migrate(exports.Migrate):
    def importable(self) -> list[str]:
        return [FORMAT]

    def exportable(self) -> list[str]:
        return [FORMAT]

    def export_state(self, format: str) -> bytes:
        if format != FORMAT:
            raise Err(f"cannot export {format}: this version exports [{FORMAT}]")
        return echo.export()

    def import_state(self, format: str, state: bytes) -> None:
        global echo
        if format != FORMAT:
            raise Err(f"cannot import {format}: this version imports [{FORMAT}]")
        try:
            echo = Echo.load(state)
        except ValueError as e:
            raise Err(f"invalid {FORMAT} state: {e}") from None
