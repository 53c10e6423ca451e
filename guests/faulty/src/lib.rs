//! `faulty`: a test guest that misbehaves on request, to test the host's
//! deadlines and trap recovery.
//!
//! Line-based. For each line received it replies `<n> <line>`, where `n`
//! counts the lines this instance has handled since it started (so a
//! restart after a trap is visible). Special lines:
//!
//! * `loop`  spins forever (the host's CPU deadline must interrupt it);
//! * `trap`  panics, which traps the instance;
//! * `grow`  allocates memory until the host's memory limit stops it;
//! * `clock` answers what the guest sees of time and randomness in the call;
//! * `remember` keeps the call's wall and monotonic clock and a random
//!   number in the state and answers with them; `recall` answers with
//!   everything remembered (replaying the journal must rebuild the same);
//! * `trap-timer` arms timer 7, which traps when it fires.
//!
//! With `--config trap-every-event=yes` every event traps (a guest the
//! host's restart budget must stop).
//!
//! Its plain build imports and exports `faulty/1` (below) exactly, so the
//! host can snapshot it and rebuild it after a trap. Three feature builds
//! pose as a new version of kv (they import `kv/1`) and fail a swap on
//! purpose:
//!
//! * `reject-state`: `import-state` returns an error;
//! * `trap-import`:  `import-state` traps;
//! * `trap-export`:  `import-state` succeeds, `export-state` traps (the
//!   host's validation step catches it).
//!
//! One more feature build has a state of its own and loses part of it on
//! import, which only a byte-for-byte round trip catches (`wasmhost check`,
//! `wasmhost swap --validate roundtrip`); the default validation (the new
//! version can export what it imported) lets it through:
//!
//! * `lossy-import`: imports and exports `faulty/1` (below), a kv-like
//!   state: the line counter and each open connection's pending bytes (a
//!   line received in part). `import-state` keeps the counter and the
//!   connections but drops their pending bytes, so a line cut in two by a
//!   swap loses its first part. With no pending bytes, its round trip is
//!   exact.
//!
//! `faulty/1`: the counter (u64 little-endian), the number of connections
//! (u32 LE), then per connection in ascending id order its id (u64 LE),
//! the length of its pending bytes (u32 LE) and those bytes; then the
//! number of memories (u32 LE) and each as its length (u32 LE) and UTF-8.

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
    /// What `remember` kept.
    memories: Vec<String>,
}

thread_local! {
    /// `--config trap-every-event=yes`.
    static TRAP_EVERY_EVENT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The timer `trap-timer` arms.
const TRAP_TIMER: u64 = 7;

fn maybe_trap(event: &str) {
    if TRAP_EVERY_EVENT.get() {
        panic!("trap-every-event: trapping in {event}");
    }
}

/// The call's time and a random number, as the guest sees them.
fn memory() -> String {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mono = std::time::Instant::now();
    // `Instant` shows its raw reading (WASI's monotonic clock) in its
    // debug form.
    let random = getrandom::u64().unwrap_or(0);
    format!("wall={wall} mono={mono:?} random={random:016x}")
}

thread_local! {
    static STATE: RefCell<Faulty> = RefCell::new(Faulty::default());
}

/// What the guest sees of time and randomness within one event: each
/// clock read twice, two random numbers (`clock` answers with them).
fn clock_reading() -> String {
    let wall = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    };
    let (w1, m1) = (wall(), std::time::Instant::now());
    // Work that takes real time: the clocks must not move.
    let mut x = 0u64;
    for i in 0..2_000_000u64 {
        x = std::hint::black_box(x.wrapping_add(i));
    }
    let (w2, m2) = (wall(), std::time::Instant::now());
    let r1 = getrandom::u64().unwrap_or(0);
    let r2 = getrandom::u64().unwrap_or(0);
    format!(
        "clock wall {w1} {w2} mono-elapsed {} random {r1:016x} {r2:016x}",
        m2.duration_since(m1).as_nanos()
    )
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
        "trap-timer" => host::set_timer(TRAP_TIMER, 20),
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
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        for (key, value) in config {
            match (key.as_str(), value.as_str()) {
                ("trap-every-event", "yes") => TRAP_EVERY_EVENT.set(true),
                ("trap-every-event", "no") => TRAP_EVERY_EVENT.set(false),
                _ => return Err(format!("unknown setting `{key}={value}`")),
            }
        }
        Ok(())
    }

    fn on_connect(conn: ConnInfo) {
        maybe_trap("on-connect");
        STATE.with_borrow_mut(|s| s.pending.insert(conn.id, Vec::new()));
    }

    fn on_data(conn: ConnId, data: Vec<u8>) {
        maybe_trap("on-data");
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
        for mut line in lines {
            misbehave(&line);
            if line == "clock" {
                line = clock_reading();
            } else if line == "remember" {
                line = format!("remember {}", memory());
                STATE.with_borrow_mut(|s| s.memories.push(line.clone()));
            } else if line == "recall" {
                line = STATE.with_borrow(|s| format!("recall [{}]", s.memories.join("; ")));
            }
            let n = STATE.with_borrow_mut(|s| {
                s.handled += 1;
                s.handled
            });
            host::send(conn, format!("{n} {line}\n").as_bytes());
        }
    }

    fn on_close(conn: ConnId) {
        maybe_trap("on-close");
        STATE.with_borrow_mut(|s| s.pending.remove(&conn));
    }

    fn on_timer(token: u64) {
        maybe_trap("on-timer");
        if token == TRAP_TIMER {
            panic!("trap-timer: trapping in on-timer({token})");
        }
    }
}

/// Whether this is one of the builds that pose as a new kv.
const POSES_AS_KV: bool = cfg!(any(
    feature = "reject-state",
    feature = "trap-import",
    feature = "trap-export"
));

/// Whether this is the build with a state of its own (`faulty/1`).
const LOSSY: bool = cfg!(feature = "lossy-import");

const FORMAT: &str = "faulty/1";

fn formats() -> Vec<String> {
    if POSES_AS_KV {
        vec!["kv/1".into()]
    } else {
        vec![FORMAT.into()]
    }
}

impl Migrate for Service {
    fn importable() -> Vec<String> {
        formats()
    }

    fn exportable() -> Vec<String> {
        formats()
    }

    fn export_state(format: String) -> Result<Vec<u8>, String> {
        if cfg!(feature = "trap-export") {
            panic!("trap-export: trapping in export-state as built to");
        }
        if !POSES_AS_KV && format == FORMAT {
            return Ok(STATE.with_borrow(encode));
        }
        Err(format!("faulty exports no state ({format})"))
    }

    fn import_state(format: String, state: Vec<u8>) -> Result<(), String> {
        if cfg!(feature = "trap-import") {
            panic!("trap-import: trapping in import-state as built to");
        }
        if cfg!(feature = "trap-export") {
            return Ok(());
        }
        if !POSES_AS_KV && format == FORMAT {
            let mut imported = decode(&state)?;
            if LOSSY {
                // The fault this build exists for: pending bytes are dropped.
                for pending in imported.pending.values_mut() {
                    pending.clear();
                }
            }
            STATE.with_borrow_mut(|s| *s = imported);
            return Ok(());
        }
        Err(format!("this build rejects every state (offered {format})"))
    }
}

/// Writes `faulty/1`.
fn encode(s: &Faulty) -> Vec<u8> {
    let mut ids: Vec<ConnId> = s.pending.keys().copied().collect();
    ids.sort_unstable();
    let mut out = Vec::new();
    out.extend_from_slice(&s.handled.to_le_bytes());
    out.extend_from_slice(&(ids.len() as u32).to_le_bytes());
    for id in ids {
        let pending = &s.pending[&id];
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&(pending.len() as u32).to_le_bytes());
        out.extend_from_slice(pending);
    }
    out.extend_from_slice(&(s.memories.len() as u32).to_le_bytes());
    for memory in &s.memories {
        out.extend_from_slice(&(memory.len() as u32).to_le_bytes());
        out.extend_from_slice(memory.as_bytes());
    }
    out
}

/// Reads `faulty/1`.
fn decode(mut bytes: &[u8]) -> Result<Faulty, String> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if bytes.len() < n {
            return Err(format!("{FORMAT} state is truncated"));
        }
        let (head, rest) = bytes.split_at(n);
        *bytes = rest;
        Ok(head)
    }
    let u64_at = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    let u32_at = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
    let mut s = Faulty {
        handled: u64_at(take(&mut bytes, 8)?),
        ..Faulty::default()
    };
    let count = u32_at(take(&mut bytes, 4)?);
    for _ in 0..count {
        let id = u64_at(take(&mut bytes, 8)?);
        let len = u32_at(take(&mut bytes, 4)?) as usize;
        s.pending.insert(id, take(&mut bytes, len)?.to_vec());
    }
    let count = u32_at(take(&mut bytes, 4)?);
    for _ in 0..count {
        let len = u32_at(take(&mut bytes, 4)?) as usize;
        let memory = String::from_utf8(take(&mut bytes, len)?.to_vec())
            .map_err(|_| format!("a {FORMAT} memory is not UTF-8"))?;
        s.memories.push(memory);
    }
    if !bytes.is_empty() {
        return Err(format!("{} bytes after the {FORMAT} state", bytes.len()));
    }
    Ok(s)
}

export!(Service);
