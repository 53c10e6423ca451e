//! `kv`: a Redis-protocol (RESP2) key-value service.
//!
//! Strings, lists and expiry, with the handshake commands that Redis clients
//! and tools send. The whole state (keys, expiries, and each connection's
//! unparsed bytes) moves to another version as `kv/1` (see `state.rs`).
//!
//! Built with the `v2` feature it is kv-v2: hashes (HSET, HGET, HDEL,
//! HGETALL, HLEN, HINCRBY) and the state format `kv/2`; it imports `kv/2`
//! and `kv/1`, and exports `kv/1` too while no key holds a hash.
//!
//! Built with the `odd` feature it is kv-odd, a test build for shadow
//! swaps (see `odd.rs`).

mod commands;
mod db;
#[cfg(feature = "v2")]
mod hashes;
mod keyspace;
#[cfg(feature = "odd")]
mod odd;
#[cfg(test)]
mod prop;
mod resp;
mod state;

use wasmhost_guest::state::Formats;
use wasmhost_guest::{ConnId, Input, Service, host};

use commands::{After, Call};
use db::Db;
use resp::{Out, Parsed};

/// The timer that deletes expired keys.
const SWEEP_TIMER: u64 = 1;
const SWEEP_EVERY_MS: u64 = 100;
/// Most keys deleted per sweep, so one timer event stays short.
const SWEEP_BUDGET: usize = 1000;

pub struct Kv {
    db: Db,
    /// `--config enable-debug-command=yes` (Redis's option): DEBUG SEGFAULT
    /// makes the guest trap. Not part of the state: a version swapped in
    /// starts with it off.
    debug: bool,
    /// The reply buffer, reused from one event to the next.
    out: Out,
}

impl Kv {
    /// A service holding `db` (an imported state): the sweep timer runs if
    /// any key has a deadline.
    fn with_db(db: Db) -> Kv {
        if db.has_deadlines() {
            host::set_timer(SWEEP_TIMER, SWEEP_EVERY_MS);
        }
        Kv {
            db,
            debug: false,
            out: Out::default(),
        }
    }
}

impl Service for Kv {
    /// As Redis's `client-query-buffer-limit`: a client that sends more
    /// than this without completing a command is closed.
    const MAX_INPUT: usize = 1 << 30;

    fn init(config: Vec<(String, String)>) -> Result<Self, String> {
        let mut debug = false;
        for (key, value) in config {
            debug = match (key.as_str(), value.as_str()) {
                ("enable-debug-command", "yes") => true,
                ("enable-debug-command", "no") => false,
                ("enable-debug-command", _) => {
                    return Err(format!(
                        "enable-debug-command takes yes or no, got `{value}`"
                    ));
                }
                _ => {
                    return Err(format!(
                        "unknown setting `{key}` (kv knows enable-debug-command=yes|no)"
                    ));
                }
            };
        }
        Ok(Kv {
            db: Db::default(),
            debug,
            out: Out::default(),
        })
    }

    fn on_data(&mut self, conn: ConnId, input: &mut Input) {
        let now = host::now_ms();
        let mut out = std::mem::take(&mut self.out);
        let had_deadlines = self.db.has_deadlines();
        // Every whole command in the input, parsed in place: the arguments
        // are slices of the input, which is consumed once at the end.
        let buf = input.bytes();
        let mut used = 0;
        let mut args = Vec::new();
        let after = loop {
            match resp::parse(&buf[used..], &mut args) {
                Parsed::Incomplete => break After::Continue,
                Parsed::Error(msg) => {
                    out.error(msg);
                    break After::Close;
                }
                Parsed::Command(len) => {
                    used += len;
                    if args.is_empty() {
                        continue;
                    }
                    let mut call = Call {
                        db: &mut self.db,
                        args: &args,
                        now,
                        conn,
                        out: &mut out,
                        debug: self.debug,
                    };
                    if commands::execute(&mut call) == After::Close {
                        break After::Close;
                    }
                }
            }
        };
        drop(args);
        input.consume(used);
        if !out.buf.is_empty() {
            host::send(conn, &out.buf);
        }
        // The reply buffer is kept for the next event (unless a big reply
        // grew it).
        out.buf.clear();
        if out.buf.capacity() <= 64 * 1024 {
            self.out = out;
        }
        if after == After::Close {
            host::close(conn);
            input.clear();
        }
        if !had_deadlines && self.db.has_deadlines() {
            host::set_timer(SWEEP_TIMER, SWEEP_EVERY_MS);
        }
    }

    fn on_timer(&mut self, token: u64) {
        if token != SWEEP_TIMER {
            return;
        }
        let removed = self.db.sweep(host::now_ms(), SWEEP_BUDGET);
        if removed == SWEEP_BUDGET {
            host::set_timer(SWEEP_TIMER, 1); // more are due: go on soon
        } else if self.db.has_deadlines() {
            host::set_timer(SWEEP_TIMER, SWEEP_EVERY_MS);
        }
    }

    fn formats() -> Formats<Self> {
        state::formats()
    }
}

wasmhost_guest::export_service!(Kv);

#[cfg(test)]
mod tests {
    use wasmhost_guest::testing::TestHost;

    use super::*;

    #[test]
    fn a_half_command_and_a_deadline_survive_a_swap() {
        let mut host = TestHost::<Kv>::start(&[]).unwrap();
        host.set_now_ms(1_000_000);
        let (c, _) = host.connect();
        let set = host.data(
            c,
            "*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n$2\r\nPX\r\n$3\r\n500\r\n",
        );
        assert_eq!(set.text_to(c), "+OK\r\n");
        assert_eq!(set.timers_set(), [(SWEEP_TIMER, SWEEP_EVERY_MS)]);
        assert!(host.data(c, "*2\r\n$3\r\nGET\r\n$1").is_empty());
        let mut host = host.swap_to::<Kv>("kv/1").unwrap();
        assert_eq!(host.data(c, "\r\nk\r\n").text_to(c), "$1\r\nv\r\n");
        host.set_now_ms(1_000_600);
        host.timer(SWEEP_TIMER);
        assert_eq!(host.service().db.len(), 0, "swept once past the deadline");
    }

    #[test]
    fn quit_and_protocol_errors_close_the_connection() {
        let mut host = TestHost::<Kv>::start(&[]).unwrap();
        let (c, _) = host.connect();
        let quit = host.data(c, "QUIT\r\nPING\r\n");
        assert_eq!(quit.text_to(c), "+OK\r\n");
        assert!(quit.closed(c));
        assert!(host.pending(c).is_empty());
        let (d, _) = host.connect();
        let bad = host.data(d, "*1\r\n+x\r\n");
        assert!(
            bad.text_to(d).starts_with("-Protocol error"),
            "{}",
            bad.text_to(d)
        );
        assert!(bad.closed(d));
    }
}
