//! `kv`: a Redis-protocol (RESP2) key-value service.
//!
//! Strings, lists and expiry, with the handshake commands that Redis clients
//! and tools send. The whole state (keys, expiries, and each connection's
//! unparsed bytes) moves to another version as `kv/1` (see `state.rs`).
//!
//! Built with the `v2` feature it is kv-v2: hashes (HSET, HGET, HDEL,
//! HGETALL, HLEN, HINCRBY) and the state format `kv/2`; it imports `kv/2`
//! and `kv/1`, and exports `kv/1` too while no key holds a hash.

mod commands;
mod db;
#[cfg(feature = "v2")]
mod hashes;
mod resp;
mod state;

use std::cell::RefCell;
use std::collections::HashMap;

wit_bindgen::generate!({ path: "../../guest-wit", world: "service" });

use exports::wasmhost::service::handler::{ConnId, ConnInfo, Guest as Handler};
use exports::wasmhost::service::migrate::Guest as Migrate;
use wasmhost::service::host;

use commands::{After, Call};
use db::Db;
use resp::{Out, Parsed};

/// The timer that deletes expired keys.
const SWEEP_TIMER: u64 = 1;
const SWEEP_EVERY_MS: u64 = 100;
/// Most keys deleted per sweep, so one timer event stays short.
const SWEEP_BUDGET: usize = 1000;

#[derive(Default)]
struct Kv {
    db: Db,
    /// Each connection's bytes that are not yet a whole command.
    pending: HashMap<ConnId, Vec<u8>>,
}

thread_local! {
    static KV: RefCell<Kv> = RefCell::new(Kv::default());
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Kv {
    fn on_data(&mut self, conn: ConnId, data: Vec<u8>) {
        let mut buf = match self.pending.get_mut(&conn) {
            Some(p) if !p.is_empty() => {
                p.extend_from_slice(&data);
                std::mem::take(p)
            }
            _ => data,
        };
        let now = now_ms();
        let mut out = Out::default();
        let mut pos = 0;
        let had_deadlines = self.db.has_deadlines();
        let after = loop {
            match resp::parse(&buf[pos..]) {
                Parsed::Incomplete => break After::Continue,
                Parsed::Error(msg) => {
                    out.error(msg);
                    break After::Close;
                }
                Parsed::Command(args, used) => {
                    pos += used;
                    if args.is_empty() {
                        continue;
                    }
                    let mut call = Call {
                        db: &mut self.db,
                        args: &args,
                        now,
                        conn,
                        out: &mut out,
                    };
                    if commands::execute(&mut call) == After::Close {
                        break After::Close;
                    }
                }
            }
        };
        if !out.buf.is_empty() {
            host::send(conn, &out.buf);
        }
        if after == After::Close {
            host::close(conn);
            self.pending.remove(&conn);
            return;
        }
        buf.drain(..pos);
        self.pending.insert(conn, buf);
        if !had_deadlines && self.db.has_deadlines() {
            host::set_timer(SWEEP_TIMER, SWEEP_EVERY_MS);
        }
    }

    fn on_timer(&mut self, token: u64) {
        if token != SWEEP_TIMER {
            return;
        }
        let removed = self.db.sweep(now_ms(), SWEEP_BUDGET);
        if removed == SWEEP_BUDGET {
            host::set_timer(SWEEP_TIMER, 1); // more are due: go on soon
        } else if self.db.has_deadlines() {
            host::set_timer(SWEEP_TIMER, SWEEP_EVERY_MS);
        }
    }
}

struct Service;

impl Handler for Service {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        if let Some((key, _)) = config.first() {
            return Err(format!("kv takes no configuration, got `{key}`"));
        }
        Ok(())
    }

    fn on_connect(conn: ConnInfo) {
        KV.with_borrow_mut(|kv| kv.pending.insert(conn.id, Vec::new()));
    }

    fn on_data(conn: ConnId, data: Vec<u8>) {
        KV.with_borrow_mut(|kv| kv.on_data(conn, data));
    }

    fn on_close(conn: ConnId) {
        KV.with_borrow_mut(|kv| kv.pending.remove(&conn));
    }

    fn on_timer(token: u64) {
        KV.with_borrow_mut(|kv| kv.on_timer(token));
    }
}

impl Migrate for Service {
    fn importable() -> Vec<String> {
        state::importable()
    }

    fn exportable() -> Vec<String> {
        KV.with_borrow(|kv| state::exportable(&kv.db))
    }

    fn export_state(format: String) -> Result<Vec<u8>, String> {
        KV.with_borrow(|kv| state::export(&kv.db, &kv.pending, &format))
    }

    fn import_state(format: String, bytes: Vec<u8>) -> Result<(), String> {
        let (db, pending) = state::import(&bytes, &format, now_ms())?;
        if db.has_deadlines() {
            host::set_timer(SWEEP_TIMER, SWEEP_EVERY_MS);
        }
        KV.set(Kv { db, pending });
        Ok(())
    }
}

export!(Service);
