"""kv-py: the WIT glue. Exports `handler` and `migrate` of the wasmhost
`service` world by delegating to one ``KvService`` (protocol.py); errors the
world declares as `result<_, string>` are raised as ``Err(text)``.

Build: componentize-py -d ../../guest-wit -w service componentize app -o kv-py.wasm
"""

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host, types

from protocol import KvService

# The one service object: the bindings call into these classes without state.
SERVICE = KvService(host)


class Handler(exports.Handler):
    def init(self, config: list[tuple[str, str]]) -> None:
        try:
            SERVICE.init(config)
        except ValueError as error:
            raise Err(str(error)) from None

    def on_connect(self, conn: types.ConnInfo) -> None:
        SERVICE.on_connect(conn.id)

    def on_data(self, conn: int, data: bytes) -> None:
        SERVICE.on_data(conn, data)

    def on_close(self, conn: int) -> None:
        SERVICE.on_close(conn)

    def on_timer(self, token: int) -> None:
        SERVICE.on_timer(token)


class Migrate(exports.Migrate):
    def importable(self) -> list[str]:
        return SERVICE.importable()

    def exportable(self) -> list[str]:
        return SERVICE.exportable()

    def export_state(self, format: str) -> bytes:
        try:
            return SERVICE.export_state(format)
        except ValueError as error:
            raise Err(str(error)) from None

    def import_state(self, format: str, state: bytes) -> None:
        try:
            SERVICE.import_state(format, state)
        except ValueError as error:
            raise Err(str(error)) from None
