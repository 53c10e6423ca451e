//! `echo`: sends every byte back to the connection it came from. Stateless,
//! so its state formats are trivial: it exports and imports `echo/1`, an
//! empty state.

wit_bindgen::generate!({ path: "../../guest-wit", world: "service" });

use exports::wasmhost::service::handler::{ConnId, ConnInfo, Guest as Handler};
use exports::wasmhost::service::migrate::Guest as Migrate;
use wasmhost::service::host;

struct Echo;

const FORMAT: &str = "echo/1";

impl Handler for Echo {
    fn init(_config: Vec<(String, String)>) -> Result<(), String> {
        Ok(())
    }

    fn on_connect(_conn: ConnInfo) {}

    fn on_data(conn: ConnId, data: Vec<u8>) {
        host::send(conn, &data);
    }

    fn on_close(_conn: ConnId) {}

    fn on_timer(_token: u64) {}
}

impl Migrate for Echo {
    fn importable() -> Vec<String> {
        vec![FORMAT.into()]
    }

    fn exportable() -> Vec<String> {
        vec![FORMAT.into()]
    }

    fn export_state(format: String) -> Result<Vec<u8>, String> {
        match format.as_str() {
            FORMAT => Ok(Vec::new()),
            other => Err(format!("echo cannot export state format {other}")),
        }
    }

    fn import_state(format: String, state: Vec<u8>) -> Result<(), String> {
        match (format.as_str(), state.is_empty()) {
            (FORMAT, true) => Ok(()),
            (FORMAT, false) => Err("echo/1 state must be empty".into()),
            (other, _) => Err(format!("echo cannot import state format {other}")),
        }
    }
}

export!(Echo);
