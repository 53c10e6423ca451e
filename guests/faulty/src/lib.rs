//! `faulty`: a test guest that misbehaves on request, to test the host's
//! deadlines and trap recovery.
//!
//! Line-based. For each line received it replies `<n> <line>`, where `n`
//! counts the lines this instance has handled since it started (so a
//! restart after a trap is visible). Special lines:
//!
//! * `loop`  spins forever (the host's CPU deadline must interrupt it);
//! * `trap`  panics, which traps the instance;
//! * `grow`  allocates memory until the host's memory limit stops it.
//!
//! Its plain build imports and exports no state format. Three feature
//! builds pose as a new version of kv (they import `kv/1`) and fail a swap
//! on purpose:
//!
//! * `reject-state`: `import-state` returns an error;
//! * `trap-import`:  `import-state` traps;
//! * `trap-export`:  `import-state` succeeds, `export-state` traps (the
//!   host's validation step catches it).

wit_bindgen::generate!({ path: "../../guest-wit", world: "service" });

use std::cell::RefCell;
use std::collections::HashMap;

use exports::wasmhost::service::handler::{ConnId, ConnInfo, Guest as Handler};
use exports::wasmhost::service::migrate::Guest as Migrate;
use wasmhost::service::{host, types::LogLevel};

#[derive(Default)]
struct Faulty {
    handled: u64,
    pending: HashMap<ConnId, Vec<u8>>,
}

thread_local! {
    static STATE: RefCell<Faulty> = RefCell::new(Faulty::default());
}

fn misbehave(line: &str) {
    match line {
        "loop" => {
            host::log(LogLevel::Info, "faulty: entering an endless loop");
            let mut x: u64 = 0;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        "trap" => panic!("trap requested"),
        "grow" => {
            let mut hoard = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        _ => {}
    }
}

struct Service;

impl Handler for Service {
    fn init(_config: Vec<(String, String)>) -> Result<(), String> {
        Ok(())
    }

    fn on_connect(conn: ConnInfo) {
        STATE.with_borrow_mut(|s| s.pending.insert(conn.id, Vec::new()));
    }

    fn on_data(conn: ConnId, data: Vec<u8>) {
        let lines: Vec<String> = STATE.with_borrow_mut(|s| {
            let buf = s.pending.entry(conn).or_default();
            buf.extend_from_slice(&data);
            let mut lines = Vec::new();
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                lines.push(String::from_utf8_lossy(&line).trim_end().to_string());
            }
            lines
        });
        for line in lines {
            misbehave(&line);
            let n = STATE.with_borrow_mut(|s| {
                s.handled += 1;
                s.handled
            });
            host::send(conn, format!("{n} {line}\n").as_bytes());
        }
    }

    fn on_close(conn: ConnId) {
        STATE.with_borrow_mut(|s| s.pending.remove(&conn));
    }

    fn on_timer(_token: u64) {}
}

/// Whether this is one of the builds that pose as a new kv.
const POSES_AS_KV: bool = cfg!(any(
    feature = "reject-state",
    feature = "trap-import",
    feature = "trap-export"
));

impl Migrate for Service {
    fn importable() -> Vec<String> {
        if POSES_AS_KV {
            vec!["kv/1".into()]
        } else {
            Vec::new()
        }
    }

    fn exportable() -> Vec<String> {
        if POSES_AS_KV {
            vec!["kv/1".into()]
        } else {
            Vec::new()
        }
    }

    fn export_state(format: String) -> Result<Vec<u8>, String> {
        if cfg!(feature = "trap-export") {
            panic!("trap-export: trapping in export-state as built to");
        }
        Err(format!("faulty exports no state ({format})"))
    }

    fn import_state(format: String, _state: Vec<u8>) -> Result<(), String> {
        if cfg!(feature = "trap-import") {
            panic!("trap-import: trapping in import-state as built to");
        }
        if cfg!(feature = "trap-export") {
            return Ok(());
        }
        Err(format!("this build rejects every state (offered {format})"))
    }
}

export!(Service);
