//! Moving a live service, with its connections, to a `wasmhost` on another
//! machine: `wasmhost serve --receive ADDR` waits for a service;
//! `wasmhost migrate --to ADDR (--move-ip IP/PREFIX | --relay)` sends one.
//!
//! It is the host upgrade's move (`crate::upgrade`) across a network: the
//! same freeze at an update point (`crate::service::Handoff`), the same
//! manifest (`ServiceImage`: counters, history, timers, connection ids,
//! unread and unsent bytes), the same state negotiation, import and
//! validation, the same way back (`Actor::thaw`). What differs is the
//! transport (a mutually authenticated TLS link, [`link`], instead of a
//! Unix socket) and what stands in for passing descriptors: in `--move-ip`
//! mode each connection's TCP state is frozen with `TCP_REPAIR` and
//! recreated on the receiver ([`repair`]), and the service address moves
//! with it; in `--relay` mode the sender keeps the client sockets and
//! relays their bytes over the link.
//!
//! # The protocol
//!
//! The sender (S) is the running host; the receiver (R) is a host started
//! with `serve --receive ADDR` and no service. Messages are length-framed
//! JSON headers with a binary payload on one TLS connection ([`link`]);
//! both sides present a certificate signed by the CA each side trusts, and
//! S checks R's name. Every message carries or follows from [`VERSION`];
//! each migration has an id (S's pid, a counter and the time) that R
//! remembers after the move, so S can ask what became of it.
//!
//! | phase | S does | R does | failure (what happens) |
//! |---|---|---|---|
//! | 1 `connect` | opens the link (TLS, client certificate) | accepts one sender at a time; refuses a certificate its CA did not sign | wrong certificate, R unreachable or busy: S reports it, nothing changed |
//! | 2 `offer` | sends `Offer` (version, id, service, mode, component hash and size, listener addresses) | answers `Need` (whether it must be sent the component: not if its compile cache has the hash) or `Failed` (already serving, another version, `--move-ip` without CAP_NET_ADMIN and CAP_NET_RAW) | `Failed` or no answer: S reports R's reason, nothing changed |
//! | 3 `prepare` | sends the component's bytes if asked | checks the hash, compiles and instantiates, asks `importable()`; answers `Prepared` (the upgrade's) | `Failed`, link lost or no answer before the deadline: S reports it, nothing changed |
//! | 4 `freeze` | at an update point: stops accepting and reading, collects sockets and unread and unsent bytes, exports the state (the upgrade's `Handoff`). `--move-ip`: every connection socket enters repair mode, the address is removed (netlink), then each socket's TCP state and kernel queues are read ([`repair::freeze`]) | waits | export refused or trapped, a socket that cannot be frozen (not ESTABLISHED, not IPv4 on the moving address): S resumes (below), sends `Abort`, reports the step |
//! | 5 `send` | sends `Manifest`: the `ServiceImage`, each connection's `TcpImage` (move-ip) and a payload of the state, each connection's unread and unsent bytes (the kernel's unsent bytes joined to the host's) and its sent-but-unacknowledged bytes | receives and checks lengths and counts against each other | link lost: S resumes |
//! | 6 `import` | waits for `Ready` | imports the state (the swap's import and validation), arms timers, builds the service without serving; move-ip: recreates every socket in repair mode ([`repair::restore`]), not yet reachable (the address is not up); relay: binds the listeners on its own address (same ports) and gives the service one end of a socket pair per connection; answers `Ready` with its timings | `Failed`, link lost, or no `Ready` before the deadline: S sends `Abort` and resumes; R drops what it built (its repaired sockets close silently) and waits again |
//! | 7 `commit` | sends `Commit` with the report, waits for `Serving` | on `Commit`, and only then: move-ip: adds the address (netlink), announces it (gratuitous ARP), takes every socket out of repair mode; relay: connections are served through the link; then serves (the listeners bound in phase 6 start accepting) (unsent bytes first, unread bytes to the guest first) and answers `Serving` with the restore's timings | see below |
//! | 8 `release` | on `Serving`: move-ip: closes its sockets in repair mode (no FIN, no RST reaches a client); relay: keeps the client sockets and relays their bytes both ways until they close; its service ends (a host with `--receive` waits for a service again, its control socket answering `status` with where the service went) | serves; answers `Outcome` queries for this id | |
//!
//! With `--relay`, phases 4 and 5 leave the sockets alone (no repair mode,
//! no address): their kernel queues stay where they are and cross the
//! link after the commit, in order, like any later byte. From phase 8 the
//! link carries `Data { id }` (bytes, as payload) and `Eof { id }` (no more
//! this way) frames for every connection ([`relay`]); S keeps copies of
//! the client sockets taken before its service closes its own, and its
//! process lives until the last relayed connection has ended both ways.
//! A link that breaks then closes the relayed connections on both sides.
//!
//! With `--move-ip --keepalived` ([`address::Keepalived`]) keepalived
//! owns the address and wasmhost never adds or removes it; it moves it by
//! writing each host's `vrrp_track_file` (`serve --keepalived-track`):
//!
//! | phase | S does | R does | failure (what happens) |
//! |---|---|---|---|
//! | 2 `offer` | `Offer` says `keepalived` | refuses without a track file; otherwise writes 1 to its own (its instance goes into FAULT, so it cannot take the address before its sockets exist), remembering whether it was 1 already | as above |
//! | 4 `freeze` | instead of removing the address: writes 1 to its track file and waits (up to 10 s) until keepalived has dropped the address | waits | keepalived does not drop it in time: S resumes |
//! | 7 `commit` | as above | instead of adding and announcing the address: writes 0 to its track file, waits (up to 10 s, then serves anyway with a warning) until keepalived has added it (keepalived announces it), then takes the sockets out of repair mode | as above |
//! | 8 `release` | keeps its track file at 1: out of FAULT its instance would preempt and take the address back without the sockets | serves | |
//!
//! Resuming, S writes 0 to its track file and waits for keepalived to give
//! the address back before the sockets leave repair mode (R still holds
//! FAULT, so only S can take it). R, after any failure (even one after its
//! commit took it out of FAULT), writes 1 again at once, then 0 10 s later
//! if it was 0 before the offer, unless another move to it has begun
//! meanwhile (that one takes the duty over). A receiver killed mid-move
//! leaves its instance in FAULT (the safe side: it takes no address
//! without sockets) until a move to it commits.
//!
//! **Resuming** (S, before phase 7): take every socket out of repair mode,
//! put the address back, thaw: every connection served again, the guest
//! given the bytes read meanwhile. Nothing a client sent is lost: the
//! kernel queues were only read, never consumed, and repair mode keeps the
//! connection silent, not closed.
//!
//! **After `Commit` is sent**, R serves if and only if it received it, and
//! S cannot see which when the link breaks. So S does not guess: it opens
//! the link again and asks `Outcome` for the migration id. `Serving`: S
//! releases (phase 8). `Aborted` or "no such migration": S resumes.
//! Connection refused: R's process is gone, and the service lives only in
//! that process, so nothing serves there: S resumes. No answer before the
//! deadline (R unreachable): S stays frozen, says so, and keeps asking in
//! the background (every five seconds) until R answers, then releases or
//! resumes. Resuming without an answer could put the service, and its
//! address, on two machines at once; staying frozen keeps it on none
//! until R can say which.
//!
//! # Testing the failure paths
//!
//! `WASMHOST_TEST_MIGRATE_FAIL=<step>` in R's environment makes R fail at
//! that step on purpose: `offer` (answer `Failed`), `prepare` (answer
//! `Failed`), `crash` (die after receiving the manifest), `import` (answer
//! `Failed` as a state rejection), `ready` (never answer), `commit` (die on
//! `Commit`, before serving). Each test checks that S serves every
//! connection with its state afterwards. The keepalived variant is tested
//! with `import` (tests/tests/fleet.rs): S leaves FAULT and keepalived
//! gives it the address back while clients keep their connections.

pub mod address;
pub mod link;
mod receive;
pub mod relay;
pub mod repair;
mod send;

use serde::{Deserialize, Serialize};

pub use address::ServiceAddr;
pub use link::TlsFiles;
pub use receive::Port;
pub use send::{How, MigrateOptions, migrate};

use crate::service::SwapReport;

/// The migration protocol's version. A receiver that speaks another one
/// answers `Failed` at `offer` (the sender keeps serving).
pub const VERSION: u32 = 1;

/// Test-only: the step at which the receiver fails on purpose.
pub const FAIL_ENV: &str = "WASMHOST_TEST_MIGRATE_FAIL";

/// The move that took this host's last service away (its report).
static LAST_MOVE: std::sync::Mutex<Option<SwapReport>> = std::sync::Mutex::new(None);

fn remember_move(report: &SwapReport) {
    *LAST_MOVE.lock().expect("last move lock") = Some(report.clone());
}

/// The report of the move that took this host's last service away.
pub fn last_move() -> Option<SwapReport> {
    LAST_MOVE.lock().expect("last move lock").clone()
}

/// Whether this process was asked (by a test) to fail at `step`.
fn fail_at(step: &str) -> bool {
    std::env::var(FAIL_ENV).is_ok_and(|s| s == step)
}

/// A message on the link.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Message {
    /// S → R: what is coming.
    Offer(Offer),
    /// R → S: whether R needs the component's bytes.
    Need { component: bool },
    /// S → R: the component; payload: its bytes.
    Component,
    /// R → S: loaded and instantiated (the upgrade's message).
    Prepared(crate::upgrade::Prepared),
    /// S → R: the frozen service; payload: the state, every connection's
    /// unread and unsent bytes, then every connection's unacknowledged
    /// bytes.
    Manifest(Box<Manifest>),
    /// R → S: imported and restored; waiting for `Commit`.
    Ready {
        import_us: u64,
        validate_us: u64,
        tcp_restore_us: u64,
        /// From the manifest's arrival to this message.
        after_receive_us: u64,
    },
    /// S → R: serve.
    Commit { report: Box<SwapReport> },
    /// R → S: R serves.
    Serving {
        address_add_us: u64,
        repair_off_us: u64,
        /// Where R's listeners are (with `--relay`, R's own addresses).
        #[serde(default)]
        listening: Vec<String>,
    },
    /// S → R: do not serve; S serves on.
    Abort { reason: String },
    /// Either way: this step failed.
    Failed { step: String, message: String },
    /// S → R, on a new link after losing the old one past `Commit`: what
    /// became of migration `id`?
    Query { id: String },
    /// R → S: the answer.
    Outcome { id: String, outcome: Outcome },
    /// Relay, either way: bytes of connection `id` (the payload).
    Data { id: u64 },
    /// Relay, either way: connection `id` has no more bytes this way.
    Eof { id: u64 },
    /// Standby → primary: ship me this host's state dir (`crate::standby`).
    Follow(crate::standby::Follow),
    /// Primary → standby: followed; what follows is the stream.
    Following { epoch: u64, service: String },
    /// Primary → standby: a write of the state dir (payload: its bytes).
    Replicate(crate::standby::Rep),
    /// Standby → primary: every append up to `seq` is written.
    Ack { seq: u64 },
    /// Either way: what is your epoch? (fencing, `crate::standby`)
    EpochQuery,
    /// The answer.
    Epoch { epoch: u64, serving: bool },
}

/// What became of a migration, as its receiver knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// R received `Commit` and serves (or served) the service.
    Serving,
    /// R dropped it (an abort, a failure, or the link lost before
    /// `Commit`).
    Aborted,
    /// R has no record of it.
    Unknown,
}

/// How the connections move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// TCP_REPAIR and the service address moving along.
    MoveIp,
    /// The sender keeps the client sockets and relays their bytes.
    Relay,
}

/// S → R: what a migration brings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Offer {
    pub version: u32,
    /// Unique per migration: the sender's pid, a counter and the time.
    pub id: String,
    pub service: String,
    pub mode: Mode,
    /// The service address that moves (`move-ip`).
    pub address: Option<ServiceAddr>,
    /// keepalived moves the address (`migrate --keepalived`): the
    /// receiver holds its own instance in FAULT until its sockets exist.
    #[serde(default)]
    pub keepalived: bool,
    /// Hex SHA-256 of the component's bytes, and their length.
    pub component_hash: String,
    pub component_size: u64,
}

/// S → R: the frozen service: the host upgrade's manifest (the service
/// image, payload lengths) plus each connection's TCP state.
#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub upgrade: crate::upgrade::Manifest,
    /// One per connection of `upgrade.image.conns`, in order.
    pub tcp: Vec<repair::TcpImage>,
}

impl Manifest {
    /// The unacknowledged bytes' share of the payload.
    fn unacked_len(&self) -> u64 {
        self.tcp.iter().map(|t| u64::from(t.unacked_len)).sum()
    }

    /// Checks the manifest against the payload's length before anything
    /// is trusted.
    fn check(&self, mode: Mode, payload_len: usize) -> Result<(), String> {
        let tcp_states = match mode {
            Mode::MoveIp => self.upgrade.image.conns.len(),
            Mode::Relay => 0,
        };
        if self.tcp.len() != tcp_states {
            return Err(format!(
                "the manifest lists {} connections and {} TCP states",
                self.upgrade.image.conns.len(),
                self.tcp.len()
            ));
        }
        let unacked = self.unacked_len();
        let rest = (payload_len as u64)
            .checked_sub(unacked)
            .ok_or("the payload is shorter than its unacknowledged bytes")?;
        self.upgrade.check(rest as usize)
    }
}
